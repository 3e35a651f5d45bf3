"""What restarting the endpoint agents costs the connections running through them: every agent of a lab but the
one whose client runs wrk's requests, restarted one after the other (SIGTERM) while wrk's keep-alive connections
run, with the kernel datapath kept across each restart (``--keep``) and without, in turns.

Each round: a lab (2 clients, 2 servers, the XDP offload, the agents on the kernel datapath) with ``agent_keep`` on
or off, wrk ``-t2 -c8 --latency`` from the second client for ``--seconds``, the restarts ``--after`` seconds in.
Printed per round and mode: how long the restarts took, wrk's latency (mean, max, p99), requests/s over the whole
run and its socket errors. Without ``--keep`` a server's host drops the labelled frames while no agent runs (its
programs die with the agent) and the requests wait for TCP's retransmissions; with it the kept programs go on.

Run ``PYTHONPATH=<checkout>/src python bench/agent_restart.py [--rounds R] [--seconds S] [--json]`` (root, nginx,
wrk, clang).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mplslb.lab import VIP4, Lab, LabSpec

ROOT = Path("/run/mplslb-bench-labs")


def _seconds(text: str) -> float:
    """wrk's duration (``812.5us``, ``4.27ms``, ``1.67s``, ``2.1m``) in seconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    number, unit = float(match.group(1)), match.group(2)
    return number * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of wrk's ``--latency`` report: latency mean, max and p99 (seconds), requests/s, socket errors."""
    latency = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", text)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.MULTILINE)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if latency is None or p99 is None or rps is None:
        raise ValueError(f"not a wrk --latency report: {text[-500:]!r}")
    return {
        "latency_mean_s": _seconds(latency.group(1)),
        "latency_max_s": _seconds(latency.group(2)),
        "p99_s": _seconds(p99.group(1)),
        "requests_per_s": float(rps.group(1)),
        "socket_errors": [int(g) for g in errors.groups()] if errors else [0, 0, 0, 0],
    }


def one(keep: bool, seconds: int, after: float) -> dict[str, Any]:
    """One lab, one wrk run, the agents restarted ``after`` seconds into it."""
    name = f"ar{'k' if keep else 'n'}{os.getpid() % 10000}"
    lab = Lab(LabSpec(name=name, clients=2, servers=2, offload="kernel", agent_keep=keep), root=ROOT)
    try:
        lab.up()
        out = lab.dir / "wrk.out"
        argv = ["nsenter", f"--net=/var/run/netns/{lab.client_ns(1)}", "--", "wrk", "-t2", "-c8", f"-d{seconds}s",
                "--timeout", "5s", "--latency", f"http://{VIP4}/"]  # fmt: skip
        with open(out, "wb") as log:
            wrk = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            time.sleep(after)
            started = time.monotonic()
            for key in [f"agent-{lab.server_name(j)}" for j in range(lab.spec.servers)] + ["agent-c2"]:
                lab.restart_agent(key, signal.SIGTERM)
            took = time.monotonic() - started
            wrk.wait(seconds + 60)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        return {"keep": keep, "restarts_s": round(took, 2)} | parse_wrk(out.read_text())
    finally:
        problems = lab.down()
        if problems:
            raise RuntimeError(f"lab {name} left: {problems}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=12, help="wrk's run (default 12)")
    parser.add_argument("--after", type=float, default=3.0, help="seconds into it the restarts start (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for _ in range(args.rounds):
        for keep in (False, True):
            result = one(keep, args.seconds, args.after)
            results.append(result)
            if not args.json:
                print(f"{'--keep' if keep else 'no --keep':9} restarts {result['restarts_s']:.2f} s; latency mean "
                      f"{result['latency_mean_s'] * 1e3:.2f} ms, max {result['latency_max_s'] * 1e3:.0f} ms, p99 "
                      f"{result['p99_s'] * 1e3:.2f} ms; {result['requests_per_s']:,.0f} requests/s; socket errors "
                      f"(connect, read, write, timeout) {result['socket_errors']}")  # fmt: skip
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
