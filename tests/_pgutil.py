"""Test helpers for talking to PostgreSQL from Trio, and a TCP proxy for partitions."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from trio_peers import LeadershipChange, Peer, PeerConfig, open_peer
from trio_peers.testing import PostgresNotFound
from trio_peers.testing._replication import ReplicatedPair


def peer_config(dsn: str, node: str, **kw: object) -> PeerConfig:
    """A PeerConfig for real-PostgreSQL tests: short interval (1 s) unless given."""
    args: dict[str, object] = {"dsn": dsn, "interval": 1.0, "node": node, **kw}
    return PeerConfig(**args)  # type: ignore[arg-type]


class SQL:
    """A superuser connection for tests: Trio-flavoured wrappers over asyncpg."""

    def __init__(self, conn: asyncpg.Connection, loop: object) -> None:
        self.conn = conn
        self.loop = loop

    def aio(self, fn: Any) -> Any:
        """Run an asyncio-flavoured function on this connection's own loop."""
        return trio_asyncio.aio_as_trio(fn, loop=self.loop)

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self.aio(self.conn.fetchval)(query, *args)

    async def fetchrow(self, query: str, *args: object) -> Any:
        return await self.aio(self.conn.fetchrow)(query, *args)

    async def fetch(self, query: str, *args: object) -> list[Any]:
        rows: list[Any] = await self.aio(self.conn.fetch)(query, *args)
        return rows

    async def execute(self, query: str, *args: object) -> str:
        status: str = await self.aio(self.conn.execute)(query, *args)
        return status

    async def row(self, name: str = "default", table: str = "public.trio_peers") -> Any:
        return await self.fetchrow(
            f"SELECT *, expires_at > now() AS live FROM {table} WHERE name = $1", name
        )

    async def expire(self, name: str = "default", table: str = "public.trio_peers") -> None:
        """Make the lease of ``name`` look expired (as if its holder died long ago)."""
        await self.execute(
            f"UPDATE {table} SET expires_at = now() - interval '1 second' WHERE name = $1", name
        )


@asynccontextmanager
async def open_sql(dsn: str) -> AsyncIterator[SQL]:
    async with trio_asyncio.open_loop() as loop:
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=loop)(dsn)
        try:
            yield SQL(conn, loop)
        finally:
            with trio.move_on_after(5, shield=True) as scope:
                await trio_asyncio.aio_as_trio(conn.close, loop=loop)()
            if scope.cancelled_caught:
                conn.terminate()


@asynccontextmanager
async def peer_in_task(
    nursery: trio.Nursery, config: PeerConfig
) -> AsyncIterator[tuple[Peer, trio.Event]]:
    """Run a peer in its own task; set the returned event to make it leave."""
    stop = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Peer]) -> None:
        async with open_peer(config) as peer:
            task_status.started(peer)
            await stop.wait()

    peer = await nursery.start(run)
    try:
        yield peer, stop
    finally:
        stop.set()


async def run_peer(
    config: PeerConfig, *, task_status: trio.TaskStatus[tuple[Peer, trio.Event]]
) -> None:
    """``peer, stop = await nursery.start(run_peer, config)``: a peer in its own task."""
    stop = trio.Event()
    async with open_peer(config) as peer:
        task_status.started((peer, stop))
        await stop.wait()


async def wait_for(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    limit: float = 10.0,
    poll: float = 0.005,
) -> None:
    """Wait until ``predicate()`` holds; fail with TooSlowError after ``limit`` seconds."""
    with trio.fail_after(limit):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(poll)


class Recorder:
    """Records (peer, is_leader, term, perf time) from many peers' leadership channels."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool, int | None, float]] = []

    async def watch(self, peer: Peer) -> None:
        async for change in peer.leadership():
            self.record(peer.node, change)

    def record(self, node: str, change: LeadershipChange) -> None:
        self.events.append((node, change.is_leader, change.term, trio.current_time()))

    def intervals(self) -> list[tuple[str, int | None, float, float]]:
        """(node, term, start, end) of each leadership interval; open ones end at +inf."""
        open_: dict[str, tuple[int | None, float]] = {}
        out: list[tuple[str, int | None, float, float]] = []
        for node, leader, term, t in self.events:
            if node in open_:
                start_term, start = open_.pop(node)
                out.append((node, start_term, start, t))
            if leader:
                open_[node] = (term, t)
        out.extend((node, term, start, math.inf) for node, (term, start) in open_.items())
        return out


def assert_no_overlap(intervals: list[tuple[str, int | None, float, float]]) -> None:
    ordered = sorted(intervals, key=lambda iv: iv[2])
    for before, after in itertools.pairwise(ordered):
        assert before[3] <= after[2], f"two leaders at once: {before} and {after}"
        assert before[1] is not None and after[1] is not None
        assert after[1] >= before[1], f"term went backwards: {before} then {after}"


class Proxy:
    """A TCP proxy in front of PostgreSQL that can *silently* partition the network.

    While partitioned, it keeps every connection open but forwards nothing (no FIN,
    no RST), like a dropped link: only timeouts can detect it.

    With ``hold_server_close``, a connection the server closes stays open towards the
    client until the client closes it (the server's goodbye never arrives). ``client_tail``
    keeps the last bytes any client sent.
    """

    def __init__(self, target_port: int, *, hold_server_close: bool = False) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self.partitioned = False
        self.hold_server_close = hold_server_close
        self.client_tail = b""

    def partition(self) -> None:
        self.partitioned = True
        self._flowing = trio.Event()

    def heal(self) -> None:
        self.partitioned = False
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope, True)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope, False)

    async def _pump(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        scope: trio.CancelScope,
        from_client: bool,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if from_client:
                    self.client_tail = (self.client_tail + data)[-64:]
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if from_client or not self.hold_server_close:
                scope.cancel()


def start_pair(*, synchronous: bool = False) -> ReplicatedPair:
    """A primary with one streaming standby; skipped (not in CI) where no binaries exist."""
    try:
        return ReplicatedPair.start(synchronous=synchronous)
    except PostgresNotFound as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
