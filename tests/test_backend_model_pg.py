"""Random operation sequences against PostgreSQL, MemoryBackend and the model store, side by side.

Hypothesis draws a sequence of elect / release / get_leader / force-expiry
operations from three connections with node ids drawn from a small pool (so
nodes collide and stale or foreign terms are quoted). Each operation runs on the
real SQL (``AsyncpgBackend``), on :class:`~trio_peers.testing.MemoryBackend` and
on ``tests/_election_model.ModelStore`` (the store the stateful core tests run
on); all three must give the same answer, and every connection must receive
the same NOTIFY payloads. So the in-memory backend and the model are faithful
to PostgreSQL on the operations the election uses.

Each example runs in a fresh ``trio.run`` (pitfall P8) with a fresh lease
``name`` in one database migrated once per module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

import trio_peers
from trio_peers._core import ElectionOutcome

from ._election_model import ModelStore
from ._lease_stores import INTERVAL, Conn, Store, open_store

#: Room for Hypothesis to shrink a failure (the suite-wide 60 s is too short for that);
#: the "thorough" profile runs 20x the examples.
pytestmark = pytest.mark.timeout(300 * max(1, settings.default.max_examples // 100))

CONNS = 3
NODES = "abc"
#: Fewer examples than the profile's: each one opens six connections to PostgreSQL.
EXAMPLES = max(5, settings.default.max_examples // 4)

terms = st.sampled_from(["none", "current", "previous", "next", "first"])
op = st.one_of(
    st.tuples(st.just("elect"), st.integers(0, CONNS - 1), st.sampled_from(NODES), terms),
    st.tuples(st.just("release"), st.integers(0, CONNS - 1), st.sampled_from(NODES), terms),
    st.tuples(st.just("get_leader"), st.integers(0, CONNS - 1)),
    st.tuples(st.just("expire")),
)


@pytest.fixture(scope="module")
def model_dsn(pg_server: Any) -> Iterator[str]:
    name = f"model_{uuid.uuid4().hex[:12]}"
    dsn: str = pg_server.create_database(name)
    trio.run(trio_peers.migrate, dsn)
    yield dsn
    pg_server.drop_database(name)


class Side:
    """One store with its connections, driven in step with the others."""

    def __init__(self, store: Store, conns: list[Conn]) -> None:
        self.store = store
        self.conns = conns


def resolve(choice: str, current: int) -> int | None:
    return {
        "none": None,
        "current": current,
        "previous": current - 1,
        "next": current + 1,
        "first": 1,
    }[choice]


def summary(outcome: ElectionOutcome) -> tuple[object, ...]:
    if outcome.term is not None:
        assert outcome.lease_remaining is not None
        assert abs(outcome.lease_remaining - INTERVAL) < 1e-6
        return ("won", outcome.term)
    assert outcome.holder_remaining is not None and 0 < outcome.holder_remaining <= INTERVAL
    return ("denied", outcome.holder_node, outcome.holder_term)


async def run_ops(dsn: str, name: str, ops: list[tuple[Any, ...]]) -> None:
    model = ModelStore()
    async with open_store("postgres", dsn) as pg, open_store("memory", None) as mem:
        sides = [
            Side(pg, [await pg.connect(name) for _ in range(CONNS)]),
            Side(mem, [await mem.connect(name) for _ in range(CONNS)]),
        ]
        for step, operation in enumerate(ops):
            kind, *args = operation
            now = trio.current_time()
            row = model.rows.get(name)
            current = row.term if row is not None else 0
            if kind == "elect":
                conn, node, choice = args
                held = resolve(choice, current)
                expected = summary(model.elect(name, node, held, now, INTERVAL))
                for side in sides:
                    got = summary(await side.conns[conn].elect(node, held))
                    assert got == expected, (step, operation, side.store.kind, got, expected)
            elif kind == "release":
                conn, node, choice = args
                term = resolve(choice, current)
                if term is None:
                    continue
                expected_released = model.release(name, node, term, now)
                for side in sides:
                    got = await side.conns[conn].release(node, term, sender=f"s{conn}")
                    assert got == expected_released, (step, operation, side.store.kind)
            elif kind == "get_leader":
                [conn] = args
                live = model.leader(name, now)
                expected_leader = None if live is None else (live.node, live.term)
                for side in sides:
                    info = await side.conns[conn].get_leader()
                    got_leader = None if info is None else (info.node, info.term)
                    assert got_leader == expected_leader, (step, operation, side.store.kind)
            elif row is not None:  # expire: only an existing lease
                row.expires_at = now - 1.0
                for side in sides:
                    await side.store.expire(name)
        # Every connection got the same NOTIFYs. A sentinel sent last arrives after
        # every NOTIFY committed before it, so nothing is still in flight after it.
        for side in sides:
            await side.store.notify_sentinel(side.conns[0].config, "sentinel")
        received = []
        for side in sides:
            got_payloads = []
            for conn in side.conns:
                with trio.fail_after(10):
                    while "sentinel" not in conn.payloads:
                        await conn.wait_payloads(len(conn.payloads) + 1)
                got_payloads.append(conn.payloads)
            received.append(got_payloads)
        assert received[0] == received[1]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_postgres_memory_and_model_agree(model_dsn: str, ops: list[tuple[Any, ...]]) -> None:
    name = f"n{uuid.uuid4().hex[:12]}"
    trio.run(run_ops, model_dsn, name, ops)
