"""The kernel offload (``offload = "kernel"``): frames per second forwarded, and sessions per second installed.

Testbed, three throwaway namespaces ``gen -- [lb] -- sink`` over two veth pairs (``g0``-``lc0p0``,
``lc1p0``-``k0``). trafgen (netsniff-ng) on CPU 0 sends 64-byte frames as fast as it can into the balancer's
client-side port; the figure is what arrives at the sink (``k0`` rx_packets) per second over ``--seconds``, and the
offered rate is what left the generator (``g0`` tx_packets + tx_dropped). Measured in the same run:

* ``kernel_ipv4``: the reference: plain IPv4/UDP frames through the kernel's own IPv4 forwarding in ``lb``;
* ``daemon_none``: the balancer daemon (``mplslb balancer``, ``ring = true``: TPACKET_V3 rings and the block path)
  switching labelled frames of
  ``--sessions`` UDP sessions in userspace; the sessions are opened by the daemon itself from real first frames;
* ``daemon_kernel``: the same daemon with ``offload = "kernel"`` (XDP, mode ``auto``: generic on veth);
* ``xdp_generic`` / ``xdp_native``: the offload alone (labels installed straight into a table), generic XDP, and
  native XDP with GRO turned on at the sink's veth (native redirect into a veth needs NAPI on its peer);
* ``nft``: the alternative that was evaluated: an nftables netdev ingress chain with label-keyed maps (bound
  ingress/MAC/IP as a set, ``ether daddr/saddr set ... map``, TTL through a map, ``fwd to ... map``), with
  ``nft_seen_by_packet_socket``: how many of those frames an AF_PACKET socket on the port (the daemon's) still got.

Install rates (``install``): 10k sessions (20k labels) installed in a table and synced into the XDP map in one
batch, one session per sync (single updates, what a trickle of new sessions costs), withdrawn, one poll of the
counters with 20k entries, and whole UDP sessions opened through ``Balancer.receive`` with a sync per 64-frame
batch (what the daemon does); and, for nftables, the same 10k sessions as one ``nft -f`` transaction and a few
hundred as one ``nft`` run per session.

``python bench/wire_offload.py [--json] [--quick]`` (root, trafgen, clang, nft; under 3 minutes, ``--quick`` about
40 s). Prints a JSON dict of figures (rates in frames or sessions per second) with the commands it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TRAFGEN = shutil.which("trafgen") or "/usr/sbin/trafgen"
NFT = shutil.which("nft") or "/usr/sbin/nft"
WAIT = 10.0
DRAIN = 0.2  # after trafgen stops: long enough for every frame in flight (a ring, a backlog) to arrive
GEN_MAC, LB0_MAC, LB1_MAC, SINK_MAC = "02:c0:00:00:00:01", "02:b0:00:00:00:00", "02:b0:00:00:00:01", "02:5e:00:00:00:01"
CLIENT_IP, VIP, SINK_IP = "10.1.0.2", "10.0.0.100", "10.2.0.2"
SPORT0 = 20000
FRAME_SIZE = 64  # without the FCS
#: Paced runs: trafgen on GEN_CPU; everything that forwards on FORWARD_CPU (RPS steers the balancer's ingress port
#: there, so the kernel's own forwarding and generic XDP run there too, and the daemon is pinned there).
GEN_CPU, FORWARD_CPU = 0, 1
#: Paced offered rates: at 300k frames/s on the 2-core reference VM trafgen alone takes all of CPU 0 and taking the
#: frames off CPU 1's backlog (and dropping them at tc ingress) all of CPU 1, so nothing can be told apart there.
PACED_RATES = (50_000, 100_000, 200_000)
PACED_RATES_QUICK = (50_000, 100_000)
#: A paced window whose offered rate is further than this from the asked one says so (``pacing_held`` false).
PACING_TOLERANCE = 0.03
#: The paced paths, in the order they run (each at every rate); the daemons pinned on FORWARD_CPU. The last is the
#: ring daemon with its port's receive softirq moved to the generator's CPU (RPS): the daemon then has its CPU to
#: itself, which no other path gets, so it is told apart from the like-for-like rows.
PACED_PATHS = ("kernel_ipv4", "nft", "xdp_generic", "daemon_none", "daemon_sockets", "daemon_kernel",
               "daemon_none_rx_on_gen")  # fmt: skip


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def missing_requirements() -> str:
    if os.geteuid() != 0:
        return "needs root (namespaces, veth pairs, bpf(2))"
    if not os.path.exists(TRAFGEN):
        return "trafgen (Debian: netsniff-ng) is not installed"
    if shutil.which("clang") is None:
        return "clang is not installed (the XDP program is built from source)"
    return ""


# -- the testbed ---------------------------------------------------------------------------------------------------
class Testbed:
    """Namespaces gen, lb, sink (names unique to this process), removed by exact name in :meth:`down`."""

    def __init__(self) -> None:
        tag = f"mlbwo{os.getpid()}"
        self.gen, self.lb, self.sink = f"{tag}g", f"{tag}l", f"{tag}k"
        self.created: list[str] = []

    def up(self) -> None:
        from pyroute2 import IPRoute, netns

        from mplslb.drivers.netns import entered

        for name in (self.gen, self.lb, self.sink):
            netns.create(name)
            self.created.append(name)
            self.sysctl(name, "ipv6/conf/all/disable_ipv6", "1")
            self.sysctl(name, "ipv6/conf/default/disable_ipv6", "1")
        with entered(self.gen), IPRoute() as ipr:
            ipr.link("add", ifname="g0", kind="veth", peer={"ifname": "lc0p0", "net_ns_fd": self.lb})
        with entered(self.lb), IPRoute() as ipr:
            ipr.link("add", ifname="lc1p0", kind="veth", peer={"ifname": "k0", "net_ns_fd": self.sink})
        for ns, ifname, address, ip in (
            (self.gen, "g0", GEN_MAC, f"{CLIENT_IP}/24"),
            (self.lb, "lc0p0", LB0_MAC, "10.1.0.1/24"),
            (self.lb, "lc1p0", LB1_MAC, "10.2.0.1/24"),
            (self.sink, "k0", SINK_MAC, f"{SINK_IP}/24"),
        ):
            with entered(ns), IPRoute() as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=index, address=address, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                addr, plen = ip.split("/")
                ipr.addr("add", index=index, address=addr, prefixlen=int(plen))
        with entered(self.lb), IPRoute() as ipr:
            ipr.neigh("add", dst=SINK_IP, lladdr=SINK_MAC, ifindex=ipr.link_lookup(ifname="lc1p0")[0], state=0x80)
        with entered(self.sink), IPRoute() as ipr:
            ipr.route("add", dst="10.1.0.0/24", gateway="10.2.0.1")
        self.sysctl(self.lb, "ipv4/ip_forward", "1")
        for ns, names in ((self.gen, ["g0"]), (self.lb, ["lc0p0", "lc1p0"]), (self.sink, ["k0"])):
            self.wait_up(ns, names)

    @staticmethod
    def sysctl(ns: str, path: str, value: str) -> None:
        from mplslb.drivers.netns import entered

        with entered(ns):
            Path("/proc/sys/net", path).write_text(value)

    @staticmethod
    def wait_up(ns: str, names: list[str]) -> None:
        from pyroute2 import IPRoute

        from mplslb.drivers.netns import entered

        deadline = time.monotonic() + WAIT
        with entered(ns), IPRoute() as ipr:
            while time.monotonic() < deadline:
                links = [ipr.get_links(ipr.link_lookup(ifname=n)[0])[0] for n in names]
                if all(k.get("IFLA_OPERSTATE") == "UP" and k.get("IFLA_QDISC") != "noop" for k in links):
                    return
                time.sleep(0.01)
        raise RuntimeError(f"{ns}: {names} did not come up")

    def down(self) -> None:
        from pyroute2 import netns

        for name in reversed(self.created):
            with contextlib.suppress(OSError):
                if name in netns.listnetns():
                    netns.remove(name)
        self.created.clear()


def stats(ns: str, ifname: str) -> dict[str, int]:
    from pyroute2 import IPRoute

    from mplslb.drivers.netns import entered

    with entered(ns), IPRoute() as ipr:
        raw = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get("IFLA_STATS64")
        return {k: int(raw[k]) for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped")}


def set_gro(ns: str, ifname: str, on: bool) -> None:
    """ETHTOOL_SGRO through the SIOCETHTOOL ioctl (no ethtool binary needed)."""
    import ctypes
    import fcntl

    from mplslb.drivers.netns import entered

    value = ctypes.create_string_buffer(struct.pack("=II", 0x2C, int(on)), 8)
    with entered(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, 0x8946, struct.pack("16sP", ifname.encode(), ctypes.addressof(value)))


# -- traffic -------------------------------------------------------------------------------------------------------
def udp_packet(sport: int, src: str = CLIENT_IP, dst: str = VIP, payload_to: int = FRAME_SIZE, l2: int = 18) -> bytes:
    from mplslb.wire.ip import IPPROTO_UDP
    from mplslb.wire.ipv4 import build_ipv4
    from mplslb.wire.udp import build_udp

    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    payload = bytes(max(1, payload_to - l2 - 28))
    segment = build_udp(s, d, sport, 53, payload)
    return build_ipv4(s, d, IPPROTO_UDP, len(segment)) + segment


def labelled_frame(label: int, sport: int) -> bytes:
    from mplslb.wire.ethernet import ETH_P_MPLS_UC, build_ethernet
    from mplslb.wire.mpls import pack_entry

    eth = build_ethernet(mac(LB0_MAC), mac(GEN_MAC), ETH_P_MPLS_UC)
    return eth + pack_entry(label, 0, True, 64) + udp_packet(sport)


def ipv4_frame(sport: int) -> bytes:
    from mplslb.wire.ethernet import ETH_P_IP, build_ethernet

    return build_ethernet(mac(LB0_MAC), mac(GEN_MAC), ETH_P_IP) + udp_packet(sport, dst=SINK_IP, l2=14)


def trafgen_config(frames: list[bytes], path: Path) -> Path:
    path.write_text("\n".join("{ " + ", ".join(f"0x{b:02x}" for b in f) + " }" for f in frames) + "\n")
    return path


#: A paced generator's output is shaped this much above the rate asked (tbf on its port, ``shaped``): trafgen's
#: ``--rate`` keeps the average per second, the shaper spreads it over the second.
SHAPE_MARGIN = 1.05
#: The shaper's bucket: at most this many frames leave back to back.
SHAPE_BURST_FRAMES = 100
#: After a shaped run, long enough for the shaper's queue to empty (trafgen's last burst, at most a second's).
SHAPE_DRAIN = 1.0


def trafgen_command(ns: str, config: Path, rate: int | None = None) -> list[str]:
    # --qdisc-path: through the port's qdisc (trafgen bypasses it by default), where ``shaped`` paces the frames
    paced = ["--rate", f"{rate}pps", "--qdisc-path"] if rate else []
    return ["ip", "netns", "exec", ns, "taskset", "-c", str(GEN_CPU), TRAFGEN, "--dev", "g0", "--conf", str(config),
            "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats", *paced]  # fmt: skip


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End a process this script started in its own session, and its children (its process group, by id)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) ticks from /proc/stat (busy: everything but idle and iowait)."""
    return {cpu: (busy, total) for cpu, (busy, total, _) in cpu_ticks_softirq().items()}


def cpu_ticks_softirq() -> dict[int, tuple[int, int, int]]:
    """Per CPU: (busy, total, softirq) ticks from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks), ticks[6])
    return out


def net_rx_softirqs() -> list[int]:
    """Per CPU: NET_RX softirqs run so far (/proc/softirqs): where the receive work went."""
    for line in Path("/proc/softirqs").read_text().splitlines():
        name, *values = line.split()
        if name == "NET_RX:":
            return [int(v) for v in values]
    return []


def group_cpu(pgid: int) -> tuple[int, int]:
    """Of every live thread in process group ``pgid`` (this script starts each tool in a session of its own, so the
    group is the tool and whatever it execs or forks: ``ip netns exec`` forks): nanoseconds run on a CPU and
    nanoseconds waited runnable for one (``/proc/PID/task/TID/schedstat``: the second is what other work on the
    CPU took from it)."""
    ran = waited = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for task in (entry / "task").iterdir():
                run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
                ran, waited = ran + int(run_ns), waited + int(wait_ns)
        except OSError:
            continue
    return ran, waited


def ksoftirqd_run_ns() -> dict[str, int]:
    """Per CPU: nanoseconds its ksoftirqd thread has run (softirq work deferred to a thread, which competes with
    the tasks on that CPU: the sign of a receive livelock)."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (comm := (entry / "comm").read_text().strip()).startswith("ksoftirqd/"):
                out[comm.split("/")[1]] = int((entry / "schedstat").read_text().split()[0])
        except OSError:
            continue
    return out


@contextlib.contextmanager
def shaped(bed: Testbed, rate: int | None, commands: list[str]) -> Iterator[None]:
    """With ``rate``: a token bucket (tbf) on the generator's port at SHAPE_MARGIN times the rate, for the time of
    the block. trafgen's ``--rate`` alone holds the average of each second but not its spread: measured on this
    machine at 50k frames/s asked, it sent about 120k frames/s for 0.4 s, then nothing for 0.6 s, every second
    (a capture of the balancer's port, counted per 100 ms), which tested how much a receive buffer holds rather than
    how fast a path forwards; shaped, the same capture counts 5,250 frames in every 100 ms."""
    if not rate:
        yield
        return
    shaped_rate = int(rate * SHAPE_MARGIN)
    tc = ["ip", "netns", "exec", bed.gen, "tc", "qdisc"]
    command = [*tc, "replace", "dev", "g0", "root", "tbf", "rate", f"{shaped_rate * FRAME_SIZE * 8}bit",
               "burst", str(SHAPE_BURST_FRAMES * FRAME_SIZE), "limit", str(shaped_rate * FRAME_SIZE)]  # fmt: skip
    commands.append(" ".join(command))
    subprocess.run(command, check=True, timeout=WAIT)
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", "g0", "root"], check=False, timeout=WAIT)


def blast(bed: Testbed, config: Path, seconds: float, warmup: float, commands: list[str],
          rate: int | None = None, watch: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """trafgen at full speed (or paced at ``rate`` frames/s); offered and forwarded frames per second over
    ``seconds`` after ``warmup``; the share of the whole run's frames (trafgen's start to the end of the frames in
    flight) that never reached the sink (``run_loss``: the window's two counters are read one after the other, so
    its ratio can pass 1); each CPU's busy share of the window and its softirq share (tick-sampled: this
    kernel has no IRQ time accounting), the NET_RX softirqs each CPU ran, and the CPU
    share of trafgen and of the process groups in ``watch`` (name: group id), and the share of the window they
    waited runnable while other work had their CPU, and each CPU's ksoftirqd's share."""
    command = trafgen_command(bed.gen, config, rate)
    with shaped(bed, rate, commands):
        commands.append(" ".join(command))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)  # fmt: skip
        groups = {"trafgen": process.pid, **(watch or {})}
        g_start, k_start = stats(bed.gen, "g0"), stats(bed.sink, "k0")
        try:
            time.sleep(warmup)
            g0, k0, c0, t0 = stats(bed.gen, "g0"), stats(bed.sink, "k0"), cpu_ticks_softirq(), time.monotonic()
            s0, p0 = net_rx_softirqs(), {name: group_cpu(pgid) for name, pgid in groups.items()}
            q0 = ksoftirqd_run_ns()
            time.sleep(seconds)
            g1, k1, c1, t1 = stats(bed.gen, "g0"), stats(bed.sink, "k0"), cpu_ticks_softirq(), time.monotonic()
            s1, p1 = net_rx_softirqs(), {name: group_cpu(pgid) for name, pgid in groups.items()}
            q1 = ksoftirqd_run_ns()
        finally:
            stop_group(process)
        time.sleep(DRAIN + (SHAPE_DRAIN if rate else 0.0))
    g_end, k_end = stats(bed.gen, "g0"), stats(bed.sink, "k0")
    sent = g_end["tx_packets"] + g_end["tx_dropped"] - g_start["tx_packets"] - g_start["tx_dropped"]
    arrived = k_end["rx_packets"] - k_start["rx_packets"]
    dt = t1 - t0
    offered = (g1["tx_packets"] + g1["tx_dropped"] - g0["tx_packets"] - g0["tx_dropped"]) / dt
    forwarded = (k1["rx_packets"] - k0["rx_packets"]) / dt
    busy = {cpu: (c1[cpu][0] - c0[cpu][0]) / max(1, c1[cpu][1] - c0[cpu][1]) for cpu in c1 if cpu in c0}
    softirq = {cpu: (c1[cpu][2] - c0[cpu][2]) / max(1, c1[cpu][1] - c0[cpu][1]) for cpu in c1 if cpu in c0}
    softirqs = {str(cpu): round((b - a) / dt) for cpu, (a, b) in enumerate(zip(s0, s1, strict=True))}
    out = {"offered_pps": round(offered), "forwarded_pps": round(forwarded), "ratio": round(forwarded / offered, 4),
           "cpu_busy": {str(cpu): round(share, 4) for cpu, share in sorted(busy.items())},
           "cpu_softirq": {str(cpu): round(share, 4) for cpu, share in sorted(softirq.items())},
           "net_rx_softirqs_per_s": softirqs,
           "process_cpu": {name: round((p1[name][0] - p0[name][0]) / 1e9 / dt, 4) for name in groups},
           "process_waited": {name: round((p1[name][1] - p0[name][1]) / 1e9 / dt, 4) for name in groups},
           "ksoftirqd": {cpu: round((q1[cpu] - q0[cpu]) / 1e9 / dt, 4) for cpu in sorted(q1) if cpu in q0}}  # fmt: skip
    out["run_loss"] = round(1 - arrived / sent, 4) if sent else None
    if rate:
        out["asked_pps"] = rate
        out["pacing_held"] = pacing_held(rate, offered)
    return out


def pacing_held(asked: int, offered: float, tolerance: float = PACING_TOLERANCE) -> bool:
    """Whether trafgen offered what it was asked for (within ``tolerance``)."""
    return abs(offered - asked) <= tolerance * asked


# -- the modes -----------------------------------------------------------------------------------------------------
def run_ipv4(bed: Testbed, n: int, args: argparse.Namespace, work: Path, commands: list[str]) -> dict[str, Any]:
    """The reference: the same rate of plain IPv4 frames (``n`` flows) through the kernel's IPv4 forwarding."""
    config = trafgen_config([ipv4_frame(SPORT0 + i) for i in range(n)], work / "ip.cfg")
    return blast(bed, config, args.seconds, args.warmup, commands)


def lb_balancer() -> Any:
    from mplslb.balancer import Balancer
    from mplslb.balancing.servers import ServerConfig
    from mplslb.config import BalancerConfig, PortConfig, VirtualService

    config = BalancerConfig(
        ports=(PortConfig(0, 0, 0, mac(LB0_MAC), "client", interface="lc0p0"),
               PortConfig(1, 1, 0, mac(LB1_MAC), "server", interface="lc1p0")),
        vips=(VirtualService(socket.inet_aton(VIP), (80,), (53,)),),
        servers=(ServerConfig("k", socket.inet_aton(SINK_IP), mac(SINK_MAC), port_id=1),),
    )  # fmt: skip
    return Balancer(config)


def direct_labels(balancer: Any, n: int) -> list[int]:
    """``n`` labels installed straight into the table, bound like C2S labels of UDP sessions from the generator."""
    labels = [17 + 2 * i for i in range(n)]
    for label in labels:
        balancer.switching.install(label, out_port=1, next_hop=mac(SINK_MAC), in_port=0, peer=mac(GEN_MAC),
                                   peer_ip=socket.inet_aton(CLIENT_IP), watch=0)  # fmt: skip
    return labels


@contextlib.contextmanager
def offload_alone(bed: Testbed, obj: bytes, mode: str, labels_n: int, work: Path) -> Iterator[tuple[Any, Path]]:
    """The XDP offload alone on the balancer's ports, ``labels_n`` labels installed straight into its table; the
    offload and the trafgen configuration of frames carrying those labels."""
    from mplslb.drivers.netns import entered
    from mplslb.offload.xdp import XdpOffload

    balancer = lb_balancer()
    labels = direct_labels(balancer, labels_n)
    config = trafgen_config([labelled_frame(lb, SPORT0 + i) for i, lb in enumerate(labels)], work / "mpls.cfg")
    if mode == "native":
        set_gro(bed.sink, "k0", True)
    try:
        with entered(bed.lb):
            offload = XdpOffload(balancer.switching, {0: "lc0p0", 1: "lc1p0"}, mode=mode, obj=obj)
            offload.open()
        try:
            yield offload, config
        finally:
            offload.close()
    finally:
        if mode == "native":
            set_gro(bed.sink, "k0", False)


def run_xdp(bed: Testbed, obj: bytes, mode: str, labels_n: int, args: argparse.Namespace, work: Path,
            commands: list[str]) -> dict[str, Any]:  # fmt: skip
    with offload_alone(bed, obj, mode, labels_n, work) as (offload, config):
        result: dict[str, Any] = blast(bed, config, args.seconds, args.warmup, commands)
        offload.poll()
        result["kernel_counted"] = offload.kernel_packets
        result["attached"] = dict(offload.attached)
    return result


NFT_RULESET = """table netdev {table} {{
  map dmac {{ typeof @nh,0,24 : ether daddr ; }}
  map smac {{ typeof @nh,0,24 : ether saddr ; }}
  map outif {{ typeof @nh,0,24 : meta iif ; }}
  map ttldec {{ typeof @nh,24,8 : @nh,24,8 ; }}
  set bind4 {{ typeof @nh,0,24 . meta iif . ether saddr . @nh,128,32 ; }}
  chain in0 {{
    type filter hook ingress device "lc0p0" priority 0; policy accept;
    ether type != 0x8847 accept
    @nh,23,1 != 1 accept
    @nh,24,8 < 2 accept
    @nh,0,24 . meta iif . ether saddr . @nh,128,32 != @bind4 accept
    ether daddr set @nh,0,24 map @dmac
    ether saddr set @nh,0,24 map @smac
    @nh,24,8 set @nh,24,8 map @ttldec
    fwd to @nh,0,24 map @outif
  }}
}}
"""


def nft_elements(table: str, labels: list[int], *, ttl: bool) -> str:
    """The elements of ``labels`` (C2S, from the generator) for the nft evaluation. Keys are the label entry's first
    24 bits (label, TC 0, bottom of stack): nft 1.0.6 keys by the 20-bit label (``@nh,0,20``, compiled to a shift)
    never matched its elements here, so a label is only switched with TC 0 in this variant."""
    keys = [(label << 4) | 1 for label in labels]
    lines = [
        f"add element netdev {table} dmac {{ " + ", ".join(f"{k} : {SINK_MAC}" for k in keys) + " }",
        f"add element netdev {table} smac {{ " + ", ".join(f"{k} : {LB1_MAC}" for k in keys) + " }",
        f"add element netdev {table} outif {{ " + ", ".join(f'{k} : "lc1p0"' for k in keys) + " }",
        f"add element netdev {table} bind4 {{ "
        + ", ".join(f'{k} . "lc0p0" . {GEN_MAC} . 0x{socket.inet_aton(CLIENT_IP).hex()}' for k in keys)
        + " }",
    ]
    if ttl:
        lines.append(
            f"add element netdev {table} ttldec {{ " + ", ".join(f"{t} : {t - 1}" for t in range(2, 256)) + " }"
        )
    return "\n".join(lines) + "\n"


def nft(ns: str, script: str, commands: list[str] | None = None) -> None:
    command = ["ip", "netns", "exec", ns, NFT, "-f", "-"]
    if commands is not None:
        commands.append(" ".join(command) + "  # < ruleset")
    subprocess.run(command, input=script.encode(), check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def nft_table(bed: Testbed, labels_n: int, work: Path, commands: list[str]) -> Iterator[Path]:
    """The nftables alternative on the balancer's client port with ``labels_n`` labels; the trafgen configuration
    of frames carrying those labels. The table is deleted on the way out."""
    table = "mlbwo"
    labels = [17 + 2 * i for i in range(labels_n)]
    config = trafgen_config([labelled_frame(lb, SPORT0 + i) for i, lb in enumerate(labels)], work / "mpls.cfg")
    nft(bed.lb, NFT_RULESET.format(table=table) + nft_elements(table, labels, ttl=True), commands)
    try:
        yield config
    finally:
        nft(bed.lb, f"delete table netdev {table}\n")


def run_nft(bed: Testbed, labels_n: int, args: argparse.Namespace, work: Path, commands: list[str]) -> dict[str, Any]:
    from mplslb.drivers.afpacket import PacketPort

    with nft_table(bed, labels_n, work, commands) as config:
        port = PacketPort("lc0p0", netns=bed.lb, rcvbuf=1 << 20)  # what the daemon's socket would see
        try:
            port.stats()
            before = stats(bed.lb, "lc0p0")["rx_packets"]
            result: dict[str, Any] = blast(bed, config, args.seconds, args.warmup, commands)
            arrived = stats(bed.lb, "lc0p0")["rx_packets"] - before
            seen, _ = port.stats()  # frames the socket's filter took (queued, or dropped for want of room)
            result["share_seen_by_packet_socket"] = round(seen / max(1, arrived), 4)
        finally:
            port.close()
    return result


def daemon_name(offload: str, ring: bool) -> str:
    return f"{offload}{'' if ring else '-sockets'}"


def start_daemon(bed: Testbed, offload: str, work: Path, commands: list[str], *,
                 ring: bool = True) -> subprocess.Popen[bytes]:  # fmt: skip
    """The balancer daemon in the balancer's namespace, pinned on FORWARD_CPU; ``ring``: TPACKET rings and the
    block path, or plain packet sockets."""
    name = daemon_name(offload, ring)
    config = work / f"lb-{name}.toml"
    config.write_text(f"""offload = "{offload}"
ring = {str(ring).lower()}
[[ports]]
id = 0
interface = "lc0p0"
line_card = 0
role = "client"
mac = "{LB0_MAC}"

[[ports]]
id = 1
interface = "lc1p0"
line_card = 1
number = 0
role = "server"
mac = "{LB1_MAC}"

[[vip]]
address = "{VIP}"
tcp = [80]
udp = [53]

[[servers]]
name = "k"
address = "{SINK_IP}"
mac = "{SINK_MAC}"
port = 1

[control]
socket = "{work / f"lb-{name}.sock"}"
""")
    ready = work / f"lb-{name}.ready"
    ready.unlink(missing_ok=True)  # left by an earlier daemon of the same name
    command = [sys.executable, "-m", "mplslb", "balancer", "--config", str(config), "--netns", bed.lb,
               "--ready-file", str(ready)]  # fmt: skip
    commands.append(" ".join(command))
    log = open(work / f"lb-{name}.log", "wb")  # noqa: SIM115 - the child keeps it
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    process = subprocess.Popen(["taskset", "-c", str(FORWARD_CPU), *command], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)  # fmt: skip
    log.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            raise RuntimeError(f"the daemon did not start: {(work / f'lb-{name}.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return process


def open_sessions(bed: Testbed, n: int) -> list[int]:
    """``n`` UDP sessions opened through the running daemon by real first frames; their C2S labels, read off the
    labelled frames arriving at the sink."""
    from mplslb.drivers.afpacket import PacketPort
    from mplslb.wire.ethernet import ETH_P_IP, build_ethernet

    labels: dict[int, int] = {}
    with PacketPort("g0", netns=bed.gen) as gen, PacketPort("k0", netns=bed.sink, rcvbuf=1 << 22) as sink:
        header = build_ethernet(mac(LB0_MAC), mac(GEN_MAC), ETH_P_IP)
        for start in range(0, n, 64):
            for i in range(start, min(n, start + 64)):
                gen.send(header + udp_packet(SPORT0 + i, l2=14))
            deadline = time.monotonic() + WAIT
            while len(labels) < min(n, start + 64) and time.monotonic() < deadline:
                for frame in sink.recv_burst(256):
                    if frame[12:14] == b"\x88\x47" and len(frame) >= 42:
                        sport = int.from_bytes(frame[38:40], "big")
                        labels[sport - SPORT0] = int.from_bytes(frame[14:17], "big") >> 4
                time.sleep(0.001)
    if len(labels) != n:
        raise RuntimeError(f"only {len(labels)} of {n} sessions came through the daemon")
    return [labels[i] for i in range(n)]


def daemon_status(work: Path, name: str) -> dict[str, Any]:
    from mplslb.control.client import request

    time.sleep(1.1)  # the daemon refreshes its snapshot every second
    reply = request(str(work / f"lb-{name}.sock"), {"cmd": "status"})
    status: dict[str, Any] = reply.get("status", {})
    return status


@contextlib.contextmanager
def daemon_sessions(bed: Testbed, offload: str, n: int, work: Path, commands: list[str], *,
                    ring: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:  # fmt: skip
    """A running daemon with ``n`` UDP sessions open; the process and the trafgen configuration of their frames.
    The daemon is stopped (its process group, by id) on the way out."""
    process = start_daemon(bed, offload, work, commands, ring=ring)
    try:
        labels = open_sessions(bed, n)
        config = trafgen_config([labelled_frame(lb, SPORT0 + i) for i, lb in enumerate(labels)], work / "mpls.cfg")
        yield process, config
    finally:
        stop_group(process)


def run_daemon(bed: Testbed, offload: str, n: int, args: argparse.Namespace, work: Path,
               commands: list[str]) -> dict[str, Any]:  # fmt: skip
    with daemon_sessions(bed, offload, n, work, commands) as (_, config):
        result: dict[str, Any] = blast(bed, config, args.seconds, args.warmup, commands)
        status = daemon_status(work, daemon_name(offload, True))
        result["daemon_frames_in"] = status.get("frames", {}).get("in")
        if offload == "kernel":
            result["offload"] = status.get("offload")
    return result


# -- paced: equal offered loads, CPU per forwarded frame ------------------------------------------------------------
def steer(ns: str, ifname: str, cpu: int | tuple[int, ...] | None) -> None:
    """RPS: hand every frame ``ifname`` receives to ``cpu``'s backlog, or spread them by flow over the CPUs of a
    tuple (None or an empty tuple: back to the sender's CPU)."""
    mask = f"{sum(1 << c for c in ((cpu,) if isinstance(cpu, int) else cpu or ())):x}"
    path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"  # sysfs as the namespace sees it: ip netns exec
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {mask} > {path}"], check=True, timeout=WAIT)


def sink_drops(bed: Testbed, on: bool) -> None:
    """Drop everything at the sink's ingress (after its counters) so no path pays for the sink's own stack."""
    script = ("add table netdev mlbsink\nadd chain netdev mlbsink in { type filter hook ingress device \"k0\" "
              "priority 0; policy drop; }\n") if on else "delete table netdev mlbsink\n"  # fmt: skip
    nft(bed.sink, script)


#: ``r0 = verdict; exit`` (BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT).
def verdict_program(verdict: int) -> bytes:
    return struct.pack("<BBhi", 0xB7, 0, 0, verdict) + struct.pack("<BBhi", 0x95, 0, 0, 0)


@contextlib.contextmanager
def dropping(ns: str, ifname: str, hook: str = "tc") -> Iterator[None]:
    """Drop every frame ``ifname`` receives for as long as the block runs, the port up, with a two-instruction BPF
    program at its tc ingress hook (``hook="tc"``, tcx: after the backlog and the packet taps, nothing copied) or
    its generic XDP hook (``"xdp"``: generic XDP first makes room in front of each frame, a cost of its own). The
    generator then runs exactly as when a path forwards. The program's link is closed on the way out, which
    detaches it."""
    from pyroute2 import IPRoute

    from mplslb.drivers.netns import entered
    from mplslb.offload import bpf

    if hook == "xdp":
        prog = bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, verdict_program(bpf.XDP_DROP), license_text="GPL",
                             name="mlbwo_drop", expected_attach_type=bpf.BPF_XDP)  # fmt: skip
        attach, flags = bpf.BPF_XDP, bpf.XDP_FLAGS_SKB_MODE
    else:
        prog = bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, verdict_program(bpf.TC_ACT_SHOT), license_text="GPL",
                             name="mlbwo_drop", expected_attach_type=bpf.BPF_TCX_INGRESS)  # fmt: skip
        attach, flags = bpf.BPF_TCX_INGRESS, 0
    try:
        with entered(ns), IPRoute() as ipr:
            link = bpf.link_create(prog, ipr.link_lookup(ifname=ifname)[0], attach, flags)
    finally:
        os.close(prog)  # the link holds the program
    try:
        yield
    finally:
        os.close(link)


def placement(hook: str = "tc") -> dict[str, str]:
    """Where each part of a paced run runs, the same for every path."""
    return {
        "generator": f"trafgen pinned on CPU {GEN_CPU} (taskset); its transmit to g0 runs in its own system calls",
        "forwarding": f"CPU {FORWARD_CPU}: RPS steers lc0p0's receive there, so the kernel's IPv4 forwarding, the "
        f"nftables chain, generic XDP and the packet sockets' receive run in that CPU's softirq; the daemons are "
        f"pinned there (taskset)",
        "sink": f"CPU {FORWARD_CPU}: RPS steers k0's receive (the ingress drop after its counters) there",
        "baseline": f"generator_only: lc0p0 up, every frame dropped at its {hook} hook by a BPF program, on CPU "
        f"{FORWARD_CPU}, at the same rates",
        "daemon_none_rx_on_gen": f"the exception: lc0p0's receive steered to CPU {GEN_CPU} (with the generator), the "
        f"ring daemon alone on CPU {FORWARD_CPU}",
    }


def paced_rates(bed: Testbed, config: Path, rates: tuple[int, ...], args: argparse.Namespace,
                commands: list[str]) -> dict[str, Any]:  # fmt: skip
    """The same path at each paced rate: offered, forwarded, loss, busy share per CPU."""
    return {str(rate): blast(bed, config, args.seconds, args.warmup, commands, rate=rate) for rate in rates}


def port0_counts(work: Path, name: str) -> dict[str, int] | None:
    """What the daemon's client port's socket received and dropped so far (None: the daemon did not answer)."""
    from mplslb.control.client import ControlError

    try:
        counts: dict[str, int] = daemon_status(work, name).get("ports", {}).get("port0", {})
    except (ControlError, OSError):
        return None
    return counts


def paced_daemon(bed: Testbed, offload: str, ring: bool, n: int, rates: tuple[int, ...], args: argparse.Namespace,
                 work: Path, commands: list[str]) -> dict[str, Any]:  # fmt: skip
    """A daemon at each paced rate, with its own CPU share, where it is pinned, and what its client port's socket
    received and dropped for want of room (PACKET_STATISTICS, from the daemon's status) in each window."""
    name = daemon_name(offload, ring)
    out: dict[str, Any] = {}
    with daemon_sessions(bed, offload, n, work, commands, ring=ring) as (process, config):
        affinity = sorted(os.sched_getaffinity(process.pid))
        before = port0_counts(work, name)
        for rate in rates:
            figures = blast(bed, config, args.seconds, args.warmup, commands, rate=rate, watch={"daemon": process.pid})
            after = port0_counts(work, name)
            figures["daemon_cpus"] = affinity
            if before is not None and after is not None:
                figures["socket"] = {key: after.get(key, 0) - before.get(key, 0)
                                     for key in ("kernel_received", "kernel_dropped")}  # fmt: skip
            before = after
            out[str(rate)] = figures
    return out


def paced_path(bed: Testbed, obj: bytes, path: str, n: int, rates: tuple[int, ...], args: argparse.Namespace,
               work: Path, commands: list[str]) -> dict[str, Any]:  # fmt: skip
    if path == "kernel_ipv4":
        ip_config = trafgen_config([ipv4_frame(SPORT0 + i) for i in range(n)], work / "ip.cfg")
        return paced_rates(bed, ip_config, rates, args, commands)
    if path == "nft":
        with nft_table(bed, n, work, commands) as config:
            return paced_rates(bed, config, rates, args, commands)
    if path == "xdp_generic":
        with offload_alone(bed, obj, "generic", n, work) as (_, config):
            return paced_rates(bed, config, rates, args, commands)
    if path in ("daemon_none", "daemon_kernel", "daemon_sockets"):
        offload = "kernel" if path == "daemon_kernel" else "none"
        return paced_daemon(bed, offload, path != "daemon_sockets", n, rates, args, work, commands)
    if path == "daemon_none_rx_on_gen":
        steer(bed.lb, "lc0p0", GEN_CPU)
        try:
            return paced_daemon(bed, "none", True, n, rates, args, work, commands)
        finally:
            steer(bed.lb, "lc0p0", FORWARD_CPU)
    raise ValueError(f"no paced path {path!r}")


def cpu_per_frame(figures: dict[str, Any], base: dict[str, Any], forward_cpu: int = FORWARD_CPU) -> dict[str, Any]:
    """A paced window's loss and CPU per forwarded frame: ``cpu_us_per_frame``, the busy time of every CPU above
    the generator-only window at the same rate (``base``), per frame forwarded; ``forward_cpu_us_per_frame``, the
    forwarding CPU's whole busy time per frame forwarded (taking each frame off the backlog included, and whatever
    else ran there); the two parts that other work on the machine hardly touches: ``forward_softirq_us_per_frame``,
    the forwarding CPU's softirq time (tick-sampled), and ``daemon_us_per_frame``, the daemon's own run time, and
    their sum, ``path_us_per_frame`` (softirq work that interrupts the daemon may count in both)."""
    frames = figures["forwarded_pps"]
    busy = figures["cpu_busy"]
    above = sum(max(0.0, share - base["cpu_busy"].get(cpu, 0.0)) for cpu, share in busy.items())
    softirq = figures.get("cpu_softirq", {}).get(str(forward_cpu), 0.0)
    daemon = figures.get("process_cpu", {}).get("daemon")
    return {
        "loss": figures["run_loss"] if figures.get("run_loss") is not None else round(1 - figures["ratio"], 4),
        "cpu_us_per_frame": round(above * 1e6 / frames, 3) if frames else None,
        "forward_cpu_us_per_frame": round(busy.get(str(forward_cpu), 0.0) * 1e6 / frames, 3) if frames else None,
        "forward_softirq_us_per_frame": round(softirq * 1e6 / frames, 3) if frames else None,
        "daemon_us_per_frame": round(daemon * 1e6 / frames, 3) if frames and daemon is not None else None,
        "path_us_per_frame": round((softirq + (daemon or 0.0)) * 1e6 / frames, 3) if frames else None,
        "baseline_pacing_held": base.get("pacing_held"),
    }


def run_paced(bed: Testbed, obj: bytes, n: int, rates: tuple[int, ...], args: argparse.Namespace, work: Path,
              commands: list[str], paths: tuple[str, ...] = PACED_PATHS) -> dict[str, Any]:  # fmt: skip
    """Every path at the same paced offered loads with the same placement (:func:`placement`), and the generator
    with every frame dropped at the balancer's port (:func:`dropping`) as the baseline; per path and rate, offered,
    forwarded, loss and CPU per forwarded frame (:func:`cpu_per_frame`). A path that fails is reported with its
    error; the others still run."""
    out: dict[str, Any] = {"rates": list(rates), "gen_cpu": GEN_CPU, "forward_cpu": FORWARD_CPU,
                           "placement": placement(args.baseline_hook), "seconds": args.seconds,
                           "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip
    steer(bed.lb, "lc0p0", FORWARD_CPU)
    steer(bed.sink, "k0", FORWARD_CPU)
    sink_drops(bed, True)
    try:
        ip_config = trafgen_config([ipv4_frame(SPORT0 + i) for i in range(n)], work / "ip.cfg")
        with dropping(bed.lb, "lc0p0", args.baseline_hook):
            out["generator_only"] = paced_rates(bed, ip_config, rates, args, commands)
        for path in paths:
            try:
                out[path] = paced_path(bed, obj, path, n, rates, args, work, commands)
            except Exception as exc:  # one failed path is reported, the others still run
                out[path] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        sink_drops(bed, False)
        steer(bed.sink, "k0", None)
        steer(bed.lb, "lc0p0", None)
    out["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]  # other work on the machine counts as busy
    for path in paths:
        for rate, figures in out[path].items() if "error" not in out[path] else ():
            figures.update(cpu_per_frame(figures, out["generator_only"][rate]))
    return out


# -- install rates -------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_install(bed: Testbed, obj: bytes, sessions: int, commands: list[str]) -> dict[str, Any]:
    from mplslb.drivers.netns import entered
    from mplslb.offload.xdp import XdpOffload
    from mplslb.switching import WATCH_ALL

    figures: dict[str, Any] = {"sessions": sessions}
    balancer = lb_balancer()
    sw = balancer.switching
    with entered(bed.lb):
        offload = XdpOffload(sw, {0: "lc0p0", 1: "lc1p0"}, mode="generic", obj=obj)
        offload.open()
    try:
        kw = dict(out_port=1, next_hop=mac(SINK_MAC), in_port=0, peer=mac(GEN_MAC), peer_ip=b"\x0a\x01\x00\x02")

        def install(first: int, count: int, *, each: bool) -> None:
            for c2s in range(first, first + 2 * count, 2):
                sw.install(c2s, **kw)
                sw.install(c2s + 1, **kw)
                if each:
                    offload.sync()
            offload.sync()

        def withdraw(first: int, count: int) -> None:
            for c2s in range(first, first + 2 * count, 2):
                sw.withdraw(c2s)
                sw.withdraw(c2s + 1)
            offload.sync()

        base = 17
        t = timed(lambda: install(base, sessions, each=False))
        figures["batched_sessions_per_s"] = round(sessions / t)
        offload.poll()  # the first poll touches the bookkeeping arrays' pages
        figures["poll_ms"] = round(min(timed(offload.poll) for _ in range(3)) * 1000, 2)
        figures["poll_entries"] = offload.entries
        t = timed(lambda: withdraw(base, sessions))
        figures["batched_withdrawals_per_s"] = round(sessions / t)
        t = timed(lambda: install(base, sessions, each=True))
        figures["per_session_sync_sessions_per_s"] = round(sessions / t)
        withdraw(base, sessions)
        # Whole sessions through the balancer: UDP first frames, a sync after each 64-frame batch as the daemon does.
        from mplslb.wire.ethernet import ETH_P_IP, build_ethernet

        header = build_ethernet(mac(LB0_MAC), mac(GEN_MAC), ETH_P_IP)
        frames = [(0, header + udp_packet(30000 + i % 30000, src=f"10.1.{i // 30000}.2", l2=14))
                  for i in range(sessions)]  # fmt: skip
        baseline = lb_balancer()

        def balancer_alone() -> None:
            now = time.monotonic()
            for start in range(0, len(frames), 64):
                baseline.receive_batch(frames[start : start + 64], now)

        figures["balancer_udp_sessions_per_s_without_offload"] = round(sessions / timed(balancer_alone))
        balancer2 = lb_balancer()
        with entered(bed.lb):
            offload2 = XdpOffload(balancer2.switching, {0: "lc0p0", 1: "lc1p0"}, mode="generic", obj=obj)
        offload.close()
        with entered(bed.lb):
            offload2.open()
        try:

            def through_balancer() -> None:
                now = time.monotonic()
                for start in range(0, len(frames), 64):
                    balancer2.receive_batch(frames[start : start + 64], now)
                    offload2.sync()

            t = timed(through_balancer)
            figures["balancer_udp_sessions_per_s"] = round(sessions / t)
            figures["balancer_kernel_entries"] = offload2.entries  # C2S now; S2C wait for the first reply
            figures["balancer_pending"] = offload2.pending
            assert all(balancer2.switching.watch[lb] & WATCH_ALL for lb in range(18, 18 + 2 * 8, 2))
        finally:
            offload2.close()
    finally:
        offload.close()
    return figures


def run_nft_install(bed: Testbed, sessions: int, single: int, commands: list[str]) -> dict[str, Any]:
    table = "mlbwo"
    nft(bed.lb, NFT_RULESET.format(table=table) + nft_elements(table, [], ttl=True).splitlines()[-1] + "\n")
    try:
        labels = [17 + i for i in range(2 * sessions)]
        script = nft_elements(table, labels, ttl=False)
        commands.append(f"ip netns exec {bed.lb} {NFT} -f -  # < {2 * sessions} labels x 4 elements")
        t = timed(lambda: nft(bed.lb, script))
        figures = {"nft_batched_sessions_per_s": round(sessions / t)}
        base = 17 + 4 * sessions
        t = timed(lambda: [nft(bed.lb, nft_elements(table, [base + 2 * i, base + 2 * i + 1], ttl=False))
                           for i in range(single)])  # fmt: skip
        figures["nft_one_run_per_session_sessions_per_s"] = round(single / t)
        return figures
    finally:
        nft(bed.lb, f"delete table netdev {table}\n")


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON dict")
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer sessions (about 40 s)")
    parser.add_argument("--seconds", type=float, default=None, help="measurement window per mode (default 3, quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before each window (default 1, quick 0.5)")
    parser.add_argument("--sessions", type=int, default=None, help="sessions in the forwarding runs (default 1000)")
    parser.add_argument("--install-sessions", type=int, default=None, help="sessions in the install runs (10000)")
    parser.add_argument("--skip", action="append", default=[], help="a section to skip (may repeat): kernel_ipv4, "
                        "nft, xdp_generic, xdp_native, daemon_none, daemon_kernel, paced, install, or one paced path: "
                        "paced_kernel_ipv4, paced_nft, paced_xdp_generic, paced_daemon_none, paced_daemon_sockets, "
                        "paced_daemon_kernel, paced_daemon_none_rx_on_gen")  # fmt: skip
    parser.add_argument(
        "--baseline-hook",
        choices=("tc", "xdp"),
        default="tc",
        help="where the paced baseline drops each frame at the balancer's port (default tc)",
    )
    parser.add_argument(
        "--paced-rate",
        dest="paced_rates",
        type=int,
        action="append",
        default=[],
        help="a paced offered rate in frames/s (may repeat; default 50k, 100k, 200k)",
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.0)
    sessions = args.sessions or (200 if args.quick else 1000)
    install_sessions = args.install_sessions or (2000 if args.quick else 10000)
    missing = missing_requirements()
    if missing:
        print(json.dumps({"skipped": missing}) if args.json else f"skipped: {missing}")
        return 0
    from mplslb.offload.build import build_object

    try:
        from common import machine

        env: dict[str, Any] = machine()
    except ImportError:
        env = {}
    results: dict[str, Any] = {"bench": "wire_offload", "machine": env, "frame_bytes": FRAME_SIZE,
                               "sessions": sessions, "seconds": args.seconds}  # fmt: skip
    commands: list[str] = []
    started = time.monotonic()
    obj = build_object()
    bed = Testbed()
    with tempfile.TemporaryDirectory(prefix="mlbwo") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        try:
            bed.up()
            sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                ("kernel_ipv4", lambda: run_ipv4(bed, sessions, args, work, commands)),
                ("xdp_generic", lambda: run_xdp(bed, obj, "generic", sessions, args, work, commands)),
                ("xdp_native", lambda: run_xdp(bed, obj, "native", sessions, args, work, commands)),
                ("daemon_none", lambda: run_daemon(bed, "none", sessions, args, work, commands)),
                ("daemon_kernel", lambda: run_daemon(bed, "kernel", sessions, args, work, commands)),
            ]
            if shutil.which("nft") or os.path.exists(NFT):
                sections.insert(1, ("nft", lambda: run_nft(bed, sessions, args, work, commands)))
            for name, fn in sections:
                if name in args.skip:
                    continue
                try:
                    results[name] = fn()
                except Exception as exc:  # one failed section is reported, the others still run
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            reference = results.get("kernel_ipv4", {}).get("forwarded_pps")
            for figures in results.values():
                if isinstance(figures, dict) and reference and "forwarded_pps" in figures:
                    figures["vs_kernel_ipv4"] = round(figures["forwarded_pps"] / reference, 4)
            if "paced" not in args.skip:
                try:
                    rates = tuple(args.paced_rates) or (PACED_RATES_QUICK if args.quick else PACED_RATES)
                    paths = tuple(p for p in PACED_PATHS if f"paced_{p}" not in args.skip)
                    results["paced"] = run_paced(bed, obj, sessions, rates, args, work, commands, paths)
                except Exception as exc:
                    results["paced"] = {"error": f"{type(exc).__name__}: {exc}"}
            if "install" not in args.skip:
                try:
                    results["install"] = run_install(bed, obj, install_sessions, commands)
                    if "nft" not in args.skip and os.path.exists(NFT):
                        results["install"].update(run_nft_install(bed, install_sessions, 100 if args.quick else 300,
                                                                  commands))  # fmt: skip
                except Exception as exc:
                    results["install"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            bed.down()
    results["commands"] = list(dict.fromkeys(commands))
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
