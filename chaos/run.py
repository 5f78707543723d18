"""The chaos runner: worker processes, a seeded fault schedule, one folder of history.

``python -m chaos.run --duration 60 --workers 5 --names 20 --interval 1 --seed 7``

It starts a throwaway PostgreSQL server (:class:`trio_peers.testing.PostgresServer`),
one :class:`chaos.proxy.FaultyProxy` per worker slot, and one worker process
per slot (``chaos.worker``; slot ``s`` always runs with ``node = "w<s>"``, also
after a restart). Then it plays the schedule of :mod:`chaos.schedule`, stops
every worker with SIGTERM, and runs :mod:`chaos.check` on the folder, whose
exit status it returns.

The folder holds ``run.json`` (arguments, seed, planned schedule, times, the
lease table at the end), ``faults.jsonl`` (each fault as executed, with wall
times), ``processes.jsonl`` (each worker process: how it was asked to end and
how it ended), ``<label>.jsonl`` (each process's own log) and
``<label>.stderr``, and ``postgres.log``.

SIGSTOP placement: the runner stops a worker only while its main thread is
parked in ``epoll_wait`` (Trio's run loop waiting for I/O or a timeout): it
sends SIGSTOP, waits for the stop, reads ``/proc/PID/syscall``, and if the
thread was anywhere else it sends SIGCONT and tries again a few milliseconds
later. A process stopped at an arbitrary instruction may have just read
``is_leader`` and be about to log its step; resumed after its trust ended, it
would log a step that Trio had decided on in the past, which the checker could
not tell from a step taken without trust. Stopped in ``epoll_wait``, no task
is running: on resume Trio expires deadlines before it runs any task, so a
correct library takes no further step of timer-driven work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from trio_peers import migrate
from trio_peers.testing import PostgresServer

from .proxy import FaultyProxy
from .schedule import Fault, make_schedule

ROOT = Path(__file__).resolve().parent.parent

#: x86-64 system call numbers of epoll_wait, epoll_pwait and epoll_pwait2.
EPOLL_SYSCALLS = frozenset({"232", "281", "441"})
#: Seconds a worker gets to exit after SIGTERM before it counts as hung.
EXIT_LIMIT = 20.0


@attrs.define(eq=False)
class Worker:
    label: str
    slot: int
    node: str
    twin: bool
    proc: trio.Process
    stderr: IO[bytes]
    started: float
    expected: str | None = None  # "sigkill" or "sigterm" once we sent one
    signal_at: float | None = None
    ended: float | None = None
    returncode: int | None = None
    hung: bool = False
    exited: trio.Event = attrs.field(factory=trio.Event)

    def record(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "slot": self.slot,
            "node": self.node,
            "twin": self.twin,
            "pid": self.proc.pid,
            "started": self.started,
            "expected": self.expected,
            "signal_at": self.signal_at,
            "ended": self.ended,
            "returncode": self.returncode,
            "hung": self.hung,
        }


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "?"


def _syscall(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return "?"


def _stop_parked(pid: int) -> bool:
    """SIGSTOP ``pid``; keep it stopped only if it was parked in epoll_wait (else SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(200):  # the stop is asynchronous: wait for it (up to ~0.1 s)
        if _proc_state(pid) in ("T", "t"):
            break
        time.sleep(0.0005)
    if _syscall(pid) in EPOLL_SYSCALLS:
        return True
    os.kill(pid, signal.SIGCONT)
    return False


class Runner:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.names = ["n0"] if args.form == "single" else [f"n{i}" for i in range(args.names)]
        self.pg: PostgresServer | None = None
        self.proxies: list[FaultyProxy] = []
        self.slots: list[Worker | None] = [None] * args.workers
        self.workers: list[Worker] = []
        self.faults: list[dict[str, Any]] = []
        self.counter = 0
        self.nursery: trio.Nursery | None = None
        self.finishing = False
        self.env = dict(os.environ)
        paths = [*args.pythonpath, str(ROOT)]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)

    # ------------------------------------------------------------ processes

    async def spawn(self, slot: int, *, twin: bool = False) -> Worker:
        assert self.nursery is not None
        label = f"p{self.counter}"
        self.counter += 1
        step = self.args.step
        cmd = [
            sys.executable,
            "-m",
            "chaos.worker",
            *("--dsn", f"postgresql://postgres@127.0.0.1:{self.proxies[slot].port}/chaos"),
            *("--node", f"w{slot}", "--slot", str(slot), "--label", label),
            *("--names", ",".join(self.names), "--interval", str(self.args.interval)),
            *(
                "--step",
                str(step),
                "--form",
                "session" if self.args.form == "session" else "peers",
            ),
            *("--log", str(self.out / f"{label}.jsonl")),
        ]
        stderr = (self.out / f"{label}.stderr").open("wb")
        proc = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=self.out,  # not ROOT: sys.path[0] must not shadow --pythonpath
            env=self.env,
        )
        worker = Worker(label, slot, f"w{slot}", twin, proc, stderr, time.time())
        self.workers.append(worker)
        if not twin:
            self.slots[slot] = worker
        self.nursery.start_soon(self._supervise, worker)
        return worker

    async def _supervise(self, worker: Worker) -> None:
        worker.returncode = await worker.proc.wait()
        worker.ended = time.time()
        worker.stderr.close()
        worker.exited.set()
        if self.slots[worker.slot] is worker:
            self.slots[worker.slot] = None
            if worker.expected is None and not self.finishing:
                # A crash (the checker reports it): keep the slot populated.
                await trio.sleep(1.0)
                if self.slots[worker.slot] is None and not self.finishing:
                    await self.spawn(worker.slot)

    async def terminate(self, worker: Worker) -> None:
        """SIGTERM and wait; a worker that does not exit in time is hung (then killed)."""
        worker.expected = "sigterm"
        worker.signal_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(EXIT_LIMIT):
            await worker.exited.wait()
            return
        worker.hung = True
        os.kill(worker.proc.pid, signal.SIGCONT)
        worker.proc.kill()
        await worker.exited.wait()

    def alive(self, slot: int | None) -> Worker | None:
        if slot is None:
            return None
        worker = self.slots[slot]
        if worker is None or worker.exited.is_set() or worker.expected is not None:
            return None
        return worker

    async def _wait_ready(self, worker: Worker, limit: float = 120.0) -> bool:
        await trio.lowlevel.checkpoint()
        path = self.out / f"{worker.label}.jsonl"
        with trio.move_on_after(limit):
            while not worker.exited.is_set():
                if path.exists() and b'"ev":"ready"' in path.read_bytes()[:4096]:
                    return True
                await trio.sleep(0.05)
        return False

    # ------------------------------------------------------------ faults

    async def play(self, fault: Fault, t0: float) -> None:
        await trio.sleep_until(t0 + fault.at)
        record: dict[str, Any] = {**fault.to_json(), "start": time.time()}
        try:
            await getattr(self, f"fault_{fault.kind}")(fault, record)
        except Exception as exc:  # a fault that could not be applied is reported, not fatal
            record["error"] = f"{type(exc).__name__}: {exc}"
        record.setdefault("end", time.time())
        self.faults.append(record)

    async def fault_kill(self, fault: Fault, rec: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        worker = self.alive(fault.target)
        if worker is None:
            rec["skipped"] = "no running worker"
            return
        rec["labels"] = [worker.label]
        worker.expected = "sigkill"
        worker.signal_at = rec["start"] = time.time()
        worker.proc.kill()
        await worker.exited.wait()
        rec["died"] = time.time()
        await trio.sleep(fault.duration)
        new = await self.spawn(worker.slot)
        rec["labels"].append(new.label)
        rec["end"] = time.time()

    async def fault_term(self, fault: Fault, rec: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        worker = self.alive(fault.target)
        if worker is None:
            rec["skipped"] = "no running worker"
            return
        rec["labels"] = [worker.label]
        rec["start"] = time.time()
        await self.terminate(worker)
        rec["died"] = time.time()
        await trio.sleep(fault.duration)
        new = await self.spawn(worker.slot)
        rec["labels"].append(new.label)
        rec["end"] = time.time()

    async def fault_stop(self, fault: Fault, rec: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        worker = self.alive(fault.target)
        if worker is None:
            rec["skipped"] = "no running worker"
            return
        rng = random.Random(fault.id)
        pid = worker.proc.pid
        rec["labels"] = [worker.label]
        tries = 0
        while not _stop_parked(pid):
            tries += 1
            if tries == 500:
                rec["skipped"] = "never found parked in epoll_wait"
                return
            await trio.sleep(rng.uniform(0.001, 0.007))
        rec["tries"] = tries + 1
        rec["stop"] = time.time()
        await trio.sleep(fault.duration)
        os.kill(pid, signal.SIGCONT)
        rec["cont"] = rec["end"] = time.time()

    async def fault_resign(self, fault: Fault, rec: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        worker = self.alive(fault.target)
        if worker is None or worker.proc.stdin is None:
            rec["skipped"] = "no running worker"
            return
        rec["labels"] = [worker.label]
        await worker.proc.stdin.send_all(f"resign {fault.params['pick']}\n".encode())

    async def fault_twin(self, fault: Fault, rec: dict[str, Any]) -> None:
        assert fault.target is not None
        twin = await self.spawn(fault.target, twin=True)
        rec["labels"] = [twin.label]
        await trio.sleep(fault.duration)
        rec["term_at"] = time.time()
        await self.terminate(twin)
        rec["end"] = time.time()

    def _proxies(self, fault: Fault) -> list[FaultyProxy]:
        return self.proxies if fault.target is None else [self.proxies[fault.target]]

    async def fault_latency(self, fault: Fault, rec: dict[str, Any]) -> None:
        for proxy in self._proxies(fault):
            proxy.latency(fault.params["delay"])
        await trio.sleep(fault.duration)
        for proxy in self._proxies(fault):
            proxy.heal()

    async def fault_blackhole(self, fault: Fault, rec: dict[str, Any]) -> None:
        for proxy in self._proxies(fault):
            proxy.blackhole()
        await trio.sleep(fault.duration)
        for proxy in self._proxies(fault):
            proxy.heal()

    async def fault_refuse(self, fault: Fault, rec: dict[str, Any]) -> None:
        for proxy in self._proxies(fault):
            proxy.refuse()
        await trio.sleep(fault.duration)
        for proxy in self._proxies(fault):
            proxy.heal()

    async def fault_reset(self, fault: Fault, rec: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        rec["links"] = sum(proxy.reset() for proxy in self._proxies(fault))

    async def fault_terminate(self, fault: Fault, rec: dict[str, Any]) -> None:
        pg = self.pg
        assert pg is not None

        def run() -> int:
            rows = pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'trio-peers' "
                "AND backend_type = 'client backend' ORDER BY pid"
            )
            pids = [int(str(r[0])) for r in rows]
            k = math.ceil(fault.params["fraction"] * len(pids))
            chosen = random.Random(fault.params["pick"]).sample(pids, k)
            out = pg.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(p)) FROM unnest($1::int[]) p",
                chosen,
            )
            return int(str(out[0][0]))

        rec["terminated"] = await trio.to_thread.run_sync(run)

    async def fault_pg_restart(self, fault: Fault, rec: dict[str, Any]) -> None:
        pg = self.pg
        assert pg is not None
        await trio.to_thread.run_sync(lambda: pg.stop("immediate"))
        rec["down"] = time.time()
        await trio.sleep(fault.duration)
        await trio.to_thread.run_sync(pg.start_again)
        rec["end"] = time.time()

    # ------------------------------------------------------------ the run

    async def main(self) -> dict[str, Any]:
        a = self.args
        pg = self.pg = await trio.to_thread.run_sync(PostgresServer.start)
        info: dict[str, Any] = {"args": vars(a), "names": self.names, "pg_version": pg.version}
        try:
            dsn = await trio.to_thread.run_sync(lambda: pg.create_database("chaos"))
            await migrate(dsn)
            schedule = make_schedule(
                seed=a.seed,
                duration=a.duration,
                workers=a.workers,
                interval=a.interval,
                rate=a.rate,
                tail=a.tail,
            )
            info["schedule"] = [f.to_json() for f in schedule]
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for _ in range(a.workers):
                    proxy = FaultyProxy(pg.port)
                    await nursery.start(proxy.serve)
                    self.proxies.append(proxy)
                first = [await self.spawn(slot) for slot in range(a.workers)]
                for worker in first:
                    if not await self._wait_ready(worker):
                        raise RuntimeError(f"worker {worker.label} did not start; see its stderr")
                await trio.sleep(2 * a.interval)  # let every name get a leader
                t0 = trio.current_time()
                info["t0"] = time.time()
                print(
                    f"chaos: {len(schedule)} faults over {a.duration:.0f} s, seed {a.seed}, "
                    f"form {a.form}, {a.workers} workers x {len(self.names)} names",
                    flush=True,
                )
                async with trio.open_nursery() as faults:
                    for fault in schedule:
                        faults.start_soon(self.play, fault, t0)
                await trio.sleep_until(t0 + a.duration)
                for proxy in self.proxies:
                    proxy.heal()
                info["faults_end"] = time.time()
                self.finishing = True
                async with trio.open_nursery() as stopping:
                    for worker in self.workers:
                        if not worker.exited.is_set():
                            stopping.start_soon(self.terminate, worker)
                info["end"] = time.time()
                nursery.cancel_scope.cancel()
            rows = await trio.to_thread.run_sync(
                lambda: pg.execute(
                    "SELECT name, node, term, expires_at > now() FROM public.trio_peers "
                    "ORDER BY name",
                    database="chaos",
                )
            )
            info["final_table"] = [
                {"name": r[0], "node": r[1], "term": r[2], "live": r[3]} for r in rows
            ]
        finally:
            with trio.CancelScope(shield=True):
                for worker in self.workers:
                    if worker.proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.proc.pid, signal.SIGCONT)
                            worker.proc.kill()
                shutil.copyfile(pg.log_path, self.out / "postgres.log")
                await trio.to_thread.run_sync(pg.close)
        return info

    def write(self, info: dict[str, Any]) -> None:
        (self.out / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
        with (self.out / "faults.jsonl").open("w") as f:
            for rec in sorted(self.faults, key=lambda r: r["id"]):
                f.write(json.dumps(rec) + "\n")
        with (self.out / "processes.jsonl").open("w") as f:
            for worker in self.workers:
                f.write(json.dumps(worker.record()) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    p.add_argument("--workers", type=int, default=5, help="worker slots (processes)")
    p.add_argument("--names", type=int, default=20, help="names per worker (forms peers, session)")
    p.add_argument("--interval", type=float, default=1.0, help="the peers' interval")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument(
        "--form",
        choices=["single", "peers", "session"],
        default="peers",
        help="single: one open_peer per process; peers: --names open_peer per process; "
        "session: --names peers on one open_session per process",
    )
    p.add_argument("--rate", type=float, default=1.2, help="faults per second (mean)")
    p.add_argument("--tail", type=float, default=None, help="quiet seconds at the end")
    p.add_argument("--step", type=float, default=None, help="seconds between work steps")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: chaos-runs/...)")
    p.add_argument(
        "--pythonpath",
        action="append",
        default=[],
        help="put this first on the workers' PYTHONPATH (for a patched copy of trio_peers)",
    )
    p.add_argument("--no-check", action="store_true", help="do not run the checker")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    if args.tail is None:
        args.tail = 3 * args.interval
    if args.step is None:
        args.step = 0.02 if args.form == "single" else 0.05
    if args.workers < 1 or args.names < 1:
        p.error("--workers and --names must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or ROOT / "chaos-runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    print(f"chaos: seed {args.seed}; history in {out}", flush=True)
    runner = Runner(args, out)
    info: dict[str, Any] = {"args": vars(args)}
    try:
        info = trio.run(runner.main)
    finally:
        runner.write(info)
    if args.no_check:
        return 0
    from .check import main as check_main

    return check_main([str(out)])


if __name__ == "__main__":
    sys.exit(main())
