"""The kernel offload's super-packet path (``offload_gso``): the tc program switches a frame longer than one segment
exactly as the XDP program and the userspace one-frame path switch it, byte for byte, or drops it under a named
reason; the XDP variant leaves such frames to it; the daemon's socket filter leaves them out and finishes partial
checksums; the configuration key is checked.

The programs run on each frame with ``BPF_PROG_TEST_RUN`` (in throwaway namespaces: the entries name real
interfaces); the lab test (tests/test_offload_gso_lab.py) moves real super-packets. Root and clang are needed for
all but the configuration and codec tests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    DAEMON_TOML,
    FIN,
    PORT_MAC,
    PSH,
    RST,
    VIP,
    client_addr,
    client_mac,
    ether,
    header_mutation,
    ip_packet,
    ipv4,
    labelled,
    mutate,
    recording,
    standard_balancer,
    tcp_segment,
    udp_datagram,
)
from mplslb.balancer import Balancer
from mplslb.config import ConfigError, Section, read_offload_gso
from mplslb.drivers import socket_filter
from mplslb.drivers.netns import entered
from mplslb.offload import bpf
from mplslb.offload.build import build_object
from mplslb.offload.xdp import (
    GSO_DEFINE,
    GSO_PIN,
    MAP_SYMBOL,
    PIN_ROOT,
    REQUEST_MAP_SYMBOL,
    SYN_MAP_SYMBOL,
    XdpOffload,
)
from mplslb.switching import WATCH_ALL, FastEvent, switch_frame
from mplslb.switching.layout import (
    ETH_HLEN,
    GSO_COUNTERS,
    IP_AT,
    LSE_AT,
    LSE_LEN,
    REQUEST_COPY,
    TCP_CHECK_AT,
    TCP_FLAGS,
    WATCH_REQUEST,
)
from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.frame import complete_l4_checksum, dissect
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv6 import IPV6_HLEN
from mplslb.wire.tcp import tcp_checksum_ok
from mplslb.wire.udp import udp_checksum_ok
from test_offload import (  # noqa: F401 - topo and obj are fixtures
    PORTS,
    A,
    C,
    D,
    F,
    G,
    from_client,
    from_server,
    install_all,
    label_of,
    needs_kernel,
    obj,
    topo,
    v4_tcp,
    v6_packet,
)

FRAME_MAX = 1500 + ETH_HLEN + LSE_LEN  # the topology's veths keep the default MTU
BIG = bytes(range(256)) * 12  # a payload of 3072 octets: every frame carrying it is a super-packet here


# -- configuration ------------------------------------------------------------------------------------------------
def test_offload_gso_key_is_validated() -> None:
    assert read_offload_gso(Section("lb.toml", "", {}), "kernel", ring=False) is False
    assert read_offload_gso(Section("lb.toml", "", {"offload_gso": True}), "kernel", ring=False) is True
    with pytest.raises(ConfigError, match=r"lb.toml.*offload_gso.*offload = \"kernel\""):
        read_offload_gso(Section("lb.toml", "", {"offload_gso": True}), "none", ring=False)
    with pytest.raises(ConfigError, match=r"offload_gso.*ring"):
        read_offload_gso(Section("lb.toml", "", {"offload_gso": True}), "kernel", ring=True)
    with pytest.raises(ConfigError, match="offload_gso"):
        read_offload_gso(Section("lb.toml", "", {"offload_gso": "yes"}), "kernel", ring=False)


def test_the_daemon_names_the_datapath_of_established_sessions(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "lb.toml"
    named = {}
    for top in ("", "ring = true\n", 'offload = "kernel"\n', 'offload = "kernel"\noffload_gso = true\n'):
        path.write_text(top + DAEMON_TOML)
        named[top] = load_daemon_config(path, need_interfaces=False).datapath
    assert list(named.values()) == [
        "userspace (packet sockets)",
        "userspace (TPACKET rings, block path)",
        "kernel (XDP)",
        "kernel (XDP, tc for super-packets)",
    ]


def test_daemon_config_rejects_offload_gso_where_it_cannot_work(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "lb.toml"
    gso = 'offload = "kernel"\noffload_gso = true\n'
    path.write_text(gso + DAEMON_TOML)
    assert load_daemon_config(path, need_interfaces=False).offload_gso is True
    path.write_text(gso + "ring = true\n" + DAEMON_TOML)
    with pytest.raises(ConfigError, match="ring"):
        load_daemon_config(path, need_interfaces=False)
    path.write_text(gso + DAEMON_TOML + "\n[state]\npersist = true\n")
    kept = load_daemon_config(path, need_interfaces=False)
    assert kept.offload_gso and kept.state_dir  # the tc program and its links are pinned with the rest
    path.write_text("offload_gso = true\n" + DAEMON_TOML)
    with pytest.raises(ConfigError, match="offload_gso"):
        load_daemon_config(path, need_interfaces=False)
    # every namespace has lo, and lo is no veth
    path.write_text(gso + DAEMON_TOML.replace('"lc0p0"', '"lo"'))
    with pytest.raises(ConfigError) as info:
        load_daemon_config(path)
    assert str(path) in str(info.value) and "offload_gso" in str(info.value) and "'lo'" in str(info.value)


# -- the socket filter and partial checksums -----------------------------------------------------------------------
def test_length_cap_drops_longer_frames_first_and_keeps_the_program() -> None:
    program = socket_filter.bpf_program({0x8847})
    capped = socket_filter.length_cap(program, FRAME_MAX)
    assert capped[3:] == program
    assert capped[0] == (socket_filter.BPF_LD_W_LEN, 0, 0, 0)
    assert capped[1] == (socket_filter.BPF_JGT_K, 0, 1, FRAME_MAX)
    assert capped[2] == (socket_filter.BPF_RET_K, 0, 0, socket_filter.BPF_DROP)
    with pytest.raises(ValueError, match="max_len"):
        socket_filter.length_cap(program, 0)


def _partial(frame: bytes) -> bytes:
    """``frame`` with its TCP or UDP checksum replaced by what a sender leaving it to an offload puts there."""
    d = dissect(frame, verify_checksum=False, follow_udp=False)
    assert d.ip is not None
    at = d.ip.payload_offset + (TCP_CHECK_AT if d.proto == IPPROTO_TCP else 6)
    return frame[:at] + b"\x12\x34" + frame[at + 2 :]


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=300), v6=st.booleans(), udp=st.booleans(), label=st.booleans())
def test_a_partial_checksum_is_finished_as_the_sender_would(payload: bytes, v6: bool, udp: bool, label: bool) -> None:
    src, dst = client_addr(0, v6=v6), (bytes(15) + b"\x01") if v6 else VIP

    body = udp_datagram(src, dst, 4000, 53, payload) if udp else tcp_segment(src, dst, 4000, 80, ACK, payload)
    packet = ip_packet(src, dst, IPPROTO_UDP if udp else IPPROTO_TCP, body)
    frame = labelled(PORT_MAC[2], client_mac(0), 101, packet) if label else ether(PORT_MAC[0], client_mac(0), packet)
    done = complete_l4_checksum(_partial(frame))
    assert done == frame
    d = dissect(done)
    assert d.ip is not None
    segment = done[d.ip.payload_offset : d.ip.end]
    assert (udp_checksum_ok if udp else tcp_checksum_ok)(src, dst, segment)


def test_mpls_in_udp_has_its_outer_checksum_finished() -> None:
    inner = labelled(PORT_MAC[2], client_mac(0), 101, v4_tcp(ACK, b"data"))[ETH_HLEN:]
    datagram = udp_datagram(client_addr(0), VIP, 49152, 6635, inner)
    frame = ether(PORT_MAC[0], client_mac(0), ipv4(client_addr(0), VIP, IPPROTO_UDP, datagram))
    assert complete_l4_checksum(_partial(frame)) == frame


def test_a_frame_with_no_whole_segment_is_not_finished() -> None:
    frame = from_client(A, v4_tcp(ACK, b"data"))
    assert complete_l4_checksum(frame[:30]) is None  # the IP header cut
    assert complete_l4_checksum(ether(PORT_MAC[0], client_mac(0), b"")) is None  # no IP at all
    later = ipv4(client_addr(0), VIP, IPPROTO_TCP, b"\x10" * 24, flags=0, frag_offset=64)
    assert complete_l4_checksum(ether(PORT_MAC[0], client_mac(0), later)) is None


# -- the programs, frame by frame ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gso_obj(tmp_path_factory: pytest.TempPathFactory, obj: bytes) -> bytes:  # noqa: F811
    return build_object(directory=tmp_path_factory.mktemp("gso"), defines={GSO_DEFINE: FRAME_MAX})


class Programs:
    """The gso offload on the topology's ports, and the plain XDP program loaded over the same maps: the frames the
    three paths make of one input."""

    def __init__(self, lb: str, balancer: Balancer, obj: bytes, gso_obj: bytes) -> None:  # noqa: F811
        self.lb = lb
        with entered(lb):
            self.offload = XdpOffload(balancer.switching, {i: f"p{i}" for i in PORTS}, obj=gso_obj, gso=True)
            self.offload.open()
            maps = {
                MAP_SYMBOL: self.offload._map.fd,  # type: ignore[union-attr]
                SYN_MAP_SYMBOL: self.offload._syn.fd,  # type: ignore[union-attr]
                REQUEST_MAP_SYMBOL: self.offload._requests.fd,  # type: ignore[union-attr]
            } | {symbol: m.fd for symbol, m in self.offload._ticket_maps.items()}
            self.plain = bpf.load_program(obj, "xdp", maps, prog_type=bpf.BPF_PROG_TYPE_XDP, name="plain_xdp")

    def xdp(self, frame: bytes, port: int) -> bpf.TestRun:
        with entered(self.lb):
            return bpf.prog_test_run(self.plain, frame, ingress_ifindex=self.offload.ifindex[port])

    def variant(self, frame: bytes, port: int) -> bpf.TestRun:
        with entered(self.lb):
            return self.offload.run(frame, port)

    def tc(self, frame: bytes, port: int) -> bpf.TestRun:
        with entered(self.lb):
            return self.offload.run_tc(frame, port)

    def close(self) -> None:
        os.close(self.plain)
        self.offload.close()


@pytest.fixture
def programs(topo: tuple[str, str], obj: bytes, gso_obj: bytes) -> Iterator[tuple[Programs, Balancer]]:  # noqa: F811
    balancer = standard_balancer()
    install_all(balancer)
    progs = Programs(topo[0], balancer, obj, gso_obj)
    try:
        yield progs, balancer
    finally:
        progs.close()


def _without_fin(frame: bytes) -> bytes:
    """``frame`` (labelled IPv4 TCP, no options) as the sender would have built it without FIN."""
    d = dissect(frame)
    assert d.ip is not None and d.l4 is not None
    tcp_at = d.ip.payload_offset
    out = bytearray(frame)
    out[tcp_at + TCP_FLAGS] &= ~FIN
    out[tcp_at + TCP_CHECK_AT : tcp_at + TCP_CHECK_AT + 2] = b"\0\0"

    total = internet_checksum(out[tcp_at : d.ip.end], pseudo_header_sum(d.src, d.dst, IPPROTO_TCP, d.ip.end - tcp_at))
    struct.pack_into("!H", out, tcp_at + TCP_CHECK_AT, total)
    return bytes(out)


def _server_reply(flags: int, payload: bytes) -> bytes:
    c0 = client_addr(0)
    return from_server(G, ipv4(VIP, c0, IPPROTO_TCP, tcp_segment(VIP, c0, 80, 40000, flags, payload)))


#: (name, ingress port, a super-packet, what the tc program does: "redirect", "redirect without fin" or the name of
#: its drop reason)
GSO_CASES: list[tuple[str, int, bytes, str]] = [
    ("tcp4", 0, from_client(A, v4_tcp(ACK | PSH, BIG)), "redirect"),
    ("tcp4 flow-bound", 0, from_client(F, v4_tcp(ACK, BIG)), "redirect"),
    ("server reply", 2, _server_reply(ACK | PSH, BIG), "redirect"),
    ("tcp6", 1, from_client(D, v6_packet(IPPROTO_TCP) + BIG, port=1, mac=client_mac(1)), "redirect"),
    ("udp6", 1, from_client(C, v6_packet(IPPROTO_UDP) + BIG, port=1, mac=client_mac(1)), "redirect"),
    ("server fin", 2, _server_reply(ACK | PSH | FIN, BIG), "redirect without fin"),
    ("client fin", 0, from_client(A, v4_tcp(ACK | FIN, BIG)), "redirect without fin"),
    ("rst", 0, from_client(A, v4_tcp(ACK | RST, BIG)), "gso_tcp_end"),
    ("ttl 1", 0, from_client(A, v4_tcp(ACK, BIG), ttl=1), "gso_ttl_expired"),
    ("wrong mac", 0, from_client(A, v4_tcp(ACK, BIG), mac=client_mac(5)), "gso_check_failed"),
    ("wrong port", 1, from_client(A, v4_tcp(ACK, BIG), port=1), "gso_check_failed"),
    ("wrong ip", 0, from_client(A, v4_tcp(ACK, BIG, src=client_addr(7))), "gso_check_failed"),
    ("unknown", 0, from_client(999, v4_tcp(ACK, BIG)), "gso_unknown_label"),
]


@needs_kernel
def test_tc_switches_super_packets_as_xdp_and_userspace_switch_them(programs: tuple[Programs, Balancer]) -> None:
    """Every case through the gso XDP variant (it leaves super-packets alone), the tc program, the plain XDP program
    and the one-frame path: what tc redirects, the other two forward with the same bytes (a FIN-carrying one with
    its FIN cleared and its checksum right); what it drops, they do not forward either, and it counts the drop by
    its reason; shorter and unlabelled frames pass untouched."""
    progs, _ = programs
    reference = standard_balancer()
    install_all(reference)
    counted: dict[str, int] = {}
    for name, port, frame, outcome in GSO_CASES:
        assert len(frame) > FRAME_MAX, name
        passed = progs.variant(frame, port)
        assert passed.retval == bpf.XDP_PASS and passed.data == frame, name
        tc = progs.tc(frame, port)
        if outcome.startswith("redirect"):
            expected_in = _without_fin(frame) if outcome.endswith("without fin") else frame
            assert tc.retval == bpf.TC_ACT_REDIRECT, name
            xdp = progs.xdp(expected_in, port)
            assert xdp.retval == bpf.XDP_REDIRECT and tc.data == xdp.data, name
            out = reference.receive(port, expected_in, 1.0)
            assert len(out) == 1 and out[0][1] == tc.data, name
            counted["gso_forwarded"] = counted.get("gso_forwarded", 0) + 1
            if expected_in != frame:
                counted["gso_fin_cleared"] = counted.get("gso_fin_cleared", 0) + 1
        else:
            assert tc.retval == bpf.TC_ACT_SHOT, name
            assert progs.xdp(frame, port).retval == bpf.XDP_PASS, name
            out = reference.receive(port, frame, 1.0)
            assert not out or outcome == "gso_tcp_end", name  # userspace forwards an RST (and reports it)
            counted[outcome] = counted.get(outcome, 0) + 1
    short = from_client(A, v4_tcp(ACK | PSH, b"GET / HTTP/1.1\r\n\r\n"))
    unlabelled = ether(PORT_MAC[0], client_mac(0), v4_tcp(ACK, BIG))
    for frame in (short, unlabelled):
        tc = progs.tc(frame, 0)
        assert tc.retval == bpf.TC_ACT_OK and tc.data == frame
    counted["gso_passed_unlabelled"] = 1
    counters = progs.offload.gso_counters()
    assert set(counters) == set(GSO_COUNTERS)
    assert {k: v for k, v in counters.items() if v} == counted
    progs.offload.poll()
    drops = progs.offload.table.drops
    assert {k: v for k, v in drops.items() if k.startswith("gso_")} == {
        k: v for k, v in counted.items() if k not in ("gso_forwarded", "gso_fin_cleared", "gso_passed_unlabelled")
    }
    assert progs.offload.stats()["gso"] == counters


@needs_kernel
def test_recorded_and_mutated_super_packets_agree_across_the_three_paths(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    gso_obj: bytes,
) -> None:
    """A recorded run replayed with the gso offload mirroring the table; each labelled frame, padded past one
    segment, and hypothesis' mutations of their headers half-way, through the tc program, the plain XDP program and
    the one-frame path: tc redirects exactly what XDP redirects, with the same bytes, which the one-frame path
    forwards too; beyond that only a FIN it cleared, whose frame XDP then redirects as tc left it."""
    config, calls = recording()
    balancer = Balancer(config)
    table = balancer.switching
    progs = Programs(topo[0], balancer, obj, gso_obj)
    seen = {"frames": 0, "redirect": 0, "fin": 0}

    def three_ways(port: int, frame: bytes, now: float) -> None:
        if len(frame) < IP_AT:
            return
        frame = frame + bytes(FRAME_MAX + 1 - len(frame)) if len(frame) <= FRAME_MAX else frame
        seen["frames"] += 1
        tc, xdp = progs.tc(frame, port), progs.xdp(frame, port)
        out: list[tuple[int, bytes]] = []
        events: list[FastEvent] = []
        drops = dict(table.drops)
        forwarded = switch_frame(table.hot, port, frame, now, out, events) >= 0
        table.drops.clear()
        table.drops.update(drops)
        if frame[12:14] != b"\x88\x47":  # tagged: the receive path would have untagged it before tc
            assert tc.retval == bpf.TC_ACT_OK and tc.data == frame
            return
        if xdp.retval == bpf.XDP_REDIRECT:
            seen["redirect"] += 1
            assert tc.retval == bpf.TC_ACT_REDIRECT and tc.data == xdp.data
            assert forwarded and out[0][1] == xdp.data
        elif tc.retval == bpf.TC_ACT_REDIRECT:  # only a FIN cleared: XDP redirects the frame as tc left it
            seen["fin"] += 1
            # the TCP header where the switch peeks at the flags: after the fixed IPv6 header or the IPv4 IHL,
            # whatever the (possibly mutated) lengths say, as the program reads it
            label = int.from_bytes(frame[LSE_AT : LSE_AT + 3], "big") >> 4
            at = IP_AT + (IPV6_HLEN if table.v6[label] else (frame[IP_AT] & 0x0F) * 4)
            cleared = bytearray(frame)
            cleared[at + TCP_FLAGS] &= ~FIN
            cleared[at + TCP_CHECK_AT : at + TCP_CHECK_AT + 2] = tc.data[at + TCP_CHECK_AT : at + TCP_CHECK_AT + 2]
            again = progs.xdp(bytes(cleared), port)
            assert frame[at + TCP_FLAGS] & FIN and again.retval == bpf.XDP_REDIRECT and again.data == tc.data
        else:
            assert tc.retval == bpf.TC_ACT_SHOT

    recorded = [(c.port, c.frame) for c in calls if c.port >= 0 and c.frame[12:14] == b"\x88\x47"]

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, 1 << 16), muts=st.lists(header_mutation, min_size=1, max_size=3))
    @example(which=47, muts=[("flip", 20, 3)])  # a FIN whose IPv4 total length says 2 kB more than it carries
    def mutated(now: float, which: int, muts: list[tuple[str, int, int]]) -> None:
        port, frame = recorded[which % len(recorded)]
        three_ways(port, mutate(frame, muts), now)

    try:
        for i, c in enumerate(calls):
            if i == len(calls) // 2:
                before = seen["frames"]
                mutated(c.now)
                assert seen["frames"] - before >= 60
            if c.port < 0:
                balancer.on_timer(c.now)
            else:
                if c.frame[12:14] == b"\x88\x47":
                    three_ways(c.port, c.frame, c.now)
                balancer.receive(c.port, c.frame, c.now)
            progs.offload.sync()
        assert seen["redirect"] > len(recorded) // 4
    finally:
        progs.close()


@needs_kernel
@pytest.mark.parametrize("l7", [False, True], ids=["no-l7", "l7"])
def test_a_measured_sessions_super_packet_is_measured_from_the_whole_packet(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    gso_obj: bytes,
    l7: bool,
) -> None:
    """Under a response-time measurement (F_RT) a server's first answer may be a super-packet: the tc program pulls
    it whole, records it and switches it, as the XDP program does with a short one; with L7 analysis (F_L7) it
    copies the request's first octets into the label's request slot first."""
    balancer = standard_balancer()

    balancer.switching.install(A, out_port=2, next_hop=PORT_MAC[2], in_port=0, peer=client_mac(0),
                               peer_ip=client_addr(0), watch=WATCH_ALL | (WATCH_REQUEST if l7 else 0))  # fmt: skip
    records: list[Any] = []
    with entered(topo[0]):
        offload = XdpOffload(balancer.switching, {i: f"p{i}" for i in PORTS}, obj=gso_obj, gso=True,
                             measured=lambda c2s, *record: records.append((c2s, record)) is None)  # fmt: skip
        offload.open()
    try:
        frame = from_client(A, v4_tcp(ACK | PSH, BIG))
        with entered(topo[0]):
            tc = offload.run_tc(frame, 0)
        assert tc.retval == bpf.TC_ACT_REDIRECT
        assert label_of(tc.data) == A and tc.data[ETH_HLEN + LSE_LEN :] == frame[ETH_HLEN + LSE_LEN :]
        entry = offload.lookup(A)
        assert entry is not None
        offload.poll()
        assert records and records[-1][0] == A and records[-1][1][2] > 0.0  # (answer, ack, request, ...)
        assert records[-1][1][5:] == ((BIG[:REQUEST_COPY], len(BIG)) if l7 else (None, 0))
        assert offload.gso_counters()["gso_forwarded"] == 1
    finally:
        offload.close()


@needs_kernel
def test_the_super_packets_program_is_kept_across_daemons(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    gso_obj: bytes,
) -> None:
    """With pins the tc program, its counters and its tcx links are pinned with the rest: while no daemon runs the
    kept program goes on switching super-packets; the next daemon with ``gso`` adopts it all (what it counted so far
    taken as the previous daemon's, not folded again); one without ``gso`` does not adopt it: the pins are let go,
    the tc program with them, and everything is loaded afresh."""
    import socket
    import time

    from mplslb.offload.bpf import unpin

    lb, _ = topo
    pins = PIN_ROOT / f"g{os.getpid() % 100000}"
    forwarded = next((port, frame) for _, port, frame, outcome in GSO_CASES if outcome == "redirect")
    dropped = next((port, frame) for _, port, frame, outcome in GSO_CASES if outcome == "gso_check_failed")

    def opened(balancer: Balancer, program: bytes, *, gso: bool) -> XdpOffload:
        with entered(lb):
            offload = XdpOffload(balancer.switching, {i: f"p{i}" for i in PORTS}, obj=program, gso=gso, pins=pins)
            offload.open()
        return offload

    def tc(offload: XdpOffload, port: int, frame: bytes) -> bpf.TestRun:
        with entered(lb):
            return offload.run_tc(frame, port)

    balancers = [standard_balancer() for _ in range(3)]
    for balancer in balancers:
        install_all(balancer)
    offload = opened(balancers[0], gso_obj, gso=True)
    try:
        switched = tc(offload, *forwarded)
        assert switched.retval == bpf.TC_ACT_REDIRECT and tc(offload, *dropped).retval == bpf.TC_ACT_SHOT
        offload.poll()
        assert balancers[0].switching.drops.get("gso_check_failed") == 1
        tc_id = bpf.prog_info(offload._tc).prog_id
        offload.close(keep=True)
        names = {p.name for p in pins.iterdir()}
        assert {GSO_PIN, "tc_prog", *(f"tclink_p{i}" for i in PORTS)} <= names
        kept = bpf.obj_get(str(pins / "tc_prog"))
        try:
            with entered(lb):
                port, frame = forwarded
                alone = bpf.prog_test_run_skb(kept, frame, ingress_ifindex=socket.if_nametoindex(f"p{port}"))
        finally:
            os.close(kept)
        assert alone.retval == bpf.TC_ACT_REDIRECT and alone.data == switched.data  # no daemon: still switching

        offload = opened(balancers[1], gso_obj, gso=True)
        assert offload.adopted and bpf.prog_info(offload._tc).prog_id == tc_id
        assert tc(offload, *forwarded).data == switched.data
        assert offload.gso_counters()["gso_forwarded"] == 3 and offload.gso_counters()["gso_check_failed"] == 1
        offload.poll()
        assert "gso_check_failed" not in balancers[1].switching.drops  # the previous daemon's, folded by it
        offload.close(keep=True)

        offload = opened(balancers[2], obj, gso=False)
        assert not offload.adopted and offload._tc < 0
        assert not any(p.name.startswith("tclink_") for p in pins.iterdir())
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                os.close(bpf.prog_fd_by_id(tc_id))
            except OSError:
                break  # gone: nothing holds the kept tc program any more
            time.sleep(0.02)
        else:
            raise AssertionError("the kept tc program is still loaded")
    finally:
        with entered(lb):
            offload.close()
        unpin(pins)
