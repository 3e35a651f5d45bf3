"""The session table's timer run (``SessionTable.due``) on the full-size table, against one pass over every row.

A close-mode load in miniature: ``--live`` sessions in a run of consecutive rows (labels are handed out in turn),
their deadlines ``--spacing`` seconds apart, the timer run every 50 ms of table time (the daemon's
``TIMER_GRANULARITY``), each session it returns armed again far ahead, as the balancer does with a session that
is finished or moved on. The same sequence is run against the reference, the vectorised pass over all 524,279
rows the table made before it kept a lower bound per block of rows, on the same table in the same run; the
sessions each returns are checked equal. Prints microseconds per timer run, median of ``--rounds``.

``--mass N``: instead, ``N`` UDP sessions of a balancer idling out at once (a server's sessions going quiet
together), its timer run as the daemon runs it (at the balancer's next deadline, TIMER_GRANULARITY apart at
least) until none is left, against the same with one run taking them all (``TIMER_SESSIONS`` lifted): the timer
runs, the longest one (what holds the daemon's loop) and all of them together, in milliseconds.

Run ``PYTHONPATH=<checkout>/src python bench/timers.py [--live N | --mass N] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

import mplslb.balancer as balancer_module
from mplslb.balancer import TIMER_GRANULARITY, Balancer
from mplslb.config import Timeouts
from mplslb.sessions import _CODE, _FREE, Session, SessionState, SessionTable
from mplslb.wire.ip import IPPROTO_UDP


def full_pass(table: SessionTable, now: float, nxt: list[float]) -> list[int]:
    """The reference: one pass over every row (occupied, deadline come, earliest first), the next deadline kept."""
    if now < nxt[0]:
        return []
    occupied = table._np_state != _FREE
    deadline = table._np_deadline
    due_mask = occupied & (deadline <= now)
    rows = np.flatnonzero(due_mask)
    later = deadline[occupied & ~due_mask]
    nxt[0] = float(later.min()) if later.size else math.inf
    if rows.size > 1:
        rows = rows[np.argsort(deadline[rows], kind="stable")]
    return [int(r) for r in rows]


def one_round(live: int, spacing: float, reference: bool) -> tuple[float, int, list[int]]:
    table = SessionTable()
    code = _CODE[SessionState.ESTABLISHED]
    base = table.rows // 5
    for i in range(live):
        table.state[base + i] = code
        table._count += 1
        table.arm(Session(table, base + i), 10.0 + i * spacing)
    nxt = [10.0]
    now, runs, order = 10.0, 0, []
    end = 10.0 + live * spacing
    start = time.perf_counter()
    while now <= end:
        rows = full_pass(table, now, nxt) if reference else [s.pair for s in table.due(now)]
        for row in rows:
            table.arm(Session(table, row), now + 1e6)
            nxt[0] = min(nxt[0], now + 1e6)
        order += rows
        now += TIMER_GRANULARITY
        runs += 1
    return (time.perf_counter() - start) * 1e6 / runs, runs, order


def mass_idle_out(count: int, unbounded: bool) -> tuple[int, float, float]:
    """``count`` UDP sessions idling out at once: (timer runs, the longest run in ms, all runs in ms)."""
    from engine import feed  # bench/'s own modules, beside this one
    from frames import build, make_config

    balancer = Balancer(make_config(timeouts=Timeouts(udp=5.0)))
    for start in range(0, count, 16384):
        feed(balancer, build(range(start, min(start + 16384, count)), proto=IPPROTO_UDP), 1.0)
    if len(balancer.sessions) != count:
        raise SystemExit(f"{len(balancer.sessions)} sessions opened of {count}")
    limit = balancer_module.TIMER_SESSIONS
    balancer_module.TIMER_SESSIONS = count if unbounded else limit
    now, holds = 10.0, []
    try:
        while len(balancer.sessions) and len(holds) < count:
            start_s = time.perf_counter()
            balancer.on_timer(now)
            holds.append(time.perf_counter() - start_s)
            deadline = balancer.next_deadline()
            now = max(now + TIMER_GRANULARITY, deadline if deadline is not None else now)
    finally:
        balancer_module.TIMER_SESSIONS = limit
    if len(balancer.sessions):
        raise SystemExit("sessions left after the timer runs")
    return len(holds), max(holds) * 1e3, sum(holds) * 1e3


def main_mass(count: int, rounds: int, as_json: bool) -> None:
    bounded, unbounded = [], []
    for _ in range(rounds):  # interleaved
        bounded.append(mass_idle_out(count, unbounded=False))
        unbounded.append(mass_idle_out(count, unbounded=True))
    out = {
        "sessions": count,
        "timer_runs": statistics.median(r[0] for r in bounded),
        "longest_run_ms": statistics.median(r[1] for r in bounded),
        "all_runs_ms": statistics.median(r[2] for r in bounded),
        "unbounded_timer_runs": statistics.median(r[0] for r in unbounded),
        "unbounded_longest_run_ms": statistics.median(r[1] for r in unbounded),
        "unbounded_all_runs_ms": statistics.median(r[2] for r in unbounded),
    }
    if as_json:
        print(json.dumps(out))
    else:
        print(f"{count} sessions idling out at once: {out['timer_runs']} timer runs, the longest "
              f"{out['longest_run_ms']:.0f} ms, all {out['all_runs_ms']:.0f} ms; one run taking them all: "
              f"{out['unbounded_longest_run_ms']:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=7000, help="sessions live (close mode at 3.5k/s: about 7,000)")
    parser.add_argument("--spacing", type=float, default=0.001, help="seconds between two sessions' deadlines")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mass", type=int, default=0, help="instead: this many sessions idling out at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.mass:
        main_mass(args.mass, args.rounds, args.json)
        return
    blocks, passes = [], []
    for _ in range(args.rounds):  # interleaved
        b_us, runs, b_order = one_round(args.live, args.spacing, reference=False)
        p_us, _, p_order = one_round(args.live, args.spacing, reference=True)
        if b_order != p_order:
            raise SystemExit("the two timer runs returned different sessions")
        blocks.append(b_us)
        passes.append(p_us)
    out = {"live": args.live, "timer_runs": runs, "due_us_per_run": statistics.median(blocks),
           "full_pass_us_per_run": statistics.median(passes)}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.live} sessions live, {runs} timer runs: SessionTable.due {out['due_us_per_run']:.0f} us per run, "
              f"one pass over every row {out['full_pass_us_per_run']:.0f} us")  # fmt: skip


if __name__ == "__main__":
    main()
