"""Properties of real peers (``open_peer`` over MemoryBackend) under a mock clock.

Hypothesis chooses the number of peers and their node ids, ``interval``,
``leader_boost``, ``max_clock_drift``, the statement timeout and delay, and a
schedule of faults: the store going down, statements hanging, NOTIFY lost,
connections killed, one peer partitioned away (as if crashed), resigns, stops,
and leader-only work failing. Every example is a fresh
``trio.run(..., clock=MockClock(autojump_threshold=0))`` (pytest-trio's
``autojump_clock`` fixture cannot be shared across examples).

Consumers watch each peer's ``leadership()`` channel; ``is_leader`` of every
peer is polled at each change; leader-only work runs under
``run_while_leader``. Checked:

* ``no_overlapping_leadership``: leadership intervals (from the channels) of
  different peers never overlap, and at every change at most one peer's
  ``is_leader`` is true;
* ``terms_increase``: successive tenures have increasing terms;
* ``no_overlapping_leader_work``: leader-only work of different peers or terms
  never runs at the same time, and always under the tenure it was given, also when it
  fails, returns, or calls ``resign()`` itself;
* ``no_rerun_of_returned_work``: work that returned never runs again in the same tenure
  (a peer resuming its tenure after a fault does not restart it);
* the fault-heal, graceful and crash handover bounds of docs/timing.rst (with
  the statement time being MemoryBackend's ``statement_delay``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import unittest.mock
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

import trio_peers._peer
from trio_peers import (
    BackendConnection,
    BackendConnector,
    BackendUnavailable,
    LeaderInfo,
    Peer,
    PeerConfig,
    current_term,
    open_peer,
)
from trio_peers._core import ElectionCore, ElectionOutcome
from trio_peers.testing import MemoryBackend

from ._election_model import crash_bound, graceful_bound, heal_bound, resign_hold

#: Room for Hypothesis to shrink a failure (the suite-wide 60 s is too short for that);
#: the "thorough" profile runs 20x the examples.
pytestmark = pytest.mark.timeout(300 * max(1, settings.default.max_examples // 100))

NODES = "abc"

# ---------------------------------------------------------------------- a partitionable backend


class Partitionable:
    """Wraps the shared MemoryBackend for one peer; ``cut`` partitions that peer away.

    While cut, the peer's connects fail, its statements never reach the store
    (they time out), and NOTIFYs do not reach it: to the others it looks
    crashed. Unlike a real crash, it is still running and resumes when healed.
    """

    def __init__(self, inner: MemoryBackend) -> None:
        self.inner = inner
        self.cut = False

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        return self._open(config)

    @asynccontextmanager
    async def _open(self, config: PeerConfig) -> AsyncIterator[BackendConnector]:
        async with self.inner.open(config) as connector:
            yield _Connector(self, connector)


@attrs.define
class _Connector:
    owner: Partitionable
    inner: BackendConnector

    async def connect(
        self, *, on_notification: Callable[[str], None], on_lost: Callable[[], None]
    ) -> BackendConnection:
        await trio.lowlevel.checkpoint()
        if self.owner.cut:
            raise BackendUnavailable("partitioned")

        def notified(payload: str) -> None:
            if not self.owner.cut:
                on_notification(payload)

        conn = await self.inner.connect(on_notification=notified, on_lost=on_lost)
        return _Connection(self.owner, conn)


@attrs.define
class _Connection:
    owner: Partitionable
    inner: BackendConnection

    async def _gate(self, limit: float) -> None:
        if self.owner.cut:
            await trio.sleep(limit)
            raise TimeoutError("partitioned")

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        await self._gate(statement_timeout)
        return await self.inner.elect(
            node=node, held_term=held_term, statement_timeout=statement_timeout
        )

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        await self._gate(statement_timeout)
        return await self.inner.release(
            node=node, term=term, sender=sender, statement_timeout=statement_timeout
        )

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        await self._gate(statement_timeout)
        return await self.inner.get_leader(statement_timeout=statement_timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def abort(self) -> None:
        self.inner.abort()


# ---------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic(backend: MemoryBackend, seed: int) -> Iterator[None]:
    """Make an example replayable: Hypothesis already makes Trio's scheduling
    deterministic; also seed each peer's jitter (``Peer`` builds its core with an
    unseeded ``random.Random()``). NOTIFY fan-out already goes in connection order
    (MemoryBackend keeps its connections insertion-ordered)."""
    seeds = random.Random(seed)

    def seeded_core(**kwargs: Any) -> ElectionCore:
        return ElectionCore(rng=random.Random(seeds.getrandbits(64)), **kwargs)

    with unittest.mock.patch.object(trio_peers._peer, "ElectionCore", seeded_core):
        yield


# ---------------------------------------------------------------------- recording


class WorkFailed(Exception):
    pass


@attrs.define
class Recorder:
    peers: list[Peer | None]
    tenures: list[tuple[int, int | None, float, float]] = attrs.Factory(list)
    """(peer, term, start, end) from the leadership channels."""
    work: list[tuple[int, int, float, float]] = attrs.Factory(list)
    """(peer, term, start, end) of leader-only work."""
    violations: list[str] = attrs.Factory(list)
    """Broken promises seen inside leader-only work (where raising would be absorbed)."""
    work_returned: list[bool] = attrs.Factory(list)
    """For each entry of ``work``: whether that run returned (rather than failed or was
    cancelled)."""
    changed: trio.Event = attrs.Factory(trio.Event)
    _open: dict[int, tuple[int | None, float]] = attrs.Factory(dict)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def leaders(self, *, besides: int | None = None) -> list[int]:
        return [
            i for i, p in enumerate(self.peers) if p is not None and i != besides and p.is_leader
        ]

    async def watch(self, i: int, peer: Peer) -> None:
        async for change in peer.leadership():
            now = change.at
            if i in self._open:
                term, start = self._open.pop(i)
                self.tenures.append((i, term, start, now))
            if change.is_leader:
                self._open[i] = (change.term, now)
            leaders = self.leaders()
            assert len(leaders) <= 1, (
                f"no_overlapping_leadership: peers {leaders} lead at t={trio.current_time()}"
            )
            self.poke()

    def close(self, end: float) -> None:
        for i, (term, start) in self._open.items():
            self.tenures.append((i, term, start, end))
        self._open.clear()

    async def wait_until(
        self, predicate: Callable[[], bool], deadline: float, *, poll: float = math.inf
    ) -> float | None:
        """The (virtual) time ``predicate`` first holds, or None if not by ``deadline``.

        It is checked at every leadership change (exact), and every ``poll`` seconds
        for a predicate that changes without one.
        """
        with trio.move_on_at(deadline + 1e-9 * max(1.0, abs(deadline))):
            while not predicate():
                with trio.move_on_after(poll):
                    await self.changed.wait()
            return trio.current_time()
        return None


def assert_no_overlap(intervals: list[tuple[int, int | None, float, float]], what: str) -> None:
    """Half-open intervals [start, end) of different (peer, term) never intersect."""
    for n, (i, ti, si, ei) in enumerate(intervals):
        for j, tj, sj, ej in intervals[n + 1 :]:
            if (i, ti) != (j, tj):
                assert not (sj < ei and si < ej), (
                    f"{what}: peer {i} (term {ti}) [{si}, {ei}) overlaps "
                    f"peer {j} (term {tj}) [{sj}, {ej})"
                )


def assert_terms_increase(tenures: list[tuple[int, int | None, float, float]]) -> None:
    ordered = sorted((t for t in tenures if t[3] > t[2]), key=lambda x: x[2])
    for (i, ti, _, _), (j, tj, sj, _) in itertools.pairwise(ordered):
        assert ti is not None and tj is not None
        assert tj > ti or (tj == ti and i == j), (
            f"terms_increase: peer {j} led with term {tj} at t={sj} after peer {i}'s term {ti}"
        )


# ---------------------------------------------------------------------- the scenario


@attrs.frozen
class Params:
    nodes: tuple[str, ...]
    interval: float
    leader_boost: float
    max_clock_drift: float
    st_fraction: float
    delay_fraction: float
    """The healthy statement delay, as a fraction of the statement timeout."""

    def config(self, node: str) -> PeerConfig:
        return PeerConfig(
            dsn="memory://",
            node=node,
            interval=self.interval,
            leader_boost=self.leader_boost,
            max_clock_drift=self.max_clock_drift,
            statement_timeout=self.st_fraction * self.interval,
            # The release runs under cleanup_timeout: it must outlast a healthy statement.
            cleanup_timeout=self.interval,
        )


params = st.builds(
    Params,
    nodes=st.lists(st.sampled_from(NODES), min_size=2, max_size=4).map(tuple),
    interval=st.one_of(st.sampled_from([1.0, 30.0]), st.floats(0.1, 100.0)),
    leader_boost=st.floats(1.0, 5.0),
    max_clock_drift=st.one_of(st.sampled_from([0.001, 0.01]), st.floats(0.001, 0.25)),
    st_fraction=st.floats(0.02, 0.5),
    delay_fraction=st.one_of(st.just(0.0), st.floats(0.0, 0.4)),
)

peer_ids = st.integers(0, 3)
fault_ops = st.one_of(
    st.tuples(st.just("available"), st.booleans()),
    st.tuples(st.just("hang"), st.booleans()),
    st.tuples(st.just("notify"), st.booleans()),
    st.tuples(st.just("kill")),
    st.tuples(st.just("delay"), st.floats(0.0, 1.5)),
    st.tuples(st.just("cut"), peer_ids, st.booleans()),
    st.tuples(st.just("resign"), peer_ids),
    st.tuples(st.just("stop"), peer_ids),
    st.tuples(st.just("request"), peer_ids),
    st.tuples(st.just("fail_work"), peer_ids),
    st.tuples(st.just("resign_in_work"), peer_ids),
    st.tuples(st.just("finish_work"), peer_ids),
)
schedules = st.lists(st.tuples(st.floats(0.0, 1.5), fault_ops), max_size=12)


@attrs.define
class World:
    p: Params
    backend: MemoryBackend
    links: list[Partitionable]
    rec: Recorder
    stops: list[trio.Event]
    work_cmd: list[trio.Event]
    """Set to make a peer's leader-only work act on ``work_action`` (now or in its next run)."""
    work_action: list[str]
    resigned_at: list[float]
    """When each peer last resigned: it then holds its bids for resign_hold."""

    @property
    def st(self) -> float:
        return self.p.st_fraction * self.p.interval

    @property
    def healthy_delay(self) -> float:
        return self.p.delay_fraction * self.st

    def live(self) -> list[int]:
        return [i for i, peer in enumerate(self.rec.peers) if peer is not None]

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        live = self.live()
        target = live[args[0] % len(live)] if args and kind not in _GLOBAL else None
        if kind == "available":
            self.backend.set_available(args[0])
        elif kind == "hang":
            self.backend.hang = args[0]
        elif kind == "notify":
            self.backend.deliver_notifications = args[0]
        elif kind == "kill":
            self.backend.kill_connections()
        elif kind == "delay":
            self.backend.statement_delay = args[0] * self.st
        elif kind == "cut":
            assert target is not None
            self.links[target].cut = args[1]
        elif kind == "resign":
            assert target is not None
            peer = self.rec.peers[target]
            assert peer is not None
            await peer.resign()
            # The hold starts inside resign(), which may first wait for a round in flight.
            self.resigned_at[target] = trio.current_time()
        elif kind == "stop" and len(live) > 2:
            assert target is not None
            await self.stop(target)
        elif kind == "request":
            assert target is not None
            peer = self.rec.peers[target]
            assert peer is not None
            peer.request_election()
        elif kind in ("fail_work", "resign_in_work", "finish_work"):
            assert target is not None
            self.work_action[target] = kind
            self.work_cmd[target].set()
        await trio.lowlevel.checkpoint()

    async def stop(self, i: int) -> None:
        self.stops[i].set()
        with trio.fail_after(60 * self.p.interval):
            while self.rec.peers[i] is not None:
                await self.rec.changed.wait()

    async def wait_out_resign_holds(self) -> None:
        # A resign waits for the round in flight (at most one statement timeout) before
        # the hold starts.
        hold = self.st + resign_hold(self.p.interval, self.p.max_clock_drift)
        await trio.sleep_until(max(trio.current_time(), *(t + hold for t in self.resigned_at)))

    def heal(self) -> None:
        self.backend.set_available(True)
        self.backend.hang = False
        self.backend.deliver_notifications = True
        self.backend.statement_delay = self.healthy_delay
        for link in self.links:
            link.cut = False
        # A work action requested while the peer did not lead would fire later.
        self.work_cmd = [trio.Event() for _ in self.work_cmd]


_GLOBAL = frozenset({"available", "hang", "notify", "kill", "delay"})


async def run_peer(
    world: World, i: int, config: PeerConfig, *, task_status: trio.TaskStatus[None]
) -> None:
    rec = world.rec

    async def work() -> None:
        term = current_term()
        peer = rec.peers[i]
        assert peer is not None and peer.term == term, "work started outside its tenure"
        start = trio.current_time()
        returned = False
        try:
            await world.work_cmd[i].wait()
            world.work_cmd[i] = trio.Event()
            action = world.work_action[i]
            if action == "finish_work":
                returned = True
                return  # one-shot work: must not run again in this tenure
            world.resigned_at[i] = trio.current_time()  # the peer resigns, either way
            if action == "resign_in_work":
                await peer.resign()  # cancels this very work: does not return
                rec.violations.append(f"peer {i}: resign() returned inside its work")
            raise WorkFailed(f"peer {i} work failed")
        finally:
            rec.work.append((i, term, start, trio.current_time()))
            rec.work_returned.append(returned)
            rec.poke()

    async with trio.open_nursery() as watchers:
        async with open_peer(config, backend=world.links[i]) as peer:
            rec.peers[i] = peer
            # The consumer outlives the body: it sees the final is_leader=False
            # the peer publishes as it closes, then its channel ends.
            watchers.start_soon(rec.watch, i, peer)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(peer.run_while_leader, work, on_error="resign_and_retry")
                )
                task_status.started()
                await world.stops[i].wait()
                nursery.cancel_scope.cancel()
        rec.peers[i] = None
        rec.poke()


async def scenario(
    p: Params,
    schedule: list[tuple[float, tuple[Any, ...]]],
    backend: MemoryBackend,
    *,
    bounds: bool,
) -> Recorder:
    """Run the peers through ``schedule``; with ``bounds``, then heal, check the fault-heal
    bound, resign the leader (graceful bound), and partition the next one (crash bound)."""
    backend.statement_delay = p.delay_fraction * p.st_fraction * p.interval
    n = len(p.nodes)
    world = World(
        p,
        backend,
        [Partitionable(backend) for _ in range(n)],
        Recorder([None] * n),
        [trio.Event() for _ in range(n)],
        [trio.Event() for _ in range(n)],
        ["fail_work"] * n,
        [-math.inf] * n,
    )
    rec = world.rec
    async with trio.open_nursery() as nursery:
        for i, node in enumerate(p.nodes):
            await nursery.start(run_peer, world, i, p.config(node))
        for wait, op in schedule:
            await trio.sleep(wait * p.interval)
            await world.apply(op)
        if bounds:
            await check_bounds(world)
        else:
            await trio.sleep(p.interval)
        for stop in world.stops:
            stop.set()
    rec.close(trio.current_time())
    return rec


async def check_bounds(world: World) -> None:
    p, rec = world.p, world.rec
    statement_time = world.healthy_delay  # MemoryBackend replies the instant it executes
    config = p.config("x")

    # fault_heal_bound: a leader from rounds run after the heal. (A leader that still
    # trusts a tenure at the heal may lose it when its round from before the heal
    # fails; such rounds end within one statement timeout.)
    t_heal = trio.current_time()
    world.heal()
    await trio.sleep(world.st)
    await trio.testing.wait_all_tasks_blocked()
    bound = heal_bound(config, statement_time)
    got = await rec.wait_until(lambda: bool(rec.leaders()), t_heal + bound)
    assert got is not None, f"fault_heal_bound: no leader {bound}s after the heal"
    # Every peer reconnects (and LISTENs) within one backoff, once it bids again: a peer
    # that resigned holds its bids for resign_hold.
    await world.wait_out_resign_holds()
    deadline = trio.current_time() + p.interval
    for i in world.live():
        peer = rec.peers[i]
        assert peer is not None
        got = await rec.wait_until(
            lambda: peer.statistics().connected,  # noqa: B023
            deadline,
            poll=p.interval / 64,
        )
        assert got is not None, f"peer {i} did not reconnect within an interval"

    # graceful_handover_bound (every follower is connected; none holds its bids)
    [leader] = rec.leaders()
    leader_peer = rec.peers[leader]
    assert leader_peer is not None
    assert await leader_peer.resign()
    world.resigned_at[leader] = trio.current_time()
    t_notify = trio.current_time()  # MemoryBackend notifies as the release executes
    bound = graceful_bound(statement_time)
    got = await rec.wait_until(lambda: bool(rec.leaders(besides=leader)), t_notify + bound)
    assert got is not None, f"graceful_handover_bound: no other leader {bound}s after NOTIFY"

    # crash_handover_bound (the leader is partitioned away, as if it had crashed)
    await trio.sleep(p.interval / 3)
    await world.wait_out_resign_holds()  # the bound counts on followers that bid
    [victim] = rec.leaders()
    world.links[victim].cut = True
    t_crash = trio.current_time()
    bound = crash_bound(config, statement_time)
    got = await rec.wait_until(lambda: bool(rec.leaders(besides=victim)), t_crash + bound)
    assert got is not None, f"crash_handover_bound: no other leader {bound}s after the cut"


def run(
    p: Params, schedule: list[tuple[float, tuple[Any, ...]]], seed: int, *, bounds: bool
) -> Recorder:
    backend = MemoryBackend()
    with deterministic(backend, seed):
        return trio.run(
            functools.partial(scenario, p, schedule, backend, bounds=bounds),
            clock=trio.testing.MockClock(autojump_threshold=0),
        )


@settings(deadline=None)
@given(p=params, schedule=schedules, seed=st.integers(0, 2**32 - 1))
def test_peers_never_overlap_and_hand_over_within_bounds(
    p: Params, schedule: list[tuple[float, tuple[Any, ...]]], seed: int
) -> None:
    """no_overlapping_leadership, terms_increase, and (after the faults heal)
    fault_heal_bound, graceful_handover_bound and crash_handover_bound."""
    rec = run(p, schedule, seed, bounds=True)
    assert rec.violations == []
    assert_no_overlap(rec.tenures, "no_overlapping_leadership")
    assert_terms_increase(rec.tenures)


@settings(deadline=None)
@given(p=params, schedule=st.lists(st.tuples(st.floats(0.0, 1.5), fault_ops), max_size=25),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_leader_only_work_never_overlaps(
    p: Params, schedule: list[tuple[float, tuple[Any, ...]]], seed: int
) -> None:
    """no_overlapping_leader_work: ``run_while_leader`` work of two tenures never runs at
    the same time, whatever the faults (work failing and resigning included), and each
    tenure's work runs on one peer only, inside that tenure."""
    rec = run(p, schedule, seed, bounds=False)
    assert rec.violations == []
    assert_no_overlap(rec.work, "no_overlapping_leader_work")
    owners: dict[int, set[int]] = {}
    for i, term, _, _ in rec.work:
        owners.setdefault(term, set()).add(i)
    assert all(len(v) == 1 for v in owners.values()), f"a term's work ran on two peers: {owners}"
    # no_rerun_of_returned_work: work that returned is not started again in that tenure,
    # even when the peer resumes it after a fault.
    for k, ((i, term, _, end), returned) in enumerate(
        zip(rec.work, rec.work_returned, strict=True)
    ):
        if returned:
            rerun = [w for w in rec.work[k + 1 :] if w[:2] == (i, term)]
            assert not rerun, (
                f"peer {i}'s work returned at {end} in term {term}, then ran again: {rerun}"
            )
    led: dict[tuple[int, int | None], list[tuple[float, float]]] = {}
    for i, term, start, end in rec.tenures:  # a term can be led twice (trust resumed)
        led.setdefault((i, term), []).append((start, end))
    for i, term, start, end in rec.work:
        if start == end:
            continue  # a tenure gained and ended in one instant: the channel may skip it
        assert any(s <= start and end <= e for s, e in led.get((i, term), [])), (
            f"peer {i}'s work for term {term} [{start}, {end}) ran outside its tenures "
            f"{led.get((i, term))}"
        )
    assert_no_overlap(rec.tenures, "no_overlapping_leadership")


async def test_resign_with_leader_work_hands_over(autojump_clock: trio.testing.MockClock) -> None:
    """``resign()`` hands leadership to another peer also when leader-only work runs.

    Regression: ending the cancelled work used to wake the resigned peer's election
    loop at once (the wake meant for a peer that *held* its bids while work wound
    down), so it bid right after its own release and won its lease back.
    """
    backend = MemoryBackend()
    configs = [Params(("a", "b"), 10.0, 2.0, 0.01, 0.25, 0.0).config(n) for n in "ab"]

    async def work() -> None:
        await trio.sleep_forever()

    async with (
        open_peer(configs[0], backend=backend) as a,
        open_peer(configs[1], backend=backend) as b,
    ):
        async with trio.open_nursery() as nursery:
            for peer in (a, b):
                nursery.start_soon(peer.run_while_leader, work)
            assert a.is_leader
            await trio.sleep(1.0)
            assert await a.resign()
            with trio.fail_after(1.0):
                await b.wait_leader()
            assert not a.is_leader
            nursery.cancel_scope.cancel()
