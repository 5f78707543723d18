"""The seeded fault schedule: pure, no I/O. Same arguments, same schedule.

Faults overlap on purpose: the only rule is that one *slot* (worker) has at
most one process fault at a time (a killed worker cannot also be paused), at
most one network fault at a time, and at most one same-``node`` twin; the
server has at most one restart at a time. Everything else may coincide: a
leader can be paused while its network is black-holed and the server restarts.
"""

from __future__ import annotations

import random
from typing import Any, Final

import attrs

#: Process faults, aimed at one worker slot.
PROCESS_KINDS: Final = ("kill", "stop", "term", "resign")
#: Network faults, on one slot's proxy or on all of them.
NETWORK_KINDS: Final = ("latency", "blackhole", "reset", "refuse")
#: Server faults.
SERVER_KINDS: Final = ("terminate", "pg_restart")
#: A second process with the same ``node`` value as a slot's worker.
TWIN_KINDS: Final = ("twin",)

KINDS: Final = PROCESS_KINDS + NETWORK_KINDS + SERVER_KINDS + TWIN_KINDS

#: Relative frequency of each kind.
WEIGHTS: Final = {
    "kill": 2.0,
    "stop": 2.5,
    "term": 1.5,
    "resign": 1.0,
    "latency": 1.0,
    "blackhole": 1.5,
    "reset": 1.0,
    "refuse": 0.7,
    "terminate": 1.2,
    "pg_restart": 0.5,
    "twin": 0.8,
}

#: Seconds a slot stays reserved after a process fault, for the worker to start again.
RESTART_ALLOWANCE: Final = 3.0


@attrs.frozen(kw_only=True)
class Fault:
    """One planned fault. ``at`` is seconds after the faults begin."""

    id: int
    kind: str
    at: float
    duration: float
    """How long the fault lasts (0 for instant ones; for kill/term: the time the
    slot stays without a worker before the restart)."""
    target: int | None
    """The slot, or ``None`` for all slots / the server."""
    params: dict[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def make_schedule(
    *, seed: int, duration: float, workers: int, interval: float, rate: float, tail: float
) -> list[Fault]:
    """Faults with a Poisson arrival ``rate`` (per second) that all end ``tail`` s before ``duration``."""
    rng = random.Random(seed)
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    slot_busy = [0.0] * workers
    net_busy = [0.0] * workers
    twin_busy = [0.0] * workers
    pg_busy = 0.0
    faults: list[Fault] = []
    t = 0.0
    end = duration - tail
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        kind = rng.choices(kinds, weights)[0]
        u = rng.random()
        params: dict[str, Any] = {}
        target: int | None = None
        if kind in PROCESS_KINDS:
            free = [s for s in range(workers) if slot_busy[s] <= t]
            if not free:
                continue
            target = rng.choice(free)
            if kind == "kill":
                dur = (0.1 + 1.4 * u) * interval
                slot_busy[target] = t + dur + RESTART_ALLOWANCE
            elif kind == "stop":
                dur = (0.1 + 2.9 * u) * interval  # up to 3 x interval
                slot_busy[target] = t + dur + 0.5
            elif kind == "term":
                dur = (0.1 + 0.9 * u) * interval
                slot_busy[target] = t + dur + RESTART_ALLOWANCE + 2.0
            else:  # resign
                dur = 0.0
                params["pick"] = rng.randrange(1000)
                slot_busy[target] = t + 0.2
        elif kind in NETWORK_KINDS:
            everyone = rng.random() < 0.2
            free = [s for s in range(workers) if net_busy[s] <= t]
            if everyone and len(free) < workers:
                everyone = False
            if not free:
                continue
            target = None if everyone else rng.choice(free)
            if kind == "latency":
                dur = (0.5 + 2.5 * u) * interval
                params["delay"] = round((0.02 + 0.3 * rng.random()) * interval, 4)
            elif kind in ("blackhole", "refuse"):
                dur = (0.2 + 2.8 * u) * interval
            else:  # reset
                dur = 0.0
            for s in range(workers) if everyone else [target]:
                assert s is not None
                net_busy[s] = t + dur + 0.1
        elif kind in SERVER_KINDS:
            if kind == "terminate":
                dur = 0.0
                params["fraction"] = round(0.2 + 0.8 * u, 3)
                params["pick"] = rng.randrange(2**31)
            else:
                if pg_busy > t:
                    continue
                dur = u * interval  # time the server stays down
                pg_busy = t + dur + 2.0
        else:  # twin
            free = [s for s in range(workers) if twin_busy[s] <= t]
            if not free:
                continue
            target = rng.choice(free)
            dur = (1.0 + 3.0 * u) * interval
            twin_busy[target] = t + dur + RESTART_ALLOWANCE + 2.0
        if t + dur >= end:
            continue
        faults.append(
            Fault(
                id=len(faults),
                kind=kind,
                at=round(t, 4),
                duration=round(dur, 4),
                target=target,
                params=params,
            )
        )
    return faults
