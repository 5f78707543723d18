"""What the election and release statements write, on a real PostgreSQL.

A follower bids once per round for as long as another peer holds the lease: followers x names x
rounds of statements. A denied bid must be a pure read (no row lock, no transaction id, no WAL
record, no commit to flush), or it costs xid-wraparound pressure, WAL volume and, with a
synchronous standby, a network round trip per bid; and it would wait behind any lock on the row.
"""

from __future__ import annotations

import asyncpg
import pytest
import trio
import trio_asyncio

from trio_peers import migrate, open_peer
from trio_peers.testing import PostgresServer

from ._lease_stores import StoreSpec
from ._pgutil import SQL, open_sql, peer_config

pytestmark = pytest.mark.postgres

BIDS = 200


@pytest.fixture
def spec(pg_dsn: str) -> StoreSpec:
    return StoreSpec("postgres", pg_dsn)


async def test_denied_bids_consume_no_transaction_id_and_no_wal(spec: StoreSpec) -> None:
    async with spec.open() as store:
        holder, other = await store.connect(), await store.connect()
        # The lease is 60 s long and nobody renews it during the test.
        assert (await holder.elect("a", None)).term == 1
        before_row = await store.row()
        xid0, wal0 = await store.xid_and_wal()
        # Another node; the same node value without the term, or with a wrong one.
        bids = [("b", None), ("a", None), ("a", 7), ("b", 1)]
        for i in range(BIDS):
            node, held = bids[i % len(bids)]
            denied = await other.elect(node, held)
            assert denied.term is None and denied.holder_term == 1
        xid1, wal1 = await store.xid_and_wal()
        assert await store.row() == before_row
        assert xid1 - xid0 == 0, f"{BIDS} denied bids consumed {xid1 - xid0} transaction ids"
        # Reads may still set hint bits; nothing here is a WAL record of the bid's own.
        assert (wal1 - wal0) / BIDS < 10, f"{(wal1 - wal0) / BIDS:.1f} WAL bytes per denied bid"

        # The measurement can see writes: a renewal and a takeover each take a transaction id.
        assert (await holder.elect("a", 1)).term == 1
        await store.expire()
        assert (await other.elect("b", None)).term == 2
        xid2, _ = await store.xid_and_wal()
        assert xid2 - xid1 >= 3  # renewal, the test's own expire, takeover


async def test_denied_bid_does_not_wait_for_a_row_lock(spec: StoreSpec, pg_dsn: str) -> None:
    """A denied bid reads: it does not queue behind a transaction that holds the row locked."""
    async with spec.open() as store:
        holder, other = await store.connect(), await store.connect()
        assert (await holder.elect("a", None)).term == 1
        async with trio_asyncio.open_loop():
            locker = await trio_asyncio.aio_as_trio(asyncpg.connect)(pg_dsn)
            try:
                await trio_asyncio.aio_as_trio(locker.execute)(
                    "BEGIN; SELECT 1 FROM trio_peers WHERE name = 'default' FOR UPDATE"
                )
                # Generous bound: the old statement waited for the lock until its timeout.
                with trio.fail_after(5):
                    denied = await other.elect("b", None)
                assert denied.term is None and denied.holder_node == "a"
            finally:
                locker.terminate()


async def test_a_release_leaves_its_flush_to_the_takeover_which_waits_for_it() -> None:
    """Without synchronous standbys a release commits asynchronously: it returns (and its
    followers hear it) before its WAL is flushed, one disk flush less on every graceful
    handover of a server with fsync on. The election that takes the lease over commits
    synchronously, which flushes the release with it before its peer learns the term.
    Regression: the release waited for its flush like an election."""
    # A WAL writer that wakes every 10 s leaves an asynchronous commit unflushed meanwhile.
    with PostgresServer.start(settings={"wal_writer_delay": "10s"}) as server:
        dsn = server.dsn
        await migrate(dsn)

        async def unflushed(sql: SQL) -> bool:
            behind: bool = await sql.fetchval(
                "SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()"
            )
            return behind

        async with open_sql(dsn) as sql:
            async with open_peer(peer_config(dsn, "a", interval=30.0)) as a:
                assert a.is_leader
                assert not await unflushed(sql)  # the election flushed its commit
            assert not (await sql.row())["live"]  # released
            assert await unflushed(sql), "the release waited for its WAL flush"
            async with open_peer(peer_config(dsn, "b", interval=30.0)) as b:
                assert b.is_leader
                assert not await unflushed(sql)  # the takeover flushed, the release too
