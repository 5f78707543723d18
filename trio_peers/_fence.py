"""Fences: a check, inside the writer's own transaction, that a tenure still holds its lease.

A :class:`Fence` is plain text and values, built without I/O by :meth:`Peer.fence
<trio_peers.Peer.fence>`. Run inside a transaction on any connection to the lease table's
database, its statement returns one row if the tenure is still the lease holder and unexpired
(by the database clock, at the statement's own time), and then locks the lease row ``FOR
SHARE`` until that transaction ends. Taking over or renewing a lease writes its row, so while
the writer's transaction is open no other tenure can begin: the writes of a fenced transaction
commit before any later tenure is granted. See :doc:`/howto/fencing-sql`.
"""

from __future__ import annotations

from typing import final

import attrs

from ._sql import Statements


@final
@attrs.frozen(kw_only=True)
class Fence:
    """The fencing statement of one tenure, from :meth:`Peer.fence <trio_peers.Peer.fence>`.

    Run :attr:`sql` with :attr:`args` (asyncpg's ``$n`` placeholders) inside your transaction,
    before the writes it protects: one row means the tenure still holds the lease, and the
    lease row is then held against any takeover until your transaction ends; no row means
    another tenure began (or the lease expired): roll back. The other attributes give the same
    statement for other drivers.

    .. versionadded:: 0.1
    """

    name: str
    """The instance name."""
    node: str
    """The node id of the tenure."""
    term: int
    """The tenure's fencing term."""
    sql: str
    """The statement, with ``$1``, ``$2``, ``$3`` placeholders (asyncpg, triopg)."""
    args: tuple[str, str, int]
    """The values for :attr:`sql`: ``(name, node, term)``."""
    pyformat_sql: str
    """The statement with ``%s`` placeholders (psycopg, psycopg2), values :attr:`args`."""
    named_sql: str
    """The statement with ``:name``, ``:node``, ``:term`` placeholders (SQLAlchemy's
    ``text()``), values :attr:`named_args`."""

    @property
    def named_args(self) -> dict[str, object]:
        """The values for :attr:`named_sql`."""
        return {"name": self.name, "node": self.node, "term": self.term}


def make_fence(statements: Statements, *, name: str, node: str, term: int) -> Fence:
    """The fence of tenure ``(name, node, term)`` on the table of ``statements``. Pure."""
    sql = statements.fence
    return Fence(
        name=name,
        node=node,
        term=term,
        sql=sql,
        args=(name, node, term),
        pyformat_sql=sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"),
        named_sql=sql.replace("$1", ":name").replace("$2", ":node").replace("$3", ":term"),
    )
