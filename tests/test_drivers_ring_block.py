"""The zero-copy block path on veth pairs in a throwaway namespace (root): RingPort.recv_block lends ring blocks in
place, TxRing sends what is queued, and BalancerDriver(block=True) forwards exactly what Balancer.receive would."""

from __future__ import annotations

import itertools
import os
import random
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from pyroute2 import IPRoute, netns

from helpers import (
    ETH_P_LOCAL_EXP,
    VIP,
    FakeClock,
    client_addr,
    frames_of,
    frames_only,
    pack,
    recording,
    tcp,
    wait_until_ready,
)
from mplslb.balancer import Balancer
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.drivers.afpacket import PacketPort, RingPort, RxBlock
from mplslb.drivers.loop import BalancerDriver, Loop
from mplslb.drivers.netns import entered
from mplslb.drivers.txring import TxRing
from mplslb.sessions import Timeouts
from mplslb.switching.block import word_aligned
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.mpls import stack_of
from mplslb.wire.tcp import TCPFlag

WAIT = 10.0  # seconds any exchange may take, at most
_serial = itertools.count()

root = pytest.mark.root
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates namespaces, veth pairs, packet sockets")
Opener = Callable[..., Any]


@pytest.fixture
def net() -> Iterator[tuple[str, tuple[str, str], tuple[str, str]]]:
    """A namespace holding two veth pairs, all up, IPv6 off (the kernel sends nothing): (netns, (ca, cb), (sa, sb))."""
    pid = os.getpid()
    serial = next(_serial)
    name = f"mlbrb{pid}n{serial}"
    c = (f"mrb{pid}c{serial}a", f"mrb{pid}c{serial}b")
    s = (f"mrb{pid}s{serial}a", f"mrb{pid}s{serial}b")
    try:
        netns.create(name)
        with entered(name):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            with IPRoute() as ipr:
                for a, b in (c, s):
                    ipr.link("add", ifname=a, kind="veth", peer=b)
                    for ifname in (a, b):
                        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                wait_until_ready(ipr, (*c, *s))
        yield name, c, s
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@pytest.fixture
def opened(net: tuple[str, tuple[str, str], tuple[str, str]]) -> Iterator[Opener]:
    """Opens ports (or TX rings) in the test namespace and closes every one of them after the test."""
    name = net[0]
    ports: list[Any] = []

    def open_in(kind: Callable[..., Any], ifname: str, **kwargs: Any) -> Any:
        port = kind(ifname, netns=name, **kwargs)
        ports.append(port)
        return port

    try:
        yield open_in
    finally:
        for port in reversed(ports):
            port.close()


def lent_frames(block: RxBlock) -> list[bytes]:
    return [block.buf[s : s + n].tobytes() for s, n in zip(block.starts.tolist(), block.lengths.tolist(), strict=True)]


def check_aligned(block: RxBlock) -> None:
    """The block is a 4-aligned uint8 view and every frame starts 2 bytes past a 4-byte boundary: the core's
    word-aligned variant applies."""
    assert block.buf.dtype == np.uint8 and block.buf.ctypes.data % 4 == 0 and len(block.buf) % 4 == 0
    assert block.starts.dtype == np.int64 and block.lengths.dtype == np.int64
    assert bool((block.starts % 4 == 2).all())
    assert word_aligned(block.buf, block.starts)


def drain_blocks(port: RingPort, n: int, got: list[bytes], deadline: float, max_frames: int | None = None) -> None:
    """Read lent blocks until ``n`` frames arrived or the deadline passes; each block is released once read."""
    while len(got) < n and time.monotonic() < deadline:
        block = port.recv_block(max_frames)
        if block is None:
            select.select([port], [], [], 0.05)
            continue
        try:
            check_aligned(block)
            assert not block.tagged
            got += lent_frames(block)
        finally:
            block.release()


def read_frames(port: PacketPort | RingPort, n: int, got: list[bytes], deadline: float) -> list[bytes]:
    while len(got) < n and time.monotonic() < deadline:
        select.select([port], [], [], 0.05)
        got += port.recv_burst(1024)
    return got


# -- recv_block -------------------------------------------------------------------------------------------------
@root
@needs_root
@pytest.mark.parametrize("max_frames", [None, 7, 20], ids=["whole", "by7", "by20"])
def test_recv_block_lends_exactly_the_frames_sent(net, opened, max_frames):
    _, (a, b), _ = net
    left = opened(PacketPort, a)
    right = opened(RingPort, b, block_size=1 << 16, block_nr=16)
    frames = frames_of([60, 64, 65, 66, 67, 128, 1500, 1514] * 40, right.mac, left.mac)
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    for i in range(0, len(frames), 40):
        for frame in frames[i : i + 40]:
            left.send(frame)
        drain_blocks(right, i + 40, got, min(deadline, time.monotonic() + 0.02), max_frames)
    drain_blocks(right, len(frames), got, deadline, max_frames)
    assert got == frames
    assert right.stats() == (len(frames), 0) and not right.drops
    assert right.recv_block() is None and right.recv_burst() == []


@root
@needs_root
def test_runs_of_equal_frames_are_read_in_bulk_and_the_rest_one_by_one(net, opened):
    """Stretches of equal-sized frames go through the numpy walk, broken by other sizes, a tagged frame and an
    expected mismatch of the stride; everything arrives in order either way."""
    _, (a, b), _ = net
    left = opened(PacketPort, a)
    right = opened(RingPort, b, block_size=1 << 16, block_nr=8, retire_ms=200)
    sizes = [64] * 40 + [65] + [64] * 20 + [1500] * 17 + [60] * 5 + [128] * 50 + [61, 62, 63] * 10 + [90] * 16
    plain = frames_of(sizes, right.mac, left.mac)
    tagged = build_ethernet(right.mac, left.mac, ETH_P_LOCAL_EXP, [5]) + bytes(50)
    sent = [*plain[:100], tagged, *plain[100:]]
    for frame in sent:
        left.send(frame)
    lent: list[bytes] = []
    copies: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(lent) < len(plain) and time.monotonic() < deadline:
        select.select([right], [], [], 0.05)
        block = right.recv_block()
        if block is not None:
            check_aligned(block)
            lent += lent_frames(block)
            copies += block.tagged
            block.release()
    assert lent == plain and copies == [tagged]
    assert right.bulk_frames >= 100  # most of the equal stretches went by numpy


@root
@needs_root
def test_release_lets_a_small_ring_go_round_many_times(net, opened):
    """4 blocks of 16 KiB (about 50 frames of 200 bytes each) carry 6000 frames: each block is lent, released and
    filled again some thirty times."""
    _, (a, b), _ = net
    left = opened(PacketPort, a)
    right = opened(RingPort, b, block_size=1 << 14, block_nr=4)
    frames = frames_of([200] * 6000, right.mac, left.mac)
    got: list[bytes] = []
    deadline = time.monotonic() + 3 * WAIT
    blocks = 0
    for i in range(0, len(frames), 32):
        for frame in frames[i : i + 32]:
            left.send(frame)
        for _ in range(64):  # bounded: until this chunk is all read (or the deadline)
            if len(got) >= i + 32 or time.monotonic() > deadline:
                break
            block = right.recv_block()
            if block is None:
                select.select([right], [], [], 0.05)
                continue
            blocks += 1
            check_aligned(block)
            got += lent_frames(block)
            block.release()
            block.release()  # a second release is harmless
    drain_blocks(right, len(frames), got, deadline)
    assert len(got) == len(frames) and got == frames
    assert blocks >= 6000 // 60
    assert right.stats()[1] == 0 and not right.drops


@root
@needs_root
def test_blocks_and_bursts_mix_and_a_lent_block_is_not_read_again(net, opened):
    """Two blocks of 64 KiB (about 350 frames of 100 bytes) retired after 300 ms: each batch below, sent in well
    under that, lands in one block."""
    _, (a, b), _ = net
    left = opened(PacketPort, a)
    right = opened(RingPort, b, block_size=1 << 16, block_nr=2, retire_ms=300)
    frames = frames_of([100] * 90, right.mac, left.mac)
    for frame in frames[:60]:
        left.send(frame)
    deadline = time.monotonic() + WAIT
    first = None
    while first is None and time.monotonic() < deadline:
        select.select([right], [], [], 0.05)
        first = right.recv_block(20)  # the first 20 frames of block 0, lent
    assert first is not None and lent_frames(first) == frames[:20]
    burst = right.recv_burst(25)  # the next 25 copied, from the same block
    assert burst == frames[20:45]
    second = right.recv_block()  # the rest of block 0
    assert second is not None and lent_frames(second) == frames[45:60]
    assert right.recv_block() is None
    second.release()
    # Block 0 is still lent (first is held): the next frames go to block 1; block 0 stays ours meanwhile.
    for frame in frames[60:90]:
        left.send(frame)
    third: list[bytes] = []
    drain_blocks(right, 30, third, deadline)
    assert third == frames[60:90]
    assert lent_frames(first) == frames[:20]  # not overwritten: the kernel has not had it back
    assert right.recv_block() is None and right.recv_burst() == []  # the ring is back at block 0, which is lent
    first.release()
    more = frames_of([100] * 5, right.mac, left.mac)
    for frame in more:
        left.send(frame)
    after: list[bytes] = []
    drain_blocks(right, 5, after, deadline)
    assert after == more


@root
@needs_root
def test_vlan_offloaded_frames_come_as_copies_with_the_tag(net, opened):
    _, (a, b), _ = net
    left = opened(PacketPort, a)
    right = opened(RingPort, b, block_size=1 << 16, block_nr=4)
    plain = frames_of([80] * 3, right.mac, left.mac)
    tagged = build_ethernet(right.mac, left.mac, ETH_P_LOCAL_EXP, [0x2005]) + bytes(60)
    for frame in (plain[0], tagged, plain[1], plain[2]):
        left.send(frame)
    deadline = time.monotonic() + WAIT
    lent: list[bytes] = []
    copies: list[bytes] = []
    while len(lent) + len(copies) < 4 and time.monotonic() < deadline:
        select.select([right], [], [], 0.05)
        block = right.recv_block()
        if block is not None:
            check_aligned(block)
            lent += lent_frames(block)
            copies += block.tagged
            block.release()
    assert lent == plain and copies == [tagged]


# -- TxRing -----------------------------------------------------------------------------------------------------
@root
@needs_root
def test_tx_ring_sends_exactly_the_queued_frames_in_order(net, opened):
    _, (a, b), _ = net
    tx = opened(TxRing, a, frame_nr=64)
    right = opened(PacketPort, b, rcvbuf=8 << 20)
    frames = frames_of([60, 64, 100, 1000, 1514] * 200, right.mac, b"\x02\x00\x00\x00\x00\x01")
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    refused = 0
    for frame in frames:
        for _ in range(3):  # a refusal means the ring is full: flush and queue again
            if tx.queue(frame):
                break
            refused += 1
            tx.flush()
            got += right.recv_burst(4096)
        else:
            raise AssertionError("the ring stayed full after a flush")
    assert tx.flush() > 0 and tx.pending == 0
    read_frames(right, len(frames), got, deadline)
    assert got == frames
    assert refused >= len(frames) // 64 - 1 and tx.full == refused
    assert tx.queued == tx.sent == len(frames) and not tx.errors


@root
@needs_root
def test_tx_ring_is_full_until_flushed_and_refuses_impossible_frames(net, opened):
    _, (a, b), _ = net
    tx = opened(TxRing, a, frame_nr=16)
    right = opened(PacketPort, b, rcvbuf=1 << 20)
    assert tx.frame_nr == 16 and tx.mtu == 1500
    frames = frames_of([64] * 20, right.mac, b"\x02\x00\x00\x00\x00\x01")
    assert all(tx.queue(frame) for frame in frames[:16])
    assert not tx.queue(frames[16]) and tx.pending == 16
    assert tx.flush() == 16 and tx.pending == 0
    assert all(tx.queue(frame) for frame in frames[16:])
    assert tx.flush() == 4
    for bad in (bytes(13), bytes(1515), bytes(tx.frame_size)):
        with pytest.raises(ValueError):
            tx.queue(bad)
    assert tx.flush() == 0
    assert read_frames(right, 20, [], time.monotonic() + WAIT) == frames


@root
@needs_root
@pytest.mark.parametrize("tx_ring", [False, True], ids=["send", "txring"])
def test_send_block_and_send_many_send_in_order(net, opened, tx_ring):
    """A block's frames, sent with send_block (in bulk through the TX ring, whatever their sizes, including frames
    whose copy window would run past the buffer's end), then with send_many, arrive as they were, in order."""
    _, (a, b), _ = net
    left = opened(RingPort, a, tx_ring=tx_ring)
    right = opened(RingPort, b)
    assert (left.tx is not None) == tx_ring
    rng = random.Random(3)
    frames = frames_of([rng.choice([60, 64, 65, 127, 128, 129, 700, 1514]) for _ in range(3000)], right.mac, left.mac)
    chunks, starts, at = [], [], 0
    for frame in frames:
        pad = (2 - at) % 4
        chunks.append(b"\xcc" * pad + frame)
        starts.append(at + pad)
        at += pad + len(frame)
    raw = b"".join(chunks)
    buf = np.frombuffer(raw + bytes(-len(raw) % 4), dtype=np.uint8).copy()
    errors: dict[str, int] = {}
    starts_a = np.array(starts, dtype=np.int64)
    lengths = np.array([len(f) for f in frames], dtype=np.int64)
    got: list[bytes] = []
    deadline = time.monotonic() + 2 * WAIT
    sent = 0
    for i in range(0, len(frames), 250):  # the TX ring holds 4096 frames; the peer's ring reads between chunks
        sent += left.send_block(buf, starts_a[i : i + 250], lengths[i : i + 250], errors)
        drain_blocks(right, i + 250, got, min(deadline, time.monotonic() + 0.05))
    sent += left.send_many(frames[:100], errors)
    sent += left.send_many([buf[s : s + n] for s, n in zip(starts[:10], lengths[:10].tolist(), strict=True)], errors)
    drain_blocks(right, len(frames) + 110, got, deadline)
    assert sent == len(frames) + 110 and not errors
    assert got == frames + frames[:100] + frames[:10]
    if tx_ring:
        assert left.tx is not None and left.tx.sent == len(frames) + 110


# -- the balancer driver's block mode with fake ports (no root) --------------------------------------------------
class FakeRing:
    """An input port lending prepared blocks (``recv_block``); as an output port it records what it is sent,
    in bulk (``send_block``, ``send_many``, ``flush``, a ``tx`` ring) when ``bulk``, else with ``send`` only."""

    def __init__(self, bulk: bool) -> None:
        self._r, self._w = os.pipe()
        self.blocks: list[RxBlock] = []
        self.released = 0
        self.sent: list[bytes] = []
        self.flushes = 0
        if bulk:
            self.tx = object()
            self.send_block = self._send_block
            self.send_many = self._send_many
            self.flush = self._flush

    def fileno(self) -> int:
        return self._r

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        raise AssertionError("block mode reads blocks")

    def lend(self, frames: list[bytes]) -> None:
        buf, starts, lengths, _ = pack([(0, f) for f in frames], aligned=True)
        released: list[bool] = []

        def release() -> None:
            assert not released, "released twice"
            released.append(True)
            self.released += 1

        self.blocks.append(RxBlock(buf, starts, lengths, release, []))

    def recv_block(self, max_frames: int | None = None) -> RxBlock | None:
        return self.blocks.pop(0) if self.blocks else None

    def send(self, frame: bytes) -> int:
        self.sent.append(bytes(frame))
        return len(frame)

    def _send_block(self, buf: Any, starts: Any, lengths: Any, errors: Any = None, *, flush: bool = True) -> int:
        self.sent += [buf[s : s + n].tobytes() for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
        return len(starts)

    def _send_many(self, frames: Any, errors: Any = None, *, flush: bool = True) -> int:
        frames = [bytes(f) for f in frames]
        self.sent += frames
        self.flushes += flush
        return len(frames)

    def _flush(self, errors: Any = None) -> int:
        self.flushes += 1
        return 0

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def test_block_mode_sends_each_port_what_receive_would_in_order():
    """The recorded simulation (sessions opening, switched both ways, closing) in blocks of consecutive frames from
    one port: each output port gets exactly the one-frame path's frames in its order, whether it sends in bulk
    (ports 0 and 2) or frame by frame (1 and 3); each block is released once, each bulk port flushed once a block."""
    config, _ = recording()
    calls = frames_only()
    one, core = Balancer(config), Balancer(config)
    fakes = {p.port_id: FakeRing(bulk=p.port_id % 2 == 0) for p in config.ports}
    clock = FakeClock()
    loop = Loop(clock=clock)
    driver = BalancerDriver(core, fakes, loop, block=True)
    expected: dict[int, list[bytes]] = {port: [] for port in fakes}
    blocks = 0
    try:
        assert set(driver.block_ports) == set(fakes)
        i = 0
        while i < len(calls):
            port, j = calls[i].port, i
            while j < len(calls) and j - i < 64 and calls[j].port == port:
                j += 1
            chunk, now = calls[i:j], calls[j - 1].now
            for c in chunk:
                for out_port, frame in one.receive(c.port, c.frame, now):
                    expected[out_port].append(frame)
            fakes[port].lend([c.frame for c in chunk])
            clock.now = now
            flushes = {p: f.flushes for p, f in fakes.items()}
            driver.readable(port)
            blocks += 1
            assert all(fakes[p].flushes - flushes[p] <= 1 for p in (0, 2))
            one.on_timer(now)
            core.on_timer(now)
            i = j
        for port, fake in fakes.items():
            assert fake.sent == expected[port], f"port {port}"
        assert sum(f.released for f in fakes.values()) == blocks
        assert driver.frames_read == {p: sum(1 for c in calls if c.port == p) for p in fakes}
        assert driver.frames_written == {p: len(expected[p]) for p in fakes}
        assert sum(driver.blocks_read.values()) == blocks and not driver.drops and not driver.send_errors
        assert core.stats().fast_path == one.stats().fast_path
    finally:
        driver.close()
        loop.close()
        for fake in fakes.values():
            fake.close()


# -- the balancer driver, end to end ---------------------------------------------------------------------------
CLIENT_MAC = bytes.fromhex("02c000000001")
SPORT = 40000


def wired_config(client_mac: bytes, server_port_mac: bytes, server_mac: bytes) -> BalancerConfig:
    """make_config (helpers) on real interfaces: port 0 (client side) and port 2 (server side) with the veths' MACs,
    one server behind port 2 at the MAC of the server-side peer."""
    ports = (PortConfig(0, 0, 0, client_mac, "client"), PortConfig(2, 1, 0, server_port_mac, "server"))
    servers = (ServerConfig(name="s1", address=bytes((10, 2, 0, 1)), mac=server_mac, port_id=2),)
    return BalancerConfig(
        ports=ports,
        vips=(VirtualService(VIP, (80,), (53,)),),
        servers=servers,
        timeouts=Timeouts(tcp_start=600.0),
    )


def client_frames(port_mac: bytes, label: int, n: int) -> list[bytes]:
    """``n`` frames of the session from the client: labelled (most), unlabelled (every 97th: the one-frame path
    forwards those, labelling them) and a few the balancer drops (a wrong label, an expired TTL)."""
    rng = random.Random(11)
    frames = []
    seq = 1001
    for i in range(n):
        payload = rng.randbytes(rng.choice([0, 0, 1, 10, 100, 600]))
        packet = tcp(client_addr(0), VIP, SPORT, 80, int(TCPFlag.ACK | TCPFlag.PSH), seq=seq, ack=1, payload=payload)
        seq += len(payload)
        if i % 97 == 50:
            frames.append(build_ethernet(port_mac, CLIENT_MAC, ETH_P_IP) + packet)
            continue
        entry = stack_of([label + 2 if i % 331 == 7 else label], ttl=1 if i % 409 == 9 else 64)
        frames.append(build_ethernet(port_mac, CLIENT_MAC, ETH_P_MPLS_UC) + entry + packet)
    return frames


@root
@needs_root
@pytest.mark.parametrize(
    ("block", "tx_ring"), [(False, False), (True, False), (True, True), (False, True)], ids=["burst", "block",
                                                                                           "block-txring",
                                                                                           "burst-txring"]
)  # fmt: skip
def test_driver_forwards_what_balancer_receive_outputs(net, opened, block, tx_ring):
    """A SYN opens a session, then 2000 frames of it from the client side: the server-side peer receives, byte for
    byte and in order, what a twin Balancer fed the same frames one by one outputs."""
    _, (ca, cb), (sa, sb) = net
    client_port = opened(RingPort, ca, tx_ring=tx_ring)
    server_port = opened(RingPort, sa, tx_ring=tx_ring)
    client = opened(PacketPort, cb)
    server = opened(RingPort, sb)
    config = wired_config(client_port.mac, server_port.mac, server.mac)
    balancer, twin = Balancer(config), Balancer(config)
    loop = Loop()
    driver = BalancerDriver(balancer, {0: client_port, 2: server_port}, loop, block=block)
    try:
        assert set(driver.block_ports) == ({0, 2} if block else set())
        syn = build_ethernet(client_port.mac, CLIENT_MAC, ETH_P_IP) + tcp(client_addr(0), VIP, SPORT, 80, 0x02)
        expected = [f for port, f in twin.receive(0, syn, 1.0) if port == 2]
        assert len(expected) == 1 and expected[0][12:14] == b"\x88\x47"
        label = int.from_bytes(expected[0][14:17], "big") >> 4
        client.send(syn)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            loop.run_once(0.05)
            got += server.recv_burst(1024)
        assert got == expected  # the session is open, with the label the twin gave it

        frames = client_frames(client_port.mac, label, 2000)
        for frame in frames:
            expected += [f for port, f in twin.receive(0, frame, 2.0) if port == 2]
        assert 1900 < len(expected) < 2001
        for i in range(0, len(frames), 50):
            for frame in frames[i : i + 50]:
                client.send(frame)
            loop.run_once(0)
            got += server.recv_burst(1024)
        while len(got) < len(expected) and time.monotonic() < deadline + WAIT:
            loop.run_once(0.02)
            got += server.recv_burst(1024)
        time.sleep(0.02)  # anything more would come now
        loop.run_once(0)
        got += server.recv_burst(1024)
        assert len(got) == len(expected)
        assert got == expected
        assert driver.frames_read[0] == len(frames) + 1 and driver.frames_written[2] == len(expected)
        assert not driver.send_errors and not driver.drops
        if block:
            assert driver.blocks_read[0] > 0 and driver.blocks_read[2] == 0
        a, b = balancer.stats(), twin.stats()
        assert a.fast_path > 1800
        assert client_port.stats()[1] == 0 and server.stats()[1] == 0
        assert (a.frames_in, a.frames_out, a.fast_path, a.slow_path, a.drops) == (
            b.frames_in,
            b.frames_out,
            b.fast_path,
            b.slow_path,
            b.drops,
        )
    finally:
        driver.close()
        loop.close()


@root
@needs_root
def test_a_syn_flood_is_opened_in_runs_and_forwarded_as_receive_would(net, opened):
    """400 SYNs of new flows sent at once reach the receive ring in a few blocks: the driver's balancer opens most
    of them in runs (``Balancer._open_syns``), and the server side receives, byte for byte and in order, what a
    twin Balancer fed the same SYNs one by one outputs."""
    _, (ca, cb), (sa, sb) = net
    client_port = opened(RingPort, ca)
    server_port = opened(RingPort, sa)
    client = opened(PacketPort, cb)
    server = opened(RingPort, sb)
    config = wired_config(client_port.mac, server_port.mac, server.mac)
    balancer, twin = Balancer(config), Balancer(config)
    taken: list[int] = []
    open_syns = balancer._open_syns

    def counted(run: list[int], *args: Any) -> int:
        taken.append(open_syns(run, *args))
        return taken[-1]

    balancer._open_syns = counted  # type: ignore[method-assign]
    loop = Loop()
    driver = BalancerDriver(balancer, {0: client_port, 2: server_port}, loop, block=True)
    try:
        head = build_ethernet(client_port.mac, CLIENT_MAC, ETH_P_IP)
        syns = [head + tcp(client_addr(i % 200), VIP, SPORT + i, 80, 0x02) for i in range(400)]
        expected = [f for syn in syns for port, f in twin.receive(0, syn, 1.0) if port == 2]
        assert len(expected) == len(syns)
        for syn in syns:
            client.send(syn)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(got) < len(expected) and time.monotonic() < deadline:
            loop.run_once(0.05)
            got += server.recv_burst(1024)
        assert got == expected
        assert sum(taken) > len(syns) // 2, taken
        assert len(balancer.sessions) == len(twin.sessions) == len(syns)
        assert not driver.send_errors and not driver.drops
    finally:
        driver.close()
        loop.close()
