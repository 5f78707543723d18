"""Run a throwaway PostgreSQL server until told to stop (used by ``nox -s tests_variants``).

Prints the server's DSN as the first line on stdout, then serves until stdin is closed or the
process gets SIGTERM or SIGINT, and then stops the server and removes its files. If this process
is killed outright, the harness's watchdog cleans up instead.

    python tests/_serve_postgres.py
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from trio_peers.testing import PostgresServer


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    with PostgresServer.start() as server:
        print(server.dsn, flush=True)
        print(
            f"serving PostgreSQL {server.version} from {server.bindir}; close stdin to stop",
            file=sys.stderr,
            flush=True,
        )
        sys.stdin.read()  # returns at EOF


if __name__ == "__main__":
    main()
