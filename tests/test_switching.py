"""The session label switching unit: the label switching table's rows, the fast path, counters and reports."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ACK, FIN, PSH, RST, SYN, RecordingMirror, ip, ipv4, ipv6, labelled, mac, tcp_segment
from mplslb.switching import (
    DROPPED,
    IPV6_PAYLOAD,
    LABEL_SPACE,
    NOT_LABELLED,
    WATCH_ALL,
    WATCH_TCP_END,
    FastEvent,
    LabelSwitchingTable,
    SwitchEntry,
    switch_frame,
)
from mplslb.switching.layout import ACK_KNOWN, TCP_FLAGS_UNKNOWN
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.mpls import pack_entry

PORT_MACS = {0: mac(0xB0, 0), 1: mac(0xB0, 1), 2: mac(0xB1, 0), 3: mac(0xB1, 1)}
PLACES = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
CLIENT_MAC, SERVER_MAC, OTHER_MAC = mac(0xC0, 1), mac(0x5E, 1), mac(0xC0, 2)
CLIENT, VIP = ip("10.1.0.1"), ip("10.0.0.100")
CLIENT6, VIP6 = ip("fd00:1::1"), ip("fd00::100")
MPLS = struct.pack("!H", ETH_P_MPLS_UC)
LABEL = 1001


@pytest.fixture(scope="module")
def shared_table() -> LabelSwitchingTable:
    return LabelSwitchingTable(PORT_MACS, PLACES)


@pytest.fixture
def table(shared_table: LabelSwitchingTable) -> LabelSwitchingTable:
    """The (large, preallocated) table, emptied between tests instead of rebuilt."""
    t = shared_table
    for label in range(LABEL_SPACE):
        if t.valid[label]:
            t.withdraw(label)
    t.drops.clear()
    return t


def install_c2s(t: LabelSwitchingTable, label: int = LABEL, **kw: object) -> None:
    values: dict[str, object] = {"out_port": 2, "next_hop": SERVER_MAC, "in_port": 0, "peer": CLIENT_MAC}
    values.update(kw)
    t.install(label, **values)  # type: ignore[arg-type]


def switch(t: LabelSwitchingTable, port: int, frame: bytes, now: float = 5.0):  # type: ignore[no-untyped-def]
    out: list[tuple[int, bytes]] = []
    events: list[FastEvent] = []
    result = switch_frame(t.hot, port, frame, now, out, events)
    return result, out, events


def c2s_frame(flags: int = ACK, payload: bytes = b"data", *, label: int = LABEL, ttl: int = 64, **kw: object) -> bytes:
    packet = ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, flags, payload))
    return labelled(PORT_MACS[0], CLIENT_MAC, label, packet, ttl=ttl, **kw)  # type: ignore[arg-type]


# -- the table's rows --------------------------------------------------------------------------------------------
def test_install_gives_a_row_with_line_card_port_and_next_hop(table: LabelSwitchingTable) -> None:
    assert table.entry(LABEL) is None
    install_c2s(table, now=3.0)
    assert table.entry(LABEL) == SwitchEntry(
        label=LABEL,
        line_card=1,
        port=0,
        port_id=2,
        next_hop=SERVER_MAC,
        in_port_id=0,
        peer=CLIENT_MAC,
        packets=0,
        bytes=0,
        last_seen=3.0,
    )
    table.install(LABEL + 1, out_port=1, next_hop=CLIENT_MAC, in_port=3, peer=SERVER_MAC)
    row = table.entry(LABEL + 1)
    assert row is not None
    assert (row.line_card, row.port, row.port_id, row.next_hop, row.in_port_id) == (0, 1, 1, CLIENT_MAC, 3)
    assert table.installed == 2
    assert table.port_place(3) == (1, 1)


def test_reinstalling_a_label_replaces_its_row_and_resets_counters(table: LabelSwitchingTable) -> None:
    install_c2s(table)
    assert switch(table, 0, c2s_frame())[0] == 2
    assert table.entry(LABEL).packets == 1  # type: ignore[union-attr]
    install_c2s(table, out_port=3, next_hop=OTHER_MAC, now=9.0)
    row = table.entry(LABEL)
    assert row is not None and (row.port_id, row.next_hop, row.packets, row.bytes, row.last_seen) == (
        3,
        OTHER_MAC,
        0,
        0,
        9.0,
    )
    assert table.installed == 1
    result, out, _ = switch(table, 0, c2s_frame())
    assert result == 3 and out[0][1][:12] == OTHER_MAC + PORT_MACS[3]


def test_withdraw_removes_the_row(table: LabelSwitchingTable) -> None:
    install_c2s(table)
    table.withdraw(LABEL)
    assert table.entry(LABEL) is None
    assert table.installed == 0
    table.withdraw(LABEL)  # twice: nothing to undo
    table.withdraw(LABEL + 2)  # never installed
    assert table.installed == 0
    result, out, _ = switch(table, 0, c2s_frame())
    assert (result, out, table.drops) == (DROPPED, [], {"label_unknown": 1})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"label": 0}, "outside the usable label space"),
        ({"label": 15}, "outside the usable label space"),
        ({"label": -1}, "outside the usable label space"),
        ({"label": LABEL_SPACE}, "outside the usable label space"),
        ({"out_port": 9}, "unknown port"),
        ({"in_port": -1}, "unknown port"),
        ({"next_hop": b"\x02" * 5}, "6-byte MAC"),
        ({"peer": b"\x02" * 7}, "6-byte MAC"),
        ({"next_hop": b""}, "6-byte MAC"),
    ],
)
def test_install_rejects_bad_arguments(table: LabelSwitchingTable, kw: dict[str, object], match: str) -> None:
    label = int(kw.pop("label", LABEL))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=match):
        install_c2s(table, label, **kw)
    assert table.installed == 0
    if 0 <= label < LABEL_SPACE:
        assert table.entry(label) is None


def test_lowest_and_highest_usable_labels(table: LabelSwitchingTable) -> None:
    for label in (16, LABEL_SPACE - 1):
        install_c2s(table, label)
        result, out, _ = switch(table, 0, c2s_frame(label=label))
        assert result == 2 and out[0][1][14:18] == pack_entry(label, 0, True, 63)


# -- the fast path -----------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    label=st.integers(16, LABEL_SPACE - 1),
    tc=st.integers(0, 7),
    bottom=st.booleans(),
    ttl=st.integers(2, 255),
    body=st.binary(max_size=300),
    vlan=st.none() | st.integers(0, 0xFFFF),
)
def test_switching_rewrites_addresses_and_ttl_only(
    shared_table: LabelSwitchingTable, label: int, tc: int, bottom: bool, ttl: int, body: bytes, vlan: int | None
) -> None:
    t = shared_table
    install_c2s(t, label)  # no peer IP: the body is not read
    try:
        frame = labelled(
            PORT_MACS[0], CLIENT_MAC, label, body, ttl=ttl, tc=tc, s=bottom, vlans=() if vlan is None else [vlan]
        )
        result, out, events = switch(t, 0, frame)
        if not bottom:  # a session label is always the only entry of its stack
            assert result == DROPPED and out == [] and t.drops["label_not_bottom"] >= 1
            return
        assert result == 2 and events == []
        assert out == [(2, SERVER_MAC + PORT_MACS[2] + MPLS + pack_entry(label, tc, bottom, ttl - 1) + body)]
        assert len(out[0][1]) == len(frame) - (0 if vlan is None else 4)  # the tag is not sent on
    finally:
        t.withdraw(label)


def test_memoryview_frames_switch_like_bytes(table: LabelSwitchingTable) -> None:
    install_c2s(table, peer_ip=CLIENT, watch=WATCH_TCP_END)
    frame = c2s_frame(FIN | ACK)
    as_bytes = switch(table, 0, frame)
    as_view = switch(table, 0, memoryview(frame))
    assert as_bytes[:2] == as_view[:2]
    assert [e.tcp_flags for e in as_view[2]] == [FIN | ACK]


def test_vlan_tagged_frame_is_switched(table: LabelSwitchingTable) -> None:
    install_c2s(table, peer_ip=CLIENT, watch=WATCH_TCP_END)
    frame = c2s_frame(RST, b"", vlans=[100])
    result, out, events = switch(table, 0, frame, now=7.0)
    assert result == 2
    assert out[0][1] == SERVER_MAC + PORT_MACS[2] + MPLS + pack_entry(LABEL, 0, True, 63) + frame[22:]
    assert [(e.label, e.ip_offset, e.tcp_flags, e.now) for e in events] == [(LABEL, 22, RST, 7.0)]
    assert table.bytes[LABEL] == len(frame)


def test_unlabelled_frames_are_left_alone(table: LabelSwitchingTable) -> None:
    install_c2s(table)
    plain = build_ethernet(PORT_MACS[0], CLIENT_MAC, ETH_P_IP) + ipv4(CLIENT, VIP, IPPROTO_UDP, bytes(8))
    tagged = build_ethernet(PORT_MACS[0], CLIENT_MAC, ETH_P_IP, [5]) + ipv4(CLIENT, VIP, IPPROTO_UDP, bytes(8))
    for frame in (plain, tagged, b"", plain[:13], plain[:14], tagged[:17]):
        assert switch(table, 0, frame) == (NOT_LABELLED, [], [])
    assert table.drops == {}
    assert table.packets[LABEL] == 0


def test_counters_follow_switched_frames_only(table: LabelSwitchingTable) -> None:
    install_c2s(table, now=1.0)
    sizes = []
    for i in range(3):
        frame = c2s_frame(payload=b"x" * (10 * i))
        sizes.append(len(frame))
        switch(table, 0, frame, now=2.0 + i)
    switch(table, 1, c2s_frame(), now=10.0)  # wrong port: dropped, not counted
    switch(table, 0, c2s_frame(ttl=1), now=11.0)  # expired: dropped, not counted
    row = table.entry(LABEL)
    assert row is not None and (row.packets, row.bytes, row.last_seen) == (3, sum(sizes), 4.0)
    table.send(LABEL, bytes(100), 14, 100, 12.0, [], ttl=64)  # a slow-path frame of the session
    row = table.entry(LABEL)
    assert row is not None and (row.packets, row.bytes, row.last_seen) == (4, sum(sizes) + 100, 12.0)
    assert table.drops == {"label_wrong_ingress": 1, "mpls_ttl_expired": 1}


@pytest.mark.parametrize(
    ("port", "frame_kw", "reason"),
    [
        (1, {}, "label_wrong_ingress"),  # another port
        (0, {"src": OTHER_MAC}, "label_wrong_ingress"),  # another sender on the right port
        (0, {"src_ip": ip("10.1.0.2")}, "label_wrong_ingress"),  # another client behind the same router
        (0, {"ttl": 1}, "mpls_ttl_expired"),
        (0, {"ttl": 0}, "mpls_ttl_expired"),
        (0, {"label": LABEL + 2}, "label_unknown"),
        (0, {"label": 3}, "mpls_reserved_label"),
        (0, {"label": 0, "ttl": 0}, "mpls_reserved_label"),
    ],
)
def test_drops(table: LabelSwitchingTable, port: int, frame_kw: dict[str, object], reason: str) -> None:
    install_c2s(table, peer_ip=CLIENT)
    src_ip = frame_kw.pop("src_ip", CLIENT)
    src = frame_kw.pop("src", CLIENT_MAC)
    packet = ipv4(src_ip, VIP, IPPROTO_TCP, tcp_segment(src_ip, VIP, 40000, 80, ACK))  # type: ignore[arg-type]
    frame = labelled(PORT_MACS[port], src, int(frame_kw.pop("label", LABEL)), packet, **frame_kw)  # type: ignore
    assert switch(table, port, frame) == (DROPPED, [], [])
    assert table.drops == {reason: 1}


@pytest.mark.parametrize("n", [14, 15, 17])
def test_truncated_label_entry(table: LabelSwitchingTable, n: int) -> None:
    frame = labelled(PORT_MACS[0], CLIENT_MAC, LABEL, b"")[:n]
    assert switch(table, 0, frame) == (DROPPED, [], [])
    tagged = labelled(PORT_MACS[0], CLIENT_MAC, LABEL, b"", vlans=[1])[: n + 4]
    assert switch(table, 0, tagged) == (DROPPED, [], [])
    assert table.drops == {"mpls_truncated": 2}


def test_ipv6_peer_address_is_checked(table: LabelSwitchingTable) -> None:
    install_c2s(table, peer_ip=CLIENT6, watch=IPV6_PAYLOAD)
    good = ipv6(CLIENT6, VIP6, IPPROTO_TCP, tcp_segment(CLIENT6, VIP6, 40000, 80, ACK))
    other = ip("fd00:1::2")
    forged = ipv6(other, VIP6, IPPROTO_TCP, tcp_segment(other, VIP6, 40000, 80, ACK))
    assert switch(table, 0, labelled(PORT_MACS[0], CLIENT_MAC, LABEL, good))[0] == 2
    assert switch(table, 0, labelled(PORT_MACS[0], CLIENT_MAC, LABEL, forged))[0] == DROPPED
    assert table.drops == {"label_wrong_ingress": 1}


# -- reports to the session manager ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "reported"),
    [
        (FIN | ACK, True),
        (RST, True),
        (RST | ACK, True),
        (FIN | PSH | ACK, True),
        (ACK, False),
        (SYN, False),
        (PSH | ACK, False),
    ],
)
def test_tcp_end_watch_reports_fin_and_rst(table: LabelSwitchingTable, flags: int, reported: bool) -> None:
    install_c2s(table, watch=WATCH_TCP_END)
    frame = c2s_frame(flags)
    result, out, events = switch(table, 0, frame, now=6.0)
    assert result == 2 and len(out) == 1
    assert events == ([FastEvent(LABEL, frame, 18, flags, 6.0)] if reported else [])


def test_ipv4_options_move_the_flags(table: LabelSwitchingTable) -> None:
    """With IHL 8 the TCP flags are 12 bytes further on; a reader assuming 20 bytes would read
    the source port's low byte, 0x01 here, as FIN."""
    install_c2s(table, watch=WATCH_TCP_END)
    nops = b"\x01" * 12
    for flags, reported in ((ACK, False), (FIN | ACK, True), (RST, True)):
        segment = tcp_segment(CLIENT, VIP, 0x9C01, 80, flags, b"x")  # source port's low byte 0x01
        packet = ipv4(CLIENT, VIP, IPPROTO_TCP, segment, options=nops)
        assert packet[0] == 0x48 and packet[20 + 13] == 0x01
        frame = labelled(PORT_MACS[0], CLIENT_MAC, LABEL, packet)
        _, out, events = switch(table, 0, frame)
        assert len(out) == 1
        assert [e.tcp_flags for e in events] == ([flags] if reported else [])


@pytest.mark.parametrize(
    "ext", [b"", b"\x06\x00" + bytes(6), b"\x06\x01" + bytes(14)], ids=["plain", "dstopts8", "dstopts16"]
)
def test_ipv6_flags_right_after_the_header_or_the_frame_goes_up(table: LabelSwitchingTable, ext: bytes) -> None:
    """The same label carries both directions' frames whatever extension headers each side adds: the flags are
    read only where TCP follows the fixed header; behind extension headers every frame is reported for the session
    manager to read (never a wrong byte taken for FIN or RST)."""
    install_c2s(table, watch=WATCH_TCP_END | IPV6_PAYLOAD)
    proto = 60 if ext else IPPROTO_TCP
    for flags, reported in ((ACK, False), (FIN | ACK, True), (RST | ACK, True)):
        packet = ipv6(CLIENT6, VIP6, proto, tcp_segment(CLIENT6, VIP6, 40000, 80, flags), ext=ext)
        _, out, events = switch(table, 0, labelled(PORT_MACS[0], CLIENT_MAC, LABEL, packet))
        assert len(out) == 1
        if ext:
            assert [e.tcp_flags for e in events] == [TCP_FLAGS_UNKNOWN]
        else:
            assert [e.tcp_flags for e in events] == ([flags] if reported else [])


def test_watch_all_reports_every_frame(table: LabelSwitchingTable) -> None:
    install_c2s(table, watch=WATCH_ALL)
    frames = [c2s_frame(ACK), c2s_frame(FIN | ACK), c2s_frame(PSH | ACK, b"GET /")]
    reports = [switch(table, 0, f, now=float(i))[2] for i, f in enumerate(frames)]
    # Without the TCP-end bit the flags are not read: every frame is reported with flags 0.
    assert [[(e.label, e.frame, e.tcp_flags, e.now) for e in r] for r in reports] == [
        [(LABEL, f, 0, float(i))] for i, f in enumerate(frames)
    ]
    table.set_watch(LABEL, WATCH_ALL | WATCH_TCP_END)
    assert [e.tcp_flags for e in switch(table, 0, c2s_frame(ACK))[2]] == [ACK]
    table.set_watch(LABEL, 0)
    assert switch(table, 0, c2s_frame(FIN))[2] == []


def test_a_session_label_above_other_entries_is_dropped(table: LabelSwitchingTable) -> None:
    install_c2s(table, watch=WATCH_TCP_END)
    frame = c2s_frame(FIN | ACK, s=False, below=[pack_entry(2002)])
    result, out, events = switch(table, 0, frame)
    assert result == DROPPED and out == [] and events == [] and table.drops == {"label_not_bottom": 1}


def test_flags_beyond_the_frame_are_not_reported(table: LabelSwitchingTable) -> None:
    install_c2s(table, watch=WATCH_TCP_END)
    frame = c2s_frame(FIN | ACK)[: 18 + 20 + 10]  # the TCP header ends before its flags
    result, out, events = switch(table, 0, frame)
    assert result == 2 and len(out) == 1 and events == []
    bare = labelled(PORT_MACS[0], CLIENT_MAC, LABEL, b"")  # nothing at all under the label
    assert switch(table, 0, bare)[0] == 2


def test_mirrors_are_told_every_install_withdrawal_and_watch_change_in_order(table: LabelSwitchingTable) -> None:
    mirror = RecordingMirror()
    table.add_mirror(mirror)
    try:
        install_c2s(table, watch=WATCH_ALL | WATCH_TCP_END)
        table.set_watch(LABEL, WATCH_ALL | WATCH_TCP_END)  # no change: nothing told
        table.clear_watch(LABEL, WATCH_ALL)
        table.withdraw(LABEL)
        table.withdraw(LABEL)  # not installed any more: nothing to tell
        assert mirror.told == [("installed", LABEL), ("watch", LABEL), ("withdrawn", LABEL)]
        assert table.watch[LABEL] == 0
    finally:
        table.remove_mirror(mirror)
    install_c2s(table)
    assert len(mirror.told) == 3  # removed: told nothing more


def test_send_attaches_the_label_addresses_the_next_hop_and_counts(table: LabelSwitchingTable) -> None:
    install_c2s(table, now=1.0)
    packet = ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, SYN))
    frame = build_ethernet(PORT_MACS[0], CLIENT_MAC, ETH_P_IP) + packet + bytes(6)  # Ethernet padding
    out: list[tuple[int, bytes]] = []
    table.send(LABEL, frame, 14, 14 + len(packet), 2.5, out, ttl=63, tc=5)
    assert out == [(2, SERVER_MAC + PORT_MACS[2] + MPLS + pack_entry(LABEL, 5, True, 63) + packet)]
    assert table.traffic(LABEL) == (1, len(frame)) and table.last_active(LABEL) == 2.5


def test_folded_counters_add_up_and_last_seen_only_moves_forward(table: LabelSwitchingTable) -> None:
    install_c2s(table, now=10.0)
    install_c2s(table, LABEL + 2, now=10.0)
    labels = np.array([LABEL, LABEL + 2])
    table.fold_counters(labels, np.array([3, 1]), np.array([300, 64]), np.array([12.0, 9.0]))
    assert table.traffic(LABEL) == (3, 300) and table.traffic(LABEL + 2) == (1, 64)
    assert table.last_seen[LABEL] == 12.0 and table.last_seen[LABEL + 2] == 10.0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"peer_ip": CLIENT, "dst_ip": VIP}, "needs the session's ports"),
        ({"peer_ip": CLIENT, "ports": (40000, 80)}, "peer_ip and dst_ip"),
        ({"dst_ip": VIP, "ports": (40000, 80)}, "peer_ip and dst_ip"),
        ({"peer_ip": CLIENT, "dst_ip": VIP6, "ports": (40000, 80)}, "peer_ip and dst_ip"),
        ({"peer_ip": CLIENT6, "dst_ip": VIP6, "ports": (40000, 80)}, "peer_ip and dst_ip"),  # not an IPv6 label
        ({"peer_ip": CLIENT, "dst_ip": VIP, "ports": (70000, 80)}, "two ports"),
        ({"peer_ip": CLIENT, "dst_ip": VIP, "ports": (1, 2, 3)}, "two ports"),
    ],
)
def test_install_rejects_a_bad_flow_binding(table: LabelSwitchingTable, kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        install_c2s(table, **kw)
    assert table.installed == 0


def test_a_label_bound_to_a_flow_takes_only_that_flow(table: LabelSwitchingTable) -> None:
    """The one-frame path's named reason for the flow binding (the three paths are compared case by case in
    tests/test_offload.py): a C2S frame from another source port of the same client is dropped; an S2C label
    reinstalled for another client drops the frames to the previous one."""
    install_c2s(table, peer_ip=CLIENT, dst_ip=VIP, ports=(40000, 80))
    assert switch(table, 0, c2s_frame())[0] == 2
    segment = tcp_segment(CLIENT, VIP, 40001, 80, ACK)
    other = labelled(PORT_MACS[0], CLIENT_MAC, LABEL, ipv4(CLIENT, VIP, IPPROTO_TCP, segment))
    assert switch(table, 0, other)[0] == DROPPED and table.drops == {"label_wrong_flow": 1}
    s2c = LABEL + 1
    table.install(s2c, out_port=0, next_hop=CLIENT_MAC, in_port=2, peer=SERVER_MAC, peer_ip=VIP,
                  dst_ip=CLIENT, ports=(80, 40000))  # fmt: skip
    segment = tcp_segment(VIP, CLIENT, 80, 40000, ACK)
    answer = labelled(PORT_MACS[2], SERVER_MAC, s2c, ipv4(VIP, CLIENT, IPPROTO_TCP, segment))
    assert switch(table, 2, answer)[0] == 0
    table.install(s2c, out_port=1, next_hop=OTHER_MAC, in_port=2, peer=SERVER_MAC, peer_ip=VIP,
                  dst_ip=ip("10.1.0.2"), ports=(80, 40000))  # fmt: skip
    assert switch(table, 2, answer)[0] == DROPPED and table.drops["label_wrong_flow"] == 2
    table.withdraw(s2c)
    assert table.flow[s2c] == b"" and table.bound[s2c] == 0


def _row(t: LabelSwitchingTable, label: int) -> tuple[object, ...]:
    return (t.valid[label], t.watch[label], t.v6[label], t.out_port[label], t.in_port[label], t.rewrite[label],
            t.peer[label], t.peer_ip[label], t.flow[label], t.bound[label], t.packets[label], t.bytes[label],
            t.last_seen[label], t.acks[label], t.generation[label])  # fmt: skip


_PAIRED: list[LabelSwitchingTable] = []


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([0, 1]),
    st.sampled_from([2, 3]),
    st.booleans(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.sampled_from([0, WATCH_TCP_END, WATCH_TCP_END | WATCH_ALL, WATCH_ALL | 0x08]),
    st.sampled_from([0, WATCH_TCP_END, WATCH_ALL]),
    st.booleans(),
)
def test_a_pair_installed_at_once_is_its_two_labels_installed_one_by_one(
    client_port: int, server_port: int, v6: bool, sport: int, dport: int, c2s_watch: int, s2c_watch: int, again: bool
) -> None:
    """``install_pair`` leaves both rows, the counts and what the mirrors are told as two ``install`` calls do (over
    an installed pair too)."""
    src, dst = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    flag = IPV6_PAYLOAD if v6 else 0
    if not _PAIRED:
        _PAIRED.extend(LabelSwitchingTable(PORT_MACS, PLACES) for _ in range(2))  # kept: the twins see the same calls
    tables = _PAIRED
    mirrors = [RecordingMirror(), RecordingMirror()]
    for t, mirror in zip(tables, mirrors, strict=True):
        t.mirrors[:] = [mirror]
    for _ in range(2 if again else 1):
        pair, single = tables
        pair.install_pair(21, client_port=client_port, client_mac=CLIENT_MAC, server_port=server_port,
                          server_mac=SERVER_MAC, key=(IPPROTO_TCP, src, sport, dst, dport), c2s_watch=c2s_watch | flag,
                          s2c_watch=s2c_watch | flag, c2s_seen=1.5, s2c_seen=2.5)  # fmt: skip
        single.install(21, out_port=server_port, next_hop=SERVER_MAC, in_port=client_port, peer=CLIENT_MAC, peer_ip=src,
                       watch=c2s_watch | flag, now=1.5, dst_ip=dst, ports=(sport, dport))  # fmt: skip
        single.install(22, out_port=client_port, next_hop=CLIENT_MAC, in_port=server_port, peer=SERVER_MAC, peer_ip=dst,
                       watch=s2c_watch | flag, now=2.5, dst_ip=src, ports=(dport, sport))  # fmt: skip
    assert [_row(tables[0], label) for label in (21, 22)] == [_row(tables[1], label) for label in (21, 22)]
    assert tables[0].installed == tables[1].installed and tables[0].version == tables[1].version
    assert mirrors[0].told == mirrors[1].told


_BLOCKED: list[LabelSwitchingTable] = []
_MAC = st.binary(min_size=6, max_size=6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.sampled_from([0, 1]), st.sampled_from([2, 3]), _MAC, _MAC,
                  st.binary(min_size=12, max_size=12)),
        max_size=12, unique_by=lambda pair: pair[0],
    ),
    st.sampled_from([WATCH_TCP_END | WATCH_ALL | 0x08, WATCH_TCP_END | WATCH_ALL, 0]),
    st.sampled_from([WATCH_TCP_END | WATCH_ALL, WATCH_TCP_END]),
)  # fmt: skip
def test_many_pairs_installed_at_once_are_each_pair_installed_in_turn(
    pairs: list[tuple[int, int, int, bytes, bytes, bytes]], c2s_watch: int, s2c_watch: int
) -> None:
    """``install_pairs`` leaves every octet of the rows, the count of installed labels and the version as
    ``install_pair`` called for each pair in turn does (over pairs installed before too: the generations go on)."""
    if not _BLOCKED:
        _BLOCKED.extend(LabelSwitchingTable(PORT_MACS, PLACES) for _ in range(2))  # kept: the twins see the same calls
    block, single = _BLOCKED
    c2s = [17 + 2 * pair for pair, *_ in pairs]
    for (_, client_port, server_port, client_mac, server_mac, flow), label in zip(pairs, c2s, strict=True):
        key = (IPPROTO_TCP, flow[:4], int.from_bytes(flow[8:10], "big"), flow[4:8], int.from_bytes(flow[10:], "big"))
        single.install_pair(label, client_port=client_port, client_mac=client_mac, server_port=server_port,
                            server_mac=server_mac, key=key, c2s_watch=c2s_watch, s2c_watch=s2c_watch, c2s_seen=3.5,
                            s2c_seen=3.5)  # fmt: skip
    columns = list(zip(*pairs, strict=True)) or [()] * 6
    block.install_pairs(
        np.array(c2s, dtype=np.int64),
        client_ports=np.array(columns[1], dtype=np.int32),
        client_macs=np.frombuffer(b"".join(columns[3]), dtype=np.uint8).reshape(-1, 6),
        server_ports=np.array(columns[2], dtype=np.int32),
        server_macs=np.frombuffer(b"".join(columns[4]), dtype=np.uint8).reshape(-1, 6),
        flows=np.frombuffer(b"".join(columns[5]), dtype=np.uint8).reshape(-1, 12),
        c2s_watch=c2s_watch,
        s2c_watch=s2c_watch,
        seen=3.5,
    )
    span = slice(17 << 7, 100 << 7)
    assert bytes(block.rows[span]) == bytes(single.rows[span])
    assert (block.installed, block.version) == (single.installed, single.version)


def test_many_pairs_are_checked_before_any_is_written(table: LabelSwitchingTable) -> None:
    """A bad label, port, shape or IP version in ``install_pairs`` is refused with nothing written."""
    before = (table.installed, table.version, bytes(table.rows[17 << 7 : 21 << 7]))
    macs = np.zeros((2, 6), dtype=np.uint8)
    good = {
        "client_ports": np.array([0, 1]), "client_macs": macs, "server_ports": np.array([2, 3]),
        "server_macs": macs, "flows": np.zeros((2, 12), dtype=np.uint8), "c2s_watch": 0, "s2c_watch": 0, "seen": 1.0,
    }  # fmt: skip
    for labels, bad, message in [
        ([17, 17], {}, "twice"),
        ([17, 18], {}, "twice"),
        ([1, 19], {}, "outside"),
        ([17, 19], {"server_ports": np.array([2, 9])}, "unknown port"),
        ([17, 19], {"flows": np.zeros((2, 36), dtype=np.uint8)}, "12-octet"),
        ([17, 19], {"c2s_watch": IPV6_PAYLOAD, "s2c_watch": IPV6_PAYLOAD}, "IPv4"),
    ]:
        with pytest.raises(ValueError, match=message):
            table.install_pairs(np.array(labels), **(good | bad))  # type: ignore[arg-type]
    assert (table.installed, table.version, bytes(table.rows[17 << 7 : 21 << 7])) == before


def test_a_pair_is_checked_as_its_labels_are(table: LabelSwitchingTable) -> None:
    """A bad port, MAC, address size or pair at the end of the label space is refused before anything is written."""
    good = {"client_port": 0, "client_mac": CLIENT_MAC, "server_port": 2, "server_mac": SERVER_MAC,
            "key": (IPPROTO_TCP, CLIENT, 1000, VIP, 80), "c2s_watch": 0, "s2c_watch": 0, "c2s_seen": 0.0,
            "s2c_seen": 0.0}  # fmt: skip
    bad_ones: list[tuple[int, dict[str, object]]] = [
        (LABEL, {"server_port": 9}), (LABEL, {"client_mac": b"\x01"}), (LABEL, {"c2s_watch": IPV6_PAYLOAD}),
        (LABEL_SPACE - 1, {}), (LABEL, {"key": (IPPROTO_TCP, CLIENT, 70000, VIP, 80)}),
    ]  # fmt: skip
    for label, bad in bad_ones:
        with pytest.raises(ValueError):
            table.install_pair(label, **(good | bad))  # type: ignore[arg-type]
        assert not table.valid[label] and not table.valid[(label + 1) % LABEL_SPACE]


def test_block_counters_count_every_frame_of_repeated_labels(table: LabelSwitchingTable) -> None:
    """The block path counts a block's frames per label, however its labels repeat and interleave (labels apart by
    a power of two, too), and records the last acknowledgment number each label's frames carried."""
    from mplslb.switching.block import count_rows

    apart = 1 << 16
    labels = [LABEL, LABEL + apart, LABEL, LABEL + 2 * apart, LABEL + apart, LABEL + apart, LABEL + 2]
    for label in set(labels):
        install_c2s(table, label)
    lengths = [10, 20, 30, 40, 50, 60, 70]
    acks = [ACK_KNOWN | 5, 0, ACK_KNOWN | 7, 0, ACK_KNOWN | 9, 0, 0]
    table.acks[LABEL + 2] = ACK_KNOWN | 3  # a frame without one leaves it
    count_rows(table, np.array(labels, dtype=np.int64), np.array(lengths), 7.0, np.array(acks, dtype=np.uint64))
    expected: dict[int, tuple[int, int]] = {}
    for label, length in zip(labels, lengths, strict=True):
        packets, octets = expected.get(label, (0, 0))
        expected[label] = (packets + 1, octets + length)
    assert {label: table.traffic(label) for label in set(labels)} == expected
    assert all(table.last_seen[label] == 7.0 for label in labels)
    assert [table.acks[label] & ~ACK_KNOWN for label in (LABEL, LABEL + apart, LABEL + 2 * apart, LABEL + 2)] == [
        7,
        9,
        0,
        3,
    ]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_row_read_at_once_says_what_each_field_says(table: LabelSwitchingTable, v6: bool) -> None:
    """``row`` (what the kernel offload writes its entry from) reads the same values as the fields one by one."""
    client, vip = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    watch = WATCH_TCP_END | (IPV6_PAYLOAD if v6 else 0)
    table.install(LABEL, out_port=2, next_hop=SERVER_MAC, in_port=1, peer=CLIENT_MAC, peer_ip=client, watch=watch,
                  dst_ip=vip, ports=(40000, 80))  # fmt: skip
    table.install(LABEL + 1, out_port=1, next_hop=OTHER_MAC, in_port=3, peer=SERVER_MAC, watch=watch & ~WATCH_TCP_END)
    table.acks[LABEL] = 0x1_0000_0123
    for label in (LABEL, LABEL + 1):
        t, row = table, table.row(label)
        assert row == (t.watch[label], t.v6[label], t.in_port[label], t.out_port[label], t.acks[label],
                       t.rewrite[label], t.peer[label], t.peer_ip[label], t.flow[label])  # fmt: skip
        assert row.rewrite[6:] == PORT_MACS[row.out_port] and len(row.peer) == 6
    assert table.row(LABEL).flow == client + vip + struct.pack("!HH", 40000, 80) and table.row(LABEL + 1).flow == b""
    assert table.row(LABEL).peer_ip == client and table.row(LABEL + 1).peer_ip == b""
    assert (table.row(LABEL).v6, table.row(LABEL).in_port, table.row(LABEL).peer) == (int(v6), 1, CLIENT_MAC)
