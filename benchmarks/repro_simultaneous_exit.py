"""Reproduction for the lead: a leader and a follower leave at the same moment.

    python benchmarks/repro_simultaneous_exit.py [ROUNDS]

The follower's bid, woken by the leader's release NOTIFY, is in flight when its own exit
cancels the election loop; the statement still commits at the server, so the follower wins
a new term in the database that no process holds, and never releases it: the lease lives
on for a whole interval (30 s by default) with no leader. Prints the rounds where a live
lease outlived both processes. Seen: 3 of 30 rounds (on 655ce30).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trio

from benchmarks._common import PeerProcess, close_all
from benchmarks.bench import start_server
from trio_peers import migrate

server, _ = start_server()
try:
    dsn = server.create_database("linger")
    trio.run(migrate, dsn)
    py = sys.executable
    lingering = 0
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    for i in range(rounds):
        server.execute("DELETE FROM trio_peers", database="linger")
        a = PeerProcess(
            [py, str(Path(__file__).resolve().parent / "_tp_proc.py"), dsn, f"a{i}", "0"]
        )
        b = PeerProcess(
            [py, str(Path(__file__).resolve().parent / "_tp_proc.py"), dsn, f"b{i}", "0"]
        )
        a.until("ready")
        b.until("ready")
        a.send("join")
        a.until("joined")
        b.send("join")
        b.until("joined")
        time.sleep(0.1)
        a.send("leave")
        b.send("leave")
        a.until("left")
        b.until("left")
        close_all([a, b])
        rows = server.execute(
            "SELECT node, term, expires_at > now() FROM trio_peers", database="linger"
        )
        live = [r for r in rows if r[2]]
        if live:
            lingering += 1
            print("round", i, "lease outlives its holder:", live, flush=True)
    print(f"{lingering}/{rounds} rounds left a live lease behind with no process holding it")
finally:
    server.close()
