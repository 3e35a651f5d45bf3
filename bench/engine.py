"""Engine benchmarks: the balancer in process, fed frames built in bulk (bench/frames.py), timed with perf_counter_ns.

Each benchmark is a function returning table rows (bench/common.Row), each row with its reference measured in the
same run. Sections (``--only``):

``claim``  cost per frame: label-switched vs unlabelled frame of a new session vs of an existing session
``single`` the one-frame fast path (``Balancer.receive``) vs a minimal pure-Python label switch
``batch``  ``Balancer.receive_batch`` on blocks of 1024 and 4096 frames vs the one-frame path, and a numpy bulk
           prototype (bench-only, not src) that shows what the block path can reach on this machine
``new``    new sessions per second through the slow path vs the existing-session slow path and a minimal
           Python session insert
``scale``  fast-path cost at 1k, 10k, 100k and 524,279 live sessions vs the cost at 1k
``memory`` RSS per live session with the whole label space in use, in a subprocess

Run ``python bench/engine.py [--quick] [--only SECTION,...] [--json]``; ``bench/run.py`` runs it with the rest.
Every loop is bounded in count and in time; figures are medians of several timed repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    ROOT,
    Row,
    Timing,
    at_least,
    at_most,
    command_for,
    rss_bytes,
    skipped,
    time_interleaved,
)
from frames import ACK, SYN, VIP, build, c2s_of_flow, client_ip, frame_block, make_config, port_mac, sport_of
from mplslb.balancer import Balancer
from mplslb.labels import PAIRS
from mplslb.state import huge_pages_of
from mplslb.switching import LABEL_SPACE, WATCH_ALL, FastEvent, scalar
from mplslb.switching.block import count_rows
from mplslb.switching.layout import ENTRY, IP_AT, LABEL_SHIFT, LSE_AT, ROW_SIZE
from mplslb.wire.ethernet import ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import build_tcp

Frames = list[tuple[int, bytes]]
NOW = 2.0
#: IPVS's own figure, from the help text of CONFIG_IP_VS_TAB_BITS (net/netfilter/ipvs/Kconfig): "each connection
#: occupies 128 bytes effectively and each hash entry uses 8 bytes".
IPVS_BYTES_PER_CONNECTION = 128.0


@dataclass(frozen=True)
class Plan:
    """How big each benchmark is: the full run or a quick smoke run."""

    quick: bool
    sessions: int  # live TCP sessions of the shared balancer
    udp_sessions: int
    frames: int  # frames per timed repetition of the one-frame paths
    new_frames: int  # new sessions per timed repetition
    repeats: int
    scale_levels: tuple[int, ...]
    memory_sessions: int
    budget_s: float  # per measurement

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 10_000, 2_000, 4_000, 1_000, 3, (1_000, 10_000), 20_000, 3.0)
        return cls(False, 100_000, 10_000, 20_000, 5_000, 5, (1_000, 10_000, 100_000, PAIRS), PAIRS, 12.0)


# -- driving the balancer ----------------------------------------------------------------------------------------
#: Dependent reads per run of bench/row_latency.c.
READS = 2_000_000
#: SYNs per block in the new-session figures of the block path.
SYN_BLOCK = 256


def feed(balancer: Balancer, frames: Frames, now: float = NOW) -> int:
    """The one-frame path: ``receive`` per frame, as a driver does with one frame per read."""
    receive = balancer.receive
    for port, frame in frames:
        receive(port, frame, now)
    return len(frames)


def switch_alone(balancer: Balancer, switch: Callable[..., int]) -> Callable[[Frames], int]:
    """``switch`` (a one-frame path: the native one or the Python reference) on the balancer's table, frame by
    frame, without the balancer around it; the reports it makes are dropped after each run."""
    hot = balancer.switching.hot
    events: list[FastEvent] = []

    def run(frames: Frames) -> int:
        out: list[tuple[int, bytes]] = []
        for port, frame in frames:
            switch(hot, port, frame, NOW, out, events)
        events.clear()
        return len(frames)

    return run


def feed_blocks(balancer: Balancer, blocks: list[Block], now: float = NOW) -> int:
    """The block path: ``receive_block`` per block, as the daemon's ring mode does with each ring block."""
    receive_block, n = balancer.receive_block, 0
    for b in blocks:
        receive_block(b.buf, b.starts, b.lengths, b.ports, now)
        n += len(b.starts)
    return n


def feed_batch(balancer: Balancer, frames: Frames, block: int, now: float = NOW) -> int:
    receive_batch = balancer.receive_batch
    for start in range(0, len(frames), block):
        receive_batch(frames[start : start + block], now)
    return len(frames)


def open_sessions(balancer: Balancer, flows: range, *, proto: int = IPPROTO_TCP, now: float = 1.0) -> None:
    """Open one session per flow (a SYN, or a UDP datagram), then, for TCP, send each session's first labelled
    frame: that is the client's request, after which the C2S label is only watched for FIN/RST (the steady state
    of a session's fast path). Built and fed in chunks so the frames never all sit in memory."""
    chunk = 32768
    for start in range(flows.start, flows.stop, chunk):
        part = range(start, min(start + chunk, flows.stop))
        if proto == IPPROTO_TCP:
            feed(balancer, build(part, flags=SYN), now)
            feed(balancer, syn_acks(balancer, part), now)
            feed(balancer, build(part, labelled=True), now)
        else:
            feed(balancer, build(part, proto=IPPROTO_UDP), now)
    check_sessions(balancer, flows)


def syn_acks(balancer: Balancer, flows: range) -> Frames:
    """Each flow's server answering its SYN: a SYN-ACK under the session's S2C label, from the server's MAC on its
    port (the client's ACK after it, with the request, completes the handshake)."""
    return server_frames(balancer, flows, seq=5000, ack=1001, flags=SYN | ACK)


def server_frames(balancer: Balancer, flows: range, *, seq: int, ack: int, flags: int, payload: bytes = b"") -> Frames:
    """Each flow's server sending one TCP segment under the session's S2C label, from its MAC on its port."""
    frames: Frames = []
    for flow in flows:
        session = balancer.sessions.by_c2s(c2s_of_flow(flow))
        if session is None:
            raise RuntimeError(f"flow {flow}: no session after its SYN")
        server = session.server.config
        client, sport = client_ip(flow), sport_of(flow)
        segment = build_tcp(VIP, client, 80, sport, seq=seq, ack=ack, flags=flags, payload=payload)
        frame = (
            build_ethernet(port_mac(server.port_id), server.mac, ETH_P_MPLS_UC)
            + pack_entry(session.s2c, 0, True, 64)
            + build_ipv4(VIP, client, IPPROTO_TCP, len(segment))
            + segment
        )
        frames.append((server.port_id, frame))
    return frames


def check_sessions(balancer: Balancer, flows: range) -> None:
    """The benchmarks rely on flow i holding C2S label 17 + 2i in steady state: check a sample."""
    for flow in (flows.start, (flows.start + flows.stop) // 2, flows.stop - 1):
        session = balancer.sessions.by_c2s(c2s_of_flow(flow))
        if session is None or session.key.src != client_ip(flow) or session.key.sport != sport_of(flow):
            raise RuntimeError(f"flow {flow}: session not where the benchmark expects it ({session})")
        watch = balancer.switching.watch[c2s_of_flow(flow)]
        if watch & WATCH_ALL:
            raise RuntimeError(f"flow {flow}: C2S label still fully watched ({watch:#x})")


#: ``--state-dir``: the world's balancer takes its arrays from a state store there.
STATE_DIR: Path | None = None


class World:
    """One balancer with ``plan.sessions`` live TCP sessions (steady state) and ``plan.udp_sessions`` UDP ones,
    shared by the claim, single, batch and new sections; fresh flows are handed out in order."""

    def __init__(self, plan: Plan, seed: int = 7) -> None:
        self.plan = plan
        self.rng = np.random.default_rng(seed)
        self.balancer = Balancer(make_config())
        if STATE_DIR is not None:  # the tables' arrays in a mapped file (mplslb.state) instead of the heap
            from mplslb.state import open_balancer

            self.balancer = open_balancer(make_config(), STATE_DIR, now=0.0, fresh=True)[0]
        t0 = time.perf_counter()
        self.tcp = range(0, plan.sessions)
        open_sessions(self.balancer, self.tcp)
        self.udp = range(plan.sessions, plan.sessions + plan.udp_sessions)
        open_sessions(self.balancer, self.udp, proto=IPPROTO_UDP)
        self.next_flow = self.udp.stop
        self.single: dict[int, Timing] = {}  # the one-frame path's timings, the batch section's reference
        self.setup_s = time.perf_counter() - t0

    def live(self, flows: range, n: int) -> np.ndarray:
        """``n`` flows drawn at random (with repeats) among the live ones: frames hit the tables at random."""
        return self.rng.integers(flows.start, flows.stop, n)

    def fresh(self, n: int) -> range:
        flows = range(self.next_flow, self.next_flow + n)
        if flows.stop > PAIRS:
            raise RuntimeError("the benchmark would run out of labels")
        self.next_flow = flows.stop
        return flows


# -- the minimal pure-Python references ----------------------------------------------------------------------------
def minimal_switch(balancer: Balancer) -> Callable[[Frames], int]:
    """The floor for a one-frame label switch in pure Python: unpack the label entry, index two plain lists (the
    rewrite and the output port of each label installed in the balancer's table when this is called), join the new
    frame. No checks, no counters."""
    unpack, pack, join = ENTRY.unpack_from, ENTRY.pack, b"".join
    table = balancer.switching
    rewrite: list[bytes] = [b""] * LABEL_SPACE
    out_port: list[int] = [-1] * LABEL_SPACE
    for label in np.flatnonzero(table.arrays().valid).tolist():
        rewrite[label], out_port[label] = table.rewrite[label], table.out_port[label]
    mpls = b"\x88\x47"

    def run(frames: Frames) -> int:
        out: list[tuple[int, bytes]] = []
        append = out.append
        for _port, frame in frames:
            (entry,) = unpack(frame, LSE_AT)
            label = entry >> LABEL_SHIFT
            append((out_port[label], join((rewrite[label], mpls, pack(entry - 1), frame[IP_AT:]))))
        return len(frames)

    return run


def minimal_insert(frames: Frames) -> int:
    """The floor for a new session in pure Python: unpack the 5-tuple with struct, insert it into a dict with a
    (label, port) tuple. No validation, no server choice, no switching-table install."""
    import struct

    five = struct.Struct("!9xB2x4s4sHH")  # from the IP header: proto, src, dst; then the ports
    unpack = five.unpack_from
    table: dict[tuple[int, bytes, int, bytes, int], tuple[int, int]] = {}
    label = 17
    for port, frame in frames:
        proto, src, dst, sport, dport = unpack(frame, 14)
        table[(proto, src, sport, dst, dport)] = (label, port)
        label += 2
    return len(frames)


# -- blocks for Balancer.receive_block ------------------------------------------------------------------------------
@dataclass
class Block:
    """Frames lying in one buffer, as ``receive_block`` takes them. ``ring``: each frame in a 16-byte aligned slot
    starting 2 bytes in (as in a TPACKET_V3 ring block, where the IP header is 16-byte aligned: the layout the
    word-aligned code path of ``switch_block`` is for); otherwise packed back to back."""

    buf: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    ports: np.ndarray

    @classmethod
    def of(cls, frames: Frames, *, ring: bool = True) -> Block:
        rows = frame_block(frames)
        n, size = rows.shape
        if ring:
            slot = (size + 2 + 15) // 16 * 16
            buf = np.zeros(n * slot, dtype=np.uint8)
            buf.reshape(n, slot)[:, 2 : 2 + size] = rows
            starts = np.arange(n, dtype=np.int64) * slot + 2
        else:
            buf = rows.reshape(-1).copy()
            starts = np.arange(n, dtype=np.int64) * size
        lengths = np.full(n, size, dtype=np.int64)
        ports = np.fromiter((p for p, _ in frames), dtype=np.int32, count=n)
        return cls(buf, starts, lengths, ports)

    def fresh(self) -> Block:
        """A copy to switch: the block path rewrites frames in place, and a rewritten frame would not pass again."""
        return Block(self.buf.copy(), self.starts, self.lengths, self.ports)


class BlockRun:
    """Timed runs of ``receive_block`` over prepared blocks; ``setup`` (untimed) lays fresh copies."""

    def __init__(self, balancer: Balancer, frames: Frames, block: int, *, ring: bool = True) -> None:
        self.method = balancer.receive_block  # type: ignore[attr-defined]
        self.pristine = [Block.of(frames[s : s + block], ring=ring) for s in range(0, len(frames), block)]
        self.blocks: list[Block] = []
        self.switched = 0
        self.frames = 0

    def setup(self) -> None:
        self.blocks = [b.fresh() for b in self.pristine]

    def run(self) -> int:
        method, n, switched = self.method, 0, 0
        for b in self.blocks:
            result = method(b.buf, b.starts, b.lengths, b.ports, NOW)
            n += len(b.starts)
            switched += int((result.out_port >= 0).sum())
        self.switched, self.frames = switched, n
        return n


def block_list_path(balancer: Balancer, frames: Frames, block: int) -> int:
    """``receive_block`` under ``receive_batch``'s contract: a list of (port, bytes) in, a list out. The frames are
    joined into one buffer (each 2 bytes past a word boundary), switched, and the output cut back into bytes."""
    method = balancer.receive_block  # type: ignore[attr-defined]
    for s in range(0, len(frames), block):
        part = frames[s : s + block]
        size = len(part[0][1])
        slot = (size + 2 + 3) // 4 * 4
        pad = b"\x00" * (slot - size - 2)
        buf = np.frombuffer(bytearray(b"\x00\x00" + (pad + b"\x00\x00").join(f for _, f in part) + pad), np.uint8)
        n = len(part)
        starts = np.arange(n, dtype=np.int64) * slot + 2
        result = method(
            buf, starts, np.full(n, size, dtype=np.int64), np.fromiter((p for p, _ in part), np.int32, n), NOW
        )
        blob = buf.tobytes()
        out = [
            (port, blob[start : start + size])
            for port, start in zip(result.out_port.tolist(), starts.tolist(), strict=True)
            if port >= 0
        ]
        out.extend((port, frame) for _, port, frame in result.extra)
    return len(frames)


def has_block_path(balancer: Balancer) -> bool:
    return callable(getattr(balancer, "receive_block", None))


def ensure_block_tables(balancer: Balancer) -> bool:
    """Run the block path once, on an empty block (it makes its views of the table)."""
    if not has_block_path(balancer):
        return False
    empty = np.zeros(0, dtype=np.int64)
    balancer.receive_block(np.zeros(16, dtype=np.uint8), empty, empty, empty.astype(np.int32), NOW)  # type: ignore[attr-defined]
    return True


# -- sections ------------------------------------------------------------------------------------------------------
def section_claim(world: World) -> list[Row]:
    plan, b = world.plan, world.balancer
    rows: list[Row] = []
    k, kn = plan.frames, plan.new_frames
    cases = (
        ("TCP 64 B", IPPROTO_TCP, 64, world.tcp),
        ("UDP 64 B", IPPROTO_UDP, 64, world.udp),
        ("UDP 1500 B", IPPROTO_UDP, 1500, world.udp),
    )
    for name, proto, size, flows in cases:
        labelled = build(world.live(flows, k), proto=proto, size=size, labelled=True)
        if proto == IPPROTO_TCP:
            existing = build(world.live(flows, k), flags=ACK, payload=b"", size=size)  # a pure ACK, padded
            first = {"flags": SYN}
        else:
            existing = build(world.live(flows, k), proto=proto, size=size)
            first = {}
        batches = [build(world.fresh(kn), proto=proto, size=size, **first) for _ in range(plan.repeats + 1)]
        it = iter(batches)
        before = len(b.sessions)
        timings = time_interleaved(
            {
                "fast": lambda f=labelled: feed(b, f),
                "existing": lambda f=existing: feed(b, f),
                "new": lambda it=it: feed(b, next(it)),
            },
            repeats=plan.repeats,
            budget_s=plan.budget_s * 2,
        )
        fast, old, new = timings["fast"], timings["existing"], timings["new"]
        cmd = command_for("claim")
        note = (
            f"frames of random live sessions ({len(flows):,} {name.split()[0]} sessions); new sessions from fresh "
            f"flows (the table grew {before:,} -> {len(b.sessions):,}); the three measured in turns"
        )
        row = Row(
            "claim",
            f"claim: {name} label-switched frame",
            fast.median_ns,
            "ns/frame",
            "new session's frame",
            new.median_ns,
            target="ratio <= 0.1 (>= 10x cheaper)",
            note=note,
            command=cmd,
            extra={"fast": fast.runs_ns, "new": new.runs_ns, "cheaper_x": new.median_ns / fast.median_ns},
        )
        rows.append(at_most(row, fast.median_ns / new.median_ns, 0.1))
        rows.append(
            Row(
                "claim",
                f"claim: {name} existing session's unlabelled frame",
                old.median_ns,
                "ns/frame",
                "new session's frame",
                new.median_ns,
                note="analysed L3-L7 and looked up by flow key, label attached; no target of its own",
                command=cmd,
                extra={"existing": old.runs_ns, "vs_fast": old.median_ns / fast.median_ns},
            )
        )
    return rows


def section_single(world: World) -> list[Row]:
    plan, b = world.plan, world.balancer
    rows: list[Row] = []
    reference = minimal_switch(b)
    for size in (64, 1500):
        frames = build(world.live(world.tcp, plan.frames), size=size, labelled=True)
        timings = time_interleaved(
            {"ours": lambda f=frames: feed(b, f), "floor": lambda f=frames: reference(f)},
            repeats=plan.repeats,
            budget_s=plan.budget_s,
        )
        ours, floor = timings["ours"], timings["floor"]
        row = Row(
            "single",
            f"one-frame fast path, {size} B (receive)",
            ours.per_second,
            "frames/s",
            "minimal Python switch (floor)",
            floor.per_second,
            target=">= 1,000,000 frames/s",
            note=f"frames of {len(world.tcp):,} live TCP sessions at random ({len(b.sessions):,} in the table); "
            f"{ours.median_ns:.0f} ns/frame vs {floor.median_ns:.0f}",
            command=command_for("single"),
            extra={"ns": ours.runs_ns, "floor_ns": floor.runs_ns},
        )
        rows.append(at_least(row, ours.per_second, 1e6))
        world.single[size] = ours
        native, python = switch_alone(b, scalar.switch_frame), switch_alone(b, scalar.switch_frame_py)
        alone = time_interleaved(
            {"in use": lambda f=frames, run=native: run(f), "python": lambda f=frames, run=python: run(f)},
            repeats=plan.repeats,
            budget_s=plan.budget_s,
        )
        used, reference_py = alone["in use"], alone["python"]
        rows.append(
            Row(
                "single",
                f"one-frame switch_frame alone, {size} B ({scalar.FAST_PATH.split()[0]})",
                used.median_ns,
                "ns/frame",
                "the same in Python (switch_frame_py)",
                reference_py.median_ns,
                note=f"the one-frame path in use: {scalar.FAST_PATH}; the same frames and table, in turns; "
                f"{reference_py.median_ns / used.median_ns:.2f}x cheaper",
                command=command_for("single"),
                extra={"ns": used.runs_ns, "python_ns": reference_py.runs_ns, "fast_path": scalar.FAST_PATH},
            )
        )
    return rows


def section_batch(world: World) -> list[Row]:
    """receive_batch and receive_block on the same frames as the one-frame path, all measured in turns."""
    plan, b = world.plan, world.balancer
    rows: list[Row] = []
    count = max(plan.frames, 8192)
    count -= count % 4096
    cmd = command_for("batch")
    for size in (64, 1500):
        frames = build(world.live(world.tcp, count), size=size, labelled=True)
        runs: dict[str, Callable[[], int]] = {"one": lambda f=frames: feed(b, f)}
        setups: dict[str, Callable[[], object]] = {}
        for block in (1024, 4096):
            runs[f"receive_batch x{block}"] = lambda f=frames, n=block: feed_batch(b, f, n)
        blockers: dict[str, BlockRun] = {}
        if not has_block_path(b):
            rows.append(
                skipped("batch", f"batch {size} B: receive_block", "Balancer has no receive_block", command=cmd)
            )
        else:
            for block, ring in ((1024, True), (4096, True), (4096, False)):
                name = f"receive_block x{block} ({'ring layout' if ring else 'packed'})"
                try:
                    runner = BlockRun(b, frames, block, ring=ring)
                    runner.setup()
                    runner.run()  # a first call: the block path is new, a failure is reported, not fatal
                except Exception as exc:
                    rows.append(skipped("batch", f"batch {size} B x{block}: receive_block", repr(exc), command=cmd))
                    continue
                blockers[name] = runner
                runs[name] = runner.run
                setups[name] = runner.setup
            if blockers:
                runs["receive_block x4096, bytes in/out"] = lambda f=frames: block_list_path(b, f, 4096)
        timings = time_interleaved(runs, setups=setups, repeats=plan.repeats, budget_s=plan.budget_s * 2)
        one = timings.pop("one")
        for name, t in timings.items():
            if name.startswith("receive_batch"):
                note = "receive_batch calls the one-frame path per frame"
            elif name in blockers:
                runner = blockers[name]
                taken = runner.switched / max(runner.frames, 1)
                note = f"{taken:.1%} of frames switched in bulk; buffers refreshed untimed between runs"
            else:
                note = "what receive_batch's contract (list of bytes in and out) would cost over the block path"
            note += f"; frames of {len(world.tcp):,} live sessions at random; measured in turns with the one-frame path"
            row = Row(
                "batch",
                f"batch {size} B: {name}",
                t.per_second,
                "frames/s",
                "one-frame path (same frames)",
                one.per_second,
                target=">= 10,000,000 frames/s",
                note=note,
                command=cmd,
                extra={"ns": t.runs_ns, "one_frame_ns": one.runs_ns},
            )
            rows.append(at_least(row, t.per_second, 1e7))
    if has_block_path(b):
        rows.append(reported_row(plan, cmd))
    return rows


REPORTED_SESSIONS = 256


def reported_row(plan: Plan, cmd: str) -> Row:
    """Frames the block path hands back frame by frame: labelled frames of half-open sessions (a SYN, no SYN-ACK yet),
    every one of which the fast path reports to the session managing unit. What a client that sends on before its
    server answered, or one that floods its own half-open sessions, costs in a ring block against the one-frame
    path. A balancer of its own, so the shared one keeps its sessions in the steady state."""
    b = Balancer(make_config())
    flows = range(REPORTED_SESSIONS)
    feed(b, build(flows, flags=SYN), 1.0)
    frames = build(np.random.default_rng(5).integers(0, len(flows), 4096), labelled=True, flags=ACK, payload=b"")
    runner = BlockRun(b, frames, 1024)
    timings = time_interleaved(
        {"one": lambda: feed(b, frames), "block": runner.run},
        setups={"block": runner.setup},
        repeats=plan.repeats,
        budget_s=plan.budget_s,
    )
    one, block = timings["one"], timings["block"]
    states = b.sessions.state_counts()
    return at_least(
        Row(
            "batch",
            "reported frames: receive_block x1024",
            block.per_second,
            "frames/s",
            "one-frame path (same frames)",
            one.per_second,
            target="ratio >= 1.0",
            note=f"labelled ACKs of {len(flows)} half-open sessions at random ({states}): each switched in bulk "
            f"({runner.switched / max(runner.frames, 1):.0%}) and reported, its report handled frame by frame; "
            "measured in turns",
            command=cmd,
            extra={"ns": block.runs_ns, "one_frame_ns": one.runs_ns, "states": states},
        ),
        block.per_second / one.per_second if one.per_second else 0.0,
        1.0,
    )


def section_new(world: World) -> list[Row]:
    plan, b = world.plan, world.balancer
    kn = plan.new_frames * 4
    cmd = command_for("new")
    existing = build(world.live(world.tcp, kn), flags=ACK, payload=b"")
    floor_frames = build(range(PAIRS, PAIRS + kn), flags=SYN)
    batches = [build(world.fresh(kn), flags=SYN) for _ in range(plan.repeats + 1)]
    it = iter(batches)
    # The same SYNs in ring blocks, as the daemon's ring mode hands them to receive_block.
    blocks = iter([[Block.of(frames[s : s + SYN_BLOCK]) for s in range(0, kn, SYN_BLOCK)] for frames in
                   (build(world.fresh(kn), flags=SYN) for _ in range(plan.repeats + 1))])  # fmt: skip
    before = len(b.sessions)
    timings = time_interleaved(
        {
            "new": lambda: feed(b, next(it)),
            "block": lambda: feed_blocks(b, next(blocks)),
            "existing": lambda: feed(b, existing),
            "floor": lambda: minimal_insert(floor_frames),
        },
        repeats=plan.repeats,
        budget_s=plan.budget_s * 2,
    )
    new, old, floor, block = timings["new"], timings["existing"], timings["floor"], timings["block"]
    note = f"TCP SYNs of fresh flows, {before:,} -> {len(b.sessions):,} sessions; round_robin"
    return [
        at_least(
            Row(
                "new",
                "new sessions/s through receive_block",
                block.per_second,
                "sessions/s",
                "new sessions/s through receive (one frame a call)",
                new.per_second,
                target=">= 100,000 sessions/s",
                note=f"blocks of {SYN_BLOCK} SYNs, as a ring block holds them (a run of SYNs is opened at once); "
                + note,
                command=cmd,
                extra={"block_ns": block.runs_ns, "ns": new.runs_ns},
            ),
            block.per_second,
            1e5,
        ),
        at_least(
            Row(
                "new",
                "new sessions/s",
                new.per_second,
                "sessions/s",
                "existing-session frames/s (slow path)",
                old.per_second,
                target=">= 100,000 sessions/s",
                note=note,
                command=cmd,
                extra={"ns": new.runs_ns, "existing_ns": old.runs_ns},
            ),
            new.per_second,
            1e5,
        ),
        at_least(
            Row(
                "new",
                "new sessions/s",
                new.per_second,
                "sessions/s",
                "minimal Python insert (floor)",
                floor.per_second,
                target=">= 100,000 sessions/s",
                note="the floor is what any pure-Python session table costs at least",
                command=cmd,
                extra={"floor_ns": floor.runs_ns},
            ),
            new.per_second,
            1e5,
        ),
    ]


def section_scale(plan: Plan, seed: int = 11) -> list[Row]:
    """One fresh balancer, filled level by level. At each level the one-frame fast path (and the block path, when
    src has it) over random sessions among all those live, measured in turns with the same path over random
    sessions among the first 1,000 only: the reference is the cost at 1,000 sessions, taken on the same table at
    the same moment, so the machine's drift stays out of the ratio (the arrays are preallocated: what a frame
    costs depends on how many sessions the frames spread over, not on how full the table is). Beside them, with no
    target: ``switch_frame`` alone on the same frames (where the one-frame path's growth lies), the rows alone
    (``count_rows`` over the block path's labels) and one row read after another (``bench/row_latency.c``): the
    floors under the paths' ratios."""
    rng = np.random.default_rng(seed)
    b = Balancer(make_config())
    rows: list[Row] = []
    opened = 0
    small = plan.scale_levels[0]
    block_count = 8 * 4096 if not plan.quick else 4096
    alone = switch_alone(b, scalar.switch_frame)
    latency = RowLatency.build()
    if isinstance(latency, str):
        rows.append(skipped("scale", "scale: one row after another", latency, command=command_for("scale")))
    for level in plan.scale_levels:
        t0 = time.perf_counter()
        open_sessions(b, range(opened, level))
        opened = level
        fill_s = time.perf_counter() - t0
        gc.collect()
        space = " (all labels)" if level == PAIRS else ""
        spread = build(rng.integers(0, level, plan.frames), labelled=True)
        few = build(rng.integers(0, small, plan.frames), labelled=True)
        runs: dict[str, Callable[[], int]] = {
            "one": lambda f=spread: feed(b, f),
            "one_ref": lambda f=few: feed(b, f),
            # The same frames through switch_frame alone, without the balancer around it: where the growth lies.
            "alone": lambda f=spread: alone(f),
            "alone_ref": lambda f=few: alone(f),
        }
        # The rows' own cost: count_rows over the labels of block_count frames (a read and write of each one's row, the
        # rows asked for ahead as the block path does, nothing else): what the memory adds from 1,000 sessions to
        # this level when no other work stands between two rows, the floor under the block path's ratio.
        for key, span in (("rows", level), ("rows_ref", small)):
            runs[key] = touch_rows(b, row_labels(rng, span, block_count))
        setups: dict[str, Callable[[], object]] = {}
        blockers: dict[str, BlockRun] = {}
        if has_block_path(b):
            try:
                for key, span in (("block", level), ("block_ref", small)):
                    runner = BlockRun(b, build(rng.integers(0, span, block_count), labelled=True), 4096)
                    runner.setup()
                    runner.run()
                    blockers[key] = runner
                    runs[key] = runner.run
                    setups[key] = runner.setup
            except Exception as exc:
                rows.append(skipped("scale", f"scale: block path at {level:,} sessions", repr(exc)))
                for key in ("block", "block_ref"):
                    runs.pop(key, None)
                    setups.pop(key, None)
                blockers.clear()
        # Three times the repeats of the other sections: a repeat costs some 0.1 s here against the seconds it takes
        # to open a level's sessions, and the ratio is what the target judges, from medians that drift with the VM.
        timings = time_interleaved(runs, setups=setups, repeats=3 * plan.repeats, budget_s=plan.budget_s * 2)
        huge = huge_pages_of(b.switching.rows) >> 20
        paths = {"one": "one-frame path", "alone": "switch_frame alone", "block": "block path", "rows": "rows alone"}
        for key, what in paths.items():
            if key not in timings:
                continue
            t, ref = timings[key], timings[f"{key}_ref"]
            note = (
                f"64 B labelled frames; opening the sessions up to this level took {fill_s:.1f} s; "
                f"{huge} MiB of the label rows on huge pages"
            )
            if key == "block":
                note = "receive_block, blocks of 4096, ring layout; " + note
            elif key == "alone":
                note = f"switch_frame ({scalar.FAST_PATH}) on the table, the same frames, no balancer; " + note
            elif key == "rows":
                note = (
                    "count_rows (C) over the labels of as many frames as the block path's: one read and write of "
                    "each frame's row, asked for ahead, no other work; the memory's own growth, no target; " + note
                )
            row = Row(
                "scale",
                f"scale: {what} at {level:,} sessions{space}",
                t.median_ns,
                "ns/frame",
                f"same path at {small:,} sessions (same table, in turns)",
                ref.median_ns,
                target="ratio <= 1.25 (flat, O(1))" if key in ("one", "block") else "-",
                note=note,
                command=command_for("scale"),
                extra={"ns": t.runs_ns, "ref_ns": ref.runs_ns, "sessions": len(b.sessions), "rows_huge_mib": huge},
            )
            rows.append(at_most(row, t.median_ns / ref.median_ns, 1.25) if key in ("one", "block") else row)
        if not isinstance(latency, str):
            rows.append(latency.row(level, small, space, plan.repeats))
    if not isinstance(latency, str):
        latency.remove()
    return rows


@dataclass(frozen=True)
class RowLatency:
    """``bench/row_latency.c``, built for this run: rows of ROW_SIZE octets read one after another, each read's
    address taken from the row before it, so no two are under way at once."""

    program: Path

    @classmethod
    def build(cls) -> RowLatency | str:
        """The program compiled into a fresh directory, or why it could not be."""
        source = Path(__file__).with_name("row_latency.c")
        program = Path(tempfile.mkdtemp(prefix="mplslb-row-latency-")) / "row_latency"
        try:
            subprocess.run(["cc", "-O2", "-o", str(program), str(source)], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"no C compiler to build {source.name}: {exc!r}"
        return cls(program)

    def remove(self) -> None:
        shutil.rmtree(self.program.parent, ignore_errors=True)

    def ns_per_read(self, rows: int, seed: int) -> float:
        done = subprocess.run(
            [str(self.program), str(rows), str(READS), str(seed)], check=True, capture_output=True, timeout=120
        )
        return float(json.loads(done.stdout)["ns_per_read"])

    def row(self, level: int, small: int, space: str, repeats: int) -> Row:
        """The reads over as many rows as the labels of ``level`` sessions (two a session), in turns with the same
        over ``small`` sessions' rows."""
        runs: dict[int, list[float]] = {level: [], small: []}
        for round_ in range(repeats):
            for sessions in (level, small) if round_ % 2 == 0 else (small, level):
                runs[sessions].append(self.ns_per_read(2 * sessions, seed=round_ + 1))
        figure, reference = float(np.median(runs[level])), float(np.median(runs[small]))
        return Row(
            "scale",
            f"scale: one row after another at {level:,} sessions{space}",
            figure,
            "ns/read",
            f"same at {small:,} sessions (in turns)",
            reference,
            target="none: the floor under the one-frame path's ratio",
            note=(
                f"bench/row_latency.c: {READS:,} dependent reads of 128-octet rows in one random cycle through "
                f"{2 * level:,} rows (the span of {level:,} sessions' labels), on huge pages where granted: what a "
                "frame's row costs when no other row is under way, as for a frame the one-frame path takes alone"
            ),
            command=command_for("scale"),
            extra={"ns": runs[level], "ref_ns": runs[small]},
        )


def row_labels(rng: np.random.Generator, span: int, n: int) -> np.ndarray:
    """The C2S labels of ``n`` flows drawn at random among the first ``span``."""
    return np.array([c2s_of_flow(int(f)) for f in rng.integers(0, span, n)], dtype=np.int64)


def touch_rows(balancer: Balancer, labels: np.ndarray) -> Callable[[], int]:
    """A run that counts one 64-octet frame at each label, in one call of ``count_rows``."""
    lengths = np.full(len(labels), 64, dtype=np.int64)

    def run() -> int:
        count_rows(balancer.switching, labels, lengths, NOW)
        return len(labels)

    return run


# -- memory ----------------------------------------------------------------------------------------------------------
def memory_child(kind: str, n: int) -> dict[str, Any]:
    """Run in a fresh interpreter: RSS before and after building ``n`` sessions (``mplslb``) or ``n`` entries of a
    plain dict-of-tuples session table (``dict``)."""
    gc.collect()
    if kind == "dict":
        before = rss_bytes()
        table: dict[tuple[int, bytes, int, bytes, int], tuple[int, int, int]] = {}
        vip = bytes((10, 0, 0, 100))
        for i in range(n):  # each key holds its own source address object, as a parsed frame gives
            table[(6, (0x0A400000 + i).to_bytes(4, "big"), 1024 + i % 64000, vip, 80)] = (17 + 2 * i, i % 4, i % 2)
        gc.collect()
        after = rss_bytes()
        return {"kind": kind, "entries": len(table), "rss_before": before, "rss_after": after}
    start = rss_bytes()
    b = Balancer(make_config(half_open_share=1.0))  # SYNs only: every pair in use, none refused as half-open
    if kind == "mplslb-block":
        ensure_block_tables(b)
    with_tables = rss_bytes()
    chunk = 16384
    for s in range(0, n, chunk):
        frames = build(range(s, min(s + chunk, n)), flags=SYN)
        feed(b, frames, 1.0)
        del frames
    gc.collect()
    after = rss_bytes()
    return {
        "kind": kind,
        "sessions": len(b.sessions),
        "labels_free": b.labels.free_count,
        "rss_start": start,
        "rss_tables": with_tables,
        "rss_after": after,
    }


def run_memory_child(kind: str, n: int, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(BENCH / "engine.py"), "--memory-child", kind, "--sessions", str(n)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def nominal_table_bytes() -> int:
    """The preallocated arrays' nominal size: switching (per label), label manager and session table (per pair),
    and the session table's key index (two slots per pair, rounded up to a power of two)."""
    per_label = ROW_SIZE  # the row (the generation included)
    per_pair = 4 + 4 + 8 + 1  # free ring, quarantine ring (label, release), state
    # session rows: 6 one-byte fields, client port and server (4 each), 4 times, key index home, key (40), MAC (6)
    per_session_row = 6 + 4 + 4 + 4 * 8 + 4 + 40 + 6
    index_slots = 1 << (2 * PAIRS - 1).bit_length()
    return LABEL_SPACE * per_label + PAIRS * (per_pair + per_session_row) + 4 * index_slots


def section_memory(plan: Plan) -> list[Row]:
    n = plan.memory_sessions
    ours = run_memory_child("mplslb", n, timeout=240)
    ref = run_memory_child("dict", n, timeout=120)
    block = run_memory_child("mplslb-block", n, timeout=300) if has_block_path(Balancer(make_config())) else None
    sessions = ours["sessions"]
    added = (ours["rss_after"] - ours["rss_tables"]) / sessions
    total = ours["rss_after"] / sessions
    fixed = ours["rss_tables"] - ours["rss_start"]
    dict_per = (ref["rss_after"] - ref["rss_before"]) / ref["entries"]
    cmd = command_for("memory")
    space = "" if sessions == PAIRS else f" ({sessions:,} sessions, quick)"
    rows = [
        at_most(
            Row(
                "memory",
                f"memory: added RSS per session{space}",
                added,
                "bytes/session",
                "IPVS 128 B/connection (documented)",
                IPVS_BYTES_PER_CONNECTION,
                target="<= 64 bytes/session",
                note="RSS after opening / before, fresh process; a session is rows of preallocated tables (its session "
                "row, its two labels' rows), no Python object of its own",
                command=cmd,
                extra=ours,
            ),
            added,
            64,
        ),
        Row(
            "memory",
            f"memory: added RSS per session{space}",
            added,
            "bytes/session",
            "dict-of-tuples table (measured)",
            dict_per,
            target="<= 64 bytes/session",
            met=added <= 64,
            gap=None if added <= 64 else added / 64,
            note="the reference: {(proto, src, sport, dst, dport): (label, server, port)} for as many sessions",
            command=cmd,
            extra=ref,
        ),
    ]
    if block is not None:
        block_added = (block["rss_after"] - block["rss_tables"]) / block["sessions"]
        rows.append(
            at_most(
                Row(
                    "memory",
                    f"memory: added RSS per session, block path in use{space}",
                    block_added,
                    "bytes/session",
                    "IPVS 128 B/connection (documented)",
                    IPVS_BYTES_PER_CONNECTION,
                    target="<= 64 bytes/session",
                    note="receive_block run once before the sessions open: it reads the table's rows, and keeps "
                    "nothing per label of its own",
                    command=cmd,
                    extra=block,
                ),
                block_added,
                64,
            )
        )
    rows += [
        Row(
            "memory",
            f"memory: total RSS / sessions{space}",
            total,
            "bytes/session",
            "IPVS 128 B/connection (documented)",
            IPVS_BYTES_PER_CONNECTION,
            note="the whole process (interpreter, numpy, preallocated tables) divided by the sessions; scalar path",
            command=cmd,
        ),
        Row(
            "memory",
            "memory: preallocated tables (fixed)",
            fixed / 2**20,
            "MiB",
            "nominal size of the arrays",
            nominal_table_bytes() / 2**20,
            note="RSS of Balancer() over an empty process; bytearrays are calloc'd, so their pages count only once "
            "a label is installed (and then as 'added')",
            command=cmd,
        ),
    ]
    return rows


# -- entry points ------------------------------------------------------------------------------------------------------
SECTIONS = ("claim", "single", "new", "batch", "scale", "memory")


def run_sections(
    sections: tuple[str, ...], quick: bool, log: Callable[[str], None] = print
) -> tuple[list[Row], dict[str, float]]:
    """Run the chosen sections in order; returns rows and seconds per section."""
    plan = Plan.make(quick)
    rows: list[Row] = []
    durations: dict[str, float] = {}
    world: World | None = None
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        log(f"engine: {name} ...")
        if name in ("claim", "single", "new", "batch"):
            if world is None:
                world = World(plan)
                log(f"engine: {plan.sessions:,} TCP + {plan.udp_sessions:,} UDP sessions in {world.setup_s:.1f} s")
            rows += {"claim": section_claim, "single": section_single, "batch": section_batch, "new": section_new}[
                name
            ](world)
        elif name == "scale":
            if world is not None:
                world = None  # free the shared balancer before filling another one
                gc.collect()
            rows += section_scale(plan)
        elif name == "memory":
            rows += section_memory(plan)
        durations[name] = time.perf_counter() - t0
    return rows, durations


def hot_loop(work: Callable[[], object], seconds: float) -> None:
    """Repeat ``work`` for ``seconds``: the frames py-spy's summary counts (set-up happens outside it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        work()


def profile_loop(target: str, seconds: float) -> None:
    """The workload py-spy samples (``--profile-target``) for ``seconds``: the one-frame fast path (``single``), new
    sessions (``new``) or the block fast path (``block``), on a
    balancer with 10,000 live sessions."""
    plan = Plan.make(True)
    b = Balancer(make_config())
    open_sessions(b, range(0, plan.sessions))
    rng = np.random.default_rng(3)
    if target == "single":
        frames = build(rng.integers(0, plan.sessions, 20_000), labelled=True)
        hot_loop(lambda: feed(b, frames), seconds)
    elif target == "block":
        runner = BlockRun(b, build(rng.integers(0, plan.sessions, 4 * 4096), labelled=True), 4096)
        runner.setup()
        runner.run()  # the first call makes the block path's views of the table: not the steady state
        runner.setup()

        def blocks() -> None:
            runner.run()
            runner.setup()  # the copies are counted too: small next to the switching (see the summary)

        hot_loop(blocks, seconds)
    else:
        # Fresh flows for the whole run, built before it starts (about 120k sessions a second at most; beyond them,
        # or the labels, the loop would spin on nothing).
        flows = int(min(PAIRS - plan.sessions - 1, seconds * 150_000))
        batches = [build(range(s, min(s + 5_000, plan.sessions + flows)), flags=SYN)
                   for s in range(plan.sessions, plan.sessions + flows, 5_000)]  # fmt: skip
        it = iter(batches)
        hot_loop(lambda: feed(b, next(it, [])), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small tables, few repetitions")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--memory-child", choices=("mplslb", "mplslb-block", "dict"), help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=PAIRS, help=argparse.SUPPRESS)
    parser.add_argument("--profile-target", choices=("single", "new", "block"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help="keep the world's tables in a state store there (mplslb.state)")
    args = parser.parse_args(argv)
    global STATE_DIR
    STATE_DIR = args.state_dir
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.sessions)))
        return 0
    if args.profile_target:
        profile_loop(args.profile_target, args.seconds)
        return 0
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    rows, durations = run_sections(sections, args.quick, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps({"rows": [r.as_dict() for r in rows], "durations": durations}, indent=1))
    else:
        for r in rows:
            ratio = f"{r.ratio:.3g}" if r.ratio is not None else "-"
            print(f"{r.benchmark}: {r.figure} {r.unit} | {r.reference}: {r.reference_figure} | ratio {ratio} | {r.met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
