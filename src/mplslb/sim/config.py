"""The demo's TOML file: the balancer's settings plus servers, workload, network and events of the simulation.

Every key is checked; an unknown key or a bad value raises :class:`~mplslb.config.ConfigError` naming the file
and the key. See ``examples/demo.toml`` for every key with its default.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from mplslb.config import (
    ConfigError,
    PortConfig,
    Section,
    VirtualService,
    balancer_config_from_section,
    load_toml,
)
from mplslb.sim.scenario import EVENT_ACTIONS, ServerSpec, SimConfig, SimEvent, Workload

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"

# The simulation generates the balancer's ports and VIPs; this placeholder only lets the section be validated.
_PLACEHOLDER_PORTS = (
    PortConfig(0, 0, 0, b"\x02\0\0\0\0\1", "client"),
    PortConfig(1, 1, 0, b"\x02\0\0\0\0\2", "server"),
)
_PLACEHOLDER_VIP = (VirtualService(b"\x0a\0\0\x64"),)


def _dataclass_from(sec: Section, cls: type[Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read every field of ``cls`` (typed by its default) from ``sec``."""
    values: dict[str, Any] = {}
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, tuple):
            values[f.name] = sec.items(f.name, type(default[0]) if default else str, list(default))
        else:
            values[f.name] = sec.get(f.name, type(default), default)
    return values


def sim_config_from_toml(path: str | Path) -> SimConfig:
    source, data = load_toml(path)
    top = Section(source, "", data)
    seed = top.get("seed", int, 1)
    bsec = top.section("balancer")
    for forbidden in ("ports", "vip", "servers"):
        if forbidden in bsec.table:
            raise bsec.error(forbidden, "the simulation lays out ports, VIPs and servers itself; use [[servers]]")
    balancer = balancer_config_from_section(bsec, default_ports=_PLACEHOLDER_PORTS, default_vips=_PLACEHOLDER_VIP)
    bsec.done()
    wsec = top.section("workload")
    workload_values = _dataclass_from(wsec, Workload)
    wsec.done()
    workload = wsec.convert("(values)", workload_values, lambda v: Workload(**v))
    for name in ("clients", "sessions", "requests_max"):
        if getattr(workload, name) < 1:
            raise wsec.error(name, "must be >= 1")
    for name in ("rate", "session_timeout", "trace_speedup"):
        if getattr(workload, name) <= 0:
            raise wsec.error(name, "must be > 0")
    for name in ("udp_fraction", "ipv6_fraction"):
        if not 0 <= getattr(workload, name) <= 1:
            raise wsec.error(name, "must be within [0, 1]")
    if workload.trace and not Path(workload.trace).is_file():
        raise wsec.error("trace", f"no such file: {workload.trace}")
    nsec = top.section("network")
    defaults = SimConfig()
    network = {
        name: nsec.get(name, type(getattr(defaults, name)), getattr(defaults, name))
        for name in ("client_ports", "server_ports", "client_latency", "server_latency", "max_sim_time")
    }
    nsec.done()
    for name in ("client_ports", "server_ports"):
        if not 1 <= network[name] <= 64:
            raise nsec.error(name, "must be within [1, 64]")
    servers: list[ServerSpec] = []
    for sec in top.sections("servers"):
        name = sec.require("name", str)
        values = _dataclass_from(sec, ServerSpec, skip=("name",))
        sec.done()
        if values["workers"] < 1:
            raise sec.error("workers", "must be >= 1")
        if values["service_time"] < 0:
            raise sec.error("service_time", "must be >= 0")
        for key in ("weight", "max_sessions"):
            if values[key] < 0:
                raise sec.error(key, "must be >= 0")
        if name in {s.name for s in servers}:
            raise sec.error("name", f"duplicate server name {name!r}")
        servers.append(ServerSpec(name=name, **values))
    if not servers:
        servers = list(defaults.servers)
    events: list[SimEvent] = []
    for sec in top.sections("events"):
        at = sec.require("at", float)
        action = sec.require("action", str)
        if action not in EVENT_ACTIONS:
            raise sec.error("action", f"must be one of {', '.join(EVENT_ACTIONS)}")
        server = sec.require("server", str)
        if server not in {s.name for s in servers}:
            raise sec.error("server", f"no server named {server!r}")
        weight = sec.number("weight", int, 0, minimum=0)
        sec.done()
        events.append(SimEvent(at, action, server, weight))
    top.done()
    return SimConfig(
        seed=seed,
        balancer=balancer,
        servers=tuple(servers),
        workload=workload,
        events=tuple(events),
        **network,
    )


__all__ = ["EXAMPLE", "ConfigError", "sim_config_from_toml"]
