"""trio-peers side by side with oban-py and the physical floor, in one run.

    python -m nox -s bench              # quick mode (a few minutes)
    python -m nox -s bench -- --full    # the published figures
    python benchmarks/bench.py --oban-python PY --tp-python PY [--full | --smoke] [--out DIR]

One throwaway PostgreSQL (trio_peers.testing.PostgresServer, with max_connections
raised for oban-py's pools and the herd, and pg_stat_statements when the server has
it) serves every measurement; each library gets a database of its own, so the
per-database statistics count one library at a time. Every peer is an OS process
(benchmarks/_tp_proc.py, benchmarks/_oban_proc.py, benchmarks/_floor_proc.py) that
stamps its events with CLOCK_MONOTONIC, the one clock of the host.

It writes a results folder (default benchmarks/results/<UTC timestamp>/): table.md
(the figures, with ratios trio-peers / oban-py and multiples of the floor),
samples.jsonl (every raw sample), meta.json (machine, load averages, versions,
PostgreSQL settings) and the plots. ``--smoke`` runs every code path once, briefly,
trio-peers only (no oban-py venv needed): CI runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import scaling
from benchmarks._common import (
    BENCH,
    ROOT,
    PeerProcess,
    close_all,
    cpu_seconds,
    first_event,
    load_average,
    machine,
    rss_bytes,
    summarize,
)

TP, OBAN = "trio-peers", "oban-py"
#: trio-peers' graceful handover with session.open_peer on a session that stays open (the
#: connection outlives the name, as oban-py's pool outlives Oban.stop()).
TPS = "trio-peers-session"
MAX_CONNECTIONS = 800

MODES: dict[str, dict[str, Any]] = {
    "smoke": {
        "statements": 40,
        "floor": 3,
        "graceful": 3,
        "peers": [2, 3],
        "crash": 2,
        "crash_default": 0,
        "idle": 2.0,
        "herd": 5,
        "herd_rounds": 1,
        "scaling_names": [1, 5],
        "scaling_intervals": [2.0],
        "scaling_window": 2.0,
        "scaling_window_long": 2.0,
        "scaling_cap": 5,
    },
    "quick": {
        "statements": 400,
        "floor": 40,
        "graceful": 20,
        "peers": [2, 3, 5],
        "crash": 10,
        "crash_default": 2,
        "idle": 30.0,
        "herd": 50,
        "herd_rounds": 2,
        "scaling_names": [1, 100, 1000],
        "scaling_intervals": [2.0, 30.0],
        "scaling_window": 10.0,
        "scaling_window_long": 31.0,
        "scaling_cap": 100,
    },
    "full": {
        "statements": 2000,
        "floor": 100,
        "graceful": 60,
        "peers": [2, 3, 5],
        "crash": 40,
        "crash_default": 6,
        "idle": 120.0,
        "herd": 50,
        "herd_rounds": 6,
        "scaling_names": [1, 100, 1000],
        "scaling_intervals": [2.0, 30.0],
        "scaling_window": 30.0,
        "scaling_window_long": 90.0,
        "scaling_cap": 250,
    },
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- the server


def start_server(dsn: str | None = None) -> tuple[Any, bool]:
    """A throwaway server with benchmark settings, or the server at ``dsn``."""
    if dsn is not None:
        from trio_peers.testing._postgres import ExternalPostgres

        return ExternalPostgres(dsn), True
    from trio_peers.testing import PostgresServer, _postgres, find_postgres_bindir

    # PostgresServer has no parameter for server settings (a suggestion for the harness):
    # the benchmark replaces the harness's command-line settings for this process only.
    settings = dict(_postgres._SERVER_SETTINGS)
    settings["max_connections"] = str(MAX_CONNECTIONS)
    settings["shared_buffers"] = "128MB"
    lib = find_postgres_bindir().parent / "lib"
    if (lib / "pg_stat_statements.so").exists() or (
        lib / "postgresql" / "pg_stat_statements.so"
    ).exists():
        settings["shared_preload_libraries"] = "pg_stat_statements"
    _postgres._SERVER_SETTINGS = tuple(settings.items())  # type: ignore[misc]
    return PostgresServer.start(), False


def has_statements_view(server: Any) -> bool:
    try:
        server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        server.execute("SELECT pg_stat_statements_reset()")
    except Exception as exc:
        log(f"pg_stat_statements not available ({type(exc).__name__}); statements not counted")
        return False
    return True


def pg_settings(server: Any) -> dict[str, str]:
    rows = server.execute(
        "SELECT name, setting, coalesce(unit, '') FROM pg_settings "
        "WHERE source NOT IN ('default', 'override') ORDER BY name"
    )
    out = {str(r[0]): f"{r[1]}{r[2] and ' ' + str(r[2])}" for r in rows}
    out["server_version"] = str(server.execute("SHOW server_version")[0][0])
    return out


# --------------------------------------------------------------------------- the run


def close_leader_last(procs: list[PeerProcess], leader: PeerProcess) -> None:
    """Quit the followers, then the leader.

    Quitting all at once can leave a lease behind: a follower's bid woken by the leader's
    release may commit while that follower is closing (benchmarks/repro_simultaneous_exit.py).
    """
    close_all([p for p in procs if p is not leader])
    leader.close()


class Bench:
    def __init__(self, args: argparse.Namespace, server: Any, out: Path) -> None:
        self.args = args
        self.server = server
        self.out = out
        self.mode: dict[str, Any] = MODES[args.mode]
        self.rng = random.Random(args.seed)
        self.samples = (out / "samples.jsonl").open("w")
        self.lock = threading.Lock()
        self.results: dict[str, Any] = {}
        self.loads: dict[str, list[float]] = {}
        self.statements_view = False
        self.tp_dsn = server.dsn_for("bench_tp")
        self.oban_dsn = server.dsn_for("bench_oban")
        self.floor_dsn = server.dsn_for("bench_floor")

    # ---------------------------------------------------------------- helpers

    def sample(self, bench: str, lib: str, **fields: Any) -> None:
        with self.lock:
            self.samples.write(json.dumps({"bench": bench, "lib": lib, **fields}) + "\n")
            self.samples.flush()

    def spawn(
        self, lib: str, node: str, *, interval: float = 0.0, trace: bool = False
    ) -> PeerProcess:
        if lib in (TP, TPS):
            argv = [
                self.args.tp_python,
                str(BENCH / "_tp_proc.py"),
                self.tp_dsn,
                node,
                str(interval),
            ]
            if trace:
                argv.append("--trace")
            if lib == TPS:
                argv.append("--session")
        else:
            argv = [self.args.oban_python, str(BENCH / "_oban_proc.py"), self.oban_dsn, node]
        return PeerProcess(argv)

    def reset(self, lib: str) -> None:
        """Start a phase from an empty lease table (no lease left by an earlier phase)."""
        if lib in (TP, TPS):
            self.server.execute("DELETE FROM trio_peers", database="bench_tp")
        else:
            self.server.execute("DELETE FROM oban_leaders", database="bench_oban")

    def join_as_leader(self, lib: str, proc: PeerProcess, timeout: float = 60.0) -> None:
        joined = proc.until("joined", timeout=timeout) if lib in (TP, TPS) else None
        if lib == OBAN:
            proc.until("gained", timeout=timeout)
        elif joined is not None and not joined["leader"]:
            raise RuntimeError("the first peer does not lead: a lease outlived its holder")

    def phase(self, name: str) -> None:
        self.loads[name] = load_average()
        log(f"{name} (load average {self.loads[name][0]:.2f})")

    @property
    def libs(self) -> list[str]:
        return [TP] if self.args.mode == "smoke" or self.args.no_oban else [TP, OBAN]

    # ---------------------------------------------------------------- setup

    def prepare(self) -> None:
        import trio

        from trio_peers import migrate

        for db in ("bench_tp", "bench_oban", "bench_floor", "bench_scaling"):
            self.server.create_database(db)
        for db in ("bench_tp", "bench_floor", "bench_scaling"):
            trio.run(migrate, self.server.dsn_for(db))
        if OBAN in self.libs:
            code = (
                "import asyncio, sys\n"
                "from oban import Oban\n"
                "from oban.schema import install\n"
                "async def main():\n"
                "    pool = await Oban.create_pool(sys.argv[1])\n"
                "    await install(pool)\n"
                "    await pool.close()\n"
                "asyncio.run(main())\n"
            )
            subprocess.run([self.args.oban_python, "-c", code, self.oban_dsn], check=True)
        self.statements_view = has_statements_view(self.server)

    # ---------------------------------------------------------------- measurements

    def statements(self) -> None:
        self.phase("statement latency: trio-asyncio vs plain asyncio")
        # Unpinned, as a deployment runs; and pinned: each side's process and its server
        # backend on one CPU. On a small VM a round trip between two CPUs costs a wake-up
        # of a few hundred microseconds, and whether a connection's client and backend end
        # up on one CPU or two is decided per connection by the kernel: unpinned, one
        # process of a side can come out twice as fast as another, for either library.
        # Pinned, both sides pay the same wake-ups, and the difference left is the CPU
        # work that trio-asyncio adds (the overhead the target is about).
        postmaster = self._postmaster_pid()
        cpu: int | None = None
        if postmaster is not None:
            try:  # (moving another user's process takes root, or CAP_SYS_NICE)
                os.sched_setaffinity(postmaster, os.sched_getaffinity(postmaster))
                cpu = max(os.sched_getaffinity(0))
            except PermissionError:
                log("statement latency: cannot pin the server's processes; unpinned only")
        for pinned in (False, True):
            if pinned and cpu is None:
                break
            data: dict[str, list[float]] = {"trio_asyncio": [], "asyncio": []}
            for _ in range(2):
                for side, key in (("trio", "trio_asyncio"), ("asyncio", "asyncio")):
                    data[key] += self._statement_block(side, cpu if pinned else None, postmaster)
            suffix = "/pinned" if pinned else ""
            for key, values in data.items():
                for v in values:
                    self.sample("statement", key, seconds=v, pinned=pinned)
                self.results[f"statement/{key}{suffix}"] = summarize(values)

    def _postmaster_pid(self) -> int | None:
        """The server's postmaster, if it runs on this host (its data directory is here)."""
        data = str(self.server.execute("SELECT current_setting('data_directory')")[0][0])
        try:
            pid = int(Path(data, "postmaster.pid").read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            return None
        return pid if comm == "postgres" else None

    def _statement_block(self, side: str, cpu: int | None, postmaster: int | None) -> list[float]:
        """One side's block of statements; with ``cpu``, that process and the backends the
        server forks meanwhile (the postmaster's affinity is inherited) run on it alone."""
        saved = os.sched_getaffinity(postmaster) if cpu is not None and postmaster else None
        try:
            if cpu is not None and postmaster is not None:
                os.sched_setaffinity(postmaster, {cpu})
            out = subprocess.run(
                [
                    self.args.tp_python,
                    str(BENCH / "_statements_proc.py"),
                    side,
                    self.tp_dsn,
                    str(self.mode["statements"] // 2),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
            )
        finally:
            if saved is not None and postmaster is not None:
                os.sched_setaffinity(postmaster, saved)
        values: list[float] = json.loads(out.stdout)
        return values

    def floor(self, peers: int = 2) -> None:
        self.phase(f"floor: release + NOTIFY + election through plain asyncpg, {peers} processes")
        env = {"PYTHONPATH": str(ROOT)}
        script = str(BENCH / "_floor_proc.py")
        leader = PeerProcess([self.args.tp_python, script, "leader", self.floor_dsn], env=env)
        followers = [
            PeerProcess([self.args.tp_python, script, "follower", self.floor_dsn, str(i)], env=env)
            for i in range(peers - 1)
        ]
        values = []
        try:
            for p in (leader, *followers):
                p.until("ready")
            for i in range(self.mode["floor"]):
                leader.send("join")
                leader.until("joined")
                time.sleep(0.05)
                leader.send("leave")
                t0 = leader.until("leaving")["t"]
                bids = [f.until("gained") for f in followers]
                leader.until("left")
                winners = [(f, b) for f, b in zip(followers, bids, strict=True) if b["won"]]
                assert len(winners) == 1, bids
                winner, won = winners[0]
                winner.send("free")  # the next round starts from a free lease
                winner.until("freed")
                values.append(won["t"] - t0)
                self.sample("floor", "asyncpg", peers=peers, round=i, seconds=won["t"] - t0)
        finally:
            close_all([leader, *followers])
        self.results[f"floor/{peers}"] = summarize(values)
        if peers == 2:
            self.results["floor"] = self.results["floor/2"]

    def graceful(self, lib: str, peers: int) -> None:
        self.phase(f"graceful handover, {lib}, {peers} processes")
        procs = [self.spawn(lib, f"{lib}-g{peers}-{i}", interval=0.0) for i in range(peers)]
        handover, leave = [], []
        leader = procs[0]
        try:
            for p in procs:
                p.until("ready", timeout=60)
            self.reset(lib)
            procs[0].send("join")
            self.join_as_leader(lib, procs[0])
            for p in procs[1:]:
                p.send("join")
                p.until("joined")
            leader = procs[0]
            for i in range(self.mode["graceful"]):
                # Followers idle, as in production when a leader leaves.
                time.sleep(0.15)
                for p in procs:
                    p.drain()
                leader.send("leave")
                t0 = leader.until("leaving")["t"]
                others = [p for p in procs if p is not leader]
                winner, gained = first_event(others, "gained", timeout=90)
                t_left = leader.until("left")["t"]
                handover.append(gained["t"] - t0)
                leave.append(t_left - t0)
                self.sample(
                    "graceful",
                    lib,
                    peers=peers,
                    round=i,
                    handover_s=gained["t"] - t0,
                    leave_s=t_left - t0,
                )
                leader.send("join")
                leader.until("joined")
                leader = winner
        finally:
            close_leader_last(procs, leader)
        self.results[f"graceful/{lib}/{peers}"] = summarize(handover)
        self.results[f"leave/{lib}/{peers}"] = summarize(leave)

    def crash(self, lib: str, interval: float, rounds: int, seed: int) -> None:
        label = f"{interval:g}s" if interval else "default"
        rng = random.Random(seed)
        period = interval or 30.0  # both libraries' default interval is 30 s
        follower = self.spawn(lib, f"{lib}-crash-{label}-f", interval=interval)
        values = []
        try:
            follower.until("ready", timeout=60)
            for i in range(rounds):
                victim = self.spawn(lib, f"{lib}-crash-{label}-v{i}", interval=interval)
                try:
                    victim.until("ready", timeout=60)
                    if i == 0:
                        self.reset(lib)
                        victim.send("join")
                        self.join_as_leader(lib, victim)
                        follower.send("join")
                        follower.until("joined")
                    else:
                        # The follower leads now: it leaves so the victim leads, then rejoins.
                        victim.send("join")
                        victim.until("joined")
                        follower.drain()
                        follower.send("leave")
                        follower.until("left")
                        victim.until("gained", timeout=3 * period)
                        follower.send("join")
                        follower.until("joined")
                    follower.drain()
                    # SIGKILL at a random phase of the renewal cycle.
                    time.sleep(rng.uniform(0.0, period))
                    t0 = time.monotonic()
                    victim.kill()
                    t1 = follower.until("gained", timeout=4 * period)["t"]
                    values.append(t1 - t0)
                    self.sample(
                        "crash", lib, interval=interval or "default", round=i, seconds=t1 - t0
                    )
                finally:
                    victim.close()
        finally:
            follower.close()
        self.results[f"crash/{lib}/{label}"] = summarize(values)

    def _db_stats(self, db: str) -> dict[str, float]:
        """Counters of one database; WAL from its statements (pg_stat_statements) when
        available, else the cluster's WAL position (which background work also moves)."""
        calls = wal = "0"
        if self.statements_view:
            per_db = "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1"
            calls = f"(SELECT coalesce(sum(calls), 0) {per_db})"
            wal = f"(SELECT coalesce(sum(wal_bytes), 0) {per_db})"
        row = self.server.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = $1), "
            f"{calls}, {wal}, pg_current_wal_lsn() - '0/0'::pg_lsn, "
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
            "AND backend_type = 'client backend')",
            db,
        )[0]
        return {
            "commits": float(row[0]),
            "statements": float(row[1]),
            "wal": float(row[2]) if self.statements_view else float(row[3]),
            "cluster_wal": float(row[3]),
            "connections": float(row[4]),
        }

    def idle(self, lib: str, peers: int = 3) -> None:
        self.phase(f"idle cost, {lib}, {peers} processes at the default interval")
        db = "bench_tp" if lib == TP else "bench_oban"
        procs = [self.spawn(lib, f"{lib}-idle-{i}") for i in range(peers)]
        try:
            for p in procs:
                p.until("ready", timeout=60)
                p.send("join")
                p.until("joined")
            time.sleep(2.0)
            window = self.mode["idle"]
            s0, c0, t0 = self._db_stats(db), [cpu_seconds(p.pid) for p in procs], time.monotonic()
            time.sleep(window)
            s1, c1, t1 = self._db_stats(db), [cpu_seconds(p.pid) for p in procs], time.monotonic()
            span = t1 - t0
            row = {
                "peers": peers,
                "window_s": span,
                "statements_per_s_per_peer": (s1["statements"] - s0["statements"]) / span / peers,
                "commits_per_s_per_peer": (s1["commits"] - s0["commits"]) / span / peers,
                "wal_bytes_per_s_per_peer": (s1["wal"] - s0["wal"]) / span / peers,
                "cluster_wal_bytes_per_s": (s1["cluster_wal"] - s0["cluster_wal"]) / span,
                "connections_per_peer": s1["connections"] / peers,
                "cpu_per_peer": sum(b - a for a, b in zip(c0, c1, strict=True)) / span / peers,
                "rss_bytes_per_peer": sum(rss_bytes(p.pid) for p in procs) / peers,
                "statements_counted": self.statements_view,
            }
            self.sample("idle", lib, **row)
            self.results[f"idle/{lib}"] = row
        finally:
            close_all(procs)

    def herd(self, lib: str, followers: int) -> None:
        self.phase(f"herd, {lib}, 1 leader and {followers} followers")
        procs = [self.spawn(lib, f"{lib}-herd-{i}", trace=True) for i in range(followers + 1)]
        settle, winners_seen, won_first = [], [], []
        leader = procs[0]
        try:
            for p in procs:
                p.until("ready", timeout=120)
            self.reset(lib)
            procs[0].send("join")
            self.join_as_leader(lib, procs[0])
            for p in procs[1:]:
                p.send("join")
            for p in procs[1:]:
                p.until("joined", timeout=120)
            leader = procs[0]
            for i in range(self.mode["herd_rounds"]):
                time.sleep(2.0)
                for p in procs:
                    p.drain()
                leader.send("leave")
                t0 = leader.until("leaving")["t"]
                others = [p for p in procs if p is not leader]
                winner, gained = first_event(others, "gained", timeout=60)
                reacted = {}
                for p in others:
                    ev = p.until("elect", timeout=30)
                    while ev["t"] < t0:
                        ev = p.until("elect", timeout=30)
                    reacted[p.pid] = ev["t"]
                time.sleep(0.5)
                extra = sum(
                    1
                    for p in others
                    if p is not winner and any(e["event"] == "gained" for e in p.drain())
                )
                # Settled: every follower's round after the release has finished, and the
                # winner has reported its leadership (a round's report can come before the
                # winner's leadership change reaches its consumer).
                t_settled = max(*reacted.values(), gained["t"])
                settle.append(t_settled - t0)
                won_first.append(gained["t"] - t0)
                winners_seen.append(1 + extra)
                self.sample(
                    "herd",
                    lib,
                    followers=followers,
                    round=i,
                    winner_s=gained["t"] - t0,
                    settled_s=t_settled - t0,
                    winners=1 + extra,
                )
                leader.until("left", timeout=60)
                leader.send("join")
                leader.until("joined", timeout=60)
                leader = winner
        finally:
            close_leader_last(procs, leader)
        self.results[f"herd/{lib}"] = {
            "followers": followers,
            "winner": summarize(won_first),
            "settled": summarize(settle),
            "max_winners": max(winners_seen) if winners_seen else None,
        }

    def crash_defaults(self) -> None:
        rounds = self.mode["crash_default"]
        if not rounds:
            return
        self.phase(
            f"crash handover at each library's default interval ({rounds} rounds, in parallel)"
        )
        threads = [
            threading.Thread(target=self.crash, args=(lib, 0.0, rounds, self.args.seed + k))
            for k, lib in enumerate(self.libs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def scaling(self) -> None:
        self.phase("many names per process (benchmarks/scaling.py)")
        m = self.mode
        rows = scaling.run(
            self.server,
            "bench_scaling",
            names=m["scaling_names"],
            intervals=m["scaling_intervals"],
            window=m["scaling_window"],
            window_long=m["scaling_window_long"],
            cap=m["scaling_cap"],
            python=self.args.tp_python,
            log=log,
        )
        for row in rows:
            self.sample("scaling", TP, **row)
        self.results["scaling"] = rows

    def crash_1s(self) -> None:
        self.phase("crash handover at interval 1 s")
        self.crash(TP, 1.0, self.mode["crash"], self.args.seed)

    def run(self, only: set[str] | None) -> None:
        # Idle first, while the databases are fresh (no autovacuum work left by other phases).
        m, libs = self.mode, self.libs
        steps: list[tuple[str, Callable[[], None]]] = [
            *(("idle", lambda lib=lib: self.idle(lib)) for lib in libs),
            ("statements", self.statements),
            *(("floor", lambda n=n: self.floor(n)) for n in m["peers"]),
            *(
                ("graceful", lambda lib=lib, n=n: self.graceful(lib, n))
                for n in m["peers"]
                for lib in [TP, TPS, *libs[1:]]
            ),
            ("crash", self.crash_1s),
            *(("herd", lambda lib=lib: self.herd(lib, m["herd"])) for lib in libs),
            ("crash_default", self.crash_defaults),
            ("scaling", self.scaling),
        ]
        for name, step in steps:
            if only is None or name in only:
                step()


# --------------------------------------------------------------------------- report


def versions(args: argparse.Namespace) -> dict[str, str]:
    def ask(python: str, code: str) -> str:
        try:
            return subprocess.run(
                [python, "-c", code], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "n/a"

    meta = "from importlib.metadata import version as v; import sys; "
    out = {
        "trio-peers peers": ask(
            args.tp_python,
            meta
            + "print('python', sys.version.split()[0], 'trio-peers', v('trio-peers'), 'trio', v('trio'), 'trio-asyncio', v('trio-asyncio'), 'asyncpg', v('asyncpg'))",
        ),
        "orchestrator": f"python {sys.version.split()[0]}",
    }
    if not args.no_oban and args.mode != "smoke":
        out["oban-py peers"] = ask(
            args.oban_python,
            meta
            + "print('python', sys.version.split()[0], 'oban', v('oban'), 'psycopg', v('psycopg'), 'psycopg-pool', v('psycopg-pool'))",
        )
    try:
        out["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git"] = "n/a"
    return out


DOCS_DATA = ROOT / "docs" / "performance"
DOCS_IMAGES = ROOT / "docs" / "images" / "performance"


def publish(out: Path) -> None:
    """Copy a run's table, plots and raw data to where docs/performance.rst finds them."""
    import shutil

    DOCS_DATA.mkdir(parents=True, exist_ok=True)
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "table.rst", DOCS_DATA / "results.inc")
    for name in ("table.md", "samples.jsonl", "meta.json", "results.json"):
        shutil.copy(out / name, DOCS_DATA / name)
    for png in out.glob("*.png"):
        shutil.copy(png, DOCS_IMAGES / png.name)
    log(
        f"published {out.name} to {DOCS_DATA.relative_to(ROOT)} and {DOCS_IMAGES.relative_to(ROOT)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--tp-python", default=sys.executable, help="interpreter of the trio-peers peers"
    )
    parser.add_argument("--oban-python", help="interpreter of a venv with oban==0.7.0")
    parser.add_argument("--no-oban", action="store_true", help="measure trio-peers only")
    parser.add_argument(
        "--out", type=Path, help="results folder (default benchmarks/results/<timestamp>)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated steps: statements,floor,graceful,crash,idle,herd,crash_default,scaling",
    )
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--publish", action="store_true", help="copy table, plots and raw data into docs/"
    )
    args = parser.parse_args()
    if args.mode != "smoke" and not args.no_oban and not args.oban_python:
        parser.error("--oban-python is required (or --no-oban); `nox -s bench` provides it")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH / "results" / f"{stamp}-{args.mode}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server, external = start_server()
    try:
        bench = Bench(args, server, out)
        bench.prepare()
        meta = {
            "mode": args.mode,
            "started_utc": stamp,
            "machine": machine(),
            "versions": versions(args),
            "postgresql": pg_settings(server),
            "seed": args.seed,
        }
        bench.run(set(args.only.split(",")) if args.only else None)
        meta["load_average_by_phase"] = bench.loads
        meta["load_average_at_end"] = load_average()
        meta["duration_s"] = time.monotonic() - started
        bench.samples.close()
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (out / "results.json").write_text(json.dumps(bench.results, indent=2) + "\n")
        from benchmarks import _report

        (out / "table.md").write_text(_report.table(bench.results, meta))
        (out / "table.rst").write_text(_report.table_rst(bench.results, meta))
        if not args.no_plots:
            _report.plots(out)
        if args.publish:
            publish(out)
        log(f"results in {out} ({meta['duration_s']:.0f} s)")
        print((out / "table.md").read_text())
    finally:
        if not external:
            server.close()


if __name__ == "__main__":
    main()
