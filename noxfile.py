"""Development sessions: ``python3 -m nox -s <session>``.

Every session but ``tests_pythons`` runs on the interpreter nox itself runs on, in a venv that
is reused between runs; ``tests_pythons`` runs on each Python the project claims that the
machine has (never downloaded). Tool versions are pinned here and only here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True
nox.options.download_python = "never"
# A missing interpreter skips its session, except in CI (the CI variable set), where it fails.
nox.options.error_on_missing_interpreters = "CI" in os.environ
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).parent

# The CPython versions the project claims (pyproject.toml's classifiers; tests/test_packaging.py
# checks that the two lists agree).
PYTHONS = ("3.11", "3.12", "3.13")


def _pyenv_bindirs() -> Iterator[str]:
    """The bin directories of the newest pyenv install of each claimed version.

    pyenv's shims only run the versions that ``pyenv global`` selects, so nox, which looks for
    ``python3.X`` on PATH, would not find the others. Their real directories go first on PATH.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for version in PYTHONS:
        found = [
            path
            for path in root.glob(f"{version}.*/bin/python{version}")
            if re.fullmatch(rf"{re.escape(version)}\.\d+", path.parents[1].name)
        ]
        if found:
            newest = max(found, key=lambda p: int(p.parents[1].name.rsplit(".", 1)[1]))
            yield str(newest.parent)


os.environ["PATH"] = os.pathsep.join([*_pyenv_bindirs(), os.environ.get("PATH", "")])

RUFF = "ruff==0.17.6"
FLAKE8_ASYNC = "flake8-async==26.8.1"
MYPY = "mypy==2.4.1"
ASYNCPG_STUBS = "asyncpg-stubs==0.32.0"
BUILD = "build==1.6.1"
TWINE = "twine==7.0.0"
# The docs' pinned dependencies, shared with Read the Docs (.readthedocs.yaml).
DOCS_REQUIREMENTS = "docs/requirements.txt"
MATPLOTLIB = "matplotlib==3.11.2"
OBAN = "oban==0.7.0"

# Checks ruff's ASYNC rules lack; they must be named one by one to be switched on.
FLAKE8_ASYNC_CODES = "ASYNC100,ASYNC101,ASYNC102,ASYNC119,ASYNC900,ASYNC910,ASYNC911"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, PostgreSQL tests included, under coverage."""
    session.install(".[test]")
    session.run("coverage", "erase")
    # The slowest tests are printed at the end, to keep an eye on the suite's (and CI's) time.
    session.run("coverage", "run", "-m", "pytest", "--durations=12", *session.posargs)
    session.run("coverage", "combine")
    session.run("coverage", "report")


# What tests_pythons runs by default: everything but the PostgreSQL tests, then the PostgreSQL
# tests of the peer itself (the harness, command line, docs and pooler tests run on the main
# Python only, in the tests session).
PEER_POSTGRES_TESTS = (
    "tests/test_peer_postgres.py",
    "tests/test_smoke_postgres.py",
    "tests/test_leader_work_postgres.py",
)


@nox.session(python=PYTHONS)
def tests_pythons(session: nox.Session) -> None:
    """The suite on each claimed Python present: non-PostgreSQL tests, then the peer's on PostgreSQL.

    With arguments, runs ``pytest`` with them instead.
    """
    session.install(".[test]")
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    session.run("pytest", "-m", "not postgres")
    session.run("pytest", *PEER_POSTGRES_TESTS)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over everything, flake8-async's extra checks over the library
    and the chaos runner."""
    session.install(RUFF, FLAKE8_ASYNC)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # The standalone flake8-async takes files, not directories.
    files = sorted(
        str(p.relative_to(ROOT)) for d in ("trio_peers", "chaos") for p in (ROOT / d).rglob("*.py")
    )
    session.run("flake8-async", f"--enable={FLAKE8_ASYNC_CODES}", *files)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy (strict, configured in pyproject.toml) over the library, chaos/, benchmarks/ and
    tests/typing."""
    session.install(".[test]", MYPY, ASYNCPG_STUBS)
    session.run("mypy")
    session.run("mypy", "chaos")
    session.run("mypy", "benchmarks")
    if (ROOT / "tests" / "typing").is_dir():
        session.run("mypy", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML documentation; warnings and broken references are errors."""
    session.install(".[otel]", "-r", DOCS_REQUIREMENTS)
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


@nox.session
def chaos(session: nox.Session) -> None:
    """A chaos run and its history check (docs/fault-injection.rst); arguments go to
    ``python -m chaos.run``, e.g. ``-- --duration 60 --workers 5 --names 20 --seed 7``."""
    session.install(".[test]")
    session.run("python", "-m", "chaos.run", *session.posargs)


@nox.session
def chaos_defects(session: nox.Session) -> None:
    """Chaos runs against deliberately broken copies of the library: every defect must be
    caught by the checker. Arguments go to ``python -m chaos.defects``."""
    session.install(".[test]")
    session.run("python", "-m", "chaos.defects", *session.posargs)


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


# What each variant of tests_variants runs (the tests session has run every PostgreSQL test
# on the wheel's server already). On another server version: the tests whose outcome the
# server decides (the statements, locks, notifications, replication and failover, the
# server's settings); not the command line, demo, docs and benchmark tests, which run the
# same statements through more processes and take half of the suite's time.
SERVER_VERSION_TESTS = (
    "tests/test_backend_contract.py",
    "tests/test_backend_model_pg.py",
    "tests/test_session_contract.py",
    "tests/test_sql_writes.py",
    "tests/test_sql_batch.py",
    "tests/test_peer_postgres.py",
    "tests/test_session_postgres.py",
    "tests/test_fence_postgres.py",
    "tests/test_failover_postgres.py",
    "tests/test_multihost_postgres.py",
    "tests/test_hostile_inputs.py",
    "tests/test_harness.py",
    "tests/test_harness_replication.py",
)
# Against a server that the harness did not start (TRIO_PEERS_TEST_DSN): the harness and the
# pytest plugin in that mode, and the peers, sessions and command line on databases it makes
# there (the tests that need a server of their own skip in this mode).
EXTERNAL_SERVER_TESTS = (
    "tests/test_harness.py",
    "tests/test_pytest_plugin.py",
    "tests/test_backend_contract.py",
    "tests/test_peer_postgres.py",
    "tests/test_session_postgres.py",
    "tests/test_smoke_postgres.py",
    "tests/test_cli.py",
)


@nox.session
def tests_variants(session: nox.Session) -> None:
    """The server-dependent PostgreSQL tests on the machine's PostgreSQL (not the wheel's),
    and the harness, peer and command-line tests against an already running server given by
    TRIO_PEERS_TEST_DSN. With arguments, each variant runs ``pytest -m postgres`` with them
    instead of its own list."""
    session.install(".[test]")
    version_args = ["-m", "postgres", *(session.posargs or SERVER_VERSION_TESTS)]
    external_args = ["-m", "postgres", *(session.posargs or EXTERNAL_SERVER_TESTS)]

    # 1. The machine's binaries (e.g. Debian's PostgreSQL 15), if there are any.
    machine_only = {"TRIO_PEERS_PG_NO_EMBEDDED": "1"}
    found = session.run(
        "python", "-c", FIND_MACHINE_POSTGRES, env=machine_only, silent=True, log=False
    )
    bindir = found.strip() if isinstance(found, str) else ""
    if bindir:
        session.log(f"variant 1: PostgreSQL from {bindir}")
        session.run("pytest", *version_args, env=machine_only)
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
        session.run("pytest", *external_args, env={"TRIO_PEERS_TEST_DSN": dsn})
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


# What the sdist must hold besides the package, so that its tests run from it: the test suite
# and its data, the docs (their examples are tests), and the files they read.
SDIST_NEEDS = (
    "pyproject.toml",
    "noxfile.py",
    "README.md",
    "CHANGELOG.md",
    "tests/",
    "docs/",
    "chaos/",  # tests/test_chaos_check.py checks the chaos checker
    "benchmarks/",  # the benchmarks smoke test
)


def _git_files(*paths: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@nox.session
def dist(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, and use them as users would: the wheel installed
    in a fresh venv runs the command line and a short demo; the sdist runs the tests."""
    session.install(BUILD, TWINE)
    tmp = Path(session.create_tmp()).resolve()
    out = tmp / "dist"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(out), str(ROOT))
    (sdist,) = out.glob("trio_peers-*.tar.gz")
    (wheel,) = out.glob("trio_peers-*.whl")
    session.run("twine", "check", "--strict", str(sdist), str(wheel))

    # The version comes from git (hatch-vcs); 0.0.0 is its fallback when there is no history.
    version = wheel.name.split("-")[1]
    if version == "0.0.0" or sdist.name != f"trio_peers-{version}.tar.gz":
        session.error(f"bad version: {wheel.name}, {sdist.name} (is this a git checkout?)")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    if top != {"trio_peers", f"trio_peers-{version}.dist-info"}:
        session.error(f"the wheel holds more than the package: {sorted(top)}")
    if "trio_peers/py.typed" not in names or "trio_peers/_cli/_main.py" not in names:
        session.error("the wheel lacks py.typed or the command line")

    with tarfile.open(sdist) as tf:
        prefix = f"trio_peers-{version}/"
        members = {m.name.removeprefix(prefix) for m in tf.getmembers() if m.isfile()}
        missing = [f for f in _git_files(*SDIST_NEEDS, "trio_peers/") if f not in members]
        if missing:
            session.error(f"the sdist lacks files the tests need: {missing}")
        source = tmp / "sdist"
        shutil.rmtree(source, ignore_errors=True)
        tf.extractall(source, filter="data")

    # A fresh venv, outside the source tree, with the wheel and its demo extra.
    venv = tmp / "venv"
    session.run("python", "-m", "venv", "--clear", str(venv))
    python = str(venv / "bin" / "python")
    script = str(venv / "bin" / "trio-peers")
    session.run(python, "-m", "pip", "install", "-q", f"{wheel}[demo,test]", external=True)
    session.chdir(tmp)
    help_text = session.run(script, "--help", external=True, silent=True)
    if not isinstance(help_text, str) or "demo" not in help_text:
        session.error(f"trio-peers --help printed no commands: {help_text!r}")
    shown = session.run(script, "--version", external=True, silent=True)
    if not isinstance(shown, str) or shown.split() != ["trio-peers", version]:
        session.error(f"trio-peers --version printed {shown!r}, not {version}")
    session.run(python, "-m", "trio_peers", "--help", external=True, silent=True)
    # A throwaway PostgreSQL from the demo extra, two peers, a handover or two. Its files go in
    # the caller's TMPDIR, not nox's session tmp (inside the checkout, which the postgres user
    # may not be able to enter; .ci/run's TMPDIR is made for it and checked for leftovers).
    session.run(
        *(script, "demo", "--peers", "2", "--duration", "8", "--interval", "1"),
        env={"TMPDIR": os.environ.get("TMPDIR") or tempfile.gettempdir()},
        external=True,
    )

    # The sdist's own tests, on the installed wheel's dependencies (not PostgreSQL: the tests
    # session runs those).
    # Their TMPDIR is the caller's too: the demo tests start a server that runs as the
    # postgres user, who cannot enter nox's session tmp inside a private (0700) checkout.
    session.chdir(source / prefix)
    session.run(
        *(python, "-m", "pytest", "-q", "-m", "not postgres"),
        env={"TMPDIR": os.environ.get("TMPDIR") or tempfile.gettempdir()},
        external=True,
    )
