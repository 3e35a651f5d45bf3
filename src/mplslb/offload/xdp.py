"""The kernel offload: the label switching table mirrored into an XDP program's map, so labelled frames of
established sessions are switched by the kernel and never reach Python.

Theory of operation
-------------------
One XDP program (``mplslb_xdp.c``) is attached, through a BPF link, to every Ethernet port of the balancer, and one
hash map (label -> ``struct entry``) holds the labels it may switch. The program makes every check the userspace
fast path makes (ingress port, source MAC, IP source of a bottom-of-stack entry, bottom of stack, the session's
flow, TTL > 1; an IPv6 packet with extension headers under a flow-bound label goes up: the userspace path walks
them); a frame that passes them all and is not a TCP FIN or RST of a TCP session (but a FIN it records, "FINs"
below) leaves with the Ethernet addresses of the label's row, its TTL decremented and an 802.1Q tag dropped, exactly as
:func:`~mplslb.switching.scalar.switch_frame` builds it. The program is built from the same layout as the userspace
paths (:mod:`mplslb.switching.layout`). Everything else is ``XDP_PASS``: the daemon's packet socket gets it and the
userspace path forwards, reports, or drops and counts it as it does without the offload.

What goes into the map (:meth:`XdpOffload.sync`): the offload is a :class:`~mplslb.switching.table.Mirror` of
the table, told of each install, withdrawal and watch change as it happens; it notes the label, and ``sync`` writes
or deletes the noted labels' map entries (batched, ``BPF_MAP_UPDATE_BATCH`` / ``BPF_MAP_DELETE_BATCH``) from what
the table then holds. Labels bound to a port without XDP (an MPLS-in-UDP port) stay in userspace. A label whose
``watch`` bits ask for every frame (``WATCH_ALL``: the session manager is timing the server's first answers from
the session's own frames) is handled one of two ways:

* without a ``measured`` handler it waits in userspace, and enters the map at the first ``sync`` after the balancer
  clears ``WATCH_ALL``: every frame of a new session's first round trips reaches the session manager;
* with one (the daemon's :class:`~mplslb.offload.driver.OffloadedBalancer`), it enters the map at once, flagged
  ``F_RT``, and the program records what the measurement wants in the session's C2S entry (the server's first answer,
  the client's pure ACK, the request, the first response byte, the budget left; ``mplslb_xdp.c`` says how, frame by
  frame as :meth:`~mplslb.sessions.SessionTable.observe`) instead of passing the frames up. The records are read back
  with the counters at every :meth:`poll`, and for one session on demand (:meth:`fold`, one map lookup), and handed to
  ``measured(c2s, answer, ack, request, response, over, copy, length)`` (the arguments of
  :meth:`~mplslb.balancer.Balancer.measured`) with the kernel's times on the table's clock (again at the next read
  while it answers False). The program clears ``F_RT`` itself once a direction has nothing more to tell, so a watch
  cleared in the table needs no map write. With ``WATCH_REQUEST`` (L7 analysis) the C2S entry is flagged ``F_L7`` and
  gets a slot in a second map, the request map (C2S label -> a :data:`~mplslb.switching.layout.REQUEST` slot; a
  preallocated hash map of :data:`REQUEST_SLOTS`, held by the sessions under measurement only): the
  program copies the session's first request's first :data:`~mplslb.switching.layout.REQUEST_COPY` octets and its
  length there before it records the request's time, and forwards the request. The slot is read with the record that
  first carries the request's time and handed to ``measured`` with it (``copy``, beside the request's ``length``),
  then deleted; the balancer reads it with the analyzer that reads a request frame. A label without a slot (the slot's
  write refused) has its request passed up instead, as the session manager then expects.

Activity (:meth:`XdpOffload.poll`): the program counts packets and bytes per entry and stores the time of the last
frame (``bpf_ktime_get_ns``, CLOCK_MONOTONIC, the clock of ``time.monotonic``). ``poll`` reads the whole map with
``BPF_MAP_LOOKUP_BATCH`` and folds what the kernel forwarded since the last poll into the table's counters and
last-seen times (:meth:`~mplslb.switching.table.LabelSwitchingTable.fold_counters`), so idle timeouts,
per-server figures and the status see the kernel's traffic. The daemon polls once a second and before the
balancer's timers run, in turns: :meth:`~XdpOffload.begin_poll` reads the map and folds the counters, and
:meth:`~XdpOffload.poll_step` hands the measurements' records and the FINs over a chunk at a time
(:class:`PollWork`; :meth:`poll` does both in one call).

Acknowledgment numbers: the program records each TCP segment's acknowledgment number in its entry (a FIN's too, and
a measured session's frame's it passes up, before passing it up: userspace forwards it and records the same), as the
userspace paths record it in the table's ``acks``. An entry starts with the table's number (0 for a label
reinstalled since the last sync: the entry still there is the ended session's, never folded back), and what the slow
path sends on a label in the kernel is written through to its entry (:meth:`XdpOffload.record_ack`; a lookup and an
update, racing only with the kernel's own frames of that label, whose counts could be lost then: the slow path sends
on a session's label only when an endpoint fell back to unlabelled frames after a silence). So while a label is in
the kernel its entry holds the last frame's number, whichever path forwarded it: the offload is the table's
:class:`~mplslb.switching.table.AckStore`, and when the session manager judges an RST or FIN that came up it reads
the entry of the label it needs (:meth:`XdpOffload.ack`, one map lookup; a FIN the kernel takes carries that number
in its record, below).
``poll``, and the fold before an entry is written again or deleted, copy the entries' numbers into the table.

FINs (``ended``, the daemon's :meth:`~mplslb.balancer.Balancer.ended`): with an ``ended`` handler a TCP session's
labels enter the map flagged ``F_FIN``, and the program forwards the first FIN (RST clear) under each label instead
of passing it up, recording in the label's entry its sequence number, the other label's last acknowledgment number
as the FIN passed (the number the session manager judges a closing FIN by) and the time. It does so only once
neither entry of the session has ``F_RT`` (the session manager watches none of its frames, so a FIN is judged and
applied, nothing else), and only for a FIN it reads as the analyzer would (one TCP segment, lengths agreeing, IPv4
without options and with a right header checksum, TCP options none or Linux's timestamps); any other FIN, and the
second one under a label (a retransmission, a forger's or the real one after a forged one), goes up as before. The
records are read at every :meth:`poll` and, for one session, by :meth:`fold` (the driver's refresh, before anything
else about the session is decided: a frame of it reaching the daemon, its deadline), and handed to ``ended(label,
seq, ack, at)`` (the FIN's sequence number, ``ACK_KNOWN |`` the last acknowledgment number of the session's other
label as it passed or 0 for none, and its time on the table's clock) in the order the kernel took them, each
session's measurement record first; a session whose record the table has not taken whole (its first request is still
on its way up) keeps its FINs until it has, so nothing is applied before what came before it. A FIN is dated by the
kernel, never before the last read of the whole map. One FIN per label and entry: an entry written again (a
neighbour's new MAC) has its record folded first and starts empty, so a retransmission after it is taken again,
which the session table takes as it would the retransmission coming up. With kept state, an adopted entry's record
is folded at the first poll whether or not the previous daemon had folded it: a FIN applied twice changes nothing
but an ENDING session's linger (started again from it) and, for one not believed, the count. Two CPUs taking FINs
under the same label at the same instant would keep one record.

Attachment: BPF links (``BPF_LINK_CREATE``) hold the program on each interface only as long as the daemon holds
their file descriptors: a daemon that dies, even by SIGKILL, leaves nothing attached, and the map goes with the
program. On :meth:`XdpOffload.open` an XDP program attached the old way (netlink) under our program's name is taken
as a leftover and removed; any other XDP program on a port is an error naming it.

SYN shedding (``syn_rate``, the daemon's ``offload_syn_rate``): an unlabelled TCP SYN without ACK is a new
session's first frame, the most the slow path pays for one frame, and the cheapest for a flood to send. With a rate
set, the program lets at most that many a second through to userspace and drops the rest (``syn_shed``, folded
into the table's drops at each poll). The bucket is per CPU (a ``PERCPU_ARRAY`` of one
:data:`~mplslb.switching.layout.SYN_BUCKET` per CPU), each holding an even share of the rate, rounded up, and as
much burst: a CPU updates only its own, with plain loads and stores, so the XDP path needs no atomic operation, no
lock, and no cache line shared between CPUs in the middle of a flood; the total stays within the rate (plus the
rounding). The cost: SYNs that all arrive on one CPU (one receive queue) get that CPU's share only. Labelled
frames, SYNs with ACK and every other frame never meet the bucket.

Pins (a daemon that keeps its state, :mod:`mplslb.state`): the label map, the SYN map, the request map, the ticket maps,
the program and each link are pinned under ``pins`` (``/sys/fs/bpf/mplslb/<instance>/``, bpffs mounted there if nothing
is), the links last, so the program stays attached and switching while no daemon runs (``close(keep=True)``). The maps'
pins are named after :data:`LAYOUT_FP`, the fingerprint of their entries' layout and flags, so a map written by a build
with another layout is never adopted. The next :meth:`XdpOffload.open` adopts them when the maps' layout, types and
sizes, each link's interface and program all fit (the SYN buckets keep their tokens and counters and take this daemon's
rate); a program built differently is loaded over the kept maps and swapped in on every port at once
(``BPF_LINK_UPDATE``). The map is then reconciled with the table: every entry's counters are taken as counted; an entry
equal to what the table would write stays, its last frame's time folded in; every other label is written or deleted.
With ``fresh``, or pins that do not fit (logged as one ``key=value`` line), everything pinned is removed, which lets the
old program go, and the program is loaded afresh.

Super-packets (``gso``, the daemon's ``offload_gso``): on veth ports GRO and a sender's GSO deliver frames of many
segments in one skb. The XDP program cannot forward one (a redirect checks the output's MTU and drops it) and the
daemon's packet sockets could not send one on. With ``gso`` the object is built with ``-DGSO_FRAME_MAX`` (the
smallest port MTU with the Ethernet header and one label entry, :attr:`XdpOffload.frame_max`): the XDP program
passes longer frames, the daemon's sockets leave them out (:func:`~mplslb.drivers.socket_filter.length_cap`), and a
tc program from the same object, attached to every port's ingress with tcx links, switches the labelled ones with
the same function the XDP program runs and hands them to the output port's veth peer (``bpf_redirect_peer``),
GSO state untouched. What the switch would pass up it drops, counted by reason (:meth:`gso_counters`, folded
into the table's drops at each poll); a FIN it clears first and switches the rest (docs/architecture.md says why).
Every port must be a veth. With ``pins`` the tc program, its counters and its tcx links are pinned and adopted as
the XDP ones are (:meth:`_adopt_gso`).

Tickets (``tickets``, the daemon's ``offload_syn``; :mod:`mplslb.offload.tickets` decides them): an unlabelled TCP SYN
on a client port may be taken by the program under a ticket, a new session decided ahead by the daemon, and sent to its
server as the userspace path sends it. The maps: the ticket queue (``BPF_MAP_TYPE_QUEUE`` of C2S labels;
:meth:`issue_tickets` writes a ticket's two entries, built by :meth:`ticket_entries` with everything that does not
depend on the client and flagged ``F_TICKET``, then pushes its label), the taken ring (what the program did with each
ticket it took: :meth:`take_tickets`, a :class:`Taken` each, whose labels' later install in the table writes nothing,
their entries being the session's already; a ``BPF_MAP_TYPE_RINGBUF`` read in place, without a system call, or a queue
built with ``TAKEN_QUEUE`` on machines whose loads may be reordered, :data:`bpf.ORDERED_LOADS`), the flow map (every
live TCP session's flow -> its C2S label: written and deleted with the label entries of the sessions made in userspace,
inserted by the program for the ones it makes, taken out once the session is ending, :meth:`release_flow`; a SYN of a
flow in it goes up, unless the program saw that session close: both its FINs taken here, the SYN from its client,
``Taken.closed``), the services map ((VIP, TCP port)s, :meth:`set_services`), the client ports
(:meth:`set_client_ports`) and the program's per-CPU counters (:meth:`ticket_counters`). The maps exist whatever the
setting (empty without it: the program never takes a SYN then). A poll leaves alone entries whose labels the table does
not hold (a taken ticket not yet folded): its FINs, measurement and counters are folded once its session is there.
With ``pins`` the ticket maps are pinned and adopted with the others (:mod:`mplslb.offload.tickets` says how the
tickets themselves are handed over).

Modes: ``generic`` (XDP in the kernel's skb path) works on every device and can redirect to every device.
``native`` runs in the driver; redirecting into a veth then needs NAPI on the veth's peer (GRO on, or an XDP
program there), which the balancer cannot see or set from its namespace, and a redirect without it drops the frame
silently. ``auto`` therefore chooses generic when a port is a veth, native otherwise (falling back to generic when
a driver refuses native).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from mplslb.balancer import WholeSessions
from mplslb.labels import C2S_MIN
from mplslb.offload import bpf
from mplslb.offload.bpf import PIN_ROOT, ensure_bpffs, possible_cpus, xdp_state
from mplslb.offload.build import BuildError, build_object
from mplslb.sessions import WATCH_BUDGET, nonzero_bytes
from mplslb.state import fingerprint
from mplslb.switching.layout import (
    ETH_HLEN,
    F_FIN,
    F_FLOW,
    F_L7,
    F_RT,
    F_TCP_END,
    F_TICKET,
    F_V6,
    GSO_COUNTERS,
    GSO_TRAFFIC,
    KERNEL_ENTRY,
    KERNEL_ENTRY_FIELDS,
    LABEL_SPACE,
    LSE_LEN,
    NS_PER_S,
    REQUEST,
    REQUEST_FIELDS,
    SERVICE_KEY,
    SYN_BUCKET,
    SYN_BUCKET_FIELDS,
    SYN_FLOW,
    SYN_FLOW_FIELDS,
    SYN_PORT,
    SYN_RATE_MAX,
    TAKEN,
    TAKEN_FIELDS,
    TICKET_COUNTERS,
    TICKETS_MAX,
    WATCH_ALL,
    WATCH_REQUEST,
    WATCH_TCP_END,
    struct_offsets,
)
from mplslb.switching.table import LabelSwitchingTable, flow_parts

#: The fingerprint of the maps' entries (their fields and flags): the maps' pins carry it in their names, so a kept
#: map is adopted only by a program that reads and writes its entries the same way.
LAYOUT_FP: Final = fingerprint(
    [
        KERNEL_ENTRY_FIELDS,
        SYN_BUCKET_FIELDS,
        REQUEST_FIELDS,
        F_V6,
        F_TCP_END,
        F_FLOW,
        F_RT,
        F_L7,
        F_FIN,
        F_TICKET,
        SYN_FLOW_FIELDS,
        TAKEN_FIELDS,
    ]
)[:12]
MAP_PIN: Final = f"map_{LAYOUT_FP}"
SYN_PIN: Final = f"syn_{LAYOUT_FP}"
REQUEST_PIN: Final = f"req_{LAYOUT_FP}"
PROG_NAME = "mplslb_xdp"
MAP_NAME = "mplslb_labels"
MAP_SYMBOL = "labels"
SYN_MAP_NAME = "mplslb_syn"
SYN_MAP_SYMBOL = "syn_buckets"
REQUEST_MAP_NAME = "mplslb_requests"
REQUEST_MAP_SYMBOL = "requests"
SHED = "syn_shed"  # the drop reason of a SYN shed by the kernel
SECTION = "xdp"
TC_SECTION = "tc"
TC_PROG_NAME = "mplslb_tc"
GSO_MAP_NAME = "mplslb_gso"
GSO_MAP_SYMBOL = "gso_counters"
#: The ticket maps (offload_syn): symbol in the program -> the map's name.
TICKET_MAPS: Final = {
    "tickets": "mplslb_tickets",
    "taken": "mplslb_taken",
    "syn_flows": "mplslb_flows",
    "services": "mplslb_services",
    "client_ports": "mplslb_cports",
    "ticket_counters": "mplslb_tcount",
}
#: The super-packets' counters' pin (gso), after the fingerprint too.
GSO_PIN: Final = f"gso_{LAYOUT_FP}"
#: The ticket maps' pins: symbol -> name, after the layout's fingerprint as the other maps'.
TICKET_PINS: Final = {symbol: f"{symbol}_{LAYOUT_FP}" for symbol in TICKET_MAPS}
SERVICES_MAX = 4096  # (VIP, TCP port)s in the service map
CLIENT_PORTS_MAX = 256
#: The macro that builds the XDP program's super-packet variant (and the tc program): the longest frame of one
#: segment, which both programs and the daemon's socket filter take as the bound.
GSO_DEFINE = "GSO_FRAME_MAX"
#: The macro that builds the program with the taken tickets on a queue map rather than a ring buffer.
TAKEN_QUEUE_DEFINE = "TAKEN_QUEUE"
MODES = ("auto", "native", "generic")

#: What the program keeps in a map entry (counters, last acknowledgment number), as numpy reads them from a batch
#: of entries.
COUNTERS = np.dtype(
    {"names": ["packets", "bytes", "last_ns", "ack"], "formats": ["<u8", "<u8", "<u8", "<u8"],
     "offsets": [struct_offsets(KERNEL_ENTRY_FIELDS)[name] for name in ("packets", "bytes", "last_ns", "ack")],
     "itemsize": KERNEL_ENTRY.size}
)  # fmt: skip
#: A C2S entry's measurement record (F_RT), as numpy reads it from a batch of entries.
_RECORD_FIELDS = ("rt_left", "answer_ns", "ack_ns", "request_ns", "response_ns")
RECORD = np.dtype(
    {"names": list(_RECORD_FIELDS), "formats": ["<u4", "<u8", "<u8", "<u8", "<u8"],
     "offsets": [struct_offsets(KERNEL_ENTRY_FIELDS)[name] for name in _RECORD_FIELDS],
     "itemsize": KERNEL_ENTRY.size}
)  # fmt: skip
_RECORD = struct.Struct("=I4xQQQQ")  # the same fields, from one entry
#: A label's FIN record (F_FIN), as numpy reads it from a batch of entries.
_FIN_FIELDS = ("fin_seq", "fin_taken", "fin_ack", "fin_ns")
FIN_RECORD = np.dtype(
    {"names": list(_FIN_FIELDS), "formats": ["<u4", "<u4", "<u8", "<u8"],
     "offsets": [struct_offsets(KERNEL_ENTRY_FIELDS)[name] for name in _FIN_FIELDS],
     "itemsize": KERNEL_ENTRY.size}
)  # fmt: skip
_FIN = struct.Struct("=IIQQ")  # the same fields, from one entry
_FIN_AT = struct_offsets(KERNEL_ENTRY_FIELDS)["fin_seq"]
_RECORD_AT = struct_offsets(KERNEL_ENTRY_FIELDS)["rt_left"]
_FLAGS_AT = struct_offsets(KERNEL_ENTRY_FIELDS)["flags"]
_ACK_AT = struct_offsets(KERNEL_ENTRY_FIELDS)["ack"]
_NATIVE_U64 = struct.Struct("=Q")
COUNTERS_SIZE = KERNEL_ENTRY.size - struct_offsets(KERNEL_ENTRY_FIELDS)["packets"]
_KEY = struct.Struct("=I")
log = logging.getLogger("mplslb.offload")
BATCH_MIN = 4  # fewer writes than this go one by one


#: Records or FINs a poll hands over per :meth:`XdpOffload.poll_step` (a few ms of the daemon's time).
POLL_CHUNK: Final = 256
#: While the table holds at most this many labels, a poll looks their entries up one by one (a few microseconds
#: each) instead of walking the map, whose 2^20 buckets take milliseconds however few entries they hold.
READ_BY_KEY_MAX = 512
#: Request slots (``F_L7``) the request map holds at once, preallocated (336 bytes each in the kernel: 21 MiB):
#: a slot lives from its session's SYN (or ticket) to the poll that takes its copy, so at 15,000 new sessions a
#: second about 30,000 are in use. A map without preallocation allocates each slot as it is written and frees it
#: at its delete: 1.9 µs an element in the daemon's batch writes under a close load, against 0.7-0.8 preallocated
#: (1.4 and 0.4 for the deletes; ``bench/close_session.py --map-calls``), and a whole read walks 2^20 buckets instead
#: of 2^16. A slot the full map refuses is counted (``e2big``) and that session's request goes up, as for any slot
#: refused.
REQUEST_SLOTS: Final = 1 << 16


@dataclass(slots=True)
class PollWork:
    """What a read of the whole map left to hand over (:meth:`XdpOffload.begin_poll`): the measured sessions'
    records and the FINs, each with its label's generation at the read, in the order they are handed over: session
    by session (its record, then its FINs in the order the kernel took them), the sessions in the order of their
    first FIN, so each chunk leaves whole sessions ending, the longest closed first, and their flows released at
    the sync after it (a client's port used again then takes a ticket instead of going up). Numpy, made into
    Python values a chunk at a time."""

    record_labels: np.ndarray  # C2S labels
    record_generations: np.ndarray
    records: np.ndarray  # RECORD
    fin_labels: np.ndarray
    fin_generations: np.ndarray
    fins: np.ndarray  # FIN_RECORD
    read_at: float  # the table's clock at the read
    copies: bool  # most of the request slots hold a copy to read: read them all in one call, at the first chunk
    order: np.ndarray = field(init=False)  # the rows in the order handed over: a record by its index, a FIN by
    # the number of records plus its index
    slots: dict[int, bytes] | None = None  # the request slots read in one call, by label (None: one lookup each)
    done: int = 0  # rows of ``order`` handed over

    def __post_init__(self) -> None:
        labels = np.concatenate((self.record_labels, self.fin_labels))
        c2s = labels - (labels & 1 != C2S_MIN & 1)
        kind = np.concatenate((np.zeros(self.record_labels.size, np.uint8), np.ones(self.fin_labels.size, np.uint8)))
        ns = np.concatenate((np.zeros(self.record_labels.size, np.uint64), self.fins["fin_ns"].astype(np.uint64)))
        # Sessions in the order of their first FIN (those without one last): the longest closed end first.
        sessions, session_of = np.unique(c2s, return_inverse=True)
        first = np.full(sessions.size, np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(first, session_of[self.record_labels.size :], ns[self.record_labels.size :])
        self.order = np.lexsort((ns, kind, c2s, first[session_of]))

    @property
    def size(self) -> int:
        return int(self.order.size)


def _unmeasured(entry: bytes) -> bytes:
    """An entry's fixed fields without ``F_RT``, which the program clears by itself."""
    flags = entry[_FLAGS_AT] & ~F_RT
    return entry[:_FLAGS_AT] + bytes((flags,)) + entry[_FLAGS_AT + 1 :]


class Taken(NamedTuple):
    """A SYN the program took under a ticket (offload_syn): the ticket's C2S label, the port it came in on, its
    time on the table's clock, the client's MAC, IP version, flow (as the client sent it: source, destination,
    ports), the frame's length, and whether its flow was a session's the program saw close (both of its FINs taken
    there: ``flow_closed`` in mplslb_xdp.c)."""

    c2s: int
    port_id: int
    at: float
    mac: bytes
    ip_version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    length: int
    closed: bool = False


def syn_flow_key(src: bytes, dst: bytes, ports: bytes) -> bytes:
    """The flow map's key of a TCP flow as the client sends it (``ports``: source and destination, as on the
    wire)."""
    family = 6 if len(src) == 16 else 4
    return SYN_FLOW.pack(src, dst, ports, family, b"")


def is_c2s(label: int) -> bool:
    return label & 1 == C2S_MIN & 1


def xdp_mode(ifindex: int) -> str:
    """How the XDP program on an interface is attached: "native", "generic" or "?"."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    attached = (xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None) or 0
    # pyroute2 names the XDP_ATTACHED_* values (or leaves the number)
    return {1: "native", 2: "generic", "xdp": "native", "xdpdrv": "native", "xdpgeneric": "generic"}.get(attached, "?")


class OffloadError(RuntimeError):
    """The kernel offload cannot be set up (no clang, no bpf(2), a port with another XDP program, ...)."""


def gso_frame_max(ifindexes: Iterable[int]) -> int:
    """The longest frame one segment makes on the interfaces ``ifindexes`` of this namespace (the smallest MTU, with
    the Ethernet header and one label stack entry): a longer labelled frame is a super-packet."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        mtu = min(int(ipr.get_links(index)[0].get_attr("IFLA_MTU")) for index in ifindexes)
    return mtu + ETH_HLEN + LSE_LEN


def syn_share(rate: int, cpus: int) -> int:
    """Each CPU's share of ``rate`` SYNs a second (rounded up; 0: no limit)."""
    return -(-rate // max(cpus, 1))


def _netlink_detach(ifindex: int, flags: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ifindex, xdp={"attrs": [["IFLA_XDP_FD", -1], ["IFLA_XDP_FLAGS", flags]]})


class XdpOffload:
    """Keeps an XDP program's label map in step with ``table``, for the ports ``interfaces`` names
    (port id -> interface name, in the calling thread's network namespace)."""

    def __init__(
        self,
        table: LabelSwitchingTable,
        interfaces: Mapping[int, str],
        *,
        mode: str = "auto",
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = LABEL_SPACE,
        obj: bytes | None = None,
        pins: Path | None = None,
        fresh: bool = False,
        syn_rate: int = 0,
        measured: Callable[[int, float, float, float, float, bool, bytes | None, int], bool] | None = None,
        gso: bool = False,
        ended: Callable[[int, int, int, float], None] | None = None,
        tickets: bool = False,
        closed: Callable[[WholeSessions], int] | None = None,
        prealloc: bool = False,
    ) -> None:
        """``syn_rate``: unlabelled TCP SYNs a second the program lets through to userspace (0: all).
        ``measured``: given, watched labels are measured in the kernel and their records handed to it (see the
        module docstring). ``gso``: super-packets too (the tc program; see "Super-packets" there). ``ended``:
        given, a TCP session's first FIN under each label is taken in the kernel and handed to it (see "FINs" in
        the module docstring). ``tickets``: new TCP sessions' SYNs may be taken in the kernel under tickets (see
        "Tickets" in the module docstring). ``closed``: with ``measured`` and ``ended``, a poll hands the sessions
        it finds whole (a record and both FINs) to it together, before the rest one by one. ``prealloc``: the label
        map's ``max_entries`` elements are allocated when it is made, not as entries are written (writes and deletes
        then cost the kernel no allocation and free: a few µs less of the daemon's time per session), and the flow
        map's, one for each label pair."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= syn_rate <= SYN_RATE_MAX:
            raise ValueError(f"syn_rate must be 0-{SYN_RATE_MAX}, got {syn_rate}")
        if not interfaces:
            raise ValueError("the kernel offload needs at least one Ethernet port")
        self.table = table
        self.interfaces = dict(interfaces)
        self.mode = mode
        self.clock = clock
        self.max_entries = max_entries
        self.prealloc = prealloc
        self._map_flags = 0 if prealloc else bpf.BPF_F_NO_PREALLOC
        self.request_slots = min(max_entries, REQUEST_SLOTS)
        self._obj = obj
        self.pins = pins
        self.fresh = fresh
        self.adopted = False  # the program, map and links were a previous daemon's
        #: An adoption's: the C2S labels of the tickets a killed daemon left in the queue, which no SYN took.
        self.untaken: list[int] = []
        self.upgraded = False  # ... and the program was replaced by this build's
        self.ifindex: dict[int, int] = {}  # port id -> ifindex
        self.attached: dict[str, str] = {}  # interface -> "native" or "generic"
        self._links: list[int] = []
        self._prog = -1
        self._map: bpf.Map | None = None
        self.syn_rate = syn_rate
        self._syn: bpf.Map | None = None
        self._requests: bpf.Map | None = None
        self._slots = np.zeros(LABEL_SPACE, dtype=np.bool_)  # C2S labels with a slot in the request map
        self._dropping: list[int] | None = None  # while a poll hands records over: slots to delete at its end
        self._read_slots: dict[int, bytes] | None = None  # ... and the slots it read in one call, by label
        self.copies = 0  # requests' copies handed to ``measured``
        self._cpus = 0
        self._shed_folded = 0  # SYNs shed already added to the table's drops
        self._in_kernel = np.zeros(LABEL_SPACE, dtype=np.uint8)
        self._kpackets = np.zeros(LABEL_SPACE, dtype=np.uint64)  # kernel counters already added to the table
        self._kbytes = np.zeros(LABEL_SPACE, dtype=np.uint64)
        self._noted: list[int] = []  # labels changed in the table since the last sync, in order
        # labels withdrawn since the last sync: their entries are an ended session's, even if reinstalled since
        self._withdrawn: set[int] = set()
        self._waiting: set[int] = set()  # installed, waiting for WATCH_ALL to clear
        self.measured = measured
        # C2S labels whose session is measured in the kernel, and the last record ``measured`` took for each
        self._measuring: dict[int, tuple[int, ...]] = {}
        self._measured = np.zeros(LABEL_SPACE, dtype=np.bool_)  # the same labels, for a batch read's rows
        self.records = 0  # records handed to ``measured``
        self.ended = ended
        self._fin_folded = np.zeros(LABEL_SPACE, dtype=np.uint8)  # the entry's FIN record was handed to ``ended``
        self.fins = 0  # FIN records handed to ``ended``
        self.closed = closed if measured is not None and ended is not None else None
        self.whole = 0  # sessions handed to ``closed`` whole (their records and FINs counted above too)
        self._read_at = clock()  # the table's clock at the last read of the whole map whose FINs are all handed over
        self._work: PollWork | None = None  # what the last read has left to hand over
        self._refreshed: set[int] = set()  # C2S labels folded one by one since that read: their rows there are old
        self.entries = 0
        self.writes = 0
        self.deletes = 0
        self.polls = 0
        self.kernel_packets = 0
        self.kernel_bytes = 0
        self.errors: dict[str, int] = {}  # refused map updates, by errno name
        self.gso = gso
        self.frame_max = 0  # gso: the longest frame of one segment (longer ones are the tc program's)
        self._gso_map: bpf.Map | None = None
        self._tc = -1
        self._tc_links: list[int] = []  # gso: the tc program's tcx link on every port
        self._gso_folded: dict[str, int] = {}  # the tc program's drops already added to the table's drops
        self.tickets = tickets
        self._ticket_maps: dict[str, bpf.Map | bpf.Queue | bpf.RingBuffer] = {}
        self._flows: dict[int, bytes] = {}  # tickets: C2S label -> its flow's key in the flow map
        self._released: list[tuple[bytes, int]] = []  # flows of ending sessions (key, C2S label), out at the next sync
        self._flow_owner: dict[bytes, int] = {}  # ... and the label each key was last written for
        self._unowned: set[bytes] = set()  # released flows deleted since the taken ring was last read
        self._ticketed: set[int] = set()  # labels a ticket's entries hold, not installed in the table yet
        self._ticket_templates: dict[tuple[int, bytes, int, int], bytes] = {}  # ticket_entries' results
        self.port_of: dict[int, int] = {}  # ifindex -> port id
        self.flow_errors = 0

    # -- setting up and tearing down ---------------------------------------------------------------------------
    def open(self) -> None:
        """Build and load the program, create the map, attach to every port, and mirror what is installed. With
        pins: adopt what a previous daemon pinned there when it fits (else remove it first), and pin."""
        if not bpf.available():
            raise OffloadError("bpf(2) is not known on this architecture")
        try:
            for port_id, ifname in self.interfaces.items():
                self.ifindex[port_id] = socket.if_nametoindex(ifname)
            self.port_of = {ifindex: port_id for port_id, ifindex in self.ifindex.items()}
            if self.gso:
                self.frame_max = gso_frame_max(self.ifindex.values())
        except OSError as exc:
            raise OffloadError(f"kernel offload: {exc}") from None
        try:
            obj = self._obj if self._obj is not None else build_object(defines=self.defines())
        except BuildError as exc:
            raise OffloadError(str(exc)) from None
        if self.pins is not None:
            try:
                ensure_bpffs(self.pins)
            except OSError as exc:
                raise OffloadError(f"kernel offload: cannot use bpffs at {self.pins}: {exc}") from None
            if not self.fresh:
                why = self._adopt(obj)
                if not why:
                    self.table.add_mirror(self)
                    try:
                        self._settle_tickets()
                        self._reconcile()
                        self._set_syn_rate(keep=True)
                    except OSError as exc:
                        why = f"reason=reconcile_failed error={str(exc).replace(' ', '_')}"
                        self.close()  # lets the adopted objects go: loaded afresh below
                    else:
                        self.adopted = True
                        log.info("event=offload_adopted pins=%s entries=%d upgraded=%s untaken_tickets=%d", self.pins,
                                 self.entries, self.upgraded, len(self.untaken))  # fmt: skip
                        return
                if why != "reason=no_pins":
                    log.warning("event=offload_not_adopted %s pins=%s", why, self.pins)
            self._unpin()
        try:
            self._map = bpf.Map.create(bpf.BPF_MAP_TYPE_HASH, _KEY.size, KERNEL_ENTRY.size, self.max_entries,
                                       flags=self._map_flags, name=MAP_NAME)  # fmt: skip
            self._open_syn_map()
            self._requests = bpf.Map.create(bpf.BPF_MAP_TYPE_HASH, _KEY.size, REQUEST.size, self.request_slots,
                                            flags=0, name=REQUEST_MAP_NAME)  # fmt: skip
            assert self._syn is not None
            maps = {MAP_SYMBOL: self._map.fd, SYN_MAP_SYMBOL: self._syn.fd, REQUEST_MAP_SYMBOL: self._requests.fd}
            maps |= self._open_ticket_maps()
            self._prog = bpf.load_program(obj, SECTION, maps, prog_type=bpf.BPF_PROG_TYPE_XDP, name=PROG_NAME)
            kinds = {port_id: self._clear_stale(ifindex) for port_id, ifindex in self.ifindex.items()}
            native = self.mode == "native" or (self.mode == "auto" and "veth" not in kinds.values())
            for port_id, ifindex in self.ifindex.items():
                self._attach(self.interfaces[port_id], ifindex, native=native)
            if self.gso:
                self._open_gso(obj, maps, kinds)
            if self.pins is not None:
                self._pin()
        except (OSError, ValueError) as exc:
            self.close()
            raise OffloadError(f"kernel offload: {exc}") from None
        self.table.add_mirror(self)
        self.table.ack_stores.append(self)
        self._mirror(int(label) for label in np.flatnonzero(self.table.arrays().valid))

    def defines(self) -> dict[str, int]:
        """The ``-D`` macros of the program this offload loads: the super-packets' bound with ``gso``, the taken
        tickets on a queue where a ring buffer cannot be read in place."""
        out = {GSO_DEFINE: self.frame_max} if self.gso else {}
        if not bpf.ORDERED_LOADS:
            out[TAKEN_QUEUE_DEFINE] = 1
        return out

    # -- pins: what outlives the daemon ----------------------------------------------------------------------------
    def _pin_path(self, what: str) -> str:
        assert self.pins is not None
        return str(self.pins / what)

    def _pin(self) -> None:
        """Pin the maps, the program and each link (the link last: until then a killed daemon leaves nothing)."""
        assert self._map is not None and self._syn is not None and self._requests is not None
        bpf.obj_pin(self._map.fd, self._pin_path(MAP_PIN))
        bpf.obj_pin(self._syn.fd, self._pin_path(SYN_PIN))
        bpf.obj_pin(self._requests.fd, self._pin_path(REQUEST_PIN))
        for symbol, m in self._ticket_maps.items():
            bpf.obj_pin(m.fd, self._pin_path(TICKET_PINS[symbol]))
        bpf.obj_pin(self._prog, self._pin_path("prog"))
        if self._gso_map is not None:
            bpf.obj_pin(self._gso_map.fd, self._pin_path(GSO_PIN))
            bpf.obj_pin(self._tc, self._pin_path("tc_prog"))
            for ifname, fd in zip(self.interfaces.values(), self._tc_links, strict=True):
                bpf.obj_pin(fd, self._pin_path(f"tclink_{ifname}"))
        for ifname, fd in zip(self.interfaces.values(), self._links, strict=True):
            bpf.obj_pin(fd, self._pin_path(f"link_{ifname}"))

    def _unpin(self, *, wait: bool = True) -> None:
        """Remove what is pinned: its program detaches from the ports once nothing holds it (``wait`` for it)."""
        if self.pins is not None:
            bpf.unpin(self.pins, self.ifindex.values() if wait else (), keep_dir=True)

    def _adopt(self, obj: bytes) -> str:
        """Take over the pinned map, program and links when they fit this daemon (``""``), else say why."""
        fds: list[int] = []
        try:
            why = self._adopt_fds(obj, fds)
        except OSError as exc:
            why = f"reason=adopt_failed error={str(exc).replace(' ', '_')}"
        if why:
            for fd in fds:
                os.close(fd)
            for m in self._ticket_maps.values():
                m.close()
            self._ticket_maps.clear()
        return why

    def _adopt_fds(self, obj: bytes, fds: list[int]) -> str:
        try:
            prog = bpf.obj_get(self._pin_path("prog"))
            fds.append(prog)
        except OSError:
            return "reason=no_pins"
        try:
            map_fd = bpf.obj_get(self._pin_path(MAP_PIN))
            fds.append(map_fd)
            syn_fd = bpf.obj_get(self._pin_path(SYN_PIN))
            fds.append(syn_fd)
            request_fd = bpf.obj_get(self._pin_path(REQUEST_PIN))
            fds.append(request_fd)
        except OSError:
            return "reason=map_layout_changed"  # pinned by a build whose maps' layout differs (or torn)
        if not (
            bpf.map_fits(map_fd, bpf.BPF_MAP_TYPE_HASH, _KEY.size, KERNEL_ENTRY.size, self.max_entries)
            and bpf.map_info(map_fd).flags == self._map_flags
            and bpf.map_fits(syn_fd, bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _KEY.size, SYN_BUCKET.size, 1)
            and bpf.map_fits(request_fd, bpf.BPF_MAP_TYPE_HASH, _KEY.size, REQUEST.size, self.request_slots)
        ):
            return "reason=map_layout_changed"
        why, ticket_fds = self._adopt_ticket_maps(fds)
        if why:
            return why
        why, links = self._adopt_links("link_", prog, fds)
        if why:
            return why
        maps = {MAP_SYMBOL: map_fd, SYN_MAP_SYMBOL: syn_fd, REQUEST_MAP_SYMBOL: request_fd} | ticket_fds
        new = bpf.load_program(obj, SECTION, maps, prog_type=bpf.BPF_PROG_TYPE_XDP, name=PROG_NAME)
        fds.append(new)
        prog = self._swap_in(prog, new, links, "prog", fds)
        why, tc, gso_fd, tc_links = self._adopt_gso(obj, maps, fds)
        if why:
            return why
        self._map = bpf.Map(map_fd, _KEY.size, KERNEL_ENTRY.size, MAP_NAME)
        self._cpus = possible_cpus()
        self._syn = bpf.Map(syn_fd, _KEY.size, SYN_BUCKET.size * self._cpus, SYN_MAP_NAME)
        self._requests = bpf.Map(request_fd, _KEY.size, REQUEST.size, REQUEST_MAP_NAME)
        for symbol, fd in ticket_fds.items():
            self._ticket_maps[symbol] = self._ticket_map(symbol, fd)
            fds.remove(fd)  # its map's now
        if gso_fd >= 0:
            self._gso_map = bpf.Map(gso_fd, _KEY.size, _NATIVE_U64.size * possible_cpus(), GSO_MAP_NAME)
            self._tc, self._tc_links = tc, tc_links
            for fd in (gso_fd, tc, *tc_links):
                fds.remove(fd)
            self._gso_folded = self.gso_counters()  # what it counted before: the previous daemon's to fold
        self._prog = prog
        self._links = links
        for ifname, ifindex in zip(self.interfaces.values(), self.ifindex.values(), strict=True):
            self.attached[ifname] = xdp_mode(ifindex)
        return ""

    def _adopt_gso(self, obj: bytes, maps: dict[str, int], fds: list[int]) -> tuple[str, int, int, list[int]]:
        """The pinned tc program, its counters' map and its links when they fit (``gso``): (why not, or ``""``;
        the program, the map, the links; -1 and none without ``gso``). A program built differently is swapped in
        on every port as the XDP one is. Pins of a daemon that ran with ``gso`` do not fit one without, nor the
        other way round."""
        pinned = any(os.path.lexists(self._pin_path(f"tclink_{ifname}")) for ifname in self.interfaces.values())
        if not self.gso:
            return ("reason=gso_changed" if pinned else ""), -1, -1, []
        try:
            tc = bpf.obj_get(self._pin_path("tc_prog"))
            fds.append(tc)
            gso_fd = bpf.obj_get(self._pin_path(GSO_PIN))
            fds.append(gso_fd)
        except OSError:
            return "reason=gso_changed", -1, -1, []
        if not bpf.map_fits(gso_fd, bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _KEY.size, _NATIVE_U64.size, len(GSO_COUNTERS)):
            return "reason=map_layout_changed", -1, -1, []
        why, links = self._adopt_links("tclink_", tc, fds)
        if why:
            return why, -1, -1, []
        new = bpf.load_program(obj, TC_SECTION, maps | {GSO_MAP_SYMBOL: gso_fd},
                               prog_type=bpf.BPF_PROG_TYPE_SCHED_CLS, name=TC_PROG_NAME)  # fmt: skip
        fds.append(new)
        return "", self._swap_in(tc, new, links, "tc_prog", fds), gso_fd, links

    def _adopt_links(self, prefix: str, prog: int, fds: list[int]) -> tuple[str, list[int]]:
        """The pinned links ``<prefix><interface>`` of every port, each added to ``fds``, when each is on its port and
        runs ``prog``; else why not."""
        prog_id = bpf.prog_info(prog).prog_id
        links: list[int] = []
        for port_id, ifname in self.interfaces.items():
            try:
                fd = bpf.obj_get(self._pin_path(f"{prefix}{ifname}"))
            except OSError:
                return f"reason=link_missing interface={ifname}", []
            fds.append(fd)
            links.append(fd)
            link = bpf.link_info(fd)
            if link.ifindex != self.ifindex[port_id] or link.prog_id != prog_id:
                return f"reason=link_detached interface={ifname}", []
        return "", links

    def _swap_in(self, old: int, new: int, links: list[int], pin: str, fds: list[int]) -> int:
        """The program to keep of the pinned ``old`` and ``new``, both in ``fds``: ``old`` when ``new`` is the same
        build (``new`` closed); else ``new``, swapped in on every port at once through ``links`` and pinned as
        ``pin`` in its place (``old`` closed)."""
        if bpf.prog_info(new).tag == bpf.prog_info(old).tag:
            fds.remove(new)
            os.close(new)
            return old
        for fd in links:
            bpf.link_update(fd, new)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pin_path(pin))
        bpf.obj_pin(new, self._pin_path(pin))
        fds.remove(old)
        os.close(old)
        self.upgraded = True
        return new

    def _reconcile(self) -> None:
        """Make the adopted map agree with the (adopted) table: entries that match it stay, with their counters
        taken as already counted and their last-seen times folded in; the others are written or deleted."""
        assert self._map is not None and self._requests is not None
        slots, _, _ = self._requests.lookup_batch()
        self._slots[np.frombuffer(slots, dtype=np.uint32).astype(np.intp)] = True
        keys, values, count = self._map.lookup_batch()
        table = self.table
        labels = np.frombuffer(keys, dtype=np.uint32).astype(np.intp)
        fixed = KERNEL_ENTRY.size - COUNTERS_SIZE
        fix: set[int] = set()
        kept: list[int] = []
        measure = self.measured is not None
        for i, label in enumerate(labels.tolist()):
            self._in_kernel[label] = 1
            entry = values[i * KERNEL_ENTRY.size : i * KERNEL_ENTRY.size + fixed]
            watched = table.watch[label] & WATCH_ALL
            fits = table.valid[label] and self._offloadable(label) and (measure or not watched)
            if fits and _unmeasured(entry) == _unmeasured(self._entry(label)[:fixed]):
                kept.append(i)
                if watched:  # its session's measurement went on in the kernel: folded at the next poll
                    c2s = label if is_c2s(label) else label - 1
                    self._measuring.setdefault(c2s, ())
                    self._measured[c2s] = True
            else:
                fix.add(label)
        self.entries = count
        # Every entry's counters are taken as counted: a kept entry's were the previous daemon's to fold, and a
        # stale one's (folded before it is rewritten) belong to no adopted binding.
        everything = np.frombuffer(values, dtype=COUNTERS)[: labels.size]
        self._kpackets[labels] = everything["packets"]
        self._kbytes[labels] = everything["bytes"]
        if kept:
            at = np.asarray(kept, dtype=np.intp)
            counters = everything[at]
            kept_labels = labels[at]
            offset = self.clock() - time.monotonic()
            zero = np.zeros(at.size, dtype=np.uint64)
            table.fold_counters(kept_labels, zero, zero, counters["last_ns"].astype(np.float64) * 1e-9 + offset)
            if self.tickets:  # a rewritten label's flow goes in with its entry (_write)
                self._write_flows(kept_labels.tolist())
        valid = np.flatnonzero(table.arrays().valid)
        fix.update(valid[self._in_kernel[valid] == 0].tolist())
        self._mirror(sorted(fix), fold=False)  # a stale entry's counters and ACK are no adopted binding's
        for label in np.flatnonzero(self._slots & ~self._measured).tolist():
            self._drop_slot(label)  # no kept session's measurement: an ended one's copy

    def _ticket_specs(self) -> dict[str, tuple[int, int, int, int, int]]:
        """Each ticket map's (type, key size, value size, entries, flags), as created and as an adopted one must
        be."""
        taken = (
            (bpf.BPF_MAP_TYPE_RINGBUF, 0, 0, bpf.ring_size(TAKEN.size, TICKETS_MAX), 0)
            if bpf.ORDERED_LOADS
            else (bpf.BPF_MAP_TYPE_QUEUE, 0, TAKEN.size, TICKETS_MAX, 0)
        )
        return {
            "tickets": (bpf.BPF_MAP_TYPE_QUEUE, 0, _KEY.size, TICKETS_MAX, 0),
            "taken": taken,
            # preallocated with the label map: a flow for each pair (every live TCP session's), and room for the
            # SYNs the program enters while it looks for a ticket
            "syn_flows": (bpf.BPF_MAP_TYPE_HASH, SYN_FLOW.size, _KEY.size, self.max_entries // 2 + TICKETS_MAX, 0)
            if self.prealloc
            else (bpf.BPF_MAP_TYPE_HASH, SYN_FLOW.size, _KEY.size, self.max_entries, bpf.BPF_F_NO_PREALLOC),
            "services": (bpf.BPF_MAP_TYPE_HASH, SERVICE_KEY.size, _KEY.size, SERVICES_MAX, 0),
            "client_ports": (bpf.BPF_MAP_TYPE_HASH, _KEY.size, SYN_PORT.size, CLIENT_PORTS_MAX, 0),
            "ticket_counters": (bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _KEY.size, _NATIVE_U64.size, len(TICKET_COUNTERS), 0),
        }

    def _ticket_map(self, symbol: str, fd: int) -> bpf.Map | bpf.Queue | bpf.RingBuffer:
        """The ticket map ``symbol`` over its file descriptor (which it then owns)."""
        map_type, key_size, value_size, entries, _ = self._ticket_specs()[symbol]
        name = TICKET_MAPS[symbol]
        if map_type == bpf.BPF_MAP_TYPE_RINGBUF:
            return bpf.RingBuffer(fd, entries, name)
        if map_type == bpf.BPF_MAP_TYPE_QUEUE:
            return bpf.Queue(fd, value_size, name)
        if map_type == bpf.BPF_MAP_TYPE_PERCPU_ARRAY:  # the kernel reads and writes every possible CPU's value
            return bpf.Map(fd, key_size, value_size * possible_cpus(), name)
        return bpf.Map(fd, key_size, value_size, name)

    def _open_ticket_maps(self) -> dict[str, int]:
        """The ticket maps (created once, empty: without tickets the program never takes a SYN; or adopted with the
        pins); symbol -> fd."""
        if not self._ticket_maps:
            for symbol, (map_type, key_size, value_size, entries, flags) in self._ticket_specs().items():
                fd = bpf.map_create(map_type, key_size, value_size, entries, flags=flags, name=TICKET_MAPS[symbol])
                try:
                    self._ticket_maps[symbol] = self._ticket_map(symbol, fd)
                except OSError:
                    os.close(fd)
                    raise
        return {symbol: m.fd for symbol, m in self._ticket_maps.items()}

    def _adopt_ticket_maps(self, fds: list[int]) -> tuple[str, dict[str, int]]:
        """The pinned ticket maps' file descriptors by symbol, each added to ``fds``; or why they do not fit."""
        out: dict[str, int] = {}
        for symbol, (map_type, key_size, value_size, entries, _) in self._ticket_specs().items():
            try:
                fd = bpf.obj_get(self._pin_path(TICKET_PINS[symbol]))
            except OSError:
                return "reason=map_layout_changed", {}  # pinned by a build without it (or torn)
            fds.append(fd)
            if not bpf.map_fits(fd, map_type, key_size, value_size, entries):
                return "reason=map_layout_changed", {}
            out[symbol] = fd
        return "", out

    def _settle_tickets(self) -> None:
        """Before an adoption's reconcile: nothing of the previous daemon's tickets is left (it gave them back as it
        stopped, unless it was killed): the queue, the taken records and the flow map are emptied. The reconcile
        then enters the adopted sessions' flows with their labels' entries (a ticket's entries are no adopted
        session's: it deletes them). The tickets drained from the queue are kept in :attr:`untaken`: no SYN took
        them, so their label pairs need no quarantine."""
        self.untaken = self.drain_tickets()
        taken = self._ticket_maps["taken"]
        assert isinstance(taken, bpf.Queue | bpf.RingBuffer)
        taken.take_all()
        flows = self._ticket_maps["syn_flows"]
        assert isinstance(flows, bpf.Map)
        flows.clear()
        self._flows.clear()
        self._flow_owner.clear()
        self._unowned.clear()

    def _open_syn_map(self) -> None:
        """The per-CPU SYN buckets, each holding its share of the rate. The kernel reads and writes a per-CPU
        value for every possible CPU at once, each rounded up to 8 bytes."""
        self._cpus = possible_cpus()
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _KEY.size, SYN_BUCKET.size, 1, name=SYN_MAP_NAME)
        self._syn = bpf.Map(fd, _KEY.size, SYN_BUCKET.size * self._cpus, SYN_MAP_NAME)
        self._set_syn_rate(keep=False)

    def _set_syn_rate(self, *, keep: bool) -> None:
        """Give every CPU's bucket its share of :attr:`syn_rate`. ``keep``: an adopted map's buckets keep their
        tokens and counters (the SYNs they shed before are not this daemon's drops); a SYN the kernel counts while
        this write is under way may go uncounted."""
        assert self._syn is not None
        share = syn_share(self.syn_rate, os.cpu_count() or 1)
        key = _KEY.pack(0)
        old = (self._syn.lookup(key) or b"") if keep else b""
        buckets = []
        for cpu in range(self._cpus):
            if len(old) >= (cpu + 1) * SYN_BUCKET.size:
                _, last_ns, credit, passed, shed = SYN_BUCKET.unpack_from(old, cpu * SYN_BUCKET.size)
                buckets.append(SYN_BUCKET.pack(share, last_ns, min(credit, share * NS_PER_S), passed, shed))
            else:
                buckets.append(SYN_BUCKET.pack(share, 0, 0, 0, 0))
        self._syn.update(key, b"".join(buckets))
        self._shed_folded = self.syn_counters()[1]

    def syn_counters(self) -> tuple[int, int]:
        """(passed, shed): unlabelled TCP SYNs the program let through and dropped, over all CPUs."""
        if self._syn is None:
            return 0, 0
        raw = self._syn.lookup(_KEY.pack(0)) or b""
        buckets = [SYN_BUCKET.unpack_from(raw, i * SYN_BUCKET.size) for i in range(len(raw) // SYN_BUCKET.size)]
        return sum(b[3] for b in buckets), sum(b[4] for b in buckets)

    def _clear_stale(self, ifindex: int) -> str:
        """Remove a leftover of ours attached by netlink; refuse to share a port with another XDP program."""
        kind, prog_id = xdp_state(ifindex)
        if prog_id:
            fd = bpf.prog_fd_by_id(prog_id)
            try:
                name = bpf.prog_info(fd).name
            finally:
                os.close(fd)
            ifname = socket.if_indextoname(ifindex)
            if name != PROG_NAME:
                raise OffloadError(f"{ifname} already has an XDP program ({name!r}, id {prog_id})")
            errors = []
            for flags in (bpf.XDP_FLAGS_SKB_MODE, bpf.XDP_FLAGS_DRV_MODE):  # the mode it was attached in is unknown
                try:
                    _netlink_detach(ifindex, flags)
                except Exception as exc:  # pyroute2's NetlinkError; EBUSY when a BPF link holds the program
                    errors.append(exc)
            if xdp_state(ifindex)[1]:
                why = f" ({errors[-1]})" if errors else ""
                raise OffloadError(
                    f"{ifname}: {PROG_NAME} (id {prog_id}) is held by a live BPF link: is another mplslb balancer "
                    f"running on this port, or one that kept its state pinned under {PIN_ROOT}?{why}"
                )
        return kind

    def _attach(self, ifname: str, ifindex: int, *, native: bool) -> None:
        if native:
            try:
                self._links.append(bpf.link_create(self._prog, ifindex, bpf.BPF_XDP, bpf.XDP_FLAGS_DRV_MODE))
                self.attached[ifname] = "native"
                return
            except bpf.BpfError:
                if self.mode == "native":
                    raise
        self._links.append(bpf.link_create(self._prog, ifindex, bpf.BPF_XDP, bpf.XDP_FLAGS_SKB_MODE))
        self.attached[ifname] = "generic"

    def _open_gso(self, obj: bytes, maps: dict[str, int], kinds: Mapping[int, str]) -> None:
        """The tc program on every port's ingress (tcx links, pinned with the XDP ones when the state is kept) and its
        counters. Every port must be a veth: the program hands a super-packet to the output port's peer."""
        others = [self.interfaces[port_id] for port_id, kind in kinds.items() if kind != "veth"]
        if others:
            raise OffloadError(f"offload_gso needs veth ports: {', '.join(others)} is not one")
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _KEY.size, _NATIVE_U64.size, len(GSO_COUNTERS),
                            name=GSO_MAP_NAME)  # fmt: skip
        self._gso_map = bpf.Map(fd, _KEY.size, _NATIVE_U64.size * possible_cpus(), GSO_MAP_NAME)
        self._tc = bpf.load_program(obj, TC_SECTION, maps | {GSO_MAP_SYMBOL: fd},
                                    prog_type=bpf.BPF_PROG_TYPE_SCHED_CLS, name=TC_PROG_NAME)  # fmt: skip
        for ifindex in self.ifindex.values():
            self._tc_links.append(bpf.link_create(self._tc, ifindex, bpf.BPF_TCX_INGRESS))

    def gso_counters(self) -> dict[str, int]:
        """What the tc program counted (``offload_gso``), by the names of
        :data:`~mplslb.switching.layout.GSO_COUNTERS`, over all CPUs; empty without it."""
        if self._gso_map is None:
            return {}
        out: dict[str, int] = {}
        for index, name in enumerate(GSO_COUNTERS):
            raw = self._gso_map.lookup(_KEY.pack(index)) or b""
            out[name] = sum(v for (v,) in _NATIVE_U64.iter_unpack(raw))
        return out

    def _fold_gso(self) -> None:
        """Add the super-packets the tc program dropped since the last poll to the table's drops, by reason."""
        if self._gso_map is None:
            return
        drops = self.table.drops
        for name, count in self.gso_counters().items():
            if name in GSO_TRAFFIC:
                continue
            new = count - self._gso_folded.get(name, 0)
            if new > 0:
                drops[name] = drops.get(name, 0) + new
                self._gso_folded[name] = count

    def close(self, *, keep: bool = False) -> None:
        """Fold the last counters in, detach from every port and free the map (idempotent). With ``keep`` (and
        pins), leave the pinned program attached and its map switching for the next daemon."""
        if self._map is not None and self._links:
            with contextlib.suppress(OSError):
                self.poll()
        for fd in (*self._links, *self._tc_links):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._links.clear()
        self._tc_links.clear()
        self.attached.clear()
        if self._prog >= 0:
            os.close(self._prog)
            self._prog = -1
        if self._tc >= 0:
            os.close(self._tc)
            self._tc = -1
        if self._gso_map is not None:
            self._gso_map.close()
            self._gso_map = None
        self._gso_folded.clear()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._syn is not None:
            self._syn.close()
            self._syn = None
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        for m in self._ticket_maps.values():
            m.close()
        self._ticket_maps.clear()
        self._flows.clear()
        self._flow_owner.clear()
        self._unowned.clear()
        self._released.clear()
        self._ticketed.clear()
        self._slots[:] = False
        if not keep:
            self._unpin()
        self.table.remove_mirror(self)
        if self in self.table.ack_stores:
            self.table.ack_stores.remove(self)
        self._in_kernel[:] = 0
        self._noted.clear()
        self._withdrawn.clear()
        self._waiting.clear()
        self._measuring.clear()
        self._measured[:] = False
        self._fin_folded[:] = 0
        self._work = None
        self._refreshed.clear()
        self.entries = 0

    def __enter__(self) -> XdpOffload:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keeping the map in step -------------------------------------------------------------------------------
    def installed(self, label: int) -> None:
        if label in self._ticketed:  # a ticket taken in the kernel: its entry is the session's already
            self._ticketed.discard(label)
            if self.measured is not None and self.table.watch[label] & WATCH_ALL:
                c2s = label if is_c2s(label) else label - 1
                self._measuring.setdefault(c2s, ())
                self._measured[c2s] = True
            return
        self._noted.append(label)

    def withdrawn(self, label: int) -> None:
        self._forget(label)  # the session is over: its record tells nothing more
        self._noted.append(label)
        self._withdrawn.add(label)

    def watch_changed(self, label: int) -> None:
        if self.measured is not None and self._in_kernel[label]:
            return  # measured in the kernel: the program drops F_RT itself (and a cleared WATCH_ALL needs no write)
        self._noted.append(label)

    def sync(self) -> int:
        """Write or delete the map entries of the labels changed since the last sync; returns how many map
        elements were written or deleted."""
        if self._released:
            self._flush_released()
        if self._map is None or not self._noted:
            return 0
        noted, self._noted = self._noted, []
        try:
            return self._mirror(dict.fromkeys(noted))
        finally:
            self._withdrawn.clear()

    def _mirror(self, labels: Iterable[int], *, fold: bool = True) -> int:
        """Make the map agree with the table for ``labels`` (distinct); ``fold``: what their entries hold first
        (not for entries that belong to no adopted binding)."""
        labels = list(labels)
        if fold:
            self._fold_entries(labels)
        valid, watch, in_kernel, waiting = self.table.valid, self.table.watch, self._in_kernel, self._waiting
        measure = self.measured is not None
        writes: list[int] = []
        deletes: list[int] = []
        for label in labels:
            if label in self._measuring and in_kernel[label]:
                self.fold(label)  # rewritten (a neighbour's new MAC) mid-measurement: take its record first
            self._kpackets[label] = 0
            self._kbytes[label] = 0
            if valid[label] and self._offloadable(label):
                if measure and watch[label] & WATCH_ALL:
                    writes.append(label)
                    waiting.discard(label)
                    c2s = label if is_c2s(label) else label - 1
                    self._measuring.setdefault(c2s, ())
                    self._measured[c2s] = True
                elif watch[label] & WATCH_ALL:
                    if in_kernel[label]:
                        deletes.append(label)
                    waiting.add(label)
                else:
                    writes.append(label)
                    waiting.discard(label)
            else:
                waiting.discard(label)
                if in_kernel[label]:
                    deletes.append(label)
        return self._delete(deletes) + self._write(writes)

    def _offloadable(self, label: int) -> bool:
        return self.table.in_port[label] in self.ifindex and self.table.out_port[label] in self.ifindex

    def _flags(self, watch: int, *, v6: bool, flow: bool) -> int:
        """An entry's flags for a label with ``watch`` bits."""
        measure = self.measured is not None
        return (
            (F_V6 if v6 else 0)
            | (F_TCP_END if watch & WATCH_TCP_END else 0)
            | (F_FLOW if flow else 0)
            | (F_RT if measure and watch & WATCH_ALL else 0)
            | (F_L7 if measure and watch & WATCH_REQUEST else 0)
            | (F_FIN if self.ended is not None and watch & WATCH_TCP_END else 0)
        )

    def _entry(self, label: int) -> bytes:
        row = self.table.row(label)  # its ACK with the kernel's folded in (_fold_entries) when written again
        dst_ip, ports = flow_parts(row.flow)
        flags = self._flags(row.watch, v6=bool(row.v6), flow=bool(row.flow))
        budget = WATCH_BUDGET if self.measured is not None and is_c2s(label) else 0
        return KERNEL_ENTRY.pack(
            self.ifindex[row.out_port],
            self.ifindex[row.in_port],
            row.rewrite,
            row.peer,
            flags,
            len(row.peer_ip),
            row.peer_ip,
            dst_ip,
            ports,
            0,
            0,
            0,
            row.acks,
            budget,
            *(0,) * 9,
        )

    def _error(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "error").lower()
        self.errors[name] = self.errors.get(name, 0) + 1

    def _open_slots(self, labels: list[int]) -> None:
        """Give the C2S labels among ``labels`` whose entries will be flagged ``F_L7`` an empty request slot (before
        the entries are written); a slot the kernel refuses is counted, and that label's request goes up."""
        if self._requests is None or self.measured is None:
            return
        watch, slots = self.table.watch, self._slots
        wanted = WATCH_ALL | WATCH_REQUEST
        self._write_slots(
            [label for label in labels if is_c2s(label) and watch[label] & wanted == wanted and not slots[label]]
        )

    def _write_slots(self, labels: list[int]) -> None:
        """Write an empty request slot for each of ``labels`` (C2S labels without one), in one call from
        :data:`BATCH_MIN` on; a slot the kernel refuses (the map full: ``e2big``) is counted, and that label's
        request goes up."""
        assert self._requests is not None
        slots = self._slots
        empty = bytes(REQUEST.size)
        batched = len(labels) >= BATCH_MIN
        if batched:
            try:
                self._requests.update_batch(struct.pack(f"={len(labels)}I", *labels), empty * len(labels), len(labels))
            except OSError:
                pass  # how far the batch went is unknown: write each one again (an empty slot written twice is one)
            else:
                slots[labels] = True
                return
        for label in labels:
            try:
                self._requests.update(_KEY.pack(label), empty)
            except OSError as exc:
                self._error(exc)
                if batched:  # the batch may have written it: a label counted slotless must have none
                    with contextlib.suppress(OSError):
                        self._requests.delete(_KEY.pack(label))
            else:
                slots[label] = True

    def _drop_slot(self, label: int) -> None:
        """Delete ``label``'s request slot, if it has one (during a poll's hand-over, with the others at its end)."""
        if self._slots[label] and self._requests is not None:
            self._slots[label] = False
            if self._dropping is not None:
                self._dropping.append(label)
            else:
                self._drop_slots([label])

    def _write(self, labels: list[int]) -> int:
        """Write ``labels``' entries; one the kernel refuses (no memory) stays in userspace and is counted."""
        assert self._map is not None
        if not labels:
            return 0
        self._open_slots(labels)
        failed: set[int] = set()
        if len(labels) >= BATCH_MIN:
            keys = struct.pack(f"={len(labels)}I", *labels)
            try:
                self._map.update_batch(keys, b"".join(self._entry(label) for label in labels), len(labels))
            except OSError:
                failed = set(labels)  # how far the batch went is unknown: write each one again
        if len(labels) < BATCH_MIN or failed:
            failed = set()
            for label in labels:
                try:
                    self._map.update(_KEY.pack(label), self._entry(label))
                except OSError as exc:
                    self._error(exc)
                    failed.add(label)
        if failed:
            labels = [label for label in labels if label not in failed]
            for label in failed:
                if self._in_kernel[label]:  # its old entry would forward for a session that has changed
                    with contextlib.suppress(OSError):
                        self._map.delete(_KEY.pack(label))
                    self._in_kernel[label] = 0
                    self.entries -= 1
        self._written(labels)
        if self.tickets:
            self._write_flows(labels)
        return len(labels)

    def _written(self, labels: list[int]) -> None:
        """``labels``' entries are in the map now, each written afresh: counted, nothing of them folded yet."""
        for label in labels:
            if not self._in_kernel[label]:
                self.entries += 1
            self._in_kernel[label] = 1
            self._kpackets[label] = 0
            self._kbytes[label] = 0
            self._fin_folded[label] = 0  # a new entry: no FIN taken yet
        self.writes += len(labels)

    def _write_flows(self, labels: list[int]) -> None:
        """Tickets: enter the flows of the TCP sessions whose C2S labels are among ``labels`` into the flow map (a
        SYN of a live session's flow then goes up to it)."""
        assert self._map is not None
        t, flows = self.table, self._flows
        keys: list[bytes] = []
        at: list[int] = []
        for label in labels:
            flow = t.flow[label]
            if not is_c2s(label) or not flow or not t.watch[label] & WATCH_TCP_END:
                continue
            size = (len(flow) - 4) // 2
            key = syn_flow_key(flow[:size], flow[size : 2 * size], flow[2 * size :])
            if flows.get(label) != key:
                keys.append(key)
                at.append(label)
        if keys and self._put_flows(keys, at):
            flows.update(zip(at, keys, strict=True))
            self._flow_owner.update(zip(keys, at, strict=True))

    def _put_flows(self, keys: list[bytes], labels: list[int]) -> bool:
        """Write ``keys`` into the flow map, each for the C2S label at its place in ``labels``; False (counted) if
        the kernel refused."""
        m = self._ticket_maps["syn_flows"]
        assert isinstance(m, bpf.Map)
        try:
            m.update_batch(b"".join(keys), struct.pack(f"={len(labels)}I", *labels), len(labels))
        except OSError:
            self.flow_errors += 1
            return False
        return True

    def _delete_flows(self, labels: Iterable[int]) -> None:
        """Take the flows of ``labels`` (C2S labels of sessions ending) out of the flow map."""
        owner = self._flow_owner
        keys: list[bytes] = []
        for label in labels:
            key = self._flows.pop(label, None)
            if key is not None and owner.get(key) == label:  # not a later session's of the same flow
                del owner[key]
                keys.append(key)
        self._delete_flow_keys(keys)

    def _delete_flow_keys(self, keys: list[bytes]) -> None:
        """Delete ``keys`` from the flow map: in one batch, or one by one when the batch stops at one gone already
        (the program deletes the flows it inserted for SYNs it then did not take)."""
        if not keys:
            return
        m = self._ticket_maps["syn_flows"]
        assert isinstance(m, bpf.Map)
        try:
            m.delete_batch(b"".join(keys), len(keys))
        except OSError:
            for key in keys:
                try:
                    m.delete(key)  # False when gone
                except OSError:
                    self.flow_errors += 1

    def _delete(self, labels: list[int]) -> int:
        assert self._map is not None
        if not labels:
            return 0
        try:
            if len(labels) < BATCH_MIN:
                for label in labels:
                    self._map.delete(_KEY.pack(label))
            else:
                self._map.delete_batch(struct.pack(f"={len(labels)}I", *labels), len(labels))
        except OSError as exc:  # never seen; the entries are then taken as gone (the next open starts afresh)
            self._error(exc)
        for label in labels:
            self._in_kernel[label] = 0
            self._drop_slot(label)
            self._fin_folded[label] = 0
        self.entries -= len(labels)
        self.deletes += len(labels)
        if self._flows:
            self._delete_flows(labels)
        return len(labels)

    # -- tickets (offload_syn) -------------------------------------------------------------------------------------
    def set_client_ports(self, ports: Iterable[int]) -> None:
        """The client ports (port ids) a SYN may be taken on, with their MACs (all of them replaced)."""
        elements = [(_KEY.pack(self.ifindex[port]), SYN_PORT.pack(self.table.port_mac(port), 0))
                    for port in ports if port in self.ifindex]  # fmt: skip
        self._replace_all("client_ports", elements)

    def set_services(self, services: Iterable[tuple[bytes, int]]) -> None:
        """The (VIP, TCP port)s whose SYNs may be taken (all of them replaced)."""
        elements = [(SERVICE_KEY.pack(vip, port.to_bytes(2, "big"), 6 if len(vip) == 16 else 4, 0), _KEY.pack(1))
                    for vip, port in services]  # fmt: skip
        self._replace_all("services", elements)

    def _replace_all(self, symbol: str, elements: list[tuple[bytes, bytes]]) -> None:
        """Make the ticket map ``symbol`` hold exactly ``elements`` (key, value)."""
        m = self._ticket_maps[symbol]
        assert isinstance(m, bpf.Map)
        keys, _, count = m.lookup_batch()
        size = m.key_size
        for i in range(count):
            m.delete(keys[i * size : (i + 1) * size])
        for key, value in elements:
            m.update(key, value)

    def ticket_entries(self, server_port: int, server_mac: bytes, c2s_watch: int, s2c_watch: int) -> bytes:
        """A ticket's two entries (C2S, S2C) for a session with a server ``server_mac`` on ``server_port``: what
        does not depend on the client, flagged F_TICKET (the program fills the rest in when it takes a SYN): the
        same for every ticket of the server, so made once."""
        key = (server_port, server_mac, c2s_watch, s2c_watch)
        made = self._ticket_templates.get(key)
        if made is not None:
            return made
        out = self.ifindex[server_port]
        rewrite = server_mac + self.table.port_mac(server_port)
        c_flags = self._flags(c2s_watch, v6=False, flow=True) | F_TICKET
        s_flags = self._flags(s2c_watch, v6=False, flow=True) | F_TICKET
        budget = WATCH_BUDGET if self.measured is not None else 0
        empty_ip, empty_ports = bytes(16), bytes(4)
        c = KERNEL_ENTRY.pack(out, 0, rewrite, bytes(6), c_flags, 0, empty_ip, empty_ip, empty_ports, 0, 0, 0, 0,
                              budget, *(0,) * 9)  # fmt: skip
        s = KERNEL_ENTRY.pack(0, out, bytes(12), server_mac, s_flags, 0, empty_ip, empty_ip, empty_ports, 0, 0, 0, 0,
                              0, *(0,) * 9)  # fmt: skip
        if len(self._ticket_templates) > len(self.ifindex) * 1024:
            self._ticket_templates.clear()  # servers' MACs come and go: bounded
        self._ticket_templates[key] = c + s
        return c + s

    def issue_tickets(self, tickets: list[tuple[int, bytes]]) -> list[int]:
        """Write the entries of ``tickets`` (C2S label, both entries as :meth:`ticket_entries` makes them) and queue
        their C2S labels for the program; returns the C2S labels issued (a ticket the kernel refused is not)."""
        if self._map is None or not tickets:
            return []
        labels = [label for c2s, _ in tickets for label in (c2s, c2s + 1)]
        try:
            self._map.update_batch(struct.pack(f"={len(labels)}I", *labels), b"".join(e for _, e in tickets),
                                   len(labels))  # fmt: skip
        except OSError as exc:
            self._error(exc)
            self._delete_tickets([c2s for c2s, _ in tickets])
            return []
        self._written(labels)
        l7 = [c2s for c2s, entries in tickets if entries[_FLAGS_AT] & F_L7]
        if l7 and self._requests is not None:
            self._write_slots(l7)  # a label left without one has its request go up, as the session manager expects
        queue = self._ticket_maps["tickets"]
        assert isinstance(queue, bpf.Queue)
        issued: list[int] = []
        for c2s, _ in tickets:
            if not queue.push(_KEY.pack(c2s)):
                break
            issued.append(c2s)
        if len(issued) < len(tickets):
            self._delete_tickets([c2s for c2s, _ in tickets[len(issued) :]])
        return issued

    def take_tickets(self) -> list[Taken]:
        """The SYNs the program took under tickets since the last call, in the order it took them. Their labels'
        entries are the sessions' already: the table's install of them writes nothing."""
        taken = self._ticket_maps.get("taken")
        if not isinstance(taken, bpf.RingBuffer | bpf.Queue):
            return []
        records = taken.take_all()
        unowned, self._unowned = self._unowned, set()
        if not records:
            return []
        out: list[Taken] = []
        again: list[int] = []
        offset = self.clock() - time.monotonic()
        for raw in records:
            c2s, ifindex, ns, mac, family, closed, src, dst, ports, length = TAKEN.unpack(raw)
            size = 16 if family == 6 else 4
            self._ticketed.update((c2s, c2s + 1))
            key = self._flows[c2s] = syn_flow_key(src[:size], dst[:size], ports)
            self._flow_owner[key] = c2s
            if key in unowned:  # taken on a released flow the last sync deleted after the program gave it to c2s
                again.append(c2s)
            sport, dport = struct.unpack("!HH", ports)
            out.append(Taken(c2s, self.port_of.get(ifindex, -1), ns * 1e-9 + offset, mac, family, src[:size],
                             dst[:size], sport, dport, length, bool(closed)))  # fmt: skip
        if again:
            self._put_flows([self._flows[c2s] for c2s in again], again)
        return out

    def drain_tickets(self) -> list[int]:
        """Take every ticket out of the program's queue (it takes none of them meanwhile); their C2S labels."""
        queue = self._ticket_maps.get("tickets")
        if not isinstance(queue, bpf.Queue):
            return []
        return [_KEY.unpack_from(raw)[0] for raw in queue.take_all()]

    def revoke_tickets(self, labels: list[int]) -> None:
        """Delete the entries of tickets (C2S labels) out of the queue, or taken but not made sessions."""
        for c2s in labels:
            self._ticketed.discard(c2s)
            self._ticketed.discard(c2s + 1)
        self._delete_tickets(labels)

    def release_flow(self, c2s: int) -> None:
        """Take the flow of the session of ``c2s`` out of the flow map at the next sync: the session is ending (both
        FINs, or an RST) and a new SYN on its flow (the client's port used again) may take a ticket; the fold then
        ends this session as the userspace path ends a reused flow's (:meth:`~mplslb.balancer.Balancer.open_decided`).
        Its labels stay until the session is finished; the sync deletes the flow (:meth:`_flush_released`)."""
        key = self._flows.pop(c2s, None)
        if key is not None and self._flow_owner.get(key) == c2s:
            del self._flow_owner[key]
            self._released.append((key, c2s))

    def _flush_released(self) -> None:
        """Delete the released flows that are not entered again since (by the daemon, or by a ticket folded since),
        in one batch. The program may have given one to a new session since the last read of the taken ring (a SYN
        on the flow of a session it saw close takes a ticket, and the flow's value becomes the new session's): the
        next read finds that ticket on a flow deleted here and enters the flow again for it (:meth:`take_tickets`).
        Until then a copy of the new session's SYN sent again would take a ticket of its own, given back at the
        fold, where the session's flow is entered again."""
        released, self._released = self._released, []
        if not isinstance(self._ticket_maps.get("syn_flows"), bpf.Map):
            return
        owner = self._flow_owner
        keys = list(dict.fromkeys(key for key, _ in released if key not in owner))
        self._delete_flow_keys(keys)
        self._unowned.update(keys)

    @property
    def handed_over_at(self) -> float:
        """The table's time of the last read of the whole map whose records and FINs are all handed over."""
        return self._read_at

    def restore_flow(self, c2s: int) -> None:
        """Enter the flow of the session of ``c2s`` into the flow map again (a ticket taken for the same flow and
        given back deleted it)."""
        self._flows.pop(c2s, None)
        if self._in_kernel[c2s]:
            self._write_flows([c2s])

    def _delete_tickets(self, labels: list[int]) -> None:
        both = [label for c2s in labels for label in (c2s, c2s + 1) if self._in_kernel[label]]
        self._delete(both)

    def ticket_counters(self) -> dict[str, int]:
        """What the program counted of the SYNs it looked at for a ticket, over all CPUs."""
        m = self._ticket_maps.get("ticket_counters")
        if not isinstance(m, bpf.Map):
            return {}
        out: dict[str, int] = {}
        for index, name in enumerate(TICKET_COUNTERS):
            raw = m.lookup(_KEY.pack(index)) or b""
            out[name] = sum(v for (v,) in _NATIVE_U64.iter_unpack(raw))
        return out

    # -- activity ------------------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Add what the kernel forwarded since the last poll to the table's counters and last-seen times, and hand
        every record and FIN over (:meth:`begin_poll` and :meth:`poll_step` until done, in one call); returns how
        many labels had new frames."""
        moved = self.begin_poll()
        while self.poll_step():
            pass
        return moved

    @property
    def polling(self) -> bool:
        """A read of the whole map has records or FINs left to hand over (:meth:`poll_step`)."""
        return self._work is not None

    def begin_poll(self) -> int:
        """Read the whole map (after what an unfinished read left is handed over, and pending changes applied, so no
        count lands on a label's next session): the counters, last-seen times and acknowledgment numbers are folded
        into the table now; the measured sessions' records and the FINs are kept for :meth:`poll_step`, which hands
        them over a chunk at a time. A busy second's thousands of them hold the caller's loop hundreds of
        milliseconds at once; a chunk, a few. Returns how many labels had new frames."""
        if self._map is None:
            return 0
        while self.poll_step():
            pass
        self.sync()
        self._fold_shed()
        self._fold_gso()
        keys, values, count = self._read_map()
        self.polls += 1
        read_at = self.clock()
        if not count:
            self._read_at = read_at
            return 0
        labels = np.frombuffer(keys, dtype=np.uint32).astype(np.intp)
        generation = self.table.arrays().generation
        wanted = np.flatnonzero(self._measured[labels]) if self._measuring else np.zeros(0, dtype=np.intp)
        records = np.frombuffer(values, dtype=RECORD)[wanted]
        at = labels[wanted]
        copies = int(np.count_nonzero((records["request_ns"] != 0) & self._slots[at]))
        fins = self._fins_of(labels, values) if self.ended is not None else np.zeros(0, dtype=np.intp)
        work = PollWork(
            at,
            generation[at],
            records,
            labels[fins],
            generation[labels[fins]],
            np.frombuffer(values, dtype=FIN_RECORD)[fins],
            read_at,
            copies >= BATCH_MIN and 2 * copies >= wanted.size,
        )
        moved = self._fold(labels, np.frombuffer(values, dtype=COUNTERS))
        if work.size:
            self._work = work
        else:
            self._read_at = read_at
        return moved

    def _read_map(self) -> tuple[bytes, bytes, int]:
        """The entries a poll reads (keys, values, count): every entry in the map, or, while the table holds at
        most :data:`READ_BY_KEY_MAX` labels, the entries of those of them in the kernel, looked up one by one. Both
        give every entry the poll uses: it folds nothing of a label not in the table (an outstanding ticket's)."""
        assert self._map is not None
        installed = self.table.installed
        if installed > READ_BY_KEY_MAX:
            return self._map.lookup_batch()
        if not installed:
            return b"", b"", 0
        labels = nonzero_bytes(self._in_kernel)
        labels = labels[self.table.arrays().valid[labels] != 0]
        lookup, pack = self._map.lookup, _KEY.pack
        found: list[int] = []
        values: list[bytes] = []
        for label in labels.tolist():
            value = lookup(pack(label))
            if value is not None:
                found.append(label)
                values.append(value)
        return struct.pack(f"={len(found)}I", *found), b"".join(values), len(found)

    def _fins_of(self, labels: np.ndarray, values: bytes) -> np.ndarray:
        """Where the FINs taken in the kernel and not handed over yet are in a read of ``labels``' entries, in the
        order taken (a taken ticket's waits for its session to be in the table: the tickets are folded before the
        next read)."""
        fins = np.frombuffer(values, dtype=FIN_RECORD)[: labels.size]
        new = (fins["fin_taken"] != 0) & (self._fin_folded[labels] == 0) & (self._in_kernel[labels] != 0)
        new &= self.table.arrays().valid[labels] != 0
        at = np.flatnonzero(new)
        return at[np.argsort(fins["fin_ns"][at], kind="stable")]

    def _read_copies(self) -> dict[int, bytes] | None:
        """Every request slot, by label, in one read of the request map (None if it fails)."""
        assert self._requests is not None
        try:
            keys, raw, count = self._requests.lookup_batch()
        except OSError as exc:
            self._error(exc)
            return None
        size = REQUEST.size
        return {
            label: raw[i * size : (i + 1) * size]
            for i, label in enumerate(np.frombuffer(keys, dtype=np.uint32, count=count).tolist())
        }

    def poll_step(self, limit: int = POLL_CHUNK) -> bool:
        """Hand over up to ``limit`` of the records and FINs the last read of the whole map left; True while more
        are left. Between two steps anything may happen to a session (its caller's loop runs): a row is handed
        over only if its label's generation is still the one read (not withdrawn, nor installed for another
        session since), a record only if its session is still measured and was not folded on its own since (that
        fold read a newer one), a FIN only if not handed over meanwhile and its session's measurement is over. A
        FIN is dated no earlier than the read before, which would have handed it over."""
        work = self._work
        if work is None:
            return False
        done = work.done
        work.done = end = min(done + limit, work.size)
        rows = work.order[done:end]
        is_fin = rows >= work.record_labels.size
        records = not is_fin.all()
        offset = self.clock() - time.monotonic()  # the kernel's clock is CLOCK_MONOTONIC
        if records and work.copies and work.slots is None and self._requests is not None:
            work.slots = self._read_copies()
        self._dropping, self._read_slots = [], work.slots
        try:
            if self.closed is not None and records:
                # whole sessions together, each other session's rows (from its record on) one by one
                starts = np.flatnonzero(~is_fin).tolist()
                self._hand_over_rows(work, rows[: starts[0]], offset)  # the FINs of a session the last step began
                starts.append(rows.size)
                at = 0
                while at < len(starts) - 1:
                    whole = self._hand_over_whole(work, rows[starts[at] :], offset) // 3
                    if whole:
                        at += whole
                        continue
                    self._hand_over_rows(work, rows[starts[at] : starts[at + 1]], offset)
                    at += 1
            else:
                self._hand_over_rows(work, rows, offset)
        finally:
            dropping, self._dropping, self._read_slots = self._dropping, None, None
            self._drop_slots([label for label in dropping if not self._slots[label]])  # not given a slot again since
        if end < work.size:
            return True
        self._work = None
        self._refreshed.clear()
        self._read_at = work.read_at
        return False

    def _hand_over_rows(self, work: PollWork, rows: np.ndarray, offset: float) -> None:
        """Hand over ``rows`` of ``work`` one by one, in order (see :meth:`poll_step`)."""
        if not rows.size:
            return
        split = work.record_labels.size
        is_fin = rows >= split
        at, fin_at = rows[~is_fin], rows[is_fin] - split
        records = zip(
            work.record_labels[at].tolist(),
            work.record_generations[at].tolist(),
            work.records[at].tolist(),
            strict=True,
        )
        fins = zip(
            work.fin_labels[fin_at].tolist(),
            work.fin_generations[fin_at].tolist(),
            work.fins[fin_at].tolist(),
            strict=True,
        )
        generation, valid = self.table.generation, self.table.valid
        in_kernel, fin_folded = self._in_kernel, self._fin_folded
        for fin in is_fin.tolist():
            if not fin:
                c2s, gen, record = next(records)
                if generation[c2s] == gen and c2s in self._measuring and c2s not in self._refreshed:
                    self._hand_over(c2s, record, offset)
                continue
            label, gen, (seq, _, ack, ns) = next(fins)
            c2s = label if is_c2s(label) else label - 1
            if (
                fin_folded[label]
                or generation[label] != gen
                or c2s in self._measuring
                or not (valid[label] and in_kernel[label])
            ):
                continue
            self._end(label, seq, ack, ns, offset)

    def _hand_over_whole(self, work: PollWork, rows: np.ndarray, offset: float) -> int:
        """Hand ``closed`` the sessions at the head of ``rows`` that are each a record and both labels' FINs, all
        three to be handed over (the checks :meth:`poll_step` makes of each row), in one call; returns how many of
        the rows it took (three a session). The rows from the first session it does not take go one by one."""
        split = work.record_labels.size
        n = rows.size // 3
        if not n or rows[1] < split or rows[2] < split:
            return 0
        triples = rows[: 3 * n].reshape(n, 3)
        record_rows, fin_rows = triples[:, 0], triples[:, 1:]
        shaped = (record_rows < split) & np.all(fin_rows >= split, axis=1)
        if not shaped[0]:
            return 0
        n = int(n if shaped.all() else np.argmin(shaped))
        record_rows, fin_rows = record_rows[:n], fin_rows[:n] - split
        c2s = work.record_labels[record_rows].astype(np.int64)
        fin_labels = work.fin_labels[fin_rows].astype(np.int64)
        generation = self.table.arrays().generation
        # the session's two labels, each as read (the C2S label's FIN row is read with its record)
        ok = self._measured[c2s] & np.all(fin_labels - (fin_labels & 1 != C2S_MIN & 1) == c2s[:, None], axis=1)
        ok &= fin_labels[:, 0] != fin_labels[:, 1]
        ok &= np.all(generation[fin_labels] == work.fin_generations[fin_rows], axis=1)
        ok &= np.all(self._fin_folded[fin_labels] == 0, axis=1)
        ok &= np.all((self.table.arrays().valid[fin_labels] != 0) & (self._in_kernel[fin_labels] != 0), axis=1)
        records = work.records[record_rows]
        ok &= np.all(np.stack([records[name] != 0 for name in _RECORD_FIELDS[1:]]), axis=0)
        n = int(n if ok.all() else np.argmin(ok))
        if not n:
            return 0
        c2s, fin_labels, records, fins = c2s[:n], fin_labels[:n], records[:n], work.fins[fin_rows[:n]]
        values = records.tolist()
        measuring, refreshed = self._measuring, self._refreshed
        for i, (label, record) in enumerate(zip(c2s.tolist(), values, strict=True)):
            if label not in measuring or label in refreshed or record == measuring[label]:
                n = i  # folded on its own since the read, or handed over already: one by one
                break
        if not n:
            return 0
        c2s, fin_labels, records, fins, values = c2s[:n], fin_labels[:n], records[:n], fins[:n], values[:n]
        copies: list[bytes | None] = []
        lengths: list[int] = []
        for label in c2s.tolist():
            copy, length = self._copy(label)
            copies.append(copy)
            lengths.append(length)

        def at(ns: np.ndarray) -> np.ndarray:
            return ns.astype(np.float64) * 1e-9 + offset

        fin_at = np.maximum(at(fins["fin_ns"]), self._read_at)
        assert self.closed is not None
        taken = self.closed(
            WholeSessions(
                c2s,
                at(records["answer_ns"]),
                at(records["ack_ns"]),
                at(records["request_ns"]),
                at(records["response_ns"]),
                copies,
                lengths,
                fin_labels[:, 0],
                fins["fin_seq"][:, 0].astype(np.int64),
                fins["fin_ack"][:, 0].astype(np.int64),
                fin_at[:, 0],
                fins["fin_seq"][:, 1].astype(np.int64),
                fins["fin_ack"][:, 1].astype(np.int64),
                fin_at[:, 1],
            )
        )
        if not taken:
            return 0
        done = c2s[:taken]
        self.records += taken
        self.fins += 2 * taken
        self.copies += sum(copy is not None for copy in copies[:taken])
        for label in done.tolist():
            del measuring[label]
        self._measured[done] = False
        self._fin_folded[fin_labels[:taken].ravel()] = 1
        slotted = done[self._slots[done]]
        if slotted.size and self._requests is not None:
            self._slots[slotted] = False
            assert self._dropping is not None
            self._dropping.extend(slotted.tolist())
        self.whole += taken
        return 3 * taken

    def _fold_entries(self, labels: list[int]) -> None:
        """Fold what the kernel forwarded on ``labels``' entries since the last poll into the table before the
        entries are rewritten or taken back to userspace (a rewritten entry's counters start again from zero, a
        deleted one's are gone). Only labels installed all along since the last sync: a withdrawn label's session
        is over, and the entry of one reinstalled since is the ended session's (its acknowledgment number and
        counters are not the new session's). One lookup per such label (a watch or next hop changed: rare)."""
        assert self._map is not None
        found: list[int] = []
        values: list[bytes] = []
        valid, withdrawn = self.table.valid, self._withdrawn
        for label in labels:
            if self._in_kernel[label] and valid[label] and label not in withdrawn:
                value = self._map.lookup(_KEY.pack(label))
                if value is not None:
                    found.append(label)
                    values.append(value)
        if found:
            at = np.array(found, dtype=np.intp)
            if self.ended is not None:  # the entry written again starts without a FIN taken: its record first
                for label in found:
                    c2s = label if is_c2s(label) else label - 1
                    if c2s in self._measuring:
                        self.fold(c2s)  # the session's measurement before its FINs
                self._fold_fins(at, b"".join(values), force=True)
            self._fold(at, np.frombuffer(b"".join(values), dtype=COUNTERS))

    def _fold(self, labels: np.ndarray, counters: np.ndarray) -> int:
        """Add the counters read from ``labels``' entries beyond what was already added; returns how many labels
        had new frames."""
        packets, octets, last_ns = counters["packets"], counters["bytes"], counters["last_ns"]
        # An entry deleted since the read is not counted, nor a taken ticket's before its session is in the table
        # (its install would reset the count): counted at the next poll.
        live = (self._in_kernel[labels] != 0) & (self.table.arrays().valid[labels] != 0)
        self._fold_acks(labels[live], counters["ack"][live])
        moved = live & (packets > self._kpackets[labels])
        if not moved.any():
            return 0
        labels, packets, octets, last_ns = labels[moved], packets[moved], octets[moved], last_ns[moved]
        new_packets = packets - self._kpackets[labels]
        new_bytes = octets - self._kbytes[labels]
        self._kpackets[labels] = packets
        self._kbytes[labels] = octets
        offset = self.clock() - time.monotonic()  # the kernel's clock is CLOCK_MONOTONIC
        self.table.fold_counters(labels, new_packets, new_bytes, last_ns.astype(np.float64) * 1e-9 + offset)
        self.kernel_packets += int(new_packets.sum())
        self.kernel_bytes += int(new_bytes.sum())
        return int(labels.size)

    # -- measurements recorded in the kernel (F_RT) ------------------------------------------------------------
    def fold(self, c2s: int) -> bool:
        """Hand ``c2s``'s record to ``measured`` now, if its session is measured in the kernel and the record
        changed (one map lookup), then the FINs the kernel took under either label of the session and not yet
        handed to ``ended`` (one lookup per label in the kernel whose FIN is not handed over yet); True if the
        measurement record was handed over."""
        if self._map is None:
            return False
        handed = False
        if self._work is not None:
            self._refreshed.add(c2s)  # the read being handed over has an older record of it
        if c2s in self._measuring and self._in_kernel[c2s]:
            raw = self._map.lookup(_KEY.pack(c2s))
            if raw is not None:
                handed = self._hand_over(c2s, _RECORD.unpack_from(raw, _RECORD_AT), self.clock() - time.monotonic())
        if self.ended is not None and c2s not in self._measuring:
            found, values = self._entries([label for label in (c2s, c2s + 1) if not self._fin_folded[label]])
            if found:
                self._fold_fins(np.array(found, dtype=np.intp), values, force=False)
        return handed

    def _entries(self, labels: list[int]) -> tuple[list[int], bytes]:
        """The kernel's entries of those of ``labels`` that are in it and not withdrawn (one lookup each): the
        labels found, and their values back to back."""
        assert self._map is not None
        found: list[int] = []
        values: list[bytes] = []
        for label in labels:
            if self._in_kernel[label] and label not in self._withdrawn:
                value = self._map.lookup(_KEY.pack(label))
                if value is not None:
                    found.append(label)
                    values.append(value)
        return found, b"".join(values)

    def recount(self, c2s: int) -> None:
        """Fold what the kernel counted on ``c2s``'s pair since the last poll into the table now (one lookup per
        label in the kernel): a session about to be judged idle is judged on its frames up to now, not up to the
        last poll, which the loop may have put off under load."""
        if self._map is None:
            return
        found, values = self._entries([c2s, c2s + 1])
        if found:
            self._fold(np.array(found, dtype=np.intp), np.frombuffer(values, dtype=COUNTERS))

    def settled(self, c2s: np.ndarray) -> np.ndarray:
        """Which of the ``c2s`` labels' sessions :meth:`fold` would hand nothing over for (a mask): not measured,
        and no FIN left in either label's entry that was not handed over."""
        if self._map is None:
            return np.ones(c2s.size, dtype=np.bool_)
        in_kernel, folded = self._in_kernel, self._fin_folded
        done: np.ndarray = ~self._measured[c2s]
        for labels in (c2s, c2s + 1):
            done &= (in_kernel[labels] == 0) | (folded[labels] != 0)
        return done

    def fold_fins(self) -> int:
        """Hand every FIN the kernel took and not yet handed over to ``ended`` now, each session's measurement
        record first (one read of the whole map; tests compare the session table with the one-frame path's after
        it). Returns how many were handed over."""
        if self._map is None or self.ended is None:
            return 0
        keys, values, count = self._map.lookup_batch()
        if not count:
            return 0
        labels = np.frombuffer(keys, dtype=np.uint32).astype(np.intp)
        fins = np.frombuffer(values, dtype=FIN_RECORD)["fin_taken"]
        pending = labels[
            (fins != 0)
            & (self._fin_folded[labels] == 0)
            & (self._in_kernel[labels] != 0)
            & (self.table.arrays().valid[labels] != 0)
        ]
        before = self.fins
        for c2s in sorted({label if is_c2s(label) else label - 1 for label in pending.tolist()}):
            self.fold(c2s)
        return self.fins - before

    def _fold_fins(self, labels: np.ndarray, values: bytes, *, force: bool) -> None:
        """Hand the FIN records of ``labels`` (their entries read into ``values``) not handed over yet to ``ended``,
        in the order the kernel took them. A session whose measurement the table has not taken whole yet (its
        record was not taken: the first request is still on its way up) keeps its FINs for a later read, so
        they are not applied before what came before them, unless ``force`` (its entry is about to be written
        again). A FIN is dated no earlier than the last read of the whole map, which would have handed it over."""
        offset = self.clock() - time.monotonic()
        at = self._fins_of(labels, values)
        fins = np.frombuffer(values, dtype=FIN_RECORD)[at]
        for label, (seq, _, ack, ns) in zip(labels[at].tolist(), fins.tolist(), strict=True):
            c2s = label if is_c2s(label) else label - 1
            if not self._fin_folded[label] and (force or c2s not in self._measuring):
                self._end(label, seq, ack, ns, offset)  # else handed over already, or wait for the measurement

    def _end(self, label: int, seq: int, ack: int, ns: int, offset: float) -> None:
        """Hand one FIN the kernel took to ``ended``."""
        assert self.ended is not None
        self._fin_folded[label] = 1
        self.fins += 1
        self.ended(label, seq, ack, max(ns * 1e-9 + offset, self._read_at))

    def _drop_slots(self, labels: list[int]) -> None:
        """Delete the request slots of ``labels`` (marked slotless already), in one call from :data:`BATCH_MIN` on."""
        if not labels or self._requests is None:
            return
        if len(labels) >= BATCH_MIN:
            try:
                self._requests.delete_batch(struct.pack(f"={len(labels)}I", *labels), len(labels))
            except OSError as exc:
                self._error(exc)
            return
        for label in labels:
            try:
                self._requests.delete(_KEY.pack(label))
            except OSError as exc:
                self._error(exc)

    def _hand_over(self, c2s: int, record: tuple[int, ...], offset: float) -> bool:
        """Give ``measured`` a record that changed; forget the label once its session's measurement is over."""
        handed = False
        if record != self._measuring.get(c2s) and (any(record[1:]) or not record[0]) and self.measured is not None:
            rt_left, answer_ns, ack_ns, request_ns, response_ns = record
            answer = answer_ns * 1e-9 + offset if answer_ns else 0.0
            ack = ack_ns * 1e-9 + offset if ack_ns else 0.0
            request = request_ns * 1e-9 + offset if request_ns else 0.0
            response = response_ns * 1e-9 + offset if response_ns else 0.0
            copy, length = self._copy(c2s) if request else (None, 0)
            self.records += 1
            if self.measured(c2s, answer, ack, request, response, rt_left == 0, copy, length):
                self._measuring[c2s] = record  # taken: not handed over again unless it changes
                if copy is not None:
                    self.copies += 1
                    self._drop_slot(c2s)
            handed = True
        watch = self.table.watch
        if not (watch[c2s] & WATCH_ALL or watch[c2s + 1] & WATCH_ALL):
            self._forget(c2s)
        return handed

    def _copy(self, c2s: int) -> tuple[bytes | None, int]:
        """The request copy awaiting in ``c2s``'s slot and the request's length; (None, 0) when none awaits (no
        slot, or the request went up). A request the kernel timed and forwarded but could not copy (its length
        set, nothing copied) gives an empty copy: read as truncated."""
        if not self._slots[c2s] or self._requests is None:
            return None, 0
        raw = self._requests.lookup(_KEY.pack(c2s)) if self._read_slots is None else self._read_slots.get(c2s)
        if raw is None:
            return None, 0
        copied, length, data = REQUEST.unpack(raw)
        return (data[:copied], length) if length else (None, 0)

    def _forget(self, c2s: int) -> None:
        if self._measuring.pop(c2s, None) is not None:
            self._measured[c2s] = False
        self._drop_slot(c2s)

    # -- acknowledgment numbers kept in the kernel ------------------------------------------------------------
    def _fold_acks(self, labels: np.ndarray, kernel: np.ndarray) -> None:
        """Copy the entries' acknowledgment numbers into the table (an entry's is its label's last one)."""
        self.table.arrays().acks[labels] = kernel

    def ack(self, label: int) -> int | None:
        """``ACK_KNOWN | `` the last acknowledgment number of ``label`` (0: none) if it is in the kernel, else None
        (the table's :class:`~mplslb.switching.table.AckStore`)."""
        if self._map is None or not self._in_kernel[label] or label in self._withdrawn:
            return None  # a label reinstalled since the last sync: its entry is still the ended session's
        raw = self._map.lookup(_KEY.pack(label))
        return None if raw is None else int(_NATIVE_U64.unpack_from(raw, _ACK_AT)[0])

    def record_ack(self, label: int, ack: int) -> None:
        """The slow path sent a frame on ``label`` carrying ``ack``: write it into the label's entry, if it is in
        the kernel (see the module docstring)."""
        if self._map is None or not self._in_kernel[label]:
            return
        key = _KEY.pack(label)
        raw = self._map.lookup(key)
        if raw is not None:
            try:
                self._map.update(key, raw[:_ACK_AT] + _NATIVE_U64.pack(ack) + raw[_ACK_AT + 8 :], bpf.BPF_EXIST)
            except OSError as exc:  # the entry went meanwhile
                self._error(exc)

    def _fold_shed(self) -> None:
        """Add the SYNs shed since the last poll to the table's drops (the balancer's figures show them)."""
        shed = self.syn_counters()[1]
        if shed > self._shed_folded:
            drops = self.table.drops
            drops[SHED] = drops.get(SHED, 0) + shed - self._shed_folded
            self._shed_folded = shed

    @property
    def pending(self) -> int:
        """Labels installed in the table and waiting for their measurement to end before they enter the map
        (without a ``measured`` handler; with one they enter at once)."""
        return len(self._waiting)

    def stats(self) -> dict[str, Any]:
        """Figures for the status: entries in the kernel, labels waiting, sessions measured in the kernel and
        records read back, writes, deletes, kernel traffic, SYNs let through and shed."""
        passed, shed = self.syn_counters()
        return (
            {
                "kind": "kernel",
                "attached": dict(self.attached),
                "entries": self.entries,
                "pending": self.pending,
                "measuring": len(self._measuring),
                "records": self.records,
                "copies": self.copies,
                "fins": self.fins,
                "whole": self.whole,
                "writes": self.writes,
                "deletes": self.deletes,
                "polls": self.polls,
                "kernel_packets": self.kernel_packets,
                "kernel_bytes": self.kernel_bytes,
                "errors": dict(self.errors),
                "syn_rate": self.syn_rate,
                "syn_passed": passed,
                "syn_shed": shed,
            }
            | ({"gso": self.gso_counters(), "gso_frame_max": self.frame_max} if self.gso else {})
            | (
                {"ticket_syns": self.ticket_counters(), "flows": len(self._flows), "flow_errors": self.flow_errors}
                if self.tickets
                else {}
            )
        )

    def run(self, frame: bytes, port_id: int) -> bpf.TestRun:
        """Run the program once on ``frame`` as if it came in on ``port_id`` (``BPF_PROG_TEST_RUN``; tests): the
        verdict (``XDP_REDIRECT`` or ``XDP_PASS``) and the frame as the program left it. Counts like real traffic."""
        if self._prog < 0:
            raise ValueError("the offload is not open")
        return bpf.prog_test_run(self._prog, frame, ingress_ifindex=self.ifindex[port_id])

    def run_tc(self, frame: bytes, port_id: int) -> bpf.TestRun:
        """Run the tc program (``gso``) once on ``frame`` as if it came in on ``port_id`` (``BPF_PROG_TEST_RUN``;
        tests): the verdict (``TC_ACT_REDIRECT``, ``TC_ACT_OK`` or ``TC_ACT_SHOT``) and the frame as the program left
        it. Counts like real traffic. An 802.1Q tag stays in a test run's frame (the receive path would have taken it
        off before tc): such a frame reads as unlabelled here."""
        if self._tc < 0:
            raise ValueError("the offload is not open with gso")
        return bpf.prog_test_run_skb(self._tc, frame, ingress_ifindex=self.ifindex[port_id])

    def lookup(self, label: int) -> tuple[int, ...] | None:
        """The map's entry for ``label`` as :data:`~mplslb.switching.layout.KERNEL_ENTRY` fields (tests,
        debugging), or None."""
        if self._map is None:
            return None
        raw = self._map.lookup(_KEY.pack(label))
        return None if raw is None else KERNEL_ENTRY.unpack(raw)
