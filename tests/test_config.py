"""PeerConfig: defaults, and clear errors naming the field for bad input."""

from __future__ import annotations

import os
import socket

import attrs
import pytest

from trio_peers import PeerConfig

DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def test_defaults() -> None:
    config = PeerConfig(dsn=DSN)
    assert config.name == "default"
    assert config.interval == 30.0
    assert config.leader_boost == 2
    assert config.prefix == "public"
    assert config.table == "trio_peers"
    assert config.channel == "public.trio_peers"
    assert config.listen is True
    assert config.effective_statement_timeout == 5.0
    assert config.trust_margin == pytest.approx(0.3)


def test_default_node_is_unique_per_process_and_never_the_bare_hostname() -> None:
    # oban-py#32: processes on one host must not share an owner id.
    a, b = PeerConfig(dsn=DSN), PeerConfig(dsn=DSN)
    assert a.node != b.node
    assert a.node != socket.gethostname()
    assert f":{os.getpid()}:" in a.node


def test_frozen_and_keyword_only() -> None:
    config = PeerConfig(dsn=DSN)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        PeerConfig(DSN)  # type: ignore[misc]


def test_dsn_not_in_repr() -> None:
    assert "secret" not in repr(PeerConfig(dsn="postgresql://u:secret@h/db"))


def test_statement_timeout_default_scales_with_interval() -> None:
    assert PeerConfig(dsn=DSN, interval=1.0).effective_statement_timeout == 0.25


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"dsn": ""}, ValueError, "dsn"),
        ({"dsn": "mysql://x"}, ValueError, "dsn"),
        ({"dsn": 5}, TypeError, "dsn"),
        ({"name": ""}, ValueError, "name"),
        ({"name": " padded"}, ValueError, "name"),
        ({"name": "a\nb"}, ValueError, "name"),
        ({"name": "x" * 600}, ValueError, "name"),
        ({"name": 3}, TypeError, "name"),
        ({"node": ""}, ValueError, "node"),
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": -1.0}, ValueError, "interval"),
        ({"interval": float("nan")}, ValueError, "interval"),
        ({"interval": float("inf")}, ValueError, "interval"),
        ({"interval": "30"}, TypeError, "interval"),
        # Regressions: an int too large for a float raised a bare OverflowError, and a lone
        # surrogate a bare UnicodeEncodeError, neither naming the field.
        ({"interval": 10**400}, ValueError, "interval"),
        ({"interval": 1e300}, ValueError, "interval=1e[+]300 is more than 1e[+]09 seconds"),
        ({"cleanup_timeout": 10**400}, ValueError, "cleanup_timeout"),
        ({"leader_boost": 10**400}, ValueError, "leader_boost"),
        ({"max_clock_drift": 10**400}, ValueError, "max_clock_drift"),
        ({"name": "job\udcff"}, ValueError, "name=.* lone surrogate"),
        ({"node": "\ud800host"}, ValueError, "node=.* lone surrogate"),
        ({"interval": True}, TypeError, "interval"),
        ({"leader_boost": 0.5}, ValueError, "leader_boost"),
        ({"leader_boost": "2"}, TypeError, "leader_boost"),
        ({"prefix": "my-schema"}, ValueError, "prefix"),
        ({"prefix": 'a"b'}, ValueError, "prefix"),
        ({"prefix": "a.b"}, ValueError, "prefix"),
        ({"prefix": "1abc"}, ValueError, "prefix"),
        ({"prefix": "x" * 64}, ValueError, "prefix"),
        ({"table": "peers; drop table x"}, ValueError, "table"),
        ({"table": ""}, ValueError, "table"),
        ({"prefix": "p" * 40, "table": "t" * 30}, ValueError, "channel"),
        ({"max_clock_drift": 0.5}, ValueError, "max_clock_drift"),
        ({"max_clock_drift": -0.01}, ValueError, "max_clock_drift"),
        ({"max_clock_drift": 0}, ValueError, "max_clock_drift"),
        ({"max_clock_drift": 0.0009}, ValueError, "at least 0.001"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"cleanup_timeout": -1}, ValueError, "cleanup_timeout"),
        ({"statement_timeout": 0}, ValueError, "statement_timeout"),
        ({"interval": 1.0, "statement_timeout": 0.6}, ValueError, "statement_timeout"),
        ({"listen": "yes"}, TypeError, "listen"),
    ],
)
def test_bad_values_raise_naming_the_field(
    kwargs: dict[str, object], error: type[Exception], field: str
) -> None:
    args: dict[str, object] = {"dsn": DSN, **kwargs}
    with pytest.raises(error, match=field):
        PeerConfig(**args)  # type: ignore[arg-type]


def test_channel_exactly_63_bytes_is_accepted() -> None:
    config = PeerConfig(dsn=DSN, prefix="p" * 31, table="t" * 31)
    assert len(config.channel.encode()) == 63


def test_identifiers_keep_their_case() -> None:
    config = PeerConfig(dsn=DSN, prefix="MySchema", table="Leases")
    assert config.channel == "MySchema.Leases"


def test_max_clock_drift_floor_is_accepted() -> None:
    """The smallest drift allowance covers real clocks (NTP slews by up to 0.0005)."""
    config = PeerConfig(dsn=DSN, interval=10.0, max_clock_drift=0.001)
    assert config.trust_margin == pytest.approx(0.01)
