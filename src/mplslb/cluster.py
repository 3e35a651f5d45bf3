"""Several balancer nodes behind ECMP: label slices per node and session state replicated to every peer.

Theory of operation
-------------------
A router spreads the clients' flows over the nodes by a hash of each flow (ECMP); when a node leaves or joins the
set, many flows change node. Any node must then carry any established session with the same checks as its owner.
Two facts make that possible (docs/architecture.md weighs them against the alternatives):

* **Labels partitioned per node.** ``[cluster] node = i, nodes = n`` gives node i the i-th of n equal slices of the
  label range (:meth:`~mplslb.config.ClusterConfig.slice`): its label manager allocates only there, so two nodes
  never hand out the same pair and a label's owner is computable from it. The session and label switching tables
  still span every slice, for the peers' sessions.
* **Session state replicated**, as IPVS's sync daemon does. Every session opened and every change of its state is
  sent to every peer in batched UDP datagrams (:class:`ClusterSync`, driven by the daemon's loop or the
  simulator). A peer installs the session as a *replica*: a row of its own session table and both labels in its
  own label switching table, bound node-locally (its own ingress port, the server's MAC as this node knows it,
  the client's address, MAC and flow), so a frame that ECMP moves there is switched with the same checks, and a
  forged label finds nothing or fails them exactly as on the owner.

What a record carries is the session itself (label, state, flow, client port and MAC, server by name) and how long
ago each direction was last seen and the session started, in milliseconds: ages, not times, because every node has
its own monotonic clock. Records are idempotent upserts, so the same record serves a new session, a change, a
keep-alive and a full dump. Only live states travel. A session's end is each node's own decision from the same
facts: FIN and RST (the ENDING state) are synced like any change, and every node closes the session when its linger
or idle timeout expires with no activity, activity being what its own frames show plus what the keep-alives tell;
an ENDING session revived by its traffic is each node's own reading of that activity too, so a revival is not sent
(a node that closed a session its peer revived gets it back from the next keep-alive).

**Keep-alives**: every ``keepalive`` seconds a node sends a record of each session whose labels carried frames
here since its peers last heard of them, if that was more than ``refresh`` seconds ago (at every round for an
ENDING session, whose linger is short). It keeps, per label, the last-seen time its peers know of, so a refresh it
received is not echoed back. A replica whose frames pass elsewhere is therefore kept alive while they do (idle
timeouts are minutes, ``refresh`` seconds), and times out by the usual idle timeouts when the node carrying them
goes silent. The keep-alives cost one record per active session per ``refresh`` at every peer.

**Joining**: a node with peers starts unsynced and says so in its hellos (``want dump``); each peer that hears it
sends every live session it holds, then a ``dump done`` message. The node is synced when every peer has finished
its dump, or has stayed silent past ``join_timeout`` (a peer that is down has nothing to give). The lab announces a
node by BGP only once it is synced (``mplslb status``: ``cluster.synced``). A restarted node finds its own old
sessions in the dumps: their labels are claimed in its label manager (:meth:`~mplslb.labels.LabelManager.claim`),
so it does not hand them out again.

**Peers changed by a reload**: ``[cluster] peers`` is the one key of the table a running node takes from a new
configuration (:meth:`ClusterSync.set_peers`); ``node`` and ``nodes`` cannot change, so a cluster meant to grow is
configured with ``nodes`` (its label slices) at the size it may reach, and a node added later takes a slice nobody
has used. A peer gone is forgotten; a new one is sent a full dump as soon as it is first heard from, so it has every
session whether it joined before or after this node learnt of it.

**The wire format** (version 1), big-endian::

    header  magic "MLSC" | version u8 | kind u8 | node u8 | flags u8 | epoch u32 | seq u32 | count u16   (18 bytes)
    record  c2s u32 | state u8 | proto u8 | address length u8 | flags u8 | idle C2S ms u32 | idle S2C ms u32 |
            age ms u32 | client port u16 | client MAC 6 | sport u16 | dport u16 | server name length u8 |
            server name | source address | destination address                                   (38 bytes + ...)
    tag     HMAC-SHA256(key, header and records), first 16 bytes, when flags has AUTH

``kind`` is 1 (records), 2 (hello: flags WANT_DUMP and SYNCED say the sender's state) or 3 (dump done). ``epoch``
is the sender's random incarnation number and ``seq`` counts its datagrams: a datagram of a known epoch whose
``seq`` is not newer than the last one taken is a replay and dropped. With a key (``[cluster] key_file``) every
datagram without a valid tag is dropped; without one only the configured peers' source addresses are taken, and
anybody able to send from such an address could install sessions: give the cluster a key, or a sync network of
its own. A malformed or unauthenticated datagram is counted under a named reason (:attr:`ClusterSync.drops`) and
dropped; a well-formed record that cannot be installed here (an unknown server, a label another session holds) is
counted under its reason too and skipped.

Costs: each new session is installed on every node, so the cluster's new-session rate is capped by one node's
install rate however many nodes there are (full replication); frames cost nothing more per frame, since a replica
is an ordinary row of the label switching table.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from hashlib import sha256
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mplslb.config import ClusterConfig
from mplslb.flow import FlowKey
from mplslb.sessions import FINAL_STATES, STATE_CODES, Session, SessionEvent, SessionState
from mplslb.wire.ethernet import ETH_ALEN

if TYPE_CHECKING:
    from mplslb.balancer import Balancer

MAGIC = b"MLSC"
VERSION = 1
KIND_RECORDS, KIND_HELLO, KIND_DUMP_DONE = 1, 2, 3
KINDS = (KIND_RECORDS, KIND_HELLO, KIND_DUMP_DONE)
FLAG_AUTH, FLAG_WANT_DUMP, FLAG_SYNCED = 1, 2, 4
HEADER = struct.Struct("!4sBBBBIIH")
RECORD = struct.Struct("!IBBBBIIIH6sHHB")
TAG_LEN = 16
#: The largest datagram a node sends (fits a 1500-byte MTU with IPv6 and UDP headers).
MAX_DATAGRAM = 1400
#: The states a record may carry, by their wire code.
WIRE_STATES: tuple[SessionState, ...] = (
    SessionState.START,
    SessionState.ANSWERED,
    SessionState.ESTABLISHED,
    SessionState.CLOSING_CLIENT,
    SessionState.CLOSING_SERVER,
    SessionState.ENDING,
)
_STATE_CODE = {state: code for code, state in enumerate(WIRE_STATES)}
_REQUEST_SEEN = 1
_MS_MAX = 0xFFFFFFFF
#: Records of a dump sent to a joining peer per :meth:`ClusterSync.poll` (the rest at the next).
DUMP_BUDGET = 4096


class SyncError(ValueError):
    """A datagram that cannot be taken, with the drop reason it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionRecord(NamedTuple):
    """One session as a sync record carries it (times as ages in seconds, relative to the sender's clock)."""

    c2s: int
    state: SessionState
    key: FlowKey
    client_port: int
    client_mac: bytes
    server: str
    idle_c2s: float
    idle_s2c: float
    age: float
    request_seen: bool = False


class Message(NamedTuple):
    kind: int
    node: int
    flags: int
    epoch: int
    seq: int
    records: tuple[SessionRecord, ...]


def _ms(seconds: float) -> int:
    return min(_MS_MAX, max(0, int(seconds * 1000.0)))


def encode_record(record: SessionRecord) -> bytes:
    """The wire form of ``record`` (ValueError for what the format cannot carry)."""
    key = record.key
    name = record.server.encode()
    if len(name) > 255 or len(key.src) not in (4, 16) or len(key.dst) != len(key.src):
        raise ValueError("a record needs a server name of at most 255 bytes and two addresses of one IP version")
    return (
        RECORD.pack(
            record.c2s,
            _STATE_CODE[record.state],
            key.proto,
            len(key.src),
            _REQUEST_SEEN if record.request_seen else 0,
            _ms(record.idle_c2s),
            _ms(record.idle_s2c),
            _ms(record.age),
            record.client_port,
            record.client_mac,
            key.sport,
            key.dport,
            len(name),
        )
        + name
        + key.src
        + key.dst
    )


def encode(
    kind: int,
    node: int,
    epoch: int,
    seq: int,
    records: Iterable[bytes] = (),
    *,
    flags: int = 0,
    key: bytes = b"",
) -> bytes:
    """A datagram of already encoded ``records``, authenticated with ``key`` when one is given."""
    parts = list(records)
    flags = (flags | FLAG_AUTH) if key else (flags & ~FLAG_AUTH)
    data = HEADER.pack(MAGIC, VERSION, kind, node, flags, epoch, seq & 0xFFFFFFFF, len(parts)) + b"".join(parts)
    if key:
        data += hmac.new(key, data, sha256).digest()[:TAG_LEN]
    return data


def decode(data: bytes, key: bytes = b"") -> Message:
    """The message in ``data``, or :class:`SyncError` naming why it is dropped."""
    if len(data) < HEADER.size:
        raise SyncError("short")
    magic, version, kind, node, flags, epoch, seq, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SyncError("bad_magic")
    if version != VERSION:
        raise SyncError("bad_version")
    end = len(data)
    if key:
        if not flags & FLAG_AUTH or end < HEADER.size + TAG_LEN:
            raise SyncError("unauthenticated")
        end -= TAG_LEN
        if not hmac.compare_digest(hmac.new(key, data[:end], sha256).digest()[:TAG_LEN], data[end:]):
            raise SyncError("bad_tag")
    elif flags & FLAG_AUTH:
        raise SyncError("unexpected_tag")  # the peer has a key and this node none: a configuration mismatch
    if kind not in KINDS:
        raise SyncError("bad_kind")
    if node == 0:
        raise SyncError("bad_node")
    at = HEADER.size
    records: list[SessionRecord] = []
    for _ in range(count):
        if at + RECORD.size > end:
            raise SyncError("truncated_record")
        (c2s, state, proto, alen, rflags, idle_c2s, idle_s2c, age, client_port, client_mac, sport, dport,
         name_len) = RECORD.unpack_from(data, at)  # fmt: skip
        at += RECORD.size
        if state >= len(WIRE_STATES):
            raise SyncError("bad_state")
        if alen not in (4, 16):
            raise SyncError("bad_address_length")
        if at + name_len + 2 * alen > end:
            raise SyncError("truncated_record")
        try:
            name = data[at : at + name_len].decode()
        except UnicodeDecodeError:
            raise SyncError("bad_server_name") from None
        at += name_len
        src, dst = data[at : at + alen], data[at + alen : at + 2 * alen]
        at += 2 * alen
        records.append(
            SessionRecord(
                c2s,
                WIRE_STATES[state],
                FlowKey(proto, src, sport, dst, dport),
                client_port,
                client_mac,
                name,
                idle_c2s / 1000.0,
                idle_s2c / 1000.0,
                age / 1000.0,
                bool(rflags & _REQUEST_SEEN),
            )
        )
    if at != end:
        raise SyncError("trailing_bytes")
    return Message(kind, node, flags & ~FLAG_AUTH, epoch, seq, tuple(records))


@dataclass
class Peer:
    """What a node knows of one peer (by its configured sync address)."""

    address: tuple[str, int]
    node: int = 0
    epoch: int = -1
    seq: int = 0
    last_heard: float | None = None
    synced: bool = False  # the peer's own flag, from its hellos
    dump_done: bool = False  # it finished the dump this node asked for
    dump_queue: list[int] = field(default_factory=list)  # labels still to send it (it asked for a dump)
    dumping: bool = False
    dumped_at: float | None = None  # when this node last finished a dump to it
    restarts: int = 0
    joined: bool = False  # added by a reload (:meth:`ClusterSync.set_peers`): dumped to once it is heard from

    def alive(self, now: float, timeout: float) -> bool:
        return self.last_heard is not None and now - self.last_heard <= timeout


class ClusterSync:
    """One node's end of the session sync (sans-I/O): :meth:`receive` each datagram from a peer's address, and call
    :meth:`poll` every ``flush`` seconds, sending each ``(address, datagram)`` it returns."""

    def __init__(self, balancer: Balancer, config: ClusterConfig, now: float, *, epoch: int | None = None) -> None:
        self.balancer = balancer
        self.config = config
        self.node = config.node
        self.epoch = int.from_bytes(os.urandom(4), "big") if epoch is None else epoch
        self.seq = 0
        own = (config.sync_address, config.sync_port)  # a peers list shared by every node may name this one too
        self.peers = {address: Peer(address) for address in config.peers if address != own}
        self.pending: dict[int, None] = {}  # labels of sessions opened or changed since the last poll
        self.drops: dict[str, int] = {}
        self.sent = {"datagrams": 0, "records": 0, "bytes": 0}
        self.received = {"datagrams": 0, "records": 0}
        self.applied = {"installed": 0, "updated": 0, "refreshed": 0, "replaced": 0, "claimed": 0}
        self.synced = not self.peers
        self.started = now
        self._next_keepalive = now
        # Per label, the last-seen time this node's peers know of (what it told them or they told it).
        self._told = np.zeros(balancer.switching.arrays().last_seen.size, dtype=np.float64)
        self._applying = False
        balancer.sessions.on_change = self._changed

    # -- changes here --------------------------------------------------------------------------------------------
    def set_peers(self, peers: Iterable[tuple[str, int]]) -> None:
        """Take a new peers list (a reload of ``[cluster] peers``): peers gone are forgotten, and each new one is
        sent every live session this node holds as soon as it is first heard from (unless it asks for a dump
        itself first), so a node that joined before this one knew of it misses none of them."""
        own = (self.config.sync_address, self.config.sync_port)
        wanted = [address for address in dict.fromkeys(peers) if address != own]
        self.peers = {a: self.peers.get(a) or Peer(a, joined=True) for a in wanted}
        self.config = replace(self.config, peers=tuple(wanted))

    def _dump_to(self, peer: Peer) -> None:
        rows, _ = self.balancer.sessions.occupied()
        peer.dump_queue = [int(c2s) for c2s in self.balancer.sessions.c2s_min + 2 * rows]
        peer.dumping, peer.dumped_at, peer.joined = True, None, False

    def _changed(self, session: Session, event: SessionEvent | None) -> None:
        # A revival is each node's own reading of the activity it knows (see the module docstring), as a close is.
        if not self._applying and event is not SessionEvent.REVIVE:
            self.pending[session.c2s] = None

    def record_of(self, session: Session, now: float) -> SessionRecord:
        seen = self.balancer.switching.last_seen
        return SessionRecord(
            session.c2s,
            session.state,
            session.key,
            session.client_port,
            session.client_mac,
            session.server.config.name,
            now - seen[session.c2s],
            now - seen[session.s2c],
            now - session.started,
            bool(session.request_at),
        )

    def _encoded(self, labels: Iterable[int], now: float) -> list[bytes]:
        """The records of the live sessions on ``labels`` (those ended since are left out)."""
        table, switching = self.balancer.sessions, self.balancer.switching
        out = []
        for c2s in labels:
            session = table.by_c2s(c2s)
            if session is None or session.state in FINAL_STATES:
                continue
            out.append(encode_record(self.record_of(session, now)))
            self._told[c2s] = switching.last_seen[c2s]
            self._told[c2s + 1] = switching.last_seen[c2s + 1]
        return out

    def _datagrams(self, kind: int, records: list[bytes], flags: int = 0) -> list[bytes]:
        """``records`` packed into as few datagrams as fit :data:`MAX_DATAGRAM` (one, empty, when there are none)."""
        room = MAX_DATAGRAM - HEADER.size - (TAG_LEN if self.config.key else 0)
        batches: list[list[bytes]] = [[]]
        size = 0
        for record in records:
            if batches[-1] and size + len(record) > room:
                batches.append([])
                size = 0
            batches[-1].append(record)
            size += len(record)
        if kind == KIND_RECORDS and not records:
            return []
        out = []
        for batch in batches:
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            out.append(encode(kind, self.node, self.epoch, self.seq, batch, flags=flags, key=self.config.key))
            self.sent["records"] += len(batch)
        return out

    def _hello_flags(self) -> int:
        return FLAG_SYNCED if self.synced else FLAG_WANT_DUMP

    def poll(self, now: float) -> list[tuple[tuple[str, int], bytes]]:
        """What to send now: the pending changes to every peer, the keep-alive round and hello when due, the next
        part of each dump a peer asked for; and the joining node's synced flag is settled."""
        out: list[tuple[tuple[str, int], bytes]] = []
        labels = self.pending
        self.pending = {}
        if now >= self._next_keepalive:
            self._next_keepalive = now + self.config.keepalive
            labels.update(dict.fromkeys(self.active_labels()))
            for datagram in self._datagrams(KIND_HELLO, [], self._hello_flags()):
                out += [(address, datagram) for address in self.peers]
        if labels and self.peers:
            for datagram in self._datagrams(KIND_RECORDS, self._encoded(labels, now)):
                out += [(address, datagram) for address in self.peers]
        for peer in self.peers.values():
            if peer.dumping:
                part, peer.dump_queue = peer.dump_queue[:DUMP_BUDGET], peer.dump_queue[DUMP_BUDGET:]
                out += [(peer.address, d) for d in self._datagrams(KIND_RECORDS, self._encoded(part, now))]
                if not peer.dump_queue:
                    peer.dumping, peer.dumped_at = False, now
                    out += [(peer.address, d) for d in self._datagrams(KIND_DUMP_DONE, [])]
        if not self.synced:
            late = now >= self.started + self.config.join_timeout
            timeout = self.config.peer_timeout
            self.synced = all(p.dump_done or (late and not p.alive(now, timeout)) for p in self.peers.values())
        for _, datagram in out:
            self.sent["datagrams"] += 1
            self.sent["bytes"] += len(datagram)
        return out

    def active_labels(self) -> list[int]:
        """C2S labels of the live sessions whose frames passed here since this node's peers last heard of them,
        more than ``refresh`` seconds later (any later for an ENDING session)."""
        table = self.balancer.sessions
        rows, _ = table.occupied()
        if not rows.size:
            return []
        c2s = table.c2s_min + 2 * rows
        seen = self.balancer.switching.arrays().last_seen
        told = self._told
        ending = np.frombuffer(table.state, dtype=np.uint8)[rows] == STATE_CODES[SessionState.ENDING]
        margin = np.where(ending, 0.0, self.config.refresh)
        fresh = (seen[c2s] > told[c2s] + margin) | (seen[c2s + 1] > told[c2s + 1] + margin)
        return [int(label) for label in c2s[fresh]]

    def next_deadline(self) -> float:
        return min(self._next_keepalive, self.started + self.config.join_timeout)

    # -- datagrams from peers ------------------------------------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def receive(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """Take one datagram from ``source`` (address, port); anything wrong with it is counted and dropped."""
        self.received["datagrams"] += 1
        peer = self.peers.get(source) or next((p for p in self.peers.values() if p.address[0] == source[0]), None)
        if peer is None:
            self._drop("unknown_peer")
            return
        try:
            message = decode(data, self.config.key)
        except SyncError as exc:
            self._drop(exc.reason)
            return
        if message.node == self.node or (peer.node and message.node != peer.node):
            self._drop("wrong_node")
            return
        if message.epoch == peer.epoch:
            if (message.seq - peer.seq) & 0xFFFFFFFF >= 0x80000000 or message.seq == peer.seq:
                self._drop("replayed")
                return
        elif peer.epoch != -1:
            peer.restarts += 1
            peer.synced, peer.dumped_at = False, None
        peer.node, peer.epoch, peer.seq, peer.last_heard = message.node, message.epoch, message.seq, now
        if peer.joined and not peer.dumping and not message.flags & FLAG_WANT_DUMP:
            self._dump_to(peer)
        if message.kind == KIND_HELLO:
            peer.synced = bool(message.flags & FLAG_SYNCED)
            recent = peer.dumped_at is not None and now - peer.dumped_at < 2 * self.config.keepalive
            if message.flags & FLAG_WANT_DUMP and not peer.dumping and not recent:  # (a hello sent before it was done)
                self._dump_to(peer)
        elif message.kind == KIND_DUMP_DONE:
            peer.dump_done = True
        else:
            self.received["records"] += len(message.records)
            self.apply(message.records, message.node, now)

    def apply(self, records: Iterable[SessionRecord], sender: int, now: float) -> None:
        """Install or update the sessions ``records`` describe, as node ``sender`` sent them."""
        self._applying = True
        try:
            mine = [r.c2s for r in records if self.config.owner_of(r.c2s) == self.node]
            fresh = [c2s for c2s in mine if self.balancer.sessions.by_c2s(c2s) is None]
            if fresh:
                self.applied["claimed"] += len(self.balancer.labels.claim(fresh))
            for record in records:
                reason = self._apply(record, sender, now)
                if reason:
                    self._drop(reason)
        finally:
            self._applying = False

    def _apply(self, record: SessionRecord, sender: int, now: float) -> str:
        b = self.balancer
        c2s = record.c2s
        table = b.sessions
        if not (table.c2s_min <= c2s < table.c2s_min + 2 * table.rows and (c2s - table.c2s_min) % 2 == 0):
            return "label_out_of_range"
        if record.server not in b.pool:
            return "unknown_server"
        server = b.pool.get(record.server)
        if len(server.mac) != ETH_ALEN:
            return "server_unresolved"
        owner = self.config.owner_of(c2s)
        session = table.by_c2s(c2s)
        if session is not None and session.key != record.key:
            if owner == self.node or sender != owner:
                return "label_conflict"  # this node's own allocation, or not the owner's word: keep it
            table.apply(session, SessionEvent.IDLE_TIMEOUT, now, "replaced")
            b._finish(session, now)
            self.applied["replaced"] += 1
            session = None
        seen = (now - record.idle_c2s, now - record.idle_s2c)
        if session is not None:
            if session.state in FINAL_STATES:
                return "session_ended"
            if table.assume(session, record.state, now):
                self.applied["updated"] += 1
            b.switching.fold_counters(
                np.array([c2s, c2s + 1]), np.zeros(2, np.uint64), np.zeros(2, np.uint64), np.array(seen)
            )
            self._told[c2s] = max(self._told[c2s], seen[0])
            self._told[c2s + 1] = max(self._told[c2s + 1], seen[1])
            self.applied["refreshed"] += 1
            return ""
        if owner == self.node and not b.labels.in_use(c2s):
            return "own_label_ended"  # ended here, its pair quarantined: a peer's late word
        if table.lookup(record.key) is not None:
            return "flow_conflict"  # the same flow under another label here
        port = self._client_port(record.client_port)
        if port is None:
            return "no_client_port"
        key = record.key
        session = table.open(
            key, c2s, server, client_port=port, client_mac=record.client_mac, ip_version=6 if len(key.src) == 16
            else 4, now=now
        )  # fmt: skip
        table.start_time[session.pair] = now - record.age
        table.rt_budget[session.pair] = 0
        if record.request_seen:
            table.request_seen(session, now - record.age)
        b.pool.session_started(server)
        table.assume(session, record.state, now)
        b.install_labels(session, now, watched=False, seen=seen)
        self._told[c2s], self._told[c2s + 1] = seen
        self.applied["installed"] += 1
        return ""

    def _client_port(self, port_id: int) -> int | None:
        """This node's port for a client port of a peer: the same id if it is a client port here, else the first
        client port."""
        ports = self.balancer.ports
        if port_id in ports and ports[port_id].role == "client":
            return port_id
        return next((p.port_id for p in ports.values() if p.role == "client"), None)

    # -- figures -------------------------------------------------------------------------------------------------
    def replicas(self) -> int:
        """Sessions in the table on labels outside this node's slice."""
        rows, _ = self.balancer.sessions.occupied()
        c2s = self.balancer.sessions.c2s_min + 2 * rows
        first, last = self.config.slice()
        return int(np.count_nonzero((c2s < first) | (c2s > last)))

    def status(self, now: float) -> dict[str, Any]:
        """The node's cluster figures for ``mplslb status`` and the control socket (JSON-serialisable)."""
        first, last = self.config.slice()
        timeout = self.config.peer_timeout
        return {
            "node": self.node,
            "nodes": self.config.nodes,
            "labels": [first, last + 1],
            "synced": self.synced,
            "sync": f"{self.config.sync_address}:{self.config.sync_port}",
            "authenticated": bool(self.config.key),
            "replicas": self.replicas(),
            "peers": [
                {
                    "address": f"{p.address[0]}:{p.address[1]}",
                    "node": p.node or None,
                    "alive": p.alive(now, timeout),
                    "last_heard": None if p.last_heard is None else round(now - p.last_heard, 3),
                    "synced": p.synced,
                    "dump_done": p.dump_done,
                    "restarts": p.restarts,
                }
                for p in self.peers.values()
            ],
            "sent": dict(self.sent),
            "received": dict(self.received),
            "applied": dict(self.applied),
            "drops": dict(self.drops),
        }


__all__ = [
    "FLAG_SYNCED",
    "FLAG_WANT_DUMP",
    "HEADER",
    "KIND_DUMP_DONE",
    "KIND_HELLO",
    "KIND_RECORDS",
    "MAGIC",
    "MAX_DATAGRAM",
    "RECORD",
    "VERSION",
    "ClusterSync",
    "Message",
    "Peer",
    "SessionRecord",
    "SyncError",
    "decode",
    "encode",
    "encode_record",
]
