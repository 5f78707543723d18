"""Multi-host DSN parsing and server positions (pure: trio_peers._dsn, trio_peers._position)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_peers._dsn import (
    DEFAULT_TARGET_SESSION_ATTRS,
    TARGET_SESSION_ATTRS,
    HostPort,
    parse_multihost,
)
from trio_peers._position import ServerPosition, parse_lsn, timeline_of_walfile

NO_ENV: dict[str, str] = {}


def hosts_of(dsn: str, env: dict[str, str] = NO_ENV) -> list[str]:
    parsed = parse_multihost(dsn, environ=env)
    assert parsed is not None
    return [str(h) for h in parsed.hosts]


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@db1:5432/app",
        "postgresql://u@db1/app?target_session_attrs=read-write",
        "postgresql:///app",
        "postgresql://u@/app?host=db1",
        "host=db1,db2 dbname=app",  # key=value: left to asyncpg, as before
        "memory://x",
    ],
)
def test_single_host_dsns_are_left_to_asyncpg(dsn: str) -> None:
    assert parse_multihost(dsn, environ=NO_ENV) is None


def test_hosts_and_ports_from_the_authority() -> None:
    dsn = "postgresql://u:p%40ss@db1:5433,db2,[::1]:6000,%2Frun%2Fpg/app?sslmode=disable"
    parsed = parse_multihost(dsn, environ=NO_ENV)
    assert parsed is not None
    assert parsed.hosts == (
        HostPort("db1", 5433),
        HostPort("db2", 5432),
        HostPort("::1", 6000),
        HostPort("/run/pg", 5432),
    )
    assert parsed.target_session_attrs == DEFAULT_TARGET_SESSION_ATTRS == "read-write"
    assert parsed.dsn == dsn
    assert "p%40ss" not in repr(parsed)  # the DSN (and its password) is not in the repr
    assert str(HostPort("::1", 6000)) == "[::1]:6000"


def test_hosts_and_ports_from_the_query() -> None:
    assert hosts_of("postgresql://u@/app?host=a,b&port=7,8") == ["a:7", "b:8"]
    assert hosts_of("postgresql://u@/app?host=a,b&port=7") == ["a:7", "b:7"]
    # A port in the host list wins over the port parameter.
    assert hosts_of("postgresql://u@a:1,b/app?port=9") == ["a:1", "b:9"]


def test_ports_from_the_environment() -> None:
    assert hosts_of("postgresql://u@a,b/app", {"PGPORT": "6543"}) == ["a:6543", "b:6543"]
    assert hosts_of("postgresql://u@a,b/app", {"PGPORT": "1,2"}) == ["a:1", "b:2"]
    # An empty item is the default port, as in libpq (it was taken as the next item).
    assert hosts_of("postgresql://u@a,b/app", {"PGPORT": ",5433"}) == ["a:5432", "b:5433"]
    assert hosts_of("postgresql://u@/app?host=a,b&port=7,", {}) == ["a:7", "b:5432"]
    # The port parameter wins over PGPORT, whose item count is then not checked.
    assert hosts_of("postgresql://u@a,b/app?port=9", {"PGPORT": "1,2,3"}) == ["a:9", "b:9"]


def test_hosts_from_the_environment() -> None:
    """A DSN that names no host takes PGHOST's list, as asyncpg does: it is a multi-host DSN.

    Regression: it was taken for a single-host DSN, so asyncpg connected with its own
    default ``target_session_attrs=any`` and a peer could elect on a standby.
    """
    env = {"PGHOST": "standby,primary:5433", "PGPORT": "6000"}
    assert hosts_of("postgresql:///app", env) == ["standby:6000", "primary:5433"]
    parsed = parse_multihost("postgresql://u@/app", environ=env)
    assert parsed is not None
    assert parsed.target_session_attrs == "read-write"
    # The DSN's own hosts win over PGHOST.
    assert hosts_of("postgresql://u@a,b/app", env) == ["a:6000", "b:6000"]
    assert parse_multihost("postgresql://u@db1/app", environ=env) is None
    assert parse_multihost("postgresql:///app", environ={"PGHOST": "db1"}) is None
    # A service file's hosts come before PGHOST's (asyncpg, libpq): left to asyncpg.
    # Regression: PGHOST's hosts were used and the service's never tried.
    assert parse_multihost("postgresql:///app?service=prod", environ=env) is None
    assert hosts_of("postgresql:///app?service=prod&host=a,b", env) == ["a:6000", "b:6000"]


def test_query_hosts_are_decoded_once() -> None:
    """parse_qsl has decoded ?host= already; decoding again read %252F as '/'."""
    assert hosts_of("postgresql://u@/app?host=%2Frun%2Fpg,b") == ["/run/pg:5432", "b:5432"]
    assert hosts_of("postgresql://u@/app?host=%252Fx,b") == ["%2Fx:5432", "b:5432"]


@pytest.mark.parametrize("attrs", TARGET_SESSION_ATTRS)
def test_target_session_attrs(attrs: str) -> None:
    parsed = parse_multihost(f"postgresql://a,b/x?target_session_attrs={attrs}", environ=NO_ENV)
    assert parsed is not None
    assert parsed.target_session_attrs == attrs
    from_env = parse_multihost("postgresql://a,b/x", environ={"PGTARGETSESSIONATTRS": attrs})
    assert from_env is not None
    assert from_env.target_session_attrs == attrs


@pytest.mark.parametrize(
    ("dsn", "needle"),
    [
        ("postgresql://u@a,,b/app", "empty host"),
        ("postgresql://u@a,/app", "empty host"),
        ("postgresql://u@a:x,b/app", "'x' is not a port number"),
        ("postgresql://u@a:0,b/app", "'0' is not a port number"),
        ("postgresql://u@a:70000,b/app", "'70000' is not a port number"),
        ("postgresql://u@[::1]x,b/app", "IPv6"),
        ("postgresql://u@/app?host=a,b&port=1,2,3", "3 ports in port='1,2,3' for 2 hosts"),
        ("postgresql://u@/app?host=a,b&port=1,z", "the port parameter: 'z'"),
        ("postgresql://u@a,b,c/app", "2 ports in PGPORT='1,2' for 3 hosts"),
        ("postgresql:///app", "an empty host name"),
        ("postgresql://u@a,b/app?target_session_attrs=master", "target_session_attrs='master'"),
    ],
)
def test_malformed_multihost_dsns(dsn: str, needle: str) -> None:
    env = {"PGPORT": "1,2", "PGHOST": "a,"}
    with pytest.raises(ValueError, match="multi-host DSN") as info:
        parse_multihost(dsn, environ=env)
    assert needle in str(info.value)


def test_dsn_that_is_no_uri() -> None:
    with pytest.raises(ValueError, match="not a valid URI: Invalid IPv6 URL"):
        parse_multihost("postgresql://u@[::1,b/app", environ=NO_ENV)


host_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
ports = st.none() | st.integers(1, 65535)


@given(st.lists(st.tuples(host_names, ports), min_size=2, max_size=6))
def test_host_lists_round_trip(hosts: list[tuple[str, int | None]]) -> None:
    spec = ",".join(h if p is None else f"{h}:{p}" for h, p in hosts)
    parsed = parse_multihost(f"postgresql://user:pw@{spec}/db?sslmode=disable", environ=NO_ENV)
    assert parsed is not None
    assert parsed.hosts == tuple(HostPort(h, 5432 if p is None else p) for h, p in hosts)


# ---------------------------------------------------------------- ServerPosition


def row(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "in_recovery": False,
        "system_identifier": 7714277957131734220,
        "walfile": "00000002000000000000000A",
        "lsn": "0/A0001B8",
        "default_transaction_read_only": "off",
        "transaction_read_only": "off",
    }
    base.update(changes)
    return base


def test_position_of_a_primary() -> None:
    pos = ServerPosition.from_row(row())
    assert pos.timeline == 2
    assert pos.lsn == 0xA0001B8
    assert pos.writable
    assert pos.read_only_reason is None
    assert [t for t in TARGET_SESSION_ATTRS if pos.matches(t)] == ["any", "read-write", "primary"]


def test_position_of_a_standby() -> None:
    pos = ServerPosition.from_row(
        row(in_recovery=True, walfile=None, lsn=None, transaction_read_only="on")
    )
    assert pos.timeline is None
    assert pos.lsn is None
    assert not pos.writable
    assert pos.read_only_reason is not None
    assert "in recovery" in pos.read_only_reason
    matching = [t for t in TARGET_SESSION_ATTRS if pos.matches(t)]
    assert matching == ["any", "read-only", "standby", "prefer-standby"]


def test_position_of_a_read_only_primary() -> None:
    pos = ServerPosition.from_row(
        row(default_transaction_read_only="on", transaction_read_only="on")
    )
    assert pos.read_only_reason == "default_transaction_read_only is on"
    assert [t for t in TARGET_SESSION_ATTRS if pos.matches(t)] == ["any", "read-only", "primary"]
    session = ServerPosition.from_row(row(transaction_read_only="on"))
    assert session.read_only_reason == "transaction_read_only is on"


def test_position_parsing_errors() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert parse_lsn(None) is None
    with pytest.raises(ValueError, match="pg_lsn"):
        parse_lsn("12345")
    assert timeline_of_walfile("0000000A0000000000000001") == 10
    with pytest.raises(ValueError, match="WAL file"):
        timeline_of_walfile("0001")
    with pytest.raises(ValueError, match="system_identifier"):
        ServerPosition.from_row(row(system_identifier=None))
