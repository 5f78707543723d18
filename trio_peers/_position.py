"""Where a PostgreSQL server stands in its replication history, and whether it takes writes.

Pure: the query text, the value it becomes, and the decisions made from it. The asyncio side
(``_asyncpg``) runs the query.

Facts this rests on (PostgreSQL 15 and 18, measured):

* A standby has the ``system_identifier`` of the primary it was copied from; servers made by
  separate ``initdb`` runs differ. Timelines are comparable only within one system.
* Promotion starts a new timeline at once: the first 8 hex digits of
  ``pg_walfile_name(pg_current_wal_lsn())``, readable by any role.
  ``pg_control_checkpoint().timeline_id`` lags until the next checkpoint: never use it.
* During recovery (a standby) both ``pg_current_wal_lsn()`` and ``pg_walfile_name()`` refuse
  to run, so a standby reports no timeline; its replay position comes from
  ``pg_last_wal_replay_lsn()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, final

import attrs

from ._dsn import TargetSessionAttrs

#: One round trip; every function in it is executable by a plain login role.
#: ``pg_is_in_recovery()`` is read once: a server can leave recovery, never re-enter it
#: without a restart, so a stale ``true`` only costs the timeline of this one reading.
POSITION_QUERY: Final = """
SELECT s.recovering AS in_recovery,
       (SELECT system_identifier FROM pg_control_system()) AS system_identifier,
       CASE WHEN NOT s.recovering THEN pg_walfile_name(pg_current_wal_lsn()) END AS walfile,
       (CASE WHEN s.recovering THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text AS lsn,
       current_setting('default_transaction_read_only') AS default_transaction_read_only,
       current_setting('transaction_read_only') AS transaction_read_only
FROM (SELECT pg_is_in_recovery() AS recovering) AS s
"""


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` -> its 64-bit integer value; None stays None."""
    if text is None:
        return None
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not a WAL location (pg_lsn): {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def timeline_of_walfile(name: str) -> int:
    """The timeline id in a WAL file name (its first 8 hex digits)."""
    if len(name) != 24:
        raise ValueError(f"not a WAL file name: {name!r}")
    return int(name[:8], 16)


def _on(value: object) -> bool:
    return str(value).strip().lower() in {"on", "true", "yes", "1"}


@final
@attrs.frozen(kw_only=True)
class ServerPosition:
    """One reading of a server: which system, which timeline, writable or not."""

    system_identifier: int
    """``pg_control_system().system_identifier``: shared by a primary and its standbys."""
    timeline: int | None
    """The timeline id the server writes on; None during recovery (see :attr:`in_recovery`)."""
    in_recovery: bool
    """``pg_is_in_recovery()``: a standby (or a server not yet done with a promotion)."""
    lsn: int | None
    """The current WAL write location, or during recovery the last one replayed (None if no
    WAL has been replayed yet)."""
    default_transaction_read_only: bool
    """The setting a session starts with (``ALTER SYSTEM``, ``ALTER DATABASE``, a role...)."""
    transaction_read_only: bool
    """Whether the session reading this could write: always on during recovery."""

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> ServerPosition:
        """The value of one row of :data:`POSITION_QUERY`."""
        walfile = row["walfile"]
        sysid = row["system_identifier"]
        lsn = row["lsn"]
        if not isinstance(sysid, int):
            raise ValueError(f"unexpected system_identifier: {sysid!r}")
        return cls(
            system_identifier=sysid,
            timeline=timeline_of_walfile(walfile) if isinstance(walfile, str) else None,
            in_recovery=row["in_recovery"] is True,
            lsn=parse_lsn(lsn) if isinstance(lsn, str) else None,
            default_transaction_read_only=_on(row["default_transaction_read_only"]),
            transaction_read_only=_on(row["transaction_read_only"]),
        )

    @property
    def writable(self) -> bool:
        """Whether a new session here can write (libpq's ``read-write``)."""
        return self.read_only_reason is None

    @property
    def read_only_reason(self) -> str | None:
        """Why a session here cannot write, naming the setting; None if it can."""
        if self.in_recovery:
            return "it is in recovery (a hot standby: pg_is_in_recovery() is true)"
        if self.default_transaction_read_only:
            return "default_transaction_read_only is on"
        if self.transaction_read_only:
            return "transaction_read_only is on"
        return None

    def matches(self, target: TargetSessionAttrs) -> bool:
        """Whether this server is of the kind ``target_session_attrs=target`` asks for.

        ``prefer-standby`` matches standbys only; the caller falls back to any server.
        """
        if target == "any":
            return True
        if target == "read-write":
            return self.writable
        if target == "read-only":
            return not self.writable
        if target == "primary":
            return not self.in_recovery
        # "standby" and "prefer-standby"
        return self.in_recovery
