"""The engine benchmark's world is what its rows assume: a SYN, the server's SYN-ACK and the client's request
leave every TCP session established with its C2S label out of the watch (the steady state the fast-path rows
time), and UDP sessions open on their first datagram. Run on a few hundred flows, not timed. And the benchmarks'
turns swap their order every other round, the bulk downloads' file is read from the page cache by every path, and
runs in turns are judged against the references of the same rounds."""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import time_interleaved  # noqa: E402
from e2e import BULK_FILE, PACED_SCRIPT, idle_cpu, idle_rows, make_bulk_files, turn_rows, wrk_args  # noqa: E402
from engine import open_sessions  # noqa: E402
from frames import c2s_of_flow, make_config  # noqa: E402
from mplslb.balancer import TIMER_SESSIONS, Balancer  # noqa: E402
from mplslb.sessions import SessionState  # noqa: E402
from mplslb.wire.ip import IPPROTO_UDP  # noqa: E402
from timers import mass_idle_out  # noqa: E402


def test_the_benchmarks_sessions_reach_the_steady_state() -> None:
    balancer = Balancer(make_config())
    open_sessions(balancer, range(300))  # checks the watch itself and raises otherwise
    states = {balancer.sessions.by_c2s(c2s_of_flow(f)).state for f in range(300)}  # type: ignore[union-attr]
    assert states == {SessionState.ESTABLISHED}
    open_sessions(balancer, range(300, 400), proto=IPPROTO_UDP)
    assert balancer.stats().sessions_active == 400


def test_the_mass_idle_out_bench_runs_the_timers_in_bounded_runs_and_its_reference_in_one() -> None:
    count = 2 * TIMER_SESSIONS + 1
    assert mass_idle_out(count, unbounded=False)[0] == 3  # it raises if a session is left
    assert mass_idle_out(count, unbounded=True)[0] == 1


def test_workloads_timed_in_turns_swap_their_order_every_other_round() -> None:
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name) or 1) for name in "abc"}
    timings = time_interleaved(runs, repeats=4, warmups=0, budget_s=60.0)
    assert "".join(calls) == "abccbaabccba"  # no workload always runs right after the same one
    assert all(len(t.runs_ns) == 4 for t in timings.values())


def _filesystem_of(path: Path) -> str:
    """The type of the file system ``path`` lies on (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def _resident_pages(path: Path) -> tuple[int, int]:
    """How many of the file's pages are in the page cache (mincore), of how many."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        found = sum(v & 1 for v in vec)
    return found, pages


def test_the_bulk_file_is_one_file_in_every_web_root_and_already_in_the_page_cache(tmp_path: Path) -> None:
    lab = SimpleNamespace(dir=tmp_path, server_name=lambda j: f"s{j + 1}")
    roots = [tmp_path / f"s{j + 1}" / "www" for j in range(3)]
    for root in roots:
        root.mkdir(parents=True)
    (roots[2] / BULK_FILE).write_bytes(b"left from before")
    make_bulk_files(lab, 3, size=8 << 20)
    files = [root / BULK_FILE for root in roots]
    assert {f.stat().st_ino for f in files} == {files[0].stat().st_ino}
    assert files[2].stat().st_size == 8 << 20
    if _filesystem_of(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a tmpfs reads a sparse file's holes as the zero page: nothing is cached to check")
    found, pages = _resident_pages(files[0])
    assert found == pages


def test_runs_in_turns_are_judged_by_the_medians_of_the_rounds() -> None:
    figures = {  # path: (requests/s, p99 ms) of three rounds, -c16
        "mplslb": ((60_000, 2.0), (50_000, 9.0), (70_000, 1.0)),
        "haproxy": ((40_000, 3.0), (30_000, 1.5), (35_000, 1.6)),
        "direct": ((65_000, 1.0), (60_000, 1.0), (80_000, 1.0)),
    }
    runs = [{"round": r, "steering": "none", "path": path, "mode": "keep-alive", "connections": 16,
             "requests_per_s": float(rps), "p99_ms": p99, "p50_ms": 0.2, "machine_cpu_us_per_request": 30.0}
            for path, rounds in figures.items() for r, (rps, p99) in enumerate(rounds)]  # fmt: skip
    rows = {row.benchmark: row for row in turn_rows(runs, "the best", "keep-alive", 3, "cmd")}
    assert set(rows) == {
        "e2e keep-alive -c16 requests/s, the best, in turns in one lab",
        "e2e keep-alive -c16 requests/s vs no balancer, the best, in turns in one lab",
        "e2e keep-alive -c16 p99 latency, the best, in turns in one lab",
    }
    vs_haproxy = rows["e2e keep-alive -c16 requests/s, the best, in turns in one lab"]
    assert (vs_haproxy.figure, vs_haproxy.reference_figure, vs_haproxy.met) == (60_000, 35_000, True)
    vs_direct = rows["e2e keep-alive -c16 requests/s vs no balancer, the best, in turns in one lab"]
    assert (vs_direct.reference_figure, vs_direct.met) == (65_000, True)
    p99 = rows["e2e keep-alive -c16 p99 latency, the best, in turns in one lab"]
    assert (p99.figure, p99.reference_figure, p99.met) == (2.0, 1.6, False)
    close = [run | {"mode": "close", "balancer_cpu_us_per_session": 150.0, "frames_per_session": 0.1} for run in runs]
    rows = {row.benchmark: row for row in turn_rows(close, "tickets", "close", 3, "cmd")}
    vs_haproxy = rows["e2e close -c16 requests/s, tickets, in turns in one lab"]
    assert (vs_haproxy.target, vs_haproxy.met) == ("ratio >= 1.0", True)
    assert "150 us of CPU per session" in vs_haproxy.note
    assert rows["e2e close -c16 p99 latency, tickets, in turns in one lab"].met is None  # no target on close's p99


def test_the_idle_row_sets_the_daemons_cpu_with_no_traffic_against_haproxys() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        record = idle_cpu({"haproxy": [sleeper.pid]}, 0.2)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (record["mode"], record["path"], record["idle_cpu_pct_haproxy"]) == ("idle", "idle", 0.0)
    runs = [record | {"idle_cpu_pct_balancer": 1.5, "idle_cpu_pct_agent-c1": 0.3}]
    (row,) = idle_rows(runs, "the best", "cmd")
    assert (row.figure, row.reference_figure, row.unit) == (1.5, 0.0, "% of a core")
    assert "agent-c1 0.3 % of a core" in row.note and "the best" in row.benchmark
    assert turn_rows(runs, "the best", "keep-alive", 3, "cmd") == [] and idle_rows([], "the best", "cmd") == []


def test_paced_runs_give_each_paths_p99_at_about_the_same_load() -> None:
    assert wrk_args("paced", 16) == (("-s", str(PACED_SCRIPT)), ("--", "1"))
    assert wrk_args("paced", 64)[1] == ("--", "4") and wrk_args("close", 64) == (("-H", "Connection: close"), ())
    assert PACED_SCRIPT.exists() and "function delay()" in PACED_SCRIPT.read_text()
    figures = {"mplslb": (14_000, 0.9), "haproxy": (13_000, 1.4), "direct": (14_500, 0.5)}
    runs = [{"round": r, "steering": "none", "path": path, "mode": "paced", "connections": 16,
             "requests_per_s": float(rps) + r, "p99_ms": p99, "p50_ms": 0.2, "machine_cpu_us_per_request": 30.0}
            for path, (rps, p99) in figures.items() for r in range(3)]  # fmt: skip
    (row,) = turn_rows(runs, "the best", "paced", 3, "cmd")
    assert row.benchmark == "e2e keep-alive -c16 p99 latency at a paced load, the best, in turns in one lab"
    assert (row.figure, row.reference_figure, row.target) == (0.9, 1.4, "-")
    assert "-s bench/paced.lua -- 1" in row.note and "mplslb 14,001" in row.note and "HAProxy 13,001" in row.note
    assert turn_rows(runs, "the best", "keep-alive", 3, "cmd") == []
