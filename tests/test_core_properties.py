"""Properties of single election-core transitions, over all timings (sync, no event loop).

Each test names the claim of docs/timing.rst it backs. The multi-peer, multi-round
versions live in ``test_core_stateful.py``.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
from hypothesis import assume, given, settings, strategies as st

from trio_peers._core import (
    BACKOFF_CAP,
    EXPIRY_SLACK_FRACTION,
    EXPIRY_SLACK_MIN,
    JITTER,
    CoreError,
    Down,
    ElectionCore,
    ElectionOutcome,
    down_payload,
    jitter,
    parse_notification,
)

from ._election_model import make_config, make_core, resign_hold

#: Room for Hypothesis to shrink a failure (the suite-wide 60 s is too short for that);
#: the "thorough" profile runs 20x the examples.
pytestmark = pytest.mark.timeout(300 * max(1, settings.default.max_examples // 100))

seeds = st.integers(0, 2**32 - 1)
intervals = st.floats(0.01, 1e4)
drifts = st.floats(0.001, 0.25)
boosts = st.floats(1.0, 16.0)
st_fractions = st.floats(0.001, 0.5)
rate_fractions = st.floats(-1.0, 1.0)
fractions = st.floats(0.0, 1.0)


@st.composite
def cores(draw: st.DrawFn) -> ElectionCore:
    config = make_config(
        interval=draw(intervals),
        leader_boost=draw(boosts),
        max_clock_drift=draw(drifts),
        st_fraction=draw(st_fractions),
    )
    return make_core(config, random.Random(draw(seeds)))


# ---------------------------------------------------------------------- schedule


@given(base=st.floats(1e-6, 1e6), seed=seeds)
def test_jitter_only_shortens(base: float, seed: int) -> None:
    """jitter_range: jitter(base) lies in ((1 - JITTER) * base, base]."""
    value = jitter(base, random.Random(seed))
    assert (1 - JITTER) * base < value <= base


@given(core=cores(), failures=st.integers(1, 200))
def test_backoff_in_documented_range(core: ElectionCore, failures: int) -> None:
    """backoff_range: after n failures the delay is in [raw / 2, raw], with
    raw = min(interval * BACKOFF_CAP, min(0.05, interval / 20) * 2 ** (n - 1))."""
    raw = min(core.interval * BACKOFF_CAP, min(0.05, core.interval / 20) * 2.0 ** (failures - 1))
    delay = core.backoff(failures)
    assert raw / 2 <= delay <= raw <= core.interval * BACKOFF_CAP


def test_expiry_slack_formula() -> None:
    """The follower's slack after the holder's expiry, as docs/timing.rst states it."""
    core = make_core(make_config(interval=10.0, leader_boost=2.0, max_clock_drift=0.01,
                                 st_fraction=0.25), random.Random(0))  # fmt: skip
    assert core.expiry_slack == EXPIRY_SLACK_MIN + EXPIRY_SLACK_FRACTION * 10.0


@given(core=cores(), start=st.floats(-1e6, 1e6), took=fractions)
def test_leader_schedule(core: ElectionCore, start: float, took: float) -> None:
    """leader_schedule: after a won round started at ``start``, the next round starts at
    start + min(jitter(interval / leader_boost), trust window - statement_timeout),
    so at least one statement timeout before local trust ends."""
    core.start_round(start)
    now = start + took * core.statement_timeout
    core.round_succeeded(now, ElectionOutcome(term=1, lease_remaining=core.interval))
    slack = 1e-9 * max(1.0, abs(start))
    window = core.trusted_until - start
    assert window == pytest.approx(core.interval - core.trust_margin, abs=slack)
    delay = core.next_round_at - start
    per = core.interval / core.leader_boost
    cap = window - core.statement_timeout
    assert cap > 0
    assert min((1 - JITTER) * per, cap) - slack <= delay <= min(per, cap) + slack
    assert core.next_round_at + core.statement_timeout <= core.trusted_until + slack


# ---------------------------------------------------------------------- safety of one round


@given(
    core=cores(),
    rate_f=rate_fractions,
    start_db=st.floats(0.0, 1e5),
    clock=st.floats(-1e5, 1e5),
    exec_f=st.floats(0.0, 1.0),
    reply_f=st.floats(0.0, 3.0),
)
def test_trust_ends_before_db_lease_expires(
    core: ElectionCore,
    rate_f: float,
    start_db: float,
    clock: float,
    exec_f: float,
    reply_f: float,
) -> None:
    """trust_bound: whatever the clock rate (within max_clock_drift), the statement
    delay and the reply delay (even a stale reply after a pause), local trust ends
    no later, on the database clock, than the lease the statement granted.

    Trust ends at round start + lease - interval * max_clock_drift (local); the
    lease at the statement's now() + lease (database), and now() >= round start.
    """
    rate = 1 + rate_f * core.max_clock_drift
    exec_db = start_db + exec_f * core.statement_timeout
    reply_db = exec_db + reply_f * core.interval

    def local(t: float) -> float:
        return clock + rate * t

    core.start_round(local(start_db))
    core.round_succeeded(local(reply_db), ElectionOutcome(term=7, lease_remaining=core.interval))
    trust_end_db = (core.trusted_until - clock) / rate
    expiry_db = exec_db + core.interval
    assert trust_end_db <= expiry_db + 1e-9 * max(1.0, expiry_db)


@given(
    core=cores(),
    rate_f=rate_fractions,
    remaining_f=st.floats(0.0, 1.0),
    reply_f=st.floats(0.0, 0.5),
    t0=st.floats(0.0, 1e5),
)
def test_follower_bids_after_holder_expiry(
    core: ElectionCore, rate_f: float, remaining_f: float, reply_f: float, t0: float
) -> None:
    """follower_schedule: a denied follower wakes at
    min(start + jitter(interval), reply + remaining * (1 + max_clock_drift) + slack)
    (local), so its bid, unless it is the periodic poll, reaches the database after
    the holder's lease expired, whatever its clock rate within the bound."""
    rate = 1 + rate_f * core.max_clock_drift
    exec_db = t0
    remaining = remaining_f * core.interval
    reply_db = exec_db + reply_f * core.statement_timeout
    core.start_round(rate * t0)
    outcome = ElectionOutcome(
        term=None, holder_node="x", holder_term=3, holder_remaining=remaining
    )
    core.round_succeeded(rate * reply_db, outcome)
    poll_lo = rate * t0 + (1 - JITTER) * core.interval
    wake = rate * reply_db + remaining * (1 + core.max_clock_drift) + core.expiry_slack
    slack = 1e-9 * max(1.0, wake)
    assert min(poll_lo, wake) - slack <= core.next_round_at <= rate * t0 + core.interval + slack
    if core.next_round_at < poll_lo:  # the expiry wake-up, not the poll
        assert core.next_round_at / rate > exec_db + remaining


@given(core=cores(), now=st.floats(0.0, 1e5), term=st.integers(1, 10**6))
def test_resign_waits_out_every_followers_next_round(
    core: ElectionCore, now: float, term: int
) -> None:
    """resign_schedule: a resigning peer bids again only after resign_hold =
    interval * (1 + m) / (1 - m) + slack, and ignores "down" notifications meanwhile."""
    core.start_round(now)
    core.round_succeeded(now, ElectionOutcome(term=term, lease_remaining=core.interval))
    assert core.resign(now) == term
    assert not core.is_leader(now)
    delay = core.next_round_at - now
    expected = resign_hold(core.interval, core.max_clock_drift)
    assert delay == pytest.approx(expected, rel=1e-9)
    assert not core.notified_down(now + delay * 0.99)
    assert core.next_round_at - now == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------- robustness

CALLS = st.sampled_from(
    ["start", "ok_won", "ok_denied", "failed", "lost", "resign", "notify", "abort", "close"]
)


@given(core=cores(), calls=st.lists(st.tuples(CALLS, st.floats(0.0, 2.0)), max_size=30))
def test_illegal_input_leaves_state_unchanged(
    core: ElectionCore, calls: list[tuple[str, float]]
) -> None:
    """Any sequence of inputs: an input the core refuses raises CoreError and changes
    nothing; time only moves forward."""
    now = 0.0
    for name, dt in calls:
        now += dt * core.interval
        before = _state(core)
        try:
            _call(core, name, now)
        except CoreError:
            assert _state(core) == before, f"{name} raised CoreError but changed state"


def _state(core: ElectionCore) -> dict[str, object]:
    state = {k: v for k, v in vars(core).items() if k != "_rng"}
    return copy.deepcopy(state)


def _call(core: ElectionCore, name: str, now: float) -> None:
    if name == "start":
        core.start_round(now)
    elif name == "ok_won":
        held = core.held_term
        core.round_succeeded(now, ElectionOutcome(term=held or 1, lease_remaining=core.interval))
    elif name == "ok_denied":
        core.round_succeeded(now, ElectionOutcome(term=None, holder_term=2, holder_remaining=1.0))
    elif name == "failed":
        core.round_failed(now)
    elif name == "lost":
        core.connection_lost(now)
    elif name == "resign":
        core.resign(now)
    elif name == "notify":
        core.notified_down(now)
    elif name == "abort":
        core.abort_round(now)
    else:
        core.close()


@given(name=st.text(min_size=1), term=st.integers(0, 2**63 - 1), sender=st.text())
def test_down_payload_round_trips(name: str, term: int, sender: str) -> None:
    assert parse_notification(down_payload(name, term, sender)) == Down(name, term, sender)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(payload=st.one_of(st.text(), json_values.map(json.dumps)))
def test_parse_notification_never_raises(payload: str) -> None:
    """Any payload on the channel parses to a Down or to None (oban#1146: tolerant decoding)."""
    down = parse_notification(payload)
    if down is not None:
        assert isinstance(down.name, str) and isinstance(down.sender, str)
        assert down.term is None or (type(down.term) is int)


@given(core=cores(), now=st.floats(0.0, 1e5))
def test_is_leader_needs_no_event_to_end(core: ElectionCore, now: float) -> None:
    """is_leader reads the deadline: trust ends at trusted_until with no further input."""
    core.start_round(now)
    core.round_succeeded(now, ElectionOutcome(term=1, lease_remaining=core.interval))
    end = core.trusted_until
    assume(math.nextafter(end, -math.inf) > now)
    assert core.is_leader(math.nextafter(end, -math.inf))
    assert not core.is_leader(end)
