"""The project's claims about itself agree: the Pythons in the classifiers are the ones nox
and CI test, and the lower bound of requires-python is the oldest of them."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def claimed_pythons() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: "
    return sorted(
        (c.removeprefix(prefix) for c in project["classifiers"] if re.fullmatch(r".* 3\.\d+", c)),
        key=lambda v: int(v.split(".")[1]),
    )


def nox_constant(name: str) -> list[str]:
    """The tuple that noxfile.py assigns to ``name``."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, tuple)
            return list(value)
    raise AssertionError(f"noxfile.py defines no {name}")


def nox_pythons() -> list[str]:
    return nox_constant("PYTHONS")


def test_classifiers_are_the_pythons_nox_tests() -> None:
    assert claimed_pythons() == nox_pythons()
    assert len(claimed_pythons()) >= 3


def test_requires_python_starts_at_the_oldest_tested() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={claimed_pythons()[0]}"


def test_ci_runs_every_claimed_python() -> None:
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run here (an sdist)")
    text = ci.read_text()
    # The main suite runs on nox's own interpreter (the oldest claimed); the others by name.
    assert "python3 -m nox -s tests\n" in text
    for version in claimed_pythons()[1:]:
        assert f"tests_pythons-{version}" in text, version


def test_read_the_docs_builds_like_nox() -> None:
    # The same requirements file and extra as the docs session, and warnings as errors.
    rtd = (ROOT / ".readthedocs.yaml").read_text() if (ROOT / ".readthedocs.yaml").exists() else ""
    if not rtd:
        pytest.skip("no .readthedocs.yaml here (an sdist)")
    noxfile = (ROOT / "noxfile.py").read_text()
    assert 'DOCS_REQUIREMENTS = "docs/requirements.txt"' in noxfile
    assert 'session.install(".[otel]", "-r", DOCS_REQUIREMENTS)' in noxfile
    assert "- requirements: docs/requirements.txt" in rtd
    assert re.search(r"extra_requirements:\s*\n\s*- otel\n", rtd)
    assert "fail_on_warning: true" in rtd
    assert "configuration: docs/conf.py" in rtd


def test_the_nox_test_lists_name_postgres_test_modules() -> None:
    """The lists of test modules that nox runs on other Pythons and servers name modules that
    exist and hold PostgreSQL tests (a renamed module would otherwise drop out unseen)."""
    lists = {
        name: nox_constant(name)
        for name in ("PEER_POSTGRES_TESTS", "SERVER_VERSION_TESTS", "EXTERNAL_SERVER_TESTS")
    }
    modules = sorted({m for listed in lists.values() for m in listed})
    for name, listed in lists.items():
        assert listed and len(set(listed)) == len(listed), name
        for module in listed:
            assert (ROOT / module).is_file(), f"{name} names {module}, which does not exist"
    # pytest's own selection: `-m postgres` keeps at least one test of each module.
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "postgres", *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    selected = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert not set(modules) - selected, f"no PostgreSQL tests in {set(modules) - selected}"
