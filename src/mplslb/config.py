"""The balancer's configuration: frozen dataclasses, and a TOML loader that rejects bad keys and values.

A bad configuration raises :class:`ConfigError` naming the file, the key (as a dotted path) and the reason, before
anything runs.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from mplslb.balancing.admission import RefuseWith
from mplslb.balancing.algorithms import algorithm_names, make_algorithm
from mplslb.balancing.servers import ServerConfig
from mplslb.endpoint import ENDPOINT_FLOW_TIMEOUT
from mplslb.labels import C2S_MAX, C2S_MIN, QUARANTINE_MIN
from mplslb.resolver import ResolverTimers
from mplslb.sessions import RST_WINDOW, RST_WINDOW_MAX, Timeouts
from mplslb.switching.layout import SYN_RATE_MAX
from mplslb.wire.ethernet import mac_from_str
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP

PORT_ROLES = ("client", "server")
PORT_KINDS = ("ethernet", "mpls_udp")
#: The daemon's top-level ``offload`` key. "none": every labelled frame is switched in userspace; "kernel":
#: established sessions' labels are also installed in an XDP program (mplslb.offload) and their frames never reach
#: Python.
OFFLOAD_KINDS = ("none", "kernel")


@dataclass(frozen=True)
class PortConfig:
    """One port of the balancer: a global ``port_id`` the driver uses, its line card and number on that card."""

    port_id: int
    line_card: int
    number: int
    mac: bytes
    role: str
    name: str = ""
    # For drivers only (the core ignores them): the Linux interface, and how frames cross it.
    interface: str = ""
    kind: str = "ethernet"  # "ethernet" (AF_PACKET) or "mpls_udp" (RFC 7510, UDP port 6635)
    # mpls_udp: the local address the UDP socket binds to. An ethernet server port: the IPv4 address its ARP
    # probes come from (optional; 0.0.0.0 without it).
    address: bytes = b""

    def __post_init__(self) -> None:
        if self.role not in PORT_ROLES:
            raise ValueError(f"role must be one of {PORT_ROLES}, got {self.role!r}")
        if len(self.mac) != 6:
            raise ValueError("mac must be 6 bytes")
        if self.kind not in PORT_KINDS:
            raise ValueError(f"kind must be one of {PORT_KINDS}, got {self.kind!r}")
        if self.kind == "mpls_udp" and len(self.address) not in (4, 16):
            raise ValueError("an mpls_udp port needs the local address to bind to")


@dataclass(frozen=True)
class VirtualService:
    """A virtual IP and the TCP and UDP ports it serves."""

    address: bytes
    tcp_ports: tuple[int, ...] = (80,)
    udp_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.address) not in (4, 16):
            raise ValueError("address must be 4 or 16 bytes")
        for port in (*self.tcp_ports, *self.udp_ports):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")

    def serves(self, proto: int, port: int) -> bool:
        if proto == IPPROTO_TCP:
            return port in self.tcp_ports
        if proto == IPPROTO_UDP:
            return port in self.udp_ports
        return False


@dataclass(frozen=True)
class BalancerConfig:
    """Everything the sans-I/O balancer needs; built in code or by :func:`balancer_config_from_toml`."""

    ports: tuple[PortConfig, ...]
    vips: tuple[VirtualService, ...]
    servers: tuple[ServerConfig, ...] = ()
    algorithm: str = "round_robin"
    algorithm_params: Mapping[str, Any] = field(default_factory=dict)
    max_sessions: int = 0
    max_new_per_second: float = 0.0
    refuse_with: RefuseWith = RefuseWith.RST
    label_quarantine: float = 60.0
    #: The longest an endpoint agent may keep using a label after its last frame (the agents' ``flow_timeout``):
    #: ``label_quarantine`` may not be shorter, so that while other pairs are free no pair an endpoint may still
    #: send goes to another session (when none is, ``label_quarantine_min`` decides, and the flow binding keeps
    #: the endpoint's late frames from the next session).
    endpoint_flow_timeout: float = ENDPOINT_FLOW_TIMEOUT
    #: When no label pair is free, the one quarantined longest is reused once it has waited this long (seconds; at
    #: most ``label_quarantine``, which caps it): the labels' flow binding keeps its ended session's late frames
    #: from its next session, and the quarantine then bounds the rate of new sessions at pairs / this, not pairs /
    #: ``label_quarantine``.
    label_quarantine_min: float = QUARANTINE_MIN
    #: The share of the label pairs half-open TCP sessions may hold; a SYN beyond evicts the oldest.
    half_open_share: float = 0.5
    #: An RST, or the FIN that would end a session, is believed only when its sequence number lies within this
    #: many of the last acknowledgment number the other end sent (either way; see the sessions' trust).
    rst_window: int = RST_WINDOW
    c2s_min: int = C2S_MIN
    c2s_max: int = C2S_MAX
    timeouts: Timeouts = field(default_factory=Timeouts)
    fail_threshold: int = 3
    #: Unanswered SYNs take a server down only when it answered no new session for this long (seconds).
    passive_window: float = 10.0
    #: Answer a TCP segment of no session with an RST from the VIP (RFC 793's reset): the clients of a server that
    #: went down or was removed learn it when their endpoint falls back to unlabelled frames (IPVS's
    #: expire_nodest_conn).
    reset_on_down: bool = False
    rt_alpha: float = 0.2
    rt_limit: float = 0.0
    l7: bool = True
    neighbors: ResolverTimers = field(default_factory=ResolverTimers)  # resolving servers configured without mac
    #: One node of several behind ECMP (``[cluster]``, see :mod:`mplslb.cluster`); None: a single balancer.
    cluster: ClusterConfig | None = None

    def __post_init__(self) -> None:
        ids = [p.port_id for p in self.ports]
        if len(set(ids)) != len(ids):
            raise ValueError("port ids must be unique")
        if not any(p.role == "client" for p in self.ports) or not any(p.role == "server" for p in self.ports):
            raise ValueError("at least one client port and one server port are needed")
        if not self.vips:
            raise ValueError("at least one virtual IP is needed")
        if self.algorithm not in algorithm_names():
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose from {', '.join(algorithm_names())}")
        if self.label_quarantine < self.endpoint_flow_timeout:
            raise ValueError(quarantine_too_short(self.label_quarantine, self.endpoint_flow_timeout))
        if not (math.isfinite(self.label_quarantine_min) and self.label_quarantine_min >= 0):
            raise ValueError(
                f"label_quarantine_min must be a number of seconds >= 0, got {self.label_quarantine_min!r}"
            )
        if not 0 < self.half_open_share <= 1:
            raise ValueError(f"half_open_share must be in (0, 1], got {self.half_open_share!r}")
        if not 0 <= self.rst_window <= RST_WINDOW_MAX:
            raise ValueError(f"rst_window must be in 0..{RST_WINDOW_MAX}, got {self.rst_window!r}")
        server_ports = {p.port_id for p in self.ports if p.role == "server"}
        for server in self.servers:
            if server.port_id not in server_ports:
                raise ValueError(f"server {server.name!r} is on port {server.port_id}, which is not a server port")


def quarantine_too_short(quarantine: float, flow_timeout: float) -> str:
    return (
        f"label quarantine {quarantine:g} s is shorter than the endpoints' flow timeout {flow_timeout:g} s "
        "(labels.endpoint_flow_timeout): an endpoint may still send a withdrawn label when it is reused"
    )


class ConfigError(ValueError):
    """A configuration that cannot be used: says which file, which key and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


T = TypeVar("T")
N = TypeVar("N", int, float)


class Section:
    """A TOML table read key by key; unknown keys are an error naming them."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(source, path or "(top)", "must be a table")
        self.source, self.path, self.table = source, path, table
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self._seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_kind_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_kind_names(kinds)}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {value!r}")
        return value  # type: ignore[return-value]

    def number(self, name: str, kind: type[N], default: N, *, minimum: N | None = None) -> N:
        """An int or float (finite) not below ``minimum``."""
        value = self.get(name, kind, default)
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value!r}")
        return value

    def items(self, name: str, kind: type[T], default: list[T]) -> tuple[T, ...]:
        """A list whose every element is a ``kind``."""
        values = self.get(name, list, default)
        for i, item in enumerate(values):
            if isinstance(item, bool) or not isinstance(item, kind):
                raise self.error(name, f"element {i} must be {kind.__name__}, got {type(item).__name__} {item!r}")
        return tuple(values)

    def require(self, name: str, kind: type[T]) -> T:
        self._seen.add(name)
        if name not in self.table:
            raise self.error(name, "is required")
        value = self.table[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)  # type: ignore[return-value]
            raise self.error(name, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def convert(self, name: str, value: Any, fn: Callable[[Any], T]) -> T:
        try:
            return fn(value)
        except (ValueError, TypeError) as exc:
            raise self.error(name, str(exc)) from None

    def build(self, key: str, factory: Callable[..., T], /, **kwargs: Any) -> T:
        """``factory(**kwargs)``, its ValueError turned into a ConfigError naming ``key``."""
        try:
            return factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def section(self, name: str) -> Section:
        self._seen.add(name)
        return Section(self.source, self.key(name), self.table.get(name, {}))

    def sections(self, name: str) -> list[Section]:
        self._seen.add(name)
        items = self.table.get(name, [])
        if not isinstance(items, list):
            raise self.error(name, "must be an array of tables ([[...]])")
        return [Section(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(items)]

    def done(self) -> None:
        unknown = sorted(set(self.table) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def parse_ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _address_text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


def parse_mac(text: str) -> bytes:
    return mac_from_str(text)


# -- the kernel offload ---------------------------------------------------------------------------------------
def read_offload(top: Section) -> str:
    """The top-level ``offload`` key: one of :data:`OFFLOAD_KINDS`, ``"none"`` when absent."""
    kind = top.get("offload", str, "none")
    if kind not in OFFLOAD_KINDS:
        raise top.error("offload", f"must be one of {', '.join(repr(k) for k in OFFLOAD_KINDS)}, got {kind!r}")
    return kind


def read_offload_syn_rate(top: Section, offload: str) -> int:
    """The top-level ``offload_syn_rate`` key: unlabelled TCP SYNs a second the kernel offload lets through to the
    slow path, the rest shed (0, the default: no limit). Only with ``offload = "kernel"``."""
    rate = top.number("offload_syn_rate", int, 0, minimum=0)
    if rate > SYN_RATE_MAX:
        raise top.error("offload_syn_rate", f"must be <= {SYN_RATE_MAX}, got {rate}")
    if rate and offload != "kernel":
        raise top.error("offload_syn_rate", 'sheds SYNs in the kernel offload: needs offload = "kernel"')
    return rate


def read_offload_gso(top: Section, offload: str, *, ring: bool) -> bool:
    """The top-level ``offload_gso`` key: the kernel offload also switches super-packets (frames of many segments
    that GRO or a sender's GSO make on veth ports) in a tc program, whole (false, the default: they reach no
    one). Only with ``offload = "kernel"`` and plain packet sockets (the daemon finishes the partial checksums such
    senders leave on the frames it reads, which a ring does not say); the ports must be veths (checked where the
    interfaces are known) and nothing may be kept across daemons (``[state]``: checked by the caller)."""
    gso = top.get("offload_gso", bool, False)
    if gso and offload != "kernel":
        raise top.error("offload_gso", 'switches super-packets in the kernel offload: needs offload = "kernel"')
    if gso and ring:
        raise top.error("offload_gso", "needs plain packet sockets (ring = false): a ring does not tell partial "
                        "checksums")  # fmt: skip
    return gso


def read_offload_syn(top: Section, offload: str) -> bool:
    """The top-level ``offload_syn`` key: new TCP sessions' SYNs are taken in the kernel offload under tickets the
    daemon decides ahead (mplslb.offload.tickets; false, the default: every SYN goes up). Only with ``offload =
    "kernel"``; nothing may be kept across daemons (``[state]``: checked by the caller)."""
    syn = top.get("offload_syn", bool, False)
    if syn and offload != "kernel":
        raise top.error("offload_syn", 'takes SYNs in the kernel offload: needs offload = "kernel"')
    return syn


def read_offload_prealloc(top: Section, offload: str) -> bool:
    """The top-level ``offload_prealloc`` key: the kernel offload's label map preallocated, an element for every
    label of the balancer's range (232 bytes each in the kernel: 232 MiB for the whole range), and its flow map,
    one for every pair (64 MiB), so the kernel allocates and frees none as sessions' entries are written and
    deleted (false, the default: each on demand). Only with ``offload = "kernel"``."""
    prealloc = top.get("offload_prealloc", bool, False)
    if prealloc and offload != "kernel":
        raise top.error("offload_prealloc", 'preallocates the kernel offload\'s label map: needs offload = "kernel"')
    return prealloc


def load_toml(path: str | Path) -> tuple[str, dict[str, Any]]:
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return source, tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(source, "(file)", exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", str(exc)) from None


# -- servers: one entry, checked against the others (at load and when added to a running balancer) -----------
def server_claims(server: ServerConfig) -> tuple[tuple[str, str, str], ...]:
    """What a server holds that no other may: ``(key, claim, shown)`` for its name, address and MAC."""
    claims = (
        ("name", f"name {server.name}", repr(server.name)),
        ("address", f"address {_address_text(server.address)}", _address_text(server.address)),
        ("mac", f"mac {server.mac.hex(':')}", server.mac.hex(":")),
    )
    return claims if server.mac else claims[:2]  # no mac configured: resolved, nothing to claim


def claim_server(taken: dict[str, str], holder: str, server: ServerConfig) -> tuple[str, str] | None:
    """Record in ``taken`` (claim -> holder, e.g. ``"servers[0]"``) that ``holder`` is ``server``'s name, address and
    MAC; or, when another holder has one of them, record nothing and return ``(key, reason)``."""
    claims = server_claims(server)
    for key, claim, shown in claims:
        other = taken.get(claim)
        if other is not None:
            if key == "name":
                return key, f"duplicate server name {shown}"
            return key, f"{shown} is already the {key} of {other}"
    for _, claim, _ in claims:
        taken[claim] = holder
    return None


def server_port_problem(roles: Mapping[int, str], port_id: int) -> str | None:
    """Why a server cannot be on port ``port_id`` (``roles``: port id -> role), or None."""
    if port_id not in roles:
        return f"no port with id {port_id}"
    if roles[port_id] != "server":
        return f"port {port_id} is a {roles[port_id]}-side port, not a server port"
    return None


def check_server(
    server: ServerConfig, roles: Mapping[int, str], taken: dict[str, str], holder: str
) -> tuple[str, str] | None:
    """A built server's checks, as for a configuration file's entry: its port (:func:`server_port_problem`) and
    its claims (:func:`claim_server`, recorded when it passes). ``(key, reason)`` when it fails."""
    problem = server_port_problem(roles, server.port_id)
    if problem is not None:
        return "port", problem
    return claim_server(taken, holder, server)


def read_server(
    sec: Section,
    roles: Mapping[int, str],
    taken: dict[str, str],
    holder: str = "",
    *,
    kinds: Mapping[int, str] | None = None,
    binds: Mapping[int, bytes] | None = None,
) -> ServerConfig:
    """One ``[[servers]]`` entry: its keys checked, its port a server port of ``roles`` (port id -> role), and its
    name, address and MAC nobody else's in ``taken`` (see :func:`claim_server`; ``holder`` defaults to the
    entry's key). The one check of a server, for a configuration file and for a server added at run time."""
    name = sec.require("name", str)
    if not name:
        raise sec.error("name", "must not be empty")
    port_id = sec.get("port", int, 0)
    problem = server_port_problem(roles, port_id)
    if problem is not None:
        raise sec.error("port", problem)
    kind = (kinds or {}).get(port_id, "ethernet")
    # Without a mac the balancer resolves the address (ARP, neighbour discovery); across MPLS-in-UDP the address
    # is all there is.
    mac_text = sec.get("mac", str, "")
    if mac_text and kind == "mpls_udp":
        raise sec.error("mac", f"port {port_id} is an mpls_udp port: its servers are reached by address, not MAC")
    server = sec.build(
        "name",
        ServerConfig,
        name=name,
        address=sec.convert("address", sec.require("address", str), parse_ip),
        mac=sec.convert("mac", mac_text, parse_mac) if mac_text else b"",
        port_id=port_id,
        weight=sec.number("weight", int, 1, minimum=0),
        max_sessions=sec.number("max_sessions", int, 0, minimum=0),
    )
    bound = (binds or {}).get(port_id, b"")
    if kind == "mpls_udp" and bound and len(bound) != len(server.address) and bound != bytes(16):
        raise sec.error(
            "address",
            f"port {port_id} sends MPLS-in-UDP from {_address_text(bound)}, which cannot reach "
            f"{_address_text(server.address)} (bind the port to '::' for both families)",
        )
    sec.done()
    conflict = claim_server(taken, holder or sec.path, server)
    if conflict is not None:
        raise sec.error(*conflict)
    return server


def balancer_config_from_section(
    top: Section,
    *,
    default_ports: tuple[PortConfig, ...] = (),
    default_vips: tuple[VirtualService, ...] = (),
) -> BalancerConfig:
    """Read the balancer's keys from ``top`` (the whole file, or a ``[balancer]`` table)."""
    ports: list[PortConfig] = []
    for sec in top.sections("ports"):
        port_id = sec.require("id", int)
        ports.append(
            sec.build(
                "role",
                PortConfig,
                port_id=port_id,
                line_card=sec.get("line_card", int, 0),
                number=sec.get("number", int, port_id),
                mac=sec.convert("mac", sec.require("mac", str), parse_mac),
                role=sec.require("role", str),
                name=sec.get("name", str, f"port{port_id}"),
                interface=sec.get("interface", str, ""),
                kind=sec.get("kind", str, "ethernet"),
                address=sec.convert("address", sec.get("address", str, ""), lambda t: parse_ip(t) if t else b""),
            )
        )
        sec.done()
    vips: list[VirtualService] = []
    for sec in top.sections("vip"):
        address = sec.convert("address", sec.require("address", str), parse_ip)
        tcp = sec.items("tcp", int, [80])
        udp = sec.items("udp", int, [])
        for key, ports_ in (("tcp", tcp), ("udp", udp)):
            if any(not 0 < p < 65536 for p in ports_):
                raise sec.error(key, "ports must be within 1..65535")
        if not tcp and not udp:
            raise sec.error("tcp", "a virtual IP must serve at least one TCP or UDP port")
        vips.append(sec.build("address", VirtualService, address=address, tcp_ports=tcp, udp_ports=udp))
        sec.done()
    roles = {p.port_id: p.role for p in ports or default_ports}
    kinds = {p.port_id: p.kind for p in ports or default_ports}
    binds = {p.port_id: p.address for p in ports or default_ports}
    servers: list[ServerConfig] = []
    taken: dict[str, str] = {}
    for sec in top.sections("servers"):
        servers.append(read_server(sec, roles, taken, kinds=kinds, binds=binds))
    algorithm = top.get("algorithm", str, "round_robin")
    if algorithm not in algorithm_names():
        raise top.error("algorithm", f"unknown algorithm {algorithm!r}; choose from {', '.join(algorithm_names())}")
    params = top.get("algorithm_params", dict, {})
    try:
        make_algorithm(algorithm, **params)
    except (ValueError, TypeError) as exc:
        raise top.error("algorithm_params", str(exc)) from None
    limits = top.section("limits")
    refuse_text = limits.get("refuse_with", str, "rst")
    refuse = limits.convert("refuse_with", refuse_text, RefuseWith)
    max_sessions = limits.number("max_sessions", int, 0, minimum=0)
    rate = limits.number("max_new_per_second", float, 0.0, minimum=0.0)
    rt_limit = limits.number("max_response_time", float, 0.0, minimum=0.0)
    half_open_share = limits.number("half_open_share", float, BalancerConfig.half_open_share)
    if not 0 < half_open_share <= 1:
        raise limits.error("half_open_share", f"must be in (0, 1], got {half_open_share!r}")
    rst_window = limits.number("rst_window", int, RST_WINDOW, minimum=0)
    if rst_window > RST_WINDOW_MAX:
        raise limits.error(
            "rst_window", f"must be at most {RST_WINDOW_MAX} (half the sequence space), got {rst_window}"
        )
    limits.done()
    tsec = top.section("timeouts")
    defaults = Timeouts()
    tvalues = {name: tsec.number(name, float, getattr(defaults, name), minimum=0.0) for name in vars(defaults)}
    timeouts = Timeouts(**tvalues)
    tsec.done()
    lsec = top.section("labels")
    quarantine = lsec.number("quarantine", float, BalancerConfig.label_quarantine, minimum=0.0)
    flow_timeout = lsec.number("endpoint_flow_timeout", float, ENDPOINT_FLOW_TIMEOUT, minimum=0.0)
    if quarantine < flow_timeout:
        raise lsec.error("quarantine", quarantine_too_short(quarantine, flow_timeout))
    quarantine_min = lsec.number("quarantine_min", float, min(QUARANTINE_MIN, quarantine), minimum=0.0)
    if quarantine_min > quarantine:
        raise lsec.error("quarantine_min", f"must not exceed quarantine ({quarantine:g} s), got {quarantine_min:g}")
    c2s_min = lsec.get("c2s_min", int, C2S_MIN)
    c2s_max = lsec.get("c2s_max", int, C2S_MAX)
    for key, value in (("c2s_min", c2s_min), ("c2s_max", c2s_max)):
        if value % 2 == 0 or not C2S_MIN <= value <= C2S_MAX:
            raise lsec.error(key, f"must be an odd label within {C2S_MIN}..{C2S_MAX}, got {value}")
    if c2s_max < c2s_min:
        raise lsec.error("c2s_min", f"must be <= c2s_max ({c2s_max}), got {c2s_min}")
    lsec.done()
    health = top.section("health")
    fail_threshold = health.number("fail_threshold", int, 3, minimum=1)
    passive_window = health.number("passive_window", float, BalancerConfig.passive_window, minimum=0.0)
    reset_on_down = health.get("reset_on_down", bool, False)
    rt_alpha = health.get("rt_alpha", float, 0.2)
    if not 0 < rt_alpha <= 1:
        raise health.error("rt_alpha", "must be in (0, 1]")
    health.done()
    l7 = top.get("l7", bool, True)
    nsec = top.section("neighbors")
    ndefaults = ResolverTimers()
    neighbors = nsec.build(
        "retry_min",
        ResolverTimers,
        retrans=nsec.number("retrans", float, ndefaults.retrans, minimum=0.001),
        probes=nsec.number("probes", int, ndefaults.probes, minimum=1),
        reachable=nsec.number("reachable", float, ndefaults.reachable, minimum=0.001),
        retry_min=nsec.number("retry_min", float, ndefaults.retry_min, minimum=0.001),
        retry_max=nsec.number("retry_max", float, ndefaults.retry_max, minimum=0.001),
    )
    nsec.done()
    return top.build(
        "(balancer)",
        BalancerConfig,
        ports=tuple(ports) or default_ports,
        vips=tuple(vips) or default_vips,
        servers=tuple(servers),
        algorithm=algorithm,
        algorithm_params=params,
        max_sessions=max_sessions,
        max_new_per_second=rate,
        refuse_with=refuse,
        label_quarantine=quarantine,
        label_quarantine_min=quarantine_min,
        endpoint_flow_timeout=flow_timeout,
        half_open_share=half_open_share,
        rst_window=rst_window,
        passive_window=passive_window,
        reset_on_down=reset_on_down,
        c2s_min=c2s_min,
        c2s_max=c2s_max,
        timeouts=timeouts,
        fail_threshold=fail_threshold,
        rt_alpha=rt_alpha,
        rt_limit=rt_limit,
        l7=l7,
        neighbors=neighbors,
        cluster=read_cluster(top.section("cluster"), c2s_min, c2s_max),
    )


# -- several balancers behind ECMP: [cluster] ---------------------------------------------------------------------
#: The most nodes a cluster's label space is divided between.
MAX_NODES = 64
#: The smallest shared secret ``[cluster] key_file`` may hold (bytes).
KEY_MIN = 16
DEFAULT_SYNC_PORT = 6640


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: this node's place among ``nodes`` balancers and the peers it keeps its sessions in step with.

    ``node`` (1..``nodes``) takes its label pairs only from its own slice of ``labels.c2s_min..c2s_max``
    (:meth:`slice`), so nodes never hand out the same pair and a label's owner is computable from it
    (:meth:`owner_of`). ``peers`` are the other nodes' sync addresses; ``sync_address``/``sync_port`` where this
    node listens. ``key`` (read from ``key_file``) authenticates every sync datagram (HMAC-SHA256); without it,
    only the peers' source addresses are checked. ``flush`` is how long a session change may wait to be batched,
    ``keepalive`` how often this node sends a hello and refreshes at its peers the sessions whose frames pass here
    (an ENDING session at every round, any other when its peers' word is older than ``refresh``),
    ``peer_timeout`` when a silent peer counts as down, ``join_timeout`` how long a starting node waits for its
    peers' dumps before it calls itself synced without the silent ones."""

    node: int
    nodes: int
    peers: tuple[tuple[str, int], ...] = ()
    sync_address: str = "0.0.0.0"
    sync_port: int = DEFAULT_SYNC_PORT
    key_file: str = ""
    key: bytes = field(default=b"", repr=False, compare=False)
    flush: float = 0.005
    keepalive: float = 1.0
    refresh: float = 10.0
    peer_timeout: float = 3.0
    join_timeout: float = 3.0
    c2s_min: int = C2S_MIN
    c2s_max: int = C2S_MAX

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be within 1..{MAX_NODES}, got {self.nodes}")
        if not 1 <= self.node <= self.nodes:
            raise ValueError(f"node must be within 1..nodes ({self.nodes}), got {self.node}")
        if self.pairs_per_node < 1:
            raise ValueError(f"labels.c2s_min..c2s_max holds fewer pairs than the {self.nodes} nodes")

    @property
    def pairs_per_node(self) -> int:
        return ((self.c2s_max - self.c2s_min) // 2 + 1) // self.nodes

    def slice(self, node: int | None = None) -> tuple[int, int]:
        """(first, last) C2S label of ``node``'s slice (this node's by default): equal slices in node order."""
        index = (self.node if node is None else node) - 1
        per = self.pairs_per_node
        first = self.c2s_min + 2 * per * index
        return first, first + 2 * (per - 1)

    def owner_of(self, label: int) -> int:
        """The node whose slice holds ``label`` (either member of a pair); 0 for a label in no slice."""
        index = ((label - 1 if label & 1 == 0 else label) - self.c2s_min) // 2 // self.pairs_per_node
        return index + 1 if 0 <= index < self.nodes and label >= self.c2s_min else 0


def _peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'address:port', got {text!r}")
    return str(ipaddress.ip_address(host.strip("[]"))), int(port)


def read_cluster(sec: Section, c2s_min: int, c2s_max: int) -> ClusterConfig | None:
    """The ``[cluster]`` table (None when absent): bad keys and values name the key."""
    if not sec.table:
        return None
    node = sec.require("node", int)
    nodes = sec.require("nodes", int)
    if not 1 <= nodes <= MAX_NODES:
        raise sec.error("nodes", f"must be within 1..{MAX_NODES}, got {nodes}")
    if not 1 <= node <= nodes:
        raise sec.error("node", f"must be within 1..nodes ({nodes}), got {node}")
    if ((c2s_max - c2s_min) // 2 + 1) // nodes < 1:
        raise sec.error("nodes", f"labels.c2s_min..c2s_max holds fewer label pairs than {nodes} nodes")
    peers = tuple(sec.convert("peers", text, _peer) for text in sec.items("peers", str, []))
    if len(set(peers)) != len(peers):
        raise sec.error("peers", "a peer is listed twice")
    address = sec.get("sync_address", str, "0.0.0.0")
    sec.convert("sync_address", address, ipaddress.ip_address)
    port = sec.number("sync_port", int, DEFAULT_SYNC_PORT, minimum=1)
    if port > 65535:
        raise sec.error("sync_port", f"must be <= 65535, got {port}")
    key_file = sec.get("key_file", str, "")
    key = b""
    if key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise sec.error("key_file", f"cannot read {key_file!r}: {exc.strerror or exc}") from None
        if len(key) < KEY_MIN:
            raise sec.error("key_file", f"{key_file!r} holds {len(key)} bytes; a key has at least {KEY_MIN}")
    timers = {name: sec.number(name, float, getattr(ClusterConfig, name), minimum=0.001)
              for name in ("flush", "keepalive", "refresh", "peer_timeout", "join_timeout")}  # fmt: skip
    cluster = sec.build(
        "node", ClusterConfig, node=node, nodes=nodes, peers=peers, sync_address=address, sync_port=port,
        key_file=key_file, key=key, c2s_min=c2s_min, c2s_max=c2s_max, **timers,
    )  # fmt: skip
    sec.done()
    return cluster


# -- reload: what differs between the running configuration and a new one --------------------------------------
#: Settings a running balancer takes from a new configuration (:class:`BalancerConfig` field -> configuration key).
LIVE_SETTINGS = {
    "algorithm": "algorithm",
    "algorithm_params": "algorithm_params",
    "max_sessions": "limits.max_sessions",
    "max_new_per_second": "limits.max_new_per_second",
    "refuse_with": "limits.refuse_with",
    "rt_limit": "limits.max_response_time",
    "rst_window": "limits.rst_window",
    "label_quarantine_min": "labels.quarantine_min",
    "fail_threshold": "health.fail_threshold",
    "rt_alpha": "health.rt_alpha",
    "l7": "l7",
}
#: Settings that cannot change while the balancer runs (field -> key): the label space is carved up by live sessions,
#: and the quarantine ring relies on one constant delay.
FIXED_SETTINGS = {"c2s_min": "labels.c2s_min", "c2s_max": "labels.c2s_max", "label_quarantine": "labels.quarantine"}
#: The one key of ``[cluster]`` a running node takes from a new configuration: the rest of the table is fixed (its
#: label slice is carved up by live sessions).
CLUSTER_LIVE = "peers"
_PORT_KEYS = {"port_id": "id", "line_card": "line_card", "number": "number", "mac": "mac", "role": "role",
              "name": "name", "interface": "interface", "kind": "kind", "address": "address"}  # fmt: skip
_VIP_KEYS = {"address": "address", "tcp_ports": "tcp", "udp_ports": "udp"}
_SERVER_IDENTITY = {"address": "address", "mac": "mac", "port_id": "port"}
FIXED_REASON = "cannot change while the balancer runs (restart it to change this)"


@dataclass(frozen=True)
class ConfigDiff:
    """What :func:`diff_configs` found between a running configuration and a new one.

    ``added``/``removed``/``updated``: servers new, gone, and kept with a new weight or session limit. ``settings``:
    the live-changeable settings that differ (field -> new value). ``changes``: one ``key:old->new`` line per
    difference, for replies and logs. ``refused``: ``(key, reason)`` for each difference that cannot be applied
    while running; a diff with any is applied not at all.
    """

    added: tuple[ServerConfig, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[ServerConfig, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    changes: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()


def show_value(value: Any) -> str:
    """A setting's value as the ``changes`` of a diff show it: no spaces (log lines are key=value)."""
    if isinstance(value, bytes):
        return _address_text(value) if len(value) in (4, 16) else value.hex(":")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={show_value(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, tuple):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return str(value)


def _fields_diff(key: str, old: Any, new: Any, names: Mapping[str, str]) -> list[tuple[str, Any, Any]]:
    return [
        (f"{key}.{shown}", getattr(old, name), getattr(new, name))
        for name, shown in names.items()
        if getattr(old, name) != getattr(new, name)
    ]


def diff_configs(old: BalancerConfig, new: BalancerConfig) -> ConfigDiff:
    """Compare the running configuration ``old`` with ``new`` (see :class:`ConfigDiff`).

    Servers are matched by name. A server's address, MAC and port are what it is (where its frames go): a change of
    any under the same name is refused, naming the key; a new machine takes a new name (the old one is removed,
    draining, and the new one added). Ports, virtual IPs and the label range cannot change while running.
    """
    refused: list[tuple[str, str]] = []
    changes: list[str] = []
    fixed: list[tuple[str, Any, Any]] = []
    for key, olds, news, names in (("ports", old.ports, new.ports, _PORT_KEYS), ("vip", old.vips, new.vips, _VIP_KEYS)):
        if len(olds) != len(news):
            fixed.append((key, len(olds), len(news)))
            continue
        for i, (a, b) in enumerate(zip(olds, news, strict=True)):
            fixed += _fields_diff(f"{key}[{i}]", a, b, names)
    fixed += [(key, getattr(old, name), getattr(new, name)) for name, key in FIXED_SETTINGS.items()
              if getattr(old, name) != getattr(new, name)]  # fmt: skip
    settings: dict[str, Any] = {}
    if old.cluster != new.cluster or (old.cluster and new.cluster and old.cluster.key != new.cluster.key):
        a, b = old.cluster, new.cluster
        if a is None or b is None or replace(b, peers=a.peers) != a or a.key != b.key:  # (``key`` compares not)
            fixed.append(("cluster", a, b))
        else:
            settings["cluster"] = b
            shown = ("[" + ",".join(f"{host}:{port}" for host, port in c.peers) + "]" for c in (a, b))
            changes.append("cluster.{}:{}->{}".format(CLUSTER_LIVE, *shown))
    for key, a, b in fixed:
        refused.append((key, f"{show_value(a)} -> {show_value(b)}: {FIXED_REASON}"))
    running = {s.name: s for s in old.servers}
    wanted = {s.name for s in new.servers}
    added: list[ServerConfig] = []
    updated: list[ServerConfig] = []
    for i, server in enumerate(new.servers):
        was = running.get(server.name)
        if was is None:
            added.append(server)
            changes.append(f"servers.{server.name}:added")
            continue
        for key, a, b in _fields_diff(f"servers[{i}]", was, server, _SERVER_IDENTITY):
            why = "a server's address, mac and port cannot change under its name; give the new machine a new name"
            refused.append((key, f"server {server.name!r}: {show_value(a)} -> {show_value(b)}: {why}"))
        kept = _fields_diff(f"servers.{server.name}", was, server, {"weight": "weight", "max_sessions": "max_sessions"})
        if kept:
            updated.append(server)
            changes += [f"{key}:{a}->{b}" for key, a, b in kept]
    removed = tuple(s.name for s in old.servers if s.name not in wanted)
    changes += [f"servers.{name}:removed" for name in removed]
    for name, key in LIVE_SETTINGS.items():
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            settings[name] = b
            changes.append(f"{key}:{show_value(a)}->{show_value(b)}")
    if old.timeouts != new.timeouts:
        settings["timeouts"] = new.timeouts
        names = {name: name for name in vars(old.timeouts)}
        for key, a, b in _fields_diff("timeouts", old.timeouts, new.timeouts, names):
            changes.append(f"{key}:{show_value(a)}->{show_value(b)}")
    return ConfigDiff(tuple(added), removed, tuple(updated), settings, tuple(changes), tuple(refused))
