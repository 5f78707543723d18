"""The ``trio-peers`` command line and its demo: not part of the library's runtime.

``import trio_peers`` imports nothing from here (``tests/test_layering.py`` checks it). The
modules, in import order (no module imports one above it):

:mod:`trio_peers._cli._common`
    Exit codes, :class:`~trio_peers._cli._common.CLIError`, output and DSN helpers.
:mod:`trio_peers._cli._demo_peer`
    One peer process of ``trio-peers demo`` (``python -m trio_peers._cli._demo_peer``).
:mod:`trio_peers._cli._demo`
    The demo's controller: starts a throwaway server and the peer processes, and measures.
:mod:`trio_peers._cli._main`
    The argument parser, the ``migrate``, ``status`` and ``watch`` commands, and
    :func:`~trio_peers._cli._main.main`, the console script ``trio-peers``.

This package module imports none of them, so that a demo peer process loads only what it uses.
"""
