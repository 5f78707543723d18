"""trio_peers.testing.pytest_plugin, as a user enables it: a small test suite run by pytester.

Each test here writes a user's ``conftest.py`` and test module into a temporary directory and
runs pytest on them in a subprocess, against a real PostgreSQL server that the inner run starts
itself (or the one in ``TRIO_PEERS_TEST_DSN``, which the subprocess inherits).
"""

from __future__ import annotations

import os

import pytest

from tests.test_cli import importable_env


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The inner pytest imports this trio_peers, also from a source tree.
    for key, value in importable_env(dict(os.environ)).items():
        monkeypatch.setenv(key, value)


CONFTEST = 'pytest_plugins = ["trio_peers.testing.pytest_plugin"]\n'

# A user's pytest.ini with warnings as errors, and the filter docs/howto/testing.rst tells such
# users to add for trio-asyncio on Python 3.12 and later.
INI = """\
[pytest]
addopts = -p no:cacheprovider
filterwarnings =
    error
    ignore:'AbstractChildWatcher' is deprecated:DeprecationWarning:trio_asyncio
"""

USER_TESTS = """
import trio

import trio_peers
from trio_peers.testing import MemoryBackend, PostgresServer

SEEN = {}


def test_server_is_shared(trio_peers_pg_server):
    SEEN.setdefault("servers", set()).add(id(trio_peers_pg_server))
    assert trio_peers_pg_server.execute("SELECT 1") == [(1,)]


def test_server_is_shared_again(trio_peers_pg_server):
    SEEN["servers"].add(id(trio_peers_pg_server))
    assert len(SEEN["servers"]) == 1  # session-scoped: one server for the run


def _tables(server, dsn):
    database = dsn.rsplit("/", 1)[1]
    return server.execute(
        "SELECT schemaname || '.' || tablename FROM pg_tables WHERE tablename = 'trio_peers'",
        database=database,
    )


def test_pg_dsn_is_empty_and_fresh(trio_peers_pg_server, trio_peers_pg_dsn):
    assert _tables(trio_peers_pg_server, trio_peers_pg_dsn) == []
    SEEN.setdefault("dsns", []).append(trio_peers_pg_dsn)


def test_pg_dsn_differs_per_test(trio_peers_pg_server, trio_peers_pg_dsn):
    assert trio_peers_pg_dsn not in SEEN["dsns"]
    # The first test's database was dropped after it.
    names = {row[0] for row in trio_peers_pg_server.execute("SELECT datname FROM pg_database")}
    assert SEEN["dsns"][0].rsplit("/", 1)[1] not in names


def test_dsn_is_migrated(trio_peers_pg_server, trio_peers_dsn):
    assert _tables(trio_peers_pg_server, trio_peers_dsn) == [("public.trio_peers",)]

    async def elect():
        async with trio_peers.open_peer(trio_peers.PeerConfig(dsn=trio_peers_dsn)) as peer:
            return peer.term

    assert trio.run(elect) == 1


def test_memory_backend(trio_peers_memory_backend):
    assert isinstance(trio_peers_memory_backend, MemoryBackend)
    assert trio_peers_memory_backend.leader() is None


def test_pg_restarts_a_stopped_server(trio_peers_pg):
    assert isinstance(trio_peers_pg, PostgresServer)
    trio_peers_pg.stop("immediate")
    assert not trio_peers_pg.is_running


def test_server_is_running_again(trio_peers_pg, trio_peers_pg_dsn):
    assert trio_peers_pg.is_running
    assert trio_peers_pg.execute("SELECT 2") == [(2,)]
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    # A plain pytest run, as in a user's project: none of this project's configuration.
    pytester.makeini(INI)
    return pytester.runpytest_subprocess("-v", *args, timeout=240)


@pytest.mark.postgres
def test_a_user_suite_gets_working_fixtures(pytester: pytest.Pytester) -> None:
    result = _run(pytester)
    if os.environ.get("TRIO_PEERS_TEST_DSN"):
        # The fault-injection fixture skips on an external server; everything else runs.
        result.assert_outcomes(passed=6, skipped=2)
    else:
        result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["trio-peers postgres: *"])  # the report header


def test_the_marker_selects_the_postgres_tests(pytester: pytest.Pytester) -> None:
    # Deselecting by the plugin's marker leaves only the in-memory test, and needs no server.
    result = _run(pytester, "-m", "not trio_peers_postgres")
    result.assert_outcomes(passed=1, deselected=7)


def test_not_loaded_unless_asked_for(pytester: pytest.Pytester) -> None:
    # No pytest11 entry point: a project that does not opt in sees none of the fixtures.
    pytester.makepyfile(test_other="def test_x(trio_peers_memory_backend):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'trio_peers_memory_backend' not found*"])
