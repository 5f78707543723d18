"""Failover on real servers: terms that grow across promotion, the barrier, old primaries.

Each test starts its own primary and streaming standby (trio_peers.testing._replication).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from trio_peers import migrate
from trio_peers._sql import Statements
from trio_peers._term import BARRIER_NODE, first_term
from trio_peers.testing import PostgresNotFound
from trio_peers.testing._replication import ReplicatedPair, timeline

from ._pgutil import SQL, open_sql, wait_for

pytestmark = pytest.mark.postgres

STATEMENTS = Statements("public", "trio_peers")
BARRIER = 0.5  # seconds: the barrier length passed to the statements directly
TL2 = first_term(2)  # the first term of timeline 2
_SECOND = datetime.timedelta(seconds=1)


def start_pair(*, synchronous: bool = False) -> ReplicatedPair:
    try:
        return ReplicatedPair.start(synchronous=synchronous)
    except PostgresNotFound as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    with start_pair() as started:
        yield started


def dsn_of(pair: ReplicatedPair, *, query: str = "target_session_attrs=read-write") -> str:
    """Both servers, the standby first (after the promotion it is the one that writes)."""
    hosts = f"{pair.standby.host}:{pair.standby.port},{pair.primary.host}:{pair.primary.port}"
    return f"postgresql://postgres@{hosts}/postgres?{query}"


async def elect(sql: SQL, name: str, node: str, held: int | None, *, min_timeline: int = 0) -> Any:
    return await sql.fetchrow(
        STATEMENTS.elect, name, node, 60.0 * _SECOND, held, BARRIER * _SECOND, min_timeline
    )


async def elect_many(
    sql: SQL, names: list[str], node: str, held: list[int | None], *, min_timeline: int = 0
) -> dict[str, Any]:
    n = len(names)
    rows = await sql.fetch(
        STATEMENTS.elect_many, names, [node] * n, [60.0] * n, held, [BARRIER] * n, min_timeline
    )
    return {r["name"]: r for r in rows}


async def next_xid(sql: SQL) -> int:
    xid: int = await sql.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    return xid


async def lost_commit_failover(pair: ReplicatedPair, names: list[str]) -> None:
    """Node "a" holds term 1 of each name, replicated; then, unreplicated, "b" takes term 2
    of each on the old primary; the old primary is frozen and the standby promoted."""
    await migrate(pair.primary.dsn)
    async with open_sql(pair.primary.dsn) as old:
        await elect(old, names[0], "a", None)
        await elect_many(old, names[1:], "a", [None] * (len(names) - 1))
        await trio.to_thread.run_sync(pair.wait_replayed)
        await trio.to_thread.run_sync(pair.cut)
        for name in names:
            await old.expire(name)
            assert (await elect(old, name, "b", None))["won_term"] == 2  # lost at promotion
    pair.primary.freeze()
    await trio.to_thread.run_sync(pair.promote)
    assert timeline(pair.standby) == 2


async def test_statements_install_a_barrier_once_and_hand_out_terms_above_it(
    pair: ReplicatedPair,
) -> None:
    single, batch = "single", ["batch-1", "batch-2"]
    await lost_commit_failover(pair, [single, *batch])
    async with open_sql(pair.standby.dsn) as new, open_sql(pair.standby.dsn) as probe:
        # The promoted server has term 1 of "a" (term 2 of "b" was lost). The first bid
        # finds a row of timeline 1: it becomes a barrier, and the bid is denied.
        one = await elect(new, single, "c", None)
        many = await elect_many(new, batch, "c", [None, None])
        for row in (one, *many.values()):
            assert row["won_term"] is None and not row["busy"]
            assert (row["holder_node"], row["holder_term"]) == (BARRIER_NODE, TL2)
            assert row["barrier_over"] == 1 and row["timeline"] == 2
            assert 0 < row["holder_remaining"] <= BARRIER
        # Installed once: later bids (the old holder's renewal too) are pure reads.
        x0 = await next_xid(probe)
        again = [
            await elect(new, single, "c", None),
            await elect(new, single, "a", 1),
            *(await elect_many(new, batch, "a", [1, 1])).values(),
            *(await elect_many(new, batch, "c", [None, None])).values(),
        ]
        for row in again:
            assert row["won_term"] is None and not row["busy"]
            assert (row["holder_node"], row["holder_term"]) == (BARRIER_NODE, TL2)
            assert row["barrier_over"] is None
        assert await next_xid(probe) == x0, "a bid that met a barrier wrote something"
        # Peers' views of the lease do not show the barrier as a leader.
        assert await new.fetch(STATEMENTS.get_leader, single) == []
        # After it expires, the next bid takes the lease with the term above it.
        await wait_for(lambda: _expired(probe, single), limit=5)
        won = await elect(new, single, "c", None)
        assert won["won_term"] == TL2 + 1 and won["timeline"] == 2
        won_many = await elect_many(new, batch, "c", [None, None])
        assert [won_many[n]["won_term"] for n in batch] == [TL2 + 1] * 2
        # ... and renews it as usual.
        assert (await elect(new, single, "c", TL2 + 1))["won_term"] == TL2 + 1
        # A session that saw a later timeline writes nothing here.
        x1 = await next_xid(probe)
        behind = await elect(new, single, "c", TL2 + 1, min_timeline=3)
        behind_many = await elect_many(new, batch, "c", [TL2 + 1] * 2, min_timeline=3)
        for row in (behind, *behind_many.values()):
            assert row["won_term"] is None and row["timeline"] == 2 and not row["busy"]
        assert await next_xid(probe) == x1


async def _expired(sql: SQL, name: str) -> bool:
    row = await sql.row(name)
    return row is not None and not row["live"]
