"""One peer process of ``trio-peers demo``: ``python -m trio_peers._cli._demo_peer``.

It joins the election with :func:`trio_peers.open_peer` and reports on stdout,
one JSON object per line:

* ``{"e": "change", "leader": bool, "term": int|null, "t": float, "version": int}``
  for each state of :meth:`Peer.leadership <trio_peers.Peer.leadership>`;
* ``{"e": "ready", "pid": int, "node": str, "leader": bool, "t": float}`` once
  the peer has joined;
* ``{"e": "stopping", "why": str, "t": float}`` when it is told to stop;
* ``{"e": "log", "level": str, "msg": str}`` for the library's warnings and errors;
* ``{"e": "error", "msg": str}`` if it cannot run (then it exits with status 4).

``t`` is :func:`time.perf_counter` at the moment the state was published. It
reads the system-wide monotonic clock (``CLOCK_MONOTONIC`` on Linux), so times
reported by different processes on one machine can be compared.

The DSN comes from ``TRIO_PEERS_DSN`` (not argv: it may hold a password).
SIGTERM or SIGINT, or EOF on stdin (the demo died), make the peer leave the
election cleanly: ``open_peer``'s exit releases a lease it holds and NOTIFYs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

import trio

from .._cell import LeadershipChannel
from .._config import PeerConfig
from .._exceptions import PeerError
from .._session import open_peer

EXIT_CANNOT_RUN: Final = 4


def emit(event: str, **fields: object) -> None:
    """Write one JSON line to stdout; never raise (the reader may be gone)."""
    line = json.dumps({"e": event, **fields}, separators=(",", ":")) + "\n"
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def to_perf_counter(trio_time: float) -> float:
    """Convert a :func:`trio.current_time` reading to :func:`time.perf_counter`'s clock."""
    return trio_time + (time.perf_counter() - trio.current_time())


class _JSONLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # pragma: no cover - a malformed log call in a library
            message = str(record.msg)
        emit("log", level=record.levelname.lower(), msg=message)


async def _report(channel: LeadershipChannel) -> None:
    async with channel:
        async for change in channel:
            emit(
                "change",
                leader=change.is_leader,
                term=change.term,
                t=to_perf_counter(change.at),
                version=change.version,
            )


async def _stop_when_told(
    stop: trio.CancelScope,
    signals: AsyncIterator[int],
) -> None:
    """Cancel ``stop`` at the first signal, or when stdin reaches EOF."""

    async def on_signal(done: trio.CancelScope) -> None:
        async for signum in signals:
            emit("stopping", why=signal.Signals(signum).name, t=time.perf_counter())
            done.cancel()
            return

    async def on_eof(done: trio.CancelScope) -> None:
        try:
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        except (OSError, ValueError):  # pragma: no cover - no usable stdin
            await trio.sleep_forever()
        async with stdin:
            while await stdin.receive_some():
                pass
        emit("stopping", why="EOF on stdin", t=time.perf_counter())
        done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal, nursery.cancel_scope)
        nursery.start_soon(on_eof, nursery.cancel_scope)
    stop.cancel()


async def run_peer(config: PeerConfig) -> int:
    """Join the election until told to stop; return the exit status."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            stop = trio.CancelScope()
            nursery.start_soon(_stop_when_told, stop, signals)
            try:
                with stop:
                    async with open_peer(config) as peer:
                        # The reporter lives outside open_peer, so it still sees the final
                        # is_leader=False state that closing the peer publishes.
                        nursery.start_soon(_report, peer.leadership())
                        emit(
                            "ready",
                            pid=os.getpid(),
                            node=peer.node,
                            leader=peer.is_leader,
                            t=time.perf_counter(),
                        )
                        await trio.sleep_forever()
            except PeerError as exc:
                emit("error", msg=f"{type(exc).__name__}: {exc}")
                nursery.cancel_scope.cancel()
                return EXIT_CANNOT_RUN
            # Told to stop: the reporter drains the last states and ends by itself.
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a demo peer process."""
    parser = argparse.ArgumentParser(prog="python -m trio_peers._cli._demo_peer")
    parser.add_argument("--name", required=True)
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)
    dsn = os.environ.get("TRIO_PEERS_DSN", "")
    logger = logging.getLogger("trio_peers")
    logger.addHandler(_JSONLogHandler(logging.WARNING))
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        config = PeerConfig(dsn=dsn, name=args.name, interval=args.interval)
    except (TypeError, ValueError) as exc:
        emit("error", msg=str(exc))
        return EXIT_CANNOT_RUN
    status = trio.run(run_peer, config)
    # Done: a late SIGTERM (or Ctrl-C) must not turn a clean exit into a killed one.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(main())
