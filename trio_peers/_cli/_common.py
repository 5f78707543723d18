"""What every part of the command line shares: exit codes, expected errors, output, DSNs.

Expected failures print one line to stderr and exit with a code that says what
kind of failure it was (see :data:`EXIT_CODES_HELP`); only bugs show a
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, TextIO, TypeVar
from urllib.parse import parse_qsl, urlsplit

import trio

from .._dsn import parse_multihost
from .._exceptions import (
    BackendMisconfigured,
    BackendUnavailable,
    PeerError,
    SchemaError,
    TableMissing,
)

T = TypeVar("T")

PROG: Final = "trio-peers"

EXIT_OK: Final = 0
#: The demo saw two leaders at once, or could not run its schedule.
EXIT_FAILURE: Final = 1
#: Bad command line, or no database given.
EXIT_USAGE: Final = 2
#: The database cannot be reached (refused, timed out, unknown host, shutting down).
EXIT_UNAVAILABLE: Final = 3
#: Permanent configuration problem: invalid DSN, authentication, missing
#: database, missing privileges, no PostgreSQL binaries for the demo.
EXIT_MISCONFIGURED: Final = 4
#: The lease table is missing or has the wrong shape.
EXIT_SCHEMA: Final = 5
#: Stopped by Ctrl-C (SIGINT) or SIGTERM (the demo only; ``watch`` exits 0).
EXIT_INTERRUPTED: Final = 130

EXIT_CODES_HELP: Final = """\
exit status:
  0    success (watch: also after Ctrl-C)
  1    demo: two processes led at once, or the demo could not run
  2    usage error, or no database given
  3    database unavailable (refused, timed out, unknown host)
  4    misconfigured: invalid DSN, authentication, missing database or privileges
  5    the lease table is missing (run `trio-peers migrate`) or has the wrong shape
  130  demo interrupted by Ctrl-C
"""

DSN_HELP: Final = """\
database:
  --dsn takes a PostgreSQL URI: postgresql://user:password@host:5432/dbname
  Without --dsn, the URI in $TRIO_PEERS_DSN is used; failing that, the
  standard libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE,
  ...) when any of them is set. Passwords are never printed.
"""

#: libpq environment variables that asyncpg reads when the DSN names no host/user/...
LIBPQ_ENV: Final = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSERVICE",
    "PGPASSFILE",
    "PGSSLMODE",
)
ENV_DSN: Final = "TRIO_PEERS_DSN"


class CLIError(Exception):
    """An expected failure: print ``message`` as one line, exit with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- helpers


def _out(text: str = "", *, stream: TextIO | None = None) -> None:
    """Write one line and flush (output is often piped, and watch runs forever)."""
    stream = sys.stdout if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def resolve_dsn(dsn: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN to use: ``--dsn``, else ``$TRIO_PEERS_DSN``, else libpq's environment.

    Returns ``"postgresql://"`` (asyncpg then reads ``PGHOST`` and friends) when
    only libpq variables are set, and ``None`` when nothing names a database.
    """
    env = os.environ if environ is None else environ
    if dsn:
        return dsn
    from_env = env.get(ENV_DSN, "").strip()
    if from_env:
        return from_env
    if any(env.get(name) for name in LIBPQ_ENV):
        return "postgresql://"
    return None


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a URI for display (``h1:p1,h2:p2/dbname`` for several hosts);
    never the user's password."""
    try:
        parts = urlsplit(dsn)
        multi = parse_multihost(dsn)
        if multi is not None:
            where = ",".join(str(host) for host in multi.hosts)
        else:
            query = dict(parse_qsl(parts.query))
            host = parts.hostname or query.get("host") or os.environ.get("PGHOST") or "localhost"
            port = parts.port or query.get("port") or os.environ.get("PGPORT") or 5432
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except ValueError:
        return "(unparsable DSN)"
    db = parts.path.lstrip("/") or os.environ.get("PGDATABASE") or "(default database)"
    return f"{where}/{db}"


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _cli_error(exc: PeerError) -> CLIError:
    message = _one_line(str(exc))
    if isinstance(exc, TableMissing):
        return CLIError(f"table missing: {message}", EXIT_SCHEMA)
    if isinstance(exc, SchemaError):
        return CLIError(f"schema error: {message}", EXIT_SCHEMA)
    if isinstance(exc, BackendMisconfigured):
        return CLIError(f"misconfigured: {message}", EXIT_MISCONFIGURED)
    if isinstance(exc, BackendUnavailable):
        return CLIError(f"database unavailable: {message}", EXIT_UNAVAILABLE)
    return CLIError(message, EXIT_FAILURE)  # pragma: no cover - every PeerError is above


def run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run`` a zero-argument async function, mapping expected errors to :class:`CLIError`.

    The library's one-shot helpers can raise their errors inside an exception
    group (from trio-asyncio's loop); unwrap single-member groups first.
    """
    try:
        return trio.run(fn)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, CLIError):
            raise leaf from None
        if isinstance(leaf, PeerError):
            raise _cli_error(leaf) from None
        if leaf is not exc:
            raise leaf from None
        raise
