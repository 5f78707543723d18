"""Tests of ``trio-peers demo``: its bookkeeping, a short real run, and Ctrl-C in the middle.

The real runs start the demo as a subprocess with a marker in its environment (inherited by the
peer processes, the PostgreSQL server and the harness's watchdog) and a private TMPDIR, so that
the test can check afterwards that no process and no temporary directory was left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.test_cli import importable_env
from trio_peers._cli._demo import (
    DemoOptions,
    Disruption,
    Tenure,
    find_overlaps,
    format_seconds,
    format_summary,
    summarize,
)

PROC = Path("/proc")
DEMO = (sys.executable, "-m", "trio_peers", "demo")


# ---------------------------------------------------------------------- bookkeeping


def test_no_overlap_for_back_to_back_tenures() -> None:
    tenures = [
        Tenure("P1", 1, 0.0, 1.0, "stepped down"),
        Tenure("P2", 2, 1.004, 3.0, "killed"),
        Tenure("P3", 3, 4.5, None),
    ]
    assert find_overlaps(tenures, now=10.0) == []
    summary = summarize(tenures, [], now=10.0)
    assert summary.safe
    assert summary.handovers == 2
    assert summary.min_gap == pytest.approx(0.004)
    assert (summary.first_term, summary.last_term) == (1, 3)


def test_overlap_is_found_and_reported() -> None:
    tenures = [
        Tenure("P1", 1, 0.0, 2.0, "stepped down"),
        Tenure("P2", 2, 1.5, None),  # started while P1 still led
        Tenure("P1", 3, 5.0, 6.0, "stepped down"),  # overlaps the open P2 tenure
    ]
    overlaps = find_overlaps(tenures, now=8.0)
    assert [(o.first.term, o.second.term) for o in overlaps] == [(1, 2), (2, 3)]
    assert overlaps[0].seconds == pytest.approx(0.5)
    assert overlaps[1].seconds == pytest.approx(1.0)
    summary = summarize(tenures, [], now=8.0)
    assert not summary.safe
    text = "\n".join(
        format_summary(summary, DemoOptions(), elapsed=8, processes=2, interrupted=False)
    )
    assert "SAFETY VIOLATION" in text
    assert "P1 (term 1) and P2 (term 2) overlapped for 500.0 ms" in text


def test_same_process_tenures_never_overlap_themselves() -> None:
    # A lapse and re-election of one process: two tenures, no handover, no overlap.
    tenures = [Tenure("P1", 1, 0.0, 1.0, "stepped down"), Tenure("P1", 2, 0.9, None)]
    assert find_overlaps(tenures, now=2.0) == []
    assert summarize(tenures, [], now=2.0).handovers == 0


def test_terms_must_increase() -> None:
    tenures = [Tenure("P1", 2, 0.0, 1.0), Tenure("P2", 2, 1.1, 2.0)]
    summary = summarize(tenures, [], now=3.0)
    assert not summary.terms_increasing
    assert not summary.safe


def test_summary_latencies() -> None:
    tenures = [
        Tenure("P1", 1, 0.0, 1.0),
        Tenure("P2", 2, 1.005, 3.0),
        Tenure("P3", 3, 4.0, 5.0),
        Tenure("P4", 4, 5.0101, None),
    ]
    disruptions = [
        Disruption("graceful", "P1", 1.0, "P2", 0.005),
        Disruption("crash", "P2", 3.0, "P3", 1.0),
        Disruption("graceful", "P3", 5.0, "P4", 0.0101),
    ]
    summary = summarize(tenures, disruptions, now=6.0)
    assert summary.handovers == 3
    assert summary.graceful == [0.005, 0.0101]
    assert summary.crash == [1.0]
    assert summary.other == 0
    lines = format_summary(summary, DemoOptions(), elapsed=6.0, processes=4, interrupted=False)
    text = "\n".join(lines)
    assert re.search(r"graceful \(SIGTERM\)\s+5\.0 ms\s+7\.5 ms\s+10\.1 ms", text), text
    assert re.search(r"crash \(SIGKILL\)\s+1\.00 s\s+1\.00 s\s+1\.00 s", text), text
    assert "never" in text


def test_format_seconds() -> None:
    assert format_seconds(0.0042) == "4.2 ms"
    assert format_seconds(1.5) == "1.50 s"


# ---------------------------------------------------------------------- real runs


@pytest.fixture
def demo_env() -> Iterator[tuple[dict[str, str], str, Path]]:
    """Environment, marker and TMPDIR for a demo subprocess.

    The TMPDIR is world-traversable: as root, the server runs as another OS user, which must
    reach its directories in there (pytest's tmp_path is private to root).
    """
    tmpdir = Path(tempfile.mkdtemp(prefix="trio-peers-demo-test-"))
    tmpdir.chmod(0o755)
    marker = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(importable_env(env))
    env.update(
        TMPDIR=str(tmpdir),
        TRIO_PEERS_DEMO_TEST_MARKER=marker,
    )
    try:
        yield env, marker, tmpdir
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def marked_processes(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries ``marker``."""
    needle = f"TRIO_PEERS_DEMO_TEST_MARKER={marker}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone, or not ours to read
        if state != "Z":
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def assert_nothing_left(marker: str, tmpdir: Path) -> None:
    # The harness's watchdog exits when the demo's end of its pipe closes: allow it a moment.
    deadline = time.monotonic() + 10
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left
    assert list(tmpdir.iterdir()) == []


needs_proc = pytest.mark.skipif(not (PROC / "self" / "environ").exists(), reason="needs /proc")


def summary_numbers(out: str) -> tuple[int, int, int]:
    match = re.search(r"handovers seen\s+(\d+)\s+\((\d+) graceful, (\d+) crash", out)
    assert match, out
    return int(match[1]), int(match[2]), int(match[3])


@needs_proc
def test_demo_run(demo_env: tuple[dict[str, str], str, Path]) -> None:
    env, marker, tmpdir = demo_env
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_peers",
            "demo",
            "--peers",
            "3",
            "--duration",
            "8",
            "--interval",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    handovers, graceful, crash = summary_numbers(out)
    assert graceful >= 1
    assert crash >= 1
    assert handovers >= graceful + crash
    # Every row of the latency table has three measurements.
    unit = r"[\d.]+ (?:ms|s)"
    assert re.search(rf"graceful \(SIGTERM\)\s+{unit}\s+{unit}\s+{unit}", out), out
    assert re.search(rf"crash \(SIGKILL\)\s+{unit}\s+{unit}\s+{unit}", out), out
    assert re.search(r"two leaders at once\s+never", out), out
    assert "LEADS, term 1" in out
    assert "<- graceful handover in" in out
    assert "<- crash handover in" in out
    assert "exited unexpectedly" not in out
    assert_nothing_left(marker, tmpdir)


@needs_proc
def test_demo_with_dsn(pg_dsn: str, demo_env: tuple[dict[str, str], str, Path]) -> None:
    env, _marker, _tmpdir = demo_env
    proc = subprocess.run(
        # 8 s, not 3: the demo stops a leader only if a leader, a settle time (1 s here) and
        # the handover fit before the end; with 3 s, on a loaded machine (CI shares its
        # cores) slow peer start-up once left no time for one ("graceful >= 1" failed).
        [*DEMO, "--dsn", pg_dsn, "--peers", "2", "--duration", "8", "--interval", "0.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=40,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting a throwaway PostgreSQL" not in proc.stdout
    assert "lease table public.trio_peers created" in proc.stdout
    _handovers, graceful, _crash = summary_numbers(proc.stdout)
    assert graceful >= 1
    assert re.search(r"two leaders at once\s+never", proc.stdout)


class Output:
    """Collects a subprocess's stdout in a task, so the test can wait for a line."""

    def __init__(self) -> None:
        self.text = ""
        self.changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some():
            self.text += chunk.decode(errors="replace")
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, needle: str) -> None:
        await trio.lowlevel.checkpoint()
        while needle not in self.text:
            await self.changed.wait()


@needs_proc
async def test_demo_sigint_mid_run_leaves_nothing(
    demo_env: tuple[dict[str, str], str, Path],
) -> None:
    env, marker, tmpdir = demo_env
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_peers", "demo", "--duration", "60", "--interval", "1"],
        stdout=subprocess.PIPE,
        env=env,
    )
    output = Output()
    try:
        assert process.stdout is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.collect, process.stdout)
            with trio.fail_after(30):
                # Mid-run: peers elected a leader and the schedule has started to stop them.
                await output.wait_for(">>> stopping leader")
            process.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                code = await process.wait()
        assert code == 130, output.text
        assert "SIGINT: stopping the peers and the database" in output.text
        assert re.search(r"stopped \d peer processes", output.text), output.text
        assert "PostgreSQL stopped" in output.text
        assert "Summary (interrupted: partial)" in output.text
        await trio.to_thread.run_sync(assert_nothing_left, marker, tmpdir)
    finally:
        with trio.move_on_after(10, shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
