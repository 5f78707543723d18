"""`PeerConfig`: every setting of a peer, validated when it is built."""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from typing import Final, final

import attrs

#: PostgreSQL truncates identifiers (and so LISTEN channel names) to 63 bytes.
MAX_IDENTIFIER_BYTES: Final = 63
#: Longest ``name`` / ``node`` accepted. NOTIFY payloads carry the name and are
#: limited to 8000 bytes, and index entries should stay small.
MAX_NAME_BYTES: Final = 512
#: Smallest ``max_clock_drift`` accepted. Crystal oscillators drift by up to about 1e-4
#: (100 ppm), NTP slews clocks by up to 5e-4 (500 ppm), and a VM's clock can do worse; a
#: smaller margin than this protects against nothing real.
MIN_CLOCK_DRIFT: Final = 0.001
#: Largest ``max_clock_drift`` accepted.
MAX_CLOCK_DRIFT: Final = 0.25

#: Longest duration accepted for any setting in seconds (about 31 years). PostgreSQL's
#: ``interval`` and Trio's deadlines hold far more; a larger value is a mistake, found here
#: rather than as a failing statement.
MAX_SECONDS: Final = 1e9

_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def default_node() -> str:
    """Return an owner id unique to this process: ``host:pid:random``.

    Never the bare hostname: several processes on one host (workers of one
    web server, say) must not share an identity (oban-py#32).
    """
    host = socket.gethostname() or "localhost"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


def check_identifier(field: str, value: object) -> str:
    """Validate a schema or table name; return it.

    Only ``[A-Za-z_][A-Za-z0-9_]*`` up to 63 bytes is accepted. trio-peers
    always quotes identifiers in SQL, so case is kept as given. Refusing dots
    and quotes keeps the derived channel name ``<schema>.<table>`` unambiguous.
    """
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    if not _IDENT_RE.match(value):
        raise ValueError(
            f"{field}={value!r} is not a valid identifier: use letters, digits and "
            f"underscores, starting with a letter or underscore"
        )
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{field}={value!r} is {len(value.encode())} bytes long; PostgreSQL "
            f"identifiers are at most {MAX_IDENTIFIER_BYTES} bytes: choose a shorter {field}"
        )
    return value


def channel_for(prefix: str, table: str) -> str:
    """The LISTEN/NOTIFY channel of a lease table: ``"<prefix>.<table>"``.

    Distinct tables never share a channel because identifiers cannot contain dots.
    """
    channel = f"{prefix}.{table}"
    if len(channel.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"the NOTIFY channel {channel!r} derived from prefix and table is "
            f"{len(channel.encode())} bytes; PostgreSQL channel names are at most "
            f"{MAX_IDENTIFIER_BYTES} bytes: shorten prefix or table"
        )
    return channel


def _finite(value: float) -> bool:
    """``math.isfinite``, also for an int too large for a float (which it cannot take)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_text(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    if not value or value.strip() != value:
        raise ValueError(
            f"{field}={value!r} must be a non-empty string without leading or trailing spaces"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"{field}={value!r} is not valid Unicode text (it holds a lone surrogate, as "
            "decoding bytes with errors='surrogateescape' makes): decode it properly"
        ) from None
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"{field} is longer than {MAX_NAME_BYTES} bytes: choose a shorter {field}"
        )
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{field}={value!r} must not contain control characters")


def _check_seconds(field: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be a number of seconds, got {type(value).__name__}")
    if not _finite(value) or value < 0 or (value == 0 and not allow_zero):
        what = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{field}={value!r} must be {what} (seconds)")
    if value > MAX_SECONDS:
        raise ValueError(
            f"{field}={value!r} is more than {MAX_SECONDS:.0e} seconds (about 31 years): "
            "give a duration in seconds"
        )


def _validate_dsn(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"dsn must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(
            "dsn must not be empty: pass a PostgreSQL URI such as "
            "'postgresql://user@host:5432/dbname'"
        )
    if "://" in value and not value.startswith(("postgres://", "postgresql://", "memory://")):
        raise ValueError(
            f"dsn must start with 'postgresql://' or 'postgres://' (or 'memory://' for "
            f"trio_peers.testing.MemoryBackend), got {value.split('://')[0]!r}://"
        )


def _validate_name(_inst: object, attr: attrs.Attribute[str], value: object) -> None:
    _check_text(attr.name, value)


def _validate_ident(_inst: object, attr: attrs.Attribute[str], value: object) -> None:
    check_identifier(attr.name, value)


def _validate_positive(_inst: object, attr: attrs.Attribute[float], value: object) -> None:
    _check_seconds(attr.name, value)


def _validate_optional_positive(
    _inst: object, attr: attrs.Attribute[float | None], value: object
) -> None:
    if value is not None:
        _check_seconds(attr.name, value)


def _validate_boost(_inst: object, _attr: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"leader_boost must be a number, got {type(value).__name__}")
    if not _finite(value) or value < 1:
        raise ValueError(
            f"leader_boost={value!r} must be >= 1 (the leader renews every interval / leader_boost)"
        )


def _validate_drift(_inst: object, _attr: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"max_clock_drift must be a number, got {type(value).__name__}")
    if not _finite(value) or not MIN_CLOCK_DRIFT <= value <= MAX_CLOCK_DRIFT:
        raise ValueError(
            f"max_clock_drift={value!r} must be between {MIN_CLOCK_DRIFT} and "
            f"{MAX_CLOCK_DRIFT} (a relative clock-rate difference, e.g. 0.01 for 1%): "
            f"real clocks drift (NTP alone slews them by up to 0.0005), so a smaller "
            f"value would leave no safety margin; use at least {MIN_CLOCK_DRIFT}"
        )


def _validate_bool(_inst: object, attr: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be True or False, got {value!r}")


@final
@attrs.frozen(kw_only=True)
class PeerConfig:
    """Settings of one peer. Frozen, keyword-only, validated on construction.

    Bad values raise :exc:`ValueError` or :exc:`TypeError` naming the field.

    .. versionadded:: 0.1
    """

    dsn: str = attrs.field(validator=_validate_dsn, repr=False)
    """PostgreSQL URI (``postgresql://user:pass@host:port/db``). Not shown in ``repr``."""

    name: str = attrs.field(default="default", validator=_validate_name)
    """Instance name: peers with the same ``name`` elect one leader among them."""

    node: str = attrs.field(factory=default_node, validator=_validate_name)
    """This process's owner id. The default, ``host:pid:random``, is unique per
    process; if you set it, keep it unique per process (a shared value still never
    yields two leaders, because renewals are scoped to the tenure's ``term``)."""

    interval: float = attrs.field(default=30.0, validator=_validate_positive)
    """Lease length and follower poll period, in seconds."""

    leader_boost: float = attrs.field(default=2.0, validator=_validate_boost)
    """The leader renews every ``interval / leader_boost`` seconds (minus jitter)."""

    prefix: str = attrs.field(default="public", validator=_validate_ident)
    """Schema of the lease table."""

    table: str = attrs.field(default="trio_peers", validator=_validate_ident)
    """Name of the lease table."""

    listen: bool = attrs.field(default=True, validator=_validate_bool)
    """LISTEN for resign notifications (fast handover), and prepare the election
    statements once per connection. Set ``False`` behind a pooler in transaction
    mode (PgBouncer, Supavisor) or wherever LISTEN is unavailable: the peer then
    uses neither LISTEN nor named prepared statements; everything still works,
    and a graceful handover takes up to one ``interval``."""

    max_clock_drift: float = attrs.field(default=0.01, validator=_validate_drift)
    """Largest relative rate difference tolerated between this process's
    monotonic clock and the database server's clock (0.01 = 1%). The leader stops
    trusting its lease ``interval * max_clock_drift`` seconds before it could
    expire in the database; see :doc:`/timing`. At least 0.001: smaller values
    would leave no margin for real clocks (NTP alone slews by up to 0.05%)."""

    connect_timeout: float = attrs.field(default=10.0, validator=_validate_positive)
    """Seconds allowed to open a database connection."""

    statement_timeout: float | None = attrs.field(
        default=None, validator=_validate_optional_positive
    )
    """Seconds allowed for one election or renewal statement. ``None`` (default)
    means ``min(5, interval / 4)``. Must not exceed ``interval / 2``."""

    cleanup_timeout: float = attrs.field(default=5.0, validator=_validate_positive)
    """Seconds allowed, on exit, to resign (delete-or-expire the row and NOTIFY)
    and close the connection, even when the surrounding scope is cancelled."""

    def __attrs_post_init__(self) -> None:
        channel_for(self.prefix, self.table)
        if self.statement_timeout is not None and self.statement_timeout > self.interval / 2:
            raise ValueError(
                f"statement_timeout={self.statement_timeout!r} must be at most interval / 2 "
                f"({self.interval / 2!r}): a renewal must be able to fail and be retried "
                "before the lease runs out; raise interval or lower statement_timeout"
            )

    @property
    def channel(self) -> str:
        """The NOTIFY channel, derived from :attr:`prefix` and :attr:`table`."""
        return channel_for(self.prefix, self.table)

    @property
    def effective_statement_timeout(self) -> float:
        """:attr:`statement_timeout`, or its default ``min(5, interval / 4)``."""
        if self.statement_timeout is not None:
            return self.statement_timeout
        return min(5.0, self.interval / 4)

    @property
    def trust_margin(self) -> float:
        """Seconds by which local trust ends before the database lease can expire."""
        return self.interval * self.max_clock_drift
