"""What one peer tells the outside world: its log lines and its events.

The peer decides (its core) and acts (its rounds); its :class:`PeerReporter` says so. Log
lines follow one policy: a fault is logged at WARNING once per kind of fault per outage,
shared by the names of a session (:class:`~trio_peers._util.SharedLog`), and its recovery
once at INFO; an unexpected error (a bug) with its traceback, at most once a minute. Events
go to the peer's :data:`~trio_peers.EventHook`, built only when there is one; what the hook
raises is logged, never raised. Every method is sync and never blocks.
"""

from __future__ import annotations

import logging
from typing import Final, final

from ._events import (
    ElectionRound,
    EventHook,
    Fault,
    LeadershipGained,
    LeadershipLost,
    LeaseReleased,
    NotificationKind,
    NotificationReceived,
    PeerEvent,
    RoundOutcome,
)
from ._exceptions import TableMissing
from ._util import ErrorLog, SharedLog

log: Final = logging.getLogger("trio_peers")

#: A follower warns of a locked lease row after this many busy rounds in a row.
_FOLLOWER_BUSY_WARN_AFTER: Final = 3
#: A session (or a peer of its own) warns of a leader with a longer interval at most this
#: often (s).
_LONGER_LEASE_WARN_PERIOD: Final = 600.0


def _fault_cause(exc: BaseException) -> tuple[str, str]:
    """What kind of fault ``exc`` is, for logging each kind once per outage.

    The driver's exception class when there is one (a refused connect, a read-only server,
    a timeout); else the message (``connection lost``).
    """
    cause = exc.__cause__
    if cause is not None:
        return (type(exc).__name__, type(cause).__name__)
    return (type(exc).__name__, str(exc))


@final
class PeerReporter:
    """The log lines and events of the peer of ``name`` on ``node``."""

    def __init__(
        self,
        name: str,
        node: str,
        table: tuple[str, str],
        on_event: EventHook | None,
        shared_log: SharedLog,
    ) -> None:
        self._name = name
        self._node = node
        self._who = f"{name} ({node})"
        self._on_event = on_event
        #: Whether events are wanted (callers skip building what only an event needs).
        self.events = on_event is not None
        self._hook_errors = ErrorLog(
            consequence="the event is dropped and the peer carries on as before. "
            "Fix the hook: it must not raise."
        )
        self._unexpected = ErrorLog()
        self._shared = shared_log
        self._faulty = False
        self._causes: set[tuple[str, str]] = set()
        self._table_key = ("table missing", *table)
        self._table_missing = False
        #: The last fault, as ``"Class: message"`` (PeerStatistics.last_error).
        self.last_error: str | None = None

    def emit(self, event: PeerEvent) -> None:
        """Hand ``event`` to the hook (there is one). Its errors are logged, never raised."""
        assert self._on_event is not None
        try:
            self._on_event(event)
        except Exception as exc:
            self._hook_errors.report(self._who, "the event hook", exc)

    # ------------------------------------------------------------------ rounds

    def round(
        self,
        *,
        started: float,
        outcome: RoundOutcome,
        held_term: int | None,
        trust_left: float | None,
        error: BaseException | None,
        now: float,
    ) -> None:
        """An election round ended (with events only)."""
        self.emit(
            ElectionRound(
                name=self._name,
                node=self._node,
                outcome=outcome,
                duration=now - started,
                term=held_term,
                trust_left=trust_left,
                error=None if error is None else f"{type(error).__name__}: {error}",
                at=now,
            )
        )

    def fault(self, exc: BaseException, what: str, now: float, *, kind: str = "statement") -> None:
        """A fault: at WARNING for each new cause during an outage, else at DEBUG.

        An outage often starts with one cause (the connection is lost) and goes on with
        another (the server came back read-only): each distinct cause is worth one line, a
        repeated one is not.
        """
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._faulty = True
        if self._on_event is not None:
            self.emit(
                Fault(name=self._name, node=self._node, kind=kind, error=self.last_error, at=now)
            )
        cause = _fault_cause(exc)
        if cause not in self._causes and self._enter_fault(cause):
            log.warning(
                "trio-peers %s: %s failed, stepping down and retrying: %s%s",
                self._who,
                what,
                self.last_error,
                self._shared.note,
            )
        else:
            log.debug("trio-peers %s: %s failed again: %s", self._name, what, exc)

    def table_missing(self, exc: TableMissing, now: float) -> None:
        """The lease table is missing: one WARNING per outage (shared), a Fault event."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._on_event is not None:
            self.emit(
                Fault(
                    name=self._name,
                    node=self._node,
                    kind="table_missing",
                    error=self.last_error,
                    at=now,
                )
            )
        if not self._table_missing:
            self._table_missing = True
            if self._shared.enter(self._table_key):
                log.warning(
                    "trio-peers %s: %s; staying follower%s", self._name, exc, self._shared.note
                )

    def misconfigured(self, exc: BaseException) -> None:
        """A permanent misconfiguration found after entry (it is retried every interval)."""
        log.error("trio-peers %s: %s", self._name, exc)

    def unexpected(self, where: str, exc: BaseException) -> None:
        """A bug (ours, the driver's, the backend's): traceback, at most once a minute."""
        self._unexpected.report(self._who, where, exc)

    def round_ok(self) -> None:
        """A round succeeded: an outage, or a missing table, has ended."""
        if self._faulty:
            self._faulty = False
            if self._leave_faults():
                log.info("trio-peers %s: database reachable again%s", self._who, self._shared.note)
        if self._table_missing:
            self._table_missing = False
            if self._shared.leave(self._table_key):
                log.info("trio-peers %s: lease table found%s", self._name, self._shared.note)

    def busy(self, *, leading: bool, streak: int) -> None:
        """The lease row was locked by another transaction, ``streak`` rounds in a row.

        Once per streak, not per retry. A follower's first busy rounds are most often
        another follower's election in the same instant (a handover race): worth a
        warning only when the row stays locked.
        """
        if streak == (1 if leading else _FOLLOWER_BUSY_WARN_AFTER):
            log.warning(
                "trio-peers %s: the lease row is locked by another transaction "
                "(a fenced write, or someone else); not waiting for it, retrying%s",
                self._who,
                "; leading until the current trust deadline" if leading else "",
            )
        elif streak == 1:
            log.debug("trio-peers %s: lease row busy; retrying", self._who)

    def longer_lease(
        self, holder: str | None, remaining: float, interval: float, now: float
    ) -> None:
        """A denied bid showed ``holder``'s lease with ``remaining`` seconds left, more than
        this peer's ``interval`` and failover barrier: the peers of this name run with
        different intervals. At WARNING, at most once per :data:`_LONGER_LEASE_WARN_PERIOD`
        for all names of a session."""
        if not self._shared.due(("longer lease",), now, _LONGER_LEASE_WARN_PERIOD):
            return
        log.warning(
            "trio-peers %s: the leader %s holds a lease with %.4g s left, longer than this "
            "peer's interval (%.4g s) and its failover barrier: peers of this name run "
            "with different intervals. "
            "Give every peer of a name the same interval and max_clock_drift: a failover "
            "barrier is only as long as the interval of the peer that installs it, so after "
            "a failover during a network partition two peers could lead at once (expected "
            "while a rolling deploy changes the interval; see the high-availability how-to)",
            self._who,
            holder,
            remaining,
            interval,
        )

    # ------------------------------------------------------------------ leadership

    def gained(self, term: int | None, now: float) -> None:
        log.info("trio-peers %s: leadership gained by %s (term %s)", self._name, self._node, term)
        if self._on_event is not None and term is not None:
            self.emit(LeadershipGained(name=self._name, node=self._node, term=term, at=now))

    def lost(self, term: int | None, reason: str, now: float, *, replaced: bool) -> None:
        """The tenure ``term`` ended (``replaced``: by a newer tenure of this peer's)."""
        if not replaced:
            log.info(
                "trio-peers %s: leadership lost by %s (term %s)", self._name, self._node, term
            )
        if self._on_event is not None and term is not None:
            self.emit(
                LeadershipLost(
                    name=self._name,
                    node=self._node,
                    term=term,
                    reason="replaced" if replaced else reason,
                    at=now,
                )
            )

    def released(self, term: int, released: bool, duration: float, now: float) -> None:
        """A release statement of ``term`` ended (with events only)."""
        self.emit(
            LeaseReleased(
                name=self._name,
                node=self._node,
                term=term,
                released=released,
                duration=duration,
                at=now,
            )
        )

    def notification(self, kind: NotificationKind, now: float) -> None:
        """A notification on the channel reached this peer (with events only)."""
        self.emit(NotificationReceived(name=self._name, node=self._node, kind=kind, at=now))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """The peer closed: the sharers of its log log for themselves from now on."""
        self._leave_faults()
        if self._table_missing:
            self._table_missing = False
            self._shared.leave(self._table_key)

    def _enter_fault(self, cause: tuple[str, str]) -> bool:
        """A new cause of faults for this peer; True if the first among its log's sharers."""
        self._causes.add(cause)
        return self._shared.enter(("fault", cause))

    def _leave_faults(self) -> bool:
        """This peer's faults ended; True if they ended for the last of its log's sharers."""
        last = False
        for cause in self._causes:
            last = self._shared.leave(("fault", cause)) or last
        self._causes.clear()
        return last
