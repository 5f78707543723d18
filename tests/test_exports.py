"""The public API: what is exported, and that its classes are final."""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version

import pytest

import trio_peers
import trio_peers.otel
import trio_peers.testing


def test_all_names_exist_and_report_the_public_module() -> None:
    for name in trio_peers.__all__:
        obj = getattr(trio_peers, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "trio_peers", name


def test_private_helpers_are_not_exported() -> None:
    public = {n for n in dir(trio_peers) if not n.startswith("_")}
    assert public - set(trio_peers.__all__) <= {"testing", "otel"}  # submodules, when imported


@pytest.mark.parametrize(
    "cls",
    [
        trio_peers.Peer,
        trio_peers.PeerConfig,
        trio_peers.LeadershipChange,
        trio_peers.LeadershipChannel,
        trio_peers.LeaderInfo,
        trio_peers.PeerStatistics,
        trio_peers.LeaderScope,
        trio_peers.ElectionOutcome,
        trio_peers.Fence,
        trio_peers.AsyncpgBackend,
        trio_peers.ElectionRound,
        trio_peers.LeadershipGained,
        trio_peers.LeadershipLost,
        trio_peers.Fault,
        trio_peers.NotificationReceived,
        trio_peers.LeaseReleased,
        trio_peers.otel.PeerMetrics,
        trio_peers.testing.MemoryBackend,
        trio_peers.testing.PostgresServer,
    ],
)
def test_public_classes_are_final(cls: type) -> None:
    # typing.final: type checkers reject subclasses (mypy strict runs in CI).
    assert getattr(cls, "__final__", False) is True


def test_version_matches_the_installed_metadata() -> None:
    try:
        expected = version("trio-peers")
    except PackageNotFoundError:  # running from a source tree
        expected = "0.0.0"
    assert trio_peers.__version__ == expected
