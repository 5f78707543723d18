"""Tests of the replication harness (trio_peers.testing._replication) on real server pairs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from trio_peers.testing import PostgresServer, _postgres
from trio_peers.testing._postgres import PostgresServerError, _children_of, _process_state
from trio_peers.testing._replication import (
    BlackHole,
    ReplicatedPair,
    system_identifier,
    timeline,
    wait_until,
)

from ._pgutil import start_pair

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    """A pair shared by the tests that leave it as they found it (no promotion)."""
    with start_pair() as shared:
        yield shared


def run_async(coro_fn: object) -> object:
    """Run an asyncio coroutine function on a private loop in a helper thread."""
    return _postgres._run_coroutine(coro_fn)  # type: ignore[arg-type]


def rows(server: PostgresServer, table: str = "t") -> list[object]:
    return [row[0] for row in server.execute(f"SELECT a FROM {table} ORDER BY a")]


# ---------------------------------------------------------------- a streaming pair


def test_write_on_primary_appears_on_standby(pair: ReplicatedPair) -> None:
    primary, standby = pair.primary, pair.standby
    print(f"\n{pair!r}, PostgreSQL {primary.version} from {primary.bindir}")
    primary.execute("CREATE TABLE appears (a int)")
    primary.execute("INSERT INTO appears VALUES (1), (2)")
    pair.wait_replayed()
    assert rows(standby, "appears") == [1, 2]
    assert standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        standby.execute("INSERT INTO appears VALUES (3)")


def test_same_system_identifier_and_timeline_one(pair: ReplicatedPair) -> None:
    assert system_identifier(pair.primary) == system_identifier(pair.standby)
    assert timeline(pair.primary) == 1
    with pytest.raises(PostgresServerError, match="in recovery"):
        timeline(pair.standby)
    # The harness copies one template per process: its servers all share one system
    # identifier, unless a server runs initdb of its own.
    with PostgresServer.start() as copy, PostgresServer.start(own_system=True) as other:
        assert system_identifier(copy) == system_identifier(pair.primary)
        assert system_identifier(other) != system_identifier(pair.primary)


def test_synchronous_switch(pair: ReplicatedPair) -> None:
    query = "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1"
    assert pair.primary.execute(query, pair.name) == [("async",)]
    pair.set_synchronous(True)
    try:
        assert pair.synchronous
        assert pair.primary.execute(query, pair.name) == [("sync",)]
        assert "synchronous" in repr(pair)
    finally:
        pair.set_synchronous(False)
    assert pair.primary.execute(query, pair.name) == [("async",)]


def test_cut_and_resume(pair: ReplicatedPair) -> None:
    primary, standby = pair.primary, pair.standby
    primary.execute("CREATE TABLE cut (a int)")
    pair.wait_replayed()
    pair.cut()
    try:
        primary.execute("INSERT INTO cut VALUES (1)")
        assert primary.execute("SELECT count(*) FROM pg_stat_replication") == [(0,)]
        # Nothing streams: the standby's WAL receiver is gone.
        assert standby.execute("SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)]
        assert rows(standby, "cut") == []
    finally:
        pair.resume()
    pair.wait_replayed()
    assert rows(standby, "cut") == [1]


# ---------------------------------------------------------------- failover


def test_promotion_after_cut_loses_commits_then_old_primary_restarts() -> None:
    with start_pair() as pair:
        primary, standby = pair.primary, pair.standby
        primary.execute("CREATE TABLE t (a int)")
        primary.execute("INSERT INTO t VALUES (1)")
        pair.wait_replayed()
        pair.cut()
        # Committed on the primary (the commit returned), but never streamed.
        assert primary.execute("INSERT INTO t VALUES (2) RETURNING a") == [(2,)]
        primary.freeze()
        elapsed = pair.promote()
        print(f"\npromotion took {elapsed * 1000:.0f} ms")
        assert standby.execute("SELECT pg_is_in_recovery()") == [(False,)]
        assert timeline(standby) == 2
        assert rows(standby) == [1]  # the last commit is lost
        standby.execute("INSERT INTO t VALUES (3)")

        # The old primary comes back as a second writable server of the same system, on the
        # old timeline, with the lost commit.
        pair.restart_old_primary()
        assert not primary.is_frozen
        assert timeline(primary) == 1
        assert system_identifier(primary) == system_identifier(standby)
        assert primary.execute("INSERT INTO t VALUES (4) RETURNING a") == [(4,)]
        assert rows(primary) == [1, 2, 4]
        assert rows(standby) == [1, 3]


def test_synchronous_replication_keeps_commits() -> None:
    with start_pair(synchronous=True) as pair:
        primary, standby = pair.primary, pair.standby
        primary.execute("CREATE TABLE t (a int)")
        primary.execute("INSERT INTO t VALUES (1)")
        # No wait_replayed(): a synchronous commit returns once the standby has the WAL.

        # With the standby cut off, a commit waits instead of returning.
        pair.cut()
        done = threading.Event()
        failure: list[BaseException] = []

        def insert() -> None:
            try:
                primary.execute("INSERT INTO t VALUES (2)")
            except BaseException as exc:  # pragma: no cover - reported below
                failure.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=insert, daemon=True)
        thread.start()
        assert not done.wait(0.5), "a synchronous commit returned without the standby"
        pair.resume()
        assert done.wait(30)
        thread.join()
        assert not failure

        primary.stop("immediate")
        pair.promote()
        assert timeline(standby) == 2
        assert rows(standby) == [1, 2]


# ---------------------------------------------------------------- frozen and black-holed


def test_frozen_server_holds_connections_without_answering() -> None:
    with PostgresServer.start() as srv:

        async def check_frozen() -> None:
            conn = await asyncpg.connect(srv.dsn, timeout=10)
            idle = await asyncpg.connect(srv.dsn, timeout=10)
            try:
                srv.freeze()
                assert srv.is_frozen
                pid = srv.pid
                assert pid is not None
                assert all(_process_state(p) in "TZ" for p in [pid, *_children_of(pid)])
                # The kernel still completes the TCP handshake...
                socket.create_connection((srv.host, srv.port), timeout=2).close()
                # ... but no one answers, neither a new connection nor an open one.
                t0 = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncpg.connect(srv.dsn, timeout=0.3)
                assert time.monotonic() - t0 >= 0.3
                with pytest.raises(TimeoutError):
                    await conn.fetchval("SELECT 1", timeout=0.3)
                assert not conn.is_closed()
            finally:
                srv.thaw()
                # The timed-out query's cancel request waits in the frozen postmaster's
                # backlog: once thawed it may hit any later query on that connection.
                conn.terminate()
            assert not srv.is_frozen
            # Thawed, an open connection answers again.
            assert await idle.fetchval("SELECT 2", timeout=10) == 2
            await idle.close()

        run_async(check_frozen)
        assert srv.execute("SELECT 1") == [(1,)]


def test_close_and_stop_thaw_a_frozen_server() -> None:
    srv = PostgresServer.start()
    with srv:
        srv.freeze()
        srv.freeze()  # idempotent
        srv.stop("fast")  # a frozen postmaster handles no signal: stop thaws it first
        assert not srv.is_running
        with pytest.raises(PostgresServerError, match="not running"):
            srv.freeze()
        srv.start_again()
        pid = srv.pid
        assert pid is not None
        children = _children_of(pid)
        srv.freeze()
    assert not any(_process_state(p) != "Z" for p in [pid, *children])
    assert not srv.data_dir.exists()


def test_crash_of_a_frozen_server_runs_nothing_it_was_sent() -> None:
    with PostgresServer.start() as srv:
        srv.execute("CREATE TABLE sent (a int)")
        # The harness commits asynchronously (synchronous_commit=off): without a checkpoint,
        # a crash could lose the table as well.
        srv.execute("CHECKPOINT")

        async def send_while_frozen() -> None:
            conn = await asyncpg.connect(srv.dsn, timeout=10)
            try:
                srv.freeze()
                # The INSERT reaches the frozen backend's socket and waits there.
                with pytest.raises(TimeoutError):
                    await conn.execute("INSERT INTO sent VALUES (1)", timeout=0.3)
            finally:
                conn.terminate()

        run_async(send_while_frozen)
        pid = srv.pid
        assert pid is not None
        children = _children_of(pid)
        srv.crash()
        assert not srv.is_running
        assert not srv.is_frozen
        # SIGKILL is delivered at once, but a process shows as a zombie only once it has
        # finished dying: wait for that (bounded), rather than read the state at once.
        deadline = time.monotonic() + 5.0
        while not all(_process_state(p) == "Z" for p in [pid, *children]):
            assert time.monotonic() < deadline, {p: _process_state(p) for p in [pid, *children]}
            time.sleep(0.01)
        srv.crash()  # not running: nothing to do
        srv.start_again()
        assert rows(srv, "sent") == []
        assert "not properly shut down" in srv.log_path.read_text()


def test_black_hole_accepts_and_never_answers() -> None:
    with BlackHole() as hole:
        assert hole.host == "127.0.0.1"
        assert hole.dsn.endswith(f":{hole.port}/postgres")
        socket.create_connection((hole.host, hole.port), timeout=2).close()

        async def attempt() -> float:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncpg.connect(hole.dsn, timeout=0.3)
            return time.monotonic() - t0

        elapsed = run_async(attempt)
        assert isinstance(elapsed, float)
        assert 0.3 <= elapsed < 5
    with pytest.raises(OSError):
        socket.create_connection((hole.host, hole.port), timeout=2).close()


def test_black_hole_on_a_given_port() -> None:
    free = _postgres._free_port()
    with BlackHole(free) as hole:
        assert hole.port == free


def test_wait_until_names_the_condition() -> None:
    with pytest.raises(PostgresServerError, match="pigs fly"):
        wait_until(lambda: False, timeout=0.05, what="pigs fly")


FROZEN_CHILD = textwrap.dedent(
    """
    import time
    from trio_peers.testing import PostgresServer
    srv = PostgresServer.start()
    srv.freeze()
    print(srv.pid, srv.data_dir.parent, flush=True)
    time.sleep(600)
    """
)


def test_watchdog_cleans_up_a_frozen_server_after_sigkill() -> None:
    package_root = str(Path(_postgres.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": package_root}
    child = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        pid_text, root_text = child.stdout.readline().split()
        pid, root = int(pid_text), Path(root_text)
        children = _children_of(pid)
        assert _process_state(pid) == "T"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        everything = [pid, *children]
        wait_until(
            lambda: all(_process_state(p) == "Z" for p in everything) and not root.exists(),
            timeout=30,
            what="the watchdog stopped the frozen server and removed its directory",
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
