"""The session contract: the same batched scenarios against MemoryBackend and PostgreSQL.

``test_backend_contract.py`` shows that the two stores agree on the per-peer protocol.
Sessions use another one, :class:`trio_peers._backend.SessionConnection` (many names of
a table per statement); the session tests on the in-memory store (``test_session_memory``,
``test_session_properties``) say something about the real thing only if the in-memory
session connection and the PostgreSQL one agree on every rule of it. Each scenario here
runs identically against both and asserts the same observable results: the outcomes per
name, in request order; the rows afterwards; the notifications another connection hears.

Expiry is real: a name a scenario wants expired gets a short lease and the test waits,
bounded, until the store reports it expired (the in-memory store runs on Trio's clock).
"""

from __future__ import annotations

import random
from typing import cast

import pytest
import trio

from trio_peers._backend import ElectRequest, LeaseTable, ReleaseOutcome, ReleaseRequest
from trio_peers._core import Down, ElectionOutcome, parse_downs, parse_notification
from trio_peers._exceptions import TableMissing

from ._session_stores import DEFAULT, LONG, SHORT, Row, StoreSpec

OTHER = LeaseTable("tenant_x", "leases")


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def spec(request: pytest.FixtureRequest) -> StoreSpec:
    """Which store to test; each test opens it in its own task (``async with spec.open()``)."""
    if request.param == "memory":
        return StoreSpec("memory", None)
    return StoreSpec("postgres", request.getfixturevalue("pg_dsn"))


def shuffled(names: list[str], seed: int = 7) -> list[str]:
    out = list(names)
    random.Random(seed).shuffle(out)
    assert out != sorted(out)
    return out


def req(name: str, node: str, held: int | None = None, lease: float = LONG) -> ElectRequest:
    return ElectRequest(name=name, node=node, lease=lease, held_term=held)


def rel(name: str, node: str, term: int) -> ReleaseRequest:
    return ReleaseRequest(name=name, node=node, term=term)


def won(term: int, lease: float = LONG) -> ElectionOutcome:
    return ElectionOutcome(
        term=term, lease_remaining=cast("float", pytest.approx(lease, abs=1e-6))
    )


def denied(node: str, term: int, *, busy: bool = False) -> ElectionOutcome:
    """Denied, told the live holder; its remaining time is checked apart (see `plain`)."""
    return ElectionOutcome(term=None, holder_node=node, holder_term=term, busy=busy)


def plain(outcome: ElectionOutcome) -> ElectionOutcome:
    """The outcome with ``holder_remaining`` checked (within the long lease) and dropped."""
    if outcome.holder_remaining is not None:
        assert 0 < outcome.holder_remaining <= LONG + 1e-3, outcome
    else:
        assert outcome.holder_node is None and outcome.holder_term is None, outcome
    return ElectionOutcome(
        term=outcome.term,
        lease_remaining=outcome.lease_remaining,
        holder_node=outcome.holder_node,
        holder_term=outcome.holder_term,
        busy=outcome.busy,
    )


RELEASED = ReleaseOutcome(released=True)
KEPT = ReleaseOutcome(released=False)
BUSY = ReleaseOutcome(released=False, busy=True)


# ---------------------------------------------------------------- 1. fresh names


@pytest.mark.parametrize("count", [1, 60])
async def test_fresh_names_each_win_term_1_with_their_own_lease_in_request_order(
    spec: StoreSpec, count: int
) -> None:
    names = [f"fresh-{i:03d}" for i in range(count)]
    if count > 1:
        names = shuffled(names)
    leases = {n: 30.0 + 0.25 * i for i, n in enumerate(names)}
    async with spec.open() as store:
        a = await store.connect()
        outcomes = await a.elect([req(n, "a", lease=leases[n]) for n in names])
        assert outcomes == [won(1, leases[n]) for n in names]
        assert all(not o.busy and o.holder_node is None for o in outcomes)
        assert await store.rows(names) == {n: Row("a", 1, live=True) for n in names}


# ---------------------------------------------------------------- 2. mixed batch


async def test_a_mixed_batch_renews_takes_over_and_denies_each_name_on_its_own(
    spec: StoreSpec,
) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        await a.take(["renew", "a-live"], "a")
        await a.take(["a-expired"], "a", lease=SHORT)
        await b.take(["b-live", "b-live-quoted"], "b")
        await b.take(["b-expired"], "b", lease=SHORT)
        await store.wait_expired(["a-expired", "b-expired"])
        names = ["b-live", "renew", "b-expired", "new", "a-live", "a-expired", "b-live-quoted"]
        before = await store.raw_rows(["b-live", "b-live-quoted", "a-live"])
        outcomes = await a.elect(
            [
                req("b-live", "a"),  # another node's live lease: denied
                req("renew", "a", held=1),  # our tenure: renewed, same term
                req("b-expired", "a"),  # another node's expired lease: taken, term + 1
                req("new", "a", held=7),  # absent: taken with term 1, whatever we held
                req("a-live", "a"),  # our node's lease but no term quoted: denied
                req("a-expired", "a", held=1),  # our own expired tenure: a new term
                req("b-live-quoted", "a", held=1),  # the holder's term from another node
            ]
        )
        assert [plain(o) for o in outcomes] == [
            denied("b", 1),
            won(1),
            won(2),
            won(1),
            denied("a", 1),
            won(2),
            denied("b", 1),
        ]
        assert await store.rows(names) == {
            "b-live": Row("b", 1, live=True),
            "renew": Row("a", 1, live=True),
            "b-expired": Row("a", 2, live=True),
            "new": Row("a", 1, live=True),
            "a-live": Row("a", 1, live=True),
            "a-expired": Row("a", 2, live=True),
            "b-live-quoted": Row("b", 1, live=True),
        }
        # A denied bid writes nothing: the rows are exactly as before.
        assert await store.raw_rows(["b-live", "b-live-quoted", "a-live"]) == before


# ---------------------------------------------------------------- 3. stale term


@pytest.mark.parametrize("count", [1, 5])
async def test_a_stale_held_term_is_not_renewed_after_a_takeover(
    spec: StoreSpec, count: int
) -> None:
    names = [f"stale-{i}" for i in range(count)]
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        await a.take(names, "a", lease=SHORT)
        await store.wait_expired(names)
        assert await b.elect([req(n, "b") for n in names]) == [won(2)] * count
        before = await store.raw_rows(names)
        # a comes back with its old tenure: it must not touch b's.
        outcomes = await a.elect([req(n, "a", held=1) for n in names])
        assert [plain(o) for o in outcomes] == [denied("b", 2)] * count
        # ... nor with b's term quoted (another node's tenure).
        outcomes = await a.elect([req(n, "a", held=2) for n in names])
        assert [plain(o) for o in outcomes] == [denied("b", 2)] * count
        assert await store.raw_rows(names) == before


@pytest.mark.parametrize("count", [1, 5])
async def test_a_stale_held_term_of_the_same_node_value_is_not_renewed(
    spec: StoreSpec, count: int
) -> None:
    # Another process with the same node id took the names over (oban#1488, oban-py#32).
    names = [f"stale-{i}" for i in range(count)]
    async with spec.open() as store:
        old, new = await store.connect(), await store.connect()
        await old.take(names, "a", lease=SHORT)
        await store.wait_expired(names)
        assert await new.elect([req(n, "a") for n in names]) == [won(2)] * count
        before = await store.raw_rows(names)
        outcomes = await old.elect([req(n, "a", held=1) for n in names])
        assert [plain(o) for o in outcomes] == [denied("a", 2)] * count
        assert await store.raw_rows(names) == before


# ---------------------------------------------------------------- 4. release


async def test_release_of_many_names_releases_exactly_the_matching_tenures_and_notifies(
    spec: StoreSpec,
) -> None:
    mine = shuffled([f"mine-{i:02d}" for i in range(12)])
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        listener = await store.connect()
        await a.take(mine, "a")
        await a.take(["expired"], "a", lease=SHORT)
        await b.take(["theirs"], "b")
        await store.wait_expired(["expired"])
        untouched = ["theirs", "expired", mine[0], mine[1]]
        before = await store.raw_rows(untouched)
        requests = [
            rel(mine[0], "a", 2),  # a term we never held
            rel("theirs", "a", 1),  # another node's tenure
            *[rel(n, "a", 1) for n in mine[2:7]],
            rel("absent", "a", 1),  # no row
            rel("expired", "a", 1),  # our tenure, but it already expired
            *[rel(n, "a", 1) for n in mine[7:]],
            rel(mine[1], "b", 1),  # our row, released in another node's name
        ]
        outcomes = await a.release(requests, sender="sess-a")
        assert outcomes == [KEPT, KEPT, *[RELEASED] * 5, KEPT, KEPT, *[RELEASED] * 5, KEPT]
        released = mine[2:]
        rows = await store.rows([*mine, "theirs", "expired", "absent"])
        assert rows == {
            **{n: Row("a", 1, live=n not in released) for n in mine},  # terms kept
            "theirs": Row("b", 1, live=True),
            "expired": Row("a", 1, live=False),
        }
        assert await store.raw_rows(untouched) == before
        # Every released name is announced, once, with the session's sender; the
        # sentinel (sent after the release committed) shows nothing else came first.
        await store.notify(DEFAULT.channel, "sentinel")
        for conn in (listener, a, b):  # the releasing connection hears it too
            await conn.wait_payload("sentinel")
            payloads = conn.payloads()
            assert payloads[-1] == "sentinel"
            downs = [d for p in payloads[:-1] for d in parse_downs(p) or []]
            assert sorted(downs, key=lambda d: d.name) == [
                Down(n, 1, "sess-a") for n in sorted(released)
            ]
        # Terms stay monotonic: the next holder of a released name gets term 2.
        assert await b.elect([req(n, "b") for n in released]) == [won(2)] * len(released)


async def test_release_of_one_name_sends_the_single_name_payload(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, listener = await store.connect(), await store.connect()
        await a.take(["solo"], "a")
        assert await a.release([rel("solo", "a", 1)], sender="sess-a") == [RELEASED]
        await listener.wait_until(lambda: len(listener.payloads()) == 1)
        [payload] = listener.payloads()
        assert parse_notification(payload) == Down("solo", 1, "sess-a")


@pytest.mark.parametrize("count", [1, 4])
async def test_a_release_reports_once_that_its_statement_has_left_before_it_returns(
    spec: StoreSpec, count: int
) -> None:
    """``on_sent``: what a session waits for before publishing the losses of its names."""
    names = [f"n{i}" for i in range(count)]
    async with spec.open() as store:
        a = await store.connect()
        await a.take(names, "a")
        sent: list[str] = []
        outcomes = await a.release(
            [rel(n, "a", 1) for n in names], sender="sess-a", on_sent=lambda: sent.append("sent")
        )
        assert outcomes == [RELEASED] * count
        assert sent == ["sent"]


@pytest.mark.parametrize("count", [1, 4])
async def test_a_release_of_nothing_sends_no_notification(spec: StoreSpec, count: int) -> None:
    names = [f"n{i}" for i in range(count)]
    async with spec.open() as store:
        a, listener = await store.connect(), await store.connect()
        await a.take(names, "a")
        wrong = [rel(n, "a", 2) for n in names]
        assert await a.release(wrong, sender="sess-a") == [KEPT] * count
        other = [rel(n, "b", 1) for n in names]
        assert await a.release(other, sender="sess-a") == [KEPT] * count
        await store.notify(DEFAULT.channel, "sentinel")
        await listener.wait_payload("sentinel")
        assert listener.payloads() == ["sentinel"]
        assert await store.rows(names) == {n: Row("a", 1, live=True) for n in names}


# ---------------------------------------------------------------- 5. locked rows


async def test_a_locked_row_is_busy_for_its_name_only_and_nobody_waits(
    spec: StoreSpec,
) -> None:
    names = [f"free-{i}" for i in range(6)]
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        await a.take([*names, "locked-mine", "locked-solo"], "a")
        await a.take(["locked-expired"], "a", lease=SHORT)
        await b.take(["locked-theirs"], "b")
        await store.wait_expired(["locked-expired"])
        locked = ["locked-mine", "locked-solo", "locked-expired", "locked-theirs"]
        async with store.rows_locked(locked):
            before = await store.raw_rows(locked)
            with trio.fail_after(5):  # the lock is held for as long as the test likes
                outcomes = await a.elect(
                    [
                        req(names[0], "a", held=1),
                        req("locked-mine", "a", held=1),  # a renewal: would write: busy
                        req(names[1], "a", held=1),
                        req("locked-expired", "b"),  # a takeover: would write: busy
                        req(names[2], "a", held=1),
                        req("locked-theirs", "a"),  # a denial is a pure read: not busy
                        *[req(n, "a", held=1) for n in names[3:]],
                    ]
                )
                assert [plain(o) for o in outcomes] == [
                    won(1),
                    denied("a", 1, busy=True),
                    won(1),
                    ElectionOutcome(term=None, busy=True),  # expired: no live holder
                    won(1),
                    denied("b", 1),
                    *[won(1)] * 3,
                ]
                # The single-name statements too.
                [solo] = await a.elect([req("locked-solo", "a", held=1)])
                assert plain(solo) == denied("a", 1, busy=True)
                releases = await a.release(
                    [
                        rel(names[0], "a", 1),
                        rel("locked-mine", "a", 1),  # held and locked: busy
                        rel("locked-theirs", "a", 1),  # not ours: nothing, not busy
                        rel(names[1], "a", 1),
                    ],
                    sender="sess-a",
                )
                assert releases == [RELEASED, BUSY, KEPT, RELEASED]
                assert await a.release([rel("locked-solo", "a", 1)], sender="s") == [BUSY]
            assert await store.raw_rows(locked) == before  # nothing changed
        # Unlocked: the same requests go through.
        again = await a.elect([req("locked-mine", "a", held=1), req("locked-expired", "b")])
        assert again == [won(1), won(2)]
        assert await a.release([rel("locked-mine", "a", 1)], sender="s") == [RELEASED]
        assert await a.release([rel("locked-solo", "a", 1)], sender="s") == [RELEASED]


# ---------------------------------------------------------------- 6. get_leaders


async def test_get_leaders_reports_exactly_the_unexpired_leases_among_the_names(
    spec: StoreSpec,
) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        await a.take(["a-live", "released"], "a", lease=20.0)
        await b.take(["b-live"], "b", lease=30.0)
        await a.take(["expired"], "a", lease=SHORT)
        await b.take(["not-asked"], "b")
        assert await a.release([rel("released", "a", 1)], sender="s") == [RELEASED]
        await store.wait_expired(["expired"])
        asked = ["expired", "b-live", "absent", "released", "a-live"]
        leaders = await b.get_leaders(asked)
        assert sorted(leaders) == ["a-live", "b-live"]
        for name, node, lease in [("a-live", "a", 20.0), ("b-live", "b", 30.0)]:
            info = leaders[name]
            assert (info.name, info.node, info.term) == (name, node, 1)
            assert info.started_at.tzinfo is not None
            span = (info.expires_at - info.started_at).total_seconds()
            assert span == pytest.approx(lease, abs=1e-3)
        assert await a.get_leaders([]) == {}
        assert await a.get_leaders(["absent"]) == {}


# ---------------------------------------------------------------- 7. big release


async def test_a_release_of_thousands_of_long_names_is_notified_in_payloads_under_8000_bytes(
    spec: StoreSpec,
) -> None:
    # 2000 names of up to 512 bytes (the longest allowed), some of which JSON must escape.
    fillers = ["n" * 507, '"' * 507, "\\" * 507, "é" * 253, "名" * 169, "🙂" * 126]
    names = shuffled([f"{i:04d}-{fillers[i % len(fillers)]}" for i in range(2000)])
    assert max(len(n.encode()) for n in names) <= 512
    async with spec.open() as store:
        a, listener = await store.connect(), await store.connect()
        await a.take(names, "a")
        outcomes = await a.release([rel(n, "a", 1) for n in names], sender="sess-a")
        assert outcomes == [RELEASED] * len(names)
        downs = await listener.wait_downs(len(names))
        assert sorted(downs, key=lambda d: d.name) == [Down(n, 1, "sess-a") for n in sorted(names)]
        payloads = listener.payloads()
        assert len(payloads) > 1
        assert all(len(p.encode()) < 8000 for p in payloads), max(len(p) for p in payloads)
        assert not any(r.live for r in (await store.rows(names)).values())


# ---------------------------------------------------------------- 8. two tables


async def test_two_tables_on_one_connection_stay_independent(spec: StoreSpec) -> None:
    names = ["x", "y", "z"]
    async with spec.open() as store:
        conn = await store.connect()
        with pytest.raises(TableMissing):
            await conn.prepare(OTHER)
        await store.create_table(OTHER)
        assert await conn.prepare(OTHER) is False
        listener = await store.connect(tables=(DEFAULT, OTHER))
        # The same names, another node per table: each table has its own term 1.
        assert await conn.elect([req(n, "a") for n in names]) == [won(1)] * 3
        assert await conn.elect([req(n, "b") for n in names], OTHER) == [won(1)] * 3
        # b's term 1 in the other table is not a tenure here.
        outcomes = await conn.elect([req(n, "b", held=1) for n in names])
        assert [plain(o) for o in outcomes] == [denied("a", 1)] * 3
        before = await store.raw_rows(names, OTHER)
        assert await conn.release([rel(n, "a", 1) for n in names], sender="s1") == [RELEASED] * 3
        assert await store.raw_rows(names, OTHER) == before
        assert (
            await conn.release([rel(n, "a", 1) for n in names], sender="s2", table=OTHER)
            == [KEPT] * 3
        )
        assert sorted(await conn.get_leaders(names, OTHER)) == names
        assert await conn.get_leaders(names) == {}
        # Each table's releases are announced on its own channel only.
        await store.notify(OTHER.channel, "sentinel")
        await listener.wait_payload("sentinel", OTHER.channel)
        assert listener.payloads(OTHER.channel) == ["sentinel"]
        downs = await listener.wait_downs(3)
        assert sorted(downs, key=lambda d: d.name) == [Down(n, 1, "s1") for n in names]
        assert (
            await conn.release([rel(n, "b", 1) for n in names], sender="s3", table=OTHER)
            == [RELEASED] * 3
        )
        downs = await listener.wait_downs(3, OTHER.channel)
        assert sorted(downs, key=lambda d: d.name) == [Down(n, 1, "s3") for n in names]
        assert await store.rows(names) == {n: Row("a", 1, live=False) for n in names}
        assert await store.rows(names, OTHER) == {n: Row("b", 1, live=False) for n in names}


# ---------------------------------------------------------------- listen=False


@pytest.mark.parametrize("count", [1, 3])
async def test_a_connection_without_listen_works_alike_and_hears_nothing(
    spec: StoreSpec, count: int
) -> None:
    names = [f"quiet-{i}" for i in range(count)]
    async with spec.open() as store:
        quiet, listener = await store.connect(listen=False), await store.connect()
        assert await quiet.elect([req(n, "q") for n in names]) == [won(1)] * count
        assert await quiet.elect([req(n, "q", held=1) for n in names]) == [won(1)] * count
        assert sorted(await quiet.get_leaders(names)) == names
        released = await quiet.release([rel(n, "q", 1) for n in names], sender="q")
        assert released == [RELEASED] * count
        downs = await listener.wait_downs(count)
        assert sorted(d.name for d in downs) == names
        await store.notify(DEFAULT.channel, "sentinel")
        await listener.wait_payload("sentinel")
        assert quiet.notes == []


# ---------------------------------------------------------------- a dropped table


async def test_a_dropped_table_fails_its_own_statements_only_and_heals_when_recreated(
    spec: StoreSpec,
) -> None:
    async with spec.open() as store:
        await store.create_table(OTHER)
        conn = await store.connect(tables=(DEFAULT, OTHER))
        assert await conn.elect([req("x", "a"), req("y", "a")], OTHER) == [won(1)] * 2
        await store.drop_table(OTHER)
        for count in (1, 2):
            names = ["x", "y"][:count]
            with pytest.raises(TableMissing):
                await conn.elect([req(n, "a", held=1) for n in names], OTHER)
            with pytest.raises(TableMissing):
                await conn.release([rel(n, "a", 1) for n in names], sender="s", table=OTHER)
        with pytest.raises(TableMissing):
            await conn.get_leaders(["x"], OTHER)
        # The other table, on the same connection, is not affected.
        assert await conn.elect([req("x", "a"), req("y", "a")]) == [won(1)] * 2
        # Created again (empty), the table works on the same connection: terms restart.
        await store.create_table(OTHER)
        assert await conn.elect([req("x", "b"), req("y", "b")], OTHER) == [won(1)] * 2
        assert await conn.elect([req("x", "b", held=1)], OTHER) == [won(1)]
        assert await conn.release([rel("x", "b", 1)], sender="s", table=OTHER) == [RELEASED]
        assert sorted(await conn.get_leaders(["x", "y"], OTHER)) == ["y"]
