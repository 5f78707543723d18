"""Sphinx configuration for the trio-peers documentation."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

from sphinx.application import Sphinx

project = "trio-peers"
author = "trio-peers developers"
copyright = "2026, trio-peers developers"

try:
    release = importlib.metadata.version("trio-peers")
except importlib.metadata.PackageNotFoundError:  # building from a bare checkout
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

# docs/_diagrams.py: the timing diagrams, drawn from trio-peers' own defaults and formulas.
sys.path.insert(0, str(Path(__file__).parent))

extensions = [
    "_diagrams",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinxcontrib_trio",
    # sphinx.ext.napoleon is set up in setup() below, for docstrings only (not attributes).
]

# The build machines have no network access, so no inventories are fetched: links to the
# Python and Trio docs would need a mapping (and a download) here.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# Every cross-reference must resolve (the docs session also passes -n -W)...
nitpicky = True
# ...except references into other projects' docs: without network access there are no
# intersphinx inventories to resolve them against. Only external namespaces are listed here
# (Trio, asyncpg, attrs, and the standard-library modules our signatures mention); every name
# of trio-peers itself must resolve, with the exceptions in nitpick_ignore below.
nitpick_ignore_regex = [
    (r"py:.*", r"(trio|asyncpg|attrs|asyncio|opentelemetry)(\..*)?"),
    (r"py:.*", r"(datetime|contextlib|collections\.abc|pathlib|os|typing|types)(\..*)?"),
]
nitpick_ignore = [
    # pathlib.Path, as the testing harness's annotations spell it.
    ("py:class", "Path"),
    # opentelemetry.metrics.MeterProvider, as trio_peers.otel's annotations spell it.
    ("py:class", "MeterProvider"),
    # The operating system's variable, named in find_postgres_bindir's docstring.
    ("envvar", "PATH"),
]
default_role = "obj"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types go next to the parameters a docstring describes; no lists of bare parameter names.
autodoc_typehints_description_target = "documented"

# Google-style sections (Args:, Returns:, Raises:), as in Trio's docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build"]

html_theme = "furo"
html_title = f"trio-peers {release}"


def _merge_private_attribute_docs(_app: Sphinx) -> None:
    """Let autodoc find the attribute docstrings of re-exported classes.

    trio-peers, like Trio, sets ``__module__`` of its public classes to the public package
    (``trio_peers``, ``trio_peers.testing``), so autodoc looks for attribute docstrings
    (strings under a field or an assignment) in the package's ``__init__.py``, where there are
    none. Copy them there from the private modules the classes are defined in.
    """
    from sphinx.pycode import ModuleAnalyzer

    for public in ("trio_peers", "trio_peers.testing"):
        analyzer = ModuleAnalyzer.for_module(public)
        analyzer.analyze()
        package = importlib.import_module(public)
        for info in pkgutil.iter_modules(package.__path__, public + "."):
            leaf = info.name.rpartition(".")[2]
            if not leaf.startswith("_") or leaf.startswith("__"):
                continue
            private = ModuleAnalyzer.for_module(info.name)
            private.analyze()
            for key, lines in private.attr_docs.items():
                analyzer.attr_docs.setdefault(key, lines)
            for key, order in private.tagorder.items():
                analyzer.tagorder.setdefault(key, order)


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", _merge_private_attribute_docs)

    # Napoleon reads an attribute's docstring "Instance name: peers with ..." as
    # "<type>: <description>". Our attribute docstrings are plain prose, so napoleon only
    # gets to see the docstrings of modules, classes, functions and methods.
    from sphinx.ext import napoleon

    app.setup_extension("sphinx.ext.napoleon")
    listeners = app.events.listeners["autodoc-process-docstring"]
    for listener in list(listeners):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)

    def process_docstring(
        app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
    ) -> None:
        if what not in ("attribute", "data", "property"):
            napoleon._process_docstring(app, what, name, obj, options, lines)  # type: ignore[arg-type]

    app.connect("autodoc-process-docstring", process_docstring)
