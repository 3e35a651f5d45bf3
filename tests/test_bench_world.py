"""The engine benchmark's world is what its rows assume: a SYN, the server's SYN-ACK and the client's request
leave every TCP session established with its C2S label out of the watch (the steady state the fast-path rows
time), and UDP sessions open on their first datagram. Run on a few hundred flows, not timed. And the benchmarks'
turns swap their order every other round."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import time_interleaved  # noqa: E402
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
