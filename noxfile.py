"""Development sessions: ``python3 -m nox -s <session>``.

Every session runs on the interpreter nox itself runs on (no interpreter downloads), in a venv
that is reused between runs. Tool versions are pinned here and only here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent

RUFF = "ruff==0.17.6"
FLAKE8_ASYNC = "flake8-async==26.8.1"
MYPY = "mypy==2.4.1"
ASYNCPG_STUBS = "asyncpg-stubs==0.32.0"
DOCS_DEPS = ("sphinx==9.0.4", "sphinxcontrib-trio==1.2.0", "furo==2025.12.19")
MATPLOTLIB = "matplotlib==3.11.2"
OBAN = "oban==0.7.0"

# Checks ruff's ASYNC rules lack; they must be named one by one to be switched on.
FLAKE8_ASYNC_CODES = "ASYNC100,ASYNC101,ASYNC102,ASYNC119,ASYNC900,ASYNC910,ASYNC911"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, PostgreSQL tests included, under coverage."""
    session.install(".[test]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine")
    session.run("coverage", "report")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over everything, flake8-async's extra checks over the library."""
    session.install(RUFF, FLAKE8_ASYNC)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # The standalone flake8-async takes files, not directories.
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "trio_peers").rglob("*.py"))
    session.run("flake8-async", f"--enable={FLAKE8_ASYNC_CODES}", *files)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy (strict, configured in pyproject.toml) over the library, benchmarks/ and tests/typing."""
    session.install(".[test]", MYPY, ASYNCPG_STUBS)
    session.run("mypy")
    session.run("mypy", "benchmarks")
    if (ROOT / "tests" / "typing").is_dir():
        session.run("mypy", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML documentation; warnings and broken references are errors."""
    session.install(".", *DOCS_DEPS)
    session.run(
        "python",
        *("-m", "sphinx", "-T", "-E", "-W", "--keep-going", "-n"),
        *("-b", "html", "docs", "docs/_build/html"),
    )


@nox.session
def thorough(session: nox.Session) -> None:
    """The tests with Hypothesis's "thorough" profile (2000 examples); not PostgreSQL by default."""
    session.install(".[test]")
    args = session.posargs or ["-m", "not postgres"]
    session.run("pytest", *args, env={"HYPOTHESIS_PROFILE": "thorough"})


def _python312() -> str | None:
    """A Python 3.12 interpreter: pyenv's (not its shim), else one on PATH."""
    import shutil

    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3"))
    return str(pyenv[-1]) if pyenv else shutil.which("python3.12")


def _venv(session: nox.Session, python: str, where: Path, *packages: str) -> str:
    """A venv at ``where`` made by ``python``, with ``packages``; returns its interpreter."""
    bin_python = where / "bin" / "python"
    if not bin_python.exists():
        session.run_install(python, "-m", "venv", str(where), external=True)
    session.run_install(str(bin_python), "-m", "pip", "install", "-q", *packages, external=True)
    return str(bin_python)


@nox.session
def bench(session: nox.Session) -> None:
    """trio-peers side by side with oban-py and the floor: ``nox -s bench [-- --full]``.

    Writes benchmarks/results/<timestamp>/ (table, raw samples, plots). oban-py runs in a
    venv of its own on Python 3.12, and so do the trio-peers peer processes (same
    interpreter version for both libraries); without a Python 3.12 the peers run here.
    """
    session.install(".[test]", MATPLOTLIB)
    args = list(session.posargs)
    py312 = _python312()
    if py312 is None:
        session.error("the benchmark needs a Python 3.12 interpreter for oban-py (python3.12)")
    venvs = ROOT / ".nox" / "bench-peers"
    oban = _venv(session, py312, venvs / "oban", OBAN)
    tp = _venv(session, py312, venvs / "trio-peers", ".")
    session.run("python", "benchmarks/bench.py", "--oban-python", oban, "--tp-python", tp, *args)


FIND_MACHINE_POSTGRES = """
from trio_peers.testing import PostgresNotFound, find_postgres_bindir
try:
    print(find_postgres_bindir())
except PostgresNotFound:
    print()
"""


@nox.session
def tests_variants(session: nox.Session) -> None:
    """The PostgreSQL tests twice more: on the machine's PostgreSQL (not the wheel's), and
    against an already running server given by TRIO_PEERS_TEST_DSN."""
    session.install(".[test]")
    pytest_args = ["-m", "postgres", *session.posargs]

    # 1. The machine's binaries (e.g. Debian's PostgreSQL 15), if there are any.
    machine_only = {"TRIO_PEERS_PG_NO_EMBEDDED": "1"}
    found = session.run(
        "python", "-c", FIND_MACHINE_POSTGRES, env=machine_only, silent=True, log=False
    )
    bindir = found.strip() if isinstance(found, str) else ""
    if bindir:
        session.log(f"variant 1: PostgreSQL from {bindir}")
        session.run("pytest", *pytest_args, env=machine_only)
    else:
        session.warn("variant 1 skipped: no PostgreSQL installed on this machine")

    # 2. An external server: started here by the harness in a separate process, which stops it
    #    and removes its files when its stdin closes.
    python = os.path.join(session.bin, "python")
    server = subprocess.Popen(
        [python, str(ROOT / "tests" / "_serve_postgres.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        dsn = server.stdout.readline().strip() if server.stdout is not None else ""
        if not dsn:
            session.error("variant 2: could not start a PostgreSQL server (see above)")
        session.log(f"variant 2: TRIO_PEERS_TEST_DSN={dsn}")
        session.run("pytest", *pytest_args, env={"TRIO_PEERS_TEST_DSN": dsn})
    finally:
        _stop_server(server)


def _stop_server(server: subprocess.Popen[str]) -> None:
    if server.stdin is not None:
        server.stdin.close()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()  # the harness's watchdog then removes the server
            server.wait()
    if server.stdout is not None:
        server.stdout.close()
