"""The history checker: ``python -m chaos.check RUN_DIR [--json-only]``.

Reads what :mod:`chaos.run` wrote and judges it. Exit status 1 on any
violation of safety, terms, process exits, untrusted steps that the SIGSTOP
placement rules out, or resign handover; 2 if the folder cannot be read; else 0.

Vocabulary: a *run* is one execution of the leader-only work in one process
(from its ``start`` record to its last ``step``), for one name and one term.

Safety
    ``overlap``: two runs of one name in different processes overlap in time
    (the work of two processes acted in the same period). ``claims``: the
    same with only the steps taken while ``is_leader`` was true.
Terms
    ``term_order``: sorted by start, a run of a name has a term lower than an
    earlier run's, or the same term as an earlier run of another process.
    ``stale_step``: a step carries a term lower than one another process had
    already used in a step of that name. ``term_lost``: the lease table at the
    end holds a lower term than a step used (the database forgot a term).
Processes
    ``crash``: a process exited when nobody asked it to, exited non-zero after
    SIGTERM, was not killed by our SIGKILL, logged an ``error``, or hung
    (``hung``: no exit within the runner's limit after SIGTERM).
Untrusted steps (``is_leader`` false when the step was taken)
    Every one is reported. Judged as ``untrusted`` violations: a run that takes
    a step after an untrusted one (the work outlived its trust by a whole step
    period: its deadline did not cancel it), and an untrusted step that is the
    first step of a run after our SIGCONT of its process when trust had already
    ended during the stop (the stop was placed in ``epoll_wait``, so Trio
    expires the deadline before it runs any task; the documented "one more
    step" of I/O-driven work does not apply to this timer-driven work). The
    rest, last steps at the trust boundary, are counted with their lateness.
Handover
    ``handover``: a peer that resigned took the same name back in less than
    0.9 interval (a resigned peer must hold its bids for an interval).
    ``never_led``: a name that no process ever led (nothing works at all).
Liveness (reported, never a failure)
    The share of time each name had a running leader; each leaderless gap,
    attributed to the most recent fault that began before it, ended at most an
    interval before it, and was global or aimed at the slot of the process that
    led before the gap; measured from the fault's start to the next
    leader's first act, and from the fault's end (``recovery``; ``isolated``
    when no other fault was active between the fault's end and the recovery).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import signal
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

SAFETY = ("overlap", "claims")
TERMS = ("term_order", "stale_step", "term_lost")
PROCESSES = ("crash", "hung")
JUDGED = ("untrusted", "handover", "never_led")
FAILING = SAFETY + TERMS + PROCESSES + JUDGED


@attrs.define
class Run:
    label: str
    run: int
    name: str
    term: int
    start: float
    steps: list[tuple[float, bool, float | None]] = attrs.field(factory=list)

    @property
    def end(self) -> float:
        return self.steps[-1][0] if self.steps else self.start


@attrs.define
class History:
    folder: Path
    info: dict[str, Any]
    faults: list[dict[str, Any]]
    processes: list[dict[str, Any]]
    runs: list[Run]
    resigns: list[dict[str, Any]]
    errors: dict[str, list[str]]
    exits: set[str]

    @property
    def interval(self) -> float:
        return float(self.info["args"]["interval"])

    @property
    def step(self) -> float:
        return float(self.info["args"]["step"])


def _jsonl(path: Path) -> Iterable[dict[str, Any]]:
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by SIGKILL (a single write(2), so rare)


def load(folder: Path) -> History:
    info = json.loads((folder / "run.json").read_text())
    faults = list(_jsonl(folder / "faults.jsonl"))
    processes = list(_jsonl(folder / "processes.jsonl"))
    runs: list[Run] = []
    resigns: list[dict[str, Any]] = []
    errors: dict[str, list[str]] = defaultdict(list)
    exits: set[str] = set()
    for proc in processes:
        label = proc["label"]
        path = folder / f"{label}.jsonl"
        if not path.exists():
            continue
        open_runs: dict[int, Run] = {}
        for rec in _jsonl(path):
            ev = rec["ev"]
            if ev == "start":
                r = Run(label, rec["run"], rec["name"], rec["term"], rec["t"])
                open_runs[rec["run"]] = r
                runs.append(r)
            elif ev == "step":
                open_runs[rec["run"]].steps.append((rec["t"], rec["lead"], rec["tf"]))
            elif ev == "resign":
                resigns.append(rec)
            elif ev == "error":
                errors[label].append(rec["error"])
            elif ev == "exit":
                exits.add(label)
    return History(folder, info, faults, processes, runs, resigns, errors, exits)


# ---------------------------------------------------------------- checks


def _by_name(runs: Iterable[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.name].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r.start)
    return out


def _overlaps(
    intervals: Sequence[tuple[float, float, str, int, int]], kind: str, name: str
) -> list[dict[str, Any]]:
    """Pairs of intervals (start, end, label, term, run) of different labels that overlap."""
    found: list[dict[str, Any]] = []
    active: list[tuple[float, float, str, int, int]] = []
    for iv in sorted(intervals):
        active = [a for a in active if a[1] > iv[0]]
        found.extend(
            {
                "check": kind,
                "name": name,
                "at": iv[0],
                "overlap_s": round(min(a[1], iv[1]) - iv[0], 6),
                "a": {"proc": a[2], "term": a[3], "run": a[4], "from": a[0], "to": a[1]},
                "b": {"proc": iv[2], "term": iv[3], "run": iv[4], "from": iv[0], "to": iv[1]},
            }
            for a in active
            if a[2] != iv[2]
        )
        active.append(iv)
    return found


def check_safety(h: History) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, rs in _by_name(h.runs).items():
        work = [(r.start, r.end, r.label, r.term, r.run) for r in rs]
        out += _overlaps(work, "overlap", name)
        claims = []
        for r in rs:
            trusted = [t for t, lead, _ in r.steps if lead]
            if trusted:
                claims.append((trusted[0], trusted[-1], r.label, r.term, r.run))
        out += _overlaps(claims, "claims", name)
    return out


def check_terms(h: History) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    used_max: dict[str, int] = {}
    for name, rs in _by_name(h.runs).items():
        best_term, best_label = 0, ""
        for r in rs:
            if r.term < best_term or (r.term == best_term and r.label != best_label):
                out.append(
                    {
                        "check": "term_order",
                        "name": name,
                        "at": r.start,
                        "proc": r.label,
                        "term": r.term,
                        "earlier": {"proc": best_label, "term": best_term},
                    }
                )
            if r.term > best_term:
                best_term, best_label = r.term, r.label
        used_max[name] = max(r.term for r in rs)
        # Step level: no step older than a term another process already used.
        events = sorted(
            (t, r.label, r.term) for r in rs for t in [r.start, *(s[0] for s in r.steps)]
        )
        top: dict[str, int] = {}
        reported: set[tuple[str, int]] = set()
        for t, label, term in events:
            other = max((v for k, v in top.items() if k != label), default=0)
            if term < other and (label, term) not in reported:
                reported.add((label, term))
                out.append(
                    {
                        "check": "stale_step",
                        "name": name,
                        "at": t,
                        "proc": label,
                        "term": term,
                        "newer_term_elsewhere": other,
                    }
                )
            if term > top.get(label, 0):
                top[label] = term
    final = {row["name"]: row for row in h.info.get("final_table", [])}
    if "final_table" in h.info:
        for name, term in used_max.items():
            kept = final.get(name, {}).get("term")
            if kept is None or kept < term:
                out.append({"check": "term_lost", "name": name, "used": term, "table": kept})
    return out


def check_processes(h: History) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in h.processes:
        label, rc, expected = p["label"], p["returncode"], p["expected"]
        problem = None
        if p["hung"]:
            out.append({"check": "hung", "proc": label, "after_sigterm_at": p["signal_at"]})
            continue
        if h.errors.get(label):
            problem = "logged an error: " + h.errors[label][0].strip().splitlines()[-1]
        elif expected is None:
            problem = f"exited by itself (status {rc})"
        elif expected == "sigterm" and (rc != 0 or label not in h.exits):
            problem = f"status {rc} after SIGTERM" + (
                "" if label in h.exits else ", no exit record"
            )
        elif expected == "sigkill" and rc != -signal.SIGKILL:
            problem = f"status {rc} although we sent SIGKILL"
        if problem is not None:
            out.append({"check": "crash", "proc": label, "problem": problem, "ended": p["ended"]})
    return out


def check_untrusted(h: History) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out: list[dict[str, Any]] = []
    conts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in h.faults:
        if f["kind"] == "stop" and "cont" in f:
            conts[f["labels"][0]].append((f["stop"], f["cont"]))
    total = 0
    lateness: list[float] = []
    for r in h.runs:
        for i, (t, lead, _tf) in enumerate(r.steps):
            if lead:
                continue
            total += 1
            prev = r.steps[i - 1] if i > 0 else None
            est_end = prev[0] + prev[2] if prev is not None and prev[2] is not None else None
            base = {"name": r.name, "proc": r.label, "term": r.term, "run": r.run, "at": t}
            if i < len(r.steps) - 1:
                out.append({"check": "untrusted", "why": "a step after an untrusted one", **base})
                continue
            paused = [
                (s, c) for s, c in conts[r.label] if c <= t and (prev is None or prev[0] <= s)
            ]
            if paused and est_end is not None and est_end < paused[-1][1] - 0.005:
                out.append(
                    {
                        "check": "untrusted",
                        "why": "first step after SIGCONT, trust had ended while stopped",
                        "after_cont_s": round(t - paused[-1][1], 6),
                        **base,
                    }
                )
                continue
            if est_end is not None:
                lateness.append(t - est_end)
    stats = {"untrusted_steps": total, "boundary_lateness_s": _dist(lateness)}
    return out, stats


def check_handover(h: History) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    by_name = _by_name(h.runs)
    for rec in h.resigns:
        if rec.get("name") is None or not rec.get("released"):
            continue
        rs = by_name.get(rec["name"], [])
        starts = [r.start for r in rs]
        i = bisect.bisect_right(starts, rec["t"])
        if i < len(rs) and rs[i].label == rec["p"] and rs[i].start - rec["t"] < 0.9 * h.interval:
            out.append(
                {
                    "check": "handover",
                    "name": rec["name"],
                    "proc": rec["p"],
                    "at": rec["t"],
                    "won_back_after_s": round(rs[i].start - rec["t"], 6),
                }
            )
    return out


# ---------------------------------------------------------------- liveness


def _dist(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 4)

    return {"n": len(v), "p50": rank(0.5), "p95": rank(0.95), "max": round(v[-1], 4)}


def liveness(h: History) -> dict[str, Any]:
    t0 = float(h.info["t0"])
    t1 = float(h.info.get("faults_end", h.info.get("end", t0)))
    window = max(t1 - t0, 1e-9)
    join = 2 * h.step + 0.05  # pauses between steps shorter than this are no gap
    faults = [f for f in h.faults if "skipped" not in f and "error" not in f]
    for f in faults:
        f.setdefault("end", f["start"])
    names = h.info.get("names") or sorted({r.name for r in h.runs})
    by_name = _by_name(h.runs)
    share: dict[str, float] = {}
    gaps: list[dict[str, Any]] = []
    for name in names:
        merged: list[list[Any]] = []  # [start, end, label of the run that ends last]
        for r in by_name.get(name, []):
            if merged and r.start <= merged[-1][1] + join:
                if r.end >= merged[-1][1]:
                    merged[-1][1:] = [r.end, r.label]
            else:
                merged.append([r.start, r.end, r.label])
        covered = sum(max(0.0, min(e, t1) - max(s, t0)) for s, e, _ in merged)
        share[name] = round(covered / window, 4)
        for before, after in itertools.pairwise(merged):
            if after[0] < t0 or before[1] > t1:
                continue
            gaps.append({"name": name, "from": before[1], "to": after[0], "prev": before[2]})
    by_kind_start: dict[str, list[float]] = defaultdict(list)
    by_kind_rec: dict[str, list[float]] = defaultdict(list)
    by_kind_iso: dict[str, list[float]] = defaultdict(list)
    unattributed: list[float] = []
    slack = h.step + 0.05
    slot_of = {p["label"]: p["slot"] for p in h.processes}
    for g in gaps:
        # Faults that could have ended this tenure: global ones, and those aimed at
        # the slot of the process that led before the gap.
        causes = [
            f
            for f in faults
            if f["start"] <= g["from"] + slack
            and g["from"] <= f["end"] + h.interval + slack
            and (f["target"] is None or f["target"] == slot_of.get(g["prev"]))
        ]
        if not causes:
            unattributed.append(g["to"] - g["from"])
            continue
        f = max(causes, key=lambda f: f["start"])
        g["fault"] = f["id"]
        kind = f["kind"]
        by_kind_start[kind].append(g["to"] - f["start"])
        recovery = max(0.0, g["to"] - f["end"])
        by_kind_rec[kind].append(recovery)
        others = [
            o for o in faults if o is not f and o["start"] <= g["to"] and o["end"] >= f["end"]
        ]
        if not others:
            by_kind_iso[kind].append(recovery)

    def table(d: dict[str, list[float]]) -> dict[str, Any]:
        every = [x for xs in d.values() for x in xs]
        return {"all": _dist(every), **{k: _dist(v) for k, v in sorted(d.items())}}

    return {
        "window_s": round(window, 3),
        "led_share": {
            "min": min(share.values(), default=None),
            "mean": round(sum(share.values()) / len(share), 4) if share else None,
            "per_name": share,
        },
        "gaps": len(gaps),
        "gap_from_fault_start_s": table(by_kind_start),
        "recovery_after_fault_end_s": table(by_kind_rec),
        "recovery_isolated_s": table(by_kind_iso),
        "unattributed_gaps_s": _dist(unattributed),
    }


# ---------------------------------------------------------------- report


def judge(h: History) -> dict[str, Any]:
    untrusted, untrusted_stats = check_untrusted(h)
    violations = (
        check_safety(h) + check_terms(h) + check_processes(h) + untrusted + check_handover(h)
    )
    led = {r.name for r in h.runs}
    violations += [
        {"check": "never_led", "name": name} for name in h.info.get("names", []) if name not in led
    ]
    counts = {c: sum(1 for v in violations if v["check"] == c) for c in FAILING}
    t0 = float(h.info["t0"])
    first: dict[str, float] = {}
    for v in violations:
        at = v.get("at", v.get("ended", v.get("after_sigterm_at")))
        if isinstance(at, int | float):
            first[v["check"]] = min(first.get(v["check"], math.inf), round(at - t0, 3))
    kinds: dict[str, int] = defaultdict(int)
    for f in h.faults:
        kinds[
            f["kind"] + (" (skipped)" if "skipped" in f else " (failed)" if "error" in f else "")
        ] += 1
    steps = sum(len(r.steps) for r in h.runs)
    return {
        "folder": str(h.folder),
        "seed": h.info["args"].get("seed"),
        "form": h.info["args"].get("form"),
        "workers": h.info["args"].get("workers"),
        "names": len(h.info.get("names", [])),
        "interval": h.interval,
        "processes": len(h.processes),
        "runs": len(h.runs),
        "steps": steps,
        "faults": dict(sorted(kinds.items())),
        "violations": counts,
        "first_violation_s": min(first.values(), default=None),
        "first_by_check_s": first,
        "ok": not violations,
        **untrusted_stats,
        "liveness": liveness(h),
        "details": violations[:50],
    }


def _fmt(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "n=0"
    return f"n={d['n']} p50={d['p50']:.3f} p95={d['p95']:.3f} max={d['max']:.3f}"


def report(s: dict[str, Any]) -> str:
    lines = [
        f"chaos history {s['folder']}",
        f"  seed {s['seed']}, form {s['form']}, {s['workers']} workers x {s['names']} names, "
        f"interval {s['interval']} s",
        f"  {s['processes']} processes, {s['runs']} runs of leader work, {s['steps']} steps",
        "  faults: " + ", ".join(f"{k} {v}" for k, v in s["faults"].items()),
        "",
        "Violations (any fails the run):",
    ]
    lines.extend(f"  {check:<12} {n}" for check, n in s["violations"].items())
    lines.extend("    " + json.dumps(v) for v in s["details"][:20])
    lateness = s["boundary_lateness_s"]
    lines += [
        "",
        f"Untrusted steps: {s['untrusted_steps']} (boundary lateness {_fmt(lateness)})",
        "",
        "Liveness:",
    ]
    live = s["liveness"]
    lines.append(
        f"  led share: min {live['led_share']['min']}, mean {live['led_share']['mean']} "
        f"over {live['window_s']} s; {live['gaps']} leaderless gaps "
        f"(unattributed: {_fmt(live['unattributed_gaps_s'])})"
    )
    for title, key in (
        ("gap, from fault start to next leader act", "gap_from_fault_start_s"),
        ("recovery, from fault end", "recovery_after_fault_end_s"),
        ("recovery, isolated faults", "recovery_isolated_s"),
    ):
        lines.append(f"  {title}:")
        for kind, d in live[key].items():
            lines.append(f"    {kind:<11} {_fmt(d)}")
    lines.append("")
    lines.append("RESULT: " + ("ok" if s["ok"] else "VIOLATIONS"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.check", description="Judge a chaos run.")
    p.add_argument("folder", type=Path)
    p.add_argument("--json-only", action="store_true", help="print only the JSON summary line")
    args = p.parse_args(argv)
    try:
        history = load(args.folder)
    except (OSError, ValueError, KeyError) as exc:
        print(f"chaos.check: cannot read {args.folder}: {exc}", file=sys.stderr)
        return 2
    summary = judge(history)
    if not args.json_only:
        print(report(summary))
    brief = {k: v for k, v in summary.items() if k != "details"}
    brief["liveness"] = {k: v for k, v in summary["liveness"].items() if k != "led_share"} | {
        "led_share_min": summary["liveness"]["led_share"]["min"],
        "led_share_mean": summary["liveness"]["led_share"]["mean"],
    }
    print(json.dumps(brief, separators=(",", ":")))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
