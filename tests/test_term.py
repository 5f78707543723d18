"""Terms that carry the timeline, and the failover barrier's pure parts (trio_peers._term)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_peers import PeerConfig
from trio_peers._core import ElectionCore, drift_bound, expiry_slack
from trio_peers._term import BARRIER_NODE, TimelineMemory, first_term, term_timeline

timelines = st.integers(min_value=1, max_value=2**31 - 1)
counts = st.integers(min_value=1, max_value=2**32 - 1)


def test_timeline_one_terms_are_todays() -> None:
    assert first_term(1) == 1
    assert [term_timeline(t) for t in (1, 2, 3, 2**32 - 1)] == [1, 1, 1, 1]
    assert first_term(2) == 2**32 + 1
    assert term_timeline(2**32) == 2  # n = 0 never occurs, but the high bits decide
    assert term_timeline(first_term(7) + 41) == 7


@given(timelines, counts)
def test_term_encoding_round_trips(tl: int, n: int) -> None:
    term = ((tl - 1) << 32) | n
    assert term_timeline(term) == tl
    assert term >= first_term(tl)
    assert term < 2**63  # a PostgreSQL bigint


@given(timelines, counts, st.integers(min_value=1, max_value=1000))
def test_any_term_of_a_later_timeline_is_higher(tl: int, n: int, later: int) -> None:
    # The promoted server's first term is above every term of the old timeline, however
    # many tenures the old one handed out (and whichever of them were lost).
    assert first_term(tl + later) > ((tl - 1) << 32) | n


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_inputs_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="timeline"):
        first_term(bad)
    with pytest.raises(ValueError, match="term"):
        term_timeline(bad)


def test_no_peer_can_have_the_barrier_node() -> None:
    with pytest.raises(ValueError, match="node"):
        PeerConfig(dsn="memory://", node=BARRIER_NODE)


def test_memory_compares_within_one_system_only() -> None:
    memory = TimelineMemory()
    assert memory.minimum(7) == 0
    assert memory.minimum(None) == 0
    memory.saw(7, 3)
    memory.saw(7, 2)  # lower: ignored
    assert memory.minimum(7) == 3
    assert memory.minimum(8) == 0  # another system: its timelines are unrelated
    assert memory.first_barrier(7, 3)
    assert not memory.first_barrier(7, 3)
    assert memory.first_barrier(8, 3)


def test_barrier_length_is_the_cores_resign_hold() -> None:
    core = ElectionCore(
        interval=10.0,
        leader_boost=2.0,
        trust_margin=0.1,
        statement_timeout=2.5,
        max_clock_drift=0.01,
    )
    assert drift_bound(10.0, 0.01) == core.resign_hold
    assert drift_bound(10.0, 0.01) == pytest.approx(10.0 * 1.01 / 0.99 + expiry_slack(10.0))
    assert drift_bound(10.0, 0.0) == pytest.approx(10.0 + expiry_slack(10.0))
