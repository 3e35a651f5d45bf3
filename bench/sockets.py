"""A plain packet socket's reads and writes: ``PacketPort`` (``recvmmsg`` / ``sendmmsg`` in bursts) against one
system call per frame in the same run.

A veth pair in a namespace of its own (root). Reading: ``--frames`` 64-byte frames are queued on one end's socket
(a receive buffer large enough to hold them all), then drained in bursts of ``--burst``, timed in CPU time per
frame; the references drain the same frames with one ``recvmsg_into`` each, with the auxiliary data (what the port
did before it used ``recvmmsg``), and with a bare ``recv_into`` (the floor of one system call a frame, no address,
no VLAN tag or checksum status). Writing: the same frames sent with ``send_many`` in bursts of ``--burst``, against
one ``send()`` each. Medians of ``--rounds``, the variants in turn within each round.

Run ``PYTHONPATH=<checkout>/src python bench/sockets.py [--frames N] [--burst B] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable

from pyroute2 import IPRoute, netns

from common import Row, command_for, skipped
from mplslb.drivers.afpacket import PACKET_AUXDATA, TP_STATUS_CSUMNOTREADY, TP_STATUS_VLAN_VALID, PacketPort
from mplslb.drivers.netns import entered
from mplslb.drivers.socket_filter import PACKET_OUTGOING
from mplslb.drivers.txring import SOL_PACKET

AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
AUX_SPACE = socket.CMSG_SPACE(AUXDATA.size)
RCVBUF = 64 << 20  # room for every queued frame (each costs about 4 KiB of it on a veth)


def drain(read: Callable[[], int]) -> int:
    """Call ``read`` until it returns 0; the frames it read."""
    total = 0
    while n := read():
        total += n
    return total


def per_frame_recvmsg(sock: socket.socket, buf: bytearray) -> Callable[[], int]:
    """One ``recvmsg_into`` a frame with its address and auxiliary data, checked and copied out as the port did
    before it used ``recvmmsg``."""
    view = memoryview(buf)
    frames: list[bytes] = []

    def read() -> int:
        try:
            n, ancdata, flags, address = sock.recvmsg_into([buf], AUX_SPACE)
        except BlockingIOError:
            return 0
        if flags & socket.MSG_TRUNC or address[2] == PACKET_OUTGOING:
            return 1
        frame = bytes(view[:n])
        for level, kind, data in ancdata:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
                status, _, _, _, _, _, _ = AUXDATA.unpack_from(data)
                if status & (TP_STATUS_VLAN_VALID | TP_STATUS_CSUMNOTREADY):
                    raise SystemExit("a frame with a VLAN tag or a partial checksum: not this benchmark's")
        frames.append(frame)
        return 1

    return read


def per_frame_recv(sock: socket.socket, buf: bytearray) -> Callable[[], int]:
    """The floor: one bare ``recv_into`` a frame, copied out."""
    view = memoryview(buf)
    frames: list[bytes] = []

    def read() -> int:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return 0
        frames.append(bytes(view[:n]))
        return 1

    return read


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    name = f"mlbsock{os.getpid()}"
    netns.create(name)
    try:
        with entered(name), IPRoute() as ipr:
            for conf in ("all", "default"):  # IPv6 off: the kernel sends nothing of its own on the pair
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            ipr.link("add", ifname="sa", kind="veth", peer="sb")
            for ifname in ("sa", "sb"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        time.sleep(0.5)
        tx, rx = PacketPort("sa", netns=name), PacketPort("sb", netns=name, rcvbuf=RCVBUF)
        try:
            frame = bytes.fromhex("02aa0000000102aa000000028847") + b"\x00\x01\x01\x40" + bytes(46)
            frames = [frame] * args.frames
            sock, buf = rx._sock, bytearray(1 << 16)
            readers: dict[str, Callable[[], int]] = {
                "recv_burst (recvmmsg)": lambda: len(rx.recv_burst(args.burst)),
                "recvmsg_into per frame": per_frame_recvmsg(sock, buf),
                "recv_into per frame (floor)": per_frame_recv(sock, buf),
            }
            writers: dict[str, Callable[[], int]] = {
                "send_many (sendmmsg)": lambda: sum(
                    tx.send_many(frames[i : i + args.burst]) for i in range(0, len(frames), args.burst)
                ),
                "send per frame": lambda: sum(tx.send(f) > 0 for f in frames),
            }
            samples: dict[str, list[float]] = {key: [] for key in [*readers, *writers]}
            for _ in range(args.rounds):
                for key, read in readers.items():
                    tx.send_many(frames)
                    time.sleep(0.2)
                    started = time.process_time()
                    got = drain(read)
                    used = time.process_time() - started
                    if got < args.frames:
                        raise SystemExit(f"{key}: read {got} of {args.frames} frames (the buffer held fewer?)")
                    samples[key].append(used / got * 1e6)
                for key, write in writers.items():
                    started = time.process_time()
                    sent = write()
                    used = time.process_time() - started
                    samples[key].append(used / max(1, sent) * 1e6)
                    time.sleep(0.2)
                    drain(lambda: len(rx.recv_burst(64)))
        finally:
            tx.close()
            rx.close()
    finally:
        netns.remove(name)
    return {key: {"median_us": round(statistics.median(v), 2), "min_us": round(min(v), 2),
                  "max_us": round(max(v), 2)} for key, v in samples.items()}  # fmt: skip


def rows(quick: bool = False) -> list[Row]:
    """The table's rows (bench/run.py's "sockets" section): reading and writing a burst against one system call a
    frame, CPU per frame, both in this run."""
    command = command_for("sockets", quick)
    if os.geteuid() != 0:
        return [skipped("sockets", "plain packet socket, per frame", "needs root (a namespace, a veth pair)",
                        command=command)]  # fmt: skip
    args = argparse.Namespace(frames=1000 if quick else 5000, burst=64, rounds=2 if quick else 5)
    found = measure(args)
    how = f"{args.frames} 64-byte frames on a veth, bursts of {args.burst}, CPU time, median of {args.rounds} rounds"
    return [
        Row("sockets", "plain packet socket: a frame read (recv_burst, recvmmsg)",
            found["recv_burst (recvmmsg)"]["median_us"], "µs CPU", "recvmsg_into a frame, checked (before)",
            found["recvmsg_into per frame"]["median_us"], note=how, command=command),
        Row("sockets", "plain packet socket: a frame sent (send_many, sendmmsg)",
            found["send_many (sendmmsg)"]["median_us"], "µs CPU", "send() a frame",
            found["send per frame"]["median_us"], note=how, command=command),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps({"bench": "sockets", "frames": args.frames, "burst": args.burst, "rounds": args.rounds,
                          "cpu_us_per_frame": result}))  # fmt: skip
        return
    for key, figures in result.items():
        print(
            f"{key:32} {figures['median_us']:6.2f} µs of CPU a frame (min {figures['min_us']}, max {figures['max_us']})"
        )


if __name__ == "__main__":
    main()
