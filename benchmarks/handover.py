"""Measure leadership handover between real OS processes on loopback.

    python benchmarks/handover.py [--dsn DSN] [--rounds 50] [--crash-rounds 10] [--interval 1.0]

Without --dsn it starts a throwaway PostgreSQL (trio_peers.testing.PostgresServer).

* graceful: from the moment the leader process starts to leave (its
  ``async with open_peer`` exits) to the moment the follower process reports
  leadership. The floor is one NOTIFY plus one election statement.
* crash: from SIGKILL of the leader process to the follower reporting
  leadership. Expected within about one ``interval``.

Also reports the single-statement latencies on the same server, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    def __init__(self, dsn: str, node: str, interval: float) -> None:
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "_peer_proc.py"), dsn, node, str(interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def send(self, command: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()

    def until(self, event: str) -> dict[str, object]:
        assert self.p.stdout is not None
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"peer process exited while waiting for {event!r}")
            data: dict[str, object] = json.loads(line)
            if data["event"] == event:
                return data

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()
        for stream in (self.p.stdin, self.p.stdout):
            if stream is not None:
                stream.close()


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return (
        f"{name:<22} n={len(ms):<4} min {ms[0]:8.2f}  p50 {statistics.median(ms):8.2f}  "
        f"p90 {p90:8.2f}  max {ms[-1]:8.2f}  (ms)"
    )


def graceful(dsn: str, rounds: int, interval: float) -> list[float]:
    a, b = Proc(dsn, "bench-a", interval), Proc(dsn, "bench-b", interval)
    try:
        a.send("join")
        a.until("gained")
        b.send("join")
        b.until("joined")
        leader, follower = a, b
        out = []
        for _ in range(rounds):
            # Let the follower, which may have just rejoined, settle: in production
            # followers are idle when a leader leaves.
            time.sleep(0.05)
            leader.send("leave")
            t0 = leader.until("leaving")["t"]
            t1 = follower.until("gained")["t"]
            out.append(float(t1) - float(t0))  # type: ignore[arg-type]
            leader.until("left")
            leader.send("join")
            leader.until("joined")
            leader, follower = follower, leader
        return out
    finally:
        a.close()
        b.close()


def crash(dsn: str, rounds: int, interval: float) -> list[float]:
    follower = Proc(dsn, "bench-follower", interval)
    out = []
    try:
        for i in range(rounds):
            victim = Proc(dsn, f"bench-victim-{i}", interval)
            try:
                if i == 0:
                    victim.send("join")
                    victim.until("gained")
                    follower.send("join")
                    follower.until("joined")
                else:
                    # The follower leads now: make it leave so the victim leads, then rejoin.
                    victim.send("join")
                    victim.until("joined")
                    follower.send("leave")
                    follower.until("left")
                    victim.until("gained")
                    follower.send("join")
                    follower.until("joined")
                # Kill at a random point of the renewal cycle.
                time.sleep(interval * (0.1 + 0.4 * ((i * 7919) % 10) / 10))
                t0 = time.monotonic()
                victim.p.send_signal(signal.SIGKILL)
                t1 = follower.until("gained")["t"]
                out.append(float(t1) - t0)  # type: ignore[arg-type]
            finally:
                victim.p.wait()
                victim.close()
        return out
    finally:
        follower.close()


def statements(dsn: str, n: int = 500) -> dict[str, list[float]]:
    import trio

    from trio_peers import PeerConfig
    from trio_peers._asyncpg import AsyncpgBackend

    config = PeerConfig(dsn=dsn, name="bench-statements", node="bench", interval=30.0)
    timings: dict[str, list[float]] = {"election (renew)": [], "election (denied)": []}

    async def main() -> None:
        async with AsyncpgBackend().open(config) as connector:
            conn = await connector.connect(on_notification=lambda _: None, on_lost=lambda: None)
            first = await conn.elect(node="bench", held_term=None, statement_timeout=5)
            for _ in range(n):
                t0 = time.perf_counter()
                await conn.elect(node="bench", held_term=first.term, statement_timeout=5)
                timings["election (renew)"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await conn.elect(node="other", held_term=None, statement_timeout=5)
                timings["election (denied)"].append(time.perf_counter() - t0)
            assert first.term is not None
            await conn.release(node="bench", term=first.term, sender="x", statement_timeout=5)
            await conn.aclose()

    trio.run(main)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--crash-rounds", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()

    import trio

    from trio_peers import migrate

    server = None
    dsn = args.dsn
    if dsn is None:
        from trio_peers.testing import PostgresServer

        server = PostgresServer.start()
        dsn = server.dsn
    try:
        trio.run(migrate, dsn)
        print(f"server: {dsn.split('@')[-1]}  interval={args.interval}s  cores={os.cpu_count()}")
        for name, values in statements(dsn).items():
            print(summary(name, values))
        print(summary("graceful handover", graceful(dsn, args.rounds, args.interval)))
        values = crash(dsn, args.crash_rounds, args.interval)
        print(summary("crash handover", values))
        print(f"crash handover / interval: max {max(values) / args.interval:.2f}")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
