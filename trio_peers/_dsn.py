"""Multi-host DSNs: which servers a DSN names, and which kind of server it asks for. Pure.

A URI DSN may list several servers, as libpq and asyncpg accept them::

    postgresql://user@db1:5432,db2:5433/app?target_session_attrs=read-write
    postgresql://user@/app?host=db1,db2&port=5432,5433

asyncpg tries such hosts one after the other, but its connect timeout is one budget for all of
them, so one host that accepts TCP and never answers uses it up. trio-peers therefore connects
to the hosts itself, one at a time, each with its own timeout (see ``_asyncpg``); this module
only reads the DSN. A DSN that names at most one host is left to asyncpg, unchanged.
"""

from __future__ import annotations

import os
import re
from typing import Final, Literal, final
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs

#: The values of ``target_session_attrs`` (libpq's and asyncpg's).
TargetSessionAttrs = Literal[
    "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
]

TARGET_SESSION_ATTRS: Final[tuple[TargetSessionAttrs, ...]] = (
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
)

#: What a peer asks for when a multi-host DSN does not say: a server it can write to.
DEFAULT_TARGET_SESSION_ATTRS: Final[TargetSessionAttrs] = "read-write"

_DEFAULT_PORT: Final = 5432
_IPV6: Final = re.compile(r"\[([^\]]*)\](?::(.*))?\Z")


@final
@attrs.frozen
class HostPort:
    """One server of a DSN: a host name, an IP address, or a Unix socket directory."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@final
@attrs.frozen
class MultiHostDSN:
    """A DSN that names two or more servers, read by :func:`parse_multihost`."""

    dsn: str = attrs.field(repr=False)
    """The DSN as given (it may hold a password: never log it)."""
    hosts: tuple[HostPort, ...]
    """The servers, in the DSN's order."""
    target_session_attrs: TargetSessionAttrs
    """The kind of server wanted; :data:`DEFAULT_TARGET_SESSION_ATTRS` when the DSN is silent."""


def _bad(message: str) -> ValueError:
    return ValueError(f"multi-host DSN: {message}")


def _port(text: str, where: str) -> int:
    text = unquote(text).strip()
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _bad(f"{where}: {text!r} is not a port number (1 to 65535)")
    return int(text)


def _split_host(spec: str, *, decode: bool = True) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` -> (host, port text or None); with
    ``decode``, the host is percent-decoded (a URI's authority)."""
    if spec.startswith("["):
        match = _IPV6.match(spec)
        if match is None:
            raise _bad(f"{spec!r} is not a valid [IPv6 address]:port")
        host, port = match.group(1), match.group(2)
    else:
        host, sep, port_text = spec.partition(":")
        port = port_text if sep else None
    host = (unquote(host) if decode else host).strip()
    if not host:
        raise _bad(f"an empty host name in the host list ({spec!r}): remove the extra comma")
    if port == "":
        port = None
    return host, port


def _port_list(text: str, name: str, hosts: int) -> list[str]:
    """The items of a ``port`` parameter or ``PGPORT``: none, one for all hosts, or one each."""
    if not text:
        return []
    items = text.split(",")
    if len(items) not in {1, hosts}:
        raise _bad(
            f"{len(items)} ports in {name}={text!r} for {hosts} hosts: "
            "give one port for all hosts or one per host"
        )
    return items


def _list_port(items: list[str], index: int, where: str) -> int:
    text = items[index if len(items) > 1 else 0]
    return _port(text, where) if text.strip() else _DEFAULT_PORT


def parse_multihost(dsn: str, *, environ: dict[str, str] | None = None) -> MultiHostDSN | None:
    """Read the servers a URI DSN lists; None unless it lists two or more.

    Hosts come from the DSN's authority (``user@h1:p1,h2:p2``), else from its ``host`` query
    parameter, else from ``PGHOST``, as libpq and asyncpg read them. A host without a port
    takes the ``port`` query parameter (one value for every host, or one per host), else
    ``PGPORT`` (likewise), else 5432; an empty item in either list means 5432, as in libpq.
    A DSN with a ``service`` parameter and no host of its own is left to asyncpg: the service
    file's hosts come before ``PGHOST``'s, and are not read here.
    ``target_session_attrs`` comes from the query, else ``PGTARGETSESSIONATTRS``, else
    :data:`DEFAULT_TARGET_SESSION_ATTRS`. ``environ`` defaults to :data:`os.environ`.

    Raises:
        ValueError: the DSN lists several hosts but is malformed: an empty host, a port that
            is not a number, more or fewer ports (in ``port`` or ``PGPORT``) than hosts, an
            unknown ``target_session_attrs``. The message says what to fix.
    """
    env = os.environ if environ is None else environ
    if not dsn.startswith(("postgresql://", "postgres://")):
        return None  # a key=value DSN or something else: asyncpg decides, as before
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:  # e.g. an unclosed [IPv6 address]
        raise ValueError(f"the DSN is not a valid URI: {exc}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    _auth, _, hostspec = parts.netloc.rpartition("@")
    if hostspec:
        specs, decode = hostspec.split(","), True
    elif query.get("host"):
        specs, decode = query["host"].split(","), False  # (parse_qsl decoded it already)
    elif "service" in query:
        return None  # the service file's hosts come before PGHOST's: asyncpg reads them
    else:
        specs, decode = env.get("PGHOST", "").split(","), False
    if len(specs) < 2:
        return None
    hosts = [_split_host(spec, decode=decode) for spec in specs]
    port_list = _port_list(query.get("port", ""), "port", len(hosts))
    env_ports = [] if port_list else _port_list(env.get("PGPORT", ""), "PGPORT", len(hosts))
    resolved = []
    for index, (host, port_text) in enumerate(hosts):
        if port_text is not None:
            port = _port(port_text, f"the port of host {host!r}")
        elif port_list:
            port = _list_port(port_list, index, "the port parameter")
        elif env_ports:
            port = _list_port(env_ports, index, "PGPORT")
        else:
            port = _DEFAULT_PORT
        resolved.append(HostPort(host, port))

    attrs_text = query.get("target_session_attrs") or env.get("PGTARGETSESSIONATTRS") or ""
    wanted = attrs_text.strip() or DEFAULT_TARGET_SESSION_ATTRS
    for target in TARGET_SESSION_ATTRS:
        if target == wanted:
            return MultiHostDSN(dsn=dsn, hosts=tuple(resolved), target_session_attrs=target)
    raise _bad(
        f"target_session_attrs={wanted!r} is not one of {', '.join(TARGET_SESSION_ATTRS)} "
        f"(a peer needs {DEFAULT_TARGET_SESSION_ATTRS}, the default)"
    )
