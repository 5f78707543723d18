"""An in-memory lease store with the PostgreSQL backend's semantics, on Trio's clock."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, final

import attrs
import trio

from .._backend import (
    BackendConnection,
    BackendConnector,
    ElectRequest,
    LeaderInfo,
    LeaseTable,
    ReleaseOutcome,
    ReleaseRequest,
    SessionConnection,
    SessionConnector,
    SessionSettings,
)
from .._config import PeerConfig
from .._core import ElectionOutcome, down_payload
from .._exceptions import BackendUnavailable, TableMissing

#: The wall-clock instant that Trio time 0 maps to in :class:`LeaderInfo` timestamps.
#: Bytes of names per multi-name NOTIFY payload (PostgreSQL allows 8000 per payload).
_CHUNK_BYTES: Final = 6000
_EPOCH: Final = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


@final
@attrs.define
class MemoryRow:
    """One lease row, as the in-memory store keeps it (times on :func:`trio.current_time`)."""

    node: str
    term: int
    started_at: float
    expires_at: float


def _stamp(t: float) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(seconds=t)


@final
class MemoryBackend:
    """A lease store in memory, shared by every peer given the same instance.

    It follows the lease semantics of the PostgreSQL backend exactly (the
    project's contract tests run the same scenarios against both), using
    :func:`trio.current_time` as the database clock, so it runs under
    :class:`trio.testing.MockClock`::

        backend = MemoryBackend()
        async with open_peer(config, backend=backend) as peer:
            ...

    Pass ``dsn="memory://"`` (any string) in the config: it is not used.

    Fault injection, for testing how your application behaves:

    * :meth:`set_available(False) <set_available>`: the store goes down: open connections
      are dropped, and connecting and every statement fail with
      :exc:`~trio_peers.BackendUnavailable` until ``set_available(True)``. (Setting
      :attr:`available` alone drops no connection: their next statements fail.)
    * :attr:`hang` = True: statements block until the caller's timeout.
    * :attr:`deliver_notifications` = False: NOTIFY is lost (as behind PgBouncer).
    * :meth:`kill_connections`: drop every open connection (as a server restart does).
    * :attr:`statement_delay`: seconds each statement takes before it runs.
    * :attr:`reply_delay`: seconds between a statement running (it has committed) and its
      reply arriving; a caller that gives up meanwhile never learns the outcome, and a
      connection dropped meanwhile fails the statement at once, as with a real server.
    * :meth:`drop_table` / :meth:`create_table`: a missing table.
    * :meth:`lock_row` / :meth:`unlock_row`: another transaction holds a lease row locked
      (as a long fenced write would); elections that would write it report it busy.
      Releases of one's own connection (:meth:`open`) are not held up by it; a
      session's releases report it busy too and are retried until ``cleanup_timeout``.

    .. versionadded:: 0.1
    """

    def __init__(
        self, *, tables: tuple[tuple[str, str], ...] = (("public", "trio_peers"),)
    ) -> None:
        self.rows: dict[tuple[str, str, str], MemoryRow] = {}
        """Lease rows by ``(prefix, table, name)``."""
        self.tables: set[tuple[str, str]] = set(tables)
        """Existing ``(prefix, table)`` pairs. Default: the default table only."""
        self.available = True
        """False: connecting and statements fail with :exc:`~trio_peers.BackendUnavailable`.
        Use :meth:`set_available` to also drop the open connections."""
        self.hang = False
        """True: statements block until the caller's statement timeout."""
        self.deliver_notifications = True
        """False: NOTIFY payloads are dropped, as behind a pooler in transaction mode."""
        self.statement_delay = 0.0
        """Seconds each statement waits (on Trio's clock) before it runs."""
        self.reply_delay = 0.0
        """Seconds between a statement running (committed) and its reply (on Trio's clock)."""
        self.statements = 0
        """How many statements ran (elect, release, get_leader)."""
        self.locked_rows: set[tuple[str, str, str]] = set()
        """``(prefix, table, name)`` of rows held locked by "another transaction"."""
        # Insertion-ordered (a dict used as a set), so NOTIFY delivery order and
        # everything that follows from it replay exactly under a seeded test.
        self._connections: dict[_MemoryConnection | _MemorySessionConnection, None] = {}

    # ------------------------------------------------------------------ controls

    def create_table(self, prefix: str = "public", table: str = "trio_peers") -> None:
        """Create a lease table (like :func:`trio_peers.migrate`)."""
        self.tables.add((prefix, table))

    def drop_table(self, prefix: str = "public", table: str = "trio_peers") -> None:
        """Drop a lease table and its rows."""
        self.tables.discard((prefix, table))
        for key in [k for k in self.rows if k[:2] == (prefix, table)]:
            del self.rows[key]

    def lock_row(
        self, name: str = "default", *, prefix: str = "public", table: str = "trio_peers"
    ) -> None:
        """Hold a lease row locked, as another transaction would (``SELECT ... FOR UPDATE``)."""
        self.locked_rows.add((prefix, table, name))

    def unlock_row(
        self, name: str = "default", *, prefix: str = "public", table: str = "trio_peers"
    ) -> None:
        """End :meth:`lock_row`."""
        self.locked_rows.discard((prefix, table, name))

    def kill_connections(self) -> None:
        """Drop every open connection; their peers see the connection lost."""
        for conn in list(self._connections):
            conn.lose()

    def set_available(self, available: bool) -> None:
        """Take the store down (dropping connections) or bring it back."""
        self.available = available
        if not available:
            self.kill_connections()

    def leader(
        self, name: str = "default", *, prefix: str = "public", table: str = "trio_peers"
    ) -> MemoryRow | None:
        """The unexpired row of ``name`` now, if any. Sync."""
        row = self.rows.get((prefix, table, name))
        if row is not None and row.expires_at > trio.current_time():
            return row
        return None

    @property
    def connection_count(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    # ------------------------------------------------------------------ backend protocol

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        """The :class:`~trio_peers.PeerBackend` method: :func:`~trio_peers.open_peer` calls it."""
        return self._open(config)

    @asynccontextmanager
    async def _open(self, config: PeerConfig) -> AsyncIterator[BackendConnector]:
        await trio.lowlevel.checkpoint()
        yield _MemoryConnector(self, config)

    def open_session(
        self, settings: SessionSettings
    ) -> AbstractAsyncContextManager[SessionConnector]:
        """The :class:`~trio_peers.SessionBackend` method: sessions (and
        :func:`~trio_peers.open_peer`) call it. A session holds one connection."""
        return self._open_session(settings)

    @asynccontextmanager
    async def _open_session(self, settings: SessionSettings) -> AsyncIterator[SessionConnector]:
        await trio.lowlevel.checkpoint()
        yield _MemorySessionConnector(self, settings)

    # ------------------------------------------------------------------ statements (sync, atomic)

    def _check(self, config: PeerConfig | LeaseTable | None) -> None:
        if not self.available:
            raise BackendUnavailable("ConnectionRefusedError: memory backend is down")
        if config is not None and (config.prefix, config.table) not in self.tables:
            raise TableMissing(
                f"the lease table {config.prefix}.{config.table} does not exist: run migrate()"
            )

    def elect_now(self, config: PeerConfig, node: str, held_term: int | None) -> ElectionOutcome:
        """One election statement, executed atomically at ``trio.current_time()``."""
        return self._elect_row(
            (config.prefix, config.table, config.name), node, config.interval, held_term
        )

    def _elect_row(
        self, key: tuple[str, str, str], node: str, lease: float, held_term: int | None
    ) -> ElectionOutcome:
        """The lease rules of one name's election (the single and the batched statement)."""
        now = trio.current_time()
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = MemoryRow(node, 1, now, now + lease)
            return ElectionOutcome(term=1, lease_remaining=lease)
        may_write = row.expires_at <= now or (row.node == node and row.term == held_term)
        if may_write and key in self.locked_rows:
            # The statement would write this row, but another transaction holds it.
            live = row.expires_at > now
            return ElectionOutcome(
                term=None,
                holder_node=row.node if live else None,
                holder_term=row.term if live else None,
                holder_remaining=row.expires_at - now if live else None,
                busy=True,
            )
        if row.expires_at <= now:
            self.rows[key] = MemoryRow(node, row.term + 1, now, now + lease)
            return ElectionOutcome(term=row.term + 1, lease_remaining=lease)
        if row.node == node and row.term == held_term:
            row.expires_at = now + lease
            return ElectionOutcome(term=row.term, lease_remaining=lease)
        return ElectionOutcome(
            term=None,
            holder_node=row.node,
            holder_term=row.term,
            holder_remaining=row.expires_at - now,
        )

    def release_now(self, config: PeerConfig, node: str, term: int, sender: str) -> bool:
        """One release statement: expire the tenure in place and notify, atomically."""
        now = trio.current_time()
        row = self.rows.get((config.prefix, config.table, config.name))
        if row is None or row.node != node or row.term != term or row.expires_at <= now:
            return False
        row.expires_at = now
        self.notify(config.channel, down_payload(config.name, term, sender))
        return True

    def release_many_now(
        self, table: LeaseTable, requests: Sequence[ReleaseRequest], sender: str
    ) -> list[ReleaseOutcome]:
        """The batched release: per name as :meth:`release_now`, but a locked row is skipped
        (busy); the released names are announced in one payload (as ``release_many``)."""
        now = trio.current_time()
        outcomes: list[ReleaseOutcome] = []
        released: list[tuple[str, int]] = []
        for r in requests:
            key = (table.prefix, table.table, r.name)
            row = self.rows.get(key)
            if row is None or row.node != r.node or row.term != r.term or row.expires_at <= now:
                outcomes.append(ReleaseOutcome(released=False))
            elif key in self.locked_rows:
                outcomes.append(ReleaseOutcome(released=False, busy=True))
            else:
                row.expires_at = now
                released.append((r.name, r.term))
                outcomes.append(ReleaseOutcome(released=True))
        # In chunks of about 6000 bytes of names, as the SQL statement does.
        chunks: list[list[tuple[str, int]]] = [[]]
        size = 0
        for item in sorted(released):
            entry = len(json.dumps(item[0]).encode()) + 24
            if chunks[-1] and size + entry > _CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += entry
        for chunk in chunks:
            if len(chunk) == 1:
                self.notify(table.channel, down_payload(chunk[0][0], chunk[0][1], sender))
            elif chunk:
                payload = json.dumps(
                    {"downs": [list(item) for item in chunk], "sender": sender},
                    separators=(",", ":"),
                )
                self.notify(table.channel, payload)
        return outcomes

    def notify(self, channel: str, payload: str) -> None:
        """Send a NOTIFY to every connection listening on ``channel`` (like ``pg_notify``)."""
        if not self.deliver_notifications:
            return
        for conn in list(self._connections):
            if channel in conn.listening:
                conn.deliver(channel, payload)

    def get_leader_now(self, config: PeerConfig) -> LeaderInfo | None:
        """The unexpired lease of ``config.name`` now, as :meth:`Peer.get_leader
        <trio_peers.Peer.get_leader>` reports it (timestamps count from 2000-01-01 UTC)."""
        return self._leader_info(config.prefix, config.table, config.name)

    def _leader_info(self, prefix: str, table: str, name: str) -> LeaderInfo | None:
        row = self.leader(name, prefix=prefix, table=table)
        if row is None:
            return None
        return LeaderInfo(
            name=name,
            node=row.node,
            term=row.term,
            started_at=_stamp(row.started_at),
            expires_at=_stamp(row.expires_at),
        )


@final
class _MemoryConnector:
    def __init__(self, backend: MemoryBackend, config: PeerConfig) -> None:
        self._backend = backend
        self._config = config

    async def connect(
        self,
        *,
        on_notification: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> BackendConnection:
        await trio.lowlevel.checkpoint()
        self._backend._check(self._config)
        conn = _MemoryConnection(self._backend, self._config, on_notification, on_lost)
        self._backend._connections[conn] = None
        return conn


async def _reply(  # noqa: ASYNC910 - always after the statement's own wait
    backend: MemoryBackend, conn: _MemoryConnection | _MemorySessionConnection
) -> None:
    """The reply of a statement that has run (committed), on its way for
    :attr:`MemoryBackend.reply_delay` (cancellable). A connection lost meanwhile fails the
    statement, as a driver's pending query fails at once: its reply never comes."""
    if backend.reply_delay:
        with trio.move_on_after(backend.reply_delay):
            await conn.gone.wait()
        if conn.closed:
            raise BackendUnavailable("ConnectionDoesNotExistError: connection was closed")


@final
class _MemoryConnection:
    def __init__(
        self,
        backend: MemoryBackend,
        config: PeerConfig,
        on_notification: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._backend = backend
        self._config = config
        self._on_notification = on_notification
        self._on_lost = on_lost
        self.listening: set[str] = {config.channel} if config.listen else set()
        self.closed = False
        self.gone = trio.Event()  # set once closed: a reply on its way never comes

    def deliver(self, channel: str, payload: str) -> None:
        del channel
        if not self.closed:
            self._on_notification(payload)

    def lose(self) -> None:
        if not self.closed:
            self.abort()
            self._on_lost()

    async def _statement(self, limit: float) -> None:
        """Wait like a statement would; raise like a broken or timed-out one would."""
        if self.closed:
            raise BackendUnavailable("InterfaceError: connection is closed")
        with trio.move_on_after(limit) as scope:
            if self._backend.hang:
                await trio.sleep_forever()
            await trio.sleep(self._backend.statement_delay)
        if scope.cancelled_caught:
            raise TimeoutError("statement timed out")
        if self.closed:
            raise BackendUnavailable("ConnectionDoesNotExistError: connection was closed")
        self._backend._check(self._config)
        self._backend.statements += 1

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        await self._statement(statement_timeout)
        outcome = self._backend.elect_now(self._config, node, held_term)
        await _reply(self._backend, self)
        return outcome

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        await self._statement(statement_timeout)
        released = self._backend.release_now(self._config, node, term, sender)
        await _reply(self._backend, self)
        return released

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        await self._statement(statement_timeout)
        return self._backend.get_leader_now(self._config)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.gone.set()
        self._backend._connections.pop(self, None)


@final
class _MemorySessionConnector:
    def __init__(self, backend: MemoryBackend, settings: SessionSettings) -> None:
        self._backend = backend
        self._settings = settings

    async def connect(
        self,
        *,
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> SessionConnection:
        await trio.lowlevel.checkpoint()
        self._backend._check(None)
        conn = _MemorySessionConnection(self._backend, self._settings, on_notification, on_lost)
        self._backend._connections[conn] = None
        return conn


@final
class _MemorySessionConnection:
    """A session's one connection to the in-memory store: many names, many tables."""

    def __init__(
        self,
        backend: MemoryBackend,
        settings: SessionSettings,
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._on_notification = on_notification
        self._on_lost = on_lost
        self.listening: set[str] = set()
        self.closed = False
        self.gone = trio.Event()  # set once closed: a reply on its way never comes

    def deliver(self, channel: str, payload: str) -> None:
        if not self.closed:
            self._on_notification(channel, payload)

    def lose(self) -> None:
        if not self.closed:
            self.abort()
            self._on_lost()

    async def _statement(self, table: LeaseTable, limit: float) -> None:
        """Wait like a statement would; raise like a broken or timed-out one would."""
        if self.closed:
            raise BackendUnavailable("InterfaceError: connection is closed")
        with trio.move_on_after(limit) as scope:
            if self._backend.hang:
                await trio.sleep_forever()
            await trio.sleep(self._backend.statement_delay)
        if scope.cancelled_caught:
            raise TimeoutError("statement timed out")
        if self.closed:
            raise BackendUnavailable("ConnectionDoesNotExistError: connection was closed")
        self._backend._check(table)
        self._backend.statements += 1

    async def prepare(self, table: LeaseTable, *, statement_timeout: float) -> bool:
        await self._statement(table, statement_timeout)
        self._backend.statements -= 1  # a table check, not an election statement
        if self._settings.listen:
            self.listening.add(table.channel)
        return False

    async def elect(
        self, table: LeaseTable, requests: Sequence[ElectRequest], *, statement_timeout: float
    ) -> list[ElectionOutcome]:
        await self._statement(table, statement_timeout)
        outcomes = [
            self._backend._elect_row(
                (table.prefix, table.table, r.name), r.node, r.lease, r.held_term
            )
            for r in requests
        ]
        await _reply(self._backend, self)
        return outcomes

    async def release(
        self,
        table: LeaseTable,
        requests: Sequence[ReleaseRequest],
        *,
        sender: str,
        statement_timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> list[ReleaseOutcome]:
        if on_sent is not None and not self.closed:
            on_sent()  # (the statement leaves now; _statement is its time on the way)
        await self._statement(table, statement_timeout)
        outcomes = self._backend.release_many_now(table, requests, sender)
        await _reply(self._backend, self)
        return outcomes

    async def get_leaders(
        self, table: LeaseTable, names: Sequence[str], *, statement_timeout: float
    ) -> dict[str, LeaderInfo]:
        await self._statement(table, statement_timeout)
        found = {n: self._backend._leader_info(table.prefix, table.table, n) for n in names}
        return {n: info for n, info in found.items() if info is not None}

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self.gone.set()
        self._backend._connections.pop(self, None)
