"""The daemon's own CPU per ``Connection: close`` session when the kernel takes everything it can (the XDP offload
with ``offload_syn``): what is left of a session for Python, phase by phase, against the same sessions with every
SYN up to the daemon (the offload without ``offload_syn``), in the same run.

Two namespaces of their own, each with the standard four ports on veths (root, clang), each with the daemon's wrapper
(:class:`~mplslb.offload.driver.OffloadedBalancer`) and L7 analysis, as the lab's balancer runs: one with tickets,
one without. Each round runs ``--batch`` whole sessions through the real XDP program with ``BPF_PROG_TEST_RUN``
(not timed: the kernel's part): the SYN, the SYN-ACK, the client's ACK, a request, the response, both FINs and the
last ACK. The daemon does what its loop does for them, each phase timed in thread CPU time:

* ``start``, every :data:`CHUNK` sessions: with tickets, the SYNs the program took become sessions
  (:meth:`TicketDesk.fold`); without, the daemon's slow path takes the SYNs
  (:meth:`OffloadedBalancer.receive_batch`: analysis, admission, a server, labels, the frame for the server, which is
  not sent here: the real daemon's ``send()`` costs more, the server namespace's handshake running in it);
* ``sync``: labels written to or deleted from the kernel; with tickets, tickets issued for the taken ones
  (:meth:`XdpOffload.sync`, :meth:`TicketDesk.refill`);
* ``poll``, once a batch: the kernel's measurement records, FINs and counters reach the table (the daemon's
  :meth:`OffloadedBalancer._poll`, then its steps, each a turn of its loop, until the records and FINs are all handed
  over); ``poll_hold_ms`` is the longest the loop is held by one of them;
* ``finish``, once a batch: the timers once the sessions' close linger is over: each is closed and its labels
  withdrawn (:meth:`Balancer.on_timer`; the clock is moved past the linger, the kernel's times with it).

Besides, once a round: ``idle_fold_us``, a fold that finds nothing taken (what the daemon's loop pays before every
batch of frames, sync and timer run between SYNs), CPU µs per call over :data:`IDLE_FOLDS` calls.

A batch (3,000 by default) is what one of the lab daemon's polls, once a second, finds under wrk. The figures are
medians over the rounds (the two daemons in turn within each round) of CPU µs per session; the end-to-end run
(``bench/e2e.py --close --variant kernel+xdp+syn``) gives the daemon's CPU per session under wrk, where its loop's
other work (reading frames, status) and the machine's other processes count too.

Run ``PYTHONPATH=<checkout>/src python bench/close_session.py [--batch N] [--rounds R] [--chunk C] [--json]
[--profile] [--prealloc] [--map-calls]`` (``--chunk``: sessions between two folds, :data:`CHUNK` by default;
``--profile``: cProfile over the timed phases of the daemon with tickets; ``--prealloc``: both daemons with the label
and flow maps preallocated, ``offload_prealloc``; ``--map-calls``: each map command's calls, elements and CPU time in
the command, both daemons and every round together).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from pyroute2 import IPRoute, netns

from common import Row, at_most, command_for, skipped
from frames import CLIENT_PORTS, SERVER_PORTS, VIP, make_config, port_mac, router_mac
from mplslb.balancer import Balancer
from mplslb.drivers.loop import Loop
from mplslb.drivers.netns import entered
from mplslb.offload import bpf
from mplslb.offload.driver import OffloadedBalancer
from mplslb.wire.ethernet import ETH_HLEN, ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import build_tcp

PHASES = ("start", "poll", "finish", "sync")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
#: Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
SYN_OPTIONS = bytes([2, 4, 5, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
PORTS = (*CLIENT_PORTS, *SERVER_PORTS)
#: Sessions between two polls: what the lab daemon's poll, once a second, finds at about 3,000 sessions a second.
BATCH = 3000
#: Sessions between two folds and syncs: what the daemon's 5 ms sync timer finds at about 3,000 sessions a second.
CHUNK = 16
#: Folds that find nothing, timed once a round.
IDLE_FOLDS = 1000


@contextlib.contextmanager
def namespaces(suffix: str = "") -> Iterator[str]:
    """A namespace with the ports p0..p3 (the bench configuration's MACs), each a veth whose peer is in a second
    namespace; both removed on the way out. Yields the first's name."""
    tag = f"mlbcs{os.getpid() % 100000}{suffix}"
    lb, peer = f"{tag}l", f"{tag}e"
    created: list[str] = []
    try:
        for name in (lb, peer):
            netns.create(name)
            created.append(name)
        with entered(lb), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": f"e{i}", "net_ns_fd": peer})
                mac = ":".join(f"{b:02x}" for b in port_mac(i))
                ipr.link("set", index=ipr.link_lookup(ifname=f"p{i}")[0], address=mac, state="up")
        with entered(peer), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("set", index=ipr.link_lookup(ifname=f"e{i}")[0], state="up")
        yield lb
    finally:
        for name in reversed(created):
            if name in netns.listnetns():
                netns.remove(name)


class Flow(NamedTuple):
    """One session's client: its address, source port, port and router MAC."""

    client: bytes
    sport: int
    port: int
    mac: bytes

    def frame(self, flags: int, payload: bytes = b"", label: int = 0, options: bytes = b"") -> bytes:
        """The client's segment with ``flags`` (the SYN unlabelled, the rest under C2S ``label``)."""
        seq = 1000 + (1 if flags != SYN else 0) + (len(REQUEST) if flags & FIN else 0)
        segment = build_tcp(self.client, VIP, self.sport, 80, seq=seq, ack=5001 if flags != SYN else 0, flags=flags,
                            options=options, payload=payload)  # fmt: skip
        packet = build_ipv4(self.client, VIP, IPPROTO_TCP, len(segment)) + segment
        if not label:
            return build_ethernet(port_mac(self.port), self.mac, ETH_P_IP) + packet
        return build_ethernet(port_mac(self.port), self.mac, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet


class Bench:
    """One daemon wrapper, with tickets or without (every SYN then up to the daemon), on a clock that the
    ``finish`` phase moves past the close linger."""

    def __init__(self, lb: str, *, tickets: bool = True, prealloc: bool = False) -> None:
        config = make_config()
        config = replace(config, ports=tuple(replace(p, interface=f"p{p.port_id}") for p in config.ports))
        self.lb = lb
        self.tickets = tickets
        self.skew = 0.0
        self.loop = Loop(clock=lambda: time.monotonic() + self.skew)
        self.balancer = Balancer(config)
        with entered(lb):
            self.core = OffloadedBalancer(self.balancer, self.loop, tickets=tickets, prealloc=prealloc)
        self.linger = self.balancer.sessions.timeouts.closed_linger
        self.flows = 0
        self.profiler: cProfile.Profile | None = None  # the timed phases only

    def close(self) -> None:
        self.core.close()

    def _run(self, frame: bytes, port: int) -> bpf.TestRun:
        with entered(self.lb):  # a test run's ingress interface is looked up in the caller's namespace
            return self.core.offload.run(frame, port)

    def _flow(self) -> Flow:
        self.flows += 1
        n = self.flows
        port = CLIENT_PORTS[n % len(CLIENT_PORTS)]
        return Flow(bytes((10, 64, (n >> 8) & 0xFF, n & 0xFF)), 1024 + n % 60000, port, router_mac(port))

    def rest(self, flow: Flow, c2s: int) -> None:
        """The session of ``flow`` on label pair ``c2s`` after its SYN, through the program: the SYN-ACK, the
        client's ACK, the request, the response, both FINs and the last ACK."""
        for frame, in_port in self.frames(flow, c2s):
            self._run(frame, in_port)

    def frames(self, flow: Flow, c2s: int) -> list[tuple[bytes, int]]:
        """The frames :meth:`rest` runs, each with its ingress port."""
        session = self.balancer.sessions.by_c2s(c2s)
        server = session.server if session is not None else self.core.desk.outstanding[c2s] if self.core.desk else None
        assert server is not None and server.mac
        out = server.config.port_id

        def from_server(flags: int, payload: bytes = b"") -> bytes:
            seq = 5000 + (1 if flags != SYN | ACK else 0) + (len(RESPONSE) if flags & FIN else 0)
            ack = 1001 + (len(REQUEST) if flags != SYN | ACK else 0) + (1 if flags & FIN else 0)
            segment = build_tcp(VIP, flow.client, 80, flow.sport, seq=seq, ack=ack, flags=flags, payload=payload)
            packet = build_ipv4(VIP, flow.client, IPPROTO_TCP, len(segment)) + segment
            return build_ethernet(port_mac(out), server.mac, ETH_P_MPLS_UC) + pack_entry(c2s + 1, 0, True, 64) + packet

        return [
            (from_server(SYN | ACK), out),
            (flow.frame(ACK, label=c2s), flow.port),
            (flow.frame(ACK | PSH, REQUEST, label=c2s), flow.port),
            (from_server(ACK | PSH, RESPONSE), out),
            (from_server(FIN | ACK), out),
            (flow.frame(FIN | ACK, label=c2s), flow.port),
            (from_server(ACK), out),
        ]

    def round(self, batch: int) -> tuple[int, dict[str, float], float, float]:
        """``batch`` sessions through the kernel and the daemon: (sessions run, CPU seconds per phase). Every
        :data:`CHUNK` sessions, as at the daemon's sync timer: their SYNs (taken in the kernel, or read by the daemon
        without tickets), the ``start`` phase (the fold of the taken tickets, or the daemon's slow path for the SYNs,
        each followed by its sync), the rest of their frames; one poll and one timer run follow the batch. The third
        value is the longest the poll held the loop at once, in CPU seconds; the fourth the CPU seconds of a fold
        that finds nothing taken."""
        spent = dict.fromkeys(PHASES, 0.0)
        core = self.core
        ran = 0
        hold = 0.0

        def timed(name: str, phase: Callable[[float], Any]) -> Any:
            if self.profiler:
                self.profiler.enable()
            nonlocal hold
            started = time.thread_time()
            result = phase(self.loop.clock())  # the maps and the program are reached by their descriptors
            took = time.thread_time() - started
            spent[name] += took
            if name == "poll":
                hold = max(hold, took)
            if self.profiler:
                self.profiler.disable()
            return result

        for first in range(0, batch, CHUNK):
            flows = [self._flow() for _ in range(min(CHUNK, batch - first))]
            syns = [(flow.port, flow.frame(SYN, options=SYN_OPTIONS)) for flow in flows]
            if self.tickets:
                c2s = []
                for port, frame in syns:
                    taken = self._run(frame, port)
                    c2s.append(_label(taken.data) if taken.retval == bpf.XDP_REDIRECT else 0)
                timed("start", core._fold_tickets)
            else:
                sent = timed("start", functools.partial(core.receive_batch, syns))
                c2s = [_label(frame) for _, frame in sent]
            timed("sync", core._sync)
            for flow, label in zip(flows, c2s, strict=True):
                if label:
                    self.rest(flow, label)
                    ran += 1
        timed("poll", core._poll)
        while core.polling:
            timed("poll", lambda _: core.poll_step())
        self.skew += self.linger + 0.01
        timed("finish", self.balancer.on_timer)
        while (due := self.balancer.sessions.next_deadline()) is not None and due <= self.loop.clock():
            timed("finish", self.balancer.on_timer)  # more ended than one timer run takes (TIMER_SESSIONS)
        timed("sync", core._sync)
        started = time.thread_time()
        for _ in range(IDLE_FOLDS):
            core._fold_tickets(self.loop.clock())
        idle = (time.thread_time() - started) / IDLE_FOLDS
        return ran, spent, hold, idle


def _label(frame: bytes) -> int:
    """The label of a frame that left for a server (one label stack entry after the Ethernet header)."""
    return int.from_bytes(frame[ETH_HLEN : ETH_HLEN + 3], "big") >> 4


def _figures(per_round: list[dict[str, float]]) -> dict[str, Any]:
    figures: dict[str, Any] = {k: round(statistics.median(r[k] for r in per_round), 1) for k in PHASES}
    figures["total"] = round(statistics.median(sum(r[k] for k in PHASES) for r in per_round), 1)
    figures["sessions"] = int(sum(r["sessions"] for r in per_round))
    figures["poll_hold_ms"] = round(statistics.median(r["poll_hold_ms"] for r in per_round), 1)
    figures["idle_fold_us"] = round(statistics.median(r["idle_fold_us"] for r in per_round), 2)
    return figures


#: The map commands :func:`map_calls` counts: the class, and each method with where its element count is (the
#: positional argument's index; None: one element a call).
MAP_COMMANDS: dict[type, dict[str, int | None]] = {
    bpf.Map: {"update_batch": 2, "delete_batch": 1, "lookup_batch": None, "lookup": None, "update": None,
              "delete": None},
    bpf.Queue: {"push": None, "pop": None, "take_all": None},
    bpf.RingBuffer: {"take_all": None},
}  # fmt: skip


@contextlib.contextmanager
def map_calls() -> Iterator[dict[tuple[str, str], list[float]]]:
    """Count every map command made meanwhile (``MAP_COMMANDS``): (map name, command) -> [calls, elements, thread
    CPU seconds in the command]."""
    counted: dict[tuple[str, str], list[float]] = {}
    saved: list[tuple[type, str, Any]] = []

    def wrapped(kind: type, name: str, at: int | None) -> Callable[..., Any]:
        real = getattr(kind, name)

        @functools.wraps(real)
        def call(self: Any, *args: Any, **kw: Any) -> Any:
            t = time.thread_time()
            try:
                return real(self, *args, **kw)
            finally:
                spent = time.thread_time() - t
                figure = counted.setdefault((self.name, name), [0, 0, 0.0])
                figure[0] += 1
                figure[1] += args[at] if at is not None and len(args) > at else 1
                figure[2] += spent

        return call

    for kind, commands in MAP_COMMANDS.items():
        for name, at in commands.items():
            saved.append((kind, name, getattr(kind, name)))
            setattr(kind, name, wrapped(kind, name, at))
    try:
        yield counted
    finally:
        for kind, name, real in saved:
            setattr(kind, name, real)


def measure(batch: int, rounds: int, *, profile: Path | None = None, prealloc: bool = False) -> dict[str, Any]:
    """Medians over ``rounds`` of CPU µs per session in each phase and in all, with tickets (``offload_syn``) and,
    in turn within each round, without (each SYN up to the daemon's slow path), after one warm-up round each;
    ``prealloc``: both with the label and flow maps preallocated."""
    with namespaces("t") as lb_tickets, namespaces("s") as lb_slow:
        benches = {"offload_syn": Bench(lb_tickets, prealloc=prealloc),
                   "syn_up": Bench(lb_slow, tickets=False, prealloc=prealloc)}  # fmt: skip
        try:
            per_round: dict[str, list[dict[str, float]]] = {key: [] for key in benches}
            for bench in benches.values():
                bench.round(batch)
            profiler = benches["offload_syn"].profiler = cProfile.Profile() if profile else None
            for _ in range(rounds):
                for key, bench in benches.items():
                    ran, spent, hold, idle = bench.round(batch)
                    per_round[key].append(
                        {k: v * 1e6 / max(ran, 1) for k, v in spent.items()}
                        | {"sessions": ran, "poll_hold_ms": hold * 1e3, "idle_fold_us": idle * 1e6}
                    )
            figures: dict[str, Any] = {key: _figures(runs) for key, runs in per_round.items()}
            desk = benches["offload_syn"].core.desk
            figures |= {
                "batch": batch,
                "rounds": rounds,
                "ended": {key: dict(bench.balancer.sessions.ended) for key, bench in benches.items()},
                "live_after": {key: len(bench.balancer.sessions) for key, bench in benches.items()},
                "tickets": desk.stats() if desk else {},
                "syn_frames_up": {key: bench.balancer.frames_in for key, bench in benches.items()},
            }
            if profiler and profile:
                profiler.dump_stats(str(profile))
            return figures
        finally:
            for bench in benches.values():
                bench.close()


def rows(quick: bool = False) -> list[Row]:
    """The ``close_session`` section of ``make bench``: the daemon's CPU per session with tickets against the same
    sessions with every SYN up to it, in the same run; then the phases."""
    cmd = command_for("close_session", quick)
    if os.geteuid() != 0 or (shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG")):
        return [skipped("close_session", "daemon CPU per Connection: close session", "needs root and clang",
                        command=cmd)]  # fmt: skip
    figures = measure(BATCH // 3 if quick else BATCH, 2 if quick else 5)
    mine, slow = figures["offload_syn"], figures["syn_up"]
    note = f"L7, {figures['batch']:,} sessions a poll, CPU µs per session, medians of {figures['rounds']} rounds"
    hold = f"; the poll held the loop {mine['poll_hold_ms']} ms at most at once ({slow['poll_hold_ms']} each SYN up)"
    out = [at_most(Row("close_session", "daemon CPU per Connection: close session, offload_syn", mine["total"], "µs",
                       "the same sessions, each SYN up to the daemon", slow["total"], target="ratio <= 1.0",
                       note=note + hold, command=cmd, extra=figures), mine["total"] / slow["total"], 1.0)]  # fmt: skip
    out += [
        Row("close_session", f"  phase {phase}", mine[phase], "µs", "the same phase, each SYN up to the daemon",
            slow[phase], note=note, command=cmd)
        for phase in PHASES
    ]  # fmt: skip
    return out


def main() -> None:
    global CHUNK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sessions per round (default {BATCH})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed rounds; the top functions")
    parser.add_argument("--chunk", type=int, default=CHUNK, help=f"sessions between two folds (default {CHUNK})")
    parser.add_argument(
        "--prealloc", action="store_true", help="both daemons with the label and flow maps preallocated"
    )
    parser.add_argument("--map-calls", action="store_true", help="count each map command (both daemons, all rounds)")
    args = parser.parse_args()
    CHUNK = args.chunk
    where = Path(tempfile.mkdtemp(prefix="mplslb-close-")) / "profile" if args.profile else None
    try:
        with map_calls() if args.map_calls else contextlib.nullcontext({}) as counted:
            figures = measure(args.batch, args.rounds, profile=where, prealloc=args.prealloc)
        if args.json:
            print(json.dumps(figures))
        else:
            print(f"{'µs per session':16} {'offload_syn':>12} {'SYN up':>12}")
            for key in (*PHASES, "total", "poll_hold_ms", "idle_fold_us"):
                print(f"{key:16} {figures['offload_syn'][key]:12.2f} {figures['syn_up'][key]:12.2f}")
            print({k: v for k, v in figures.items() if k not in ("offload_syn", "syn_up")})
        if counted:
            print(f"{'map command':36} {'calls':>8} {'elements':>9} {'ms':>8} {'µs a call':>10} {'µs an element':>14}")
            for (name, command), (calls, elements, spent) in sorted(counted.items(), key=lambda kv: -kv[1][2]):
                print(f"{name + ' ' + command:36} {calls:8.0f} {elements:9.0f} {spent * 1e3:8.1f} "
                      f"{spent / calls * 1e6:10.1f} {spent / max(elements, 1) * 1e6:14.2f}")  # fmt: skip
        if where is not None:
            stats = pstats.Stats(str(where), stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(int(os.environ.get("TOP", "40")))
    finally:
        if where is not None:
            shutil.rmtree(where.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
