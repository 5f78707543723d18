"""Events a peer reports to an event hook: what metrics and tracing integrations consume.

Every event is a frozen, final attrs class with keyword-only fields; all of them carry the
instance ``name``, this peer's ``node`` and ``at``, the :func:`trio.current_time` at which the
event happened. Durations are seconds on the same clock.

An :data:`EventHook` is a plain sync callable. The peer calls it inline, from its own tasks, so
it must not block, and should be cheap (update counters, append to a buffer); an exception it
raises is caught and logged (rate-limited), never propagated into the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, TypeAlias, final

import attrs

RoundOutcome: TypeAlias = Literal[
    "gained", "renewed", "resumed", "replaced", "denied", "lost", "failed", "busy"
]
"""What one election round did (see :class:`ElectionRound`)."""

ROUND_OUTCOMES: Final[tuple[RoundOutcome, ...]] = (
    "gained",
    "renewed",
    "resumed",
    "replaced",
    "denied",
    "lost",
    "failed",
    "busy",
)

NotificationKind: TypeAlias = Literal["down", "ignored", "malformed"]
"""What a notification on the peers' channel was (see :class:`NotificationReceived`)."""


@final
@attrs.frozen(kw_only=True)
class ElectionRound:
    """One election round finished (every round, renewals included).

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    outcome: Literal[
        "gained", "renewed", "resumed", "replaced", "denied", "lost", "failed", "busy"
    ]
    """What the round did:

    ``"gained"``
        took a new tenure (a new term);
    ``"renewed"``
        renewed the tenure it trusted;
    ``"resumed"``
        renewed a tenure it held but no longer trusted (after an error or a pause);
    ``"replaced"``
        held a tenure and took a new one, with a higher term, in the same round;
    ``"denied"``
        was a follower and stays one;
    ``"lost"``
        held a tenure, and the database says it is gone;
    ``"failed"``
        the statement failed or timed out (see :attr:`error`); trust, if any, ended;
    ``"busy"``
        the lease row was locked by another transaction (a fenced write, say): nothing
        changed, and a leader keeps its trust deadline (see :doc:`/protocol`).

    A round that is not run (leader-only work that ignores cancellation still runs, so the
    peer does not bid) reports nothing.
    """
    duration: float
    """Seconds from the start of the round (just before its statement is sent) until its
    result, or failure, arrived."""
    term: int | None
    """The term this peer holds after the round, or ``None``."""
    trust_left: float | None
    """Leaders only: seconds of local trust left when the round finished (how close the
    renewal came to the trust deadline); ``None`` for a follower."""
    error: str | None
    """For ``"failed"``: the error, as ``"ExceptionType: message"``; otherwise ``None``."""
    at: float
    """:func:`trio.current_time` when the round finished."""


@final
@attrs.frozen(kw_only=True)
class LeadershipGained:
    """This peer started to lead (to trust a tenure).

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    term: int
    """The tenure's fencing term."""
    at: float
    """:func:`trio.current_time` when the peer started to trust the tenure."""


@final
@attrs.frozen(kw_only=True)
class LeadershipLost:
    """This peer stopped leading.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    term: int
    """The term of the tenure that ended (or is no longer trusted)."""
    reason: str
    """Why, in a few words, e.g. ``"lost"``, ``"failed"``, ``"trust expired"``,
    ``"resigned"``, ``"closed"``."""
    at: float
    """:func:`trio.current_time` when the peer stopped trusting the tenure."""


@final
@attrs.frozen(kw_only=True)
class Fault:
    """Something went wrong that the peer recovers from by itself.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    kind: str
    """What kind of fault, e.g. ``"connect"``, ``"connection_lost"``, ``"statement"``,
    ``"table_missing"``, ``"hook"``."""
    error: str
    """The error, as ``"ExceptionType: message"``."""
    at: float
    """:func:`trio.current_time` when it happened."""


@final
@attrs.frozen(kw_only=True)
class NotificationReceived:
    """A notification arrived on the peers' channel.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    kind: Literal["down", "ignored", "malformed"]
    """``"down"``: another peer released its lease (the peer runs a round at once);
    ``"ignored"``: this peer's own, or for another instance name; ``"malformed"``: not a
    payload trio-peers sends."""
    at: float
    """:func:`trio.current_time` when it arrived."""


@final
@attrs.frozen(kw_only=True)
class LeaseReleased:
    """The peer tried to release its lease as it closed or resigned.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    term: int
    """The term of the released tenure."""
    released: bool
    """Whether the database released it (``False``: the statement failed or timed out, or the
    lease had already expired or passed on; the other peers then wait for it to expire).
    Committed, but without synchronous standbys not yet flushed: a server crash before the
    next synchronous commit (the takeover's) may undo it (see :doc:`/protocol`)."""
    duration: float
    """Seconds the release statement took."""
    at: float
    """:func:`trio.current_time` when it finished."""


PeerEvent: TypeAlias = (
    ElectionRound
    | LeadershipGained
    | LeadershipLost
    | Fault
    | NotificationReceived
    | LeaseReleased
)
"""Any event a peer reports."""

EventHook: TypeAlias = Callable[[PeerEvent], None]
"""The type of an event hook: a sync callable that must not block."""

EVENT_TYPES: Final[tuple[type[PeerEvent], ...]] = (
    ElectionRound,
    LeadershipGained,
    LeadershipLost,
    Fault,
    NotificationReceived,
    LeaseReleased,
)
