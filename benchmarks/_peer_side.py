"""What every Trio benchmark peer process shares: its event lines and its command loop.

A peer process (benchmarks/_tp_proc.py, _peer_proc.py, scaling.py's ``peer``) reads one
command per line on stdin: ``join`` starts the peer, ``leave`` makes it leave (reported as
``leaving``), ``quit`` or end of input ends the process. Events go to stdout as JSON lines
with ``time.monotonic()`` stamps (CLOCK_MONOTONIC, one clock for the whole host on Linux).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable

import trio


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def serve_commands(
    join: Callable[[trio.Nursery, trio.Event], Awaitable[object]],
    *,
    on_join: Callable[[], None] | None = None,
) -> None:
    """Run the command loop. On each ``join``, ``await join(nursery, leave)`` starts the
    peer in ``nursery`` (returning once it has joined); it leaves when ``leave`` is set."""
    lines = trio.wrap_file(sys.stdin)
    leave = trio.Event()
    async with trio.open_nursery() as nursery:
        while True:
            command = (await lines.readline()).strip()
            if command == "join":
                if on_join is not None:
                    on_join()
                leave = trio.Event()
                await join(nursery, leave)
            elif command == "leave":
                emit("leaving")
                leave.set()
            elif command in ("quit", ""):
                leave.set()
                return
