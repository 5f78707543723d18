"""A trio-peers peer in its own process, driven over stdin, for benchmarks/bench.py.

    python benchmarks/_tp_proc.py DSN NODE INTERVAL [--name NAME] [--trace]

Commands (one per line): ``join``, ``leave``, ``quit``. Events go to stdout as JSON
lines with ``time.monotonic()`` stamps (CLOCK_MONOTONIC, system-wide on Linux):
``joined`` (entry returned), ``gained`` / ``lost`` (leadership changes), ``leaving``
(the moment it starts to leave) and ``left`` (the ``async with`` has exited).

With ``--session`` the process opens one session at start and each ``join`` is a
``session.open_peer`` block on it: leaving then releases the name but keeps the
connection, as oban-py's ``Oban.stop()`` keeps the application's pool.

With ``--trace`` the default backend is wrapped (through the public
``PeerBackend`` protocol) so that each election, release and close is reported as
``elect`` / ``release`` / ``close`` with its start and end stamps: the herd uses it
to see when each follower's reaction has finished, the profile to split the exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # For benchmarks._peer_side; appended, so that the trio_peers on PYTHONPATH or
    # installed (a variant, or the benchmark's venv) is the one imported.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._peer_side import emit, serve_commands
from trio_peers import (
    AsyncpgBackend,
    BackendConnection,
    BackendConnector,
    ElectionOutcome,
    LeaderInfo,
    Peer,
    PeerBackend,
    PeerConfig,
    PeerSession,
    open_peer,
    open_session,
)


class _TracedConnection:
    def __init__(self, inner: BackendConnection) -> None:
        self._inner = inner

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        t0 = time.monotonic()
        out = await self._inner.elect(
            node=node, held_term=held_term, statement_timeout=statement_timeout
        )
        emit("elect", t0=t0, won=out.term is not None)
        return out

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        t0 = time.monotonic()
        out = await self._inner.release(
            node=node, term=term, sender=sender, statement_timeout=statement_timeout
        )
        emit("release", t0=t0)
        return out

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        return await self._inner.get_leader(statement_timeout=statement_timeout)

    async def aclose(self) -> None:
        t0 = time.monotonic()
        await self._inner.aclose()
        emit("close", t0=t0)

    def abort(self) -> None:
        t0 = time.monotonic()
        self._inner.abort()
        emit("close", t0=t0, aborted=True)


class _TracedConnector:
    def __init__(self, inner: BackendConnector) -> None:
        self._inner = inner

    async def connect(
        self, *, on_notification: Callable[[str], None], on_lost: Callable[[], None]
    ) -> BackendConnection:
        def noted(payload: str) -> None:
            emit("notified")
            on_notification(payload)

        conn = await self._inner.connect(on_notification=noted, on_lost=on_lost)
        return _TracedConnection(conn)


class TracedBackend:
    """The default backend with every statement's timing written to stdout."""

    def __init__(self) -> None:
        self._inner: PeerBackend = AsyncpgBackend()

    @asynccontextmanager
    async def _open(self, config: PeerConfig) -> AsyncIterator[BackendConnector]:
        try:
            async with self._inner.open(config) as connector:
                yield _TracedConnector(connector)
        finally:
            # (Also when the session ends its backend's block by cancelling it.)
            emit("backend_closed")

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        return self._open(config)


async def watch(peer: Any) -> None:
    async for change in peer.leadership():
        emit("gained" if change.is_leader else "lost", term=change.term)


async def main(args: argparse.Namespace) -> None:
    kwargs: dict[str, Any] = {"dsn": args.dsn, "node": args.node, "name": args.name}
    if args.interval > 0:
        kwargs["interval"] = args.interval
    config = PeerConfig(**kwargs)
    backend: PeerBackend | None = TracedBackend() if args.trace else None
    async with AsyncExitStack() as stack:
        session = None
        if args.session:
            session = await stack.enter_async_context(open_session(args.dsn, node=args.node))
        emit("ready")
        await serve_commands(
            lambda nursery, leave: nursery.start(run_peer, config, backend, session, leave)
        )


async def run_peer(
    config: PeerConfig,
    backend: PeerBackend | None,
    session: PeerSession | None,
    leave: trio.Event,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    cm: AbstractAsyncContextManager[Peer]
    if session is None:
        cm = open_peer(config, backend=backend)
    else:
        cm = session.open_peer(name=config.name, interval=config.interval)
    async with trio.open_nursery() as nursery:
        async with cm as peer:
            nursery.start_soon(watch, peer)
            emit("joined", leader=peer.is_leader)
            task_status.started()
            await leave.wait()
        emit("left")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("node")
    parser.add_argument("interval", type=float, help="0: the library's default")
    parser.add_argument("--name", default="bench")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--session",
        action="store_true",
        help="join and leave with session.open_peer on one session that stays open",
    )
    trio.run(main, parser.parse_args())
