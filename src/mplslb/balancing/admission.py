"""The service acceptance control unit (claims 4, 11): accept or refuse a new session.

Theory of operation
-------------------
Only a packet without a session label (a would-be new session) ever reaches this unit (claim 11): frames of
admitted sessions are switched on their labels and are never refused here. Refusing new work when the
balancer or the servers are at their limits is what keeps the sessions already being served healthy
(claim 4).

A new session is checked in this order, the first failing check naming the :class:`Refusal`:

1. the global session limit (``max_sessions``, 0 = none);
2. free session labels (none left: ``labels_exhausted``);
3. the new-session rate, a token bucket of ``max_new_per_second`` tokens per second holding at most
   ``max(1, rate)`` tokens (0 = no limit). A session that passes takes a token.

If all pass, the caller asks the algorithm for a server; when it gets none,
:meth:`AdmissionControl.refusal_for_no_server` says whether that is because every server in service is at
its own limit or overloaded (``server_session_limit``) or because none is in service at all
(``no_server_available``). ``refuse_with`` says how a refused client is answered, and
:meth:`AdmissionControl.answer` builds that answer: a TCP RST, an ICMP (or ICMPv6) unreachable quoting the
refused datagram, both from the virtual IP, or nothing. Deciding and counting are separate: the caller counts
what it really refused with :meth:`AdmissionControl.count`.

Time is passed in as ``now``; the bucket never reads a clock. A clock that steps back adds no tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from mplslb.balancing.servers import ServerPool
from mplslb.flow import FlowKey
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from mplslb.wire.icmp import build_icmp_unreachable
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.tcp import TCPFlag, build_tcp

__all__ = ["AdmissionControl", "Refusal", "RefuseWith", "reset_frame", "tcp_reset"]

_TOKEN_EPSILON = 1e-9
ICMP_PORT_UNREACHABLE_V4 = 3
ICMP_PORT_UNREACHABLE_V6 = 4
_RST_ACK = int(TCPFlag.RST | TCPFlag.ACK)
_RST = int(TCPFlag.RST)
_SEQ_MASK = 0xFFFFFFFF


class Refusal(StrEnum):
    """Why a new session was refused; the value is the counter name."""

    GLOBAL_LIMIT = "global_session_limit"
    SERVER_LIMIT = "server_session_limit"
    NO_SERVER = "no_server_available"
    LABELS_EXHAUSTED = "labels_exhausted"
    RATE_LIMIT = "new_session_rate_limit"


class RefuseWith(StrEnum):
    """How a refused client is answered."""

    RST = "rst"
    ICMP = "icmp"
    DROP = "drop"


def tcp_reset(key: FlowKey, *, ip_version: int, seq: int, ack: int | None, syn: bool, payload_len: int) -> bytes:
    """The RST (an IP packet from ``key.dst``) answering a TCP segment of ``key`` that has no connection, as RFC 793
    generates it: a segment with an ACK (``ack``) gets seq = that ACK, which is the receiver's RCV.NXT and so
    accepted exactly (RFC 5961); one without gets seq 0 and an ACK of everything it occupied."""
    if ack is not None:
        segment = build_tcp(key.dst, key.src, key.dport, key.sport, seq=ack, ack=0, flags=_RST, window=0)
    else:
        end = (seq + payload_len + (1 if syn else 0)) & _SEQ_MASK
        segment = build_tcp(key.dst, key.src, key.dport, key.sport, seq=0, ack=end, flags=_RST_ACK, window=0)
    header = build_ipv6 if ip_version == 6 else build_ipv4
    return header(key.dst, key.src, IPPROTO_TCP, len(segment)) + segment


def reset_frame(packet: bytes, *, ip_version: int, client_mac: bytes, port_mac: bytes) -> bytes:
    """``packet`` (from the virtual IP) in an Ethernet frame to the client."""
    return build_ethernet(client_mac, port_mac, ETH_P_IPV6 if ip_version == 6 else ETH_P_IP) + packet


def _zero_counts() -> dict[Refusal, int]:
    return dict.fromkeys(Refusal, 0)


@dataclass
class AdmissionControl:
    """Limits on new sessions and counters of refusals. See the module docstring for the order of checks."""

    max_sessions: int = 0
    max_new_per_second: float = 0.0
    refuse_with: RefuseWith = RefuseWith.RST
    refused: dict[Refusal, int] = field(default_factory=_zero_counts)
    _tokens: float = field(init=False, repr=False, default=0.0)
    _last_refill: float | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        limit = self.max_sessions
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_sessions must be an integer >= 0 (0 = no limit), got {limit!r}")
        rate = self.max_new_per_second
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"max_new_per_second must be a finite number >= 0 (0 = no limit), got {rate!r}")
        try:
            # Accept the plain string from a config file ("rst", "icmp", "drop").
            self.refuse_with = RefuseWith(self.refuse_with)
        except ValueError:
            valid = ", ".join(member.value for member in RefuseWith)
            raise ValueError(f"refuse_with must be one of {valid}, got {self.refuse_with!r}") from None
        for refusal in Refusal:
            self.refused.setdefault(refusal, 0)
        self._tokens = self.burst

    @property
    def burst(self) -> float:
        """The token bucket's depth: how many new sessions may arrive at once after a quiet spell."""
        return max(1.0, float(self.max_new_per_second))

    @property
    def tokens(self) -> float:
        """Tokens in the bucket as of the last :meth:`admit` (refilled lazily there)."""
        return self._tokens

    @property
    def refused_total(self) -> int:
        """All refusals counted so far."""
        return sum(self.refused.values())

    def admit(self, *, active_sessions: int, labels_free: int, now: float) -> Refusal | None:
        """Decide on a new session: ``None`` to go ahead, otherwise the reason to refuse it.

        ``active_sessions`` is the balancer's live session count and ``labels_free`` the label manager's
        free pairs. Passing takes a rate token; refusing does not, and nothing is counted here.
        """
        if self.max_sessions and active_sessions >= self.max_sessions:
            return Refusal.GLOBAL_LIMIT
        if labels_free <= 0:
            return Refusal.LABELS_EXHAUSTED
        rate = self.max_new_per_second
        if rate > 0:
            last = self._last_refill
            if last is None:
                self._last_refill = now
            elif now > last:
                self._tokens = min(self.burst, self._tokens + (now - last) * rate)
                self._last_refill = now
            # The tolerance absorbs float rounding of the refill, so a token due exactly now is not refused.
            if self._tokens < 1.0 - _TOKEN_EPSILON:
                return Refusal.RATE_LIMIT
            self._tokens -= 1.0
        return None

    def refusal_for_no_server(self, pool: ServerPool) -> Refusal:
        """The reason to give when the algorithm found no eligible server in ``pool``.

        ``SERVER_LIMIT`` if some server is in service (UP, weight > 0) but all of those are full or
        overloaded, ``NO_SERVER`` if none is in service.
        """
        if any(server.in_service for server in pool):
            return Refusal.SERVER_LIMIT
        return Refusal.NO_SERVER

    def count(self, refusal: Refusal) -> None:
        """Count one refused session under ``refusal``."""
        self.refused[refusal] += 1

    def answer(
        self,
        key: FlowKey,
        *,
        ip_version: int,
        tcp_seq: int,
        payload_len: int,
        datagram: bytes,
        client_mac: bytes,
        port_mac: bytes,
    ) -> bytes | None:
        """The frame that tells a refused client so (claim 11), or None when ``refuse_with`` is ``drop``.

        ``key`` is the refused packet's flow as the client sent it, ``datagram`` that IP packet (quoted by an
        ICMP answer). A TCP client gets a RST from the virtual IP acknowledging its segment (``rst``), a UDP client
        an ICMP port unreachable (``rst``: UDP has no RST) or, with ``icmp``, every client an ICMP unreachable.
        """
        mode = self.refuse_with
        if mode is RefuseWith.DROP:
            return None
        v6 = ip_version == 6
        if mode is RefuseWith.RST and key.proto == IPPROTO_TCP:
            packet = tcp_reset(key, ip_version=ip_version, seq=tcp_seq, ack=None, syn=True, payload_len=payload_len)
        else:
            code = None
            if mode is RefuseWith.RST:
                code = ICMP_PORT_UNREACHABLE_V6 if v6 else ICMP_PORT_UNREACHABLE_V4
            packet = build_icmp_unreachable(key.dst, key.src, datagram, code=code)
        return reset_frame(packet, ip_version=ip_version, client_mac=client_mac, port_mac=port_mac)
