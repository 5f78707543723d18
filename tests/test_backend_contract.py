"""The backend contract: the same lease scenarios against MemoryBackend and PostgreSQL.

The property tests of the election (``test_core_stateful.py``,
``test_peer_properties.py``) run on the in-memory store or a model of it. This
suite shows that the in-memory backend and the real SQL agree on every lease
rule the election relies on, so those properties say something about the real
thing. ``test_backend_model_pg.py`` compares them on random operation sequences.
"""

from __future__ import annotations

import pytest

from trio_peers._core import Down, parse_notification

from ._lease_stores import INTERVAL, Row, StoreSpec


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def spec(request: pytest.FixtureRequest) -> StoreSpec:
    """Which store to test; each test opens it in its own task (``async with spec.open()``)."""
    if request.param == "memory":
        return StoreSpec("memory", None)
    return StoreSpec("postgres", request.getfixturevalue("pg_dsn"))


def approx_interval(value: float | None) -> bool:
    return value is not None and abs(value - INTERVAL) < 1e-6


async def test_first_election_gets_term_1(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a = await store.connect()
        won = await a.elect("a", None)
        assert won.term == 1 and approx_interval(won.lease_remaining)
        assert won.holder_node is None
        assert await store.row() == Row("a", 1, live=True)


async def test_second_node_is_denied_and_told_the_holder(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        denied = await b.elect("b", None)
        assert denied.term is None and denied.lease_remaining is None
        assert (denied.holder_node, denied.holder_term) == ("a", 1)
        assert denied.holder_remaining is not None and 0 < denied.holder_remaining <= INTERVAL
        assert await store.row() == Row("a", 1, live=True)


async def test_holder_renews_its_own_tenure_with_the_same_term(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a = await store.connect()
        assert (await a.elect("a", None)).term == 1
        renewed = await a.elect("a", 1)
        assert renewed.term == 1 and approx_interval(renewed.lease_remaining)
        assert await store.row() == Row("a", 1, live=True)


@pytest.mark.parametrize(
    ("node", "held"),
    [
        ("a", None),  # the holder's node, but without the term (e.g. a restarted process)
        ("a", 2),  # a term that does not exist
        ("a", 0),
        ("b", 1),  # another node quoting the holder's term (oban#1488, oban-py#32)
        ("b", None),
    ],
)
async def test_no_renewal_of_a_tenure_not_held(
    spec: StoreSpec, node: str, held: int | None
) -> None:
    async with spec.open() as store:
        a, other = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        before = await store.row()
        denied = await other.elect(node, held)
        assert denied.term is None
        assert (denied.holder_node, denied.holder_term) == ("a", 1)
        assert await store.row() == before


async def test_a_stale_term_is_not_renewed_after_a_takeover(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        await store.expire()
        assert (await b.elect("b", None)).term == 2
        # a comes back with its old tenure: it must not touch b's.
        denied = await a.elect("a", 1)
        assert denied.term is None and (denied.holder_node, denied.holder_term) == ("b", 2)
        assert await store.row() == Row("b", 2, live=True)


async def test_own_expired_tenure_is_not_renewed_but_retaken_as_a_new_term(
    spec: StoreSpec,
) -> None:
    async with spec.open() as store:
        a = await store.connect()
        assert (await a.elect("a", None)).term == 1
        await store.expire()
        again = await a.elect("a", 1)
        assert again.term == 2 and approx_interval(again.lease_remaining)
        assert await store.row() == Row("a", 2, live=True)


async def test_an_expired_lease_is_taken_over(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        await store.expire()
        assert await store.row() == Row("a", 1, live=False)
        assert await a.get_leader() is None
        won = await b.elect("b", None)
        assert won.term == 2 and approx_interval(won.lease_remaining)
        assert await store.row() == Row("b", 2, live=True)


async def test_release_expires_the_lease_and_notifies_the_others(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b, listener = await store.connect(), await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        assert await a.release("a", 1, sender="sender-a") is True
        [payload] = await listener.wait_payloads(1)
        assert parse_notification(payload) == Down("default", 1, "sender-a")
        assert await store.row() == Row("a", 1, live=False)  # kept: terms stay monotonic
        assert await a.get_leader() is None
        assert (await b.elect("b", None)).term == 2
        # the releasing connection hears its own NOTIFY too (the peer ignores it by sender)
        assert await a.wait_payloads(1) == [payload]


@pytest.mark.parametrize(
    ("node", "term"),
    [("b", 1), ("a", 2), ("a", 0)],  # a foreign tenure, a stale/unknown term
)
async def test_release_of_a_tenure_not_held_does_nothing(
    spec: StoreSpec, node: str, term: int
) -> None:
    async with spec.open() as store:
        a, other, listener = await store.connect(), await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        assert await other.release(node, term, sender="wrong") is False
        assert await store.row() == Row("a", 1, live=True)
        # Nothing was sent: NOTIFYs arrive in commit order, so the first one to arrive
        # is the later, real release's.
        assert await a.release("a", 1, sender="right") is True
        payloads = await listener.wait_payloads(1)
        assert [parse_notification(p) for p in payloads] == [Down("default", 1, "right")]


async def test_release_of_an_expired_tenure_does_nothing(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, listener = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        await store.expire()
        assert await a.release("a", 1, sender="late") is False
        await store.notify_sentinel(a.config, "sentinel")
        assert await listener.wait_payloads(1) == ["sentinel"]


async def test_terms_are_monotonic_across_release_expiry_and_takeover(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        terms = []
        terms.append((await a.elect("a", None)).term)  # 1: first
        assert await a.release("a", 1)
        terms.append((await b.elect("b", None)).term)  # after a release
        await store.expire()
        terms.append((await a.elect("a", None)).term)  # after expiry
        terms.append((await a.elect("a", terms[-1])).term)  # a renewal keeps it
        await store.expire()
        terms.append((await a.elect("a", terms[-1])).term)  # own expired: a new term
        assert terms == [1, 2, 3, 3, 4]


async def test_get_leader_reports_only_an_unexpired_lease(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a = await store.connect()
        assert await a.get_leader() is None  # no row
        assert (await a.elect("a", None)).term == 1
        info = await a.get_leader()
        assert info is not None and (info.name, info.node, info.term) == ("default", "a", 1)
        assert info.expires_at > info.started_at
        await store.expire()
        assert await a.get_leader() is None


async def test_names_are_independent(spec: StoreSpec) -> None:
    async with spec.open() as store:
        x, y = await store.connect("x"), await store.connect("y")
        assert (await x.elect("a", None)).term == 1
        assert (await y.elect("b", None)).term == 1
        assert (await x.elect("a", 1)).term == 1
        assert await x.release("a", 1)
        assert await store.row("y") == Row("b", 1, live=True)


async def test_a_row_locked_by_another_transaction_makes_writers_busy(spec: StoreSpec) -> None:
    async with spec.open() as store:
        a, b = await store.connect(), await store.connect()
        assert (await a.elect("a", None)).term == 1
        async with store.row_locked():
            renewal = await a.elect("a", 1)
            assert renewal.term is None and renewal.busy
            denied = await b.elect("b", None)  # a pure read: not held up, not busy
            assert denied.term is None and not denied.busy
            assert (denied.holder_node, denied.holder_term) == ("a", 1)
        assert await store.row() == Row("a", 1, live=True)
        renewed = await a.elect("a", 1)
        assert renewed.term == 1 and not renewed.busy
