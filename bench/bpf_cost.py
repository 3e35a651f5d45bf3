"""The kernel programs' own cost per request: each mplslb BPF program's runs and run time under wrk, end to end.

One lab of ``--variant`` (bench/e2e.py's variants; kernel endpoints and the balancer's XDP offload by default), wrk
-c16 for ``--seconds`` in each mode (keep-alive, ``Connection: close``), ``--rounds`` times in turn, with the
kernel's BPF run-time statistics on (``kernel.bpf_stats_enabled``, restored afterwards; each run then also pays
two clock reads). For every program whose name starts with ``mplslb_`` it gives the runs per request, the
nanoseconds per run and per request (medians over rounds), and the sum per request: the CPU the labels' datapath
spends in the kernel's hooks, not counting the hooks' own overhead (generic XDP's, the qdisc's).

Run ``PYTHONPATH=<checkout>/src python bench/bpf_cost.py [--variant KEY] [--seconds S] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2e
from mplslb.offload import bpf

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def programs() -> dict[int, tuple[str, int, int]]:
    """Every loaded mplslb program: id -> (name, run time in ns, runs)."""
    found: dict[int, tuple[str, int, int]] = {}
    for prog_id in bpf.prog_ids():
        try:
            fd = bpf.prog_fd_by_id(prog_id)
        except bpf.BpfError:  # unloaded meanwhile
            continue
        try:
            info = bpf.prog_info(fd)
        finally:
            os.close(fd)
        if info.name.startswith("mplslb_"):
            found[prog_id] = (info.name, info.run_time_ns, info.run_cnt)
    return found


def by_name(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]]) -> dict[str, list[int]]:
    """Run time and runs between two readings, summed per program name (one per endpoint or port)."""
    out: dict[str, list[int]] = {}
    for prog_id, (name, ns, runs) in after.items():
        _, ns0, runs0 = before.get(prog_id, (name, 0, 0))
        total = out.setdefault(name, [0, 0])
        total[0] += ns - ns0
        total[1] += runs - runs0
    return out


@contextlib.contextmanager
def stats_enabled() -> Iterator[None]:
    previous = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(previous)


def measure(variant: str, seconds: int, rounds: int, log: Any = print) -> dict[str, Any]:
    lab, urls = e2e.reference_lab(variant, "bpc", 3)
    samples: dict[str, dict[str, list[float]]] = {}
    rates: dict[str, list[float]] = {}
    try:
        lab.up()
        e2e.set_sysctls(lab, [lab.client_ns(0), lab.lb])
        e2e.wait_until(lambda: e2e.http_ok(lab, 0, urls["mplslb"]), 30, "the VIP to answer through the balancer")
        with stats_enabled():
            for round_ in range(rounds):
                for mode, header in e2e.MODES:
                    before = programs()
                    figures = e2e.run_wrk(lab, 0, urls["mplslb"], seconds=seconds, connections=16, header=header)
                    spent = by_name(before, programs())
                    requests = figures.get("requests", 0.0)
                    if not requests:
                        raise SystemExit(f"wrk answered nothing in {mode} (round {round_})")
                    rates.setdefault(mode, []).append(figures.get("requests_per_s", 0.0))
                    for name, (ns, runs) in spent.items():
                        got = samples.setdefault(mode, {})
                        got.setdefault(f"{name} runs/request", []).append(runs / requests)
                        got.setdefault(f"{name} ns/run", []).append(ns / runs if runs else 0.0)
                        got.setdefault(f"{name} ns/request", []).append(ns / requests)
                    total = sum(ns for ns, _ in spent.values()) / requests
                    samples.setdefault(mode, {}).setdefault("all programs ns/request", []).append(total)
                    log(f"bpf_cost {variant} round {round_} {mode}: {figures.get('requests_per_s', 0):,.0f} "
                        f"requests/s, {total:,.0f} ns of BPF programs a request")  # fmt: skip
    finally:
        problems = lab.down()
        if problems:
            log(f"bpf_cost: lab down: {problems}")
    return {mode: {"requests_per_s": round(statistics.median(rates[mode]))}
            | {key: round(statistics.median(values), 2) for key, values in sorted(figures.items())}
            for mode, figures in samples.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="kernel+xdp")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    missing = e2e.missing_requirements()
    if missing:
        raise SystemExit(f"bpf_cost: {missing}")
    result = measure(args.variant, args.seconds, args.rounds, log=lambda m: print(m, flush=True))
    if args.json:
        print(json.dumps({"bench": "bpf_cost", "variant": args.variant, "seconds": args.seconds,
                          "rounds": args.rounds, "modes": result}))  # fmt: skip
        return
    for mode, figures in result.items():
        print(f"{mode}:")
        for key, value in figures.items():
            print(f"  {key:40} {value:,}")


if __name__ == "__main__":
    main()
