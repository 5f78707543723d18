"""What a denied bid costs the database: transaction ids, WAL bytes and latency.

    python benchmarks/denied_bids.py [--dsn DSN] [--bids 2000]

Without --dsn it starts a throwaway PostgreSQL (trio_peers.testing.PostgresServer). One
connection holds a lease of 10 minutes; another bids against it ``--bids`` times through the
backend the peers use (one prepared election statement per bid). A denied bid should be a pure
read: no transaction id, no WAL record, nothing to flush at commit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import asyncpg
import trio
import trio_asyncio

from trio_peers import AsyncpgBackend, PeerConfig, migrate
from trio_peers.testing import PostgresServer

_PROBE = (
    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid, "
    "pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS wal"
)


async def measure(dsn: str, bids: int) -> None:
    await migrate(dsn)
    config = PeerConfig(dsn=dsn, name="bench-denied", interval=600.0)
    backend = AsyncpgBackend()
    async with backend.open(config) as hc, backend.open(config) as fc:
        holder = await hc.connect(on_notification=lambda _p: None, on_lost=lambda: None)
        follower = await fc.connect(on_notification=lambda _p: None, on_lost=lambda: None)
        won = await holder.elect(node="holder", held_term=None, statement_timeout=5.0)
        assert won.term is not None, "the lease of bench-denied is held by someone else"
        async with trio_asyncio.open_loop():
            probe = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
            try:
                before = await trio_asyncio.aio_as_trio(probe.fetchrow)(_PROBE)
                latencies = []
                for _ in range(bids):
                    t0 = time.perf_counter()
                    out = await follower.elect(
                        node="follower", held_term=None, statement_timeout=5.0
                    )
                    latencies.append(time.perf_counter() - t0)
                    assert out.term is None
                after = await trio_asyncio.aio_as_trio(probe.fetchrow)(_PROBE)
            finally:
                await trio_asyncio.aio_as_trio(probe.close)()
        await holder.release(node="holder", term=won.term, sender="bench", statement_timeout=5.0)
        for conn in (holder, follower):
            await conn.aclose()
    xids = after["xid"] - before["xid"]
    wal = after["wal"] - before["wal"]
    latencies.sort()
    print(f"denied bids: {bids}")
    print(f"transaction ids consumed: {xids} ({xids / bids:.3f} per bid)")
    print(f"WAL bytes written: {wal} ({wal / bids:.2f} per bid)")
    print(
        f"latency: p50 {statistics.median(latencies) * 1e3:.3f} ms, "
        f"p95 {latencies[int(0.95 * (bids - 1))] * 1e3:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL URI; default: a throwaway server")
    parser.add_argument("--bids", type=int, default=2000)
    args = parser.parse_args()
    if args.dsn:
        trio.run(measure, args.dsn, args.bids)
        return
    with PostgresServer.start() as server:
        trio.run(measure, server.dsn, args.bids)


if __name__ == "__main__":
    main()
