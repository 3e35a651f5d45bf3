"""AF_PACKET ports (plain socket and TPACKET_V3 ring) on a veth pair in a throwaway namespace (root), and the BPF
filter builder (no root)."""

from __future__ import annotations

import itertools
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from helpers import (
    DAEMON_TOML,
    ETH_P_LOCAL_EXP,
    VIP,
    VIP6,
    client_addr,
    frames_of,
    ip,
    make_config,
    tcp,
    wait_until_ready,
)
from mplslb.balancer import Balancer
from mplslb.drivers.afpacket import (
    DEFAULT_RETIRE_MS,
    DEFAULT_SOCKET_RCVBUF,
    MAX_RETIRE_MS,
    MAX_SOCKET_RCVBUF,
    MMSG_BATCH,
    PacketPort,
    RingPort,
    open_port,
)
from mplslb.drivers.loop import BalancerDriver, Loop
from mplslb.drivers.netns import entered
from mplslb.drivers.socket_filter import BPF_ACCEPT, BPF_DROP, BPF_RET_K, PACKET_OTHERHOST, bpf_program, host_only
from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.ethernet import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_MPLS_UC,
    build_ethernet,
)
from mplslb.wire.frame import dissect
from mplslb.wire.ip import IPPROTO_ICMPV6, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.mpls import stack_of

WAIT = 10.0  # seconds any exchange may take, at most
CHUNK = 16  # frames sent between reads, well inside a socket's receive buffer
_serial = itertools.count()
OTHER_VIP = bytes((10, 0, 0, 101))

root = pytest.mark.root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces, veth pairs, packet sockets")
PortClass = Callable[..., PacketPort | RingPort]
KINDS = [pytest.param(PacketPort, id="plain"), pytest.param(RingPort, id="ring")]


def ring_small(ifname: str, **kwargs: Any) -> RingPort:
    """A ring of 16 x 256 KiB: enough for the bursts below, small enough for a test."""
    return RingPort(ifname, block_size=1 << 18, block_nr=16, **kwargs)


def opener(kind: PortClass) -> PortClass:
    return ring_small if kind is RingPort else kind


@pytest.fixture
def veth() -> Iterator[tuple[str, str, str]]:
    """A namespace holding a veth pair (both ends up, IPv6 off so the kernel sends nothing): (netns, a, b)."""
    pid = os.getpid()
    name, a, b = f"mlbt{pid}a{next(_serial)}", f"mlbt{pid}a", f"mlbt{pid}b"
    try:
        netns.create(name)
        with entered(name):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            with IPRoute() as ipr:
                ipr.link("add", ifname=a, kind="veth", peer=b)
                for ifname in (a, b):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                wait_until_ready(ipr, (a, b))
        yield name, a, b
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@pytest.fixture
def ports(veth: tuple[str, str, str]) -> Iterator[Callable[..., PacketPort | RingPort]]:
    """Opens ports in the veth namespace and closes every one of them after the test."""
    name = veth[0]
    opened: list[PacketPort | RingPort] = []

    def open_in(kind: PortClass, ifname: str, **kwargs: Any) -> PacketPort | RingPort:
        port = opener(kind)(ifname, netns=name, **kwargs)
        opened.append(port)
        return port

    try:
        yield open_in
    finally:
        for port in opened:
            port.close()


def read_until(port: PacketPort | RingPort, n: int, got: list[bytes], deadline: float) -> list[bytes]:
    while len(got) < n and time.monotonic() < deadline:
        select.select([port], [], [], 0.05)
        got += port.recv_burst()
    return got


def carry(sender: PacketPort | RingPort, receiver: PacketPort | RingPort, frames: list[bytes]) -> list[bytes]:
    """Send ``frames``, reading the other end between chunks; returns what arrived (bounded by time)."""
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    for i, frame in enumerate(frames):
        sender.send(frame)
        if i % CHUNK == CHUNK - 1:
            got += receiver.recv_burst(256)
    return read_until(receiver, len(frames), got, deadline)


# -- the filter program (no root) -----------------------------------------------------------------------------
def test_bpf_program_without_accept_only_drops_outgoing():
    prog = bpf_program(None)
    assert len(prog) == 4 and prog[-2:] == [(BPF_RET_K, 0, 0, BPF_ACCEPT), (BPF_RET_K, 0, 0, BPF_DROP)]


def test_bpf_program_jumps_land_inside_the_program():
    for accept in ({ETH_P_MPLS_UC}, {ETH_P_MPLS_UC, ETH_P_IP, ETH_P_IPV6}, set(range(0x8800, 0x8820))):
        prog = bpf_program(accept)
        assert prog[-2:] == [(BPF_RET_K, 0, 0, BPF_DROP), (BPF_RET_K, 0, 0, BPF_ACCEPT)]
        for at, (code, jt, jf, _) in enumerate(prog):
            if code == 0x15:
                assert at + 1 + max(jt, jf) < len(prog)


def test_bpf_program_refuses_bad_sets():
    for bad in (set(), {0x10000}, set(range(200))):
        with pytest.raises(ValueError):
            bpf_program(bad)


# -- on a veth pair (root) ------------------------------------------------------------------------------------
@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", [[64] * 1000, [1500] * 1000, [60, 64, 1500, 1514] * 250], ids=["64", "1500", "mix"])
def test_frames_cross_byte_for_byte_in_order(ports, veth, kind, sizes):
    _, a, b = veth
    left, right = ports(kind, a), ports(kind, b)
    frames = frames_of(sizes, right.mac, left.mac)
    got = carry(left, right, frames)
    assert len(got) == len(frames)
    assert got == frames
    assert left.recv_burst() == []  # our own frames are not read back
    assert right.stats() == (1000, 0)  # the kernel dropped none
    assert not left.drops and not right.drops


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_both_directions_and_own_frames_ignored(ports, veth, kind):
    _, a, b = veth
    left, right = ports(kind, a), ports(kind, b)
    there = frames_of([100] * 20, right.mac, left.mac)
    back = frames_of([200] * 20, left.mac, right.mac)
    assert carry(left, right, there) == there
    assert carry(right, left, back) == back
    time.sleep(0.01)
    assert left.recv_burst() == [] and right.recv_burst() == []


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_accept_filter_keeps_only_the_named_ethertypes(ports, veth, kind):
    _, a, b = veth
    left = ports(kind, a)
    right = ports(kind, b, accept={ETH_P_MPLS_UC, ETH_P_IP})
    dst, src = right.mac, left.mac
    payload = stack_of([1001]) + bytes(40)
    mixed = [
        build_ethernet(dst, src, ETH_P_MPLS_UC) + payload,
        build_ethernet(dst, src, ETH_P_LOCAL_EXP) + payload,
        build_ethernet(dst, src, ETH_P_IP) + bytes(46),
        build_ethernet(dst, src, ETH_P_IPV6) + bytes(46),
        build_ethernet(dst, src, ETH_P_MPLS_UC, [7]) + payload,  # tagged: the tag is offloaded, then put back
        build_ethernet(dst, src, ETH_P_LOCAL_EXP, [7]) + payload,
        build_ethernet(dst, src, ETH_P_MPLS_UC, [7, 9]) + payload,  # Q-in-Q: the inner tag stays in the frame
    ]
    for frame in mixed:
        left.send(frame)
    expected = [mixed[0], mixed[2], mixed[4], mixed[6]]
    got = read_until(right, len(expected), [], time.monotonic() + WAIT)
    time.sleep(0.02)
    got += right.recv_burst()
    assert got == expected


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_vlan_tags_are_put_back(ports, veth, kind):
    _, a, b = veth
    left, right = ports(kind, a), ports(kind, b)
    tagged = [
        build_ethernet(right.mac, left.mac, ETH_P_MPLS_UC, [0x2005]) + stack_of([1001]) + bytes(40),  # PCP 1
        build_ethernet(right.mac, left.mac, ETH_P_MPLS_UC, [100, 200]) + stack_of([1003]) + bytes(40),
        build_ethernet(right.mac, left.mac, ETH_P_8021Q) + (0).to_bytes(2, "big") + b"\x88\x47" + bytes(44),
    ]
    assert int.from_bytes(tagged[1][12:14], "big") == ETH_P_8021AD
    assert carry(left, right, tagged) == tagged


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_ring_or_socket_bursts_are_capped_and_resume(ports, veth, kind):
    _, a, b = veth
    left = ports(PacketPort, a)
    right = ports(kind, b) if kind is RingPort else ports(kind, b, rcvbuf=4 << 20)
    frames = frames_of([80] * 1000, right.mac, left.mac)
    for frame in frames:
        left.send(frame)
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(got) < len(frames) and time.monotonic() < deadline:
        select.select([right], [], [], 0.05)
        burst = right.recv_burst(7)
        assert len(burst) <= 7
        got += burst
    assert got == frames


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_mac_is_the_interfaces_and_promisc_lasts_while_open(ports, veth, kind):
    name, a, _ = veth

    def link(ifname: str) -> Any:
        with entered(name), IPRoute() as ipr:
            return ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]

    port = ports(kind, a, promisc=True)
    info = link(a)
    assert port.mac.hex(":") == info.get("IFLA_ADDRESS")
    assert info.get("IFLA_PROMISCUITY") == 1  # a membership counts here; IFF_PROMISC shows only what users set
    port.close()
    assert link(a).get("IFLA_PROMISCUITY") == 0


@root
@needs_root
def test_a_plain_socket_burst_spans_several_system_calls_in_order(ports, veth):
    _, a, b = veth
    left, right = ports(PacketPort, a), ports(PacketPort, b, rcvbuf=4 << 20)
    frames = frames_of([64, 1514, 200] * 100, right.mac, left.mac)
    for frame in frames:
        left.send(frame)
    time.sleep(0.05)
    first = right.recv_burst(3 * MMSG_BATCH + 5)  # more than one recvmmsg takes
    assert len(first) == 3 * MMSG_BATCH + 5
    assert first + read_until(right, len(frames) - len(first), [], time.monotonic() + WAIT) == frames
    assert not right.drops


@root
@needs_root
def test_a_plain_socket_counts_a_frame_longer_than_its_buffer_as_truncated(ports, veth):
    _, a, b = veth
    left, right = ports(PacketPort, a), ports(PacketPort, b, bufsize=128)
    frames = frames_of([100, 200, 128, 129, 60], right.mac, left.mac)
    for frame in frames:
        left.send(frame)
    got = read_until(right, 3, [], time.monotonic() + WAIT)
    time.sleep(0.02)
    assert got + right.recv_burst() == [frames[0], frames[2], frames[4]]
    assert right.drops == {"truncated": 2}


@root
@needs_root
def test_a_long_burst_with_a_tagged_or_a_truncated_frame_reads_each_as_a_short_one_does(ports, veth):
    """Bursts long enough to be checked with numpy: one holding a frame whose VLAN tag the kernel took off, one a
    frame too long for its slot, one neither; each read as frame by frame, the tag put back, the long one
    counted."""
    _, a, b = veth
    left, right = ports(PacketPort, a), ports(PacketPort, b, bufsize=128)
    plain = [build_ethernet(right.mac, left.mac, ETH_P_IP) + i.to_bytes(4, "big") + bytes(60) for i in range(40)]
    tagged = build_ethernet(right.mac, left.mac, ETH_P_MPLS_UC, [7]) + stack_of([1001]) + bytes(60)
    long = plain[20] + bytes(100)
    for burst, expected in (
        ([*plain[:10], tagged, *plain[10:]], [*plain[:10], tagged, *plain[10:]]),
        ([*plain[:20], long, *plain[20:]], plain),
        (plain, plain),
    ):
        for frame in burst:
            left.send(frame)
        time.sleep(0.05)
        assert right.recv_burst(64) == expected
    assert right.drops == {"truncated": 1}


@root
@needs_root
def test_a_plain_socket_finishes_the_checksum_its_sender_left_to_an_offload(ports, veth):
    """A datagram the namespace's own stack sends out of a veth carries a partial checksum (veth offloads it):
    the port on the other end reads it with the sum completed, as it will leave."""
    name, a, b = veth
    right = ports(PacketPort, b)
    with entered(name), IPRoute() as ipr:
        index = ipr.link_lookup(ifname=a)[0]
        ipr.addr("add", index=index, address="10.99.0.1", prefixlen=24)
        ipr.neigh("add", dst="10.99.0.2", lladdr=":".join(f"{x:02x}" for x in right.mac), ifindex=index, state=0x80)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"partial checksum" * 20, ("10.99.0.2", 4242))
    got = read_until(right, 1, [], time.monotonic() + WAIT)
    udp_frames = [f for f in got if dissect(f).proto == IPPROTO_UDP]
    assert len(udp_frames) == 1, got
    frame, d = udp_frames[0], dissect(udp_frames[0])
    assert d.ip is not None and d.dport == 4242 and not right.drops
    segment = frame[d.ip.payload_offset : d.ip.end]
    assert internet_checksum(segment, pseudo_header_sum(d.src, d.dst, IPPROTO_UDP, len(segment))) == 0


@root
@needs_root
def test_a_plain_socket_sends_a_burst_in_order_counting_each_frame_it_cannot_send(ports, veth):
    """send_many gathers frames into sendmmsg calls: more than one call's worth arrive in order; a frame longer
    than the link takes, or than a slot, is counted under its errno's name and the frames after it still go."""
    _, a, b = veth
    left, right = ports(PacketPort, a), ports(PacketPort, b, rcvbuf=4 << 20)
    good = frames_of([64, 1514, 300] * 50, right.mac, left.mac)
    too_long, beyond_a_slot = good[0] + bytes(2000), good[0] + bytes(70_000)
    burst = [*good[:70], too_long, *good[70:75], beyond_a_slot, *good[75:]]
    errors: dict[str, int] = {}
    assert left.send_many(burst, errors) == len(good)
    assert errors == {"emsgsize": 2}
    assert read_until(right, len(good), [], time.monotonic() + WAIT) == good


@root
@needs_root
def test_a_lane_is_read_first_and_keeps_its_frames_when_the_other_socket_overflows(ports, veth):
    """More unlabelled frames than the port's buffer holds, with labelled ones among them: the labelled frames all
    wait in the lane and come first, in order; the kernel drops only unlabelled ones; each burst still gives the
    other socket a quarter of it."""
    _, a, b = veth
    left = ports(PacketPort, a)
    right = ports(PacketPort, b, accept={ETH_P_MPLS_UC, ETH_P_IP}, lane={ETH_P_MPLS_UC}, rcvbuf=1 << 20)
    labelled = [build_ethernet(right.mac, left.mac, ETH_P_MPLS_UC) + stack_of([1001 + 2 * i]) + bytes(60)
                for i in range(100)]  # fmt: skip
    plain = [build_ethernet(right.mac, left.mac, ETH_P_IP) + i.to_bytes(4, "big") + bytes(60) for i in range(5000)]
    for i, frame in enumerate(plain):
        left.send(frame)
        if i % 50 == 0:
            left.send(labelled[i // 50])
    time.sleep(0.05)
    first = right.recv_burst(64)
    assert first[:48] == labelled[:48]  # the lane's first, the other socket's quarter after them
    assert first[48:] == plain[:16]
    got = first + read_until(right, 200, [], time.monotonic() + WAIT)
    while burst := right.recv_burst(256):
        got += burst
    assert [f for f in got if f[12:14] == b"\x88\x47"] == labelled
    received, dropped = right.stats()
    assert dropped > 0, "the unlabelled frames fitted: the test did not overflow the socket"
    assert right.lane_counts == {"received": 100, "dropped": 0}
    assert received == 100 + 5000 and len(got) == received - dropped  # the kernel counts the dropped as received


@root
@needs_root
def test_a_lane_must_be_part_of_what_the_port_accepts(veth):
    name, a, _ = veth
    for accept, lane in ((None, {ETH_P_MPLS_UC}), ({ETH_P_MPLS_UC}, {ETH_P_MPLS_UC}), ({ETH_P_IP}, {ETH_P_MPLS_UC})):
        with pytest.raises(ValueError, match="lane must be a part of accept"):
            PacketPort(a, netns=name, accept=accept, lane=lane)


@root
@needs_root
def test_open_port_picks_the_kind(veth):
    name, a, _ = veth
    with open_port(a, netns=name) as plain, open_port(a, ring=True, accept={ETH_P_MPLS_UC}, netns=name) as ring:
        assert type(plain) is PacketPort and type(ring) is RingPort
        assert ring.accept == frozenset({ETH_P_MPLS_UC}) and plain.accept is None


@root
@needs_root
def test_open_port_passes_the_retire_timer_to_rings(veth):
    name, a, _ = veth
    with open_port(a, ring=True, netns=name) as default, open_port(a, ring=True, netns=name, retire_ms=20) as set_:
        assert isinstance(default, RingPort) and isinstance(set_, RingPort)
        assert (default.retire_ms, set_.retire_ms) == (DEFAULT_RETIRE_MS, 20)
    assert DEFAULT_RETIRE_MS >= 8  # with 1 ms the ring held a seventh of the frames its memory has room for


def test_daemon_config_ring_retire_ms(tmp_path):
    from mplslb.config import ConfigError
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "lb.toml"
    path.write_text("ring = true\n" + DAEMON_TOML)
    assert load_daemon_config(path, need_interfaces=False).ring_retire_ms == DEFAULT_RETIRE_MS
    path.write_text("ring = true\nring_retire_ms = 16\n" + DAEMON_TOML)
    assert load_daemon_config(path, need_interfaces=False).ring_retire_ms == 16
    for bad in ("0", "-1", str(MAX_RETIRE_MS + 1), '"8"'):
        path.write_text(f"ring = true\nring_retire_ms = {bad}\n" + DAEMON_TOML)
        with pytest.raises(ConfigError, match="ring_retire_ms"):
            load_daemon_config(path, need_interfaces=False)


@root
@needs_root
def test_open_port_gives_a_plain_socket_its_receive_buffer(veth):
    """The kernel doubles a receive buffer it is given (its own accounting) and keeps its default otherwise; a ring
    takes none."""
    import socket

    name, a, _ = veth
    with open_port(a, netns=name) as default, open_port(a, netns=name, rcvbuf=DEFAULT_SOCKET_RCVBUF) as set_:
        assert isinstance(default, PacketPort) and isinstance(set_, PacketPort)
        got = set_._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert got == 2 * DEFAULT_SOCKET_RCVBUF  # past net.core.rmem_max: set as root (SO_RCVBUFFORCE)
        assert default._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < got
    with pytest.raises(ValueError, match="rcvbuf"):
        open_port(a, ring=True, netns=name, rcvbuf=1 << 20)


def test_daemon_config_socket_rcvbuf(tmp_path):
    from mplslb.config import ConfigError
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "lb.toml"
    path.write_text(DAEMON_TOML)
    assert load_daemon_config(path, need_interfaces=False).socket_rcvbuf == DEFAULT_SOCKET_RCVBUF
    path.write_text("socket_rcvbuf = 1048576\n" + DAEMON_TOML)
    assert load_daemon_config(path, need_interfaces=False).socket_rcvbuf == 1 << 20
    for bad, why in (("0", "bytes from"), ("1024", "bytes from"), (str(MAX_SOCKET_RCVBUF + 1), "bytes from"),
                     ('"8M"', "socket_rcvbuf"), ("1048576\nring = true", "plain packet sockets")):  # fmt: skip
        path.write_text(f"socket_rcvbuf = {bad}\n" + DAEMON_TOML)
        with pytest.raises(ConfigError, match=why):
            load_daemon_config(path, need_interfaces=False)


def test_ring_geometry_is_checked():
    with pytest.raises(ValueError):
        RingPort("lo", block_size=1000)
    with pytest.raises(ValueError):
        RingPort("lo", frame_size=100)


@root
@needs_root
def test_balancer_driver_on_ring_ports(veth, ports):
    """A client's SYN put on the wire of port 0 leaves port 2 labelled for the server (one veth pair: port 0 is one
    end, port 2 the other, and the test reads what the balancer sends on a third socket)."""
    _, a, b = veth
    config = make_config(n_servers=1)
    balancer = Balancer(config)
    client_side, server_side = ports(RingPort, a), ports(RingPort, b)
    wire = ports(PacketPort, a)  # sees what arrives on a: frames the balancer sent out of b
    loop = Loop()
    driver = BalancerDriver(balancer, {0: client_side, 2: server_side}, loop)
    try:
        syn = tcp(client_addr(0), VIP, 40000, 80, 0x02)
        server_mac = config.servers[0].mac
        frame = build_ethernet(config.ports[0].mac, bytes.fromhex("02c000000000"), ETH_P_IP) + syn
        with open_port(b, netns=veth[0]) as injector:
            injector.send(frame)  # leaves b, arrives on a: the balancer's client port reads it
            got: list[bytes] = []
            deadline = time.monotonic() + WAIT
            while not got and time.monotonic() < deadline:
                loop.run_once(0.05)
                got = [f for f in wire.recv_burst() if f[0:6] == server_mac]
        assert len(got) == 1
        assert got[0][12:14] == b"\x88\x47" and got[0][18:] == syn
        assert driver.frames_read[0] == 1 and driver.frames_written[2] == 1 and not driver.send_errors
    finally:
        driver.close()
        loop.close()


def test_host_only_program_drops_other_hosts_frames_first():
    prog = host_only(bpf_program({ETH_P_MPLS_UC}))
    assert prog[2] == (prog[1][0], prog[2][1], 0, PACKET_OTHERHOST)
    for i, (code, jt, jf, _) in enumerate(prog):  # every jump lands inside the program, on a return for drops
        if code == prog[1][0]:
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert prog[2 + 1 + prog[2][1]] == prog[1 + 1 + prog[1][1]]  # both drop to the same instruction


def test_a_destination_list_tests_each_address_without_a_tag_and_with_one():
    accept = {ETH_P_MPLS_UC, ETH_P_IP, ETH_P_IPV6, ETH_P_ARP}
    prog = bpf_program(accept, [VIP, OTHER_VIP, VIP6])
    assert prog[-2:] == [(BPF_RET_K, 0, 0, BPF_DROP), (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    for at, (code, jt, jf, _) in enumerate(prog):
        if code == 0x15:
            assert at + 1 + max(jt, jf) < len(prog)
    tests = [k for code, _, _, k in prog if code == 0x15]
    words = [int.from_bytes(VIP6[i : i + 4]) for i in range(0, 16, 4)]
    constants = [int.from_bytes(VIP), int.from_bytes(OTHER_VIP), IPPROTO_ICMPV6, *words]
    for k in constants:
        assert tests.count(k) == 2 * constants.count(k)  # without a VLAN tag and with one
    assert len(prog) == len(bpf_program(accept)) + 2 * (1 + 2) + 2 * (2 + 8)
    for bad in ([], [bytes(15)]):
        with pytest.raises(ValueError):
            bpf_program(accept, bad)
    for versions, address in (({ETH_P_MPLS_UC, ETH_P_IPV6}, VIP), ({ETH_P_MPLS_UC, ETH_P_IP}, VIP6)):
        with pytest.raises(ValueError):
            bpf_program(versions, [address])  # that IP version is not taken at all
    with pytest.raises(ValueError):
        bpf_program(accept, [bytes(12) + i.to_bytes(4) for i in range(16)])  # too long a program


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_a_port_with_destinations_takes_ip_frames_to_them_only(ports, veth, kind):
    """A client port's filter: IPv4 and IPv6 frames to a virtual IP, with or without VLAN tags, ICMPv6 (neighbour
    discovery) and every other ethertype it accepts reach the port; IP frames to another address (the host's own
    traffic, a flood at it) do not."""
    _, a, b = veth
    left = ports(kind, a)
    accept = {ETH_P_MPLS_UC, ETH_P_IP, ETH_P_IPV6, ETH_P_ARP}
    right = ports(kind, b, accept=accept, destinations=[VIP, OTHER_VIP, VIP6])
    host, host6, solicited = bytes((10, 99, 0, 1)), ip("fd00::99"), ip("ff02::1:ff00:100")

    def to(dst: bytes, tags: tuple[int, ...] = (), proto: int = IPPROTO_UDP) -> bytes:
        if len(dst) == 4:
            return (
                build_ethernet(right.mac, left.mac, ETH_P_IP, tags)
                + build_ipv4(client_addr(0), dst, proto, 8)
                + bytes(28)
            )
        header = build_ipv6(ip("fd00::7"), dst, proto, 8)
        return build_ethernet(right.mac, left.mac, ETH_P_IPV6, tags) + header + bytes(8)

    wanted = [
        to(VIP),
        to(OTHER_VIP, (7,)),
        to(VIP, (100, 200)),
        to(VIP6),
        to(VIP6, (7,)),
        to(solicited, proto=IPPROTO_ICMPV6),
        to(host6, (7,), proto=IPPROTO_ICMPV6),
        build_ethernet(right.mac, left.mac, ETH_P_ARP) + bytes(46),
        build_ethernet(right.mac, left.mac, ETH_P_MPLS_UC) + stack_of([1001]) + bytes(46),
    ]
    unwanted = [to(host), to(host, (7,)), to(host, (100, 200)), to(host6), to(host6, (7,)), to(VIP6[:-1] + b"\x01")]
    for frame in (*unwanted[:3], *wanted[:3], *unwanted[3:], *wanted[3:]):
        left.send(frame)
    got = read_until(right, len(wanted), [], time.monotonic() + WAIT)
    time.sleep(0.05)
    got += right.recv_burst()
    assert got == wanted


@root
@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_host_only_port_takes_frames_to_it_and_broadcasts_not_other_hosts(ports, veth, kind):
    _, a, b = veth
    left = ports(kind, a)
    right = ports(kind, b, host_only=True)
    payload = bytes(50)
    to_it = build_ethernet(right.mac, left.mac, ETH_P_LOCAL_EXP) + b"\x01" + payload
    to_other = build_ethernet(b"\x02\x77\x77\x77\x77\x77", left.mac, ETH_P_LOCAL_EXP) + b"\x02" + payload
    broadcast = build_ethernet(b"\xff" * 6, left.mac, ETH_P_LOCAL_EXP) + b"\x03" + payload
    for frame in (to_other, to_it, to_other, broadcast):
        left.send(frame)
    got = read_until(right, 2, [], time.monotonic() + WAIT)
    time.sleep(0.05)
    got += right.recv_burst()
    assert got == [to_it, broadcast]
