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
    assert figures["offload_syn"]["idle_fold_us"] > 0  # a fold that finds nothing, timed
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


def _forged_fin(flow: close_session.Flow, c2s: int) -> bytes:
    """The client's FIN with a sequence number far from anything the server acknowledged."""
    segment = close_session.build_tcp(flow.client, close_session.VIP, flow.sport, 80, seq=0x4000_0000, ack=5001,
                                      flags=close_session.FIN | close_session.ACK)  # fmt: skip
    packet = close_session.build_ipv4(flow.client, close_session.VIP, close_session.IPPROTO_TCP, len(segment))
    return (close_session.build_ethernet(close_session.port_mac(flow.port), flow.mac, close_session.ETH_P_MPLS_UC)
            + close_session.pack_entry(c2s, 0, True, 64) + packet + segment)  # fmt: skip


def _close_some(bench: close_session.Bench, count: int, *, poll: bool = True) -> list[int]:
    """``count`` sessions through the real program, in turn: whole (the server's FIN first), whole with the
    client's FIN first, one FIN only, no FIN, a forged client's FIN before the server's; then (``poll``) one poll,
    handed over to its end. Their C2S labels."""
    opened = _open(bench, count)
    for i, (flow, c2s) in enumerate(opened):
        frames = bench.frames(flow, c2s)
        kind = i % 5
        if kind == 1:
            frames[4], frames[5] = frames[5], frames[4]
        if kind == 4:
            frames[4], frames[5] = (_forged_fin(flow, c2s), flow.port), frames[4]
        for frame in frames[: (7, 7, 5, 4, 6)[kind]]:
            bench._run(*frame)
    core = bench.core
    if not poll:
        return [c2s for _, c2s in opened]
    core._poll(bench.loop.clock())
    while core.polling:
        core.poll_step()
    return [c2s for _, c2s in opened]


def _outcome(bench: close_session.Bench, labels: list[int]) -> tuple[object, ...]:
    b = bench.balancer
    rows = []
    for c2s in labels:
        session = b.sessions.by_c2s(c2s)
        assert session is not None
        rows.append((session.state, bool(session.request_at), session.rt_pending, b.switching.watch[c2s],
                     b.switching.watch[c2s + 1]))  # fmt: skip
    servers = sorted((s.name, s.active, s.total, s.rt_samples, s.failures) for s in b.pool.servers)
    kernel = bench.core.offload
    stats = kernel.stats()
    assert kernel._requests is not None
    slots = kernel._requests.lookup_batch()[2]  # the request copies' slots left in the kernel
    offload = {key: stats[key] for key in ("records", "fins", "copies", "measuring")} | {"slots": slots}
    return rows, servers, offload, b.sessions.live, b.sessions.half_open, dict(b.sessions.not_believed), b.l7_hosts


def test_sessions_a_poll_finds_whole_are_handed_over_together_as_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real program, a poll hands the sessions it finds whole (their record and both FINs, either side
    first) to the balancer together, chunk by chunk, and the others one by one: every session, server figure and
    count ends as in a daemon that hands everything over one by one, and so do the closes at the linger's end."""
    monkeypatch.setattr(driver, "POLL_STEP", 0.0)  # one chunk a step: sessions across the chunks' edges
    count = 2 * POLL_CHUNK // 3 + 40
    with close_session.namespaces("x") as together_lb, close_session.namespaces("y") as one_by_one_lb:
        together, one_by_one = close_session.Bench(together_lb), close_session.Bench(one_by_one_lb)
        try:
            one_by_one.core.offload.closed = None
            labels = _close_some(together, count)
            assert _close_some(one_by_one, count) == labels
            assert _outcome(together, labels) == _outcome(one_by_one, labels)
            closed = sum(1 for i in range(count) if i % 5 < 2)
            whole = together.core.offload.stats()["whole"]  # not those a chunk's edge cut in two
            assert closed - 2 <= whole <= closed and one_by_one.core.offload.stats()["whole"] == 0
            states = [together.balancer.sessions.by_c2s(c2s).state for c2s in labels]  # type: ignore[union-attr]
            assert states[:5] == [SessionState.ENDING] * 2 + [SessionState.CLOSING_SERVER, SessionState.ESTABLISHED,
                                  SessionState.CLOSING_SERVER]  # fmt: skip
            assert together.balancer.sessions.not_believed == {"fin_out_of_window": -(-count // 5)}
            for bench in (together, one_by_one):
                bench.skew += bench.linger + 0.01
                while (due := bench.balancer.sessions.next_deadline()) is not None and due <= bench.loop.clock():
                    bench.balancer.on_timer(bench.loop.clock())
            assert together.balancer.sessions.ended == one_by_one.balancer.sessions.ended == {"closed": closed}
        finally:
            together.close()
            one_by_one.close()


@pytest.mark.parametrize("costly_poll", [False, True])
def test_a_timer_run_with_many_sessions_due_hands_a_poll_over_first_as_one_by_one(
    monkeypatch: pytest.MonkeyPatch, costly_poll: bool
) -> None:
    """A timer run that finds many sessions due whose records and FINs no poll has handed over yet (the daemon's
    polls behind under load) has the driver read the map once and hand it over, whole sessions together, before it
    judges them, instead of reading each session's entries on its own, unless the last poll cost more than their
    refreshes would: every session, server figure and count ends as in a daemon that refreshes them one by one."""
    monkeypatch.setattr(driver, "POLL_STEP", 0.0)  # one chunk a step: the catch-up goes through every step at once
    count = POLL_CHUNK + 5  # more rows than a step hands over; many more sessions than CATCH_UP_MIN
    with close_session.namespaces("c") as caught_lb, close_session.namespaces("o") as each_lb:
        caught, each = close_session.Bench(caught_lb), close_session.Bench(each_lb)
        try:
            each.balancer.catch_up = None
            if costly_poll:
                caught.core._poll_cost = 3600.0
            outcomes, folds = [], []
            for bench in (caught, each):
                labels = _close_some(bench, count, poll=False)
                labels += [c2s for _, c2s in _open(bench, 8)]  # their SYNs only: nothing in the kernel moves them on
                offload, fold, folded = bench.core.offload, bench.core.offload.fold, []
                monkeypatch.setattr(
                    offload, "fold", lambda c2s, fold=fold, folded=folded: folded.append(c2s) or fold(c2s)
                )
                bench.skew += bench.balancer.sessions.timeouts.tcp_start + 0.01  # every session's START is over
                bench.balancer.on_timer(bench.loop.clock())
                b = bench.balancer
                states = [getattr(b.sessions.by_c2s(c2s), "state", None) for c2s in labels]
                bench.skew += bench.linger + 0.01  # then the closes' linger
                while (due := b.sessions.next_deadline()) is not None and due <= bench.loop.clock():
                    b.on_timer(bench.loop.clock())
                states += [getattr(b.sessions.by_c2s(c2s), "state", None) for c2s in labels]
                servers = sorted((s.name, s.active, s.total, s.rt_samples, s.failures) for s in b.pool.servers)
                counts = {key: offload.stats()[key] for key in ("records", "fins", "measuring")}
                outcomes.append((states, servers, counts, dict(b.sessions.ended), dict(b.sessions.not_believed),
                                 b.sessions.live, b.sessions.half_open, b.l7_hosts))  # fmt: skip
                folds.append(len(folded))
            assert outcomes[0] == outcomes[1]
            closed = sum(1 for i in range(count) if i % 5 < 2)
            first = [SessionState.ENDING] * 2 + [SessionState.CLOSING_SERVER, SessionState.ESTABLISHED]
            assert outcomes[0][3] == {"closed": closed, "half_open_timeout": 8}
            assert outcomes[0][0][:5] == [*first, SessionState.CLOSING_SERVER]
            assert outcomes[0][0][count : count + 8] == [None] * 8  # the half-open ones timed out at once
            assert outcomes[0][0][count + 8 : count + 13] == [None, None, *outcomes[0][0][2:5]]
            assert each.core.offload.stats()["whole"] == 0 and folds[1] >= count + 8
            if costly_poll:  # refreshed one by one too
                assert caught.core.offload.stats()["whole"] == 0 and folds[0] == folds[1]
            else:  # the sessions' own reads: only the half-open ones still due after the catch-up's
                assert caught.core.offload.stats()["whole"] >= closed - 2 and folds[0] == 8
        finally:
            caught.close()
            each.close()


def test_a_whole_session_gets_no_row_whose_label_changed_since_the_read() -> None:
    """A poll hands no row to a whole session whose label was withdrawn and installed again since the read (its
    generation moved on), together or one by one: a session whose C2S label moved gets nothing of the read; one whose
    S2C label moved, its record and the client's FIN only."""
    with close_session.namespaces("g") as lb:
        bench = close_session.Bench(lb)
        try:
            core = bench.core
            opened = _open(bench, 12)
            for flow, c2s in opened:
                bench.rest(flow, c2s)
            core._poll(bench.loop.clock())
            generation = bench.balancer.switching.arrays().generation
            (_, moved), (_, moved_s2c) = opened[0], opened[1]
            generation[moved] += 1
            generation[moved_s2c + 1] += 1
            while core.polling:
                core.poll_step()
            states = [bench.balancer.sessions.by_c2s(c2s).state for _, c2s in opened]  # type: ignore[union-attr]
            assert states == [SessionState.START, SessionState.CLOSING_CLIENT] + [SessionState.ENDING] * 10
            assert core.offload.stats()["whole"] == 10
        finally:
            bench.close()
