"""Test configuration: Hypothesis profiles and the PostgreSQL fixtures.

The PostgreSQL fixtures come from the plugin users get, :mod:`trio_peers.testing.pytest_plugin`
(the project's tests use it as users would); here they have the short names the tests use:

``pg_server``
    ``trio_peers_pg_server``: one throwaway server for the whole run, or the one named by
    ``TRIO_PEERS_TEST_DSN``.
``pg_dsn``
    ``trio_peers_pg_dsn``: a fresh, empty database on that server for each test; its DSN.
``dsn``
    ``trio_peers_dsn``: the same, with the default lease table (``public.trio_peers``).
``pg``
    ``trio_peers_pg``: the server, for fault injection (``stop``, ``start_again``,
    ``restart``, ``terminate_backends``). Skips the test when the server was not started by
    the suite.

Every test using one of them gets the ``postgres`` marker automatically. All of them are sync
fixtures (pytest-trio async fixtures can only be function-scoped). From inside Trio, call the
server's blocking methods through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import trio
from hypothesis import settings

if TYPE_CHECKING:  # the plugin is imported by pytest (below), to rewrite its asserts
    from trio_peers.testing._postgres import PostgresServer
    from trio_peers.testing.pytest_plugin import ExternalServer

pytest_plugins = ["trio_peers.testing.pytest_plugin", "pytester"]

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


# ---------------------------------------------------------------- a Cancelled escaping a test
#
# pytest-trio 0.8 reports a test as passed when a trio.Cancelled escapes its function (seen
# when a peer's failure reached the user's block as the Cancelled it caused in the body:
# pytest.raises let it by, and the test passed). Every async test is wrapped so that such
# an escape fails the test instead.


def _no_escaping_cancelled(fn: Callable[..., Awaitable[object]]) -> Callable[..., object]:
    if getattr(fn, "_no_escaping_cancelled", False):
        return fn

    @functools.wraps(fn)
    async def guarded(*args: object, **kwargs: object) -> object:
        try:
            return await fn(*args, **kwargs)
        except trio.Cancelled as exc:
            raise AssertionError(
                "a trio.Cancelled escaped the test function (not raised by a scope of the "
                "test's own): something under test let a cancellation leave its scope"
            ) from exc

    guarded._no_escaping_cancelled = True  # type: ignore[attr-defined]
    return guarded


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-trio wraps the function
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if isinstance(item, pytest.Function) and item.get_closest_marker("trio") is not None:
        inner = getattr(item.obj, "hypothesis", None)
        if inner is not None:
            if inspect.iscoroutinefunction(inner.inner_test):
                inner.inner_test = _no_escaping_cancelled(inner.inner_test)
        elif inspect.iscoroutinefunction(item.obj):
            item.obj = _no_escaping_cancelled(item.obj)
    yield


# ---------------------------------------------------------------- PostgreSQL


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from trio_peers.testing.pytest_plugin import POSTGRES_FIXTURES

    for item in items:
        if POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_server(
    trio_peers_pg_server: PostgresServer | ExternalServer,
) -> PostgresServer | ExternalServer:
    return trio_peers_pg_server


@pytest.fixture
def pg_dsn(trio_peers_pg_dsn: str) -> str:
    return trio_peers_pg_dsn


@pytest.fixture
def pg(trio_peers_pg: PostgresServer) -> PostgresServer:
    return trio_peers_pg


@pytest.fixture
def dsn(trio_peers_dsn: str) -> str:
    return trio_peers_dsn
