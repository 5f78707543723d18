"""Measure failover to a streaming standby, and what peers do across one today.

    python benchmarks/failover.py [promotion] [listen] [peers] [--rounds 5]

Starts its own servers (trio_peers.testing._replication.ReplicatedPair); the binaries are
chosen as for the tests (TRIO_PEERS_PG_NO_EMBEDDED=1 for the machine's PostgreSQL).

* promotion: how long ``pg_promote()`` takes, and how long after the promotion started a
  connect with a multi-host DSN ``[old primary, standby]`` first reaches a writable server:
  asyncpg's own multi-host connect, and trio-peers' (``connect_once``), with the old primary
  stopped (refusing connections) or frozen (SIGSTOP: it accepts and never answers).
* listen: what LISTEN connections see of a promotion.
* peers: two peers, A and B, with the DSN ``[primary, standby]`` across a failover:
  asynchronous replication with the last commits lost, synchronous replication, and the
  old primary restarted afterwards. Prints each peer's leadership changes and the library's
  log lines on one clock (seconds since the scenario started).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import asyncpg
import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_peers import BackendUnavailable, LeadershipChange, Peer, PeerConfig, open_peer
from trio_peers._asyncpg import connect_once
from trio_peers.testing._replication import ReplicatedPair, timeline

T = TypeVar("T")


def multihost(*ports: int, database: str = "postgres") -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


# ---------------------------------------------------------------- promotion


async def first_success(
    attempt: Callable[[], Awaitable[None]], t0: float, limit: float
) -> float | None:
    """Seconds after t0 at which ``attempt`` first succeeded (None: not within limit)."""
    with trio.move_on_after(limit):
        while True:
            try:
                await attempt()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            except BackendUnavailable:
                pass
            else:
                return time.monotonic() - t0
            await trio.sleep(0.005)
    return None


async def one_promotion(old_primary: str) -> tuple[float, float | None, float | None]:
    pair = await trio.to_thread.run_sync(ReplicatedPair.start)
    try:
        old, new = pair.primary, pair.standby
        dsn = multihost(old.port, new.port)
        await in_thread(lambda: old.execute("CREATE TABLE t (a int)"))
        await in_thread(pair.wait_replayed)
        if old_primary == "stopped":
            await in_thread(old.stop)
        else:
            await in_thread(old.freeze)

        async def native() -> None:
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn, timeout=1.0)
            await trio_asyncio.aio_as_trio(conn.close)()

        async def ours() -> None:
            async with connect_once(dsn, connect_timeout=1.0):
                pass

        results: dict[str, float | None] = {}
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            t0 = time.monotonic()

            async def run(name: str, attempt: Callable[[], Awaitable[None]]) -> None:
                results[name] = await first_success(attempt, t0, 6.0)

            nursery.start_soon(run, "native", native)
            nursery.start_soon(run, "ours", ours)
            took = await trio.to_thread.run_sync(pair.promote)
        return took, results["native"], results["ours"]
    finally:
        await in_thread(pair.close)


async def promotion(rounds: int) -> None:
    print("== promotion (pg_promote) and finding the new primary with [old, new] DSNs")
    for old_primary in ("stopped", "frozen"):
        rows = [await one_promotion(old_primary) for _ in range(rounds)]
        took = [r[0] for r in rows]
        print(
            f"old primary {old_primary}: pg_promote {fmt(took)}; first connect after the "
            f"promotion started: asyncpg {fmt([r[1] for r in rows])}, "
            f"trio-peers {fmt([r[2] for r in rows])}"
        )


def fmt(values: Sequence[float | None]) -> str:
    found = [v for v in values if v is not None]
    missing = len(values) - len(found)
    text = "never (6 s)" if not found else f"median {statistics.median(found) * 1000:.0f} ms"
    if found:
        text += f" (min {min(found) * 1000:.0f}, max {max(found) * 1000:.0f})"
    if found and missing:
        text += f", never in {missing} of {len(values)}"
    return text


# ---------------------------------------------------------------- listen


async def listen() -> None:
    print("== LISTEN connections across a promotion")
    with await trio.to_thread.run_sync(ReplicatedPair.start) as pair:
        old, new = pair.primary, pair.standby
        async with trio_asyncio.open_loop():
            aio = trio_asyncio.aio_as_trio
            on_old = await aio(asyncpg.connect)(old.dsn)
            on_new = await aio(asyncpg.connect)(new.dsn)
            lost = trio.Event()
            on_old.add_termination_listener(lambda _c: lost.set())
            await aio(on_old.add_listener)("ch", lambda *_a: None)
            try:
                await aio(on_new.add_listener)("ch", lambda *_a: None)
            except asyncpg.PostgresError as exc:
                print(f"LISTEN on the standby: {type(exc).__name__}: {exc}")
            await in_thread(old.freeze)
            took = await in_thread(pair.promote)
            print(f"promoted in {took * 1000:.0f} ms; old primary frozen")
            with trio.move_on_after(3):
                await lost.wait()
            print(
                f"LISTEN connection on the frozen old primary noticed within 3 s: {lost.is_set()}"
            )
            ro = await aio(on_new.fetchval)("SHOW transaction_read_only")
            print(
                f"session opened on the standby before promotion: alive, transaction_read_only={ro}"
            )
            await aio(on_new.add_listener)("ch", lambda *_a: None)
            print("... and LISTEN works on it now")
            t0 = time.monotonic()
            await in_thread(old.stop)
            with trio.move_on_after(5):
                await lost.wait()
            print(
                f"old primary stopped: its LISTEN connection noticed "
                f"{'after %.0f ms' % ((time.monotonic() - t0) * 1000) if lost.is_set() else 'not within 5 s'}"
            )
            await aio(on_new.close)()
            on_old.terminate()


# ---------------------------------------------------------------- peers


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.leading: dict[str, tuple[int | None, float]] = {}
        self.tenures: list[tuple[str, int | None, float, float]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, text: str) -> None:
        self.lines.append((self.now(), text))

    def change(self, node: str, change: LeadershipChange) -> None:
        state = f"LEADER term {change.term}" if change.is_leader else "follower"
        self.note(f"{node}: {state} (leadership channel)")

    def sample(self, node: str, leading: bool, term: int | None) -> None:
        """One sample of ``peer.is_leader`` / ``peer.term``: tenures come from these."""
        t = self.now()
        current = self.leading.get(node)
        if current is not None and (not leading or current[0] != term):
            self.tenures.append((node, current[0], current[1], t))
            del self.leading[node]
        if leading and node not in self.leading:
            self.leading[node] = (term, t)

    def report(self) -> None:
        for t, text in sorted(self.lines):
            print(f"  {t:7.3f}  {text}")
        tenures = self.tenures + [
            (n, term, s, self.now()) for n, (term, s) in self.leading.items()
        ]
        tenures.sort(key=lambda x: x[2])
        overlaps = [
            (a, b)
            for i, a in enumerate(tenures)
            for b in tenures[i + 1 :]
            if a[0] != b[0] and b[2] < a[3] and a[2] < b[3]
        ]
        terms = [t[1] for t in tenures]
        print(
            f"  tenures (node, term, from, to): {[(n, t, round(s, 3), round(e, 3)) for n, t, s, e in tenures]}"
        )
        print(
            f"  terms in order: {terms}; repeated: {sorted({t for t in terms if t is not None and terms.count(t) > 1})}"
        )
        for a, b in overlaps:
            print(
                f"  TWO LEADERS: {a[0]} term {a[1]} and {b[0]} term {b[1]} overlap for "
                f"{min(a[3], b[3]) - max(a[2], b[2]):.3f} s"
            )
        if not overlaps:
            print("  no overlapping tenures")


class LogToTimeline(logging.Handler):
    def __init__(self, tl: Timeline) -> None:
        super().__init__(logging.INFO)
        self.tl = tl

    def emit(self, record: logging.LogRecord) -> None:
        self.tl.note(f"log {record.levelname}: {record.getMessage()}")


async def run_peer(
    config: PeerConfig,
    tl: Timeline,
    *,
    task_status: trio.TaskStatus[tuple[Peer, trio.Event]],
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async with open_peer(config) as peer:

            async def watch() -> None:
                async for change in peer.leadership():
                    tl.change(config.node, change)

            async def sample() -> None:
                # Outside the peer's scope: it goes on sampling while the peer leaves.
                while True:
                    tl.sample(config.node, peer.is_leader, peer.term)
                    await trio.sleep(0.005)

            nursery.start_soon(watch)
            nursery.start_soon(sample)
            task_status.started((peer, stop))
            await stop.wait()
        tl.sample(config.node, peer.is_leader, peer.term)
        nursery.cancel_scope.cancel()
    tl.sample(config.node, False, None)


async def wait_for(predicate: Callable[[], bool], limit: float = 20) -> None:
    with trio.fail_after(limit):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


async def peers_scenario(mode: str, interval: float) -> None:
    synchronous = mode == "sync"
    title = {
        "async": "asynchronous replication, replication cut, then B takes term 2 (lost at promotion)",
        "sync": "synchronous replication, B takes term 2 (kept)",
    }[mode]
    print(f"== peers across a failover: {title}; interval {interval} s, connect_timeout 1 s")
    with await trio.to_thread.run_sync(
        lambda: ReplicatedPair.start(synchronous=synchronous)
    ) as pair:
        old, new = pair.primary, pair.standby
        database = str(await in_thread(old.create_database)).rpartition("/")[2]
        dsn = multihost(old.port, new.port, database=database)
        from trio_peers import migrate

        await migrate(dsn)
        tl = Timeline()
        handler = LogToTimeline(tl)
        logging.getLogger("trio_peers").addHandler(handler)
        logging.getLogger("trio_peers").setLevel(logging.INFO)
        try:

            def cfg(node: str) -> PeerConfig:
                return PeerConfig(dsn=dsn, node=node, interval=interval, connect_timeout=1.0)

            async with trio.open_nursery() as nursery:
                a, stop_a = await nursery.start(run_peer, cfg("A"), tl)
                await wait_for(lambda: a.is_leader)
                b, stop_b = await nursery.start(run_peer, cfg("B"), tl)
                await in_thread(pair.wait_replayed)
                if not synchronous:
                    await in_thread(pair.cut)
                    tl.note("replication cut")
                stop_a.set()  # A resigns; B takes term 2
                await wait_for(lambda: b.is_leader)
                a, stop_a = await nursery.start(run_peer, cfg("A"), tl)
                await trio.sleep(interval / 2)
                await in_thread(old.freeze)
                tl.note("old primary frozen")
                took = await in_thread(pair.promote)
                tl.note(
                    f"standby promoted ({took * 1000:.0f} ms), timeline {await in_thread(lambda: timeline(new))}"
                )
                await trio.sleep(4 * interval)
                rows = await in_thread(
                    lambda: new.execute("SELECT node, term FROM trio_peers", database=database)
                )
                tl.note(f"lease row on the new primary: {rows}")
                # The old primary comes back (writable, old timeline, first in the DSN).
                await in_thread(pair.restart_old_primary)
                tl.note("old primary restarted (a second writable server, listed first)")
                _c, stop_c = await nursery.start(run_peer, cfg("C"), tl)
                await trio.sleep(3 * interval)
                rows_old = await in_thread(
                    lambda: old.execute("SELECT node, term FROM trio_peers", database=database)
                )
                rows_new = await in_thread(
                    lambda: new.execute("SELECT node, term FROM trio_peers", database=database)
                )
                tl.note(f"lease rows: old primary {rows_old}, new primary {rows_new}")
                for stop in (stop_a, stop_b, stop_c):
                    stop.set()
        finally:
            logging.getLogger("trio_peers").removeHandler(handler)
        tl.report()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="*", default=["promotion", "listen", "peers"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    if "promotion" in args.what:
        await promotion(args.rounds)
    if "listen" in args.what:
        await listen()
    if "peers" in args.what:
        await peers_scenario("async", args.interval)
        await peers_scenario("sync", args.interval)


if __name__ == "__main__":
    trio.run(main)
