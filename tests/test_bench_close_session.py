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
from mplslb.offload import bpf
from mplslb.offload.tickets import REFILL_MIN, TICKETS_WANT
from mplslb.offload.xdp import POLL_CHUNK
from mplslb.sessions import SessionState

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


def test_a_long_poll_folds_and_issues_tickets_between_its_chunks() -> None:
    """A poll handing over more records and FINs than one chunk takes the tickets the kernel took meanwhile and
    issues new ones between chunks (the daemon's loop is held while it runs), and leaves every session as one pass
    would: ending, its measurement and both FINs folded."""
    sessions = POLL_CHUNK + 40
    with close_session.namespaces("w") as lb:
        bench = close_session.Bench(lb)
        try:
            core, desk = bench.core, bench.core.desk
            assert desk is not None
            opened = []
            for i in range(sessions):
                flow = bench._flow()
                taken = bench._run(flow.frame(close_session.SYN, options=close_session.SYN_OPTIONS), flow.port)
                assert taken.retval == bpf.XDP_REDIRECT
                opened.append((flow, close_session._label(taken.data)))
                if i % 16 == 15:
                    core._fold_tickets(bench.loop.clock())
                    core._sync(bench.loop.clock())
            core._fold_tickets(bench.loop.clock())
            core._sync(bench.loop.clock())
            for flow, c2s in opened:
                bench.rest(flow, c2s)
            for _ in range(REFILL_MIN + 8):  # SYNs the kernel takes while the records wait for the poll
                late = bench._flow()
                syn = late.frame(close_session.SYN, options=close_session.SYN_OPTIONS)
                assert bench._run(syn, late.port).retval == bpf.XDP_REDIRECT
            seen: list[tuple[int, int]] = []
            meanwhile = core._tickets_meanwhile

            def spied() -> None:
                meanwhile()
                seen.append((desk.taken, len(desk.outstanding)))

            core._tickets_meanwhile = spied  # type: ignore[method-assign]
            taken_before = desk.taken
            core._poll(bench.loop.clock())
            assert len(seen) >= 2  # the records' chunk and the FINs' chunks
            assert seen[0] == (
                taken_before + REFILL_MIN + 8,
                TICKETS_WANT,
            )  # the late SYNs folded, tickets issued again
            states = {bench.balancer.sessions.by_c2s(c2s).state for _, c2s in opened}  # type: ignore[union-attr]
            assert states == {SessionState.ENDING}
            assert core.offload.fins == 2 * sessions and core.offload.records >= sessions
        finally:
            bench.close()
