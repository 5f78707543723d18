"""A :class:`~trio_peers.PeerBackend` served as a session of one name.

:func:`~trio_peers.open_peer` runs every peer on a private session (one name, one
connection): a backend that serves sessions does so itself; a backend that serves only the
per-peer protocol (a custom store, or a wrapper around one, as tests and benchmarks write)
is adapted here, so that connections, NOTIFY and the watchdog are the session's job on
every path and a :class:`~trio_peers.Peer` never manages a connection of its own.

The adapter holds the one name's config: the per-peer protocol opens its resources and
connections for one name (:meth:`PeerBackend.open`), and each batch of a private session
carries exactly that name's request. Errors pass through as the per-peer connection
raised them; the session maps them as it maps a session connection's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import final

import trio

from ._backend import (
    BackendConnection,
    BackendConnector,
    ElectRequest,
    LeaderInfo,
    LeaseTable,
    PeerBackend,
    ReleaseOutcome,
    ReleaseRequest,
    SessionConnection,
    SessionConnector,
    SessionSettings,
)
from ._config import PeerConfig
from ._core import ElectionOutcome


@final
class OneNameBackend:
    """``backend`` (per-peer protocol only) as the :class:`~trio_peers.SessionBackend` of a
    private session whose one name is ``config.name``."""

    def __init__(self, backend: PeerBackend, config: PeerConfig) -> None:
        self._backend = backend
        self._config = config

    def open_session(
        self, settings: SessionSettings
    ) -> AbstractAsyncContextManager[SessionConnector]:
        del settings  # (made from the same config: the backend opens for the config)
        return self._open()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[SessionConnector]:
        async with self._backend.open(self._config) as connector:
            yield _Connector(connector, self._config)


@final
class _Connector:
    def __init__(self, connector: BackendConnector, config: PeerConfig) -> None:
        self._connector = connector
        self._table = LeaseTable(config.prefix, config.table)

    async def connect(
        self,
        *,
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> SessionConnection:
        channel = self._table.channel

        def on_payload(payload: str) -> None:
            # (Sync, never raising: the session's callback only queues the payload.)
            on_notification(channel, payload)

        conn = await self._connector.connect(on_notification=on_payload, on_lost=on_lost)
        return _Connection(conn, self._table)


@final
class _Connection:
    """One per-peer connection as a session's connection of one name and one table."""

    def __init__(self, conn: BackendConnection, table: LeaseTable) -> None:
        self._conn = conn
        self._table = table

    def _check(self, table: LeaseTable, count: int) -> None:
        # A private session sends one request of its one name per statement.
        if table != self._table or count != 1:
            raise ValueError(
                f"a one-name session got {count} request(s) for {table}; expected one for "
                f"{self._table}"
            )

    async def prepare(self, table: LeaseTable, *, statement_timeout: float) -> bool:
        # The per-peer connect checked the table already (and warned of an UNLOGGED one).
        del statement_timeout
        self._check(table, 1)
        await trio.lowlevel.checkpoint()
        return False

    async def elect(
        self, table: LeaseTable, requests: Sequence[ElectRequest], *, statement_timeout: float
    ) -> list[ElectionOutcome]:
        self._check(table, len(requests))
        (r,) = requests
        outcome = await self._conn.elect(
            node=r.node, held_term=r.held_term, statement_timeout=statement_timeout
        )
        return [outcome]

    async def release(
        self,
        table: LeaseTable,
        requests: Sequence[ReleaseRequest],
        *,
        sender: str,
        statement_timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> list[ReleaseOutcome]:
        # (The per-peer protocol cannot tell when its statement has left: on_sent, which
        # only schedules, is never called; only a shared session passes one.)
        del on_sent
        self._check(table, len(requests))
        (r,) = requests
        released = await self._conn.release(
            node=r.node, term=r.term, sender=sender, statement_timeout=statement_timeout
        )
        return [ReleaseOutcome(released=released)]

    async def get_leaders(
        self, table: LeaseTable, names: Sequence[str], *, statement_timeout: float
    ) -> dict[str, LeaderInfo]:
        self._check(table, len(names))
        info = await self._conn.get_leader(statement_timeout=statement_timeout)
        return {} if info is None else {info.name: info}

    async def aclose(self) -> None:
        await self._conn.aclose()

    def abort(self) -> None:
        self._conn.abort()
