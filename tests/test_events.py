"""The event hook of a real peer (open_peer(..., on_event=...)), on MemoryBackend under
MockClock, and trio_peers.otel.PeerMetrics fed by it end to end."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from trio_peers import (
    ElectionRound,
    Fault,
    LeadershipGained,
    LeadershipLost,
    LeaseReleased,
    NotificationReceived,
    PeerConfig,
    PeerEvent,
    open_peer,
)
from trio_peers.otel import PeerMetrics
from trio_peers.testing import MemoryBackend

INTERVAL = 10.0


def cfg(node: str) -> PeerConfig:
    return PeerConfig(dsn="memory://", interval=INTERVAL, node=node)


async def test_a_peer_reports_its_rounds_leadership_faults_notifications_and_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a_events: list[PeerEvent] = []
    b_events: list[PeerEvent] = []
    async with open_peer(cfg("a"), backend=backend, on_event=a_events.append) as a:
        async with open_peer(cfg("b"), backend=backend, on_event=b_events.append) as b:
            await trio.sleep(INTERVAL)  # renewals
            backend.kill_connections()  # a fault: trust ends, the tenure resumes
            await a.wait_leader()
            await trio.sleep(1)  # b reconnects (and LISTENs) within one backoff, < 0.05 s
            assert b.statistics().connected
            await a.resign()
            await b.wait_leader()
    rounds = [e for e in a_events if isinstance(e, ElectionRound)]
    assert rounds[0].outcome == "gained" and rounds[0].term == 1
    assert rounds[0].trust_left == pytest.approx(INTERVAL * 0.99)  # MemoryBackend is instant
    outcomes = {r.outcome for r in rounds}
    assert {"gained", "renewed", "resumed"} <= outcomes
    assert all(r.duration >= 0 and r.error is None for r in rounds)
    gained = [e.term for e in a_events if isinstance(e, LeadershipGained)]
    lost = [(e.term, e.reason) for e in a_events if isinstance(e, LeadershipLost)]
    # The first tenure, resumed after the blip; then, b's release of term 2 as it closed is
    # newer than the term a gave up, so a bids at once and takes term 3.
    assert gained == [1, 1, 3]
    assert lost == [(1, "connection lost"), (1, "resigned"), (3, "closed")]
    assert [e.kind for e in a_events if isinstance(e, Fault)] == ["connection_lost"]
    releases = [e for e in a_events if isinstance(e, LeaseReleased)]
    assert [(e.term, e.released) for e in releases] == [(1, True), (3, True)]
    # b: denied while a led, a "down" notification, then it won term 2, and left closing.
    assert {r.outcome for r in b_events if isinstance(r, ElectionRound)} >= {"denied", "gained"}
    assert "down" in [e.kind for e in b_events if isinstance(e, NotificationReceived)]
    assert [e.term for e in b_events if isinstance(e, LeadershipGained)] == [2]
    assert [(e.term, e.reason) for e in b_events if isinstance(e, LeadershipLost)] == [
        (2, "closed")
    ]
    b_releases = [(e.term, e.released) for e in b_events if isinstance(e, LeaseReleased)]
    assert b_releases == [(2, True)]


async def test_failed_rounds_carry_the_error(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    events: list[PeerEvent] = []
    async with open_peer(cfg("a"), backend=backend, on_event=events.append) as a:
        backend.set_available(False)
        await a.wait_follower()
        await trio.sleep(1)
    failed = [e for e in events if isinstance(e, ElectionRound) and e.outcome == "failed"]
    assert failed and all(e.error and "BackendUnavailable" in e.error for e in failed)


async def test_a_failing_hook_is_logged_rarely_and_never_disturbs_the_peer(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: PeerEvent) -> None:
        raise RuntimeError("hook bug")

    with caplog.at_level(logging.ERROR, logger="trio_peers"):
        async with open_peer(cfg("a"), backend=MemoryBackend(), on_event=broken) as a:
            assert a.is_leader
            await trio.sleep(5 * INTERVAL)  # many rounds, each event raises
            assert a.is_leader and a.statistics().elections_failed == 0
    reports = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(reports) == 1 and reports[0].exc_info is not None
    # The line says what happened: the peer kept leading, it did not step down.
    # Regression: it read "stepping down and retrying. Please report this as a bug."
    assert "stepping down" not in reports[0].getMessage()
    assert "the peer carries on" in reports[0].getMessage()


async def test_on_event_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_event"):
        async with open_peer(cfg("a"), backend=MemoryBackend(), on_event=42):  # type: ignore[arg-type]
            pass  # pragma: no cover


async def test_otel_metrics_from_a_real_peer(autojump_clock: trio.testing.MockClock) -> None:
    reader = InMemoryMetricReader()
    metrics = PeerMetrics(MeterProvider(metric_readers=[reader]))
    backend = MemoryBackend()
    async with open_peer(cfg("a"), backend=backend, on_event=metrics) as a:
        await trio.sleep(INTERVAL)
        assert a.is_leader
        values = _values(reader)
        assert values["trio_peers.leader"] == 1 and values["trio_peers.term"] == 1
        assert values["trio_peers.election.rounds"] >= 2
    values = _values(reader)
    assert values["trio_peers.leader"] == 0  # closed: it leads no more
    assert values["trio_peers.lease.releases"] == 1
    reader.shutdown()


def _values(reader: InMemoryMetricReader) -> dict[str, float]:
    """Each metric's value summed over its points (histograms: their count)."""
    out: dict[str, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    out[metric.name] = out.get(metric.name, 0) + (
                        point.count if value is None else value
                    )
    return out


async def test_a_closing_peer_ends_its_connection_as_soon_as_its_release_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """open_peer's private session closes the connection when the peer's last statement (its
    release) returns, before the peer and the session unwind (each scheduler pass of that is
    slower while followers take the CPU). The closing is not a fault."""
    backend = MemoryBackend()
    seen: list[tuple[str, int]] = []

    def hook(event: PeerEvent) -> None:
        if isinstance(event, LeaseReleased | Fault):
            seen.append((type(event).__name__, backend.connection_count))

    async with open_peer(cfg("a"), backend=backend, on_event=hook) as a:
        assert a.is_leader and backend.connection_count == 1
    assert seen == [("LeaseReleased", 0)]
    assert backend.connection_count == 0
