"""Fenced writes in the same database (Peer.fence, Peer.fenced_transaction), on PostgreSQL.

A fence is a statement run inside the writer's own transaction: it returns a row only while
the tenure holds its lease, and then holds the lease row against any takeover until that
transaction ends, so a fenced write of tenure T commits before any later tenure begins.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
import trio
import trio_asyncio

from trio_peers import Fence, Peer, TenureLost, open_peer, open_session
from trio_peers.testing import PostgresServer

from ._pgutil import open_sql, peer_config, wait_for

pytestmark = pytest.mark.postgres

INTERVAL = 1.0
WRITES = "CREATE TABLE writes (term bigint NOT NULL, value text NOT NULL)"


@asynccontextmanager
async def writer(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """The application's own asyncpg connection, on its own trio-asyncio loop."""
    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
        try:
            yield conn
        finally:
            with trio.move_on_after(5, shield=True):
                await trio_asyncio.aio_as_trio(conn.close)()
            conn.terminate()


async def run(conn: asyncpg.Connection, query: str, *args: object) -> str:
    status: str = await trio_asyncio.aio_as_trio(conn.execute)(query, *args)
    return status


async def test_fence_needs_leadership_and_names_the_tenure(dsn: str) -> None:
    async with open_peer(peer_config(dsn, "a")) as a, open_peer(peer_config(dsn, "b")) as b:
        with pytest.raises(TenureLost, match="does not lead"):
            b.fence()
        fence = a.fence()
        assert (fence.name, fence.node, fence.term) == ("default", "a", a.term)
        assert fence.args == ("default", "a", a.term)
        assert "clock_timestamp()" in fence.sql and "FOR SHARE" in fence.sql
        assert fence.pyformat_sql.count("%s") == 3 and "$" not in fence.pyformat_sql
        assert fence.named_args == {"name": "default", "node": "a", "term": a.term}
        for placeholder in (":name", ":node", ":term"):
            assert placeholder in fence.named_sql


async def test_fenced_transaction_commits_within_the_tenure(dsn: str) -> None:
    async with open_sql(dsn) as sql, open_peer(peer_config(dsn, "a")) as a, writer(dsn) as conn:
        await sql.execute(WRITES)
        async with a.fenced_transaction(conn) as fence:
            await run(conn, "INSERT INTO writes VALUES ($1, 'x')", fence.term)
        assert await sql.fetch("SELECT term, value FROM writes") == [(1, "x")]

        # A failing block rolls back.
        async def failing_block() -> None:
            async with a.fenced_transaction(conn):
                await run(conn, "INSERT INTO writes VALUES (1, 'y')")
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            await failing_block()
        # So does a cancelled one (shielded ROLLBACK: the connection stays usable).
        with trio.move_on_after(0.2):
            async with a.fenced_transaction(conn):
                await run(conn, "INSERT INTO writes VALUES (1, 'z')")
                await trio.sleep_forever()
        assert await sql.fetch("SELECT value FROM writes") == [("x",)]
        assert await trio_asyncio.aio_as_trio(conn.fetchval)("SELECT 1") == 1


async def test_a_stale_fence_returns_no_row_and_cannot_commit(dsn: str) -> None:
    async with open_sql(dsn) as sql, writer(dsn) as conn:
        await sql.execute(WRITES)
        async with open_peer(peer_config(dsn, "a")) as a:
            stale: Fence = a.fence()
            async with open_peer(peer_config(dsn, "b")) as b:
                await a.resign()
                assert await b.wait_leader() == stale.term + 1
                row = await sql.fetchrow(stale.sql, *stale.args)
                assert row is None
                with pytest.raises(TenureLost, match="no longer holds the lease"):
                    await a.fenced_transaction(conn, fence=stale).__aenter__()
        assert await sql.fetch("SELECT * FROM writes") == []


async def test_open_fenced_transaction_blocks_takeover_until_it_ends(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Held open past the lease: no takeover until it commits, and the next tenure starts
    after that commit. Meanwhile no peer reconnects or fails a round, and each logs about
    the lock at most once."""
    leaders: list[tuple[str, float]] = []

    async def watch(peer: Peer) -> None:
        async for change in peer.leadership():
            if change.is_leader:
                leaders.append((peer.node, trio.current_time()))

    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with (
            open_sql(dsn) as sql,
            writer(dsn) as conn,
            open_peer(peer_config(dsn, "a")) as a,
            open_peer(peer_config(dsn, "b")) as b,
            trio.open_nursery() as nursery,
        ):
            await sql.execute(WRITES)
            nursery.start_soon(watch, a)
            nursery.start_soon(watch, b)
            async with a.fenced_transaction(conn) as fence:
                await run(conn, "INSERT INTO writes VALUES ($1, 'long')", fence.term)
                runs = [peer.statistics().elections_run for peer in (a, b)]
                await trio.sleep(3 * INTERVAL)  # the lease has expired meanwhile
                assert not b.is_leader
                assert not a.is_leader  # its trust ended at its deadline: it could not renew
                # Neither election loop hung behind the lock: both kept running rounds.
                after = [peer.statistics().elections_run for peer in (a, b)]
                assert all(n - m >= 2 for m, n in zip(runs, after, strict=True)), (runs, after)
                committed_before = await sql.fetchval("SELECT clock_timestamp()")
            await wait_for(lambda: a.is_leader or b.is_leader, limit=INTERVAL * 3)
            row = await sql.row()
            assert row["term"] == fence.term + 1
            assert row["started_at"] > committed_before  # the next tenure began after the commit
            for peer in (a, b):
                stats = peer.statistics()
                assert stats.connects == 1 and stats.elections_failed == 0, stats
            nursery.cancel_scope.cancel()
    assert [node for node, _ in leaders].count("b") <= 1
    lock_logs = [r for r in caplog.records if "locked by another transaction" in r.getMessage()]
    assert 1 <= len(lock_logs) <= 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r not in lock_logs]


async def test_fence_under_repeatable_read_and_serializable(dsn: str) -> None:
    """Locking a row that changed after the transaction's snapshot is a serialization failure
    (what a fence run late in a REPEATABLE READ transaction gets). fenced_transaction runs the
    fence as the transaction's first statement, so its snapshot is never older than the fence."""
    async with open_sql(dsn) as sql, writer(dsn) as conn:
        await sql.execute(WRITES)
        async with open_peer(peer_config(dsn, "a")) as a:
            fence = a.fence()
            await run(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ")
            await run(conn, "SELECT 1 FROM trio_peers")  # the snapshot is taken here
            await sql.execute("UPDATE trio_peers SET expires_at = expires_at")  # e.g. a renewal
            with pytest.raises(asyncpg.exceptions.SerializationError):
                await trio_asyncio.aio_as_trio(conn.fetchrow)(fence.sql, *fence.args)
            await run(conn, "ROLLBACK")
            await run(conn, "SET default_transaction_isolation = 'serializable'")
            async with a.fenced_transaction(conn):
                await run(conn, "INSERT INTO writes VALUES ($1, 'ok')", fence.term)
        assert await sql.fetch("SELECT value FROM writes") == [("ok",)]


# ---------------------------------------------------------------------- real processes

WORKER_WRITES = "CREATE TABLE writes (term bigint NOT NULL, node text NOT NULL, seq bigint)"


class Worker:
    def __init__(self, dsn: str, node: str, mode: str) -> None:
        self.node = node
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._fence_worker", dsn, node, str(INTERVAL), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def until(self, event: str) -> dict[str, object]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"worker exited before {event!r}")
            data: dict[str, object] = json.loads(line)
            if data["event"] == event:
                return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


async def test_a_leader_paused_between_fence_and_write_cannot_commit(dsn: str) -> None:
    async with open_sql(dsn) as sql:
        await sql.execute(WORKER_WRITES)
        worker = Worker(dsn, "w", "pause")
        try:
            fenced = await trio.to_thread.run_sync(worker.until, "fenced")
            worker.proc.send_signal(signal.SIGSTOP)  # frozen with its Fence in hand
            async with open_peer(peer_config(dsn, "b")) as b:
                with trio.fail_after(INTERVAL * 5):
                    term = await b.wait_leader()
                assert term == fenced["term"] + 1  # type: ignore[operator]
                worker.proc.send_signal(signal.SIGCONT)
                assert worker.proc.stdin is not None
                worker.proc.stdin.write("go\n")
                worker.proc.stdin.flush()
                await trio.to_thread.run_sync(worker.until, "refused")
            assert await sql.fetch("SELECT * FROM writes") == []
        finally:
            worker.close()


async def test_fenced_writes_commit_in_term_order_under_faults(
    dsn: str, pg: PostgresServer
) -> None:
    """Several leader processes write fenced rows while being killed, paused and cut off:
    in commit order (track_commit_timestamp), every row's term is >= every earlier row's."""
    await trio.to_thread.run_sync(
        lambda: pg.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    )
    await trio.to_thread.run_sync(pg.restart)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    workers: list[Worker] = []
    try:
        async with open_sql(dsn) as sql:
            await sql.execute(WORKER_WRITES)
            workers = [Worker(dsn, f"w{i}", "stress") for i in range(3)]
            for w in workers:
                await trio.to_thread.run_sync(w.until, "ready")
            end = trio.current_time() + 12 * INTERVAL
            paused: set[int] = set()
            while trio.current_time() < end:
                await trio.sleep(rng.uniform(0.2, 0.8) * INTERVAL)
                i = rng.randrange(len(workers))
                fault = rng.choice(["kill", "pause", "resume", "terminate"])
                if fault == "kill":
                    workers[i].close()
                    workers[i] = Worker(dsn, f"w{i}-{rng.randrange(10**6)}", "stress")
                    paused.discard(i)
                elif fault == "pause" and i not in paused:
                    workers[i].proc.send_signal(signal.SIGSTOP)
                    paused.add(i)
                elif fault == "resume" and i in paused:
                    workers[i].proc.send_signal(signal.SIGCONT)
                    paused.discard(i)
                elif fault == "terminate":
                    await sql.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND application_name = 'trio-peers'"
                    )
            for i in paused:
                workers[i].proc.send_signal(signal.SIGCONT)

            # The random schedule may leave the first leader alone (about one run in ten):
            # then kill whoever leads now, so that every run judges at least one handover.
            async def terms_written() -> int:
                count: int = await sql.fetchval("SELECT count(DISTINCT term) FROM writes")
                return count

            if await terms_written() < 2:
                holder = await sql.fetchval(
                    "SELECT node FROM trio_peers WHERE expires_at > now() LIMIT 1"
                )
                for i, w in enumerate(workers):
                    if w.node == holder:
                        w.close()
                        workers[i] = Worker(dsn, f"w{i}-{rng.randrange(10**6)}", "stress")

                async def moved() -> bool:
                    return await terms_written() >= 2

                await wait_for(moved, limit=10 * INTERVAL)
            await trio.sleep(INTERVAL)
            rows = await sql.fetch(
                "SELECT term, node, pg_xact_commit_timestamp(xmin) AS at FROM writes ORDER BY at"
            )
    finally:
        for w in workers:
            w.close()
    assert len(rows) > 20, "too few fenced writes to judge"
    assert len({r["term"] for r in rows}) >= 2, "the faults should have moved leadership"
    for before, after in itertools.pairwise(rows):
        assert after["term"] >= before["term"], (
            f"a write of term {after['term']} committed after one of {before['term']}"
        )
    # Each term's writes come from one process.
    owners: dict[int, set[str]] = {}
    for r in rows:
        owners.setdefault(r["term"], set()).add(r["node"])
    assert all(len(n) == 1 for n in owners.values()), owners


async def test_a_fenced_transaction_of_one_session_name_leaves_the_others_on_schedule(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Sessions: a fenced transaction held open on one name's row past its lease makes that
    name busy in the session's batched rounds, and only that name: the session's other
    names keep renewing on schedule in the same statements, nobody takes the fenced name
    over until the transaction ends, no round fails, and the session does not reconnect."""
    names = [f"fenced-{i}" for i in range(5)]
    lapsed: list[str] = []  # names of session a seen not leading while fenced

    async def sample(peers: dict[str, Peer], stop: trio.Event) -> None:
        while not stop.is_set():
            lapsed.extend(name for name, peer in peers.items() if not peer.is_leader)
            await trio.sleep(0.02)

    with caplog.at_level(logging.WARNING, logger="trio_peers"):
        async with (
            open_sql(dsn) as sql,
            writer(dsn) as conn,
            open_session(dsn, node="a") as sa,
            sa.open_peers(names, interval=INTERVAL) as a,
            open_session(dsn, node="b") as sb,
            sb.open_peers(names, interval=INTERVAL) as b,
            trio.open_nursery() as nursery,
        ):
            await sql.execute(WRITES)
            assert all(peer.is_leader for peer in a.values())
            fenced = a[names[0]]
            stop = trio.Event()
            async with fenced.fenced_transaction(conn) as fence:
                await run(conn, "INSERT INTO writes VALUES ($1, 'long')", fence.term)
                nursery.start_soon(sample, {n: a[n] for n in names[1:]}, stop)
                await trio.sleep(3 * INTERVAL)  # the fenced name's lease has expired
                stop.set()
                assert not fenced.is_leader  # its trust ended at its deadline
                assert not any(peer.is_leader for peer in b.values())
                committed_before = await sql.fetchval("SELECT clock_timestamp()")
            assert lapsed == [], f"other names stopped leading: {sorted(set(lapsed))}"
            await wait_for(lambda: fenced.is_leader or b[names[0]].is_leader, limit=3 * INTERVAL)
            row = await sql.row(names[0])
            assert row["term"] == fence.term + 1
            assert row["started_at"] > committed_before
            for peer in [*a.values(), *b.values()]:
                assert peer.statistics().elections_failed == 0, peer.statistics()
            assert sa.statistics().connects == 1 and sb.statistics().connects == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all("locked by another transaction" in r.getMessage() for r in warnings), warnings
    assert 1 <= len(warnings) <= 2


async def test_a_cancellation_at_the_commit_rolls_back_and_never_leaves_the_row_locked(
    dsn: str,
) -> None:
    """Regression: BEGIN and COMMIT ran outside the block that rolls back. A cancellation
    that came at the COMMIT (the tenure's deadline right after the block's last write)
    never sent it, and nothing rolled back: the connection stayed in the transaction,
    holding the lease row FOR SHARE, so every election of the name was busy (no leader
    anywhere) until the connection was next used or closed. Now it rolls back."""
    async with open_sql(dsn) as sql, open_peer(peer_config(dsn, "a")) as a, writer(dsn) as conn:
        await sql.execute(WRITES)
        with trio.CancelScope() as scope:
            async with a.fenced_transaction(conn) as fence:
                await run(conn, "INSERT INTO writes VALUES ($1, 'x')", fence.term)
                scope.cancel()  # no checkpoint left in the block: it lands at the COMMIT
        assert scope.cancelled_caught
        assert not conn.is_closed() and not conn.is_in_transaction()
        assert await sql.fetch("SELECT * FROM writes") == []
        # The lease row is not held: a writer can lock it at once, and the leader renews.
        await sql.execute("BEGIN")
        await sql.execute("SELECT 1 FROM trio_peers FOR UPDATE NOWAIT")
        await sql.execute("ROLLBACK")
        rounds = a.statistics().elections_run
        await wait_for(lambda: a.statistics().elections_run > rounds, limit=2 * INTERVAL)
        assert a.is_leader and a.statistics().elections_busy == 0
