"""open_peer against a real PostgreSQL (started by the suite): semantics, regressions, faults.

Real clock, short intervals, and every wait bounded by a timeout.
"""

from __future__ import annotations

import datetime
import logging
import math
import ssl
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import trio
import trio.testing

from trio_peers import (
    BackendMisconfigured,
    BackendUnavailable,
    Peer,
    PeerConfig,
    SchemaError,
    migrate,
    open_peer,
    open_session,
)
from trio_peers._asyncpg import _mapped, _Statements
from trio_peers.testing import PostgresServer

from ._pgutil import (
    SQL,
    Proxy,
    Recorder,
    assert_no_overlap,
    open_sql,
    peer_config,
    peer_in_task,
    run_peer,
    wait_for,
)

INTERVAL = 1.0

pytestmark = pytest.mark.timeout(60)


cfg = peer_config


# ---------------------------------------------------------------------- basics


async def test_leads_renews_and_hands_over_gracefully(dsn: str) -> None:
    async with open_sql(dsn) as sql, trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg(dsn, "a")) as (a, stop_a):
            assert a.is_leader and a.term == 1
            async with open_peer(cfg(dsn, "b")) as b:
                assert not b.is_leader
                first = await sql.row()
                await trio.sleep(INTERVAL * 1.5)  # several renewals
                later = await sql.row()
                assert later["term"] == 1 and later["node"] == "a"
                assert later["expires_at"] > first["expires_at"]
                assert later["started_at"] == first["started_at"]
                stop_a.set()
                assert await b.wait_leader() == 2


async def test_lease_times_come_from_the_database_clock(dsn: str) -> None:
    async with open_sql(dsn) as sql:
        before = await sql.fetchval("SELECT clock_timestamp()")
        async with open_peer(cfg(dsn, "a", interval=7.5)) as a:
            assert a.is_leader
            after = await sql.fetchval("SELECT clock_timestamp()")
            row = await sql.row()
            assert before <= row["started_at"] <= after
            # The interval is sent as a duration and added on the server.
            assert row["expires_at"] - row["started_at"] == datetime.timedelta(seconds=7.5)
            info = await a.get_leader()
            assert info is not None
            assert (info.node, info.term) == ("a", 1)
            assert info.expires_at.tzinfo is not None


async def test_entry_raises_for_permanent_misconfiguration(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    base = pg_dsn.rsplit("/", 1)[0]
    with pytest.raises(BackendMisconfigured, match="does not exist"):
        async with open_peer(cfg(base + "/no_such_database", "a")):
            pass  # pragma: no cover
    with pytest.raises(BackendMisconfigured):
        async with open_peer(cfg(pg_dsn.replace("postgres@", "no_such_role@"), "a")):
            pass  # pragma: no cover
    with pytest.raises(BackendMisconfigured, match="DSN"):
        async with open_peer(cfg("postgresql://127.0.0.1:notaport/x", "a")):
            pass  # pragma: no cover


@pytest.mark.parametrize("hosts", [1, 2])
async def test_entry_raises_when_the_dsn_requires_tls_that_the_server_lacks(
    dsn: str, hosts: int
) -> None:
    """Regression: sslmode=require against a server without TLS (asyncpg: "rejected SSL
    upgrade", an OSError) was taken for "unreachable now": the entry succeeded as a follower
    and retried for good. Retrying cannot fix it: the entry raises, naming sslmode."""
    parts = urlsplit(dsn)
    netloc = parts.netloc if hosts == 1 else f"{parts.netloc},{parts.netloc.split('@')[1]}"
    tls = urlunsplit(parts._replace(netloc=netloc, query="sslmode=require"))
    with pytest.raises(BackendMisconfigured, match="sslmode"):
        async with open_peer(cfg(tls, "a")):
            pytest.fail("entered although no connection can be made")


async def test_unreachable_at_entry_is_follower_then_leads(dsn: str, pg: PostgresServer) -> None:
    await trio.to_thread.run_sync(pg.stop)
    try:
        async with open_peer(cfg(dsn, "a")) as a:
            assert not a.is_leader
            assert a.statistics().last_error is not None
            assert not a.statistics().connected
            await trio.to_thread.run_sync(pg.start_again)
            with trio.fail_after(INTERVAL * 3):
                await a.wait_leader()
    finally:
        if not pg.is_running:
            await trio.to_thread.run_sync(pg.start_again)


async def test_missing_table_warns_and_leads_after_migrate(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg(pg_dsn, "a")) as a:
            assert not a.is_leader
            await migrate(pg_dsn)
            with trio.fail_after(INTERVAL * 3):
                await a.wait_leader()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "migrate" in messages[0] and "public.trio_peers" in messages[0]


async def test_a_follower_warns_of_a_leader_with_a_longer_interval(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's lease, as PostgreSQL reports it to a denied bid, outlasts the follower's
    interval: the follower (an open_peer, and a name of a session) warns that the name's
    peers run with different intervals."""
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg(dsn, "long", interval=4 * INTERVAL)) as leader:
            assert leader.is_leader
            async with (
                open_peer(cfg(dsn, "short")) as follower,
                open_session(dsn, node="shared") as session,
                session.open_peer(name=leader.name, interval=INTERVAL) as named,
            ):
                await wait_for(
                    lambda: (
                        follower.statistics().elections_run >= 2
                        and named.statistics().elections_run >= 2
                    ),
                    limit=10 * INTERVAL,
                )
                assert leader.is_leader and not follower.is_leader and not named.is_leader
    warned = [r.getMessage() for r in caplog.records if "longer than this" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in warned) == [
        "trio-peers default (shared)",
        "trio-peers default (short)",
    ]
    assert all("the leader long holds a lease" in m for m in warned)


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE public.trio_peers (name text, node text, term bigint, "
        "started_at timestamptz, expires_at timestamptz)",  # no primary key (oban#933)
        "CREATE TABLE public.trio_peers (name text PRIMARY KEY, node text, "
        "started_at timestamptz, expires_at timestamptz)",  # no term column
        "CREATE TABLE public.trio_peers (name text PRIMARY KEY, node text, term int, "
        "started_at timestamp, expires_at timestamptz)",  # wrong types
    ],
)
async def test_wrong_table_shape_is_a_clear_error_at_entry(pg_dsn: str, ddl: str) -> None:
    async with open_sql(pg_dsn) as sql:
        await sql.execute(ddl)
    with pytest.raises(SchemaError, match="cannot hold trio-peers leases"):
        async with open_peer(cfg(pg_dsn, "a")):
            pass  # pragma: no cover
    with pytest.raises(SchemaError):
        await migrate(pg_dsn)


async def test_migrate_is_idempotent_and_safe_concurrently(pg_dsn: str) -> None:
    results: list[bool] = []

    async def run() -> None:
        results.append(await migrate(pg_dsn, prefix="app", table="leases"))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(run)
    assert sorted(results) == [False] * 5 + [True]
    assert await migrate(pg_dsn, prefix="app", table="leases") is False
    async with open_sql(pg_dsn) as sql:
        persistence = await sql.fetchval(
            "SELECT relpersistence FROM pg_class WHERE oid = 'app.leases'::regclass"
        )
        assert persistence == b"p"  # logged by default: terms survive a crash-restart


async def test_migrate_unlogged_option(pg_dsn: str) -> None:
    await migrate(pg_dsn, table="fast_leases", unlogged=True)
    async with open_sql(pg_dsn) as sql:
        kind = await sql.fetchval(
            "SELECT relpersistence FROM pg_class WHERE oid = 'public.fast_leases'::regclass"
        )
        assert kind == b"u"


# ---------------------------------------------------------------------- regressions


async def test_oban_1488_rollback_then_takeover_never_renews_the_new_holder(dsn: str) -> None:
    """A failed (rolled back) round, a takeover meanwhile, then the old leader's rounds."""
    async with open_sql(dsn) as sql, open_sql(dsn) as locker, open_peer(cfg(dsn, "a")) as a:
        assert a.is_leader
        # Lock the row so a cannot renew (busy rounds): a stops leading at its deadline...
        await locker.execute("BEGIN")
        await locker.execute("SELECT * FROM public.trio_peers FOR UPDATE")
        await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
        # ...while another node takes the lease over (as Oban's take_over helper does).
        await locker.execute(
            "UPDATE public.trio_peers SET node = 'b', term = term + 1, started_at = now(), "
            "expires_at = now() + interval '30 seconds'"
        )
        await locker.execute("COMMIT")
        taken = await sql.row()
        rounds = a.statistics().elections_run
        await wait_for(lambda: a.statistics().elections_run >= rounds + 3, limit=INTERVAL * 3)
        # a kept bidding with its old term: it neither renewed b's row nor leads.
        assert not a.is_leader
        now = await sql.row()
        assert (now["node"], now["term"], now["expires_at"]) == ("b", 2, taken["expires_at"])


async def test_oban_1488_a_renewal_cannot_extend_another_nodes_row(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a")) as a:
        assert a.is_leader
        # Someone else's tenure replaces a's (as after a takeover), same term value.
        await sql.execute("UPDATE public.trio_peers SET node = 'other'")
        before = await sql.row()
        await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
        after = await sql.row()
        assert after["node"] == "other"
        assert after["expires_at"] == before["expires_at"]  # untouched


async def test_oban_py_32_same_node_value_never_both_lead(dsn: str) -> None:
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg(dsn, "web-1")) as (a, stop_a):
            async with open_peer(cfg(dsn, "web-1")) as b:
                nursery.start_soon(rec.watch, a)
                nursery.start_soon(rec.watch, b)
                for _ in range(10):
                    await trio.sleep(INTERVAL / 4)
                    assert not (a.is_leader and b.is_leader)
                assert a.is_leader
                t0 = trio.current_time()
                stop_a.set()
                await b.wait_leader()  # fast handover works between equal node values
                assert trio.current_time() - t0 < INTERVAL / 2
                nursery.cancel_scope.cancel()
    assert_no_overlap(rec.intervals())


async def test_river_286_own_notify_is_ignored(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a", interval=30.0)) as a:
        async with open_peer(cfg(dsn, "b", interval=30.0)) as b:
            assert await a.resign()
            await b.wait_leader()
            assert not a.is_leader
            assert (await sql.row())["node"] == "b"
            stats = a.statistics()
            assert stats.notifications_ignored >= 1  # its own "down"


async def test_river_134_notify_wakes_followers_in_milliseconds(dsn: str) -> None:
    # With a 30 s interval, only the NOTIFY path can hand over this fast.
    latencies = []
    async with trio.open_nursery() as nursery:
        async with open_peer(cfg(dsn, "b", interval=30.0)) as b:
            for i in range(5):
                if b.is_leader:
                    await b.resign()
                async with peer_in_task(nursery, cfg(dsn, f"a{i}", interval=30.0)) as (a, stop):
                    await a.wait_leader()
                    t0 = trio.current_time()
                    stop.set()
                    await b.wait_leader()
                    latencies.append(trio.current_time() - t0)
    print("graceful handover latencies (ms):", [round(x * 1000, 2) for x in latencies])
    assert max(latencies) < 1.0


async def test_notify_channel_is_derived_and_end_to_end(dsn: str) -> None:
    await migrate(dsn, prefix="custom", table="my_leases")
    config = cfg(dsn, "x", prefix="custom", table="my_leases")
    assert config.channel == "custom.my_leases"
    async with open_sql(dsn) as sql:
        got: list[str] = []

        def listener(*args: object) -> None:
            got.append(str(args[-1]))

        await trio_asyncio_add_listener(sql, "custom.my_leases", listener)
        async with open_peer(config) as p:
            assert p.is_leader
        await wait_for(lambda: len(got) == 1)
        assert '"down":"default"' in got[0]


async def trio_asyncio_add_listener(sql: SQL, channel: str, cb: object) -> None:
    await sql.aio(sql.conn.add_listener)(channel, cb)


# ---------------------------------------------------------------------- shutdown


async def test_cancelled_outer_scope_still_releases_and_notifies(dsn: str) -> None:
    async with open_sql(dsn) as sql, trio.open_nursery() as nursery:
        with trio.CancelScope() as outer:
            async with open_peer(cfg(dsn, "a", interval=30.0)) as a:
                assert a.is_leader
                b, stop_b = await nursery.start(run_peer, cfg(dsn, "b", interval=30.0))
                assert not b.is_leader
                outer.cancel()
                await trio.sleep_forever()
        assert outer.cancelled_caught
        with trio.fail_after(2):  # by NOTIFY, not after the 30 s interval
            await b.wait_leader()
        row = await sql.row()
        assert (row["node"], row["term"]) == ("b", 2)
        stop_b.set()


async def test_hung_backend_during_cleanup_is_abandoned_after_cleanup_timeout(dsn: str) -> None:
    async with open_sql(dsn) as locker:
        async with open_peer(cfg(dsn, "a", cleanup_timeout=0.5, interval=30.0)) as a:
            assert a.is_leader
            await locker.execute("BEGIN")
            await locker.execute("SELECT * FROM public.trio_peers FOR UPDATE")  # release blocks
            t0 = trio.current_time()
        elapsed = trio.current_time() - t0
        await locker.execute("ROLLBACK")
        assert 0.5 <= elapsed < 3 * 0.5 + 1.0


async def test_body_exception_propagates_unwrapped_after_release(dsn: str) -> None:
    async with open_sql(dsn) as sql:
        led = False
        with pytest.raises(ZeroDivisionError):  # noqa: PT012
            async with open_peer(cfg(dsn, "a")) as a:
                led = a.is_leader
                _ = 1 / 0
        assert led
        assert (await sql.row())["live"] is False


# ---------------------------------------------------------------------- terms


async def test_term_strictly_increases_across_resign_expiry_and_restart(
    dsn: str, pg: PostgresServer
) -> None:
    terms: list[int] = []
    async with open_sql(dsn) as sql:
        async with open_peer(cfg(dsn, "a")) as a:
            terms.append(await a.wait_leader())
            await a.resign()  # 1. resign
        async with open_peer(cfg(dsn, "b")) as b:
            terms.append(await b.wait_leader())
        # 2. expiry: a lease nobody renews, taken over
        await sql.expire()
        async with open_peer(cfg(dsn, "c")) as c:
            terms.append(await c.wait_leader())
            await sql.expire()
            await wait_for(lambda: c.term not in (None, terms[-1]), limit=INTERVAL * 3)
            terms.append(await c.wait_leader())
    # 3. an immediate-mode (crash-like) restart of PostgreSQL
    await trio.to_thread.run_sync(lambda: pg.restart(mode="immediate"))
    async with open_peer(cfg(dsn, "d")) as d:
        terms.append(await d.wait_leader())
    assert terms == sorted(set(terms)), terms
    assert len(terms) == 5


async def test_get_leader_is_none_when_expired(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a", interval=30.0)) as a:
        assert (await a.get_leader()) is not None
        await a.resign()
        assert (await a.get_leader()) is None
        assert (await sql.row())["live"] is False


# ---------------------------------------------------------------------- lease safety


async def test_paused_leader_reports_false_before_its_lease_can_be_taken(dsn: str) -> None:
    """The leader's renewal is blocked; it must distrust before the DB lease ends."""
    async with open_sql(dsn) as sql, open_sql(dsn) as locker:
        config = cfg(dsn, "a", interval=2.0, leader_boost=1.0, statement_timeout=1.0)
        async with open_peer(config) as a:
            changes = a.leadership()
            assert (await changes.receive()).is_leader
            await locker.execute("BEGIN")
            await locker.execute("SELECT * FROM public.trio_peers FOR UPDATE")
            lost = await changes.receive()
            assert not lost.is_leader and not a.is_leader
            # How much of the database lease was left when trust ended (lost.at), from a
            # query sent at `sent`: what it says, plus the time that passed since (a lower
            # bound, so a slow scheduler cannot make this pass or fail by chance). The
            # renewals were busy (the row is locked), so trust ends at its deadline, a margin
            # of interval * max_clock_drift (20 ms) before the lease.
            sent = trio.current_time()
            remaining = await sql.fetchval(
                "SELECT EXTRACT(EPOCH FROM expires_at - clock_timestamp())::float8 "
                "FROM public.trio_peers WHERE name = 'default'"
            )
            await locker.execute("ROLLBACK")
            assert remaining + (sent - lost.at) > 0


async def test_no_overlap_with_churn(dsn: str) -> None:
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        peers = [await nursery.start(_run_recorded, cfg(dsn, f"n{i}"), rec) for i in range(3)]
        for i in range(3, 7):
            leader = next((p for p in peers if p[0].is_leader), None)
            if leader is not None:
                leader[1].set()
                peers.remove(leader)
                peers.append(await nursery.start(_run_recorded, cfg(dsn, f"n{i}"), rec))
            await wait_for(lambda: any(p[0].is_leader for p in peers), limit=INTERVAL * 3)
        for _, stop in peers:
            stop.set()
    intervals = rec.intervals()
    assert_no_overlap(intervals)
    assert all(iv[3] != math.inf for iv in intervals)  # every tenure's end was observed
    assert len({iv[1] for iv in intervals}) >= 4


async def _run_recorded(
    config: PeerConfig,
    rec: Recorder,
    *,
    task_status: trio.TaskStatus[tuple[Peer, trio.Event]],
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async with open_peer(config) as peer:
            nursery.start_soon(rec.watch, peer)  # ends by itself when the peer closes
            task_status.started((peer, stop))
            await stop.wait()


# ---------------------------------------------------------------------- faults


async def test_terminated_backend_steps_down_logs_once_and_resumes(
    dsn: str, pg: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="trio_peers"):
        async with open_peer(cfg(dsn, "a")) as a:
            changes = a.leadership()
            first = await changes.receive()
            assert first.is_leader
            killed = await trio.to_thread.run_sync(
                lambda: pg.terminate_backends(application_name="trio-peers")
            )
            assert killed >= 1
            await wait_for(lambda: a.statistics().connects == 2 and a.is_leader)
            latest = await changes.receive()
            # It stepped down (one skipped state) and resumed the same tenure.
            assert latest.is_leader and latest.term == first.term
            assert latest.version == first.version + 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "connection lost" in warnings[0].getMessage()
    infos = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "gained by a (term 1)" in infos and "lost by a (term 1)" in infos


async def test_server_restart_steps_down_and_recovers(dsn: str, pg: PostgresServer) -> None:
    """A restart costs the leader its trust (it cannot know the lease survived), then a leader
    exists again, and never two at once.

    The restart may be noticed through the connection-lost callback alone, with no failed
    round (the peers' rounds may all fall before or after it), so the test follows what users
    see, the leadership channels, and not the failure counters.
    """
    recorder = Recorder()
    async with open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
        assert a.is_leader
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recorder.watch, a)
            nursery.start_soon(recorder.watch, b)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(lambda: pg.restart(mode="fast"))
            # The first leadership interval (a's, term 1) has ended...
            await wait_for(lambda: recorder.intervals()[0][3] < math.inf, limit=INTERVAL * 4)
            # ...and a leader exists again.
            await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 4)
            nursery.cancel_scope.cancel()
        assert not (a.is_leader and b.is_leader)
    intervals = recorder.intervals()
    assert intervals[0][:2] == ("a", 1)
    assert len(intervals) >= 2
    assert_no_overlap(intervals)


async def test_silent_partition_times_out_steps_down_and_recovers(
    dsn: str, pg: PostgresServer
) -> None:
    """No FIN, no RST: only statement timeouts notice (DRIVER P9: orphaned cancel requests)."""
    proxy = Proxy(pg.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        proxied = dsn.replace(f":{pg.port}/", f":{proxy.port}/")
        config = cfg(proxied, "a", connect_timeout=0.5)
        async with open_peer(config) as a:
            assert a.is_leader
            proxy.partition()
            await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
            assert "timed out" in (a.statistics().last_error or "")
            await trio.sleep(INTERVAL)  # reconnect attempts time out, nothing crashes
            proxy.heal()
            with trio.fail_after(INTERVAL * 4):
                await a.wait_leader()
        nursery.cancel_scope.cancel()


TERMINATE = b"X\x00\x00\x00\x04"  # the protocol's Terminate message


@pytest.mark.parametrize("form", ["open_peer", "session"])
async def test_exit_sends_terminate_and_does_not_wait_for_the_server_to_hang_up(
    dsn: str, pg: PostgresServer, form: str
) -> None:
    """A peer's exit ends its connection as libpq does: Terminate, then the socket is
    dropped. It never waits for the server's own close: asyncpg's ``close()`` did, which
    cost 2-3 ms of every exit (the server process's exit), and here, where the proxy
    holds the server's close back, it would wait out the whole ``cleanup_timeout``."""
    proxy = Proxy(pg.port, hold_server_close=True)
    async with open_sql(dsn) as sql, trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        proxied = dsn.replace(f":{pg.port}/", f":{proxy.port}/")
        async with AsyncExitStack() as stack:
            if form == "session":
                session = await stack.enter_async_context(
                    open_session(proxied, cleanup_timeout=5.0)
                )
                peer = await stack.enter_async_context(session.open_peer(name="hang-up"))
            else:
                config = cfg(proxied, "a", name="hang-up", cleanup_timeout=5.0)
                peer = await stack.enter_async_context(open_peer(config))
            assert peer.is_leader
            started = trio.current_time()
        assert trio.current_time() - started < 2.0  # not the 5 s cleanup_timeout
        assert proxy.client_tail.endswith(TERMINATE)
        # Once: a second Terminate (asyncpg's terminate() sends one itself) cost every exit
        # one more write, a system call of a few hundred microseconds on a small VM.
        assert not proxy.client_tail.endswith(TERMINATE * 2)
        assert not (await sql.row("hang-up"))["live"]  # released first
        # The server ended the session on the Terminate: its backend goes away.
        await wait_for(lambda: _no_peer_connections(sql), limit=5)
        nursery.cancel_scope.cancel()


async def test_statement_timeout_means_follower(dsn: str) -> None:
    async with open_sql(dsn) as locker, open_peer(cfg(dsn, "a")) as a:
        assert a.is_leader
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE public.trio_peers IN ACCESS EXCLUSIVE MODE")
        await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
        await locker.execute("ROLLBACK")
        await wait_for(lambda: a.is_leader, limit=INTERVAL * 2)


async def test_malformed_notifications_never_crash_the_peer(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a")) as a:
        for payload in ["not json", "{}", '{"down": 5}', "[1,2]", '{"down":"default"}']:
            await sql.execute("SELECT pg_notify('public.trio_peers', $1)", payload)
        await wait_for(lambda: a.statistics().notifications_received >= 5)
        assert a.statistics().notifications_ignored == 5
        assert a.is_leader


async def test_listen_false_still_elects_and_hands_over(dsn: str) -> None:
    async with trio.open_nursery() as nursery:
        async with peer_in_task(nursery, cfg(dsn, "a", listen=False)) as (a, stop):
            async with open_peer(cfg(dsn, "b", listen=False)) as b:
                assert a.is_leader
                t0 = trio.current_time()
                stop.set()
                with trio.fail_after(INTERVAL * 2):
                    await b.wait_leader()
                assert trio.current_time() - t0 > 0.05  # by polling, not by NOTIFY


async def test_names_and_schemas_do_not_interfere(dsn: str) -> None:
    await migrate(dsn, prefix="other")
    async with (
        open_peer(cfg(dsn, "a", name="cron", interval=30.0)) as a,
        open_peer(cfg(dsn, "b", name="pruner", interval=30.0)) as b,
        open_peer(cfg(dsn, "c", prefix="other", name="cron", interval=30.0)) as c,
        open_peer(cfg(dsn, "d", name="cron", interval=30.0)) as d,
    ):
        assert a.is_leader and b.is_leader and c.is_leader and not d.is_leader
        heard_by_c = c.statistics().notifications_received
        assert await b.resign()  # another name: d must not be woken
        assert await a.resign()
        with trio.fail_after(2):
            await d.wait_leader()  # the NOTIFY reached public's listeners...
        assert d.statistics().notifications_ignored >= 1  # (b's "pruner" down)
        assert c.is_leader  # ...and not the other schema's
        assert c.statistics().notifications_received == heard_by_c


async def test_one_connection_per_peer(dsn: str) -> None:
    async with open_sql(dsn) as sql:
        async with open_peer(cfg(dsn, "a")), open_peer(cfg(dsn, "b")), open_peer(cfg(dsn, "c")):
            await trio.sleep(INTERVAL)
            count = await sql.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'trio-peers' AND datname = current_database()"
            )
            assert count == 3
        await wait_for(lambda: _no_peer_connections(sql), limit=5)


async def _no_peer_connections(sql: SQL) -> bool:
    count = await sql.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'trio-peers' AND datname = current_database()"
    )
    return bool(count == 0)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.InternalClientError("cannot switch to state 12"),  # DRIVER P10
        asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
    ],
)
def test_driver_errors_that_mean_unavailable(exc: BaseException) -> None:
    with pytest.raises(BackendUnavailable) as info, _mapped():
        raise exc
    assert info.value.__cause__ is exc


def test_permanent_driver_errors() -> None:
    with pytest.raises(BackendMisconfigured), _mapped(connecting=True):
        raise asyncpg.exceptions.InvalidPasswordError("bad password")
    # A server certificate refused (sslmode=verify-full with the wrong root or host name).
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"
    with (
        pytest.raises(BackendMisconfigured, match="self-signed certificate"),
        _mapped(connecting=True),
    ):
        raise refused
    with pytest.raises(BackendMisconfigured), _mapped(connecting=True):
        raise ValueError("invalid DSN")


# ---------------------------------------------------------------------- more regressions
# One test per pitfall in the anchors' list that the tests above do not already name.


async def test_river_197_a_follower_bid_never_touches_a_live_lease(dsn: str) -> None:
    # river#197/#199: a WHERE on EXCLUDED made every bidder bump the expiry and "win".
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a", interval=30.0)) as a:
        assert a.is_leader
        before = await sql.row()
        async with open_peer(cfg(dsn, "b", interval=30.0)) as b:
            for _ in range(3):
                b.request_election()
                await trio.sleep(0.01)
            assert not b.is_leader
            assert b.statistics().elections_run >= 2
        after = await sql.row()
        assert (after["node"], after["term"]) == ("a", 1)
        assert after["expires_at"] == before["expires_at"]


async def test_river_1213_a_stale_release_cannot_end_a_newer_tenure(dsn: str) -> None:
    # A delayed resign of an old term of the same node must not release its newer term.
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a", interval=30.0)) as a:
        assert a.term == 1
        await sql.expire()
        await sql.execute("UPDATE public.trio_peers SET term = 2, expires_at = now() + '30 s'")
        released = await sql.fetch(
            "WITH r AS (UPDATE public.trio_peers SET expires_at = now() "
            "WHERE name = 'default' AND node = 'a' AND term = 1 AND expires_at > now() "
            "RETURNING name) SELECT pg_notify('public.trio_peers', 'x') FROM r"
        )
        assert released == []
        assert (await sql.row())["live"] is True


async def test_oban_9d60b5a1_a_missing_row_is_tolerated(dsn: str) -> None:
    # An UNLOGGED table is emptied by a crash, and an operator may DELETE rows. That
    # breaks the lease (documented in Guarantees; the default table is LOGGED), but
    # the peers must not crash: the row comes back and elections go on.
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a")) as a, open_peer(cfg(dsn, "b")) as b:
        assert a.is_leader
        rounds = a.statistics().elections_run + b.statistics().elections_run
        await sql.execute("DELETE FROM public.trio_peers")

        async def recovered() -> bool:
            row = await sql.row()
            done = a.statistics().elections_run + b.statistics().elections_run >= rounds + 4
            return row is not None and row["live"] and done

        await wait_for(recovered, limit=INTERVAL * 3)
        assert a.statistics().elections_failed == b.statistics().elections_failed == 0
        await wait_for(lambda: a.is_leader != b.is_leader, limit=INTERVAL * 2)


async def test_river_1077_peers_use_a_dedicated_connection_not_the_apps_pool(dsn: str) -> None:
    # river#1077/#695: elections starved by an exhausted application pool. A peer
    # owns its connection; exhausting every other slot does not starve it.
    async with open_sql(dsn) as sql, open_peer(cfg(dsn, "a")) as a:
        pids = await sql.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'trio-peers' "
            "AND datname = current_database()"
        )
        assert len(pids) == 1
        rounds = a.statistics().elections_run
        await wait_for(lambda: a.statistics().elections_run >= rounds + 2, limit=INTERVAL * 2)
        assert a.is_leader


async def test_p1_a_raising_notification_callback_cannot_kill_the_loop(dsn: str) -> None:
    from trio_peers._asyncpg import AsyncpgBackend

    def explode(_payload: str) -> None:
        raise RuntimeError("callback bug")

    config = cfg(dsn, "a")
    async with AsyncpgBackend().open(config) as connector, open_sql(dsn) as sql:
        conn = await connector.connect(on_notification=explode, on_lost=lambda: None)
        await sql.execute("SELECT pg_notify('public.trio_peers', 'boom')")
        await trio.sleep(0.05)
        outcome = await conn.elect(node="a", held_term=None, statement_timeout=1.0)
        assert outcome.term == 1  # the loop and the connection still work
        await conn.aclose()


async def test_p2_a_cancelled_round_leaves_the_connection_usable(dsn: str) -> None:
    from trio_peers._asyncpg import AsyncpgBackend

    config = cfg(dsn, "a")
    async with AsyncpgBackend().open(config) as connector, open_sql(dsn) as locker:
        conn = await connector.connect(on_notification=lambda _: None, on_lost=lambda: None)
        first = await conn.elect(node="a", held_term=None, statement_timeout=1.0)
        await locker.execute("BEGIN")
        # A table lock (a row lock would only make the round busy: it does not wait for one).
        await locker.execute("LOCK TABLE public.trio_peers IN ACCESS EXCLUSIVE MODE")
        with trio.move_on_after(0.1) as scope:
            await conn.elect(node="a", held_term=first.term, statement_timeout=5.0)
        assert scope.cancelled_caught
        await locker.execute("ROLLBACK")
        # Not left "idle in transaction (aborted)": the next statement works.
        again = await conn.elect(node="a", held_term=first.term, statement_timeout=1.0)
        assert again.term == first.term
        await conn.aclose()


async def test_unlogged_table_warns_once_at_entry_naming_the_lost_guarantee(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate(pg_dsn, table="fast_leases", unlogged=True)
    config = cfg(pg_dsn, "a", table="fast_leases")
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(config) as a:
            assert a.is_leader  # still works: a warning, not an error
            await a.resign()  # reconnects do not repeat the warning
            await trio.sleep(INTERVAL * 0.5)
    warnings = [r.getMessage() for r in caplog.records if "UNLOGGED" in r.getMessage()]
    assert len(warnings) == 1
    assert "fencing terms can start again" in warnings[0]
    assert "ALTER TABLE" in warnings[0] and "SET LOGGED" in warnings[0]


async def test_logged_table_gives_no_unlogged_warning(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with open_peer(cfg(dsn, "a")) as a:
            assert a.is_leader
    assert not [r for r in caplog.records if "UNLOGGED" in r.getMessage()]


async def test_row_locked_by_another_transaction_is_busy_not_a_fault(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction holding the lease row (a long fenced write): the election statement does
    not wait for it. The leader keeps its trust deadline (then steps down), nobody takes over
    while the row is held, no peer reconnects, each logs once; the row freed, a leader again."""
    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with (
            open_sql(dsn) as locker,
            open_peer(cfg(dsn, "a")) as a,
            open_peer(cfg(dsn, "b")) as b,
        ):
            assert a.is_leader
            await locker.execute("BEGIN")
            await locker.execute("SELECT 1 FROM trio_peers WHERE name = 'default' FOR UPDATE")
            deadline = a._core.trusted_until
            await wait_for(lambda: not a.is_leader, limit=INTERVAL * 2)
            assert trio.current_time() >= deadline  # the renewals were busy, not failed
            await trio.sleep(INTERVAL * 2)  # the lease expired meanwhile: still nobody leads
            assert not (a.is_leader or b.is_leader)
            for peer in (a, b):
                stats = peer.statistics()
                assert stats.connects == 1, stats
                assert stats.elections_failed == 0, stats.last_error
            assert a.statistics().elections_busy >= 1
            await locker.execute("ROLLBACK")
            await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings, "the lock is worth one warning"
    assert all("locked by another transaction" in w for w in warnings)
    assert len(warnings) <= 2  # one per peer at most


# ------------------------------------------- statements run in the calling Trio task


async def test_statements_run_in_the_trio_task_and_survive_cancellation(dsn: str) -> None:
    """_Statements steps asyncpg's query coroutines in the calling task (no asyncio task per
    statement). A statement cancelled by Trio, or timed out by asyncpg, is cancelled at the
    server, raises as it would through aio_as_trio, and leaves the connection usable: the
    next statement, which asyncpg makes wait for that cancellation under asyncio.timeout
    (it needs an asyncio task), runs as a task of the loop, and the ones after it in the
    calling task again. Regression guard: run in the calling task, that next statement
    failed with "Timeout should be used inside a task"."""
    async with open_sql(dsn) as sql:
        conn, loop = sql.conn, sql.loop
        statements = _Statements(loop)  # type: ignore[arg-type]
        sent: list[str] = []
        assert (
            await statements.run(lambda: conn.fetchval("SELECT 41 + 1"), lambda: sent.append("x"))
            == 42
        )
        assert sent == ["x"]
        with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
            await statements.run(lambda: conn.fetchval("SELECT 1 / 0"))
        for _ in range(2):
            started = trio.current_time()
            with trio.move_on_after(0.2) as scope:
                await statements.run(lambda: conn.fetchval("SELECT pg_sleep(30)"))
            assert scope.cancelled_caught and trio.current_time() - started < 5
            assert await statements.run(lambda: conn.fetchval("SELECT 2")) == 2
            assert await statements.run(lambda: conn.fetchval("SELECT 3")) == 3
        with pytest.raises(TimeoutError):
            await statements.run(lambda: conn.fetchval("SELECT pg_sleep(30)", timeout=0.2))
        assert await statements.run(lambda: conn.fetchval("SELECT 4")) == 4
        # Nothing of the cancelled statements runs on: the backend is idle.
        busy = await statements.run(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
                " AND state = 'active'"
            )
        )
        assert busy == 0


async def test_statements_of_a_cancelled_caller_are_never_sent(dsn: str) -> None:
    """A caller already cancelled sends nothing (as an asyncio task cancelled before its
    first step): regression, the statement was written and could commit (an election that
    won a term its peer then never released)."""
    async with open_sql(dsn) as sql:
        conn = sql.conn
        statements = _Statements(sql.loop)  # type: ignore[arg-type]
        await statements.run(lambda: conn.execute("CREATE TABLE sent (x int)"))
        with trio.CancelScope() as scope:
            scope.cancel()
            await statements.run(lambda: conn.execute("INSERT INTO sent VALUES (1)"))
        assert scope.cancelled_caught
        assert await statements.run(lambda: conn.fetchval("SELECT count(*) FROM sent")) == 0


async def test_statements_track_a_cancellation_left_by_a_multi_statement_task(
    dsn: str,
) -> None:
    """A coroutine run as a task (in_task: preparing a table) that times out leaves asyncpg
    cancelling its statement: the next statement must run as a task too. Regression: it ran
    in the calling task and failed with "Timeout should be used inside a task", which
    dropped the whole session connection."""
    async with open_sql(dsn) as sql:
        conn = sql.conn
        statements = _Statements(sql.loop)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            await statements.run(
                lambda: conn.fetchval("SELECT pg_sleep(30)", timeout=0.2), in_task=True
            )
        assert await statements.run(lambda: conn.fetchval("SELECT 5")) == 5


async def test_a_statement_failing_at_once_still_checkpoints(dsn: str) -> None:
    async with open_sql(dsn) as sql:
        conn = sql.conn
        statements = _Statements(sql.loop)  # type: ignore[arg-type]
        conn.terminate()
        with trio.testing.assert_checkpoints(), pytest.raises(asyncpg.InterfaceError):
            await statements.run(lambda: conn.fetchval("SELECT 1"))
