"""The backend protocol: what the Trio shell needs from a lease store.

Every method here is *Trio-flavoured*. Two implementations exist: the
PostgreSQL one (:mod:`trio_peers._asyncpg`, the only module with
asyncio-flavoured code) and the in-memory one
(:class:`trio_peers.testing.MemoryBackend`), which follows the same lease
semantics on :func:`trio.current_time`.

Errors a backend raises, and what the shell does with them:

* :exc:`~trio_peers.BackendUnavailable` or :exc:`TimeoutError`: transient; step
  down, back off, reconnect.
* :exc:`~trio_peers.TableMissing`: warn (naming ``migrate()``), stay follower,
  retry every ``interval``.
* :exc:`~trio_peers.SchemaError`, :exc:`~trio_peers.BackendMisconfigured`:
  permanent; raised from :func:`~trio_peers.open_peer` entry, logged at ERROR
  (and retried every ``interval``) if they appear later.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, final, runtime_checkable

import attrs

from ._config import PeerConfig, channel_for
from ._core import ElectionOutcome


@final
@attrs.frozen(kw_only=True)
class LeaderInfo:
    """Who leads an instance name now, as :meth:`Peer.get_leader` reports it.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """The leader's node id."""
    term: int
    """The tenure's fencing token."""
    started_at: datetime.datetime
    """When the tenure began (database clock, timezone-aware)."""
    expires_at: datetime.datetime
    """When the lease expires unless renewed (database clock, timezone-aware)."""


class BackendConnection(Protocol):
    """One connection of one peer to the lease store. Trio-flavoured."""

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        """Run one election round as a single atomic statement.

        Renews the tenure ``held_term`` if this node holds it unexpired, else
        takes over an absent or expired lease with a new, higher term, else
        changes nothing and reports the current holder. A won or renewed tenure must be
        durable when this returns, and so must every release the store committed before
        it (PostgreSQL: a synchronous commit, whose WAL flush covers all earlier WAL).
        """
        ...

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        """Release tenure ``term`` (if still held and unexpired) and NOTIFY ``down``, atomically.

        Returns True if a lease was released. The release need not be durable yet (the
        next election's commit makes it so); see :doc:`/protocol`.
        """
        ...

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        """The unexpired lease of this peer's name, if any."""
        ...

    async def aclose(self) -> None:
        """Close gracefully. The caller bounds it with a timeout and falls back to :meth:`abort`."""
        ...

    def abort(self) -> None:
        """Close at once, without waiting. Sync; never blocks; idempotent."""
        ...


class BackendConnector(Protocol):
    """Opens connections for the peers of one :func:`~trio_peers.open_peer`."""

    async def connect(
        self,
        *,
        on_notification: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> BackendConnection:
        """Open a connection, check the table, and LISTEN if the config says so.

        ``on_notification(payload)`` is called for each NOTIFY on the peer's
        channel and ``on_lost()`` when the connection drops. Both are sync,
        run in the Trio thread, and must never raise (the backend guards them).
        """
        ...


class PeerBackend(Protocol):
    """A lease store. Pass one to :func:`~trio_peers.open_peer` as ``backend=``."""

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        """Resources a peer needs for its lifetime (e.g. the asyncio loop for asyncpg)."""
        ...


# ---------------------------------------------------------------------- sessions


@final
@attrs.frozen
class LeaseTable:
    """One lease table, ``prefix.table``, as sessions address it. Both are validated
    identifiers (see :class:`~trio_peers.PeerConfig`)."""

    prefix: str
    table: str

    @property
    def channel(self) -> str:
        """The table's NOTIFY channel."""
        return channel_for(self.prefix, self.table)


@final
@attrs.frozen(kw_only=True)
class ElectRequest:
    """One name's part of a batched election: the same inputs as :meth:`BackendConnection.elect`."""

    name: str
    node: str
    lease: float
    """The lease length to grant, in seconds (the name's ``interval``)."""
    held_term: int | None
    barrier: float = 0.0
    """How long a failover barrier installed by this bid lasts, in seconds:
    ``interval * (1 + m) / (1 - m)`` plus the expiry slack, ``m`` the name's
    ``max_clock_drift`` (see :doc:`/protocol`, "Failover"). Backends without timelines
    ignore it."""


@final
@attrs.frozen(kw_only=True)
class ReleaseRequest:
    """One name's part of a batched release."""

    name: str
    node: str
    term: int


@final
@attrs.frozen(kw_only=True)
class ReleaseOutcome:
    """What a batched release did for one name."""

    released: bool
    """The tenure was live and is now expired (and announced)."""
    busy: bool = False
    """The row was locked by another transaction: nothing changed; retry."""


@final
@attrs.frozen(kw_only=True)
class SessionSettings:
    """The connection-level settings of a session (see :func:`~trio_peers.open_session`)."""

    dsn: str = attrs.field(repr=False)
    listen: bool = True
    connect_timeout: float = 10.0


class SessionConnection(Protocol):
    """The one connection of a :class:`~trio_peers.PeerSession`. Trio-flavoured.

    Every method takes many names of one table at once; results come back in the order
    of the requests. Errors are those of :class:`BackendConnection`. The session treats
    :exc:`~trio_peers.TableMissing`, :exc:`~trio_peers.SchemaError` and
    :exc:`~trio_peers.BackendMisconfigured` as a problem of that table's names only, and
    anything else as the connection's.
    """

    async def prepare(self, table: LeaseTable, *, statement_timeout: float) -> bool:
        """Check ``table``'s shape (and, with ``listen``, prepare its statements and LISTEN
        on its channel) on this connection. Returns True if the table is UNLOGGED."""
        ...

    async def elect(
        self, table: LeaseTable, requests: Sequence[ElectRequest], *, statement_timeout: float
    ) -> list[ElectionOutcome]:
        """One election round for each request (distinct names), as one atomic statement."""
        ...

    async def release(
        self,
        table: LeaseTable,
        requests: Sequence[ReleaseRequest],
        *,
        sender: str,
        statement_timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> list[ReleaseOutcome]:
        """Release each tenure (distinct names) and NOTIFY the released ones, atomically.

        ``on_sent``, if given, is called once (sync, in the Trio thread, never raising) as
        soon as the statement has left, before its reply: the session then does the work
        it had held back so as not to delay the statement (telling each peer's readers
        that leadership ended). A connection that cannot tell may call it at once, or
        never; nothing but that scheduling depends on it.
        """
        ...

    async def get_leaders(
        self, table: LeaseTable, names: Sequence[str], *, statement_timeout: float
    ) -> dict[str, LeaderInfo]:
        """The unexpired leases among ``names``."""
        ...

    async def aclose(self) -> None:
        """Close gracefully. The caller bounds it with a timeout and falls back to :meth:`abort`."""
        ...

    def abort(self) -> None:
        """Close at once, without waiting. Sync; never blocks; idempotent."""
        ...


class SessionConnector(Protocol):
    """Opens the connection of one session (again after it is lost)."""

    async def connect(
        self,
        *,
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> SessionConnection:
        """Open a connection. ``on_notification(channel, payload)`` is called for each
        NOTIFY on a channel :meth:`SessionConnection.prepare` listens on, ``on_lost()`` when
        the connection drops; both sync, in the Trio thread, never raising."""
        ...


@runtime_checkable
class SessionBackend(Protocol):
    """A lease store that serves sessions: many names over one connection."""

    def open_session(
        self, settings: SessionSettings
    ) -> AbstractAsyncContextManager[SessionConnector]:
        """Resources a session needs for its lifetime (e.g. the asyncio loop for asyncpg)."""
        ...
