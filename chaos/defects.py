"""Prove that the checker can fail: chaos runs against deliberately broken copies.

``python -m chaos.defects [--only NAME] [--duration S] [--seed X] [--out DIR]``

For each defect, the library is copied to a temporary directory, one patch is
applied to the copy (the working tree is never touched), and a short chaos
run is made with the workers importing the copy. The table printed at the end
says which checks fired and how long after the faults began the first
violation happened. A defect that no check catches makes the exit status 1.

A patch that no longer applies (the code it edits was rewritten) is reported
as such: update the ``old`` text below.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parent.parent

#: name -> (what it breaks, [(file in trio_peers, old text, new text), ...])
DEFECTS: Final[dict[str, tuple[str, list[tuple[str, str, str]]]]] = {
    "trust_past_expiry": (
        "a leader trusts its tenure half an interval past the lease's expiry",
        [
            (
                "_core.py",
                "trusted_until = start + outcome.lease_remaining - self.trust_margin",
                "trusted_until = start + outcome.lease_remaining + 0.5 * self.interval",
            )
        ],
    ),
    "renew_without_term": (
        "renewal checks the node but not the term",
        [
            (
                "_sql.py",
                "OR (p.node = $2 AND p.term = $4::bigint)",
                # $4 stays referenced, so the statement keeps its four parameters.
                "OR (p.node = $2 AND coalesce($4::bigint, 0) >= 0)",
            )
        ],
    ),
    "no_work_deadline": (
        "leader-only work has no deadline; only the watchdog's publish cancels it",
        [
            (
                "_peer.py",
                "cancel_scope = trio.CancelScope(deadline=self._core.trusted_until)",
                "cancel_scope = trio.CancelScope()",
            ),
            (
                "_peer.py",
                "                scope.cancel_scope.deadline = deadline\n",
                "                pass\n",
            ),
        ],
    ),
    "resign_bids_at_once": (
        "a peer that resigned bids again at once",
        [
            (
                "_core.py",
                "self.next_round_at = now + self.resign_hold",
                "self.next_round_at = now",
            )
        ],
    ),
}


def patched_copy(name: str, into: Path) -> Path:
    """Copy trio_peers into ``into`` and apply defect ``name``; return the directory to import."""
    target = into / "trio_peers"
    shutil.copytree(ROOT / "trio_peers", target, ignore=shutil.ignore_patterns("__pycache__"))
    for filename, old, new in DEFECTS[name][1]:
        path = target / filename
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(
                f"defect {name}: the patch no longer applies to trio_peers/{filename} "
                f"({text.count(old)} matches of {old!r}); update chaos/defects.py"
            )
        path.write_text(text.replace(old, new))
    return into


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"trio-peers-defect-{name}-") as tmp:
        libdir = patched_copy(name, Path(tmp))
        cmd = [
            sys.executable,
            *("-m", "chaos.run", "--pythonpath", str(libdir)),
            *("--duration", str(args.duration), "--workers", str(args.workers)),
            *("--names", str(args.names), "--interval", "1", "--rate", str(args.rate)),
            *("--seed", str(args.seed), "--out", str(out / name)),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"defect": name, "error": proc.stderr[-2000:] or proc.stdout[-2000:]}
    summary = json.loads(lines[-1])
    # Every worker must have imported the patched copy.
    libs = set()
    for log in (out / name).glob("p[0-9]*.jsonl"):
        with log.open() as f:
            first = f.readline()
        if first:
            libs.add(json.loads(first).get("lib", "?"))
    fired = {k: v for k, v in summary["violations"].items() if v}
    return {
        "defect": name,
        "breaks": DEFECTS[name][0],
        "caught": bool(fired),
        "checks": fired,
        "first_after_s": summary.get("first_violation_s"),
        "patched_copy_used": all(str(Path(tmp)) in lib for lib in libs) and bool(libs),
        "exit": proc.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.defects")
    p.add_argument("--only", action="append", choices=sorted(DEFECTS), default=None)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--names", type=int, default=8)
    p.add_argument("--rate", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--out", type=Path, default=ROOT / "chaos-runs" / "defects")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or list(DEFECTS):
        print(f"defect {name}: running {args.duration:.0f} s ...", flush=True)
        result = run_one(name, args, args.out)
        print(json.dumps(result), flush=True)
        results.append(result)
    print()
    print(f"{'defect':<22} {'caught by':<40} first violation after")
    for r in results:
        fired = r.get("checks", {})
        assert isinstance(fired, dict)
        checks = ", ".join(f"{k} ({v})" for k, v in fired.items()) or "NOTHING"
        first = r.get("first_after_s")
        print(f"{r['defect']:<22} {checks:<40} {first if first is not None else '-'} s")
    return 0 if all(r.get("caught") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
