"""A block's SYNs of new sessions, opened together (``Balancer.receive_block`` with ``SessionTable.open_block`` and
``LabelSwitchingTable.install_pairs``), leave every table, counter and output exactly as the one-frame path leaves
them frame by frame: under every admission limit, with retransmitted and foreign SYNs among them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import listed, pack
from mplslb.analyzer import PacketAnalyzer, plain_ipv4_py
from mplslb.balancer import SYN_RUN_MIN, Balancer, Frames
from mplslb.balancing.admission import RefuseWith
from mplslb.config import BalancerConfig
from mplslb.fuzz import (
    PORT_MAC,
    VIP4,
    VIP6,
    _counters,
    _ether,
    _tcp,
    _traffic,
    campaign_config,
    client_addr,
    client_mac,
)
from mplslb.labels import C2S_MIN
from mplslb.sessions import SessionTable, Timeouts
from mplslb.wire.checksum import internet_checksum
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.tcp import TCPFlag, build_tcp

SYN, ACK = int(TCPFlag.SYN), int(TCPFlag.ACK)
#: Frame kinds: mostly SYNs of fresh flows, with what must stop or break a run of them.
KINDS = ["new"] * 10 + ["marked", "marked", "again", "again", "novip", "noport", "server", "v6", "options", "data",
                        "ack", "badsum", "unknown"]  # fmt: skip

_KEPT = Timeouts(tcp_start=60.0, closed_linger=0.25)
LIMITS = {
    "plain": {"fail_threshold": 10**9},  # the servers stay up though no SYN is answered
    "no-reply": {},  # unanswered SYNs take the servers down: the later ones are refused
    "rate": {"max_new_per_second": 40.0},
    "sessions": {"max_sessions": 30},
    # 25 label pairs: exhausted, a half-open share of 12, and pairs back from quarantine by the next block
    "labels": {
        "c2s_max": C2S_MIN + 2 * 24,
        "label_quarantine": 0.5,
        "endpoint_flow_timeout": 0.5,
        "fail_threshold": 10**9,
    },
    # 104 of the 524,279 pairs, the SYNs' sessions kept from block to block: most SYNs evict the oldest
    "half-open": {"half_open_share": 0.0002, "timeouts": _KEPT},
    # as many sessions as half-open ones: an evicting SYN is admitted only with the evicted one not counted
    "half-open-full": {"half_open_share": 0.0002, "max_sessions": 104, "timeouts": _KEPT},
    "rst": {"refuse_with": RefuseWith.RST, "max_sessions": 20},
}


def _config(limits: str, server_limit: bool) -> BalancerConfig:
    config = campaign_config()
    if server_limit:
        servers = (dataclasses.replace(config.servers[0], max_sessions=4), *config.servers[1:])
        config = dataclasses.replace(config, servers=servers)
    return dataclasses.replace(config, **LIMITS[limits])  # type: ignore[arg-type]


def _frame(kind: str, n: int, last: tuple[int, bytes]) -> tuple[int, bytes]:
    """Frame ``n`` of kind ``kind`` (``last``: the frame before, for a retransmission)."""
    client = n % 16
    port = client % 2
    src = client_addr(client, False)
    sport = 1024 + n
    to = PORT_MAC[port]
    if kind == "again":
        return last
    if kind == "novip":
        return port, _ether(to, client_mac(client), _tcp(src, bytes((10, 0, 0, 99)), sport, 80, SYN))
    if kind == "noport":
        return port, _ether(to, client_mac(client), _tcp(src, VIP4, sport, 81, SYN))
    if kind == "server":
        return 2, _ether(PORT_MAC[2], client_mac(client), _tcp(src, VIP4, sport, 80, SYN))
    if kind == "v6":
        return port, _ether(to, client_mac(client), _tcp(client_addr(client, True), VIP6, sport, 80, SYN))
    if kind == "options":  # a real SYN's: the MSS option
        return port, _ether(to, client_mac(client), _segment(src, sport, b"\x02\x04\x05\xb4"))
    if kind == "marked":  # a TOS and a TTL of its own: the label's traffic class and TTL
        return port, _ether(to, client_mac(client), _segment(src, sport, tos=0xB8, ttl=n % 200 + 2))
    if kind == "data":
        return port, _ether(to, client_mac(client), _tcp(src, VIP4, sport, 80, SYN, b"GET / HTTP/1.0\r\n\r\n"))
    if kind == "ack":
        return port, _ether(to, client_mac(client), _tcp(src, VIP4, sport, 80, ACK))
    if kind == "badsum":
        packet = bytearray(_tcp(src, VIP4, sport, 80, SYN))
        packet[10] ^= 0x40
        return port, _ether(to, client_mac(client), bytes(packet))
    frame = _ether(to, client_mac(client), _tcp(src, VIP4, sport, 80, SYN))
    return (9, frame) if kind == "unknown" else (port, frame)


def _segment(src: bytes, sport: int, options: bytes = b"", *, tos: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 SYN to the VIP's port 80 with TCP ``options``, ``tos`` and ``ttl``."""
    segment = build_tcp(src, VIP4, sport, 80, seq=sport, ack=1, flags=SYN, options=options)
    return build_ipv4(src, VIP4, IPPROTO_TCP, len(segment), tos=tos, ttl=ttl) + segment


def _same_tables(one: Balancer, block: Balancer) -> list[str]:
    """The names of the tables whose octets differ between the two balancers: every field of the session table's
    rows and its key index, its counts and half-open queue, the switching table's rows and counts, the label
    manager's."""
    a, b = one.sessions, block.sessions
    fields = ["state", "proto", "ip_version", "rt_budget", "end_reason", "final_state", "client_port", "server",
              "start_time", "request_at", "end_time", "ending_at", "deadline", "keys", "client_mac", "home", "_slots",
              "_block_min"]  # fmt: skip
    pairs = [(name, getattr(a, name), getattr(b, name)) for name in fields]
    pairs.append(("switching rows", one.switching.rows, block.switching.rows))
    differ = [
        name for name, x, y in pairs if not np.array_equal(np.frombuffer(x, np.uint8), np.frombuffer(y, np.uint8))
    ]
    sessions = [(s.half_open, s.live, s.started, s.peak, len(s), s._next, _half_open_queue(s)) for s in (a, b)]
    labels = [(t.switching.installed, t.switching.version, t.labels.stats()) for t in (one, block)]
    return differ + ["session counts"] * (sessions[0] != sessions[1]) + ["label counts"] * (labels[0] != labels[1])


def _half_open_queue(s: SessionTable) -> list[tuple[int, float]]:
    queue = s._half_open_fifo
    entries = zip(queue.rows[queue.head :], queue.times[queue.head :], strict=True)
    return [entry for entry in entries if s._is_half_open(*entry)]


def _run(one: Balancer, block: Balancer, chunk: list[tuple[int, bytes]], now: float) -> None:
    """``chunk`` frame by frame through ``one`` and as a block through ``block``: the same frames out (the block's
    extra frames in frame order), the same tables."""
    expected: Frames = []
    for port, frame in chunk:
        expected += one.receive(port, frame, now)
    buf, starts, lengths, ports = pack(chunk)
    result = block.receive_block(buf, starts, lengths, ports, now)
    assert listed(result, buf, starts, lengths) == expected
    order = [i for i, _, _ in result.extra]
    assert order == sorted(order)
    assert _same_tables(one, block) == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(st.sampled_from(KINDS), min_size=SYN_RUN_MIN, max_size=160),
    st.sampled_from(sorted(LIMITS)),
    st.booleans(),
    st.integers(1, 6),
)
def test_a_blocks_syns_opened_together_leave_what_frame_by_frame_leaves(
    kinds: list[str], limits: str, server_limit: bool, blocks: int
) -> None:
    config = _config(limits, server_limit)
    one, block = Balancer(config), Balancer(config)
    frames: list[tuple[int, bytes]] = []
    last = (0, b"")
    for n, kind in enumerate(kinds):
        last = _frame(kind, n, last) if last[1] or kind != "again" else _frame("new", n, last)
        frames.append(last)
    size = -(-len(frames) // blocks)
    now = 10.0
    for start in range(0, len(frames), size):
        _run(one, block, frames[start : start + size], now)
        # Half-open sessions expire and their labels come back out of quarantine: later runs reuse rows and labels.
        now += 1.5
        assert one.on_timer(now) == block.on_timer(now)
    a, b = one.stats(), block.stats()
    assert _counters(a) == _counters(b) and _traffic(a) == _traffic(b)
    assert a.refused == b.refused and _same_tables(one, block) == []


@pytest.mark.parametrize("limits", sorted(LIMITS))
def test_a_syn_flood_in_blocks_is_opened_together_and_as_frame_by_frame(limits: str) -> None:
    """Blocks of 96 SYNs of new flows (two of them retransmitted), a second and a half apart: runs are opened at
    once (with no limit, only the retransmitted SYNs go frame by frame), and the outputs and tables are
    frame-by-frame processing's, also when a limit, the half-open share or the labels run out in the middle of a
    run, when the unanswered SYNs take the servers down, and when rows and labels come back from earlier sessions."""
    config = _config(limits, server_limit=limits == "plain")
    one, block = Balancer(config), Balancer(config)
    entered = 0
    receive = block._receive

    def counted(*args: object) -> None:
        nonlocal entered
        entered += 1
        receive(*args)  # type: ignore[arg-type]

    block._receive = counted  # type: ignore[method-assign]
    frames: list[tuple[int, bytes]] = []
    for n in range(6 * 96):
        frames.append(frames[-1] if n % 96 in (30, 60) else _frame("new", n, (0, b"")))
    now = 1.0
    for start in range(0, len(frames), 96):
        _run(one, block, frames[start : start + 96], now)
        now += 1.5
        assert one.on_timer(now) == block.on_timer(now)
    a, b = one.stats(), block.stats()
    assert _counters(a) == _counters(b) and _traffic(a) == _traffic(b) and a.refused == b.refused
    assert _same_tables(one, block) == []
    if limits == "plain":  # only the retransmitted SYNs (an existing session's) went frame by frame
        assert entered == 2 * 6


_CHECKED = [12, 13, 14, 16, 17, 20, 21, 23, 46, 47]


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["new"] * 6 + ["marked", "options", "data", "ack", "badsum", "v6", "novip"]),
    # mostly the octets the checks read: ethertype, version and IHL, total length, fragment, protocol, data
    # offset, flags; any other header octet too
    st.lists(
        st.tuples(st.sampled_from(_CHECKED) | st.sampled_from(_CHECKED) | st.integers(12, 57), st.integers(0, 255)),
        max_size=2,
    ),
    st.sampled_from([0, 0, 0, 0, -1, -6, 1, 12]),
    st.booleans(),
)
def test_the_block_reads_a_syn_of_a_new_session_exactly_where_the_one_frame_analysis_does(
    kind: str, mutations: list[tuple[int, int]], resize: int, checksum: bool
) -> None:
    """``PacketAnalyzer.plain_syns`` takes a frame exactly when the one-frame analysis reads it on its plain path as
    an IPv4 TCP segment with SYN (not ACK, RST or FIN) and no payload, and reads its fields as that analysis does;
    over frames with octets changed anywhere in their headers (the IP header's checksum made right again or not),
    cut short or padded."""
    frame = bytearray(_frame(kind, 5, (0, b""))[1])
    for at, value in mutations:
        if at < len(frame):
            frame[at] = value
    if checksum and len(frame) >= 34:  # the IPv4 header's checksum made right again: the change is seen past it
        frame[24:26] = b"\0\0"
        frame[24:26] = internet_checksum(bytes(frame[14:34])).to_bytes(2, "big")
    frame = frame[: len(frame) + resize] if resize < 0 else frame + bytes(resize)
    analyzer = PacketAnalyzer()
    plain = None
    if len(frame) >= 42 and frame[12:14] == b"\x08\x00":
        plain = plain_ipv4_py(bytes(frame), 14, False)
    expected = (
        plain is not None
        and plain.key.proto == IPPROTO_TCP
        and plain.tcp_flags & (SYN | ACK | int(TCPFlag.RST) | int(TCPFlag.FIN)) == SYN
        and plain.payload_len == 0
    )
    buf, starts, lengths, _ = pack([(0, bytes(frame))])
    taken, heads = analyzer.plain_syns(buf, starts, lengths, np.arange(1))
    assert (taken.tolist() == [0]) == expected
    if expected:
        assert plain is not None
        head = heads[0].tobytes()
        assert (head[26:30], head[30:34], head[34:36], head[36:38]) == (
            plain.key.src,
            plain.key.dst,
            plain.key.sport.to_bytes(2, "big"),
            plain.key.dport.to_bytes(2, "big"),
        )
        assert (head[22], head[15], head[6:12]) == (plain.ttl, plain.tos, bytes(frame[6:12]))
