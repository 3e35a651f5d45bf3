"""Frames per second the balancer daemon's driver forwards on a veth testbed: BalancerDriver reading bursts
(block=False) against the zero-copy block path (block=True: RX ring blocks switched in place, TX ring, one flush per
block), with the kernel forwarding the same frames (tc mirred redirect) as the reference.

Testbed, in a throwaway namespace: ``gen -- ca [balancer] sa -- sink``, two veth pairs. trafgen (netsniff-ng) on
CPU 0 sends labelled 64-byte frames of ``--sessions`` open sessions (each past its handshake: the client's SYN and
the server's SYN-ACK went through the driver first) round robin into ``ca`` as fast as it can; the
driver (this process, on CPU 1) reads ``ca`` through a TPACKET_V3 ring and sends the switched frames out of ``sa``.
The figure is what arrives at ``sink`` (its rx_packets counter) per second over ``--seconds`` after a
``--warmup``; what the balancer could not take is dropped at its receive ring and shows as ``rx_drops``. The
reference redirects every frame from ``ca``'s ingress to ``sa`` in the kernel (no rewrite: an upper bound for any
forwarding on this testbed, done in trafgen's softirq on CPU 0).

``python bench/wire_ring.py [--seconds 3] [--warmup 1] [--json]`` (root; about 20 s with the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import Row, at_least, load_average, machine

TRAFGEN = "/usr/sbin/trafgen"
CLIENT_MAC = bytes.fromhex("02c000000001")
VIP = bytes((10, 0, 0, 100))
MODES = (
    ("burst", False, False),  # (name, block, tx_ring)
    ("block", True, True),
    ("block-plain-send", True, False),
)
WAIT = 5.0


def missing_requirements() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, packet sockets)"
    if not Path(TRAFGEN).exists() and shutil.which("trafgen") is None:
        return "trafgen (netsniff-ng) is not installed"
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    return ""


@contextlib.contextmanager
def testbed() -> Iterator[tuple[str, str, str, str, str]]:
    """A namespace with veth pairs (gen, ca) and (sa, sink), up, IPv6 off; removed by name afterwards."""
    from pyroute2 import IPRoute, netns

    from mplslb.drivers.netns import entered

    pid = os.getpid()
    name, gen, ca, sa, sink = f"mlbwr{pid}", f"wr{pid}g", f"wr{pid}ca", f"wr{pid}sa", f"wr{pid}k"
    try:
        netns.create(name)
        with entered(name):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            with IPRoute() as ipr:
                ipr.link("add", ifname=gen, kind="veth", peer=ca)
                ipr.link("add", ifname=sa, kind="veth", peer=sink)
                for ifname in (gen, ca, sa, sink):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline:
                    links = [ipr.get_links(ipr.link_lookup(ifname=n)[0])[0] for n in (gen, ca, sa, sink)]
                    if all(lk.get("IFLA_OPERSTATE") == "UP" and lk.get("IFLA_QDISC") != "noop" for lk in links):
                        break
                    time.sleep(0.01)
        yield name, gen, ca, sa, sink
    finally:
        if name in netns.listnetns():
            netns.remove(name)


def counters(ns: str, ifname: str) -> tuple[int, int]:
    """(rx_packets, tx_packets) of ``ifname``."""
    from pyroute2 import IPRoute

    from mplslb.drivers.netns import entered

    with entered(ns), IPRoute() as ipr:
        stats = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get("IFLA_STATS64")
        return int(stats["rx_packets"]), int(stats["tx_packets"])


def make_balancer(ca_mac: bytes, sa_mac: bytes, sink_mac: bytes) -> Any:
    from mplslb.balancer import Balancer
    from mplslb.balancing.servers import ServerConfig
    from mplslb.config import BalancerConfig, PortConfig, VirtualService
    from mplslb.sessions import Timeouts

    config = BalancerConfig(
        ports=(PortConfig(0, 0, 0, ca_mac, "client"), PortConfig(2, 1, 0, sa_mac, "server")),
        vips=(VirtualService(VIP, (80,)),),
        servers=(ServerConfig(name="s1", address=bytes((10, 2, 0, 1)), mac=sink_mac, port_id=2),),
        timeouts=Timeouts(tcp_start=3600.0),
    )
    return Balancer(config)


def client_packet(sport: int, flags: int, seq: int = 1000, ack: int = 0) -> bytes:
    from mplslb.wire.ip import IPPROTO_TCP
    from mplslb.wire.ipv4 import build_ipv4
    from mplslb.wire.tcp import build_tcp

    src = bytes((10, 1, 0, 1))
    segment = build_tcp(src, VIP, sport, 80, seq=seq, ack=ack, flags=flags)
    return build_ipv4(src, VIP, IPPROTO_TCP, len(segment)) + segment


def server_packet(dport: int, flags: int) -> bytes:
    """The server's answer to ``client_packet(dport, SYN)``: from the VIP (direct server return)."""
    from mplslb.wire.ip import IPPROTO_TCP
    from mplslb.wire.ipv4 import build_ipv4
    from mplslb.wire.tcp import build_tcp

    client = bytes((10, 1, 0, 1))
    segment = build_tcp(VIP, client, 80, dport, seq=5000, ack=1001, flags=flags)
    return build_ipv4(VIP, client, IPPROTO_TCP, len(segment)) + segment


def passed(loop: Any, port: Any, ethertype: bytes, what: str) -> bytes:
    """The one frame of ``ethertype`` that ``port`` receives while the driver runs, within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    got: list[bytes] = []
    while not got and time.monotonic() < deadline:
        loop.run_once(0.01)
        got = [f for f in port.recv_burst() if f[12:14] == ethertype]
    if len(got) != 1:
        raise RuntimeError(f"{what} did not come through the balancer")
    return got[0]


def open_sessions(driver: Any, loop: Any, gen_port: Any, sink_port: Any, ca_mac: bytes, sa_mac: bytes,
                  n: int) -> list[int]:  # fmt: skip
    """Open ``n`` TCP sessions through the driver: each client's SYN, and its server's SYN-ACK under the S2C label
    (the frames trafgen sends then are the client's ACKs, which complete the handshake: sessions past it, as a
    deployment's traffic is, not half-open ones, whose every frame the balancer looks at). The C2S labels they got,
    read off the labelled SYNs."""
    from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
    from mplslb.wire.mpls import stack_of

    labels: list[int] = []
    for i in range(n):
        gen_port.send(build_ethernet(ca_mac, CLIENT_MAC, ETH_P_IP) + client_packet(41000 + i, 0x02))
        syn = passed(loop, sink_port, b"\x88\x47", f"session {i}: the SYN")
        label = int.from_bytes(syn[14:17], "big") >> 4
        sink_port.send(build_ethernet(sa_mac, sink_port.mac, ETH_P_MPLS_UC) + stack_of([label + 1])
                       + server_packet(41000 + i, 0x12))  # fmt: skip
        passed(loop, gen_port, b"\x88\x47", f"session {i}: the SYN-ACK")
        labels.append(label)
    return labels


def trafgen_config(ca_mac: bytes, labels: list[int], size: int) -> str:
    """One labelled frame per session (``size`` bytes, padded), for trafgen to send round robin."""
    from mplslb.wire.ethernet import ETH_P_MPLS_UC, build_ethernet
    from mplslb.wire.mpls import stack_of

    packets = []
    for i, label in enumerate(labels):
        ack = client_packet(41000 + i, 0x10, seq=1001, ack=5001)  # the handshake's last segment, then as often again
        frame = build_ethernet(ca_mac, CLIENT_MAC, ETH_P_MPLS_UC) + stack_of([label]) + ack
        frame += bytes(max(0, size - len(frame)))
        packets.append("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }")
    return "\n".join(packets) + "\n"


def start_trafgen(ns: str, dev: str, config: Path) -> subprocess.Popen[bytes]:
    """trafgen on CPU 0 in ``ns``, one process, without touching the host's socket memory or IRQ settings."""
    command = ["ip", "netns", "exec", ns, "taskset", "-c", "0", TRAFGEN, "--dev", dev, "--conf", str(config),
               "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]  # fmt: skip
    # Its own session: trafgen forks its workers, and stop() ends the whole group it started (by its id).
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End trafgen and its workers: the process group this script started for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # the workers may outlive the parent by a moment
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def cpu_ticks() -> dict[str, list[int]]:
    """Per CPU: the /proc/stat tick counters (user nice system idle iowait irq softirq steal ...)."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks[name] = [int(v) for v in values]
    return ticks


def cpu_share(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per CPU, the share of the window spent in user, system, softirq, idle and steal."""
    out = {}
    for name, values in after.items():
        delta = [a - b for a, b in zip(values, before[name], strict=False)]
        total = sum(delta[:8]) or 1
        out[name] = {k: round(delta[i] / total, 3) for k, i in
                     (("user", 0), ("system", 2), ("idle", 3), ("softirq", 6), ("steal", 7))}  # fmt: skip
    return out


def measure_window(ns: str, gen: str, sink: str, run: Any, seconds: float) -> dict[str, Any]:
    """Frames per second offered (leaving gen) and forwarded (arriving at sink) while ``run(seconds)`` runs."""
    _, offered0 = counters(ns, gen)
    forwarded0, _ = counters(ns, sink)
    ticks0 = cpu_ticks()
    cpu0 = os.times()
    t0 = time.monotonic()
    run(seconds)
    t1 = time.monotonic()
    cpu1 = os.times()
    ticks1 = cpu_ticks()
    _, offered1 = counters(ns, gen)
    forwarded1, _ = counters(ns, sink)
    return {
        "offered": (offered1 - offered0) / (t1 - t0),
        "forwarded": (forwarded1 - forwarded0) / (t1 - t0),
        # this process's CPU share in the window, user and system (the kernel's send path runs in the system part)
        "user": (cpu1.user - cpu0.user) / (t1 - t0),
        "system": (cpu1.system - cpu0.system) / (t1 - t0),
        "cpus": cpu_share(ticks0, ticks1),
    }


def run_driver(bed: tuple[str, str, str, str, str], mode: tuple[str, bool, bool], args: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:  # fmt: skip
    from mplslb.drivers.afpacket import PacketPort, RingPort
    from mplslb.drivers.loop import BalancerDriver, Loop

    ns, gen, ca, sa, sink = bed
    _, block, tx_ring = mode
    opened: list[Any] = []
    loop = Loop()
    driver = None
    trafgen = None
    try:
        ca_port = RingPort(ca, netns=ns, tx_ring=tx_ring)
        opened.append(ca_port)
        sa_port = RingPort(sa, netns=ns, tx_ring=tx_ring)
        opened.append(sa_port)
        gen_port = PacketPort(gen, netns=ns)
        opened.append(gen_port)
        sink_port = PacketPort(sink, netns=ns, rcvbuf=4 << 20)
        opened.append(sink_port)
        balancer = make_balancer(ca_port.mac, sa_port.mac, sink_port.mac)
        driver = BalancerDriver(balancer, {0: ca_port, 2: sa_port}, loop, block=block)
        labels = open_sessions(driver, loop, gen_port, sink_port, ca_port.mac, sa_port.mac, args.sessions)
        sink_port.close()  # nothing reads the sink during the run: its counter is the figure
        gen_port.close()
        config = workdir / "frames.cfg"
        config.write_text(trafgen_config(ca_port.mac, labels, args.size))
        ca_port.stats()  # reset the kernel's counters
        trafgen = start_trafgen(ns, gen, config)
        loop.run(until=loop.clock() + args.warmup)
        if trafgen.poll() is not None:
            raise RuntimeError(
                f"trafgen exited: {trafgen.stderr.read().decode(errors='replace') if trafgen.stderr else ''}"
            )
        ca_port.stats()
        read0, written0 = driver.frames_read[0], driver.frames_written[2]
        figures = measure_window(ns, gen, sink, lambda s: loop.run(until=loop.clock() + s), args.seconds)
        _, rx_drops = ca_port.stats()
        busy = figures["user"] + figures["system"]
        figures |= {
            # this process's CPU time per forwarded frame: steadier than the rate when the machine is shared
            "cpu_us_per_frame": busy / figures["forwarded"] * 1e6 if figures["forwarded"] else None,
            "read": driver.frames_read[0] - read0,
            "written": driver.frames_written[2] - written0,
            "rx_drops": rx_drops,
            "send_errors": dict(driver.send_errors),
            "fast_path": balancer.fast_path,
            "states": balancer.sessions.state_counts(),
            "blocks": dict(driver.blocks_read),
        }
        return figures
    finally:
        if trafgen is not None:
            stop(trafgen)
        if driver is not None:
            driver.close()
        loop.close()
        for port in opened:
            with contextlib.suppress(OSError, ValueError):
                port.close()


def run_kernel(bed: tuple[str, str, str, str, str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The reference: tc redirects every frame arriving on ca to sa (clsact ingress, a match-all u32, mirred)."""
    from mplslb.drivers.afpacket import PacketPort

    ns, gen, ca, sa, sink = bed
    tc = ["ip", "netns", "exec", ns, "tc"]
    subprocess.run([*tc, "qdisc", "add", "dev", ca, "clsact"], check=True)
    trafgen = None
    try:
        subprocess.run([*tc, "filter", "add", "dev", ca, "ingress", "protocol", "all", "u32", "match", "u32", "0",
                        "0", "action", "mirred", "egress", "redirect", "dev", sa], check=True)  # fmt: skip
        with PacketPort(ca, netns=ns) as probe:
            mac = probe.mac
        config = workdir / "kernel.cfg"
        config.write_text(trafgen_config(mac, [1001 + 2 * i for i in range(args.sessions)], args.size))
        trafgen = start_trafgen(ns, gen, config)
        time.sleep(args.warmup)
        return measure_window(ns, gen, sink, time.sleep, args.seconds)
    finally:
        if trafgen is not None:
            stop(trafgen)
        subprocess.run([*tc, "qdisc", "del", "dev", ca, "clsact"], check=False)


def rows_for(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    command = f".venv/bin/python bench/wire_ring.py --seconds {args.seconds:g} --warmup {args.warmup:g}"
    kernel = results.get("kernel", {}).get("forwarded")
    burst = results.get("burst", {}).get("forwarded")
    rows: list[Row] = []
    for name, figures in results.items():
        if name == "kernel":
            rows.append(Row("wire_ring", f"kernel tc mirred redirect, {args.size} B", figures["forwarded"],
                            "frames/s", "offered by trafgen", figures["offered"], command=command,
                            note="reference: no rewrite, in trafgen's softirq on CPU 0", extra=figures))  # fmt: skip
            continue
        row = Row(
            "wire_ring",
            f"BalancerDriver {name}, {args.size} B, {args.sessions} sessions",
            figures["forwarded"],
            "frames/s",
            "kernel tc mirred redirect",
            kernel,
            command=command,
            note=f"offered {figures['offered']:,.0f}/s, rx ring drops {figures['rx_drops']:,}, "
            f"{figures['cpu_us_per_frame'] or 0:.2f} us CPU/frame (user+sys of the driver), "
            f"send errors {figures['send_errors'] or 'none'}",
            extra=figures,
        )
        if name != "burst" and burst:
            row.extra["vs_burst"] = figures["forwarded"] / burst
            at_least(row, figures["forwarded"] / burst, 1.0)
            row.target = "block >= burst"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before measuring")
    parser.add_argument("--sessions", type=int, default=64, help="open sessions the frames are spread over")
    parser.add_argument("--size", type=int, default=64, help="frame size in bytes (without the FCS)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--no-kernel", action="store_true", help="skip the tc mirred reference")
    parser.add_argument("--modes", default=",".join(m[0] for m in MODES), help="driver modes to run, comma separated")
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        row = Row("wire_ring", "BalancerDriver block vs burst", None, "", "", None, skipped=reason)
        print(json.dumps([row.as_dict()]) if args.json else f"skipped: {reason}")
        return 0
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})  # the driver on CPU 1, trafgen on CPU 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mplslb-wire-ring-") as tmp, testbed() as bed:
        wanted = [name.strip() for name in args.modes.split(",") if name.strip()]
        for mode in (m for m in MODES if m[0] in wanted):
            results[mode[0]] = run_driver(bed, mode, args, Path(tmp))
            print(f"{mode[0]}: {results[mode[0]]['forwarded']:,.0f} frames/s", file=sys.stderr, flush=True)
        if not args.no_kernel:
            results["kernel"] = run_kernel(bed, args, Path(tmp))
            print(f"kernel: {results['kernel']['forwarded']:,.0f} frames/s", file=sys.stderr, flush=True)
    rows = rows_for(results, args)
    if args.json:
        print(json.dumps({"machine": machine(), "load": load_average(), "rows": [r.as_dict() for r in rows]}, indent=1))
    else:
        for r in rows:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            print(f"{r.benchmark:60} {r.figure or 0:>14,.0f} {r.unit}  x{ratio} of {r.reference}   {r.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
