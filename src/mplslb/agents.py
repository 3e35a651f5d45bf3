"""The endpoint agents: a TUN device toward the host's stack, labels toward the wire (claims 8, 12, 13, 14).

``mplslb agent server`` makes a host a labelled server and ``mplslb agent client`` a labelled client; ordinary
programs (nginx, curl, wrk) talk through them unchanged. Each agent is the sans-I/O endpoint of
:mod:`mplslb.endpoint` between two drivers: a :class:`~mplslb.drivers.tun.TunDevice` and the wire, either an
AF_PACKET port on an Ethernet interface or MPLS-in-UDP to the balancer across routed IP (``--balancer``; for a server
agent, the balancer's server-side ``mpls_udp`` port). MPLS-in-UDP is not in the kernel datapath: an agent asked for
``--datapath kernel`` with ``--balancer`` says so and runs the tun datapath.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mplslb.control.server import ControlServer
from mplslb.drivers.afpacket import open_port
from mplslb.drivers.loop import EndpointDriver, Loop, Port
from mplslb.drivers.mplsudp import MplsUdpEndpointLink, overhead
from mplslb.drivers.tun import TunDevice
from mplslb.endpoint import ENDPOINT_FLOW_TIMEOUT, ClientEndpoint, Endpoint, ServerEndpoint
from mplslb.hostsetup import (
    HostChanges,
    interface_mac,
    setup_client,
    setup_client_kernel,
    setup_server,
    setup_server_kernel,
)
from mplslb.logfmt import value
from mplslb.switching.layout import ENDPOINT_TRAFFIC
from mplslb.wire.ethernet import ETH_P_MPLS_UC

log = logging.getLogger("mplslb.agent")
DATAPATHS = ("auto", "kernel", "tun")
#: How often the kernel datapath's agent looks for idle flows, at most (seconds).
EXPIRY_INTERVAL = 5.0

#: How often an agent closes control connections that outlived their timeout (seconds).
CONTROL_TICK = 1.0

#: The wire carries a 4-byte label in front of each packet: the TUN's MTU leaves room for it (over MPLS-in-UDP, room
#: for the outer IP and UDP headers too: :func:`mplslb.drivers.mplsudp.overhead`).
LABEL_OVERHEAD = 4
WIRE_MTU = 1500


@dataclass(frozen=True)
class AgentConfig:
    role: str  # "server" or "client"
    interface: str
    vips: tuple[str, ...]
    tun: str = ""
    gateway_mac: bytes = b""  # client over Ethernet: the balancer port's MAC
    balancer: str = ""  # over MPLS-in-UDP: the balancer's address (port 6635)
    udp_local: str = "0.0.0.0"
    udp_port: int = 6635
    flow_timeout: float = ENDPOINT_FLOW_TIMEOUT
    #: Client: a flow that heard nothing back for this long sends unlabelled again (its label may have died).
    fallback: float = 2.0
    #: The TUN's MTU (TCP's MSS follows it on both ends); 0: the wire's less what the transport adds (:meth:`tun_mtu`).
    mtu: int = 0
    ready_file: str = ""
    #: The agent's control socket (``mplslb status --socket`` reads its counters); "" for none.
    control_socket: str = ""
    #: Serve the agent's Prometheus ``/metrics`` on (address, port); None for none.
    metrics: tuple[str, int] | None = None
    datapath: str = "auto"  # "kernel": BPF programs on the wire interface; "tun": packets through this process
    #: Server, kernel datapath: labelled super-packets leave whole (TX checksumming on), for a balancer whose kernel
    #: offload switches them (``offload_gso``); without it they are segmented before they leave.
    super_packets: bool = False
    #: Kernel datapath: the name the agent's kept datapath goes by (its pins under ``/sys/fs/bpf/mplslb/``, its host
    #: changes in ``/run/mplslb/<kept>.host.json``); "" for none. One per role, namespace and interface.
    kept: str = ""
    #: Kernel datapath: on exit, leave the programs attached with their flows and the host as set up, for the next
    #: agent of the same name, which takes them over (without it, an agent lets a kept datapath go as it starts).
    keep: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.datapath not in DATAPATHS:
            raise ValueError(f"datapath must be one of {', '.join(DATAPATHS)}")
        if self.role not in ("server", "client"):
            raise ValueError("role must be server or client")
        if not self.vips:
            raise ValueError("at least one --vip is needed")
        for vip in self.vips:
            ipaddress.ip_address(vip)
        if self.super_packets and (self.role != "server" or self.datapath == "tun" or self.balancer):
            raise ValueError("--super-packets is for a server agent on the kernel datapath over Ethernet")
        if self.role == "client" and not self.balancer and len(self.gateway_mac) != 6:
            raise ValueError("a client agent needs --gateway-mac (Ethernet) or --balancer (MPLS-in-UDP)")
        if self.keep and (self.datapath == "tun" or self.balancer or not self.kept):
            raise ValueError("--keep is for the kernel datapath over Ethernet")

    def host_file(self) -> Path:
        """Where the kept datapath's host changes are written (``kept``)."""
        from mplslb.control.client import RUN_DIR

        return Path(RUN_DIR) / f"{self.kept}.host.json"

    def pins(self) -> Path:
        """Where the kept datapath's maps, programs and links are pinned (``kept``)."""
        from mplslb.offload.bpf import PIN_ROOT

        return PIN_ROOT / self.kept

    def about(self) -> dict[str, Any]:
        """What the host changes of a kept datapath were made for: another agent takes them over only if it is the
        same."""
        return {"role": self.role, "interface": self.interface, "vips": sorted(self.vips),
                "gateway_mac": self.gateway_mac.hex(), "super_packets": self.super_packets}  # fmt: skip

    def tun_mtu(self) -> int:
        """The TUN's MTU: ``mtu``, or the wire's less the label (over Ethernet) or less the label, UDP and outer IP
        headers (MPLS-in-UDP; the outer family is the local address's, as the link's socket's), so a packet of that
        size is carried whole, never as IP fragments."""
        if self.mtu:
            return self.mtu
        return WIRE_MTU - (overhead(self.udp_local) if self.balancer else LABEL_OVERHEAD)


def choose_datapath(config: AgentConfig) -> str:
    """The datapath the agent will run: ``kernel`` when asked for (or ``auto``) and possible, else ``tun``, with a
    log line saying why. Asking for ``kernel`` where BPF or clang is missing is an error."""
    if config.balancer:
        if config.datapath == "kernel":
            log.warning(
                "event=datapath_refused datapath=kernel using=tun reason=%s",
                value("MPLS-in-UDP (--balancer) is not in the kernel datapath"),
            )
        return "tun"
    if config.datapath == "tun":
        return "tun"
    from mplslb.offload.endpoint import unavailable_reason

    why = unavailable_reason()
    if not why:
        return "kernel"
    if config.datapath == "kernel":
        raise RuntimeError(f"datapath kernel is not available here: {why}")
    log.warning("event=datapath_unavailable datapath=kernel using=tun reason=%s", value(why))
    if config.keep:
        log.warning("event=keep_ignored reason=%s", value("the tun datapath is this process: nothing outlives it"))
    return "tun"


def kept_host(config: AgentConfig) -> tuple[HostChanges, dict[str, Any]] | None:
    """The host changes a kept kernel datapath of this agent's name left, and what they were made for
    (:meth:`AgentConfig.about`); None when there are none (or they cannot be read, said in the log)."""
    if not config.kept or not config.host_file().exists():
        return None
    try:
        return HostChanges.load(config.host_file())
    except ValueError as exc:
        log.warning("event=kept_host_unreadable reason=%s", value(str(exc)))
        return None


def _undo_kept_host(changes: HostChanges) -> None:
    failed = changes.undo()
    if failed:
        log.warning("event=kept_host_undone failed=%s", value("; ".join(failed)))


def let_kept_go(config: AgentConfig) -> None:
    """Put back what a kept kernel datapath of this agent's name left, for an agent that does not take it over (it
    runs another datapath, has no ``--keep`` or another configuration): its host changes undone, its pins removed
    (its programs detached as their links go)."""
    if not config.kept:
        return
    from mplslb.offload import bpf

    leftover = kept_host(config)
    if leftover is not None:
        _undo_kept_host(leftover[0])
    config.host_file().unlink(missing_ok=True)  # read or not, nobody's now
    if config.pins().is_dir():
        log.warning("event=kept_datapath_let_go pins=%s", value(str(config.pins())))
        bpf.unpin(config.pins(), [socket.if_nametoindex(config.interface)])


class KernelAgent:
    """An agent whose labels are handled by BPF programs on the wire interface: this process only loads them,
    changes the host, expires idle flows and keeps the counters. ``close()`` detaches and puts the host back."""

    datapath = "kernel"

    def __init__(self, config: AgentConfig) -> None:
        from mplslb.offload.endpoint import KernelEndpoint

        self.config = config
        self.changes = HostChanges()
        self.loop = Loop()
        self.kernel: KernelEndpoint | None = None
        self.control: ControlServer | None = None
        self.kept = False  # took over a kept datapath and its host
        try:
            mac = interface_mac(config.interface)
            self.kernel = KernelEndpoint(config.role, mac=mac, vips=config.vips, gateway_mac=config.gateway_mac,
                                         flow_timeout=config.flow_timeout,
                                         fallback=config.fallback if config.role == "client" else 0.0,
                                         pins=config.pins() if config.keep else None)  # fmt: skip
            leftover = kept_host(config) if config.keep else None
            if leftover is not None and leftover[1] != config.about():
                log.warning("event=kept_host_not_taken reason=config_changed file=%s", value(str(config.host_file())))
                leftover = None
            if leftover is not None:
                self.kernel.attach(config.interface)  # takes the kept datapath over when it fits
                if self.kernel.adopted:
                    self.changes, self.kept = leftover[0], True
                else:  # a kept host whose datapath did not fit (attach let it go): put back as it was
                    _undo_kept_host(leftover[0])
            else:  # a kept datapath of this name that is not taken over: let go, set up afresh
                let_kept_go(config)
            if not self.kept:
                if config.role == "server":
                    setup_server_kernel(config.interface, list(config.vips), self.changes,
                                        super_packets=config.super_packets)  # fmt: skip
                else:
                    setup_client_kernel(config.interface, list(config.vips), config.gateway_mac, self.changes)
            if config.keep:
                self.changes.save(config.host_file(), **config.about())  # before the pins: a kill leaves both
            if not self.kernel.attached:
                self.kernel.attach(config.interface)
            log.info("event=datapath datapath=kernel interface=%s role=%s kept=%s", value(config.interface),
                     config.role, "taken_over" if self.kept else "yes" if config.keep else "no")  # fmt: skip
            self.control = _serve_control(self, self.loop)
        except BaseException:
            self.close()
            raise

    def run(self, stop: threading.Event | None = None) -> None:
        if self.config.ready_file:
            Path(self.config.ready_file).write_text(f"{self.config.interface}\ndatapath=kernel\n")
        interval = min(EXPIRY_INTERVAL, max(self.config.flow_timeout / 4, 0.1))

        def expire() -> None:
            if self.kernel is not None:
                self.kernel.expire()
            self.loop.call_later(interval, expire)

        self.loop.call_later(interval, expire)
        self.loop.run(stop)

    def stop(self) -> None:
        self.loop.stop()

    def counts(self) -> dict[str, int]:
        return self.kernel.counts() if self.kernel is not None else {}

    def traffic(self) -> dict[str, int]:
        counts = self.counts()
        return {name: counts[name] for name in ENDPOINT_TRAFFIC if name in counts}

    def drops(self) -> dict[str, int]:
        return {name: n for name, n in self.counts().items() if n and name not in ENDPOINT_TRAFFIC}

    def flows(self) -> int:
        return self.kernel.flow_count() if self.kernel is not None else 0

    def close(self) -> list[str]:
        """Detach and put the host back; with ``keep``, leave both for the next agent."""
        if self.control is not None:
            self.control.close()
            self.control = None
        keep = self.config.keep and self.kernel is not None and self.kernel.attached != ""
        if self.kernel is not None:
            self.kernel.close(keep=keep)
            self.kernel = None
        self.loop.close()
        if keep:
            return []
        if self.config.keep:
            self.config.host_file().unlink(missing_ok=True)
        return self.changes.undo()


class Agent:
    """A running agent: its devices, host changes, loop and endpoint. ``close()`` puts the host back."""

    datapath = "tun"

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.changes = HostChanges()
        self.loop = Loop()
        self.tun = TunDevice(config.tun or None)
        self.wire: Port
        self.control: ControlServer | None = None
        try:
            let_kept_go(config)  # a kernel datapath kept on the interface would take the labelled frames first
            self.tun.configure(up=True, mtu=config.tun_mtu())
            mac = interface_mac(config.interface)
            vip_bytes = [ipaddress.ip_address(v).packed for v in config.vips]
            if config.balancer:
                link = MplsUdpEndpointLink(
                    mac, (config.balancer, config.udp_port), address=config.udp_local, port=config.udp_port
                )
                self.wire = link
                gateway = link.balancer_mac
                if not link.symmetric:  # a canonical source port was taken: some sessions' entropy differs
                    log.warning("event=entropy_ports_not_canonical ports=%s", value(link.source_ports))
            else:
                self.wire = open_port(config.interface, accept={ETH_P_MPLS_UC}, host_only=True)
                gateway = config.gateway_mac
            self.endpoint: Endpoint
            if config.role == "server":
                self.endpoint = ServerEndpoint(mac=mac, vips=vip_bytes, flow_timeout=config.flow_timeout)
                setup_server(self.tun.name, list(config.vips), self.changes)
            else:
                self.endpoint = ClientEndpoint(
                    mac=mac, gateway_mac=gateway, flow_timeout=config.flow_timeout, fallback=config.fallback
                )
                setup_client(self.tun.name, config.interface, list(config.vips), self.changes)
            self.driver = EndpointDriver(self.endpoint, self.tun, self.wire, self.loop)
            self.control = _serve_control(self, self.loop)
        except BaseException:
            self.close()
            raise

    def run(self, stop: threading.Event | None = None) -> None:
        if self.config.ready_file:
            Path(self.config.ready_file).write_text(f"{self.tun.name}\ndatapath=tun\n")
        self.loop.run(stop)

    def stop(self) -> None:
        self.loop.stop()

    def counts(self) -> dict[str, int]:
        return {**self.endpoint.counters, **self.endpoint.drops}

    def traffic(self) -> dict[str, int]:
        return dict(self.endpoint.counters)

    def drops(self) -> dict[str, int]:
        """The endpoint's drops and its wire's (MPLS-in-UDP: malformed or unknown datagrams, a full receive buffer)."""
        out = dict(self.endpoint.drops)
        for reason, count in getattr(self.wire, "drops", {}).items():
            out[reason] = out.get(reason, 0) + count
        return out

    def flows(self) -> int:
        return len(self.endpoint.flows)

    def close(self) -> list[str]:
        if self.control is not None:
            self.control.close()
            self.control = None
        failed = self.changes.undo()
        wire = getattr(self, "wire", None)
        if wire is not None:
            wire.close()
        self.tun.close()
        self.loop.close()
        return failed


class RunningAgent(Protocol):
    """What the status of an agent is made of (both datapaths' agents are one)."""

    config: AgentConfig
    datapath: str

    def flows(self) -> int: ...

    def traffic(self) -> dict[str, int]: ...

    def drops(self) -> dict[str, int]: ...


def agent_snapshot(agent: RunningAgent) -> dict[str, Any]:
    """What ``mplslb status`` and the agent's metrics show: its role, datapath, flows and every counter (the
    kernel datapath's are read from its counter map), each drop under its reason."""
    config = agent.config
    return {
        "agent": {
            "role": config.role,
            "interface": config.interface,
            "datapath": agent.datapath,
            "kept": _kept(agent),
            "vips": list(config.vips),
            "flows": agent.flows(),
            "traffic": agent.traffic(),
            "drops": agent.drops(),
        }
    }


def _kept(agent: RunningAgent) -> str:
    """Whether the agent keeps its datapath across a restart: "taken over" (from the agent before it), "yes" or
    "no"."""
    if getattr(agent, "kept", False):
        return "taken over"
    return "yes" if agent.config.keep and agent.datapath == "kernel" else "no"


def _serve_control(agent: RunningAgent, loop: Loop) -> ControlServer | None:
    path = agent.config.control_socket
    if not path:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    control = ControlServer(path, lambda: agent_snapshot(agent))
    loop.add_reader(control.fileno(), control.on_readable)

    def tick() -> None:  # close the connections of clients that went quiet
        control.on_timer(loop.clock())
        loop.call_later(CONTROL_TICK, tick)

    loop.call_later(CONTROL_TICK, tick)
    return control


def make_agent(config: AgentConfig) -> Agent | KernelAgent:
    """The agent of the datapath :func:`choose_datapath` picks."""
    if choose_datapath(config) == "kernel":
        return KernelAgent(config)
    return Agent(config)


def run_agent(config: AgentConfig, *, on_ready: Callable[[Agent | KernelAgent], None] | None = None) -> int:
    """Run an agent until SIGTERM or SIGINT; returns a process exit status."""
    agent = make_agent(config)

    def handle(_signum: int, _frame: object) -> None:
        agent.stop()  # wakes the loop (its wake-up pipe): no need to look at an event every STOP_POLL

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics = None
    try:
        if config.metrics is not None:
            from mplslb.control.metrics import AgentCollector, start_metrics_server

            addr, port = config.metrics
            metrics = start_metrics_server(port, addr, lambda: agent_snapshot(agent), collector=AgentCollector)
        if on_ready is not None:
            on_ready(agent)
        log.info("event=started role=%s datapath=%s interface=%s control=%s", config.role, agent.datapath,
                 value(config.interface), value(config.control_socket))  # fmt: skip
        agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics is not None:
            metrics.close()
        figures = {**agent.traffic(), **agent.drops()}
        log.info("event=stopped role=%s %s", config.role, " ".join(f"{k}={v}" for k, v in figures.items() if v))
        failed = agent.close()
    return 1 if failed else 0
