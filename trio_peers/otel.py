"""OpenTelemetry metrics for trio-peers: ``pip install 'trio-peers[otel]'``.

:class:`PeerMetrics` is an event hook (see :data:`trio_peers.EventHook`) that turns a peer's
events into OpenTelemetry instruments, through ``opentelemetry-api`` only: the application
chooses the SDK, the exporter and the meter provider. ``import trio_peers`` does not import
this module.

Instruments (all with the attribute ``trio_peers.name``, the instance name, and with
``trio_peers.node`` when asked for):

=================================== ============== ============================================
``trio_peers.leader``               gauge          1 while this peer leads, else 0
``trio_peers.term``                 gauge          the term of the current or last tenure
``trio_peers.election.rounds``      counter        rounds, by ``trio_peers.outcome``
``trio_peers.election.duration``    histogram (s)  how long each round's statement took
``trio_peers.trust.remaining``      histogram (s)  trust left when a leader's round finished
``trio_peers.faults``               counter        faults, by ``trio_peers.fault``
``trio_peers.notifications``        counter        notifications, by ``trio_peers.kind``
``trio_peers.lease.releases``       counter        releases, by ``trio_peers.released``
=================================== ============== ============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Final, final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ._events import (
    ElectionRound,
    Fault,
    LeadershipGained,
    LeadershipLost,
    LeaseReleased,
    NotificationReceived,
    PeerEvent,
)

__all__ = ["DURATION_BUCKETS", "TRUST_BUCKETS", "PeerMetrics"]

#: Bucket boundaries (seconds) of ``trio_peers.election.duration``: one statement's round trip.
DURATION_BUCKETS: Final[Sequence[float]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Bucket boundaries (seconds) of ``trio_peers.trust.remaining``: a leader renews with about
#: ``interval`` of trust left (30 s by default); a renewal that ends near 0 was nearly too late.
TRUST_BUCKETS: Final[Sequence[float]] = (
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
)  # fmt: skip

_Key = tuple[tuple[str, str], ...]


@final
class PeerMetrics:
    """An event hook that records OpenTelemetry metrics for every peer it is given to.

    One instance can serve many peers (different names, or several peers in one process).
    Calling it is cheap and never blocks: counters and histograms are recorded at once; the
    two gauges are kept in a dict and reported when the SDK collects.

    Args:
        meter_provider: where the instruments are created; by default the global one
            (:func:`opentelemetry.metrics.get_meter_provider`).
        include_node: add the ``trio_peers.node`` attribute too. Off by default: the default
            node id is new in every process, which gives each restart its own time series.
    """

    def __init__(
        self, meter_provider: MeterProvider | None = None, *, include_node: bool = False
    ) -> None:
        from . import __version__

        self._include_node = include_node
        self._lock = threading.Lock()  # the SDK collects on its own thread
        self._leader: dict[_Key, int] = {}
        self._term: dict[_Key, int] = {}
        meter = metrics.get_meter("trio_peers", __version__, meter_provider=meter_provider)
        self._rounds = meter.create_counter(
            "trio_peers.election.rounds", unit="{round}", description="Election rounds run"
        )
        self._duration = meter.create_histogram(
            "trio_peers.election.duration",
            unit="s",
            description="Duration of an election round's statement",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._trust = meter.create_histogram(
            "trio_peers.trust.remaining",
            unit="s",
            description="Seconds of trust a leader had left when its round finished",
            explicit_bucket_boundaries_advisory=TRUST_BUCKETS,
        )
        self._faults = meter.create_counter(
            "trio_peers.faults", unit="{fault}", description="Faults the peer recovered from"
        )
        self._notifications = meter.create_counter(
            "trio_peers.notifications",
            unit="{notification}",
            description="Notifications received on the peers' channel",
        )
        self._releases = meter.create_counter(
            "trio_peers.lease.releases", unit="{release}", description="Lease releases tried"
        )
        meter.create_observable_gauge(
            "trio_peers.leader",
            callbacks=[self._observe_leader],
            unit="1",
            description="1 while this peer leads, else 0",
        )
        meter.create_observable_gauge(
            "trio_peers.term",
            callbacks=[self._observe_term],
            unit="1",
            description="Fencing term of this peer's current or last tenure",
        )

    def _key(self, name: str, node: str) -> _Key:
        if self._include_node:
            return (("trio_peers.name", name), ("trio_peers.node", node))
        return (("trio_peers.name", name),)

    def __call__(self, event: PeerEvent) -> None:
        """Record one event."""
        key = self._key(event.name, event.node)
        attributes = dict(key)
        if isinstance(event, ElectionRound):
            self._rounds.add(1, {**attributes, "trio_peers.outcome": event.outcome})
            if event.outcome != "busy":
                self._duration.record(event.duration, attributes)
            if event.trust_left is not None:
                self._trust.record(max(event.trust_left, 0.0), attributes)
            with self._lock:
                self._leader.setdefault(key, 0)  # a follower's series exists too, at 0
                if event.term is not None:
                    self._term[key] = event.term
        elif isinstance(event, LeadershipGained):
            with self._lock:
                self._leader[key] = 1
                self._term[key] = event.term
        elif isinstance(event, LeadershipLost):
            with self._lock:
                self._leader[key] = 0
        elif isinstance(event, Fault):
            self._faults.add(1, {**attributes, "trio_peers.fault": event.kind})
        elif isinstance(event, NotificationReceived):
            self._notifications.add(1, {**attributes, "trio_peers.kind": event.kind})
        elif isinstance(event, LeaseReleased):
            self._releases.add(1, {**attributes, "trio_peers.released": event.released})
            with self._lock:
                self._leader[key] = 0

    def _observe_leader(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._leader.items())
        return [Observation(value, dict(key)) for key, value in items]

    def _observe_term(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._term.items())
        return [Observation(value, dict(key)) for key, value in items]
