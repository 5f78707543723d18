"""The election state machine: pure, no I/O, no clock reads.

Rules of this module (after h11's ``_state.py``):

1. Everything that decides *whether this peer leads* and *when it acts next*
   lives here. The Trio shell (``_peer.py``) only runs statements, sleeps and
   publishes what this module decides.
2. Time is always an input (``now``: seconds on the shell's monotonic clock,
   :func:`trio.current_time` in practice). Randomness comes from an injected
   :class:`random.Random`. So every transition is reproducible in tests.
3. Illegal input raises :exc:`CoreError` and leaves the state unchanged.

Theory of operation
-------------------

A peer runs *rounds*. A round is one statement that, atomically in the
database, either renews the tenure this peer holds (same ``term``), takes over
an absent or expired lease (new ``term``), or changes nothing. Its outcome is
an :class:`ElectionOutcome`, in durations measured on the database clock.

The peer *holds* a tenure (``term``) from a successful round until the database
says otherwise. It *trusts* that tenure until ``trusted_until``: the start of
the round that won or renewed it (taken before the statement is sent, so
earlier than the database's ``now()``), plus the lease length the database
granted, minus ``trust_margin`` (which covers clock-rate drift). The database
cannot let anyone else take the lease before it expires, and the lease cannot
expire before local trust ends as long as the drift stays within bounds. So
two peers never trust a tenure at the same instant.

A failed round (error, timeout) ends trust at once, but the peer remembers the
tenure: if a later round finds it still unexpired in the database, the peer
resumes it with the same ``term``; if someone else took it, the peer learns
that it lost. ``is_leader(now)`` is ``now < trusted_until``: it needs no
event to turn false when a renewal hangs or the process was paused.
"""

from __future__ import annotations

import enum
import json
import math
import random
from typing import Final, Literal, final

import attrs

#: Jitter shortens every scheduled delay by up to this fraction (Oban's ``mode: :dec``).
JITTER: Final = 0.1
#: A follower wakes this long (plus drift allowance) after the holder's lease
#: expires according to the database, so its bid arrives just after expiry.
EXPIRY_SLACK_MIN: Final = 0.001
EXPIRY_SLACK_FRACTION: Final = 0.002
#: Backoff after failed rounds: ``min(interval * BACKOFF_CAP, base * 2**(n-1))``,
#: times a random factor in ``[0.5, 1]``, with ``base = min(0.05, interval / 20)``.
BACKOFF_CAP: Final = 0.5
#: A periodic round may run up to this fraction of its period early, to share a batch.
ALIGN_FRACTION: Final = 0.25


FailureCause = Literal["unavailable", "unexpected", "table_missing", "misconfigured", "behind"]
"""What kind of fault failed a round (see :meth:`ElectionCore.round_failed`)."""


def expiry_slack(interval: float) -> float:
    """How long after a lease's expiry (per the database) a follower bids for it."""
    return EXPIRY_SLACK_MIN + EXPIRY_SLACK_FRACTION * interval


def longer_lease_seen(
    outcome: ElectionOutcome, interval: float, max_clock_drift: float
) -> float | None:
    """The time left of another node's lease, if a denied bid shows it longer than a
    failover barrier of this peer would last (:func:`drift_bound`).

    Every lease a peer writes lasts exactly its ``interval`` on the database clock, so a
    lease with more time left than that was written by a peer of the same name with a
    longer interval. Past the barrier's length that is unsafe across a failover (a barrier
    is as long as the interval of the peer that installs it; see
    docs/howto/high-availability.rst), so the shell warns. Comparing with the barrier, not
    the interval, also leaves room for what a lease's time left can exceed its interval by
    with equal intervals (the two statements' ``now()`` differ by their start times). A
    failover barrier (node ``''``) is no one's lease and is not counted.
    """
    remaining = outcome.holder_remaining
    if outcome.term is not None or remaining is None or not outcome.holder_node:
        return None
    return remaining if remaining > drift_bound(interval, max_clock_drift) else None


def drift_bound(interval: float, max_clock_drift: float) -> float:
    """The longest ``interval`` on any peer's clock can last on another's, plus slack.

    A peer's round is at most ``interval`` away on its own clock; with clock rates that
    differ by up to ``max_clock_drift`` (m) that is at most ``interval * (1 + m) / (1 - m)``
    on another clock; plus :func:`expiry_slack`. It bounds how long a resigned peer holds
    back (:attr:`ElectionCore.resign_hold`) and how long a failover barrier lasts
    (:mod:`._term`): by then every lease granted with ``interval`` before it, trusted on
    any clock, has ended.
    """
    m = max_clock_drift
    return interval * (1 + m) / (1 - m) + expiry_slack(interval)


class CoreError(Exception):
    """Input that the state machine does not accept in its current state."""


@final
@attrs.frozen
class ElectionOutcome:
    """What one election statement reported. Durations are on the database clock."""

    term: int | None
    """The term this peer holds after the statement, or ``None`` if it was denied."""
    lease_remaining: float | None = None
    """If won: seconds from the statement's ``now()`` until our lease expires."""
    holder_node: str | None = None
    """If denied: the node that holds an unexpired lease (if any)."""
    holder_term: int | None = None
    """If denied: the term of that lease."""
    holder_remaining: float | None = None
    """If denied: seconds until that lease expires, per the database."""
    busy: bool = False
    """Not won, and nothing done: the statement could have taken or renewed the lease,
    but another transaction held the row locked (it does not wait for such a lock)."""


class Change(enum.Enum):
    """What a round did to this peer's leadership, for logging and statistics."""

    GAINED = "gained"
    """Took a new tenure (new term)."""
    RESUMED = "resumed"
    """Renewed a tenure it held but no longer trusted (after an error or a pause)."""
    RENEWED = "renewed"
    """Renewed the trusted tenure."""
    LOST = "lost"
    """Held a tenure, and the database says it is gone."""
    DENIED = "denied"
    """Was follower and stays follower."""
    FAILED = "failed"
    """The round failed; trust (if any) ended."""
    REPLACED = "replaced"
    """Held a tenure and took a new one with a higher term in the same round."""
    BUSY = "busy"
    """The lease row was locked by another transaction; nothing changed. A held tenure
    keeps its trust deadline: no extension, and no cut (nobody else can take the row
    while it is locked, and the lease granted earlier still stands)."""


@final
@attrs.define
class Tenure:
    """A lease this peer holds (or held, until a round says otherwise).

    Mutable: a renewal moves ``trusted_until`` in place. A new object per renewal would
    live for a round (a second or more) and so reach the garbage collector's oldest
    generation: at 1,000 names that was 1,000 objects a second making every full
    collection come sooner.
    """

    term: int
    trusted_until: float


def jitter(base: float, rng: random.Random) -> float:
    """``base`` shortened by a random fraction in ``[0, JITTER)``."""
    return base * (1.0 - JITTER * rng.random())


@final
class ElectionCore:
    """The election state machine of one peer. See the module docstring."""

    def __init__(
        self,
        *,
        interval: float,
        leader_boost: float,
        trust_margin: float,
        statement_timeout: float,
        max_clock_drift: float = 0.0,
        queue_wait: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not (interval > 0 and leader_boost >= 1 and 0 <= trust_margin < interval):
            raise CoreError("invalid timing parameters")
        if not 0 < statement_timeout <= interval / 2:
            raise CoreError("statement_timeout must be in (0, interval / 2]")
        self.interval = interval
        self.leader_boost = leader_boost
        self.trust_margin = trust_margin
        self.statement_timeout = statement_timeout
        self.max_clock_drift = max_clock_drift
        if not 0 <= queue_wait < interval:
            raise CoreError("queue_wait must be in [0, interval)")
        #: Longest a round may wait for the connection before its statement is sent (a
        #: batch of other names in flight on a shared session connection): a renewal is
        #: scheduled early enough to wait that long, time out, and still be retried.
        self.queue_wait = queue_wait
        self._align_from = math.inf
        self._align_for = math.nan
        self._rng = rng if rng is not None else random.Random()
        self.tenure: Tenure | None = None
        self.next_round_at: float = -math.inf
        self.round_started_at: float | None = None
        self.failures = 0
        self.busy_rounds = 0
        self.closed = False
        self._wake_pending = False
        self._hold_until = -math.inf
        self._resigned_term = 0
        self._resign_requested = False
        self._pending_release: int | None = None
        self._last_poll = math.nan

    # ------------------------------------------------------------------ queries

    def is_leader(self, now: float) -> bool:
        """True while this peer trusts a tenure. Reads the deadline every time."""
        return self.tenure is not None and now < self.tenure.trusted_until

    def term(self, now: float) -> int | None:
        """The trusted tenure's term, or ``None``."""
        if self.tenure is not None and now < self.tenure.trusted_until:
            return self.tenure.term
        return None

    @property
    def held_term(self) -> int | None:
        """The term of the tenure this peer may still hold in the database."""
        return self.tenure.term if self.tenure is not None else None

    @property
    def trusted_until(self) -> float:
        """Local trust deadline, or ``-inf`` when no tenure is trusted."""
        return self.tenure.trusted_until if self.tenure is not None else -math.inf

    @property
    def expiry_slack(self) -> float:
        return expiry_slack(self.interval)

    @property
    def backoff_base(self) -> float:
        return min(0.05, self.interval / 20)

    # ------------------------------------------------------------------ inputs

    def start_round(self, now: float) -> int | None:
        """A round begins at ``now``. Returns the term to renew, or ``None``."""
        if self.closed:
            raise CoreError("the peer is closed")
        if self.round_started_at is not None:
            raise CoreError("a round is already in progress")
        self.round_started_at = now
        return self.held_term

    def round_succeeded(self, now: float, outcome: ElectionOutcome) -> Change:
        """The statement of the current round returned ``outcome`` at ``now``."""
        if outcome.term is not None and (
            outcome.lease_remaining is None or outcome.lease_remaining <= 0
        ):
            raise CoreError("a won round must report a positive lease_remaining")
        if outcome.term is not None and outcome.busy:
            raise CoreError("a busy round cannot have won")
        start = self._finish_round(now)
        wake = self._take_wake()
        was_trusted = self.tenure is not None and start < self.tenure.trusted_until
        before = self.tenure
        self.failures = 0
        if outcome.busy:
            return self._round_busy(now)
        self.busy_rounds = 0
        if outcome.term is None:
            self.tenure = None
            if wake:
                self.next_round_at = now
            else:
                self.next_round_at = self._follower_next(start, now, outcome)
                if self.next_round_at == self._last_poll:
                    self._alignable(self.next_round_at - ALIGN_FRACTION * self.interval)
            self._resign_requested = False  # nothing left to give up
            return Change.LOST if before is not None else Change.DENIED
        assert outcome.lease_remaining is not None
        # A term won: a resigned one not released yet (its leader-only work overran the
        # release) is gone from the row, and releasing it at close would release nothing
        # while the lease won here stayed live.
        self._pending_release = None
        trusted_until = start + outcome.lease_remaining - self.trust_margin
        if before is not None and before.term == outcome.term:
            before.trusted_until = trusted_until
        else:
            self.tenure = Tenure(outcome.term, trusted_until)
        cap = (trusted_until - start) - self.statement_timeout - self.queue_wait
        base = self.interval / self.leader_boost
        delay = max(min(jitter(base, self._rng), cap), 0.0)
        self.next_round_at = start + delay
        self._alignable(start + max(delay - ALIGN_FRACTION * base, 0.0))
        if before is None:
            change = Change.GAINED
        elif before.term != outcome.term:
            change = Change.REPLACED
        else:
            change = Change.RENEWED if was_trusted else Change.RESUMED
        self._complete_requested_resign(now)
        return change

    def _round_busy(self, now: float) -> Change:
        # Retry with the backoff of failed rounds (a lock may be held for long: a fenced
        # transaction), but a leader retries in time to renew before its trust ends.
        self.busy_rounds += 1
        retry = now + self.backoff(self.busy_rounds)
        if self.tenure is not None:
            last_chance = self.tenure.trusted_until - self.statement_timeout - self.queue_wait
            if now < last_chance:
                retry = min(retry, last_chance)
        self.next_round_at = retry
        self._complete_requested_resign(now)
        return Change.BUSY

    def round_failed(self, now: float, *, cause: FailureCause = "unavailable") -> Change:
        """The statement of the current round failed (error or timeout) at ``now``.

        Trust ends at once; the tenure is remembered so a later round may resume it.
        The next round comes after :meth:`backoff` for a fault that may pass at any moment
        (``"unavailable"``, ``"unexpected"``, ``"behind"``: the server is on an older
        timeline than one this peer has seen, a resurrected old primary that a failover may
        leave behind at any moment), and after one ``interval`` for one that an
        operator must fix (``"table_missing"``, ``"misconfigured"``): the shell says which
        kind of fault it was, the core decides when to try again.
        """
        self._finish_round(now)
        self._take_wake()
        self._distrust()
        self.failures += 1
        if cause in ("table_missing", "misconfigured"):
            delay = self.interval
        else:
            delay = self.backoff(self.failures)
        self.next_round_at = now + delay
        self._complete_requested_resign(now)
        return Change.FAILED

    def connection_lost(self, now: float) -> bool:
        """The connection dropped between rounds. Trust ends; reconnect after backoff.

        Returns True if this ended trust in a tenure. During a round this does
        nothing: the round itself fails.
        """
        if self.closed or self.round_started_at is not None:
            return False
        was_leader = self.is_leader(now)
        self._distrust()
        self.failures += 1
        # Reconnect soon, but not before a resign's hold ends: a bid then could win back
        # the lease this peer has just released, and the handover would not happen.
        retry = max(now + self.backoff(self.failures), self._hold_until)
        self.next_round_at = min(self.next_round_at, retry)
        return was_leader

    def resign(self, now: float) -> int | None:
        """Give up the tenure now; bid again only after every follower had its turn.

        Trust ends at once. The resigned peer holds its bids for :attr:`resign_hold`
        seconds, longer than any follower's next poll even with drifting clocks,
        and ignores ``down`` notifications of its own or older terms meanwhile (a
        stale one could otherwise make it bid at once and win its lease back). So
        another live peer takes over, with or without notifications.

        Returns the term to release in the database, if any; it is also kept for
        :meth:`take_release`. During a round the resign completes when the round
        ends (whatever it reports, the tenure it held or won is given up), and the
        term is then available from :meth:`take_release`; this returns ``None``.
        """
        if self.closed:
            return None
        if self.round_started_at is not None:
            self._distrust()
            self._resign_requested = True
            return None
        term = self.held_term
        self.tenure = None
        if term is not None:
            self.next_round_at = now + self.resign_hold
            self._hold_until = self.next_round_at
            self._resigned_term = term
            self._pending_release = term
        return term

    def _complete_requested_resign(self, now: float) -> None:
        if self._resign_requested:
            self._resign_requested = False
            self.resign(now)

    def take_release(self) -> int | None:
        """The term a resign gave up and that has not been released yet; clears it."""
        term, self._pending_release = self._pending_release, None
        return term

    @property
    def resigning(self) -> bool:
        """A resign was requested during the round in progress and completes when it ends."""
        return self._resign_requested

    @property
    def resign_hold(self) -> float:
        """Seconds a resigned peer waits before bidding again.

        A follower's next round is at most ``interval`` away on its own clock;
        with rates differing by up to ``max_clock_drift`` (m) that is at most
        ``interval * (1 + m) / (1 - m)`` on ours, plus the expiry slack.
        """
        return drift_bound(self.interval, self.max_clock_drift)

    def _distrust(self) -> None:
        if self.tenure is not None:
            self.tenure.trusted_until = -math.inf

    def _take_wake(self) -> bool:
        wake, self._wake_pending = self._wake_pending, False
        return wake

    def abort_round(self, now: float) -> None:
        """The round was abandoned (the peer is closing). Trust ends, as on failure."""
        self._finish_round(now)
        self._distrust()
        self._complete_requested_resign(now)

    def notified_down(self, now: float, term: int | None = None) -> bool:
        """Another peer released tenure ``term`` of this name. Returns True to run a round now.

        The caller coalesces: one pending wake-up runs one round. A peer that
        resigned less than :attr:`resign_hold` ago ignores releases of the term
        it gave up or older ones (stale, or its own successor's NOTIFY racing
        its poll), but follows the release of a newer tenure: otherwise two
        quick resigns in a row would leave the name without a leader.
        """
        if self.closed or self.is_leader(now):
            return False
        if now < self._hold_until and (term is None or term <= self._resigned_term):
            return False
        if self.round_started_at is not None:
            self._wake_pending = True
        else:
            self.next_round_at = min(self.next_round_at, now)
        return True

    def may_start_round(self, *, winding_down: bool) -> bool:
        """Whether a round may start now. Not while leader-only work of an ended tenure
        still winds down (``winding_down``, the shell's view of that work): a new tenure
        would overlap it. Bids are then held until :meth:`wind_down_ended`."""
        if not winding_down:
            return True
        if self.round_started_at is not None:
            raise CoreError("cannot hold during a round")
        self.next_round_at = math.inf  # held
        return False

    def wind_down_ended(self, now: float) -> bool:
        """The last leader-only work of an ended tenure has finished. If bids were held for
        it, the next round runs now (True: wake the loop). Otherwise the schedule stands:
        after :meth:`resign` the peer must not bid at once and win back what it released.
        """
        if self.closed or self.round_started_at is not None or self.next_round_at != math.inf:
            return False
        self.next_round_at = now
        return True

    def close(self) -> int | None:
        """The peer stops. Returns the term to release in the database, if any.

        That is the tenure it holds, or one it resigned and has not released yet.
        """
        self.closed = True
        term = self._pending_release if self._pending_release is not None else self.held_term
        self._pending_release = None
        self.tenure = None
        return term

    # ------------------------------------------------------------------ schedule

    def _alignable(self, earliest: float) -> None:
        """The round now scheduled at :attr:`next_round_at` may run as early as ``earliest``."""
        self._align_from = earliest
        self._align_for = self.next_round_at

    @property
    def next_round_earliest(self) -> float:
        """The earliest time the next round may run without changing its meaning.

        A periodic round (a leader's renewal, a follower's poll) may run up to
        :data:`ALIGN_FRACTION` of its period early: renewing early only renews, polling
        early only reads. A session moves such rounds of many names onto shared instants
        (:func:`aligned_wake`) so that they run as one batch. Every other round (a
        follower waking at the holder's expiry, a retry after backoff, a wake-up) must
        run when scheduled: then this is :attr:`next_round_at`.
        """
        if self._align_for == self.next_round_at:
            return min(self._align_from, self.next_round_at)
        return self.next_round_at

    def backoff(self, failures: int) -> float:
        """Delay before the next round after ``failures`` consecutive failed rounds."""
        exp = min(failures - 1, 60)
        raw = min(self.interval * BACKOFF_CAP, self.backoff_base * 2.0**exp)
        return raw * (0.5 + 0.5 * self._rng.random())

    def _follower_next(self, start: float, now: float, outcome: ElectionOutcome) -> float:
        poll = self._last_poll = start + jitter(self.interval, self._rng)
        if outcome.holder_remaining is None:
            if outcome.holder_term is None:
                # Denied, yet no live holder was visible: the row changed while
                # the statement waited for its lock. Look again soon.
                return min(poll, now + self.backoff(1))
            return poll
        remaining = max(outcome.holder_remaining, 0.0)
        wake = now + remaining * (1 + self.max_clock_drift) + self.expiry_slack
        return min(poll, wake)

    def _finish_round(self, now: float) -> float:
        start = self.round_started_at
        if start is None:
            raise CoreError("no round is in progress")
        if now < start:
            raise CoreError("time went backwards")
        self.round_started_at = None
        # Whatever the round schedules next is not alignable unless it says so (a busy
        # retry can land on the very instant a capped renewal was due at).
        self._align_for = math.nan
        return start


def aligned_wake(due: float, earliest: float) -> float:
    """When to run a round due at ``due`` that may run as early as ``earliest``.

    The latest point at or before ``due`` of a grid whose step is the largest power of
    two not above ``due - earliest``. Rounds of many names thus land on few shared
    instants (their grids nest, whatever their intervals) and run as one batch. Pure.
    """
    room = due - earliest
    if not room > 0 or not math.isfinite(due):
        return due
    step = 2.0 ** math.floor(math.log2(room))
    return max(math.floor(due / step) * step, earliest)


# ---------------------------------------------------------------------- notifications


@final
@attrs.frozen
class Down:
    """A parsed ``down`` notification: a peer released its lease of ``name``."""

    name: str
    term: int | None
    sender: str


def down_payload(name: str, term: int, sender: str) -> str:
    """The NOTIFY payload a resigning peer sends."""
    return json.dumps({"down": name, "term": term, "sender": sender}, separators=(",", ":"))


def parse_notification(payload: str) -> Down | None:
    """Parse a NOTIFY payload; ``None`` for anything that is not a valid ``down``."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON (any client)
        return None
    if not isinstance(data, dict):
        return None
    name, term, sender = data.get("down"), data.get("term"), data.get("sender")
    if not isinstance(name, str) or not isinstance(sender, str):
        return None
    if term is not None and (isinstance(term, bool) or not isinstance(term, int)):
        return None
    return Down(name=name, term=term, sender=sender)


def parse_downs(payload: str) -> list[Down] | None:
    """Parse a NOTIFY payload into the releases it announces; ``None`` if it is malformed.

    Two forms exist: one name (``{"down": name, "term": t, "sender": s}``, see
    :func:`down_payload`), and many names released by one statement of a session
    (``{"downs": [[name, term], ...], "sender": s}``, built in SQL in chunks that keep
    each payload under PostgreSQL's 8000 bytes). Never raises.
    """
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if "downs" not in data:
        one = parse_notification(payload)
        return None if one is None else [one]
    entries, sender = data.get("downs"), data.get("sender")
    if not isinstance(entries, list) or not isinstance(sender, str):
        return None
    downs: list[Down] = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2):
            return None
        name, term = entry
        if not isinstance(name, str) or isinstance(term, bool) or not isinstance(term, int):
            return None
        downs.append(Down(name=name, term=term, sender=sender))
    return downs
