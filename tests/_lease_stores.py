"""One interface over the two lease stores, for the backend contract tests.

Both stores are driven through the backend protocol the peer itself uses
(``backend.open(config)`` → connector → ``connect()`` → ``elect`` / ``release`` /
``get_leader``), plus two test-only powers: read a row, and force a lease to
expire (PostgreSQL: ``UPDATE ... SET expires_at = now() - 1 s``, like Oban's
``take_over`` test helper; memory: set ``MemoryRow.expires_at`` in the past).

Each connection comes from its own ``backend.open(config)``, as each peer's
does (for PostgreSQL, one trio-asyncio loop each); the test's own SQL runs on
one more loop, opened by :func:`open_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeVar

import asyncpg
import attrs
import trio
import trio_asyncio

import trio_peers
from trio_peers import AsyncpgBackend, BackendConnection, LeaderInfo, PeerBackend, PeerConfig
from trio_peers._core import ElectionOutcome
from trio_peers.testing import MemoryBackend

Kind = Literal["memory", "postgres"]
T = TypeVar("T")

#: Lease length in the contract tests: long, so that nothing expires unless forced.
INTERVAL = 60.0
#: Generous real-time bound for anything PostgreSQL does (a NOTIFY arriving, say).
WAIT = 10.0


@attrs.frozen
class Row:
    node: str
    term: int
    live: bool


class Conn:
    """One connection to the store, with the NOTIFY payloads it received."""

    def __init__(self, store: Store, config: PeerConfig) -> None:
        self.store = store
        self.config = config
        self.payloads: list[str] = []
        self._arrived = trio.Event()
        self.lost = False
        self.backend_conn: BackendConnection | None = None

    def on_notification(self, payload: str) -> None:
        self.payloads.append(payload)
        self._arrived.set()
        self._arrived = trio.Event()

    def on_lost(self) -> None:
        self.lost = True

    async def elect(self, node: str, held_term: int | None) -> ElectionOutcome:
        assert self.backend_conn is not None
        return await self.backend_conn.elect(
            node=node, held_term=held_term, statement_timeout=WAIT
        )

    async def release(self, node: str, term: int, sender: str = "s") -> bool:
        assert self.backend_conn is not None
        return await self.backend_conn.release(
            node=node, term=term, sender=sender, statement_timeout=WAIT
        )

    async def get_leader(self) -> LeaderInfo | None:
        assert self.backend_conn is not None
        return await self.backend_conn.get_leader(statement_timeout=WAIT)

    async def wait_payloads(self, count: int) -> list[str]:
        """Wait (bounded) until ``count`` payloads arrived; return them all."""
        with trio.fail_after(WAIT):
            while len(self.payloads) < count:
                await self._arrived.wait()
        return list(self.payloads)


class Store:
    """A lease store of either kind. Create with :func:`open_store`."""

    def __init__(
        self,
        kind: Kind,
        dsn: str,
        stack: contextlib.AsyncExitStack,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.kind = kind
        self.dsn = dsn
        self.memory = MemoryBackend() if kind == "memory" else None
        self.backend: PeerBackend = self.memory if self.memory is not None else AsyncpgBackend()
        self._stack = stack
        self._loop = loop
        self._sql: asyncpg.Connection | None = None

    def config(self, name: str = "default", **kw: object) -> PeerConfig:
        return PeerConfig(dsn=self.dsn, name=name, interval=INTERVAL, **kw)  # type: ignore[arg-type]

    async def connect(self, name: str = "default") -> Conn:
        config = self.config(name)
        conn = Conn(self, config)
        connector = await self._stack.enter_async_context(self.backend.open(config))
        backend_conn = await connector.connect(
            on_notification=conn.on_notification, on_lost=conn.on_lost
        )
        self._stack.callback(backend_conn.abort)
        conn.backend_conn = backend_conn
        return conn

    async def _raw(self) -> asyncpg.Connection:
        if self._sql is None:
            self._sql = await self._aio(asyncpg.connect)(self.dsn)
            self._stack.callback(self._sql.terminate)
        return self._sql

    def _aio(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        wrapped: Callable[..., Awaitable[T]] = trio_asyncio.aio_as_trio(fn, loop=self._loop)
        return wrapped

    async def row(self, name: str = "default") -> Row | None:
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            mrow = self.memory.rows.get(("public", "trio_peers", name))
            if mrow is None:
                return None
            return Row(mrow.node, mrow.term, mrow.expires_at > trio.current_time())
        sql = await self._raw()
        rec = await self._aio(sql.fetchrow)(
            "SELECT node, term, expires_at > now() AS live FROM trio_peers WHERE name = $1", name
        )
        return None if rec is None else Row(rec["node"], rec["term"], rec["live"])

    async def expire(self, name: str = "default") -> None:
        """Make the lease of ``name`` expired now (as if its holder stopped renewing)."""
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.rows[("public", "trio_peers", name)].expires_at = trio.current_time() - 1
            return
        sql = await self._raw()
        status = await self._aio(sql.execute)(
            "UPDATE trio_peers SET expires_at = now() - interval '1 second' WHERE name = $1",
            name,
        )
        assert status == "UPDATE 1", status

    @contextlib.asynccontextmanager
    async def row_locked(self, name: str = "default") -> AsyncIterator[None]:
        """Hold the row of ``name`` locked, as another transaction would, inside the block."""
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.lock_row(name)
            try:
                yield
            finally:
                self.memory.unlock_row(name)
            return
        locker = await self._aio(asyncpg.connect)(self.dsn)
        try:
            await self._aio(locker.execute)("BEGIN")
            await self._aio(locker.execute)(
                "SELECT 1 FROM trio_peers WHERE name = $1 FOR UPDATE", name
            )
            yield
            # Ended by the server before it answers: the lock is gone when the block ends.
            # (A terminate() alone left it to the server process's exit, which a loaded
            # host may run after the test's next statement: a renewal then still found the
            # row locked, and came back busy.)
            await self._aio(locker.execute)("ROLLBACK")
        finally:
            locker.terminate()

    async def xid_and_wal(self) -> tuple[int, int]:
        """PostgreSQL only: the next transaction id and the WAL insert position (bytes).

        ``pg_snapshot_xmax(pg_current_snapshot())`` reads the next xid without assigning one.
        """
        sql = await self._raw()
        rec = await self._aio(sql.fetchrow)(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid, "
            "pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS wal"
        )
        return rec["xid"], rec["wal"]

    async def sql(self, query: str, *args: object) -> str:
        """PostgreSQL only: run one statement on the test's own connection."""
        sql = await self._raw()
        status: str = await self._aio(sql.execute)(query, *args)
        return status

    async def notify_sentinel(self, config: PeerConfig, payload: str) -> None:
        """Send ``payload`` on the channel from outside the peers (PostgreSQL: pg_notify)."""
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.notify(config.channel, payload)
            return
        sql = await self._raw()
        await self._aio(sql.execute)("SELECT pg_notify($1, $2)", config.channel, payload)


@contextlib.asynccontextmanager
async def open_store(kind: Kind, dsn: str | None) -> AsyncIterator[Store]:
    """A store of ``kind``: for PostgreSQL, ``dsn`` must name a migrated database."""
    async with contextlib.AsyncExitStack() as stack:
        loop = None
        if kind == "postgres":
            assert dsn is not None
            loop = await stack.enter_async_context(trio_asyncio.open_loop())
        yield Store(kind, dsn or "memory://", stack, loop)


@attrs.frozen
class StoreSpec:
    """Which store a test uses. ``open()`` it in the test's own task."""

    kind: Kind
    dsn: str | None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        with trio.fail_after(60):
            if self.dsn is not None:
                await trio_peers.migrate(self.dsn)
            async with open_store(self.kind, self.dsn) as store:
                yield store
