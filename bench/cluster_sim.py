"""Cluster benchmarks: what replicating sessions costs per new session and per frame, and the simulated N = 1..16
table (mplslb.sim.cluster: N real balancers behind a hash-threshold ECMP router, sync carried in process).

    .venv/bin/python bench/cluster_sim.py            # the tables for docs/benchmarks.md (a few minutes)
    .venv/bin/python bench/cluster_sim.py --quick    # a smoke run
    .venv/bin/python bench/run.py --only cluster     # the rows of the benchmark table

The costs are CPU seconds (user and system) of this process per operation, medians of three runs, so a shared
machine's waiting does not count; the rates are one core per node divided by them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, command_for
from mplslb.sim.cluster import Costs, capacity, measure_costs, node_change

NODES = tuple(range(1, 17))
CHANGE_NODES = (1, 2, 3, 4, 8, 16)
PEERS = (1, 2, 3)
COMMAND = ".venv/bin/python bench/cluster_sim.py"


def costs_for(quick: bool) -> Costs:
    return measure_costs(sessions=500 if quick else 2000, frames=5000 if quick else 20000, repeats=1 if quick else 5)


def rows(quick: bool) -> list[Row]:
    """The benchmark table's rows: each figure beside the single node's."""
    costs = costs_for(quick)
    cmd = command_for("cluster", quick)
    alone = 1 / costs.new_alone
    out = [
        Row(
            "cluster",
            f"new sessions/s, a node with {peers} peer{'s' if peers > 1 else ''} (owner's CPU)",
            1 / costs.owner_cost(peers),
            "sessions/s",
            "single node, no sync",
            alone,
            note=f"handshake (SYN, SYN-ACK, ACK) and its {costs.records_per_session:.0f} sync records, sent to each "
            "peer over UDP; CPU time",
            command=cmd,
        )
        for peers in PEERS
    ]
    out.append(
        Row(
            "cluster",
            "replicated sessions/s installed at a peer",
            1 / costs.install,
            "sessions/s",
            "single node, no sync (new sessions/s)",
            alone,
            note="receiving, authenticating and installing a session's records; every peer does it for every session",
            command=cmd,
        )
    )
    out.append(
        Row(
            "cluster",
            "frames/s of a replicated session (Balancer.receive)",
            1 / costs.frame_replica,
            "frames/s",
            "the same session's frames on its owner",
            1 / costs.frame_owner,
            note="a replica is an ordinary row of the label switching table: no cost per frame",
            command=cmd,
        )
    )
    for n in (4, 16):
        cap = capacity(costs, n)
        out.append(
            Row(
                "cluster",
                f"simulated {n} nodes: new sessions/s in all, with sync",
                cap.new_total,
                "sessions/s",
                f"{n} nodes without sync",
                cap.new_total_alone,
                note=f"full replication caps the cluster at one node's install rate ({1 / costs.install:,.0f}/s)",
                command=COMMAND,
            )
        )
    return out


def markdown(quick: bool) -> str:
    t0 = time.monotonic()
    costs = costs_for(quick)
    lines = [
        "Measured costs (CPU microseconds per operation, one core):",
        "",
        "| operation | µs |",
        "|---|---:|",
        f"| new session, single node (handshake: SYN, SYN-ACK, ACK) | {costs.new_alone * 1e6:.1f} |",
        f"| new session on a node with peers: the same, and its {costs.records_per_session:.0f} sync records "
        f"encoded | {costs.new_sync * 1e6:.1f} |",
        f"| sending a new session's records to one peer (UDP, batched) | {costs.send * 1e6:.1f} |",
        *(
            f"| new session on its owner with {p} peer{'s' if p > 1 else ''} | {costs.owner_cost(p) * 1e6:.1f} |"
            for p in PEERS
        ),
        f"| installing a replicated session at a peer (receive, check, install) | {costs.install * 1e6:.1f} |",
        f"| keep-alive of an active session (every `refresh`, 10 s): encoding its record | "
        f"{costs.refresh_send * 1e6:.1f} |",
        f"| keep-alive of an active session: applying it at a peer | {costs.refresh_apply * 1e6:.1f} |",
        f"| label-switched frame on the owner | {costs.frame_owner * 1e6:.2f} |",
        f"| label-switched frame on a replica | {costs.frame_replica * 1e6:.2f} |",
        "",
        "Capacity on one core per node (the owner encodes a session's records once and sends them to each peer; "
        "every peer installs them):",
        "",
        "| N | new sessions/s in all (sync) | per node | in all without sync | frames/s in all | per node |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in NODES:
        cap = capacity(costs, n)
        lines.append(
            f"| {n} | {cap.new_total:,.0f} | {cap.new_per_node:,.0f} | {cap.new_total_alone:,.0f} | "
            f"{cap.frames_total:,.0f} | {cap.frames_per_node:,.0f} |"
        )
    sessions = 200 if quick else 1000
    nodes = (1, 2, 3) if quick else CHANGE_NODES
    lines += [
        "",
        f"Sessions broken by one node change ({sessions} established sessions, hash-threshold ECMP; the middle node "
        "removed, or node N+1 added once synced):",
        "",
        "| N | change | moved | broken with sync | broken without sync | sync datagrams |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n in nodes:
        for change in ("remove", "add"):
            if change == "remove" and n < 2:
                continue
            with_sync = node_change(n, change, sync=True, sessions=sessions)
            without = node_change(n, change, sync=False, sessions=sessions)
            assert with_sync.moved == without.moved
            lines.append(
                f"| {n} | {change} one | {with_sync.moved} | {with_sync.broken} | {without.broken} | "
                f"{with_sync.sync_datagrams} |"
            )
    lines += ["", f"({time.monotonic() - t0:.0f} s; `{COMMAND}{' --quick' if quick else ''}`)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    print(markdown(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
