"""Test configuration: Hypothesis profiles and the PostgreSQL fixtures.

PostgreSQL fixtures (every test using one gets the ``postgres`` marker automatically):

``pg_server``
    Session-scoped: one throwaway server for the whole run (see
    :mod:`trio_peers.testing._postgres`). If ``TRIO_PEERS_TEST_DSN`` is set, no server is started
    and the fixture talks to that server instead.
``pg_dsn``
    A fresh, empty database on that server for each test; its DSN.
``pg``
    The same server, for fault injection (``stop``, ``start_again``, ``restart``,
    ``terminate_backends``). Skips the test when the server was not started by the suite.

All of them are sync fixtures (pytest-trio async fixtures can only be function-scoped). From
inside Trio, call the server's blocking methods through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Literal, NoReturn

import pytest
from hypothesis import settings

from trio_peers.testing._postgres import (
    ENV_TEST_DSN,
    ExternalPostgres,
    PostgresNotFound,
    PostgresServer,
    find_postgres_bindir,
    test_dsn_from_env,
)

# ---------------------------------------------------------------- Hypothesis profiles
#
# Hypothesis loads its built-in "ci" profile by itself when CI is set, so a profile is loaded
# here only on request (HYPOTHESIS_PROFILE), or "dev" outside CI.

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=2000, stateful_step_count=100, deadline=None)

if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")


# ---------------------------------------------------------------- PostgreSQL

_POSTGRES_FIXTURES = frozenset({"pg_server", "pg_dsn", "pg"})
_NOT_OURS = f"needs a server started by the suite ({ENV_TEST_DSN} is set)"


def pytest_report_header() -> str:
    """Say which PostgreSQL the suite will use, so a CI log shows it."""
    dsn = test_dsn_from_env()
    if dsn is not None:
        return f"postgres: external server from {ENV_TEST_DSN}"
    try:
        return f"postgres: binaries in {find_postgres_bindir()}"
    except PostgresNotFound:
        return "postgres: no server binaries found"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


class ExternalServer(ExternalPostgres):
    """The server named by ``TRIO_PEERS_TEST_DSN``: SQL helpers work, fault injection skips."""

    is_running = True

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60.0
    ) -> NoReturn:
        pytest.skip(_NOT_OURS)

    def start_again(self) -> NoReturn:
        pytest.skip(_NOT_OURS)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> NoReturn:
        pytest.skip(_NOT_OURS)


AnyServer = PostgresServer | ExternalServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[AnyServer]:
    dsn = test_dsn_from_env()
    if dsn is not None:
        yield ExternalServer(dsn)
        return
    try:
        server = PostgresServer.start()
    except PostgresNotFound as exc:
        if os.environ.get("CI"):
            raise  # CI must run these tests, not skip them
        pytest.skip(str(exc))
    with server:
        yield server


def _ensure_running(server: AnyServer) -> None:
    # A fault-injection test may leave the shared server stopped; later tests need it up.
    if isinstance(server, PostgresServer) and not server.is_running:
        server.start_again()


@pytest.fixture
def pg_dsn(pg_server: AnyServer) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    dsn = pg_server.create_database(name)
    yield dsn
    _ensure_running(pg_server)
    pg_server.drop_database(name)  # terminates its backends first, then DROP ... WITH (FORCE)


@pytest.fixture
def pg(pg_server: AnyServer) -> Iterator[PostgresServer]:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip(_NOT_OURS)
    yield pg_server
    _ensure_running(pg_server)


@pytest.fixture
async def dsn(pg_dsn: str) -> str:
    """A fresh database with the default lease table (``public.trio_peers``) migrated."""
    from trio_peers import migrate

    await migrate(pg_dsn)
    return pg_dsn
