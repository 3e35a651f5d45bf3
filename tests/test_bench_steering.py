"""The end-to-end benchmark's ``--steer`` placements (bench/e2e.py) do what they say on real interfaces: RPS masks
written in each namespace's own sysfs, the switch's ports facing the balancer told apart, the balancing process
pinned and let go. Two namespaces, three veth pairs and a bridge; needs root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyroute2 import NetNS, netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from e2e import STEERING, lab_ports, set_steering

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces and veth pairs"),
]


@pytest.fixture
def lab() -> Iterator[Any]:
    """A stand-in for a Lab: a switch namespace (a port facing the balancer, one facing a server, a bridge) and a
    balancer namespace holding the ports' peers."""
    pid = os.getpid()
    sw, lb = f"mlbst{pid}", f"mlbsl{pid}"
    try:
        for name in (sw, lb):
            netns.create(name)
        with NetNS(sw) as ns:
            for here, there in (("lbs0", "lc1p0"), ("s1", "eth0")):
                ns.link("add", ifname=here, kind="veth", peer={"ifname": there, "net_ns_fd": lb})
            ns.link("add", ifname="brs", kind="bridge")
        yield SimpleNamespace(ns=lambda role: {"sw": sw, "lb": lb}[role], state=SimpleNamespace(namespaces=[sw, lb]))
    finally:
        for name in (sw, lb):
            if name in netns.listnetns():
                netns.remove(name)


def rps_mask(ns: str, ifname: str) -> int:
    path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", path], capture_output=True, text=True, check=True, timeout=10
    )
    return int(out.stdout.strip().replace(",", ""), 16)


def test_each_placement_sets_the_masks_and_the_affinity_it_names(lab: Any) -> None:
    sw, lb = lab.ns("sw"), lab.ns("lb")
    cpus = sorted(os.sched_getaffinity(0))
    every = sum(1 << c for c in cpus)
    ports = lab_ports(lab)
    assert {ns: sorted(names) for ns, names in ports.items()} == {sw: ["lbs0", "s1"], lb: ["eth0", "lc1p0"]}
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        seen = {}
        for mode in (*STEERING, "none"):
            set_steering(lab, mode, ports, [sleeper.pid])
            masks = {(ns, name): rps_mask(ns, name) for ns, names in ports.items() for name in names}
            seen[mode] = (masks, os.sched_getaffinity(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait(10)
    zero = {(ns, name): 0 for ns, names in ports.items() for name in names}
    assert seen["none"] == (zero, set(cpus))
    assert seen["rps"] == ({key: every for key in zero}, set(cpus))
    assert seen["pin"] == (zero | {(sw, "lbs0"): every & ~(1 << cpus[0])}, {cpus[0]})
