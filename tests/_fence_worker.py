"""A leader process that writes fenced rows, for tests/test_fence_postgres.py.

Usage: python -m tests._fence_worker DSN NODE INTERVAL MODE

MODE ``pause``: lead, take a Fence, print ``fenced``, then wait for a line on stdin and run a
fenced transaction with that (by then perhaps stale) fence; print ``committed`` or
``refused``. MODE ``stress``: while leading, write fenced rows ``(term, node, seq)`` into
``writes`` in a loop, until SIGTERM. Prints JSON lines.
"""

from __future__ import annotations

import json
import signal
import sys

import asyncpg
import trio
import trio_asyncio

from trio_peers import PeerConfig, TenureLost, open_peer


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def pause(dsn: str, config: PeerConfig) -> None:
    async with open_peer(config) as peer, trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
        await peer.wait_leader()
        fence = peer.fence()
        emit("fenced", term=fence.term)
        await trio.to_thread.run_sync(sys.stdin.readline)
        try:
            async with peer.fenced_transaction(conn, fence=fence):
                await trio_asyncio.aio_as_trio(conn.execute)(
                    "INSERT INTO writes VALUES ($1, $2, 0)", fence.term, config.node
                )
        except TenureLost:
            emit("refused")
        else:
            emit("committed")
        conn.terminate()


async def stress(dsn: str, config: PeerConfig) -> None:
    seq = 0
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with open_peer(config) as peer, trio_asyncio.open_loop(), trio.open_nursery() as n:

            async def stop() -> None:
                async for _ in signals:
                    n.cancel_scope.cancel()

            n.start_soon(stop)
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
            emit("ready")
            while True:
                await peer.wait_leader()
                try:
                    async with peer.fenced_transaction(conn) as fence:
                        seq += 1
                        await trio_asyncio.aio_as_trio(conn.execute)(
                            "INSERT INTO writes VALUES ($1, $2, $3)", fence.term, config.node, seq
                        )
                except (TenureLost, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await trio.sleep(0.01)
                    if conn.is_closed():
                        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
                await trio.sleep(0.005)


def main() -> None:
    dsn, node, interval, mode = sys.argv[1:5]
    config = PeerConfig(dsn=dsn, node=node, interval=float(interval))
    trio.run(pause if mode == "pause" else stress, dsn, config)


if __name__ == "__main__":
    main()
