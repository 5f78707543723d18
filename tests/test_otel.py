"""trio_peers.otel.PeerMetrics, read back through the OpenTelemetry SDK's in-memory reader.

The events are fed to the hook directly here; an end-to-end test with a real peer comes with
the peer's event hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from trio_peers import (
    ElectionRound,
    Fault,
    LeadershipGained,
    LeadershipLost,
    LeaseReleased,
    NotificationReceived,
)
from trio_peers.otel import DURATION_BUCKETS, TRUST_BUCKETS, PeerMetrics


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    yield reader
    reader.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "trio_peers"
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def _by_attrs(points: list[Any]) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset(p.attributes.items()): p for p in points}


def _round(outcome: Any, **kw: Any) -> ElectionRound:
    fields: dict[str, Any] = {
        "name": "reports",
        "node": "web-1",
        "outcome": outcome,
        "duration": 0.003,
        "term": None,
        "trust_left": None,
        "error": None,
        "at": 1.0,
    }
    fields.update(kw)
    return ElectionRound(**fields)


NAME = ("trio_peers.name", "reports")


def test_a_tenure_as_a_dashboard_sees_it(reader: InMemoryMetricReader) -> None:
    hook = PeerMetrics(MeterProvider(metric_readers=[reader]))
    hook(_round("denied"))
    points = _points(reader)
    assert [p.value for p in points["trio_peers.leader"]] == [0]  # a follower shows 0
    assert "trio_peers.term" not in points  # no term seen yet

    hook(_round("gained", term=7, trust_left=29.5, duration=0.004))
    hook(LeadershipGained(name="reports", node="web-1", term=7, at=1.0))
    hook(_round("renewed", term=7, trust_left=14.2, duration=0.002))
    hook(_round("renewed", term=7, trust_left=0.3, duration=2.0))  # nearly too late
    points = _points(reader)
    (leader,) = points["trio_peers.leader"]
    assert isinstance(leader, NumberDataPoint)
    assert leader.value == 1
    assert dict(leader.attributes) == dict([NAME])
    assert [p.value for p in points["trio_peers.term"]] == [7]

    rounds = _by_attrs(points["trio_peers.election.rounds"])
    assert {k: p.value for k, p in rounds.items()} == {
        frozenset({NAME, ("trio_peers.outcome", "denied")}): 1,
        frozenset({NAME, ("trio_peers.outcome", "gained")}): 1,
        frozenset({NAME, ("trio_peers.outcome", "renewed")}): 2,
    }

    (duration,) = points["trio_peers.election.duration"]
    assert isinstance(duration, HistogramDataPoint)
    assert duration.count == 4
    assert duration.sum == pytest.approx(0.003 + 0.004 + 0.002 + 2.0)
    assert tuple(duration.explicit_bounds) == tuple(DURATION_BUCKETS)

    (trust,) = points["trio_peers.trust.remaining"]
    assert trust.count == 3  # leaders' rounds only
    assert trust.min == pytest.approx(0.3)
    assert tuple(trust.explicit_bounds) == tuple(TRUST_BUCKETS)
    assert trust.bucket_counts[TRUST_BUCKETS.index(0.5)] == 1  # 0.3 s: in (0.25, 0.5]

    hook(LeadershipLost(name="reports", node="web-1", term=7, reason="lost", at=2.0))
    points = _points(reader)
    assert [p.value for p in points["trio_peers.leader"]] == [0]
    assert [p.value for p in points["trio_peers.term"]] == [7]  # the last term stays visible


def test_faults_notifications_and_releases(reader: InMemoryMetricReader) -> None:
    hook = PeerMetrics(MeterProvider(metric_readers=[reader]))
    hook(_round("failed", error="BackendUnavailable: timed out", duration=5.0))
    for kind in ("connection_lost", "connection_lost", "statement"):
        hook(Fault(name="reports", node="web-1", kind=kind, error="X: y", at=1.0))
    for kind in ("down", "ignored", "ignored", "malformed"):
        hook(NotificationReceived(name="reports", node="web-1", kind=kind, at=1.0))  # type: ignore[arg-type]
    hook(LeadershipGained(name="reports", node="web-1", term=3, at=1.0))
    hook(LeaseReleased(name="reports", node="web-1", term=3, released=True, duration=0.01, at=2))

    points = _points(reader)
    faults = {dict(p.attributes)["trio_peers.fault"]: p.value for p in points["trio_peers.faults"]}
    assert faults == {"connection_lost": 2, "statement": 1}
    notes = {
        dict(p.attributes)["trio_peers.kind"]: p.value for p in points["trio_peers.notifications"]
    }
    assert notes == {"down": 1, "ignored": 2, "malformed": 1}
    (release,) = points["trio_peers.lease.releases"]
    assert dict(release.attributes) == {"trio_peers.name": "reports", "trio_peers.released": True}
    assert [p.value for p in points["trio_peers.leader"]] == [0]  # released: not leading
    (failed,) = points["trio_peers.election.rounds"]
    assert dict(failed.attributes)["trio_peers.outcome"] == "failed"
    assert "trio_peers.trust.remaining" not in points  # a follower's failure has no trust


def test_busy_rounds_count_but_have_no_latency(reader: InMemoryMetricReader) -> None:
    hook = PeerMetrics(MeterProvider(metric_readers=[reader]))
    hook(_round("busy", duration=0.0))
    points = _points(reader)
    assert [p.value for p in points["trio_peers.election.rounds"]] == [1]
    assert "trio_peers.election.duration" not in points


def test_names_and_nodes_are_separate_series(reader: InMemoryMetricReader) -> None:
    hook = PeerMetrics(MeterProvider(metric_readers=[reader]), include_node=True)
    hook(LeadershipGained(name="reports", node="web-1", term=1, at=1.0))
    hook(LeadershipGained(name="billing", node="web-1", term=4, at=1.0))
    hook(_round("denied", node="web-2"))
    points = _points(reader)
    leaders = {
        (dict(p.attributes)["trio_peers.name"], dict(p.attributes)["trio_peers.node"]): p.value
        for p in points["trio_peers.leader"]
    }
    assert leaders == {("reports", "web-1"): 1, ("billing", "web-1"): 1, ("reports", "web-2"): 0}


def test_the_global_meter_provider_is_the_default() -> None:
    # Without a provider, the API's global one is used: a no-op until the application sets
    # one, so the hook is safe to install unconditionally.
    hook = PeerMetrics()
    hook(LeadershipGained(name="reports", node="web-1", term=1, at=1.0))
    hook(_round("renewed", term=1, trust_left=10.0))
