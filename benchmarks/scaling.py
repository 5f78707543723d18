"""Many names in one process: what each name costs (issue 10's benchmark).

    python benchmarks/scaling.py [--dsn DSN] [--names 1,100,1000] [--intervals 2,30]
                                 [--window 20] [--cap 250] [--sessions auto|on|off]

For each (names, interval): process A opens every name and leads them all, process B
opens the same names and follows; then, over an idle window, it reads the server
connections of the benchmark database, the idle CPU of each process, commits/s and
WAL bytes/s; then A leaves, and it times A's exit and the moment B leads every name.
Without --dsn it starts a throwaway PostgreSQL (trio_peers.testing.PostgresServer).

With ``--sessions on`` (``auto``, the default, when ``trio_peers.open_session`` exists)
each process opens one session and enters all of its names with
``session.open_peers(names)``, each name with a task reading its ``leadership()``; there
is no cap. With ``--sessions off`` each name is an ``open_peer`` of its own (its own
connection and trio-asyncio loop, so N names cost 2N connections for the two processes),
and runs that would need more than ``--cap`` names per process are skipped.

The same file is the peer process (``scaling.py peer DSN INTERVAL NAMES``), driven over
stdin like the other benchmark peers: ``join`` opens every name (``opened``), and it
reports ``all_leading`` each time it leads every name; ``leave`` exits them all
(``leaving``, ``left``, then ``counted`` with the failed rounds, read after the exit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import PeerProcess, close_all, cpu_seconds, load_average, rss_bytes

TABLE = "trio_peers"


# --------------------------------------------------------------------------- peer side


def sessions_available() -> bool:
    import trio_peers

    return hasattr(trio_peers, "open_session")


async def peer_main(dsn: str, interval: float, names: int, use_sessions: bool) -> None:
    import trio

    import trio_peers
    from benchmarks._peer_side import emit, serve_commands

    emit("ready", sessions=use_sessions)
    leading: set[str] = set()
    all_names = [f"n{i:05d}" for i in range(names)]

    async def watch(peer: Any) -> None:
        async for change in peer.leadership():
            if change.is_leader:
                leading.add(peer.name)
                if len(leading) == names:
                    emit("all_leading")
            else:
                leading.discard(peer.name)

    failed: list[int] = []

    async def one_name(
        name: str, leave: trio.Event, opened: list[int], all_open: trio.Event
    ) -> None:
        cm = trio_peers.open_peer(trio_peers.PeerConfig(dsn=dsn, name=name, interval=interval))
        async with trio.open_nursery() as nursery, cm as peer:
            nursery.start_soon(watch, peer)
            opened.append(1)
            if len(opened) == names:
                all_open.set()
            await leave.wait()
            failed.append(peer.statistics().elections_failed)
            nursery.cancel_scope.cancel()

    async def run_all(leave: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        if use_sessions:
            # Many names of one session enter and leave together: open_peers (their
            # releases then go out as one statement before the peers wind down). The
            # readers' nursery is outside the names' block, as docs/howto/many-names.rst
            # advises: leaving releases first, and each reader's ``async for`` ends by
            # itself when its peer closes (no cancellation of 1,000 tasks before it).
            async with (
                trio_peers.open_session(dsn) as session,
                trio.open_nursery() as watchers,
            ):
                async with session.open_peers(all_names, interval=interval) as peers:
                    for peer in peers.values():
                        watchers.start_soon(watch, peer)
                    emit("opened", leading=sum(peer.is_leader for peer in peers.values()))
                    task_status.started()
                    await leave.wait()
            emit("left")
            # (Counted after the exit: the benchmark's bookkeeping is not part of leaving.)
            failed.extend(peer.statistics().elections_failed for peer in peers.values())
            emit("counted", failed_rounds=sum(failed))
            return
        opened: list[int] = []
        all_open = trio.Event()
        async with trio.open_nursery() as nursery:
            for name in all_names:
                nursery.start_soon(one_name, name, leave, opened, all_open)
            await all_open.wait()
            emit("opened", leading=len(leading))
            task_status.started()
        emit("left")
        emit("counted", failed_rounds=sum(failed))

    await serve_commands(
        lambda nursery, leave: nursery.start(run_all, leave), on_join=lambda: emit("joining")
    )


# --------------------------------------------------------------------------- orchestrator


def _peer(python: str, dsn: str, interval: float, names: int, sessions: bool) -> PeerProcess:
    argv = [python, str(Path(__file__).resolve()), "peer", dsn, str(interval), str(names)]
    if sessions:
        argv.append("--sessions")
    return PeerProcess(argv)


def _db_counters(server: Any, database: str) -> dict[str, float]:
    row = server.execute(
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = $1), "
        "pg_current_wal_lsn() - '0/0'::pg_lsn, "
        "(SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend')",
        database,
    )[0]
    return {"commits": float(row[0]), "wal": float(row[1]), "connections": float(row[2])}


def measure(
    server: Any,
    database: str,
    *,
    names: int,
    interval: float,
    window: float,
    python: str,
    sessions: bool,
) -> dict[str, Any]:
    """One (names, interval) configuration; returns one result row."""
    dsn = server.dsn_for(database)
    server.execute(f"DELETE FROM {TABLE}", database=database)
    a = _peer(python, dsn, interval, names, sessions)
    b = _peer(python, dsn, interval, names, sessions)
    row: dict[str, Any] = {
        "names": names,
        "interval": interval,
        "sessions": sessions,
        "load_average": load_average(),
    }
    try:
        a.until("ready")
        b.until("ready")
        a.send("join")
        t0 = a.until("joining")["t"]
        opened = a.until("opened", timeout=600)
        row["open_s"] = opened["t"] - t0
        a.until("all_leading", timeout=600) if opened["leading"] < names else None
        b.send("join")
        b.until("opened", timeout=600)
        time.sleep(min(2.0, interval))  # let the first rounds' stragglers finish
        c0, cpu_a0, cpu_b0, w0 = (
            _db_counters(server, database),
            cpu_seconds(a.pid),
            cpu_seconds(b.pid),
            time.monotonic(),
        )
        time.sleep(window)
        c1, cpu_a1, cpu_b1, w1 = (
            _db_counters(server, database),
            cpu_seconds(a.pid),
            cpu_seconds(b.pid),
            time.monotonic(),
        )
        span = w1 - w0
        row.update(
            window_s=span,
            connections=c1["connections"],
            connections_per_process=c1["connections"] / 2,
            cpu_leader=(cpu_a1 - cpu_a0) / span,
            cpu_follower=(cpu_b1 - cpu_b0) / span,
            rss_leader=rss_bytes(a.pid),
            rss_follower=rss_bytes(b.pid),
            commits_per_s=(c1["commits"] - c0["commits"]) / span,
            wal_bytes_per_s=(c1["wal"] - c0["wal"]) / span,
        )
        b.drain()
        a.send("leave")
        t_leave = a.until("leaving")["t"]
        row["handover_all_s"] = b.until("all_leading", timeout=600)["t"] - t_leave
        left = a.until("left", timeout=600)
        row["exit_s"] = left["t"] - t_leave
        row["failed_rounds_leader"] = a.until("counted", timeout=600)["failed_rounds"]
        b.send("leave")
        row["failed_rounds_follower"] = b.until("counted", timeout=600)["failed_rounds"]
    finally:
        close_all([a, b])
    return row


def run(
    server: Any,
    database: str,
    *,
    names: list[int],
    intervals: list[float],
    window: float,
    window_long: float,
    cap: int,
    python: str,
    sessions: str = "auto",
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every configuration; configurations over ``cap`` names without sessions are skipped."""
    use = sessions == "on" or (sessions == "auto" and _sessions_in(python))
    rows: list[dict[str, Any]] = []
    for interval in intervals:
        for n in names:
            if not use and n > cap:
                rows.append(
                    {
                        "names": n,
                        "interval": interval,
                        "sessions": False,
                        "skipped": f"needs {2 * n} server connections (one open_peer per name); "
                        f"capped at {cap} names per process",
                    }
                )
                log(f"scaling: {n} names at {interval} s skipped (cap {cap})")
                continue
            w = window if interval < 10 else window_long
            row = measure(
                server, database, names=n, interval=interval, window=w, python=python, sessions=use
            )
            log(
                f"scaling: {n} names at {interval} s: {row['connections']:.0f} connections, "
                f"idle CPU {100 * row['cpu_leader']:.1f}% (leader) "
                f"{100 * row['cpu_follower']:.1f}% (follower), open {row['open_s']:.2f} s, exit {row['exit_s']:.2f} s, "
                f"handover of all {row['handover_all_s']:.2f} s, "
                f"{row['commits_per_s']:.1f} commits/s, failed rounds "
                f"{row['failed_rounds_leader']} (leader) {row['failed_rounds_follower']} (follower)"
            )
            rows.append(row)
    return rows


def _sessions_in(python: str) -> bool:
    import subprocess

    out = subprocess.run(
        [python, "-c", "import trio_peers; print(hasattr(trio_peers, 'open_session'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "True"


def prepare_database(server: Any, database: str) -> None:
    import trio

    from trio_peers import migrate

    server.create_database(database)
    trio.run(migrate, server.dsn_for(database))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        import trio

        _, _, dsn, interval, names, *rest = sys.argv
        trio.run(peer_main, dsn, float(interval), int(names), "--sessions" in rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="an existing server's DSN (superuser; a database is made)")
    parser.add_argument("--names", default="1,100,1000")
    parser.add_argument("--intervals", default="2,30")
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--window-long", type=float, default=45.0)
    parser.add_argument("--cap", type=int, default=250)
    parser.add_argument("--sessions", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the peers")
    args = parser.parse_args()

    from benchmarks.bench import start_server

    server, external = start_server(args.dsn)
    try:
        prepare_database(server, "scaling")
        rows = run(
            server,
            "scaling",
            names=[int(n) for n in args.names.split(",")],
            intervals=[float(i) for i in args.intervals.split(",")],
            window=args.window,
            window_long=args.window_long,
            cap=args.cap,
            python=args.python,
            sessions=args.sessions,
        )
        for row in rows:
            print(json.dumps(row))
    finally:
        if not external:
            server.close()


if __name__ == "__main__":
    main()
