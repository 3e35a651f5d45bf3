"""``mplslb balancer --config lb.toml``: the balancer on real Linux interfaces.

Theory of operation
-------------------
One thread, one selector loop (:class:`~mplslb.drivers.loop.Loop`). The sans-I/O :class:`~mplslb.balancer.Balancer`
sits behind a :class:`~mplslb.drivers.loop.BalancerDriver` that reads bursts of frames from every port (AF_PACKET on
Ethernet interfaces, or MPLS-in-UDP), hands them to ``receive_batch`` and writes what comes back. Around it, in the
same loop: active health checks (TCP connect or HTTP GET with interval, timeout, rise and fall, as keepalived and
HAProxy do), the control socket that ``mplslb status`` talks to, and once a second a fresh snapshot of the figures
that the HTTP endpoint (its own thread) serves: Prometheus ``/metrics`` and the status page (``/``, ``/status.json``
with the last five minutes of :class:`~mplslb.control.history.StatusHistory`). Once running it tells systemd
(``READY=1`` on ``$NOTIFY_SOCKET``, :mod:`mplslb.sdnotify`) and logs ``event=started`` with its addresses.
SIGTERM and SIGINT stop the loop; every socket is closed and the control socket removed. SIGHUP (like
``mplslb reload``) re-reads the configuration file at the loop's next turn and applies what changed, or refuses the
file naming the key and keeps running as before (:meth:`Daemon.reload`).

At start the balancer announces each virtual IP on its Ethernet client ports (gratuitous ARP, unsolicited neighbour
advertisement), so a router that learned another MAC for it (a balancer before this one) takes ours. Server ports
take ARP frames where an IPv4 server is resolved (configured without ``mac``), and IPv6 frames where an IPv6 server
is, for the neighbour resolver; the probes it sends leave with the timer's frames.

A server-side ``mpls_udp`` port reaches its servers across routed IP: each server's labelled frames go as
MPLS-in-UDP to its address, port 6635, and only the servers configured on the port are heard (a server agent with
``--balancer`` answers the same way).

The configuration is the balancer's TOML (:func:`mplslb.config.balancer_config_from_section`) plus two tables:
``[health_check]`` (kind, port, path, expect_status, interval, timeout, rise, fall) and ``[control]`` (``socket``,
``metrics`` as ``"addr:port"`` or ``""`` for none: the HTTP endpoint of the metrics and the status page). Bad keys
or values are rejected at load naming the key.

With a ``[cluster]`` table the daemon is one node of several behind ECMP (:mod:`mplslb.cluster`): it allocates
labels from its own slice, and a UDP socket (:mod:`mplslb.drivers.cluster`) keeps its sessions in step with its
peers'. The status (control socket, ``/status.json``) has a ``cluster`` object: node, peers with when each was last
heard, ``synced`` (false until the peers' dumps are in: announce the node to the router only once it is true),
replicas, and the sync's counters; ``event=cluster_synced`` is logged when it becomes true. A reload takes a new
``[cluster] peers`` (nodes joining or leaving); the rest of the table cannot change while the daemon runs.

With ``offload = "kernel"`` (top level; default ``"none"``) the driver talks to an
:class:`~mplslb.offload.driver.OffloadedBalancer`: sessions' labels are installed in an XDP program on the
Ethernet ports from their first frame on, their frames are switched by the kernel, which records what the
response-time measurement wants; see :mod:`mplslb.offload.xdp`. Without kept state nothing of it outlives the
daemon: the program is held by BPF links that close with the process, and a leftover attached another way under
the program's name is removed at start.

With ``[state] persist = true`` (``dir``, ``instance``) or ``--state-dir``, the sessions, labels and label switching
entries live in a mapped file that the next daemon adopts (:mod:`mplslb.state`; ``--fresh`` starts clean), and on
stop the daemon leaves the offload's pinned program attached and the VIPs' blackhole routes in place.
"""

from __future__ import annotations

import fcntl
import gc
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mplslb.balancer import Balancer
from mplslb.balancing.health_policy import apply_result, reconcile
from mplslb.balancing.servers import Server, ServerConfig, ServerStatus
from mplslb.bgp import BEAT_INTERVAL, BgpConfig, BgpSpeaker, read_bgp
from mplslb.cluster import ClusterSync
from mplslb.config import (
    FIXED_REASON,
    BalancerConfig,
    ConfigError,
    PortConfig,
    Section,
    VirtualService,
    balancer_config_from_section,
    load_toml,
    read_offload,
    read_offload_gso,
    read_offload_prealloc,
    read_offload_syn,
    read_offload_syn_rate,
)
from mplslb.control.client import DEFAULT_SOCKET
from mplslb.control.history import StatusHistory
from mplslb.control.server import ControlServer, balancer_commands, follow_pool
from mplslb.control.tables import RateTracker, snapshot, with_offload
from mplslb.drivers.afpacket import (
    DEFAULT_RETIRE_MS,
    DEFAULT_SOCKET_RCVBUF,
    MAX_RETIRE_MS,
    MAX_SOCKET_RCVBUF,
    MIN_SOCKET_RCVBUF,
    open_port,
)
from mplslb.drivers.cluster import ClusterLink
from mplslb.drivers.loop import BalancerDriver, Loop, Port
from mplslb.drivers.mplsudp import MplsUdpPort
from mplslb.health import HealthCheckConfig, HealthChecker, HealthProbeDriver
from mplslb.hostsetup import HostChanges, setup_balancer
from mplslb.logfmt import value
from mplslb.resolver import MacChange
from mplslb.sdnotify import notify, reloading_message
from mplslb.state import StateError, StateStore, default_dir, huge_pages_of, open_balancer
from mplslb.switching.scalar import FAST_PATH
from mplslb.wire.checksum import IPV4_ADDR_LEN, IPV6_ADDR_LEN
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC

log = logging.getLogger("mplslb.balancer")

if TYPE_CHECKING:
    from mplslb.offload.driver import OffloadedBalancer

#: What each side's packet sockets take in; the kernel keeps everything else (health-check replies, its own ARP).
CLIENT_SIDE_ETHERTYPES = frozenset({ETH_P_MPLS_UC, ETH_P_IP, ETH_P_IPV6, ETH_P_ARP})
SERVER_SIDE_ETHERTYPES = frozenset({ETH_P_MPLS_UC})
LABELLED = frozenset({ETH_P_MPLS_UC})
#: Up to this many virtual IPs of an IP version, a client port's socket filter takes that version's frames to them
#: only (IPv6 also ICMPv6: neighbour discovery); beyond, every one (a classic BPF program jumps 255 instructions
#: at most, and each IPv6 address costs 16).
FILTERED_IPV4_MAX = 48
FILTERED_IPV6_MAX = 6
SNAPSHOT_INTERVAL = 1.0


def refusal_line(logged: dict[str, int], refused: Mapping[Any, int]) -> tuple[str, dict[str, int]]:
    """The log line for the sessions admission refused since ``logged`` (counts by reason), "" if none, and the
    counts to remember."""
    now = {str(reason): n for reason, n in refused.items() if n}
    new = {reason: n - logged.get(reason, 0) for reason, n in now.items() if n > logged.get(reason, 0)}
    line = "event=refusing " + " ".join(f"{reason}={n}" for reason, n in sorted(new.items())) if new else ""
    return line, now


@dataclass(frozen=True)
class DaemonConfig:
    balancer: BalancerConfig
    health: HealthCheckConfig | None
    control_socket: str
    metrics: tuple[str, int] | None
    ring: bool
    offload: str = "none"  # "none" or "kernel"
    offload_syn_rate: int = 0  # unlabelled TCP SYNs a second the kernel offload passes up (0: all)
    state_dir: str = ""  # "": nothing outlives the daemon; else where its state does (mplslb.state)
    instance: str = ""  # names the state directory's and the kernel offload's pins by default
    bgp: BgpConfig | None = None  # [bgp]: announce the VIPs to routers while healthy (mplslb.bgp)
    offload_gso: bool = False  # the kernel offload switches super-packets too (tc ingress, veth ports)
    offload_syn: bool = False  # the kernel offload takes new TCP sessions' SYNs under tickets (mplslb.offload.tickets)
    ring_retire_ms: int = DEFAULT_RETIRE_MS  # with ring: how long a receive block stays open before it is handed over
    socket_rcvbuf: int = DEFAULT_SOCKET_RCVBUF  # each packet socket's (without ring) and MPLS-in-UDP socket's, bytes
    offload_prealloc: bool = False  # the kernel offload's label map preallocated for the whole label range

    @property
    def datapath(self) -> str:
        """What switches an established session's frames: the kernel (XDP; tc for super-packets) or this process."""
        if self.offload == "kernel":
            return "kernel (XDP, tc for super-packets)" if self.offload_gso else "kernel (XDP)"
        return "userspace (TPACKET rings, block path)" if self.ring else "userspace (packet sockets)"


def load_daemon_config(path: str | Path, *, need_interfaces: bool = True) -> DaemonConfig:
    source, data = load_toml(path)
    top = Section(source, "", data)
    hsec = top.section("health_check")
    health: HealthCheckConfig | None = None
    if hsec.table:
        expect = hsec.get("expect_status", (int, list), 200)
        health = hsec.build(
            "kind",
            HealthCheckConfig,
            kind=hsec.get("kind", str, "tcp"),
            port=hsec.number("port", int, 80, minimum=1),
            interval=hsec.number("interval", float, 2.0, minimum=0.0),
            timeout=hsec.number("timeout", float, 1.0, minimum=0.0),
            rise=hsec.number("rise", int, 2, minimum=1),
            fall=hsec.number("fall", int, 3, minimum=1),
            path=hsec.get("path", str, "/"),
            expect_status=tuple(expect) if isinstance(expect, list) else expect,
            host=hsec.get("host", str, "") or None,
        )
    hsec.done()
    csec = top.section("control")
    control_socket = csec.get("socket", str, DEFAULT_SOCKET)
    metrics_text = csec.get("metrics", str, "")
    metrics: tuple[str, int] | None = None
    if metrics_text:
        addr, _, port = metrics_text.rpartition(":")
        if not addr or not port.isdigit() or not 0 <= int(port) < 65536:
            raise csec.error("metrics", f"expected 'address:port', got {metrics_text!r}")
        metrics = (addr.strip("[]"), int(port))
    csec.done()
    # Rings (TPACKET_V3 receive, TPACKET_V2 transmit, the zero-copy block path) give the highest frame rates, but
    # a receive block is only handed over when full or when its retire timer fires (ring_retire_ms): measured end
    # to end with the 1 ms timer rings then had, request/response traffic ran about twice as fast on plain packet
    # sockets. Plain is the default.
    ring = top.get("ring", bool, False)
    # The ring holds a fixed number of blocks however full the timer retires them: a short timer makes it hold few
    # frames, and small blocks cost more per frame (docs/benchmarks.md, "Wire paths at equal paced loads"); a long
    # one delays the frames of a block that does not fill by up to that long.
    ring_retire_ms = top.get("ring_retire_ms", int, DEFAULT_RETIRE_MS)
    if not 1 <= ring_retire_ms <= MAX_RETIRE_MS:
        raise top.error("ring_retire_ms", f"milliseconds from 1 to {MAX_RETIRE_MS}, got {ring_retire_ms}")
    # A plain packet socket's frames wait in its receive buffer, each costing its truesize: on a veth a 64-byte frame
    # takes about 4 KiB, so the system's default (208 KiB) holds about a millisecond of 50k frames/s, and any pause
    # of the loop longer than that drops frames (docs/benchmarks.md, "Wire paths at equal paced loads, shaped").
    socket_rcvbuf = top.get("socket_rcvbuf", int, DEFAULT_SOCKET_RCVBUF)
    if not MIN_SOCKET_RCVBUF <= socket_rcvbuf <= MAX_SOCKET_RCVBUF:
        raise top.error("socket_rcvbuf", f"bytes from {MIN_SOCKET_RCVBUF} to {MAX_SOCKET_RCVBUF}, got {socket_rcvbuf}")
    if ring and "socket_rcvbuf" in top.table:
        raise top.error("socket_rcvbuf", "for plain packet sockets: a ring (ring = true) holds frames in its blocks")
    offload = read_offload(top)
    syn_rate = read_offload_syn_rate(top, offload)
    gso = read_offload_gso(top, offload, ring=ring)
    syn = read_offload_syn(top, offload)
    prealloc = read_offload_prealloc(top, offload)
    ssec = top.section("state")
    persist = ssec.get("persist", bool, False)
    instance = ssec.get("instance", str, Path(path).stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", instance):
        raise ssec.error("instance", f"1-64 letters, digits, '_', '.', '-' (a directory name), got {instance!r}")
    state_dir = ssec.get("dir", str, "")
    if persist and not state_dir:
        state_dir = str(default_dir(instance))
    if state_dir and not persist and "persist" in ssec.table:
        raise ssec.error("dir", "set with persist = false")
    ssec.done()
    balancer = balancer_config_from_section(top)
    service = [str(ipaddress.ip_address(a)) for a in (*(v.address for v in balancer.vips), *(
        p.address for p in balancer.ports if p.kind == "mpls_udp"))]  # fmt: skip
    bgp = read_bgp(top, service)
    top.done()
    for index, port_config in enumerate(balancer.ports):
        if need_interfaces and port_config.kind == "ethernet" and not port_config.interface:
            raise ConfigError(source, f"ports[{index}].interface", "an ethernet port needs an interface")
    if offload == "kernel" and not any(p.kind == "ethernet" for p in balancer.ports):
        raise ConfigError(source, "offload", "the kernel offload switches between ethernet ports; there is none")
    if gso:
        _check_gso_ports(source, balancer.ports, need_interfaces=need_interfaces)
    return DaemonConfig(
        balancer, health, control_socket, metrics, ring, offload, syn_rate, state_dir, instance, bgp, gso, syn,
        ring_retire_ms, socket_rcvbuf, prealloc,
    )  # fmt: skip


def _check_gso_ports(source: str, ports: tuple[PortConfig, ...], *, need_interfaces: bool) -> None:
    """``offload_gso`` hands a super-packet to the output port's veth peer: every port must be an ethernet port on
    a veth (with ``need_interfaces``, each interface this namespace has is looked up: the daemon loads its
    configuration again inside its own namespace, where a missing one is then reported by its port)."""
    for index, port in enumerate(ports):
        if port.kind != "ethernet":
            raise ConfigError(source, "offload_gso", f"needs ethernet ports on veths: ports[{index}] is {port.kind}")
        if not need_interfaces:
            continue
        from mplslb.offload.bpf import xdp_state

        try:
            kind = xdp_state(socket.if_nametoindex(port.interface))[0]
        except OSError:
            continue  # not in this namespace (yet)
        if kind != "veth":
            what = f"ports[{index}].interface {port.interface!r} is {kind or 'not a veth'}"
            raise ConfigError(source, "offload_gso", f"needs veth ports (a veth peer takes super-packets): {what}")


def _log_server(server: Server) -> None:
    """One line per change of a server's status."""
    reason = f" reason={server.down_reason}" if server.down_reason is not None else ""
    log.warning("event=server_%s server=%s%s", server.status, value(server.name), reason)


def _log_mac(change: MacChange) -> None:
    """One line per change of a resolved server's MAC: found, moved (its sessions follow), lost."""
    event = "found" if not change.old else "lost" if not change.new else "moved"
    old, new = change.old.hex(":") or "-", change.new.hex(":") or "-"
    log.warning("event=server_mac_%s server=%s old=%s new=%s", event, value(change.name), old, new)


class StartError(RuntimeError):
    """The daemon cannot start: says which port, interface or address and why."""


#: Where the daemons' interface locks live (one file per network namespace and interface).
LOCK_DIR = Path("/run/mplslb/locks")


def lock_interfaces(config: BalancerConfig, lock_dir: Path = LOCK_DIR) -> list[int]:
    """Take an exclusive lock on every Ethernet interface of ``config`` in this network namespace, so a second
    daemon on the same interface is refused (naming the holder) instead of stealing half its frames. The locks
    are ``flock``s on open files: they go with the process, also when it is killed. Returns the descriptors."""
    namespace = os.stat("/proc/self/ns/net").st_ino
    lock_dir.mkdir(parents=True, exist_ok=True)
    fds: list[int] = []
    try:
        for port in config.ports:
            if port.kind != "ethernet" or not port.interface:
                continue
            path = lock_dir / f"{namespace}-{port.interface}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StartError(
                    f"port {port.port_id}: interface {port.interface!r} is already used by another mplslb balancer "
                    f"(pid {holder}; lock {path})"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def server_side_ethertypes(servers: list[ServerConfig]) -> frozenset[int]:
    """What a server port's packet socket takes in: labelled frames, and for the resolver ARP (when an IPv4 server
    on the port is configured without a MAC) and IPv6 (neighbour discovery, for such an IPv6 server)."""
    resolved = {len(server.address) for server in servers if not server.mac}
    return (
        SERVER_SIDE_ETHERTYPES | ({ETH_P_ARP} if 4 in resolved else set()) | ({ETH_P_IPV6} if 16 in resolved else set())
    )


def open_ports(
    config: BalancerConfig,
    *,
    ring: bool,
    max_len: int | None = None,
    retire_ms: int = DEFAULT_RETIRE_MS,
    rcvbuf: int | None = None,
) -> dict[int, Port]:
    """Open every port of ``config``; a port that cannot be opened raises :class:`StartError` naming it.
    ``max_len``: the ethernet ports' sockets leave longer frames out (the kernel offload's super-packets);
    ``retire_ms``: with ``ring``, the receive rings' block retire timer; ``rcvbuf``: the receive buffer (bytes) of
    the ethernet ports' sockets without ``ring``, and of the MPLS-in-UDP ports' sockets."""
    ports: dict[int, Port] = {}
    try:
        for port in config.ports:
            try:
                ports[port.port_id] = _open(
                    port, config.servers, ring=ring, max_len=max_len, retire_ms=retire_ms, rcvbuf=rcvbuf,
                    vips=config.vips,
                )  # fmt: skip
            except OSError as exc:
                if port.kind == "ethernet":
                    where = f"interface {port.interface!r}"
                else:
                    where = f"address {ipaddress.ip_address(port.address)}"
                name = f" ({port.name})" if port.name else ""
                why = exc.strerror or str(exc)
                raise StartError(f"port {port.port_id}{name}: cannot open {where}: {why}") from None
    except BaseException:
        for opened in ports.values():
            opened.close()  # type: ignore[attr-defined]
        raise
    return ports


def _open(
    port: PortConfig,
    servers: tuple[ServerConfig, ...],
    *,
    ring: bool,
    max_len: int | None = None,
    retire_ms: int = DEFAULT_RETIRE_MS,
    rcvbuf: int | None = None,
    vips: tuple[VirtualService, ...] = (),
) -> Port:
    here = [server for server in servers if server.port_id == port.port_id]
    if port.kind == "mpls_udp":
        address = str(ipaddress.ip_address(port.address))
        if port.role == "client":
            return MplsUdpPort(port.mac, address=address, rcvbuf=rcvbuf)
        return MplsUdpPort(port.mac, address=address, peers=[server.address for server in here], learn=False,
                           rcvbuf=rcvbuf)  # fmt: skip
    client = port.role == "client"
    accept = CLIENT_SIDE_ETHERTYPES if client else server_side_ethertypes(here)
    # A client port takes the IP frames to its virtual IPs only (the host's own traffic stays in the kernel), an IP
    # version without virtual IPs not at all.
    destinations: list[bytes] = []
    versions = ((IPV4_ADDR_LEN, ETH_P_IP, FILTERED_IPV4_MAX), (IPV6_ADDR_LEN, ETH_P_IPV6, FILTERED_IPV6_MAX))
    for length, ethertype, most in versions if client and vips else ():
        addresses = [vip.address for vip in vips if len(vip.address) == length]
        if not addresses:
            accept -= {ethertype}
        elif len(addresses) <= most:
            destinations += addresses
    # With rings, transmit through a TPACKET_V2 TX ring too: one system call per block each way.
    # host_only: a bridge floods unknown unicast, and a frame for another host must not be switched here too.
    # A plain socket's client port reads labelled frames first, from a socket of their own (PacketPort's lane).
    return open_port(
        port.interface, ring=ring, accept=accept, tx_ring=ring, host_only=True, max_len=max_len, retire_ms=retire_ms,
        rcvbuf=None if ring else rcvbuf, lane=LABELLED if client and not ring else None,
        destinations=destinations or None,
    )  # fmt: skip


class Daemon:
    """The balancer daemon's parts, in one loop."""

    def __init__(self, config: DaemonConfig, *, fresh: bool = False) -> None:
        """``fresh``: with a state directory, start clean instead of adopting what a previous daemon left."""
        self.config = config
        self.loop = Loop()
        clock = self.loop.clock
        self.store: StateStore | None = None
        if config.state_dir:
            try:
                self.balancer, self.store, _ = open_balancer(
                    config.balancer, Path(config.state_dir), now=clock(), fresh=fresh
                )
            except StateError as exc:
                raise StartError(str(exc)) from None
        else:
            self.balancer = Balancer(config.balancer)
        self.balancer.pool.on_status = _log_server
        self.balancer.on_mac = _log_mac
        bc = config.balancer
        log.info(
            "event=config_loaded ports=%d vips=%d servers=%d algorithm=%s offload=%s ring=%s datapath=%s "
            "fast_path_build=%s rows_on_huge_pages_mib=%d",
            len(bc.ports), len(bc.vips), len(bc.servers), bc.algorithm, config.offload, config.ring,
            value(config.datapath), value(FAST_PATH), huge_pages_of(self.balancer.switching.rows) >> 20,
        )  # fmt: skip
        # The kernel offload: the driver talks to the balancer through the offload, which mirrors its
        # label switching table into the kernel after each batch and before its timers.
        try:
            self.locks = lock_interfaces(config.balancer)
        except BaseException:
            self._close_store()
            raise
        self.offloaded: OffloadedBalancer | None = None
        if config.offload == "kernel":
            from mplslb.offload.driver import OffloadedBalancer

            try:
                self.offloaded = OffloadedBalancer(
                    self.balancer, self.loop, syn_rate=config.offload_syn_rate, pins=self._pins(), fresh=fresh,
                    gso=config.offload_gso, tickets=config.offload_syn, prealloc=config.offload_prealloc,
                )  # fmt: skip
            except BaseException:
                self._unlock()
                self._close_store()
                raise
        self.changes = HostChanges()
        try:
            setup_balancer([str(ipaddress.ip_address(v.address)) for v in config.balancer.vips], self.changes)
            frame_max = self.offloaded.offload.frame_max if self.offloaded is not None else 0
            self.ports = open_ports(
                config.balancer,
                ring=config.ring,
                max_len=frame_max or None,
                retire_ms=config.ring_retire_ms,
                rcvbuf=config.socket_rcvbuf,
            )
        except BaseException:  # nothing of a daemon that could not start stays behind (but its kept state)
            self.changes.undo()
            self._unlock()
            if self.offloaded is not None:
                self.offloaded.close(keep=self.store is not None)
            self._close_store()
            raise
        # Block mode: receive-ring blocks switched in place by the numpy fast path (Balancer.receive_block).
        self.driver = BalancerDriver(self.offloaded or self.balancer, self.ports, self.loop, block=config.ring)
        self.cluster = self._open_cluster()
        self.announce()
        self.rates = RateTracker()
        self.socket_counts: dict[str, dict[str, int]] = {}
        self._refused_logged: dict[str, int] = {}  # admission's refusals already logged, by reason
        self._synced_logged = False
        self.latest: dict[str, Any] | None = None
        # The status page's history; (snapshot, history points) published together for the HTTP thread.
        self.history = StatusHistory()
        self.published: tuple[dict[str, Any] | None, tuple[dict[str, Any], ...]] = (None, ())
        self.checker: HealthChecker | None = None
        self.probes: HealthProbeDriver | None = None
        if config.health is not None:
            self.checker = HealthChecker(config.health, [s.config.name for s in self.balancer.pool.servers])
            self.balancer.confirm_passive = True  # unanswered SYNs only make a server suspect: the checks decide
            self.probes = HealthProbeDriver(
                self.checker,
                self._address_of,
                on_result=lambda result: apply_result(self.balancer, result),
                clock=clock,
            )
            self.loop.add_reader(self.probes.fileno(), self.probes.on_ready)
            # The first probes go out once the loop runs to read their answers: a slow start (adopting a kept
            # state under load) must not pass for servers that do not answer.
            self.loop.call_at(clock(), self._health_tick)
        self.control = ControlServer(
            config.control_socket,
            self._snapshot,
            balancer_commands(self.balancer, clock=clock, health=self.checker, reload=self.reload),
        )
        self.loop.add_reader(self.control.fileno(), self.control.on_readable)
        self.metrics = None
        if config.metrics is not None:
            from mplslb.control.metrics import start_metrics_server

            self.metrics = start_metrics_server(
                config.metrics[1], config.metrics[0], lambda: self.latest, page=lambda: self.published
            )
        self._second_tick()
        self.speaker: BgpSpeaker | None = None
        if config.bgp is not None:
            try:
                self.speaker = BgpSpeaker(config.bgp)
            except BaseException as exc:
                self.close()
                if isinstance(exc, (OSError, RuntimeError)):
                    raise StartError(f"bgp: cannot start the speaker: {exc}") from None
                raise
            self._bgp_tick()

    def node_health(self) -> tuple[bool, str]:
        """Whether this node should be announced to the routers, else why not (the loop being alive is implied:
        this runs in it)."""
        if not any(s.status == ServerStatus.UP for s in self.balancer.pool.servers):
            return False, "no_server_up"
        if self.cluster is not None and not self.cluster.sync.synced:  # clustering: the peers' sessions are in
            return False, "not_synced"
        return True, ""

    def _bgp_tick(self) -> None:
        assert self.speaker is not None
        self.speaker.beat(*self.node_health())
        self.loop.call_later(BEAT_INTERVAL, self._bgp_tick)

    def _open_cluster(self) -> ClusterLink | None:
        """The session sync with the peers (``[cluster]``), or None for a single balancer; a sync address that
        cannot be bound stops the start, naming it."""
        cluster = self.config.balancer.cluster
        if cluster is None:
            return None
        try:
            link = ClusterLink(ClusterSync(self.balancer, cluster, self.loop.clock()), self.loop)
        except OSError as exc:
            self.driver.close()
            for port in self.ports.values():
                port.close()  # type: ignore[attr-defined]
            if self.offloaded is not None:
                self.offloaded.close()
            self.changes.undo()
            self._unlock()
            where = f"{cluster.sync_address}:{cluster.sync_port}"
            raise StartError(f"cluster sync: cannot bind {where}: {exc.strerror or exc}") from None
        log.info(
            "event=cluster node=%d nodes=%d peers=%d sync=%s authenticated=%s",
            cluster.node, cluster.nodes, len(cluster.peers), value(f"{cluster.sync_address}:{cluster.sync_port}"),
            bool(cluster.key),
        )  # fmt: skip
        return link

    def announce(self) -> None:
        """Tell the client side the VIPs are here (gratuitous ARP, unsolicited neighbour advertisements)."""
        frames = self.balancer.announcements()
        self.driver.write(frames)
        log.info("event=vips_announced frames=%d", len(frames))

    def _address_of(self, name: str) -> bytes | None:
        return self.balancer.pool.get(name).config.address if name in self.balancer.pool else None

    def _snapshot(self) -> dict[str, Any]:
        return self.latest or self._with_offload(
            snapshot(self.balancer, health=self.checker, rates=self.rates, now=self.loop.clock())
        )

    def _with_offload(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The datapath in use, the one-frame fast path's build (``native``, or ``python`` and why), the kernel
        offload's figures under ``"offload"`` when it is on, each port's socket counters under ``"ports"``, and the
        frames the ports themselves dropped (e.g. ``csum_partial_unreadable``) among the drops."""
        snap["datapath"] = self.config.datapath
        snap["fast_path_build"] = FAST_PATH
        if self.offloaded is not None:
            with_offload(snap, self.offloaded.stats())
        snap["ports"] = {name: dict(counts) for name, counts in self.socket_counts.items()}
        drops = snap["drops"] = dict(snap["drops"])
        for port in getattr(self, "ports", {}).values():
            for reason, count in getattr(port, "drops", {}).items():
                drops[reason] = drops.get(reason, 0) + count
        speaker = getattr(self, "speaker", None)
        if speaker is not None:
            snap["bgp"] = speaker.status()
        if self.cluster is not None:
            snap["cluster"] = self.cluster.sync.status(self.loop.clock()) | {"socket_errors": dict(self.cluster.errors)}
        return snap

    def _read_socket_counts(self) -> None:
        """Fold each packet socket's kernel counters (PACKET_STATISTICS: frames queued to it, frames it lost
        because its buffer or ring was full; reading resets them) into totals, and log new losses."""
        for port_id, port in self.ports.items():
            read = getattr(port, "stats", None)
            if read is None:
                continue
            try:
                received, dropped = read()
            except OSError:
                continue
            cfg = self.balancer.ports[port_id]
            name = cfg.name or cfg.interface or str(port_id)
            counts = self.socket_counts.setdefault(name, {"kernel_received": 0, "kernel_dropped": 0})
            counts["kernel_received"] += received
            counts["kernel_dropped"] += dropped
            lane = getattr(port, "lane_counts", None)
            if lane is not None and getattr(port, "lane", None) is not None:
                counts["labelled_received"], counts["labelled_dropped"] = lane["received"], lane["dropped"]
            if dropped:
                log.warning(
                    "event=kernel_drops port=%s dropped=%d total=%d", value(name), dropped, counts["kernel_dropped"]
                )

    def _health_tick(self) -> None:
        assert self.probes is not None
        now = self.loop.clock()
        self.probes.on_timer(now)
        deadline = self.probes.next_deadline()
        self.loop.call_at(max(now + 0.01, deadline if deadline is not None else now + 1.0), self._health_tick)

    def _log_refusals(self) -> None:
        """One line a second at most while admission refuses new sessions (see :func:`refusal_line`)."""
        line, self._refused_logged = refusal_line(self._refused_logged, self.balancer.admission.refused)
        if line:
            log.warning("%s", line)

    def _second_tick(self) -> None:
        now = self.loop.clock()
        self._read_socket_counts()
        self._log_refusals()
        if self.cluster is not None and self.cluster.sync.synced and not self._synced_logged:
            self._synced_logged = True
            log.info("event=cluster_synced replicas=%d", self.cluster.sync.replicas())
        if self.checker is not None:
            follow_pool(self.checker, self.balancer, now)  # servers added, and retired ones that have left
            reconcile(self.balancer, self.checker, now)
        self.control.on_timer(now)
        # Swap the reference, never mutate: the metrics thread reads the latest snapshot.
        self.latest = self._with_offload(snapshot(self.balancer, health=self.checker, rates=self.rates, now=now))
        self.history.record(self.latest)
        self.published = (self.latest, self.history.points())
        self.loop.call_at(now + SNAPSHOT_INTERVAL, self._second_tick)

    def run(self, stop: threading.Event | None = None) -> None:
        """Say the daemon is up (the start line with its addresses; READY=1 to systemd) and run the loop."""
        page = "none"
        if self.metrics is not None and self.config.metrics is not None:
            host = self.config.metrics[0]
            page = f"http://{f'[{host}]' if ':' in host else host}:{self.metrics.port}/"
        log.info("event=started pid=%d status_page=%s control=%s", os.getpid(), page, value(self.config.control_socket))
        notify(f"READY=1\nSTATUS=balancing; status page {page}")
        # What was built to start (the tables' per-label lists of a million entries among it) lives as long as the
        # daemon: collected once, then frozen, a full collection no longer walks it. Measured under 50k frames/s
        # (docs/benchmarks.md, "Wire paths at equal paced loads, shaped"): a 99-120 ms pause of the loop and one of
        # 31-34 ms in a few seconds of traffic before, none above 1 ms after.
        gc.collect()
        gc.freeze()
        self.loop.run(stop)

    #: The file the daemon was started from, which :meth:`reload` re-reads.
    config_path: Path | None = None

    def reload(self) -> dict[str, Any]:
        """Re-read :attr:`config_path` and apply what changed (:meth:`Balancer.reconfigure`); a file that does not
        load, or changes what cannot change while running, is refused with its file, key and reason, and the
        daemon keeps its configuration. Logs one line either way; returns the control reply. The service manager
        is told (``RELOADING=1``, then ``READY=1`` once the reload is over, applied or refused)."""
        path = self.config_path
        if path is None:
            return {"error": "reload: the daemon was not started from a configuration file"}
        notify(reloading_message())
        try:
            return self._reload(path)
        finally:
            notify("READY=1")

    def _reload(self, path: Path) -> dict[str, Any]:
        try:
            new = load_daemon_config(path)
            running = self.config
            for key, was, now in (
                ("health_check", running.health, new.health),
                ("control.socket", running.control_socket, new.control_socket),
                ("control.metrics", running.metrics, new.metrics),
                ("ring", running.ring, new.ring),
                ("ring_retire_ms", running.ring_retire_ms, new.ring_retire_ms),
                ("socket_rcvbuf", running.socket_rcvbuf, new.socket_rcvbuf),
                ("offload", running.offload, new.offload),
                ("bgp", running.bgp, new.bgp),
            ):
                if was != now:
                    raise ConfigError(str(path), key, FIXED_REASON)
            changes = self.balancer.reconfigure(new.balancer, source=str(path))
        except ConfigError as exc:
            log.warning(
                "event=reload_refused file=%s key=%s reason=%s", value(exc.source), value(exc.key), value(exc.reason)
            )
            return {"error": f"reload refused: {exc}", "file": exc.source, "key": exc.key, "reason": exc.reason}
        self.config = replace(self.config, balancer=self.balancer.config)
        cluster = self.balancer.config.cluster
        if self.cluster is not None and cluster is not None and cluster.peers != self.cluster.sync.config.peers:
            self.cluster.sync.set_peers(cluster.peers)
        if self.checker is not None:
            follow_pool(self.checker, self.balancer, self.loop.clock())
        log.info("event=reload_ok file=%s changed=%s", value(path), value(",".join(changes) or "-"))
        return {"ok": True, "file": str(path), "changes": list(changes)}

    def close(self) -> None:
        notify("STOPPING=1")
        speaker = getattr(self, "speaker", None)
        if speaker is not None:  # the routers stop sending here before the datapath closes
            speaker.close()
            self.speaker = None
        if self.metrics is not None:
            self.metrics.close()
        if self.probes is not None:
            self.probes.close()
        self.control.close()
        self.driver.close()
        if self.cluster is not None:
            self.cluster.close()
        keep = self.store is not None  # a next daemon adopts the state: the kernel goes on switching meanwhile
        if self.offloaded is not None:  # detach from every port, or leave the program pinned and attached
            self.offloaded.close(keep=keep)
        for port in self.ports.values():
            port.close()  # type: ignore[attr-defined]
        self.loop.close()
        if not keep:  # with kept state the VIPs' blackhole routes stay too: the host stays silent meanwhile
            self.changes.undo()
        self._unlock()
        self._close_store()

    def _pins(self) -> Path | None:
        """Where the kernel offload pins its program, map and links when the state is kept."""
        if self.store is None:
            return None
        from mplslb.offload.bpf import PIN_ROOT

        return PIN_ROOT / self.config.instance

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()

    def _unlock(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks = []


def run_daemon(config_path: str | Path, *, ready_file: str = "", state_dir: str = "", fresh: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. ``state_dir`` keeps its state there (overrides ``[state]``);
    ``fresh`` starts clean instead of adopting what a previous daemon left."""
    config = load_daemon_config(config_path)
    if state_dir:
        config = replace(config, state_dir=state_dir)
    daemon = Daemon(config, fresh=fresh)

    def handle(_signum: int, _frame: object) -> None:
        daemon.loop.stop()  # wakes the loop (its wake-up pipe): no need to look at an event every STOP_POLL

    def hangup(_signum: int, _frame: object) -> None:  # reload at the loop's next turn, not inside a frame's work
        daemon.loop.call_at(daemon.loop.clock(), daemon.reload)
        daemon.loop.wake()

    daemon.config_path = Path(config_path)
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    try:
        if ready_file:
            Path(ready_file).write_text("ready\n")
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("event=stopping kept_state=%s", daemon.store is not None)
        started = time.monotonic()
        daemon.close()
        log.info("event=stopped seconds=%.3f", time.monotonic() - started)
    return 0
