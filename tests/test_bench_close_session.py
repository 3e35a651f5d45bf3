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
import mplslb.balancer as balancer_module
from mplslb.offload import bpf, driver
from mplslb.offload.tickets import REFILL_MIN, TICKETS_WANT
from mplslb.offload.xdp import POLL_CHUNK
from mplslb.sessions import SessionState

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces, veths, an XDP program"),
    pytest.mark.skipif(shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG"), reason="needs clang"),
]


def test_both_ways_close_every_session_and_only_the_slow_path_reads_the_syns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balancer_module, "TIMER_SESSIONS", 20)  # ends due in several timer runs, as in the bench
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


def _open(bench: close_session.Bench, sessions: int) -> list[tuple[close_session.Flow, int]]:
    """``sessions`` sessions whose SYNs the program takes under tickets, folded and synced as the daemon's timer
    does every 16 SYNs; (flow, C2S label) each."""
    core = bench.core
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
    return opened


def test_a_poll_hands_over_chunks_and_folds_the_tickets_taken_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll handing over more records and FINs than one chunk folds the counters at once and hands the rest over
    a chunk at a time (here one a step of the daemon's loop), session by session; after each chunk, the tickets the
    kernel took meanwhile are folded and issued again, and the flows of the sessions it ended leave the flow map. It
    leaves every session as one pass would: ending, its measurement and both FINs folded."""
    sessions = 2 * POLL_CHUNK + 40
    monkeypatch.setattr(driver, "POLL_STEP", 0.0)  # one chunk a step
    with close_session.namespaces("w") as lb:
        bench = close_session.Bench(lb)
        try:
            core, desk = bench.core, bench.core.desk
            assert desk is not None
            opened = _open(bench, sessions)
            for flow, c2s in opened:
                bench.rest(flow, c2s)
            for _ in range(REFILL_MIN + 8):  # SYNs the kernel takes while the records wait for the poll
                late = bench._flow()
                syn = late.frame(close_session.SYN, options=close_session.SYN_OPTIONS)
                assert bench._run(syn, late.port).retval == bpf.XDP_REDIRECT
            taken_before, packets_before = desk.taken, core.offload.kernel_packets
            core._poll(bench.loop.clock())
            assert core.polling and core.offload.records == 0 and core.offload.fins == 0
            assert core.offload.kernel_packets - packets_before == 8 * sessions  # every frame counted at once
            flows = core.offload.stats()["flows"]
            core.poll_step()
            # one chunk, session by session: a record and its two FINs, each whole session ending, its flow released
            ending = [c2s for _, c2s in opened if bench.balancer.sessions.by_c2s(c2s).state is SessionState.ENDING]  # type: ignore[union-attr]
            assert POLL_CHUNK // 3 <= len(ending) <= core.offload.records <= len(ending) + 1 < sessions
            assert core.offload.fins >= 2 * len(ending)
            assert core.offload.stats()["flows"] == flows - len(ending) + REFILL_MIN + 8  # the late SYNs' flows in
            assert (desk.taken, len(desk.outstanding)) == (taken_before + REFILL_MIN + 8, TICKETS_WANT)
            steps = 1
            while core.polling:
                core.poll_step()
                steps += 1
            assert steps == -(-3 * sessions // POLL_CHUNK)  # the records, then both FINs of each session
            states = {bench.balancer.sessions.by_c2s(c2s).state for _, c2s in opened}  # type: ignore[union-attr]
            assert states == {SessionState.ENDING}
            assert core.offload.fins == 2 * sessions and core.offload.records == sessions
        finally:
            bench.close()


def test_a_session_folded_on_its_own_between_steps_keeps_the_newer_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two steps of a poll a frame of a session can reach the daemon, which folds the session's newer
    record first: the older one the poll read is not handed over after it."""
    monkeypatch.setattr(driver, "POLL_STEP", 0.0)  # one chunk a step
    with close_session.namespaces("r") as lb:
        bench = close_session.Bench(lb)
        try:
            core, offload = bench.core, bench.core.offload
            opened = _open(bench, POLL_CHUNK + 8)
            (flow, c2s), others = opened[-1], opened[:-1]
            for other in others:
                bench.rest(*other)
            frames = bench.frames(flow, c2s)
            bench._run(*frames[0])  # the server's SYN-ACK only, when the poll reads the map
            core._poll(bench.loop.clock())
            for frame in frames[1:3]:  # the client's ACK and request, recorded after the read
                bench._run(*frame)
            session = bench.balancer.sessions.by_c2s(c2s)
            assert session is not None and session.state is SessionState.START
            records = offload.records
            bench.balancer._refresh(session)  # what the daemon does when a frame of it comes up
            assert offload.records == records + 1 and session.state is SessionState.ESTABLISHED
            while core.polling:
                core.poll_step()
            assert offload.records == records + 1 + len(others)  # the older record of the session not again
            assert session.state is SessionState.ESTABLISHED and session.request_at
            for frame in frames[3:]:
                bench._run(*frame)
            offload.poll()
            assert session.state is SessionState.ENDING
        finally:
            bench.close()


def test_a_session_ended_between_steps_is_not_handed_its_fins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that end between two steps of a poll (their server taken down: labels withdrawn) get nothing more
    from the poll's read; the others get their FINs."""
    monkeypatch.setattr(driver, "POLL_STEP", 0.0)  # one chunk a step
    with close_session.namespaces("d") as lb:
        bench = close_session.Bench(lb)
        try:
            core, offload, balancer = bench.core, bench.core.offload, bench.balancer
            opened = _open(bench, 2 * POLL_CHUNK)
            for flow, c2s in opened:
                bench.rest(flow, c2s)
            core._poll(bench.loop.clock())
            core.poll_step()
            server = balancer.sessions.by_c2s(opened[-1][1]).server  # type: ignore[union-attr]
            downed = [
                c2s
                for _, c2s in opened
                if balancer.sessions.by_c2s(c2s).server is server  # type: ignore[union-attr]
                and balancer.sessions.by_c2s(c2s).state is not SessionState.ENDING  # type: ignore[union-attr]
            ]
            assert 0 < len(downed) < len(opened) and offload.fins
            balancer.mark_down(server.name, bench.loop.clock())
            core._sync(bench.loop.clock())
            assert not any(balancer.switching.valid[c2s] for c2s in downed)
            while core.polling:
                core.poll_step()
            assert offload.fins == 2 * (len(opened) - len(downed))
            assert all(balancer.sessions.by_c2s(c2s) is None for c2s in downed)
        finally:
            bench.close()
