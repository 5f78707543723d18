"""A deterministic, sync simulation of trio-peers' election, for property tests.

Several :class:`~trio_peers._core.ElectionCore` instances (the real, pure state
machine) run against :class:`ModelStore`, a lease store that mirrors
``trio_peers/_sql.py`` statement by statement. No event loop, no real time.

Time model
----------

The simulation's global time ``t`` *is the database clock*: every statement
executes at one instant of it (the statement's ``now()``). Each simulated peer
process has its own monotonic clock, ``local(t) = offset + rate * t``, with
``|rate - 1| <= max_clock_drift``; its core only ever sees local times.

A round is faithful to the shell (``_peer.py``): the core's ``start_round`` is
called at the local start time; the statement executes ``exec_delay`` database
seconds later (so the database's ``now()`` is *after* the start the core anchors
trust to); the reply arrives ``reply_delay`` later. The client-side statement
timeout (``statement_timeout`` local seconds) cancels the round: a statement
that has not executed by then never does, but one that executed and whose reply
is late still changed the database (an *orphaned* lease, as with a real
timeout). A paused process keeps its clock running but handles nothing until it
resumes; then it first sees its round's outcome (the adversarial order: a stale
success beats the timeout), then queued notifications.

Every check raises :exc:`AssertionError` naming the invariant:

``at_most_one_leader``
    At every event instant, at most one live process's ``core.is_leader(local
    now)`` is true. Trust only begins at events (a reply), so two trust periods
    that overlap at any instant overlap at the later one's start, an event.
``trust_within_db_lease``
    A process trusts term ``k`` only while the database row holds term ``k`` for
    its node, unexpired (stronger than the above; holds for a single peer too).
``terms_increase``
    A newly gained tenure has a term above every term trusted before it; a
    renewed or resumed one keeps the newest term.
``renewals_only_by_holder``
    The store renews a tenure only for the process that won it.
``leader_renews_before_trust_ends``
    After a won round, the next round starts at least ``statement_timeout``
    before the local trust deadline.
``delays_in_documented_range``
    Every delay the core schedules lies in the range docs/timing.rst states.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import random
from collections.abc import Callable
from typing import Literal

from trio_peers._config import PeerConfig
from trio_peers._core import (
    BACKOFF_CAP,
    EXPIRY_SLACK_FRACTION,
    EXPIRY_SLACK_MIN,
    JITTER,
    Change,
    ElectionCore,
    ElectionOutcome,
    down_payload,
    parse_notification,
)

NAME = "default"
#: Absolute tolerance for float rounding, per second of simulated time.
EPS = 1e-9

Fail = Literal["before", "after"] | None


def tol(*values: float) -> float:
    """Rounding tolerance for comparisons of times of these magnitudes."""
    return EPS * max(1.0, *(abs(v) for v in values if math.isfinite(v)))


# ---------------------------------------------------------------------- the lease store


@dataclasses.dataclass
class ModelRow:
    node: str
    term: int
    started_at: float
    expires_at: float


class ModelStore:
    """The lease table, mirroring the statements of ``trio_peers/_sql.py`` exactly.

    ``now`` is the statement's ``now()``; ``lease`` is the ``$3`` interval.
    """

    def __init__(self) -> None:
        self.rows: dict[str, ModelRow] = {}

    def elect(
        self, name: str, node: str, held_term: int | None, now: float, lease: float
    ) -> ElectionOutcome:
        row = self.rows.get(name)
        if row is None:  # INSERT
            self.rows[name] = ModelRow(node, 1, now, now + lease)
            return ElectionOutcome(term=1, lease_remaining=lease)
        if row.expires_at <= now:  # ON CONFLICT ... WHERE p.expires_at <= now(): take over
            self.rows[name] = ModelRow(node, row.term + 1, now, now + lease)
            return ElectionOutcome(term=row.term + 1, lease_remaining=lease)
        if row.node == node and held_term is not None and row.term == held_term:
            # WHERE p.node = $2 AND p.term = $4: renew this exact tenure.
            row.expires_at = now + lease
            return ElectionOutcome(term=row.term, lease_remaining=lease)
        # Denied: the outer SELECT reports the unexpired holder.
        return ElectionOutcome(
            term=None,
            holder_node=row.node,
            holder_term=row.term,
            holder_remaining=row.expires_at - now,
        )

    def release(self, name: str, node: str, term: int, now: float) -> bool:
        row = self.rows.get(name)
        if row is None or row.node != node or row.term != term or row.expires_at <= now:
            return False
        row.expires_at = now
        return True

    def leader(self, name: str, now: float) -> ModelRow | None:
        row = self.rows.get(name)
        return row if row is not None and row.expires_at > now else None


# ---------------------------------------------------------------------- peers


def make_config(
    *, interval: float, leader_boost: float, max_clock_drift: float, st_fraction: float
) -> PeerConfig:
    """The config a simulated peer runs with (``statement_timeout = st_fraction * interval``)."""
    return PeerConfig(
        dsn="memory://",
        interval=interval,
        leader_boost=leader_boost,
        max_clock_drift=max_clock_drift,
        statement_timeout=st_fraction * interval,
    )


def make_core(config: PeerConfig, rng: random.Random) -> ElectionCore:
    """An ElectionCore built exactly as ``Peer.__init__`` builds it."""
    return ElectionCore(
        interval=config.interval,
        leader_boost=config.leader_boost,
        trust_margin=config.trust_margin,
        statement_timeout=config.effective_statement_timeout,
        max_clock_drift=config.max_clock_drift,
        rng=rng,
    )


@dataclasses.dataclass
class Net:
    """How one process's statements behave (database seconds)."""

    exec_delay: float = 0.0
    reply_delay: float = 0.0
    fail: Fail = None
    """``"before"``: the statement fails without executing (refused, broken connection);
    ``"after"``: it executes, then the reply is lost (an orphaned write)."""


@dataclasses.dataclass(eq=False)
class Round:
    start_db: float
    start_local: float
    held: int | None
    done_at: float = math.inf
    ok: bool = False
    executed: bool = False
    cancelled: bool = False
    outcome: ElectionOutcome | None = None


@dataclasses.dataclass(eq=False)
class SimPeer:
    uid: int
    node: str
    core: ElectionCore
    offset: float
    rate: float
    net: Net = dataclasses.field(default_factory=Net)
    alive: bool = True
    paused: bool = False
    connected: bool = False
    round: Round | None = None
    inbox: list[str] = dataclasses.field(default_factory=list)
    lost_pending: bool = False
    resigned_at: float = -math.inf
    """Local time of this process's last resign that gave up a term (it then holds its bids)."""

    @property
    def sender(self) -> str:
        return f"sender-{self.uid}"

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def db(self, local: float) -> float:
        return (local - self.offset) / self.rate

    @property
    def st_db(self) -> float:
        """The statement timeout, in database seconds."""
        return self.core.statement_timeout / self.rate


# ---------------------------------------------------------------------- the simulation


class Sim:
    """N processes, one store, one database clock. See the module docstring."""

    def __init__(self, config: PeerConfig, *, seed: int = 0) -> None:
        self.config = config
        self.interval = config.interval
        self.drift = config.max_clock_drift
        self.store = ModelStore()
        self.store_up = True
        self.notify_delay = 0.0
        self.notify_lost = False
        self.now = 0.0
        self.peers: list[SimPeer] = []
        # (time, sequence, dies with connections?, method name, args): plain data, so
        # that copy.deepcopy() copies pending events along with the peers they refer to.
        self._events: list[tuple[float, int, bool, str, tuple[object, ...]]] = []
        # Plain ints, not itertools.count(): copying those is deprecated since Python 3.12.
        self._seq = 0
        self._uids = 0
        self._seeds = random.Random(seed)
        self._store_up_at = -math.inf
        # invariant state
        self.max_trusted_term = 0
        self.term_owner: dict[int, int] = {}  # term -> uid of the process that won it
        self.trusting: dict[int, int | None] = {}  # uid -> term it trusted at the last check
        self.events_run = 0

    # ------------------------------------------------------------------ set-up

    def add_peer(self, *, node: str, rate: float = 1.0, offset: float = 0.0) -> SimPeer:
        assert abs(rate - 1) <= self.drift + 1e-12
        core = make_core(self.config, random.Random(self._seeds.getrandbits(32)))
        uid, self._uids = self._uids, self._uids + 1
        peer = SimPeer(uid, node, core, offset - rate * self.now, rate)
        # offset is given as the local clock's reading now
        self.peers.append(peer)
        return peer

    def replace_peer(self, slot: int, *, node: str, rate: float, offset: float) -> SimPeer:
        assert not self.peers[slot].alive
        new = self.add_peer(node=node, rate=rate, offset=offset)
        self.peers.pop()
        self.peers[slot] = new
        return new

    def copy(self) -> Sim:
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ queries

    def live(self) -> list[SimPeer]:
        return [p for p in self.peers if p.alive]

    def leaders(self, t: float | None = None) -> list[SimPeer]:
        t = self.now if t is None else t
        return [p for p in self.peers if p.alive and p.core.is_leader(p.local(t))]

    def holding(self, peer: SimPeer) -> bool:
        """Whether ``peer`` still holds its bids after its last resign."""
        return peer.local(self.now) < peer.resigned_at + resign_hold(self.interval, self.drift)

    def notifications_in_flight(self) -> bool:
        return any(e[3] in ("_deliver", "_execute_release") for e in self._events)

    def statement_time(self) -> float:
        """Longest possible statement round trip now: max exec delay + max reply delay."""
        live = self.live()
        return max(p.net.exec_delay for p in live) + max(p.net.reply_delay for p in live)

    # ------------------------------------------------------------------ fault controls

    def set_net(self, peer: SimPeer, net: Net) -> None:
        peer.net = net

    def set_notify(self, *, delay: float, lost: bool) -> None:
        self.notify_delay = delay
        self.notify_lost = lost

    def pause(self, peer: SimPeer) -> None:
        if peer.alive:
            peer.paused = True

    def resume(self, peer: SimPeer) -> None:
        if not (peer.alive and peer.paused):
            return
        peer.paused = False
        t = self.now
        r = peer.round
        if r is not None and r.done_at <= t:
            self._finish_round(peer, r, t)
        if peer.lost_pending:
            peer.lost_pending = False
            self._connection_lost(peer, t)
        inbox, peer.inbox = peer.inbox, []
        for payload in inbox:
            self._handle_notification(peer, payload, t)
        self.check()

    def crash(self, peer: SimPeer) -> None:
        """The process dies: it believes nothing any more; its sent statement may still run."""
        peer.alive = False
        peer.paused = False
        self.trusting.pop(peer.uid, None)
        self.check()

    def resign(self, peer: SimPeer) -> bool:
        """``Peer.resign()``: give up now, release the held term and NOTIFY. Needs no round."""
        if not peer.alive or peer.paused or peer.round is not None:
            return False
        loc = peer.local(self.now)
        term = peer.core.resign(loc)
        assert peer.core.take_release() == term  # the shell releases what take_release gives
        if term is not None:
            hold = resign_hold(self.interval, self.drift)
            self._check_delay("resign", peer.core.next_round_at - loc, hold, hold)
            peer.resigned_at = loc
            self._release(peer, term)
        self.check()
        return True

    def stop(self, peer: SimPeer) -> bool:
        """Leave gracefully (``open_peer`` exit): close, release the held term, exit."""
        if not peer.alive or peer.paused or peer.round is not None:
            return False
        term = peer.core.close()
        if term is not None:
            self._release(peer, term)
        peer.alive = False
        self.trusting.pop(peer.uid, None)
        self.check()
        return True

    def drop_connection(self, peer: SimPeer) -> None:
        """This process's connection breaks (network blip, backend terminated)."""
        if peer.alive:
            self._lose_connection(peer, self.now)
        self.check()

    def store_restart(self, down_for: float) -> None:
        """The server restarts: every connection drops, in-flight work is lost, rows persist."""
        t = self.now
        self.store_up = False
        self._store_up_at = t + down_for
        self._push(self._store_up_at, "_store_comes_up")
        # In-flight notifications and releases die with their connections.
        self._events = [e for e in self._events if not e[2]]
        heapq.heapify(self._events)
        for peer in self.peers:
            if peer.alive:
                self._lose_connection(peer, t)
        self.check()

    def heal(self) -> float:
        """End every fault now; returns the healthy statement round-trip bound (database s).

        New statements complete well within the timeout; the store is up; paused
        processes resume; notifications are delivered. Rounds already in flight
        keep the fate they were given (they end within one statement timeout).
        """
        if not self.store_up:
            self.store_up = True
            self._store_up_at = -math.inf
        self.notify_lost = False
        for peer in self.live():
            quarter = peer.st_db / 4
            peer.net = Net(min(peer.net.exec_delay, quarter), min(peer.net.reply_delay, quarter))
        for peer in self.live():
            self.resume(peer)
        return self.statement_time()

    # ------------------------------------------------------------------ running

    def advance(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until(self, target: float, stop: Callable[[], bool] | None = None) -> float | None:
        """Run events up to ``target``; with ``stop``, return the first event time it holds."""
        if stop is not None and stop():
            return self.now
        while True:
            nxt = self._next_event(target)
            if nxt is None:
                break
            t, peer = nxt
            self.now = max(self.now, t)
            if peer is None:
                _, _, _, method, args = heapq.heappop(self._events)
                getattr(self, method)(*args)
            else:
                self._start_round(peer)
            self.events_run += 1
            self.check()
            if stop is not None and stop():
                return self.now
            if self.events_run > 2_000_000:  # pragma: no cover - a runaway schedule
                raise AssertionError("the simulation does not make progress")
        self.now = max(self.now, target)
        self.check()
        return None

    def _push(self, t: float, method: str, *args: object, on_connection: bool = False) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, on_connection, method, args))

    def _next_event(self, target: float) -> tuple[float, SimPeer | None] | None:
        """The next thing to happen: a queued event (peer None) or a peer's round start."""
        best: tuple[float, SimPeer | None] | None = None
        if self._events and self._events[0][0] <= target:
            best = (self._events[0][0], None)
        for peer in self.peers:
            if not peer.alive or peer.paused or peer.round is not None:
                continue
            due = max(self.now, peer.db(peer.core.next_round_at))
            if due <= target and (best is None or due < best[0]):
                best = (due, peer)
        return best

    def _store_comes_up(self) -> None:
        if not self.store_up and self._store_up_at <= self.now:
            self.store_up = True

    # ------------------------------------------------------------------ rounds

    def _start_round(self, peer: SimPeer) -> None:
        t = self.now
        loc = peer.local(t)
        held = peer.core.start_round(loc)
        r = Round(start_db=t, start_local=loc, held=held)
        peer.round = r
        timeout_at = t + peer.st_db
        net = peer.net
        if not self.store_up or net.fail == "before":
            r.done_at = min(t + net.exec_delay, timeout_at)
        else:
            peer.connected = True  # connected (and LISTENing) from the round's start
            exec_at = t + net.exec_delay
            if exec_at >= timeout_at:
                r.done_at = timeout_at  # cancelled before it ran
            else:
                self._push(exec_at, "_execute", peer, r)
                reply_at = exec_at + net.reply_delay
                if net.fail == "after" or reply_at >= timeout_at:
                    r.done_at = min(reply_at, timeout_at)
                else:
                    r.done_at = reply_at
                    r.ok = True
        self._push(r.done_at, "_round_done", peer, r)

    def _execute(self, peer: SimPeer, r: Round) -> None:
        if r.cancelled:
            return
        t = self.now
        before = copy.copy(self.store.rows.get(NAME))
        outcome = self.store.elect(NAME, peer.node, r.held, t, self.interval)
        r.executed = True
        r.outcome = outcome
        if outcome.term is None:
            return
        if before is not None and before.expires_at > t:
            # renewals_only_by_holder
            assert outcome.term == before.term, "renewals_only_by_holder: term changed"
            assert r.held == before.term and peer.node == before.node, (
                f"renewals_only_by_holder: {peer.node} (held {r.held}) renewed "
                f"{before.node}'s term {before.term}"
            )
            assert self.term_owner.get(before.term) == peer.uid, (
                f"renewals_only_by_holder: process {peer.uid} renewed term {before.term} "
                f"won by process {self.term_owner.get(before.term)}"
            )
        else:
            expected = 1 if before is None else before.term + 1
            assert outcome.term == expected, "terms_increase: the store skipped or reused a term"
            self.term_owner[outcome.term] = peer.uid

    def _round_done(self, peer: SimPeer, r: Round) -> None:
        if not peer.alive or peer.round is not r or peer.paused:
            return  # a dead process; a round already finished; or handled at resume
        self._finish_round(peer, r, self.now)

    def _finish_round(self, peer: SimPeer, r: Round, t: float) -> None:
        peer.round = None
        core = peer.core
        loc = peer.local(t)
        if not r.ok:
            core.round_failed(loc)
            peer.connected = False
            raw = min(self.interval * BACKOFF_CAP, core.backoff_base * 2.0 ** (core.failures - 1))
            self._check_delay("backoff", core.next_round_at - loc, raw / 2, raw)
            return
        outcome = r.outcome
        assert outcome is not None and r.executed
        held_before = core.held_term
        change = core.round_succeeded(loc, outcome)
        start = r.start_local
        if outcome.term is not None:
            self._check_won(peer, r, change, held_before)
            return
        next_at = core.next_round_at
        if next_at == loc:
            return  # a notification arrived during the round: run again at once
        poll_lo, poll_hi = start + (1 - JITTER) * self.interval, start + self.interval
        assert next_at <= poll_hi + tol(next_at), (
            f"delays_in_documented_range: follower polls after {next_at - start} > interval"
        )
        if outcome.holder_remaining is not None:
            wake = loc + outcome.holder_remaining * (1 + self.drift) + core.expiry_slack
            lo = min(poll_lo, wake)
            assert next_at >= lo - tol(next_at), (
                f"delays_in_documented_range: follower bids at {next_at}, before "
                f"min(poll {poll_lo}, expiry wake {wake})"
            )

    def _check_won(self, peer: SimPeer, r: Round, change: Change, held_before: int | None) -> None:
        core = peer.core
        outcome = r.outcome
        assert outcome is not None and outcome.term is not None
        term = outcome.term
        if not core.is_leader(peer.local(self.now)):
            pass  # a stale reply (after a pause): the tenure is already untrusted
        elif change in (Change.GAINED, Change.REPLACED):
            assert term > self.max_trusted_term, (
                f"terms_increase: process {peer.uid} gained term {term}, not above "
                f"{self.max_trusted_term} trusted before"
            )
        else:
            assert term == held_before, f"terms_increase: {change} changed term"
            assert term >= self.max_trusted_term, (
                f"terms_increase: process {peer.uid} resumed term {term} after "
                f"term {self.max_trusted_term} was trusted"
            )
        start = r.start_local
        trusted = core.trusted_until
        # leader_renews_before_trust_ends
        assert core.next_round_at + core.statement_timeout <= trusted + tol(trusted), (
            f"leader_renews_before_trust_ends: next round at {core.next_round_at}, "
            f"trust ends {trusted}, statement timeout {core.statement_timeout}"
        )
        per = self.interval / core.leader_boost
        cap = trusted - start - core.statement_timeout
        self._check_delay("leader", core.next_round_at - start, min((1 - JITTER) * per, cap), per)

    def _check_delay(self, what: str, delay: float, lo: float, hi: float) -> None:
        assert lo - tol(lo) <= delay <= hi + tol(hi), (
            f"delays_in_documented_range: {what} delay {delay} not in [{lo}, {hi}]"
        )

    # ------------------------------------------------------------------ connections and notify

    def _lose_connection(self, peer: SimPeer, t: float) -> None:
        peer.connected = False
        r = peer.round
        if r is not None:
            if not r.executed:
                r.cancelled = True
            r.ok = False
            r.done_at = min(r.done_at, t)
            if not peer.paused:
                self._finish_round(peer, r, t)
        elif peer.paused:
            peer.lost_pending = True
        else:
            self._connection_lost(peer, t)

    def _connection_lost(self, peer: SimPeer, t: float) -> None:
        core = peer.core
        before = core.next_round_at
        loc = peer.local(t)
        core.connection_lost(loc)
        if core.next_round_at != before:
            raw = min(self.interval * BACKOFF_CAP, core.backoff_base * 2.0 ** (core.failures - 1))
            self._check_delay("reconnect backoff", core.next_round_at - loc, raw / 2, raw)

    def _release(self, peer: SimPeer, term: int) -> None:
        """The release statement (on the peer's connection); NOTIFY at its commit."""
        if not self.store_up or peer.net.fail is not None:
            peer.connected = False  # the release failed: the lease lapses instead
            return
        self._push(
            self.now + peer.net.exec_delay, "_execute_release", peer, term, on_connection=True
        )

    def _execute_release(self, peer: SimPeer, term: int) -> None:
        if self.store.release(NAME, peer.node, term, self.now) and not self.notify_lost:
            payload = down_payload(NAME, term, peer.sender)
            for other in self.peers:
                if other is not peer and other.alive:
                    self._push(
                        self.now + self.notify_delay,
                        "_deliver",
                        other,
                        payload,
                        on_connection=True,
                    )

    def _deliver(self, peer: SimPeer, payload: str) -> None:
        if not peer.alive or not peer.connected:
            return  # not LISTENing: lost
        if peer.paused:
            peer.inbox.append(payload)
            return
        self._handle_notification(peer, payload, self.now)

    def _handle_notification(self, peer: SimPeer, payload: str, t: float) -> None:
        down = parse_notification(payload)
        if down is None or down.name != NAME or down.sender == peer.sender:
            return
        peer.core.notified_down(peer.local(t), down.term)

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        t = self.now
        row = self.store.leader(NAME, t)
        leaders = self.leaders(t)
        if len(leaders) > 1:
            # Two trust periods touching at one instant (a slow clock at exactly the
            # drift bound) may differ only by rounding; anything more is a violation.
            ends = [p.db(p.core.trusted_until) for p in leaders]
            overlap = min(ends) - t
            assert overlap <= tol(t), (
                f"at_most_one_leader: processes {[p.uid for p in leaders]} all trust at "
                f"t={t} (terms {[p.core.held_term for p in leaders]}, overlap {overlap})"
            )
        for p in leaders:
            term = p.core.held_term
            end = p.db(p.core.trusted_until)
            if row is None or row.term != term or row.node != p.node:
                # Trust may end at the instant the lease does, up to rounding.
                assert end - t <= tol(t), (
                    f"trust_within_db_lease: process {p.uid} trusts term {term} until "
                    f"t={end}, but at t={t} the store holds {row}"
                )
                continue
            assert end <= row.expires_at + tol(end), (
                f"trust_within_db_lease: process {p.uid} trusts term {term} until t={end}, "
                f"after its lease expires at {row.expires_at}"
            )
            if term is not None and term > self.max_trusted_term:
                self.max_trusted_term = term
        for p in self.peers:
            if p.alive and not p.paused and p.round is None and p in leaders:
                core = p.core
                assert core.next_round_at + core.statement_timeout <= core.trusted_until + tol(
                    core.trusted_until
                ), "leader_renews_before_trust_ends: a leader's next round is too late"


# ---------------------------------------------------------------------- documented bounds


def crash_bound(config: PeerConfig, statement_time: float) -> float:
    """docs/timing.rst, crash handover: from the crash until another process leads."""
    m = config.max_clock_drift
    core = make_core(config, random.Random(0))
    return config.interval * (1 + m) / (1 - m) + core.expiry_slack / (1 - m) + 2 * statement_time


def heal_bound(config: PeerConfig, statement_time: float) -> float:
    """docs/timing.rst, fault heal: from the end of all faults until some process leads.

    The larger of: an orphaned lease from a round in flight at the heal running out,
    then the crash bound; and every live process holding its bids after a resign
    just before the heal (``resign_hold`` on a clock slow by ``m``), then one election.
    """
    m = config.max_clock_drift
    orphan = config.effective_statement_timeout / (1 - m) + crash_bound(config, statement_time)
    held = resign_hold(config.interval, m) / (1 - m) + statement_time
    return max(orphan, held)


def graceful_bound(statement_time: float) -> float:
    """docs/timing.rst, graceful handover: from the NOTIFY's delivery until another leads."""
    return 2 * statement_time


def resign_hold(interval: float, drift: float) -> float:
    """How long a resigned peer waits before bidding again (docs/timing.rst).

    Longer than any follower's next round (at most ``interval`` on the follower's
    own clock, so ``interval * (1 + m) / (1 - m)`` on the resigned peer's), plus
    the expiry slack, so another live peer takes over even with notifications lost.
    """
    slack = EXPIRY_SLACK_MIN + EXPIRY_SLACK_FRACTION * interval
    return interval * (1 + drift) / (1 - drift) + slack
