"""Regression tests of the side paths that broke documented promises (issue 9).

Each test names the promise. They run on MemoryBackend under MockClock, where timing is the
point; the SQL-side items are in test_sql_writes.py and test_peer_postgres.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from trio_peers import (
    BackendConnection,
    BackendConnector,
    BackendUnavailable,
    ElectionOutcome,
    LeaderInfo,
    Peer,
    PeerConfig,
    current_term,
    open_peer,
)
from trio_peers.testing import MemoryBackend

INTERVAL = 10.0


def cfg(node: str, **kw: object) -> PeerConfig:
    args: dict[str, object] = {"dsn": "memory://", "interval": INTERVAL, "node": node, **kw}
    return PeerConfig(**args)  # type: ignore[arg-type]


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------- a faulty backend


@attrs.define
class Faulty:
    """A MemoryBackend whose statements can raise what a buggy driver might."""

    memory: MemoryBackend = attrs.Factory(MemoryBackend)
    elect_error: Callable[[], BaseException] | None = None
    elect_calls: list[float] = attrs.Factory(list)
    """Trio time at which each election statement was sent."""
    get_leader_error: Callable[[], BaseException] | None = None

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        return self._open(config)

    @asynccontextmanager
    async def _open(self, config: PeerConfig) -> AsyncIterator[BackendConnector]:
        async with self.memory.open(config) as inner:
            yield _FaultyConnector(self, inner)


@attrs.define
class _FaultyConnector:
    owner: Faulty
    inner: BackendConnector

    async def connect(
        self, *, on_notification: Callable[[str], None], on_lost: Callable[[], None]
    ) -> BackendConnection:
        conn = await self.inner.connect(on_notification=on_notification, on_lost=on_lost)
        return _FaultyConnection(self.owner, conn)


@attrs.define
class _FaultyConnection:
    owner: Faulty
    inner: BackendConnection

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        self.owner.elect_calls.append(trio.current_time())
        if self.owner.elect_error is not None:
            await trio.lowlevel.checkpoint()
            raise self.owner.elect_error()
        return await self.inner.elect(
            node=node, held_term=held_term, statement_timeout=statement_timeout
        )

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        return await self.inner.release(
            node=node, term=term, sender=sender, statement_timeout=statement_timeout
        )

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        if self.owner.get_leader_error is not None:
            await trio.lowlevel.checkpoint()
            raise self.owner.get_leader_error()
        return await self.inner.get_leader(statement_timeout=statement_timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def abort(self) -> None:
        self.inner.abort()


# ---------------------------------------------------------------------- 1. resign from work


@pytest.mark.parametrize("form", ["run_while_leader", "leader_scope"])
async def test_resign_from_inside_leader_work_releases_the_moment_the_work_ends(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """resign() inside leader-only work cancels that work (it does not return) and the
    release follows the work's end at once: the other peer leads after the NOTIFY, not
    after the lease lapses, and nothing is logged as an error."""
    backend = MemoryBackend()
    after_resign: list[str] = []
    resigned_at: list[float] = []

    async def work() -> None:
        await trio.sleep(1)
        resigned_at.append(trio.current_time())
        await a.resign()
        after_resign.append("resign() returned")  # never: resign() cancels this work

    with caplog.at_level(logging.INFO, logger="trio_peers"):
        async with (
            open_peer(cfg("a"), backend=backend) as a,
            open_peer(cfg("b"), backend=backend) as b,
        ):
            assert a.is_leader
            if form == "run_while_leader":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.run_while_leader, work)
                    await b.wait_leader()
                    nursery.cancel_scope.cancel()
            else:
                async with a.leader_scope() as scope:
                    await work()
                assert scope.lost
                await b.wait_leader()
            took = trio.current_time() - resigned_at[0]
            assert b.term == 2
            assert took < 0.01, f"handover took {took}s: the release waited"
    assert after_resign == []
    assert errors(caplog) == []


async def test_resign_from_a_task_outside_the_work_waits_for_the_work_then_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    order: list[str] = []

    async def work() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)
            order.append("work stopped")

    async with open_peer(cfg("a"), backend=backend) as a, trio.open_nursery() as nursery:
        nursery.start_soon(a.run_while_leader, work)
        await trio.testing.wait_all_tasks_blocked()
        assert await a.resign() is True
        order.append("released")
        assert backend.leader() is None
        nursery.cancel_scope.cancel()
    assert order == ["work stopped", "released"]


# ---------------------------------------------------------------------- resign and deadlines


async def test_resign_honours_the_callers_deadline_and_still_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shield cleanup, not operations: a caller's timeout ends its wait; the release, once
    started, finishes in the peer's own task."""
    backend = MemoryBackend()
    async with (
        open_peer(cfg("a"), backend=backend) as a,
        open_peer(cfg("b"), backend=backend) as b,
    ):
        backend.statement_delay = 1.0  # a slow database: each statement takes 1 s
        t0 = trio.current_time()
        with trio.move_on_after(0.1) as scope:
            await a.resign()
        assert scope.cancelled_caught
        assert trio.current_time() - t0 == pytest.approx(0.1)
        assert not a.is_leader
        # The release landed at t0 + 1 s; its NOTIFY made b bid (one more second).
        assert await b.wait_leader() == 2
        assert trio.current_time() - t0 == pytest.approx(2.0)


async def test_resign_during_a_round_in_flight_completes_when_the_round_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with (
        open_peer(cfg("a"), backend=backend) as a,
        open_peer(cfg("b"), backend=backend) as b,
    ):
        backend.statement_delay = 0.5
        await trio.sleep(INTERVAL / 2)  # a's renewal is in flight now
        assert a.statistics().elections_run == 2
        assert await a.resign() is True
        assert not a.is_leader
        backend.statement_delay = 0.0
        await b.wait_leader()
        assert b.term == 2


# ---------------------------------------------------------------------- 2. returned work


async def test_work_that_returned_is_not_rerun_when_the_same_tenure_resumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    runs: list[int] = []

    async def one_shot() -> None:
        runs.append(current_term())

    async with open_peer(cfg("a"), backend=backend) as a, trio.open_nursery() as nursery:
        nursery.start_soon(a.run_while_leader, one_shot)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):  # connection blips: trust ends, the same term resumes
            backend.kill_connections()
            await a.wait_follower()
            assert await a.wait_leader() == 1
            await trio.testing.wait_all_tasks_blocked()
        assert runs == [1]
        await a.resign()  # a new tenure later: the work runs again
        assert await a.wait_leader() == 2
        await trio.testing.wait_all_tasks_blocked()
        assert runs == [1, 2]
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- 3. body exceptions


async def test_exception_group_raised_by_the_body_comes_out_as_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mine = ExceptionGroup("mine", [ValueError("a"), KeyError("b")])
    single = ExceptionGroup("single", [ValueError("c")])
    for raised in (mine, single):
        with pytest.raises(ExceptionGroup) as info:
            async with open_peer(cfg("a"), backend=MemoryBackend()):
                raise raised
        assert info.value is raised


# ---------------------------------------------------------------------- 4. failing while cancelled


async def test_resign_and_retry_covers_work_failing_while_it_is_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A child task of the work raises in its cleanup after the tenure ended: the error is
    the work's failure, handled by on_error, and never escapes into the caller's nursery."""
    backend = MemoryBackend()
    runs: list[int] = []
    rerun = trio.Event()

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if len(runs) == 1:  # only in the first tenure
                raise RuntimeError("cleanup failed")

    async def work() -> None:
        runs.append(current_term())
        if len(runs) == 2:
            rerun.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            await trio.sleep_forever()

    with caplog.at_level(logging.ERROR, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=backend) as a, trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(a.run_while_leader, work, on_error="resign_and_retry")
            )
            await trio.testing.wait_all_tasks_blocked()
            backend.kill_connections()  # the tenure's trust ends: the work is cancelled
            await a.wait_follower()
            with trio.fail_after(3 * INTERVAL):
                await rerun.wait()  # ...and it runs again at the next tenure
            nursery.cancel_scope.cancel()
    assert runs == [1, 2]
    failures = [r for r in errors(caplog) if "leader-only work" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_raise_policy_propagates_a_failure_while_cancelled_as_the_group_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    async def work() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            await trio.sleep_forever()

    async with open_peer(cfg("a"), backend=backend) as a:
        # run_while_leader raises the work's group; the test's nursery wraps it once more.
        inner = pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="cleanup failed"))
        with pytest.RaisesGroup(inner):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.run_while_leader, work)
                await trio.testing.wait_all_tasks_blocked()
                backend.kill_connections()
                await trio.sleep_forever()


# ---------------------------------------------------------------------- unexpected errors


@pytest.mark.parametrize(
    "error",
    [lambda: ValueError("driver bug"), lambda: KeyError("driver bug")],
    ids=["ValueError", "KeyError"],
)
async def test_unexpected_backend_error_costs_the_round_not_the_application(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], BaseException],
) -> None:
    backend = Faulty()
    with caplog.at_level(logging.DEBUG, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=backend) as a:
            assert a.is_leader
            backend.elect_error = error
            await a.wait_follower()  # the failed renewal ends trust
            await trio.sleep(5 * INTERVAL)  # many failed rounds: the body keeps running
            assert a.statistics().elections_failed >= 5
            backend.elect_error = None
            await a.wait_leader()
    reports = [r for r in errors(caplog) if "unexpected error" in r.getMessage()]
    assert len(reports) == 1, "logged once, then rate-limited"
    assert reports[0].exc_info is not None and "driver bug" in str(reports[0].exc_info[1])


def test_asyncio_cancelled_error_from_the_driver_is_a_backend_failure() -> None:
    """An asyncio.CancelledError that did not come from Trio (a BaseException) must not
    escape the election loop: the asyncpg backend maps it to BackendUnavailable."""
    from trio_peers._asyncpg import _mapped

    with pytest.raises(BackendUnavailable, match="cancelled"), _mapped():
        raise asyncio.CancelledError


# ---------------------------------------------------------------------- get_leader


@pytest.mark.parametrize(
    ("error", "connection_kept"),
    [
        # The driver's timeout: the connection is fine and stays.
        (lambda: TimeoutError("statement timed out"), True),
        # The connection broke under the query: the session reconnects for the next round.
        (lambda: BackendUnavailable("connection reset"), False),
    ],
    ids=["timeout", "broken"],
)
async def test_get_leader_failure_leaves_leadership_alone(
    autojump_clock: trio.testing.MockClock,
    error: Callable[[], BaseException],
    connection_kept: bool,
) -> None:
    backend = Faulty()
    async with open_peer(cfg("a"), backend=backend) as a:
        term = a.term
        backend.get_leader_error = error
        with pytest.raises(BackendUnavailable):
            await a.get_leader()
        assert a.is_leader and a.term == term
        assert backend.memory.connection_count == (1 if connection_kept else 0)
        backend.get_leader_error = None
        await trio.sleep(2 * INTERVAL)  # renewals go on, on the old or a new connection
        assert a.is_leader and a.term == term
        assert a.statistics().elections_failed == 0
        assert backend.memory.connection_count == 1


async def test_get_leader_never_delays_a_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A renewal due while get_leader() holds the connection starts on time: get_leader's
    statement is cut short at the round's due time and retried after the round."""
    backend = Faulty()
    st = 2.0
    async with open_peer(cfg("a", statement_timeout=st), backend=backend) as a:
        backend.memory.statement_delay = 0.4  # each statement takes 0.4 s
        # Ask just before the renewal is due: the old get_leader held the connection
        # for its whole statement, and the renewal waited behind it.
        renewal_due = a._core.next_round_at
        await trio.sleep(renewal_due - trio.current_time() - 0.1)
        t0 = trio.current_time()
        info = await a.get_leader()
        assert info is not None and info.node == "a"
        assert trio.current_time() - t0 <= st  # bounded by statement_timeout in all
        assert backend.elect_calls[-1] == pytest.approx(renewal_due, abs=1e-9)
        assert a.is_leader and a.statistics().elections_failed == 0


async def test_get_leader_is_bounded_by_statement_timeout_in_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_peer(cfg("a", statement_timeout=1.0), backend=backend) as a:
        backend.hang = True
        t0 = trio.current_time()
        with pytest.raises(BackendUnavailable, match="did not finish"):
            await a.get_leader()
        assert trio.current_time() - t0 == pytest.approx(1.0)


# ---------------------------------------------------------------------- request_election


async def test_request_election_says_when_it_is_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with (
        open_peer(cfg("a"), backend=backend) as a,
        open_peer(cfg("b"), backend=backend) as b,
    ):
        assert a.request_election() is False  # leads already
        assert b.request_election() is True
        await a.resign()
        await b.wait_leader()
        assert a.request_election() is False  # holding after its resign
        await trio.sleep(1.5 * INTERVAL)
        assert a.request_election() is True  # the hold is over


def test_asyncio_loop_errors_are_filtered_not_hidden(caplog: pytest.LogCaptureFixture) -> None:
    """The loop's exception handler stays quiet (DEBUG) about errors of dead connections on
    orphaned futures (asyncpg's abandoned cancel requests, DRIVER P9), and logs anything
    else at ERROR with its traceback."""
    from trio_peers._asyncpg import _log_asyncio_error

    orphan = ConnectionError("unexpected connection_lost() call")
    bug = RuntimeError("a real problem")
    with caplog.at_level(logging.DEBUG, logger="trio_peers"):
        _log_asyncio_error(
            None, {"message": "Future exception was never retrieved", "exception": orphan}
        )
        _log_asyncio_error(
            None, {"message": "Task exception was never retrieved", "exception": bug}
        )
    by_level = {r.levelno: r for r in caplog.records}
    assert by_level[logging.DEBUG].exc_info is not None
    assert by_level[logging.DEBUG].exc_info[1] is orphan
    assert by_level[logging.ERROR].exc_info is not None
    assert by_level[logging.ERROR].exc_info[1] is bug
    assert len(caplog.records) == 2


# ---------------------------------------------------------------------- a locked lease row


async def test_locked_row_busy_leader_keeps_its_deadline_and_nobody_takes_over(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Another transaction holds the lease row (a long fenced write): renewals do not wait
    for the lock and are not failures (no reconnect, one log line); the leader keeps
    trusting until its deadline, then no one leads until the row is free."""
    backend = MemoryBackend()
    with caplog.at_level(logging.INFO, logger="trio_peers"):
        async with (
            open_peer(cfg("a"), backend=backend) as a,
            open_peer(cfg("b"), backend=backend) as b,
        ):
            deadline = a._core.trusted_until
            backend.lock_row()
            await a.wait_follower()
            assert trio.current_time() == pytest.approx(deadline)  # not cut short, not extended
            await trio.sleep(3 * INTERVAL)  # the row stays locked past the lease's expiry
            assert not a.is_leader and not b.is_leader
            for peer in (a, b):
                stats = peer.statistics()
                assert stats.connects == 1 and stats.elections_failed == 0
                assert stats.elections_busy >= 1
            # Bounded retry rate while busy: backoff up to interval / 2.
            assert a.statistics().elections_run < 3 * INTERVAL / (INTERVAL / 2) + 15
            backend.unlock_row()
            with trio.fail_after(INTERVAL):
                async with trio.open_nursery() as race:  # a leader again, whichever peer

                    async def lead(peer: Peer, race: trio.Nursery = race) -> None:
                        await peer.wait_leader()
                        race.cancel_scope.cancel()

                    race.start_soon(lead, a)
                    race.start_soon(lead, b)
    busy_logs = [r for r in caplog.records if "locked by another transaction" in r.getMessage()]
    assert len(busy_logs) <= 2  # at most once per peer
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == busy_logs


# ---------------------------------------------------------------------- exit during a bid


async def test_exit_during_a_winning_bid_releases_what_it_won(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A follower exits while its bid is in flight: the server has committed it (the reply is
    still on its way). The peer must learn the outcome and release the term it won, or the
    lease outlives every process for an interval (found by benchmarks/repro_simultaneous_exit.py
    on PostgreSQL: 3 of 30 simultaneous exits)."""
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend) as a, trio.open_nursery() as nursery:
        async with open_peer(cfg("b"), backend=backend) as b:
            backend.reply_delay = 0.2  # every reply from now on arrives 0.2 s late
            nursery.start_soon(a.resign)  # a holds its bids for a resign hold
            await trio.sleep(0.1)  # the release ran, b was told and bid; no reply yet
            row = backend.leader()
            assert row is not None and (row.node, row.term) == ("b", 2)
            assert not b.is_leader
        # b has exited: it released the term it won (so no lease outlives its holder), and a
        # follows that release of a newer term than the one it gave up.
        row = backend.leader()
        assert row is None or row.node == "a", row
        assert await a.wait_leader() == 3
