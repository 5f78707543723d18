"""A peer in its own process, driven over stdin, for benchmarks/handover.py.

Commands (one per line): ``join``, ``leave``, ``quit``. Events go to stdout as
JSON lines with ``time.monotonic()`` stamps (system-wide on Linux):
``joined`` (entry returned), ``gained`` / ``lost`` (leadership changes) and
``leaving`` (the moment it starts to leave).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # For benchmarks._peer_side; appended, so that the trio_peers on PYTHONPATH or
    # installed (a variant, or the benchmark's venv) is the one imported.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._peer_side import emit, serve_commands
from trio_peers import PeerConfig, open_peer


async def watch(peer: object) -> None:
    async for change in peer.leadership():  # type: ignore[attr-defined]
        emit("gained" if change.is_leader else "lost", term=change.term)


async def main(dsn: str, node: str, interval: float) -> None:
    config = PeerConfig(dsn=dsn, node=node, interval=interval)
    await serve_commands(lambda nursery, leave: nursery.start(run_peer, config, leave))


async def run_peer(
    config: PeerConfig, leave: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    async with trio.open_nursery() as nursery:
        async with open_peer(config) as peer:
            nursery.start_soon(watch, peer)
            emit("joined", leader=peer.is_leader)
            task_status.started()
            await leave.wait()
    emit("left")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
