"""The numpy block fast path forwards exactly the frames the one-frame path forwards: same ports, same bytes, same
order, same counters; everything it cannot take goes through the one-frame path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    PSH,
    RST,
    SYN,
    VIP,
    Net,
    client_addr,
    feed_mutations,
    frames_only,
    handshake,
    label_of,
    listed,
    make_config,
    pack,
    recording,
    reused_label_pair,
    tcp,
    with_mutated,
)
from mplslb.balancer import Balancer, Frames
from mplslb.switching.block import word_aligned


@pytest.mark.parametrize("aligned", [False, True], ids=["bytes", "words"])
def test_the_whole_recording_in_blocks_matches_frame_by_frame(aligned: bool) -> None:
    config, _ = recording()
    frames = frames_only()
    one, block = Balancer(config), Balancer(config)
    switched = 0
    for start in range(0, len(frames), 64):
        calls = frames[start : start + 64]
        now = calls[-1].now
        expected: Frames = []
        for c in calls:
            expected += one.receive(c.port, c.frame, now)
        buf, starts, lengths, ports = pack([(c.port, c.frame) for c in calls], aligned=aligned)
        assert word_aligned(buf, starts) == aligned  # each variant of the block path is the one tested
        result = block.receive_block(buf, starts, lengths, ports, now)
        switched += int((result.out_port >= 0).sum())
        assert listed(result, buf, starts, lengths) == expected
        one.on_timer(now)
        block.on_timer(now)
    a, b = one.stats(), block.stats()
    # Labelled frames of a session opened earlier in the same block were classified before it existed, so the
    # one-frame path took them (correctly, in order); the rest went by the block path.
    assert 0.3 * a.fast_path < switched <= a.fast_path
    assert (a.frames_in, a.frames_out, a.fast_path, a.slow_path) == (
        b.frames_in,
        b.frames_out,
        b.fast_path,
        b.slow_path,
    )
    assert a.drops == b.drops and a.sessions_ended == b.sessions_ended and a.labels == b.labels
    assert [(r.name, r.packets_in, r.bytes_in, r.packets_out, r.bytes_out) for r in a.servers] == [
        (r.name, r.packets_in, r.bytes_in, r.packets_out, r.bytes_out) for r in b.servers
    ]
    assert_same_label_counters(one, block)


def assert_same_label_counters(one: Balancer, block: Balancer) -> None:
    """Every label's packets, bytes, last frame's time and last acknowledgment number, as the fast path keeps them,
    are the same after the block path as after frame-by-frame processing."""
    x, y = one.switching.arrays(), block.switching.arrays()
    for name in ("packets", "bytes", "last_seen", "acks"):
        assert np.array_equal(getattr(x, name), getattr(y, name)), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(100, 900),
    block_size=st.integers(1, 200),
    mutations=feed_mutations,
    aligned=st.booleans(),
)
def test_blocks_with_mutated_frames_match_frame_by_frame(
    cut: int, block_size: int, mutations: list[tuple[int, list[tuple[str, int, int]]]], aligned: bool
) -> None:
    config, _ = recording()
    calls = frames_only()[:cut]
    feed = with_mutated([(c.port, c.frame, c.now) for c in calls], mutations)
    one, block = Balancer(config), Balancer(config)
    for start in range(0, len(feed), block_size):
        chunk = feed[start : start + block_size]
        now = chunk[-1][2]
        expected: Frames = []
        for port, frame, _ in chunk:
            expected += one.receive(port, frame, now)
        buf, starts, lengths, ports = pack([(p, f) for p, f, _ in chunk], aligned=aligned)
        assert listed(block.receive_block(buf, starts, lengths, ports, now), buf, starts, lengths) == expected
    a, b = one.stats(), block.stats()
    assert (a.frames_in, a.frames_out, a.fast_path, a.drops) == (b.frames_in, b.frames_out, b.fast_path, b.drops)
    assert_same_label_counters(one, block)


def test_a_forged_or_expired_frame_is_left_to_the_one_frame_path() -> None:
    config, _ = recording()
    calls = frames_only()
    b = Balancer(config)
    for c in calls[:200]:
        b.receive(c.port, c.frame, c.now)
    labelled = next(c for c in calls[200:] if c.frame[12:14] == b"\x88\x47" and b.switching.valid[
        int.from_bytes(c.frame[14:17], "big") >> 4])  # fmt: skip
    wrong_mac = labelled.frame[:6] + b"\x02\x99\x99\x99\x99\x99" + labelled.frame[12:]
    ttl_one = labelled.frame[:17] + b"\x01" + labelled.frame[18:]
    buf, starts, lengths, ports = pack([(labelled.port, wrong_mac), (labelled.port, ttl_one)])
    before = dict(b.stats().drops)
    result = b.receive_block(buf, starts, lengths, ports, labelled.now)
    assert list(result.out_port) == [-1, -1] and result.extra == []
    after = b.stats().drops
    assert after.get("label_wrong_ingress", 0) == before.get("label_wrong_ingress", 0) + 1
    assert after.get("mpls_ttl_expired", 0) == before.get("mpls_ttl_expired", 0) + 1


@pytest.mark.parametrize("aligned", [False, True])
def test_blocks_of_runts_go_to_the_one_frame_path(aligned: bool) -> None:
    config, _ = recording()
    one, block = Balancer(config), Balancer(config)
    runts = [(0, b""), (1, b"\x01\x02"), (0, b"\xff" * 13), (2, b"\x00" * 17)]
    buf, starts, lengths, ports = pack(runts, gap=0, aligned=aligned)
    result = block.receive_block(buf, starts, lengths, ports, 1.0)
    expected: Frames = []
    for port, frame in runts:
        expected += one.receive(port, frame, 1.0)
    assert listed(result, buf, starts, lengths) == expected == []
    assert one.stats().drops == block.stats().drops and block.stats().frames_in == len(runts)


def test_a_block_that_withdraws_labels_it_later_carries_matches_frame_by_frame() -> None:
    """A server's RST to an unanswered SYN takes it down (threshold 1) and withdraws its sessions' labels: a frame
    later in the same block with one of those labels is dropped, exactly as frame by frame, not forwarded on the
    bulk decision made before."""
    config = make_config(n_servers=1, fail_threshold=1)
    nets = [Net(config), Net(config)]
    frames: list[tuple[int, bytes]] = []
    for net in nets:
        name, c2s = handshake(net, 0, sport=5001)  # session B, established
        net.deliver_to_servers(net.from_client(0, tcp(client_addr(0), VIP, 5000, 80, SYN, seq=1)))  # A: no answer
        server = net.servers[name]
        rst = server.from_host(tcp(VIP, client_addr(0), 80, 5000, RST | ACK, seq=0, ack=2), net.now)
        data = net.client(0).from_host(tcp(client_addr(0), VIP, 5001, 80, PSH | ACK, seq=101, ack=501), net.now)
        assert rst is not None and data is not None and label_of(data) == c2s
        frames = [(net.server_port[name], rst), (net.client_port(0), data), (net.client_port(0), data)]
    one, block = nets[0].balancer, nets[1].balancer
    expected: Frames = []
    for port, frame in frames:
        expected += one.receive(port, frame, 1.0)
    buf, starts, lengths, ports = pack(frames, aligned=False)
    result = block.receive_block(buf, starts, lengths, ports, 1.0)
    # The RST itself is switched to the client; the two frames after it find their label withdrawn.
    assert listed(result, buf, starts, lengths) == expected and len(expected) == 1
    a, b = one.stats(), block.stats()
    assert a.drops == b.drops and a.drops.get("label_unknown") == 2
    assert (a.frames_in, a.frames_out, a.fast_path, a.slow_path) == (
        b.frames_in,
        b.frames_out,
        b.fast_path,
        b.slow_path,
    )
    assert [(r.name, r.status, r.packets_in, r.packets_out) for r in a.servers] == [
        (r.name, r.status, r.packets_in, r.packets_out) for r in b.servers
    ]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("same_client", [False, True], ids=["other-client", "same-client"])
@pytest.mark.parametrize("way", ["receive", "receive_block-bytes", "receive_block-words"])
def test_a_reused_label_pairs_late_s2c_frame_never_reaches_the_new_client(
    way: str, same_client: bool, v6: bool
) -> None:
    """A label pair reused by a new session to the same server: the server agent's late frame of the old flow
    passes the label's ingress binding (same port, MAC, the VIP as source) but not its flow (another client, or
    another port of the same client): dropped as label_wrong_flow, while the new session's frames pass both ways."""
    pair = reused_label_pair(same_client=same_client, v6=v6)
    net, balancer = pair.net, pair.net.balancer
    frames = [pair.late, pair.reply, pair.late, pair.request]
    if way == "receive":
        out = balancer.receive_batch(frames, net.now)
    else:
        buf, starts, lengths, ports = pack(frames, aligned=way.endswith("words"))
        result = balancer.receive_block(buf, starts, lengths, ports, net.now)
        # The block path itself takes the new session's frames (their MAC, IP source and flow read from the rows)
        # and leaves the late ones to the one-frame path, which drops them.
        assert (result.out_port >= 0).tolist() == [False, True, False, True]
        out = listed(result, buf, starts, lengths)
    assert len(out) == 2
    (reply, request) = out
    delivered = net.deliver_to_client(pair.new_client, [reply])
    assert len(delivered) == 1 and delivered[0].endswith(b"a2")
    assert request[0] == net.server_port["s1"] and label_of(request[1]) == pair.c2s
    assert balancer.stats().drops == {"label_wrong_flow": 2}
