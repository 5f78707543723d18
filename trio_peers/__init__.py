"""trio-peers: leader election among the processes of an application, through PostgreSQL.

.. code-block:: python

    async with trio_peers.open_peer(trio_peers.PeerConfig(dsn=dsn)) as peer:
        async for change in peer.leadership():
            ...
"""

from ._asyncpg import AsyncpgBackend as AsyncpgBackend, migrate as migrate
from ._backend import (
    BackendConnection as BackendConnection,
    BackendConnector as BackendConnector,
    ElectRequest as ElectRequest,
    LeaderInfo as LeaderInfo,
    LeaseTable as LeaseTable,
    PeerBackend as PeerBackend,
    ReleaseOutcome as ReleaseOutcome,
    ReleaseRequest as ReleaseRequest,
    SessionBackend as SessionBackend,
    SessionConnection as SessionConnection,
    SessionConnector as SessionConnector,
    SessionSettings as SessionSettings,
)
from ._cell import LeadershipChange as LeadershipChange, LeadershipChannel as LeadershipChannel
from ._config import PeerConfig as PeerConfig
from ._core import ElectionOutcome as ElectionOutcome
from ._events import (
    ElectionRound as ElectionRound,
    EventHook as EventHook,
    Fault as Fault,
    LeadershipGained as LeadershipGained,
    LeadershipLost as LeadershipLost,
    LeaseReleased as LeaseReleased,
    NotificationReceived as NotificationReceived,
    PeerEvent as PeerEvent,
)
from ._exceptions import (
    BackendMisconfigured as BackendMisconfigured,
    BackendUnavailable as BackendUnavailable,
    PeerError as PeerError,
    SchemaError as SchemaError,
    ServerBehind as ServerBehind,
    TableMissing as TableMissing,
    TenureLost as TenureLost,
    TrioPeersInternalError as TrioPeersInternalError,
)
from ._fence import Fence as Fence
from ._leader_work import LeaderScope as LeaderScope, current_term as current_term
from ._peer import Peer as Peer, PeerStatistics as PeerStatistics
from ._session import (
    PeerSession as PeerSession,
    SessionStatistics as SessionStatistics,
    open_peer as open_peer,
    open_session as open_session,
)
from ._util import fixup_module_metadata as _fixup_module_metadata

__all__ = [
    "AsyncpgBackend",
    "BackendConnection",
    "BackendConnector",
    "BackendMisconfigured",
    "BackendUnavailable",
    "ElectRequest",
    "ElectionOutcome",
    "ElectionRound",
    "EventHook",
    "Fault",
    "Fence",
    "LeaderInfo",
    "LeaderScope",
    "LeadershipChange",
    "LeadershipChannel",
    "LeadershipGained",
    "LeadershipLost",
    "LeaseReleased",
    "LeaseTable",
    "NotificationReceived",
    "Peer",
    "PeerBackend",
    "PeerConfig",
    "PeerError",
    "PeerEvent",
    "PeerSession",
    "PeerStatistics",
    "ReleaseOutcome",
    "ReleaseRequest",
    "SchemaError",
    "ServerBehind",
    "SessionBackend",
    "SessionConnection",
    "SessionConnector",
    "SessionSettings",
    "SessionStatistics",
    "TableMissing",
    "TenureLost",
    "TrioPeersInternalError",
    "__version__",
    "current_term",
    "migrate",
    "open_peer",
    "open_session",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("trio-peers")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0.0.0"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
