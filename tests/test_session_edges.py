"""Edge paths of peers in sessions: races with the session's inline rounds, and exits that
go wrong (found by reviewing the inline rounds; each test failed before its fix)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

import trio_peers._peer
from trio_peers import Peer, PeerConfig, open_peer, open_session
from trio_peers._backend import ElectRequest, LeaseTable
from trio_peers._core import ElectionOutcome
from trio_peers.testing import MemoryBackend, _memory

from ._pgutil import wait_for

INTERVAL = 2.0


def one_name(backend: MemoryBackend, form: str) -> AbstractAsyncContextManager[Peer]:
    if form == "open_peer":
        config = PeerConfig(dsn="memory://", name="x", node="a", interval=INTERVAL)
        return open_peer(config, backend=backend)
    return _session_peer(backend)


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


@pytest.mark.parametrize("form", ["session", "open_peer"])
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

    async def broken_close(self: Peer) -> None:
        await trio.lowlevel.checkpoint()
        raise error("cleanup failed")

    monkeypatch.setattr(trio_peers._peer.Peer, "_close_connection", broken_close)
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


@pytest.mark.parametrize("form", ["session", "open_peer"])
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
