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
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mplslb.drivers.afpacket import open_port
from mplslb.drivers.loop import EndpointDriver, Loop, Port
from mplslb.drivers.mplsudp import MplsUdpEndpointLink
from mplslb.drivers.tun import TunDevice
from mplslb.endpoint import ClientEndpoint, Endpoint, ServerEndpoint
from mplslb.hostsetup import (
    HostChanges,
    interface_mac,
    setup_client,
    setup_client_kernel,
    setup_server,
    setup_server_kernel,
)
from mplslb.wire.ethernet import ETH_P_MPLS_UC

log = logging.getLogger("mplslb.agent")
DATAPATHS = ("auto", "kernel", "tun")
#: How often the kernel datapath's agent looks for idle flows, at most (seconds).
EXPIRY_INTERVAL = 5.0

#: The wire carries a 4-byte label in front of each packet: the TUN's MTU leaves room for it.
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
    flow_timeout: float = 300.0
    #: Client: a flow that heard nothing back for this long sends unlabelled again (its label may have died).
    fallback: float = 2.0
    mtu: int = WIRE_MTU - LABEL_OVERHEAD
    ready_file: str = ""
    datapath: str = "auto"  # "kernel": BPF programs on the wire interface; "tun": packets through this process
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
        if self.role == "client" and not self.balancer and len(self.gateway_mac) != 6:
            raise ValueError("a client agent needs --gateway-mac (Ethernet) or --balancer (MPLS-in-UDP)")


def choose_datapath(config: AgentConfig) -> str:
    """The datapath the agent will run: ``kernel`` when asked for (or ``auto``) and possible, else ``tun``, with a
    log line saying why. Asking for ``kernel`` where BPF or clang is missing is an error."""
    if config.balancer:
        if config.datapath == "kernel":
            log.warning("datapath kernel refused: MPLS-in-UDP (--balancer) is not in the kernel datapath; using tun")
        return "tun"
    if config.datapath == "tun":
        return "tun"
    from mplslb.offload.endpoint import unavailable_reason

    why = unavailable_reason()
    if not why:
        return "kernel"
    if config.datapath == "kernel":
        raise RuntimeError(f"datapath kernel is not available here: {why}")
    log.warning("kernel datapath not available (%s): using tun", why)
    return "tun"


class KernelAgent:
    """An agent whose labels are handled by BPF programs on the wire interface: this process only loads them,
    changes the host, expires idle flows and keeps the counters. ``close()`` detaches and puts the host back."""

    datapath = "kernel"

    def __init__(self, config: AgentConfig) -> None:
        from mplslb.offload.endpoint import KernelEndpoint

        self.config = config
        self.changes = HostChanges()
        self.stop_event = threading.Event()
        self.kernel: KernelEndpoint | None = None
        try:
            mac = interface_mac(config.interface)
            self.kernel = KernelEndpoint(config.role, mac=mac, vips=config.vips, gateway_mac=config.gateway_mac,
                                         flow_timeout=config.flow_timeout,
                                         fallback=config.fallback if config.role == "client" else 0.0)  # fmt: skip
            if config.role == "server":
                setup_server_kernel(config.interface, list(config.vips), self.changes)
            else:
                setup_client_kernel(config.interface, list(config.vips), config.gateway_mac, self.changes)
            self.kernel.attach(config.interface)
            log.info("datapath kernel on %s (%s)", config.interface, config.role)
        except BaseException:
            self.close()
            raise

    def run(self, stop: threading.Event | None = None) -> None:
        if self.config.ready_file:
            Path(self.config.ready_file).write_text(f"{self.config.interface}\ndatapath=kernel\n")
        stop = stop or self.stop_event
        interval = min(EXPIRY_INTERVAL, max(self.config.flow_timeout / 4, 0.1))
        while not stop.wait(interval):
            if self.kernel is not None:
                self.kernel.expire()

    def stop(self) -> None:
        self.stop_event.set()

    def counts(self) -> dict[str, int]:
        return self.kernel.counts() if self.kernel is not None else {}

    def close(self) -> list[str]:
        if self.kernel is not None:
            counts = {k: v for k, v in self.kernel.counts().items() if v} if self.kernel.maps else {}
            log.info("kernel datapath counters: %s", counts)
            self.kernel.close()
            self.kernel = None
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
        try:
            self.tun.configure(up=True, mtu=config.mtu)
            mac = interface_mac(config.interface)
            vip_bytes = [ipaddress.ip_address(v).packed for v in config.vips]
            if config.balancer:
                link = MplsUdpEndpointLink(
                    mac, (config.balancer, config.udp_port), address=config.udp_local, port=config.udp_port
                )
                self.wire = link
                gateway = link.balancer_mac
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

    def close(self) -> list[str]:
        failed = self.changes.undo()
        wire = getattr(self, "wire", None)
        if wire is not None:
            wire.close()
        self.tun.close()
        self.loop.close()
        return failed


def make_agent(config: AgentConfig) -> Agent | KernelAgent:
    """The agent of the datapath :func:`choose_datapath` picks."""
    if choose_datapath(config) == "kernel":
        return KernelAgent(config)
    return Agent(config)


def run_agent(config: AgentConfig, *, on_ready: Callable[[Agent | KernelAgent], None] | None = None) -> int:
    """Run an agent until SIGTERM or SIGINT; returns a process exit status."""
    agent = make_agent(config)
    stop = threading.Event()

    def handle(_signum: int, _frame: object) -> None:
        stop.set()
        agent.stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(agent)
        agent.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        failed = agent.close()
    return 1 if failed else 0
