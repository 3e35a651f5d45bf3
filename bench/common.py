"""What every benchmark module shares: the row of the results table, timing helpers and the machine description.

A row is one figure with the reference it is compared with, both measured in the same run (or, where that cannot be,
a documented figure that the row names as such), their ratio (always figure / reference figure) and the target.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = ".venv/bin/python"


@dataclass
class Row:
    """One line of the results table."""

    section: str  # the --only name that produces it
    benchmark: str
    figure: float | None
    unit: str
    reference: str
    reference_figure: float | None
    target: str = "-"
    # None: no target; otherwise whether it is met. ``gap`` says by how much it is missed (>1 = factor short).
    met: bool | None = None
    gap: float | None = None
    note: str = ""  # what limits the figure, how it was measured
    command: str = ""
    skipped: str = ""  # a reason when the figure could not be measured here
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.figure is None or not self.reference_figure:
            return None
        return self.figure / self.reference_figure

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def at_least(row: Row, value: float, bound: float) -> Row:
    """Mark ``row`` against a target ``value >= bound`` (value is the figure or the ratio)."""
    row.met = value >= bound
    row.gap = None if row.met or value <= 0 else bound / value
    return row


def at_most(row: Row, value: float, bound: float) -> Row:
    """Mark ``row`` against a target ``value <= bound``."""
    row.met = value <= bound
    row.gap = None if row.met or bound <= 0 else value / bound
    return row


def skipped(section: str, benchmark: str, reason: str, *, target: str = "-", command: str = "") -> Row:
    return Row(section, benchmark, None, "", "", None, target=target, skipped=reason, command=command)


def command_for(section: str, quick: bool = False) -> str:
    return f"{PYTHON} bench/run.py --only {section}" + (" --quick" if quick else "")


# -- timing ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Nanoseconds per item: the median of the repetitions, and every repetition."""

    median_ns: float
    runs_ns: tuple[float, ...]
    items: int

    @property
    def per_second(self) -> float:
        return 1e9 / self.median_ns if self.median_ns else 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median of the repetitions: how steady the measurement was."""
        return (max(self.runs_ns) - min(self.runs_ns)) / self.median_ns if self.median_ns else 0.0


def time_per_item(
    run: Callable[[], int],
    *,
    repeats: int = 5,
    warmups: int = 1,
    budget_s: float = 20.0,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``run`` (which processes some items and returns how many) ``repeats`` times after ``warmups`` untimed
    calls; ``setup`` (untimed) runs before each call. Stops early (after at least 3 timed runs) once ``budget_s`` is
    spent. Returns ns per item, median over the repetitions."""
    start = time.perf_counter_ns()
    deadline = start + int(budget_s * 1e9)
    for _ in range(warmups):
        if setup is not None:
            setup()
        run()
    runs: list[float] = []
    items = 0
    while len(runs) < repeats:
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        items = run()
        t1 = time.perf_counter_ns()
        runs.append((t1 - t0) / max(items, 1))
        if len(runs) >= 3 and t1 > deadline:
            break
    return Timing(statistics.median(runs), tuple(runs), items)


def time_interleaved(
    runs: dict[str, Callable[[], int]],
    *,
    repeats: int = 5,
    warmups: int = 1,
    budget_s: float = 20.0,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Like :func:`time_per_item` for several workloads at once, run in turns, so a figure and its reference see the
    same machine: on a shared VM the speed drifts by 10-20 % between seconds, and interleaving keeps that drift out
    of their ratio. Every other round runs them in the reverse order (a, b, c, c, b, a, a, b, c, ...): a workload
    that always followed another one (whose frames had taken the caches) paid for it in every round: in the scale
    section two runs of the same work measured 1.06 apart in the median that way, 1.04 with the order reversed.
    Medians per workload; at least 3 rounds, then bounded by ``budget_s``."""
    setups = setups or {}
    deadline = time.perf_counter_ns() + int(budget_s * 1e9)
    for _ in range(warmups):
        for name, run in runs.items():
            if name in setups:
                setups[name]()
            run()
    results: dict[str, list[float]] = {name: [] for name in runs}
    items: dict[str, int] = dict.fromkeys(runs, 0)
    order = list(runs.items())
    for round_ in range(repeats):
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            if name in setups:
                setups[name]()
            t0 = time.perf_counter_ns()
            items[name] = run()
            results[name].append((time.perf_counter_ns() - t0) / max(items[name], 1))
        if round_ >= 2 and time.perf_counter_ns() > deadline:
            break
    return {name: Timing(statistics.median(r), tuple(r), items[name]) for name, r in results.items()}


# -- the machine -------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = ""
    flags: list[str] = []
    mhz = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and not cpu:
                cpu = value
            elif key == "cpu MHz" and not mhz:
                mhz = value
            elif key == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency of mplslb
        numpy_version = "-"
    return {
        "cpu": cpu or platform.processor(),
        "cpu_mhz": mhz,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "numpy": numpy_version,
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows in the figures."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "-"


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")
