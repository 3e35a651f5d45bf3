"""``Connection: close`` through mplslb without a pause: wrk runs back to back in one lab, -c16 and -c64 in turns, and
after each run what the daemon did in it. The end-to-end benchmark's runs are 3 s each with the references' turns
and warm-ups between them; a daemon at its limit can keep up there and fall behind here, and here the label pairs
(524,279, each held for ``label_quarantine`` after its session while others are free) cycle early once the rate
stays above 524,279 / quarantine sessions a second (``reused early`` in each run's line).

One lab (one client, three nginx servers, the whole datapath in the kernel: kernel endpoints, the XDP offload,
``offload_gso`` and ``offload_syn``), ``--runs`` wrk runs of ``--seconds`` each. Per run: requests/s (a run whose
wrk could not start, its first connection refused, counts none and waits out its seconds), the daemon's CPU per
session, its polls and the sessions they handed over whole, the tickets waiting for a poll at the end, the SYNs that
went up (no ticket, a live flow's), the tickets given back, the sessions refused for want of a label
pair, the pairs reused before their quarantine's end, and the label pairs free and in quarantine at the end.

``--quarantine-min 60,5`` runs the whole sequence once per value, each in a lab of its own, one after the other
(``[labels] quarantine_min``; 60, the quarantine itself: no pair reused early, the reference; default: the
configuration's default alone), and ends with each one's requests and refusals over all its runs.

Run ``PYTHONPATH=<checkout>/src python bench/close_sustained.py [--runs N] [--seconds S] [--quarantine-min A,B]
[--json]`` (root, nginx, wrk, clang).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e


def run(runs: int, seconds: int, log: Any = print, quarantine_min: float | None = None) -> list[dict[str, Any]]:
    """``runs`` back-to-back wrk runs (-c16, -c64, ...) through one lab (``[labels] quarantine_min`` as given, or
    the default): each run's figures."""
    lab, urls = e2e.reference_lab("kernel+xdp+gso+syn", "cs", 3, quarantine_min=quarantine_min)
    found: list[dict[str, Any]] = []
    try:
        lab.up()
        e2e.set_sysctls(lab, [lab.client_ns(0), lab.lb])
        e2e.wait_until(lambda: e2e.http_ok(lab, 0, urls["mplslb"]), 30, "the VIP to answer through the balancer")
        procs = e2e.lab_processes(lab)
        daemon = lab.state.pids["balancer"]
        for i in range(runs):
            conns = 16 if i % 2 == 0 else 64
            before = lab.status()["status"]
            started = time.monotonic()
            figures = e2e.turn_run(lab, urls["mplslb"], mode="close", seconds=seconds, connections=conns,
                                   procs=procs, daemon=daemon)  # fmt: skip
            ran = "requests" in figures  # wrk gives up at once when its first connection is refused
            if not ran:
                time.sleep(max(0.0, started + seconds - time.monotonic()))  # the load's time goes on all the same
            after = lab.status()["status"]
            t0, t1 = before["offload"]["tickets"], after["offload"]["tickets"]
            row = {
                "run": i,
                "wrk_ran": ran,
                "connections": conns,
                "requests_per_s": figures.get("requests_per_s", 0.0),
                "daemon_cpu_us_per_session": figures.get("balancer_cpu_us_per_session", 0.0),
                "polls": after["offload"]["polls"] - before["offload"]["polls"],
                "whole": after["offload"]["whole"] - before["offload"]["whole"],
                "waiting": t1.get("waiting", 0),
                "syn_no_ticket": t1["syn_no_ticket"] - t0["syn_no_ticket"],
                "syn_flow_live": t1["syn_flow_live"] - t0["syn_flow_live"],
                "refused": t1["refused"] - t0["refused"],
                "labels_exhausted": after["sessions"]["refused"].get("labels_exhausted", 0)
                - before["sessions"]["refused"].get("labels_exhausted", 0),
                "reused_early": after["labels"]["reused_early"] - before["labels"]["reused_early"],
                # request slots the full request map refused (those sessions' requests went up)
                "slots_refused": after["offload"]["errors"].get("e2big", 0)
                - before["offload"]["errors"].get("e2big", 0),
                "labels_free": after["labels"]["free"],
                "labels_quarantined": after["labels"]["quarantined"],
            }
            found.append(row)
            said = "" if ran else " (wrk refused at its start)"
            log(f"{i} -c{conns}: {row['requests_per_s']:,.0f} requests/s{said}, daemon "
                f"{row['daemon_cpu_us_per_session']:.0f} us/session, polls {row['polls']}, whole {row['whole']}, "
                f"waiting {row['waiting']}, SYNs up {row['syn_no_ticket']} (no ticket) {row['syn_flow_live']} "
                f"(live flow), tickets refused {row['refused']}, sessions refused for want of labels "
                f"{row['labels_exhausted']:,}, pairs reused early {row['reused_early']:,}, free "
                f"{row['labels_free']:,}, quarantined {row['labels_quarantined']:,}, request slots refused "
                f"{row['slots_refused']:,}")  # fmt: skip
    finally:
        lab.down()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="wrk runs back to back (default 8)")
    parser.add_argument("--seconds", type=int, default=3, help="each run's length (default 3)")
    parser.add_argument("--quarantine-min", default="", help="[labels] quarantine_min, one lab per value (A,B,...)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = e2e.missing_requirements()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    values: list[float | None] = [float(v) for v in args.quarantine_min.split(",") if v] or [None]
    found: dict[str, list[dict[str, Any]]] = {}
    for value in values:
        name = "default" if value is None else f"{value:g}"
        print(f"[labels] quarantine_min: {name}", file=sys.stderr)
        found[name] = run(args.runs, args.seconds, log=lambda m: print(m, file=sys.stderr), quarantine_min=value)
    for name, rows in found.items():
        requests = sum(row["requests_per_s"] for row in rows) * args.seconds
        refused = sum(row["labels_exhausted"] for row in rows)
        early = sum(row["reused_early"] for row in rows)
        said = (f"quarantine_min {name}: {requests:,.0f} requests in {len(rows)} runs of {args.seconds} s, "
                f"{refused:,} sessions refused for want of labels, {early:,} pairs reused early")  # fmt: skip
        print(said, file=sys.stderr)
    if args.json:
        print(json.dumps(found if len(found) > 1 else next(iter(found.values())), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
