"""The Trio shell of one name: `Peer`, its rounds, its leadership and its shutdown.

A peer owns what is its name's: the election core (:mod:`trio_peers._core` decides, the
peer runs statements, sleeps and publishes), the leadership cell, the leader-only work
(:mod:`trio_peers._leader_work`), the event hook and the logging of its faults. Its
*main task* (:meth:`Peer._serve`) runs the election loop, one round at a time, sleeping
until the core's next round (or an earlier wake-up), then the peer's stop.

Everything a peer shares is its session's (:mod:`trio_peers._session`), also for
:func:`~trio_peers.open_peer`, which runs a private session of one name: the connection
(the peer sends its statements through a per-name :class:`NameConnector`), the NOTIFY
listener (which calls :meth:`Peer._handle_down` for this name's releases), and the
watchdog (which calls :meth:`Peer._watch_fired` the instant the trust deadline passes,
even while a renewal hangs).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeVarTuple, Unpack, final

import attrs
import trio

from ._backend import LeaderInfo
from ._cell import LeadershipCell, LeadershipChannel
from ._config import PeerConfig
from ._core import (
    Change,
    Down,
    ElectionCore,
    ElectionOutcome,
    FailureCause,
    longer_lease_seen,
)
from ._events import (
    EventHook,
    NotificationKind,
    RoundOutcome,
)
from ._exceptions import (
    BackendMisconfigured,
    BackendUnavailable,
    PeerError,
    SchemaError,
    ServerBehind,
    TableMissing,
    TenureLost,
)
from ._fence import Fence, make_fence
from ._leader_work import LeaderScope, LeaderWork
from ._report import PeerReporter
from ._sql import Statements
from ._util import NoPublicConstructor, SharedLog, raise_after_body

if TYPE_CHECKING:
    import asyncpg

log: Final = logging.getLogger("trio_peers")


class NameConnection(Protocol):
    """A peer's statements, sent in its session's batches (the peer never closes the
    session's connection: it detaches with :meth:`abort`)."""

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        """One election round of this name (:meth:`BackendConnection.elect`)."""
        ...

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        """Release tenure ``term`` of this name (:meth:`BackendConnection.release`)."""
        ...

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        """The unexpired lease of this name, if any."""
        ...

    def abort(self) -> None:
        """Detach from the session's connection. Sync; idempotent."""
        ...


class NameConnector(Protocol):
    """What a peer needs of its session: a connection for its name's statements (a
    session's per-name member, which sends them in the session's batches)."""

    async def connect(self, *, on_lost: Callable[[], None]) -> NameConnection:
        """Attach to the session's connection (connecting it if need be). ``on_lost()``
        is called (sync, never raising) if that connection drops while attached."""
        ...


PosArgsT = TypeVarTuple("PosArgsT")

#: Extra seconds the Trio-side guard adds to a statement's own timeout.
_GUARD_SLACK: Final = 0.5
#: get_leader() runs its statement only with at least this much time before the next round.
_GET_LEADER_MIN_ROOM: Final = 0.002


@final
@attrs.frozen(kw_only=True)
class PeerStatistics:
    """A snapshot of a peer's state and counters, from :meth:`Peer.statistics`.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """This peer's node id."""
    is_leader: bool
    """Whether the peer leads (trusts a tenure) now."""
    term: int | None
    """The trusted tenure's term, else ``None``."""
    trusted_for: float | None
    """Seconds of local trust left while leading, else ``None``."""
    connected: bool
    """Whether the peer has a live database connection."""
    elections_run: int
    """Rounds started (each one statement)."""
    elections_failed: int
    """Rounds that failed (error, timeout, lost connection)."""
    elections_busy: int
    """Rounds that found the lease row locked by another transaction and changed
    nothing (a leader keeps its trust deadline meanwhile; see :doc:`/protocol`)."""
    tenures_gained: int
    """Times this peer took a new tenure."""
    notifications_received: int
    """NOTIFY payloads received on the channel."""
    notifications_ignored: int
    """Payloads ignored: our own, other names, malformed."""
    connects: int
    """Connections opened (the first plus reconnects)."""
    last_error: str | None
    """The most recent error, as text, or ``None``."""
    leader_work_running: int
    """Leader-only work scopes currently active."""


@attrs.define
class _Counters:
    elections_run: int = 0
    elections_failed: int = 0
    elections_busy: int = 0
    tenures_gained: int = 0
    notifications_received: int = 0
    notifications_ignored: int = 0
    connects: int = 0


@final
@attrs.define(eq=False)
class _Resignation:
    """One resign() call: its release runs in the peer's nursery, whoever waits for it."""

    done: trio.Event = attrs.Factory(trio.Event)
    released: bool = False


@final
class Peer(metaclass=NoPublicConstructor):
    """A member of a leader election. Get one from :func:`open_peer`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        config: PeerConfig,
        on_event: EventHook | None = None,
        *,
        sender: str | None = None,
        queue_wait: float = 0.0,
        aligner: Callable[[float, float], float] | None = None,
        timer: Callable[[float], None] | None = None,
        watch: Callable[[float], None],
        shared_log: SharedLog | None = None,
    ) -> None:
        now = trio.current_time()
        self._config = config
        self._core = ElectionCore(
            interval=config.interval,
            leader_boost=config.leader_boost,
            trust_margin=config.trust_margin,
            statement_timeout=config.effective_statement_timeout,
            max_clock_drift=config.max_clock_drift,
            queue_wait=queue_wait,
        )
        self._queue_wait = queue_wait
        self._aligner = aligner
        self._timer = timer
        self._cell = LeadershipCell(config.name, config.node, now)
        self._statements = Statements(config.prefix, config.table)
        self._sender = sender if sender is not None else secrets.token_hex(8)
        self._connector: NameConnector | None = None
        self._conn: NameConnection | None = None
        self._conn_gen = 0
        # A semaphore, not a Lock: a shared session's task takes it for an inline round
        # and its report releases it (a Lock belongs to the task that took it). Fair.
        self._conn_lock = trio.Semaphore(1, max_value=1)
        self._parked = False
        self._resched = trio.Event()
        self._loop_scope = trio.CancelScope()
        self._serve_scope = trio.CancelScope()  # shielded once entered (see _serve)
        # The session's one watchdog calls _watch_fired at the trust deadline it is given
        # (rather than a task and a cancel scope per name).
        self._watch = watch
        self._watching = math.inf
        self._report = PeerReporter(
            config.name,
            config.node,
            (config.prefix, config.table),
            on_event,
            shared_log if shared_log is not None else SharedLog(),
        )
        self._loop_done = trio.Event()
        self._work = LeaderWork(config.name, config.node, config.cleanup_timeout)
        self._counters = _Counters()
        self._closing = False
        self._served = trio.Event()
        self._stop_started = False
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._stop_wanted = False  # see _request_stop
        self._report_entry: Callable[[], None] | None = None  # the task status's started()
        self._round_finished: trio.Event | None = None  # made by a waiter (get_leader)

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> PeerConfig:
        """The configuration this peer runs with."""
        return self._config

    @property
    def name(self) -> str:
        """The instance name."""
        return self._config.name

    @property
    def node(self) -> str:
        """This process's unique owner id."""
        return self._config.node

    @property
    def is_leader(self) -> bool:
        """Whether this peer leads now. Sync, never blocks, never stale.

        Reads the local trust deadline on every access: a process that was paused,
        or whose renewal hangs, reports ``False`` before any other peer can take
        the lease.
        """
        return self._core.is_leader(trio.current_time())

    @property
    def term(self) -> int | None:
        """The fencing token of the current tenure while leader, else ``None``."""
        return self._core.term(trio.current_time())

    async def wait_leader(self) -> int:
        """Return once this peer leads; returns the term. Checkpoints even if already leader.

        Raises:
          trio.ClosedResourceError: if the peer closes first.
        """
        return await self._wait_tenure(other_than=None)

    async def _wait_tenure(self, *, other_than: int | None) -> int:
        """Wait until this peer trusts a tenure whose term is not ``other_than``."""
        await trio.lowlevel.checkpoint()
        while True:
            if self._closing:
                raise trio.ClosedResourceError("the peer closed")
            term = self.term
            if term is not None and term != other_than:
                return term
            await self._cell.wait_newer(self._cell.value.version)

    async def wait_follower(self) -> None:
        """Return once this peer does not lead (at once, after a checkpoint, if so)."""
        await trio.lowlevel.checkpoint()
        while self.is_leader:
            await self._cell.wait_newer(self._cell.value.version)

    def leadership(self) -> LeadershipChannel:
        """A new, independent receive channel of this peer's leadership changes.

        The first item is the current state, delivered at once. Then each change:
        a slow consumer receives the latest state (``version`` and ``term`` show
        what it skipped) and never holds up the election. When the peer closes,
        a leader's channels get a final ``is_leader=False`` item, then end.
        """
        return self._cell.open_channel()

    def request_election(self) -> bool:
        """Run an election round soon, as a NOTIFY would. Sync; never blocks.

        Returns True if a round will run soon, False if the request was ignored: the
        peer leads already, is closing, or resigned less than a ``resign_hold`` ago
        (a resigned peer lets every follower bid first, so it ignores requests
        meanwhile, as it ignores stale notifications).
        """
        if not self._closing and self._core.notified_down(trio.current_time()):
            self._resched.set()
            return True
        return False

    async def get_leader(self) -> LeaderInfo | None:
        """Who leads this peer's name now, per the database, or ``None``.

        Uses this peer's connection, between its election rounds: a renewal never
        waits behind it (a statement that would still run when the next round is
        due is cut short and tried again after that round). Bounded by
        ``statement_timeout`` in all, including any wait for a round in flight or
        for a connection. A failure of this query leaves the peer's leadership alone,
        and its connection too unless the failure broke it (then the next round
        reconnects).

        Raises:
          BackendUnavailable: the database cannot be reached, or did not answer in time.
          trio.ClosedResourceError: the peer is closed.
        """
        await trio.lowlevel.checkpoint()
        limit = self._config.effective_statement_timeout
        deadline = trio.current_time() + limit
        with trio.move_on_at(deadline):
            while True:
                if self._closing:
                    raise trio.ClosedResourceError("the peer is closed")
                finished = self._round_event()
                async with self._conn_lock:
                    if self._closing:
                        raise trio.ClosedResourceError("the peer is closed")
                    # The room before the next round, taken before any connect wait.
                    room_ends = min(deadline, self._core.next_round_at)
                    if room_ends - trio.current_time() >= _GET_LEADER_MIN_ROOM:
                        conn = await self._ensure_connection()
                        with trio.move_on_at(room_ends):
                            try:
                                return await conn.get_leader(
                                    statement_timeout=deadline - trio.current_time()
                                )
                            except TimeoutError as exc:
                                raise BackendUnavailable("get_leader timed out") from exc
                # A round is due: let it run, then try again.
                self._resched.set()
                await finished.wait()
        raise BackendUnavailable(f"get_leader did not finish within {limit:g}s")

    async def resign(self) -> bool:
        """Give up leadership now, if leading, so another peer can take over.

        This peer becomes follower at once and its leader-only work is cancelled;
        once that work has finished, the peer releases the lease and sends NOTIFY.
        It bids again only after slightly more than one ``interval`` (every
        follower's next round comes first, so another live peer takes over even
        without notifications). Returns True if a lease was released.

        The release runs in the peer's own task: if the caller's deadline expires
        first, :exc:`trio.Cancelled` reaches the caller and the release still
        completes (bounded by ``cleanup_timeout``).

        Called from inside leader-only work (:meth:`run_while_leader` work or a
        :meth:`leader_scope` block), it cancels that very work, so it does not
        return: it raises the work's :exc:`trio.Cancelled`, which the work's scope
        absorbs at its end, and the lease is released the moment that scope exits.
        """
        await trio.lowlevel.checkpoint()
        if self._closing:
            return False
        resignation = self._begin_resign()
        if resignation is None:
            return False
        await resignation.done.wait()
        return resignation.released

    def fence(self) -> Fence:
        """The fencing statement of the current tenure. Sync; builds text, no I/O.

        Run it inside the transaction of a leader-only write, on any connection to the lease
        table's database (see :class:`~trio_peers.Fence`): while that transaction is open no
        other tenure can begin, and a fence of an ended tenure returns no row. The writer's
        role needs ``SELECT`` and ``UPDATE`` on the lease table (row locks need ``UPDATE``).

        Raises:
          TenureLost: this peer does not lead now.
        """
        term = self.term
        if term is None:
            raise TenureLost(f"{self.node} does not lead {self.name!r}: nothing to fence")
        return make_fence(self._statements, name=self.name, node=self.node, term=term)

    def fenced_transaction(
        self, conn: asyncpg.Connection, *, fence: Fence | None = None
    ) -> AbstractAsyncContextManager[Fence]:
        """A transaction on your asyncpg connection whose writes commit only within this tenure.

        ``async with peer.fenced_transaction(conn) as fence:`` begins a transaction on
        ``conn`` (an asyncpg connection of your own trio-asyncio loop), runs :meth:`fence`
        (or the ``fence`` given), and raises :exc:`~trio_peers.TenureLost` after rolling
        back if another tenure began. The block's statements then run in that transaction;
        it commits when the block ends, and rolls back if the block raises or is cancelled
        (shielded, bounded by ``cleanup_timeout``), also when the cancellation comes at the
        COMMIT itself (one that comes while the COMMIT is at the server may find it done).
        The transaction is never left open. Keep it short compared with
        ``interval / leader_boost``: while it is open, this leader cannot renew either.

        Raises:
          TenureLost: this peer does not lead, or the fence found another tenure.
        """
        from ._asyncpg import fenced_transaction

        return fenced_transaction(
            conn,
            fence if fence is not None else self.fence(),
            cleanup_timeout=self._config.cleanup_timeout,
        )

    def statistics(self) -> PeerStatistics:
        """A frozen snapshot of this peer's state and counters. Sync."""
        now = trio.current_time()
        c = self._counters
        leader = self._core.is_leader(now)
        return PeerStatistics(
            name=self.name,
            node=self.node,
            is_leader=leader,
            term=self._core.term(now),
            trusted_for=self._core.trusted_until - now if leader else None,
            connected=self._conn is not None,
            elections_run=c.elections_run,
            elections_failed=c.elections_failed,
            elections_busy=c.elections_busy,
            tenures_gained=c.tenures_gained,
            notifications_received=c.notifications_received,
            notifications_ignored=c.notifications_ignored,
            connects=c.connects,
            last_error=self._report.last_error,
            leader_work_running=len(self._work.scopes),
        )

    # ------------------------------------------------------------------ leader-only work

    @asynccontextmanager
    async def leader_scope(self) -> AsyncIterator[LeaderScope]:
        """Wait until this peer leads, then run the block in a scope bound to that tenure.

        ``async with peer.leader_scope() as scope:``

        The block is cancelled as soon as the tenure ends for any reason (lost
        renewal, local trust deadline passed, resign, peer closing): the scope's
        deadline *is* the local trust deadline, moved forward by each renewal,
        so a process paused past it is cancelled before its work takes another
        step. The cancellation is absorbed at the end of the block; check
        ``scope.lost``. The peer waits for the block to finish (up to
        ``cleanup_timeout``) before it releases the lease. The block may call
        :meth:`resign`: that cancels the block, and the release follows its end.

        Raises:
          trio.ClosedResourceError: if the peer closes before it leads.
        """
        term = await self.wait_leader()
        with self._tenure_scope(term, "a Peer.leader_scope() block") as scope:
            yield scope

    def _tenure_scope(self, term: int, owner: str) -> AbstractContextManager[LeaderScope]:
        # No checkpoint between wait_leader() returning and the scope being bound.
        return self._work.tenure_scope(term, owner, self._core.trusted_until, self._wound_down)

    def _wound_down(self) -> None:
        if not self._closing and self._core.wind_down_ended(trio.current_time()):
            self._resched.set()  # bids were held while that work wound down

    async def run_while_leader(
        self,
        async_fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        *args: *PosArgsT,
        on_error: Literal["raise", "resign_and_retry"] = "raise",
    ) -> None:
        """Run ``async_fn(*args)`` during each of this peer's tenures; cancel it when one ends.

        Each time this peer becomes leader, the work starts in a cancel scope
        whose deadline is the local trust deadline; it is cancelled the moment
        leadership ends, and awaited before the peer releases its lease or bids
        again. :func:`current_term` gives the work its tenure's fencing term.
        If the work returns while still leading, it is not restarted until the
        next tenure.

        Errors raised by the work: with ``on_error="raise"`` (default), the peer
        resigns (so another node takes over) and the exception propagates out of
        this call. With ``"resign_and_retry"``, it is logged, the peer resigns,
        and the work runs again at this peer's next tenure.

        Returns ``None`` when the peer closes; raises if the caller is cancelled.
        """
        finished: int | None = None  # the term in which the work returned
        while True:
            try:
                # Work that returned is not restarted in the same tenure, even when the
                # peer resumes that tenure after a connection blip: only a newer term.
                term = await self._wait_tenure(other_than=finished)
            except trio.ClosedResourceError:
                await trio.lowlevel.checkpoint()
                return
            returned = False
            try:
                with self._tenure_scope(term, _fn_name(async_fn)):
                    await async_fn(*args)
                    returned = True
            except Exception as exc:
                # Outside the tenure scope, which has absorbed its own Cancelled: what
                # is left is the work's failure, also when it failed while being
                # cancelled (e.g. a child task raising in its cleanup; then a group).
                failed: Exception = exc
            else:
                if returned:
                    finished = term
                continue
            log.error(
                "trio-peers %s: leader-only work %s failed (term %d); resigning",
                self.name,
                _fn_name(async_fn),
                term,
                exc_info=failed,
            )
            await self.resign()
            if on_error == "raise":
                raise failed

    # ------------------------------------------------------------------ internals

    def _begin_resign(self) -> _Resignation | None:
        """The sync half of :meth:`resign`: end trust, cancel leader-only work, and start
        the release in the peer's nursery. ``None`` if there is nothing to give up."""
        term = self._core.resign(trio.current_time())
        if term is None and not self._core.resigning:
            return None
        self._publish("resigned")  # cancels leader-only work (the caller's own, if any)
        self._resched.set()  # the loop re-reads its schedule: the resign hold
        resignation = _Resignation()
        assert self._nursery is not None
        self._nursery.start_soon(self._release_resigned, resignation)
        return resignation

    async def _release_resigned(self, resignation: _Resignation) -> None:
        """After a resign: wait for leader-only work to end, then release what was given up."""
        try:
            if not await self._work.wait_stopped():
                return  # work ignores cancellation: no release while it runs (logged)
            async with self._conn_lock:  # after a round in flight (it completes the resign)
                term = self._core.take_release()
                # Also when the peer is closing: the term is taken, so the stop (queued for
                # the connection behind this) has nothing left to release.
                if term is not None:
                    resignation.released = await self._release(term)
        finally:
            resignation.done.set()

    def _publish(self, reason: str = "trust expired", now: float | None = None) -> None:
        """Publish the core's current view; bind leader scopes and the watchdog to it.

        ``reason`` says why leadership would end now, for the event hook; ``now``, if
        given, is the current time (a caller that has it saves the clock read).
        """
        if now is None:
            now = trio.current_time()
        # A round that completes while the peer closes (see _stop) never shows as leading.
        leader = self._core.is_leader(now) and not self._closing
        term = self._core.term(now) if leader else None
        old = self._cell.value
        if self._cell.set(leader, term, now):
            if old.is_leader:
                self._report.lost(old.term, reason, now, replaced=leader)
            if leader:
                self._report.gained(term, now)
        deadline = self._core.trusted_until if leader else math.inf
        # One live entry at a time, moved only earlier: a renewal that extends trust leaves
        # it, and when it fires (_watch_fired) it moves on to the new deadline.
        if deadline < self._watching:
            self._watching = deadline
            self._watch(deadline)
        if self._work.scopes:
            self._work.bind(term, deadline, watch=not self._closing)

    def _watch_fired(self) -> None:
        """The session's watchdog: the trust deadline registered last has come."""
        self._watching = math.inf
        if self._core.is_leader(trio.current_time()) and not self._closing:
            self._watching = self._core.trusted_until  # renewed since: watch the new one
            self._watch(self._watching)
        else:
            self._publish()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._conn_gen += 1
        if conn is not None:
            conn.abort()

    def _make_on_lost(self, gen: int) -> Callable[[], None]:
        def on_lost() -> None:
            if gen != self._conn_gen or self._closing:
                return  # a connection we already dropped or are closing
            self._conn_gen += 1
            self._conn = None
            self._report.fault(
                BackendUnavailable("connection lost"),
                "the database connection",
                trio.current_time(),
                kind="connection_lost",
            )
            if self._core.connection_lost(trio.current_time()):
                self._publish("connection lost")
            self._resched.set()

        return on_lost

    async def _ensure_connection(self) -> NameConnection:
        if self._conn is not None:
            # Hot path of every round: the caller awaits a statement right after.
            return self._conn  # noqa: ASYNC910
        assert self._connector is not None
        gen = self._conn_gen + 1
        with trio.fail_after(self._config.connect_timeout + _GUARD_SLACK):
            conn = await self._connector.connect(on_lost=self._make_on_lost(gen))
        self._conn_gen = gen
        self._conn = conn
        self._counters.connects += 1
        return conn

    async def _run_round(self, *, entry: bool) -> None:
        # Take the connection lock without a scheduling hop when it is free (the
        # usual case): a NOTIFY-triggered round goes straight to its statement.
        try:
            self._conn_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._conn_lock.acquire()
        try:
            if not entry and self._next_wake() > trio.current_time():
                # The schedule moved while we waited for the lock (behind a shared
                # session's inline round, which may also have begun a resign's hold).
                await trio.lowlevel.checkpoint()
                return
            await self._run_round_locked(entry=entry)
        finally:
            self._conn_lock.release()

    async def _run_round_locked(self, *, entry: bool) -> None:  # noqa: ASYNC910 - awaits or raises
        begun = self._begin_round()
        if begun is None:
            await trio.lowlevel.checkpoint()
            return
        started, held = begun
        st = self._config.effective_statement_timeout
        try:
            conn = await self._ensure_connection()
            with trio.fail_after(st + self._queue_wait + _GUARD_SLACK):
                outcome = await conn.elect(node=self.node, held_term=held, statement_timeout=st)
        except Exception as exc:
            if self._end_round(started, error=exc, entry=entry):
                raise
        except BaseException:  # cancelled
            self._core.abort_round(trio.current_time())
            self._publish("closed")
            self._round_over()
            raise
        else:
            self._end_round(started, outcome=outcome)

    def _begin_round(self, now: float | None = None) -> tuple[float, int | None] | None:
        """Start a round (the caller holds the connection lock): its start and the term it
        holds. ``None`` if no round runs now: the peer closes, or work of an ended tenure
        still runs (bids are held until it finishes; the tenure scope wakes the loop, so
        that work never overlaps a new tenure)."""
        if self._closing:
            return None
        if not self._core.may_start_round(winding_down=self._work.winding_down()):
            return None
        started = trio.current_time() if now is None else now
        held = self._core.start_round(started)
        self._counters.elections_run += 1
        return started, held

    def _end_round(
        self,
        started: float,
        *,
        outcome: ElectionOutcome | None = None,
        error: Exception | None = None,
        entry: bool = False,
        now: float | None = None,
    ) -> bool:
        """Apply a round's outcome or error (the time is ``now``, read here if not given).
        Sync. True if ``error`` must propagate from entry (a misconfiguration)."""
        outcome_name: RoundOutcome = "failed"
        propagate = False
        if error is None:
            assert outcome is not None
            at = trio.current_time() if now is None else now
            change = self._core.round_succeeded(at, outcome)
            outcome_name = change.value
            longer = longer_lease_seen(
                outcome, self._config.interval, self._config.max_clock_drift
            )
            if longer is not None:
                self._report.longer_lease(outcome.holder_node, longer, self._config.interval, at)
            self._round_done(change, now)
        elif isinstance(error, TableMissing):
            self._round_failed(error, "table_missing")
            self._drop_connection()
        elif isinstance(error, BackendMisconfigured | SchemaError):
            self._round_failed(error, "misconfigured")
            self._drop_connection()
            propagate = entry
            if not entry:
                self._report.misconfigured(error)
        elif isinstance(error, ServerBehind):
            # An old primary left behind by a failover: follow, retry at the failures'
            # bounded rate, and reconnect (a multi-host DSN may reach the new primary).
            self._round_failed(error, "behind")
            self._drop_connection()
        elif isinstance(error, BackendUnavailable | TimeoutError | trio.TooSlowError):
            self._round_failed(error, "unavailable")
            self._drop_connection()
        else:
            # A bug (ours, the driver's, the backend's): it costs this round and the
            # connection, never the application. Cancellation is not an Exception.
            self._round_failed(error, "unexpected")
            self._drop_connection()
            self._report.unexpected("an election round", error)
        if self._report.events:
            at = trio.current_time()
            self._report.round(
                started=started,
                outcome=outcome_name,
                held_term=self._core.held_term,
                trust_left=self._core.trusted_until - at if self._core.is_leader(at) else None,
                error=error,
                now=at,
            )
        self._round_over()
        return propagate

    def _round_event(self) -> trio.Event:
        """Set when the round in progress (or the next one) has finished."""
        if self._round_finished is None:
            self._round_finished = trio.Event()
        return self._round_finished

    def _round_over(self) -> None:
        if self._round_finished is not None:
            self._round_finished.set()
            self._round_finished = None

    # -------------------------------------------------- rounds driven by a shared session

    def _next_wake(self) -> float:
        wake_at = self._core.next_round_at
        if self._aligner is not None:
            # A session moves periodic rounds onto instants shared with other names.
            wake_at = self._aligner(wake_at, self._core.next_round_earliest)
        return wake_at

    def _inline_round(self, now: float) -> tuple[float, int | None] | None:
        """Start this name's due round for a shared session's one task. Sync.

        Only from the steady state: the loop is parked waiting for its next round, with a
        connection and nothing in flight. The session sends the bid in its next batch
        and reports back to :meth:`_inline_round_done`; the loop's task never wakes. On
        ``None`` the session wakes the loop instead, which runs the round itself.
        """
        if not self._parked or self._closing or self._conn is None or self._work.winding_down():
            return None
        if self._core.next_round_earliest > now:
            return None  # (its schedule moved since it was registered)
        try:
            self._conn_lock.acquire_nowait()
        except trio.WouldBlock:
            return None
        begun = self._begin_round(now)  # (trust anchored at the batch's start: safe)
        assert begun is not None  # not closing, not winding down
        return begun

    def _inline_round_done(
        self, started: float, outcome: ElectionOutcome | None, error: Exception | None
    ) -> None:
        """The session's report of an inline round. Sync; called once per inline round."""
        now = trio.current_time()
        try:
            self._end_round(started, outcome=outcome, error=error, now=now)
        except Exception as exc:
            # An outcome the core refuses (a backend's bug): this round fails, as an
            # error of the statement would, and the peer goes on.
            if self._core.round_started_at is not None:
                self._end_round(started, error=exc)
            self._report.unexpected("an election round", exc)
        finally:
            self._conn_lock.release()
            if self._parked and not self._closing:
                self._schedule(now)

    def _schedule(self, now: float) -> None:
        """Register the parked loop's next round with the session's timer."""
        assert self._timer is not None
        wake_at = self._next_wake()
        if wake_at <= now:
            self._resched.set()
        elif wake_at < math.inf:
            self._timer(wake_at)

    def _round_failed(self, exc: BaseException, cause: FailureCause) -> None:
        self._counters.elections_failed += 1
        now = trio.current_time()
        self._core.round_failed(now, cause=cause)
        if isinstance(exc, TableMissing):
            self._report.table_missing(exc, now)
        else:
            self._report.fault(exc, "an election round", now)
        self._publish("failed")

    def _round_done(self, change: Change, now: float | None = None) -> None:
        self._report.round_ok()
        if change in (Change.GAINED, Change.REPLACED):
            self._counters.tenures_gained += 1
        if change is Change.BUSY:
            self._counters.elections_busy += 1
            self._report.busy(leading=self.is_leader, streak=self._core.busy_rounds)
        self._publish("lost" if change is Change.LOST else "trust expired", now)

    # ------------------------------------------------------------------ tasks

    async def _election_loop(self) -> None:
        """The rounds, run in the peer's main task (:meth:`_serve`) until :meth:`_stop`
        cancels them or :meth:`_request_stop` ends them: the entry round, the report that
        the peer is entered, then each next round when due."""
        with self._loop_scope:
            await self._run_round(entry=True)
            # A cancellation that came while the entry round's reply was on its way: the
            # peer is not entered. (Shielded first, the task would never report started()
            # (a no-op once the starting nursery is cancelled), and the entry would wait for
            # it for good while it led the name.) The stop below releases what it won.
            await trio.lowlevel.checkpoint_if_cancelled()
            # Entered: from now on the peer stops only through _stop, which lets a round in
            # flight finish (a bid the server committed is then released). The cancellation
            # of the scope around the peer would abandon it: run_peer stops the peer
            # instead, and cancels this scope only if that overran its bound.
            self._serve_scope.shield = True
            report, self._report_entry = self._report_entry, None
            if report is not None:
                report()
            del report
            while True:
                await self._sleep_until_next_round()
                if self._stop_wanted:
                    break
                await self._run_round(entry=False)

    def _request_stop(self) -> None:
        """Have the peer's own task stop it (:meth:`_stop`) as soon as no round of its is
        in flight. Sync: many names leaving together each cost one wake-up of their task."""
        self._stop_wanted = True
        self._resched.set()

    async def _sleep_until_next_round(self) -> None:
        while True:
            if self._stop_wanted:
                return  # noqa: ASYNC910 - the loop ends; its task's stop awaits next
            if self._closing:
                # No more rounds: the stop cancels the loop, or _request_stop wakes it.
                self._resched = trio.Event()
                await self._resched.wait()
                continue
            wake_at = self._next_wake()
            if wake_at <= trio.current_time():
                return  # noqa: ASYNC910 - due now; the round awaits right after
            self._resched = trio.Event()
            if self._timer is not None:
                # A shared session's one task runs due rounds itself (_inline_round), so a
                # parked loop wakes only when its schedule changes or the session cannot.
                if wake_at < math.inf:
                    self._timer(wake_at)
                self._parked = True
                try:
                    await self._resched.wait()
                finally:
                    self._parked = False
                continue  # due, or the schedule changed: look again
            with trio.move_on_at(wake_at):
                await self._resched.wait()
                continue  # the schedule changed: look again
            return

    def _handle_down(self, down: Down | None) -> None:
        """A notification on the channel: a release (of any name), or ``None`` if malformed.

        Sync: a session calls it for each release its one listener parsed.
        """
        self._counters.notifications_received += 1
        kind: NotificationKind = "down"
        if down is None:
            kind = "malformed"
            self._counters.notifications_ignored += 1
        elif down.name != self.name or down.sender == self._sender:
            kind = "ignored"
            self._counters.notifications_ignored += 1
        elif self._core.notified_down(trio.current_time(), down.term):
            if self._timer is not None and self._parked:
                self._timer(trio.current_time())  # in the session's next batch, with others
            else:
                self._resched.set()
        if self._report.events:
            self._report.notification(kind, trio.current_time())

    # ------------------------------------------------------------------ lifecycle

    async def _serve(
        self,
        attachment: AbstractAsyncContextManager[NameConnector],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The peer's main task: backend resources, the election loop, and shutdown.

        It runs in a task of its own so that whatever the backend puts in the
        context (trio-asyncio's current loop, for asyncpg) never leaks into the
        user's ``async with`` body. The rounds run in this task itself (a task of their
        own cost each name one more task to run, wake and end: at 1,000 names of a
        session, a measurable share of its exit). The connection, NOTIFY and the
        watchdog are the session's; the nursery holds the peer's leader-only work.
        """
        try:
            with self._serve_scope:
                async with attachment as connector, trio.open_nursery() as nursery:
                    self._connector = connector
                    self._nursery = self._work.nursery = nursery
                    try:
                        # Reported by the loop once entered; not kept past that (the
                        # task status holds the nursery that started the task).
                        self._report_entry = task_status.started
                        del task_status
                        await self._election_loop()
                    finally:
                        self._loop_done.set()
                        with trio.move_on_after(_shutdown_bound(self._config), shield=True):
                            await self._stop()
                        # Cancel only what still runs (work that overran its stop): a
                        # cancellation costs each name's exit more than the rest of it.
                        if nursery.child_tasks:
                            nursery.cancel_scope.cancel()
        finally:
            self._loop_done.set()  # (also when the loop never ran: a stop waits for it)
            self._served.set()

    async def _release(self, term: int) -> bool:
        """Release ``term`` (caller holds the connection lock). Never raises for faults."""
        started = trio.current_time()
        released = await self._release_statement(term)
        self._report_release(term, released, started)
        return released

    def _report_release(self, term: int, released: bool, started: float) -> None:
        if self._report.events:
            now = trio.current_time()
            self._report.released(term, released, now - started, now)

    def _close_for_release(self) -> int | None:
        """The sync first half of a stop, for a session that releases many names in one
        statement: if no round is in flight, no leader-only work runs and no resign is
        under way, end the tenure here (``is_leader`` is False at once) and return the term
        for the caller to release; the caller publishes (:meth:`_publish`) once the release
        is on its way. ``None``: nothing to release now (the peer's own stop does what is
        left, as usual)."""
        if self._stop_started or self._closing or self._core.closed:
            return None
        if self._core.round_started_at is not None or self._work.scopes:
            return None
        if self._core.resigning or self._core.held_term is None:
            return None
        # No new rounds (the loop idles until the stop cancels it), no new leader-only work;
        # is_leader is False from here on. The caller publishes once its release is sent.
        self._closing = True
        return self._core.close()

    async def _release_statement(self, term: int) -> bool:
        try:
            with trio.move_on_after(self._config.cleanup_timeout) as scope:
                conn = await self._ensure_connection()
                released = await conn.release(
                    node=self.node,
                    term=term,
                    sender=self._sender,
                    statement_timeout=self._config.cleanup_timeout,
                )
                if released:
                    log.info(
                        "trio-peers %s: %s released the lease (term %d) and notified",
                        self.name,
                        self.node,
                        term,
                    )
                return released
            if scope.cancelled_caught:
                log.warning(
                    "trio-peers %s: releasing term %d timed out after %.1fs; "
                    "the lease will lapse instead",
                    self.name,
                    term,
                    self._config.cleanup_timeout,
                )
                self._drop_connection()
        except (PeerError, TimeoutError, trio.TooSlowError) as exc:
            log.warning(
                "trio-peers %s: could not release term %d (%s); the lease will lapse instead",
                self.name,
                term,
                exc,
            )
            self._drop_connection()
        return False  # noqa: ASYNC910 - every path awaited a statement (or raised from one)

    async def _stop(self) -> None:
        """Shutdown, run shielded by the caller: work, release, close. Idempotent.

        A round in flight is let finish (it is bounded by its statement timeout,
        and takes a millisecond or so): abandoning it would not stop the server from
        committing it, and a bid that won a new term then would leave a lease that no
        process holds or releases, for a whole ``interval``. Otherwise the loop is
        cancelled at once, and the release is the very next statement, which keeps a
        graceful handover down to one statement plus one NOTIFY.
        """
        if self._stop_started:
            if not self._stopped.is_set():
                await self._stopped.wait()
            # (Else no checkpoint: this is the second call of an exit that already ran
            # one; each hop here costs every name of a session one more scheduler pass.)
            return  # noqa: ASYNC910
        self._stop_started = True
        try:
            self._closing = True  # no new leader-only work, no new rounds
            if self._core.round_started_at is None:
                self._loop_scope.cancel()
            try:
                self._conn_lock.acquire_nowait()  # free unless a round is in flight
            except trio.WouldBlock:
                await self._conn_lock.acquire()  # (a fair lock: the loop cannot cut in)
            self._loop_scope.cancel()
            try:
                was_leader = self._cell.value.is_leader
                term = self._core.close()
                self._publish("closed")  # cancels leader-only work; channels see the loss
                work_stopped = await self._work.wait_stopped()
                if term is not None and work_stopped:
                    # The session closes right after (open_peer's). A pause here (so that
                    # followers elect before the server ends this backend) cost every exit
                    # 5 ms; without it a handover's p95 grows a little on a loaded 2-core
                    # host (docs/performance.rst).
                    await self._release(term)
                elif was_leader:
                    log.info("trio-peers %s: %s stopped", self.name, self.node)
                # Detach from the session's connection (sync: the session closes it).
                self._drop_connection()
            finally:
                self._conn_lock.release()
            if not self._loop_done.is_set():  # (usually it is by now: no extra hop)
                await self._loop_done.wait()
            self._cell.close()
        finally:
            self._loop_scope.cancel()  # (already, unless the stop overran its bound)
            self._publish("closed")  # (already, unless the stop overran its bound)
            self._cell.close()
            self._report.close()  # the sharers of its log log for themselves now
            self._stopped.set()


def _fn_name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _shutdown_bound(config: PeerConfig) -> float:
    # leader-work grace and release, each bounded by cleanup_timeout, with a third one and a
    # statement timeout of slack (the detach at the end takes no time).
    return 3 * config.cleanup_timeout + config.effective_statement_timeout + 1.0


def check_event_hook(on_event: object) -> None:
    if on_event is not None and not callable(on_event):
        raise TypeError(f"on_event must be a callable (an EventHook), got {on_event!r}")


@asynccontextmanager
async def run_peer(
    peer: Peer, attachment: AbstractAsyncContextManager[NameConnector]
) -> AsyncIterator[Peer]:
    """Serve ``peer`` for the ``async with`` body: entry and exit as :func:`open_peer` says."""
    config = peer.config
    # What the body raises is kept out of the nursery (which would wrap it in a group,
    # and split a group the body raised) and re-raised as itself afterwards.
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(peer._serve, attachment)
            except BaseException:
                peer._serve_scope.cancel()  # (a KeyboardInterrupt can follow started())
                raise
            try:
                yield peer
            except BaseException as exc:
                body_error = exc
            finally:
                try:
                    with trio.move_on_after(_shutdown_bound(config) + 1.0, shield=True):
                        if not peer._served.is_set():
                            # Stop from this task: one scheduling hop fewer before the
                            # release statement (the backend names its loop itself).
                            await peer._stop()
                        await peer._served.wait()
                finally:
                    # Whatever happened above (the stop overran, raised, or a
                    # KeyboardInterrupt came), the shielded peer must end with the block.
                    peer._serve_scope.cancel()
                    if nursery.child_tasks:
                        nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_after_body(group, body_error)
    if body_error is not None:
        raise body_error
