"""Sessions: many names of one process over one connection, with batched statements.

A :class:`PeerSession` owns what its peers share: the backend's resources (the asyncio
loop, for asyncpg), **one** database connection (elections, releases and LISTEN all run
on it), one *batcher* task that runs every statement, and one *listener* task that parses
each notification once and hands each release to the peer of that name. Each peer keeps
what is its own: its election core, its leadership cell, its leader-only work and its
loop (:mod:`trio_peers._peer`). A peer talks to the session through a small per-name
member (a :class:`~trio_peers._peer.NameConnector` whose connection sends that name's
statements in the session's batches), and the session's one watchdog ends each name's
trust at its deadline. :func:`open_peer` runs its peer on a private session of one name
(a backend of the per-peer protocol only is adapted, :mod:`trio_peers._one_name`), so
this is every peer's path.

Batching. A request (an election round, a release, a ``get_leader``) is queued and the
batcher wakes. It takes everything queued, and runs, per table, one statement for all
releases, one for all ``get_leader`` calls and one for all elections (with the single-name
statement when only one name is due). Requests that arrive while a statement is in
flight form the next batch. A shared session also lets peers move their periodic rounds
onto shared instants (:func:`trio_peers._core.aligned_wake`), so that idle names renew in
a few batches per period instead of one commit each.

Safety stays per name: a peer anchors its trust before it queues its round; a failed
batch fails the round of every name in it (their trust ends, as after any failed round);
a waiting round is bounded by its own guard. In a shared session a round may wait behind
one batch already in flight: the core schedules renewals early enough for that
(``queue_wait``), and every batch's statement timeout is the smallest of the session's
names (:attr:`PeerSession.statement_timeout`).

Isolation: a table that is missing or of the wrong shape fails only its names' requests; a
row locked by another transaction is reported busy for its name only (both statements skip
locked rows); only a connection-level error drops the connection, and then every name sees
the connection lost and the session reconnects once for all of them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Final, Literal, final

import attrs
import trio

from ._backend import (
    ElectRequest,
    LeaderInfo,
    LeaseTable,
    PeerBackend,
    ReleaseOutcome,
    ReleaseRequest,
    SessionBackend,
    SessionConnection,
    SessionConnector,
    SessionSettings,
)
from ._config import PeerConfig, default_node
from ._core import ElectionOutcome, aligned_wake, drift_bound, parse_downs
from ._events import EventHook
from ._exceptions import (
    BackendMisconfigured,
    BackendUnavailable,
    PeerError,
    SchemaError,
    StatementRefused,
    TableMissing,
)
from ._one_name import OneNameBackend
from ._peer import NameConnection, Peer, check_event_hook, run_peer
from ._sql import Statements, unlogged_warning
from ._util import Deadlines, ErrorLog, NoPublicConstructor, SharedLog, raise_after_body

log: Final = logging.getLogger("trio_peers")

#: Most NOTIFY payloads buffered between the backend callback and the session's listener.
_NOTIFY_BUFFER: Final = 1024
#: Options of PeerConfig that belong to the session, not to one name.
_SESSION_FIELDS: Final = frozenset({"dsn", "listen", "connect_timeout"})
#: First and longest pause between retries of a release whose row another transaction holds.
_RELEASE_RETRY_FIRST: Final = 0.005
_RELEASE_RETRY_MAX: Final = 0.1
#: At most this many scheduler passes spent waiting for a burst of notifications to end.
_BURST_PASSES: Final = 8
#: At most this many scheduler passes spent waiting for a release statement to be written.
_SEND_PASSES: Final = 12

_Kind = Literal["connect", "release", "leader", "elect"]
#: The order in which one batch runs its statements: releases first (a handover waits on
#: them), then reads, then elections.
_ORDER: Final[dict[_Kind, int]] = {"connect": 0, "release": 1, "leader": 2, "elect": 3}


@final
@attrs.frozen(kw_only=True)
class SessionStatistics:
    """A snapshot of a session's counters, from :meth:`PeerSession.statistics`.

    .. versionadded:: 0.2
    """

    names: int
    """Peers open in the session now."""
    connected: bool
    """Whether the session's connection is open."""
    connects: int
    """Connections opened (the first plus reconnects)."""
    batches: int
    """Batches run (each one or more statements)."""
    statements: int
    """Statements sent (elections, releases and reads; table checks not counted)."""
    requests: int
    """Requests served (one per name per round, release or ``get_leader``)."""
    largest_batch: int
    """The most requests one statement carried."""


@attrs.define(eq=False)
class _Request:
    kind: _Kind
    member: _Member
    statement_timeout: float
    elect: ElectRequest | None = None
    release: ReleaseRequest | None = None
    done: trio.Event | None = None  # for a task that waits (not for an inline round)
    finished: bool = False
    sent: bool = False  # taken into a statement
    written: bool = False  # that statement has left (SessionConnection.release's on_sent)
    result: object = None
    error: BaseException | None = None
    # An inline round's report (Peer._inline_round_done): called instead of a task waking.
    on_done: Callable[[object, BaseException | None], None] | None = None

    def finish(self, result: object = None, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.result, self.error = result, error
        if self.done is not None:
            self.done.set()
        if self.on_done is not None:
            # Reported, not kept: an inline request is its member's, reused next round.
            self.result = self.error = None
            try:
                self.on_done(result, error)
            except Exception as exc:  # a bug: the session goes on serving the other names
                log.error("trio-peers %s: an inline round failed", self.member.name, exc_info=exc)


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone or stuck, not just a statement timing out
    (which the driver cancels, leaving the connection usable)."""
    if isinstance(exc, trio.TooSlowError):
        return True  # not even the driver's own timeout answered
    timed_out = isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError)
    return not timed_out


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception for each waiter of a failed batch (each raises its own)."""
    if isinstance(exc, PeerError | TimeoutError):
        fresh = type(exc)(*exc.args)
        fresh.__cause__ = exc.__cause__ if exc.__cause__ is not None else exc
        return fresh
    fresh_error = BackendUnavailable(f"{type(exc).__name__}: {exc}")
    fresh_error.__cause__ = exc
    return fresh_error


@final
class _Member:
    """One name in a session: the peer's connector and connection (the per-peer protocol)."""

    def __init__(self, session: PeerSession, config: PeerConfig) -> None:
        self.session = session
        self.config = config
        self.table = LeaseTable(config.prefix, config.table)
        self.name = config.name
        self.statement_timeout = config.effective_statement_timeout
        #: How long a failover barrier installed by this name's bid lasts (trio_peers._term).
        self._barrier = drift_bound(config.interval, config.max_clock_drift)
        self.peer: Peer | None = None
        self.attached = False
        self.on_lost: Callable[[], None] | None = None
        self._inline: _Request | None = None  # the last inline round's request
        self._inline_started = 0.0
        self._elect: ElectRequest | None = None

    # The peer's main task holds the member for the peer's life (an async context manager
    # of its own rather than a generator-based one: at 1,000 names leaving at once, those
    # cost a good share of the exit).
    async def __aenter__(self) -> _Member:
        try:
            await trio.lowlevel.checkpoint()
        except BaseException:
            # Cancelled before the peer's task held the member (a cancelled scope, or
            # open_peers giving up): the name was registered at the call; it leaves here,
            # as __aexit__ (which will not run) would have it leave.
            self._leave()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:  # noqa: ASYNC910 - sync cleanup
        self._leave()

    def _leave(self) -> None:
        self.abort()
        session = self.session
        session._timers.discard(self)
        session._watches.discard(self)
        key = (self.table, self.name)
        if session._members.get(key) is self:
            del session._members[key]

    def watch(self, when: float) -> None:
        """The peer's trust ends at ``when`` unless renewed (the session's watchdog)."""
        self.session._watch(self, when)

    def schedule(self, when: float) -> None:
        """The peer's next round is due at ``when`` (the session's timer). Sync."""
        self.session._schedule(self, when)

    def inline_request(self, now: float) -> _Request | None:
        """This name's due round, started for the session's next batch, or ``None``.

        The request and its bid are this member's own, reused round after round while the
        bid is unchanged: objects made anew each round would outlive the garbage
        collector's young generations (a batch is in flight across its collections), and
        at 1,000 names bring every full collection sooner.
        """
        peer = self.peer
        if peer is None:
            return None
        begun = peer._inline_round(now)
        if begun is None:
            return None
        started, held = begun
        self._inline_started = started
        elect = self._elect
        if elect is None or elect.held_term != held or elect.node != peer.node:
            elect = self._elect = ElectRequest(
                name=self.name,
                node=peer.node,
                lease=self.config.interval,
                held_term=held,
                barrier=self._barrier,
            )
        request = self._inline
        if request is None or not request.finished:
            request = self._inline = _Request(
                "elect", self, self.statement_timeout, on_done=self._inline_done
            )
        else:
            request.finished = request.sent = False
            request.result = request.error = None
        request.elect = elect
        return request

    def _inline_done(self, result: object, error: BaseException | None) -> None:
        peer = self.peer
        assert peer is not None  # (set before the member's first round, never unset)
        if error is None and not isinstance(result, ElectionOutcome):
            error = TypeError(f"the backend's elect returned {result!r}")
        if error is None:
            assert isinstance(result, ElectionOutcome)
            peer._inline_round_done(self._inline_started, result, None)
        elif isinstance(error, Exception):
            peer._inline_round_done(self._inline_started, None, error)
        else:  # (a request is finished with an Exception or a result)
            peer._inline_round_done(self._inline_started, None, BackendUnavailable(repr(error)))

    # NameConnector (notifications come parsed from the session's listener: Peer._handle_down)
    async def connect(self, *, on_lost: Callable[[], None]) -> NameConnection:
        session = self.session
        if session._conn is None or self.table not in session._prepared:
            await session._submit(self, "connect", session._settings.connect_timeout)
        self.attached = True
        self.on_lost = on_lost
        return self  # noqa: ASYNC910 - connected already: the round's statement comes next

    # NameConnection
    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        request = ElectRequest(
            name=self.name,
            node=node,
            lease=self.config.interval,
            held_term=held_term,
            barrier=self._barrier,
        )
        result = await self.session._submit(self, "elect", statement_timeout, elect=request)
        assert isinstance(result, ElectionOutcome)
        return result

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        """Release, retrying while another transaction holds the row (no statement waits)."""
        del sender  # the session's own: its peers ignore their own releases
        deadline = trio.current_time() + statement_timeout
        pause = _RELEASE_RETRY_FIRST
        request = ReleaseRequest(name=self.name, node=node, term=term)
        while True:
            result = await self.session._submit(
                self, "release", statement_timeout, release=request
            )
            assert isinstance(result, ReleaseOutcome)
            if not result.busy:
                return result.released
            if trio.current_time() + pause >= deadline:
                await trio.sleep_until(deadline)  # it was given that long
                log.warning(
                    "trio-peers %s: the lease row stayed locked by another transaction; "
                    "term %d was not released and will lapse",
                    self.name,
                    term,
                )
                return False
            await trio.sleep(pause)
            pause = min(pause * 2, _RELEASE_RETRY_MAX)

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        result = await self.session._submit(self, "leader", statement_timeout)
        assert result is None or isinstance(result, LeaderInfo)
        return result

    def abort(self) -> None:
        # The connection is the session's: a peer that drops "its" connection detaches.
        self.attached = False
        self.on_lost = None


@final
class _Joining:
    """:meth:`PeerSession.open_peer`'s context manager. The name joins the session when the
    block is entered: a manager made and never entered (an exit stack whose earlier entry
    failed, say) holds no name, which could not be opened again and which the session's
    exit would wait a whole stop bound for."""

    def __init__(self, session: PeerSession, config: PeerConfig) -> None:
        self._session = session
        self._config = config
        self._run: AbstractAsyncContextManager[Peer] | None = None

    async def __aenter__(self) -> Peer:
        if self._run is not None:
            raise RuntimeError("this open_peer() block was entered already: call it again")
        peer, member = self._session._add(self._config)
        self._run = run_peer(peer, member)
        return await self._run.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._run is not None
        return await self._run.__aexit__(exc_type, exc, tb)  # noqa: ASYNC102 - shields itself


@final
class PeerSession(metaclass=NoPublicConstructor):
    """Many names of one process over one database connection. Get one from
    :func:`open_session`; open each name with :meth:`open_peer`.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        settings: SessionSettings,
        *,
        node: str,
        on_event: EventHook | None,
        shared: bool,
        cleanup_timeout: float,
    ) -> None:
        self._settings = settings
        self._node = node
        self._on_event = on_event
        self._shared = shared
        self._cleanup_timeout = cleanup_timeout
        self._sender = secrets.token_hex(8)
        self._members: dict[tuple[LeaseTable, str], _Member] = {}
        self._queue: list[_Request] = []
        self._queue_ready = trio.Event()
        self._connector: SessionConnector | None = None
        self._conn: SessionConnection | None = None
        self._conn_gen = 0
        self._prepared: set[LeaseTable] = set()
        self._unlogged_warned: set[LeaseTable] = set()
        self._payloads: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=_NOTIFY_BUFFER
        )
        self._payloads_ready = trio.Event()
        self._dispatches = 0  # payloads dispatched (see _burst_end)
        self._dispatches_batched = 0
        self._timers: Deadlines[_Member] = Deadlines()  # each name's next round
        self._watches: Deadlines[_Member] = Deadlines()  # each leader's trust deadline
        self._watches_changed = trio.Event()
        self._closed = False
        self._stopping = False  # the session's exit has begun: no new names
        # Faults of the connection (and of a table) are logged once for all of the names.
        self._log = SharedLog(" (said once for all of this session's names)")
        self._unexpected = ErrorLog()  # a batch's unexpected errors (bugs): rate-limited
        self._helpers_scope = trio.CancelScope()
        self._serve_scope = trio.CancelScope(shield=True)
        self._connects = 0
        self._batches = 0
        self._statements = 0
        self._requests = 0
        self._largest = 0

    # ------------------------------------------------------------------ public API

    @property
    def node(self) -> str:
        """The node id that this session's peers use unless given their own."""
        return self._node

    @property
    def listen(self) -> bool:
        """Whether the session LISTENs (and prepares its statements)."""
        return self._settings.listen

    @property
    def statement_timeout(self) -> float:
        """The timeout of each batch statement: the smallest of its open names'."""
        return min((m.statement_timeout for m in self._members.values()), default=math.inf)

    @property
    def peers(self) -> Mapping[tuple[str, str, str], Peer]:
        """The open peers, by ``(prefix, table, name)``."""
        return {
            (m.table.prefix, m.table.table, m.name): m.peer
            for m in self._members.values()
            if m.peer is not None
        }

    def statistics(self) -> SessionStatistics:
        """A frozen snapshot of the session's counters. Sync."""
        return SessionStatistics(
            names=len(self._members),
            connected=self._conn is not None,
            connects=self._connects,
            batches=self._batches,
            statements=self._statements,
            requests=self._requests,
            largest_batch=self._largest,
        )

    def open_peer(self, *, name: str, **options: object) -> AbstractAsyncContextManager[Peer]:
        """Join the election for ``name`` in this session: ``async with session.open_peer(
        name="cron") as peer:``.

        The peer has the whole :class:`~trio_peers.Peer` API, and entry and exit behave as
        :func:`~trio_peers.open_peer` says. ``options`` are :class:`~trio_peers.PeerConfig`
        fields with their meanings (``node``, ``interval``, ``leader_boost``, ``prefix``,
        ``table``, ``max_clock_drift``, ``statement_timeout``, ``cleanup_timeout``);
        ``node`` defaults to the session's. The connection-level ones (``dsn``,
        ``listen``, ``connect_timeout``) belong to :func:`open_session`.

        Raises:
          TypeError, ValueError: a bad option (naming it), at the call, before any I/O.
          ValueError: ``name`` is already open in this session for the same table (at the
            call, and at entry if it was opened in between: the name joins the session
            when the block is entered).
          trio.ClosedResourceError: the session is closed, or its exit has begun (it
            stops the names it finds then; a name joining later would be left running).
        """
        config = self._config_for(name, options)
        return self._join(config)

    @asynccontextmanager
    async def open_peers(
        self, names: Iterable[str], **options: object
    ) -> AsyncIterator[dict[str, Peer]]:
        """Open many names at once: ``async with session.open_peers(names) as peers:``.

        Every peer is entered concurrently (their first rounds run as one batch) and left
        concurrently (their releases run as one statement). Yields the peers by name.
        ``options`` apply to every name, as in :meth:`open_peer`.
        """
        configs = [self._config_for(name, options) for name in names]
        seen: set[str] = set()
        for config in configs:
            if config.name in seen:
                raise ValueError(f"names contains {config.name!r} twice: give each name once")
            seen.add(config.name)
        peers: dict[str, Peer] = {}
        body_error: BaseException | None = None

        async def enter(nursery: trio.Nursery, config: PeerConfig) -> None:
            peer, member = self._add(config)
            await nursery.start(peer._serve, member)
            peers[config.name] = peer

        # Each name's main task runs in this block's nursery (no task and nursery per name
        # around it, as open_peer has: at 1,000 names they were a good part of the
        # process's objects and of the exit's work). A name's failure fails the block.
        try:
            async with trio.open_nursery() as nursery:
                try:
                    async with trio.open_nursery() as starting:
                        for config in configs:
                            starting.start_soon(enter, nursery, config)
                except BaseException:
                    # One name could not enter: the others leave (they are shielded).
                    for peer in peers.values():
                        peer._request_stop()
                    raise
                try:
                    yield peers
                except BaseException as exc:
                    body_error = exc
                finally:
                    try:
                        with trio.move_on_after(self._cleanup_timeout, shield=True):
                            mine = set(peers.values())
                            await self._release_first(
                                [m for m in self._members.values() if m.peer in mine]
                            )
                    finally:
                        # Each peer's task stops it (each bounded as a peer's stop is); also
                        # after a KeyboardInterrupt above: the peers are shielded.
                        for peer in peers.values():
                            peer._request_stop()
        except BaseExceptionGroup as group:
            raise_after_body(group, body_error)
        if body_error is not None:
            raise body_error

    # ------------------------------------------------------------------ joining

    def _config_for(self, name: str, options: Mapping[str, object]) -> PeerConfig:
        misplaced = sorted(_SESSION_FIELDS & options.keys())
        if misplaced:
            raise TypeError(
                f"{', '.join(misplaced)} belong(s) to the session: pass "
                f"{' and '.join(misplaced)} to open_session(), not to open_peer()"
            )
        fields: dict[str, object] = {"node": self._node, **options}
        try:
            config = PeerConfig(
                dsn=self._settings.dsn,
                listen=self._settings.listen,
                connect_timeout=self._settings.connect_timeout,
                name=name,
                **fields,  # type: ignore[arg-type]
            )
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise TypeError(
                    f"open_peer() got an option that is not a PeerConfig field: {exc}"
                ) from None
            raise
        st = config.effective_statement_timeout
        if self._shared and st > config.interval / 4:
            raise ValueError(
                f"statement_timeout={st!r} must be at most interval / 4 "
                f"({config.interval / 4!r}) in a shared session: a renewal may wait behind "
                "another name's batch for one statement timeout before its own runs; "
                "raise interval or lower statement_timeout"
            )
        return config

    def _join(self, config: PeerConfig) -> AbstractAsyncContextManager[Peer]:
        self._check_joinable(config)  # at the call, the earliest point
        return _Joining(self, config)

    def _check_joinable(self, config: PeerConfig) -> tuple[LeaseTable, str]:
        """Raise if ``config``'s name cannot join now; its key in :attr:`_members`."""
        if self._closed or self._stopping:
            # (Once the exit has begun it stops the names it found; a later one would be
            # left running, and a lease it won left to lapse.)
            raise trio.ClosedResourceError("the session is closed")
        key = (LeaseTable(config.prefix, config.table), config.name)
        if key in self._members:
            raise ValueError(
                f"name {config.name!r} (table {config.prefix}.{config.table}) is already "
                "open in this session: open each name once per process"
            )
        return key

    def _add(self, config: PeerConfig) -> tuple[Peer, _Member]:
        """A new name of the session: its peer, and the member its main task enters."""
        key = self._check_joinable(config)
        member = _Member(self, config)
        peer = Peer._create(
            config,
            self._on_event,
            sender=self._sender,
            queue_wait=config.effective_statement_timeout if self._shared else 0.0,
            aligner=aligned_wake if self._shared else None,
            timer=member.schedule if self._shared else None,
            shared_log=self._log if self._shared else None,
            watch=member.watch,
        )
        member.peer = peer
        self._members[key] = member
        return peer, member

    # ------------------------------------------------------------------ requests

    async def _submit(
        self,
        member: _Member,
        kind: _Kind,
        statement_timeout: float,
        *,
        elect: ElectRequest | None = None,
        release: ReleaseRequest | None = None,
    ) -> object:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise BackendUnavailable("the session is closed")
        request = _Request(kind, member, statement_timeout, elect=elect, release=release)
        if not self._shared:
            # open_peer's session: its one peer runs one statement at a time already (under
            # its connection lock), so the statement runs in the caller's task, as on a
            # connection of the peer's own: no hop to the batcher task and back.
            request.sent = True
            peer = member.peer
            last = kind == "release" and peer is not None and peer._stop_started
            if last:
                # The peer's last statement (its trust has ended, it runs no more rounds):
                # the session's other tasks end now, while the statement is at the server,
                # rather than after it, when a follower's election needs the CPU.
                self._helpers_scope.cancel()
            await self._run_batch([request])
            result = request.result
            if last and not (isinstance(result, ReleaseOutcome) and result.busy):
                # And once it is back, the connection goes at once (as _close would), not
                # after the peer's and the session's tasks have unwound: each of those
                # scheduler passes is slower while the followers' bids take the CPU.
                conn = self._forget_connection()
                if conn is not None:
                    conn.abort()
            if request.error is not None:
                raise request.error
            return result
        request.done = done = trio.Event()
        self._queue.append(request)
        self._queue_ready.set()
        try:
            await done.wait()
        except BaseException:
            # Given up (the peer's guard, or it closes): unsent, it leaves the queue; sent,
            # its result is dropped (as a statement abandoned mid-flight).
            if not request.sent:
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
            raise
        if request.error is not None:
            raise request.error
        return request.result

    # ------------------------------------------------------------------ tasks

    async def _batcher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The session's one worker: runs the due rounds and queued requests in batches.

        A due round of a parked peer starts here (:meth:`_collect_due`) and its outcome is
        applied here: in the steady state no peer task wakes at all, and a timeout serves
        every name.
        """
        task_status.started()
        while True:
            if self._dispatches != self._dispatches_batched:
                await self._burst_end()
            self._collect_due(trio.current_time())
            if not self._queue:
                self._queue_ready = trio.Event()
                with trio.move_on_at(self._timers.earliest):
                    await self._queue_ready.wait()
                continue
            batch, self._queue = self._queue, []
            for request in batch:
                request.sent = True
            self._batches += 1
            try:
                await self._run_batch(batch)
            finally:
                # Cancelled (the session ends) or crashed mid-batch: no request of it may
                # stay unanswered (an inline round would hold its peer's lock).
                for request in batch:
                    # (Not one put back in the queue for the next batch: the queue's own.)
                    if not request.finished and request.sent:
                        request.finish(error=BackendUnavailable("the session is closed"))
                # Let go of the batch now, not when the next one replaces it a round later:
                # kept, its requests and outcomes (one per name) would outlive the
                # collector's young generations and grow the work of every full collection.
                del batch

    async def _burst_end(self) -> None:
        """Wait while notifications keep coming, so that a burst becomes one batch.

        One statement releasing many names sends a payload per ~6,000 bytes of names; they
        reach the listener a scheduler pass or so apart, and each one's names are due at
        once. Batched as they come, the first payload's names went in a statement of
        their own and the rest waited for it: at 1,000 names, two statements in a row. A
        pass with no new payload, twice in a row (the scheduler runs tasks in random
        order), ends the burst; a few passes at most.
        """
        quiet = passes = 0
        while True:
            seen = self._dispatches
            await trio.lowlevel.checkpoint()
            passes += 1
            quiet = quiet + 1 if self._dispatches == seen and not self._payloads else 0
            if quiet == 2 or passes == _BURST_PASSES:
                break
        self._dispatches_batched = self._dispatches

    def _schedule(self, member: _Member, when: float) -> None:
        """Register ``member``'s next round (replacing any earlier entry). Sync."""
        if self._timers.put(member, when):
            self._queue_ready.set()  # a new earliest deadline

    def _watch(self, member: _Member, when: float) -> None:
        """Publish ``member``'s peer at ``when`` (replacing any earlier entry). Sync."""
        if self._watches.put(member, when):
            self._watches_changed.set()

    async def _watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ends each peer's leadership at its trust deadline, on time, whatever the batcher
        waits for (a renewal that hangs is the very case): one task for every name."""
        task_status.started()
        watches = self._watches
        while True:
            now = trio.current_time()
            while (member := watches.pop_due(now)) is not None:
                if member.peer is not None:
                    member.peer._watch_fired()
            self._watches_changed = trio.Event()
            with trio.move_on_at(watches.earliest):
                await self._watches_changed.wait()

    def _collect_due(self, now: float) -> None:
        """Start the rounds due by ``now``: inline when the peer allows, else wake it."""
        timers = self._timers
        while (member := timers.pop_due(now)) is not None:
            request = member.inline_request(now) if not self._closed else None
            if request is not None:
                self._queue.append(request)
            elif member.peer is not None:
                member.peer._resched.set()

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            conn = await self._ensure_connection()
        except (PeerError, TimeoutError, trio.TooSlowError) as exc:
            for request in batch:
                request.finish(error=_copy_error(exc))
            await trio.lowlevel.checkpoint()
            return
        groups: dict[tuple[int, LeaseTable], list[_Request]] = collections.defaultdict(list)
        for request in batch:
            groups[(_ORDER[request.kind], request.member.table)].append(request)
        for (order, table), requests in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1].prefix, item[0][1].table)
        ):
            del order
            if self._conn is not conn:  # lost during this batch
                error = BackendUnavailable("connection lost")
                for request in requests:
                    request.finish(error=_copy_error(error))
                continue
            try:
                await self._run_group(conn, table, requests)
            except (TableMissing, SchemaError, BackendMisconfigured) as exc:
                # This table's problem: its names fail, the connection stays.
                self._prepared.discard(table)
                for request in requests:
                    request.finish(error=_copy_error(exc))
            except StatementRefused as exc:
                # The server refused this table's statement; the connection is fine: this
                # table's names fail, every other name keeps its round and its trust. The
                # table is checked again before its next statement (an altered table then
                # shows as the SchemaError it is, as on a new connection).
                self._prepared.discard(table)
                for request in requests:
                    request.finish(error=_copy_error(exc))
            except (BackendUnavailable, TimeoutError, trio.TooSlowError) as exc:
                if requests[0].kind == "leader" and not _connection_lost(exc):
                    # A read that failed (e.g. timed out) leaves the connection and
                    # everyone's leadership alone, as Peer.get_leader promises.
                    for request in requests:
                        request.finish(error=_copy_error(exc))
                    continue
                self._drop_connection(conn, batch)
                for request in requests:
                    request.finish(error=_copy_error(exc))
            except Exception as exc:  # a bug: costs this group and the connection
                self._unexpected.report(f"session ({self._node})", "a batch", exc)
                self._drop_connection(conn, batch)
                for request in requests:
                    request.finish(error=_copy_error(exc))

    async def _run_group(
        self, conn: SessionConnection, table: LeaseTable, requests: list[_Request]
    ) -> None:
        # Every statement of a batch is bounded by the smallest timeout of the session's
        # names (and of the requests): a round queued behind it waits at most that.
        limit = min(self.statement_timeout, *(r.statement_timeout for r in requests))
        limit = max(limit, 0.001)
        if table not in self._prepared:
            # A few statements and a LISTEN (asyncpg's has no timeout of its own): bounded
            # as two statements, so that one that never answers costs this connection (a
            # TooSlowError drops it), not every name of the session for good.
            with trio.fail_after(2 * limit + 0.5):
                unlogged = await conn.prepare(table, statement_timeout=limit)
            self._prepared.add(table)
            if unlogged and table not in self._unlogged_warned:
                self._unlogged_warned.add(table)
                log.warning(
                    "trio-peers %s: %s",
                    requests[0].member.name,
                    unlogged_warning(Statements(table.prefix, table.table)),
                )
        kind = requests[0].kind
        if kind == "connect":
            for request in requests:
                request.finish()
            await trio.lowlevel.checkpoint()
            return
        # One request per name (a peer has one in flight at a time; a duplicate would be a
        # bug): a later duplicate waits for the next batch rather than break the statement.
        unique: dict[str, _Request] = {}
        for request in requests:
            if request.member.name in unique:
                self._queue.append(request)
                request.sent = False
                self._queue_ready.set()
            else:
                unique[request.member.name] = request
        todo = list(unique.values())
        self._statements += 1
        self._requests += len(todo)
        self._largest = max(self._largest, len(todo))
        with trio.fail_after(limit + 0.5):
            if kind == "elect":
                elect_requests = [r.elect for r in todo if r.elect is not None]
                outcomes = await conn.elect(table, elect_requests, statement_timeout=limit)
                for request, outcome in zip(todo, outcomes, strict=True):
                    request.finish(outcome)
            elif kind == "release":
                release_requests = [r.release for r in todo if r.release is not None]

                def on_sent() -> None:
                    for request in todo:
                        request.written = True

                released = await conn.release(
                    table,
                    release_requests,
                    sender=self._sender,
                    statement_timeout=limit,
                    # (Only a shared session waits for it: open_peer's releases its one name
                    # in the peer's own stop, and the signal costs an asyncio task.)
                    on_sent=on_sent if self._shared else None,
                )
                for request, result in zip(todo, released, strict=True):
                    request.finish(result)
            else:
                leaders = await conn.get_leaders(
                    table, [r.member.name for r in todo], statement_timeout=limit
                )
                for request in todo:
                    request.finish(leaders.get(request.member.name))

    async def _ensure_connection(self) -> SessionConnection:
        if self._conn is not None:
            return self._conn  # noqa: ASYNC910 - the caller awaits a statement next
        assert self._connector is not None
        gen = self._conn_gen + 1
        with trio.fail_after(self._settings.connect_timeout + 0.5):
            conn = await self._connector.connect(
                on_notification=self._on_notification, on_lost=self._make_on_lost(gen)
            )
        if self._closed:
            # The session closed while this connect was in flight (and finished anyway): it
            # closed no connection then, so this one is closed here.
            conn.abort()
            raise BackendUnavailable("the session is closed")
        self._conn_gen = gen
        self._conn = conn
        self._prepared = set()
        self._connects += 1
        return conn

    def _drop_connection(self, conn: SessionConnection, batch: list[_Request]) -> None:
        """A connection-level failure during ``batch``: drop the connection; every name
        not waiting in this batch sees the connection lost. One waiting in it is not told:
        its round fails by itself, and a get_leader() that fails leaves leadership alone, as
        :meth:`Peer.get_leader <trio_peers.Peer.get_leader>` promises (its lease stands,
        its trust is bounded by time)."""
        if self._conn is conn:
            self._forget_connection()
            conn.abort()
            self._tell_lost(skip={r.member for r in batch if not r.finished})

    def _forget_connection(self) -> SessionConnection | None:
        """Stop using the connection (returned, to close or not): its ``on_lost``, if it
        comes, is for an old connection, and a new one prepares its tables again."""
        conn, self._conn = self._conn, None
        self._conn_gen += 1
        self._prepared = set()
        return conn

    def _tell_lost(self, skip: frozenset[_Member] | set[_Member] = frozenset()) -> None:
        for member in list(self._members.values()):
            if member in skip:
                continue
            if member.attached and member.on_lost is not None:
                on_lost = member.on_lost
                member.abort()
                on_lost()

    def _make_on_lost(self, gen: int) -> Callable[[], None]:
        def on_lost() -> None:
            if gen != self._conn_gen or self._closed:
                return
            self._forget_connection()
            self._tell_lost()

        return on_lost

    def _on_notification(self, channel: str, payload: str) -> None:
        # Called from the backend's callback: no raising, no blocking.
        self._payloads.append((channel, payload))
        self._payloads_ready.set()

    async def _listener(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._payloads_ready.wait()
            self._payloads_ready = trio.Event()
            while self._payloads:
                channel, payload = self._payloads.popleft()
                self._dispatch(channel, payload)
                self._dispatches += 1

    def _dispatch(self, channel: str, payload: str) -> None:
        """Parse one payload once and hand each release to the peer of its name."""
        downs = parse_downs(payload)
        tables = [t for t in self._prepared if t.channel == channel]
        if downs is None:
            log.debug("trio-peers: ignoring malformed notification %.200r", payload)
            for each in self._members.values():
                if each.table in tables and each.attached and each.peer is not None:
                    each.peer._handle_down(None)
            return
        for down in downs:
            for table in tables:
                member = self._members.get((table, down.name))
                if member is None and not self._shared:
                    # open_peer's session: its one peer counts other names' releases, as
                    # a peer of its own connection always has (PeerStatistics).
                    member = next(iter(self._members.values()), None)
                if member is not None and member.attached and member.peer is not None:
                    member.peer._handle_down(down)

    # ------------------------------------------------------------------ lifecycle

    async def _serve(
        self,
        backend: SessionBackend,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The session's main task: the backend's resources, the batcher and the listener.

        Shielded from the surroundings' cancellation: the session's peers release their
        leases through it while they stop, also when the enclosing scope is cancelled. It
        ends when :func:`open_session`'s block has ended (:attr:`_serve_scope` cancelled).
        """
        with self._serve_scope:
            async with (
                backend.open_session(self._settings) as connector,
                trio.open_nursery() as nursery,
            ):
                self._connector = connector
                await nursery.start(self._helpers)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.move_on_after(self._cleanup_timeout, shield=True):
                        await self._close()
                    nursery.cancel_scope.cancel()

    async def _helpers(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The batcher, the listener and the watchdog, in a scope of their own: open_peer's
        session ends them while its peer's release is at the server (:meth:`_submit`)."""
        with self._helpers_scope:
            async with trio.open_nursery() as helpers:
                await helpers.start(self._batcher)
                await helpers.start(self._listener)
                await helpers.start(self._watchdog)
                task_status.started()

    async def _stop_members(self) -> None:
        """Stop the peers still open when the session ends, all at once: their releases
        run as one statement per table."""
        self._stopping = True
        members = list(self._members.values())
        await self._release_first(members)
        peers = [m.peer for m in members if m.peer is not None]
        if not peers:
            await trio.lowlevel.checkpoint()
            return
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(peer._stop)

    async def _release_first(self, members: Iterable[_Member]) -> None:
        """Many names leave at once: end every idle leader's tenure and release them all in
        one statement (per table) before any peer's own stop runs, so that the other
        processes take every name over at once rather than as each peer's exit gets to its
        release. A name whose round is in flight goes in a second statement once that round
        has ended; a busy row is retried as a single release would be; a name that cannot go
        this way (leader-only work winding down, a resign under way) is left to its own stop.
        """
        started = trio.current_time()
        pending: list[tuple[_Member, Peer, int, _Request]] = []
        todo = list(members)
        for attempt in range(2):
            in_flight: list[tuple[_Member, trio.Event]] = []
            queued = len(pending)
            for member in todo:
                peer = member.peer
                if peer is None or self._closed or self._conn is None:
                    continue
                term = peer._close_for_release()
                if term is None:
                    if attempt == 0 and peer._core.round_started_at is not None:
                        # (Mostly an inline round of a batch in flight: it ends soon.)
                        in_flight.append((member, peer._round_event()))
                    continue
                request = _Request(
                    "release",
                    member,
                    member.config.cleanup_timeout,
                    release=ReleaseRequest(name=member.name, node=peer.node, term=term),
                    done=trio.Event(),
                )
                pending.append((member, peer, term, request))
                self._queue.append(request)
            if len(pending) > queued:
                self._queue_ready.set()
                # Trust has ended (_close_for_release: is_leader is False, and no leader-only
                # work runs); what is left is telling each leadership() stream and the event
                # hook. At 1,000 names that, and the readers it wakes, took ~15 ms, spent
                # before the release statement went out; now it runs once the batcher has it.
                await self._until_written(pending[queued][3])
                for _, peer, _, _ in pending[queued:]:
                    peer._publish("closed")
            if not in_flight:
                break
            # Names whose round was in flight go in a second statement once it has ended,
            # rather than each with its own stop, later.
            with trio.move_on_after(max(m.statement_timeout for m, _ in in_flight) + 0.5):
                for _, finished in in_flight:
                    if not finished.is_set():  # (a set one would still cost a hop)
                        await finished.wait()
            todo = [member for member, _ in in_flight]
        await trio.lowlevel.checkpoint()  # the batcher sends them
        if not pending:
            return
        limit = max(member.config.cleanup_timeout for member, _, _, _ in pending)
        with trio.move_on_after(limit):
            for _, _, _, request in pending:
                assert request.done is not None
                if not request.finished:  # (a set one would still cost a hop)
                    await request.done.wait()
        failed: list[str] = []
        busy: list[tuple[_Member, Peer, int]] = []
        for member, peer, term, request in pending:
            result = request.result
            if isinstance(result, ReleaseOutcome) and result.busy:
                busy.append((member, peer, term))
                continue
            released = isinstance(result, ReleaseOutcome) and result.released
            if not request.finished or request.error is not None:
                failed.append(member.name)
            peer._report_release(term, released, started)
        count = len(pending) - len(failed) - len(busy)
        if count:
            log.info("trio-peers: released %d lease(s) in one statement and notified", count)
        if failed:
            log.warning(
                "trio-peers: could not release %d name(s) of the session (%s, ...); their "
                "leases will lapse instead",
                len(failed),
                ", ".join(failed[:3]),
            )
        if busy:
            async with trio.open_nursery() as nursery:
                for member, peer, term in busy:
                    nursery.start_soon(self._release_busy, member, peer, term, started)

    async def _until_written(self, request: _Request) -> None:
        """Wait (a few scheduler passes at most) until the statement carrying ``request``
        has left (the connection's ``on_sent``). Bounded: behind a statement in flight the
        request goes out only after it, and nothing is worth waiting that long for here.
        Taking the request is not enough: under trio-asyncio the statement is written a
        few passes after the batcher hands it to the driver, and at 1,000 names what the
        caller does next (publishing the losses) took ~15 ms, all before the write."""
        passes = 0
        while True:
            await trio.lowlevel.checkpoint()
            passes += 1
            if request.written or passes == _SEND_PASSES:
                return

    async def _release_busy(self, member: _Member, peer: Peer, term: int, started: float) -> None:
        released = False
        await trio.lowlevel.checkpoint()
        with contextlib.suppress(PeerError, TimeoutError, trio.TooSlowError):
            released = await member.release(
                node=peer.node,
                term=term,
                sender=self._sender,
                statement_timeout=member.config.cleanup_timeout,
            )
        peer._report_release(term, released, started)

    async def _close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        for request in self._queue:
            request.finish(error=BackendUnavailable("the session is closed"))
        self._queue = []
        conn = self._forget_connection()
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(self._cleanup_timeout) as scope:
            try:
                await conn.aclose()
            except PeerError:
                conn.abort()
        if scope.cancelled_caught:
            conn.abort()


@asynccontextmanager
async def _serve_session(
    session: PeerSession, backend: SessionBackend
) -> AsyncIterator[PeerSession]:
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._serve, backend)
            try:
                yield session
            except BaseException as exc:
                body_error = exc
            finally:
                try:
                    with trio.move_on_after(3 * session._cleanup_timeout + 1.0, shield=True):
                        await session._stop_members()
                finally:
                    # Also after a KeyboardInterrupt there (it reaches a shielded scope too):
                    # the session's task is shielded, and without this the block never ends.
                    session._serve_scope.cancel()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_after_body(group, body_error)
    if body_error is not None:
        raise body_error


@asynccontextmanager
async def open_session(
    dsn: str,
    *,
    listen: bool = True,
    connect_timeout: float = 10.0,
    cleanup_timeout: float = 5.0,
    node: str | None = None,
    backend: SessionBackend | None = None,
    on_event: EventHook | None = None,
) -> AsyncIterator[PeerSession]:
    """Open a session: one database connection for many names of this process.

    ``async with open_session(dsn) as session:`` then ``async with
    session.open_peer(name="cron") as peer:`` for each name (names may come and go while
    the session runs), or :meth:`PeerSession.open_peers` for many at once.

    The session holds one connection (elections, releases and LISTEN share it) and one
    asyncio loop, and runs the rounds of names that are due together as one statement.
    Entry connects lazily: the first peer's first round opens the connection.

    Args:
      dsn: PostgreSQL URI, as :attr:`PeerConfig.dsn <trio_peers.PeerConfig.dsn>`.
      listen: As :attr:`PeerConfig.listen <trio_peers.PeerConfig.listen>`, for every name.
      connect_timeout: Seconds allowed to open the connection.
      cleanup_timeout: Seconds allowed to close the connection on exit.
      node: The node id of the session's peers (default: unique to this process).
      backend: A :class:`~trio_peers.SessionBackend`; default PostgreSQL through asyncpg.
        :class:`trio_peers.testing.MemoryBackend` serves sessions too.
      on_event: An :data:`~trio_peers.EventHook` for every peer of the session.

    Raises:
      TypeError, ValueError: a bad argument, naming it.

    .. versionadded:: 0.2
    """
    # The fields' own validation, with their error messages.
    probe = PeerConfig(
        dsn=dsn,
        listen=listen,
        connect_timeout=connect_timeout,
        cleanup_timeout=cleanup_timeout,
        node=node if node is not None else default_node(),
    )
    check_event_hook(on_event)
    if backend is None:
        from ._asyncpg import AsyncpgBackend

        backend = AsyncpgBackend()
    if not hasattr(backend, "open_session"):
        raise TypeError(
            f"backend must serve sessions (have open_session()), got {type(backend).__name__}"
        )
    settings = SessionSettings(dsn=dsn, listen=listen, connect_timeout=connect_timeout)
    session = PeerSession._create(
        settings,
        node=probe.node,
        on_event=on_event,
        shared=True,
        cleanup_timeout=cleanup_timeout,
    )
    async with _serve_session(session, backend) as served:
        yield served


@asynccontextmanager
async def open_private_session(
    config: PeerConfig, backend: SessionBackend, on_event: EventHook | None
) -> AsyncIterator[Peer]:
    """:func:`~trio_peers.open_peer`'s session: one name, no alignment, no queue wait."""
    settings = SessionSettings(
        dsn=config.dsn, listen=config.listen, connect_timeout=config.connect_timeout
    )
    session = PeerSession._create(
        settings,
        node=config.node,
        on_event=on_event,
        shared=False,
        cleanup_timeout=config.cleanup_timeout,
    )
    async with _serve_session(session, backend) as served, served._join(config) as peer:
        yield peer


@asynccontextmanager
async def open_peer(
    config: PeerConfig,
    *,
    backend: PeerBackend | SessionBackend | None = None,
    on_event: EventHook | None = None,
) -> AsyncIterator[Peer]:
    """Join the election for ``config.name``; leave it (releasing any lease) on exit.

    ``async with open_peer(config) as peer:``

    **Entry blocks** until the first election round has finished, so
    ``peer.is_leader`` is meaningful on the first line of the body. If the
    database cannot be reached at entry (refused, timed out, starting up),
    entry still succeeds with the peer as follower, and it keeps retrying in
    the background. A permanent misconfiguration raises from entry.

    **Exit blocks** for a bounded time, also when the surrounding scope is
    cancelled: it cancels and awaits leader-only work, stops the election
    loop, and if this peer holds a lease it releases it and sends NOTIFY in one
    statement (under ``cleanup_timeout``), then closes the connection. An
    exception from the body propagates as itself, not wrapped in an
    :exc:`ExceptionGroup`.

    Args:
      config: The peer's settings.
      backend: The lease store. Default: PostgreSQL through asyncpg
        (:class:`trio_peers.AsyncpgBackend`). Tests can pass
        :class:`trio_peers.testing.MemoryBackend`.
      on_event: An :data:`~trio_peers.EventHook`: a sync function called with each of the
        peer's events (rounds, leadership, faults, notifications, releases), for metrics;
        see :doc:`/howto/metrics`. It must not block; what it raises is logged (at most
        once a minute) and ignored. Without it, no event is built.

    Raises:
      BackendMisconfigured: invalid DSN, failed authentication, missing database.
      SchemaError: the lease table exists but has the wrong shape.

    .. versionadded:: 0.1
    """
    if not isinstance(config, PeerConfig):
        raise TypeError(f"config must be a PeerConfig, got {type(config).__name__}")
    if backend is None:
        from ._asyncpg import AsyncpgBackend

        backend = AsyncpgBackend()
    check_event_hook(on_event)
    # A private session of one name (one connection, one loop); a backend of the per-peer
    # protocol only is served as one.
    sessions = backend if isinstance(backend, SessionBackend) else OneNameBackend(backend, config)
    async with open_private_session(config, sessions, on_event) as peer:
        yield peer
