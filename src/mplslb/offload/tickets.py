"""Tickets (``offload_syn``): new TCP sessions decided ahead of their SYN, so the kernel can send the SYN on.

Theory of operation
-------------------
With the kernel offload every frame of an established session is switched in the kernel, and in ``Connection:
close`` traffic what is left for the daemon is each session's SYN: the slow path (analysis, admission, a server, a
label pair, both labels installed, the SYN sent on) per session. None of it depends on the client for an algorithm
that does not read the flow key, so the daemon decides it ahead:

* **Issue** (:meth:`TicketDesk.refill`, at every sync and poll of the driver, and between a poll's chunks): up to
  :data:`TICKETS_WANT` tickets are kept outstanding. Each is what :meth:`~mplslb.balancer.Balancer.pre_decide`
  decides for a SYN that has not come yet: admission with the room the outstanding tickets leave (each counts as a
  live, half-open session; the half-open share is never exceeded: a SYN beyond it goes up, where the oldest is
  evicted), a server (which counts the ticket as one of its sessions at once, so least-connections-like algorithms
  spread the tickets), a label pair. Its two entries are written into the label map with everything that does not
  depend on the client (:meth:`XdpOffload.ticket_entries`: the server's port, MACs, flags and measurement budget),
  flagged ``F_TICKET`` (every frame under them goes up, and the table does not hold them: dropped there), and its
  C2S label is pushed onto the program's ticket queue. A refusal stops the issue and is counted by reason
  (``held``); ``source_hash`` and ``maglev`` read the flow key and issue none (their SYNs go up as ever).
* **Take** (``mplslb_xdp.c``, ``take_syn``): an unlabelled TCP SYN on a client port, read as the analyzer reads it,
  to a (VIP, port) served, on a flow that is no live session's (the flow map, which holds every live TCP session's
  flow until it is ending: kernel-made ones from their SYN, the others from the sync that writes their labels; an
  ending session's flow leaves it, so its client's port used again takes a ticket and the fold ends the ending
  session as a reused flow's, :meth:`~mplslb.balancer.Balancer.open_decided`), or on the flow of a session the
  kernel saw close (both labels' FINs taken there, the SYN from the session's client: ``flow_closed``; the flow's
  entry becomes the new session's), pops a ticket, fills the client's fields into both entries, clears ``F_TICKET``
  and leaves for the server under the C2S label exactly as :meth:`~mplslb.balancer.Balancer._to_server` would send
  it; what it did goes into the taken ring.
* **Fold** (:meth:`TicketDesk.fold`, before every batch of frames the daemon handles, so a retransmitted SYN finds
  its session, and before every sync, poll and timer run): each taken ticket becomes the session
  :meth:`~mplslb.balancer.Balancer._new_session` would have made (:meth:`~mplslb.balancer.Balancer.open_decided`:
  opened at the SYN's kernel time, its labels installed in the table, which writes nothing to the kernel: the
  entries are the session's already); its measurement and FINs then go on in the kernel as any session's. One
  taken for a flow that is a session's already (its SYN went up and was opened before the sync entered its flow)
  is given back (``refused``) and the flow entered again for that session. One taken for the flow of a session the
  kernel saw close while no poll has handed the close over yet (a client that uses its port again within a poll
  interval) waits (``waiting``): the next poll hands the old session over with the others, whole, and the fold
  after it ends the old session as a reused flow's and opens the new one. Made at once, it would cost the old
  session's three map lookups and a hand-over of its own, and under ``wrk -c64`` such folds left the polls behind
  until most sessions were handed over one at a time. The program says in the taken record that it took the SYN
  on such a flow (``Taken.closed``), so the fold reads nothing of the kernel to tell. A released flow is deleted
  from the flow map at the next sync (:meth:`XdpOffload.release_flow`) unless a ticket folded since took it over;
  the program may have given it to the new session after the fold, and the next read of the taken ring then enters
  it again for that session.
* **Revoke** (:meth:`TicketDesk.revoke_all`): when a server's state, MAC or weight, the pool, the algorithm, the
  limits or the services change, or a server goes over (or back under) the response time limit, every ticket is
  drained from the queue (the program takes none meanwhile), its entries deleted and its decision given back
  (:meth:`~mplslb.balancer.Balancer.release_decided`: the server's count, and the labels, which no frame can have
  carried, straight back to the free ones), and tickets are issued afresh. A ticket the program popped as the
  queue was drained shows up in the taken ring and is folded at the next call.

Across daemons (``[state] persist``): a daemon that stops gives every ticket back (:meth:`TicketDesk.close`: the
taken ones folded into sessions, which its state keeps like any other, the rest revoked), so while no daemon runs the
program takes no SYN and each goes up, as to a daemon without tickets. The ticket maps are pinned with the program;
the next daemon adopts them, empties what a killed daemon left in them (tickets, taken records: the entries of both
are no kept session's, and go with the map's reconcile; the pairs of the tickets no SYN took are free again at once,
the taken ones' wait out the quarantine), enters its kept sessions' flows into the flow map afresh and issues new
tickets (:meth:`XdpOffload._settle_tickets`).
"""

from __future__ import annotations

from typing import Any

from mplslb.balancer import Balancer
from mplslb.balancing.servers import Server
from mplslb.flow import FlowKey
from mplslb.offload.xdp import Taken, XdpOffload
from mplslb.sessions import Session, SessionState
from mplslb.switching.layout import TICKETS_MAX, WATCH_ALL, WATCH_REQUEST, WATCH_TCP_END
from mplslb.wire.ip import IPPROTO_TCP

#: Tickets kept outstanding (at most TICKETS_MAX, the queue's size): the SYNs of a few thousand new sessions a second
#: while the daemon's loop is held up. Under wrk on the 2-core lab at 3,500 sessions a second the ticket folds came
#: 25-70 ms apart, and up to 170 ms around a poll (handed over a chunk a turn since, each chunk followed by a fold
#: and a refill); 256 tickets ran out every second there. A SYN that finds none goes up, and its client waits for the
#: daemon. Each ticket counts as a session of its server until taken or revoked. At 18,000 sessions a second (wrk
#: -c64 on the faster lab VM) 1,024 lasted 57 ms, and a loop held longer (a map read, a poll's step) sent all 64
#: clients' next SYNs up at once, twice or three times in 3 s; the queue's whole size lasts twice that.
TICKETS_WANT = TICKETS_MAX
#: Tickets waiting for a poll (their flow's old session closed in the kernel) tried at most this many a fold once
#: the poll is handed over: a busy second's thousands, made sessions at once, held the loop 60-95 ms, longer than
#: the outstanding tickets last under wrk -c64.
WAIT_CHUNK = 256
#: Tickets outstanding and waiting together at most: a waiting ticket is a session the daemon has yet to make, and
#: while they pile up (the daemon at its limit: the polls, and so the waiting tickets, fall behind) fewer are issued,
#: so more SYNs go up, their clients wait, and the load eases. Without it the waiting ones grew to 25,000 under a
#: sustained wrk -c64 and the polls stopped: 12,000-13,000 requests/s after 15 s, against 15,000 for a daemon whose
#: reused ports' SYNs all went up; with it the waiting stay under 3,500 and the rate where it began.
TICKETS_BUDGET = 2 * TICKETS_MAX
#: Tickets are issued in batches of at least this many (while any is outstanding): one map write and this many
#: queue pushes, rather than a write per SYN taken.
REFILL_MIN = 32
assert REFILL_MIN <= TICKETS_WANT <= TICKETS_MAX


class TicketDesk:
    """The tickets of one balancer and its kernel offload (see the module docstring)."""

    def __init__(self, balancer: Balancer, offload: XdpOffload, *, want: int = TICKETS_WANT) -> None:
        if not 0 < want <= TICKETS_MAX:
            raise ValueError(f"want must be 1-{TICKETS_MAX}, got {want}")
        self.balancer = balancer
        self.offload = offload
        self.want = want
        self.outstanding: dict[int, Server] = {}  # C2S label -> the server it was decided for
        self._epoch: tuple[Any, ...] | None = None
        self.issued = 0
        self.taken = 0  # tickets folded into sessions
        self.revoked = 0
        self.refused = 0  # taken and given back: its flow a session's already, or its server's MAC lost since
        self.held: dict[str, int] = {}  # issues stopped, by the reason no ticket could be decided
        # taken, made sessions once a poll hands their flow's old session over: waiting for it, and due to be tried
        # (each with the table's time it first waited: the poll that hands its flow's old session over reads later)
        self._waiting: list[tuple[Taken, Server, float]] = []
        self._due: list[tuple[Taken, Server, float]] = []
        self._waited_at = 0.0  # the offload's handed_over_at when the waiting ones became due
        self._services_of: object = None
        self.set_ports()
        # An ending session's flow leaves the flow map (a SYN on it may take a ticket, and its fold ends the session
        # as a reused flow's); one that goes on after all has it back.
        sessions = balancer.sessions
        ended, revived = sessions.on_end, sessions.on_revive

        def on_end(session: Session) -> None:
            if ended is not None:
                ended(session)
            offload.release_flow(session.c2s)

        def on_revive(session: Session) -> None:
            if revived is not None:
                revived(session)
            offload.restore_flow(session.c2s)

        sessions.on_end, sessions.on_revive = on_end, on_revive

    def set_ports(self) -> None:
        """Tell the program the client ports and the (VIP, TCP port)s it may take SYNs for."""
        b = self.balancer
        self.offload.set_client_ports(p.port_id for p in b.config.ports if p.role == "client")
        self.offload.set_services((v.address, port) for v in b.config.vips for port in v.tcp_ports)
        self._services_of = b.config.vips

    def _state(self) -> tuple[Any, ...]:
        """What the outstanding tickets were decided on: when it changes they are revoked. The pool's version
        covers its servers' membership, status, weight and MAC; a server's response time overload (which changes
        per sample, without a version) is read only when a limit is set."""
        b = self.balancer
        a = b.admission
        pool = b.pool
        overloaded = tuple(s.index for s in pool if s.overloaded) if pool.rt_limit > 0 else ()
        return (pool.version, id(b.algorithm), a.max_sessions, a.max_new_per_second, b.max_half_open,
                b.analyzer.l7, id(b.config.vips), overloaded)  # fmt: skip

    def fold(self, now: float, *, wait: bool = True) -> int:
        """Make the tickets the program took into sessions; returns how many. With ``wait``, one taken for the flow
        of a session the kernel saw close and the daemon has not yet (:meth:`_waits`) is made once a poll has handed
        that session over; without, now."""
        b = self.balancer
        made = 0
        if not wait or self.offload.handed_over_at != self._waited_at:  # a poll handed over since: all may go
            self._waited_at = self.offload.handed_over_at
            self._due += self._waiting
            self._waiting = []
        if self._due:  # up to WAIT_CHUNK a fold (without ``wait``, all); those that still wait, for the next poll
            chunk = self._due[: WAIT_CHUNK if wait else len(self._due)]
            del self._due[: len(chunk)]
            for t, decided, since in chunk:
                made += self._open(t, decided, now, wait=wait, since=since)
        for t in self.offload.take_tickets():
            server = self.outstanding.pop(t.c2s, None)
            if server is None or t.port_id < 0:  # not ours (never seen): its entries go
                self.offload.revoke_tickets([t.c2s])
                continue
            if not server.mac:  # lost since the ticket was issued: no label can name it (the client sends again)
                self.offload.revoke_tickets([t.c2s])
                b.release_decided(t.c2s, server, now)
                self.refused += 1
                continue
            made += self._open(t, server, now, wait=wait)
        self.taken += made
        return made

    def _open(self, t: Taken, server: Server, now: float, *, wait: bool, since: float | None = None) -> int:
        """The session of taken ticket ``t`` opened (1), given back (0), or left waiting (0); ``since``: when it
        first waited (None: now, its first try)."""
        b = self.balancer
        key = FlowKey(IPPROTO_TCP, t.src, t.sport, t.dst, t.dport)
        since = now if since is None else since
        if wait and self._waits(t, key, since):
            self._waiting.append((t, server, since))
            return 0
        if b.open_decided(t.c2s, server, key, t.port_id, t.mac, t.ip_version, t.at) is None:
            # the flow is a live session's (its SYN went up, the daemon opened it, and its flow was not in the
            # map yet when the program took a copy of the SYN; or it was ending, and went on, or the SYN came
            # from elsewhere than its client): that session keeps the flow
            self.offload.revoke_tickets([t.c2s])
            b.release_decided(t.c2s, server, now)
            existing = b.sessions.lookup(key)
            if existing is not None:
                self.offload.restore_flow(existing.c2s)
            self.refused += 1
            return 0
        return 1

    def _waits(self, t: Taken, key: FlowKey, since: float) -> bool:
        """Whether ``t`` waits for a poll: its flow is a session's that is not ending in the table, no poll read
        since the SYN and since ``t`` first waited (``since``) has been handed over, and the program took the SYN on
        the flow of a session whose FINs it both took (``t.closed``: the program takes a SYN on a live session's
        flow only then).
        The poll hands the old session over with the others, whole (its record, both FINs), where the fold would end
        it on its own with three map lookups and its record and FINs handed over one at a time; the new session's
        frames meanwhile are switched under its entries, which polls leave alone until it is in the table. A poll
        that read before ``t`` first waited may have read before the old session was in the table (both tickets
        taken while the loop was held, and folded after the read): it left that session alone, and ``t`` waits for
        the next."""
        if not t.closed or self.offload.handed_over_at >= max(t.at, since):
            return False
        existing = self.balancer.sessions.lookup(key)
        return existing is not None and existing.state is not SessionState.ENDING

    def refill(self, now: float) -> int:
        """Revoke the tickets if what they were decided on changed, then issue up to :attr:`want` (once
        :data:`REFILL_MIN` are missing, or none is left); returns how many were issued."""
        state = self._state()
        if state != self._epoch:
            if self._services_of is not self.balancer.config.vips:
                self.set_ports()
            self.revoke_all(now)
            self._epoch = state
        missing = min(self.want, TICKETS_BUDGET - len(self._waiting) - len(self._due)) - len(self.outstanding)
        if missing <= 0 or (self.outstanding and missing < min(REFILL_MIN, self.want)):
            return 0
        b = self.balancer
        l7 = b.analyzer.l7
        c2s_watch = WATCH_TCP_END | WATCH_ALL | (WATCH_REQUEST if l7 else 0)  # as Balancer._install_labels
        s2c_watch = WATCH_TCP_END | WATCH_ALL
        decided: list[tuple[int, Server]] = []
        entries: list[tuple[int, bytes]] = []
        for _ in range(missing):
            decision = b.pre_decide(len(self.outstanding) + len(decided), now)
            if isinstance(decision, str):
                self.held[decision] = self.held.get(decision, 0) + 1
                break
            c2s, server = decision
            port = server.config.port_id
            if port not in self.offload.ifindex or not server.mac:
                b.release_decided(c2s, server, now, carried=False)  # never in the kernel
                self.held["server_port_not_offloaded"] = self.held.get("server_port_not_offloaded", 0) + 1
                break
            decided.append(decision)
            entries.append((c2s, self.offload.ticket_entries(port, server.mac, c2s_watch, s2c_watch)))
        issued = set(self.offload.issue_tickets(entries))
        for c2s, server in decided:
            if c2s in issued:
                self.outstanding[c2s] = server
            else:
                b.release_decided(c2s, server, now, carried=False)  # never queued: no SYN could take it
        self.issued += len(issued)
        return len(issued)

    def revoke_all(self, now: float) -> int:
        """Take back every ticket still in the program's queue (the taken ones are folded first); returns how
        many."""
        self.fold(now)
        drained = [c2s for c2s in self.offload.drain_tickets() if c2s in self.outstanding]
        self.offload.revoke_tickets(drained)
        for c2s in drained:  # never taken: no frame carried their labels
            self.balancer.release_decided(c2s, self.outstanding.pop(c2s), now, carried=False)
        self.revoked += len(drained)
        return len(drained)

    def close(self, now: float) -> None:
        """Give every ticket back (the daemon stops, or the offload goes): the taken ones made sessions now, the waiting
        ones too."""
        self.fold(now, wait=False)
        self.revoke_all(now)

    def stats(self) -> dict[str, Any]:
        """Tickets issued, taken, revoked, outstanding (and how many of them each server holds), refused; issues
        held by reason; and what the program counted: SYNs taken, passed up for lack of a ticket, passed up as a live
        session's."""
        by_server: dict[str, int] = {}
        for server in self.outstanding.values():
            by_server[server.name] = by_server.get(server.name, 0) + 1
        return {
            "outstanding": len(self.outstanding),
            "by_server": by_server,
            "issued": self.issued,
            "taken": self.taken,
            "revoked": self.revoked,
            "refused": self.refused,
            "held": dict(self.held),
            "waiting": len(self._waiting) + len(self._due),
        } | self.offload.ticket_counters()
