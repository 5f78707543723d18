"""One interface over the two session stores, for the session contract tests.

Both stores are driven through the session protocol the session itself uses
(``backend.open_session(settings)`` → connector → ``connect()`` → ``prepare`` /
``elect`` / ``release`` / ``get_leaders``), each connection from its own
``open_session`` (for PostgreSQL, one trio-asyncio loop each, as each session has),
plus test-only powers: read rows, hold rows locked as another transaction would,
send a NOTIFY from outside, create a table. The test's own SQL runs on one more
connection (:func:`tests._pgutil.open_sql`).

Nothing here forces a lease to expire: the tests give a name a short lease
(:attr:`ElectRequest.lease`) and wait, bounded, until the store reports it expired.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Literal

import attrs
import trio

import trio_peers
from trio_peers import AsyncpgBackend, LeaderInfo
from trio_peers._backend import (
    ElectRequest,
    LeaseTable,
    ReleaseOutcome,
    ReleaseRequest,
    SessionBackend,
    SessionConnection,
    SessionSettings,
)
from trio_peers._core import Down, ElectionOutcome, parse_downs
from trio_peers._sql import Statements
from trio_peers.testing import MemoryBackend

from ._pgutil import SQL, open_sql

Kind = Literal["memory", "postgres"]

#: The default lease table.
DEFAULT = LeaseTable("public", "trio_peers")
#: A long lease: nothing given it expires during a test.
LONG = 60.0
#: A short lease, for names a test wants expired (it waits for that, bounded).
SHORT = 0.3
#: Generous real-time bound for anything PostgreSQL does (a NOTIFY arriving, say).
WAIT = 10.0


@attrs.frozen
class Row:
    """A lease row as the tests compare it."""

    node: str
    term: int
    live: bool


@attrs.frozen
class RawRow:
    """A lease row exactly: equal before and after means the row was not written."""

    node: str
    term: int
    started_at: object
    expires_at: object


class Conn:
    """One session connection, with the notifications it received (in arrival order)."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, str]] = []
        self._arrived = trio.Event()
        self.lost = False
        self.conn: SessionConnection | None = None

    def on_notification(self, channel: str, payload: str) -> None:
        self.notes.append((channel, payload))
        self._arrived.set()
        self._arrived = trio.Event()

    def on_lost(self) -> None:
        self.lost = True

    @property
    def c(self) -> SessionConnection:
        assert self.conn is not None
        return self.conn

    async def prepare(self, table: LeaseTable = DEFAULT) -> bool:
        return await self.c.prepare(table, statement_timeout=WAIT)

    async def elect(
        self, requests: Sequence[ElectRequest], table: LeaseTable = DEFAULT
    ) -> list[ElectionOutcome]:
        return await self.c.elect(table, requests, statement_timeout=WAIT)

    async def take(
        self, names: Iterable[str], node: str, lease: float = LONG, table: LeaseTable = DEFAULT
    ) -> None:
        """Set up: ``node`` takes each (absent or expired) name, which must succeed."""
        reqs = [ElectRequest(name=n, node=node, lease=lease, held_term=None) for n in names]
        outcomes = await self.elect(reqs, table)
        assert all(o.term is not None for o in outcomes), outcomes

    async def release(
        self,
        requests: Sequence[ReleaseRequest],
        sender: str,
        table: LeaseTable = DEFAULT,
        on_sent: Callable[[], None] | None = None,
    ) -> list[ReleaseOutcome]:
        return await self.c.release(
            table, requests, sender=sender, statement_timeout=WAIT, on_sent=on_sent
        )

    async def get_leaders(
        self, names: Sequence[str], table: LeaseTable = DEFAULT
    ) -> dict[str, LeaderInfo]:
        return await self.c.get_leaders(table, names, statement_timeout=WAIT)

    def payloads(self, channel: str = DEFAULT.channel) -> list[str]:
        return [p for ch, p in self.notes if ch == channel]

    async def wait_until(self, done: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint()
        with trio.fail_after(WAIT):
            while not done():
                await self._arrived.wait()

    async def wait_payload(self, payload: str, channel: str = DEFAULT.channel) -> None:
        """Wait (bounded) until ``payload`` arrived on ``channel``."""
        await self.wait_until(lambda: payload in self.payloads(channel))

    async def wait_downs(self, count: int, channel: str = DEFAULT.channel) -> list[Down]:
        """Wait (bounded) until the payloads on ``channel`` announce ``count`` releases."""

        def downs() -> list[Down]:
            return [d for p in self.payloads(channel) for d in parse_downs(p) or []]

        await self.wait_until(lambda: len(downs()) >= count)
        return downs()


class Store:
    """A session store of either kind. Create with :func:`open_store`."""

    def __init__(
        self, kind: Kind, dsn: str, stack: contextlib.AsyncExitStack, sql: SQL | None
    ) -> None:
        self.kind = kind
        self.dsn = dsn
        self.memory = MemoryBackend() if kind == "memory" else None
        self.backend: SessionBackend = self.memory if self.memory is not None else AsyncpgBackend()
        self._stack = stack
        self._sql = sql

    async def connect(
        self, *, listen: bool = True, tables: Sequence[LeaseTable] = (DEFAULT,)
    ) -> Conn:
        """A new session connection with ``tables`` prepared."""
        settings = SessionSettings(dsn=self.dsn, listen=listen, connect_timeout=WAIT)
        connector = await self._stack.enter_async_context(self.backend.open_session(settings))
        conn = Conn()
        conn.conn = await connector.connect(
            on_notification=conn.on_notification, on_lost=conn.on_lost
        )
        self._stack.callback(conn.conn.abort)
        for table in tables:
            assert await conn.prepare(table) is False  # a logged table
        return conn

    async def create_table(self, table: LeaseTable) -> None:
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.create_table(table.prefix, table.table)
            return
        await trio_peers.migrate(self.dsn, prefix=table.prefix, table=table.table)

    async def drop_table(self, table: LeaseTable) -> None:
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.drop_table(table.prefix, table.table)
            return
        sql = await self._raw()
        await sql.execute(f"DROP TABLE {Statements(table.prefix, table.table).qualified}")

    async def _raw(self) -> SQL:
        """The test's own connection (PostgreSQL only; opened with the store, because the
        exit stack must not enter a nursery from inside a caller's cancel scope)."""
        await trio.lowlevel.checkpoint()
        assert self._sql is not None
        return self._sql

    async def raw_rows(
        self, names: Iterable[str], table: LeaseTable = DEFAULT
    ) -> dict[str, RawRow]:
        """The rows of ``names`` that exist, exactly."""
        names = list(names)
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            found = {n: self.memory.rows.get((table.prefix, table.table, n)) for n in names}
            return {
                n: RawRow(r.node, r.term, r.started_at, r.expires_at)
                for n, r in found.items()
                if r is not None
            }
        sql = await self._raw()
        qualified = Statements(table.prefix, table.table).qualified
        recs = await sql.fetch(
            f"SELECT name, node, term, started_at, expires_at FROM {qualified} "
            "WHERE name = ANY($1::text[])",
            names,
        )
        return {
            r["name"]: RawRow(r["node"], r["term"], r["started_at"], r["expires_at"]) for r in recs
        }

    async def rows(self, names: Iterable[str], table: LeaseTable = DEFAULT) -> dict[str, Row]:
        """The rows of ``names`` that exist: holder, term, and whether unexpired now."""
        names = list(names)
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            found = {n: self.memory.rows.get((table.prefix, table.table, n)) for n in names}
            return {
                n: Row(r.node, r.term, r.expires_at > now)
                for n, r in found.items()
                if r is not None
            }
        sql = await self._raw()
        qualified = Statements(table.prefix, table.table).qualified
        recs = await sql.fetch(
            f"SELECT name, node, term, expires_at > now() AS live FROM {qualified} "
            "WHERE name = ANY($1::text[])",
            names,
        )
        return {r["name"]: Row(r["node"], r["term"], r["live"]) for r in recs}

    async def wait_expired(self, names: Iterable[str], table: LeaseTable = DEFAULT) -> None:
        """Wait (bounded) until every row of ``names`` exists and has expired."""
        names = list(names)
        with trio.fail_after(WAIT):
            while True:
                rows = await self.rows(names, table)
                if len(rows) == len(names) and not any(r.live for r in rows.values()):
                    return
                await trio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def rows_locked(
        self, names: Sequence[str], table: LeaseTable = DEFAULT
    ) -> AsyncIterator[None]:
        """Hold the (existing) rows of ``names`` locked, as another transaction would."""
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            for n in names:
                self.memory.lock_row(n, prefix=table.prefix, table=table.table)
            try:
                yield
            finally:
                for n in names:
                    self.memory.unlock_row(n, prefix=table.prefix, table=table.table)
            await trio.lowlevel.checkpoint()
            return
        qualified = Statements(table.prefix, table.table).qualified
        async with open_sql(self.dsn) as locker:
            await locker.execute("BEGIN")
            locked = await locker.fetch(
                f"SELECT name FROM {qualified} WHERE name = ANY($1::text[]) FOR UPDATE",
                list(names),
            )
            assert len(locked) == len(names)
            try:
                yield
            finally:
                with trio.move_on_after(5, shield=True):
                    await locker.execute("ROLLBACK")

    async def notify(self, channel: str, payload: str) -> None:
        """Send a NOTIFY on ``channel`` from outside the sessions."""
        if self.memory is not None:
            await trio.lowlevel.checkpoint()
            self.memory.notify(channel, payload)
            return
        sql = await self._raw()
        await sql.execute("SELECT pg_notify($1, $2)", channel, payload)


@contextlib.asynccontextmanager
async def open_store(kind: Kind, dsn: str | None) -> AsyncIterator[Store]:
    """A store of ``kind``; for PostgreSQL, ``dsn`` names an empty database (migrated here)."""
    with trio.fail_after(60):
        if dsn is not None:
            await trio_peers.migrate(dsn)
        async with contextlib.AsyncExitStack() as stack:
            sql = None
            if kind == "postgres":
                assert dsn is not None
                sql = await stack.enter_async_context(open_sql(dsn))
            yield Store(kind, dsn or "memory://", stack, sql)


@attrs.frozen
class StoreSpec:
    """Which store a test uses. ``open()`` it in the test's own task."""

    kind: Kind
    dsn: str | None

    def open(self) -> contextlib.AbstractAsyncContextManager[Store]:
        return open_store(self.kind, self.dsn)
