"""The daemon's per-session bench (bench/close_session.py) runs whole sessions through the real XDP program with
tickets and with every SYN up to the daemon, ends every one of them closed in both, and cleans up its namespaces;
nothing timed."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import close_session

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces, veths, an XDP program"),
    pytest.mark.skipif(shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG"), reason="needs clang"),
]


def test_both_ways_close_every_session_and_only_the_slow_path_reads_the_syns() -> None:
    figures = close_session.measure(48, 1)
    for key in ("offload_syn", "syn_up"):
        assert figures[key]["sessions"] == 48
        assert figures["ended"][key] == {"closed": 96}  # the warm-up round's and the measured round's
        assert figures["live_after"][key] == 0
        assert all(figures[key][phase] > 0 for phase in close_session.PHASES)
    assert figures["syn_frames_up"] == {"offload_syn": 0, "syn_up": 96}
    assert figures["tickets"]["taken"] == 96 and figures["tickets"]["syn_no_ticket"] == 0
    ours = {f"mlbcs{os.getpid() % 100000}{mode}{side}" for mode in "ts" for side in "le"}
    assert not ours & set(netns.listnetns())


def test_the_run_table_gets_the_total_against_the_slow_path_and_each_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(close_session, "BATCH", 96)
    rows = close_session.rows(quick=True)
    assert [r.benchmark.strip() for r in rows][1:] == [f"phase {p}" for p in close_session.PHASES]
    assert all(r.figure and r.reference_figure and not r.skipped for r in rows)
    assert rows[0].met is not None and rows[0].target == "ratio <= 1.0"
