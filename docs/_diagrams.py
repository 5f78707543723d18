"""Timing diagrams for the docs, drawn by the docs build itself (a Sphinx extension).

Every time and length in a picture comes from trio-peers: the defaults of
:class:`trio_peers.PeerConfig` (``interval``, ``leader_boost``, ``max_clock_drift``,
``trust_margin``, ``effective_statement_timeout``) and the election core's own formulas
(``ElectionCore.resign_hold``, ``ElectionCore.expiry_slack``, ``JITTER``). Change a default or
a formula and the pictures follow. Only ``T``, one statement's round trip, is an assumption
(the library cannot know it); it is stated in each picture that uses it.

The SVGs are written to ``docs/_generated/`` (not in git) when the builder starts, and
included with ``.. image:: _generated/NAME.svg``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sphinx.application import Sphinx

from trio_peers import PeerConfig
from trio_peers._core import JITTER, ElectionCore

OUT_DIR = "_generated"

# Colours (colour-blind safe, after Okabe and Ito), one per role.
LEASE = "#0072B2"  # the database's lease
TRUST = "#009E73"  # a peer's trust window (is_leader true)
ROUND = "#E69F00"  # an election round in flight
HOLD = "#CC79A7"  # a resigned peer holding its bids
ALERT = "#D55E00"  # crash, bound
GREY = "#777777"

# One statement's round trip in the pictures that need one (an assumption, not a setting).
T_GRACEFUL = 0.002
T_CRASH = 0.05


class Timing:
    """The numbers the pictures show, from the library's defaults and formulas."""

    def __init__(self) -> None:
        config = PeerConfig(dsn="postgresql://localhost/diagrams")
        self.interval = config.interval
        self.boost = config.leader_boost
        self.m = config.max_clock_drift
        self.margin = config.trust_margin
        self.st = config.effective_statement_timeout
        core = ElectionCore(
            interval=config.interval,
            leader_boost=config.leader_boost,
            trust_margin=config.trust_margin,
            statement_timeout=config.effective_statement_timeout,
            max_clock_drift=config.max_clock_drift,
        )
        self.resign_hold = core.resign_hold
        self.slack = core.expiry_slack
        self.jitter = JITTER
        self.window = self.interval - self.margin  # trust window of one round
        self.renew_every = min(self.interval / self.boost, self.window - self.st)

    def d_crash(self, t: float) -> float:
        m = self.m
        return self.interval * (1 + m) / (1 - m) + self.slack / (1 - m) + 2 * t


# ---------------------------------------------------------------------- drawing helpers


def _figure(rows: Sequence[str], *, height: float = 2.6) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(9.0, height), layout="constrained")
    ax.set_ylim(-0.8, len(rows) - 0.05)
    ax.set_yticks(range(len(rows)), list(reversed(rows)))
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    return fig, ax


def _row(rows: Sequence[str], name: str) -> int:
    return len(rows) - 1 - list(rows).index(name)


def _bar(
    ax: Axes, y: float, start: float, end: float, color: str, label: str = "", **kw: Any
) -> None:
    ax.broken_barh([(start, end - start)], (y - 0.22, 0.44), color=color, **kw)
    if label:
        ax.text((start + end) / 2, y, label, ha="center", va="center", fontsize=8.5, color="white")


def _mark(
    ax: Axes,
    x: float,
    y: float,
    text: str,
    *,
    color: str = "black",
    above: bool = True,
    ha: str = "center",
) -> None:
    ax.plot([x, x], [y - 0.3, y + 0.3], color=color, linewidth=1.4)
    ax.text(
        x,
        y + (0.34 if above else -0.34),
        text,
        ha=ha,
        va="bottom" if above else "top",
        fontsize=8,
        color=color,
    )


def _span(ax: Axes, x0: float, x1: float, y: float, text: str, *, color: str = "black") -> None:
    ax.annotate(
        "",
        xy=(x1, y),
        xytext=(x0, y),
        arrowprops={
            "arrowstyle": "<->",
            "color": color,
            "linewidth": 1.0,
            "shrinkA": 0,
            "shrinkB": 0,
        },
    )
    ax.text((x0 + x1) / 2, y + 0.06, text, ha="center", va="bottom", fontsize=8, color=color)


def _s(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


# ---------------------------------------------------------------------- the pictures


def trust_window(t: Timing) -> Figure:
    rows = ["leader's rounds", "leader trusts", "database lease"]
    fig, ax = _figure(rows, height=3.0)
    y_round, y_trust, y_lease = (_row(rows, r) for r in rows)
    starts = [0.0, t.renew_every]  # two rounds, then the leader stops (crash, pause)
    last = starts[-1]
    for s in starts:
        _bar(ax, y_round, s, s + 0.6, ROUND)
        _mark(ax, s, y_round, f"round at {s:g} s", above=False)
    _bar(ax, y_lease, 0.0, last + t.interval, LEASE, "lease: interval from the last round's now()")
    _bar(
        ax,
        y_trust,
        0.0,
        last + t.window,
        TRUST,
        "is_leader: interval - interval * m from its start",
    )
    _mark(
        ax,
        last + t.interval,
        y_lease,
        f"lease expires ({_s(last + t.interval)})",
        color=LEASE,
        above=False,
    )
    _mark(
        ax,
        last + t.window,
        y_trust,
        f"trust ends ({_s(last + t.window)})",
        color=TRUST,
        ha="right",
    )
    _span(
        ax,
        0.0,
        t.renew_every,
        y_round + 0.45,
        f"next round after min(interval / leader_boost, W - st) = {_s(t.renew_every)} (jitter: up to {t.jitter:.0%} sooner)",
    )
    ax.set_xlim(-1.0, last + t.interval + 17)
    ax.set_xlabel(
        "seconds (database clock; defaults: interval "
        f"{t.interval:g} s, leader_boost {t.boost:g}, max_clock_drift {t.m:g}, st {t.st:g} s)"
    )
    # The margin is a hundredth of the lease: zoom in on the end.
    zoom = ax.inset_axes((0.82, 0.2, 0.17, 0.36))
    end = last + t.interval
    zoom.broken_barh([(end - 2, 2)], (0.6, 0.3), color=LEASE)
    zoom.broken_barh([(end - 2, 2 - t.margin)], (0.1, 0.3), color=TRUST)
    zoom.set_xlim(end - 1.2, end + 0.3)
    zoom.set_ylim(0, 1.0)
    zoom.set_yticks([])
    zoom.tick_params(labelsize=6.5)
    zoom.annotate(
        "",
        xy=(end, 0.5),
        xytext=(end - t.margin, 0.5),
        arrowprops={"arrowstyle": "<->", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0},
    )
    zoom.set_title(f"zoomed: margin interval * m = {t.margin:.2f} s", fontsize=7, pad=2)
    return fig


def graceful_handover(t: Timing) -> Figure:
    rows = ["A (leader)", "database", "B (follower)"]
    fig, ax = _figure(rows, height=2.9)
    y_a, y_db, y_b = (_row(rows, r) for r in rows)
    ms = 1000.0
    T = T_GRACEFUL * ms
    runs = T / 2  # the release runs halfway through its round trip
    notify = runs + T / 2  # delivered at commit, about as long as a reply
    _bar(ax, y_a, -3 * T, 0.0, TRUST, "leads")
    _mark(ax, 0.0, y_a, "resign() or exit: trust ends first", color=TRUST)
    _bar(ax, y_a, 0.0, T, ROUND, "release")
    _bar(ax, y_db, -3 * T, runs, LEASE, "A's lease")
    _mark(ax, runs, y_db, "expires_at = now(); NOTIFY at commit", color=LEASE)
    _bar(ax, y_b, notify - 0.4 * T, notify + T, ROUND, "round in flight", alpha=0.55)
    _bar(ax, y_b, notify + T, notify + 2 * T, ROUND, "bid")
    _mark(ax, notify, y_b, "notified", above=False)
    _bar(ax, y_b, notify + 2 * T, notify + 4 * T, TRUST, "leads")
    _span(ax, notify, notify + 2 * T, y_b + 0.45, "≤ 2 T after the notification", color=ALERT)
    ax.set_xlim(-3.2 * T, notify + 4.2 * T)
    ax.set_xlabel(
        f"milliseconds (T, one statement's round trip, drawn as {T:g} ms)\nWithout the "
        f"notification, B finds the lease free at its next poll (≤ interval = {t.interval:g} s)"
    )
    return fig


def crash_handover(t: Timing) -> Figure:
    rows = ["A (leader)", "database", "B (follower)"]
    fig, ax = _figure(rows, height=2.9)
    y_a, y_db, y_b = (_row(rows, r) for r in rows)
    T = T_CRASH
    crash = T  # right after A's renewal ran at 0: the lease has a whole interval to go
    expiry = t.interval
    denied_at = 1.0  # B's last round, denied: the reply says the lease has `remaining` left
    remaining = expiry - denied_at
    wake = denied_at + T + remaining * (1 + t.m) + t.slack
    _bar(ax, y_a, -2.0, crash, TRUST)
    _mark(ax, crash, y_a, "A crashes (SIGKILL): no release", color=ALERT)
    _bar(ax, y_db, -2.0, expiry, LEASE, "A's lease runs out: interval from its last round's now()")
    _mark(ax, expiry, y_db, f"expires ({_s(expiry)})", color=LEASE)
    _bar(ax, y_b, denied_at, denied_at + 0.5, ROUND)
    _mark(ax, denied_at, y_b, "denied: lease has R left", above=False)
    _span(
        ax,
        denied_at,
        wake,
        y_b + 0.42,
        f"wakes R * (1 + m) + slack later (slack {t.slack * 1000:.0f} ms)",
    )
    _bar(ax, y_b, wake, wake + 0.5, ROUND)
    _bar(ax, y_b, wake + 0.5, wake + 3.0, TRUST, "leads")
    bound = crash + t.d_crash(T)
    ax.axvline(bound, color=ALERT, linestyle="--", linewidth=1.0)
    ax.text(
        bound + 0.15,
        y_a,
        f"bound: crash + D_crash\n= {_s(bound)}",
        color=ALERT,
        fontsize=8,
        va="center",
    )
    ax.set_xlim(-2.2, bound + 4.5)
    ax.set_xlabel(
        f"seconds (defaults: interval {t.interval:g} s, max_clock_drift {t.m:g}; T drawn as "
        f"{T * 1000:g} ms)\nD_crash = interval (1 + m) / (1 - m) + slack / (1 - m) + 2 T"
    )
    return fig


def resign_hold(t: Timing) -> Figure:
    rows = ["A (resigned)", "database", "B (follower)"]
    fig, ax = _figure(rows, height=2.9)
    y_a, y_db, y_b = (_row(rows, r) for r in rows)
    m = t.m
    last_poll = 0.0  # B's last round ran just as A resigned: the latest next poll
    latest_next = last_poll + t.interval * (1 + m) / (1 - m)  # on A's clock, B's clock slow
    _bar(ax, y_a, -2.0, 0.0, TRUST)
    _mark(ax, 0.0, y_a, "resign(): releases; the notification is lost", color=ALERT)
    _bar(ax, y_a, 0.0, t.resign_hold, HOLD, "holds its bids, ignores stale releases")
    _mark(ax, t.resign_hold, y_a, f"may bid again ({_s(t.resign_hold)})", color=HOLD, above=False)
    _bar(ax, y_db, -2.0, 0.0, LEASE)
    _mark(ax, 0.0, y_db, "A's lease released", color=LEASE, above=False)
    _bar(ax, y_b, last_poll - 0.3, last_poll, ROUND)
    _span(
        ax,
        last_poll,
        latest_next,
        y_b + 0.42,
        "B's next poll: ≤ interval on B's clock, ≤ interval (1 + m) / (1 - m) on A's",
    )
    _bar(ax, y_b, latest_next, latest_next + 0.3, ROUND)
    _bar(ax, y_b, latest_next + 0.3, latest_next + 2.5, TRUST, "leads")
    ax.set_xlim(-2.2, t.resign_hold + 3.0)
    ax.set_xlabel(
        f"seconds (defaults: interval {t.interval:g} s, max_clock_drift {m:g})\nresign_hold = "
        f"interval (1 + m) / (1 - m) + slack = {t.resign_hold:.3f} s"
    )
    zoom = ax.inset_axes((0.42, 0.42, 0.2, 0.17))
    zoom.broken_barh([(t.resign_hold - 1, 1)], (0.6, 0.3), color=HOLD)
    zoom.broken_barh([(latest_next, 1)], (0.1, 0.3), color=TRUST)
    zoom.set_xlim(latest_next - 0.15, t.resign_hold + 0.1)
    zoom.set_ylim(0, 1.0)
    zoom.set_yticks([])
    zoom.set_xticks([])
    zoom.set_title(
        f"zoomed: B bids {(t.resign_hold - latest_next) * 1000:.0f} ms before A's hold ends",
        fontsize=7,
        pad=2,
    )
    return fig


DIAGRAMS: dict[str, Callable[[Timing], Figure]] = {
    "trust-window": trust_window,
    "graceful-handover": graceful_handover,
    "crash-handover": crash_handover,
    "resign-hold": resign_hold,
}


def write_all(out_dir: Path) -> list[Path]:
    """Draw every diagram into ``out_dir`` as SVG; return the paths."""
    out_dir.mkdir(exist_ok=True)
    timing = Timing()
    paths = []
    with plt.rc_context({"svg.hashsalt": "trio-peers", "font.size": 9, "svg.fonttype": "path"}):
        for name, draw in DIAGRAMS.items():
            fig = draw(timing)
            path = out_dir / f"{name}.svg"
            fig.savefig(path, format="svg", metadata={"Date": None})
            plt.close(fig)
            paths.append(path)
    return paths


def _builder_inited(app: Sphinx) -> None:
    write_all(Path(app.srcdir) / OUT_DIR)


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("builder-inited", _builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
