"""The benchmark's code path, run briefly: ``benchmarks/bench.py --smoke``.

The benchmark itself (``nox -s bench``) is not part of CI; this runs every one of its
measurements once or twice, trio-peers only (no oban-py venv), against the throwaway
server the benchmark starts itself, and checks that what it writes is complete and
sane. The bounds are generous: timing goals are the benchmark's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trio_peers.testing._postgres import ENV_TEST_DSN

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not BENCH.exists(), reason="needs the source tree's benchmarks/"),
    pytest.mark.skipif(
        bool(os.environ.get(ENV_TEST_DSN)),
        reason=f"the benchmark starts its own server ({ENV_TEST_DSN} is set)",
    ),
]


def test_bench_smoke_writes_complete_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--no-plots", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by_bench: dict[str, list[dict[str, object]]] = {}
    for s in samples:
        by_bench.setdefault(str(s["bench"]), []).append(s)
    assert set(by_bench) >= {"statement", "floor", "graceful", "crash", "idle", "herd", "scaling"}

    statements = by_bench["statement"]
    assert {s["lib"] for s in statements} == {"trio_asyncio", "asyncio"}
    # Pinned too (client and backend on one CPU), where the benchmark may move the server's
    # processes: root here and in CI.
    pinned = {bool(s["pinned"]) for s in statements}
    assert pinned == ({False, True} if os.geteuid() == 0 else {False})

    graceful = by_bench["graceful"]
    assert {s["peers"] for s in graceful} == {2, 3}
    for s in graceful:
        assert 0 < float(s["handover_s"]) < 5  # type: ignore[arg-type]
        assert 0 < float(s["leave_s"]) < 5  # type: ignore[arg-type]
    for s in by_bench["crash"]:
        # Interval 1 s: a crashed leader is replaced within about one interval.
        assert 0 < float(s["seconds"]) < 5  # type: ignore[arg-type]
    for s in by_bench["herd"]:
        assert s["winners"] == 1  # one release, one new leader
        assert float(s["winner_s"]) <= float(s["settled_s"]) < 10  # type: ignore[arg-type]
    (idle,) = by_bench["idle"]
    assert idle["connections_per_peer"] == 1.0
    scaling = [s for s in by_bench["scaling"] if "skipped" not in s]
    assert {s["names"] for s in scaling} == {1, 5}
    for s in scaling:
        # Two processes, one session each: one connection per process, whatever the names.
        assert s["sessions"] is True
        assert s["connections"] == 2

    results = json.loads((out / "results.json").read_text())
    assert results["graceful/trio-peers/3"]["n"] == 3
    assert results["graceful/trio-peers-session/3"]["n"] == 3  # session.open_peer, too
    assert {s["lib"] for s in graceful} == {"trio-peers", "trio-peers-session"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["machine"]["cores"] == os.cpu_count()
    assert "max_connections" in meta["postgresql"]
    table = (out / "table.md").read_text()
    assert "graceful handover, 3 processes, p50" in table
    assert "leaving time, session.open_peer, 3 processes, p50" in table
    assert "Many names in one process" in table
    if os.geteuid() == 0:
        assert "trio-asyncio vs plain asyncio, pinned to one CPU" in table


def test_report_plots_from_samples(tmp_path: Path) -> None:
    """The plots are made from samples.jsonl alone (matplotlib is the bench session's)."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import _report
    finally:
        sys.path.remove(str(ROOT))
    lines = [
        {"bench": "graceful", "lib": lib, "peers": p, "round": i, "handover_s": 0.001 * (i + p)}
        for lib in ("trio-peers", "oban-py")
        for p in (3, 5)
        for i in range(5)
    ]
    lines += [{"bench": "floor", "lib": "asyncpg", "round": 0, "seconds": 0.001}]
    lines += [
        {
            "bench": "scaling",
            "lib": "trio-peers",
            "names": n,
            "interval": 2.0,
            "connections_per_process": n,
            "cpu_leader": 0.01 * n,
            "commits_per_s": n,
        }
        for n in (1, 10)
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    made = _report.plots(tmp_path)
    assert sorted(p.name for p in made) == ["handover_ecdf.png", "names_cost.png"]
    assert all(p.stat().st_size > 1000 for p in made)
