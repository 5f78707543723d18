"""Hostile input at every edge, against a real PostgreSQL (issue 12).

Each test puts the peers in front of one thing a real deployment can throw at
them (junk on the NOTIFY channel, a role or database that refuses writes,
server-side timeouts shorter than an election, a full server, a DBA editing
the lease table) and asserts what users rely on:

* a clear log line that names the cause;
* the affected peers are followers (``is_leader`` false) while it lasts;
* no crash loop: a bounded number of rounds and connects over a window;
* no log flood: a bounded number of records;
* no lost or regressed term where the database kept the row.

A DSN pointing at a hot standby is tested on a real streaming replica in
``test_multihost_postgres.py`` (``test_peer_on_a_single_host_standby_is_a_follower_that_names_it``);
the statement that fails there is the one that fails under
``default_transaction_read_only``, tested below.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from trio_peers import BackendMisconfigured, Peer, migrate, open_peer
from trio_peers._core import BACKOFF_CAP, parse_notification

from ._pgutil import SQL, open_sql, peer_config, wait_for

INTERVAL = 1.0
COUNT_SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
CHANNEL = "public.trio_peers"

pytestmark = pytest.mark.timeout(90)

cfg = peer_config


# ---------------------------------------------------------------------- helpers


def records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    """Messages of the ``trio_peers`` logger at ``level`` or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("trio_peers") and r.levelno >= level
    ]


def max_failed_rounds(window: float) -> int:
    """Most rounds a failing peer may run in ``window`` seconds once its backoff is capped.

    The capped backoff is ``interval * BACKOFF_CAP`` times a factor in [0.5, 1]; the
    uncapped start (0.05 s doubling) adds a handful.
    """
    return int(window / (INTERVAL * BACKOFF_CAP * 0.5)) + 6


async def rounds_in(peer: Peer, window: float) -> tuple[int, int]:
    """(rounds run, connects made) by ``peer`` during the next ``window`` seconds."""
    before = peer.statistics()
    await trio.sleep(window)  # a measurement window, not a wait for a condition
    after = peer.statistics()
    return after.elections_run - before.elections_run, after.connects - before.connects


@asynccontextmanager
async def role(sql: SQL, *, grants: str | None) -> AsyncIterator[str]:
    """A throwaway LOGIN role (trust authentication); yields its name."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    await sql.execute(f"CREATE ROLE {name} LOGIN")
    await sql.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
    if grants is not None:
        await sql.execute(f"GRANT {grants} ON public.trio_peers TO {name}")
    try:
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await sql.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
            )
            await sql.execute(f"DROP OWNED BY {name}")
            await sql.execute(f"DROP ROLE {name}")


def as_role(dsn: str, name: str) -> str:
    return dsn.replace("postgres@", f"{name}@", 1)


async def database_of(sql: SQL) -> str:
    name: str = await sql.fetchval("SELECT current_database()")
    return name


async def hold_session(dsn: str, *, task_status: trio.TaskStatus[trio.Event]) -> None:
    """Hold one session open until the event handed to the caller is set."""
    done = trio.Event()
    async with open_sql(dsn):
        task_status.started(done)
        await done.wait()


async def reconnect_all(sql: SQL) -> None:
    """End every other session of this database (settings apply to new sessions)."""
    await sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


# ---------------------------------------------------------------------- NOTIFY channel

_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
# Payloads shaped like a `down`, with every field wrong in some way (or right).
_DOWNISH = st.fixed_dictionaries(
    {
        "down": st.one_of(st.just("default"), st.integers(), st.none(), _TEXT, st.lists(_TEXT)),
        "term": st.one_of(
            st.none(), st.booleans(), st.integers(), st.just(10**40), st.floats(), _TEXT
        ),
        "sender": st.one_of(st.integers(), st.none(), st.just(""), _TEXT),
    }
)
PAYLOADS = st.one_of(
    _TEXT,  # mostly not JSON
    _JSON.map(json.dumps),
    _DOWNISH.map(json.dumps),
    # Oversized: up to PostgreSQL's limit (payloads must be shorter than 8000 bytes).
    st.integers(7000, 7999).map(lambda n: "x" * n),
    st.integers(7000, 7999).map(lambda n: '{"down":"' + "d" * (n - 12) + '"}'),
    # A number longer than Python's int-from-string limit (4300 digits).
    st.integers(4301, 7900).map(
        lambda n: '{"down":"default","sender":"s","term":' + "9" * n + "}"
    ),
)


async def _notify_round(dsn: str, payloads: list[str]) -> None:
    await migrate(dsn)
    async with (
        open_sql(dsn) as sql,
        open_peer(cfg(dsn, "a", interval=30.0)) as leader,
        open_peer(cfg(dsn, "b", interval=30.0)) as follower,
    ):
        assert leader.is_leader and not follower.is_leader
        term = leader.term
        version = leader._cell.value.version
        rounds_before = follower.statistics().elections_run
        for payload in payloads:
            await sql.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        # A sentinel sent last arrives after everything committed before it.
        await sql.execute("SELECT pg_notify($1, $2)", CHANNEL, "sentinel")
        for peer in (leader, follower):
            await wait_for(
                lambda peer=peer: peer.statistics().notifications_received >= len(payloads) + 1
            )
        # The leader never changes its mind over a notification.
        assert leader.is_leader and leader.term == term
        assert leader._cell.value.version == version
        assert not follower.is_leader
        # Each payload costs the follower at most one round (a valid `down` of its
        # name asks for one), and the burst is coalesced.
        assert follower.statistics().elections_run - rounds_before <= len(payloads) + 1
        # Everything but a well-formed `down` of this name from another peer is ignored.
        ignored = sum(1 for p in payloads if _not_for_us(p)) + 1  # + the sentinel
        assert leader.statistics().notifications_ignored == ignored
        assert follower.statistics().notifications_ignored == ignored


def _not_for_us(payload: str) -> bool:
    down = parse_notification(payload)
    return down is None or down.name != "default"


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payloads=st.lists(PAYLOADS, min_size=1, max_size=12))
def test_notify_payloads_malformed_oversized_or_not_json_are_ignored(
    pg_dsn: str, payloads: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="trio_peers"):
        trio.run(_notify_round, pg_dsn, payloads)
    assert records(caplog) == []  # no warning, no error: junk on the channel is only debug
    malformed = [m for m in records(caplog, logging.DEBUG) if "malformed notification" in m]
    assert len(malformed) <= 2 * (len(payloads) + 1)  # one per payload and peer, never more
    assert all(len(m) < 400 for m in malformed)  # the payload is cut in the log line


async def test_deeply_nested_json_notification_is_ignored(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a")) as a:
        assert a.is_leader
        term = a.term
        # 4000 bytes, well under the 8000-byte limit: any client that may NOTIFY can send it.
        await sql.execute("SELECT pg_notify($1, $2)", CHANNEL, "[" * 2000 + "]" * 2000)
        await sql.execute("SELECT pg_notify($1, $2)", CHANNEL, "sentinel")
        await wait_for(lambda: a.statistics().notifications_received >= 2)
        await trio.sleep(0.1)  # give a crashed listener time to take the peer down
        assert a.is_leader and a.term == term


# ---------------------------------------------------------------------- permissions


async def test_role_without_write_permission_raises_at_entry(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sql(dsn) as sql, role(sql, grants="SELECT") as reader:
        with pytest.raises(BackendMisconfigured, match=r"permission denied.*trio_peers"):
            async with open_peer(cfg(as_role(dsn, reader), "a")):
                pass  # pragma: no cover


async def test_write_permission_revoked_while_leading(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sql(dsn) as sql, role(sql, grants="SELECT, INSERT, UPDATE") as app:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(as_role(dsn, app), "a")) as a:
                term = a.term
                assert term is not None
                await sql.execute(f"REVOKE INSERT, UPDATE ON public.trio_peers FROM {app}")
                await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
                rounds, connects = await rounds_in(a, 3 * INTERVAL)
                assert not a.is_leader
                assert rounds <= 4  # retried every interval, not in a loop
                assert connects <= 4
                errors = records(caplog, logging.ERROR)
                assert errors and all("permission denied" in m for m in errors)
                assert len(records(caplog)) <= 6  # one line per interval at most
                await sql.execute(f"GRANT INSERT, UPDATE ON public.trio_peers TO {app}")
                await wait_for(lambda: a.is_leader, limit=INTERVAL * 3)
                assert a.term is not None and a.term >= term


async def test_default_transaction_read_only_means_follower(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sql(dsn) as sql:
        db = await database_of(sql)
        async with open_peer(cfg(dsn, "a")) as a:
            term = a.term
            assert term is not None
        await sql.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a:
                assert not a.is_leader
                window = 3 * INTERVAL
                rounds, connects = await rounds_in(a, window)
                assert not a.is_leader
                assert rounds <= max_failed_rounds(window)
                assert connects <= max_failed_rounds(window)
                warnings = records(caplog)
                assert len(warnings) == 1, warnings  # once per outage, not per round
                assert "read-only" in warnings[0] and "standby" in warnings[0], warnings
                await sql.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
                await reconnect_all(sql)
                await wait_for(lambda: a.is_leader, limit=INTERVAL * 4)
                assert a.term is not None and a.term > term
        assert any("reachable again" in m for m in records(caplog, logging.INFO))


async def test_a_new_cause_during_an_outage_is_logged(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database turns read-only, and the sessions are ended so that it applies:
    the first failure is the lost connection; the lasting cause is the read-only
    database, and the log must say so."""
    async with open_sql(dsn) as sql:
        db = await database_of(sql)
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a:
                assert a.is_leader
                await sql.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
                await reconnect_all(sql)
                await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
                await wait_for(
                    lambda: "read-only" in (a.statistics().last_error or ""), limit=INTERVAL * 2
                )
                await sql.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
        assert any("read-only" in m for m in records(caplog)), records(caplog)


# ---------------------------------------------------------------------- server-side timeouts


@pytest.mark.parametrize(
    ("setting", "cause"),
    [
        ("statement_timeout = '50ms'", "statement timeout"),
        ("lock_timeout = '50ms'", "lock"),
    ],
)
async def test_server_timeout_shorter_than_an_election(
    dsn: str, caplog: pytest.LogCaptureFixture, setting: str, cause: str
) -> None:
    """The table is held locked (SHARE) by another session, so a renewal waits longer than
    the server lets a statement (or a lock wait) take: every round fails, server-side. (A
    row lock would not do: an election does not wait for one, the round is busy.)"""
    async with open_sql(dsn) as sql, open_sql(dsn) as locker:
        db = await database_of(sql)
        await sql.execute(f'ALTER DATABASE "{db}" SET {setting}')
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a:
                term = a.term  # elections are far quicker than 50 ms
                assert term is not None
                await locker.execute("BEGIN")
                await locker.execute("LOCK TABLE public.trio_peers IN SHARE MODE")
                await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
                window = 3 * INTERVAL
                rounds, connects = await rounds_in(a, window)
                assert not a.is_leader
                assert rounds <= max_failed_rounds(window)
                assert connects <= max_failed_rounds(window)
                warnings = records(caplog)
                assert any(cause in m for m in warnings), warnings
                assert len(warnings) <= 3, warnings
                await locker.execute("ROLLBACK")
                await wait_for(lambda: a.is_leader, limit=INTERVAL * 3)
                assert a.term is not None and a.term >= term
        await sql.execute(f'ALTER DATABASE "{db}" RESET ALL')


async def test_idle_in_transaction_session_timeout_does_not_disturb_peers(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Peers never leave a transaction open, so a tiny idle-in-transaction timeout
    (which ends the *session* of whoever does) never fires for them."""
    async with open_sql(dsn) as sql:
        db = await database_of(sql)
        await sql.execute(
            f"ALTER DATABASE \"{db}\" SET idle_in_transaction_session_timeout = '50ms'"
        )
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                assert a.is_leader and not b.is_leader
                term = a.term
                await trio.sleep(3 * INTERVAL)  # a window in which nothing may happen
                assert a.is_leader and a.term == term and not b.is_leader
                for peer in (a, b):
                    stats = peer.statistics()
                    assert stats.connects == 1 and stats.elections_failed == 0
        assert records(caplog) == []
        await sql.execute(f'ALTER DATABASE "{db}" RESET ALL')


# ---------------------------------------------------------------------- connection limits


async def test_database_at_its_connection_limit(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A full database: PostgreSQL refuses the connection with SQLSTATE 53300, as it
    does at max_connections (the shared test server's max_connections is not ours to
    exhaust, so the limit is set on this test's database)."""
    async with open_sql(dsn) as sql:
        db = await database_of(sql)
        try:
            # Superusers may exceed the limit (but count towards it): use a role.
            async with role(sql, grants="SELECT, INSERT, UPDATE") as app:
                role_dsn = as_role(dsn, app)
                # Room for one more session than there are now; the filler takes it.
                await sql.execute(
                    f'ALTER DATABASE "{db}" CONNECTION LIMIT '
                    f"{await sql.fetchval(COUNT_SESSIONS) + 1}"
                )
                async with trio.open_nursery() as nursery:
                    free = await nursery.start(hold_session, role_dsn)  # the last free slot
                    with caplog.at_level(logging.INFO, logger="trio_peers"):
                        async with open_peer(cfg(role_dsn, "a")) as a:
                            assert not a.is_leader
                            window = 3 * INTERVAL
                            rounds, connects = await rounds_in(a, window)
                            assert connects == 0 and not a.is_leader
                            assert rounds <= max_failed_rounds(window)
                            warnings = records(caplog)
                            assert any("too many connections" in m for m in warnings), warnings
                            assert len(warnings) <= 2, warnings
                            free.set()  # a slot is free again
                            await wait_for(lambda: a.is_leader, limit=INTERVAL * 3)
        finally:
            await sql.execute(f'ALTER DATABASE "{db}" CONNECTION LIMIT -1')


# ---------------------------------------------------------------------- the lease table


async def test_lease_table_dropped_while_peers_run(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                assert a.is_leader
                await sql.execute("DROP TABLE public.trio_peers")
                await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
                window = 3 * INTERVAL
                rounds, _ = await rounds_in(a, window)
                assert rounds <= 4 and not a.is_leader and not b.is_leader
                warnings = records(caplog)
                missing = [m for m in warnings if "does not exist" in m and "migrate" in m]
                assert missing, warnings
                assert len(warnings) <= 4, warnings  # once per peer, plus the first failure
                await migrate(dsn)
                await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 3)
                assert a.is_leader != b.is_leader
        assert any("lease table found" in m for m in records(caplog, logging.INFO))


async def test_lease_table_truncated_while_peers_run(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """TRUNCATE forgets the term (documented: only trio-peers may write the table);
    the peers must carry on with exactly one leader, which the table agrees with."""
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                assert a.is_leader
                await sql.execute("TRUNCATE public.trio_peers")

                async def settled() -> bool:
                    row = await sql.row()
                    leaders = [p for p in (a, b) if p.is_leader]
                    return (
                        row is not None
                        and len(leaders) == 1
                        and (leaders[0].node, leaders[0].term) == (row["node"], row["term"])
                    )

                await wait_for(settled, limit=INTERVAL * 3)
                stats = [p.statistics() for p in (a, b)]
                assert sum(s.elections_failed for s in stats) == 0
        assert records(caplog, logging.ERROR) == []


@pytest.mark.parametrize(
    ("ddl", "undo", "cause"),
    [
        (
            "ALTER TABLE public.trio_peers RENAME COLUMN expires_at TO expires",
            "ALTER TABLE public.trio_peers RENAME COLUMN expires TO expires_at",
            "expires_at",
        ),
        (
            "ALTER TABLE public.trio_peers ALTER COLUMN term TYPE integer",
            "ALTER TABLE public.trio_peers ALTER COLUMN term TYPE bigint",
            "term",
        ),
    ],
)
async def test_lease_table_altered_while_peers_run(
    dsn: str, caplog: pytest.LogCaptureFixture, ddl: str, undo: str, cause: str
) -> None:
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a:
                term = a.term
                assert term is not None
                await sql.execute(ddl)
                await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
                window = 3 * INTERVAL
                rounds, connects = await rounds_in(a, window)
                assert not a.is_leader
                assert rounds <= 5 and connects <= 5
                errors = records(caplog, logging.ERROR)
                assert any("cannot hold trio-peers leases" in m and cause in m for m in errors), (
                    records(caplog)
                )
                assert len(records(caplog)) <= 6
                await sql.execute(undo)
                await wait_for(lambda: a.is_leader, limit=INTERVAL * 3)
                assert a.term is not None and a.term >= term  # the row kept its term
        row = await sql.row()
        assert row["term"] >= term


async def test_dba_deletes_the_lease_row(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """The term is gone with the row (documented); one leader, agreeing with the table."""
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                assert a.is_leader
                await sql.execute("DELETE FROM public.trio_peers WHERE name = 'default'")

                async def settled() -> bool:
                    row = await sql.row()
                    leaders = [p for p in (a, b) if p.is_leader]
                    return (
                        row is not None
                        and len(leaders) == 1
                        and (leaders[0].node, leaders[0].term) == (row["node"], row["term"])
                    )

                await wait_for(settled, limit=INTERVAL * 3)
        assert records(caplog, logging.ERROR) == []


async def test_dba_edits_the_lease_row_node(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Another node's name in the live row: the leader's renewal is refused, it steps
    down at once, and the next tenure (after that lease expires) has a higher term."""
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                term = a.term
                assert term is not None
                await sql.execute("UPDATE public.trio_peers SET node = 'intruder'")
                await wait_for(lambda: not a.is_leader, limit=INTERVAL)
                assert not b.is_leader
                await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 3)
                now = a.term if a.is_leader else b.term
                assert now is not None and now == term + 1
        lost = [m for m in records(caplog, logging.INFO) if "leadership lost by a" in m]
        assert lost
        assert records(caplog, logging.ERROR) == []


async def test_dba_raises_the_term_in_the_lease_row(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A term edited upwards: the holder's renewal no longer matches, it steps down,
    and terms keep growing from the edited value."""
    async with open_sql(dsn) as sql:
        with caplog.at_level(logging.INFO, logger="trio_peers"):
            async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
                term = a.term
                assert term is not None
                await sql.execute("UPDATE public.trio_peers SET term = term + 10")
                await wait_for(lambda: not a.is_leader, limit=INTERVAL)
                await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 3)
                now = a.term if a.is_leader else b.term
                assert now == term + 11
        assert records(caplog, logging.ERROR) == []
