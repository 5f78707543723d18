"""Sphinx configuration for the trio-peers documentation."""

from __future__ import annotations

import importlib.metadata

project = "trio-peers"
author = "trio-peers developers"
copyright = "2026, trio-peers developers"

try:
    release = importlib.metadata.version("trio-peers")
except importlib.metadata.PackageNotFoundError:  # building from a bare checkout
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinxcontrib_trio",
]

# The build machines have no network access, so no inventories are fetched: links to the
# Python and Trio docs would need a mapping (and a download) here.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# Every cross-reference must resolve (the docs session also passes -n -W).
nitpicky = True
default_role = "obj"

autodoc_member_order = "bysource"
autodoc_typehints = "description"

exclude_patterns = ["_build"]

html_theme = "furo"
html_title = f"trio-peers {release}"
