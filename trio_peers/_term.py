"""Fencing terms that carry the server's timeline, and the failover barrier. Pure.

A PostgreSQL promotion starts a new timeline (see :mod:`._position`). A term is
``((timeline - 1) << 32) | n``, ``n`` counting tenures from 1 within the timeline: on
timeline 1 terms are 1, 2, 3... as they always were, and a term handed out on a later
timeline is above every term of an earlier one, even when the promoted standby lost the
last commits (and so the last terms) of the old primary.

A lease row last written on an older timeline than the server's may still be trusted by a
leader of the old primary. The first election statement that finds one turns it into a
*barrier*: a lease held by :data:`BARRIER_NODE` (a node value no peer can have), with a
term of the new timeline, for :func:`._core.drift_bound` of the name's interval; nobody
takes it before it expires.
"""

from __future__ import annotations

from typing import Final, final

#: Bits of a term below the timeline.
TIMELINE_SHIFT: Final = 32
#: The ``node`` of a barrier row. ``PeerConfig`` refuses an empty node, so no peer has it.
BARRIER_NODE: Final = ""


def first_term(timeline: int) -> int:
    """The first term of a tenure on ``timeline`` (1 on timeline 1)."""
    if timeline < 1:
        raise ValueError(f"a timeline is at least 1, got {timeline}")
    return ((timeline - 1) << TIMELINE_SHIFT) | 1


def term_timeline(term: int) -> int:
    """The timeline a term was handed out on (1 for every term below ``2**32``)."""
    if term < 1:
        raise ValueError(f"a term is at least 1, got {term}")
    return (term >> TIMELINE_SHIFT) + 1


@final
class TimelineMemory:
    """The highest timeline a peer has seen, per ``system_identifier``.

    Timelines of servers made by separate ``initdb`` runs are unrelated: only servers of
    one system (a primary and the standbys copied from it) are compared.
    """

    def __init__(self) -> None:
        self._highest: dict[int, int] = {}
        self._barriers_logged: set[tuple[int, int]] = set()

    def saw(self, system_identifier: int, timeline: int) -> None:
        """A server of ``system_identifier`` reported ``timeline``."""
        if timeline > self._highest.get(system_identifier, 0):
            self._highest[system_identifier] = timeline

    def minimum(self, system_identifier: int | None) -> int:
        """The lowest timeline this peer may write on in that system (0: any)."""
        if system_identifier is None:
            return 0
        return self._highest.get(system_identifier, 0)

    def first_barrier(self, system_identifier: int, timeline: int) -> bool:
        """True the first time a barrier of ``timeline`` is met or installed (to log once)."""
        key = (system_identifier, timeline)
        if key in self._barriers_logged:
            return False
        self._barriers_logged.add(key)
        return True
