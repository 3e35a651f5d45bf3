"""Cluster benchmark in namespaces: 3, then 2, then 1 real balancer node behind the BIRD ECMP router of
``mplslb.lab`` (``LabSpec(nodes=3, cluster=True)``, :meth:`~mplslb.lab.Lab.remove_node` between the steps), the
sessions synced between them.

    .venv/bin/python bench/cluster_lab.py [--quick]      # the table for docs/benchmarks.md (about a minute)
    .venv/bin/python bench/run.py --only cluster_lab     # the rows of the benchmark table

For each node count: new sessions/s (wrk with ``Connection: close``: a session per request) and frames/s (wrk on
keep-alive connections) through the nodes, and each node's CPU time (user and system, /proc/<pid>/stat of its
daemon) per session it opened and per frame it received, over the same run. On the 2-core reference machine the
client agent, the server agents, nginx and the nodes share two cores: the total cannot grow with the nodes, and
what the table shows is what each node spends (a node with peers also installs every peer's sessions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, command_for
from e2e import _ticks

COMMAND = ".venv/bin/python bench/cluster_lab.py"
NODES = 3
LAB_ROOT = Path("/run/mplslb-bench-labs")


def missing_requirements() -> str:
    """Why the lab cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, TUN devices)"
    for tool in ("nginx", "wrk", "nsenter", "bird", "birdc", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (make bench installs it)"
    return ""


@dataclass(frozen=True)
class Step:
    """One node count's figures."""

    nodes: int
    sessions_per_s: float  # wrk's requests/s with Connection: close
    frames_per_s: float  # frames the nodes received, per second of the keep-alive run
    cpu_per_session_us: dict[int, float]  # per node (index): its CPU per session it opened
    cpu_per_frame_us: dict[int, float]  # per node: its CPU per frame it received
    cpu_share: dict[int, float]  # per node: share of a core during the keep-alive run
    client_share: float  # the client agent's share of a core during the keep-alive run
    requests_per_s: float  # wrk's requests/s on keep-alive connections
    errors: float  # wrk's socket errors and non-2xx, both runs


def _status(lab: Any, i: int) -> dict[str, Any]:
    from mplslb.control.client import request

    status: dict[str, Any] = request(lab.node_socket(i), {"cmd": "status"})["status"]
    return status


def _counters(lab: Any) -> dict[int, tuple[int, int, int]]:
    """Per node: (CPU ticks of its daemon, label pairs it allocated, frames in), and at -1 the client agent's CPU
    ticks. The status is refreshed every second: wait for a fresh one."""
    time.sleep(1.1)
    out = {-1: (_ticks(lab.state.pids["agent-c1"]), 0, 0)}
    for i in lab.members:
        status = _status(lab, i)
        pid = lab.state.pids[lab.node_key(i)]
        out[i] = (_ticks(pid), int(status["labels"]["allocated_total"]), int(status["frames"]["in"]))
    return out


def measure_step(lab: Any, seconds: int) -> Step:
    hz = os.sysconf("SC_CLK_TCK")
    before = _counters(lab)
    closing = lab.wrk(0, seconds=seconds, connections=16, headers=("Connection: close",))
    middle = _counters(lab)
    keeping = lab.wrk(0, seconds=seconds, connections=8)
    after = _counters(lab)
    per_session, per_frame, share = {}, {}, {}
    frames = 0
    for i in lab.members:
        ticks, opened, _ = (middle[i][k] - before[i][k] for k in range(3))
        per_session[i] = ticks / hz / opened * 1e6 if opened else float("nan")
        ticks, _, received = (after[i][k] - middle[i][k] for k in range(3))
        per_frame[i] = ticks / hz / received * 1e6 if received else float("nan")
        share[i] = ticks / hz / (seconds + 1.1)
        frames += received
    client = (after[-1][0] - middle[-1][0]) / hz / (seconds + 1.1)
    return Step(
        nodes=len(lab.members),
        sessions_per_s=closing.get("requests_per_s", 0.0),
        frames_per_s=frames / (seconds + 1.1),  # (the counters are read 1.1 s after wrk ends)
        cpu_per_session_us=per_session,
        cpu_per_frame_us=per_frame,
        cpu_share=share,
        client_share=client,
        requests_per_s=keeping.get("requests_per_s", 0.0),
        errors=sum(f["socket_errors"] + f["non_2xx"] for f in (closing, keeping)),
    )


def run(quick: bool) -> list[Step]:
    """Measure with 3, 2 and 1 nodes (one lab, a node removed between steps); returns the steps by node count."""
    from mplslb.lab import VIP4, Lab, LabSpec

    spec = LabSpec(name=f"bk{os.getpid() % 100000}", nodes=NODES, clients=1, servers=2, transport="udp",
                   server_transport="udp", cluster=True)  # fmt: skip
    lab = Lab(spec, root=LAB_ROOT)
    seconds = 2 if quick else 5
    steps = []
    try:
        lab.up()
        lab.wrk(0, seconds=1, connections=4)  # warm-up
        while True:
            steps.append(measure_step(lab, seconds))
            if len(lab.members) == 1:
                break
            lab.remove_node(lab.members[-1])
            lab.wait_next_hops(VIP4, len(lab.members), 30.0)
    finally:
        lab.down()
    return sorted(steps, key=lambda s: s.nodes)


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


def rows(quick: bool) -> list[Row]:
    """The benchmark table's rows: each node count's figures beside the single node's."""
    from common import skipped

    cmd = command_for("cluster_lab", quick)
    missing = missing_requirements()
    if missing:
        return [skipped("cluster_lab", "cluster in namespaces (1-3 nodes)", missing, command=cmd)]
    steps = run(quick)
    one = steps[0]
    out = []
    for step in steps:
        nodes = f"{step.nodes} node{'s' if step.nodes > 1 else ''}"
        sessions_note = (
            f"CPU per session per node {_mean(step.cpu_per_session_us):.0f} µs (1 node: "
            f"{_mean(one.cpu_per_session_us):.0f}); 2 cores shared with the agents and nginx; {step.errors:.0f} "
            "wrk errors"
        )
        frames_share = f"; the client agent {step.client_share:.0%} of a core"
        frames_note = (
            f"CPU per frame per node {_mean(step.cpu_per_frame_us):.1f} µs "
            f"(1 node: {_mean(one.cpu_per_frame_us):.1f}); {step.requests_per_s:,.0f} requests/s{frames_share}"
        )
        out.append(
            Row(
                "cluster_lab",
                f"{nodes} in namespaces: new sessions/s (wrk, Connection: close)",
                step.sessions_per_s,
                "sessions/s",
                "1 node",
                one.sessions_per_s,
                note=sessions_note,
                command=cmd,
            )
        )
        out.append(
            Row(
                "cluster_lab",
                f"{nodes} in namespaces: frames/s (wrk keep-alive)",
                step.frames_per_s,
                "frames/s",
                "1 node",
                one.frames_per_s,
                note=frames_note,
                command=cmd,
            )
        )
    return out


def markdown(steps: list[Step], took: float, quick: bool) -> str:
    lines = [
        "| nodes | new sessions/s | CPU µs per session, per node | frames/s | CPU µs per frame, per node | "
        "share of a core per node (keep-alive run) | client agent's share | wrk errors |",
        "|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for s in steps:
        per = lambda values, fmt: ", ".join(f"n{i + 1} {v:{fmt}}" for i, v in sorted(values.items()))  # noqa: E731
        lines.append(
            f"| {s.nodes} | {s.sessions_per_s:,.0f} | {per(s.cpu_per_session_us, '.0f')} | {s.frames_per_s:,.0f} | "
            f"{per(s.cpu_per_frame_us, '.1f')} | {per(s.cpu_share, '.0%')} | {s.client_share:.0%} | {s.errors:.0f} |"
        )
    lines += ["", f"({took:.0f} s; `{COMMAND}{' --quick' if quick else ''}`)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"skipped: {missing}")
        return 0
    t0 = time.monotonic()
    steps = run(args.quick)
    print(markdown(steps, time.monotonic() - t0, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
