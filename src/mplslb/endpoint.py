"""The endpoints' part of the method (claims 8, 12, 13, 14): answer a session label with its pair, no signalling.

Theory of operation
-------------------
Both sides keep one small table: flow key (as the local host sends it) -> the label to attach, learned from the
labelled frames that arrive. Nothing is signalled (claim 14):

* a **server** that receives C2S label ``L`` answers with S2C label ``L + 1`` (claim 8 step 3, claim 13). The
  server owns the virtual IP and replies from it, so the balancer never maps the virtual IP to a real address
  (claim 12); a reply not from a virtual IP is refused here (``not_from_vip``).
* a **client** that receives S2C label ``M`` sends the rest of the session with C2S label ``M - 1`` (claim 8
  steps 6-7). A session's first packet (and any TCP SYN, so a reused port starts afresh) goes unlabelled: the
  balancer analyses it and picks the server.

The endpoint objects are sans-I/O: ``from_wire(frame, now)`` gives the IP packet for the host (labels stripped)
and ``from_host(packet, now)`` gives the Ethernet frame for the wire. Flows idle for ``flow_timeout`` are forgotten
on :meth:`Endpoint.on_timer`. The agents put these objects between a TUN device and the wire.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from mplslb.analyzer import Analysis, PacketAnalyzer
from mplslb.flow import FlowKey
from mplslb.labels import c2s_of, is_c2s, is_s2c, s2c_of
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet, parse_ethernet
from mplslb.wire.mpls import ENTRY, encode_entry, parse_stack
from mplslb.wire.tcp import TCPFlag

_SYN_ONLY = int(TCPFlag.SYN)
_SYN_MASK = int(TCPFlag.SYN | TCPFlag.ACK)


class Flow:
    """A learned flow: the label to attach, the MAC address to send to, when it was last used and last heard."""

    __slots__ = ("heard", "label", "last", "peer", "timer")

    def __init__(self, label: int, peer: bytes, last: float) -> None:
        self.label, self.peer, self.last = label, peer, last
        self.heard = last  # the last labelled frame of the flow from the wire
        self.timer = 0  # serial of this flow's live expiry entry


#: How long an endpoint keeps an idle flow's label (the agents' default ``flow_timeout``). The balancer's label
#: quarantine must be at least this long (``labels.endpoint_flow_timeout``), so a label an endpoint may still send
#: is not reused for another session while other pairs are free (when none is, the labels' flow binding keeps the
#: endpoint's late frames from the next session).
ENDPOINT_FLOW_TIMEOUT = 60.0


class Endpoint:
    """What both endpoint sides share: the flow -> label table, its expiry, and counters."""

    def __init__(self, *, mac: bytes, flow_timeout: float = ENDPOINT_FLOW_TIMEOUT, ttl: int = 64) -> None:
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes")
        self.mac = bytes(mac)
        self.flow_timeout = flow_timeout
        self.ttl = ttl
        self.analyzer = PacketAnalyzer(l7=False)
        self.flows: dict[FlowKey, Flow] = {}  # keyed as the local host sends the flow
        self._expiry: list[tuple[float, int, FlowKey]] = []  # heap of (deadline, serial, key)
        self._serial = 0
        self.counters: dict[str, int] = {}
        self.drops: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _learn(self, key: FlowKey, label: int, peer: bytes, now: float) -> None:
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = Flow(label, peer, now)
            self._arm(now + self.flow_timeout, key, flow)
        else:
            flow.label, flow.peer, flow.last, flow.heard = label, peer, now, now

    def _arm(self, deadline: float, key: FlowKey, flow: Flow) -> None:
        self._serial += 1
        flow.timer = self._serial
        heapq.heappush(self._expiry, (deadline, self._serial, key))

    def label_for(self, key: FlowKey) -> int | None:
        """The label this side attaches to ``key``'s packets, if learned."""
        flow = self.flows.get(key)
        return None if flow is None else flow.label

    def _strip(self, frame: bytes | memoryview) -> tuple[int, bytes, bytes] | None:
        """(top label, sender MAC, IP packet) of a labelled frame; None (counted) if it is not one."""
        try:
            eth = parse_ethernet(frame)
            if eth.ethertype != ETH_P_MPLS_UC:
                return None
            entries, end = parse_stack(frame, eth.payload_offset)
        except WireError as exc:
            self._drop(exc.reason)
            return (-1, b"", b"")
        return entries[0].label, bytes(eth.src), bytes(frame[end:])

    def _analyze(self, packet: bytes | memoryview) -> Analysis | None:
        """The packet's flow key and kind, or None (counted under the codec's reason)."""
        try:
            return self.analyzer.analyze_ip(packet)
        except WireError as exc:
            self._drop(exc.reason)
            return None

    def _labelled(self, dst_mac: bytes, label: int, packet: bytes | memoryview) -> bytes:
        header = build_ethernet(dst_mac, self.mac, ETH_P_MPLS_UC)
        return header + ENTRY.pack(encode_entry(label, 0, True, self.ttl)) + bytes(packet)

    def next_deadline(self) -> float | None:
        return self._expiry[0][0] if self._expiry else None

    def on_timer(self, now: float) -> int:
        """Forget flows idle for ``flow_timeout``; returns how many."""
        forgotten = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, serial, key = heapq.heappop(self._expiry)
            flow = self.flows.get(key)
            if flow is None or flow.timer != serial:
                continue  # forgotten, or replaced by a new flow with its own entry
            if flow.last + self.flow_timeout <= now:
                del self.flows[key]
                forgotten += 1
            else:
                self._arm(flow.last + self.flow_timeout, key, flow)
        return forgotten


class ServerEndpoint(Endpoint):
    """A labelled server: C2S label L in, S2C label L + 1 out, replies from the virtual IP."""

    def __init__(
        self, *, mac: bytes, vips: Iterable[bytes], flow_timeout: float = ENDPOINT_FLOW_TIMEOUT, ttl: int = 64
    ) -> None:
        super().__init__(mac=mac, flow_timeout=flow_timeout, ttl=ttl)
        self.vips = frozenset(bytes(v) for v in vips)

    def from_wire(self, frame: bytes | memoryview, now: float) -> bytes | None:
        """A frame from the balancer: returns the IP packet for the host, or None (counted)."""
        stripped = self._strip(frame)
        if stripped is None:
            self._drop("unlabelled")
            return None
        label, sender, packet = stripped
        if label < 0:
            return None
        if not is_c2s(label):
            self._drop("not_c2s_label")
            return None
        a = self._analyze(packet)
        if a is None:
            return None
        if a.key.dst not in self.vips and not a.icmp_error:
            self._drop("not_for_vip")
            return None
        # Claim 8 step 3 / claim 13: the opposite direction's label is this label + 1; nothing is signalled.
        reply_key = a.key if a.icmp_error else a.key.reversed()
        self._learn(reply_key, s2c_of(label), sender, now)
        self._count("from_wire")
        return packet

    def from_host(self, packet: bytes | memoryview, now: float) -> bytes | None:
        """An IP packet the host sends: returns the labelled frame for the wire, or None (counted)."""
        a = self._analyze(packet)
        if a is None:
            return None
        key = a.key.reversed() if a.icmp_error else a.key
        if key.src not in self.vips:
            self._drop("not_from_vip")  # claim 12: replies leave from the virtual IP, never a real address
            return None
        flow = self.flows.get(key)
        if flow is None:
            self._drop("no_session_label")
            return None
        flow.last = now
        self._count("from_host")
        return self._labelled(flow.peer, flow.label, packet)


class ClientEndpoint(Endpoint):
    """A labelled client: first packet unlabelled, then C2S label M - 1 for S2C label M."""

    def __init__(
        self,
        *,
        mac: bytes,
        gateway_mac: bytes,
        flow_timeout: float = ENDPOINT_FLOW_TIMEOUT,
        ttl: int = 64,
        fallback: float = 0.0,
    ) -> None:
        """``fallback``: a flow that has heard nothing from the wire for this long (seconds; 0: never) sends its
        next packet unlabelled and forgets its label, so a session the balancer ended (its server down, an idle
        timeout, a restart) starts again instead of sending a dead label for ever; an unlabelled packet of a live
        session still reaches its server (claim 2)."""
        super().__init__(mac=mac, flow_timeout=flow_timeout, ttl=ttl)
        if len(gateway_mac) != 6:
            raise ValueError("gateway_mac must be 6 bytes")
        if not fallback >= 0:
            raise ValueError("fallback must be >= 0 seconds")
        self.gateway_mac = bytes(gateway_mac)
        self.fallback = fallback

    def from_wire(self, frame: bytes | memoryview, now: float) -> bytes | None:
        """A frame from the network: returns the IP packet for the host, or None (counted)."""
        stripped = self._strip(frame)
        if stripped is None:  # unlabelled: a refusal (RST, ICMP) or ordinary traffic
            try:
                eth = parse_ethernet(frame)
            except WireError as exc:
                self._drop(exc.reason)
                return None
            if eth.ethertype not in (ETH_P_IP, ETH_P_IPV6):
                self._drop("unsupported_ethertype")
                return None
            self._count("from_wire_unlabelled")
            return bytes(frame[eth.payload_offset :])
        label, _, packet = stripped
        if label < 0:
            return None
        if not is_s2c(label):
            self._drop("not_s2c_label")
            return None
        a = self._analyze(packet)
        if a is None:
            return None
        # Claim 8 step 6 / claim 14: the opposite direction's label is this label - 1.
        key = a.key if a.icmp_error else a.key.reversed()
        self._learn(key, c2s_of(label), self.gateway_mac, now)
        self._count("from_wire")
        return packet

    def from_host(self, packet: bytes | memoryview, now: float) -> bytes | None:
        """An IP packet the host sends: returns the frame for the wire (labelled once the session has a label)."""
        a = self._analyze(packet)
        if a is None:
            return None
        key = a.key
        if a.tcp_flags >= 0 and a.tcp_flags & _SYN_MASK == _SYN_ONLY:
            self.flows.pop(key, None)  # a new connection, perhaps on a reused port: it starts unlabelled
        flow = self.flows.get(key)
        if flow is not None and self.fallback and now - flow.heard > self.fallback:
            del self.flows[key]  # nothing heard back for a while: the label may have died at the balancer
            self._count("fallback_unlabelled")
            return build_ethernet(self.gateway_mac, self.mac, ETH_P_IPV6 if a.ip_version == 6 else ETH_P_IP) + bytes(
                packet
            )
        if flow is None:
            self._count("from_host_unlabelled")
            ethertype = ETH_P_IPV6 if a.ip_version == 6 else ETH_P_IP
            return build_ethernet(self.gateway_mac, self.mac, ethertype) + bytes(packet)
        flow.last = now
        self._count("from_host")
        return self._labelled(self.gateway_mac, flow.label, packet)
