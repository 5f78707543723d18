"""The PostgreSQL backend: asyncpg run under Trio through trio-asyncio.

This is the ONLY module of trio-peers with asyncio-flavoured code. Each
function says its flavour. Everything it exports is Trio-flavoured.

Rules that keep asyncpg safe under trio-asyncio (see the project's DRIVER notes):

* Each transaction, and each multi-step sequence (connect + check + LISTEN),
  is one asyncio-side coroutine reached through a single ``aio_as_trio`` hop.
* Listener and termination callbacks never raise: they hand data to the Trio
  side inside ``try``/``except`` and do nothing else.
* The loop gets an exception handler that logs instead of re-raising, so an
  orphaned asyncio future (asyncpg's cancel request abandoned by
  ``terminate()``) cannot kill the peer.
* Connections are closed inside the loop, under a shielded timeout, with
  ``terminate()`` as the fallback.
* "Database unavailable" is one explicit list of exceptions, mapped here.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar, cast, final

import asyncpg
import attrs
import trio
import trio_asyncio

from ._backend import (
    BackendConnection,
    BackendConnector,
    ElectRequest,
    LeaderInfo,
    LeaseTable,
    ReleaseOutcome,
    ReleaseRequest,
    SessionConnection,
    SessionConnector,
    SessionSettings,
)
from ._config import PeerConfig, check_identifier
from ._core import ElectionOutcome, down_payload, drift_bound
from ._dsn import HostPort, MultiHostDSN, parse_multihost
from ._exceptions import (
    BackendMisconfigured,
    BackendUnavailable,
    SchemaError,
    ServerBehind,
    StatementRefused,
    TableMissing,
    TenureLost,
)
from ._fence import Fence
from ._position import POSITION_QUERY, ServerPosition
from ._sql import MIGRATE_LOCK_KEY, Statements, shape_problems, unlogged_warning
from ._term import BARRIER_NODE, TimelineMemory, term_timeline
from ._util import raise_single

if TYPE_CHECKING:
    from asyncpg import Connection, Record
    from asyncpg.connect_utils import SessionAttribute
    from asyncpg.prepared_stmt import PreparedStatement

log: Final = logging.getLogger("trio_peers")

T = TypeVar("T")

_APPLICATION_NAME: Final = "trio-peers"

#: asyncpg errors that retrying cannot fix.
_PERMANENT: Final = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28000, includes 28P01
    asyncpg.exceptions.InvalidCatalogNameError,  # 3D000: database does not exist
    asyncpg.exceptions.ClientConfigurationError,
)
#: Errors that mean "the database cannot be reached right now".
_UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx
    asyncpg.exceptions.OperatorInterventionError,  # 57P01 admin shutdown, 57P03 starting up, 57014
    asyncpg.exceptions.InternalClientError,  # e.g. a query racing a terminated backend
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx, too many connections
)


def _tls_problem(exc: BaseException) -> str | None:
    """What is wrong with the TLS settings, if ``exc`` (from a connect) says so: the
    server's certificate was refused (``sslmode=verify-ca`` / ``verify-full`` with the wrong
    root certificate or host name), or ``sslmode=require`` met a server without TLS. Both
    are OSErrors, which otherwise mean "cannot reach the server now": retrying cannot fix
    them, so they are misconfigurations, as a refused password is."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate was refused ({exc.verify_message or exc}): check "
            "sslrootcert and the host name in the DSN, or sslmode"
        )
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return f"{exc}: the server does not accept TLS, and the DSN's sslmode requires it"
    return None


def _aio(
    fn: Callable[..., Awaitable[T]], loop: asyncio.AbstractEventLoop | None = None
) -> Callable[..., Awaitable[T]]:
    """Typed ``aio_as_trio``: call an asyncio-flavoured coroutine function from Trio.

    With ``loop``, the call runs on that loop whatever the calling task's current
    loop is: a peer's loop is private, and the user's code may run in a task
    that has no loop, or a loop of its own.
    """
    wrapped: Callable[..., Awaitable[T]] = trio_asyncio.aio_as_trio(fn, loop=loop)
    return wrapped


async def _drive(coro: Coroutine[Any, Any, T], on_sent: Callable[[], None] | None = None) -> T:
    """Run one asyncpg query coroutine in the calling Trio task; ``on_sent()`` once it has
    written its statement (it must not raise).

    ``aio_as_trio`` runs a coroutine as an asyncio task of the loop: a hop from the Trio
    task to the loop's task to start it, and a task wake-up plus a done callback to finish,
    about 90 µs per statement, 45% of an election statement's round trip. A query method's
    coroutine (a prepared statement's ``fetch``/``fetchrow``, a connection's) only awaits
    asyncio futures (its reply), so this steps it here, as an asyncio task would, and waits
    for each future it awaits the way ``trio_asyncio.run_aio_future`` does: the statement is
    written in this task's own step, and the reply wakes this task from the future's done
    callback (one hop). The statement then costs about 10% more than under plain asyncio.

    Cancellation is a task's: the awaited future is cancelled (asyncpg then cancels the
    statement at the server), ``CancelledError`` is thrown into the coroutine, and if it
    ends with that, the Trio cancellation is raised, as ``run_aio_coroutine`` does.

    Only for a connection with no cancellation of its own in progress: asyncpg then waits
    for it under ``asyncio.timeout``, which needs a current asyncio task
    (:class:`_Statements` runs that statement as a task).
    """
    # A caller cancelled already sends nothing, as with a task (cancelled before its first
    # step): the first step below writes the statement.
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        coro.close()
        raise
    task = trio.lowlevel.current_task()
    awaited: asyncio.Future[Any] | None = None
    raise_cancel: Callable[[], NoReturn] | None = None

    def abort(raise_cancel_arg: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = raise_cancel_arg
        assert awaited is not None
        awaited.cancel()  # the reply's future: done (cancelled) soon, which wakes us
        return trio.lowlevel.Abort.FAILED

    def wake(_future: object) -> None:
        trio.lowlevel.reschedule(task)

    value: Any = None
    error: BaseException | None = None
    blocked = False
    while True:
        try:
            yielded = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            if not blocked:
                await trio.lowlevel.checkpoint()
            result: T = stop.value
            return result  # noqa: ASYNC910 - it blocked on a reply, or checkpointed just now
        except asyncio.CancelledError:
            if raise_cancel is not None:
                raise_cancel()  # trio.Cancelled (or the KeyboardInterrupt that came)
            raise
        except BaseException:
            if not blocked:  # (failed in its first step: a closed connection, say)
                await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        if on_sent is not None and not blocked:
            on_sent()
        blocked = True
        value = error = None
        if yielded is None:  # a bare yield (asyncio.sleep(0)): let the loop run once
            await trio.lowlevel.cancel_shielded_checkpoint()
            continue
        if not asyncio.isfuture(yielded):  # pragma: no cover - asyncpg awaits futures only
            coro.close()
            raise RuntimeError(f"asyncpg awaited {yielded!r}, which is not an asyncio future")
        awaited = yielded
        awaited._asyncio_future_blocking = False  # (what a task does with an awaited future)
        awaited.add_done_callback(wake)
        await trio.lowlevel.wait_task_rescheduled(abort)
        try:
            value = awaited.result()
        except BaseException as exc:  # (CancelledError included: thrown in, as a task does)
            error = exc
        awaited = None


@final
class _Statements:
    """Runs the statements of one connection for the Trio side, one at a time.

    Each runs in the calling task (:func:`_drive`), unless the connection's last statement
    ended with an exception: asyncpg may then be cancelling it at the server, which the
    next statement waits for in a way that needs an asyncio task, so that one runs as a
    task of the loop (``aio_as_trio``) and, once it has succeeded, the next ones run in
    the calling task again. Every statement of the connection goes through here, so that
    none can leave a cancellation in progress unseen; ``in_task=True`` runs an
    asyncio-flavoured coroutine of several statements (preparing a table) as a task.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._direct = True

    async def run(
        self,
        call: Callable[[], Coroutine[Any, Any, T]],
        on_sent: Callable[[], None] | None = None,
        *,
        in_task: bool = False,
    ) -> T:
        try:
            if in_task or not self._direct:
                result: T = await _aio(_aio_signalled, self._loop)(call, on_sent)
                self._direct = True
                return result
            return await _drive(call(), on_sent)
        except BaseException:
            self._direct = False
            raise


@contextmanager
def _mapped(*, connecting: bool = False) -> Iterator[None]:
    """Translate asyncpg and OS errors into trio-peers errors (keeping ``__cause__``)."""
    try:
        yield
    except _PERMANENT as exc:
        raise BackendMisconfigured(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.exceptions.UndefinedTableError as exc:
        # Dropped while peers run: their prepared statements name it.
        raise TableMissing(
            f"{exc}: the lease table is gone; run trio_peers.migrate(dsn) or "
            "`trio-peers migrate --dsn ...` (with your prefix and table) to create it again"
        ) from exc
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise BackendMisconfigured(f"permission denied: {exc}") from exc
    except asyncpg.exceptions.ReadOnlySQLTransactionError as exc:
        # Retried (a standby may be promoted, a setting reverted), but say which it is.
        if "recovery" in str(exc):
            why = "the server is a hot standby (in recovery: pg_is_in_recovery() is true)"
        else:
            why = "default_transaction_read_only is on for this role or database"
        raise BackendUnavailable(
            f"the database is read-only ({exc}): {why}, or the DSN points at a standby; "
            "peers need a writable primary and follow until they find one"
        ) from exc
    except _UNAVAILABLE as exc:
        if isinstance(exc, TimeoutError):
            raise BackendUnavailable("timed out") from exc
        problem = _tls_problem(exc) if connecting else None
        if problem is not None:
            raise BackendMisconfigured(problem) from exc
        raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        # Anything else the server says (serialization failure, deadlock, a trigger's
        # error, ...) is worth a retry; the peer steps down meanwhile. The connection is
        # fine (the statement's implicit transaction rolled back): a session keeps it.
        raise StatementRefused(f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        if connecting:  # asyncpg rejects a malformed DSN with ValueError
            raise BackendMisconfigured(f"invalid DSN: {exc}") from exc
        raise
    except asyncio.CancelledError as exc:
        # Trio's own cancellation arrives as trio.Cancelled; an asyncio.CancelledError
        # (a BaseException) means the driver cancelled one of its own futures. It must
        # not escape as if the peer were being cancelled: the round failed.
        raise BackendUnavailable(f"asyncio task cancelled inside the driver: {exc!r}") from exc


def _log_asyncio_error(loop: object, context: Mapping[str, object]) -> None:
    """asyncio-flavoured loop exception handler: log, never re-raise (pitfall P9).

    An error of a dead connection on a future nobody awaits is expected: asyncpg
    orphans its cancel request when a timed-out connection is terminated (P9), and
    the peer learns of the connection's fate from its own statements. That is
    logged at DEBUG. Anything else is a real problem somewhere, logged at ERROR
    with its traceback.
    """
    exc = context.get("exception")
    message = context.get("message")
    if isinstance(exc, _UNAVAILABLE):
        log.debug("ignored asyncio error of a dead connection: %s", message, exc_info=exc)
        return
    log.error(
        "trio-peers: unexpected error in the asyncio loop: %s",
        message,
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Trio-flavoured: a private trio-asyncio loop with a logging exception handler.

    trio-asyncio wraps what the body raises in an ExceptionGroup; a single
    exception is unwrapped so callers see ``SchemaError``, not a group.
    """
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_asyncio_error)
            yield loop
    except BaseExceptionGroup as group:
        raise_single(group)


# ---------------------------------------------------------------------- asyncio side


async def _aio_signalled(
    call: Callable[[], Awaitable[T]], on_sent: Callable[[], None] | None
) -> T:
    """asyncio-flavoured: await ``call()``, calling ``on_sent()`` once its statement is written.

    Without ``on_sent``, just ``await call()`` (no task of its own).

    asyncpg writes a statement's messages to the socket in the first step of its coroutine,
    before it first waits (for the reply). Run as a task of its own, that step is a
    callback of the loop's, and a callback queued right after it runs right after it (the
    loop runs ready callbacks in order): ``on_sent()`` then tells the Trio side that the
    statement has left, in the same scheduler pass. Cancelling this coroutine cancels the
    statement's task (asyncio cancels the future a task awaits). ``on_sent`` must not raise.
    """
    if on_sent is None:
        return await call()
    task = asyncio.ensure_future(call())
    asyncio.get_running_loop().call_soon(on_sent)
    return await task


async def _aio_connect(
    dsn: str, connect_timeout: float, *, statement_cache: bool = True
) -> Connection:
    """asyncio-flavoured: open one connection.

    Only ``application_name`` goes in the startup packet (poolers such as
    PgBouncer refuse most other startup parameters). Without
    ``statement_cache``, asyncpg uses unnamed statements only, which survive
    a transaction-mode pooler switching server connections between statements.
    """
    multihost = parse_multihost(dsn)  # ValueError: a malformed list of hosts
    if multihost is not None:
        return await _aio_connect_multihost(
            multihost, connect_timeout, statement_cache=statement_cache
        )
    conn: Connection = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        statement_cache_size=100 if statement_cache else 0,
        server_settings={"application_name": _APPLICATION_NAME},
    )
    return conn


async def _aio_fetch_position(conn: Connection, limit: float) -> ServerPosition:
    """asyncio-flavoured: read the server's :class:`ServerPosition` (one round trip)."""
    row: Record | None = await conn.fetchrow(POSITION_QUERY, timeout=limit)
    if row is None:  # pragma: no cover - the SELECT always returns one row
        raise BackendUnavailable("the position query returned no row")
    return ServerPosition.from_row(dict(row.items()))


async def _aio_probe(
    target: MultiHostDSN, host: HostPort, connect_timeout: float, statement_cache: bool
) -> tuple[Connection, ServerPosition]:
    """asyncio-flavoured: connect to one host and read its position, within connect_timeout."""
    async with asyncio.timeout(connect_timeout):
        conn = await _aio_connect_host(target, host, connect_timeout, statement_cache)
        try:
            position = await _aio_fetch_position(conn, connect_timeout)
        except BaseException:
            conn.terminate()
            raise
    return conn, position


def _discard(task: asyncio.Task[tuple[Connection, ServerPosition]]) -> None:
    """Done callback of a probe nobody wants: close its connection, swallow its error."""
    if task.cancelled():
        return
    if task.exception() is None:
        task.result()[0].terminate()


async def _aio_connect_multihost(
    target: MultiHostDSN, connect_timeout: float, *, statement_cache: bool
) -> Connection:
    """asyncio-flavoured: connect to the first host of ``target`` that is of the kind wanted.

    Every host is tried at once, each with ``connect_timeout`` of its own for connecting and
    reading its :data:`POSITION_QUERY` (asyncpg's own multi-host connect tries them one
    after the other within one shared timeout, so a host that never answers uses it all
    up). The first host in the DSN's order that fits wins, as with libpq; so the whole
    call takes at most ``connect_timeout``, and a host that does not answer delays the
    hosts after it by at most that. ``prefer-standby`` falls back to the first host that
    answered. Unchosen connections are terminated. When no host fits, the error names
    every host and why: BackendMisconfigured if some host refused us for good
    (authentication, missing database), else BackendUnavailable.
    """
    wanted = target.target_session_attrs
    tasks = [
        asyncio.ensure_future(_aio_probe(target, host, connect_timeout, statement_cache))
        for host in target.hosts
    ]
    answered: list[str] = []  # hosts that answered but are not of the kind wanted
    failed: list[str] = []  # hosts we could not connect to or read
    permanent: BaseException | None = None
    chosen: asyncio.Task[tuple[Connection, ServerPosition]] | None = None
    fallback: asyncio.Task[tuple[Connection, ServerPosition]] | None = None
    try:
        for host, task in zip(target.hosts, tasks, strict=True):
            try:
                _conn, position = await asyncio.shield(task)
            except _PERMANENT as exc:
                permanent = permanent or exc
                failed.append(f"{host}: {type(exc).__name__}: {exc}")
                continue
            except TimeoutError:
                failed.append(f"{host}: no answer within {connect_timeout} s")
                continue
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                problem = _tls_problem(exc)
                if problem is not None:
                    permanent = permanent or exc
                failed.append(f"{host}: {problem or f'{type(exc).__name__}: {exc}'}")
                continue
            if position.matches(wanted):
                chosen = task
                break
            if wanted == "prefer-standby" and fallback is None:
                fallback = task
                continue
            answered.append(f"{host}: {position.read_only_reason or 'it is a writable primary'}")
        chosen = chosen or fallback
    finally:
        for task in tasks:
            if task is not chosen:
                task.add_done_callback(_discard)
                task.cancel()
    # Let the cancelled probes close their sockets now (asyncpg does so at once), rather
    # than at some later turn of a loop that may be about to close.
    pending = [task for task in tasks if not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    if chosen is not None:
        # asyncio-flavoured: a DSN with two or more hosts awaited a probe above.
        return chosen.result()[0]  # noqa: ASYNC910
    raise _no_host_error(wanted, answered, failed, permanent)


def _no_host_error(
    wanted: str, answered: list[str], failed: list[str], permanent: BaseException | None
) -> Exception:
    """The error for a multi-host connect that found no host of the kind wanted."""
    writable = wanted in {"read-write", "primary"}
    if answered and writable:
        head = f"every host in the DSN that answered is read-only (target_session_attrs={wanted})"
    elif answered:
        head = f"no host in the DSN is of the kind wanted (target_session_attrs={wanted})"
    else:
        head = f"no host in the DSN answered (target_session_attrs={wanted})"
    message = f"{head}: {'; '.join(answered or failed)}"
    if answered and failed:
        message += f"; the others: {'; '.join(failed)}"
    if writable and answered and permanent is None:
        message += "; a failover may be under way"
    error: Exception
    if permanent is not None:
        error = BackendMisconfigured(message)
        error.__cause__ = permanent
    else:
        error = BackendUnavailable(message)
    return error


async def _aio_connect_host(
    target: MultiHostDSN, host: HostPort, connect_timeout: float, statement_cache: bool
) -> Connection:
    """asyncio-flavoured: connect to one host of a multi-host DSN, with its own timeout.

    Everything but the host list comes from the DSN (user, password, database, TLS,
    ...); the explicit host and port win over it, and ``target_session_attrs="any"``
    leaves the choice to the caller.
    """
    conn: Connection = await asyncpg.connect(
        target.dsn,
        host=host.host,
        port=host.port,
        # asyncpg takes the plain string; its stubs name the enum it converts it to.
        target_session_attrs=cast("SessionAttribute", "any"),
        timeout=connect_timeout,
        statement_cache_size=100 if statement_cache else 0,
        server_settings={"application_name": _APPLICATION_NAME},
    )
    return conn


async def _aio_check_table(conn: Connection, sql: Statements, limit: float) -> bool:
    """asyncio-flavoured: raise TableMissing / SchemaError unless the table fits.

    Returns True if the table is UNLOGGED.
    """
    row = await conn.fetchrow(sql.table_shape, sql.regclass, timeout=limit)
    if row is None or not row["present"]:
        raise TableMissing(
            f"the lease table {sql.prefix}.{sql.table} does not exist: "
            f"run trio_peers.migrate(dsn, prefix={sql.prefix!r}, table={sql.table!r}) "
            f"or `trio-peers migrate --dsn ... --prefix {sql.prefix} --table {sql.table}`"
        )
    problems = shape_problems(list(row["columns"]), list(row["pkey"]))
    if problems:
        raise SchemaError(
            f"the table {sql.prefix}.{sql.table} cannot hold trio-peers leases: "
            + "; ".join(problems)
            + ". Drop it and run trio_peers.migrate(), or choose another table."
        )
    unlogged: bool = row["unlogged"]
    return unlogged


@final
@attrs.frozen
class _Prepared:
    conn: Connection
    elect: PreparedStatement | None
    release: PreparedStatement | None
    unlogged: bool
    position: ServerPosition


async def _aio_open_peer_connection(
    config: PeerConfig,
    sql: Statements,
    on_notify: Callable[[object, int, str, object], None],
    on_terminate: Callable[[object], None],
) -> _Prepared:
    """asyncio-flavoured: connect, check the table, prepare, LISTEN; close on any failure.

    Preparing the election and release statements here makes each later round
    and the final release a single round trip (no parse step on the hot path).
    With ``listen=False`` (the setting for transaction-mode poolers) nothing is
    prepared and no LISTEN is issued: both are bound to one server connection.
    """
    conn = await _aio_connect(config.dsn, config.connect_timeout, statement_cache=config.listen)
    try:
        timeout = config.connect_timeout
        position = await _aio_fetch_position(conn, timeout)
        unlogged = await _aio_check_table(conn, sql, timeout)
        elect = release = None
        if config.listen:
            elect = await conn.prepare(sql.elect, timeout=timeout)
            release = await conn.prepare(sql.release, timeout=timeout)
            await conn.add_listener(config.channel, on_notify)
        conn.add_termination_listener(on_terminate)
    except BaseException:
        conn.terminate()
        raise
    return _Prepared(conn, elect, release, unlogged, position)


async def _aio_migrate(conn: Connection, sql: Statements, unlogged: bool) -> bool:
    """asyncio-flavoured: create schema and table in one transaction. True if created."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1::bigint)", MIGRATE_LOCK_KEY)
        have_schema = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", sql.prefix
        )
        if not have_schema:
            await conn.execute(sql.create_schema)
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", sql.regclass)
        if not exists:
            await conn.execute(sql.create_table(unlogged=unlogged))
    await _aio_check_table(conn, sql, 60.0)
    return not exists


# ---------------------------------------------------------------------- Trio side


def _saw_timeline(
    memory: TimelineMemory, system_identifier: int, timeline: int | None, minimum: int, who: str
) -> None:
    """Remember the timeline an election statement reported; raise if it wrote nothing
    because the server is behind one seen before (its ``minimum``)."""
    if timeline is None:  # (a standby: the statement failed as read-only before this)
        return
    if timeline < minimum:
        raise ServerBehind(
            f"the server is on timeline {timeline}, behind timeline {minimum} that {who} saw "
            f"on a server of the same system (system_identifier {system_identifier}): it "
            "is an old primary left behind by a failover; not leading there, retrying (fix "
            "the DSN or stop that server)"
        )
    memory.saw(system_identifier, timeline)


def _note_barrier(
    memory: TimelineMemory, system_identifier: int, row: Record, who: str, name: str
) -> None:
    """Log (once per timeline) that a bid installed or met a failover barrier."""
    if row["holder_node"] != BARRIER_NODE or row["holder_term"] is None:
        return
    timeline = term_timeline(row["holder_term"])
    if not memory.first_barrier(system_identifier, timeline):
        return
    over = row["barrier_over"]
    if over is not None:
        log.info(
            "trio-peers %s (%s): the lease was last written on timeline %d and the server is "
            "on timeline %d (a failover): installed a failover barrier for %.3g s, so that no "
            "leader of the old primary can still trust its lease when the next one is elected",
            name,
            who,
            term_timeline(over),
            timeline,
            row["holder_remaining"],
        )
    else:
        log.info(
            "trio-peers %s (%s): met a failover barrier of timeline %d (the server was promoted); "
            "the lease can be taken in %.3g s",
            name,
            who,
            timeline,
            row["holder_remaining"],
        )


@final
class AsyncpgConnection:
    """Trio-flavoured wrapper of one asyncpg connection of one peer."""

    def __init__(
        self,
        prepared: _Prepared,
        config: PeerConfig,
        sql: Statements,
        loop: asyncio.AbstractEventLoop,
        memory: TimelineMemory,
    ) -> None:
        self._loop = loop
        self._statements = _Statements(loop)
        self._conn = prepared.conn
        self._elect = prepared.elect
        self._release = prepared.release
        self._config = config
        self._sql = sql
        self._lease = datetime.timedelta(seconds=config.interval)
        self._barrier = datetime.timedelta(
            seconds=drift_bound(config.interval, config.max_clock_drift)
        )
        self._memory = memory
        self._system = prepared.position.system_identifier
        if prepared.position.timeline is not None:
            memory.saw(self._system, prepared.position.timeline)

    async def elect(
        self, *, node: str, held_term: int | None, statement_timeout: float
    ) -> ElectionOutcome:
        minimum = self._memory.minimum(self._system)
        with _mapped():
            args = (self._config.name, node, self._lease, held_term, self._barrier, minimum)
            if self._elect is not None:
                elect = self._elect
                row: Record | None = await self._statements.run(
                    lambda: elect.fetchrow(*args, timeout=statement_timeout)
                )
            else:
                row = await self._statements.run(
                    lambda: self._conn.fetchrow(self._sql.elect, *args, timeout=statement_timeout)
                )
        if row is None:  # pragma: no cover - the SELECT always returns one row
            raise BackendUnavailable("election statement returned no row")
        _saw_timeline(self._memory, self._system, row["timeline"], minimum, "this peer")
        _note_barrier(self._memory, self._system, row, node, self._config.name)
        return _outcome(row)

    async def release(
        self, *, node: str, term: int, sender: str, statement_timeout: float
    ) -> bool:
        payload = down_payload(self._config.name, term, sender)
        args = (self._config.name, node, term, self._config.channel, payload)
        with _mapped():
            if self._release is not None:
                release = self._release
                rows = await self._statements.run(
                    lambda: release.fetch(*args, timeout=statement_timeout)
                )
            else:
                rows = await self._statements.run(
                    lambda: self._conn.fetch(self._sql.release, *args, timeout=statement_timeout)
                )
        return len(rows) > 0

    async def get_leader(self, *, statement_timeout: float) -> LeaderInfo | None:
        with _mapped():
            row: Record | None = await self._statements.run(
                lambda: self._conn.fetchrow(
                    self._sql.get_leader, self._config.name, timeout=statement_timeout
                )
            )
        return None if row is None else _leader_info(row)

    async def position(self, *, statement_timeout: float) -> ServerPosition:
        """The server's system, timeline and read-only state (see :mod:`._position`)."""
        with _mapped():
            return await self._statements.run(
                lambda: _aio_fetch_position(self._conn, statement_timeout), in_task=True
            )

    async def aclose(self) -> None:
        # asyncpg's terminate() is libpq's PQfinish: it writes Terminate, then drops the
        # socket. close() also sends Terminate but then waits for the server to hang up,
        # which is the server process's exit: 2-3 ms on every exit of an idle 2-core host,
        # more under load (docs/performance.rst). Nothing needs that wait: no statement is
        # in flight, the lease is released, and the server ends the session cleanly on the
        # Terminate. (So closing and aborting are the same here.)
        self._conn.terminate()
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        self._conn.terminate()


def _leader_info(row: Record) -> LeaderInfo:
    return LeaderInfo(
        name=row["name"],
        node=row["node"],
        term=row["term"],
        started_at=row["started_at"],
        expires_at=row["expires_at"],
    )


@final
class AsyncpgConnector:
    """Trio-flavoured: opens peer connections inside an open trio-asyncio loop."""

    def __init__(self, config: PeerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self._config = config
        self._loop = loop
        self._sql = Statements(config.prefix, config.table)
        self._unlogged_warned = False
        self._memory = TimelineMemory()  # the peer's: it outlives each connection

    async def connect(
        self,
        *,
        on_notification: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> BackendConnection:
        def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            # Runs in the loop's callback; MUST NOT raise (pitfall P1).
            try:
                on_notification(str(payload))
            except Exception:  # pragma: no cover - on_notification never raises
                log.exception("trio-peers notification callback failed")

        def on_terminate(_conn: object) -> None:
            try:
                on_lost()
            except Exception:  # pragma: no cover
                log.exception("trio-peers connection-lost callback failed")

        with _mapped(connecting=True):
            prepared = await _aio(_aio_open_peer_connection, self._loop)(
                self._config, self._sql, on_notify, on_terminate
            )
        if prepared.unlogged and not self._unlogged_warned:
            self._unlogged_warned = True  # once per peer
            log.warning("trio-peers %s: %s", self._config.name, unlogged_warning(self._sql))
        return AsyncpgConnection(prepared, self._config, self._sql, self._loop, self._memory)


@final
@attrs.frozen
class AsyncpgBackend:
    """The default backend: PostgreSQL through asyncpg under trio-asyncio.

    Each peer opens a private trio-asyncio loop and at most one connection.
    """

    @asynccontextmanager
    async def _open(self, config: PeerConfig) -> AsyncIterator[BackendConnector]:
        async with open_asyncio_loop() as loop:
            yield AsyncpgConnector(config, loop)

    def open(self, config: PeerConfig) -> AbstractAsyncContextManager[BackendConnector]:
        """One peer's own connections (the per-peer protocol; :func:`~trio_peers.open_peer`
        uses :meth:`open_session` instead)."""
        return self._open(config)

    @asynccontextmanager
    async def _open_session(self, settings: SessionSettings) -> AsyncIterator[SessionConnector]:
        async with open_asyncio_loop() as loop:
            yield AsyncpgSessionConnector(settings, loop)

    def open_session(
        self, settings: SessionSettings
    ) -> AbstractAsyncContextManager[SessionConnector]:
        """A session's loop; its connector opens the session's one connection."""
        return self._open_session(settings)


# ---------------------------------------------------------------------- sessions


@final
@attrs.frozen
class _TablePrepared:
    sql: Statements
    elect: PreparedStatement | None
    elect_many: PreparedStatement | None
    release_one: PreparedStatement | None
    release_many: PreparedStatement | None


async def _aio_prepare_table(
    conn: Connection,
    sql: Statements,
    channel: str | None,
    on_notify: Callable[[object, int, str, object], None],
    limit: float,
) -> tuple[_TablePrepared, bool]:
    """asyncio-flavoured: check a table; with a channel, prepare its statements and LISTEN."""
    unlogged = await _aio_check_table(conn, sql, limit)
    if channel is None:
        return _TablePrepared(sql, None, None, None, None), unlogged
    elect = await conn.prepare(sql.elect, timeout=limit)
    elect_many = await conn.prepare(sql.elect_many, timeout=limit)
    release_one = await conn.prepare(sql.release_one, timeout=limit)
    release_many = await conn.prepare(sql.release_many, timeout=limit)
    await conn.add_listener(channel, on_notify)
    return _TablePrepared(sql, elect, elect_many, release_one, release_many), unlogged


async def _aio_session_connect(
    settings: SessionSettings, on_terminate: Callable[[object], None]
) -> tuple[Connection, ServerPosition]:
    """asyncio-flavoured: open a session's connection and read the server's position."""
    conn = await _aio_connect(
        settings.dsn, settings.connect_timeout, statement_cache=settings.listen
    )
    try:
        position = await _aio_fetch_position(conn, settings.connect_timeout)
        conn.add_termination_listener(on_terminate)
    except BaseException:
        conn.terminate()
        raise
    return conn, position


def _outcome(row: Record) -> ElectionOutcome:
    won: int | None = row["won_term"]
    if won is not None:
        return ElectionOutcome(term=won, lease_remaining=row["won_remaining"])
    return ElectionOutcome(
        term=None,
        holder_node=row["holder_node"],
        holder_term=row["holder_term"],
        holder_remaining=row["holder_remaining"],
        busy=row["busy"],
    )


@final
class AsyncpgSessionConnection:
    """Trio-flavoured: the one connection of a session, for many names and tables."""

    def __init__(
        self,
        conn: Connection,
        settings: SessionSettings,
        loop: asyncio.AbstractEventLoop,
        on_notify: Callable[[object, int, str, object], None],
        position: ServerPosition,
        memory: TimelineMemory,
    ) -> None:
        self._conn = conn
        self._memory = memory
        self._system = position.system_identifier
        if position.timeline is not None:
            memory.saw(self._system, position.timeline)
        self._settings = settings
        self._loop = loop
        self._statements = _Statements(loop)
        self._on_notify = on_notify
        self._tables: dict[LeaseTable, _TablePrepared] = {}

    def _table(self, table: LeaseTable) -> _TablePrepared:
        prepared = self._tables.get(table)
        if prepared is None:  # the session prepares every table before using it
            raise RuntimeError(f"table {table} was not prepared on this connection")
        return prepared

    async def prepare(self, table: LeaseTable, *, statement_timeout: float) -> bool:
        sql = Statements(table.prefix, table.table)
        channel = table.channel if self._settings.listen else None
        with _mapped():
            prepared, unlogged = await self._statements.run(
                lambda: _aio_prepare_table(
                    self._conn, sql, channel, self._on_notify, statement_timeout
                ),
                in_task=True,
            )
        self._tables[table] = prepared
        return unlogged

    async def elect(
        self, table: LeaseTable, requests: Sequence[ElectRequest], *, statement_timeout: float
    ) -> list[ElectionOutcome]:
        prepared = self._table(table)
        minimum = self._memory.minimum(self._system)
        if len(requests) == 1:  # the single-name statement is the quicker one
            (r,) = requests
            args: tuple[object, ...] = (
                r.name,
                r.node,
                datetime.timedelta(seconds=r.lease),
                r.held_term,
                datetime.timedelta(seconds=r.barrier),
                minimum,
            )
            with _mapped():
                if prepared.elect is not None:
                    elect = prepared.elect
                    row = await self._statements.run(
                        lambda: elect.fetchrow(*args, timeout=statement_timeout)
                    )
                else:
                    row = await self._statements.run(
                        lambda: self._conn.fetchrow(
                            prepared.sql.elect, *args, timeout=statement_timeout
                        )
                    )
            if row is None:  # pragma: no cover - the SELECT always returns one row
                raise BackendUnavailable("election statement returned no row")
            _saw_timeline(self._memory, self._system, row["timeline"], minimum, "this session")
            _note_barrier(self._memory, self._system, row, r.node, r.name)
            return [_outcome(row)]
        args = (
            [r.name for r in requests],
            [r.node for r in requests],
            [r.lease for r in requests],
            [r.held_term for r in requests],
            [r.barrier for r in requests],
            minimum,
        )
        with _mapped():
            if prepared.elect_many is not None:
                elect_many = prepared.elect_many
                rows = await self._statements.run(
                    lambda: elect_many.fetch(*args, timeout=statement_timeout)
                )
            else:
                rows = await self._statements.run(
                    lambda: self._conn.fetch(
                        prepared.sql.elect_many, *args, timeout=statement_timeout
                    )
                )
        if rows:
            _saw_timeline(self._memory, self._system, rows[0]["timeline"], minimum, "this session")
        by_name = {row["name"]: row for row in rows}
        for r in requests:
            row = by_name[r.name]
            if row["holder_node"] == BARRIER_NODE:
                _note_barrier(self._memory, self._system, row, r.node, r.name)
        return [_outcome(by_name[r.name]) for r in requests]

    async def release(
        self,
        table: LeaseTable,
        requests: Sequence[ReleaseRequest],
        *,
        sender: str,
        statement_timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> list[ReleaseOutcome]:
        prepared = self._table(table)
        if len(requests) == 1:  # the single-name statement is the quicker one
            (r,) = requests
            one = (r.name, r.node, r.term, table.channel, down_payload(r.name, r.term, sender))
            release_one = prepared.release_one

            def fetch_one() -> Coroutine[Any, Any, Record | None]:
                if release_one is not None:
                    return release_one.fetchrow(*one, timeout=statement_timeout)
                sql = prepared.sql.release_one
                return self._conn.fetchrow(sql, *one, timeout=statement_timeout)

            with _mapped():
                row = await self._statements.run(fetch_one, on_sent)
            if row is None:  # pragma: no cover - the SELECT always returns one row
                raise BackendUnavailable("release statement returned no row")
            return [ReleaseOutcome(released=row["released"], busy=row["busy"])]
        args = (
            [r.name for r in requests],
            [r.node for r in requests],
            [r.term for r in requests],
            table.channel,
            sender,
        )
        release_many = prepared.release_many

        def fetch_many() -> Coroutine[Any, Any, list[Record]]:
            if release_many is not None:
                return release_many.fetch(*args, timeout=statement_timeout)
            return self._conn.fetch(prepared.sql.release_many, *args, timeout=statement_timeout)

        with _mapped():
            rows = await self._statements.run(fetch_many, on_sent)
        by_name = {row["name"]: row for row in rows}
        return [
            ReleaseOutcome(released=by_name[r.name]["released"], busy=by_name[r.name]["busy"])
            for r in requests
        ]

    async def get_leaders(
        self, table: LeaseTable, names: Sequence[str], *, statement_timeout: float
    ) -> dict[str, LeaderInfo]:
        prepared = self._table(table)
        with _mapped():
            rows: list[Record] = await self._statements.run(
                lambda: self._conn.fetch(
                    prepared.sql.get_leaders, list(names), timeout=statement_timeout
                )
            )
        return {row["name"]: _leader_info(row) for row in rows}

    async def aclose(self) -> None:
        self._conn.terminate()  # as AsyncpgConnection.aclose: Terminate, no wait
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        self._conn.terminate()


@final
class AsyncpgSessionConnector:
    """Trio-flavoured: opens a session's connection inside its trio-asyncio loop."""

    def __init__(self, settings: SessionSettings, loop: asyncio.AbstractEventLoop) -> None:
        self._settings = settings
        self._loop = loop
        self._memory = TimelineMemory()  # the session's: it outlives each connection

    async def connect(
        self,
        *,
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
    ) -> SessionConnection:
        def on_notify(_conn: object, _pid: int, channel: str, payload: object) -> None:
            # Runs in the loop's callback; MUST NOT raise (pitfall P1).
            try:
                on_notification(channel, str(payload))
            except Exception:  # pragma: no cover - on_notification never raises
                log.exception("trio-peers notification callback failed")

        def on_terminate(_conn: object) -> None:
            try:
                on_lost()
            except Exception:  # pragma: no cover
                log.exception("trio-peers connection-lost callback failed")

        with _mapped(connecting=True):
            conn, position = await _aio(_aio_session_connect, self._loop)(
                self._settings, on_terminate
            )
        return AsyncpgSessionConnection(
            conn, self._settings, self._loop, on_notify, position, self._memory
        )


@asynccontextmanager
async def fenced_transaction(
    conn: Connection, fence: Fence, *, cleanup_timeout: float
) -> AsyncIterator[Fence]:
    """Trio-flavoured: a transaction on the caller's asyncpg connection, opened with ``fence``.

    The connection belongs to the caller's own trio-asyncio loop (the current one). Each step
    is one ``aio_as_trio`` hop; ROLLBACK runs shielded under ``cleanup_timeout`` (a cancelled
    Trio-side transaction would otherwise never send it, DRIVER P2), falling back to
    ``terminate()``.
    """
    # BEGIN and COMMIT are inside the try, so that a cancellation at either (the tenure's
    # deadline right after the block's last statement, say) rolls back too: outside it, a
    # COMMIT that trio-asyncio never sent left the transaction open, holding the lease row
    # (FOR SHARE) against every election of the name until the connection was next used or
    # closed. A cancellation while the COMMIT is at the server leaves it committed or not
    # (the ROLLBACK after it then has nothing to undo), never open.
    try:
        await _aio(conn.execute)("BEGIN")
        try:
            row = await _aio(conn.fetchrow)(fence.sql, *fence.args)
        except (
            asyncpg.exceptions.SerializationError,
            asyncpg.exceptions.LockNotAvailableError,
        ) as exc:
            raise TenureLost(
                f"term {fence.term} of {fence.name!r} could not be fenced: {exc}"
            ) from exc
        if row is None:
            raise TenureLost(
                f"term {fence.term} of {fence.name!r} no longer holds the lease "
                f"(another tenure began, or the lease expired); rolled back"
            )
        yield fence
        await _aio(conn.execute)("COMMIT")
    except BaseException:
        with trio.move_on_after(cleanup_timeout, shield=True) as scope:
            try:
                await _aio(conn.execute)("ROLLBACK")
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError,  # (DRIVER P10: not an InterfaceError)
                OSError,
            ):
                conn.terminate()
        if scope.cancelled_caught:
            conn.terminate()
        raise


@asynccontextmanager
async def connect_once(dsn: str, *, connect_timeout: float) -> AsyncIterator[Connection]:
    """Trio-flavoured: a private loop and one connection, closed on exit (shielded, bounded)."""
    async with open_asyncio_loop():
        with _mapped(connecting=True):
            conn = await _aio(_aio_connect)(dsn, connect_timeout)
        try:
            yield conn
        finally:
            with trio.move_on_after(connect_timeout, shield=True) as scope:
                try:
                    await _aio(conn.close)()
                except Exception:
                    conn.terminate()
            if scope.cancelled_caught:
                conn.terminate()


async def migrate(
    dsn: str,
    *,
    prefix: str = "public",
    table: str = "trio_peers",
    unlogged: bool = False,
    connect_timeout: float = 10.0,
) -> bool:
    """Create the lease table (and its schema) if they do not exist.

    Idempotent and safe to run concurrently from many processes: the work runs
    in one transaction under an advisory lock. Afterwards it checks that the
    table has the shape trio-peers needs.

    Args:
      dsn: PostgreSQL URI.
      prefix: Schema of the table (created if missing).
      table: Table name.
      unlogged: Create an ``UNLOGGED`` table. Faster writes, but PostgreSQL
        empties it after a crash, which resets fencing terms to 1; the default
        (a logged table) keeps terms monotonic across crash-restarts.
      connect_timeout: Seconds allowed for connecting. Bound the whole call
        with :func:`trio.fail_after` if you need to.

    Returns:
      True if the table was created, False if it already existed.

    Raises:
      ValueError: ``prefix`` or ``table`` is not a valid identifier.
      BackendUnavailable: the server cannot be reached.
      BackendMisconfigured: bad DSN, authentication, database, or privileges.
      SchemaError: a table of that name exists with the wrong shape.

    .. versionadded:: 0.1
    """
    check_identifier("prefix", prefix)
    check_identifier("table", table)
    sql = Statements(prefix, table)
    async with connect_once(dsn, connect_timeout=connect_timeout) as conn:
        with _mapped():
            created: bool = await _aio(_aio_migrate)(conn, sql, unlogged)
    return created


async def fetch_position(dsn: str, *, connect_timeout: float = 10.0) -> ServerPosition:
    """Trio-flavoured: connect once and read the server's :class:`ServerPosition`.

    A multi-host DSN reads the server it connects to (by default a writable one).
    """
    async with connect_once(dsn, connect_timeout=connect_timeout) as conn:
        with _mapped():
            return await _aio(_aio_fetch_position)(conn, connect_timeout)


async def fetch_status(
    dsn: str, *, prefix: str = "public", table: str = "trio_peers", connect_timeout: float = 10.0
) -> tuple[list[Mapping[str, object]], bool, ServerPosition]:
    """Trio-flavoured: every row of a lease table with database-clock ``remaining`` seconds,
    whether the table is UNLOGGED, and the server's position (read-only or not, why)."""
    check_identifier("prefix", prefix)
    check_identifier("table", table)
    sql = Statements(prefix, table)
    async with connect_once(dsn, connect_timeout=connect_timeout) as conn:
        with _mapped():
            unlogged: bool = await _aio(_aio_check_table)(conn, sql, connect_timeout)
            rows: list[Record] = await _aio(conn.fetch)(sql.status, timeout=connect_timeout)
            position = await _aio(_aio_fetch_position)(conn, connect_timeout)
    return [dict(r.items()) for r in rows], unlogged, position


@asynccontextmanager
async def open_status_listener(
    dsn: str,
    *,
    on_notification: Callable[[str], None],
    on_lost: Callable[[], None],
    prefix: str = "public",
    table: str = "trio_peers",
    connect_timeout: float = 10.0,
) -> AsyncIterator[Callable[[], Awaitable[list[Mapping[str, object]]]]]:
    """Trio-flavoured: one connection that LISTENs on a lease table's channel (``trio-peers watch``).

    Checks the table, then LISTENs. ``on_notification(payload)`` and ``on_lost()``
    are called from the loop's callbacks: they must not block (exceptions are
    logged, never raised into the loop). Yields an async function that returns the
    table's rows as :func:`fetch_status` does, over this same connection.
    """
    from ._config import channel_for

    check_identifier("prefix", prefix)
    check_identifier("table", table)
    sql = Statements(prefix, table)
    channel = channel_for(prefix, table)

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:  # MUST NOT raise (pitfall P1)
            on_notification(str(payload))
        except Exception:  # pragma: no cover - the callers' callbacks do not raise
            log.exception("trio-peers status notification callback failed")

    def on_terminate(_conn: object) -> None:
        try:
            on_lost()
        except Exception:  # pragma: no cover
            log.exception("trio-peers status connection-lost callback failed")

    async with connect_once(dsn, connect_timeout=connect_timeout) as conn:
        with _mapped():
            await _aio(_aio_check_table)(conn, sql, connect_timeout)
            await _aio(conn.add_listener)(channel, on_notify)
        conn.add_termination_listener(on_terminate)

        async def poll() -> list[Mapping[str, object]]:
            with _mapped():
                rows: list[Record] = await _aio(conn.fetch)(sql.status, timeout=connect_timeout)
            return [dict(r.items()) for r in rows]

        yield poll
