"""open_peer over the in-memory backend, under Trio's MockClock (deterministic, fast).

The same behaviours are proven against a real PostgreSQL in test_peer_postgres.py;
here the clock is virtual, so exact timing can be asserted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import trio_peers
from trio_peers import (
    LeadershipChange,
    Peer,
    PeerConfig,
    current_term,
    open_peer,
)
from trio_peers.testing import MemoryBackend

from ._pgutil import wait_for

INTERVAL = 10.0


def cfg(node: str, **kw: object) -> PeerConfig:
    args: dict[str, object] = {"dsn": "memory://", "interval": INTERVAL, "node": node, **kw}
    return PeerConfig(**args)  # type: ignore[arg-type]


@asynccontextmanager
async def peer_in_task(
    nursery: trio.Nursery, config: PeerConfig, backend: MemoryBackend
) -> AsyncIterator[tuple[Peer, trio.Event]]:
    """Run a peer in its own task; set the returned event to make it exit."""
    stop = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Peer]) -> None:
        async with open_peer(config, backend=backend) as peer:
            task_status.started(peer)
            await stop.wait()

    peer = await nursery.start(run)
    yield peer, stop
    stop.set()


async def test_first_peer_leads_at_entry_second_follows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        assert a.is_leader and a.term == 1
        async with open_peer(cfg("b"), backend=backend) as b:
            assert not b.is_leader and b.term is None
            await trio.sleep(5 * INTERVAL)
            assert a.is_leader and not b.is_leader
            assert a.term == 1  # renewals keep the term


async def test_graceful_exit_hands_over_at_once_and_term_increases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg("a"), backend) as (a, stop_a):
            async with open_peer(cfg("b"), backend=backend) as b:
                assert a.is_leader and not b.is_leader
                t0 = trio.current_time()
                stop_a.set()
                term = await b.wait_leader()
                # NOTIFY-driven: no interval passed, only the statements.
                assert trio.current_time() - t0 < 0.01
                assert term == 2


async def test_without_listen_handover_takes_at_most_an_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg("a", listen=False), backend) as (_, stop_a):
            async with open_peer(cfg("b", listen=False), backend=backend) as b:
                t0 = trio.current_time()
                stop_a.set()
                await b.wait_leader()
                assert 0.5 < trio.current_time() - t0 <= INTERVAL


async def test_crashed_leader_replaced_just_after_its_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    await trio.sleep(1)
    # Node "a" took the lease at t=1 and then died: it never renews or releases.
    assert backend.elect_now(cfg("a"), "a", None).term == 1
    expires = 1 + INTERVAL
    await trio.sleep(2)
    async with open_peer(cfg("b"), backend=backend) as b:
        assert not b.is_leader
        assert await b.wait_leader() == 2
        took = trio.current_time()
    # Not before the lease expired, and within the drift allowance + slack after.
    assert expires <= took <= expires + INTERVAL * (0.01 + 0.002) + 0.001 + 1e-9


async def test_cancelling_outer_scope_still_releases_and_notifies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    with trio.CancelScope() as outer:
        async with open_peer(cfg("a"), backend=backend) as a:
            assert a.is_leader
            outer.cancel()
            await trio.sleep_forever()
    assert outer.cancelled_caught
    row = backend.rows[("public", "trio_peers", "default")]
    assert row.expires_at <= trio.current_time()  # released, not left to lapse
    # A follower learns of the cancelled leader's exit from the NOTIFY at once.
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as leader_scope:
            async with open_peer(cfg("b"), backend=backend) as b:
                async with peer_in_task(nursery, cfg("c"), backend) as (c, _):
                    assert b.is_leader and not c.is_leader
                    t0 = trio.current_time()
                    leader_scope.cancel()
                    await trio.sleep_forever()
        await c.wait_leader()
        assert trio.current_time() - t0 < 0.01
        nursery.cancel_scope.cancel()


async def test_body_exception_propagates_unwrapped_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    with pytest.raises(KeyError, match="boom"):
        async with open_peer(cfg("a"), backend=backend):
            raise KeyError("boom")
    assert backend.leader() is None


async def test_keyboard_interrupt_propagates_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    with pytest.raises(KeyboardInterrupt):
        async with open_peer(cfg("a"), backend=backend):
            raise KeyboardInterrupt
    assert backend.leader() is None


async def test_hung_backend_during_cleanup_is_abandoned_after_cleanup_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    t0 = 0.0
    async with open_peer(cfg("a", cleanup_timeout=1.5), backend=backend) as a:
        assert a.is_leader
        backend.hang = True
        t0 = trio.current_time()
    elapsed = trio.current_time() - t0
    assert 1.5 <= elapsed <= 1.5 * 3 + 1
    backend.hang = False
    assert backend.leader() is not None  # not released: it will lapse


async def test_unreachable_at_entry_is_follower_then_leads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.set_available(False)
    async with open_peer(cfg("a"), backend=backend) as a:
        assert not a.is_leader
        assert a.statistics().last_error is not None
        await trio.sleep(30)
        backend.set_available(True)
        t0 = trio.current_time()
        await a.wait_leader()
        assert trio.current_time() - t0 <= INTERVAL * 0.5 + 0.1  # backoff cap


async def test_missing_table_warns_once_naming_migrate_and_retries_each_interval(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend(tables=())
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=backend) as a:
            assert not a.is_leader
            await trio.sleep(3 * INTERVAL + 1)
            assert a.statistics().elections_run in (4, 5)  # one per interval
            backend.create_table()
            await a.wait_leader()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "migrate" in warnings[0].getMessage()
    assert "public.trio_peers" in warnings[0].getMessage()


async def test_hung_renewal_stops_trust_before_the_lease_can_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        changes = a.leadership()
        assert (await changes.receive()).is_leader
        backend.hang = True
        lost = await changes.receive()
        assert not lost.is_leader
        assert not a.is_leader
        row = backend.leader()
        assert row is not None and row.node == "a"  # the lease is still valid in the store
        # Trust ended at least the safety margin before the lease could expire.
        assert row.expires_at - trio.current_time() >= INTERVAL * 0.01
        backend.hang = False


async def test_paused_process_reports_follower_before_running_anything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        assert a.is_leader
        row = backend.leader()
        assert row is not None
        # The process "pauses" (SIGSTOP, GC, swap) until just before the lease expires.
        autojump_clock.jump(row.expires_at - trio.current_time() - INTERVAL * 0.005)
        # No task has run since: is_leader reads the deadline itself.
        assert backend.leader() is not None
        assert not a.is_leader
        assert a.term is None


async def test_connection_lost_steps_down_then_resumes_same_term(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        changes = a.leadership()
        first = await changes.receive()
        assert first.is_leader and first.term == 1
        backend.kill_connections()
        assert not (await changes.receive()).is_leader
        back = await changes.receive()
        assert back.is_leader and back.term == 1  # same tenure, still valid in the store
        assert a.statistics().connects == 2


async def test_same_node_value_never_both_lead(autojump_clock: trio.testing.MockClock) -> None:
    # oban-py#32: two processes configured with the same node value.
    backend = MemoryBackend()
    async with open_peer(cfg("shared"), backend=backend) as a:
        async with open_peer(cfg("shared"), backend=backend) as b:
            for _ in range(20):
                await trio.sleep(INTERVAL / 3)
                assert not (a.is_leader and b.is_leader)
                assert a.is_leader
    async with trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg("shared"), backend) as (_, stop_a):
            async with open_peer(cfg("shared"), backend=backend) as b:
                t0 = trio.current_time()
                stop_a.set()  # fast handover still works between equal node values
                await b.wait_leader()
                assert trio.current_time() - t0 < 0.01


async def test_own_notification_is_ignored_river_286(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        stats = a.statistics()
        assert await a.resign()
        await trio.testing.wait_all_tasks_blocked()
        after = a.statistics()
        assert after.notifications_received == stats.notifications_received + 1
        assert after.notifications_ignored == stats.notifications_ignored + 1
        assert not a.is_leader  # did not re-elect itself on its own NOTIFY
        t0 = trio.current_time()
        await a.wait_leader()  # bids again only after a follower's poll
        assert trio.current_time() - t0 >= INTERVAL * 0.9


async def test_unknown_and_malformed_notifications_are_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("b"), backend=backend) as b, open_peer(cfg("c"), backend=backend):
        before = b.statistics()
        for payload in ["garbage", '{"down": "other-name", "sender": "x"}', "[]", '{"up": 1}']:
            backend.notify("public.trio_peers", payload)
        await trio.testing.wait_all_tasks_blocked()
        after = b.statistics()
        assert after.notifications_ignored - before.notifications_ignored == 4
        assert after.elections_run == before.elections_run


async def test_burst_of_notifications_coalesces_into_one_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend), open_peer(cfg("b"), backend=backend) as b:
        before = b.statistics().elections_run
        for i in range(50):
            backend.notify("public.trio_peers", f'{{"down":"default","term":{i},"sender":"x"}}')
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics().elections_run - before == 1


async def test_leadership_channel_first_item_then_final_false_then_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    seen: list[LeadershipChange] = []
    follower_seen: list[LeadershipChange] = []
    async with trio.open_nursery() as nursery:
        async with open_peer(cfg("a"), backend=backend) as a:
            async with open_peer(cfg("b"), backend=backend) as b:

                async def collect(
                    channel: trio.abc.ReceiveChannel[LeadershipChange], out: list[LeadershipChange]
                ) -> None:
                    async for change in channel:
                        out.append(change)

                nursery.start_soon(collect, a.leadership(), seen)
                nursery.start_soon(collect, b.leadership(), follower_seen)
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(INTERVAL)
            await trio.testing.wait_all_tasks_blocked()
            assert [c.is_leader for c in follower_seen] == [False]
    assert [(c.is_leader, c.term, c.version) for c in seen] == [(True, 1, 1), (False, None, 2)]


async def test_wait_leader_checkpoints_even_when_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        with trio.testing.assert_checkpoints():
            assert await a.wait_leader() == 1
        with trio.testing.assert_checkpoints():
            await a.get_leader()


async def test_wait_follower_and_closed_peer(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        async with open_peer(cfg("b"), backend=backend) as b:
            await b.wait_follower()
    with pytest.raises(trio.ClosedResourceError):
        await b.wait_leader()
    with pytest.raises(trio.ClosedResourceError):
        await a.get_leader()


async def test_get_leader_and_statistics(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with (
        open_peer(cfg("a"), backend=backend) as a,
        open_peer(cfg("b"), backend=backend) as b,
    ):
        info = await b.get_leader()
        assert info is not None
        assert (info.name, info.node, info.term) == ("default", "a", 1)
        assert info.expires_at > info.started_at
        stats = a.statistics()
        assert stats.is_leader and stats.term == 1 and stats.connected
        assert stats.tenures_gained == 1
        assert stats.trusted_for is not None and 0 < stats.trusted_for <= INTERVAL
    async with open_peer(cfg("c"), backend=backend) as c:
        backend.set_available(False)
        assert c.statistics().connected is False


async def test_no_public_constructor(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(TypeError):
        Peer(cfg("a"))  # type: ignore[call-arg]


async def test_one_connection_per_peer(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend), open_peer(cfg("b"), backend=backend):
        await trio.sleep(3 * INTERVAL)
        assert backend.connection_count == 2
    assert backend.connection_count == 0


async def test_one_statement_per_round(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        await trio.sleep(4 * INTERVAL)
        assert backend.statements == a.statistics().elections_run


async def test_names_and_tables_do_not_interfere(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend(tables=(("public", "trio_peers"), ("other", "trio_peers")))
    async with (
        open_peer(cfg("a", name="cron"), backend=backend) as a,
        open_peer(cfg("b", name="pruner"), backend=backend) as b,
        open_peer(cfg("c", prefix="other"), backend=backend) as c,
        open_peer(cfg("d"), backend=backend) as d,
    ):
        assert a.is_leader and b.is_leader and c.is_leader and d.is_leader


# ---------------------------------------------------------------------- leader-only work


async def test_run_while_leader_runs_on_leader_and_is_cancelled_on_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    events: list[tuple[str, int, float]] = []

    async def work(tag: str) -> None:
        events.append((tag + " start", current_term(), trio.current_time()))
        try:
            await trio.sleep_forever()
        finally:
            events.append((tag + " stop", current_term(), trio.current_time()))

    async with open_peer(cfg("a"), backend=backend) as a:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run_while_leader, work, "a")
            await trio.sleep(1)
            backend.hang = True  # renewals hang: trust must end, work must stop
            await a.wait_follower()
            lost_at = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert events[-1][0] == "a stop"
            assert events[-1][2] == lost_at
            backend.hang = False
            await a.wait_leader()  # resumes the same tenure...
            await trio.testing.wait_all_tasks_blocked()
            assert events[-1][:2] == ("a start", 1)  # ...and restarts the work
            nursery.cancel_scope.cancel()
    assert [e[0] for e in events] == ["a start", "a stop", "a start", "a stop"]


async def test_work_stops_before_release_on_graceful_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    order: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, trio_peers.LeaseReleased) and event.released:
            order.append("release")

    async def work() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)  # cleanup that takes time
            order.append("work stopped")

    async with trio.open_nursery() as outer:
        async with open_peer(cfg("a"), backend=backend, on_event=on_event) as a:
            outer.start_soon(a.run_while_leader, work)
            await trio.sleep(1)
    assert order == ["work stopped", "release"]


async def test_work_exception_propagates_and_peer_resigns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()

    async def work() -> None:
        await trio.sleep(1)
        raise RuntimeError("job failed")

    async with (
        open_peer(cfg("a"), backend=backend) as a,
        open_peer(cfg("b"), backend=backend) as b,
    ):
        with pytest.raises(RuntimeError, match="job failed"):
            await a.run_while_leader(work)
        assert not a.is_leader
        await b.wait_leader()  # another node took over at once, after the NOTIFY


async def test_work_exception_resign_and_retry_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    runs: list[int] = []

    async def work() -> None:
        runs.append(current_term())
        await trio.sleep(1)
        raise RuntimeError("flaky")

    async with open_peer(cfg("a"), backend=backend) as a:
        with trio.move_on_after(3 * INTERVAL):
            await a.run_while_leader(work, on_error="resign_and_retry")
    assert len(runs) >= 2
    assert runs == sorted(runs) and len(set(runs)) == len(runs)  # each retry is a new tenure


async def test_work_ignoring_cancellation_lets_lease_lapse(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = MemoryBackend()

    async def stubborn() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(100)

    with caplog.at_level(logging.ERROR, logger="trio_peers"):
        async with trio.open_nursery() as outer:
            async with open_peer(cfg("a", cleanup_timeout=1.0), backend=backend) as a:
                outer.start_soon(a.run_while_leader, stubborn)
                await trio.sleep(1)
            # The peer did not release the row while the work still ran.
            row = backend.rows[("public", "trio_peers", "default")]
            assert row.expires_at > trio.current_time()
            outer.cancel_scope.cancel()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "stubborn" in errors[0] and "ignored cancellation" in errors[0]


async def test_leader_scope_low_level_form(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        async with a.leader_scope() as scope:
            assert scope.term == 1 == current_term()
            backend.hang = True
            await trio.sleep_forever()  # cancelled at the trust deadline
        assert scope.lost
        backend.hang = False
    with pytest.raises(RuntimeError, match="outside leader-only work"):
        current_term()


async def test_a_leader_scope_the_block_cancels_itself_does_not_hold_the_renewals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a block that left its leader_scope early by cancelling the scope itself
    (scope.cancel_scope.cancel(), an ordinary Trio idiom) was taken for work of an ended
    tenure winding down: the peer held every bid, renewals included, while the block's
    cleanup ran, and a cleanup of a few seconds lost a healthy leader its tenure; and
    scope.lost said the tenure had ended. The tenure goes on: renewals go on."""
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        term = await a.wait_leader()
        async with a.leader_scope() as scope:
            scope.cancel_scope.cancel()  # the block is done with its work
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):  # a cleanup longer than a renewal period
                    rounds = a.statistics().elections_run
                    await trio.sleep(INTERVAL)
                    assert a.statistics().elections_run >= rounds + 1
                    assert a.is_leader and a.term == term
        assert not scope.lost
        assert a.is_leader and a.term == term


async def test_oban_717_is_leader_and_statistics_never_block_on_a_hung_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a:
        backend.hang = True
        await trio.sleep(INTERVAL / 2)  # a renewal is now hanging
        with trio.testing.assert_no_checkpoints():
            a.is_leader  # noqa: B018 - sync read, never blocks
            a.statistics()
            a.term  # noqa: B018
        backend.hang = False


async def test_oban_651_down_notifications_do_not_make_followers_spin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # After handling a "down", a follower keeps its normal schedule.
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend), open_peer(cfg("b"), backend=backend) as b:
        for _ in range(5):
            backend.notify("public.trio_peers", '{"down":"default","term":1,"sender":"x"}')
            await trio.testing.wait_all_tasks_blocked()
        before = b.statistics().elections_run
        await trio.sleep(5 * INTERVAL)
        # At most one round per interval, plus one wake at each lease expiry it saw.
        assert b.statistics().elections_run - before <= 10


async def test_river_216_leader_boost_one_keeps_the_lease_despite_slow_statements(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # river#216: TTL equal to the renew period lost leadership to query latency.
    backend = MemoryBackend()
    backend.statement_delay = INTERVAL * 0.2
    async with open_peer(cfg("a", leader_boost=1.0), backend=backend) as a:
        changes = a.leadership()
        assert (await changes.receive()).is_leader
        await trio.sleep(20 * INTERVAL)
        assert a.is_leader
        with pytest.raises(trio.WouldBlock):
            changes.receive_nowait()  # not a single flap in 20 intervals


async def test_work_stuck_after_loss_stops_bidding_until_it_finishes(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = MemoryBackend()
    release_work = trio.Event()

    async def slow_to_stop() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await release_work.wait()  # ignores cancellation for a long time

    with caplog.at_level(logging.ERROR, logger="trio_peers"):
        async with (
            trio.open_nursery() as nursery,
            open_peer(cfg("a", cleanup_timeout=2.0), backend=backend) as a,
        ):
            nursery.start_soon(a.run_while_leader, slow_to_stop)
            await trio.sleep(1)
            backend.hang = True
            await a.wait_follower()  # trust lapsed; the work is cancelled but keeps running
            backend.hang = False
            await trio.sleep(3 * INTERVAL)
            # It never bid while its old work ran: the lease lapsed, nobody renewed it.
            assert not a.is_leader
            assert backend.leader() is None
            async with open_peer(cfg("b"), backend=backend) as b:
                assert b.is_leader  # another node took over
                release_work.set()  # the stuck work finally ends...
                await trio.sleep(INTERVAL)
                assert not a.is_leader  # ...and a bids again, as a follower
            await a.wait_leader()
            nursery.cancel_scope.cancel()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "slow_to_stop" in errors[0]


async def test_a_follower_warns_of_a_locked_row_only_when_it_stays_locked(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: a follower warned at its first busy round, which is most often another
    follower electing in the same instant (every graceful handover with 3 peers logged it).
    A leader warns at once (its renewal is blocked); a follower after a few busy rounds."""
    backend = MemoryBackend()
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=backend) as a:
            async with open_peer(cfg("b"), backend=backend) as b:
                assert a.is_leader and not b.is_leader
                backend.lock_row()  # a cannot renew; once its lease ends b's bids are busy
                await wait_for(
                    lambda: b.statistics().elections_busy >= 1, limit=3 * INTERVAL, poll=0.001
                )
                busy = [r for r in caplog.records if "locked by another" in r.getMessage()]
                assert [r.getMessage() for r in busy if "(b)" in r.getMessage()] == []
                await trio.sleep(3 * INTERVAL)  # locked for long: now worth a warning
                busy = [r for r in caplog.records if "locked by another" in r.getMessage()]
                assert len([r for r in busy if "(b)" in r.getMessage()]) == 1
                assert len([r for r in busy if "(a)" in r.getMessage()]) == 1
                backend.unlock_row()


@pytest.mark.parametrize("form", ["open_peer", "session"])
async def test_memory_a_connection_dropped_while_a_reply_is_on_its_way_fails_the_round(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    """Regression (MemoryBackend): a statement whose connection was dropped during
    reply_delay still returned its outcome, so a renewal "succeeded" over a dead connection
    and the peer led on without one for half an interval; with PostgreSQL the pending query
    fails at once. Now it fails the round, and the peer reconnects and renews."""
    backend = MemoryBackend()
    async with contextlib.AsyncExitStack() as stack:
        if form == "open_peer":
            a = await stack.enter_async_context(open_peer(cfg("a"), backend=backend))
        else:
            session = await stack.enter_async_context(
                trio_peers.open_session("memory://", backend=backend, node="a")
            )
            a = await stack.enter_async_context(
                session.open_peer(name="default", interval=INTERVAL)
            )
        term = await a.wait_leader()
        backend.reply_delay = 1.0
        statements = backend.statements
        await wait_for(lambda: backend.statements > statements, limit=INTERVAL, poll=0.001)
        backend.reply_delay = 0.0
        backend.kill_connections()  # the renewal has run; its reply is on its way
        await trio.sleep(0.01)
        assert a.statistics().elections_failed == 1
        await wait_for(lambda: backend.connection_count == 1 and a.is_leader, limit=1.0)
        assert a.term == term  # resumed on a new connection


@pytest.mark.parametrize("follower_interval", [INTERVAL / 5, INTERVAL])
async def test_a_follower_warns_once_of_a_leader_with_a_longer_interval(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    follower_interval: float,
) -> None:
    """Peers of one name with different intervals are unsafe across a failover (the barrier
    is as long as its installer's interval): the shorter one sees a lease longer than its
    own interval and warns, once per period however many bids see it. Equal intervals: no
    warning."""
    backend = MemoryBackend()
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=backend) as a:
            async with open_peer(cfg("b", interval=follower_interval), backend=backend) as b:
                await trio.sleep(10 * INTERVAL)  # many denied bids of b
                assert a.is_leader and not b.is_leader
                assert b.statistics().elections_run > 10
    warnings = [r.getMessage() for r in caplog.records if "longer than this" in r.getMessage()]
    if follower_interval < INTERVAL:
        assert len(warnings) == 1
        assert "default (b): the leader a holds a lease" in warnings[0]
        assert f"interval ({follower_interval:.3g} s)" in warnings[0]
    else:
        assert warnings == []


async def test_a_session_warns_once_for_all_its_names_led_with_a_longer_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Many names of a session that each see a longer lease: one warning for the session
    per period, not one per name (regression: one per name, 1,000 lines at 1,000 names)."""
    backend = MemoryBackend()
    names = [f"job-{i}" for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with contextlib.AsyncExitStack() as stack:
            for name in names:
                leader = await stack.enter_async_context(
                    open_peer(cfg("a", name=name), backend=backend)
                )
                assert leader.is_leader
            session = await stack.enter_async_context(
                trio_peers.open_session("memory://", node="b", backend=backend)
            )
            for name in names:
                await stack.enter_async_context(
                    session.open_peer(name=name, interval=INTERVAL / 5)
                )
            await trio.sleep(4 * INTERVAL)
    warnings = [r.getMessage() for r in caplog.records if "longer than this" in r.getMessage()]
    assert len(warnings) == 1 and "(b): the leader a holds" in warnings[0]
