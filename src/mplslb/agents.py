"""The endpoint agents: a TUN device toward the host's stack, labels toward the wire (claims 8, 12, 13, 14).

``mplslb agent server`` makes a host a labelled server and ``mplslb agent client`` a labelled client; ordinary
programs (nginx, curl, wrk) talk through them unchanged. Each agent is the sans-I/O endpoint of
:mod:`mplslb.endpoint` between two drivers: a :class:`~mplslb.drivers.tun.TunDevice` and the wire, either an
AF_PACKET port on an Ethernet interface or MPLS-in-UDP to the balancer across routed IP.
"""

from __future__ import annotations

import ipaddress
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
from mplslb.hostsetup import HostChanges, interface_mac, setup_client, setup_server
from mplslb.wire.ethernet import ETH_P_MPLS_UC

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
    mtu: int = WIRE_MTU - LABEL_OVERHEAD
    ready_file: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ("server", "client"):
            raise ValueError("role must be server or client")
        if not self.vips:
            raise ValueError("at least one --vip is needed")
        for vip in self.vips:
            ipaddress.ip_address(vip)
        if self.role == "client" and not self.balancer and len(self.gateway_mac) != 6:
            raise ValueError("a client agent needs --gateway-mac (Ethernet) or --balancer (MPLS-in-UDP)")


class Agent:
    """A running agent: its devices, host changes, loop and endpoint. ``close()`` puts the host back."""

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
                self.endpoint = ClientEndpoint(mac=mac, gateway_mac=gateway, flow_timeout=config.flow_timeout)
                setup_client(self.tun.name, config.interface, list(config.vips), self.changes)
            self.driver = EndpointDriver(self.endpoint, self.tun, self.wire, self.loop)
        except BaseException:
            self.close()
            raise

    def run(self, stop: threading.Event | None = None) -> None:
        if self.config.ready_file:
            Path(self.config.ready_file).write_text(f"{self.tun.name}\n")
        self.loop.run(stop)

    def close(self) -> list[str]:
        failed = self.changes.undo()
        wire = getattr(self, "wire", None)
        if wire is not None:
            wire.close()
        self.tun.close()
        self.loop.close()
        return failed


def run_agent(config: AgentConfig, *, on_ready: Callable[[Agent], None] | None = None) -> int:
    """Run an agent until SIGTERM or SIGINT; returns a process exit status."""
    agent = Agent(config)
    stop = threading.Event()

    def handle(_signum: int, _frame: object) -> None:
        stop.set()
        agent.loop.stop()

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
