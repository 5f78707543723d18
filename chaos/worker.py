"""One chaos worker process: peers for K names, each with logged leader-only work.

Usage: ``python -m chaos.worker --dsn DSN --node NODE --slot W --label P --names n0,n1
--interval I --step S --log FILE [--form peers|session]``

Every record is one JSON line, written with a single ``write(2)`` to ``FILE``
(opened ``O_APPEND``), so a SIGKILL loses nothing already logged. Fields:
``ev`` (event), ``t`` (wall time, ``time.time()``: CLOCK_REALTIME, comparable
across the processes of one machine), ``m`` (``time.monotonic()``), ``p``
(process label) and, where it applies, ``name``, ``term``, ``run`` (one run of
the work: a number unique in this process), ``lead`` (``peer.is_leader`` read
synchronously just before the step) and ``tf`` (seconds of trust left, from
``peer.statistics()``, read just after ``lead``).

Events: ``ready``; ``start``/``step``/``stop`` of leader-only work (``stop`` is
logged when the work's cancellation arrives); ``resign``; ``exit`` (clean exit
after SIGTERM); ``error`` (anything else that ended the process).

Commands on stdin, one per line: ``resign N`` makes the peer of the
``N mod L``-th of the L names this process leads resign.

Forms: ``peers`` runs one :func:`trio_peers.open_peer` per name in this
process (``--names n0`` is the single-peer form); ``session`` runs every name
on one :func:`trio_peers.open_session` (one connection, batched statements).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

import trio_peers
from trio_peers import Peer, PeerConfig, current_term, open_peer


def now() -> tuple[float, float]:
    return time.time(), time.monotonic()


class Log:
    """JSON lines, one ``write(2)`` each, on an ``O_APPEND`` file descriptor."""

    def __init__(self, path: str, label: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._label = label

    def __call__(self, ev: str, *, at: tuple[float, float] | None = None, **fields: Any) -> None:
        t, m = at if at is not None else now()
        record = {"ev": ev, "t": t, "m": m, "p": self._label, **fields}
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


async def _hold_peer(
    config: PeerConfig, stop: trio.Event, *, task_status: trio.TaskStatus[Peer]
) -> None:
    async with open_peer(config) as peer:
        task_status.started(peer)
        await stop.wait()


@asynccontextmanager
async def open_members(form: str, configs: Sequence[PeerConfig]) -> AsyncIterator[list[Peer]]:
    """The peers of this process, one per config, in the given form.

    Each peer of the ``peers`` form lives in a task of its own, so that on exit they
    all leave at once: one after the other, K peers whose database is unreachable
    would take K times ``cleanup_timeout`` to exit.
    """
    if form == "peers":
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            peers = [await nursery.start(_hold_peer, c, stop) for c in configs]
            try:
                yield peers
            finally:
                stop.set()
        return
    if form == "session":
        # One session (one connection) for every name; the peers open and leave together.
        first = configs[0]
        async with (
            trio_peers.open_session(
                first.dsn,
                node=first.node,
                connect_timeout=first.connect_timeout,
                cleanup_timeout=first.cleanup_timeout,
            ) as session,
            session.open_peers([c.name for c in configs], interval=first.interval) as by_name,
        ):
            yield [by_name[c.name] for c in configs]
        return
    raise ValueError(f"unknown form {form!r}")


async def leader_work(peer: Peer, log: Log, step: float, runs: list[int]) -> None:
    """Leader-only work: log a step every ``step`` seconds until cancelled."""
    # Each record's time is read *before* is_leader: no checkpoint separates the two,
    # so no task can change the peer's trust in between, and a trusted reading means
    # the peer trusted its tenure at the recorded instant, however late the OS lets
    # this process write the line.
    at = now()
    runs[0] += 1
    run = runs[0]
    term = current_term()
    log("start", at=at, name=peer.name, term=term, run=run)
    try:
        while True:
            at = now()
            lead = peer.is_leader  # read synchronously, just before the step
            stats = peer.statistics()
            log("step", at=at, name=peer.name, term=term, run=run, lead=lead, tf=stats.trusted_for)
            await trio.sleep(step)
    finally:
        log("stop", name=peer.name, term=term, run=run)


async def commands(peers: list[Peer], log: Log) -> None:
    """Read commands from stdin (see the module docstring)."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                await trio.sleep_forever()  # the runner closed our stdin; keep going
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode().split()
                if len(words) == 2 and words[0] == "resign":
                    leading = [p for p in peers if p.is_leader]
                    if not leading:
                        log("resign", name=None, term=None)
                        continue
                    peer = leading[int(words[1]) % len(leading)]
                    term = peer.term
                    released = await peer.resign()
                    log("resign", name=peer.name, term=term, released=released)


async def main(args: argparse.Namespace) -> None:
    log = Log(args.log, args.label)
    names = args.names.split(",")
    configs = [
        PeerConfig(
            dsn=args.dsn,
            name=name,
            node=args.node,
            interval=args.interval,
            cleanup_timeout=args.cleanup_timeout,
            connect_timeout=args.interval,
        )
        for name in names
    ]
    runs = [0]
    try:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with open_members(args.form, configs) as peers, trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(
                        peer.run_while_leader, leader_work, peer, log, args.step, runs
                    )
                nursery.start_soon(commands, peers, log)
                log(
                    "ready",
                    pid=os.getpid(),
                    node=args.node,
                    slot=args.slot,
                    names=names,
                    lib=trio_peers.__file__,
                )
                async for _ in signals:
                    log("sigterm")
                    nursery.cancel_scope.cancel()
                    break
    except BaseException as exc:
        log("error", error="".join(traceback.format_exception(exc))[-4000:])
        raise
    log("exit")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos.worker")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--names", required=True, help="comma-separated names")
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--step", type=float, default=0.02)
    parser.add_argument("--cleanup-timeout", type=float, default=2.0)
    parser.add_argument("--form", choices=["peers", "session"], default="peers")
    parser.add_argument("--log", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(created).6f %(levelname)s %(message)s")
    trio.run(main, parse())
