"""The endpoints' kernel datapath (mplslb_endpoint.c) gives the frames the Python endpoint (mplslb.endpoint) gives,
byte for byte, frame by frame (``BPF_PROG_TEST_RUN`` on recorded and hypothesis-mutated frames), and learns the same
flows. Where the kernel legitimately differs, the difference is asserted here and listed in docs/architecture.md:

* frames that are not the datapath's pass untouched to the host's stack or the wire (unlabelled frames on ingress;
  on egress, a server's packets not from a virtual IP and a client's not to one), where the Python agent, which
  only sees what is routed into its TUN or labelled, counts them;
* checks the kernel leaves to the host's stack: TCP options, 802.1Q tags (the frame passes to the stack, which
  drops it);
* the IPv6 extension header walk stops after ``IPV6_EXT_MAX`` headers (``ipv6_ext_too_many``).

Root and clang are needed; nothing here touches an interface.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    PSH,
    SYN,
    VIP,
    VIP6,
    captured,
    client_addr,
    ether,
    header_mutation,
    ipv4,
    ipv6,
    labelled,
    mutate,
    mutation,
    recording,
    tcp_segment,
)
from helpers import udp_datagram as udp
from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.offload import bpf
from mplslb.offload.endpoint_fuzz import (
    HOST,
    LB,
    NOT_IN_KERNEL,
    NOW,
    Outcome,
    Pair,
    compare_egress,
    compare_ingress,
    host_frame,
    keyed_on_vip,
    packet_of,
    readdressed,
    reversed_packet,
)
from mplslb.switching.layout import IPV6_EXT_MAX
from mplslb.wire.frame import dissect
from mplslb.wire.icmp import build_icmp_unreachable
from mplslb.wire.ip import IPPROTO_DSTOPTS, IPPROTO_TCP, IPPROTO_UDP

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: bpf(2)"),
    pytest.mark.skipif(
        shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG"),
        reason="needs clang to build the endpoint programs",
    ),
]


def kernel(role: str) -> object:
    from mplslb.offload.endpoint import KernelEndpoint

    return KernelEndpoint(role, mac=HOST, gateway_mac=LB, vips=[VIP, VIP6])


@pytest.fixture(scope="module")
def server_pair() -> object:
    k = kernel("server")
    yield k
    k.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def client_pair() -> object:
    k = kernel("client")
    yield k
    k.close()  # type: ignore[attr-defined]


def fresh(k: object) -> None:
    k.clear_flows()  # type: ignore[attr-defined]
    k.reset_counters()  # type: ignore[attr-defined]


def c2s_packets() -> list[bytes]:
    """Client-to-server packets of IPv4 and IPv6, TCP and UDP, one with IPv6 extension headers, two with IPv4
    options (a short header and the longest)."""
    c4, c6 = client_addr(0), client_addr(1, v6=True)
    dst_opts = bytes([IPPROTO_TCP, 0]) + bytes(6)
    return [
        ipv4(c4, VIP, IPPROTO_TCP, tcp_segment(c4, VIP, 40000, 80, SYN)),
        ipv4(c4, VIP, IPPROTO_TCP, tcp_segment(c4, VIP, 40000, 80, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n")),
        ipv4(c4, VIP, IPPROTO_UDP, udp(c4, VIP, 40001, 53, b"query")),
        ipv6(c6, VIP6, IPPROTO_TCP, tcp_segment(c6, VIP6, 40002, 80, ACK, b"x" * 100)),
        ipv6(c6, VIP6, IPPROTO_UDP, udp(c6, VIP6, 40003, 53, b"q6")),
        ipv6(c6, VIP6, IPPROTO_DSTOPTS, tcp_segment(c6, VIP6, 40004, 80, ACK), ext=dst_opts),
        ipv4(c4, VIP, IPPROTO_TCP, tcp_segment(c4, VIP, 40005, 80, ACK, b"opt"), options=bytes([1, 1, 1, 0])),
        ipv4(c4, VIP, IPPROTO_UDP, udp(c4, VIP, 40006, 53, b"opt"), options=bytes([1] * 39 + [0])),
    ]


def icmp_errors(*, to_server: bool) -> list[bytes]:
    """ICMP errors about a flow's datagrams, IPv4 and IPv6: to_server, errors from the client's side about the
    server's replies (what the balancer forwards labelled to a server; a PMTU error of a router, a port
    unreachable of the client's host); else errors the server's host sends about a client's datagram (or, seen
    from a client, errors the server's side sends about the client's datagram)."""
    out = []
    for packet in (c2s_packets()[0], c2s_packets()[2], c2s_packets()[3], c2s_packets()[4]):
        v6 = packet[0] >> 4 == 6
        client, vip = (packet[8:24], packet[24:40]) if v6 else (packet[12:16], packet[16:20])
        if to_server:
            out.append(build_icmp_unreachable(client, vip, reply_of(packet), code=4 if not v6 else 0))
        else:
            out.append(build_icmp_unreachable(vip, client, packet, code=3 if not v6 else 4))
    return out


def reply_of(packet: bytes) -> bytes:
    """The server's answer to a client packet: addresses and ports swapped."""
    if packet[0] >> 4 == 4:
        src, dst, proto = packet[12:16], packet[16:20], packet[9]
        ports = struct.unpack_from("!HH", packet, (packet[0] & 0xF) * 4)
        body = (tcp_segment(dst, src, ports[1], ports[0], ACK, b"ok") if proto == IPPROTO_TCP
                else udp(dst, src, ports[1], ports[0], b"ok"))  # fmt: skip
        return ipv4(dst, src, proto, body)
    src, dst = packet[8:24], packet[24:40]
    proto, l4 = packet[6], 40
    if proto == IPPROTO_DSTOPTS:
        proto, l4 = packet[40], 48
    ports = struct.unpack_from("!HH", packet, l4)
    body = (tcp_segment(dst, src, ports[1], ports[0], ACK, b"ok") if proto == IPPROTO_TCP
            else udp(dst, src, ports[1], ports[0], b"ok"))  # fmt: skip
    return ipv6(dst, src, proto, body)


def labels_of(frame: bytes) -> list[int]:
    """The labels of an Ethernet frame's MPLS stack."""
    return [entry.label for entry in dissect(frame).labels]


def py_flows(ep: ServerEndpoint | ClientEndpoint) -> dict[object, tuple[int, bytes]]:
    return {k: (f.label, f.peer) for k, f in ep.flows.items()}


def k_flows(k: object) -> dict[object, tuple[int, bytes]]:
    return {key: (label, peer) for key, (label, peer, _) in k.flow_table().items()}  # type: ignore[attr-defined]


# -- ingress ---------------------------------------------------------------------------------------------------------
def test_server_ingress_pops_and_learns_as_the_python_endpoint(server_pair: object) -> None:
    fresh(server_pair)
    ep = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    for i, packet in enumerate(c2s_packets()):
        compare_ingress(server_pair, ep, labelled(HOST, LB, 1001 + 2 * i, packet))
    assert (
        k_flows(server_pair) == py_flows(ep) and len(ep.flows) == len(c2s_packets()) - 1
    )  # the first two are one flow


def test_server_ingress_refusals(server_pair: object) -> None:
    fresh(server_pair)
    ep = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    p = c2s_packets()[0]
    c4 = client_addr(0)
    other = ipv4(c4, c4, IPPROTO_TCP, tcp_segment(c4, c4, 1, 2, ACK))
    for frame in (labelled(HOST, LB, 1002, p), labelled(HOST, LB, 1001, other), labelled(HOST, LB, 1001, p[:30]),
                  labelled(HOST, LB, 1001, p, below=[struct.pack("!I", 5 << 12)], s=False)[:22],
                  ether(HOST, LB, p)):  # fmt: skip
        compare_ingress(server_pair, ep, frame)
    assert k_flows(server_pair) == py_flows(ep) == {}


def test_the_kernel_walks_a_bounded_number_of_ipv6_extension_headers(server_pair: object) -> None:
    fresh(server_pair)
    c6 = client_addr(1, v6=True)
    ext = b"".join(bytes([IPPROTO_DSTOPTS if i < IPV6_EXT_MAX else IPPROTO_TCP, 0]) + bytes(6)
                   for i in range(IPV6_EXT_MAX + 1))  # fmt: skip
    packet = ipv6(c6, VIP6, IPPROTO_DSTOPTS, tcp_segment(c6, VIP6, 1, 80, ACK), ext=ext)
    ep = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    assert ep.from_wire(labelled(HOST, LB, 1001, packet), NOW) == packet  # userspace walks on
    got = server_pair.run_ingress(labelled(HOST, LB, 1001, packet))  # type: ignore[attr-defined]
    assert got.retval == 1 and server_pair.counts()["ipv6_ext_too_many"] == 1  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 5), st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_server_ingress_on_mutated_frames(server_pair: object, which: int, mutations: list, serving: bool) -> None:
    fresh(server_pair)
    ep = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    frame = mutate(labelled(HOST, LB, 1001, c2s_packets()[which]), mutations)
    compare_ingress(server_pair, ep, frame)
    assert k_flows(server_pair) == py_flows(ep) or ep.drops.keys() & NOT_IN_KERNEL


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 5), st.lists(mutation, min_size=1, max_size=3))
def test_client_ingress_on_mutated_frames(client_pair: object, which: int, mutations: list) -> None:
    fresh(client_pair)
    ep = ClientEndpoint(mac=HOST, gateway_mac=LB)
    frame = mutate(labelled(HOST, LB, 1002, reply_of(c2s_packets()[which])), mutations)
    compare_ingress(client_pair, ep, frame)
    assert k_flows(client_pair) == py_flows(ep) or ep.drops.keys() & NOT_IN_KERNEL


def test_icmp_errors_are_learned_and_labelled_as_the_python_endpoint(server_pair: object, client_pair: object) -> None:
    """An ICMP error belongs to the flow of the datagram it quotes: a server learns a flow from one that arrives
    labelled (a client-side router's PMTU error, forwarded by the balancer) and labels the errors its host sends
    about a client's datagram; a client learns from a labelled error about its own datagram. Both datapaths
    alike, byte for byte."""
    fresh(server_pair)
    server = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    for i, error in enumerate(icmp_errors(to_server=True)):
        compare_ingress(server_pair, server, labelled(HOST, LB, 1001 + 2 * i, error))
    assert len(server.flows) == 4 and k_flows(server_pair) == py_flows(server)
    fresh(server_pair)
    server = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    for i, (packet, error) in enumerate(zip([c2s_packets()[j] for j in (0, 2, 3, 4)],
                                            icmp_errors(to_server=False), strict=True)):  # fmt: skip
        frame = labelled(HOST, LB, 1001 + 2 * i, packet)
        server.from_wire(frame, NOW)
        server_pair.run_ingress(frame)  # type: ignore[attr-defined]
        server_pair.reset_counters()  # type: ignore[attr-defined]
        expected = server.from_host(error, NOW)
        assert expected is not None and int.from_bytes(expected[14:17], "big") >> 4 == 1002 + 2 * i
        compare_egress(server_pair, server, error)
    fresh(client_pair)
    client = ClientEndpoint(mac=HOST, gateway_mac=LB)
    for error in icmp_errors(to_server=False):
        compare_ingress(client_pair, client, labelled(HOST, LB, 2002, error))
        compare_egress(client_pair, client, icmp_errors(to_server=True)[0])  # an error it sends goes unlabelled
    assert len(client.flows) == 4 and k_flows(client_pair) == py_flows(client)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 3), st.lists(mutation, min_size=1, max_size=3), st.booleans())
@example(1, [("flip", 294, 0)], True)  # the mutated error taught a flow, which both endpoints must forget
def test_icmp_errors_on_mutated_frames(server_pair: object, client_pair: object, which: int, mutations: list,
                                       serving: bool) -> None:  # fmt: skip
    def endpoints() -> tuple[object, ServerEndpoint | ClientEndpoint]:
        if serving:
            return server_pair, ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
        return client_pair, ClientEndpoint(mac=HOST, gateway_mac=LB)

    k, ep = endpoints()
    fresh(k)
    error = icmp_errors(to_server=serving)[which]
    frame = mutate(labelled(HOST, LB, 1001 if serving else 1002, error), mutations)
    compare_ingress(k, ep, frame)
    assert k_flows(k) == py_flows(ep) or ep.drops.keys() & NOT_IN_KERNEL
    k, ep = endpoints()  # both forget what the mutated frame taught them
    fresh(k)
    k.run_ingress(labelled(HOST, LB, 1001 if serving else 1002, error))  # type: ignore[attr-defined]
    ep.from_wire(labelled(HOST, LB, 1001 if serving else 1002, error), NOW)
    k.reset_counters()  # type: ignore[attr-defined]
    out = mutate(icmp_errors(to_server=not serving)[which], mutations)
    if out and (serving or keyed_on_vip(out, False)):
        compare_egress(k, ep, out)


# -- egress ----------------------------------------------------------------------------------------------------------
def test_server_egress_labels_replies_of_known_flows(server_pair: object) -> None:
    """A server's reply is dropped before its flow is known (no_session_label), then sent under the flow's S2C
    label; the server's own traffic (a health check answer, not from a virtual IP) is not the datapath's. Both
    datapaths alike."""
    fresh(server_pair)
    ep = ServerEndpoint(mac=HOST, vips=[VIP, VIP6])
    sent: list[list[int]] = []
    for i, packet in enumerate(c2s_packets()):
        before = compare_egress(server_pair, ep, reply_of(packet))
        # the second packet is the first one's flow: its reply already has that flow's label
        assert before == Outcome(None) if i != 1 else labels_of(before.python or b"") == [1002]
        frame = labelled(HOST, LB, 1001 + 2 * i, packet)
        ep.from_wire(frame, NOW)
        server_pair.run_ingress(frame)  # type: ignore[attr-defined]
        after = compare_egress(server_pair, ep, reply_of(packet))
        sent.append(labels_of(after.python or b""))
    assert sent == [[1002 + 2 * i] for i in range(len(c2s_packets()))]
    assert ep.drops["no_session_label"] == len(c2s_packets()) - 1
    c4 = client_addr(0)
    health = ipv4(bytes([10, 78, 0, 11]), c4, IPPROTO_TCP, tcp_segment(bytes([10, 78, 0, 11]), c4, 80, 5, ACK))
    assert compare_egress(server_pair, ep, health) == Outcome(None) and ep.drops["not_from_vip"] == 1
    assert k_flows(server_pair) == py_flows(ep)


def test_client_egress_first_unlabelled_then_labelled_and_syn_forgets(client_pair: object) -> None:
    fresh(client_pair)
    ep = ClientEndpoint(mac=HOST, gateway_mac=LB)
    for packet in c2s_packets():
        client_pair.reset_counters()  # type: ignore[attr-defined]
        compare_egress(client_pair, ep, packet)  # unlabelled
        answer = labelled(HOST, LB, 2002, reply_of(packet))
        ep.from_wire(answer, NOW)
        client_pair.run_ingress(answer)  # type: ignore[attr-defined]
        compare_egress(client_pair, ep, packet)  # labelled 2001 (a SYN starts afresh: unlabelled again)
    assert k_flows(client_pair) == py_flows(ep)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 5), st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_egress_on_mutated_packets(server_pair: object, client_pair: object, which: int, mutations: list,
                                   serving: bool) -> None:  # fmt: skip
    packet = c2s_packets()[which]
    k, ep = (
        (server_pair, ServerEndpoint(mac=HOST, vips=[VIP, VIP6]))
        if serving
        else (client_pair, ClientEndpoint(mac=HOST, gateway_mac=LB))
    )
    fresh(k)
    learn = labelled(HOST, LB, 1001, packet) if serving else labelled(HOST, LB, 2002, reply_of(packet))
    ep.from_wire(learn, NOW)
    k.run_ingress(learn)  # type: ignore[attr-defined]
    k.reset_counters()  # type: ignore[attr-defined]
    out = reply_of(packet) if serving else packet
    mutated = mutate(out, mutations)
    if not mutated:
        return
    if not serving and not keyed_on_vip(mutated, False):
        return  # a client's packets not to a VIP are never the datapath's (nor routed into the Python agent)
    outcome = compare_egress(k, ep, mutated)
    assert k_flows(k) == py_flows(ep) or outcome.difference  # (a client's SYN forgets its flow in both)


def test_a_client_flow_unheard_for_the_fallback_goes_unlabelled_again_in_both_endpoints() -> None:
    """The balancer ended the session (its server down, an idle timeout, a restart) and the client keeps sending:
    after ``fallback`` seconds with nothing heard back the next packet goes unlabelled (a new session for UDP, the
    slow path for a live one) and the label is forgotten, in the kernel as in the Python endpoint."""
    from mplslb.offload.endpoint import KernelEndpoint

    k = KernelEndpoint("client", mac=HOST, gateway_mac=LB, vips=[VIP, VIP6], fallback=0.2)
    try:
        ep = ClientEndpoint(mac=HOST, gateway_mac=LB, fallback=0.2)
        c4 = client_addr(0)
        packet = ipv4(c4, VIP, IPPROTO_UDP, udp(c4, VIP, 40001, 53, b"query"))
        answer = labelled(HOST, LB, 2002, reply_of(packet))
        ep.from_wire(answer, NOW)
        k.run_ingress(answer)
        labelled_frame = ep.from_host(packet, NOW + 0.1)
        assert labelled_frame is not None and labelled_frame[12:14] == b"\x88\x47"
        assert k.run_egress(host_frame(packet)).data == labelled_frame
        time.sleep(0.3)  # past the kernel's fallback (its clock is CLOCK_MONOTONIC, the test's NOW is simulated)
        plain = ep.from_host(packet, NOW + 0.3)
        assert plain is not None and plain[12:14] == b"\x08\x00" and plain[14:] == packet
        got = k.run_egress(host_frame(packet))
        assert got.retval == bpf.TC_ACT_OK and got.data == plain
        assert ep.counters.get("fallback_unlabelled") == 1 and k.counts()["fallback_unlabelled"] == 1
        assert ep.flows == {} and k_flows(k) == {}
    finally:
        k.close()


def test_a_labelled_frame_of_a_known_flow_keeps_it_heard_and_a_new_label_replaces_the_old() -> None:
    """Each labelled frame from the wire refreshes its flow (in place, when label and peer are the ones mapped): a
    flow heard again within the fallback stays labelled past the first frame's fallback; a frame with another
    label (a new session on the same ports) replaces the mapping, in the kernel as in the Python endpoint."""
    from mplslb.offload.endpoint import KernelEndpoint

    k = KernelEndpoint("client", mac=HOST, gateway_mac=LB, vips=[VIP, VIP6], fallback=0.4)
    try:
        ep = ClientEndpoint(mac=HOST, gateway_mac=LB, fallback=0.4)
        c4 = client_addr(0)
        packet = ipv4(c4, VIP, IPPROTO_UDP, udp(c4, VIP, 40002, 53, b"query"))
        answer = labelled(HOST, LB, 2002, reply_of(packet))
        for _ in range(3):  # heard every 0.25 s: never 0.4 s unheard, though 0.75 s pass
            k.run_ingress(answer)
            time.sleep(0.25)
        assert k_flows(k) != {}
        got = k.run_egress(host_frame(packet))
        assert got.data[12:14] == b"\x88\x47" and labels_of(got.data) == [2001]
        assert k.counts().get("fallback_unlabelled", 0) == 0
        k.run_ingress(labelled(HOST, LB, 2006, reply_of(packet)))
        ep.from_wire(labelled(HOST, LB, 2006, reply_of(packet)), NOW)
        assert k_flows(k) == py_flows(ep) and next(iter(py_flows(ep).values()))[0] == 2005
        assert labels_of(k.run_egress(host_frame(packet)).data) == [2005]
    finally:
        k.close()


def test_the_programs_are_listed_with_their_run_statistics(client_pair: object) -> None:
    """bpf.prog_ids lists the endpoint's programs; their info carries the kernel's run count and time, which grow
    with each run while kernel.bpf_stats_enabled is on (bench/bpf_cost.py reads them)."""
    progs = client_pair.progs  # type: ignore[attr-defined]
    infos = {kind: bpf.prog_info(fd) for kind, fd in progs.items()}
    assert {info.name for info in infos.values()} == {"mplslb_cli_in", "mplslb_cli_out"}
    assert {info.prog_id for info in infos.values()} <= set(bpf.prog_ids())
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = stats.read_text().strip()
    stats.write_text("1")
    try:
        before = bpf.prog_info(progs["xdp"])
        c4 = client_addr(0)
        packet = ipv4(c4, VIP, IPPROTO_UDP, udp(c4, VIP, 40003, 53, b"query"))
        for _ in range(3):
            client_pair.run_ingress(labelled(HOST, LB, 2002, reply_of(packet)))  # type: ignore[attr-defined]
        after = bpf.prog_info(progs["xdp"])
    finally:
        stats.write_text(previous)
    assert after.run_cnt - before.run_cnt >= 3 and after.run_time_ns > before.run_time_ns


#: The verifier's limit on instructions processed per program load (kernel/bpf/verifier.c, BPF_COMPLEXITY_LIMIT_INSNS).
VERIFIER_LIMIT = 1_000_000
BPF_LOG_STATS = 4


@pytest.mark.parametrize("role", ["server", "client"])
def test_each_program_verifies_well_within_the_kernel_limit(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier walks every path of a program; a loop whose exits each carry what it narrowed multiplies the
    walk of everything after it. Each program must stay within a fifth of the limit: room for the next feature, and
    an agent's start is not spent verifying (the ingress programs processed 696k of the 1M before)."""
    from mplslb.offload.endpoint import KernelEndpoint

    real = bpf.bpf
    processed: dict[str, int] = {}

    def with_stats(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
        if cmd != bpf.BPF_PROG_LOAD:
            return real(cmd, attr, what)
        log = ctypes.create_string_buffer(1 << 16)
        struct.pack_into("=IIQ", attr, 24, BPF_LOG_STATS, len(log), ctypes.addressof(log))
        fd = real(cmd, attr, what)
        found = re.search(r"processed (\d+) insns", log.value.decode())
        assert found, log.value.decode()
        processed[what] = int(found.group(1))
        return fd

    monkeypatch.setattr(bpf, "bpf", with_stats)
    k = KernelEndpoint(role, mac=HOST, vips=[VIP, VIP6], gateway_mac=LB)
    try:
        assert len(processed) == 2  # the ingress and the egress program
        assert all(n <= VERIFIER_LIMIT // 5 for n in processed.values()), processed
    finally:
        k.close()


# -- recorded runs and real captures ---------------------------------------------------------------------------------
def test_a_recorded_run_through_both_datapaths_of_both_roles(server_pair: object, client_pair: object) -> None:
    """A recorded balancer run (the tests' simulation: sessions of eight clients to three servers, IPv4 and IPv6, TCP
    and UDP, a server failing and coming back) as its endpoints met it: each frame the balancer sent to a server
    through a server endpoint's ingress, each it sent to a client through a client endpoint's, and the packet under
    each frame a server or a client sent the balancer through that role's egress, as its host handed it over. The
    kernel's programs and the Python endpoint give the same frames, frame by frame, and learn the same flows."""
    config, calls = recording()
    roles = {port.port_id: port.role for port in config.ports}
    pairs = {"server": Pair(server_pair, True), "client": Pair(client_pair, False)}
    for call in calls:
        if call.port >= 0:
            packet = packet_of(call.frame)
            assert packet is not None  # every frame of the run carries an IP packet
            pairs[roles[call.port]].egress(packet)
        for port, frame in call.out:
            pairs[roles[port]].ingress(frame)
    for role, pair in pairs.items():
        assert pair.adopted == 0 and pair.same_flows(), role
        assert pair.delivered > 300 and pair.labelled > 300, (role, pair.delivered, pair.labelled)


def test_real_captures_through_both_datapaths_of_both_roles(
    shared_data: Path, server_pair: object, client_pair: object
) -> None:
    """Every frame of the real captures of shared/data (MPLS of other networks, plain IPv4 and IPv6 of real hosts)
    through each role's two datapaths: as captured, on ingress; the IP packet it carries made the role's (to the
    virtual IP for a server, from it for a client) under a label of the role, on ingress; then that packet's
    reply (addresses and ports swapped) from the host, on egress. The same outcome frame by frame, and the same
    flows learnt."""
    pairs = (Pair(server_pair, True), Pair(client_pair, False))
    for n, frame in enumerate(captured(shared_data)):
        packet = packet_of(frame)
        for pair in pairs:
            pair.ingress(frame)
            if packet is None:
                continue
            mine = readdressed(packet, serving=pair.serving)
            pair.ingress(labelled(HOST, LB, 1001 + 2 * (n % 4096) + (0 if pair.serving else 1), mine))
            back = reversed_packet(mine)
            if back is not None:
                pair.egress(back)
    for pair in pairs:
        assert pair.same_flows(), pair.serving
        assert pair.delivered > 9_000 and pair.labelled > 9_000, (pair.serving, pair.delivered, pair.labelled)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.integers(0, 1 << 16), muts=st.lists(st.one_of(mutation, header_mutation), min_size=1, max_size=3))
def test_mutated_recorded_frames_through_both_datapaths(server_pair: object, client_pair: object, which: int,
                                                         muts: list[tuple[str, int, int]]) -> None:  # fmt: skip
    """One frame of the recorded run that an endpoint meets, mutated (anywhere, or where the datapaths read: the
    label entry, the IP header, the first octets of TCP or UDP), on the ingress of its role after the frame as
    recorded taught the flow; and the packet the other side of that flow sends back, mutated alike, on egress."""
    config, calls = recording()
    roles = {port.port_id: port.role for port in config.ports}
    met = [(roles[port], frame) for call in calls for port, frame in call.out]
    role, frame = met[which % len(met)]
    pair = Pair(server_pair if role == "server" else client_pair, role == "server")
    pair.ingress(frame)
    pair.ingress(mutate(frame, muts))
    assert pair.same_flows()
    packet = packet_of(frame)
    back = reversed_packet(packet) if packet is not None else None
    if back is None:
        return
    pair = Pair(pair.k, pair.serving)
    pair.ingress(frame)
    mutated = mutate(back, muts)
    if mutated and (pair.serving or keyed_on_vip(mutated, False)):  # a client's other packets are not the datapath's
        pair.egress(mutated)


def test_clearing_the_flows_forgets_every_one_and_the_next_packet_is_learnt_afresh() -> None:
    """KernelEndpoint.clear_flows (the differential tests' and the campaign's fresh start): every flow goes in one
    call, and the next labelled packet of a flow is learnt under its new label."""
    from mplslb.offload.endpoint import KernelEndpoint

    k = KernelEndpoint("server", mac=HOST, vips=[VIP, VIP6])
    try:
        packets = c2s_packets()
        for i, packet in enumerate(packets):
            assert k.run_ingress(labelled(HOST, LB, 1001 + 2 * i, packet)).retval == bpf.XDP_PASS
        assert k.flow_count() == len(packets) - 1  # the first two are one flow's
        k.clear_flows()
        assert k.flow_count() == 0 and k.flow_table() == {}
        k.clear_flows()  # nothing to clear
        assert k.run_ingress(labelled(HOST, LB, 4001, packets[0])).retval == bpf.XDP_PASS
        assert [label for label, _, _ in k.flow_table().values()] == [4002]
    finally:
        k.close()


def test_flows_idle_for_the_timeout_are_forgotten_and_the_others_kept() -> None:
    """The agent's expiry (KernelEndpoint.expire, on the flow map's own CLOCK_MONOTONIC times): a flow idle for
    ``flow_timeout`` goes, one used since stays, and a scan that finds none idle long enough deletes nothing."""
    from mplslb.offload.endpoint import KernelEndpoint

    k = KernelEndpoint("server", mac=HOST, vips=[VIP, VIP6], flow_timeout=2.0)
    try:
        frames = [labelled(HOST, LB, 1001 + 2 * i, packet) for i, packet in enumerate(c2s_packets()[2:5])]
        for frame in frames:
            assert k.run_ingress(frame).retval == bpf.XDP_PASS
        learnt = time.monotonic()
        assert k.flow_count() == len(k.flow_table()) == 3
        assert k.expire(learnt + 1.5) == 0 and k.flow_count() == 3  # idle 1.5 s of 2
        time.sleep(0.3)
        k.run_ingress(frames[0])  # the first flow used again
        assert k.expire(learnt + 2.1) == 2  # the other two idle for more than 2 s by then
        assert [label for label, _, _ in k.flow_table().values()] == [1002]
        assert k.expire(time.monotonic() + 2.1) == 1 and k.flow_count() == 0
    finally:
        k.close()


def test_a_kept_datapath_stays_attached_and_the_next_endpoint_takes_it_over() -> None:
    """With pins (the agent's --keep): an endpoint that closes keeping them leaves its programs attached and its
    flows in place (the kept egress program goes on labelling a known flow's replies); the next endpoint of the same
    role on the same interface takes over the maps, the programs and the links (flows and counters go on, the same
    program stays attached, its own VIPs written in). One of another role does not fit: the pins are let go and it
    starts afresh; closed without keeping, nothing stays pinned or attached."""
    import socket

    from mplslb.drivers.netns import entered
    from mplslb.offload.endpoint import KernelEndpoint
    from test_offload import veth_namespaces, xdp_state_in

    pins = Path("/sys/fs/bpf/mplslb") / f"agent-t{os.getpid() % 100000}"
    every = c2s_packets()
    packets = [every[0], every[2], every[6]]  # three IPv4 flows
    with veth_namespaces() as (lb, _):
        with entered(lb):
            ifindex = socket.if_nametoindex("p0")

        def endpoint(role: str, vips: list[bytes]) -> KernelEndpoint:
            with entered(lb):
                made = KernelEndpoint(role, mac=HOST, gateway_mac=LB, vips=vips, pins=pins)
                made.attach("p0")
            return made

        k = endpoint("server", [VIP])
        try:
            assert not k.adopted and pins.is_dir()
            for i, packet in enumerate(packets):
                assert k.run_ingress(labelled(HOST, LB, 1001 + 2 * i, packet)).retval == bpf.XDP_PASS
            flows, counts = {key: value[:2] for key, value in k.flow_table().items()}, k.counts()
            _, prog_id = xdp_state_in(lb, ifindex)
            assert len(flows) == 3 and prog_id
            with entered(lb):
                k.close(keep=True)
            assert xdp_state_in(lb, ifindex)[1] == prog_id  # still attached, no endpoint running
            kept_tc = bpf.obj_get(str(pins / "prog_tc"))
            try:
                reply = bpf.prog_test_run_skb(kept_tc, host_frame(reply_of(packets[0])))
            finally:
                os.close(kept_tc)
            assert reply.retval == bpf.TC_ACT_OK and labels_of(reply.data) == [1002]

            k = endpoint("server", [VIP, VIP6])  # the next agent, with one more VIP
            kept = {key: value[:2] for key, value in k.flow_table().items()}  # (label, peer MAC): the times went on
            assert k.adopted and kept == flows and xdp_state_in(lb, ifindex)[1] == prog_id
            after = k.counts()
            assert after["from_wire"] == counts["from_wire"] == 3 and after["from_host"] == counts["from_host"] + 1
            v6 = every[3]  # an IPv6 flow, whose VIP only the new endpoint serves
            assert k.run_ingress(labelled(HOST, LB, 1007, v6)).retval == bpf.XDP_PASS
            assert labels_of(k.run_egress(host_frame(reply_of(v6))).data) == [1008]
            with entered(lb):
                k.close(keep=True)

            k = endpoint("client", [VIP])
            assert not k.adopted and k.flow_count() == 0 and xdp_state_in(lb, ifindex)[1] not in (0, prog_id)
            with entered(lb):
                k.close()
            assert not pins.exists() and xdp_state_in(lb, ifindex)[1] == 0
        finally:
            with entered(lb):
                k.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to count on")
def test_frames_counted_on_every_cpu_are_summed(server_pair: object) -> None:
    """Each CPU counts in its own slot of the counters map: frames taken on different CPUs are all in the counts,
    and a reset clears every CPU's."""
    fresh(server_pair)
    packets = c2s_packets()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    try:
        for i, cpu in enumerate(cpus * 3):
            os.sched_setaffinity(0, {cpu})
            assert server_pair.run_ingress(labelled(HOST, LB, 1001 + 2 * i, packets[2])).retval == bpf.XDP_PASS  # type: ignore[attr-defined]
    finally:
        os.sched_setaffinity(0, before)
    assert server_pair.counts()["from_wire"] == 6  # type: ignore[attr-defined]
    fresh(server_pair)
    assert not any(server_pair.counts().values())  # type: ignore[attr-defined]
