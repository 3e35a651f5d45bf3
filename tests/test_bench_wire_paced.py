"""The paced wire benchmark's (bench/wire_offload.py) baseline and placement do what its figures assume: the
generator-only baseline keeps the balancer's port up and drops each frame at its XDP hook (nothing forwarded,
nothing left attached afterwards), the placement steers both receiving ports to the forwarding CPU, and CPU per
forwarded frame is the busy time above that baseline. Frames sent one by one through a packet socket; nothing
timed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import wire_offload as wo

FRAMES = 50


def test_cpu_per_frame_is_the_busy_time_above_the_baseline_per_forwarded_frame() -> None:
    base = {"cpu_busy": {"0": 1.0, "1": 0.10}, "pacing_held": True}
    figures = {"forwarded_pps": 100_000, "ratio": 0.8, "cpu_busy": {"0": 1.0, "1": 0.40},
               "cpu_softirq": {"0": 0.0, "1": 0.25}, "process_cpu": {"trafgen": 0.3, "daemon": 0.1}}  # fmt: skip
    out = wo.cpu_per_frame(figures, base, forward_cpu=1)
    assert out["forward_softirq_us_per_frame"] == pytest.approx(2.5)
    assert out["daemon_us_per_frame"] == pytest.approx(1.0)
    assert out["path_us_per_frame"] == pytest.approx(3.5)
    assert out["loss"] == pytest.approx(0.2)  # from the window when the whole run's is not known
    assert wo.cpu_per_frame({**figures, "run_loss": 0.25}, base)["loss"] == 0.25
    assert out["cpu_us_per_frame"] == pytest.approx(3.0)  # 0.30 of a CPU over 100k frames/s
    assert out["forward_cpu_us_per_frame"] == pytest.approx(4.0)
    assert out["baseline_pacing_held"] is True
    below = {"forwarded_pps": 100_000, "ratio": 1.0, "cpu_busy": {"0": 0.95, "1": 0.10}}
    assert wo.cpu_per_frame(below, base, forward_cpu=1)["cpu_us_per_frame"] == 0.0  # no CPU counted below the base
    assert wo.cpu_per_frame({**figures, "forwarded_pps": 0, "ratio": 0.0}, base)["cpu_us_per_frame"] is None


def test_pacing_held_within_the_tolerance_only() -> None:
    assert wo.pacing_held(100_000, 100_000 * (1 + wo.PACING_TOLERANCE / 2))
    assert wo.pacing_held(100_000, 100_000 * (1 - wo.PACING_TOLERANCE / 2))
    assert not wo.pacing_held(100_000, 377_000)  # a generator that is not paced
    assert not wo.pacing_held(300_000, 150_000)  # a generator that cannot keep up


@pytest.fixture
def bed() -> Iterator[wo.Testbed]:
    testbed = wo.Testbed()
    try:
        testbed.up()
        yield testbed
    finally:
        testbed.down()


def send_and_count(bed: wo.Testbed) -> tuple[int, int]:
    """FRAMES IPv4 frames for the sink from the generator's port; how many more the balancer's port received and
    the sink's port received, once the sink has them all or WAIT has passed."""
    from mplslb.drivers.afpacket import PacketPort

    lb0, k0 = wo.stats(bed.lb, "lc0p0")["rx_packets"], wo.stats(bed.sink, "k0")["rx_packets"]
    with PacketPort("g0", netns=bed.gen) as gen:
        for i in range(FRAMES):
            gen.send(wo.ipv4_frame(wo.SPORT0 + i))
    deadline = time.monotonic() + wo.WAIT
    while time.monotonic() < deadline and wo.stats(bed.lb, "lc0p0")["rx_packets"] - lb0 < FRAMES:
        time.sleep(0.01)
    time.sleep(0.1)  # frames the balancer forwards reach the sink within its softirq
    return wo.stats(bed.lb, "lc0p0")["rx_packets"] - lb0, wo.stats(bed.sink, "k0")["rx_packets"] - k0


def xdp_attached(ns: str, ifname: str) -> str:
    """How an XDP program is attached to ``ifname`` ("generic", "native"; "?": none)."""
    from pyroute2 import IPRoute

    from mplslb.drivers.netns import entered
    from mplslb.offload.xdp import xdp_mode

    with entered(ns), IPRoute() as ipr:
        return xdp_mode(ipr.link_lookup(ifname=ifname)[0])


def rps_mask(ns: str, ifname: str) -> int:
    path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", path], capture_output=True, text=True, check=True,
                         timeout=10)  # fmt: skip
    return int(out.stdout.strip().replace(",", ""), 16)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth pairs, bpf(2)")
@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_the_baseline_drops_at_the_port_it_keeps_up_and_leaves_nothing_attached(bed: wo.Testbed, hook: str) -> None:
    with wo.dropping(bed.lb, "lc0p0", hook):
        assert xdp_attached(bed.lb, "lc0p0") == ("generic" if hook == "xdp" else "?")
        bed.wait_up(bed.lb, ["lc0p0"])  # raises unless the port is up
        received, forwarded = send_and_count(bed)
        assert received >= FRAMES  # received at the port (and its counters), then dropped
        assert forwarded == 0
    assert xdp_attached(bed.lb, "lc0p0") == "?"
    received, forwarded = send_and_count(bed)  # the same frames are forwarded once the program is gone
    assert received >= FRAMES
    assert forwarded >= FRAMES


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth pairs")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_the_placement_steers_both_receiving_ports_to_the_forwarding_cpu(bed: wo.Testbed) -> None:
    for ns, ifname in ((bed.lb, "lc0p0"), (bed.sink, "k0")):
        wo.steer(ns, ifname, wo.FORWARD_CPU)
        assert rps_mask(ns, ifname) == 1 << wo.FORWARD_CPU
        wo.steer(ns, ifname, None)
        assert rps_mask(ns, ifname) == 0
    assert wo.GEN_CPU != wo.FORWARD_CPU
    assert f"CPU {wo.FORWARD_CPU}" in wo.placement()["forwarding"]
    assert "tc hook" in wo.placement("tc")["baseline"]
