"""The exceptions trio-peers raises."""

from __future__ import annotations


class PeerError(Exception):
    """Base class of every error trio-peers raises on purpose."""


class BackendUnavailable(PeerError):
    """The database cannot be reached right now (refused, lost, timed out, starting up).

    A peer treats this as transient: it steps down, logs once, and retries with
    backoff. You only see it from one-shot calls such as :func:`trio_peers.migrate`
    or :meth:`Peer.get_leader <trio_peers.Peer.get_leader>`.
    """


class ServerBehind(BackendUnavailable):
    """The server is on an older timeline than one this peer saw in the same system.

    An old primary that came back after a failover. A peer never leads there: each round
    fails with this, and the peer retries with backoff (and reconnects: a multi-host DSN
    may find the new primary). You see it in :attr:`PeerStatistics.last_error
    <trio_peers.PeerStatistics.last_error>` and in the ``error`` of
    :class:`~trio_peers.Fault` events; a :class:`~trio_peers.PeerBackend` raises it from
    ``elect`` for the same case. See :doc:`/howto/high-availability`.

    .. versionadded:: 0.2
    """


class StatementRefused(BackendUnavailable):
    """The server refused one statement with an error of its own (a trigger, a constraint,
    a serialization failure), not of the connection, which is still usable.

    Transient, as :exc:`BackendUnavailable` is (a peer steps down and retries), but a
    session fails only the names of that statement's table and keeps its connection and
    its other names. Internal: the asyncpg backend raises it; not exported.
    """


class BackendMisconfigured(PeerError):
    """A permanent problem that retrying cannot fix.

    An invalid DSN, failed authentication, a database that does not exist, missing
    privileges, or TLS settings the server cannot meet (its certificate refused, or
    ``sslmode=require`` on a server without TLS). :func:`trio_peers.open_peer` raises it
    from entry.
    """


class SchemaError(PeerError):
    """The lease table has the wrong shape (missing columns, no primary key on ``name``).

    Raised from :func:`trio_peers.open_peer` entry. A *missing* table is not an
    error at entry: the peer logs a warning naming :func:`trio_peers.migrate`,
    stays follower and retries every ``interval``.
    """


class TableMissing(SchemaError):
    """The lease table does not exist yet; run :func:`trio_peers.migrate`."""


class TenureLost(PeerError):
    """A fenced write was refused: the tenure it was fenced with no longer holds the lease.

    Raised by :meth:`Peer.fence <trio_peers.Peer.fence>` when the peer does not lead, and by
    :meth:`Peer.fenced_transaction <trio_peers.Peer.fenced_transaction>` when the fence finds
    another tenure, an expired lease, or cannot be checked (e.g. a serialization failure in a
    REPEATABLE READ or SERIALIZABLE transaction). The transaction was rolled back.

    .. versionadded:: 0.1
    """


class TrioPeersInternalError(Exception):
    """A bug in trio-peers. Please report it, with the traceback."""
