"""Utilities for testing code that uses :mod:`trio_peers`.

Like :mod:`trio.testing`, this module is not imported by ``import trio_peers``.
"""

from ._memory import MemoryBackend as MemoryBackend, MemoryRow as MemoryRow
from ._postgres import (
    PostgresNotFound as PostgresNotFound,
    PostgresServer as PostgresServer,
    PostgresServerError as PostgresServerError,
    find_postgres_bindir as find_postgres_bindir,
)
