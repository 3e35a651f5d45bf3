"""The one-frame fast path's native build (``mplslb.switching._fast``) against its reference in Python.

For every frame both are given the same table and arguments: what they return, send and report, the label's row
after them (counters, last seen, acknowledgment number) and the drop counts must be the same, byte for byte. The
frames: a recorded run's (real sessions, their watch bits and flow bindings as the balancer installs them) with
hypothesis' mutations of their headers, frames built over a table with every kind of install (IPv4 and IPv6, flow
bound or not, peer IP or not, watch bits), and the real captures of shared/data (their labels installed as they
arrived). Then whole balancers: the same feed through the native path and through the reference gives the same
frames out and the same figures.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from array import array
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    FIN,
    RST,
    SYN,
    captured,
    feed_mutations,
    fix_ipv4_checksum,
    frames_only,
    header_mutation,
    ip,
    ipv4,
    ipv6,
    labelled,
    mac,
    mutate,
    mutation,
    pack,
    recording,
    tcp_segment,
    udp_datagram,
    with_mutated,
)
from mplslb import analyzer as analyzer_module
from mplslb import balancer as balancer_module
from mplslb import sessions as sessions_module
from mplslb.analyzer import Analysis
from mplslb.balancer import Balancer
from mplslb.flow import FlowKey
from mplslb.sessions import ROW_COLUMNS
from mplslb.switching import IPV6_PAYLOAD, WATCH_ALL, WATCH_TCP_END, FastEvent, LabelSwitchingTable, scalar
from mplslb.switching import block as block_module
from mplslb.switching import table as table_module
from mplslb.switching.block import Count, lead_of
from mplslb.switching.layout import (
    ETH_P_8021Q,
    IP_AT,
    LABEL_SHIFT,
    LSE_AT,
    RESERVED_LABEL_MAX,
    ROW_SHIFT,
    ROW_SIZE,
    VLAN_HLEN,
)
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP

try:
    from mplslb.switching import _fast
except ImportError:  # pragma: no cover - the first test says why
    _fast = None  # type: ignore[assignment]

Out = list[tuple[int, bytes]]
COUNTS: list[Count] = [False, True, "lead"]

PORT_MACS = {0: mac(0xB0, 0), 1: mac(0xB0, 1), 2: mac(0xB1, 0), 3: mac(0xB1, 1)}
PLACES = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
CLIENT_MAC, SERVER_MAC = mac(0xC0, 1), mac(0x5E, 1)
CLIENT, VIP, OTHER = ip("10.1.0.1"), ip("10.0.0.100"), ip("10.1.0.9")
CLIENT6, VIP6 = ip("fd00:1::1"), ip("fd00::100")


BOUND_HERE: list[bool] = []


def native() -> object:
    if _fast is None:
        pytest.fail(f"the native fast path is not built: {scalar.FAST_PATH}")
    if scalar.native is None and not BOUND_HERE:  # MPLSLB_FAST_PATH=python: bound once to be compared, not used
        _fast.bind(scalar.switch_frame_py, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)
        _fast.bind_analyzer(FlowKey, Analysis, analyzer_module._http, analyzer_module.NATIVE_NUMBERS)
        BOUND_HERE.append(True)
    return _fast.switch_frame


def test_the_native_fast_path_is_built_and_in_use() -> None:
    """The package is installed with its C part (setup.py), and the balancer switches with it."""
    if os.environ.get("MPLSLB_FAST_PATH") == "python":
        pytest.skip("MPLSLB_FAST_PATH=python keeps the reference path")
    assert scalar.FAST_PATH == "native"
    assert balancer_module.switch_frame is native()


def labels_in(frame: bytes) -> set[int]:
    """The labels whose rows a frame may touch: its top entry's, untagged or after one 802.1Q tag."""
    found = set()
    for at in (LSE_AT, LSE_AT + VLAN_HLEN):
        if len(frame) >= at + 4:
            found.add(struct.unpack_from("!I", frame, at)[0] >> LABEL_SHIFT)
    return found


Outcome = tuple[int, Out, list[FastEvent], list[bytes], dict[str, int]]


def switch_both_ways(
    table: LabelSwitchingTable, port: int, frame: bytes | memoryview, now: float
) -> tuple[Outcome, Outcome]:
    """Switch ``frame`` with the reference, put the table back as it was, switch it natively; what each did (result,
    frames out, reports, the rows it touched, the drops), the reference's first. The table keeps the native
    path's changes."""
    rows = table.rows
    spans = [(label << ROW_SHIFT, (label << ROW_SHIFT) + ROW_SIZE) for label in labels_in(bytes(frame))]
    before = [bytes(rows[a:b]) for a, b in spans]
    drops = dict(table.drops)
    outcomes: list[Outcome] = []
    for switch in (scalar.switch_frame_py, native()):
        for (a, b), row in zip(spans, before, strict=True):
            rows[a:b] = row
        table.drops.clear()
        table.drops.update(drops)
        out: Out = []
        events: list[FastEvent] = []
        result = switch(table.hot, port, frame, now, out, events)  # type: ignore[operator]
        outcomes.append((result, out, events, [bytes(rows[a:b]) for a, b in spans], dict(table.drops)))
    return outcomes[0], outcomes[1]


def both_ways(table: LabelSwitchingTable, port: int, frame: bytes | memoryview, now: float) -> int:
    """:func:`switch_both_ways`, asserting the two did the same (and sent ``bytes``, reported the frame itself);
    the result."""
    reference, got = switch_both_ways(table, port, frame, now)
    assert got == reference
    result, out, events, _, _ = got
    assert all(type(f) is bytes for _, f in out)
    assert all(type(e) is FastEvent and e.frame is frame for e in events)
    return result


# -- a recorded run, its frames mutated ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(200, 900),
    mutations=st.lists(st.lists(st.one_of(mutation, header_mutation), min_size=1, max_size=3), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_recorded_runs_frames_and_their_mutations_switch_alike(
    cut: int, mutations: list[list[tuple[str, int, int]]], seed: int
) -> None:
    """Each labelled frame of the recording, and mutated copies of some, tried both ways on the balancer's own
    table just before the balancer takes the frame (so the rows are a live run's: watch bits, flow bindings,
    measurements under way)."""
    config, _ = recording()
    b = Balancer(config)
    pick = random.Random(seed)
    for c in frames_only()[:cut]:
        if c.frame[12:14] in (b"\x88\x47", b"\x81\x00"):
            both_ways(b.switching, c.port, c.frame, c.now)
            for muts in pick.sample(mutations, min(len(mutations), 2)):
                both_ways(b.switching, c.port, mutate(c.frame, muts), c.now)
        b.receive(c.port, c.frame, c.now)


# -- a table with every kind of install ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table() -> LabelSwitchingTable:
    """Labels 1001-1010, each installed its own way (see INSTALLS)."""
    t = LabelSwitchingTable(PORT_MACS, PLACES)
    for label, kw in INSTALLS.items():
        values: dict[str, object] = {"out_port": 2, "next_hop": SERVER_MAC, "in_port": 0, "peer": CLIENT_MAC}
        values.update(kw)
        t.install(label, **values)  # type: ignore[arg-type]
    return t


INSTALLS: dict[int, dict[str, object]] = {
    1001: {},  # no flow, no peer IP, no watch
    1002: {"peer_ip": CLIENT, "watch": WATCH_TCP_END},
    1003: {"peer_ip": CLIENT, "dst_ip": VIP, "ports": (40000, 80), "watch": WATCH_TCP_END},
    1004: {"peer_ip": CLIENT, "dst_ip": VIP, "ports": (40000, 80), "watch": WATCH_TCP_END | WATCH_ALL},
    1005: {"peer_ip": CLIENT6, "dst_ip": VIP6, "ports": (40000, 80), "watch": WATCH_TCP_END | IPV6_PAYLOAD},
    1006: {"peer_ip": CLIENT6, "watch": WATCH_ALL | IPV6_PAYLOAD},
    1007: {"peer_ip": CLIENT, "dst_ip": VIP, "ports": (5353, 53)},
    1008: {"in_port": 1, "peer": SERVER_MAC, "out_port": 0, "next_hop": CLIENT_MAC, "watch": WATCH_ALL},
    1010: {"peer_ip": CLIENT, "dst_ip": VIP, "ports": (40000, 80), "watch": WATCH_ALL},
}

packets = st.one_of(
    st.builds(
        lambda flags, payload, ack, sport, src, options: ipv4(
            src, VIP, IPPROTO_TCP, tcp_segment(src, VIP, sport, 80, flags, payload, ack=ack), options=options
        ),
        st.sampled_from([ACK, SYN, FIN | ACK, RST, RST | ACK, 0, ACK | 0x08]),
        st.binary(max_size=40),
        st.integers(0, 2**32 - 1),
        st.sampled_from([40000, 40001]),
        st.sampled_from([CLIENT, OTHER]),
        st.sampled_from([b"", b"\x01\x01\x01\x00"]),
    ),
    st.builds(
        lambda flags, sport, src: ipv6(src, VIP6, IPPROTO_TCP, tcp_segment(src, VIP6, sport, 80, flags, b"x")),
        st.sampled_from([ACK, FIN | ACK, RST]),
        st.sampled_from([40000, 40001]),
        st.sampled_from([CLIENT6, ip("fd00:1::2")]),
    ),
    st.builds(
        lambda sport: ipv4(CLIENT, VIP, IPPROTO_UDP, udp_datagram(CLIENT, VIP, sport, 53, b"query")),
        st.sampled_from([5353, 5354]),
    ),
    st.builds(lambda body: ipv6(CLIENT6, VIP6, IPPROTO_UDP, body), st.binary(max_size=30)),
    st.binary(max_size=64),
)


@settings(max_examples=600, deadline=None)
@given(
    label=st.sampled_from([*INSTALLS, 1009, 3, 1 << 19]),
    packet=packets,
    port=st.sampled_from([0, 0, 0, 1, 2, -5, 1 << 40]),  # mostly where the labels are bound
    source=st.sampled_from([CLIENT_MAC, CLIENT_MAC, CLIENT_MAC, SERVER_MAC]),
    ttl=st.sampled_from([0, 1, 2, 64, 255]),
    bottom=st.sampled_from([True, True, True, False]),
    vlans=st.sampled_from([(), (), (), (7,)]),
    muts=st.lists(st.one_of(mutation, header_mutation), max_size=2),
    view=st.booleans(),
    now=st.sampled_from([7.5, 0.0, 12]),
)
def test_built_frames_switch_alike_under_every_kind_of_install(
    table: LabelSwitchingTable,
    label: int,
    packet: bytes,
    port: int,
    source: bytes,
    ttl: int,
    bottom: bool,
    vlans: tuple[int, ...],
    muts: list[tuple[str, int, int]],
    view: bool,
    now: float,
) -> None:
    frame = mutate(labelled(PORT_MACS[port % 4], source, label, packet, ttl=ttl, s=bottom, vlans=vlans), muts)
    given_frame = memoryview(frame) if view else frame
    reference, got = switch_both_ways(table, port, given_frame, now)
    assert got == reference  # result, frames out, reports, rows touched, drops
    result, out, events, _, _ = got
    assert (result >= 0) == (len(out) == 1) and all(type(f) is bytes for _, f in out)
    assert all(type(e) is FastEvent and e.frame is given_frame for e in events)


def test_each_labels_own_frame_cut_anywhere_switches_alike(table: LabelSwitchingTable) -> None:
    """Every installed label's own kind of frame, whole and cut at every length (the flow key half there, the
    TCP flags or the acknowledgment number just past the end, ...)."""
    frames = {
        1001: ipv4(CLIENT, VIP, 99, b"anything"),
        1002: ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, ACK, ack=77)),
        1003: ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, FIN | ACK, ack=78)),
        1004: ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, ACK, b"request", ack=79)),
        1005: ipv6(CLIENT6, VIP6, IPPROTO_TCP, tcp_segment(CLIENT6, VIP6, 40000, 80, ACK, ack=80)),
        1006: ipv6(CLIENT6, VIP6, IPPROTO_UDP, udp_datagram(CLIENT6, VIP6, 40000, 80, b"x")),
        1007: ipv4(CLIENT, VIP, IPPROTO_UDP, udp_datagram(CLIENT, VIP, 5353, 53, b"query")),
        1010: ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, RST)),
    }
    for label, packet in frames.items():
        whole = labelled(PORT_MACS[0], CLIENT_MAC, label, packet)
        assert both_ways(table, 0, whole, 2.0) == 2
        for n in range(len(whole)):
            both_ways(table, 0, whole[:n], 2.0)


def test_the_plain_frames_never_reach_the_reference(table: LabelSwitchingTable) -> None:
    """What nearly every frame is (untagged, a plain packet of the label's flow, or a label bound to no flow; a
    drop of the native path's reasons; an unlabelled frame) is taken in C: the reference is not called."""
    called: list[int] = []

    def counting(*args: object) -> int:
        called.append(1)
        return scalar.switch_frame_py(*args)  # type: ignore[arg-type]

    ack = ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, ACK, b"x"))
    fin = ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, FIN | ACK))
    rst6 = ipv6(CLIENT6, VIP6, IPPROTO_TCP, tcp_segment(CLIENT6, VIP6, 40000, 80, RST))
    frames = [
        labelled(PORT_MACS[0], CLIENT_MAC, 1003, ack),
        labelled(PORT_MACS[0], CLIENT_MAC, 1004, fin),
        labelled(PORT_MACS[0], CLIENT_MAC, 1005, rst6),
        labelled(PORT_MACS[0], CLIENT_MAC, 1001, ipv4(OTHER, VIP, 99, b"anything")),
        labelled(PORT_MACS[0], CLIENT_MAC, 1002, ipv4(OTHER, VIP, IPPROTO_UDP, b"12345678")),  # wrong peer IP
        labelled(PORT_MACS[0], CLIENT_MAC, 1009, b"\x45" + bytes(40)),  # not installed
        labelled(PORT_MACS[0], CLIENT_MAC, 1001, ipv4(CLIENT, VIP, 99, b""), ttl=1),
        labelled(PORT_MACS[0], SERVER_MAC, 1001, ipv4(CLIENT, VIP, 99, b"")),  # wrong peer MAC
        PORT_MACS[0] + CLIENT_MAC + b"\x08\x00" + ipv4(CLIENT, VIP, IPPROTO_UDP, b"12345678"),  # unlabelled
    ]
    _fast.bind(counting, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)
    try:
        results = [both_ways(table, 0, frame, 1.0) for frame in frames]
    finally:
        _fast.bind(scalar.switch_frame_py, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)
    assert results == [2, 2, 2, 2, -2, -2, -2, -2, -1]
    assert called == []  # (both_ways calls the reference itself, not through the binding)
    tagged = labelled(PORT_MACS[0], CLIENT_MAC, 1001, ipv4(CLIENT, VIP, 99, b""), vlans=(7,))
    assert tagged[12:14] == struct.pack("!H", ETH_P_8021Q)
    _fast.bind(counting, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)
    try:
        native()(table.hot, 0, tagged, 1.0, [], [])  # type: ignore[operator]
    finally:
        _fast.bind(scalar.switch_frame_py, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)
    assert called == [1]  # a tag: the reference's


def test_bind_refuses_what_it_cannot_use() -> None:
    native()
    numbers = scalar.native_numbers()
    del numbers["ROW_FLOW"]
    with pytest.raises(KeyError, match="ROW_FLOW"):
        _fast.bind(scalar.switch_frame_py, FastEvent, numbers, scalar.NATIVE_REASONS)
    with pytest.raises(KeyError, match="unknown"):
        _fast.bind(scalar.switch_frame_py, FastEvent, scalar.native_numbers(), {"reserved": "x"})
    with pytest.raises(TypeError):
        _fast.bind(scalar.switch_frame_py, dict, scalar.native_numbers(), scalar.NATIVE_REASONS)
    with pytest.raises(TypeError):
        _fast.switch_frame(1, 2)  # type: ignore[call-arg]
    _fast.bind(scalar.switch_frame_py, FastEvent, scalar.native_numbers(), scalar.NATIVE_REASONS)


# -- real captures -------------------------------------------------------------------------------------------------
def test_real_captures_switch_alike_with_their_labels_installed(shared_data: Path) -> None:
    """Every frame of the captures of shared/data, twice: as it is, on a table where the first frame seen with
    each label installed that label bound to its source MAC (and every second one to its IP source too), then
    on the same table with the label withdrawn."""
    t = LabelSwitchingTable(PORT_MACS, PLACES)
    seen = forwarded = 0
    installed: set[int] = set()
    for frame in captured(shared_data):
        seen += 1
        if frame[12:14] == b"\x88\x47" and len(frame) >= 18:
            label = struct.unpack_from("!I", frame, 14)[0] >> LABEL_SHIFT
            if label > 15 and label not in installed:
                installed.add(label)
                peer_ip = frame[18 + 12 : 18 + 16] if len(installed) % 2 and frame[18] >> 4 == 4 else b""
                t.install(
                    label,
                    out_port=2,
                    next_hop=SERVER_MAC,
                    in_port=0,
                    peer=frame[6:12],
                    peer_ip=peer_ip,
                    watch=WATCH_TCP_END,
                )
        forwarded += both_ways(t, 0, frame, 3.0) >= 0
    for label in installed:
        t.withdraw(label)
    for frame in captured(shared_data):
        both_ways(t, 0, frame, 4.0)
    assert seen > 10_000 and len(installed) >= 5 and forwarded > 100, (seen, installed, forwarded)


# -- whole balancers -------------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=feed_mutations,
)
def test_a_balancer_sends_the_same_frames_and_figures_on_either_path(
    mutations: list[tuple[int, list[tuple[str, int, int]]]],
) -> None:
    """A recorded run with mutated frames among its own, through a balancer switching, reading plain packets,
    writing its sessions' label rows and session rows and sending its slow path's frames natively and through one
    doing all five with the references: the same frames out, call by call, the same figures and the same rows
    (every field of every label ever installed: counters, bindings, generations; every session row's octets)."""
    config, calls = recording()
    feed = with_mutated([(c.port, c.frame, c.now) for c in calls], mutations)

    Run = tuple[list[list[tuple[int, bytes]]], object, dict[int, bytes]]

    def run(switch: object, writers: ModuleType | None) -> Run:
        saved = balancer_module.switch_frame
        balancer_module.switch_frame = switch  # type: ignore[assignment]
        table_module.use_native(writers)
        analyzer_module.use_native(writers)
        sessions_module.use_native(writers)
        try:
            b = Balancer(config)
            sent = [b.receive(p, f, now) if p >= 0 else b.on_timer(now) for p, f, now in feed]
            grid = np.frombuffer(b.switching.rows, dtype=np.uint8).reshape(-1, ROW_SIZE)
            rows = {int(label): grid[label].tobytes() for label in np.flatnonzero(grid.any(axis=1))}
            s = b.stats()
            session_rows = tuple(
                hashlib.sha256(getattr(b.sessions, name)).digest() for name in (*ROW_COLUMNS, "state", "deadline")
            )
            figures = (s.frames_in, s.frames_out, s.fast_path, s.slow_path, s.drops, s.sessions_ended, session_rows)
            return sent, figures, rows
        finally:
            balancer_module.switch_frame = saved
            table_module.use_native(scalar.native)
            analyzer_module.use_native(scalar.native)
            sessions_module.use_native(scalar.native)

    sent, figures, rows = run(native(), _fast)
    sent_ref, figures_ref, rows_ref = run(scalar.switch_frame_py, None)
    assert sent == sent_ref
    assert figures == figures_ref
    assert rows.keys() == rows_ref.keys() and len(rows) >= 2
    for label, row in rows.items():
        assert row == rows_ref[label], label


# -- the block path ------------------------------------------------------------------------------------------------
def rows_of(table: LabelSwitchingTable, labels: set[int]) -> dict[int, bytes]:
    return {label: bytes(table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT]) for label in labels}


def blocks_both_ways(
    table: LabelSwitchingTable, frames: list[tuple[int, bytes]], now: float, *, aligned: bool, count: Count
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """One block switched by numpy (the reference) and, on the table put back as it was and a fresh copy of the
    block, in C; what each did, the reference's first: the verdict (each array's type and octets), the buffer, the
    reports, the report rows, the rows and the saved headers. Asserts that each switched frame's saved header is
    the frame as it came."""
    buf, starts, lengths, ports = pack(frames, aligned=aligned)
    touched = {struct.unpack_from("!I", f, LSE_AT)[0] >> LABEL_SHIFT for _, f in frames if len(f) >= LSE_AT + 4}
    touched.add(0)
    before = rows_of(table, touched)
    runs = []
    for switch in (block_module.switch_block_np, block_module.switch_block):
        for label, row in before.items():
            table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT] = row
        copy = buf.copy()
        events: list[FastEvent] = []
        report_rows: list[int] = []
        saved = np.full((len(frames), IP_AT), 0xEE, dtype=np.uint8)
        verdict = switch(
            table, copy, starts, lengths, ports, now, events, count=count, report_rows=report_rows, saved=saved
        )
        for i in np.flatnonzero(verdict.switched).tolist():  # each switched frame's header as it came
            assert saved[i].tobytes() == buf[int(starts[i]) : int(starts[i]) + IP_AT].tobytes()
        assert all(type(e) is FastEvent and type(e.frame) is bytes for e in events)
        arrays = tuple((name, a.dtype.str, a.tobytes()) for name, a in zip(verdict._fields, verdict, strict=True))
        runs.append((arrays, copy.tobytes(), events, report_rows, rows_of(table, touched), saved.tobytes()))
    return runs[0], runs[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(100, 900),
    block_size=st.integers(1, 200),
    mutations=feed_mutations,
    aligned=st.booleans(),
    count=st.sampled_from(COUNTS),
)
def test_a_recorded_runs_blocks_switch_alike_in_c_and_numpy(
    cut: int, block_size: int, mutations: list[tuple[int, list[tuple[str, int, int]]]], aligned: bool, count: Count
) -> None:
    """A recorded run's frames in blocks, mutated frames among them, each block tried both ways on the balancer's
    live table before the balancer takes it (through ``receive_block``, in C)."""
    config, _ = recording()
    feed = with_mutated([(c.port, c.frame, c.now) for c in frames_only()[:cut]], mutations)
    b = Balancer(config)
    for start in range(0, len(feed), block_size):
        chunk = feed[start : start + block_size]
        now = chunk[-1][2]
        frames = [(p, f) for p, f, _ in chunk]
        reference, got = blocks_both_ways(b.switching, frames, now, aligned=aligned, count=count)
        assert got == reference
        buf, starts, lengths, ports = pack(frames, aligned=aligned)
        b.receive_block(buf, starts, lengths, ports, now)


Pick = tuple[int, bytes, int, bytes, int, bool, list[tuple[str, int, int]]]
#: A block of frames built at the table's labels (and two others), from either MAC, on any port, mutated or not.
built_blocks = st.lists(
    st.tuples(
        st.sampled_from([*INSTALLS, 1009, 3]),
        packets,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([CLIENT_MAC, SERVER_MAC]),
        st.sampled_from([1, 2, 64]),
        st.booleans(),
        st.lists(st.one_of(mutation, header_mutation), max_size=2),
    ),
    min_size=1,
    max_size=40,
)


def built(picks: list[Pick]) -> list[tuple[int, bytes]]:
    return [
        (port, mutate(labelled(PORT_MACS[port], source, label, packet, ttl=ttl, s=bottom), muts))
        for label, packet, port, source, ttl, bottom, muts in picks
    ]


def bound_to(label: int) -> tuple[int, bytes]:
    """An installed label's port and peer MAC: where its frames are switched from."""
    port, peer = INSTALLS[label].get("in_port", 0), INSTALLS[label].get("peer", CLIENT_MAC)
    assert isinstance(port, int) and isinstance(peer, bytes)
    return port, peer


#: Blocks of frames at the table's labels from the port and MAC each is bound to, mostly whole: runs of switched
#: frames, and among them frames reported for their watch bits (WATCH_ALL, or FIN and RST under WATCH_TCP_END).
switched_blocks = st.lists(
    st.tuples(
        st.sampled_from(sorted(INSTALLS)),
        packets,
        st.one_of(st.just([]), st.just([]), st.just([]), st.lists(st.one_of(mutation, header_mutation), max_size=1)),
    ),
    min_size=1,
    max_size=40,
)


def switched_built(picks: list[tuple[int, bytes, list[tuple[str, int, int]]]]) -> list[Pick]:
    return [(label, packet, *bound_to(label), 64, True, muts) for label, packet, muts in picks]


@settings(max_examples=200, deadline=None)
@given(picks=built_blocks, aligned=st.booleans(), count=st.sampled_from(COUNTS))
def test_built_blocks_switch_alike_in_c_and_numpy(
    table: LabelSwitchingTable, picks: list[Pick], aligned: bool, count: Count
) -> None:
    reference, got = blocks_both_ways(table, built(picks), 9.0, aligned=aligned, count=count)
    assert got == reference  # verdict, buffer, reports, report rows, rows, saved headers


@settings(max_examples=150, deadline=None)
@given(picks=st.one_of(built_blocks, switched_blocks.map(switched_built)), aligned=st.booleans())
def test_the_lead_counted_by_the_switch_is_what_count_rows_counts_of_it(
    table: LabelSwitchingTable, picks: list[Pick], aligned: bool
) -> None:
    """``count="lead"`` leaves the rows as switching with ``count=False`` and then counting the lead's frames
    (the switched ones before the first frame not switched or reported) with ``count_rows``: in C and in numpy."""
    frames = built(picks)
    buf, starts, lengths, ports = pack(frames, aligned=aligned)
    touched = {label for label, *_ in picks} | {0}
    before = rows_of(table, touched)
    for switch in (block_module.switch_block_np, block_module.switch_block):
        after = []
        for count in ("lead", False):
            for label, row in before.items():
                table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT] = row
            report_rows: list[int] = []
            verdict = switch(table, buf.copy(), starts, lengths, ports, 9.0, [], count=count, report_rows=report_rows)
            lead = lead_of(np.flatnonzero(~verdict.switched), len(frames), report_rows)
            assert verdict.switched[:lead].all() and not set(report_rows) & set(range(lead))
            assert lead == len(frames) or not verdict.switched[lead] or lead in report_rows
            if count is False and lead:
                block_module.count_rows(table, verdict.labels[:lead], lengths[:lead], 9.0, verdict.acks[:lead])
            after.append(rows_of(table, touched))
        assert after[0] == after[1], switch.__name__
        assert after[0] != before or not lead  # a lead is counted


@settings(max_examples=100, deadline=None)
@given(
    counted=st.lists(
        st.tuples(
            st.sampled_from([*INSTALLS, 1009]), st.integers(0, 9000), st.sampled_from([0, 0, 1 << 32, (1 << 32) | 77])
        ),
        max_size=60,
    ),
    with_acks=st.booleans(),
)
def test_rows_count_alike_in_c_and_numpy(
    table: LabelSwitchingTable, counted: list[tuple[int, int, int]], with_acks: bool
) -> None:
    labels = np.array([c[0] for c in counted], dtype=np.int64)
    lengths = np.array([c[1] for c in counted], dtype=np.int64)
    acks = np.array([c[2] for c in counted], dtype=np.uint64) if with_acks else None
    before = rows_of(table, {*INSTALLS, 1009})
    block_module.count_rows_np(table, labels, lengths, 3.5, acks)
    after_np = rows_of(table, set(before))
    for label, row in before.items():
        table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT] = row
    block_module.count_rows(table, labels, lengths, 3.5, acks)
    assert rows_of(table, set(before)) == after_np


@settings(max_examples=100, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from([*INSTALLS, 1009]),
            st.integers(0, 9000),
            st.sampled_from([0, 0, 1 << 32, (1 << 32) | 77]),
        ),
        max_size=60,
    ),
    span=st.tuples(st.integers(0, 60), st.integers(0, 60)),
)
def test_a_blocks_switched_frames_count_alike_in_c_and_python(
    table: LabelSwitchingTable, frames: list[tuple[bool, int, int, int]], span: tuple[int, int]
) -> None:
    """The block path's counter of the switched frames among some of a block's frames, between the frames that touch
    the session state: the same rows in C and in Python (one by one for a few frames, in bulk for more), and the
    frames outside the span or not switched counted by neither."""
    begin, end = sorted(min(x, len(frames)) for x in span)
    switched = np.array([f[0] for f in frames], dtype=np.bool_)
    labels = np.array([f[1] for f in frames], dtype=np.int64)
    lengths = np.array([f[2] for f in frames], dtype=np.int64)
    acks = np.array([f[3] for f in frames], dtype=np.uint64)
    before = rows_of(table, {*INSTALLS, 1009})
    block_module.count_switched_py(table, switched, labels, lengths, acks, begin, end, 3.5)
    after_py = rows_of(table, set(before))
    for label, row in before.items():
        table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT] = row
    block_module.switched_counter(table, switched, labels, lengths, acks)(begin, end, 3.5)
    assert rows_of(table, set(before)) == after_py
    rows = np.flatnonzero(switched[begin:end]) + begin
    for label, row in before.items():
        table.rows[label << ROW_SHIFT : (label + 1) << ROW_SHIFT] = row
    block_module.count_rows_np(table, labels[rows], lengths[rows], 3.5, acks[rows])
    assert rows_of(table, set(before)) == after_py


# -- a session's two rows --------------------------------------------------------------------------------------------
PAIR_ROWS = 64  # a small table's worth of rows: the pair writers take any rows buffer
addresses = st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16), st.binary(max_size=17))


@settings(max_examples=400, deadline=None)
@given(
    before=st.binary(min_size=2 * ROW_SIZE, max_size=2 * ROW_SIZE),
    valid=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    c2s=st.integers(RESERVED_LABEL_MAX + 1, PAIR_ROWS - 2),
    ports=st.tuples(st.sampled_from(sorted(PORT_MACS)), st.sampled_from(sorted(PORT_MACS))),
    macs=st.tuples(st.binary(min_size=6, max_size=6), st.one_of(st.binary(min_size=6, max_size=6), st.binary())),
    key=st.tuples(
        st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
        addresses,
        st.integers(-1, 0x10000),
        addresses,
        st.one_of(st.integers(0, 0xFFFF), st.just(0x10000)),
    ),
    watch=st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFF)),
    seen=st.tuples(st.floats(allow_nan=False), st.floats(0, 1e9)),
)
def test_a_sessions_two_rows_are_written_alike_in_c_and_python(
    before: bytes,
    valid: tuple[int, int],
    c2s: int,
    ports: tuple[int, int],
    macs: tuple[bytes, bytes],
    key: tuple[int, bytes, int, bytes, int],
    watch: tuple[int, int],
    seen: tuple[float, float],
) -> None:
    """The native pair writer and its reference (``table.write_pair_py``), from the same rows (whatever they held:
    counters, generations near their wrap, either label installed or not) and the same session: the same two rows,
    octet for octet, and the same answer, or the same error with nothing written. The generated sessions are the
    ones a balancer installs, IPv4 and IPv6, and ones it never would (an address of the wrong length, a port out
    of range, a MAC of the wrong length, watch bits of two IP versions)."""
    native()
    results = []
    for write in (table_module.write_pair_py, _fast.install_pair):
        rows = bytearray(PAIR_ROWS * ROW_SIZE)
        at = c2s << ROW_SHIFT
        rows[at : at + 2 * ROW_SIZE] = before
        rows[at], rows[at + ROW_SIZE] = valid
        view = memoryview(rows)
        args = (view, c2s, *ports, *macs, PORT_MACS[ports[0]], PORT_MACS[ports[1]], key, *watch, *seen)
        try:
            outcome: object = write(*args)
        except ValueError as exc:
            outcome = str(exc)
        results.append((outcome, bytes(rows)))
    assert results[1] == results[0]
    written = isinstance(results[0][0], int)
    assert (
        written
        or results[0][1][at : at + 2 * ROW_SIZE]
        == bytes([valid[0]]) + before[1:ROW_SIZE] + bytes([valid[1]]) + before[ROW_SIZE + 1 :]
    )
    assert not written or results[0][0] == sum(valid)


def test_the_balancer_writes_its_sessions_rows_and_sends_natively() -> None:
    """Where the native build is in use, every session's rows are written and every slow-path frame sent by it (and
    by the references under ``MPLSLB_FAST_PATH=python``)."""
    if os.environ.get("MPLSLB_FAST_PATH") == "python":
        assert (table_module._write_pair, table_module._send) == (table_module.write_pair_py, table_module.send_py)
        assert (sessions_module._open_row, sessions_module.ROW_WRITER) == (sessions_module.open_row_py, "python")
        assert sessions_module._find_slot is sessions_module.find_slot_py
    else:
        native()
        assert (table_module._write_pair, table_module._send) == (_fast.install_pair, _fast.send)
        assert (sessions_module._open_row, sessions_module.ROW_WRITER) == (_fast.open_row, "native")
        assert sessions_module._find_slot is _fast.find_slot


# -- a packet sent under its session's label ----------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    label=st.sampled_from([*INSTALLS, 1009]),
    frame=st.binary(max_size=200),
    span=st.tuples(st.integers(-30, 220), st.integers(-30, 220)),
    ttl=st.integers(0, 255),
    tc=st.integers(0, 7),
    ack=st.one_of(st.just(-1), st.integers(0, 0xFFFFFFFF)),
    as_view=st.booleans(),
)
def test_a_packet_is_sent_under_its_label_alike_in_c_and_python(
    table: LabelSwitchingTable,
    label: int,
    frame: bytes,
    span: tuple[int, int],
    ttl: int,
    tc: int,
    ack: int,
    as_view: bool,
) -> None:
    """The native ``send`` and its reference (``table.send_py``) on the same row (every kind of install, and a
    label installed by none): the same frame out to the same port, the same counters, last seen and acknowledgment
    number in the row, and the same answer; any part of the frame, as bytes or a view."""
    native()
    before = rows_of(table, {label})
    results = []
    for send in (table_module.send_py, _fast.send):
        for at, row in before.items():
            table.rows[at << ROW_SHIFT : (at + 1) << ROW_SHIFT] = row
        out: Out = []
        given_frame = memoryview(frame) if as_view else frame
        recorded = send(table.hot, label, given_frame, *span, 6.5, out, ttl, tc, ack)
        assert all(type(f) is bytes for _, f in out)
        results.append((recorded, out, rows_of(table, {label})))
    assert results[1] == results[0]
    assert results[0][2] != before  # counted


# -- the analyzer's plain reading ----------------------------------------------------------------------------------
def plain_packets() -> list[bytes]:
    """IPv4 packets the plain reading takes (TCP with and without payload, an HTTP request, UDP, UDP carrying a
    request) and leaves (TCP options, IP options, a later fragment, ICMP)."""
    request = b"GET /a HTTP/1.1\r\nHost: plain\r\n\r\n"
    return [
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40000, 80, SYN)),
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40001, 80, ACK, request, seq=0xFFFFFFF0), tos=0xB8),
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40002, 80, FIN | ACK, b"x" * 300), ttl=1),
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40003, 80, SYN, options=b"\x02\x04\x05\xb4")),
        ipv4(CLIENT, VIP, IPPROTO_UDP, udp_datagram(CLIENT, VIP, 5353, 53, b"query")),
        ipv4(CLIENT, VIP, IPPROTO_UDP, udp_datagram(CLIENT, VIP, 5353, 80, b"GET / HTTP/1.0\r\n\r\n")),
        ipv4(CLIENT, VIP, IPPROTO_UDP, udp_datagram(CLIENT, VIP, 1, 2)),
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40004, 80, ACK), options=b"\x01\x01\x01\x00"),
        ipv4(CLIENT, VIP, IPPROTO_TCP, tcp_segment(CLIENT, VIP, 40005, 80, ACK, b"y" * 40), frag_offset=2),
        ipv4(CLIENT, VIP, 1, b"\x08\x00" + bytes(30)),
    ]


@settings(max_examples=600, deadline=None)
@given(
    index=st.integers(0, 9),
    head=st.sampled_from([0, 14, 3]),
    mutations=st.lists(st.tuples(st.sampled_from(["flip", "cut", "set"]), st.integers(0, 60), st.integers(0, 255)),
                       max_size=3),
    checksum=st.booleans(),
    tail=st.binary(max_size=8),
    l7=st.booleans(),
    as_view=st.booleans(),
)  # fmt: skip
def test_plain_ipv4_reads_alike_in_c_and_python(
    index: int,
    head: int,
    mutations: list[tuple[str, int, int]],
    checksum: bool,
    tail: bytes,
    l7: bool,
    as_view: bool,
) -> None:
    """The native plain reading and its reference (``analyzer.plain_ipv4_py``) on the same octets at the same
    offset: the same :class:`Analysis` (a FlowKey of bytes addresses, the same request read) or both None; packets
    the reading takes and leaves, mutated (the header checksum made right again or not), with octets after them."""
    native()
    packet = mutate(plain_packets()[index], mutations)
    if checksum and len(packet) >= 20 and packet[0] >> 4 == 4:
        packet = fix_ipv4_checksum(packet)
    frame = bytes(range(head)) + packet + tail
    if len(frame) < head + 28:
        return  # the callers read no shorter packet this way
    given_frame = memoryview(frame) if as_view else frame
    reference = analyzer_module.plain_ipv4_py(given_frame, head, l7)
    got = _fast.plain_ipv4(given_frame, head, l7)
    assert got == reference
    if got is not None:
        assert type(got) is Analysis and type(got.key) is FlowKey
        assert type(got.key.src) is bytes and type(got.key.dst) is bytes
        assert [type(v) for v in got[1:]] == [type(v) for v in reference[1:]]


def test_plain_ipv4_refuses_what_it_cannot_read() -> None:
    native()
    with pytest.raises(ValueError, match="no IPv4 and UDP header"):
        _fast.plain_ipv4(bytes(30), 14, True)
    with pytest.raises(ValueError, match="no IPv4 and UDP header"):
        _fast.plain_ipv4(bytes(60), -1, True)
    with pytest.raises(TypeError):
        _fast.plain_ipv4(bytes(60), 14)  # type: ignore[call-arg]


def test_the_analyzer_reads_plain_packets_natively() -> None:
    """Where the native build is in use, the analyzer's plain reading is its (and the reference under
    ``MPLSLB_FAST_PATH=python``)."""
    if os.environ.get("MPLSLB_FAST_PATH") == "python":
        assert analyzer_module._read_plain is analyzer_module.plain_ipv4_py
    else:
        native()
        assert (analyzer_module.PLAIN_READER, analyzer_module._read_plain) == ("native", _fast.plain_ipv4)


def test_plain_ipv4_takes_the_plain_packets_and_leaves_the_others() -> None:
    native()
    for l7 in (True, False):
        read = [_fast.plain_ipv4(bytes(14) + packet, 14, l7) for packet in plain_packets()]
        assert [a is not None for a in read] == [True, True, True, False, True, True, True, False, False, False]
        assert read == [analyzer_module.plain_ipv4_py(bytes(14) + p, 14, l7) for p in plain_packets()]
        assert (read[1].http is not None) is l7 and read[1].tcp_seq == 0xFFFFFFF0 and read[1].tos == 0xB8


def test_the_pair_writer_and_send_refuse_what_they_cannot_use(table: LabelSwitchingTable) -> None:
    """A wrongly typed argument raises TypeError before anything is written; a label past the rows is refused."""
    native()
    before = rows_of(table, {1001, 1002})
    key = (IPPROTO_TCP, CLIENT, "port", VIP, 80)
    with pytest.raises(TypeError):
        _fast.install_pair(
            table.rows, 1001, 0, 2, CLIENT_MAC, SERVER_MAC, PORT_MACS[0], PORT_MACS[2], key, 0, 0, 1.0, 1.0
        )
    with pytest.raises(TypeError, match="5-tuple"):
        _fast.install_pair(
            table.rows, 1001, 0, 2, CLIENT_MAC, SERVER_MAC, PORT_MACS[0], PORT_MACS[2], (), 0, 0, 1.0, 1.0
        )
    with pytest.raises(TypeError):
        _fast.send(table.hot, 1001, bytes(60), 14, 60, "now", [], 64, 0, -1)  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="no row"):
        _fast.send(table.hot, 1 << 20, bytes(60), 14, 60, 1.0, [], 64, 0, -1)
    assert rows_of(table, {1001, 1002}) == before


# -- a new session's row in the session table ---------------------------------------------------------------------
SESSION_ROWS, SESSION_SLOTS = 8, 16


def session_columns(fill: bytes) -> tuple[list[bytearray | array[int] | array[float]], tuple[memoryview, ...]]:
    """Columns shaped as a session table of SESSION_ROWS rows keeps them (sessions.ROW_COLUMNS), their octets taken
    from ``fill`` over and over, and the memoryviews the row writers are given."""
    octets = {"B": 1, "i": 4, "I": 4, "d": 8}
    rows = SESSION_ROWS
    shapes = [("B", 40 * rows)] + [("B", rows)] * 4 + [("i", rows), ("I", rows), ("B", 6 * rows)]
    shapes += [("d", rows)] * 4 + [("i", rows), ("i", SESSION_SLOTS)]
    made: list[bytearray | array[int] | array[float]] = []
    for code, items in shapes:
        size = octets[code] * items
        raw = (fill * (size // len(fill) + 1))[:size] if fill else bytes(size)
        made.append(bytearray(raw) if code == "B" else array(code, raw))
    return made, tuple(memoryview(column) for column in made)


#: The ranges of open_row's numbers (protocol, IP version, watch budget, client port, server index).
NUMBER_RANGES = ((0, 0xFF), (0, 0xFF), (0, 0xFF), (-(1 << 31), (1 << 31) - 1), (0, (1 << 32) - 1))


@settings(max_examples=400, deadline=None)
@given(
    fill=st.binary(max_size=64),
    pair=st.integers(0, SESSION_ROWS - 1),
    slot=st.integers(0, SESSION_SLOTS - 1),
    packed=st.one_of(st.binary(min_size=38, max_size=38), st.binary(max_size=40)),
    numbers=st.tuples(
        *(st.one_of(st.integers(low, high), st.sampled_from([low, high])) for low, high in NUMBER_RANGES)
    ),
    client_mac=st.binary(min_size=6, max_size=6),
    now=st.floats(allow_nan=False),
    broken=st.sampled_from([None, None, None, "pair", "slot", "packed", "mac", 0, 1, 2, 3, 4]),
    past=st.booleans(),
)
def test_a_sessions_row_is_opened_alike_in_c_and_python(
    fill: bytes,
    pair: int,
    slot: int,
    packed: bytes,
    numbers: tuple[int, ...],
    client_mac: bytes,
    now: float,
    broken: str | int | None,
    past: bool,
) -> None:
    """The native row writer and its reference (``sessions.open_row_py``), from the same columns (whatever they
    held) and the same session: the same octets in every column, or the same error with nothing written. The
    sessions are whole, or have one thing a table never opens (``broken``, just below its range or just past it):
    a row or slot out of range, a key too long, a MAC of the wrong length, a number out of its column's range."""
    if broken == "pair":
        pair = SESSION_ROWS if past else -1
    elif broken == "slot":
        slot = SESSION_SLOTS if past else -1
    elif broken == "packed":
        packed = packed.ljust(41 + past, b"\x01")
    elif broken == "mac":
        client_mac = client_mac[: 5 + 2 * past].ljust(5 + 2 * past, b"\x02")
    elif isinstance(broken, int):
        low, high = NUMBER_RANGES[broken]
        numbers = (*numbers[:broken], high + 1 if past else low - 1, *numbers[broken + 1 :])
    native()
    results = []
    for write in (sessions_module.open_row_py, _fast.open_row):
        made, columns = session_columns(fill)
        try:
            outcome: object = write(columns, pair, slot, packed, *numbers, client_mac, now)
        except (IndexError, ValueError) as exc:
            outcome = (type(exc), str(exc))
        results.append((outcome, [bytes(column) for column in made]))
    assert results[1] == results[0]
    if results[0][0] is not None:
        assert results[0][1] == [bytes(column) for column in session_columns(fill)[0]]
    else:
        key = results[0][1][0]
        assert key[pair * 40 : pair * 40 + len(packed)] == packed
        assert array("i", results[0][1][13])[slot] == pair
        assert array("i", results[0][1][12])[pair] == hash(packed) & (SESSION_SLOTS - 1)


def test_the_row_writer_refuses_what_it_cannot_use() -> None:
    """Columns that are not a table's (a view of other items, a read-only or released view, a short column, an
    index whose size is not a power of two) and wrongly typed arguments raise before anything is written."""
    native()
    made, columns = session_columns(b"\x5a")
    before = [bytes(column) for column in made]
    args = (1, 2, bytes(38), IPPROTO_TCP, 4, 16, 1234, 3, CLIENT_MAC, 1.5)
    _fast.open_row(columns, *args)  # the columns as they are: written
    assert [bytes(column) for column in made] != before
    made, columns = session_columns(b"\x5a")
    released = memoryview(bytearray(SESSION_ROWS))
    released.release()
    wrong: list[tuple[tuple[memoryview, ...], type[Exception], str]] = [
        (columns[:-1], TypeError, "tuple of 14"),
        ((*columns[:5], memoryview(array("q", [0] * SESSION_ROWS)), *columns[6:]), TypeError, "column 5"),
        ((*columns[:1], memoryview(bytes(SESSION_ROWS)), *columns[2:]), TypeError, "column 1"),
        ((*columns[:2], released, *columns[3:]), TypeError, "column 2"),
        ((*columns[:8], memoryview(array("d", [0.0] * 3)), *columns[9:]), ValueError, "column 8"),
        ((*columns[:13], memoryview(array("i", [0] * 12))), ValueError, "power of two"),
    ]
    for bad, error, message in wrong:
        with pytest.raises(error, match=message):
            _fast.open_row(bad, *args)
    for at, value in ((0, 1.0), (2, bytearray(38)), (3, "6"), (8, 1.5), (9, "now")):
        with pytest.raises(TypeError):
            _fast.open_row(columns, *args[:at], value, *args[at + 1 :])
    assert [bytes(column) for column in made] == before


# -- a key found in the session table's key index -----------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(
    fill=st.binary(max_size=64),
    index=st.lists(st.integers(-2, SESSION_ROWS), min_size=SESSION_SLOTS, max_size=SESSION_SLOTS),
    keys=st.lists(st.binary(min_size=38, max_size=40), min_size=SESSION_ROWS, max_size=SESSION_ROWS),
    sought=st.one_of(st.tuples(st.integers(0, SESSION_ROWS - 1), st.integers(38, 41)), st.binary(max_size=41)),
    full=st.booleans(),
)
def test_a_key_is_found_alike_in_c_and_python(
    fill: bytes, index: list[int], keys: list[bytes], sought: tuple[int, int] | bytes, full: bool
) -> None:
    """The native key finder and its reference (``sessions.find_slot_py``), over any key index (slots empty, naming
    a row, naming no row of the table: -2 or one past the last) and any keys, seeking a row's first 38 to 41 octets
    (41: the row and the next row's first octet, longer than a row's key) or any octets: the same slot and row, or
    the same error (an index with no empty slot that does not hold the key); nothing written."""
    native()
    made, columns = session_columns(fill)
    for row, key in enumerate(keys):
        made[0][row * 40 : row * 40 + len(key)] = key
    if full:
        index = [SESSION_ROWS if row == -1 else row for row in index]
    made[-1][:] = array("i", index)
    before = [bytes(column) for column in made]
    packed = before[0][sought[0] * 40 :][: sought[1]] if isinstance(sought, tuple) else sought
    outcomes: list[object] = []
    for find in (sessions_module.find_slot_py, _fast.find_slot):
        try:
            outcomes.append(find(columns, packed))
        except RuntimeError as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[1] == outcomes[0]
    assert [bytes(column) for column in made] == before
    stored = [before[0][row * 40 : (row + 1) * 40] for row in range(SESSION_ROWS)]
    if isinstance(outcomes[0], tuple) and isinstance(outcomes[0][0], int):
        slot, row = outcomes[0]
        assert index[slot] == row
        assert row == -1 or stored[row].startswith(packed)
        at = hash(packed) & (SESSION_SLOTS - 1)  # every slot probed before it holds another row or none of the table
        while at != slot:
            assert index[at] != -1 and not (0 <= index[at] < SESSION_ROWS and stored[index[at]].startswith(packed))
            at = (at + 1) & (SESSION_SLOTS - 1)
    else:
        assert -1 not in index


def test_the_key_finder_refuses_what_it_cannot_use() -> None:
    """Columns that are not a table's and a key that is not bytes raise, and nothing is written."""
    native()
    made, columns = session_columns(b"\x5a")
    made[-1][:] = array("i", [-1] * SESSION_SLOTS)
    before = [bytes(column) for column in made]
    released = memoryview(array("i", [-1] * SESSION_SLOTS))
    released.release()
    wrong: list[tuple[tuple[memoryview, ...], object, type[Exception], str]] = [
        (columns[:-1], bytes(38), TypeError, "tuple of 14"),
        ((memoryview(array("q", [0] * SESSION_ROWS)), *columns[1:]), bytes(38), TypeError, "column 0"),
        ((*columns[:13], released), bytes(38), TypeError, "column 13"),
        ((*columns[:13], memoryview(array("i", [-1] * 12))), bytes(38), ValueError, "power of two"),
        (columns, bytearray(38), TypeError, "bytes"),
    ]
    for bad, packed, error, message in wrong:
        with pytest.raises(error, match=message):
            _fast.find_slot(bad, packed)
    assert _fast.find_slot(columns, bytes(38)) == (hash(bytes(38)) & (SESSION_SLOTS - 1), -1)
    assert [bytes(column) for column in made] == before
