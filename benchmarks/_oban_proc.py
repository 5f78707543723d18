"""An oban-py leader-only instance in its own process, for benchmarks/bench.py.

    <oban venv>/bin/python benchmarks/_oban_proc.py DSN NODE

Runs in its own virtual environment (Python 3.12, ``oban==0.7.0`` from PyPI) and uses
only oban-py's public API: ``Oban.create_pool``, ``Oban(pool=..., leadership=True)``
with no queues (a minimal instance that takes part in leader election), ``start`` /
``stop``, ``is_leader``, and ``oban.telemetry.attach`` on the public
``oban.leader.election.stop`` event, which says when each election round has ended and
whether this node leads.

Same protocol as benchmarks/_tp_proc.py: commands ``join``, ``leave``, ``quit``;
events ``ready``, ``joined``, ``gained``, ``lost``, ``leaving``, ``left`` (``stop()``
returned), ``pool_closed`` and ``elect`` (one per election round), each stamped with
``time.monotonic()``. The connection pool lives for the whole process, as an
application's pool would: ``left`` is the moment ``Oban.stop()`` returns.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from oban import Oban, telemetry


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


class State:
    leader = False


def on_election(_name: str, meta: dict[str, Any]) -> None:
    leader = bool(meta.get("leader"))
    emit("elect", won=leader)
    if leader != State.leader:
        State.leader = leader
        emit("gained" if leader else "lost")


async def read_line(loop: asyncio.AbstractEventLoop) -> str:
    return await loop.run_in_executor(None, sys.stdin.readline)


async def main(dsn: str, node: str) -> None:
    loop = asyncio.get_running_loop()
    telemetry.attach("bench", ["oban.leader.election.stop"], on_election)
    pool = await Oban.create_pool(dsn)
    emit("ready")
    oban: Any = None
    try:
        while True:
            command = (await read_line(loop)).strip()
            if command == "join":
                oban = Oban(pool=pool, leadership=True, node=node)
                await oban.start()
                emit("joined", leader=oban.is_leader)
            elif command == "leave":
                emit("leaving")
                assert oban is not None
                await oban.stop()
                emit("left")
                if State.leader:
                    State.leader = False
                    emit("lost")
                oban = None
            elif command in ("quit", ""):
                break
    finally:
        if oban is not None:
            await oban.stop()
        await pool.close()
        emit("pool_closed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
