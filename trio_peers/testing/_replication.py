"""Streaming replication for tests: a primary with one hot standby, failover and faults.

Synchronous, subprocess-only code, like :mod:`trio_peers.testing._postgres` (from Trio, call it
through :func:`trio.to_thread.run_sync`). Every server and directory made here is registered
with that module's watchdog, so nothing is left behind even if the test process is killed.

What a :class:`ReplicatedPair` offers, each the real PostgreSQL mechanism:

* :meth:`ReplicatedPair.start`: a primary (``wal_level=replica``) and a standby made with
  ``pg_basebackup -R`` (its own replication slot, ``hot_standby=on``), streaming asynchronously
  or, with ``synchronous=True``, synchronously (``synchronous_standby_names``; commits run with
  the default ``synchronous_commit=on``, so each waits for the standby's flush).
* :meth:`ReplicatedPair.cut` / :meth:`ReplicatedPair.resume`: the standby's
  ``primary_conninfo`` is emptied (and restored) with ``ALTER SYSTEM`` and a reload, which stops
  its WAL receiver: commits on the primary then no longer reach the standby, so a promotion
  loses them (with asynchronous replication; with synchronous replication they block instead).
* :meth:`ReplicatedPair.promote`: ``pg_promote()`` on the standby; the timeline id goes up.
* the old primary is an ordinary :class:`PostgresServer`: :meth:`~PostgresServer.freeze` it,
  :meth:`~PostgresServer.stop` it, or :meth:`ReplicatedPair.restart_old_primary` it after a
  promotion, which makes it a second writable server of the same system.
* :class:`BlackHole`: a TCP port that accepts connections and never answers.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self, final

from ._postgres import (
    _HOST,
    _SUPERUSER,
    PostgresServer,
    PostgresServerError,
    _make_private_dir,
    _registry,
    _server_env,
    _Settings,
    find_postgres_bindir,
)

__all__ = [
    "REPLICATION_SETTINGS",
    "BlackHole",
    "ReplicatedPair",
    "start_standby",
    "system_identifier",
    "timeline",
    "wait_until",
]

#: Settings of both servers of a pair, on top of the harness's defaults.
REPLICATION_SETTINGS: Final[_Settings] = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    # Not on the command line: the default ("on") holds, and synchronous_standby_names, set
    # with ALTER SYSTEM, decides whether a commit waits for the standby.
    "synchronous_commit": None,
    # Stream WAL soon after each commit, and reconnect soon after resume().
    "wal_writer_delay": "10ms",
    "wal_retrieve_retry_interval": "100ms",
    "wal_receiver_status_interval": "1s",
}

_STANDBY_NAME: Final = "standby1"


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.01
) -> None:
    """Call ``predicate`` until it returns True; raise PostgresServerError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise PostgresServerError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(poll)


def timeline(server: PostgresServer) -> int:
    """The timeline id a primary writes on, as a plain role sees it at once after promotion.

    The first 8 hex digits of ``pg_walfile_name(pg_current_wal_lsn())``. Raises
    PostgresServerError on a server in recovery (both functions refuse to run there).
    """
    rows = server.execute(
        "SELECT pg_is_in_recovery(), CASE WHEN NOT pg_is_in_recovery() "
        "THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END"
    )
    recovering, prefix = rows[0]
    if recovering or not isinstance(prefix, str):
        raise PostgresServerError(f"{server!r} is in recovery: it has no timeline of its own")
    return int(prefix, 16)


def system_identifier(server: PostgresServer) -> int:
    """``pg_control_system().system_identifier``: the same on a primary and its standbys."""
    value = server.execute("SELECT system_identifier FROM pg_control_system()")[0][0]
    if not isinstance(value, int):  # pragma: no cover
        raise PostgresServerError(f"unexpected system_identifier: {value!r}")
    return value


def _in_recovery(server: PostgresServer) -> bool:
    return server.execute("SELECT pg_is_in_recovery()")[0][0] is True


def _run_tool(server: PostgresServer, exe: str, *args: str, timeout: float) -> None:
    """Run one of ``server``'s binaries (pg_basebackup, ...) as the server's OS user."""
    cmd = [str(server.bindir / exe), *args]
    try:
        proc = subprocess.run(  # noqa: S603 (the binaries we were told to use)
            cmd,
            user=server._user,
            cwd="/",
            env=_server_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresServerError(f"could not run {exe}: {exc}") from exc
    if proc.returncode != 0:
        raise PostgresServerError(
            f"{exe} failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )


def start_standby(
    primary: PostgresServer, *, name: str = _STANDBY_NAME, timeout: float = 60.0
) -> PostgresServer:
    """Make a hot standby of ``primary`` with ``pg_basebackup -R`` and start it.

    The standby streams from its own replication slot, called ``name`` (which is also its
    ``application_name`` on the primary), and runs with the primary's command-line settings.
    Returns once the primary reports it ``streaming``. ``primary`` needs ``wal_level=replica``
    and WAL senders: start it with ``settings=REPLICATION_SETTINGS``.
    """
    user = primary._user
    root = _make_private_dir("trio-peers-pg-", user)
    _registry.watch(root, None)
    data = root / "data"
    try:
        _run_tool(
            primary,
            "pg_basebackup",
            *("--pgdata", str(data)),
            "--write-recovery-conf",
            *("--wal-method", "stream"),
            *("--checkpoint", "fast"),
            "--no-sync",
            *("--create-slot", "--slot", name),
            *(
                "--dbname",
                f"host={_HOST} port={primary.port} user={_SUPERUSER} application_name={name}",
            ),
            timeout=timeout,
        )
        # The copy brings the primary's ALTER SYSTEM settings along; a standby that waited for
        # a synchronous standby of its own once promoted would hang every commit.
        _drop_auto_setting(data, "synchronous_standby_names")
    except BaseException:
        with contextlib.suppress(Exception):
            primary.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1",
                name,
            )
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        _registry.forget(root)
        raise
    standby = PostgresServer._start_in(
        root, bindir=primary.bindir, user=user, timeout=timeout, settings=primary._overrides
    )
    try:
        wait_until(
            lambda: _streaming(primary, name), timeout=timeout, what=f"{name} streams from primary"
        )
    except BaseException:
        standby.close()
        raise
    return standby


def _drop_auto_setting(data: Path, setting: str) -> None:
    auto = data / "postgresql.auto.conf"
    lines = auto.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.split("=", 1)[0].strip() != setting]
    if kept != lines:
        auto.write_text("".join(kept))


def _streaming(primary: PostgresServer, name: str) -> bool:
    rows = primary.execute(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 "
        "AND state = 'streaming'",
        name,
    )
    return rows[0][0] == 1


def _has_walsender(primary: PostgresServer, name: str) -> bool:
    rows = primary.execute(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", name
    )
    count = rows[0][0]
    return isinstance(count, int) and count > 0


@final
class ReplicatedPair:
    """A primary and one streaming hot standby, for failover tests.

    Create one with :meth:`start`; :meth:`close` (or ``with``) removes both servers. After
    :meth:`promote`, :attr:`standby` is the new primary and :attr:`primary` the old one (still
    running, frozen or stopped, as the test left it).
    """

    def __init__(self, primary: PostgresServer, standby: PostgresServer, name: str) -> None:
        # Private: use ReplicatedPair.start().
        self.primary = primary
        self.standby = standby
        self.name = name
        self._conninfo = str(standby.execute("SHOW primary_conninfo")[0][0])
        self._synchronous = False

    @classmethod
    def start(
        cls,
        bindir: str | Path | None = None,
        *,
        synchronous: bool = False,
        timeout: float = 60.0,
    ) -> Self:
        """Start a primary and a standby streaming from it (see :func:`start_standby`)."""
        found = find_postgres_bindir() if bindir is None else Path(bindir)
        primary = PostgresServer.start(found, timeout=timeout, settings=REPLICATION_SETTINGS)
        try:
            standby = start_standby(primary, timeout=timeout)
        except BaseException:
            primary.close()
            raise
        try:
            pair = cls(primary, standby, _STANDBY_NAME)
            pair.set_synchronous(synchronous)
        except BaseException:
            standby.close()
            primary.close()
            raise
        return pair

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
        mode = "synchronous" if self._synchronous else "asynchronous"
        return f"<ReplicatedPair {self.primary!r} -> {self.standby!r} ({mode})>"

    def close(self) -> None:
        """Close both servers (idempotent)."""
        try:
            self.standby.close()
        finally:
            self.primary.close()

    @property
    def synchronous(self) -> bool:
        """Whether commits on the primary wait for the standby (see :meth:`set_synchronous`)."""
        return self._synchronous

    def set_synchronous(self, synchronous: bool, *, timeout: float = 30.0) -> None:
        """Switch the primary between synchronous and asynchronous replication.

        ``ALTER SYSTEM SET synchronous_standby_names`` and a reload; returns once the primary
        reports the standby's ``sync_state`` accordingly (while it is connected at all).
        """
        value = self.name if synchronous else ""
        self.primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{value}'")
        self.primary.execute("SELECT pg_reload_conf()")
        self._synchronous = synchronous
        want = "sync" if synchronous else "async"

        def applied() -> bool:
            rows = self.primary.execute(
                "SELECT current_setting('synchronous_standby_names'), "
                "(SELECT sync_state FROM pg_stat_replication WHERE application_name = $1)",
                self.name,
            )
            setting, state = rows[0]
            return setting == value and state in {want, None}

        wait_until(applied, timeout=timeout, what=f"the primary replicates {want}hronously")

    def wait_replayed(self, *, timeout: float = 30.0) -> None:
        """Wait until the standby has replayed all WAL the primary has flushed so far."""
        target = self.primary.execute("SELECT pg_current_wal_flush_lsn()::text")[0][0]

        def replayed() -> bool:
            rows = self.standby.execute(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target
            )
            return rows[0][0] is True

        wait_until(replayed, timeout=timeout, what=f"the standby replayed WAL up to {target}")

    def cut(self, *, timeout: float = 30.0) -> None:
        """Stop replication: later commits on the primary do not reach the standby.

        Empties the standby's ``primary_conninfo`` (``ALTER SYSTEM`` and a reload), which
        makes it stop its WAL receiver and start none; returns once the standby has no WAL
        receiver and the primary no WAL sender for it any more. With asynchronous replication, what the primary commits from
        now on is lost by a :meth:`promote`; with synchronous replication those commits wait.
        """
        self.standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
        self.standby.execute("SELECT pg_reload_conf()")
        wait_until(
            lambda: (
                self.standby.execute("SELECT count(*) FROM pg_stat_wal_receiver")[0][0] == 0
                and not _has_walsender(self.primary, self.name)
            ),
            timeout=timeout,
            what="the standby has no WAL receiver, and the primary no WAL sender for it",
        )

    def resume(self, *, timeout: float = 30.0) -> None:
        """Undo :meth:`cut`: restore ``primary_conninfo``; wait until the standby streams."""
        self.standby.execute(
            "ALTER SYSTEM SET primary_conninfo = " + _quote_literal(self._conninfo)
        )
        self.standby.execute("SELECT pg_reload_conf()")
        wait_until(
            lambda: _streaming(self.primary, self.name),
            timeout=timeout,
            what="the standby streams again",
        )

    def promote(self, *, timeout: float = 60.0) -> float:
        """Promote the standby (``pg_promote()``); return the seconds until it was writable.

        The old primary is left as it is: stop or freeze it first, as a failover manager
        would (or leave it running, for a split brain).
        """
        t0 = time.monotonic()
        done = self.standby.execute("SELECT pg_promote(true, $1)", max(1, round(timeout)))
        elapsed = time.monotonic() - t0
        if done[0][0] is not True or _in_recovery(self.standby):
            raise PostgresServerError(
                f"the standby was not promoted within {timeout} s:\n{self.standby.log_tail()}"
            )
        return elapsed

    def restart_old_primary(self) -> None:
        """Start the old primary again after a promotion: a second writable server.

        Stops it first if it still runs, as a crash: an immediate stop, or :meth:`crash
        <PostgresServer.crash>` if it is frozen (thawed, its backends would first run what
        clients sent them while frozen). Clears ``synchronous_standby_names`` there, so that
        its commits do not wait for a standby that follows another primary now.
        """
        if self.primary.is_frozen:
            self.primary.crash()
        elif self.primary.is_running:
            self.primary.stop("immediate")
        self.primary.start_again()
        self.primary.execute("ALTER SYSTEM RESET synchronous_standby_names")
        self.primary.execute("SELECT pg_reload_conf()")
        wait_until(
            lambda: self.primary.execute("SHOW synchronous_standby_names")[0][0] == "",
            timeout=30,
            what="the old primary replicates asynchronously",
        )


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@final
class BlackHole:
    """A TCP port on 127.0.0.1 that accepts connections and never answers.

    The kernel completes every TCP handshake (up to the listen backlog; later ones hang in
    SYN) and nothing ever reads, writes or closes: a client only notices through its own
    timeout, as with a server whose machine hung. ``port=None`` picks a free port; give one
    to black-hole the port of a stopped server.
    """

    def __init__(self, port: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((_HOST, port or 0))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port: int = sock.getsockname()[1]

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return _HOST

    @property
    def dsn(self) -> str:
        """A DSN that points at the black hole."""
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self.port}/postgres"

    def close(self) -> None:
        """Stop listening; connections waiting in the backlog are reset. Idempotent."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
