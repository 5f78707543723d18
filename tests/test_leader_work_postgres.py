"""Leader-only work against a real PostgreSQL: exactly one runner, cancelled in time.

Start and stop times are ``time.monotonic()`` (system-wide CLOCK_MONOTONIC), so
records from other OS processes compare with this one's.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from trio_peers import current_term, open_peer
from trio_peers.testing import PostgresServer

from ._pgutil import open_sql, peer_config, run_peer, wait_for

INTERVAL = 1.0
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


cfg = peer_config


class WorkLog:
    """(node, term, start, end) of each run of leader-only work, on time.monotonic()."""

    def __init__(self) -> None:
        self.runs: list[list[object]] = []

    def work_for(self, node: str):  # type: ignore[no-untyped-def]
        async def work() -> None:
            run: list[object] = [node, current_term(), time.monotonic(), None]
            self.runs.append(run)
            try:
                await trio.sleep_forever()
            finally:
                run[3] = time.monotonic()

        return work

    def assert_no_overlap(self) -> None:
        runs = sorted(self.runs, key=lambda r: r[2])  # type: ignore[arg-type,return-value]
        for before, after in itertools.pairwise(runs):
            assert before[3] is not None and before[3] <= after[2], (before, after)  # type: ignore[operator]
            assert after[1] > before[1] or after[0] == before[0], (before, after)  # type: ignore[operator]


async def test_work_runs_on_exactly_one_peer_through_faults(dsn: str, pg: PostgresServer) -> None:
    log = WorkLog()
    async with open_sql(dsn) as locker, trio.open_nursery() as nursery:
        peers = {}
        for node in ("a", "b", "c"):
            peer, stop = await nursery.start(run_peer, cfg(dsn, node))
            nursery.start_soon(peer.run_while_leader, log.work_for(node))
            peers[node] = (peer, stop)

        def running() -> list[list[object]]:
            return [r for r in log.runs if r[3] is None]

        await wait_for(lambda: len(running()) == 1)
        # 1. the leader cannot renew (the row is locked: its rounds are busy), so its trust
        #    ends at its deadline; then its lease expires: work moves to another peer.
        await locker.execute("BEGIN")
        await locker.execute("SELECT * FROM public.trio_peers FOR UPDATE")
        await wait_for(lambda: not running(), limit=INTERVAL * 2)
        await locker.execute("UPDATE public.trio_peers SET expires_at = now()")
        await locker.execute("COMMIT")
        await wait_for(lambda: len(log.runs) == 2 and len(running()) == 1, limit=INTERVAL * 3)
        # 2. the leader's connection is killed.
        await trio.to_thread.run_sync(lambda: pg.terminate_backends(application_name="trio-peers"))
        await wait_for(lambda: len(log.runs) >= 3 and len(running()) == 1, limit=INTERVAL * 4)
        # 3. the leader leaves gracefully.
        leader = next(node for node, (p, _) in peers.items() if p.is_leader)
        peers[leader][1].set()
        await wait_for(lambda: len(log.runs) >= 4 and len(running()) == 1, limit=INTERVAL * 3)
        nursery.cancel_scope.cancel()
    log.assert_no_overlap()


async def test_graceful_exit_cancels_and_awaits_work_then_releases(dsn: str) -> None:
    notified: list[float] = []
    stopped: list[float] = []

    async def work() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.2)  # slow cleanup: the release must wait for it
            stopped.append(time.monotonic())

    async with open_sql(dsn) as sql:
        await sql.aio(sql.conn.add_listener)(
            "public.trio_peers", lambda *_: notified.append(time.monotonic())
        )
        async with trio.open_nursery() as nursery:
            async with open_peer(cfg(dsn, "a")) as a:
                nursery.start_soon(a.run_while_leader, work)
                await a.wait_leader()
                await trio.sleep(0.05)
        await wait_for(lambda: bool(notified))
        assert stopped and stopped[0] <= notified[0]
        assert (await sql.row())["live"] is False


async def test_work_exception_propagates_and_another_node_takes_over(dsn: str) -> None:
    async def failing() -> None:
        await trio.sleep(0.05)
        raise ValueError("job failed")

    async with trio.open_nursery() as nursery:
        b, stop_b = await nursery.start(run_peer, cfg(dsn, "b", interval=30.0))
        async with open_peer(cfg(dsn, "a", interval=30.0)) as a:
            assert not a.is_leader
            await b.resign()
            await a.wait_leader()
            with pytest.raises(ValueError, match="job failed"):
                await a.run_while_leader(failing)
            assert not a.is_leader
            with trio.fail_after(2):  # by NOTIFY, not after 30 s
                await b.wait_leader()
        stop_b.set()


def _process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (``T``: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def _spawn_worker(dsn: str, node: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests._leader_worker", dsn, node, str(INTERVAL)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


async def _read_events(
    proc: subprocess.Popen[str],
    out: list[dict[str, object]],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    assert proc.stdout is not None
    task_status.started()
    while True:
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        if not line:
            return
        out.append(json.loads(line))


async def test_paused_process_runs_no_further_step_of_leader_work(dsn: str) -> None:
    """SIGSTOP the leader past its trust deadline: when it resumes, its work is
    cancelled before it runs again, and another process's work started meanwhile."""
    events: list[dict[str, object]] = []
    proc = _spawn_worker(dsn, "paused")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_read_events, proc, events)
            await wait_for(lambda: any(e["event"] == "step" for e in events), limit=20)
            os.kill(proc.pid, signal.SIGSTOP)
            # The stop takes effect a little after kill() returns (a loaded host may run
            # the worker a few more steps): the pause starts when it shows as stopped.
            await wait_for(lambda: _process_state(proc.pid) == "T", limit=5, poll=0.0005)
            paused_at = time.monotonic()
            b_started: list[tuple[int, float]] = []

            async def work() -> None:
                b_started.append((current_term(), time.monotonic()))
                await trio.sleep_forever()

            async with open_peer(cfg(dsn, "b")) as b:
                nursery.start_soon(b.run_while_leader, work)
                await wait_for(lambda: bool(b_started), limit=INTERVAL * 4)
                await trio.sleep(0.2)
                os.kill(proc.pid, signal.SIGCONT)
                cont_at = time.monotonic()
                await wait_for(lambda: any(e["event"] == "stop" for e in events), limit=10)
                assert b.is_leader
                proc.send_signal(signal.SIGTERM)
                await wait_for(lambda: any(e["event"] == "exit" for e in events), limit=10)
            nursery.cancel_scope.cancel()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    steps = [e for e in events if e["event"] == "step"]
    a_term = steps[0]["term"]
    b_term, b_start = b_started[0]
    assert b_term > a_term  # type: ignore[operator]
    # Every step of the paused process's work happened before the pause...
    late = [e["t"] - paused_at for e in steps if e["t"] >= paused_at]  # type: ignore[operator]
    assert not late, f"steps {late} s after the pause (SIGCONT came after {cont_at - paused_at} s)"
    # ...so none ran while (or after) the other process's work ran.
    assert max(e["t"] for e in steps) < b_start  # type: ignore[type-var]
    stop = next(e for e in events if e["event"] == "stop")
    assert stop["t"] > b_start  # the cancellation was delivered only on resume  # type: ignore[operator]
