"""Peers behind PgBouncer in transaction mode, with ``listen=False``.

A transaction-mode pooler hands each transaction to any server connection, so
LISTEN and named prepared statements do not work there. With ``listen=False``
a peer uses neither: elections still work, handover just waits for a poll.

PgBouncer is a Debian package (``apt-get install pgbouncer``); ``.ci/run``
installs it. Elsewhere these tests skip when it is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trio
import trio_asyncio

from trio_peers import TenureLost, open_peer
from trio_peers.testing import PostgresServer
from trio_peers.testing._postgres import _chown_tree, _server_user

from ._pgutil import open_sql, peer_config, run_peer

INTERVAL = 1.0

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


@pytest.fixture
def pgbouncer(pg: PostgresServer) -> Iterator[int]:
    """A transaction-mode PgBouncer in front of the suite's server; yields its port."""
    binary = _pgbouncer_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed; .ci/run installs it")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    user = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="trio-peers-pgbouncer-"))
    workdir.chmod(0o755)
    port = _free_port()
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
* = host=127.0.0.1 port={pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
server_reset_query =
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
"""
    )
    _chown_tree(workdir, user)
    proc = subprocess.Popen([binary, str(workdir / "pgbouncer.ini")], user=user)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (workdir / "pgbouncer.log").read_text(errors="replace")
                    pytest.fail(f"pgbouncer did not start: {log[-2000:]}")
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_transaction_mode_pooler_with_listen_false(
    dsn: str, pg: PostgresServer, pgbouncer: int
) -> None:
    pooled = dsn.replace(f":{pg.port}/", f":{pgbouncer}/")
    async with trio.open_nursery() as nursery, open_sql(pooled) as blocker:
        a, stop_a = await nursery.start(run_peer, peer_config(pooled, "a", listen=False))
        b, stop_b = await nursery.start(run_peer, peer_config(pooled, "b", listen=False))
        assert a.is_leader and not b.is_leader
        # Hold one of the pool's two server connections in a transaction now and
        # then, so the peers' statements land on one server, then on the other.
        for _ in range(6):
            await blocker.execute("BEGIN; SELECT 1")
            await trio.sleep(INTERVAL / 4)
            await blocker.execute("COMMIT")
            await trio.sleep(INTERVAL / 8)
        assert a.statistics().elections_run >= 5
        assert a.is_leader and not b.is_leader
        stop_a.set()
        with trio.fail_after(INTERVAL * 2):
            await b.wait_leader()
        async with open_peer(peer_config(pooled, "c", listen=False)) as c:
            assert not c.is_leader
            info = await c.get_leader()
            assert info is not None and info.node == "b"
        for peer in (a, b):
            assert peer.statistics().elections_failed == 0, peer.statistics().last_error
        stop_b.set()
    async with open_sql(dsn) as sql:
        assert (await sql.row())["live"] is False  # b released through the pooler


async def test_fenced_writes_through_a_transaction_mode_pooler(
    dsn: str, pg: PostgresServer, pgbouncer: int
) -> None:
    """A transaction stays on one server connection in transaction mode: the fence and the
    writes it protects run together, and a stale fence is refused."""
    pooled = dsn.replace(f":{pg.port}/", f":{pgbouncer}/")
    async with open_sql(dsn) as sql, trio_asyncio.open_loop():
        await sql.execute("CREATE TABLE writes (term bigint NOT NULL)")
        # No named prepared statements: the pooler may switch server connections between
        # transactions.
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(pooled, statement_cache_size=0)
        try:
            async with trio.open_nursery() as nursery:
                a, stop_a = await nursery.start(run_peer, peer_config(pooled, "a", listen=False))
                async with a.fenced_transaction(conn) as fence:
                    await trio_asyncio.aio_as_trio(conn.execute)(
                        "INSERT INTO writes VALUES ($1)", fence.term
                    )
                stale = a.fence()
                b, stop_b = await nursery.start(run_peer, peer_config(pooled, "b", listen=False))
                await a.resign()
                with trio.fail_after(INTERVAL * 3):
                    await b.wait_leader()
                with pytest.raises(TenureLost):
                    await a.fenced_transaction(conn, fence=stale).__aenter__()
                stop_a.set()
                stop_b.set()
        finally:
            conn.terminate()
        assert await sql.fetch("SELECT term FROM writes") == [(stale.term,)]
