"""Every code example in the documentation and the README runs, and shows what the docs say.

Examples are found in ``docs/**/*.rst`` (``.. code-block::`` directives) and ``README.md``
(fenced blocks). An rst comment right above a block (``.. test-example: OPTIONS``; in the README,
``<!-- test-example: OPTIONS -->``) says how to run it. Every ``python`` block is run, with or
without such a comment; ``postgresql`` and ``console`` blocks must have one.

Python blocks run with ``TRIO_PEERS_DSN`` (and a variable ``dsn``) naming the database:

* By default, against :class:`trio_peers.testing.MemoryBackend` under
  :class:`trio.testing.MockClock` (autojump): ``trio_peers.open_peer`` and
  ``trio_peers.migrate`` are patched to use one shared in-memory store, so the examples stay
  exactly as a reader would write them, and hours of virtual time pass in milliseconds.
* With the ``postgres`` option, against a real, freshly created PostgreSQL database and the
  real clock.

``trio.run(main)`` in a block is intercepted and run by the harness; a block may instead use
top-level ``await`` / ``async with``. A block that defines ``test_*`` functions has them run,
as pytest-trio would, with an ``autojump_clock``.

Options of a python block:

``continue``
    Run in the namespace of the previous python block of the same file (same test).
``forever``
    The program runs until stopped: it must still be running when the time limit ends it.
``time=S``
    The time limit, in virtual seconds (default 3600), or real seconds with ``postgres``.
``sigterm=S``
    Send this process SIGTERM after S (virtual) seconds; the example must then finish.
``postgres``
    Real PostgreSQL, real clock (the whole chain of ``continue`` blocks).
``file=NAME``
    Not run on its own: a file of a user's test suite (``conftest.py``, ``test_*.py``). The
    blocks with this option on one page make up one suite, which pytest runs in a subprocess
    with the ``ini`` block marked ``file=pytest.ini`` on that page; every test must pass.

A ``text`` block with the option ``output`` is compared with what the python block before it
printed (``...`` matches anything, as in doctest's ELLIPSIS).

``postgresql`` blocks: ``ddl`` must match the table trio-peers creates; the others (``grants``,
``fencing-...``) are run by the tests below that know what they are for.

``console`` blocks with the option ``cli`` are run line by line (``$ trio-peers ...``) as
subprocesses against a migrated PostgreSQL database, with ``exit=N`` for the expected status,
``interrupt=S`` to press Ctrl-C after S seconds, and ``peer`` to keep a peer (name
``reports``, node ``web-1``) leading while the commands run.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import doctest
import inspect
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
import trio.testing

import trio_peers
from tests.test_cli import cli_env
from trio_peers._sql import Statements
from trio_peers.testing import MemoryBackend, PostgresServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = [*sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts), ROOT / "README.md"]

_REAL_TRIO_RUN = trio.run
_REAL_OPEN_PEER = trio_peers.open_peer


# ---------------------------------------------------------------------- collecting


@attrs.frozen
class Block:
    path: Path
    line: int
    language: str
    code: str
    options: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def flag(self, name: str) -> bool:
        return name in self.options


def _options(text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in text.split():
        key, _, value = token.partition("=")
        options[key] = value
    return options


_RST_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block:: *(\S+)\s*$")
_RST_MARKER = re.compile(r"^\s*\.\. test-example:(.*)$")
_MD_FENCE = re.compile(r"^```(\S*)\s*$")
_MD_MARKER = re.compile(r"^<!-- test-example:(.*)-->\s*$")


def _previous_nonblank(lines: list[str], i: int) -> str:
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return lines[j] if j >= 0 else ""


def _rst_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _RST_DIRECTIVE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = len(match[1]), match[2]
        marker = _RST_MARKER.match(_previous_nonblank(lines, i))
        start = i
        i += 1
        while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # directive options
            i += 1
        body: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        yield Block(
            path,
            start + 1,
            language,
            textwrap.dedent("\n".join(body)).strip("\n") + "\n",
            _options(marker[1]) if marker else {},
        )


def _md_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _MD_FENCE.match(lines[i].strip())
        if not match or not match[1]:
            i += 1
            continue
        marker = _MD_MARKER.match(_previous_nonblank(lines, i).strip())
        start, fence_indent = i, len(lines[i]) - len(lines[i].lstrip())
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][fence_indent:])
            i += 1
        i += 1
        yield Block(
            path,
            start + 1,
            match[1],
            "\n".join(body).strip("\n") + "\n",
            _options(marker[1]) if marker else {},
        )


def all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in SOURCES:
        blocks.extend(_md_blocks(path) if path.suffix == ".md" else _rst_blocks(path))
    return blocks


@attrs.frozen
class Chain:
    """Python blocks that share a namespace, each with the output block that follows it."""

    steps: list[tuple[Block, Block | None]]

    @property
    def first(self) -> Block:
        return self.steps[0][0]


def python_chains() -> list[Chain]:
    chains: list[Chain] = []
    last_python: dict[Path, Block] = {}
    for block in all_blocks():
        if block.language == "python" and block.flag("file"):
            continue  # part of a pytest suite: test_documented_pytest_suites
        if block.language == "python":
            if block.flag("continue"):
                chain = chains[-1]
                assert chain.steps[-1][0].path == block.path, f"{block.where}: nothing to continue"
                chain.steps.append((block, None))
            else:
                chains.append(Chain([(block, None)]))
            last_python[block.path] = block
        elif block.flag("output") and block.language != "console":
            previous = last_python.get(block.path)
            assert previous is not None, f"{block.where}: output of what?"
            for chain in chains:
                for n, (step, output) in enumerate(chain.steps):
                    if step is previous:
                        assert output is None, f"{block.where}: a second output block"
                        chain.steps[n] = (step, block)
    return chains


def blocks_with(language: str, option: str) -> list[Block]:
    return [b for b in all_blocks() if b.language == language and b.flag(option)]


def test_every_example_is_exercised() -> None:
    """No example is left out: every block has a language this file knows how to run."""
    runnable = {"python", "postgresql", "console", "text", "sh", "ini"}
    for block in all_blocks():
        assert block.language in runnable, f"{block.where}: unknown language {block.language!r}"
        if block.language in ("postgresql", "console", "ini"):
            assert block.options, f"{block.where}: a {block.language} block with no test-example"
        if block.language == "sh":
            # Only the README's two commands at the top: CI runs the test command verbatim,
            # and tests/test_demo.py runs the demo.
            assert block.path.name == "README.md", f"{block.where}: use a console block"
    assert len(python_chains()) >= 10


# ---------------------------------------------------------------------- running python


class Harness:
    """Runs one chain of python blocks."""

    def __init__(self, chain: Chain, dsn: str, *, memory: bool) -> None:
        self.chain = chain
        self.dsn = dsn
        self.memory = memory
        self.backend = MemoryBackend()
        self.namespace: dict[str, Any] = {"__name__": "__doc_example__", "dsn": dsn}

    # The stand-ins for trio_peers.open_peer and trio_peers.migrate in memory mode.

    def open_peer(
        self,
        config: trio_peers.PeerConfig,
        *,
        backend: trio_peers.PeerBackend | None = None,
        on_event: trio_peers.EventHook | None = None,
    ) -> contextlib.AbstractAsyncContextManager[trio_peers.Peer]:
        return _REAL_OPEN_PEER(
            config, backend=self.backend if backend is None else backend, on_event=on_event
        )

    async def migrate(
        self,
        dsn: str,
        *,
        prefix: str = "public",
        table: str = "trio_peers",
        unlogged: bool = False,
        connect_timeout: float = 10.0,
    ) -> bool:
        await trio.lowlevel.checkpoint()
        created = (prefix, table) not in self.backend.tables
        self.backend.create_table(prefix, table)
        return created

    def run(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRIO_PEERS_DSN", self.dsn)
        if self.memory:
            monkeypatch.setattr(trio_peers, "open_peer", self.open_peer)
            monkeypatch.setattr(trio_peers, "migrate", self.migrate)
        for block, output in self.chain.steps:
            printed = self.run_block(block, monkeypatch)
            if output is not None:
                checker = doctest.OutputChecker()
                want = output.code
                if not checker.check_output(want, printed, doctest.ELLIPSIS):
                    pytest.fail(
                        f"{block.where}: the output differs from {output.where}\n"
                        f"--- documented:\n{want}--- printed:\n{printed}"
                    )

    def run_block(self, block: Block, monkeypatch: pytest.MonkeyPatch) -> str:
        code = compile(
            block.code,
            block.where,
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )

        def fake_trio_run(fn: Callable[..., Any], *args: Any, **_kw: Any) -> Any:
            return self.run_async(block, fn, args)

        before = set(self.namespace)
        out = io.StringIO()
        with monkeypatch.context() as patch, contextlib.redirect_stdout(out):
            patch.setattr(trio, "run", fake_trio_run)
            if code.co_flags & inspect.CO_COROUTINE:  # the block awaits at top level

                async def top_level() -> None:
                    await builtins.eval(code, self.namespace)  # noqa: S307 - our own docs

                fake_trio_run(top_level)
            else:
                exec(code, self.namespace)  # noqa: S102 - our own docs
            for name in sorted(set(self.namespace) - before):
                fn = self.namespace[name]
                if name.startswith("test_") and callable(fn):
                    self.run_test_function(block, fn)
        return out.getvalue()

    def _clock(self) -> trio.testing.MockClock | None:
        return trio.testing.MockClock(autojump_threshold=0) if self.memory else None

    def run_async(self, block: Block, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        limit = float(block.options.get("time") or (3600 if self.memory else 20))
        forever = block.flag("forever")
        sigterm = block.options.get("sigterm")
        finished = False
        result = None

        async def send_sigterm(after: float) -> None:
            await trio.sleep(after)
            os.kill(os.getpid(), signal.SIGTERM)

        async def harness() -> None:
            nonlocal finished, result
            with trio.move_on_after(limit):
                async with trio.open_nursery() as nursery:
                    if sigterm:
                        nursery.start_soon(send_sigterm, float(sigterm))
                    result = await fn(*args)
                    finished = True
                    nursery.cancel_scope.cancel()

        _REAL_TRIO_RUN(harness, clock=self._clock())
        if forever:
            assert not finished, f"{block.where}: marked 'forever', but it returned"
        else:
            assert finished, f"{block.where}: still running after {limit} s"
        return result

    def run_test_function(self, block: Block, fn: Callable[..., Any]) -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        kwargs = {"autojump_clock": clock} if "autojump_clock" in fn.__code__.co_varnames else {}

        async def harness() -> None:
            with trio.fail_after(24 * 3600):
                await fn(**kwargs)

        _REAL_TRIO_RUN(harness, clock=clock)


def _ids(chains: list[Chain]) -> list[str]:
    return [c.first.where for c in chains]


MEMORY_CHAINS = [c for c in python_chains() if not c.first.flag("postgres")]
POSTGRES_CHAINS = [c for c in python_chains() if c.first.flag("postgres")]


@pytest.mark.parametrize("chain", MEMORY_CHAINS, ids=_ids(MEMORY_CHAINS))
def test_python_example(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    Harness(chain, "memory://", memory=True).run(monkeypatch)


@pytest.mark.parametrize("chain", POSTGRES_CHAINS, ids=_ids(POSTGRES_CHAINS))
def test_python_example_on_postgres(
    chain: Chain, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Harness(chain, pg_dsn, memory=False).run(monkeypatch)


# ---------------------------------------------------------------------- pytest suites


def pytest_suites() -> dict[Path, list[Block]]:
    suites: dict[Path, list[Block]] = {}
    for block in all_blocks():
        if block.language == "python" and block.flag("file"):
            suites.setdefault(block.path, []).append(block)
    return suites


PYTEST_SUITES = pytest_suites()


@pytest.mark.postgres
@pytest.mark.parametrize(
    "path", list(PYTEST_SUITES), ids=[str(p.relative_to(ROOT)) for p in PYTEST_SUITES]
)
def test_documented_pytest_suite(
    path: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    files: dict[str, str] = {}
    for block in PYTEST_SUITES[path]:
        name = block.options["file"]
        assert name not in files, f"{block.where}: a second block for {name}"
        files[name] = block.code
    for name, code in files.items():
        (pytester.path / name).write_text(code)
    (block,) = [b for b in blocks_with("ini", "file") if b.path == path]
    pytester.makeini(block.code + "addopts = -p no:cacheprovider\n")
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    result = pytester.runpytest_subprocess("-v", timeout=240)
    tests = sum(
        code.count("\ndef test_") + code.count("\nasync def test_") for code in files.values()
    )
    assert tests >= 1
    if os.environ.get("TRIO_PEERS_TEST_DSN"):
        outcomes = result.parseoutcomes()
        assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == 0, result.stdout.str()
        assert outcomes.get("passed", 0) + outcomes.get("skipped", 0) == tests
    else:
        result.assert_outcomes(passed=tests)


def test_the_documented_suites_exist() -> None:
    assert {p.name for p in PYTEST_SUITES} == {"testing.rst"}


# ---------------------------------------------------------------------- SQL


def _normalize_sql(sql: str) -> str:
    return " ".join(sql.split()).rstrip(";")


def test_documented_table_is_the_one_migrate_creates() -> None:
    (block,) = blocks_with("postgresql", "ddl")
    created = Statements("prefix", "table").create_table()
    assert _normalize_sql(block.code) == _normalize_sql(created)


def _sql(role: str) -> str:
    (block,) = blocks_with("postgresql", role)
    return block.code


def test_fenced_write_rejects_older_terms(pg_server: PostgresServer, pg_dsn: str) -> None:
    database = urlsplit(pg_dsn).path.lstrip("/")
    pg_server.execute(_sql("fencing-table"), database=database)
    write = _sql("fencing-write")

    def written(key: str, value: str, term: int) -> bool:
        return len(pg_server.execute(write, key, value, term, database=database)) == 1

    assert written("daily", "v1", 3)  # first write
    assert written("daily", "v2", 3)  # same tenure again
    assert written("daily", "v3", 5)  # a newer tenure
    assert not written("daily", "v4", 4)  # a deposed leader's late write: rejected
    assert written("weekly", "w1", 4)  # keys are fenced independently
    rows = pg_server.execute("SELECT key, value, term FROM report ORDER BY key", database=database)
    assert rows == [("daily", "v3", 5), ("weekly", "w1", 4)]

    pg_server.execute(
        "CREATE TABLE fences (resource text PRIMARY KEY, term bigint NOT NULL)", database=database
    )
    pg_server.execute("INSERT INTO fences VALUES ('reports', 0)", database=database)
    advance = _sql("fencing-advance")

    def raised(term: int) -> bool:
        return len(pg_server.execute(advance, "reports", term, database=database)) == 1

    assert raised(5)
    assert raised(5)
    assert not raised(4)
    assert raised(6)


def test_documented_grants_are_enough_for_a_peer(pg_server: PostgresServer, pg_dsn: str) -> None:
    database = urlsplit(pg_dsn).path.lstrip("/")
    trio.run(trio_peers.migrate, pg_dsn)
    role = f"app_{uuid.uuid4().hex[:8]}"
    pg_server.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        for statement in _sql("grants").split(";"):
            if statement.strip():
                pg_server.execute(statement.replace("app", f'"{role}"'), database=database)
        parts = urlsplit(pg_dsn)
        role_dsn = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()

        async def lead_and_release() -> None:
            config = trio_peers.PeerConfig(dsn=role_dsn, node="app-1")
            async with trio_peers.open_peer(config) as peer:
                assert peer.is_leader
                assert await peer.get_leader() is not None
                assert peer.statistics().last_error is None
            async with trio_peers.open_peer(config) as peer:
                assert peer.term == 2  # the release worked, and a new tenure began

        trio.run(lead_and_release)
    finally:
        pg_server.execute(f'DROP OWNED BY "{role}"', database=database)
        pg_server.execute(f'DROP ROLE "{role}"')


# ---------------------------------------------------------------------- the command line

CLI_BLOCKS = blocks_with("console", "cli")

PEER_SCRIPT = """
import signal, sys, trio
from trio_peers import PeerConfig, open_peer

# Started in the background (as CI starts the suite), a process inherits SIGINT ignored;
# then Ctrl-C never reaches Python, and the peer would not leave at the end of the test.
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    config = PeerConfig(dsn=sys.argv[1], name="reports", node="web-1", interval=30)
    async with open_peer(config) as peer:
        await peer.wait_leader()
        print("leading", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


@contextlib.contextmanager
def background_peer(dsn: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT, dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the KeyboardInterrupt traceback at the end
        text=True,
        env=cli_env(),
    )
    stuck = False
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "leading"
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the peer releases its lease
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stuck = True
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # (Not reached when the block raised: its error is the one to see.)
    assert not stuck, "the background peer did not leave within 10 s of SIGINT"


def _commands(block: Block) -> list[list[str]]:
    commands = []
    for line in block.code.splitlines():
        if line.startswith("$ trio-peers"):
            commands.append(shlex.split(line[2:]))
        else:
            # Only output lines, and `export` lines for the environment the harness sets.
            assert not line.startswith("$ ") or line.startswith("$ export "), line
    return commands


def _expected_output(block: Block) -> str:
    lines = [line for line in block.code.splitlines() if not line.startswith("$ export ")]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.where for b in CLI_BLOCKS])
def test_cli_example(block: Block, pg_dsn: str) -> None:
    trio.run(trio_peers.migrate, pg_dsn)
    expected_status = int(block.options.get("exit") or 0)
    interrupt = block.options.get("interrupt")
    transcript: list[str] = []
    with background_peer(pg_dsn) if block.flag("peer") else contextlib.nullcontext():
        for argv in _commands(block):
            argv = argv[1:]
            env = cli_env(TRIO_PEERS_DSN=pg_dsn)
            transcript.append("$ " + shlex.join(["trio-peers", *argv]))
            proc = subprocess.Popen(
                [sys.executable, "-m", "trio_peers", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            if interrupt:
                time.sleep(float(interrupt))
                proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
            transcript.append(out.rstrip("\n"))
            assert proc.returncode == expected_status, "\n".join(transcript)
    printed = "\n".join(transcript) + "\n"
    if block.flag("output"):
        want = _expected_output(block)
        if not doctest.OutputChecker().check_output(want, printed, doctest.ELLIPSIS):
            pytest.fail(
                f"{block.where}: the output differs\n--- documented:\n{want}"
                f"--- printed:\n{printed}"
            )


# ---------------------------------------------------------------------- the API reference


def test_reference_documents_every_public_name() -> None:
    """Every public name has a docstring, and the reference pulls it in."""
    import trio_peers.testing

    text = (DOCS / "reference.rst").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|data):: ([\w.]+)", text, re.MULTILINE))
    by_hand = set(re.findall(r"^\.\. data:: ([\w.]+)", text, re.MULTILINE))
    modules = set(re.findall(r"^\.\. module:: ([\w.]+)", text, re.MULTILINE))
    assert modules >= {"trio_peers.testing", "trio_peers.testing.pytest_plugin"}
    testing_names = [
        n
        for n in dir(trio_peers.testing)
        if not n.startswith("_") and not inspect.ismodule(getattr(trio_peers.testing, n))
    ]
    for module, names in (
        ("trio_peers", trio_peers.__all__),
        ("trio_peers.testing", testing_names),
    ):
        for name in names:
            assert name in documented, f"{module}.{name} is missing from docs/reference.rst"
            if name not in by_hand:  # `.. data::` entries carry their text in the rst
                obj = getattr(sys.modules[module], name)
                assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"
