"""The floor: a handover's database work through plain asyncio asyncpg, no library.

    python benchmarks/_floor_proc.py leader|follower DSN [ID]

Both processes use trio-peers' own SQL (the release and election statements,
prepared once). The ``leader`` process takes the lease on ``join`` and, on
``leave``, reports ``leaving`` and runs the release statement, which expires the
lease and sends NOTIFY in one transaction. The ``follower`` LISTENs; its
notification callback runs the election statement at once and reports ``gained``
when it returns; on ``free``, the winner expires its lease quietly, without NOTIFY,
so that the next round starts from a free lease. ``gained.t - leaving.t`` is one release statement, one
NOTIFY delivery and one election statement between two processes: what the
hardware, the server and the driver allow, with no library in the way. With several
followers (each with its own ``ID``), every one bids at once, as library followers do,
and reports ``gained`` with ``won`` true or false.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time

import asyncpg

from trio_peers._core import down_payload
from trio_peers._sql import Statements

NAME = "floor"
CHANNEL = "public.trio_peers"
LEASE = datetime.timedelta(seconds=30)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def main(role: str, dsn: str) -> None:
    sql = Statements("public", "trio_peers")
    conn = await asyncpg.connect(dsn)
    elect = await conn.prepare(sql.elect)
    release = await conn.prepare(sql.release)
    node = f"floor-{role}-{sys.argv[3] if len(sys.argv) > 3 else 0}"
    loop = asyncio.get_running_loop()

    async def bid() -> int | None:
        row = await elect.fetchrow(NAME, node, LEASE, None, LEASE, 0)
        assert row is not None  # the election statement always returns one row
        won: int | None = row["won_term"]
        return won

    busy = asyncio.Lock()  # one statement at a time on the connection

    held: list[int] = []

    async def react() -> None:
        async with busy:
            won = await bid()
            emit("gained", won=won is not None)
            if won is not None:
                held.append(won)

    if role == "follower":
        tasks: set[asyncio.Task[None]] = set()

        def on_notify(*_: object) -> None:
            task = loop.create_task(react())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await conn.add_listener(CHANNEL, on_notify)
    emit("ready")
    term = None
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "join" and role == "leader":
            while term is None:
                term = await bid()
                if term is None:
                    await asyncio.sleep(0.001)
            emit("joined", leader=True)
        elif command == "leave" and role == "leader":
            emit("leaving")
            await release.fetch(NAME, node, term, CHANNEL, down_payload(NAME, term or 0, "floor"))
            term = None
            emit("left")
        elif command == "free" and held:
            # Free the lease again, without a notification (nobody listens on that channel).
            async with busy:
                await release.fetch(NAME, node, held.pop(), "floor.quiet", "x")
            emit("freed")
        elif command in ("quit", ""):
            break
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
