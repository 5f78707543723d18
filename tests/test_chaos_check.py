"""The chaos history checker (chaos/check.py) on small hand-made histories, and the schedule.

Each test writes the folder a chaos run would write, with one thing wrong (or nothing), and
asserts the checker's verdict. The real runs are in docs/fault-injection.rst.
"""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from chaos.check import judge, load, main
from chaos.schedule import make_schedule

T0 = 1_000_000.0
STEP = 0.05


def _steps(label: str, name: str, term: int, run: int, start: float, end: float, **kw: Any):
    out = [
        {"ev": "start", "t": start, "m": start, "p": label, "name": name, "term": term, "run": run}
    ]
    t = start
    while t <= end + 1e-9:
        rec = {"ev": "step", "t": t, "m": t, "p": label, "name": name, "term": term, "run": run}
        rec |= {"lead": True, "tf": 0.5} | kw
        out.append(rec)
        t += STEP
    return out


def write(
    folder: Path,
    logs: dict[str, list[dict[str, Any]]],
    *,
    faults: list[dict[str, Any]] | None = None,
    processes: list[dict[str, Any]] | None = None,
    final_term: int = 99,
) -> Path:
    info = {
        "args": {"interval": 1.0, "step": STEP, "seed": 1, "form": "peers", "workers": 2},
        "names": ["n0"],
        "t0": T0,
        "faults_end": T0 + 10,
        "final_table": [{"name": "n0", "node": "w0", "term": final_term, "live": False}],
    }
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faults or []))
    if processes is None:
        processes = [
            {
                "label": label,
                "slot": i,
                "expected": "sigterm",
                "returncode": 0,
                "hung": False,
                "signal_at": T0 + 10,
                "ended": T0 + 10.1,
            }
            for i, label in enumerate(logs)
        ]
    (folder / "processes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in processes))
    for label, records in logs.items():
        records = [*records, {"ev": "exit", "t": T0 + 10, "m": 0, "p": label}]
        (folder / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def verdict(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = judge(load(folder))["violations"]
    return {k: v for k, v in counts.items() if v}


def test_a_clean_handover_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        tmp_path,
        {
            "p0": _steps("p0", "n0", 1, 1, T0, T0 + 2),
            "p1": _steps("p1", "n0", 2, 1, T0 + 3, T0 + 5),
        },
        faults=[{"id": 0, "kind": "kill", "target": 0, "start": T0 + 2.01, "end": T0 + 2.5}],
    )
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] and summary["runs"] == 2
    gap = summary["liveness"]["recovery_after_fault_end_s"]["kill"]
    assert gap["n"] == 1 and gap["max"] == pytest.approx(0.5, abs=0.01)


def test_overlapping_leaders_fail(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "p0": _steps("p0", "n0", 1, 1, T0, T0 + 2),
            "p1": _steps("p1", "n0", 2, 1, T0 + 1.9, T0 + 3),
        },
    )
    # p0 also steps under term 1 after p1 used term 2.
    assert verdict(tmp_path) == {"overlap": 1, "claims": 1, "stale_step": 1}
    assert main([str(tmp_path), "--json-only"]) == 1


def test_same_term_in_two_processes_and_a_stale_step_fail(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "p0": _steps("p0", "n0", 3, 1, T0, T0 + 1) + _steps("p0", "n0", 2, 2, T0 + 4, T0 + 5),
            "p1": _steps("p1", "n0", 3, 1, T0 + 2, T0 + 3),
        },
    )
    assert verdict(tmp_path) == {"term_order": 2, "stale_step": 1}


def test_a_term_the_table_forgot_fails(tmp_path: Path) -> None:
    write(tmp_path, {"p0": _steps("p0", "n0", 7, 1, T0, T0 + 1)}, final_term=1)
    assert verdict(tmp_path) == {"term_lost": 1}


def test_crashes_and_hangs_fail(tmp_path: Path) -> None:
    logs = {
        label: _steps(label, "n0", i + 1, 1, T0 + 2 * i, T0 + 2 * i + 1)
        for i, label in enumerate(["p0", "p1", "p2", "p3"])
    }
    base = {"slot": 0, "hung": False, "signal_at": T0 + 10, "ended": T0 + 10}
    processes = [
        {"label": "p0", "expected": "sigterm", "returncode": 1, **base},
        {"label": "p1", "expected": None, "returncode": 0, **base},
        {"label": "p2", "expected": "sigkill", "returncode": -signal.SIGKILL, **base},
        {**base, "label": "p3", "expected": "sigterm", "returncode": -9, "hung": True},
    ]
    write(tmp_path, logs, processes=processes)
    assert verdict(tmp_path) == {"crash": 2, "hung": 1}


def test_untrusted_steps_are_judged(tmp_path: Path) -> None:
    boundary = _steps("p0", "n0", 1, 1, T0, T0 + 1)
    boundary[-1] |= {"lead": False, "tf": None}  # the last step, at the trust boundary
    after_pause = _steps("p1", "n0", 2, 1, T0 + 2, T0 + 2.2, tf=0.1)
    after_pause.append(
        {
            "ev": "step",
            "t": T0 + 5.0,
            "m": 0,
            "p": "p1",
            "name": "n0",
            "term": 2,
            "run": 1,
            "lead": False,
            "tf": None,
        }
    )
    kept_going = _steps("p0", "n0", 3, 2, T0 + 6, T0 + 7)
    kept_going[3] |= {"lead": False, "tf": None}
    faults = [
        {
            "id": 0,
            "kind": "stop",
            "target": 1,
            "labels": ["p1"],
            "start": T0 + 2.21,
            "stop": T0 + 2.21,
            "cont": T0 + 4.99,
            "end": T0 + 4.99,
        }
    ]
    write(tmp_path, {"p0": boundary + kept_going, "p1": after_pause}, faults=faults)
    summary = judge(load(tmp_path))
    assert summary["untrusted_steps"] == 3
    whys = sorted(v["why"] for v in summary["details"] if v["check"] == "untrusted")
    assert whys == [
        "a step after an untrusted one",
        "first step after SIGCONT, trust had ended while stopped",
    ]


def test_a_resigned_peer_winning_straight_back_fails(tmp_path: Path) -> None:
    resign = {
        "ev": "resign",
        "t": T0 + 1.01,
        "m": 0,
        "p": "p0",
        "name": "n0",
        "term": 1,
        "released": True,
    }
    write(
        tmp_path,
        {
            "p0": [
                *_steps("p0", "n0", 1, 1, T0, T0 + 1),
                resign,
                *_steps("p0", "n0", 2, 2, T0 + 1.05, T0 + 2),
            ]
        },
    )
    assert verdict(tmp_path) == {"handover": 1}


def test_an_unreadable_folder_is_status_2(tmp_path: Path) -> None:
    assert main([str(tmp_path / "missing")]) == 2


def test_the_schedule_is_a_function_of_its_seed() -> None:
    args = {"duration": 120.0, "workers": 5, "interval": 1.0, "rate": 1.2, "tail": 3.0}
    one = make_schedule(seed=5, **args)
    assert one == make_schedule(seed=5, **args)
    assert one != make_schedule(seed=6, **args)
    assert {f.kind for f in one} == {
        "kill",
        "stop",
        "term",
        "resign",
        "latency",
        "blackhole",
        "reset",
        "refuse",
        "terminate",
        "pg_restart",
        "twin",
    }
    assert all(f.at + f.duration < 117.0 for f in one)
    assert max(f.duration for f in one if f.kind == "stop") <= 3.0
    # One process fault per slot at a time.
    for slot in range(5):
        mine = sorted(
            (f.at, f.at + f.duration)
            for f in one
            if f.target == slot and f.kind in ("kill", "stop", "term", "resign")
        )
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(mine))


def test_a_name_nobody_led_fails(tmp_path: Path) -> None:
    write(tmp_path, {"p0": []})
    assert verdict(tmp_path) == {"never_led": 1}
