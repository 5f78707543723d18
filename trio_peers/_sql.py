"""SQL text. Identifiers come only from validated config and are always quoted."""

from __future__ import annotations

from typing import Final, final

import attrs

from ._config import check_identifier

#: Columns of the lease table and their types, as ``format_type`` prints them.
EXPECTED_COLUMNS: Final = {
    "name": "text",
    "node": "text",
    "term": "bigint",
    "started_at": "timestamp with time zone",
    "expires_at": "timestamp with time zone",
}

#: Key of the transaction-level advisory lock that serialises concurrent migrations.
MIGRATE_LOCK_KEY: Final = 0x7472696F70656572  # b"triopeer"


#: The server's timeline ``tl`` (trio_peers/_term.py), for the election statements: the
#: first 8 hex digits of the current WAL file's name; NULL on a standby (where a write fails
#: as read-only anyway).
_POSITION_CTE: Final = """pos AS (
    SELECT CASE WHEN NOT pg_is_in_recovery() THEN
        ('x' || lpad(left(pg_walfile_name(pg_current_wal_lsn()), 8), 16, '0'))::bit(64)::bigint
    END AS tl
)"""

#: A release's commit mode, for its own transaction only (see Statements.release):
#: asynchronous, unless the server has synchronous standbys to wait for.
_PROMPT: Final = """(SELECT set_config('synchronous_commit',
                       CASE WHEN current_setting('synchronous_standby_names') = ''
                            THEN 'off' ELSE 'on' END, true)) AS prompt"""

#: elect_many's barrier length for the conflicting row (looked up only for a new barrier).
_BARRIER_OF_ROW: Final = """make_interval(
                              secs => (SELECT r.barrier FROM req AS r WHERE r.name = p.name))"""


def _take_or_barrier(barrier: str) -> str:
    """The upsert's ``SET`` list shared by the election statements: a row written on an older
    timeline becomes a failover barrier (node '', the next term, ``barrier`` long); an
    expired lease is taken with the next term; else the tenure is renewed."""
    return f"""        node = CASE WHEN (p.term >> 32) + 1 < (SELECT tl FROM pos) THEN ''
                    ELSE EXCLUDED.node END,
        term = CASE WHEN p.expires_at <= now() OR (p.term >> 32) + 1 < (SELECT tl FROM pos)
                    THEN greatest(p.term + 1, EXCLUDED.term) ELSE p.term END,
        started_at = CASE WHEN p.expires_at <= now()
                            OR (p.term >> 32) + 1 < (SELECT tl FROM pos)
                          THEN now() ELSE p.started_at END,
        expires_at = CASE WHEN (p.term >> 32) + 1 < (SELECT tl FROM pos)
                          THEN now() + {barrier} ELSE EXCLUDED.expires_at END"""


def quote_ident(ident: str) -> str:
    """Quote a validated identifier for SQL."""
    check_identifier("identifier", ident)
    return '"' + ident.replace('"', '""') + '"'


@final
@attrs.frozen
class Statements:
    """Every statement for one ``prefix.table``, built once per config."""

    prefix: str
    table: str

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.prefix)}.{quote_ident(self.table)}"

    @property
    def regclass(self) -> str:
        """The text to pass to ``to_regclass()``."""
        return self.qualified

    @property
    def elect(self) -> str:
        # $1 name, $2 node, $3 lease length (interval), $4 held term or NULL, $5 barrier
        # length (interval), $6 lowest timeline this peer may write on (0: any).
        # docs/protocol.rst describes this statement; keep the two in step.
        #
        # One statement, so one round trip and one transaction. now() is the
        # statement's start: expiry and the expired check use the database
        # clock only.
        #
        # `pos` reads the server's timeline tl (the first 8 hex digits of the current WAL
        # file's name; NULL on a standby, where the write fails as read-only anyway).
        # Terms carry it (trio_peers/_term.py): a new tenure's term is
        # greatest(term + 1, first(tl)), first(tl) = ((tl - 1) << 32) | 1, so terms grow
        # across a promotion even when the last commits were lost. On a server behind
        # $6 (a resurrected old primary) nothing is written: `behind`.
        #
        # `cur` reads the row from the statement's snapshot, without a lock. If it
        # shows an unexpired lease of another tenure, the INSERT gets no row to
        # insert, so a denied bid locks nothing and writes nothing: no transaction
        # id, no WAL, no commit to flush. Otherwise (no row, an expired row, our own
        # tenure $4, or a row last written on an older timeline) the UPSERT runs, and
        # its WHERE re-checks the newest row version under the row lock, admitting
        # exactly three cases:
        #   * the row was written on an older timeline (live or not, whoever holds it):
        #     it becomes a failover barrier: node '' (no peer has it), the next term,
        #     lease $5; the bid is denied and reports the barrier as the holder;
        #   * the lease is absent or expired: take it with the next term;
        #   * this node holds exactly tenure $4 and it has not expired: renew it.
        # A renewal can therefore never touch another node's lease, nor another
        # tenure of the same node value (oban#1488, oban-py#32), nor a barrier. A
        # snapshot that saw an expired lease which another peer took meanwhile locks
        # the row and changes nothing (a denied bid that writes: a lost race; the
        # other is installing a barrier, once per row per failover).
        #
        # The final SELECT reports the holder of a denied bid from the snapshot.
        # It also makes this statement's commit synchronous (transaction-local, so
        # it works behind poolers and on servers that default to asynchronous
        # commit): a new term must be durable before anyone acts on it, or a
        # crash could hand the same term out twice.
        t = self.qualified
        return f"""
WITH {_POSITION_CTE},
cur AS (
    SELECT node, term, expires_at FROM {t} WHERE name = $1
),
may AS (
    SELECT (SELECT tl FROM pos) >= $6::bigint AND NOT EXISTS (
        SELECT FROM cur
        WHERE cur.expires_at > now()
          AND NOT (cur.node = $2 AND cur.term IS NOT DISTINCT FROM $4::bigint)
          AND (cur.term >> 32) + 1 >= (SELECT tl FROM pos)
    ) AS write
),
locked AS (
    SELECT name FROM {t} WHERE name = $1 AND (SELECT write FROM may)
    FOR UPDATE SKIP LOCKED
),
attempt AS (
    INSERT INTO {t} AS p (name, node, term, started_at, expires_at)
    SELECT $1, $2, (((SELECT tl FROM pos) - 1) << 32) | 1, now(), now() + $3::interval
    WHERE (SELECT write FROM may)
      AND (EXISTS (SELECT FROM locked) OR NOT EXISTS (SELECT FROM cur))
    ON CONFLICT (name) DO UPDATE SET
{_take_or_barrier("$5::interval")}
    WHERE p.expires_at <= now() OR (p.node = $2 AND p.term = $4::bigint)
       OR (p.term >> 32) + 1 < (SELECT tl FROM pos)
    RETURNING p.node, p.term, p.expires_at
)
SELECT CASE WHEN a.node <> '' THEN a.term END AS won_term,
       CASE WHEN a.node <> '' THEN EXTRACT(EPOCH FROM a.expires_at - now())::float8 END
           AS won_remaining,
       (a.term IS NULL AND (SELECT write FROM may) AND EXISTS (SELECT FROM cur)
        AND NOT EXISTS (SELECT FROM locked)) AS busy,
       CASE WHEN a.node = '' THEN a.node ELSE h.node END AS holder_node,
       CASE WHEN a.node = '' THEN a.term ELSE h.term END AS holder_term,
       EXTRACT(EPOCH FROM CASE WHEN a.node = '' THEN a.expires_at ELSE h.expires_at END
               - now())::float8 AS holder_remaining,
       (SELECT tl FROM pos) AS timeline,
       CASE WHEN a.node = '' THEN (SELECT term FROM cur) END AS barrier_over
FROM (SELECT set_config('synchronous_commit', 'on', true)) AS durable
LEFT JOIN attempt AS a ON true
LEFT JOIN cur AS h ON a.term IS NULL AND h.expires_at > now()
"""

    @property
    def elect_many(self) -> str:
        # Many names in one statement: the batched form of `elect`, for sessions that run
        # the rounds of many names at once (docs/protocol.rst, "Batched elections").
        # $1 names, $2 nodes, $3 lease lengths in seconds, $4 held terms (NULL: none),
        # $5 barrier lengths in seconds, as arrays of one length; the names must be
        # distinct (PostgreSQL refuses to update one row twice in one ON CONFLICT). $6 the
        # lowest timeline the session may write on (0: any).
        #
        # Per name, the same rules as `elect` (timelines, terms, barriers): a snapshot read
        # first; a pure read (no lock, nothing written) when it shows a live lease of
        # another tenure written on the server's timeline. The rows it may
        # write are locked in name order with SKIP LOCKED, so a batch never waits for a
        # row that another transaction holds (another session's batch, a fenced write):
        # such a name is reported busy and left alone, and two batches cannot deadlock.
        # An absent row is inserted; a concurrent insert of the same name makes this
        # statement wait for that one (another election: a few milliseconds). The renewal
        # test looks the held term up in one hashed set of (name, held) pairs: a lookup
        # per row correlated by name scanned every request for each renewed row, and made
        # a renewal of 1,000 names cost the server 90 ms instead of about 10. The barrier
        # length is looked up per name only for a row that becomes a barrier.
        t = self.qualified
        return f"""
WITH {_POSITION_CTE},
req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::bigint[], $5::float8[])
        AS r(name, node, lease, held, barrier)
),
cur AS (
    SELECT t.name, t.node, t.term, t.expires_at FROM {t} AS t JOIN req USING (name)
),
want AS (
    SELECT r.* FROM req AS r LEFT JOIN cur AS c USING (name)
    WHERE (SELECT tl FROM pos) >= $6::bigint
      AND (c.name IS NULL OR c.expires_at <= now() OR (c.node = r.node AND c.term = r.held)
           OR (c.term >> 32) + 1 < (SELECT tl FROM pos))
),
locked AS (
    SELECT t.name FROM {t} AS t JOIN want USING (name)
    ORDER BY t.name FOR UPDATE OF t SKIP LOCKED
),
attempt AS (
    INSERT INTO {t} AS p (name, node, term, started_at, expires_at)
    SELECT w.name, w.node, (((SELECT tl FROM pos) - 1) << 32) | 1, now(),
           now() + make_interval(secs => w.lease)
    FROM want AS w
    WHERE w.name IN (SELECT name FROM locked) OR w.name NOT IN (SELECT name FROM cur)
    ORDER BY w.name
    ON CONFLICT (name) DO UPDATE SET
{_take_or_barrier(_BARRIER_OF_ROW)}
    WHERE p.expires_at <= now()
       OR (p.term >> 32) + 1 < (SELECT tl FROM pos)
       OR (p.node = EXCLUDED.node
           AND (p.name, p.term) IN (SELECT r.name, r.held FROM req AS r WHERE r.held IS NOT NULL))
    RETURNING p.name, p.node, p.term, p.expires_at
)
SELECT r.name,
       CASE WHEN a.node <> '' THEN a.term END AS won_term,
       CASE WHEN a.node <> '' THEN EXTRACT(EPOCH FROM a.expires_at - now())::float8 END
           AS won_remaining,
       (a.name IS NULL
        AND r.name IN (SELECT name FROM want)
        AND r.name IN (SELECT name FROM cur)
        AND r.name NOT IN (SELECT name FROM locked)) AS busy,
       CASE WHEN a.node = '' THEN a.node ELSE c.node END AS holder_node,
       CASE WHEN a.node = '' THEN a.term ELSE c.term END AS holder_term,
       EXTRACT(EPOCH FROM CASE WHEN a.node = '' THEN a.expires_at ELSE c.expires_at END
               - now())::float8 AS holder_remaining,
       (SELECT tl FROM pos) AS timeline,
       CASE WHEN a.node = '' THEN (SELECT o.term FROM cur AS o WHERE o.name = r.name) END
           AS barrier_over
FROM (SELECT set_config('synchronous_commit', 'on', true)) AS durable
CROSS JOIN req AS r
LEFT JOIN attempt AS a ON a.name = r.name
LEFT JOIN cur AS c ON a.name IS NULL AND c.name = r.name AND c.expires_at > now()
ORDER BY r.name
"""

    @property
    def release(self) -> str:
        # $1 name, $2 node, $3 term, $4 channel, $5 payload.
        # Expire the tenure in place (the row keeps the term counter, so terms
        # stay monotonic) and NOTIFY in the same statement: the notification is
        # delivered at commit, when followers can already take the lease.
        #
        # The commit is asynchronous (transaction-local) on a server without synchronous
        # standbys: it returns, and the NOTIFY goes out, without waiting for the WAL flush.
        # Nothing depends on a release being durable: the releasing peer stopped trusting
        # its lease before it sent this, and the election that takes the lease over
        # commits synchronously, which flushes all earlier WAL, the release included,
        # before its peer learns the new term. A crash can only undo a release that no
        # election has committed on top of: the lease then lapses at its expiry, as after
        # a crash of its holder. With synchronous standbys (synchronous_standby_names set)
        # the commit stays synchronous: were the release to commit at once while the
        # standby is away, the takeover would wait for the standby instead, and if it
        # outlasted its statement timeout, its peer would never learn the term it won and
        # stay locked out for an interval after the standby came back; waiting in the
        # release instead, the takeover comes the moment the standby does.
        t = self.qualified
        return f"""
WITH released AS (
    UPDATE {t} SET expires_at = now()
    WHERE name = $1 AND node = $2 AND term = $3 AND expires_at > now()
    RETURNING name
)
SELECT pg_notify($4::text, $5::text)
FROM released, {_PROMPT}
"""

    @property
    def release_one(self) -> str:
        # $1 name, $2 node, $3 term, $4 channel, $5 payload: `release_many` for one name
        # (a session's release of a single name: the quicker statement), with the payload
        # built by the caller as for `release`, and committed in the same mode as it is. A
        # row locked by another transaction is not waited for: busy, nothing changed.
        t = self.qualified
        return f"""
WITH held AS (
    SELECT name FROM {t}
    WHERE name = $1 AND node = $2 AND term = $3 AND expires_at > now()
),
locked AS (
    SELECT name FROM {t} WHERE name = $1 AND EXISTS (SELECT FROM held)
    FOR UPDATE SKIP LOCKED
),
released AS (
    UPDATE {t} SET expires_at = now()
    WHERE name = $1 AND node = $2 AND term = $3 AND expires_at > now()
      AND EXISTS (SELECT FROM locked)
    RETURNING name
),
notified AS (
    SELECT pg_notify($4::text, $5::text) FROM released
)
SELECT EXISTS (SELECT FROM released) AS released,
       (EXISTS (SELECT FROM held) AND NOT EXISTS (SELECT FROM locked)) AS busy,
       (SELECT count(*) FROM notified) AS notified
FROM {_PROMPT}
"""

    @property
    def release_many(self) -> str:
        # Many names in one statement: the batched form of `release`, for sessions
        # (docs/protocol.rst, "Batched elections"). $1 names, $2 nodes, $3 terms (arrays of
        # one length, distinct names), $4 channel, $5 sender.
        #
        # Per name, the same rule as `release`: expire exactly this tenure, if unexpired;
        # committed in the same mode as `release` is.
        # Unlike `release`, a row locked by another transaction is not waited for (SKIP
        # LOCKED, in name order): it is reported busy, so one name's locked row cannot hold
        # up the others; the caller retries it. The released names are announced in
        # chunks of at most about 6000 bytes of JSON (a NOTIFY payload is limited to 8000
        # bytes, and a name to 512 bytes, 1024 once escaped), one NOTIFY per chunk; a
        # chunk of one name uses the single-name payload of `release`.
        t = self.qualified
        return f"""
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(name, node, term)
),
held AS (
    SELECT t.name FROM {t} AS t JOIN req AS r
        ON t.name = r.name AND t.node = r.node AND t.term = r.term AND t.expires_at > now()
),
locked AS (
    SELECT t.name FROM {t} AS t JOIN held USING (name)
    ORDER BY t.name FOR UPDATE OF t SKIP LOCKED
),
released AS (
    UPDATE {t} AS t SET expires_at = now()
    FROM req AS r
    WHERE t.name = r.name AND t.node = r.node AND t.term = r.term AND t.expires_at > now()
      AND t.name IN (SELECT name FROM locked)
    RETURNING t.name, t.term
),
chunked AS (
    SELECT name, term,
           (sum(octet_length(to_json(name)::text) + 24) OVER (ORDER BY name)
            - octet_length(to_json(name)::text) - 24) / 6000 AS chunk
    FROM released
),
notified AS (
    SELECT pg_notify($4::text, CASE
        WHEN count(*) = 1 THEN
            '{{"down":' || to_json(min(name))::text || ',"term":' || min(term)
            || ',"sender":' || to_json($5::text)::text || '}}'
        ELSE
            '{{"downs":[' || string_agg('[' || to_json(name)::text || ',' || term || ']', ','
                                       ORDER BY name)
            || '],"sender":' || to_json($5::text)::text || '}}'
        END)
    FROM chunked GROUP BY chunk
)
SELECT r.name,
       rel.name IS NOT NULL AS released,
       (rel.name IS NULL AND r.name IN (SELECT name FROM held)
        AND r.name NOT IN (SELECT name FROM locked)) AS busy
FROM {_PROMPT}
CROSS JOIN (SELECT count(*) FROM notified) AS n
CROSS JOIN req AS r
LEFT JOIN released AS rel USING (name)
ORDER BY r.name
"""

    @property
    def get_leaders(self) -> str:
        # $1 names: the unexpired leases among them.
        return (
            f"SELECT name, node, term, started_at, expires_at FROM {self.qualified} "
            "WHERE name = ANY($1::text[]) AND expires_at > now() AND node <> ''"
        )

    @property
    def fence(self) -> str:
        # $1 name, $2 node, $3 term. Run by the application inside its own transaction
        # (docs/protocol.rst, "Fences"). clock_timestamp(): the statement's own time, not
        # the transaction's start (a fence may run late in a long transaction). FOR SHARE
        # holds the row against every election that would write it (they lock it FOR
        # UPDATE, SKIP LOCKED: busy) until the transaction ends. The placeholders appear
        # once each and in order, so they can be rewritten for other drivers.
        return (
            f"SELECT term FROM {self.qualified} "
            "WHERE name = $1 AND node = $2 AND term = $3 AND expires_at > clock_timestamp() "
            "FOR SHARE"
        )

    @property
    def get_leader(self) -> str:
        return (
            f"SELECT name, node, term, started_at, expires_at FROM {self.qualified} "
            "WHERE name = $1 AND expires_at > now() AND node <> ''"
        )

    @property
    def status(self) -> str:
        """Every name in the table, live or not, with database-clock remaining time."""
        return (
            "SELECT name, node, term, started_at, expires_at, expires_at > now() AS live, "
            "EXTRACT(EPOCH FROM expires_at - now())::float8 AS remaining "
            f"FROM {self.qualified} ORDER BY name"
        )

    @property
    def table_shape(self) -> str:
        # $1: the regclass text. Returns exists, columns (name:type), primary key columns,
        # and whether the table is UNLOGGED.
        return """
SELECT c.oid IS NOT NULL AS present,
       coalesce((SELECT r.relpersistence = 'u' FROM pg_class AS r WHERE r.oid = c.oid), false)
           AS unlogged,
       (SELECT coalesce(array_agg(a.attname::text || ':' || format_type(a.atttypid, a.atttypmod)), '{}')
          FROM pg_attribute AS a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       (SELECT coalesce(array_agg(k.attname::text), '{}')
          FROM pg_index AS i
          JOIN pg_attribute AS k ON k.attrelid = i.indrelid AND k.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND i.indisprimary) AS pkey
FROM (SELECT to_regclass($1) AS oid) AS c
"""

    def create_table(self, *, unlogged: bool = False) -> str:
        kind = "UNLOGGED TABLE" if unlogged else "TABLE"
        return f"""
CREATE {kind} IF NOT EXISTS {self.qualified} (
    name text PRIMARY KEY CHECK (name <> ''),
    node text NOT NULL,
    term bigint NOT NULL CHECK (term > 0),
    started_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
)
"""

    @property
    def create_schema(self) -> str:
        return f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.prefix)}"


def shape_problems(columns: list[str], pkey: list[str]) -> list[str]:
    """Describe how a table's shape differs from the one trio-peers needs."""
    have = dict(col.split(":", 1) for col in columns)
    problems = [
        f"column {col!r} is missing"
        if col not in have
        else f"column {col!r} is {have[col]}, not {typ}"
        for col, typ in EXPECTED_COLUMNS.items()
        if have.get(col) != typ
    ]
    if pkey != ["name"]:
        problems.append(
            "the primary key must be exactly (name)"
            + (f", not ({', '.join(pkey)})" if pkey else "")
        )
    return problems


def unlogged_warning(sql: Statements) -> str:
    """What a peer logs (once) about an UNLOGGED lease table: the guarantee lost and the fix."""
    return (
        f"the lease table {sql.prefix}.{sql.table} is UNLOGGED: PostgreSQL empties it after "
        "a crash and a failover, so fencing terms can start again from 1 and a new leader "
        "can be elected while the old one still trusts its lease (the term and single-leader "
        f"guarantees do not hold across a crash). Make it logged: ALTER TABLE {sql.qualified} "
        "SET LOGGED"
    )
