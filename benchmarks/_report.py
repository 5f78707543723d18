"""The results folder's table (Markdown) and plots (matplotlib), from one run's data."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TP, OBAN = "trio-peers", "oban-py"
TPS = "trio-peers-session"  # session.open_peer on a session that stays open


NOTES = (
    "Every peer is an OS process; each stamps its events with CLOCK_MONOTONIC (one clock for "
    "the host). Graceful handover: from the leader's 'starts leaving' to the first other process "
    "reporting leadership. Leaving time: from 'starts leaving' to the exit returning "
    "(trio-peers: `async with open_peer` exited, its connection closed; oban-py: `Oban.stop()` "
    "returned, the application's pool still open). The session.open_peer rows are trio-peers "
    "with the same like-for-like shape as oban-py: each process keeps one session open, and "
    "joins and leaves with a `session.open_peer` block on it (leaving releases the name; the "
    "connection stays).",
    "oban-py's leader interval cannot be set through its public API (`Oban(...)` passes only "
    "`enabled` to its leader, which then uses 30 s), so crash handover at interval 1 s is "
    "measured for trio-peers only; both libraries are measured at their defaults (30 s).",
    "Crash handover: from SIGKILL of the leader, at a random phase of its renewal cycle, to the "
    "follower reporting leadership.",
    "Idle cost: 3 processes per library at its default interval, each library in a database of "
    "its own (pg_stat_database, and pg_stat_statements for statements and their WAL bytes, per "
    "database); commits include the database's background transactions (autovacuum). oban-py's minimal instance (no queues, "
    "leadership on) still runs its stager every second.",
    "WAL: oban-py's install makes its leaders table UNLOGGED (no WAL, and its rows do not "
    "survive a server crash); trio-peers' table is logged by default "
    "(`migrate(unlogged=True)` makes it unlogged too).",
    "Herd: 1 leader and N followers of one name; the leader leaves; 'first leader' is the first "
    "report of leadership, 'settled' the moment the last follower's reaction round ended "
    "(trio-peers: a tracing wrapper of the public PeerBackend protocol; oban-py: its public "
    "`oban.leader.election.stop` telemetry event).",
    "Floor: a release statement (UPDATE + pg_notify in one transaction), the NOTIFY delivery, "
    "and one election statement, through plain asyncio asyncpg between two processes, with "
    "trio-peers' own SQL.",
)


def _ms(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v * 1000:.1f} ms"


def _s(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f} s"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}"


Row = tuple[str, str, str, str, str, str]


def main_rows(results: dict[str, Any]) -> list[Row]:
    """The comparison table's rows: measure, trio-peers, oban-py, their ratio, and each as a
    multiple of the floor (same number of processes, same quantile)."""
    rows: list[Row] = []

    def stat(key: str, q: str) -> float | None:
        r = results.get(key)
        return None if r is None or not r.get("n") else r.get(q)

    def add(
        label: str, tp: float | None, ob: float | None, fmt: Any = _ms, floor: float | None = None
    ) -> None:
        rows.append(
            (
                label,
                fmt(tp),
                fmt(ob),
                _ratio(tp, ob),
                _ratio(tp, floor) if floor else "",
                _ratio(ob, floor) if floor else "",
            )
        )

    def handover_rows(lib: str, form: str, peers: int, n: float, quantiles: Sequence[str]) -> None:
        """Graceful handover and leaving time of ``lib`` (a trio-peers form) against oban-py."""
        for q in quantiles:
            add(
                f"graceful handover, {form}{peers} processes, {q} (n={n:.0f})",
                stat(f"graceful/{lib}/{peers}", q),
                stat(f"graceful/{OBAN}/{peers}", q),
                floor=stat(f"floor/{peers}", q) or stat("floor", q),
            )
        for q in ("p50", "p95"):
            add(
                f"leaving time, {form}{peers} processes, {q}",
                stat(f"leave/{lib}/{peers}", q),
                stat(f"leave/{OBAN}/{peers}", q),
            )

    for peers in (2, 3, 5):
        n = max(
            stat(f"graceful/{TP}/{peers}", "n") or 0, stat(f"graceful/{OBAN}/{peers}", "n") or 0
        )
        if not n:
            continue
        handover_rows(TP, "", peers, n, ("min", "p50", "p95", "max"))
        n_session = stat(f"graceful/{TPS}/{peers}", "n")
        if n_session:
            handover_rows(TPS, "session.open_peer, ", peers, n_session, ("p50", "p95"))
    c1 = f"crash/{TP}/1s"
    if stat(c1, "n"):
        for q in ("p50", "p95", "max"):
            add(
                f"crash handover, interval 1 s, {q} (n={stat(c1, 'n'):.0f})", stat(c1, q), None, _s
            )
    for q in ("p50", "max"):
        n_tp, n_ob = stat(f"crash/{TP}/default", "n"), stat(f"crash/{OBAN}/default", "n")
        if n_tp or n_ob:
            add(
                f"crash handover, default interval (30 s), {q} (n={n_tp or 0:.0f}/{n_ob or 0:.0f})",
                stat(f"crash/{TP}/default", q),
                stat(f"crash/{OBAN}/default", q),
                _s,
            )
    idle_tp, idle_ob = results.get(f"idle/{TP}"), results.get(f"idle/{OBAN}")
    if idle_tp or idle_ob:
        for key, label, fmt in (
            (
                "statements_per_s_per_peer",
                "idle statements/s per peer",
                lambda v: "n/a" if v is None else f"{v:.3f}",
            ),
            (
                "commits_per_s_per_peer",
                "idle commits/s per peer",
                lambda v: "n/a" if v is None else f"{v:.3f}",
            ),
            (
                "wal_bytes_per_s_per_peer",
                "idle WAL bytes/s per peer",
                lambda v: "n/a" if v is None else f"{v:.0f}",
            ),
            (
                "connections_per_peer",
                "server connections per peer",
                lambda v: "n/a" if v is None else f"{v:.1f}",
            ),
            (
                "cpu_per_peer",
                "idle CPU per peer (% of a core)",
                lambda v: "n/a" if v is None else f"{v * 100:.3f}",
            ),
            (
                "rss_bytes_per_peer",
                "memory (RSS) per peer, MiB",
                lambda v: "n/a" if v is None else f"{v / 2**20:.1f}",
            ),
        ):
            add(label, (idle_tp or {}).get(key), (idle_ob or {}).get(key), fmt)
    herd_tp, herd_ob = results.get(f"herd/{TP}"), results.get(f"herd/{OBAN}")
    if herd_tp or herd_ob:
        f = (herd_tp or herd_ob or {}).get("followers")
        for part, label in (("winner", "first leader"), ("settled", "every follower settled")):
            for q in ("p50", "max"):
                add(
                    f"herd of {f}: {label}, {q}",
                    ((herd_tp or {}).get(part) or {}).get(q),
                    ((herd_ob or {}).get(part) or {}).get(q),
                )
        rows.append(
            (
                f"herd of {f}: most leaders seen in one round",
                str((herd_tp or {}).get("max_winners", "n/a")),
                str((herd_ob or {}).get("max_winners", "n/a")),
                "",
                "",
                "",
            )
        )
    for suffix, how in (("", "unpinned"), ("/pinned", "pinned to one CPU")):
        st_t = results.get(f"statement/trio_asyncio{suffix}")
        st_a = results.get(f"statement/asyncio{suffix}")
        if st_t and st_a:
            rows.append(
                (
                    f"election statement p50, trio-asyncio vs plain asyncio, {how} "
                    f"(n={st_t['n']})",
                    _ms(st_t["p50"]),
                    _ms(st_a["p50"]) + " (asyncio)",
                    _ratio(st_t["p50"], st_a["p50"]),
                    "",
                    "",
                )
            )
    for peers in (2, 3, 5):
        fl = results.get(f"floor/{peers}") or (results.get("floor") if peers == 2 else None)
        if not fl or not fl.get("n"):
            continue
        label = f"floor: release + NOTIFY + election, plain asyncpg, {peers} processes"
        rows += [
            (f"{label}, {q} (n={fl['n']})", _ms(fl[q]), "", "", "1.00", "1.00")
            for q in ("p50", "p95")
        ]
    return rows


SCALING_HEADER = (
    "names",
    "interval",
    "connections",
    "CPU leader",
    "CPU follower",
    "commits/s",
    "WAL B/s",
    "open all",
    "exit",
    "all led elsewhere",
    "failed rounds (A / B)",
)


def scaling_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in results.get("scaling") or []:
        if "skipped" in r:
            out.append(
                (str(r["names"]), f"{r['interval']:g} s", "skipped: " + r["skipped"], *[""] * 8)
            )
            continue
        out.append(
            (
                str(r["names"]),
                f"{r['interval']:g} s",
                f"{r['connections']:.0f}",
                f"{r['cpu_leader'] * 100:.2f} %",
                f"{r['cpu_follower'] * 100:.2f} %",
                f"{r['commits_per_s']:.1f}",
                f"{r['wal_bytes_per_s']:.0f}",
                _s(r["open_s"]),
                _s(r["exit_s"]),
                _s(r["handover_all_s"]),
                f"{r.get('failed_rounds_leader', 'n/a')} / {r.get('failed_rounds_follower', 'n/a')}",
            )
        )
    return out


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, "
        f"Linux {m['kernel']}; load average (1 min) {m['load_average_at_start'][0]:.2f} at the "
        f"start, {meta.get('load_average_at_end', [math.nan])[0]:.2f} at the end; "
        f"PostgreSQL {meta['postgresql'].get('server_version')}"
    )


MAIN_HEADER = (
    "measure",
    "trio-peers",
    "oban-py",
    "trio-peers ÷ oban-py",
    "trio-peers ÷ floor",
    "oban-py ÷ floor",
)


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The results folder's table.md."""
    out = [
        f"# trio-peers vs oban-py ({meta['mode']} mode, {meta['started_utc']})",
        "",
        f"Machine: {machine_line(meta)}. Other work shares the machine: compare ratios within "
        "this run. One throwaway PostgreSQL server for everything.",
        "",
        "| " + " | ".join(MAIN_HEADER) + " |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    out += [f"| {' | '.join(r)} |" for r in main_rows(results)]
    sc = scaling_rows(results)
    if sc:
        out += [
            "",
            "## Many names in one process (trio-peers; two processes: one leads every name, one follows)",
            "",
            "| " + " | ".join(SCALING_HEADER) + " |",
            "| " + " | ".join(["---"] * len(SCALING_HEADER)) + " |",
        ]
        out += [f"| {' | '.join(r)} |" for r in sc]
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in NOTES]
    out += ["", "## Versions", ""]
    out += [f"- {k}: {v}" for k, v in meta["versions"].items()]
    out += ["", "## PostgreSQL settings (not at their defaults)", ""]
    out += [f"- {k} = {v}" for k, v in meta["postgresql"].items()]
    out += ["", "## Load average by phase (1 min)", ""]
    out += [f"- {k}: {v[0]:.2f}" for k, v in meta.get("load_average_by_phase", {}).items()]
    return "\n".join(out) + "\n"


def _rst_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], widths: str) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in (header, *rows):
        cells = [c.replace("*", "\\*") or " " for c in row]
        out.append(f"   * - {cells[0]}")
        out += [f"     - {c}" for c in cells[1:]]
    return out


def table_rst(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The same tables as reStructuredText, for docs/performance.rst to include."""
    out = [
        f".. Generated by benchmarks/bench.py ({meta['mode']} mode, {meta['started_utc']}); "
        "do not edit.",
        "",
        f"Measured on {machine_line(meta)}; {meta['versions'].get('trio-peers peers', '')}; "
        f"{meta['versions'].get('oban-py peers', '')}.",
        "",
    ]
    out += _rst_table(MAIN_HEADER, main_rows(results), "34 14 14 12 13 13")
    sc = scaling_rows(results)
    if sc:
        out += [
            "",
            ".. _performance-names:",
            "",
            "Many names in one process",
            "~~~~~~~~~~~~~~~~~~~~~~~~~",
            "",
        ]
        out += _rst_table(SCALING_HEADER, sc, "8 8 9 9 9 9 9 9 9 11 10")
    return "\n".join(out) + "\n"


def _load(folder: Path) -> list[dict[str, Any]]:
    with (folder / "samples.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plots(folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    samples = _load(folder)
    made: list[Path] = []
    graceful: dict[tuple[str, int], list[float]] = defaultdict(list)
    floor: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        if s["bench"] == "graceful":
            graceful[(s["lib"], s["peers"])].append(s["handover_s"] * 1000)
        elif s["bench"] == "floor":
            floor[s.get("peers", 2)].append(s["seconds"] * 1000)
    if graceful:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        styles = {2: ":", 3: "-", 5: "--"}
        colors = {TP: "tab:blue", TPS: "tab:green", OBAN: "tab:orange"}
        top = max(max(v) for v in graceful.values()) * 1.5
        for (lib, peers), values in sorted(graceful.items()):
            v = sorted(values)
            y = [(i + 1) / len(v) for i in range(len(v))]
            ax.step(
                v,
                y,
                where="post",
                color=colors.get(lib, "k"),
                linestyle=styles.get(peers, "-"),
                label=f"{lib}, {peers} processes",
            )
        for peers, values in sorted(floor.items()):
            v = sorted(values)
            ax.step(
                v,
                [(i + 1) / len(v) for i in range(len(v))],
                where="post",
                color="tab:gray",
                linestyle=styles.get(peers, "-"),
                label=f"floor (plain asyncpg), {peers} processes",
            )
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200) if t <= top]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(
            "graceful handover (ms, log scale): leader starts leaving → another process leads"
        )
        ax.set_ylabel("fraction of rounds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / "handover_ecdf.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    rows = [s for s in samples if s["bench"] == "scaling" and "skipped" not in s]
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), dpi=120)
        for interval in sorted({r["interval"] for r in rows}):
            rs = sorted((r for r in rows if r["interval"] == interval), key=lambda r: r["names"])
            names = [r["names"] for r in rs]
            label = f"interval {interval:g} s"
            axes[0].plot(
                names, [r["connections_per_process"] for r in rs], marker="o", label=label
            )
            axes[1].plot(names, [r["cpu_leader"] * 100 for r in rs], marker="o", label=label)
            axes[2].plot(names, [r["commits_per_s"] for r in rs], marker="o", label=label)
        for ax, title in zip(
            axes,
            (
                "connections per process",
                "idle CPU of the leading process (%)",
                "commits/s (both processes)",
            ),
            strict=True,
        ):
            ax.set_xscale("log")
            ax.set_xlabel("names per process")
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = folder / "names_cost.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


def rerender(folder: Path) -> list[Path]:
    """Write a results folder's tables and plots again from its results.json, meta.json and
    samples.jsonl (after a change to this module)."""
    results = json.loads((folder / "results.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "table.md").write_text(table(results, meta))
    (folder / "table.rst").write_text(table_rst(results, meta))
    return [folder / "table.md", folder / "table.rst", *plots(folder)]


if __name__ == "__main__":
    import sys

    print("\n".join(str(p) for p in rerender(Path(sys.argv[1]))))
