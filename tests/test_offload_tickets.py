"""Tickets (``offload_syn``, mplslb.offload.tickets): a new TCP session's SYN taken in the XDP program under a
decision the daemon made ahead is what the userspace path makes of the same SYN with the same decision: the same
frame leaves (byte for byte), the same session row, the same label rows, and kernel entries that are what the
table's mirror would write; every SYN the program does not take goes up untouched and the daemon does what it did
before. Root and clang are needed for all but the configuration tests.

The reference is a userspace balancer of the same configuration fed only the SYNs the program took: its decisions
(round robin's next server, the label manager's next pair) are then the tickets', in the order the program takes
them.
"""

from __future__ import annotations

import itertools
import re
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    DAEMON_TOML,
    FIN,
    PORT_MAC,
    PSH,
    RST,
    SYN,
    VIP,
    VIP6,
    client_addr,
    client_mac,
    ether,
    ipv4,
    ipv6,
    standard_config,
    tcp_segment,
)
from mplslb.balancer import Balancer
from mplslb.config import ConfigError, Section, read_offload_prealloc, read_offload_syn
from mplslb.drivers.loop import Loop
from mplslb.drivers.netns import entered
from mplslb.flow import FlowKey
from mplslb.offload import bpf, driver, tickets, xdp
from mplslb.offload.driver import OffloadedBalancer
from mplslb.offload.tickets import TICKETS_WANT, TicketDesk
from mplslb.offload.xdp import Taken, syn_flow_key
from mplslb.sessions import SessionState
from mplslb.switching.layout import KERNEL_ENTRY, KERNEL_ENTRY_FIELDS, TAKEN, struct_offsets
from mplslb.wire.ip import IPPROTO_TCP
from test_offload import from_client, from_server, label_of, needs_kernel, on_veths, veth_namespaces

#: An entry's fields the program and the daemon write (what the mirror compares), up to the kernel's counters.
FIXED = struct_offsets(KERNEL_ENTRY_FIELDS)["packets"]
RT_LEFT = struct_offsets(KERNEL_ENTRY_FIELDS)["rt_left"]
#: Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
LINUX_OPTIONS = bytes([2, 4, 5, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
_sports = itertools.count(20000)


@pytest.fixture
def lb() -> Iterator[str]:
    with veth_namespaces() as (name, _):
        yield name


def pair(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[OffloadedBalancer, Balancer, Loop]:
    """The daemon's wrapper with tickets over a balancer on p0..p3, and a reference balancer of the same
    configuration."""
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path))
    config = on_veths(standard_config(**overrides))
    loop = Loop()
    with entered(lb):
        core = OffloadedBalancer(Balancer(config), loop, tickets=True)
    return core, Balancer(config), loop


def syn_frame(
    *, v6: bool = False, sport: int | None = None, port: int = 0, dport: int = 80, dst: bytes | None = None,
    options: bytes = LINUX_OPTIONS, vlan: bool = False, pad: int = 0, flags: int = SYN, tos: int = 0,
) -> bytes:  # fmt: skip
    src = client_addr(port, v6=v6)
    vip = dst if dst is not None else (VIP6 if v6 else VIP)
    segment = tcp_segment(src, vip, next(_sports) if sport is None else sport, dport, flags, options=options)
    packet = ipv6(src, vip, IPPROTO_TCP, segment) if v6 else ipv4(src, vip, IPPROTO_TCP, segment)
    if tos:
        packet = with_tos(packet, tos)
    return ether(PORT_MAC[port], client_mac(port), packet, vlans=(7,) if vlan else ()) + bytes(pad)


def with_tos(packet: bytes, tos: int) -> bytes:
    """``packet`` (IPv4) with another TOS, its header checksum right."""
    header = bytearray(packet[:20])
    header[1] = tos
    header[10:12] = b"\0\0"
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(header) + packet[20:]


def run(core: OffloadedBalancer, lb: str, frame: bytes, port: int = 0) -> bpf.TestRun:
    with entered(lb):
        return core.offload.run(frame, port)


def taken_as_in_userspace(core: OffloadedBalancer, reference: Balancer, loop: Loop, lb: str, frame: bytes,
                          port: int = 0) -> int:  # fmt: skip
    """``frame``, a SYN the program must take: the frame it sends is the reference's, and once folded the session
    row, the label rows and the kernel's entries are what the userspace path makes. Returns the C2S label."""
    now = loop.clock()
    result = run(core, lb, frame, port)
    assert result.retval == bpf.XDP_REDIRECT
    expected = reference.receive(port, frame, now)
    assert [result.data] == [sent for _, sent in expected]
    assert core.desk is not None and core.desk.fold(now) == 1
    c2s = label_of(result.data)
    ours, theirs = core.balancer.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
    assert ours is not None and theirs is not None
    for field in ("key", "client_port", "client_mac", "ip_version", "state"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.server.name == theirs.server.name
    a, b = core.balancer.switching, reference.switching
    for label in (c2s, c2s + 1):
        for column in ("valid", "out_port", "in_port", "rewrite", "peer", "peer_ip", "flow", "watch", "v6"):
            assert getattr(a, column)[label] == getattr(b, column)[label], (label, column)
        entry = core.offload.lookup(label)
        assert entry is not None
        raw = KERNEL_ENTRY.pack(*entry)
        written = core.offload._entry(label)
        assert raw[:FIXED] == written[:FIXED] and raw[RT_LEFT : RT_LEFT + 4] == written[RT_LEFT : RT_LEFT + 4]
    core.offload.poll()  # the SYN the kernel counted reaches the table's counters
    assert a.traffic(c2s) == b.traffic(c2s)
    return c2s


@needs_kernel
@pytest.mark.parametrize(
    ("v6", "vlan", "pad", "options", "tos"),
    [
        (False, False, 0, LINUX_OPTIONS, 0),
        (True, False, 0, LINUX_OPTIONS, 0),
        (False, True, 0, LINUX_OPTIONS, 0),
        (False, False, 12, b"", 0xB8),  # a short SYN padded to the Ethernet minimum, and a TOS for the TC
        (True, True, 0, bytes([1, 1, 1, 0]), 0),
        (False, False, 0, bytes([2, 4, 5, 0xB4, 0, 0, 0, 0]), 0),  # EOL and what follows it
    ],
)
def test_a_syn_taken_under_a_ticket_is_what_userspace_makes_of_it(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v6: bool, vlan: bool, pad: int, options: bytes,
    tos: int,
) -> None:  # fmt: skip
    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    try:
        assert core.desk is not None and len(core.desk.outstanding) == TICKETS_WANT
        for client_port in (0, 1, 0):
            frame = syn_frame(v6=v6, vlan=vlan, pad=pad, options=options, port=client_port, tos=tos)
            taken_as_in_userspace(core, reference, loop, lb, frame, client_port)
        stats = core.stats()["tickets"]
        assert stats["syn_taken"] == stats["taken"] == 3 and core.balancer.frames_in == 0
        assert [s.active for s in core.balancer.pool] != [s.active for s in reference.pool]  # the tickets' servers
    finally:
        core.close()


@needs_kernel
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "queue"])
def test_more_syns_than_the_taken_ring_holds_are_read_whole_and_in_order(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ring: bool
) -> None:
    """The program's records of the tickets it took, over more folds and more records in all than the taken ring
    holds (so they wrap around its end, one of them across it), are read whole and in the order taken; the same
    from the queue the program is built with on machines whose loads may be reordered."""
    monkeypatch.setattr(bpf, "ORDERED_LOADS", ring)
    core, _, loop = pair(lb, tmp_path, monkeypatch)
    try:
        desk = core.desk
        taken_map = core.offload._ticket_maps["taken"]
        assert desk is not None and isinstance(taken_map, bpf.RingBuffer if ring else bpf.Queue)
        record = (TAKEN.size + bpf.RINGBUF_HDR_SIZE + 7) & ~7
        rounds = 4
        if ring:
            assert taken_map.size % record and rounds * TICKETS_WANT * record > taken_map.size
        for _ in range(rounds):
            assert len(desk.outstanding) == TICKETS_WANT
            expected: list[tuple[int, int, int, bytes]] = []
            for i in range(TICKETS_WANT):
                port, sport, v6 = i % 2, next(_sports), i % 3 == 0
                result = run(core, lb, syn_frame(v6=v6, sport=sport, port=port), port)
                assert result.retval == bpf.XDP_REDIRECT
                expected.append((label_of(result.data), port, sport, client_addr(port, v6=v6)))
            taken = core.offload.take_tickets()
            assert [(t.c2s, t.port_id, t.sport, t.src) for t in taken] == expected
            assert all(t.dport == 80 and t.dst in (VIP, VIP6) for t in taken)
            assert core.offload.take_tickets() == []
            now = loop.clock()
            for t in taken:
                core.balancer.release_decided(t.c2s, desk.outstanding.pop(t.c2s), now)
            core.offload.revoke_tickets([t.c2s for t in taken])
            assert desk.refill(now) == TICKETS_WANT
    finally:
        core.close()


@needs_kernel
def test_an_idle_wrappers_tick_slows_down_until_a_ticket_is_taken_or_a_change_written(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper's tick doubles its interval while nothing happens between ticks, up to SYNC_INTERVAL_IDLE, and
    comes back to SYNC_INTERVAL at the first tick after a ticket the kernel took was folded or a change written to
    the kernel, by the tick itself or by the daemon's handling of frames in between."""
    core, _, loop = pair(lb, tmp_path, monkeypatch)

    def tick() -> float:
        """One tick of the wrapper's timer: the interval it chose to its next (the timer is set that far from the
        tick's own clock reading; measured from a later reading, a slow tick would shorten it)."""
        before = loop.clock()
        core._tick()
        assert core._timer is not None and core._timer.when >= before + core._tick_interval
        return core._tick_interval

    try:
        intervals = [round(tick(), 3) for _ in range(6)]
        assert intervals[-1] == driver.SYNC_INTERVAL_IDLE and intervals == sorted(intervals)
        assert intervals[0] == 2 * driver.SYNC_INTERVAL
        assert run(core, lb, syn_frame()).retval == bpf.XDP_REDIRECT  # taken under a ticket
        assert round(tick(), 3) == driver.SYNC_INTERVAL and len(core.balancer.sessions) == 1
        assert round(tick(), 3) == 2 * driver.SYNC_INTERVAL
        (session,) = core.balancer.sessions.sessions()
        core.balancer.switching.withdraw(session.c2s)  # a change for the kernel
        assert round(tick(), 3) == driver.SYNC_INTERVAL
        assert round(tick(), 3) == 2 * driver.SYNC_INTERVAL
        assert run(core, lb, syn_frame()).retval == bpf.XDP_REDIRECT
        assert core.receive_batch([], loop.clock()) == [] and len(core.balancer.sessions) == 2  # folded there
        assert round(tick(), 3) == driver.SYNC_INTERVAL
    finally:
        core.close()


@needs_kernel
def test_mutated_syns_are_taken_identically_or_passed_up_untouched(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutations of a SYN (options, checksum, fragments, payload, flags, lengths, versions): the program either takes
    it, sending exactly what the userspace path sends for it, or passes it up byte for byte; the daemon then
    handles it without failing, as a userspace balancer does (the same number of frames out, the same drops)."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    outcomes: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        v6=st.booleans(),
        vlan=st.booleans(),
        at=st.integers(14, 80),
        value=st.integers(0, 255),
        mutate=st.booleans(),
        options=st.sampled_from([b"", LINUX_OPTIONS, bytes([1, 1, 1, 1]), bytes([2, 4, 5]), bytes([8, 1, 0, 0])]),
        extra=st.sampled_from([b"", b"x", bytes(10)]),
    )
    def one(v6: bool, vlan: bool, at: int, value: int, mutate: bool, options: bytes, extra: bytes) -> None:
        frame = bytearray(syn_frame(v6=v6, vlan=vlan, options=options) + extra)
        if mutate and at < len(frame):
            frame[at] = value
        frame_b = bytes(frame)
        now = loop.clock()
        result = run(core, lb, frame_b)
        outcomes[result.retval] = outcomes.get(result.retval, 0) + 1
        assert core.desk is not None
        if result.retval == bpf.XDP_REDIRECT:
            assert [result.data] == [sent for _, sent in reference.receive(0, frame_b, now)]
            assert core.desk.fold(now) == 1
        else:
            assert result.retval == bpf.XDP_PASS and result.data == frame_b
            fresh = Balancer(reference.config)
            theirs = fresh.receive(0, frame_b, now)
            ours = core.receive_batch([(0, frame_b)], now)
            assert [p for p, _ in ours] == [p for p, _ in theirs] and core.balancer.drops.keys() >= fresh.drops.keys()
        core.desk.refill(now)

    try:
        one()
        assert outcomes.get(bpf.XDP_REDIRECT, 0) > 10 and outcomes.get(bpf.XDP_PASS, 0) > 10, outcomes
    finally:
        core.close()


@needs_kernel
def test_a_retransmitted_syn_and_syns_of_no_service_go_up(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SYN of a session live in the flow map (retransmitted: taken in the kernel, or opened in userspace) goes up
    and reaches its session as in userspace; a SYN to a port or address the balancer does not serve goes up and is
    dropped as there; a SYN with ACK, RST or FIN goes up."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    try:
        assert core.desk is not None
        syn = syn_frame(sport=31000)
        c2s = taken_as_in_userspace(core, reference, loop, lb, syn)
        for frame in (syn, syn_frame(dport=81), syn_frame(dst=client_addr(5)), syn_frame(flags=SYN | ACK),
                      syn_frame(flags=SYN | RST), syn_frame(flags=SYN | FIN)):  # fmt: skip
            result = run(core, lb, frame)
            assert result.retval == bpf.XDP_PASS and result.data == frame
            now = loop.clock()
            assert core.receive_batch([(0, frame)], now) == reference.receive(0, frame, now)
        assert core.balancer.drops == reference.drops and core.balancer.drops
        counters = core.stats()["tickets"]
        assert counters["syn_flow_live"] == 1 and counters["syn_taken"] == 1
        # A session opened in userspace (its SYN came before any ticket) is in the flow map from its sync on.
        core.desk.revoke_all(loop.clock())
        core.desk.want = 1
        fresh = syn_frame(sport=31001)
        assert run(core, lb, fresh).retval == bpf.XDP_PASS
        assert core.stats()["tickets"]["syn_no_ticket"] == 1
        core.receive_batch([(0, fresh)], loop.clock())  # opened in userspace, then a ticket issued
        assert len(core.desk.outstanding) == 1
        assert run(core, lb, fresh).retval == bpf.XDP_PASS  # retransmitted: its session's
        assert core.stats()["tickets"]["syn_flow_live"] == 2 and len(core.desk.outstanding) == 1
        # The flow leaves the map with the session's labels.
        session = core.balancer.sessions.by_c2s(c2s)
        assert session is not None
        core.balancer._finish(session, loop.clock())
        core.offload.sync()
        assert run(core, lb, syn).retval == bpf.XDP_REDIRECT
    finally:
        core.close()


@needs_kernel
def test_a_key_based_algorithm_issues_no_tickets(lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core, reference, loop = pair(lb, tmp_path, monkeypatch, algorithm="source_hash")
    try:
        assert core.desk is not None and not core.desk.outstanding
        assert core.desk.held.get("keyed_algorithm", 0) >= 1
        frame = syn_frame()
        result = run(core, lb, frame)
        assert result.retval == bpf.XDP_PASS and result.data == frame
        assert core.stats()["tickets"]["syn_no_ticket"] == 1
        now = loop.clock()
        assert core.receive_batch([(0, frame)], now) == reference.receive(0, frame, now)
    finally:
        core.close()


@needs_kernel
def test_tickets_of_a_server_gone_down_are_revoked_and_given_back(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server marked down with tickets outstanding: they are all revoked at the next refill (their entries
    deleted, the server's count given back, and their labels, which no frame carried, free again without a
    quarantine), and no SYN taken after lands on it."""
    core, _, loop = pair(lb, tmp_path, monkeypatch, algorithm="least_connections")
    b = core.balancer
    try:
        assert core.desk is not None
        s1 = b.pool.get("s1")
        assert s1.active > 0 and any(server is s1 for server in core.desk.outstanding.values())
        spread = [s.active for s in b.pool]
        assert max(spread) - min(spread) <= 1  # least connections spreads the reservations
        revoked = set(core.desk.outstanding)
        b.mark_down("s1", loop.clock())
        core.desk.refill(loop.clock())
        assert core.desk.revoked == TICKETS_WANT
        assert s1.active == 0 and s1.total == 0
        assert b.labels.quarantined_count == 0 and b.labels.in_use_count == TICKETS_WANT
        assert b.labels.free_count == b.labels.capacity - TICKETS_WANT
        given_back = revoked - set(core.desk.outstanding)
        assert given_back and not any(b.labels.in_use(c2s) or b.labels.is_quarantined(c2s) for c2s in given_back)
        assert all(server is not s1 for server in core.desk.outstanding.values())
        assert core.offload.entries == 2 * len(core.desk.outstanding)
        for _ in range(6):
            assert run(core, lb, syn_frame()).retval == bpf.XDP_REDIRECT
        assert core.desk.fold(loop.clock()) == 6
        assert all(s.server is not s1 for s in b.live_sessions()) and len(b.live_sessions()) == 6
    finally:
        core.close()
    assert b.labels.in_use_count == 6  # the tickets given back on close, the sessions' pairs kept


@needs_kernel
def test_tickets_of_a_server_over_the_response_time_limit_or_with_a_new_mac_are_revoked(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose response time goes over ``max_response_time`` takes no new session: its tickets (all of them,
    with the rest) are revoked at the next refill and none is issued for it while it stays over; back under, it
    gets tickets again. A server's MAC changing (resolved anew) revokes them too: the entries hold the old one."""
    core, _, loop = pair(lb, tmp_path, monkeypatch, algorithm="least_connections", rt_limit=0.5)
    b = core.balancer
    try:
        desk = core.desk
        assert desk is not None and any(server.name == "s1" for server in desk.outstanding.values())
        s1 = b.pool.get("s1")
        b.pool.record_response_time(s1, 2.0)
        assert s1.overloaded
        desk.refill(loop.clock())
        assert desk.revoked == TICKETS_WANT and len(desk.outstanding) == TICKETS_WANT
        assert all(server is not s1 for server in desk.outstanding.values()) and s1.active == 0
        desk.refill(loop.clock())
        assert desk.revoked == TICKETS_WANT  # nothing changed since: nothing revoked
        while s1.overloaded:  # fast answers bring the estimate back under the limit
            b.pool.record_response_time(s1, 0.0)
        desk.refill(loop.clock())
        assert desk.revoked == 2 * TICKETS_WANT and any(server is s1 for server in desk.outstanding.values())
        moved = bytes.fromhex("02aa00000001")
        b.pool.set_mac("s1", moved)
        desk.refill(loop.clock())
        assert desk.revoked == 3 * TICKETS_WANT
        ours = [c2s for c2s, server in desk.outstanding.items() if server is s1]
        assert ours
        for c2s in ours:  # the C2S entry's next hop and the S2C entry's bound peer are the new MAC
            c2s_entry, s2c_entry = core.offload.lookup(c2s), core.offload.lookup(c2s + 1)
            assert c2s_entry is not None and s2c_entry is not None
            assert c2s_entry[2][:6] == moved and s2c_entry[3] == moved
    finally:
        core.close()


@needs_kernel
def test_tickets_stop_where_admission_would_refuse(lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a global session limit, no more tickets are outstanding than the room it leaves (the stop counted by
    its reason); past it a SYN goes up and is refused as in userspace. The half-open share likewise."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch, max_sessions=3)
    try:
        assert core.desk is not None and len(core.desk.outstanding) == 3
        assert core.desk.held.get("global_session_limit", 0) >= 1
        for _ in range(3):
            taken_as_in_userspace(core, reference, loop, lb, syn_frame())
        core.desk.refill(loop.clock())
        assert not core.desk.outstanding
        frame = syn_frame()
        assert run(core, lb, frame).retval == bpf.XDP_PASS
        now = loop.clock()
        refused = core.receive_batch([(0, frame)], now)
        assert refused == reference.receive(0, frame, now) and refused  # the RST
        assert core.balancer.admission.refused == reference.admission.refused
    finally:
        core.close()
    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    try:
        assert core.desk is not None
        core.balancer.max_half_open = reference.max_half_open = 2
        core.desk.refill(loop.clock())  # the limits changed: revoked, and issued within them
        assert len(core.desk.outstanding) == 2 and core.desk.held.get("half_open", 0) >= 1
        for _ in range(2):  # (the revoked tickets took the reference's first decisions: not compared here)
            assert run(core, lb, syn_frame()).retval == bpf.XDP_REDIRECT
        assert core.desk.fold(loop.clock()) == 2
        core.desk.refill(loop.clock())
        assert not core.desk.outstanding and core.balancer.sessions.half_open == 2
        frame = syn_frame()
        assert run(core, lb, frame).retval == bpf.XDP_PASS
        core.receive_batch([(0, frame)], loop.clock())  # the oldest half-open session is evicted up there
        assert core.balancer.sessions.half_open == 2 and core.balancer.sessions.ended.get("half_open_evicted") == 1
    finally:
        core.close()


def test_offload_syn_is_validated() -> None:
    assert read_offload_syn(Section("lb.toml", "", {"offload_syn": True}), "kernel") is True
    assert read_offload_syn(Section("lb.toml", "", {}), "kernel") is False
    with pytest.raises(ConfigError, match="needs offload") as info:
        read_offload_syn(Section("lb.toml", "", {"offload_syn": True}), "none")
    assert info.value.key == "offload_syn"


def test_offload_syn_is_read_and_goes_with_kept_state(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "lb.toml"
    path.write_text('offload = "kernel"\n' + DAEMON_TOML)
    assert not load_daemon_config(path).offload_syn
    path.write_text('offload = "kernel"\noffload_syn = true\n' + DAEMON_TOML)
    assert load_daemon_config(path).offload_syn
    path.write_text('offload = "kernel"\noffload_syn = true\n' + DAEMON_TOML + "\n[state]\npersist = true\n")
    config = load_daemon_config(path)
    assert config.offload_syn and config.state_dir
    path.write_text("offload_syn = true\n" + DAEMON_TOML)
    with pytest.raises(ConfigError, match="needs offload"):
        load_daemon_config(path)


def test_offload_prealloc_is_read_and_validated(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config

    assert read_offload_prealloc(Section("lb.toml", "", {"offload_prealloc": True}), "kernel") is True
    assert read_offload_prealloc(Section("lb.toml", "", {}), "kernel") is False
    with pytest.raises(ConfigError, match="needs offload") as info:
        read_offload_prealloc(Section("lb.toml", "", {"offload_prealloc": True}), "none")
    assert info.value.key == "offload_prealloc"
    path = tmp_path / "lb.toml"
    path.write_text('offload = "kernel"\n' + DAEMON_TOML)
    assert not load_daemon_config(path).offload_prealloc
    path.write_text('offload = "kernel"\noffload_prealloc = true\n' + DAEMON_TOML)
    assert load_daemon_config(path).offload_prealloc
    path.write_text('offload = "kernel"\noffload_prealloc = 1\n' + DAEMON_TOML)
    with pytest.raises(ConfigError, match="offload_prealloc"):
        load_daemon_config(path)


def test_the_labs_offload_prealloc_reaches_the_daemons_configuration(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config
    from mplslb.lab import Lab, LabSpec

    spec = LabSpec(offload="kernel", offload_syn=True, offload_prealloc=True)
    path = tmp_path / "lb.toml"
    path.write_text(Lab(spec, root=tmp_path).balancer_toml())
    config = load_daemon_config(path, need_interfaces=False)
    assert config.offload_prealloc and config.offload_syn
    path.write_text(Lab(LabSpec(offload="kernel"), root=tmp_path).balancer_toml())
    assert not load_daemon_config(path, need_interfaces=False).offload_prealloc
    with pytest.raises(ValueError, match="offload_prealloc"):
        LabSpec(offload_prealloc=True)


@needs_kernel
def test_a_preallocated_label_map_holds_the_whole_range_and_takes_syns_as_the_other(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``prealloc`` the label map is made whole, an element for each label of the balancer's range, and the
    flow map an element for each pair (maps without preallocation otherwise), and the tickets in them are taken as
    in the others: the frames, sessions and entries are the userspace path's."""
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path))
    config = on_veths(standard_config())
    loop = Loop()
    with entered(lb):
        core = OffloadedBalancer(Balancer(config), loop, tickets=True, prealloc=True)
    reference = Balancer(config)
    try:
        assert core.offload._map is not None
        info = bpf.map_info(core.offload._map.fd)
        labels = core.balancer.labels
        assert info.flags == 0 and info.max_entries == labels.c2s_max + 2 - labels.c2s_min
        flows = bpf.map_info(core.offload._ticket_maps["syn_flows"].fd)  # a flow for each pair, and room
        assert flows.flags == 0 and flows.max_entries == (labels.c2s_max + 2 - labels.c2s_min) // 2 + TICKETS_WANT
        for client_port in (0, 1, 0):
            taken_as_in_userspace(core, reference, loop, lb, syn_frame(port=client_port), client_port)
        assert core.stats()["tickets"]["syn_taken"] == 3
    finally:
        core.close()
    with entered(lb):
        other = OffloadedBalancer(Balancer(config), loop, tickets=True)
    try:
        assert other.offload._map is not None
        assert bpf.map_info(other.offload._map.fd).flags == bpf.BPF_F_NO_PREALLOC
        assert bpf.map_info(other.offload._ticket_maps["syn_flows"].fd).flags == bpf.BPF_F_NO_PREALLOC
    finally:
        other.close()


class _Taking:
    """The parts of the kernel offload a ticket desk's fold uses, the SYNs taken given by the test."""

    def __init__(self) -> None:
        self.taken: list[Taken] = []
        self.revoked: list[int] = []
        # what the waiting tickets use: the last poll handed over
        self.handed_over_at = 0.0
        self.restored: list[int] = []

    def set_client_ports(self, ports: Iterable[int]) -> None:
        list(ports)

    def set_services(self, services: Iterable[tuple[bytes, int]]) -> None:
        list(services)

    def take_tickets(self) -> list[Taken]:
        taken, self.taken = self.taken, []
        return taken

    def revoke_tickets(self, labels: list[int]) -> None:
        self.revoked.extend(labels)

    def release_flow(self, c2s: int) -> None:
        pass

    def restore_flow(self, c2s: int) -> None:
        self.restored.append(c2s)

    def ticket_counters(self) -> dict[str, int]:
        return {}

    ifindex = {port: 10 + port for port in range(4)}

    def ticket_entries(self, port: int, mac: bytes, c2s_watch: int, s2c_watch: int) -> bytes:
        return b""

    def issue_tickets(self, tickets: list[tuple[int, bytes]]) -> list[int]:
        return [c2s for c2s, _ in tickets]

    def drain_tickets(self) -> list[int]:
        return []


def test_tickets_for_flows_the_kernel_saw_close_wait_for_a_poll_and_are_then_tried_a_chunk_a_fold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tickets taken for the flows of sessions the kernel saw close and the table has not (no poll handed the close
    over yet: the program says so of each SYN it took) wait, none tried again until a poll is handed over, then
    :data:`tickets.WAIT_CHUNK` a fold (here: the old sessions did not end after all, so each is given back and its
    flow restored to the old session); the daemon's last fold makes them all at once. A ticket whose flow's session
    the kernel did not see close does not wait."""
    monkeypatch.setattr(tickets, "WAIT_CHUNK", 2)
    b = Balancer(standard_config())
    taking = _Taking()
    desk = TicketDesk(b, taking)  # type: ignore[arg-type]
    now = 100.0

    def decide() -> tuple[int, Any]:
        decision = b.pre_decide(len(desk.outstanding), now)
        assert not isinstance(decision, str)
        return decision

    def key(i: int) -> FlowKey:
        return FlowKey(IPPROTO_TCP, client_addr(0), 41000 + i, VIP, 80)

    old = []
    for i in range(6):
        c2s, server = decide()
        assert b.open_decided(c2s, server, key(i), 0, client_mac(0), 4, now) is not None
        old.append(c2s)
    new = []
    for i in range(6):
        c2s, server = decide()
        desk.outstanding[c2s] = server
        new.append(c2s)
        closed = i < 5  # the program saw the first five flows' sessions close
        taking.taken.append(Taken(c2s, 0, now + 1, client_mac(0), 4, client_addr(0), VIP, 41000 + i, 80, 74, closed))
    assert desk.fold(now + 1.01) == 0 and desk.stats()["waiting"] == 5
    assert desk.refused == 1 and taking.restored == [old[5]]  # not closed in the kernel: tried at once, given back
    assert desk.fold(now + 1.02) == 0 and desk.stats()["waiting"] == 5
    monkeypatch.setattr(tickets, "TICKETS_BUDGET", 8)  # outstanding and waiting together
    assert desk.refill(now + 1.03) == 3 and len(desk.outstanding) == 3
    revoked = len(taking.revoked)
    taking.handed_over_at = now + 1.5  # a poll read after the SYNs handed over: the old sessions did not end
    for refused in (3, 5):
        assert desk.fold(now + 1.6) == 0 and desk.refused == refused
    assert desk.fold(now + 1.7, wait=False) == 0 and desk.refused == 6 and desk.stats()["waiting"] == 0
    assert taking.restored == old[5:] + old[:5] and taking.revoked[:1] + taking.revoked[revoked:] == new[5:] + new[:5]
    assert all(b.sessions.by_c2s(c2s) is not None for c2s in old)


def test_a_ticket_whose_flows_old_session_came_after_the_last_polls_read_waits_for_the_next_poll() -> None:
    """Both SYNs of a reused flow taken while the loop was held, the old session's and the new one's, and folded
    after a poll's read: that poll, handed over, said nothing of the old session (not in the table when it read),
    so the new ticket waits for a poll that reads after its first fold, and only then is it tried."""
    b = Balancer(standard_config())
    taking = _Taking()
    desk = TicketDesk(b, taking)  # type: ignore[arg-type]
    now = 100.0
    key = FlowKey(IPPROTO_TCP, client_addr(0), 41000, VIP, 80)
    decision = b.pre_decide(0, now)
    assert not isinstance(decision, str)
    old, server = decision
    assert b.open_decided(old, server, key, 0, client_mac(0), 4, now + 0.5) is not None  # folded after the read
    decision = b.pre_decide(0, now)
    assert not isinstance(decision, str)
    desk.outstanding[decision[0]] = decision[1]
    taking.handed_over_at = now + 0.4  # a poll read after both SYNs (now + 0.1, + 0.3), before their fold
    taking.taken = [Taken(decision[0], 0, now + 0.3, client_mac(0), 4, client_addr(0), VIP, 41000, 80, 74, True)]
    assert desk.fold(now + 0.5) == 0 and desk.stats()["waiting"] == 1 and desk.refused == 0
    assert desk.fold(now + 0.6) == 0 and desk.stats()["waiting"] == 1  # no poll since
    taking.handed_over_at = now + 0.7  # a poll read after the first fold: the old session was in the table
    assert desk.fold(now + 0.8) == 0 and desk.stats()["waiting"] == 0
    assert desk.refused == 1 and taking.restored == [old]  # tried: here the old session went on, and keeps its flow


def test_a_ticket_taken_for_a_server_whose_mac_was_lost_since_is_given_back() -> None:
    """A ticket taken after its server's MAC was lost (the resolver lost it; the kernel had sent the SYN by the MAC
    known when the ticket was issued) is given back at the fold: its labels withdrawn, its server's count released,
    counted refused; no session is opened whose labels name no MAC, and the other tickets of the fold are made."""
    b = Balancer(standard_config())
    taking = _Taking()
    desk = TicketDesk(b, taking)  # type: ignore[arg-type]
    now = 100.0
    decisions = []
    for _ in range(2):
        decision = b.pre_decide(len(desk.outstanding), now)
        assert not isinstance(decision, str)
        desk.outstanding[decision[0]] = decision[1]
        decisions.append(decision)
    (lost, server), (kept, other) = decisions
    assert server is not other and server.active == other.active == 1
    b.pool.set_mac(server.name, b"")
    taking.taken = [Taken(c2s, 0, now + 0.001, client_mac(0), 4, client_addr(0), VIP, 40000 + i, 80, 74)
                    for i, c2s in enumerate((lost, kept))]  # fmt: skip
    assert desk.fold(now + 0.01) == 1
    assert taking.revoked == [lost] and desk.refused == 1 and desk.taken == 1
    assert b.sessions.by_c2s(lost) is None and b.labels.is_quarantined(lost)
    assert server.active == 0 and other.active == 1 and b.sessions.by_c2s(kept) is not None


@needs_kernel
def test_a_session_the_kernel_ran_whole_before_its_ticket_was_folded_closes_as_in_userspace(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``Connection: close`` session whose every frame the kernel switched (handshake, request, response, both
    FINs) before the daemon folded its ticket (a daemon preempted between its fold and its poll): a poll then hands
    over nothing of it (its measurement, FINs and counters wait for the session), and once folded it is the userspace
    path's session, closed by both FINs."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch, l7=True)
    try:
        assert core.desk is not None
        syn = syn_frame(sport=32000)
        result = run(core, lb, syn)
        assert result.retval == bpf.XDP_REDIRECT
        assert reference.receive(0, syn, loop.clock()) == [(2, result.data)]
        c2s = label_of(result.data)
        session = reference.sessions.by_c2s(c2s)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac
        c0 = client_addr(0)
        request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"

        def client(flags: int, payload: bytes = b"") -> bytes:
            packet = ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, 32000, 80, flags, payload))
            return from_client(c2s, packet)

        def server(flags: int, payload: bytes = b"") -> bytes:
            segment = tcp_segment(VIP, c0, 80, 32000, flags, payload, ack=1 + len(request))
            return from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, segment), port=port, mac=mac)

        time.sleep(0.001)  # the kernel's clock moves past the SYN's
        frames = [(port, server(SYN | ACK)), (0, client(ACK)), (0, client(ACK | PSH, request)),
                  (port, server(ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n")), (port, server(FIN | ACK)),
                  (0, client(FIN | ACK)), (port, server(ACK))]  # fmt: skip
        for in_port, frame in frames:
            expected = reference.receive(in_port, frame, loop.clock())
            assert [run(core, lb, frame, in_port).data] == [sent for _, sent in expected]
        core.offload.poll()  # before the fold: nothing of the session is handed over
        assert core.offload.fins == 0 and core.offload.records == 0
        assert core.desk.fold(loop.clock()) == 1
        core.offload.poll()
        ours, theirs = core.balancer.sessions.by_c2s(c2s), reference.sessions.by_c2s(c2s)
        assert ours is not None and theirs is not None
        assert ours.state is theirs.state is SessionState.ENDING
        assert core.offload.fins == 2 and core.balancer.l7_hosts == reference.l7_hosts == {"a": 1}
        assert core.balancer.switching.traffic(c2s) == reference.switching.traffic(c2s)
    finally:
        core.close()


@needs_kernel
def test_tickets_beyond_the_request_maps_slots_have_their_requests_go_up(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tickets are issued whether or not the bounded request map has a slot for each: those it refuses are counted
    (``e2big``) and hold no slot, and their sessions' requests go up, where the Host is read from the frame, while
    the tickets that got one have their requests copied in the kernel. The Hosts counted are the one-frame path's."""
    monkeypatch.setattr(xdp, "REQUEST_SLOTS", 4)
    core, reference, loop = pair(lb, tmp_path, monkeypatch, l7=True)
    requests = core.offload._requests
    try:
        assert core.desk is not None and requests is not None
        assert len(core.desk.outstanding) == TICKETS_WANT and requests.lookup_batch()[2] == 4
        assert core.offload.stats()["errors"] == {"e2big": TICKETS_WANT - 4}
        c0 = client_addr(0)
        verdicts = []
        for i in range(6):
            sport = 34000 + i
            syn = syn_frame(sport=sport)
            result = run(core, lb, syn)
            assert result.retval == bpf.XDP_REDIRECT
            assert [sent for _, sent in reference.receive(0, syn, loop.clock())] == [result.data]
            assert core.desk.fold(loop.clock()) == 1
            c2s = label_of(result.data)
            session = reference.sessions.by_c2s(c2s)
            assert session is not None
            port, mac = session.server.config.port_id, session.server.mac
            request = f"GET / HTTP/1.1\r\nHost: h{i}.example\r\nConnection: close\r\n\r\n".encode()

            answer = tcp_segment(VIP, c0, 80, sport, SYN | ACK, ack=1 + len(request))
            frames = [
                (port, from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, answer), port=port, mac=mac)),
                (0, from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, ACK)))),
                (0, from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, ACK | PSH, request)))),
            ]
            time.sleep(0.001)  # the kernel's clock moves past the SYN's
            for in_port, frame in frames:
                now = loop.clock()
                expected = reference.receive(in_port, frame, now)
                result = run(core, lb, frame, in_port)
                if result.retval == bpf.XDP_REDIRECT:
                    assert [result.data] == [sent for _, sent in expected]
                else:
                    assert result.data == frame and core.receive_batch([(in_port, frame)], now) == expected
            verdicts.append(result.retval)
        assert verdicts == [bpf.XDP_REDIRECT] * 4 + [bpf.XDP_PASS] * 2
        core.offload.poll()
        assert core.offload.stats()["copies"] == 4
        assert core.balancer.l7_hosts == reference.l7_hosts == {f"h{i}.example": 1 for i in range(6)}
    finally:
        core.close()


@needs_kernel
def test_a_closed_sessions_flow_used_again_takes_a_ticket_and_ends_it_as_in_userspace(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a session is ending (both FINs), its flow leaves the flow map: a new SYN on it (the client's port used
    again) is taken in the kernel, and the fold ends the old session as a reused flow's and opens the new one, as
    the userspace path does with the SYN; the same SYN from another MAC is given back and dropped as there
    (``session_wrong_source``), the old session left as it was and its flow back in the map."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    c0, sport = client_addr(0), 34000

    def close(c2s: int) -> None:
        """Both FINs of the session of ``c2s``, through the program and the reference; then folded and synced."""
        session = reference.sessions.by_c2s(c2s)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac
        segment = lambda flags, ack=0: tcp_segment(c0, VIP, sport, 80, flags, b"", ack=ack)  # noqa: E731
        reply = lambda flags: tcp_segment(VIP, c0, 80, sport, flags, b"", ack=1)  # noqa: E731
        for in_port, frame in [
            (port, from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, reply(SYN | ACK)), port=port, mac=mac)),
            (0, from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, segment(ACK, 1)))),
            (port, from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, reply(FIN | ACK)), port=port, mac=mac)),
            (0, from_client(c2s, ipv4(c0, VIP, IPPROTO_TCP, segment(FIN | ACK, 2)))),
        ]:
            now = loop.clock()
            expected = reference.receive(in_port, frame, now)
            result = run(core, lb, frame, in_port)
            if result.retval == bpf.XDP_PASS:  # up to the daemon (the measurement, a FIN under it)
                assert result.data == frame and core.receive_batch([(in_port, frame)], now) == expected
            else:
                assert [result.data] == [sent for _, sent in expected]
        core.offload.poll()
        ours = core.balancer.sessions.by_c2s(c2s)
        assert ours is not None and ours.state is SessionState.ENDING
        core.offload.sync()

    try:
        assert core.desk is not None
        syn = syn_frame(sport=sport)
        first = taken_as_in_userspace(core, reference, loop, lb, syn)
        assert run(core, lb, syn).retval == bpf.XDP_PASS  # live: its flow is in the map
        close(first)
        # The client's port used again: taken, the old session ended as reused, the new one the userspace path's.
        second = taken_as_in_userspace(core, reference, loop, lb, syn)
        assert second != first and core.balancer.sessions.by_c2s(first) is None
        assert reference.sessions.by_c2s(first) is None and core.balancer.drops == reference.drops
        close(second)
        # The same SYN from another MAC: taken (the flow is out of the map), given back at the fold, dropped.
        stranger = ether(PORT_MAC[0], client_mac(7), syn[14:])
        assert run(core, lb, stranger).retval == bpf.XDP_REDIRECT
        assert reference.receive(0, stranger, loop.clock()) == []
        assert core.desk.fold(loop.clock()) == 0 and core.desk.refused == 1
        assert core.balancer.drops == reference.drops and reference.drops.get("session_wrong_source") == 1
        ending = core.balancer.sessions.by_c2s(second)
        assert ending is not None and ending.state is SessionState.ENDING
        core.offload.sync()
        assert run(core, lb, syn).retval == bpf.XDP_PASS  # the flow is the ending session's again
    finally:
        core.close()


@needs_kernel
@pytest.mark.parametrize("fold_first", [True, False], ids=["folded-then-polled", "polled-then-folded"])
def test_a_flow_the_kernel_saw_close_takes_a_ticket_and_its_old_session_ends_as_in_userspace(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold_first: bool
) -> None:
    """A ``Connection: close`` session run whole in the kernel (handshake, request, response, both FINs), and its
    client's port used again before a poll handed the close over: the program takes the new SYN under a ticket at
    once, where it went up to the daemon before (a SYN after one FIN only, or from another MAC, still goes up). A
    fold before the poll holds the ticket until a poll has handed the old session over whole; either way the old
    session then ends as a reused flow's and the new one opens, as the userspace path does with the same frames, and
    the flow map holds the flow for the new session: the old session's release leaves it alone once the ticket was
    read, and a release synced before that deletes it and the read enters it again."""
    core, reference, loop = pair(lb, tmp_path, monkeypatch, l7=True)
    sport, c0 = 35000 + fold_first, client_addr(0)
    request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    try:
        assert core.desk is not None
        syn = syn_frame(sport=sport)
        first = taken_as_in_userspace(core, reference, loop, lb, syn)
        session = reference.sessions.by_c2s(first)
        assert session is not None
        port, mac = session.server.config.port_id, session.server.mac

        def client(flags: int, payload: bytes = b"") -> bytes:
            packet = ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, flags, payload))
            return from_client(first, packet)

        def server(flags: int, payload: bytes = b"") -> bytes:
            segment = tcp_segment(VIP, c0, 80, sport, flags, payload, ack=1 + len(request))
            return from_server(first + 1, ipv4(VIP, c0, IPPROTO_TCP, segment), port=port, mac=mac)

        time.sleep(0.001)  # the kernel's clock moves past the SYN's
        frames = [(port, server(SYN | ACK)), (0, client(ACK)), (0, client(ACK | PSH, request)),
                  (port, server(ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\n")), (port, server(FIN | ACK)),
                  (0, client(FIN | ACK)), (port, server(ACK))]  # fmt: skip
        for i, (in_port, frame) in enumerate(frames):
            expected = reference.receive(in_port, frame, loop.clock())
            assert [run(core, lb, frame, in_port).data] == [sent for _, sent in expected]
            if i == 4:  # the server's FIN alone: the session is not closed yet
                assert run(core, lb, syn).retval == bpf.XDP_PASS
        stranger = ether(PORT_MAC[0], client_mac(7), syn[14:])
        assert run(core, lb, stranger).retval == bpf.XDP_PASS
        assert core.offload.ticket_counters()["syn_flow_live"] == 2
        old = core.balancer.sessions.by_c2s(first)
        assert old is not None and old.state is not SessionState.ENDING  # nothing of the close handed over yet

        time.sleep(0.001)
        now = loop.clock()
        result = run(core, lb, syn)
        assert result.retval == bpf.XDP_REDIRECT
        expected = reference.receive(0, syn, now)
        assert [result.data] == [sent for _, sent in expected]
        second = label_of(result.data)
        assert second != first
        flows = core.offload._ticket_maps["syn_flows"]
        assert isinstance(flows, bpf.Map)
        key = syn_flow_key(c0, VIP, struct.pack("!HH", sport, 80))
        if fold_first:
            assert core.desk.fold(loop.clock()) == 0 and core.stats()["tickets"]["waiting"] == 1
            assert core.desk.fold(loop.clock()) == 0  # tried again once a poll is handed over, not before
            assert core.balancer.sessions.by_c2s(first) is not None
        core.offload.poll()
        assert core.offload.whole == 1
        core.offload.sync()  # the old session's flow released
        assert flows.lookup(key) == (struct.pack("=I", second) if fold_first else None)
        if not fold_first:  # a copy of the new SYN sent again meanwhile takes a ticket too, given back at the fold
            assert run(core, lb, syn).retval == bpf.XDP_REDIRECT
        assert core.desk.fold(loop.clock()) == 1 and core.stats()["tickets"]["waiting"] == 0
        assert flows.lookup(key) == struct.pack("=I", second)
        assert core.offload.whole == 1 and core.desk.refused == (0 if fold_first else 1)
        assert core.balancer.sessions.by_c2s(first) is None and reference.sessions.by_c2s(first) is None
        ours, theirs = core.balancer.sessions.by_c2s(second), reference.sessions.by_c2s(second)
        assert ours is not None and theirs is not None
        for field in ("key", "client_port", "client_mac", "ip_version", "state"):
            assert getattr(ours, field) == getattr(theirs, field), field
        assert ours.server.name == theirs.server.name
        assert core.balancer.sessions.ended == reference.sessions.ended and reference.sessions.ended["reused"] == 1
        assert core.balancer.drops == reference.drops and core.balancer.l7_hosts == reference.l7_hosts == {"a": 1}
        core.offload.sync()
        assert flows.lookup(key) == struct.pack("=I", second)
        assert run(core, lb, syn).retval == bpf.XDP_PASS  # the new session's flow, live
    finally:
        core.close()


@needs_kernel
def test_a_ticket_taken_for_a_flow_the_daemon_just_opened_is_given_back_and_the_flow_kept(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SYN that went up (no ticket) opens its session in userspace; a copy of it the program takes before the
    sync enters the session's flow in the map is refused at the fold (its ticket given back), and the flow is the
    session's again: its next SYN goes up to it instead of taking another ticket."""
    core, _, loop = pair(lb, tmp_path, monkeypatch)
    try:
        assert core.desk is not None
        core.desk.revoke_all(loop.clock())
        syn = syn_frame(sport=33000)
        assert run(core, lb, syn).retval == bpf.XDP_PASS  # no ticket
        ((_, sent),) = core.balancer.receive(0, syn, loop.clock())  # opened in userspace, not synced yet
        session = core.balancer.sessions.by_c2s(label_of(sent))
        assert session is not None
        core.desk.refill(loop.clock())
        assert run(core, lb, syn).retval == bpf.XDP_REDIRECT  # its flow is not in the map yet
        core.offload.sync()
        assert core.desk.fold(loop.clock()) == 0 and core.desk.refused == 1
        assert core.balancer.sessions.by_c2s(session.c2s) is not None
        for _ in range(2):
            assert run(core, lb, syn).retval == bpf.XDP_PASS  # the session's flow
            core.receive_batch([(0, syn)], loop.clock())
        assert core.desk.refused == 1 and core.stats()["tickets"]["syn_flow_live"] == 2
        assert core.offload.entries == 2 * (len(core.desk.outstanding) + 1)
    finally:
        core.close()


@needs_kernel
def test_the_tickets_and_the_kernels_syns_are_in_the_prometheus_metrics(
    lb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from mplslb.control.metrics import SnapshotCollector
    from mplslb.control.tables import offload_tables, snapshot, with_offload

    core, reference, loop = pair(lb, tmp_path, monkeypatch)
    try:
        assert core.desk is not None
        c2s = taken_as_in_userspace(core, reference, loop, lb, syn_frame(sport=32000))
        session = core.balancer.sessions.by_c2s(c2s)
        assert session is not None
        held = {s.name: sum(1 for t in core.desk.outstanding.values() if t is s) for s in core.balancer.pool}
        snap = snapshot(core.balancer, now=loop.clock())
        with_offload(snap, core.stats())
        metrics = {m.name: m for m in SnapshotCollector(lambda: snap).collect()}
        tickets = {s.labels["what"]: s.value for s in metrics["mplslb_offload_tickets"].samples}
        syns = {s.labels["what"]: s.value for s in metrics["mplslb_offload_syn"].samples}
        outstanding = metrics["mplslb_offload_tickets_outstanding"].samples[0].value
        waiting = metrics["mplslb_offload_tickets_waiting"].samples[0].value
    finally:
        core.close()
    console = Console(width=160, record=True)
    for table in offload_tables(snap["offload"]):
        console.print(table)
    text = console.export_text()
    assert "Kernel offload (XDP: p0 generic" in text and "Tickets (offload_syn)" in text
    assert re.search(r"syn taken[\s│]+1\b", text) and re.search(rf"outstanding[\s│]+{TICKETS_WANT - 1}\b", text)
    assert waiting == 0 and re.search(r"waiting[\s│]+0\b", text)
    assert offload_tables(None) == []
    # a server's tickets are shown apart from its sessions: the one taken is a session of its server
    rows = {row["name"]: (row["active"], row["total"], row["tickets"]) for row in snap["servers"]}
    assert rows == {name: (int(name == session.server.name),) * 2 + (count,) for name, count in held.items()}
    assert sum(held.values()) == TICKETS_WANT - 1
    assert all(re.search(rf"outstanding for {name}[\s│]+{count}\b", text) for name, count in held.items())
    assert tickets["taken"] == 1 and tickets["issued"] == TICKETS_WANT and tickets["revoked"] == 0
    assert syns == {"syn_taken": 1, "syn_no_ticket": 0, "syn_flow_live": 0}
    assert outstanding == TICKETS_WANT - 1
    assert metrics["mplslb_offload_entries"].samples[0].value >= 2
