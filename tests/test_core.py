"""The pure election core: transitions, trust, schedule. Sync, no event loop."""

from __future__ import annotations

import math
import random

import attrs
import pytest

from trio_peers._core import (
    BACKOFF_CAP,
    JITTER,
    Change,
    CoreError,
    Down,
    ElectionCore,
    ElectionOutcome,
    down_payload,
    parse_notification,
)

INTERVAL = 10.0
MARGIN = 0.1  # 1% drift
ST = 2.5


def make_core(*, boost: float = 2.0, seed: int = 0) -> ElectionCore:
    return ElectionCore(
        interval=INTERVAL,
        leader_boost=boost,
        trust_margin=MARGIN,
        statement_timeout=ST,
        max_clock_drift=0.01,
        rng=random.Random(seed),
    )


def won(term: int, remaining: float = INTERVAL) -> ElectionOutcome:
    return ElectionOutcome(term=term, lease_remaining=remaining)


def denied(holder_remaining: float | None = 5.0, holder_term: int | None = 1) -> ElectionOutcome:
    return ElectionOutcome(
        term=None, holder_node="other", holder_term=holder_term, holder_remaining=holder_remaining
    )


def round_(core: ElectionCore, start: float, end: float, outcome: ElectionOutcome) -> Change:
    core.start_round(start)
    return core.round_succeeded(end, outcome)


def test_gain_trust_is_anchored_at_round_start() -> None:
    core = make_core()
    assert round_(core, 100.0, 100.4, won(1)) is Change.GAINED
    # Trusted until start + lease - margin, however long the statement took.
    assert core.trusted_until == pytest.approx(100.0 + INTERVAL - MARGIN)
    assert core.is_leader(109.89)
    assert not core.is_leader(109.9)
    assert core.term(105.0) == 1
    assert core.term(110.0) is None


def test_slow_statement_does_not_stretch_trust() -> None:
    # river#1213 / codex-lb#1253: a slow successful renewal must not extend trust.
    core = make_core()
    round_(core, 0.0, 9.95, won(1))
    assert not core.is_leader(9.95)


def test_renewal_keeps_term_and_moves_deadline() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    assert core.start_round(4.5) == 1  # a leader sends its held term
    assert core.round_succeeded(4.51, won(1)) is Change.RENEWED
    assert core.trusted_until == pytest.approx(4.5 + INTERVAL - MARGIN)


def test_leader_renews_before_trust_ends_with_jitter_decreasing() -> None:
    for seed in range(200):
        core = make_core(seed=seed)
        round_(core, 0.0, 0.01, won(1))
        delay = core.next_round_at - 0.0
        assert (1 - JITTER) * INTERVAL / 2 <= delay <= INTERVAL / 2
        assert core.next_round_at < core.trusted_until


def test_boost_one_is_capped_below_trust_deadline_minus_statement_timeout() -> None:
    for seed in range(50):
        core = make_core(boost=1.0, seed=seed)
        round_(core, 0.0, 0.01, won(1))
        assert core.next_round_at <= core.trusted_until - ST


def test_failure_ends_trust_at_once_but_remembers_tenure() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(5))
    core.start_round(5.0)
    assert core.round_failed(5.2) is Change.FAILED
    assert not core.is_leader(5.2)
    assert core.held_term == 5
    # Next round offers term 5 again, and resuming keeps it (False, then True/5).
    retry_at = core.next_round_at
    assert 5.2 < retry_at <= 5.2 + core.backoff_base
    assert core.start_round(retry_at) == 5
    assert core.round_succeeded(retry_at + 0.01, won(5)) is Change.RESUMED
    assert core.term(retry_at + 0.1) == 5


def test_denied_renewal_means_lost_and_forgets_tenure() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    assert round_(core, 5.0, 5.01, denied(holder_term=2)) is Change.LOST
    assert core.held_term is None
    assert not core.is_leader(5.01)


def test_new_term_in_same_round_is_reported_as_replaced() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    core.start_round(20.0)
    core.round_failed(20.1)
    assert round_(core, 21.0, 21.01, won(2)) is Change.REPLACED


def test_follower_polls_each_interval_or_just_after_expiry() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, denied(holder_remaining=3.0))
    # Wakes just after the holder's lease expires per the database.
    assert 3.01 < core.next_round_at < 3.01 + 3.0 * 0.01 + 0.05
    core2 = make_core()
    round_(core2, 0.0, 0.01, denied(holder_remaining=50.0))
    assert (1 - JITTER) * INTERVAL <= core2.next_round_at <= INTERVAL


def test_denied_without_visible_holder_retries_soon() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, denied(holder_remaining=None, holder_term=None))
    assert core.next_round_at <= 0.01 + core.backoff_base


def test_backoff_grows_and_is_capped() -> None:
    core = make_core()
    delays = []
    for _ in range(12):
        start = max(core.next_round_at, 0.0)
        core.start_round(start)
        core.round_failed(start)
        delays.append(core.next_round_at - start)
    assert delays[0] <= core.backoff_base
    assert max(delays) <= INTERVAL * 0.5
    assert delays[-1] >= INTERVAL * 0.25  # reached the cap region (random factor >= 0.5)


def test_notification_wakes_follower_not_leader() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, denied(holder_remaining=9.0))
    assert core.notified_down(1.0)
    assert core.next_round_at == 1.0
    leader = make_core()
    round_(leader, 0.0, 0.01, won(1))
    assert not leader.notified_down(1.0)


def test_notification_during_round_is_not_lost() -> None:
    core = make_core()
    core.start_round(0.0)
    assert core.notified_down(0.005)
    core.round_succeeded(0.01, denied(holder_remaining=9.0))
    assert core.next_round_at == 0.01  # coalesced wake-up runs right after


def test_connection_lost_ends_trust() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    assert core.connection_lost(2.0)
    assert not core.is_leader(2.0)
    assert core.held_term == 1
    assert core.next_round_at <= 2.0 + core.backoff_base


def test_resign_releases_and_waits_a_poll_before_bidding() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(3))
    assert core.resign(1.0) == 3
    assert not core.is_leader(1.0)
    assert core.next_round_at >= 1.0 + (1 - JITTER) * INTERVAL


def test_close_returns_held_term_even_when_untrusted() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(4))
    core.start_round(1.0)
    core.round_failed(1.1)
    assert core.close() == 4
    with pytest.raises(CoreError):
        core.start_round(2.0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda c: c.round_succeeded(1.0, won(1)),  # no round in progress
        lambda c: c.round_failed(1.0),
        lambda c: (c.start_round(1.0), c.start_round(1.0)),  # two rounds at once
        lambda c: (c.start_round(5.0), c.round_succeeded(4.0, won(1))),  # time backwards
        lambda c: (c.start_round(1.0), c.round_succeeded(1.1, ElectionOutcome(term=1))),
    ],
)
def test_illegal_input_raises_and_leaves_state_unchanged(bad: object) -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    before = (attrs.evolve(core.tenure), core.next_round_at, core.failures)
    with pytest.raises(CoreError):
        bad(core)  # type: ignore[operator]
    assert (core.tenure, core.next_round_at, core.failures) == before


def test_invalid_parameters() -> None:
    with pytest.raises(CoreError):
        ElectionCore(interval=1.0, leader_boost=2, trust_margin=0.01, statement_timeout=0.9)
    with pytest.raises(CoreError):
        ElectionCore(interval=-1.0, leader_boost=2, trust_margin=0.0, statement_timeout=0.1)


def test_payload_round_trip_and_tolerant_parsing() -> None:
    payload = down_payload("default", 7, "abc")
    assert parse_notification(payload) == Down(name="default", term=7, sender="abc")
    for junk in [
        "",
        "not json",
        "[1, 2]",
        '{"down": 1, "sender": "x"}',
        '{"down": "n"}',
        '{"down": "n", "sender": "s", "term": "7"}',
        '{"down": "n", "sender": "s", "term": true}',
        '"just a string"',
        "\x00\xff",
    ]:
        assert parse_notification(junk) is None
    assert parse_notification('{"down": "n", "sender": "s"}') == Down("n", None, "s")


def test_trusted_until_is_minus_inf_without_tenure() -> None:
    assert make_core().trusted_until == -math.inf


def test_resigned_peer_ignores_stale_downs_but_follows_a_newer_release() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(3))
    assert core.resign(1.0) == 3
    held_until = core.next_round_at
    assert not core.notified_down(2.0, 3)  # its own tenure's release, seen late
    assert not core.notified_down(2.0, 2)  # an older one
    assert not core.notified_down(2.0, None)  # unknown term: treated as stale
    assert core.next_round_at == held_until
    assert core.notified_down(2.0, 4)  # its successor resigned: bid now
    assert core.next_round_at == 2.0


def busy() -> ElectionOutcome:
    return ElectionOutcome(term=None, busy=True)


def test_busy_renewal_keeps_the_trust_deadline_and_retries_before_it_ends() -> None:
    core = make_core()
    round_(core, 0.0, 0.01, won(1))
    deadline = core.trusted_until
    assert round_(core, 4.5, 4.51, busy()) is Change.BUSY
    assert core.trusted_until == deadline  # neither extended nor cut
    assert core.is_leader(deadline - 0.001) and core.held_term == 1
    assert 4.51 < core.next_round_at <= deadline - ST
    # Busy again and again: the retries back off, never past the last chance to renew
    # (trust deadline minus a statement timeout) while it is ahead, and never spin.
    t = core.next_round_at
    for _ in range(10):
        round_(core, t, t + 0.01, busy())
        if t + 0.01 < deadline - ST:
            assert core.next_round_at <= deadline - ST
        assert core.next_round_at > t + 0.01
        t = core.next_round_at
    assert core.failures == 0
    # Free again (the trust deadline passed meanwhile): the same tenure resumes, and trust
    # runs from that round's start.
    assert t > deadline
    assert round_(core, t, t + 0.01, won(1)) is Change.RESUMED
    assert core.trusted_until == pytest.approx(t + INTERVAL - MARGIN)
    assert core.busy_rounds == 0


def test_busy_follower_stays_follower_and_backs_off() -> None:
    core = make_core()
    assert round_(core, 0.0, 0.01, busy()) is Change.BUSY
    assert not core.is_leader(0.01) and core.held_term is None
    first = core.next_round_at - 0.01
    round_(core, core.next_round_at, core.next_round_at, busy())
    assert 0 < first <= core.backoff_base


def test_a_busy_outcome_that_claims_a_win_is_refused_and_changes_nothing() -> None:
    core = make_core()
    core.start_round(1.0)
    with pytest.raises(CoreError):
        core.round_succeeded(1.1, ElectionOutcome(term=1, lease_remaining=5.0, busy=True))
    assert core.round_started_at == 1.0 and core.tenure is None


def test_deeply_nested_json_notification_is_malformed_not_an_error() -> None:
    """Any client may NOTIFY: 4000 bytes of nesting must not raise RecursionError."""
    assert parse_notification("[" * 2000 + "]" * 2000) is None
    assert parse_notification('{"down":' * 1500 + "1" + "}" * 1500) is None


def test_the_core_decides_when_a_failed_round_is_retried_by_the_kind_of_fault() -> None:
    """Faults that may pass at any moment back off (from 0.5 to 1x the base, doubling);
    those an operator must fix (a missing table, a misconfiguration) are retried every
    ``interval``, whatever the streak."""
    for cause in ("table_missing", "misconfigured"):
        core = ElectionCore(
            interval=5.0, leader_boost=2.0, trust_margin=0.1, statement_timeout=1.0
        )
        now = 0.0
        for _ in range(4):
            core.start_round(now)
            core.round_failed(now, cause=cause)
            assert core.next_round_at == now + 5.0
            now = core.next_round_at
    for cause in ("unavailable", "unexpected", "behind"):
        core = ElectionCore(
            interval=5.0, leader_boost=2.0, trust_margin=0.1, statement_timeout=1.0
        )
        core.start_round(0.0)
        core.round_failed(0.0, cause=cause)
        assert 0 < core.next_round_at <= core.backoff_base
    # A server behind a timeline the peer saw (an old primary) may be left for the new one
    # at any moment: retried at the failures' bounded rate, never slower than the cap.
    core = ElectionCore(interval=5.0, leader_boost=2.0, trust_margin=0.1, statement_timeout=1.0)
    now = 0.0
    for _ in range(20):
        core.start_round(now)
        core.round_failed(now, cause="behind")
        assert 0 < core.next_round_at - now <= 5.0 * BACKOFF_CAP
        assert not core.is_leader(now)
        now = core.next_round_at


def test_bids_are_held_while_work_of_an_ended_tenure_winds_down() -> None:
    """The core holds bids while the shell reports leader-only work still winding down, and
    bids at once when it ends; but an end of work never moves a schedule it did not hold
    (after a resign the peer must wait its resign hold)."""
    core = ElectionCore(interval=5.0, leader_boost=2.0, trust_margin=0.1, statement_timeout=1.0)
    core.start_round(0.0)
    core.round_succeeded(0.0, ElectionOutcome(term=1, lease_remaining=5.0))
    assert core.may_start_round(winding_down=False)
    assert not core.may_start_round(winding_down=True)
    assert core.next_round_at == math.inf  # held
    assert core.wind_down_ended(3.0) and core.next_round_at == 3.0
    # A schedule that was not held stands.
    core.start_round(3.0)
    core.round_succeeded(3.0, ElectionOutcome(term=1, lease_remaining=5.0))
    scheduled = core.next_round_at
    assert not core.wind_down_ended(4.0) and core.next_round_at == scheduled
    core.start_round(scheduled)
    with pytest.raises(CoreError):
        core.may_start_round(winding_down=True)  # (never during a round)


def test_a_term_won_after_an_unreleased_resign_is_the_one_close_releases() -> None:
    """Regression: a resign whose release was skipped (its leader-only work overran the
    cleanup timeout) left its term pending; once the peer had won a newer term, close()
    still returned the old one, and the exit released nothing while the new lease stayed
    live for a whole interval."""
    core = make_core()
    round_(core, 0.0, 0.1, won(1))
    assert core.resign(1.0) == 1  # (the shell skips take_release: the work overran)
    assert round_(core, 20.0, 20.1, won(2)) is Change.GAINED
    assert core.close() == 2


def test_a_lost_connection_keeps_a_resign_hold() -> None:
    """Regression: a connection lost after a resign (its release done) replaced the resign
    hold with one backoff: the peer bid again some 50 ms later and won back the lease it had
    just released (with listen=False or a lost notification, before any follower)."""
    core = make_core()
    round_(core, 0.0, 0.1, won(7))
    assert core.resign(1.0) == 7
    assert core.take_release() == 7  # released
    held_until = core.next_round_at
    assert held_until >= 1.0 + (1 - JITTER) * INTERVAL
    core.connection_lost(1.01)
    assert core.next_round_at == held_until
    assert not core.notified_down(1.5, term=7)  # its own release's NOTIFY: still held
    # A newer tenure's release may still wake it earlier, as before.
    assert core.notified_down(2.0, term=8)
    assert core.next_round_at == 2.0


def test_a_lease_longer_than_the_barrier_is_seen_only_on_denied_bids_of_a_node() -> None:
    from trio_peers._core import drift_bound, longer_lease_seen

    denied = ElectionOutcome(term=None, holder_node="x", holder_term=3, holder_remaining=12.0)
    assert longer_lease_seen(denied, 10.0, 0.01) == 12.0
    # A little over the interval is what equal intervals show when the leader's renewal
    # started a few ms after this bid (each statement's now() is its start): not longer.
    # Regression: 1 ms over the interval warned.
    assert longer_lease_seen(attrs.evolve(denied, holder_remaining=10.02), 10.0, 0.01) is None
    bound = drift_bound(10.0, 0.01)
    assert longer_lease_seen(attrs.evolve(denied, holder_remaining=bound), 10.0, 0.01) is None
    assert longer_lease_seen(attrs.evolve(denied, holder_remaining=bound + 0.01), 10.0, 0.01)
    # A failover barrier (node '') is longer than an interval by design: no one's lease.
    assert longer_lease_seen(attrs.evolve(denied, holder_node=""), 10.0, 0.01) is None
    won = ElectionOutcome(term=4, lease_remaining=12.0)
    assert longer_lease_seen(won, 10.0, 0.01) is None
    assert longer_lease_seen(ElectionOutcome(term=None), 10.0, 0.01) is None
