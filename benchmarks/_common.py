"""Shared parts of the benchmarks: peer-process drivers, statistics, machine facts.

Every peer process writes JSON lines to stdout, each with ``t`` = ``time.monotonic()``
(CLOCK_MONOTONIC, one clock for every process of the host), so that an interval between
two processes' events is a plain subtraction.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeerProcess:
    """One peer process (either library), driven over stdin, read over stdout.

    stdout is read unbuffered through its file descriptor, so that ``select`` over several
    processes never misses a line already read into a buffer.
    """

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.p = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        assert self.p.stdout is not None
        self.fd = self.p.stdout.fileno()
        self.buf = b""
        self.backlog: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.p.pid

    def send(self, command: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write((command + "\n").encode())
        self.p.stdin.flush()

    def _line(self) -> dict[str, Any] | None:
        if b"\n" not in self.buf:
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        data: dict[str, Any] = json.loads(line)
        return data

    def _fill(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False if nothing came."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise RuntimeError(f"peer process {self.argv[1:3]} exited (rc={self.p.poll()})")
        self.buf += chunk
        return True

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        while (data := self._line()) is None:
            if not self._fill(deadline - time.monotonic()) and time.monotonic() >= deadline:
                return None
        return data

    def until(self, event: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next event named ``event`` (earlier other events are kept in backlog)."""
        for i, data in enumerate(self.backlog):
            if data["event"] == event:
                del self.backlog[: i + 1]
                return data
        self.backlog.clear()
        deadline = time.monotonic() + timeout
        while True:
            data_or_none = self.read(deadline - time.monotonic())
            if data_or_none is None:
                raise TimeoutError(f"no {event!r} from {self.argv[1:3]} within {timeout} s")
            if data_or_none["event"] == "error":
                raise RuntimeError(f"peer process reported: {data_or_none}")
            if data_or_none["event"] == event:
                return data_or_none
            self.backlog.append(data_or_none)

    def drain(self) -> list[dict[str, Any]]:
        """Every event already written (without waiting), backlog included."""
        out = list(self.backlog)
        self.backlog.clear()
        while (data := self.read(0)) is not None:
            out.append(data)
        return out

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def close(self, timeout: float = 20.0) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(timeout)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.p.stdin, self.p.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def first_event(
    procs: Sequence[PeerProcess], event: str, timeout: float = 120.0
) -> tuple[PeerProcess, dict[str, Any]]:
    """The first ``event`` any of ``procs`` reports (other events go to each backlog)."""
    for proc in procs:
        for i, data in enumerate(proc.backlog):
            if data["event"] == event:
                del proc.backlog[: i + 1]
                return proc, data
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            while (line := proc._line()) is not None:
                if line["event"] == event:
                    return proc, line
                proc.backlog.append(line)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {event!r} from any of {len(procs)} processes")
        ready, _, _ = select.select([p.fd for p in procs], [], [], left)
        for proc in procs:
            if proc.fd in ready:
                proc._fill(0)


def close_all(procs: Iterable[PeerProcess]) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.p.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.send("quit")
    for proc in procs:
        proc.close()


# --------------------------------------------------------------------- statistics


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "n": len(v),
        "min": v[0] if v else math.nan,
        "p50": quantile(v, 0.5),
        "p95": quantile(v, 0.95),
        "max": v[-1] if v else math.nan,
    }


# --------------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size (/proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def load_average() -> list[float]:
    return list(os.getloadavg())


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "system": platform.system(),
        "memory_bytes": mem,
        "load_average_at_start": load_average(),
    }
