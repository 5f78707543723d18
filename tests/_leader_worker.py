"""A peer in its own OS process, running leader-only work that reports every step.

Usage: python -m tests._leader_worker DSN NODE INTERVAL

Prints one JSON object per line on stdout, with ``time.monotonic()`` timestamps
(CLOCK_MONOTONIC is system-wide on Linux, so the test process can compare them):
``ready``, ``start``, ``step``, ``stop`` (the work's cancellation arrived) and
``exit``. It exits on SIGTERM, leaving the election gracefully.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import trio

from trio_peers import PeerConfig, current_term, open_peer


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def work() -> None:
    term = current_term()
    emit("start", term=term)
    try:
        while True:
            emit("step", term=term)
            await trio.sleep(0.01)
    finally:
        emit("stop", term=term)


async def main(dsn: str, node: str, interval: float) -> None:
    config = PeerConfig(dsn=dsn, node=node, interval=interval)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with open_peer(config) as peer, trio.open_nursery() as nursery:
            nursery.start_soon(peer.run_while_leader, work)
            emit("ready", leader=peer.is_leader)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    emit("exit")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
