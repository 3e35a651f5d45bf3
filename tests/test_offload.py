"""The kernel offload (mplslb.offload): the XDP program forwards exactly what the userspace fast path forwards, with
the same bytes, and leaves everything else to userspace; the map follows the table; the daemon's configuration key.

The program is compared with the userspace path two ways: on each frame with ``BPF_PROG_TEST_RUN`` (verdict and
bytes), and with real frames through veth pairs in throwaway namespaces (what leaves at the far end of each port,
byte for byte, and what the balancer's own packet socket still sees). Root and clang are needed for all but the
configuration tests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import select
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyroute2 import IPRoute, netns

from helpers import (
    ACK,
    DAEMON_TOML,
    FIN,
    PORT_MAC,
    PSH,
    RST,
    SERVERS,
    SYN,
    VIP,
    VIP6,
    Net,
    client_addr,
    client_mac,
    client_udp,
    ether,
    handshake,
    header_mutation,
    icmp4,
    icmp6,
    ipv4,
    ipv6,
    labelled,
    make_config,
    mutate,
    pack,
    recording,
    reused_label_pair,
    standard_balancer,
    standard_config,
    tcp,
    tcp_segment,
    udp_datagram,
)
from mplslb.analyzer import TRUNCATED_HOST
from mplslb.balancer import Balancer
from mplslb.config import BalancerConfig, ConfigError, Section, read_offload, read_offload_syn_rate
from mplslb.drivers.afpacket import PacketPort
from mplslb.drivers.loop import Loop
from mplslb.drivers.netns import entered
from mplslb.offload import bpf, driver, xdp
from mplslb.offload.bpf import xdp_state
from mplslb.offload.build import build_object
from mplslb.offload.driver import OffloadedBalancer
from mplslb.offload.xdp import BATCH_MIN, PROG_NAME, TICKET_MAPS, OffloadError, XdpOffload, syn_share
from mplslb.sessions import SessionState, Timeouts
from mplslb.switching import IPV6_PAYLOAD, WATCH_ALL, WATCH_TCP_END, FastEvent, switch_block, switch_frame
from mplslb.switching.layout import (
    ACK_KNOWN,
    FRAG_OFFSET_MASK,
    IP_AT,
    IPV4_FRAG_AT,
    IPV4_PLAIN,
    IPV4_PROTO,
    IPV6_NEXT_HEADER,
    KERNEL_ENTRY,
    LSE_AT,
    REQUEST_COPY,
)
from mplslb.wire.ip import (
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
)
from mplslb.wire.ipv4 import IP_MF
from mplslb.wire.ipv6 import EXTENSION_HEADERS
from mplslb.wire.mpls import pack_entry

WAIT = 10.0  # seconds any exchange may take, at most
_serial = itertools.count()
PORTS = (0, 1, 2, 3)  # the standard layout: 0 and 1 face the clients, 2 and 3 the servers

is_root = os.geteuid() == 0
has_clang = shutil.which("clang") is not None or bool(os.environ.get("MPLSLB_CLANG"))
F = TypeVar("F", bound=Callable[..., Any])


#: What a test of the program needs: root (bpf(2), namespaces, veth pairs) and clang (it is built from source).
KERNEL_MARKS = (
    pytest.mark.root,
    pytest.mark.skipif(not is_root, reason="needs root: bpf(2), namespaces, veth pairs"),
    pytest.mark.skipif(not has_clang, reason="needs clang to build the XDP program (make debs installs it)"),
)


def needs_kernel(test: F) -> F:
    for mark in KERNEL_MARKS:
        test = mark(test)
    return test


S1, S2 = SERVERS[0], SERVERS[1]

# Labels installed in both the kernel and the reference tables (label, install keywords).
A, B, C, D, E, W = 101, 102, 201, 203, 301, 401
INSTALLS: dict[int, dict[str, Any]] = {
    A: dict(out_port=2, next_hop=S1.mac, in_port=0, peer=client_mac(0), peer_ip=client_addr(0), watch=WATCH_TCP_END),
    B: dict(out_port=0, next_hop=client_mac(0), in_port=2, peer=S1.mac, peer_ip=VIP, watch=WATCH_TCP_END),
    C: dict(
        out_port=3, next_hop=S2.mac, in_port=1, peer=client_mac(1), peer_ip=client_addr(1, v6=True), watch=IPV6_PAYLOAD
    ),
    D: dict(
        out_port=3,
        next_hop=S2.mac,
        in_port=1,
        peer=client_mac(1),
        peer_ip=client_addr(1, v6=True),
        watch=WATCH_TCP_END | IPV6_PAYLOAD,
    ),
    E: dict(out_port=2, next_hop=S1.mac, in_port=0, peer=client_mac(2)),
    W: dict(out_port=2, next_hop=S1.mac, in_port=0, peer=client_mac(0), peer_ip=client_addr(0), watch=WATCH_ALL),
}


# Labels with a session's flow binding, as the balancer installs them: a C2S label (client 0 port 40000 to the VIP
# port 80) and S2C labels (VIP port 80 to client 0 port 40000; over IPv6, VIP port 53 to client 1 port 40001).
F, G, H = 501, 502, 504
FLOW_INSTALLS: dict[int, dict[str, Any]] = {
    F: INSTALLS[A] | dict(dst_ip=VIP, ports=(40000, 80)),
    G: INSTALLS[B] | dict(dst_ip=client_addr(0), ports=(80, 40000)),
    H: dict(
        out_port=1,
        next_hop=client_mac(1),
        in_port=3,
        peer=S2.mac,
        peer_ip=VIP6,
        watch=IPV6_PAYLOAD,
        dst_ip=client_addr(1, v6=True),
        ports=(53, 40001),
    ),
}
INSTALLS.update(FLOW_INSTALLS)


def install_all(balancer: Balancer) -> None:
    for label, kwargs in INSTALLS.items():
        balancer.switching.install(label, **kwargs)


def v4_tcp(flags: int, payload: bytes = b"", *, src: bytes | None = None, options: bytes = b"") -> bytes:
    s = src or client_addr(0)
    return ipv4(s, VIP, IPPROTO_TCP, tcp_segment(s, VIP, 40000, 80, flags, payload), options=options)


def v6_packet(proto: int, flags: int = ACK, *, src: bytes | None = None) -> bytes:
    s = src or client_addr(1, v6=True)
    body = (
        tcp_segment(s, VIP6, 40001, 80, flags, b"GET")
        if proto == IPPROTO_TCP
        else udp_datagram(s, VIP6, 40001, 53, b"query")
    )
    return ipv6(s, VIP6, proto, body)


def v6_ext(flags: int) -> bytes:
    """TCP behind a destination options header: the fast paths cannot see the flags and hand the frame up."""
    s = client_addr(1, v6=True)
    return ipv6(s, VIP6, 60, tcp_segment(s, VIP6, 40001, 80, flags, b"GET"), ext=b"\x06\x00" + bytes(6))


def label_of(frame: bytes) -> int:
    return int(struct.unpack_from("!I", frame, 18 if frame[12:14] == b"\x81\x00" else 14)[0] >> 12)


def from_client(label: int, packet: bytes, *, port: int = 0, mac: bytes | None = None, **kw: Any) -> bytes:
    return labelled(PORT_MAC[port], mac or client_mac(0), label, packet, **kw)


#: (name, ingress port, frame, what the kernel does: "redirect" or "pass", userspace forwards it too when passed)
CASES: list[tuple[str, int, bytes, str, bool]] = [
    ("tcp4", 0, from_client(A, v4_tcp(ACK | PSH, b"GET / HTTP/1.1\r\n\r\n")), "redirect", True),
    ("tcp4 syn", 0, from_client(A, v4_tcp(SYN)), "redirect", True),
    ("ttl 2", 0, from_client(A, v4_tcp(ACK), ttl=2), "redirect", True),
    ("ttl 1", 0, from_client(A, v4_tcp(ACK), ttl=1), "pass", False),
    ("ttl 0", 0, from_client(A, v4_tcp(ACK), ttl=0), "pass", False),
    ("fin", 0, from_client(A, v4_tcp(FIN | ACK)), "pass", True),
    ("rst", 0, from_client(A, v4_tcp(RST)), "pass", True),
    ("options ack", 0, from_client(A, v4_tcp(ACK, options=b"\x01\x01\x01\x00")), "redirect", True),
    ("options fin", 0, from_client(A, v4_tcp(FIN, options=b"\x01\x01\x01\x00")), "pass", True),
    ("wrong mac", 0, from_client(A, v4_tcp(ACK), mac=client_mac(5)), "pass", False),
    ("wrong port", 1, from_client(A, v4_tcp(ACK), port=1), "pass", False),
    ("wrong ip", 0, from_client(A, v4_tcp(ACK, src=client_addr(7))), "pass", False),
    ("not bottom", 0, from_client(A, v4_tcp(ACK), s=False, below=[pack_entry(77, 0, True, 64)]), "pass", False),
    ("vlan", 0, from_client(A, v4_tcp(ACK, b"x"), vlans=[5]), "redirect", True),
    ("unknown", 0, from_client(999, v4_tcp(ACK)), "pass", False),
    ("reserved", 0, from_client(3, v4_tcp(ACK)), "pass", False),
    (
        "server reply",
        2,
        labelled(
            PORT_MAC[2],
            S1.mac,
            B,
            ipv4(
                VIP,
                client_addr(0),
                IPPROTO_TCP,
                tcp_segment(VIP, client_addr(0), 80, 40000, ACK, b"HTTP/1.1 200 OK\r\n"),
            ),
        ),
        "redirect",
        True,
    ),
    ("udp6", 1, from_client(C, v6_packet(IPPROTO_UDP), port=1, mac=client_mac(1)), "redirect", True),
    (
        "udp6 wrong ip",
        1,
        from_client(C, v6_packet(IPPROTO_UDP, src=client_addr(9, v6=True)), port=1, mac=client_mac(1)),
        "pass",
        False,
    ),
    ("tcp6", 1, from_client(D, v6_packet(IPPROTO_TCP), port=1, mac=client_mac(1)), "redirect", True),
    ("tcp6 fin", 1, from_client(D, v6_packet(IPPROTO_TCP, FIN | ACK), port=1, mac=client_mac(1)), "pass", True),
    ("tcp6 ext ack", 1, from_client(D, v6_ext(ACK), port=1, mac=client_mac(1)), "pass", True),
    ("tcp6 ext fin", 1, from_client(D, v6_ext(FIN | ACK), port=1, mac=client_mac(1)), "pass", True),
    ("no ip binding", 0, from_client(E, v4_tcp(ACK, src=client_addr(8)), mac=client_mac(2)), "redirect", True),
    ("header only", 0, from_client(E, b"", mac=client_mac(2)), "redirect", True),
    ("header only, ip bound", 0, from_client(A, b""), "pass", False),
    ("watched", 0, from_client(W, v4_tcp(ACK)), "pass", True),
    ("unlabelled", 0, ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN)), "pass", True),
    ("truncated", 0, from_client(A, b"")[:16], "pass", False),
]


def from_server(label: int, packet: bytes, *, port: int = 2, mac: bytes = S1.mac) -> bytes:
    return labelled(PORT_MAC[port], mac, label, packet)


def to_client(dst: bytes, dport: int, *, proto: int = IPPROTO_TCP, **kw: Any) -> bytes:
    """From the VIP (port 80) to ``dst``:``dport``, IPv4."""
    if proto == IPPROTO_TCP:
        return ipv4(VIP, dst, proto, tcp_segment(VIP, dst, 80, dport, ACK, b"answer"), **kw)
    return ipv4(VIP, dst, proto, udp_datagram(VIP, dst, 80, dport, b"answer"), **kw)


def to_client6(dst: bytes, dport: int, *, ext: bytes = b"", first: int = IPPROTO_UDP) -> bytes:
    return ipv6(VIP6, dst, first, udp_datagram(VIP6, dst, 53, dport, b"answer"), ext=ext)


C0, C1_6, C3 = client_addr(0), client_addr(1, v6=True), client_addr(3)
QUOTED = ipv4(C0, VIP, IPPROTO_TCP, tcp_segment(C0, VIP, 40000, 80, ACK))[:28]
DSTOPTS_UDP = bytes([IPPROTO_UDP, 0]) + bytes(6)
LATER_FRAGMENT_UDP = bytes([IPPROTO_UDP, 0]) + struct.pack("!HI", 100 << 3, 7)
#: (name, ingress port, frame, the kernel's verdict, the one-frame path's drop reason or None when it forwards)
FLOW_CASES: list[tuple[str, int, bytes, str, str | None]] = [
    ("c2s", 0, from_client(F, v4_tcp(ACK)), "redirect", None),
    (
        "c2s other source port",
        0,
        from_client(F, ipv4(C0, VIP, IPPROTO_TCP, tcp_segment(C0, VIP, 40001, 80, ACK))),
        "pass",
        "label_wrong_flow",
    ),
    ("c2s other destination port", 0,
     from_client(F, ipv4(C0, VIP, IPPROTO_TCP, tcp_segment(C0, VIP, 40000, 81, ACK))), "pass", "label_wrong_flow"),
    ("c2s other destination", 0,
     from_client(F, ipv4(C0, C3, IPPROTO_TCP, tcp_segment(C0, C3, 40000, 80, ACK))), "pass", "label_wrong_flow"),
    ("c2s udp, same ports", 0, from_client(F, ipv4(C0, VIP, IPPROTO_UDP, udp_datagram(C0, VIP, 40000, 80))),
     "redirect", None),
    ("s2c", 2, from_server(G, to_client(C0, 40000)), "redirect", None),
    ("s2c other client", 2, from_server(G, to_client(C3, 40000)), "pass", "label_wrong_flow"),
    ("s2c other port", 2, from_server(G, to_client(C0, 40002)), "pass", "label_wrong_flow"),
    ("s2c udp, same ports", 2, from_server(G, to_client(C0, 40000, proto=IPPROTO_UDP)), "redirect", None),
    ("s2c other source port", 2, from_server(G, ipv4(VIP, C0, IPPROTO_TCP, tcp_segment(VIP, C0, 81, 40000, ACK))),
     "pass", "label_wrong_flow"),
    ("s2c ip options", 2, from_server(G, to_client(C0, 40000, options=b"\x01\x01\x01\x00")), "redirect", None),
    ("s2c ip options, other port", 2, from_server(G, to_client(C0, 40002, options=b"\x01\x01\x01\x00")), "pass",
     "label_wrong_flow"),
    ("s2c icmp error", 2, from_server(G, ipv4(VIP, C0, IPPROTO_ICMP, icmp4(3, 4, 1400, QUOTED))), "redirect", None),
    ("s2c icmp error, other client", 2, from_server(G, ipv4(VIP, C3, IPPROTO_ICMP, icmp4(3, 4, 1400, QUOTED))),
     "pass", "label_wrong_flow"),
    ("s2c later fragment", 2, from_server(G, ipv4(VIP, C0, IPPROTO_TCP, b"\x10" * 24, flags=0, frag_offset=64)),
     "redirect", None),
    ("s2c later fragment, other client", 2,
     from_server(G, ipv4(VIP, C3, IPPROTO_TCP, b"\x10" * 24, flags=0, frag_offset=64)), "pass",
     "label_wrong_flow"),
    ("s2c first fragment, other port", 2, from_server(G, to_client(C0, 40002, flags=IP_MF)), "pass",
     "label_wrong_flow"),
    ("s2c cut in the port", 2, from_server(G, to_client(C0, 40000)[:23]), "pass", "label_wrong_flow"),
    ("s2c ip header cut", 2, from_server(G, to_client(C0, 40000)[:19]), "pass", "label_wrong_flow"),
    ("s2c header only", 2, from_server(G, b""), "pass", "label_wrong_ingress"),  # no IP source
    ("s2c6", 3, from_server(H, to_client6(C1_6, 40001), port=3, mac=S2.mac), "redirect", None),
    ("s2c6 other client", 3, from_server(H, to_client6(client_addr(5, v6=True), 40001), port=3, mac=S2.mac), "pass",
     "label_wrong_flow"),
    ("s2c6 other port", 3, from_server(H, to_client6(C1_6, 40003), port=3, mac=S2.mac), "pass",
     "label_wrong_flow"),
    ("s2c6 icmp6 error", 3,
     from_server(H, ipv6(VIP6, C1_6, IPPROTO_ICMPV6, icmp6(1, 4, 0, bytes(48))), port=3, mac=S2.mac), "redirect", None),
    ("s2c6 extension header", 3,
     from_server(H, to_client6(C1_6, 40001, ext=DSTOPTS_UDP, first=IPPROTO_DSTOPTS), port=3, mac=S2.mac), "pass",
     None),
    ("s2c6 extension header, other port", 3,
     from_server(H, to_client6(C1_6, 40003, ext=DSTOPTS_UDP, first=IPPROTO_DSTOPTS), port=3, mac=S2.mac), "pass",
     "label_wrong_flow"),
    ("s2c6 later fragment", 3,
     from_server(H, to_client6(C1_6, 40003, ext=LATER_FRAGMENT_UDP, first=IPPROTO_FRAGMENT), port=3, mac=S2.mac),
     "pass", None),
    ("s2c6 cut extension header", 3,
     from_server(H, to_client6(C1_6, 40001, ext=b"\x11\x05" + bytes(6), first=IPPROTO_HOPOPTS), port=3, mac=S2.mac),
     "pass", "label_wrong_flow"),
    ("s2c6 header cut", 3, from_server(H, to_client6(C1_6, 40001)[:39], port=3, mac=S2.mac), "pass",
     "label_wrong_flow"),
]  # fmt: skip


def test_offload_key_is_validated() -> None:
    assert read_offload(Section("lb.toml", "", {})) == "none"
    assert read_offload(Section("lb.toml", "", {"offload": "kernel"})) == "kernel"
    for bad in ("xdp", 1, True):
        with pytest.raises(ConfigError) as info:
            read_offload(Section("lb.toml", "", {"offload": bad}))
        assert info.value.key == "offload"


def test_offload_syn_rate_is_validated() -> None:
    assert read_offload_syn_rate(Section("lb.toml", "", {}), "kernel") == 0
    assert read_offload_syn_rate(Section("lb.toml", "", {"offload_syn_rate": 5000}), "kernel") == 5000
    for bad, offload, why in (
        (-1, "kernel", ">= 0"),
        (1.5, "kernel", "expected"),
        (True, "kernel", "boolean"),
        (10**10, "kernel", "<="),
        (100, "none", "needs offload"),
    ):
        with pytest.raises(ConfigError, match=why) as info:
            read_offload_syn_rate(Section("lb.toml", "", {"offload_syn_rate": bad}), offload)
        assert info.value.key == "offload_syn_rate" and "lb.toml" in str(info.value)


def test_daemon_config_reads_offload(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config

    body = DAEMON_TOML
    path = tmp_path / "lb.toml"
    path.write_text(body)
    assert load_daemon_config(path).offload == "none"
    path.write_text('offload = "kernel"\n' + body)
    assert load_daemon_config(path).offload == "kernel"
    assert load_daemon_config(path).offload_syn_rate == 0
    path.write_text('offload = "kernel"\noffload_syn_rate = 20000\n' + body)
    assert load_daemon_config(path).offload_syn_rate == 20000
    path.write_text("offload_syn_rate = 20000\n" + body)
    with pytest.raises(ConfigError, match="offload_syn_rate"):
        load_daemon_config(path)
    path.write_text('offload = "fast"\n' + body)
    with pytest.raises(ConfigError, match="offload"):
        load_daemon_config(path)


@pytest.mark.skipif(not has_clang, reason="needs clang")
def test_object_builds_once_and_names_its_map(tmp_path: Path) -> None:
    first = build_object(directory=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("mplslb_xdp-*.o")]
    assert build_object(directory=tmp_path) == first
    prog = bpf.read_elf_program(first, "xdp")
    assert prog.map_refs and {symbol for _, symbol in prog.map_refs} == {
        "labels",
        "syn_buckets",
        "requests",
        *TICKET_MAPS,
    }
    assert "GPL" in prog.license


# -- in throwaway namespaces ---------------------------------------------------------------------------------------
def _wait_up(ipr: IPRoute, names: list[str]) -> None:
    """Until linkwatch has run a device keeps the noop qdisc, which drops every frame sent while reporting success."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        links = [ipr.get_links(ipr.link_lookup(ifname=n)[0])[0] for n in names]
        if all(link.get("IFLA_OPERSTATE") == "UP" and link.get("IFLA_QDISC") != "noop" for link in links):
            return
        time.sleep(0.01)
    raise AssertionError(f"links {names} did not come up within {WAIT} s")


def _quiet(name: str) -> None:
    with entered(name):
        for conf in ("all", "default"):
            Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")


@pytest.fixture
def topo() -> Iterator[tuple[str, str]]:
    """Namespace ``lb`` with interfaces p0..p3 (the balancer's ports, with the standard layout's MACs), each a veth
    whose peer e0..e3 is in namespace ``peer``. Yields (lb, peer)."""
    with veth_namespaces() as names:
        yield names


@contextlib.contextmanager
def veth_namespaces() -> Iterator[tuple[str, str]]:
    """The namespaces of :func:`topo`, for tests that set them up themselves; removed on the way out."""
    tag = f"mlbo{os.getpid() % 100000}x{next(_serial)}"
    lb, peer = f"{tag}l", f"{tag}e"
    created: list[str] = []
    try:
        for name in (lb, peer):
            netns.create(name)
            created.append(name)
            _quiet(name)
        with entered(lb), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": f"e{i}", "net_ns_fd": peer})
                ipr.link(
                    "set",
                    index=ipr.link_lookup(ifname=f"p{i}")[0],
                    address=":".join(f"{b:02x}" for b in PORT_MAC[i]),
                    state="up",
                )
        with entered(peer), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("set", index=ipr.link_lookup(ifname=f"e{i}")[0], state="up")
            _wait_up(ipr, [f"e{i}" for i in PORTS])
        with entered(lb), IPRoute() as ipr:
            _wait_up(ipr, [f"p{i}" for i in PORTS])
        yield lb, peer
    finally:
        for name in reversed(created):
            if name in netns.listnetns():
                netns.remove(name)


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if not has_clang:
        pytest.skip("needs clang")
    return build_object(directory=tmp_path_factory.mktemp("xdp"))


def offload_in(lb: str, balancer: Balancer, obj: bytes, **kw: Any) -> XdpOffload:
    with entered(lb):
        offload = XdpOffload(balancer.switching, {i: f"p{i}" for i in PORTS}, obj=obj, **kw)
        offload.open()
    return offload


@needs_kernel
@pytest.mark.parametrize("mode", ["generic", "native"])
def test_program_agrees_with_userspace_frame_by_frame(topo: tuple[str, str], obj: bytes, mode: str) -> None:
    """Each case through the program (BPF_PROG_TEST_RUN) and through the one-frame and batch userspace paths: the
    program redirects exactly the frames userspace forwards (minus FIN/RST and watched labels), byte for byte, to
    the same port, and leaves every other frame untouched."""
    lb, _ = topo
    kernel, one, batch = standard_balancer(), standard_balancer(), standard_balancer()
    for b in (kernel, one, batch):
        install_all(b)
    offload = offload_in(lb, kernel, obj, mode=mode)
    try:
        assert set(offload.attached.values()) == {mode}
        assert offload.lookup(W) is None and offload.pending == 1  # watched: stays in userspace
        one_out: list[tuple[int, bytes]] = []
        redirected: dict[int, int] = {}
        with entered(lb):
            for name, port, frame, verdict, userspace_forwards in CASES:
                out = one.receive(port, frame, 1.0)
                one_out += out
                run = offload.run(frame, port)
                if verdict == "redirect":
                    assert run.retval == bpf.XDP_REDIRECT, name
                    assert len(out) == 1, name
                    out_port, sent = out[0]
                    assert run.data == sent, name
                    label = label_of(frame)
                    entry = offload.lookup(label)
                    assert entry is not None and entry[0] == offload.ifindex[out_port], name
                    redirected[label] = redirected.get(label, 0) + 1
                else:
                    assert run.retval == bpf.XDP_PASS, name
                    assert run.data == frame, name
                    assert bool(out) == userspace_forwards, name
        assert batch.receive_batch([(port, frame) for _, port, frame, _, _ in CASES], 1.0) == one_out
        assert offload.poll() == len(redirected)
        for label, count in redirected.items():
            assert kernel.switching.packets[label] == count
            assert kernel.switching.last_seen[label] > 0.0
        assert offload.stats()["kernel_packets"] == sum(redirected.values())
    finally:
        offload.close()


def _drain(port: PacketPort, until: float, want: int = 1 << 30) -> list[bytes]:
    got: list[bytes] = []
    while time.monotonic() < until and len(got) < want:
        select.select([port], [], [], 0.02)
        got += port.recv_burst()
    return got


@needs_kernel
def test_kernel_forwards_on_the_wire_what_userspace_forwards(topo: tuple[str, str], obj: bytes) -> None:
    """Real frames into p0/p1/p2: what comes out at e0..e3 is byte for byte what the userspace path sends on the
    same ports; the balancer's own packet sockets only see the frames the kernel left to userspace; a withdrawn
    label is no longer forwarded; the kernel's counters reach the table."""
    lb, peer = topo
    kernel, reference = standard_balancer(), standard_balancer()
    install_all(kernel)
    install_all(reference)
    offload = offload_in(lb, kernel, obj)
    senders = {i: PacketPort(f"e{i}", netns=peer) for i in PORTS}
    captures = {i: PacketPort(f"e{i}", netns=peer) for i in PORTS}
    daemon_side = {i: PacketPort(f"p{i}", netns=lb) for i in PORTS}
    try:
        assert offload.attached == {f"p{i}": "generic" for i in PORTS}  # veth: generic, see mplslb.offload.xdp
        for port in captures.values():
            _drain(port, time.monotonic() + 0.2)  # anything the kernel sent while links came up
        for port in daemon_side.values():
            _drain(port, time.monotonic() + 0.05)
        expected: dict[int, list[bytes]] = {i: [] for i in PORTS}
        passed: dict[int, list[bytes]] = {i: [] for i in PORTS}
        for _, port, frame, verdict, _ in CASES:
            if verdict == "redirect":
                ((out_port, sent),) = reference.receive(port, frame, 1.0)
                expected[out_port].append(sent)
            else:
                passed[port].append(frame)
            senders[port].send(frame)
        deadline = time.monotonic() + WAIT
        for i in PORTS:
            got = _drain(captures[i], deadline, len(expected[i]))
            assert got == expected[i], f"e{i}"
        for i in PORTS:
            seen = _drain(daemon_side[i], deadline, len(passed[i]))
            assert seen == passed[i], f"p{i}"
        assert sum(map(len, expected.values())) == sum(v == "redirect" for _, _, _, v, _ in CASES) >= 10
        # Nothing more trickles in: every frame went to exactly one place.
        quiet = time.monotonic() + 0.3
        assert all(_drain(p, quiet) == [] for p in (*captures.values(), *daemon_side.values()))

        offload.poll()
        forwarded_a = sum(1 for _, _, f, v, _ in CASES if v == "redirect" and label_of(f) == A)
        assert kernel.switching.packets[A] == forwarded_a

        # Withdrawn: the next frame of A goes up to userspace (which drops it as label_unknown).
        kernel.switching.withdraw(A)
        assert offload.sync() == 1 and offload.lookup(A) is None
        frame = from_client(A, v4_tcp(ACK))
        senders[0].send(frame)
        assert _drain(daemon_side[0], time.monotonic() + WAIT, 1) == [frame]
        assert _drain(captures[2], time.monotonic() + 0.3) == []
    finally:
        for port in (*senders.values(), *captures.values(), *daemon_side.values()):
            port.close()
        offload.close()


@needs_kernel
def test_map_follows_the_table(topo: tuple[str, str], obj: bytes) -> None:
    """Installs, withdrawals, reinstalls and WATCH_ALL clearing reach the map; close leaves nothing attached."""
    lb, _ = topo
    balancer = standard_balancer()
    sw = balancer.switching
    sw.install(A, **INSTALLS[A])  # installed before the offload opens: mirrored at open
    offload = offload_in(lb, balancer, obj)
    try:
        assert offload.lookup(A) is not None and offload.entries == 1
        sw.install(W, **INSTALLS[W])
        sw.install(B, **INSTALLS[B])
        assert offload.sync() == 1
        assert offload.lookup(W) is None and offload.lookup(B) is not None and offload.pending == 1
        sw.set_watch(W, sw.watch[W] & ~WATCH_ALL)  # the balancer is done timing the server
        assert offload.sync() == 1 and offload.lookup(W) is not None and offload.pending == 0
        entry = offload.lookup(B)
        assert entry is not None
        assert entry[2] == client_mac(0) + PORT_MAC[0] and entry[3] == S1.mac and entry[6][:4] == VIP
        # Many at once (the batched path), then all withdrawn.
        labels = range(1001, 1001 + 2 * 300, 2)
        for label in labels:
            sw.install(label, **INSTALLS[A])
        assert offload.sync() == len(labels) and offload.entries == 3 + len(labels)
        for label in labels:
            sw.withdraw(label)
        sw.withdraw(B)
        sw.install(B, **INSTALLS[B] | {"peer": client_mac(4)})  # reused for another session in the same drain
        assert offload.sync() == len(labels) + 1
        assert offload.entries == 3
        entry = offload.lookup(B)
        assert entry is not None and entry[3] == client_mac(4)
        assert all(xdp_state_in(lb, ifindex)[1] for ifindex in offload.ifindex.values())
    finally:
        offload.close()
    assert sw.mirrors == []  # closed: no longer told of changes
    assert all(xdp_state_in(lb, ifindex)[1] == 0 for ifindex in offload.ifindex.values())


@needs_kernel
def test_counters_survive_an_entry_rewritten_or_taken_back_between_polls(topo: tuple[str, str], obj: bytes) -> None:
    """A label's entry rewritten (its next hop moved) or taken back to userspace (watched again) between two
    polls: what the kernel forwarded on the old entry still reaches the table, once."""
    lb, _ = topo
    balancer = standard_balancer()
    sw = balancer.switching
    sw.install(A, **INSTALLS[A])
    offload = offload_in(lb, balancer, obj)
    frame = from_client(A, v4_tcp(ACK, b"x"))
    try:
        with entered(lb):
            assert [offload.run(frame, 0).retval for _ in range(3)] == [bpf.XDP_REDIRECT] * 3
            sw.repoint(A, next_hop=S2.mac)
            assert offload.sync() == 1 and offload.lookup(A) is not None
            assert [offload.run(frame, 0).retval for _ in range(2)] == [bpf.XDP_REDIRECT] * 2
            sw.set_watch(A, sw.watch[A] | WATCH_ALL)
            assert offload.sync() == 1 and offload.lookup(A) is None
        assert sw.packets[A] == 5 and sw.bytes[A] == 5 * len(frame)
        offload.poll()
        offload.poll()
        assert sw.packets[A] == 5  # folded once
    finally:
        offload.close()


@needs_kernel
def test_a_poll_reads_by_key_what_a_walk_of_the_map_reads(
    topo: tuple[str, str], obj: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the table holds few labels a poll looks up their entries one by one instead of walking the map: it
    reads the walk's entries of the labels in the table (a label in the map but no longer in the table, withdrawn
    and not yet synced, is left out, and a watched one is in neither), and the table's counters come out the
    same."""
    lb, _ = topo
    frames = [(A, from_client(A, v4_tcp(ACK, b"x")))] * 3 + [(E, from_client(E, v4_tcp(ACK), mac=client_mac(2)))] * 2
    counted: dict[bool, list[tuple[int, int]]] = {}
    for by_key in (True, False):
        monkeypatch.setattr(xdp, "READ_BY_KEY_MAX", 64 if by_key else -1)
        balancer = standard_balancer()
        sw = balancer.switching
        install_all(balancer)
        offload = offload_in(lb, balancer, obj)
        try:
            with entered(lb):
                assert [offload.run(frame, 0).retval for _, frame in frames] == [bpf.XDP_REDIRECT] * len(frames)
            sw.withdraw(F)  # still in the map until the next sync
            keys, values, count = offload._read_map()
            walked, all_values, all_count = offload._map.lookup_batch()  # type: ignore[union-attr]
            in_table = {
                label: all_values[i * KERNEL_ENTRY.size : (i + 1) * KERNEL_ENTRY.size]
                for i, label in enumerate(struct.unpack(f"={all_count}I", walked))
                if sw.valid[label]
            }
            read = {
                label: values[i * KERNEL_ENTRY.size : (i + 1) * KERNEL_ENTRY.size]
                for i, label in enumerate(struct.unpack(f"={count}I", keys))
            }
            assert read == in_table if by_key else count == all_count
            assert F in set(struct.unpack(f"={all_count}I", walked)) and W not in read and A in read
            offload.poll()
            counted[by_key] = [sw.traffic(label) for label in INSTALLS]
        finally:
            offload.close()
    assert counted[True] == counted[False]
    assert counted[True][list(INSTALLS).index(A)] == (3, 3 * len(frames[0][1]))


@needs_kernel
def test_a_label_reused_before_the_next_sync_starts_with_no_ack_in_the_kernel(
    topo: tuple[str, str], obj: bytes
) -> None:
    """A label withdrawn and installed again for another session before the next sync (its session ended and the
    label went to the next one in the same batch): the kernel's entry is the ended session's, so neither its
    acknowledgment number nor its counters are folded into the new session's, in the table or in the rewritten
    entry; until the sync the table's own number (none) judges the new session's RSTs and FINs."""
    lb, _ = topo
    balancer = standard_balancer()
    sw = balancer.switching
    sw.install(A, **INSTALLS[A])
    offload = offload_in(lb, balancer, obj)
    try:
        with entered(lb):
            c0 = client_addr(0)
            frame = from_client(A, ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, 40000, 80, ACK, b"x", ack=777)))
            assert [offload.run(frame, 0).retval for _ in range(2)] == [bpf.XDP_REDIRECT] * 2
        assert offload.ack(A) == sw.last_ack(A) == ACK_KNOWN | 777
        sw.withdraw(A)
        sw.install(A, **INSTALLS[A] | {"peer": client_mac(4)})
        assert sw.last_ack(A) == 0 and sw.in_window(A, 12345, 0)  # nothing to judge the new session by yet
        assert offload.sync() == 1
        entry = offload.lookup(A)
        assert entry is not None and entry[3] == client_mac(4)
        assert offload.ack(A) == 0 and sw.last_ack(A) == 0
        assert sw.packets[A] == 0 and sw.bytes[A] == 0  # the ended session's frames are not the new one's
        offload.poll()
        assert sw.packets[A] == 0 and sw.acks[A] == 0
    finally:
        offload.close()


def xdp_state_in(ns: str, ifindex: int) -> tuple[str, int]:
    with entered(ns):
        return xdp_state(ifindex)


@needs_kernel
def test_ports_without_xdp_keep_their_labels_in_userspace(topo: tuple[str, str], obj: bytes) -> None:
    lb, _ = topo
    balancer = standard_balancer()
    with entered(lb):
        offload = XdpOffload(balancer.switching, {0: "p0", 2: "p2"}, obj=obj)  # ports 1 and 3: say, MPLS-in-UDP
        offload.open()
    try:
        balancer.switching.install(A, **INSTALLS[A])
        balancer.switching.install(C, **INSTALLS[C])  # port 1 -> port 3
        offload.sync()
        assert offload.lookup(A) is not None and offload.lookup(C) is None
    finally:
        offload.close()


def _trivial_xdp(name: str) -> int:
    """An XDP program that passes everything: r0 = XDP_PASS; exit."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, bpf.XDP_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    return bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, insns, license_text="GPL", name=name)


def _netlink_attach(ifname: str, fd: int) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, xdp={"attrs": [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", bpf.XDP_FLAGS_SKB_MODE]]})


@needs_kernel
def test_a_load_the_kernel_answers_with_eagain_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier answers EAGAIN when a signal comes while it runs (a profiler's or debugger's stop): the load is
    tried again, as libbpf does, and any other refusal, or EAGAIN every time, is an error at once."""
    real = bpf.bpf
    calls: list[int] = []
    fail = {"errno": errno.EAGAIN, "times": bpf.PROG_LOAD_ATTEMPTS - 1}

    def flaky(cmd: int, attr: Any, what: str) -> int:
        if cmd == bpf.BPF_PROG_LOAD:
            calls.append(cmd)
            if len(calls) <= fail["times"]:
                raise bpf.BpfError(fail["errno"], what)
        return real(cmd, attr, what)

    monkeypatch.setattr(bpf, "bpf", flaky)
    fd = _trivial_xdp("mplslb_eagain")
    os.close(fd)
    assert len(calls) == bpf.PROG_LOAD_ATTEMPTS
    calls.clear()
    fail["times"] = 2 * bpf.PROG_LOAD_ATTEMPTS  # EAGAIN every time (the log-on load too)
    with pytest.raises(bpf.BpfError) as raised:
        _trivial_xdp("mplslb_eagain")
    assert raised.value.errno == errno.EAGAIN and len(calls) == 2 * bpf.PROG_LOAD_ATTEMPTS
    calls.clear()
    fail["errno"] = errno.EPERM
    with pytest.raises(bpf.BpfError) as raised:
        _trivial_xdp("mplslb_eagain")
    assert raised.value.errno == errno.EPERM and len(calls) == 2  # without the log, then with it


@needs_kernel
def test_stale_program_is_removed_and_a_foreign_one_refused(topo: tuple[str, str], obj: bytes) -> None:
    """A program of ours attached by netlink (a crashed older daemon) is removed at open; another XDP program on a
    port is an error naming it; a second offload cannot take ports a live one holds."""
    lb, _ = topo
    with entered(lb):
        stale = _trivial_xdp(PROG_NAME)
        try:
            _netlink_attach("p1", stale)
        finally:
            os.close(stale)  # the attachment holds the program
        assert xdp_state(socket.if_nametoindex("p1"))[1]
    first = offload_in(lb, standard_balancer(), obj)
    try:
        assert first.attached["p1"] == "generic"
        with pytest.raises(OffloadError, match="another mplslb balancer"):
            offload_in(lb, standard_balancer(), obj)
    finally:
        first.close()
    with entered(lb):
        foreign = _trivial_xdp("someone_else")
        try:
            _netlink_attach("p3", foreign)
        finally:
            os.close(foreign)
    with pytest.raises(OffloadError, match="someone_else"):
        offload_in(lb, standard_balancer(), obj)
    with entered(lb):
        assert all(xdp_state(socket.if_nametoindex(f"p{i}"))[1] == 0 for i in (0, 1, 2))  # nothing left behind


@needs_kernel
def test_a_full_map_leaves_the_rest_in_userspace(topo: tuple[str, str], obj: bytes) -> None:
    """A refused map update never raises into the balancer's path: the label stays in userspace and is counted."""
    lb, _ = topo
    balancer = standard_balancer()
    offload = offload_in(lb, balancer, obj, max_entries=4)
    try:
        for label in range(1001, 1001 + 2 * 10, 2):
            balancer.switching.install(label, **INSTALLS[A])
        offload.sync()
        assert offload.entries == 4 and offload.errors == {"e2big": 6}
        in_kernel = [label for label in range(1001, 1021, 2) if offload.lookup(label) is not None]
        assert len(in_kernel) == 4
        balancer.switching.withdraw(in_kernel[0])
        balancer.switching.install(1101, **INSTALLS[A])
        offload.sync()
        assert offload.lookup(1101) is not None and offload.entries == 4
        sw = balancer.switching
        outside = next(lb for lb in range(1001, 1021, 2) if sw.valid[lb] and offload.lookup(lb) is None)
        frame = from_client(outside, v4_tcp(ACK))
        with entered(lb):
            assert offload.run(frame, 0).retval == bpf.XDP_PASS  # left to userspace ...
        assert len(balancer.receive(0, frame, 1.0)) == 1  # ... which forwards it
    finally:
        offload.close()


@needs_kernel
@pytest.mark.parametrize("polls", [True, False])
def test_kernel_traffic_keeps_a_session_from_its_idle_timeout(
    topo: tuple[str, str], obj: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, polls: bool
) -> None:
    """The daemon's wrapper polls the kernel's counters before the balancer's timers, and a session judged idle by
    the table is judged again on the kernel's counters of its labels (a poll may be put off under load): a UDP
    session whose frames only the kernel sees outlives its idle timeout while they flow, with the polls or without
    them, and expires (its label leaving the kernel) once they stop."""
    lb, _ = topo
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path))
    if not polls:  # as a loaded daemon whose last poll's cost puts the next off
        monkeypatch.setattr(driver, "TIMER_POLL_MIN", 60.0)
        monkeypatch.setattr(driver, "POLL_INTERVAL", 60.0)
    ports = tuple(replace(p, interface=f"p{p.port_id}") for p in standard_config().ports)
    balancer = Balancer(standard_config(ports=ports, timeouts=Timeouts(udp=0.5)))
    loop = Loop()
    with entered(lb):
        core = OffloadedBalancer(balancer, loop, syn_rate=1000)
    try:
        assert core.offload.stats()["syn_rate"] == 1000  # the daemon's offload_syn_rate reaches the program
        ((_, first),) = core.receive_batch([(0, client_udp(sport=40000))], loop.clock())
        c2s = label_of(first)
        assert core.offload.lookup(c2s) is not None  # UDP: no response time to take from the C2S frames
        frame = from_client(
            c2s, ipv4(client_addr(0), VIP, IPPROTO_UDP, udp_datagram(client_addr(0), VIP, 40000, 53, b"more"))
        )

        def run_timers(until: float, *, traffic: bool) -> None:
            while loop.clock() < until:
                if traffic:
                    with entered(lb):
                        assert core.offload.run(frame, 0).retval == bpf.XDP_REDIRECT
                deadline = core.next_deadline()
                if deadline is not None and deadline <= loop.clock():
                    core.on_timer(loop.clock())
                loop.run_once(0)  # the wrapper's own timers: its sync, its poll's steps
                time.sleep(0.05)

        run_timers(loop.clock() + 1.5, traffic=True)  # three idle timeouts long
        assert balancer.live == 1 and core.offload.lookup(c2s) is not None
        assert balancer.switching.packets[c2s] >= 10  # the kernel's frames, counted in the table
        end = loop.clock() + 5.0
        while balancer.live and loop.clock() < end:
            run_timers(loop.clock() + 0.2, traffic=False)
        assert balancer.live == 0 and core.offload.lookup(c2s) is None
    finally:
        core.close()
    assert balancer.switching.mirrors == []


@needs_kernel
def test_the_wrappers_own_polls_come_every_half_second_or_later_for_a_costly_read(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper's timer reads the whole map every POLL_INTERVAL after the last read, and puts it off, up to
    POLL_INTERVAL_MAX, while a read costs more than 1/POLL_BUDGET of the interval (a very large map)."""
    lb, _ = topo
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path))
    ports = tuple(replace(p, interface=f"p{p.port_id}") for p in standard_config().ports)
    now = [100.0]
    loop = Loop(clock=lambda: now[0])
    with entered(lb):
        core = OffloadedBalancer(Balancer(standard_config(ports=ports)), loop)
    try:
        offload = core.offload

        def polled_at(at: float) -> bool:
            """The wrapper's timer at ``at``: whether it read the map."""
            now[0] = at
            before = offload.polls
            core._tick()
            return offload.polls > before

        assert polled_at(100.0 + driver.POLL_INTERVAL)
        read = core._read_cost  # this small map's read: far below 1/POLL_BUDGET of the interval
        assert read * driver.POLL_BUDGET < driver.POLL_INTERVAL
        start = now[0]
        assert not polled_at(start + driver.POLL_INTERVAL - 0.01) and polled_at(start + driver.POLL_INTERVAL)
        for cost, due in ((0.035, 0.7), (0.2, driver.POLL_INTERVAL_MAX)):  # as a costly read would have taken
            core._read_cost = cost
            start = now[0]
            assert not polled_at(start + due - 0.01) and polled_at(start + due)
    finally:
        core.close()


@needs_kernel
def test_flow_binding_agrees_across_the_three_paths(topo: tuple[str, str], obj: bytes) -> None:
    """Frames that differ from a session's own only in the inner destination address or a port (and the cases
    that carry no port: ICMP errors, later fragments; IP options, IPv6 extension headers): the one-frame path
    forwards or drops them under the named reason, the block path switches the plain ones it forwards (and leaves
    every other to it) and the program redirects exactly the ones it forwards with the same bytes (the IPv6
    extension headers excepted: passed up)."""
    lb, _ = topo
    kernel, one, block = standard_balancer(), standard_balancer(), standard_balancer()
    for b in (kernel, one, block):
        for label, kwargs in FLOW_INSTALLS.items():
            b.switching.install(label, **kwargs)
    offload = offload_in(lb, kernel, obj)
    try:
        assert all(offload.lookup(label) is not None for label in FLOW_INSTALLS)
        expected: list[tuple[int, bytes]] = []
        with entered(lb):
            for name, port, frame, verdict, reason in FLOW_CASES:
                before = dict(one.switching.drops)
                out = one.receive(port, frame, 1.0)
                expected += out
                dropped = {k: v - before.get(k, 0) for k, v in one.switching.drops.items() if v != before.get(k, 0)}
                assert dropped == ({reason: 1} if reason else {}), name
                assert bool(out) == (reason is None), name
                run = offload.run(frame, port)
                if verdict == "redirect":
                    assert run.retval == bpf.XDP_REDIRECT and len(out) == 1 and run.data == out[0][1], name
                    assert offload.lookup(label_of(frame))[0] == offload.ifindex[out[0][0]], name  # type: ignore[index]
                else:
                    assert run.retval == bpf.XDP_PASS and run.data == frame, name
        for aligned in (False, True):
            b = standard_balancer()
            for label, kwargs in FLOW_INSTALLS.items():
                b.switching.install(label, **kwargs)
            buf, starts, lengths, ports = pack([(port, frame) for _, port, frame, _, _ in FLOW_CASES], aligned=aligned)
            result = b.receive_block(buf, starts, lengths, ports, 1.0)
            taken = {name for (name, *_), p in zip(FLOW_CASES, result.out_port, strict=True) if p >= 0}
            assert taken == {"c2s", "c2s udp, same ports", "s2c", "s2c udp, same ports", "s2c6"}
            rows = zip(result.out_port, starts, lengths, strict=True)
            got = [(int(p), buf[s : s + n].tobytes()) for p, s, n in rows if p >= 0]
            got += [(port, frame) for _, port, frame in result.extra]
            assert sorted(got) == sorted(expected)
            assert b.stats().drops == one.stats().drops
    finally:
        offload.close()


@needs_kernel
@pytest.mark.parametrize("same_client", [False, True], ids=["other-client", "same-client"])
def test_a_reused_label_pairs_late_s2c_frame_goes_up_from_the_kernel(
    topo: tuple[str, str], obj: bytes, same_client: bool
) -> None:
    """The late-frame scenario of tests/test_block.py through the program: once the new session's S2C label is in
    the kernel, the old flow's late frame is passed up (and dropped there as label_wrong_flow), the new
    session's frames are redirected as userspace forwards them."""
    lb, _ = topo
    pair = reused_label_pair(same_client=same_client)
    balancer, now = pair.net.balancer, pair.net.now
    offload = offload_in(lb, balancer, obj)
    try:
        (sent,) = balancer.receive(*pair.reply, now)  # the first answer ends the response-time measurement ...
        offload.sync()
        s2c = label_of(pair.reply[1])
        assert offload.lookup(s2c) is not None and offload.lookup(pair.c2s) is not None  # ... so both are offloaded
        with entered(lb):
            late = offload.run(pair.late[1], pair.late[0])
            assert late.retval == bpf.XDP_PASS and late.data == pair.late[1]
            reply = offload.run(pair.reply[1], pair.reply[0])
            assert reply.retval == bpf.XDP_REDIRECT and reply.data == sent[1]
            request = offload.run(pair.request[1], pair.request[0])
            assert request.retval == bpf.XDP_REDIRECT
        assert balancer.receive(*pair.late, now) == []
        assert balancer.stats().drops == {"label_wrong_flow": 1}
    finally:
        offload.close()


@needs_kernel
def test_recorded_and_mutated_frames_agree_across_the_three_paths(topo: tuple[str, str], obj: bytes) -> None:
    """A recorded run replayed with the kernel offload mirroring the table, each labelled frame tried on the three
    paths before the balancer takes it; half-way, hypothesis' mutations of recorded frames' headers (inner
    addresses, ports, protocol, IHL, label entry; frames of earlier sessions whose labels were since reused
    among them). Every frame the program redirects or the block path switches, the one-frame path forwards to the
    same port with the same bytes; every frame the one-frame path forwards, the block path switches and the
    program redirects, but for the documented exceptions (an 802.1Q tag, IPv6 extension headers or a packet
    without ports (another protocol, a later fragment) under a flow-bound label, a label kept out of the kernel, a
    frame the session manager must see)."""
    lb, _ = topo
    config, calls = recording()
    balancer = Balancer(config)
    table = balancer.switching
    offload = offload_in(lb, balancer, obj)
    seen = {"redirect": 0, "drop": 0, "frames": 0}

    def three_ways(port: int, frame: bytes, now: float) -> None:
        out: list[tuple[int, bytes]] = []
        events: list[FastEvent] = []
        drops = dict(table.drops)
        forwarded = switch_frame(table.hot, port, frame, now, out, events) >= 0
        table.drops.clear()
        table.drops.update(drops)  # the balancer's own figures stay as the recording had them
        if len(frame) < LSE_AT:  # BPF_PROG_TEST_RUN takes whole Ethernet headers only (and such a runt is no label's)
            assert not forwarded
            return
        with entered(lb):
            run = offload.run(frame, port)
        buf, starts, lengths, ports = pack([(port, frame)])
        verdict = switch_block(table, buf, starts, lengths, ports, now, [], count=False)
        label = label_of(frame) if len(frame) >= IP_AT else 0
        seen["frames"] += 1
        if run.retval == bpf.XDP_REDIRECT:
            seen["redirect"] += 1
            assert forwarded and run.data == out[0][1]
            assert offload.lookup(label)[0] == offload.ifindex[out[0][0]]  # type: ignore[index]
        else:
            assert run.retval == bpf.XDP_PASS and run.data == frame
            seen["drop"] += not forwarded
        if verdict.switched[0]:
            assert forwarded and buf[: len(frame)].tobytes() == out[0][1] and verdict.out_port[0] == out[0][0]
        if forwarded:
            tagged = frame[12:14] == b"\x81\x00"
            extended = bool(table.v6[label]) and frame[IP_AT + IPV6_NEXT_HEADER] in EXTENSION_HEADERS
            if tagged or not table.bound[label]:
                plain = True
            elif table.v6[label]:
                plain = frame[IP_AT + IPV6_NEXT_HEADER] in (IPPROTO_TCP, IPPROTO_UDP)
            else:  # a later fragment or another protocol carries no ports: left to the one-frame path (when the
                # octets where the ports would be differ from the flow's), which forwards it on its addresses
                later = int.from_bytes(frame[IP_AT + IPV4_FRAG_AT : IP_AT + IPV4_FRAG_AT + 2]) & FRAG_OFFSET_MASK
                ported = frame[IP_AT + IPV4_PROTO] in (IPPROTO_TCP, IPPROTO_UDP)
                plain = frame[IP_AT] == IPV4_PLAIN and ported and not later
            assert verdict.switched[0] or tagged or not plain  # the block path takes plain packets of the flow
            assert run.retval == bpf.XDP_REDIRECT or offload.lookup(label) is None or events or extended

    recorded = [(c.port, c.frame) for c in calls if c.port >= 0 and c.frame[12:14] == b"\x88\x47"]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, 1 << 16), muts=st.lists(header_mutation, min_size=1, max_size=3))
    @example(which=1, muts=[("flip", 38, 0), ("flip", 85, 0)])
    def mutated(now: float, which: int, muts: list[tuple[str, int, int]]) -> None:
        port, frame = recorded[which % len(recorded)]
        three_ways(port, mutate(frame, muts), now)

    try:
        for i, c in enumerate(calls):
            if i == len(calls) // 2:
                before = seen["frames"]
                mutated(c.now)
                assert seen["frames"] - before >= 100
            if c.port < 0:
                balancer.on_timer(c.now)
            else:
                if c.frame[12:14] == b"\x88\x47":
                    three_ways(c.port, c.frame, c.now)
                balancer.receive(c.port, c.frame, c.now)
            offload.sync()
        assert seen["redirect"] > len(recorded) // 4 and seen["drop"] > 0
    finally:
        offload.close()


#: Labels whose frames carry TCP of a session (and E, which is no TCP session's): (label, ingress port, source
#: MAC, IP source, IP destination, source port, destination port).
ACK_LABELS = [
    (A, 0, client_mac(0), client_addr(0), VIP, 40000, 80),
    (F, 0, client_mac(0), client_addr(0), VIP, 40000, 80),
    (G, 2, S1.mac, VIP, client_addr(0), 80, 40000),
    (D, 1, client_mac(1), client_addr(1, v6=True), VIP6, 40001, 80),
    (E, 0, client_mac(2), client_addr(0), VIP, 40000, 80),
]


@needs_kernel
def test_program_records_acknowledgment_numbers_as_userspace(topo: tuple[str, str], obj: bytes) -> None:
    """Frames of every TCP flag combination and acknowledgment number, as TCP, UDP or ICMP, later fragments, with
    IP options, tagged, cut short: the acknowledgment number the program stores in the label's entry is the one the
    one-frame path records for it (none: the entry keeps its last), whether the program redirects the frame or
    passes it up (a FIN), and the block path reports the same for the frames it switches."""
    lb, _ = topo
    kernel, one = standard_balancer(), standard_balancer()
    for b in (kernel, one):
        install_all(b)
    offload = offload_in(lb, kernel, obj)
    seen = {"recorded": 0, "kept": 0, "passed": 0, "passed, recorded": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        which=st.integers(0, len(ACK_LABELS) - 1),
        # FINs with an ACK (recorded, then passed up) as often as the rest, so that each outcome is seen enough
        flags=st.one_of(
            st.sampled_from([ACK, ACK | PSH, SYN | ACK, FIN | ACK, FIN | ACK | PSH, FIN | ACK]), st.integers(0, 255)
        ),
        ack=st.integers(0, (1 << 32) - 1),
        proto=st.sampled_from([IPPROTO_TCP, IPPROTO_TCP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP]),
        later_fragment=st.sampled_from([False, False, False, True]),
        options=st.booleans(),
        tagged=st.sampled_from([False, False, False, True]),
        cut=st.sampled_from([0, 0, 0, 1, 5, 20, 41, 60]),
    )
    def one_frame(
        which: int, flags: int, ack: int, proto: int, later_fragment: bool, options: bool, tagged: bool, cut: int
    ) -> None:
        check(which, flags, ack, proto, later_fragment, options, tagged, cut)

    def check(
        which: int, flags: int, ack: int, proto: int, later_fragment: bool, options: bool, tagged: bool, cut: int
    ) -> None:
        label, port, mac, src, dst, sport, dport = ACK_LABELS[which]
        segment = tcp_segment(src, dst, sport, dport, flags, b"data", seq=7, ack=ack)
        if len(src) == 16:
            packet = ipv6(src, dst, IPPROTO_TCP if proto == IPPROTO_ICMP else proto, segment)
        else:
            packet = ipv4(src, dst, proto, segment, options=b"\x01\x01\x01\x00" if options else b"",
                          **(dict(flags=0, frag_offset=64) if later_fragment else {}))  # fmt: skip
        frame = labelled(PORT_MAC[port], mac, label, packet, vlans=[5] if tagged else [])
        if cut:
            frame = frame[: max(IP_AT, len(frame) - cut)]
        table = one.switching
        kept = table.acks[label]
        table.acks[label] = 0
        out: list[tuple[int, bytes]] = []
        forwarded = switch_frame(table.hot, port, frame, 1.0, out, []) >= 0
        recorded = table.acks[label]
        table.acks[label] = kept
        assert recorded == 0 or forwarded
        before = offload.ack(label)
        with entered(lb):
            run = offload.run(frame, port)
        after = offload.ack(label)
        assert before is not None and after == (recorded or before)  # the entry holds what the table would
        if run.retval == bpf.XDP_REDIRECT:
            seen["recorded" if recorded else "kept"] += 1
        else:
            seen["passed, recorded" if recorded else "passed"] += 1  # a FIN: recorded before it goes up
        buf, starts, lengths, ports = pack([(port, frame)])
        verdict = switch_block(table, buf, starts, lengths, ports, 1.0, [], count=False)
        assert int(verdict.acks[0]) == (recorded if verdict.switched[0] else 0)

    try:
        one_frame()
        drawn = dict(seen)
        # and each outcome ten times whatever the draw: a pure ACK (recorded, forwarded), a UDP datagram (kept), an
        # RST (passed up, nothing recorded), a FIN with IPv4 options (recorded, then passed up: never taken)
        for n in range(10):
            check(0, ACK, n, IPPROTO_TCP, False, False, False, 0)
            check(0, ACK, n, IPPROTO_UDP, False, False, False, 0)
            check(0, ACK | RST, n, IPPROTO_TCP, False, False, False, 0)
            check(0, FIN | ACK, n, IPPROTO_TCP, False, True, False, 0)
        assert {k: seen[k] - drawn[k] for k in seen} == dict.fromkeys(seen, 10), (drawn, seen)
    finally:
        offload.close()


@needs_kernel
def test_an_rst_is_judged_by_the_acknowledgment_number_the_kernel_saw(topo: tuple[str, str], obj: bytes) -> None:
    """A session whose labels are in the kernel: the server's acknowledgments advance there only, and the client's
    RST (which the program passes up) is judged against the latest of them, read from the map when it comes;
    an RST at the last acknowledgment number userspace itself saw is by then far behind and not believed."""
    lb, _ = topo
    net = Net(make_config(timeouts=Timeouts(closed_linger=2.0)))
    b = net.balancer
    name, c2s = handshake(net)
    src = client_addr(0)
    net.now = 1.0  # the request's time (0.0 would read as "no request seen")
    request = net.from_client(
        0, tcp(src, VIP, 40000, 80, PSH | ACK, seq=101, ack=501, payload=b"GET / HTTP/1.1\r\n\r\n")
    )
    net.deliver_to_servers(request)
    answer = net.from_server(name, tcp(VIP, src, 80, 40000, PSH | ACK, seq=501, ack=119, payload=b"HTTP/1.1 200"))
    assert len(net.deliver_to_client(0, answer)) == 1  # the measurement is over: both labels may enter the kernel
    offload = offload_in(lb, b, obj)
    try:
        assert offload.lookup(c2s) is not None and offload.lookup(c2s + 1) is not None
        assert b.switching.acks[c2s + 1] == ACK_KNOWN | 119
        far = 119 + 10 * 65535  # the client sent that much more, acknowledged in the kernel only
        port = net.server_port[name]
        with entered(lb):
            for ack in (119 + 65535, far):
                frame = net.servers[name].from_host(tcp(VIP, src, 80, 40000, ACK, seq=513, ack=ack), net.now)
                assert frame is not None and offload.run(frame, port).retval == bpf.XDP_REDIRECT
        assert b.switching.acks[c2s + 1] == ACK_KNOWN | 119  # userspace has not seen them
        session = b.sessions.by_c2s(c2s)
        assert session is not None
        for seq, state in ((119, SessionState.ESTABLISHED), (far, SessionState.ENDING)):
            rst = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, RST, seq=seq))
            with entered(lb):
                assert offload.run(rst, 0).retval == bpf.XDP_PASS  # the session manager must see it
            assert len(b.receive(0, rst, net.now)) == 1
            assert session.state is state, seq
        assert b.sessions.not_believed == {"rst_out_of_window": 1}
        assert b.switching.acks[c2s + 1] == ACK_KNOWN | far  # copied when read
        # The client's endpoint fell back to unlabelled frames: the slow path's frame on the C2S label (in the
        # kernel) writes its acknowledgment number through to the entry, which judges the server's RST.
        fallback = ether(PORT_MAC[0], client_mac(0), tcp(src, VIP, 40000, 80, ACK, seq=far, ack=99_999))
        assert len(b.receive(0, fallback, net.now)) == 1
        assert offload.ack(c2s) == ACK_KNOWN | 99_999
        server_rst = net.servers[name].from_host(tcp(VIP, src, 80, 40000, RST, seq=99_999), net.now)
        assert server_rst is not None and len(b.receive(port, server_rst, net.now)) == 1
        assert b.sessions.not_believed == {"rst_out_of_window": 1}  # believed (already ENDING: the linger again)
    finally:
        offload.close()


@needs_kernel
def test_unlabelled_syns_beyond_the_rate_are_shed_in_the_kernel(topo: tuple[str, str], obj: bytes) -> None:
    """With offload_syn_rate set, the program lets this CPU's share of unlabelled TCP SYNs (IPv4, IPv6, tagged)
    through, then drops the excess and counts it; labelled frames (SYNs among them) and unlabelled frames that are
    not a SYN without ACK are never shed, even with the bucket empty; the shed SYNs reach the balancer's drops."""
    lb, _ = topo
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})  # BPF_PROG_TEST_RUN runs on the calling CPU: one CPU, one bucket
    balancer = standard_balancer()
    install_all(balancer)
    cpus = os.cpu_count() or 1
    offload = offload_in(lb, balancer, obj, syn_rate=3 * cpus)
    share = syn_share(3 * cpus, cpus)
    syns = [
        ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN)),
        ether(PORT_MAC[1], client_mac(1), ipv6(client_addr(1, v6=True), VIP6, IPPROTO_TCP,
                                               tcp_segment(client_addr(1, v6=True), VIP6, 40001, 80, SYN))),
        ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN, options=b"\x01\x01\x01\x00"), vlans=[5]),
    ]  # fmt: skip
    never_shed = [(port, frame) for _, port, frame, _, _ in CASES if label_of_or_none(frame) is not None]
    never_shed += [
        (0, ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN | ACK))),
        (0, ether(PORT_MAC[0], client_mac(0), v4_tcp(ACK, b"GET /"))),
        (0, ether(PORT_MAC[0], client_mac(0), ipv4(client_addr(0), VIP, IPPROTO_UDP,
                                                   udp_datagram(client_addr(0), VIP, 40000, 53, b"q")))),
        (0, ether(PORT_MAC[0], client_mac(0), ipv4(client_addr(0), VIP, IPPROTO_TCP, bytes(40), flags=0,
                                                   frag_offset=8))),  # a later fragment: no TCP header
    ]  # fmt: skip
    try:
        with entered(lb):
            started = time.monotonic()
            verdicts = [offload.run(syns[i % len(syns)], 0).retval for i in range(share + 30)]
            after = [offload.run(frame, port).retval for port, frame in never_shed]
            elapsed = time.monotonic() - started
        refilled = int(elapsed * share) + 1  # what the bucket may have regained while the test ran
        passed, shed = verdicts.count(bpf.XDP_PASS), verdicts.count(bpf.XDP_DROP)
        assert passed + shed == len(verdicts)
        assert verdicts[:share] == [bpf.XDP_PASS] * share
        assert share <= passed <= share + refilled and shed >= 30 - refilled
        assert bpf.XDP_DROP not in after
        stats = offload.stats()
        assert (stats["syn_passed"], stats["syn_shed"]) == (passed, shed)
        offload.poll()
        offload.poll()  # counted once
        assert balancer.stats().drops.get("syn_shed") == shed
    finally:
        offload.close()
        os.sched_setaffinity(0, saved)


def label_of_or_none(frame: bytes) -> int | None:
    tagged = frame[12:14] == b"\x81\x00"
    at = 16 if tagged else 12
    return label_of(frame) if frame[at : at + 2] == b"\x88\x47" and len(frame) >= at + 6 else None


def on_veths(config: BalancerConfig) -> BalancerConfig:
    """``config`` with each port on the interface of :func:`veth_namespaces` named after its id."""
    return replace(config, ports=tuple(replace(p, interface=f"p{p.port_id}") for p in config.ports))


def _measured_pair(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[OffloadedBalancer, Balancer, Loop]:
    """The daemon's wrapper over a balancer on p0..p3 (the kernel measures new sessions) and a reference balancer
    of the same configuration without it."""
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path))
    config = on_veths(standard_config(**overrides))
    loop = Loop()
    with entered(lb):
        core = OffloadedBalancer(Balancer(config), loop)
    return core, Balancer(config), loop


@needs_kernel
@pytest.mark.parametrize(("l7", "v6"), [(True, False), (False, False), (True, True)])
def test_a_new_session_is_measured_in_the_kernel_as_in_userspace(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, l7: bool, v6: bool
) -> None:
    """With the daemon's wrapper, a new TCP session's labels enter the kernel with its SYN: the SYN-ACK, the
    client's ACK, the request (copied for L7 analysis), the first response byte and both FINs are forwarded by the
    program and never reach the balancer, yet once the kernel's records are folded the session, its server's
    response time and passive health, the L7 figures, the watches and the close are what the userspace path makes
    of the same frames."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=l7)
    kernel = core.balancer
    try:

        def to_both(port: int, frame: bytes) -> list[tuple[int, bytes]]:
            now = loop.clock()
            out = core.receive_batch([(port, frame)], now)
            assert out == reference.receive(port, frame, now)
            return out

        in_kernel = functools.partial(_through_both, core, reference, loop, lb)

        client, vip = client_addr(0, v6=v6), VIP6 if v6 else VIP

        def segment(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
            made = ipv6 if v6 else ipv4
            return made(src, dst, IPPROTO_TCP, tcp_segment(src, dst, sport, dport, flags, payload))

        def to_vip(flags: int, payload: bytes = b"") -> bytes:
            return segment(client, vip, 40000, 80, flags, payload)

        ((_, syn),) = to_both(0, ether(PORT_MAC[0], client_mac(0), to_vip(SYN)))
        c2s = label_of(syn)
        s2c = c2s + 1
        assert core.offload.lookup(c2s) is not None and core.offload.lookup(s2c) is not None
        server = kernel.sessions.by_c2s(c2s)
        assert server is not None
        port, mac = server.server.config.port_id, server.server.mac

        def reply(flags: int, payload: bytes = b"") -> bytes:
            return from_server(s2c, segment(vip, client, 80, 40000, flags, payload), port=port, mac=mac)

        time.sleep(0.002)  # the kernel's clock moves past the SYN's
        in_kernel(port, reply(SYN | ACK), bpf.XDP_REDIRECT)
        in_kernel(0, from_client(c2s, to_vip(ACK)), bpf.XDP_REDIRECT)
        request = from_client(c2s, to_vip(ACK | PSH, b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"))
        in_kernel(0, request, bpf.XDP_REDIRECT)
        in_kernel(port, reply(ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n"), bpf.XDP_REDIRECT)
        assert kernel.frames_in == 1  # the SYN only
        assert kernel.stats().l7_hosts == {}  # the request's copy waits in the kernel for the next fold
        in_kernel(port, reply(FIN | ACK), bpf.XDP_REDIRECT)  # taken in the kernel too (F_FIN)
        assert kernel.frames_in == 1
        core.offload.poll()  # the measurement's record is folded first (the request's copy read), then the FIN's
        ours, theirs = kernel.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
        assert ours is not None and theirs is not None
        assert (ours.state, ours.rt_pending, bool(ours.request_at)) == (theirs.state, theirs.rt_pending, True)
        assert ours.state is SessionState.CLOSING_SERVER
        assert ours.server.rt_ewma is not None and theirs.server.rt_ewma is not None
        assert ours.server.answered_at > 0 and theirs.server.answered_at > 0
        assert kernel.stats().l7_hosts == reference.stats().l7_hosts == ({"shop.example": 1} if l7 else {})
        for label in (c2s, s2c):
            assert kernel.switching.watch[label] == reference.switching.watch[label]
        assert core.offload.stats()["measuring"] == 0 and core.offload.stats()["records"] >= 1
        assert core.offload.stats()["copies"] == l7
        # the client's FIN (judged by the server's last ACK, as the kernel saw it) and its last ACK: the whole
        # session reached the balancer as its SYN
        in_kernel(0, from_client(c2s, to_vip(FIN | ACK)), bpf.XDP_REDIRECT)
        in_kernel(port, reply(ACK), bpf.XDP_REDIRECT)
        assert kernel.frames_in == 1
        core.offload.poll()  # the kernel's frames are counted as the reference counted them
        assert ours.state is theirs.state is SessionState.ENDING
        assert kernel.sessions.not_believed == reference.sessions.not_believed == {}
        assert core.offload.stats()["fins"] == 2
        for label in (c2s, s2c):
            assert kernel.switching.traffic(label) == reference.switching.traffic(label)
    finally:
        core.close()


@needs_kernel
def test_the_kernel_records_the_ack_of_a_first_request_it_passes_up(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With L7 analysis, a measured session whose C2S label has no request slot (its write refused) has its first
    request go up (its Host is read there): the program records its acknowledgment number before passing it, as
    userspace records it when it forwards it, so the server's RST is judged by it as without the offload, and the
    Host is counted from the frame."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    c0 = client_addr(0)
    far = 0x8000_0000  # the request's acknowledgment number, far from the handshake's (0)
    try:
        both = functools.partial(_through_both, core, reference, loop, lb)

        syn = ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN))
        ((_, first),) = core.receive_batch([(0, syn)], loop.clock())
        assert reference.receive(0, syn, loop.clock()) == [(_, first)]
        c2s = label_of(first)
        session = core.balancer.sessions.by_c2s(c2s)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac
        core.offload._drop_slot(c2s)  # as if the kernel had refused the slot

        def server(flags: int, **kw: int) -> bytes:
            return from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, tcp_segment(VIP, c0, 80, 40000, flags, **kw)),
                               port=port, mac=mac)  # fmt: skip

        both(port, server(SYN | ACK, ack=1001), bpf.XDP_REDIRECT)
        both(0, from_client(c2s, v4_tcp(ACK)), bpf.XDP_REDIRECT)
        request = tcp_segment(c0, VIP, 40000, 80, ACK | PSH, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ack=far)
        both(0, from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, request)), bpf.XDP_PASS)
        assert core.offload.ack(c2s) == reference.switching.acks[c2s] == ACK_KNOWN | far
        both(port, server(RST, seq=far), bpf.XDP_PASS)  # within the window of the request's number: believed
        ours, theirs = core.balancer.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
        assert ours is not None and theirs is not None
        assert ours.state is theirs.state is SessionState.ENDING
        assert core.balancer.sessions.not_believed == reference.sessions.not_believed == {}
        assert core.balancer.l7_hosts == reference.l7_hosts == {"a": 1}
        assert core.offload.stats()["copies"] == 0
    finally:
        core.close()


def _through_both(
    core: OffloadedBalancer, reference: Balancer, loop: Any, lb: str, port: int, frame: bytes, verdict: int
) -> None:
    """``frame`` through the XDP program (which must give ``verdict``) and, passed up untouched, the daemon's
    balancer, against the userspace balancer ``reference``: the same frames leave."""
    now = loop.clock()
    expected = reference.receive(port, frame, now)
    with entered(lb):
        run = core.offload.run(frame, port)
    assert run.retval == verdict
    if verdict == bpf.XDP_PASS:
        assert run.data == frame and core.receive_batch([(port, frame)], now) == expected
    else:
        assert [run.data] == [sent for _, sent in expected]


def _close_mode_session(
    core: OffloadedBalancer, reference: Balancer, loop: Loop, lb: str, sport: int, request: bytes
) -> list[int]:
    """One session as a ``Connection: close`` client and server make it, each frame through the program first
    (what it passes up to the daemon's balancer) and through the reference's one-frame path, the frames that leave
    compared: handshake, request, response, the server's FIN, the client's FIN and ACK, the server's last ACK.
    Returns the program's verdicts."""
    c0 = client_addr(0)
    verdicts: list[int] = []

    def both(port: int, frame: bytes) -> None:
        now = loop.clock()
        expected = reference.receive(port, frame, now)
        with entered(lb):
            run = core.offload.run(frame, port)
        verdicts.append(run.retval)
        if run.retval == bpf.XDP_REDIRECT:
            assert [run.data] == [sent for _, sent in expected]
        else:
            assert run.data == frame and core.receive_batch([(port, frame)], now) == expected

    def client(flags: int, payload: bytes = b"", **kw: int) -> bytes:
        return ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, flags, payload, **kw))

    syn = ether(PORT_MAC[0], client_mac(0), client(SYN))
    ((out, first),) = core.receive_batch([(0, syn)], loop.clock())
    verdicts.append(bpf.XDP_PASS)  # unlabelled: the daemon's
    assert reference.receive(0, syn, loop.clock()) == [(out, first)]
    c2s = label_of(first)
    session = core.balancer.sessions.by_c2s(c2s)
    assert session is not None
    port, mac = session.server.config.port_id, session.server.mac

    def server(flags: int, payload: bytes = b"") -> bytes:
        segment = tcp_segment(VIP, c0, 80, sport, flags, payload, ack=1 + len(request))
        return from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, segment), port=port, mac=mac)

    time.sleep(0.001)  # the kernel's clock moves past the SYN's
    both(port, server(SYN | ACK))
    both(0, from_client(c2s, client(ACK)))
    both(0, from_client(c2s, client(ACK | PSH, request)))
    both(port, server(ACK | PSH, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"))
    both(port, server(FIN | ACK))
    both(0, from_client(c2s, client(FIN | ACK)))
    both(port, server(ACK))
    return verdicts


@needs_kernel
def test_a_close_mode_session_sends_only_its_syn_up_with_l7(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With L7 analysis on, a ``Connection: close`` session costs the daemon its SYN: the request is copied in the
    kernel and forwarded there, the FINs are recorded there, and once folded the Host counts, the sessions and the
    server's response time are the one-frame path's, for a request that fits the copy and one longer than it whose
    Host is within it."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    kernel = core.balancer
    short = b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
    long = b"GET /big HTTP/1.1\r\nHost: big.example\r\nCookie: " + b"c" * (2 * REQUEST_COPY) + b"\r\n\r\n"
    try:
        verdicts = _close_mode_session(core, reference, loop, lb, 40000, short)
        verdicts += _close_mode_session(core, reference, loop, lb, 40001, long)
        assert verdicts.count(bpf.XDP_PASS) == kernel.frames_in == 2 * 1  # the SYN
        core.offload.poll()
        assert kernel.l7_hosts == reference.l7_hosts == {"shop.example": 1, "big.example": 1}
        assert core.offload.stats()["copies"] == 2
        ours, theirs = kernel.stats(), reference.stats()
        assert (ours.sessions_active, ours.sessions_ended) == (theirs.sessions_active, theirs.sessions_ended)
        assert [s.state for s in kernel.live_sessions()] == [s.state for s in reference.live_sessions()]
        assert [s.rt_ewma is not None for s in kernel.pool] == [s.rt_ewma is not None for s in reference.pool]
    finally:
        core.close()


@needs_kernel
def test_request_slots_are_dropped_and_opened_many_at_a_time(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies one poll takes have their request slots deleted together at its end, and SYNs read in one burst
    get theirs in one write: no slot is left once its copy is taken, every new session has one, and the Hosts
    counted are the one-frame path's."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    requests = core.offload._requests
    assert requests is not None
    n = BATCH_MIN + 1
    c0 = client_addr(0)
    try:
        for i in range(n):
            request = f"GET / HTTP/1.1\r\nHost: h{i}.example\r\nConnection: close\r\n\r\n".encode()
            _close_mode_session(core, reference, loop, lb, 40000 + i, request)
        assert requests.lookup_batch()[2] == n  # each copy waits in its slot for the poll
        core.offload.poll()
        assert core.offload.stats()["copies"] == n
        assert requests.lookup_batch()[2] == 0
        assert core.balancer.l7_hosts == reference.l7_hosts == {f"h{i}.example": 1 for i in range(n)}
        syns = [(0, ether(PORT_MAC[0], client_mac(0), ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, 41000 + i, 80,
                                                                                               SYN))))
                for i in range(n)]  # fmt: skip
        out = core.receive_batch(syns, loop.clock())
        labels = sorted(label_of(frame) for _, frame in out)
        assert len(labels) == n
        keys, _, count = requests.lookup_batch()
        assert count == n and sorted(struct.unpack(f"={n}I", keys)) == labels
        assert all(core.offload._slots[label] for label in labels)
    finally:
        core.close()


@needs_kernel
def test_a_slot_refused_after_a_failed_batch_is_left_out_of_the_map(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst's batch write of request slots that fails (how far it went unknown) is written again one by one; a
    slot the kernel then refuses is counted and deleted, so a label counted without a slot has none in the map (its
    request goes up, as the balancer expects), and the others have theirs."""
    lb, _ = topo
    core, _, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    requests = core.offload._requests
    assert requests is not None
    n = BATCH_MIN + 1
    c0 = client_addr(0)
    real_update = requests.update
    refused: list[bytes] = []

    def half_batch(keys: bytes, values: bytes, count: int) -> int:
        real_update(keys[:4], values[: len(values) // count])  # the first went in before the failure
        raise bpf.BpfError(errno.ENOMEM, "batch update (test)")

    def update(key: bytes, value: bytes, flags: int = bpf.BPF_ANY) -> None:
        if not refused:
            refused.append(key)
            raise bpf.BpfError(errno.ENOMEM, "update (test)")
        real_update(key, value, flags)

    monkeypatch.setattr(requests, "update_batch", half_batch)
    monkeypatch.setattr(requests, "update", update)
    try:
        syns = [(0, ether(PORT_MAC[0], client_mac(0), ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, 42000 + i, 80,
                                                                                               SYN))))
                for i in range(n)]  # fmt: skip
        out = core.receive_batch(syns, loop.clock())
        labels = sorted(label_of(frame) for _, frame in out)
        (first,) = struct.unpack("=I", refused[0])  # the one the failed batch had written
        others = [label for label in labels if label != first]
        assert len(others) == n - 1
        keys, _, count = requests.lookup_batch()
        assert sorted(struct.unpack(f"={count}I", keys)) == others
        assert not core.offload._slots[first] and all(core.offload._slots[label] for label in others)
        assert core.offload.stats()["errors"] == {"enomem": 1}
    finally:
        core.close()


@needs_kernel
def test_sessions_beyond_the_request_maps_slots_have_their_requests_go_up(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request map is preallocated and bounded: once its slots are all waiting for a poll, a new session's slot
    is refused (counted, ``e2big``) and its request goes up, where its Host is read from the frame; the Hosts
    counted are the one-frame path's either way, and the poll that takes the copies frees their slots for the next
    sessions."""
    lb, _ = topo
    monkeypatch.setattr(xdp, "REQUEST_SLOTS", 4)
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    requests = core.offload._requests
    assert requests is not None and core.offload.request_slots == 4
    try:
        passed = []
        for i in range(6):
            request = f"GET / HTTP/1.1\r\nHost: h{i}.example\r\nConnection: close\r\n\r\n".encode()
            passed.append(_close_mode_session(core, reference, loop, lb, 40000 + i, request).count(bpf.XDP_PASS))
        assert passed == [1, 1, 1, 1, 2, 2]  # the SYN, and the request of a session without a slot
        assert requests.lookup_batch()[2] == 4
        assert core.offload.stats()["errors"] == {"e2big": 2}
        core.offload.poll()
        assert core.offload.stats()["copies"] == 4 and requests.lookup_batch()[2] == 0
        assert core.balancer.l7_hosts == reference.l7_hosts == {f"h{i}.example": 1 for i in range(6)}
        request = b"GET / HTTP/1.1\r\nHost: again.example\r\nConnection: close\r\n\r\n"
        assert _close_mode_session(core, reference, loop, lb, 40010, request).count(bpf.XDP_PASS) == 1
        core.offload.poll()
        assert core.balancer.l7_hosts == reference.l7_hosts
        assert core.offload.stats()["errors"] == {"e2big": 2}
    finally:
        core.close()


@needs_kernel
def test_a_host_past_the_kernels_copy_is_counted_as_truncated(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose Host header (or request line) ends past the first REQUEST_COPY octets the kernel copies is
    counted under TRUNCATED_HOST, not under no host and not left out; the session and its measurement are the
    one-frame path's, which reads the whole frame and counts the Host."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=True)
    late_host = b"GET / HTTP/1.1\r\nCookie: " + b"c" * REQUEST_COPY + b"\r\nHost: late.example\r\n\r\n"
    long_line = b"GET /" + b"p" * REQUEST_COPY + b" HTTP/1.1\r\nHost: path.example\r\n\r\n"
    try:
        _close_mode_session(core, reference, loop, lb, 40000, late_host)
        _close_mode_session(core, reference, loop, lb, 40001, long_line)
        core.offload.poll()
        assert core.balancer.l7_hosts == {TRUNCATED_HOST: 2}
        assert reference.l7_hosts == {"late.example": 1, "path.example": 1}
        assert core.balancer.frames_in == 2 * 1  # the SYN
        ours, theirs = core.balancer.stats(), reference.stats()
        assert (ours.sessions_active, ours.sessions_ended) == (theirs.sessions_active, theirs.sessions_ended)
    finally:
        core.close()


@needs_kernel
def test_fins_taken_in_the_kernel_are_judged_and_applied_as_in_userspace(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a session's measurement is over, the first FIN under each label is forwarded by the program and
    recorded with the other end's last ACK as it passed: a client's FIN far from the server's last ACK is not
    believed, as in userspace, even when the server's ACKs moved near it before the record was folded; a second FIN
    under the label goes up and is judged there, after the first is folded in; a FIN the program cannot read as the
    analyzer would (TCP options other than timestamps; a wrong IPv4 header checksum) goes up."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, l7=False)
    c0 = client_addr(0)
    kernel = core.balancer
    try:
        both = functools.partial(_through_both, core, reference, loop, lb)

        def open_session(sport: int) -> tuple[int, int, bytes]:
            syn = ether(PORT_MAC[0], client_mac(0), ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, SYN)))
            ((_, first),) = core.receive_batch([(0, syn)], loop.clock())
            assert reference.receive(0, syn, loop.clock()) == [(_, first)]
            c2s = label_of(first)
            session = kernel.sessions.by_c2s(c2s)
            assert session is not None
            return c2s, session.server.config.port_id, session.server.mac

        def client(c2s: int, sport: int, flags: int, payload: bytes = b"", **kw: Any) -> bytes:
            return from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, flags, payload, **kw)))

        def server(c2s: int, sport: int, at: tuple[int, bytes], flags: int, payload: bytes = b"", **kw: Any) -> bytes:
            segment = tcp_segment(VIP, c0, 80, sport, flags, payload, **kw)
            return from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, segment), port=at[0], mac=at[1])

        def established(sport: int) -> tuple[int, tuple[int, bytes]]:
            """A session whose measurement is over in the kernel (handshake, request, response)."""
            c2s, port, mac = open_session(sport)
            time.sleep(0.002)
            both(port, server(c2s, sport, (port, mac), SYN | ACK, ack=1001), bpf.XDP_REDIRECT)
            both(0, client(c2s, sport, ACK, seq=1001, ack=5001), bpf.XDP_REDIRECT)
            both(0, client(c2s, sport, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n", seq=1001, ack=5001), bpf.XDP_REDIRECT)
            both(port, server(c2s, sport, (port, mac), ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n", seq=5001, ack=1020),
                 bpf.XDP_REDIRECT)  # fmt: skip
            return c2s, (port, mac)

        c2s, at = established(40000)
        far = 0x8000_0000
        both(0, client(c2s, 40000, FIN | ACK, seq=far, ack=5020), bpf.XDP_REDIRECT)  # forged: far from 1020
        # the server's ACKs move on (to where the client's next FIN is) before the daemon folds the first FIN in,
        # which is judged by the ACK the server had sent when it passed
        both(at[0], server(c2s, 40000, at, ACK, seq=5020, ack=far + 1), bpf.XDP_REDIRECT)
        both(0, client(c2s, 40000, FIN | ACK, seq=far + 1, ack=5020), bpf.XDP_PASS)  # a second FIN: up, believed
        ours, theirs = kernel.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
        assert ours is not None and theirs is not None
        assert kernel.sessions.not_believed == reference.sessions.not_believed == {"fin_out_of_window": 1}
        assert core.offload.stats()["fins"] == 1  # folded before the second FIN was handled
        assert ours.state is theirs.state is SessionState.CLOSING_CLIENT
        both(at[0], server(c2s, 40000, at, FIN | ACK, seq=5020, ack=far + 2), bpf.XDP_REDIRECT)
        core.offload.poll()
        assert ours.state is theirs.state is SessionState.ENDING
        assert kernel.sessions.not_believed == reference.sessions.not_believed

        c2s, at = established(40001)
        sack = bytes([1, 1, 5, 10]) + bytes(8)  # NOP, NOP, SACK of one block: options the program does not read
        both(0, client(c2s, 40001, FIN | ACK, seq=1020, ack=5020, options=sack), bpf.XDP_PASS)
        bad = bytearray(server(c2s, 40001, at, FIN | ACK, seq=5020, ack=1021))
        bad[IP_AT + 10] ^= 0xFF  # the IPv4 header checksum: the analyzer reads no sequence number in it
        both(at[0], bytes(bad), bpf.XDP_PASS)
        ours, theirs = kernel.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
        assert ours is not None and theirs is not None
        assert ours.state is theirs.state
        assert kernel.sessions.not_believed == reference.sessions.not_believed
        assert kernel.frames_in == 2 + 1 + 2  # two SYNs, the second FIN, the two FINs the program could not read
    finally:
        core.close()


@needs_kernel
def test_a_half_open_deadline_sees_the_answer_the_kernel_recorded(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SYN-ACK only the kernel saw still counts when the session's half-open deadline comes before any poll:
    the session ends half-open without its server charged for not answering, as in userspace, while a session
    nobody answered charges it."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, timeouts=Timeouts(tcp_start=1.0))
    kernel = core.balancer
    try:
        labels = []
        for sport in (40000, 40001):
            now = loop.clock()
            frame = ether(PORT_MAC[0], client_mac(0), ipv4(client_addr(0), VIP, IPPROTO_TCP,
                          tcp_segment(client_addr(0), VIP, sport, 80, SYN)))  # fmt: skip
            ((_, syn),) = core.receive_batch([(0, frame)], now)
            assert reference.receive(0, frame, now) == [(_, syn)]
            labels.append(label_of(syn))
        answered = kernel.sessions.by_c2s(labels[0])
        assert answered is not None
        c0 = client_addr(0)
        synack = from_server(labels[0] + 1, ipv4(VIP, c0, IPPROTO_TCP, tcp_segment(VIP, c0, 80, 40000, SYN | ACK)),
                             port=answered.server.config.port_id, mac=answered.server.mac)  # fmt: skip
        time.sleep(0.002)
        reference.receive(answered.server.config.port_id, synack, loop.clock())
        with entered(lb):
            assert core.offload.run(synack, answered.server.config.port_id).retval == bpf.XDP_REDIRECT
        later = loop.clock() + 2.0
        kernel.on_timer(later)  # the balancer's own timers, no poll before them
        reference.on_timer(later)
        for b in (kernel, reference):
            assert b.sessions.ended == {"half_open_timeout": 2}
            assert {s.config.name: s.failures for s in b.pool.servers} == {
                s.config.name: s.failures for s in reference.pool.servers
            }
        unanswered = {s.config.name for s in kernel.pool.servers if s.failures}
        assert len(unanswered) == 1 and answered.server.config.name not in unanswered
    finally:
        core.close()


@needs_kernel
def test_a_udp_flows_first_reply_is_timed_in_the_kernel_and_folded_at_the_poll(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UDP session's reply is forwarded and timed by the program; the daemon's poll (no frame of the session
    reaches the balancer) makes of it what the userspace path makes of the reply: ESTABLISHED, a response time,
    a passive-health success, nothing more watched."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch)
    kernel = core.balancer
    try:
        now = loop.clock()
        query = client_udp(sport=40000)
        ((_, first),) = core.receive_batch([(0, query)], now)
        assert reference.receive(0, query, now) == [(_, first)]
        c2s = label_of(first)
        session = kernel.sessions.by_c2s(c2s)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac
        c0 = client_addr(0)
        answer = from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_UDP, udp_datagram(VIP, c0, 53, 40000, b"answer")),
                             port=port, mac=mac)  # fmt: skip
        time.sleep(0.002)
        ((_, sent),) = reference.receive(port, answer, loop.clock())
        with entered(lb):
            run = core.offload.run(answer, port)
        assert run.retval == bpf.XDP_REDIRECT and run.data == sent
        assert session.state is SessionState.START and kernel.frames_in == 1  # not yet folded
        core.offload.poll()
        theirs = reference.sessions.by_c2s(c2s)
        assert theirs is not None
        assert session.state is theirs.state is SessionState.ESTABLISHED and not session.rt_pending
        assert session.server.rt_ewma is not None and session.server.answered_at > 0
        assert kernel.switching.watch[c2s + 1] == reference.switching.watch[c2s + 1] == 0
        assert kernel.frames_in == 1 and core.offload.stats()["measuring"] == 0
    finally:
        core.close()


@needs_kernel
def test_an_established_session_the_kernel_saw_is_not_evicted_as_half_open(
    topo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for one half-open session: a session whose handshake only the kernel saw complete is not the oldest
    half-open one when the next SYN comes (its record is read first), as in userspace; an unanswered one is."""
    lb, _ = topo
    core, reference, loop = _measured_pair(lb, tmp_path, monkeypatch, half_open_share=1e-9)
    kernel = core.balancer
    c0 = client_addr(0)
    try:

        def syn(sport: int) -> int:
            now = loop.clock()
            frame = ether(PORT_MAC[0], client_mac(0),
                          ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, SYN)))  # fmt: skip
            ((_, sent),) = core.receive_batch([(0, frame)], now)
            assert reference.receive(0, frame, now) == [(_, sent)]
            return label_of(sent)

        c2s = syn(40000)
        session = kernel.sessions.by_c2s(c2s)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac
        synack = from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, tcp_segment(VIP, c0, 80, 40000, SYN | ACK)),
                             port=port, mac=mac)  # fmt: skip
        time.sleep(0.002)
        for p, frame in ((port, synack), (0, from_client(c2s, v4_tcp(ACK)))):
            reference.receive(p, frame, loop.clock())
            with entered(lb):
                assert core.offload.run(frame, p).retval == bpf.XDP_REDIRECT
        syn(40001)  # the first session is established: nobody to evict
        syn(40002)  # the second never was: evicted
        for b in (kernel, reference):
            assert b.sessions.ended == {"half_open_evicted": 1} and b.live == 2
        assert session.state is SessionState.ESTABLISHED
    finally:
        core.close()
