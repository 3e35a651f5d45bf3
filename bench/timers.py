"""The session table's timer run (``SessionTable.due``) on the full-size table, against one pass over every row.

A close-mode load in miniature: ``--live`` sessions in a run of consecutive rows (labels are handed out in turn),
their deadlines ``--spacing`` seconds apart, the timer run every 50 ms of table time (the daemon's
``TIMER_GRANULARITY``), each session it returns armed again far ahead, as the balancer does with a session that
is finished or moved on. The same sequence is run against the reference, the vectorised pass over all 524,279
rows the table made before it kept a lower bound per block of rows, on the same table in the same run; the
sessions each returns are checked equal. Prints microseconds per timer run, median of ``--rounds``.

Run ``PYTHONPATH=<checkout>/src python bench/timers.py [--live N] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np

from mplslb.balancer import TIMER_GRANULARITY
from mplslb.sessions import _CODE, _FREE, Session, SessionState, SessionTable


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=7000, help="sessions live (close mode at 3.5k/s: about 7,000)")
    parser.add_argument("--spacing", type=float, default=0.001, help="seconds between two sessions' deadlines")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
