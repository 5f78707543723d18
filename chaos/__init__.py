"""Fault injection for trio-peers: a chaos runner and a history checker.

Not part of the runtime package. ``python -m chaos.run --help`` runs a chaos
experiment (worker processes, a seeded fault schedule, a loopback proxy per
worker); ``python -m chaos.check DIR`` judges the history a run wrote. See
``docs/fault-injection.rst``.
"""
