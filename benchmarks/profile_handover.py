"""Where a graceful handover's time goes: traced trio-peers rounds, split into phases.

    python benchmarks/profile_handover.py [--peers 2,3,5] [--rounds 30]
                                          [--variant NAME=DIR ...] [--dsn DSN]

Every peer process runs with ``--trace`` (benchmarks/_tp_proc.py): a wrapper around the
default backend, through the public ``PeerBackend`` protocol, stamps each election,
release, close and notification with CLOCK_MONOTONIC. Each round is then split into:

* leaver: ``leaving`` -> release sent (cancel the loop, take the lock, publish), the
  release statement, release done -> close sent (the pause before closing), the close,
  close done -> backend closed (trio-asyncio loop teardown), -> ``left``;
* followers: release done -> first notification, notification -> election sent, the
  winning election, election done -> ``gained``; and for the losers, whether their bid
  overlapped the winner's (it then waits on the row lock) and how long it took.

``--variant NAME=DIR`` puts DIR first on the peers' PYTHONPATH (a modified copy of the
package, say), and the variants' rounds alternate in blocks within one run, so that
they are compared under the same machine load. The stamps themselves cost a few tens of
microseconds per event; compare phases, not these totals with the untraced benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH,
    ROOT,
    PeerProcess,
    close_all,
    first_event,
    load_average,
    summarize,
)


def spawn(python: str, dsn: str, node: str, path: str | None) -> PeerProcess:
    env = {"PYTHONPATH": f"{path}{os.pathsep}{ROOT}" if path else str(ROOT)}
    return PeerProcess([python, str(BENCH / "_tp_proc.py"), dsn, node, "0", "--trace"], env=env)


def _after(events: list[dict[str, Any]], name: str, t: float) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == name and e["t"] >= t), None)


def one_round(
    procs: list[PeerProcess], leader: PeerProcess
) -> tuple[dict[str, float], PeerProcess]:
    time.sleep(0.15)
    for p in procs:
        p.drain()
    leader.send("leave")
    t0 = leader.until("leaving")["t"]
    others = [p for p in procs if p is not leader]
    winner, gained = first_event(others, "gained", timeout=30)
    left_event = leader.until("left", timeout=30)
    time.sleep(0.1)  # the losers' bids
    # The events before `left` went to the backlog and are drained with it.
    lev = [{"event": "leaving", "t": t0}, *leader.drain(), left_event]
    release = _after(lev, "release", t0)
    close = _after(lev, "close", t0)
    closed = _after(lev, "backend_closed", t0)
    left = _after(lev, "left", t0)
    assert release is not None, lev
    assert close is not None, lev
    assert closed is not None, lev
    assert left is not None, lev
    wev = winner.drain()
    notified = _after(wev, "notified", t0)
    elect = next(e for e in wev if e["event"] == "elect" and e.get("won"))
    ph = {
        "handover": gained["t"] - t0,
        "leave": left["t"] - t0,
        "L_to_release_sent": release["t0"] - t0,
        "L_release_stmt": release["t"] - release["t0"],
        "L_pause_before_close": close["t0"] - release["t"],
        "L_close": close["t"] - close["t0"],
        "L_loop_teardown": closed["t"] - close["t"],
        "L_to_left": left["t"] - closed["t"],
        "W_release_to_notified": (notified["t"] - release["t"]) if notified else float("nan"),
        "W_notified_to_elect_sent": (elect["t0"] - notified["t"]) if notified else float("nan"),
        "W_elect_stmt": elect["t"] - elect["t0"],
        "W_elect_to_gained": gained["t"] - elect["t"],
        "W_elect_end_vs_close_start": elect["t"] - close["t0"],
    }
    losers = [p for p in others if p is not winner]
    overlaps, loser_stmt = 0, []
    for p in losers:
        ev = p.drain()
        e = next((x for x in ev if x["event"] == "elect" and x["t0"] >= t0), None)
        if e is None:
            continue
        loser_stmt.append(e["t"] - e["t0"])
        if e["t0"] < elect["t"]:
            overlaps += 1
    if losers:
        ph["losers_overlapping_winner"] = overlaps / len(losers)
        ph["loser_elect_stmt"] = max(loser_stmt) if loser_stmt else float("nan")
    leader.send("join")
    leader.until("joined")
    return ph, winner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--peers", default="2,3,5")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=10, help="rounds per variant block")
    parser.add_argument("--variant", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants: list[tuple[str, str | None]] = [("current", None)]
    for v in args.variant:
        name, _, path = v.partition("=")
        variants.append((name, path))

    import trio

    from benchmarks.bench import start_server
    from trio_peers import migrate

    server, external = start_server(args.dsn)
    results: dict[str, Any] = {"load_average_at_start": load_average()}
    raw: list[dict[str, Any]] = []
    try:
        db = "profile_handover"
        server.create_database(db)
        dsn = server.dsn_for(db)
        trio.run(migrate, dsn)
        for peers in [int(p) for p in args.peers.split(",")]:
            # One process group per variant; the groups take turns (all share the name, and
            # only the group whose block runs has joined).
            groups = {
                name: [spawn(args.python, dsn, f"{name}-{peers}-{i}", path) for i in range(peers)]
                for name, path in variants
            }
            try:
                for procs in groups.values():
                    for p in procs:
                        p.until("ready", timeout=60)
                done = {name: 0 for name, _ in variants}
                phases: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
                while any(done[n] < args.rounds for n in done):
                    for name, _ in variants:
                        if done[name] >= args.rounds:
                            continue
                        procs = groups[name]
                        procs[0].send("join")
                        if not procs[0].until("joined")["leader"]:
                            procs[0].until("gained", timeout=90)
                        for p in procs[1:]:
                            p.send("join")
                            p.until("joined")
                        leader = procs[0]
                        for _ in range(min(args.block, args.rounds - done[name])):
                            ph, leader = one_round(procs, leader)
                            phases[name].append(ph)
                            raw.append({"variant": name, "peers": peers, **ph})
                            done[name] += 1
                        # Followers first: a follower leaving during a handover could
                        # win the lease with its last bid and leave it to lapse.
                        for p in [*(q for q in procs if q is not leader), leader]:
                            p.send("leave")
                            p.until("left", timeout=30)
                for name, rows in phases.items():
                    keys = rows[0].keys()
                    results[f"{name}/{peers}"] = {
                        k: summarize([r[k] for r in rows if k in r]) for k in keys
                    }
                    print(f"\n== {name}, {peers} processes, {len(rows)} rounds (p50 / p95, ms)")
                    for k in keys:
                        s = results[f"{name}/{peers}"][k]
                        scale = 1 if k.startswith("losers_overlapping") else 1000
                        print(f"  {k:<28} {s['p50'] * scale:8.2f} {s['p95'] * scale:8.2f}")
            finally:
                close_all([p for procs in groups.values() for p in procs])
        results["load_average_at_end"] = load_average()
        print(
            "\nload average",
            results["load_average_at_start"],
            "->",
            results["load_average_at_end"],
        )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "profile.json").write_text(json.dumps(results, indent=2))
            (args.out / "profile_samples.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in raw)
            )
    finally:
        if not external:
            server.close()


if __name__ == "__main__":
    main()
