"""Sessions over MemoryBackend under a mock clock: sharing, batching, isolation, input."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_peers import LeadershipLost, Peer, PeerSession, open_peer, open_session
from trio_peers._core import ElectionCore, aligned_wake
from trio_peers.testing import MemoryBackend
from trio_peers.testing._memory import _MemorySessionConnection

from ._pgutil import wait_for

INTERVAL = 2.0
NAMES = [f"job-{i:02d}" for i in range(40)]


@asynccontextmanager
async def session_in_task(
    nursery: trio.Nursery,
    backend: MemoryBackend,
    node: str,
    names: Iterable[str] = NAMES,
    **options: object,
) -> AsyncIterator[tuple[PeerSession, dict[str, Peer], trio.Event]]:
    """A session with ``names`` open, in its own task; set the event to make it exit."""
    leave = trio.Event()
    names = list(names)

    async def run(*, task_status: trio.TaskStatus[tuple[PeerSession, dict[str, Peer]]]) -> None:
        async with open_session("memory://", backend=backend, node=node) as session:
            async with session.open_peers(names, interval=INTERVAL, **options) as peers:
                task_status.started((session, peers))
                await leave.wait()

    session, peers = await nursery.start(run)
    yield session, peers, leave
    leave.set()


def leaders(backend: MemoryBackend, names: Iterable[str] = NAMES) -> dict[str, str | None]:
    rows = {name: backend.leader(name) for name in names}
    return {name: None if row is None else row.node for name, row in rows.items()}


async def test_many_names_share_one_connection_and_two_sessions_split_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with session_in_task(nursery, backend, "a") as (sa, a, leave_a):
            assert backend.connection_count == 1
            assert all(peer.is_leader for peer in a.values())
            async with session_in_task(nursery, backend, "b") as (sb, b, _):
                assert backend.connection_count == 2
                for _ in range(10):
                    await trio.sleep(INTERVAL)
                    assert all(a[n].is_leader and not b[n].is_leader for n in NAMES)
                assert sa.statistics().names == len(NAMES)
                assert sb.statistics().connects == 1
                leave_a.set()
                # Every name moves to b, which still holds one connection.
                await wait_for(
                    lambda: all(peer.is_leader for peer in b.values()), limit=0.5, poll=0.001
                )
                assert backend.connection_count == 1
                assert set(leaders(backend).values()) == {"b"}
            nursery.cancel_scope.cancel()


async def test_idle_names_renew_in_a_few_batches_instead_of_one_statement_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with session_in_task(nursery, backend, "a"), session_in_task(nursery, backend, "b"):
            await trio.sleep(5 * INTERVAL)  # let the schedules settle onto shared instants
            before = backend.statements
            window = 20 * INTERVAL
            await trio.sleep(window)
            per_second = (backend.statements - before) / window
            # Unbatched: 40 renewals per second (interval / leader_boost = 1 s) plus 20
            # follower polls. Batched: a few statements per second for all of them.
            assert per_second < 8, per_second
            assert all(backend.leader(n) is not None for n in NAMES)
            nursery.cancel_scope.cancel()


async def test_session_exit_releases_every_name_in_one_statement_and_the_other_takes_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with session_in_task(nursery, backend, "a") as (_, a, leave_a):
            async with session_in_task(nursery, backend, "b") as (_, b, _):
                assert all(peer.is_leader for peer in a.values())
                await trio.testing.wait_all_tasks_blocked()
                before = backend.statements
                left = trio.current_time()
                leave_a.set()
                await wait_for(lambda: backend.connection_count == 1, limit=1, poll=0.001)
                assert set(leaders(backend).values()) <= {None, "b"}
                await wait_for(
                    lambda: all(peer.is_leader for peer in b.values()), limit=1, poll=0.0005
                )
                # One release statement for every name of a, one election for all of b's.
                assert backend.statements - before == 2
                # One notification, one batched election: well under one poll interval.
                assert trio.current_time() - left < 0.05
                assert {peer.term for peer in b.values()} == {2}
                nursery.cancel_scope.cancel()


async def test_one_locked_row_is_busy_for_its_name_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with session_in_task(nursery, backend, "a") as (_, a, _):
            locked = NAMES[3]
            backend.lock_row(locked)
            for _ in range(6):
                await trio.sleep(INTERVAL)
                # The others keep renewing on schedule; the locked name's trust ends at
                # its deadline (a busy renewal neither extends nor cuts it).
                assert all(a[n].is_leader for n in NAMES if n != locked)
            assert not a[locked].is_leader
            assert a[locked].statistics().elections_busy > 0
            assert all(a[n].statistics().elections_busy == 0 for n in NAMES if n != locked)
            backend.unlock_row(locked)
            with trio.fail_after(3 * INTERVAL):
                await a[locked].wait_leader()
            nursery.cancel_scope.cancel()


async def test_stuck_leader_work_of_one_name_does_not_delay_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    stuck_running = trio.Event()

    async def stuck() -> None:
        stuck_running.set()
        with trio.CancelScope(shield=True):
            await trio.sleep(1000)  # ignores cancellation

    async with trio.open_nursery() as nursery:
        async with session_in_task(nursery, backend, "a", cleanup_timeout=1.0) as (_, a, _):
            nursery.start_soon(a[NAMES[0]].run_while_leader, stuck)
            await stuck_running.wait()
            await a[NAMES[0]].resign()
            for _ in range(10):
                await trio.sleep(INTERVAL)
                assert all(a[n].is_leader for n in NAMES[1:])
            nursery.cancel_scope.cancel()


async def test_a_missing_table_fails_only_its_names(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()  # only public.trio_peers exists
    async with open_session("memory://", backend=backend, node="a") as session:
        async with (
            session.open_peers(NAMES[:5], interval=INTERVAL) as good,
            session.open_peers(NAMES[:5], interval=INTERVAL, table="absent") as bad,
        ):
            for _ in range(5):
                await trio.sleep(INTERVAL)
                assert all(peer.is_leader for peer in good.values())
                assert not any(peer.is_leader for peer in bad.values())
            assert backend.connection_count == 1
            assert session.statistics().connects == 1
            assert all("TableMissing" in (p.statistics().last_error or "") for p in bad.values())
            backend.create_table("public", "absent")
            with trio.fail_after(3 * INTERVAL):
                for peer in bad.values():
                    await peer.wait_leader()


async def test_a_killed_connection_ends_trust_for_every_name_and_all_heal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        async with session.open_peers(NAMES, interval=INTERVAL) as peers:
            backend.kill_connections()
            assert not any(peer.is_leader for peer in peers.values())
            with trio.fail_after(2 * INTERVAL):
                for peer in peers.values():
                    await peer.wait_leader()
            assert backend.connection_count == 1
            assert session.statistics().connects == 2
            # The same tenures resumed: no term was handed out twice or skipped.
            assert {peer.term for peer in peers.values()} == {1}


async def test_names_join_and_leave_while_the_session_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        async with session.open_peer(name="cron", interval=INTERVAL) as cron:
            assert cron.is_leader
            async with session.open_peer(name="pruner", interval=4.0) as pruner:
                assert pruner.is_leader and session.statistics().names == 2
                await trio.sleep(3 * INTERVAL)
            assert backend.leader("pruner") is None  # released when it left
            assert session.statistics().names == 1
            await trio.sleep(3 * INTERVAL)
            assert cron.is_leader
            async with session.open_peer(name="pruner", interval=4.0) as again:
                assert again.is_leader and again.term == 2
        assert backend.connection_count == 1
    assert backend.connection_count == 0


async def test_a_slow_batch_does_not_cost_renewals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each statement takes 80% of the statement timeout, so a renewal may wait behind a
    # batch of other names for that long before its own: the core renews early enough.
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        async with (
            session.open_peers(NAMES[:10], interval=2.0, leader_boost=1.0) as short,
            session.open_peers(NAMES[10:20], interval=3.1, leader_boost=1.0) as long,
        ):
            backend.statement_delay = 0.8 * 0.5
            for _ in range(30):
                await trio.sleep(1.0)
                assert all(p.is_leader for p in [*short.values(), *long.values()])
            assert all(p.statistics().elections_failed == 0 for p in short.values())


async def test_open_peer_runs_on_a_private_session_of_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    from trio_peers import PeerConfig

    async with open_peer(
        PeerConfig(dsn="memory://", node="a", interval=INTERVAL), backend=backend
    ) as p:
        assert p.is_leader
        assert backend.connection_count == 1
    assert backend.connection_count == 0 and backend.leader() is None


def test_periodic_rounds_align_on_a_nested_grid() -> None:
    # Any due time with a quarter-period of room lands on a grid point at or before it.
    for due in (10.0, 10.3, 17.77, 1234.5678):
        for room in (0.1, 0.25, 0.5, 7.5):
            at = aligned_wake(due, due - room)
            assert due - room <= at <= due
    # Two names with different periods share the coarser grid point.
    assert aligned_wake(100.9, 100.9 - 0.25) == aligned_wake(100.8, 100.8 - 0.3) == 100.75
    assert aligned_wake(100.8, 100.8 - 0.5) == 100.5  # a coarser step: a point of both grids
    assert aligned_wake(5.0, 5.0) == 5.0


def test_queue_wait_schedules_renewals_earlier() -> None:
    from trio_peers._core import ElectionOutcome

    for queue_wait, latest in ((0.0, 2.0 * 0.99 - 0.5), (0.5, 2.0 * 0.99 - 1.0)):
        core = ElectionCore(
            interval=2.0,
            leader_boost=1.0,
            trust_margin=0.02,
            statement_timeout=0.5,
            queue_wait=queue_wait,
        )
        core.start_round(0.0)
        core.round_succeeded(0.001, ElectionOutcome(term=1, lease_remaining=2.0))
        assert core.next_round_at <= latest + 1e-9
        assert core.next_round_at == pytest.approx(2.0 - 0.02 - 0.5 - queue_wait)


async def test_bad_options_are_refused_at_the_call_naming_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend) as session:
        with pytest.raises(TypeError, match="dsn belong"):
            session.open_peer(name="x", dsn="memory://")
        with pytest.raises(TypeError, match="listen"):
            session.open_peer(name="x", listen=False)
        with pytest.raises(TypeError, match="not a PeerConfig field"):
            session.open_peer(name="x", intervall=3)
        with pytest.raises(ValueError, match="interval"):
            session.open_peer(name="x", interval=-1)
        with pytest.raises(ValueError, match="interval / 4"):
            session.open_peer(name="x", interval=2.0, statement_timeout=1.0)
        with pytest.raises(ValueError, match="twice"):
            async with session.open_peers(["x", "x"]):
                pass
        async with session.open_peer(name="x"):
            with pytest.raises(ValueError, match="already open"):
                session.open_peer(name="x")
        assert session.statistics().names == 0
    with pytest.raises(TypeError, match="backend must serve sessions"):
        async with open_session("memory://", backend=object()):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="connect_timeout"):
        async with open_session("memory://", connect_timeout=0):
            pass


async def test_one_notification_covers_the_releases_of_many_names(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = MemoryBackend()
    payloads: list[str] = []
    original = backend.notify

    def notify(channel: str, payload: str) -> None:
        payloads.append(payload)
        original(channel, payload)

    backend.notify = notify  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="trio_peers"):
        async with trio.open_nursery() as nursery:
            async with session_in_task(nursery, backend, "a") as (_, _a, leave_a):
                async with session_in_task(nursery, backend, "b"):
                    leave_a.set()
                    await wait_for(lambda: bool(payloads), limit=1, poll=0.001)
                assert len(payloads) == 1 and '"downs"' in payloads[0]
                nursery.cancel_scope.cancel()


def test_a_busy_retry_is_never_moved_earlier() -> None:
    """Regression: a renewal capped at its last chance (trust end - statement timeout -
    queue wait) that came back busy was retried at that same instant, which still counted
    as the alignable renewal; aligned into the past, the locked name retried in a hot loop."""
    from trio_peers._core import ElectionOutcome

    core = ElectionCore(
        interval=2.0, leader_boost=1.0, trust_margin=0.02, statement_timeout=0.5, queue_wait=0.5
    )
    core.start_round(0.0)
    core.round_succeeded(0.0, ElectionOutcome(term=1, lease_remaining=2.0))
    last_chance = core.next_round_at  # capped: 2.0 - 0.02 - 0.5 - 0.5
    assert core.next_round_earliest < last_chance  # a periodic renewal may run early
    core.start_round(0.97)  # the backoff (at least 0.025 s) would reach past last_chance
    core.round_succeeded(0.97, ElectionOutcome(term=None, busy=True))
    assert core.next_round_at == last_chance
    assert core.next_round_earliest == core.next_round_at


async def test_a_timed_out_get_leader_leaves_the_session_connection_and_leadership_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a read that timed out counted as a connection fault and dropped the
    shared connection, ending every name's trust."""
    from trio_peers import BackendUnavailable

    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        async with session.open_peers(NAMES[:5], interval=30.0) as peers:
            backend.hang = True
            with pytest.raises(BackendUnavailable):
                await peers[NAMES[0]].get_leader()
            backend.hang = False
            assert all(peer.is_leader for peer in peers.values())
            assert session.statistics().connects == 1 and session.statistics().connected
            info = await peers[NAMES[0]].get_leader()
            assert info is not None and info.node == "a"


async def test_an_outage_is_logged_once_for_all_names_not_once_per_name(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: each of a session's names logged a missing table and a lost database at
    WARNING itself: 1,000 names, 1,000 identical lines per outage. Now the first name
    logs it for all (and the recovery is logged when the last name recovers)."""

    def lines(level: int, text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.msg]

    backend = MemoryBackend(tables=())
    with caplog.at_level(logging.INFO, logger="trio_peers"):
        async with trio.open_nursery() as nursery:
            async with session_in_task(nursery, backend, "a") as (_, a, _):
                assert not any(p.is_leader for p in a.values())
                assert len(lines(logging.WARNING, "staying follower")) == 1
                assert "all of this session's names" in lines(logging.WARNING, "follower")[0]
                backend.create_table()
                with trio.fail_after(3 * INTERVAL):
                    for peer in a.values():
                        await peer.wait_leader()
                assert len(lines(logging.INFO, "lease table found")) == 1

                backend.set_available(False)
                with trio.fail_after(3 * INTERVAL):
                    for peer in a.values():
                        await peer.wait_follower()
                await trio.sleep(5 * INTERVAL)  # many failed retries of every name
                first = lines(logging.WARNING, "stepping down and retrying")
                causes = [line.split("retrying: ")[1] for line in first]
                # One line per kind of fault (the connection lost, then refused), for all.
                assert len(causes) == len(set(causes)) <= 2, first
                backend.set_available(True)
                with trio.fail_after(10 * INTERVAL):
                    for peer in a.values():
                        await peer.wait_leader()
                assert len(lines(logging.INFO, "reachable again")) == 1
                # A second outage is news again.
                backend.set_available(False)
                with trio.fail_after(3 * INTERVAL):
                    for peer in a.values():
                        await peer.wait_follower()
                again = lines(logging.WARNING, "stepping down and retrying")
                assert len(first) < len(again) <= 2 * len(first)
                nursery.cancel_scope.cancel()


async def test_a_paused_session_publishes_every_names_loss_when_its_trust_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session's one watchdog (not a task per name) publishes each leader's loss once
    its trust has ended without a renewal (here: the process paused past it), before the
    renewal that follows makes it leader again: the hook sees the loss and every
    leadership() reader sees the gap (its next value's version skips the loss)."""
    from trio_peers import LeadershipLost, PeerEvent

    losses: dict[str, LeadershipLost] = {}

    def hook(event: PeerEvent) -> None:
        if isinstance(event, LeadershipLost):
            losses.setdefault(event.name, event)

    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a", on_event=hook) as session:
        async with session.open_peers(NAMES[:10], interval=INTERVAL) as peers:
            channels = {name: peer.leadership() for name, peer in peers.items()}
            first = {name: await channel.receive() for name, channel in channels.items()}
            assert all(change.is_leader for change in first.values())
            ends = {}
            for name, peer in peers.items():
                trusted_for = peer.statistics().trusted_for
                assert trusted_for is not None
                ends[name] = trio.current_time() + trusted_for
            # The process "pauses" past every trust deadline, not past the leases.
            autojump_clock.jump(max(ends.values()) - trio.current_time() + 0.001)
            with trio.fail_after(INTERVAL):
                for name, channel in channels.items():
                    after = await channel.receive()
                    assert after.version >= first[name].version + 2 or not after.is_leader
            assert set(losses) == set(NAMES[:10])
            for name, lost in losses.items():
                assert lost.reason == "trust expired" and lost.at >= ends[name], lost
            with trio.fail_after(INTERVAL):
                for peer in peers.values():
                    assert await peer.wait_leader() == 1  # the same tenure resumed


async def test_steady_rounds_leave_no_objects_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Regression: each round's objects outlived it (the batcher kept its last batch of
    # requests until the next one, a renewal made a new Tenure): at 1,000 names that was
    # thousands of objects a second reaching the collector's oldest generation, whose
    # full collections (~0.1 s each at that size) then came every few seconds and landed
    # in the middle of exits. Objects made by steady rounds must die with their round.
    names = [f"gc-{i:03d}" for i in range(100)]
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        async with session.open_peers(names, interval=INTERVAL) as peers:
            await trio.sleep(5 * INTERVAL)  # settled: every name leads and renews
            assert all(peer.is_leader for peer in peers.values())
            gc.collect()
            before = {id(o) for o in gc.get_objects()}
            rounds = session.statistics().requests
            await trio.sleep(5 * INTERVAL)
            assert session.statistics().requests - rounds >= 5 * len(names)
            gc.collect()
            ours = [
                o
                for o in gc.get_objects()
                if id(o) not in before and type(o).__module__.startswith("trio_peers")
            ]
            assert len(ours) < len(names) // 4, sorted({type(o).__qualname__ for o in ours})


async def test_leaving_sends_the_release_before_publishing_the_losses(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's names leave with trust ended first (every ``is_leader`` is False when the
    release statement is sent), and their losses are published after it is sent: at 1,000
    names publishing, and the ``leadership()`` readers it wakes, took ~15 ms that used to
    come before the release, and so before any other process could take a name over."""
    backend = MemoryBackend()
    lost: list[str] = []
    at_release: list[tuple[int, bool]] = []
    peers: dict[str, Peer] = {}
    release = _MemorySessionConnection.release

    async def spy(self: _MemorySessionConnection, *args: Any, **kwargs: Any) -> Any:
        at_release.append((len(lost), any(peer.is_leader for peer in peers.values())))
        return await release(self, *args, **kwargs)

    monkeypatch.setattr(_MemorySessionConnection, "release", spy)

    def hook(event: object) -> None:
        if isinstance(event, LeadershipLost):
            lost.append(event.name)

    async def read(peer: Peer) -> None:
        async for _ in peer.leadership():
            pass

    async with trio.open_nursery() as readers:
        async with open_session("memory://", backend=backend, node="a", on_event=hook) as s:
            async with s.open_peers(NAMES, interval=INTERVAL) as opened:
                peers.update(opened)
                for peer in peers.values():
                    readers.start_soon(read, peer)
                assert all(peer.is_leader for peer in peers.values())
    assert at_release == [(0, False)]  # one statement; no loss published yet, none leads
    assert sorted(lost) == sorted(NAMES)  # then every loss, once
    assert all(row is None for row in (backend.leader(name) for name in NAMES))
