"""Smoke test of the driver stack against a real server: asyncpg under Trio via trio-asyncio,
LISTEN/NOTIFY, and a server restart in the middle."""

from __future__ import annotations

import contextlib

import asyncpg
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from trio_peers.testing import PostgresServer

CHANNEL = "trio_peers_smoke"


async def connect(dsn: str, conns: list[asyncpg.Connection]) -> asyncpg.Connection:
    # trio_asyncio is untyped: say what comes back.
    conn: asyncpg.Connection = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
    conns.append(conn)  # closed by the caller's finally
    return conn


async def notify_roundtrip(
    listener: asyncpg.Connection, sender: asyncpg.Connection, payload: str
) -> None:
    send, receive = trio.open_memory_channel[str](10)

    def on_notify(conn: object, pid: int, channel: str, message: str) -> None:
        # Runs in the asyncio loop: must never raise, or it tears down open_loop (DRIVER P1).
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            send.send_nowait(message)

    await aio_as_trio(listener.add_listener)(CHANNEL, on_notify)
    try:
        await aio_as_trio(sender.execute)("SELECT pg_notify($1, $2)", CHANNEL, payload)
        with trio.fail_after(5):
            assert await receive.receive() == payload
    finally:
        with trio.move_on_after(5, shield=True):
            await aio_as_trio(listener.remove_listener)(CHANNEL, on_notify)
        send.close()


async def test_listen_notify_across_restart(pg: PostgresServer, pg_dsn: str) -> None:
    async with trio_asyncio.open_loop():
        conns: list[asyncpg.Connection] = []
        try:
            listener = await connect(pg_dsn, conns)
            sender = await connect(pg_dsn, conns)
            lost = trio.Event()

            def on_lost(conn: object) -> None:
                lost.set()  # cannot raise

            listener.add_termination_listener(on_lost)
            await notify_roundtrip(listener, sender, "before restart")

            await trio.to_thread.run_sync(pg.restart)

            with trio.fail_after(5):
                await lost.wait()
            assert listener.is_closed()

            listener = await connect(pg_dsn, conns)
            sender = await connect(pg_dsn, conns)
            await notify_roundtrip(listener, sender, "after restart")
        finally:
            with trio.move_on_after(5, shield=True):
                for conn in conns:
                    await aio_as_trio(conn.close)()


async def test_listen_notify(pg_dsn: str) -> None:
    # The same round trip without fault injection, so it also runs against TRIO_PEERS_TEST_DSN.
    async with trio_asyncio.open_loop():
        conns: list[asyncpg.Connection] = []
        try:
            listener = await connect(pg_dsn, conns)
            sender = await connect(pg_dsn, conns)
            for n in range(3):
                await notify_roundtrip(listener, sender, f"message {n}")
        finally:
            with trio.move_on_after(5, shield=True):
                for conn in conns:
                    await aio_as_trio(conn.close)()
