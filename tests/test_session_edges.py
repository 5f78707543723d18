"""Edge paths of peers in sessions: races with the session's inline rounds, and exits that
go wrong (found by reviewing the inline rounds; each test failed before its fix)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import trio_peers._peer
from trio_peers import Peer, PeerConfig, PeerSession, open_peer, open_session
from trio_peers._backend import ElectRequest, LeaseTable
from trio_peers._core import ElectionOutcome
from trio_peers.testing import MemoryBackend, _memory

from ._pgutil import wait_for
from .test_cli import cli_env

INTERVAL = 2.0


def one_name(backend: MemoryBackend, form: str) -> AbstractAsyncContextManager[Peer]:
    if form == "open_peer":
        config = PeerConfig(dsn="memory://", name="x", node="a", interval=INTERVAL)
        return open_peer(config, backend=backend)
    if form == "open_peers":
        return _session_peers(backend)
    return _session_peer(backend)


@asynccontextmanager
async def _session_peers(backend: MemoryBackend) -> AsyncIterator[Peer]:
    # open_peers runs each name's main task in its own nursery (no task per name around it).
    async with (
        open_session("memory://", backend=backend, node="a") as session,
        session.open_peers(["x"], interval=INTERVAL) as peers,
    ):
        yield peers["x"]


@asynccontextmanager
async def _session_peer(backend: MemoryBackend) -> AsyncIterator[Peer]:
    async with (
        open_session("memory://", backend=backend, node="a") as session,
        session.open_peer(name="x", interval=INTERVAL) as peer,
    ):
        yield peer


@pytest.mark.parametrize("seed", range(8))
async def test_a_resign_during_an_inline_round_holds_its_bids_for_the_resign_hold(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """Regression: a resign that came while the session ran the peer's round woke the
    parked loop, which found its (old) round due and bid again the moment the inline round
    ended: the resigned peer led again at once, instead of after one resign hold."""
    random.seed(seed)
    backend = MemoryBackend()
    async with _session_peer(backend) as peer:
        await peer.wait_leader()
        backend.statement_delay = 0.05
        # (Virtual time) until an inline round is in flight.
        await wait_for(
            lambda: peer._core.round_started_at is not None and peer._parked,
            limit=3 * INTERVAL,
            poll=0.001,
        )
        hold = peer._core.resign_hold
        assert await peer.resign()
        resigned = trio.current_time()
        backend.statement_delay = 0.0
        with trio.move_on_after(3 * hold):
            await peer.wait_leader()
        assert trio.current_time() - resigned >= hold - INTERVAL * 0.05


@pytest.mark.parametrize("form", ["session", "open_peers", "open_peer"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
async def test_an_exit_whose_cleanup_raises_still_ends_the_block(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    form: str,
    error: type[BaseException],
) -> None:
    """Regression: once entered, a peer's tasks are shielded from the caller's cancellation
    and stop through the exit path; when that path raised (a backend's bug, a Ctrl-C
    during exit), the block never returned."""

    def broken_detach(self: Peer) -> None:
        raise error("cleanup failed")

    # (The exit's last step: it detaches the peer from the session's connection.)
    monkeypatch.setattr(trio_peers._peer.Peer, "_drop_connection", broken_detach)
    backend = MemoryBackend()
    with trio.fail_after(60), pytest.raises(error, match="cleanup failed"):
        async with one_name(backend, form) as peer:
            assert peer.is_leader


@pytest.mark.parametrize("bad", ["not an outcome", "impossible outcome"])
async def test_an_inline_round_with_an_unusable_outcome_fails_that_round_only(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    """Regression: an outcome that the peer could not apply (a backend's bug) left the
    inline round unfinished: the peer never ran another round and its exit waited out its
    whole shutdown bound. Now that round fails, as a failed statement does."""
    original = _memory._MemorySessionConnection.elect
    armed = [False]

    async def elect(
        self: _memory._MemorySessionConnection,
        table: LeaseTable,
        requests: Sequence[ElectRequest],
        *,
        statement_timeout: float,
    ) -> list[object]:
        out: list[object] = list(
            await original(self, table, requests, statement_timeout=statement_timeout)
        )
        if armed[0]:
            armed[0] = False
            first = out[0]
            assert isinstance(first, ElectionOutcome)
            out[0] = (
                "garbage"
                if bad == "not an outcome"
                else ElectionOutcome(term=first.term, lease_remaining=0.0)
            )
        return out

    monkeypatch.setattr(_memory._MemorySessionConnection, "elect", elect)
    backend = MemoryBackend()
    async with _session_peer(backend) as peer:
        await peer.wait_leader()
        failed = peer.statistics().elections_failed
        armed[0] = True
        await wait_for(lambda: not armed[0], limit=3 * INTERVAL, poll=0.01)
        assert peer.statistics().elections_failed == failed + 1
        runs = peer.statistics().elections_run
        with trio.fail_after(3 * INTERVAL):
            await peer.wait_leader()
        await wait_for(
            lambda: peer.statistics().elections_run >= runs + 3, limit=3 * INTERVAL, poll=0.01
        )
        exiting = trio.current_time()
    assert trio.current_time() - exiting < 0.1


@pytest.mark.parametrize("form", ["session", "open_peers", "open_peer"])
async def test_a_stop_that_overruns_still_ends_every_leadership_channel(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Regression: when the exit overran its bound (here: a release that hangs, ignoring
    its timeout), the peer's leadership channels never ended: an ``async for`` over
    ``peer.leadership()`` outlived the peer."""

    async def hung_release(self: Peer, term: int) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio_peers._peer.Peer, "_release", hung_release)
    backend = MemoryBackend()
    seen: list[bool] = []
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        async with one_name(backend, form) as peer:
            await peer.wait_leader()

            async def read() -> None:
                async for change in peer.leadership():
                    seen.append(change.is_leader)
                ended.set()

            nursery.start_soon(read)
            await trio.sleep(0.1)
        with trio.fail_after(1):
            await ended.wait()
    assert seen[0] and seen[-1] is False


async def _two_sessions(
    backend: MemoryBackend, names: list[str], nursery: trio.Nursery
) -> tuple[dict[str, Peer], dict[str, Peer], trio.Event, trio.Event]:
    """Session a leads ``names``, session b follows; set the first event to make a leave
    (through open_peers' exit); the second is set once a has left."""
    leave, left = trio.Event(), trio.Event()
    ready: list[dict[str, Peer]] = []

    async def run(node: str, *, task_status: trio.TaskStatus[dict[str, Peer]]) -> None:
        async with open_session("memory://", backend=backend, node=node) as session:
            async with session.open_peers(names, interval=INTERVAL) as peers:
                task_status.started(peers)
                if node == "a":
                    await leave.wait()
                else:
                    await trio.sleep_forever()
        left.set()

    ready.append(await nursery.start(run, "a"))
    ready.append(await nursery.start(run, "b"))
    return ready[0], ready[1], leave, left


async def test_many_names_leaving_at_once_never_release_a_name_whose_work_still_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """open_peers' exit releases every idle leader in one statement before the peers stop;
    a name whose leader-only work is still winding down is not among them: it is released
    by its own stop once the work has ended, so its leadership never overlaps."""
    backend = MemoryBackend()
    names = [f"n{i}" for i in range(20)]
    work_ended = trio.Event()
    ended_at: list[float] = []

    async def slow_to_stop() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)  # winds down for half a second
            ended_at.append(trio.current_time())
            work_ended.set()

    async with trio.open_nursery() as nursery:
        a, b, leave, left = await _two_sessions(backend, names, nursery)
        nursery.start_soon(a["n3"].run_while_leader, slow_to_stop)
        await trio.testing.wait_all_tasks_blocked()
        leaving = trio.current_time()
        leave.set()
        others = [peer for name, peer in b.items() if name != "n3"]
        await wait_for(lambda: all(p.is_leader for p in others), limit=0.1, poll=0.001)
        assert not b["n3"].is_leader  # its work still runs in a
        await b["n3"].wait_leader()
        assert ended_at and trio.current_time() >= ended_at[0] >= leaving + 0.5
        await left.wait()
        nursery.cancel_scope.cancel()


async def test_many_names_leaving_at_once_retry_a_locked_row_until_it_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A row locked by another transaction comes back busy from the one release statement
    of open_peers' exit; it is retried (as a single release is) and released once free."""
    backend = MemoryBackend()
    names = [f"n{i}" for i in range(20)]
    async with trio.open_nursery() as nursery:
        _, b, leave, left = await _two_sessions(backend, names, nursery)
        await trio.testing.wait_all_tasks_blocked()
        backend.lock_row("n7")
        leave.set()
        others = [peer for name, peer in b.items() if name != "n7"]
        await wait_for(lambda: all(p.is_leader for p in others), limit=0.1, poll=0.001)
        row = backend.leader("n7")
        assert row is not None and row.node == "a"  # not released while locked
        await trio.sleep(0.2)
        backend.unlock_row("n7")
        unlocked = trio.current_time()
        await left.wait()
        assert trio.current_time() - unlocked < 0.2  # retried promptly, then left
        row = backend.leader("n7")
        assert row is None or row.node == "b"
        await b["n7"].wait_leader()
        nursery.cancel_scope.cancel()


async def test_many_names_leaving_during_a_batch_in_flight_release_every_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """open_peers' exit while a batch of renewals is in flight: the names of that batch are
    released as soon as it has ended (a second statement), the others at once; none is
    left to lapse."""
    backend = MemoryBackend()
    names = [f"n{i}" for i in range(20)]
    async with trio.open_nursery() as nursery:
        a, b, leave, left = await _two_sessions(backend, names, nursery)
        backend.statement_delay = 0.02
        await wait_for(
            lambda: any(peer._core.round_started_at is not None for peer in a.values()),
            limit=3 * INTERVAL,
            poll=0.001,
        )
        in_flight = {n for n, peer in a.items() if peer._core.round_started_at is not None}
        assert in_flight
        leave.set()
        await wait_for(lambda: all(p.is_leader for p in b.values()), limit=0.3, poll=0.001)
        await left.wait()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("form", ["session", "open_peers", "open_peer"])
async def test_a_peer_that_fails_after_entry_raises_its_error_not_a_cancellation(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Regression: when a peer's own task failed after entry (a bug of ours or a backend's),
    the failure cancelled the ``async with`` body, and the block re-raised the body's
    exception: that ``Cancelled``, out of a scope that nobody had cancelled. Now the
    failure itself comes out, and the peer has still released its lease."""

    async def broken_sleep(self: Peer) -> None:
        await trio.sleep(INTERVAL / 4)
        raise RuntimeError("loop bug")

    monkeypatch.setattr(trio_peers._peer.Peer, "_sleep_until_next_round", broken_sleep)
    backend = MemoryBackend()
    raised: BaseException | None = None
    with trio.fail_after(60):
        try:
            async with one_name(backend, form) as peer:
                assert peer.is_leader
                await trio.sleep_forever()
        except BaseException as exc:  # (a Cancelled too: pytest.raises would let it by)
            raised = exc
    assert isinstance(raised, RuntimeError) and str(raised) == "loop bug", repr(raised)
    assert backend.leader("x") is None


@pytest.mark.parametrize("in_flight", ["round", "get_leader"])
@pytest.mark.parametrize("form", ["session", "open_peers", "open_peer"])
async def test_a_resign_queued_behind_a_statement_is_still_released_by_an_exit(
    autojump_clock: trio.testing.MockClock, form: str, in_flight: str
) -> None:
    """Regression: resign() while a statement held the peer's connection (its round, or a
    get_leader()), then the block exits. The resign's release, queued for the connection,
    took the term and then saw the peer closing and skipped it, and the stop found nothing
    left to release: the lease stayed live for a whole interval, although resign() says
    its release still completes and the exit promises to release."""
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        async with one_name(backend, form) as peer:
            await peer.wait_leader()
            backend.statement_delay = 0.05
            if in_flight == "get_leader":
                nursery.start_soon(peer.get_leader)
            # (Virtual time) until the statement holds the connection.
            await wait_for(lambda: peer._conn_lock.value == 0, limit=3 * INTERVAL, poll=0.001)
            with trio.move_on_after(0.001):  # the caller gives up waiting for the release
                await peer.resign()
            assert not peer.is_leader
        assert backend.leader("x") is None  # released by the time the block has exited
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["cancelled", "open_peers_with_a_name_already_open"])
async def test_an_entry_that_never_ran_leaves_no_name_behind(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """Regression: a name registers with its session at the call, and left it only when its
    main task had entered it. An entry cancelled before that (a cancelled scope; or
    open_peers, whose other names are cancelled when one cannot enter) left the name in the
    session: it could not be opened again ("already open"), it showed in the session's
    peers and statistics, and the session's exit waited out a whole stop bound for it."""
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as session:
        if how == "cancelled":
            with trio.CancelScope() as scope:
                scope.cancel()
                async with session.open_peer(name="x", interval=INTERVAL):
                    pytest.fail("entered under a cancelled scope")
        else:
            async with session.open_peer(name="b", interval=INTERVAL):
                with pytest.raises(ValueError, match="already open"):
                    async with session.open_peers(["x", "b"], interval=INTERVAL):
                        pytest.fail("entered with a name already open")
        assert session.statistics().names == 0
        assert not session.peers
        async with session.open_peer(name="x", interval=INTERVAL) as again:
            await again.wait_leader()
        exit_started = trio.current_time()
    assert trio.current_time() - exit_started < 1.0


class _Sessions:
    """MemoryBackend's sessions, each connection made by ``connect(inner_connector,
    **callbacks)``: a test's wrapper around the connect, the connection, or both. Every
    connection made is recorded, in order."""

    def __init__(self, connect: Callable[..., Awaitable[object]]) -> None:
        self.backend = MemoryBackend()
        self.connections: list[object] = []
        self._connect = connect

    @asynccontextmanager
    async def _open(self, settings: object) -> AsyncIterator[object]:
        async with self.backend.open_session(settings) as connector:  # type: ignore[arg-type]
            yield _SessionsConnector(connector, self)

    def open_session(self, settings: object) -> AbstractAsyncContextManager[object]:
        return self._open(settings)


class _SessionsConnector:
    def __init__(self, inner: object, owner: _Sessions) -> None:
        self._inner = inner
        self._owner = owner

    async def connect(self, **callbacks: object) -> object:
        conn = await self._owner._connect(self._inner, **callbacks)
        self._owner.connections.append(conn)
        return conn


def _hanging_prepare() -> _Sessions:
    """Sessions whose second connection never answers the preparation of a table (a
    LISTEN whose reply the network lost: asyncpg's has no timeout)."""

    async def connect(inner: Any, **callbacks: object) -> object:
        conn = await inner.connect(**callbacks)
        return _HangingConnection(conn, hang=len(sessions.connections) == 1)

    sessions = _Sessions(connect)
    return sessions


class _Wrapped:
    """A session connection that passes everything it does not define to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _HangingConnection(_Wrapped):
    def __init__(self, inner: object, *, hang: bool) -> None:
        super().__init__(inner)
        self._hang = hang

    async def prepare(self, table: LeaseTable, *, statement_timeout: float) -> bool:
        if self._hang:
            await trio.sleep_forever()
        prepared: bool = await self._inner.prepare(table, statement_timeout=statement_timeout)
        return prepared


async def test_a_table_preparation_that_never_answers_costs_one_connection_not_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: preparing a table (its check, statements and LISTEN) after a reconnect
    ran outside the statement bound, so one that never answered held the session's batcher
    for good: every name of the session stayed follower until the kernel gave up on the
    connection, minutes later. It is now bounded: the connection is dropped and replaced."""
    backend = _hanging_prepare()
    async with (
        open_session("memory://", backend=backend, node="a") as session,  # type: ignore[arg-type]
        session.open_peer(name="x", interval=INTERVAL) as peer,
    ):
        await peer.wait_leader()
        backend.backend.kill_connections()  # a server restart: the session reconnects
        with trio.fail_after(5 * INTERVAL):
            await wait_for(
                lambda: len(backend.connections) >= 3 and peer.is_leader, limit=5 * INTERVAL
            )


_CTRL_C_DURING_RELEASES = """
import os, signal, sys, threading
import trio
from trio_peers import open_session
from trio_peers.testing import MemoryBackend

# A process started in the background inherits SIGINT ignored (CI's may be): Python then
# never raises KeyboardInterrupt. Restore the default, as an interactive program has it.
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main(form):
    backend = MemoryBackend()
    async with trio.open_nursery() as outer:
        async with open_session("memory://", backend=backend, node="a") as session:
            if form == "open_peers":
                async with session.open_peers(["x", "y"], interval=2.0) as peers:
                    await peers["x"].wait_leader()
                    backend.statement_delay = 0.5  # the exit's release statement
                    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            else:
                # A name opened by a task outside the session's block: the session's exit
                # releases it.
                async def hold(*, task_status):
                    async with session.open_peer(name="x", interval=2.0) as peer:
                        await peer.wait_leader()
                        task_status.started()
                        await trio.sleep_forever()

                await outer.start(hold)
                backend.statement_delay = 0.5
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        outer.cancel_scope.cancel()

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("form", ["open_peers", "session"])
def test_a_ctrl_c_while_a_session_releases_its_names_still_ends_the_process(form: str) -> None:
    """Regression: a KeyboardInterrupt reaches the main task even in a shielded scope. One
    that came while a session's exit released its names (open_peers' block, or the session's
    own exit with a name still open) skipped what came after it in the same finally:
    stopping the peers, ending the session's task. Both are shielded, so the block never
    returned, and each further Ctrl-C only joined the nursery's errors: only SIGKILL ended
    the process. (A real SIGINT, in a process of its own.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_RELEASES, form],
        capture_output=True,
        text=True,
        timeout=30,  # without the fix: a hang, and TimeoutExpired
        check=False,
        env=cli_env(),
    )
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in proc.stderr, proc.stderr[-2000:]


async def test_a_second_request_of_one_name_in_a_batch_waits_for_the_next_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a batch runs one request per name (PostgreSQL cannot update a row twice
    in one statement) and puts a later one of the same name back in the queue for the next
    batch. The batch's own cleanup then failed that request as unanswered ("the session is
    closed"), although it was queued, and its statement still ran in the next batch. (No
    public path sends two at once, a peer runs one statement at a time; this holds the
    session to its contract.)"""
    backend = MemoryBackend()
    async with (
        open_session("memory://", backend=backend, node="a") as session,
        session.open_peer(name="x", interval=INTERVAL) as peer,
    ):
        await peer.wait_leader()
        (member,) = session._members.values()
        results: list[object] = []

        async def read() -> None:
            try:
                results.append(await member.get_leader(statement_timeout=0.5))
            except Exception as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(read)
        assert [getattr(r, "node", r) for r in results] == ["a", "a"]


async def test_a_name_cannot_join_a_session_whose_exit_has_begun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the session's exit stops the names open when it begins; a name opened
    meanwhile (from a task outside the session's block) was accepted, never stopped by it,
    and a lease it won then was left to lapse. Joining is refused once the exit has begun."""
    backend = MemoryBackend()
    leaving = trio.Event()
    refused: list[BaseException] = []

    async def hold(session: PeerSession, *, task_status: trio.TaskStatus[None]) -> None:
        async with session.open_peer(name="held", interval=INTERVAL) as peer:
            await peer.wait_leader()
            task_status.started()
            await trio.sleep_forever()

    async def join_late(session: PeerSession) -> None:
        await leaving.wait()
        await trio.sleep(0.01)  # the exit is releasing "held" (its statement takes 50 ms)
        try:
            async with session.open_peer(name="late", interval=INTERVAL):
                pass
        except trio.ClosedResourceError as exc:
            refused.append(exc)

    async with trio.open_nursery() as outer:
        async with open_session("memory://", backend=backend, node="a") as session:
            await outer.start(hold, session)
            outer.start_soon(join_late, session)
            backend.statement_delay = 0.05
            leaving.set()
        outer.cancel_scope.cancel()
    assert refused, "a name joined a session that was already stopping its names"
    assert backend.leader("late") is None


def _slow_connect() -> _Sessions:
    """Sessions whose connect takes 0.1 s and finishes even when cancelled (as a driver's
    connect can, racing the cancellation), each connection recording whether it was
    closed."""

    async def connect(inner: Any, **callbacks: object) -> object:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.1)
            return _Recorded(await inner.connect(**callbacks))

    return _Sessions(connect)


class _Recorded(_Wrapped):
    def __init__(self, inner: object) -> None:
        super().__init__(inner)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        await self._inner.aclose()

    def abort(self) -> None:
        self.closed = True
        self._inner.abort()


async def test_a_connection_that_opens_while_the_session_closes_is_closed_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a session that ended while its connection was being opened closed no
    connection (it had none yet); the connect then finished, and that connection stayed
    open, with nobody left to close it."""
    backend = _slow_connect()
    async with open_session("memory://", backend=backend, node="a") as session:  # type: ignore[arg-type]
        with trio.move_on_after(0.05):  # the first round's connect is in flight
            async with session.open_peer(name="x", interval=INTERVAL):
                pass
    assert backend.connections, "the connect never finished"
    assert all(isinstance(c, _Recorded) and c.closed for c in backend.connections)


class _CancelAfterElect(_Wrapped):
    """A session connection whose elect cancels ``scope`` as its reply comes back (the
    caller's timeout firing at that moment)."""

    def __init__(self, inner: Any, scope: trio.CancelScope) -> None:
        super().__init__(inner)
        self._scope = scope

    async def elect(self, *args: Any, **kwargs: Any) -> object:
        outcome = await self._inner.elect(*args, **kwargs)
        self._scope.cancel()
        return outcome


async def test_a_cancellation_as_the_entry_round_returns_leaves_no_hidden_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the caller's scope cancelled while the entry round's reply was on its
    way. The peer's task shielded itself before it reported that it had entered, and
    ``started()`` does nothing once the starting nursery is cancelled: the entry never
    returned (whatever the cancellation), and the peer, hidden, renewed the lease for as
    long as the process lived. Now the entry ends cancelled and the won lease is released.
    (Without the fix this test hangs until pytest's timeout.)"""
    scope = trio.CancelScope()

    async def connect(inner: Any, **callbacks: object) -> object:
        return _CancelAfterElect(await inner.connect(**callbacks), scope)

    backend = _Sessions(connect)
    config = PeerConfig(dsn="memory://", name="x", node="a", interval=INTERVAL)
    with scope:
        async with open_peer(config, backend=backend):  # type: ignore[arg-type]
            pytest.fail("entered although the caller was cancelled")
    assert scope.cancelled_caught
    assert backend.backend.leader("x") is None
    statements = backend.backend.statements
    await trio.sleep(3 * INTERVAL)
    assert backend.backend.statements == statements  # no peer left running


@pytest.mark.parametrize("form", ["session", "open_peers", "open_peer"])
async def test_an_exit_after_an_unreleased_resign_and_a_new_tenure_releases_the_new_lease(
    autojump_clock: trio.testing.MockClock, form: str
) -> None:
    """Regression: resign() whose leader-only work overran the cleanup timeout skips the
    release (the work might still write); the work ended, the peer won a newer term, and
    then the block exited. The exit released the old, resigned term (still pending), which
    no longer matched the row: the new lease stayed live for a whole interval."""
    backend = MemoryBackend()
    async with one_name(backend, form) as peer:
        first = await peer.wait_leader()

        async def work() -> None:
            async with peer.leader_scope():
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):  # a cleanup that overruns
                        await trio.sleep(peer.config.cleanup_timeout + 1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            await wait_for(lambda: bool(peer._work.scopes), limit=1.0, poll=0.001)
            assert not await peer.resign()  # skipped: the work still ran
        second = await peer.wait_leader()
        assert second != first
    assert backend.leader("x") is None  # the new lease was released


async def test_an_open_peer_made_but_never_entered_holds_no_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: session.open_peer() registered the name when called, not when entered.
    A manager made and never entered (an exit stack whose earlier entry failed) kept the
    name: opening it again was refused ("already open"), and the session's exit waited a
    whole stop bound for a peer that never ran."""
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a", cleanup_timeout=1.0) as s:
        unentered = s.open_peer(name="x", interval=INTERVAL)
        assert s.statistics().names == 0
        async with s.open_peer(name="x", interval=INTERVAL) as peer:
            await peer.wait_leader()
            with pytest.raises(ValueError, match="already open"):
                async with unentered:  # entered now: the name is taken
                    pytest.fail("entered a name that is open")
            with pytest.raises(ValueError, match="already open"):
                s.open_peer(name="x", interval=INTERVAL)  # refused at the call
        exit_started = trio.current_time()
    assert trio.current_time() - exit_started < 0.5
    assert backend.leader("x") is None


async def test_an_open_peer_block_cannot_be_entered_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with open_session("memory://", backend=backend, node="a") as s:
        block = s.open_peer(name="x", interval=INTERVAL)
        async with block as peer:
            await peer.wait_leader()
        with pytest.raises(RuntimeError, match="entered already"):
            async with block:
                pytest.fail("entered twice")
