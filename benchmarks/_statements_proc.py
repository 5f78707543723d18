"""The election statement's latency through trio-asyncio vs plain asyncio asyncpg.

    python benchmarks/_statements_proc.py trio|asyncio DSN N

Both sides renew a held lease with the same prepared SQL over one connection, ``N``
times. The orchestrator runs alternating blocks (trio, asyncio, trio, asyncio) so that
a change of machine load hits both. Each side runs in a process of its own: importing
trio-asyncio replaces asyncio's event loop policy, so "plain asyncio" must not share a
process with it. Prints one JSON list: seconds per statement.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time

from trio_peers._sql import Statements


def through_trio(dsn: str, n: int, out: list[float]) -> None:
    import trio

    from trio_peers import PeerConfig
    from trio_peers._asyncpg import AsyncpgBackend

    config = PeerConfig(dsn=dsn, name="bench-statements-trio", node="bench", interval=30.0)

    async def run() -> None:
        async with AsyncpgBackend().open(config) as connector:
            conn = await connector.connect(on_notification=lambda _: None, on_lost=lambda: None)
            first = await conn.elect(node="bench", held_term=None, statement_timeout=5)
            assert first.term is not None
            for _ in range(n):
                t0 = time.perf_counter()
                await conn.elect(node="bench", held_term=first.term, statement_timeout=5)
                out.append(time.perf_counter() - t0)
            await conn.release(node="bench", term=first.term, sender="x", statement_timeout=5)
            await conn.aclose()

    trio.run(run)


def through_asyncio(dsn: str, n: int, out: list[float]) -> None:
    import asyncpg

    sql = Statements("public", "trio_peers")
    lease = datetime.timedelta(seconds=30)
    name = "bench-statements-asyncio"

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        elect = await conn.prepare(sql.elect)
        row = await elect.fetchrow(name, "bench", lease, None, lease, 0)
        assert row is not None
        term = row["won_term"]
        assert term is not None
        for _ in range(n):
            t0 = time.perf_counter()
            await elect.fetchrow(name, "bench", lease, term, lease, 0, timeout=5)
            out.append(time.perf_counter() - t0)
        await conn.execute("DELETE FROM trio_peers WHERE name = $1", name)
        await conn.close()

    asyncio.run(run())


def main() -> None:
    side, dsn, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out: list[float] = []
    (through_trio if side == "trio" else through_asyncio)(dsn, n, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
