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
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, final

import attrs

from ._config import PeerConfig
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
        changes nothing and reports the current holder.
        """
        ...

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        """Release tenure ``term`` (if still held and unexpired) and NOTIFY ``down``, atomically.

        Returns True if a lease was released.
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
