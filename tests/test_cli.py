"""Tests of the ``trio-peers`` command line against a real PostgreSQL server.

Most run the CLI in-process through ``main([...])`` (each call does its own ``trio.run``, so
these tests are sync); the smoke paths and ``watch`` also run it as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

import trio_peers
from trio_peers import PeerConfig, open_peer
from trio_peers._cli._common import (
    EXIT_MISCONFIGURED,
    EXIT_OK,
    EXIT_SCHEMA,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    LIBPQ_ENV,
    describe_dsn,
    resolve_dsn,
)
from trio_peers._cli._main import describe_change, main

REPO_ROOT = Path(trio_peers.__file__).resolve().parent.parent


def importable_env(env: dict[str, str]) -> dict[str, str]:
    """PYTHONPATH that lets a child ``python -m trio_peers`` import this trio_peers.

    Only needed when it runs from a source tree; an installed package (nox) is found anyway.
    """
    if REPO_ROOT.name in ("site-packages", "dist-packages"):
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)}


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: this trio_peers importable, no stray DSN variables."""
    env = {k: v for k, v in os.environ.items() if k not in LIBPQ_ENV and k != "TRIO_PEERS_DSN"}
    env.update(importable_env(env))
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_peers", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        check=False,
    )


@pytest.fixture
def no_dsn_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*LIBPQ_ENV, "TRIO_PEERS_DSN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dead_dsn() -> str:
    """A DSN whose port has nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def sql(pg_server: trio_peers.testing.PostgresServer, dsn: str, text: str) -> None:
    pg_server.execute(text, database=database_of(dsn))


@pytest.fixture
def migrated(pg_dsn: str, no_dsn_env: None) -> str:
    assert main(["migrate", "--dsn", pg_dsn]) == EXIT_OK
    return pg_dsn


@pytest.fixture
def nopriv_dsn(pg_server: trio_peers.testing.PostgresServer, pg_dsn: str) -> Iterator[str]:
    """The DSN of ``pg_dsn``'s database for a fresh role with no privileges at all."""
    role = f"nopriv_{uuid.uuid4().hex[:8]}"
    pg_server.execute(f'CREATE ROLE "{role}" LOGIN')
    parts = urlsplit(pg_dsn)
    yield parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
    pg_server.execute(f'DROP ROLE IF EXISTS "{role}"')


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------- parsing and help


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "migrate", "status", "watch", "TRIO_PEERS_DSN", "exit status"):
        assert word in out
    assert "_demo" not in out  # no hidden commands leak into the help


@pytest.mark.parametrize("command", ["demo", "migrate", "status", "watch"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"trio-peers {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["status", "--dsn", "postgresql://x/y", "--prefix", "bad-name"],
        ["migrate", "--dsn", "postgresql://x/y", "--table", "x" * 64],
        ["demo", "--peers", "1"],
        ["demo", "--interval", "0"],
        ["demo", "--duration", "nan"],
        ["watch", "--dsn", "postgresql://x/y", "--poll", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["migrate", "status", "watch"])
def test_no_database_given_is_a_usage_error(
    command: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command])
    assert exc.value.code == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert "no database given" in line
    assert "TRIO_PEERS_DSN" in line


def test_resolve_dsn_precedence() -> None:
    flag, env_dsn = "postgresql://flag/db", "postgresql://env/db"
    assert resolve_dsn(flag, {"TRIO_PEERS_DSN": env_dsn, "PGHOST": "h"}) == flag
    assert resolve_dsn(None, {"TRIO_PEERS_DSN": env_dsn, "PGHOST": "h"}) == env_dsn
    assert resolve_dsn(None, {"PGHOST": "h"}) == "postgresql://"
    assert resolve_dsn(None, {"PGDATABASE": "d"}) == "postgresql://"
    assert resolve_dsn(None, {"TRIO_PEERS_DSN": "  ", "PATH": "/bin"}) is None
    assert resolve_dsn(None, {}) is None


def test_describe_dsn_hides_the_password() -> None:
    assert describe_dsn("postgresql://u:secret@db.example:6432/app") == "db.example:6432/app"
    assert "secret" not in describe_dsn("postgresql://u:secret@[::1/x")


def test_describe_dsn_names_the_hosts_of_the_query_and_of_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: ``?host=`` was ignored (shown as localhost), a host list as unparsable."""
    for name in ("PGHOST", "PGPORT", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    assert describe_dsn("postgresql://u@/app?host=db9&port=6000") == "db9:6000/app"
    assert describe_dsn("postgresql://u:pw@a:1,b/app") == "a:1,b:5432/app"
    assert describe_dsn("postgresql:///app?host=a,b&port=7") == "a:7,b:7/app"
    assert describe_dsn("postgresql://u@[::1]:5433/app") == "[::1]:5433/app"


def test_describe_change() -> None:
    from trio_peers._cli._main import _Seen

    a1, a1_gone, b2 = _Seen("a", 1, True), _Seen("a", 1, False), _Seen("b", 2, True)
    assert describe_change("n", a1, a1) is None
    assert describe_change("n", None, a1) == "n: leader a, term 1"
    assert describe_change("n", a1, b2) == "n: leader b, term 2 (was a, term 1)"
    assert describe_change("n", a1, a1_gone) == "n: no leader (term 1 of a ended)"
    assert describe_change("n", a1_gone, b2) == "n: leader b, term 2 (after term 1 ended)"
    assert describe_change("n", None, a1_gone) == "n: no leader (last: a, term 1)"
    assert describe_change("n", a1, None) == "n: lease row removed"


def test_status_and_watch_name_a_failover_barrier() -> None:
    import datetime

    from trio_peers._cli._main import LeaseRow, _Seen, format_status_table

    barrier, gone = _Seen("", 2**32 + 1, True), _Seen("", 2**32 + 1, False)
    a1 = _Seen("a", 1, True)
    assert describe_change("n", a1, barrier) == "n: no leader: failover barrier, term 4294967297"
    assert describe_change("n", barrier, gone) == (
        "n: no leader (failover barrier of term 4294967297 ended)"
    )
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    row = LeaseRow("n", "", 2**32 + 1, at, at, True, 0.5)
    assert row.as_json()["leader"] is None and row.as_json()["barrier"] is True
    line = format_status_table([row])[1]
    assert "barrier" in line and "(failover barrier)" in line


# ---------------------------------------------------------------------- migrate


def test_migrate_creates_then_finds(
    pg_dsn: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--dsn", pg_dsn]) == EXIT_OK
    assert "created the lease table public.trio_peers" in capsys.readouterr().out
    assert main(["migrate", "--dsn", pg_dsn]) == EXIT_OK
    assert "already exists" in capsys.readouterr().out


def test_migrate_prefix_table_unlogged(
    pg_server: trio_peers.testing.PostgresServer,
    pg_dsn: str,
    no_dsn_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--dsn", pg_dsn, "--prefix", "app", "--table", "leases"]
    assert main(["migrate", *argv, "--unlogged"]) == EXIT_OK
    assert "created the lease table app.leases" in capsys.readouterr().out
    rows = pg_server.execute(
        "SELECT relpersistence::text FROM pg_class WHERE oid = 'app.leases'::regclass",
        database=database_of(pg_dsn),
    )
    assert rows == [("u",)]
    assert main(["status", *argv]) == EXIT_OK
    captured = capsys.readouterr()
    assert "no leader" in captured.out
    # status says what an UNLOGGED table costs, on stderr (stdout stays the table or JSON).
    assert "app.leases is UNLOGGED" in captured.err and "SET LOGGED" in captured.err
    assert main(["status", *argv, "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "UNLOGGED" in captured.err


def test_migrate_subprocess(pg_dsn: str) -> None:
    proc = run_cli("migrate", "--dsn", pg_dsn)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "created the lease table" in proc.stdout
    assert proc.stderr == ""


# ---------------------------------------------------------------------- status


def add_leases(pg_server: trio_peers.testing.PostgresServer, dsn: str) -> None:
    sql(
        pg_server,
        dsn,
        "INSERT INTO trio_peers (name, node, term, started_at, expires_at) VALUES "
        "('alpha', 'node-a', 3, now() - interval '5 s', now() + interval '60 s'), "
        "('beta', 'node-b', 7, now() - interval '2 min', now() - interval '90 s')",
    )


def test_status_table(
    pg_server: trio_peers.testing.PostgresServer,
    migrated: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--dsn", migrated]) == EXIT_OK
    assert "no leader" in capsys.readouterr().out

    add_leases(pg_server, migrated)
    assert main(["status", "--dsn", migrated]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATE",
        "LEADER",
        "NODE",
        "TERM",
        "STARTED",
        "(UTC)",
        "EXPIRES",
    ]
    alpha, beta = lines[1].split(), lines[2].split()
    assert alpha[:4] == ["alpha", "live", "node-a", "3"]
    assert alpha[-2] == "in"
    assert 55 < float(alpha[-1].rstrip("s")) <= 60
    assert beta[:4] == ["beta", "expired", "(node-b)", "7"]
    assert beta[-1] == "ago"

    assert main(["status", "--dsn", migrated, "--name", "beta"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "beta" in out
    assert "alpha" not in out

    assert main(["status", "--dsn", migrated, "--name", "nobody"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "no lease for name 'nobody'" in captured.out
    assert "UNLOGGED" not in captured.err  # a logged table: no warning


def test_status_json(
    pg_server: trio_peers.testing.PostgresServer,
    migrated: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_leases(pg_server, migrated)
    assert main(["status", "--dsn", migrated, "--json"]) == EXIT_OK
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alpha"]["leader"] == "node-a"
    assert rows["alpha"]["live"] is True
    assert rows["alpha"]["term"] == 3
    assert 55 < rows["alpha"]["expires_in"] <= 60
    assert rows["beta"]["leader"] is None
    assert rows["beta"]["node"] == "node-b"
    assert rows["beta"]["expires_in"] < 0
    assert main(["status", "--dsn", migrated, "--json", "--name", "nobody"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


def test_status_dsn_from_environment(
    migrated: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIO_PEERS_DSN", migrated)
    assert main(["status"]) == EXIT_OK
    assert "no leader" in capsys.readouterr().out

    monkeypatch.delenv("TRIO_PEERS_DSN")
    parts = urlsplit(migrated)
    monkeypatch.setenv("PGHOST", str(parts.hostname))
    monkeypatch.setenv("PGPORT", str(parts.port))
    monkeypatch.setenv("PGUSER", str(parts.username))
    monkeypatch.setenv("PGDATABASE", database_of(migrated))
    assert main(["status"]) == EXIT_OK
    assert f"{parts.hostname}:{parts.port}/{database_of(migrated)}" in capsys.readouterr().out


def test_status_subprocess_with_a_live_peer(migrated: str) -> None:
    async def hold_lease_and_ask() -> subprocess.CompletedProcess[str]:
        config = PeerConfig(dsn=migrated, name="svc", node="the-node", interval=30)
        async with open_peer(config) as peer:
            assert peer.is_leader
            return await trio.run_process(
                [sys.executable, "-m", "trio_peers", "status", "--json"],
                capture_stdout=True,
                capture_stderr=True,
                env=cli_env(TRIO_PEERS_DSN=migrated),
                check=False,
            )

    proc = trio.run(hold_lease_and_ask)
    assert proc.returncode == EXIT_OK, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["name"] == "svc"
    assert row["leader"] == "the-node"
    assert row["term"] == 1
    assert 25 < row["expires_in"] <= 30


# ---------------------------------------------------------------------- error paths


@pytest.mark.parametrize("command", ["migrate", "status", "watch"])
@pytest.mark.parametrize(
    "dsn", ["mysql://user@localhost/db", "host=localhost dbname=x", "postgresql://[::1/x"]
)
def test_bad_dsn(
    command: str, dsn: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--dsn", dsn]) == EXIT_MISCONFIGURED
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"trio-peers {command}: error: misconfigured:")
    assert "DSN" in line


@pytest.mark.parametrize("command", ["migrate", "status", "watch"])
def test_server_down(
    command: str, dead_dsn: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--dsn", dead_dsn, "--connect-timeout", "5"]) == EXIT_UNAVAILABLE
    line = one_error_line(capsys.readouterr().err)
    assert f"trio-peers {command}: error: database unavailable:" in line
    assert "refused" in line.lower()


@pytest.mark.parametrize("command", ["status", "watch"])
def test_missing_table(
    command: str, pg_dsn: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--dsn", pg_dsn]) == EXIT_SCHEMA
    line = one_error_line(capsys.readouterr().err)
    assert "table missing" in line
    assert "trio-peers migrate" in line


def test_wrong_table_shape(
    pg_server: trio_peers.testing.PostgresServer,
    pg_dsn: str,
    no_dsn_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sql(pg_server, pg_dsn, "CREATE TABLE trio_peers (name text)")
    for command in ("migrate", "status"):
        assert main([command, "--dsn", pg_dsn]) == EXIT_SCHEMA
        line = one_error_line(capsys.readouterr().err)
        assert "schema error" in line
        assert "'node' is missing" in line


def test_permission_denied_status_and_watch(
    migrated: str, nopriv_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("status", "watch"):
        assert main([command, "--dsn", nopriv_dsn]) == EXIT_MISCONFIGURED
        line = one_error_line(capsys.readouterr().err)
        assert "permission denied for table trio_peers" in line


def test_permission_denied_migrate(
    pg_dsn: str, nopriv_dsn: str, no_dsn_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # PostgreSQL 15+ grants nobody CREATE on schema public; nopriv may not create schemas either.
    assert main(["migrate", "--dsn", nopriv_dsn]) == EXIT_MISCONFIGURED
    assert "permission denied for schema public" in one_error_line(capsys.readouterr().err)
    assert main(["migrate", "--dsn", nopriv_dsn, "--prefix", "mine"]) == EXIT_MISCONFIGURED
    assert "permission denied for database" in one_error_line(capsys.readouterr().err)


def test_error_paths_subprocess(dead_dsn: str, pg_dsn: str) -> None:
    cases = [
        (("status", "--dsn", dead_dsn), EXIT_UNAVAILABLE, "database unavailable"),
        (("status", "--dsn", "mysql://x@y/z"), EXIT_MISCONFIGURED, "misconfigured"),
        (("status", "--dsn", pg_dsn), EXIT_SCHEMA, "table missing"),
        (("status",), EXIT_USAGE, "no database given"),
    ]
    for args, code, words in cases:
        proc = run_cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert words in one_error_line(proc.stderr)
        assert proc.stdout == ""


# ---------------------------------------------------------------------- watch


class Lines:
    """Lines of a subprocess's output stream, waited for with a timeout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[str] = []
        self._next = 0

    async def expect(self, needle: str, within: float = 10) -> str:
        """Return the next line containing ``needle``, skipping others."""
        with trio.fail_after(within):
            while True:
                while self._next < len(self.seen):
                    line = self.seen[self._next]
                    self._next += 1
                    if needle in line:
                        return line
                chunk = await self._stream.receive_some()
                if not chunk:
                    raise AssertionError(f"EOF before {needle!r}; saw {self.seen}")
                self._buffer += chunk
                *complete, self._buffer = self._buffer.split(b"\n")
                self.seen.extend(line.decode() for line in complete)


class RunningPeer:
    """A peer in its own task, so that peers can leave in any order."""

    def __init__(self) -> None:
        self.leave = trio.Event()
        self.left = trio.Event()

    async def run(
        self, config: PeerConfig, *, task_status: trio.TaskStatus[trio_peers.Peer]
    ) -> None:
        try:
            async with open_peer(config) as peer:
                task_status.started(peer)
                await self.leave.wait()
        finally:
            self.left.set()

    async def stop(self) -> None:
        self.leave.set()
        with trio.fail_after(10):
            await self.left.wait()


async def test_watch_shows_changes_and_stops_on_sigint(migrated: str) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_peers", "watch", "--dsn", migrated, "--name", "w"],
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert process.stdout is not None
        out = Lines(process.stdout)
        await out.expect("watching public.trio_peers", within=30)

        async with trio.open_nursery() as nursery:
            a, b, other = RunningPeer(), RunningPeer(), RunningPeer()
            peer_a = await nursery.start(a.run, PeerConfig(dsn=migrated, name="w", node="node-a"))
            assert peer_a.is_leader
            line = await out.expect("w: leader node-a, term 1")
            assert "lease expires in" in line
            # A peer of another name is not shown (--name w).
            await nursery.start(other.run, PeerConfig(dsn=migrated, name="other"))
            peer_b = await nursery.start(b.run, PeerConfig(dsn=migrated, name="w", node="node-b"))
            assert not peer_b.is_leader

            await peer_a.resign()  # graceful handover: release + NOTIFY
            await out.expect("w: leader resigned of term 1 (NOTIFY)")
            await out.expect("w: leader node-b, term 2 (was node-a, term 1)")
            await a.stop()
            await other.stop()
            await b.stop()  # the leader leaves: release + NOTIFY, nobody takes over
            await out.expect("w: leader resigned of term 2 (NOTIFY)")
            await out.expect("w: no leader (term 2 of node-b ended)")

        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert not any("other" in line for line in out.seen), out.seen
    finally:
        with trio.move_on_after(5, shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_watch_survives_a_server_restart(
    pg: trio_peers.testing.PostgresServer, migrated: str
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_peers", "watch", "--dsn", migrated, "--poll", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        out, err = Lines(process.stdout), Lines(process.stderr)
        await out.expect("watching", within=30)
        await trio.to_thread.run_sync(pg.restart)
        await err.expect("database unavailable")
        await err.expect("reconnected")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        with trio.move_on_after(5, shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
