"""Multi-host DSNs and server positions on real servers: a primary, its standby, and faults."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import asyncpg
import pytest
import trio
import trio_asyncio

from trio_peers import BackendMisconfigured, BackendUnavailable, migrate, open_peer
from trio_peers._asyncpg import connect_once, fetch_position
from trio_peers._cli._common import EXIT_OK
from trio_peers._cli._main import main
from trio_peers.testing import PostgresNotFound, PostgresServer, _postgres
from trio_peers.testing._replication import (
    BlackHole,
    ReplicatedPair,
    system_identifier,
    wait_until,
)

from ._pgutil import peer_config, wait_for

pytestmark = pytest.mark.postgres


def skip_without_postgres(exc: PostgresNotFound) -> None:
    if os.environ.get("CI"):
        raise exc
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    try:
        shared = ReplicatedPair.start()
    except PostgresNotFound as exc:
        skip_without_postgres(exc)
        raise
    with shared:
        yield shared


@pytest.fixture(scope="module")
def read_only_server() -> Iterator[PostgresServer]:
    """A primary whose sessions start read-only (``default_transaction_read_only=on``)."""
    try:
        srv = PostgresServer.start(settings={"default_transaction_read_only": "on"})
    except PostgresNotFound as exc:
        skip_without_postgres(exc)
        raise
    with srv:
        yield srv


@pytest.fixture(scope="module")
def hole() -> Iterator[BlackHole]:
    with BlackHole() as black_hole:
        yield black_hole


@pytest.fixture(scope="module")
def dead_port() -> int:
    """A port nothing listens on: connecting is refused at once."""
    return _postgres._free_port()


def multihost(*ports: int, database: str = "postgres", query: str = "") -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgresql://postgres@{hosts}/{database}" + (f"?{query}" if query else "")


async def server_port(dsn: str, *, connect_timeout: float = 10.0) -> int:
    """The port of the server that a connection made with ``dsn`` reached."""
    async with connect_once(dsn, connect_timeout=connect_timeout) as conn:
        port: int = await trio_asyncio.aio_as_trio(conn.fetchval)("SELECT inet_server_port()")
    return port


# ---------------------------------------------------------------- asyncpg alone


async def test_asyncpg_shares_one_connect_timeout_among_hosts(
    pair: ReplicatedPair, hole: BlackHole
) -> None:
    # Why trio-peers connects to the hosts itself: a black hole first uses up asyncpg's
    # whole budget, and the primary behind it is never tried.
    dsn = multihost(hole.port, pair.primary.port)
    async with trio_asyncio.open_loop():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn, timeout=0.5)
        assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- choosing a host


async def test_black_holed_first_host_costs_only_its_own_timeout(
    pair: ReplicatedPair, hole: BlackHole
) -> None:
    dsn = multihost(hole.port, pair.primary.port)
    t0 = time.monotonic()
    assert await server_port(dsn, connect_timeout=1.0) == pair.primary.port
    elapsed = time.monotonic() - t0
    print(f"\nblack hole (1 s timeout), then the primary: {elapsed * 1000:.0f} ms")
    assert 1.0 <= elapsed < 1.0 + 5


async def test_black_holes_cost_one_timeout_together(
    pair: ReplicatedPair, hole: BlackHole
) -> None:
    # The hosts are tried at once: three black holes cost one connect timeout, not three.
    dsn = multihost(hole.port, hole.port, hole.port, pair.primary.port)
    t0 = time.monotonic()
    assert await server_port(dsn, connect_timeout=1.0) == pair.primary.port
    elapsed = time.monotonic() - t0
    print(f"\nthree black holes (1 s timeout each), then the primary: {elapsed * 1000:.0f} ms")
    assert 1.0 <= elapsed < 2.5


async def test_standby_first_connects_to_the_primary(pair: ReplicatedPair) -> None:
    dsn = multihost(pair.standby.port, pair.primary.port)
    assert await server_port(dsn) == pair.primary.port
    explicit = multihost(
        pair.standby.port, pair.primary.port, query="target_session_attrs=primary"
    )
    assert await server_port(explicit) == pair.primary.port


async def test_read_only_primary_is_skipped(
    pair: ReplicatedPair, read_only_server: PostgresServer
) -> None:
    dsn = multihost(read_only_server.port, pair.primary.port)
    assert await server_port(dsn) == pair.primary.port


async def test_only_standbys_up_says_every_host_is_read_only(
    pair: ReplicatedPair, read_only_server: PostgresServer, dead_port: int
) -> None:
    dsn = multihost(pair.standby.port, read_only_server.port)
    with pytest.raises(BackendUnavailable) as info:
        await server_port(dsn, connect_timeout=2)
    message = str(info.value)
    print(f"\n{message}")
    assert "every host in the DSN that answered is read-only" in message
    assert f"127.0.0.1:{pair.standby.port}: it is in recovery" in message
    assert f"127.0.0.1:{read_only_server.port}: default_transaction_read_only is on" in message
    assert "read-only (target_session_attrs=read-write): " in message
    assert "a failover may be under way" in message

    # A host that is down is named with its own reason, after the read-only ones.
    dsn = multihost(dead_port, pair.standby.port)
    with pytest.raises(BackendUnavailable) as info:
        await server_port(dsn, connect_timeout=2)
    message = str(info.value)
    print(message)
    assert message.startswith("every host in the DSN that answered is read-only")
    assert f"the others: 127.0.0.1:{dead_port}: ConnectionRefusedError" in message


async def test_no_host_answers(hole: BlackHole, dead_port: int) -> None:
    with pytest.raises(BackendUnavailable) as info:
        await server_port(multihost(hole.port, dead_port), connect_timeout=0.3)
    message = str(info.value)
    assert message.startswith("no host in the DSN answered")
    assert f"127.0.0.1:{hole.port}: no answer within 0.3 s" in message
    assert f"127.0.0.1:{dead_port}: ConnectionRefusedError" in message


async def test_other_target_session_attrs(pair: ReplicatedPair, dead_port: int) -> None:
    primary, standby = pair.primary.port, pair.standby.port

    async def port_for(attrs: str, *ports: int) -> int:
        return await server_port(multihost(*ports, query=f"target_session_attrs={attrs}"))

    assert await port_for("any", standby, primary) == standby
    assert await port_for("standby", primary, standby) == standby
    assert await port_for("read-only", primary, standby) == standby
    assert await port_for("prefer-standby", primary, standby) == standby
    # prefer-standby falls back to the first server that answered.
    assert await port_for("prefer-standby", dead_port, primary) == primary
    with pytest.raises(BackendUnavailable, match="no host in the DSN is of the kind wanted"):
        await port_for("standby", dead_port, primary)


async def test_authentication_failure_is_permanent(pair: ReplicatedPair, dead_port: int) -> None:
    dsn = f"postgresql://nosuchrole@127.0.0.1:{dead_port},127.0.0.1:{pair.primary.port}/postgres"
    with pytest.raises(BackendMisconfigured, match="nosuchrole") as info:
        await server_port(dsn)
    assert isinstance(info.value.__cause__, asyncpg.InvalidAuthorizationSpecificationError)


async def test_malformed_multihost_dsn_is_misconfigured_at_entry() -> None:
    dsn = "postgresql://postgres@127.0.0.1:1,,127.0.0.1:2/postgres"
    with pytest.raises(BackendMisconfigured, match="empty host"):
        await migrate(dsn)
    with pytest.raises(BackendMisconfigured, match="empty host"):
        async with open_peer(peer_config(dsn, "a")):
            pytest.fail("entered a peer with a malformed DSN")  # pragma: no cover
    bad_attrs = "postgresql://postgres@127.0.0.1:1,127.0.0.1:2/postgres?target_session_attrs=rw"
    with pytest.raises(BackendMisconfigured, match="target_session_attrs='rw'"):
        await migrate(bad_attrs)


def trio_peers_backends(server: PostgresServer) -> int:
    count = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'trio-peers'"
    )[0][0]
    assert isinstance(count, int)
    return count


async def test_unchosen_and_cancelled_attempts_leave_no_connection(
    pair: ReplicatedPair, hole: BlackHole
) -> None:
    def none_left() -> bool:
        return trio_peers_backends(pair.primary) == 0 and trio_peers_backends(pair.standby) == 0

    await trio.to_thread.run_sync(lambda: wait_until(none_left, timeout=10, what="no backends"))
    # The standby answered too, but the primary was chosen: the standby's session is closed.
    async with connect_once(multihost(pair.standby.port, pair.primary.port), connect_timeout=5):
        assert await trio.to_thread.run_sync(trio_peers_backends, pair.primary) == 1
        await trio.to_thread.run_sync(
            lambda: wait_until(
                lambda: trio_peers_backends(pair.standby) == 0,
                timeout=10,
                what="the unchosen standby session is gone",
            )
        )
    # Cancelled while the black hole holds up the choice: every attempt is dropped.
    with trio.move_on_after(0.3) as scope:
        await server_port(multihost(hole.port, pair.standby.port, pair.primary.port))
    assert scope.cancelled_caught
    await trio.to_thread.run_sync(
        lambda: wait_until(none_left, timeout=10, what="the cancelled attempts are gone")
    )


# ---------------------------------------------------------------- peers


async def test_peer_leads_through_a_multihost_dsn(pair: ReplicatedPair, hole: BlackHole) -> None:
    database = (await trio.to_thread.run_sync(pair.primary.create_database)).rpartition("/")[2]
    try:
        dsn = multihost(
            hole.port, hole.port, pair.standby.port, pair.primary.port, database=database
        )
        assert await migrate(dsn, connect_timeout=1.0)
        config = peer_config(dsn, "mh", connect_timeout=1.0, interval=4.0)
        async with open_peer(config) as peer:
            await wait_for(lambda: peer.is_leader, limit=20)
        held = await trio.to_thread.run_sync(
            lambda: pair.primary.execute("SELECT node, term FROM trio_peers", database=database)
        )
        assert held == [("mh", 1)]
    finally:
        await trio.to_thread.run_sync(pair.primary.drop_database, database)


async def test_peer_on_standbys_only_is_a_follower_that_says_why(pair: ReplicatedPair) -> None:
    database = (await trio.to_thread.run_sync(pair.primary.create_database)).rpartition("/")[2]
    try:
        await migrate(multihost(pair.primary.port, database=database))
        await trio.to_thread.run_sync(lambda: pair.wait_replayed())
        dsn = multihost(pair.standby.port, pair.standby.port, database=database)
        async with open_peer(peer_config(dsn, "ro")) as peer:
            assert not peer.is_leader
            error = peer.statistics().last_error
            assert error is not None
            assert "every host in the DSN that answered is read-only" in error
    finally:
        await trio.to_thread.run_sync(pair.primary.drop_database, database)


# ---------------------------------------------------------------- positions


async def test_positions_of_primary_standby_and_promoted_standby(
    read_only_server: PostgresServer,
) -> None:
    try:
        fresh = await trio.to_thread.run_sync(ReplicatedPair.start)
    except PostgresNotFound as exc:
        skip_without_postgres(exc)
        raise
    with fresh:
        primary, standby = fresh.primary, fresh.standby
        sysid = await trio.to_thread.run_sync(system_identifier, primary)

        before = await fetch_position(primary.dsn)
        assert before.system_identifier == sysid
        assert before.timeline == 1
        assert not before.in_recovery
        assert before.writable
        assert before.lsn is not None and before.lsn > 0

        on_standby = await fetch_position(standby.dsn)
        assert on_standby.system_identifier == sysid
        assert on_standby.timeline is None
        assert on_standby.in_recovery
        assert on_standby.transaction_read_only
        assert not on_standby.default_transaction_read_only
        assert on_standby.lsn is not None
        assert on_standby.read_only_reason is not None
        assert "in recovery" in on_standby.read_only_reason

        await trio.to_thread.run_sync(primary.stop)
        await trio.to_thread.run_sync(lambda: fresh.promote())
        promoted = await fetch_position(standby.dsn)
        assert promoted.system_identifier == sysid
        assert promoted.timeline == 2
        assert not promoted.in_recovery
        assert promoted.writable
        assert promoted.lsn is not None and promoted.lsn >= on_standby.lsn

    read_only = await fetch_position(read_only_server.dsn)
    assert read_only.timeline == 1
    assert not read_only.in_recovery
    assert read_only.default_transaction_read_only
    assert read_only.read_only_reason == "default_transaction_read_only is on"


async def test_peer_connection_reads_its_position(pair: ReplicatedPair) -> None:
    from trio_peers._asyncpg import AsyncpgBackend

    database = (await trio.to_thread.run_sync(pair.primary.create_database)).rpartition("/")[2]
    try:
        await migrate(multihost(pair.primary.port, database=database))
        await trio.to_thread.run_sync(lambda: pair.wait_replayed())
        on_primary = peer_config(multihost(pair.primary.port, database=database), "p")
        async with AsyncpgBackend().open(on_primary) as connector:
            conn = await connector.connect(on_notification=lambda _p: None, on_lost=lambda: None)
            try:
                position = await conn.position(statement_timeout=5)  # type: ignore[attr-defined]
            finally:
                await conn.aclose()
        assert position.writable
        assert position.timeline == 1

        # On a standby a peer's connection fails at LISTEN, before anything could read its
        # position; without LISTEN it connects and reports recovery.
        standby_dsn = multihost(pair.standby.port, database=database)
        async with AsyncpgBackend().open(peer_config(standby_dsn, "s")) as connector:
            with pytest.raises(BackendUnavailable, match="cannot execute LISTEN during recovery"):
                await connector.connect(on_notification=lambda _p: None, on_lost=lambda: None)
        quiet = peer_config(standby_dsn, "s", listen=False)
        async with AsyncpgBackend().open(quiet) as connector:
            conn = await connector.connect(on_notification=lambda _p: None, on_lost=lambda: None)
            try:
                position = await conn.position(statement_timeout=5)  # type: ignore[attr-defined]
            finally:
                await conn.aclose()
        assert position.in_recovery
        assert position.timeline is None
    finally:
        await trio.to_thread.run_sync(pair.primary.drop_database, database)


async def test_peer_on_a_single_host_standby_is_a_follower_that_names_it(
    pair: ReplicatedPair, caplog: pytest.LogCaptureFixture
) -> None:
    """A DSN of one host that is a hot standby: follower, one WARNING that says it is a
    standby (in recovery), retries at a bounded rate."""
    database = (await trio.to_thread.run_sync(pair.primary.create_database)).rpartition("/")[2]
    try:
        await migrate(multihost(pair.primary.port, database=database))
        await trio.to_thread.run_sync(lambda: pair.wait_replayed())
        dsn = multihost(pair.standby.port, database=database)
        with caplog.at_level(logging.WARNING, logger="trio_peers"):
            async with open_peer(peer_config(dsn, "ro")) as peer:
                assert not peer.is_leader
                await trio.sleep(2.0)  # interval 1 s: backoff up to interval / 2
                stats = peer.statistics()
                assert not peer.is_leader
                assert "hot standby" in (stats.last_error or ""), stats.last_error
                assert stats.connects <= 12, stats  # bounded: no reconnect loop
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "hot standby" in warnings[0], warnings
    finally:
        await trio.to_thread.run_sync(pair.primary.drop_database, database)


def test_status_says_when_the_server_is_read_only(
    pair: ReplicatedPair, read_only_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``trio-peers status`` on a hot standby, or on a server whose sessions start read-only,
    shows the leases and says (on stderr, naming the setting) that peers there follow."""
    database = pair.primary.create_database().rpartition("/")[2]
    try:
        trio.run(migrate, multihost(pair.primary.port, database=database))
        pair.wait_replayed()
        standby = multihost(pair.standby.port, database=database)
        assert main(["status", "--dsn", standby]) == EXIT_OK
        out, err = capsys.readouterr()
        assert "no leader" in out
        assert "read-only: it is in recovery" in err and "pg_is_in_recovery()" in err, err
        primary = multihost(pair.primary.port, database=database)
        assert main(["status", "--dsn", primary]) == EXIT_OK
        assert "read-only" not in capsys.readouterr().err
    finally:
        pair.primary.drop_database(database)
    # A writable primary whose sessions start read-only (the table made in a session that
    # turned the setting off).
    ro = multihost(read_only_server.port)
    trio.run(migrate, ro + "?default_transaction_read_only=off")
    assert main(["status", "--dsn", ro]) == EXIT_OK
    assert "read-only: default_transaction_read_only is on" in capsys.readouterr().err
