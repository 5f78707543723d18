"""pytest fixtures for testing applications that use trio-peers.

Enable them in your top-level ``conftest.py``::

    pytest_plugins = ["trio_peers.testing.pytest_plugin"]

The plugin is opt-in: installing trio-peers does not load it into every pytest run.

Fixtures (all sync, so they work with pytest-trio, anyio or plain tests):

``trio_peers_pg_server``
    Session-scoped: one throwaway PostgreSQL server (:class:`PostgresServer`) for the whole
    run. If ``TRIO_PEERS_TEST_DSN`` is set, no server is started and the fixture returns an
    object for that server instead (its fault-injection methods skip the calling test).
    Without PostgreSQL binaries the tests that use it are skipped, except where the ``CI``
    environment variable is set: there they fail, so that CI cannot pass by skipping them.
``trio_peers_pg_dsn``
    The DSN of a fresh, empty database on that server, dropped after the test.
``trio_peers_dsn``
    The same, with the default lease table (``public.trio_peers``) created by
    :func:`trio_peers.migrate`.
``trio_peers_pg``
    The server itself, for fault injection (``stop``, ``start_again``, ``restart``,
    ``terminate_backends``), started again after the test if the test left it stopped.
    Skips the test when the server is an external one.
``trio_peers_memory_backend``
    A new :class:`MemoryBackend`.

Every test that uses one of the PostgreSQL fixtures gets the ``trio_peers_postgres`` marker,
so ``pytest -m "not trio_peers_postgres"`` runs the others only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final, Literal, NoReturn, final
from urllib.parse import urlsplit

import pytest

from ._memory import MemoryBackend
from ._postgres import (
    ENV_TEST_DSN,
    ExternalPostgres,
    PostgresNotFound,
    PostgresServer,
    find_postgres_bindir,
    test_dsn_from_env,
)

__all__ = [
    "MARKER",
    "POSTGRES_FIXTURES",
    "ExternalServer",
    "trio_peers_dsn",
    "trio_peers_memory_backend",
    "trio_peers_pg",
    "trio_peers_pg_dsn",
    "trio_peers_pg_server",
]

#: The marker given to every test that uses a PostgreSQL fixture.
MARKER: Final = "trio_peers_postgres"
#: The fixtures that need a PostgreSQL server.
POSTGRES_FIXTURES: Final = frozenset(
    {"trio_peers_pg_server", "trio_peers_pg_dsn", "trio_peers_dsn", "trio_peers_pg"}
)

_NOT_OURS: Final = f"needs a server started by the test run ({ENV_TEST_DSN} is set)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: uses a PostgreSQL server (trio_peers.testing.pytest_plugin)"
    )


def pytest_report_header() -> str:
    """Say which PostgreSQL the tests will use, so that a CI log shows it."""
    if test_dsn_from_env() is not None:
        return f"trio-peers postgres: external server from {ENV_TEST_DSN}"
    try:
        return f"trio-peers postgres: binaries in {find_postgres_bindir()}"
    except PostgresNotFound:
        return "trio-peers postgres: no server binaries found"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(MARKER)


@final
class ExternalServer(ExternalPostgres):
    """The server named by ``TRIO_PEERS_TEST_DSN``: SQL helpers work, fault injection skips."""

    is_running = True

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60.0
    ) -> NoReturn:
        """Skip the calling test: this server is not ours to stop."""
        pytest.skip(_NOT_OURS)

    def start_again(self) -> NoReturn:
        """Skip the calling test: this server is not ours to start."""
        pytest.skip(_NOT_OURS)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> NoReturn:
        """Skip the calling test: this server is not ours to restart."""
        pytest.skip(_NOT_OURS)

    def terminate_backends(
        self, database: str | None = None, application_name: str | None = None
    ) -> int:
        """As :meth:`PostgresServer.terminate_backends`, within ``database`` only (a test's
        own): the server's other users' connections are not ours to end. Without
        ``database``, skips the calling test."""
        if database is None:
            pytest.skip(f"{_NOT_OURS}: terminating connections needs the test's database")
        return super().terminate_backends(database, application_name)


def _ensure_running(server: PostgresServer | ExternalServer) -> None:
    # A fault-injection test may leave the shared server stopped or frozen (a frozen
    # server's processes are alive: it counts as running); later tests need it up.
    if isinstance(server, PostgresServer):
        if server.is_frozen:
            server.thaw()
        if not server.is_running:
            server.start_again()


@pytest.fixture(scope="session")
def trio_peers_pg_server() -> Iterator[PostgresServer | ExternalServer]:
    """One throwaway PostgreSQL server for the whole test session (or ``TRIO_PEERS_TEST_DSN``'s)."""
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


@pytest.fixture
def trio_peers_pg_dsn(trio_peers_pg_server: PostgresServer | ExternalServer) -> Iterator[str]:
    """The DSN of a fresh, empty database, dropped after the test."""
    dsn = trio_peers_pg_server.create_database()
    yield dsn
    _ensure_running(trio_peers_pg_server)
    # Terminates the database's connections first, then DROP ... WITH (FORCE).
    trio_peers_pg_server.drop_database(urlsplit(dsn).path.lstrip("/"))


@pytest.fixture
def trio_peers_dsn(trio_peers_pg_dsn: str) -> str:
    """The DSN of a fresh database with the default lease table created."""
    import trio

    from .._asyncpg import migrate

    trio.run(migrate, trio_peers_pg_dsn)
    return trio_peers_pg_dsn


@pytest.fixture
def trio_peers_pg(
    trio_peers_pg_server: PostgresServer | ExternalServer,
) -> Iterator[PostgresServer]:
    """The session's server for fault injection; skips the test if the server is external."""
    if not isinstance(trio_peers_pg_server, PostgresServer):
        pytest.skip(_NOT_OURS)
    yield trio_peers_pg_server
    _ensure_running(trio_peers_pg_server)


@pytest.fixture
def trio_peers_memory_backend() -> MemoryBackend:
    """A new, empty in-memory lease store with the default table."""
    return MemoryBackend()
