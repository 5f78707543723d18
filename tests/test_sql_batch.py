"""The batched election statement (``Statements.elect_many``) on a real PostgreSQL.

Sessions (many names per process) will run the rounds of many names in one statement; this
checks the statement's per-name rules before the shell uses it: the same outcomes as the
single-name statement, denied bids that write nothing, and a name whose row another
transaction holds reported busy without stalling the batch.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
import trio

from trio_peers import migrate
from trio_peers._core import Down, parse_downs, parse_notification
from trio_peers._sql import Statements

from ._pgutil import SQL, open_sql

pytestmark = pytest.mark.postgres

STATEMENTS = Statements("public", "trio_peers")
NAMES = [f"name-{i:03d}" for i in range(20)]


async def elect(
    sql: SQL, names: list[str], node: str, held: list[int | None], lease: float = 60.0
) -> dict[str, Any]:
    rows = await sql.fetch(
        STATEMENTS.elect_many,
        names,
        [node] * len(names),
        [lease] * len(names),
        held,
        [lease] * len(names),
        0,
    )
    return {r["name"]: r for r in rows}


async def next_xid(sql: SQL) -> int:
    xid: int = await sql.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    return xid


async def test_batch_takes_renews_and_denies_per_name(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as b, open_sql(pg_dsn) as probe:
        won = await elect(a, NAMES, "a", [None] * len(NAMES))
        assert [won[n]["won_term"] for n in NAMES] == [1] * len(NAMES)
        renewed = await elect(a, NAMES, "a", [1] * len(NAMES))
        assert all(renewed[n]["won_term"] == 1 for n in NAMES)
        # Wrong held terms and another node: denied, told the holder.
        x0 = await next_xid(probe)
        for held in ([None] * len(NAMES), [2] * len(NAMES)):
            denied = await elect(b, NAMES, "b", held)
            assert all(denied[n]["won_term"] is None and not denied[n]["busy"] for n in NAMES)
            assert {(denied[n]["holder_node"], denied[n]["holder_term"]) for n in NAMES} == {
                ("a", 1)
            }
        denied = await elect(a, NAMES, "a", [None] * len(NAMES))  # same node value, no term
        assert all(denied[n]["won_term"] is None for n in NAMES)
        assert await next_xid(probe) == x0, "denied batches must write nothing"
        # Expired leases are taken with term + 1, live ones are left alone, in one batch.
        await probe.execute(
            "UPDATE trio_peers SET expires_at = now() - interval '1 s' WHERE name = ANY($1)",
            NAMES[:5],
        )
        mixed = await elect(b, NAMES, "b", [None] * len(NAMES))
        assert [mixed[n]["won_term"] for n in NAMES[:5]] == [2] * 5
        assert all(mixed[n]["won_term"] is None for n in NAMES[5:])


async def test_a_locked_row_is_busy_and_does_not_stall_the_batch(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as locker:
        await elect(a, NAMES, "a", [None] * len(NAMES))
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM trio_peers WHERE name = $1 FOR UPDATE", NAMES[3])
        with trio.fail_after(5):  # the lock is held for as long as the test likes
            renewed = await elect(a, NAMES, "a", [1] * len(NAMES))
        assert renewed[NAMES[3]]["busy"] and renewed[NAMES[3]]["won_term"] is None
        others = [n for n in NAMES if n != NAMES[3]]
        assert all(renewed[n]["won_term"] == 1 and not renewed[n]["busy"] for n in others)
        await locker.execute("ROLLBACK")
        again = await elect(a, NAMES, "a", [1] * len(NAMES))
        assert not again[NAMES[3]]["busy"] and again[NAMES[3]]["won_term"] == 1


async def test_a_name_twice_in_one_batch_is_refused(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a:
        with pytest.raises(asyncpg.exceptions.CardinalityViolationError):
            await elect(a, ["x", "x"], "a", [None, None])


async def release(
    sql: SQL, names: list[str], node: str, terms: list[int], sender: str = "s"
) -> dict[str, Any]:
    rows = await sql.fetch(
        STATEMENTS.release_many, names, [node] * len(names), terms, "public.trio_peers", sender
    )
    return {r["name"]: r for r in rows}


async def test_batched_release_expires_exactly_the_tenures_named_and_notifies_in_chunks(
    pg_dsn: str,
) -> None:
    await migrate(pg_dsn)
    # Long names: 600 names of ~400 bytes need several payloads under the 8000-byte limit.
    names = [f"{i:04d}-" + "n" * 400 for i in range(600)]
    payloads: list[str] = []
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as listener, open_sql(pg_dsn) as probe:
        got = trio.Event()

        def on_notify(_c: object, _pid: int, _ch: str, payload: str) -> None:
            payloads.append(payload)
            got.set()

        await listener.aio(listener.conn.add_listener)("public.trio_peers", on_notify)
        await elect(a, names, "a", [None] * len(names))
        # A wrong term and another node release nothing, and notify nothing.
        wrong = await release(a, names[:3], "a", [2, 2, 2])
        assert not any(r["released"] or r["busy"] for r in wrong.values())
        other = await release(a, names[:3], "b", [1, 1, 1])
        assert not any(r["released"] for r in other.values())
        done = await release(a, names, "a", [1] * len(names), sender="sess")
        assert all(done[n]["released"] and not done[n]["busy"] for n in names)
        assert (
            await probe.fetchval("SELECT count(*) FROM trio_peers WHERE expires_at > now()") == 0
        )
        with trio.fail_after(5):
            while sum(len(parse_downs(p) or []) for p in payloads) < len(names):
                await got.wait()
                got = trio.Event()
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    downs = [d for p in payloads for d in parse_downs(p) or []]
    assert sorted(d.name for d in downs) == names
    assert {(d.term, d.sender) for d in downs} == {(1, "sess")}


async def test_batched_release_of_one_name_uses_the_single_name_payload(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as listener:
        payloads: list[str] = []
        got = trio.Event()

        def on_notify(_c: object, _pid: int, _ch: str, payload: str) -> None:
            payloads.append(payload)
            got.set()

        await listener.aio(listener.conn.add_listener)("public.trio_peers", on_notify)
        await elect(a, ["solo"], "a", [None])
        assert (await release(a, ["solo"], "a", [1], sender="x"))["solo"]["released"]
        with trio.fail_after(5):
            await got.wait()
    assert parse_notification(payloads[0]) == Down(name="solo", term=1, sender="x")


async def test_batched_release_skips_a_locked_row_as_busy(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as locker:
        await elect(a, NAMES, "a", [None] * len(NAMES))
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM trio_peers WHERE name = $1 FOR SHARE", NAMES[3])
        with trio.fail_after(5):
            done = await release(a, NAMES, "a", [1] * len(NAMES))
        assert done[NAMES[3]]["busy"] and not done[NAMES[3]]["released"]
        assert all(done[n]["released"] for n in NAMES if n != NAMES[3])
        await locker.execute("ROLLBACK")
        again = await release(a, [NAMES[3]], "a", [1])
        assert again[NAMES[3]]["released"]


async def test_single_name_session_release_skips_a_locked_row_and_releases_exactly_its_tenure(
    pg_dsn: str,
) -> None:
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a, open_sql(pg_dsn) as locker:

        async def release_one(node: str, term: int) -> Any:
            return await a.fetchrow(
                STATEMENTS.release_one, "solo", node, term, "public.trio_peers", "{}"
            )

        await elect(a, ["solo"], "a", [None])
        assert not (await release_one("a", 2))["released"]  # another term
        assert not (await release_one("b", 1))["released"]  # another node
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM trio_peers WHERE name = 'solo' FOR SHARE")
        with trio.fail_after(5):
            busy = await release_one("a", 1)
        assert busy["busy"] and not busy["released"]
        await locker.execute("ROLLBACK")
        done = await release_one("a", 1)
        assert done["released"] and not done["busy"] and done["notified"] == 1
        assert not (await a.fetchrow("SELECT expires_at > now() AS live FROM trio_peers"))["live"]


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", ()) for n in _plan_nodes(child))]


async def test_a_batched_renewal_reads_the_requests_once_not_once_per_row(pg_dsn: str) -> None:
    # Regression: the renewal test of the conflict clause looked up each row's held term
    # with a subquery correlated by name, which scanned every request again for each
    # renewed row (quadratic: a renewal of 1,000 names cost the server ~90 ms, not ~15).
    names = [f"renew-{i:04d}" for i in range(300)]
    await migrate(pg_dsn)
    async with open_sql(pg_dsn) as a:
        won = await elect(a, names, "a", [None] * len(names))
        terms = [won[n]["won_term"] for n in names]
        assert terms == [1] * len(names)
        plan = await a.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + STATEMENTS.elect_many,
            names,
            ["a"] * len(names),
            [60.0] * len(names),
            terms,
            [60.0] * len(names),
            0,
        )
        plan = json.loads(plan) if isinstance(plan, str) else plan
        nodes = _plan_nodes(plan[0]["Plan"])
        scans = [n for n in nodes if n.get("CTE Name") == "req"]
        assert scans, "the plan reads the requests (CTE req)"
        loops = max(n["Actual Loops"] for n in scans)
        assert loops < len(names) // 10, f"the requests were scanned {loops} times"
        renewed = await elect(a, names, "a", terms)
        assert all(renewed[n]["won_term"] == 1 for n in names)
