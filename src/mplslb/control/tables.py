"""The daemon's figures as one JSON-serialisable snapshot, rates over consecutive snapshots, and the status
tables ``mplslb status`` prints (in the manner of ``ipvsadm -Ln --stats --rate``).

The snapshot is the only thing that crosses from the daemon loop to the outside (the control socket, the
Prometheus collector in another thread): it is built in the loop, from :meth:`Balancer.stats` and the
configuration, and is never mutated once published.

Rates are kept as IPVS keeps them: every ~2 s window the counters' increase over the window gives a rate, and
each rate is an exponentially weighted average (weight 1/4) of those. The first window sets the rate outright
instead of climbing from 0.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP

if TYPE_CHECKING:
    from mplslb.balancer import Balancer, BalancerStats
    from mplslb.health import HealthChecker

__all__ = [
    "SNAPSHOT_VERSION",
    "RateTracker",
    "format_address",
    "offload_tables",
    "snapshot",
    "stats_counters",
    "status_tables",
    "with_offload",
]

SNAPSHOT_VERSION = 1
RateKey = tuple[str, ...]
_SERVER_COUNTERS = ("sessions", "packets_in", "packets_out", "bytes_in", "bytes_out")
_GLOBAL_COUNTERS = ("sessions", "frames_in", "frames_out", "fast_path", "slow_path")


class RateTracker:
    """Per-second rates of monotonically growing counters, from consecutive readings (``update``), averaged as
    IPVS does: a rate per ``window`` seconds, smoothed with weight ``alpha``. A counter that goes down (its
    server was removed and added again) starts over from its new value."""

    def __init__(self, *, window: float = 2.0, alpha: float = 0.25) -> None:
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a finite number of seconds > 0, got {window!r}")
        if not (0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.window = window
        self.alpha = alpha
        self._last: dict[RateKey, float] = {}
        self._last_time: float | None = None
        self._rates: dict[RateKey, float] = {}

    def update(self, counters: Mapping[RateKey, float], now: float) -> bool:
        """Read the counters at ``now``; True if this closed a window (the rates changed). Readings less than a
        window apart are ignored, so it may be called as often as convenient."""
        if self._last_time is None:
            self._last, self._last_time = dict(counters), now
            return False
        elapsed = now - self._last_time
        if elapsed < self.window:
            return False
        rates: dict[RateKey, float] = {}
        for key, value in counters.items():
            previous = self._last.get(key)
            if previous is None:
                continue  # a counter seen for the first time has no rate until the next window
            delta = value - previous if value >= previous else value
            rate = delta / elapsed
            old = self._rates.get(key)
            rates[key] = rate if old is None else old + self.alpha * (rate - old)
        self._rates = rates
        self._last, self._last_time = dict(counters), now
        return True

    def rate(self, key: RateKey) -> float:
        """The current rate of ``key`` per second (0 until known)."""
        return self._rates.get(key, 0.0)

    def rates(self) -> dict[RateKey, float]:
        """Every known rate."""
        return dict(self._rates)


def stats_counters(stats: BalancerStats) -> dict[RateKey, float]:
    """The counters of a :class:`BalancerStats` that rates are kept for."""
    counters: dict[RateKey, float] = {
        ("sessions",): stats.sessions_started,
        ("frames_in",): stats.frames_in,
        ("frames_out",): stats.frames_out,
        ("fast_path",): stats.fast_path,
        ("slow_path",): stats.slow_path,
    }
    for row in stats.servers:
        counters["server", row.name, "sessions"] = row.total
        counters["server", row.name, "packets_in"] = row.packets_in
        counters["server", row.name, "packets_out"] = row.packets_out
        counters["server", row.name, "bytes_in"] = row.bytes_in
        counters["server", row.name, "bytes_out"] = row.bytes_out
    return counters


def format_address(address: bytes, port: int | None = None) -> str:
    """``10.0.0.1``, ``fd00::1``; with a port ``10.0.0.1:80``, ``[fd00::1]:80``."""
    text = str(ipaddress.ip_address(address))
    if port is None:
        return text
    return f"[{text}]:{port}" if len(address) == 16 else f"{text}:{port}"


def snapshot(
    balancer: Balancer,
    *,
    health: HealthChecker | None = None,
    rates: RateTracker | None = None,
    now: float,
    per_vip_sessions: bool = True,
) -> dict[str, Any]:
    """Everything ``mplslb status`` and the metrics show, as a JSON-serialisable dict.

    ``rates`` is updated from this reading (see :class:`RateTracker`). ``per_vip_sessions`` counts live sessions
    per virtual service from the session table's arrays (O(sessions), in numpy); turn it off for very large tables.
    """
    stats = balancer.stats()
    if rates is not None:
        rates.update(stats_counters(stats), now)
    per_service = (
        balancer.sessions.per_service(
            (vip.address, proto, port)
            for vip in balancer.config.vips
            for proto, ports in ((IPPROTO_TCP, vip.tcp_ports), (IPPROTO_UDP, vip.udp_ports))
            for port in ports
        )
        if per_vip_sessions
        else {}
    )
    vips = []
    for vip in balancer.config.vips:
        services = [
            {
                "proto": proto_name,
                "port": port,
                "active": per_service.get((vip.address, proto, port), 0) if per_vip_sessions else None,
            }
            for proto, proto_name, ports in ((IPPROTO_TCP, "tcp", vip.tcp_ports), (IPPROTO_UDP, "udp", vip.udp_ports))
            for port in ports
        ]
        vips.append(
            {
                "address": format_address(vip.address),
                "tcp_ports": list(vip.tcp_ports),
                "udp_ports": list(vip.udp_ports),
                "services": services,
            }
        )
    health_states = health.states() if health is not None else {}
    servers = []
    for row in stats.servers:
        server = balancer.pool.get(row.name)
        hs = health_states.get(row.name)
        servers.append(
            {
                "name": row.name,
                "address": format_address(server.config.address),
                "mac": row.mac,
                "neighbor": row.neighbor,
                "status": row.status,
                "down_reason": "" if server.down_reason is None else str(server.down_reason),
                "weight": row.weight,
                "active": row.active,
                "total": row.total,
                "refused": server.refused,
                "passive_failures": server.failures,
                "overloaded": server.overloaded,
                "rt_ms": row.rt_ms,
                "packets_in": row.packets_in,
                "packets_out": row.packets_out,
                "bytes_in": row.bytes_in,
                "bytes_out": row.bytes_out,
                "line_card": row.line_card,
                "port": row.port,
                "health": None
                if hs is None
                else {
                    "up": hs.up,
                    "label": hs.label,
                    "health": hs.health,
                    "successes": hs.successes,
                    "failures": hs.failures,
                    "checks": hs.checks,
                    "failed_checks": hs.failed_checks,
                    "in_flight": hs.in_flight,
                    "last_ok": hs.last_ok,
                    "last_detail": hs.last_detail,
                    "last_rtt_ms": None if hs.last_rtt is None else hs.last_rtt * 1000.0,
                    "last_change": hs.last_change,
                },
            }
        )
    labels = stats.labels
    snap: dict[str, Any] = {
        "version": SNAPSHOT_VERSION,
        "time": now,
        "algorithm": balancer.config.algorithm,
        "vips": vips,
        "frames": {
            "in": stats.frames_in,
            "out": stats.frames_out,
            "fast_path": stats.fast_path,
            "slow_path": stats.slow_path,
        },
        "sessions": {
            "active": stats.sessions_active,
            "started": stats.sessions_started,
            "peak": stats.sessions_peak,
            "ended": dict(sorted(stats.sessions_ended.items())),
            "by_state": stats.sessions_by_state,
            "refused": dict(sorted(stats.refused.items())),
            "not_believed": dict(sorted(stats.not_believed.items())),
        },
        "drops": dict(sorted(stats.drops.items())),
        "labels": {
            "capacity": labels.capacity,
            "in_use": labels.in_use_count,
            "quarantined": labels.quarantined_count,
            "free": labels.free_count,
            "peak": labels.peak,
            "allocated_total": labels.allocated_total,
            "withdrawn_total": labels.withdrawn_total,
            "exhausted": labels.exhausted,
            "reused_early": labels.reused_early,
            "installed": stats.labels_installed,
        },
        "servers": servers,
        "health": None,
        "l7_hosts": dict(sorted(stats.l7_hosts.items())),
        "rates": None,
    }
    if health is not None:
        cfg = health.config
        snap["health"] = {
            "kind": cfg.kind,
            "port": cfg.port,
            "path": cfg.path if cfg.kind == "http" else None,
            "interval": cfg.interval,
            "timeout": cfg.timeout,
            "rise": cfg.rise,
            "fall": cfg.fall,
        }
    if rates is not None:
        snap["rates"] = {
            "window": rates.window,
            **{f"{name}_per_s": rates.rate((name,)) for name in _GLOBAL_COUNTERS},
            "servers": {
                row.name: {f"{name}_per_s": rates.rate(("server", row.name, name)) for name in _SERVER_COUNTERS}
                for row in stats.servers
            },
        }
    return snap


# -- tables ----------------------------------------------------------------------------------------------------
def bgp_table(bgp: Mapping[str, Any]) -> Table:
    """The node's BGP neighbours (session state, uptime) and what each is sent (:mod:`mplslb.bgp`)."""
    if bgp.get("announcing"):
        doing = "announcing"
    else:
        doing = f"withdrawn ({bgp['reason']})" if bgp.get("reason") else "withdrawn"
    title = (
        f"BGP (AS {bgp.get('local_as', '?')}, router id {bgp.get('router_id', '?')}, speaker {bgp['speaker']}, {doing})"
    )
    table = _table(title, "neighbor", "session", "state", "uptime", "announced")
    for peer in bgp.get("peers", []):
        uptime = peer.get("uptime_s")
        _add(
            table,
            peer["neighbor"],
            peer["name"],
            peer["info"] or peer["state"],
            "-" if uptime is None or not peer["established"] else f"{uptime:.0f}s",
            ", ".join(peer["announced"]) or "-",
        )
    return table


def cluster_tables(cluster: Mapping[str, Any] | None) -> list[Table]:
    """The node's place in its cluster and its peers (none for a single balancer)."""
    if cluster is None:
        return []
    first, end = cluster["labels"]
    title = (
        f"Cluster: node {cluster['node']} of {cluster['nodes']}, labels {first}..{end}, "
        f"{'synced' if cluster['synced'] else 'NOT SYNCED'}, {cluster['replicas']} replicas"
    )
    peers = _table(title, "peer", "node", "state", "last heard s", "synced", "restarts")
    for peer in cluster["peers"]:
        heard = peer["last_heard"]
        _add(
            peers,
            peer["address"],
            str(peer["node"] or "-"),
            "alive" if peer["alive"] else "silent",
            "-" if heard is None else f"{heard:.1f}",
            "yes" if peer["synced"] else "no",
            str(peer["restarts"]),
        )
    sync = _table("Session sync", "what", "count")
    for group in ("sent", "received", "applied", "drops"):
        for name, count in sorted(cluster[group].items()):
            _add(sync, f"{group} {name}", str(count))
    return [peers, sync]


def with_offload(snap: dict[str, Any], offload: dict[str, Any]) -> None:
    """Put the kernel offload's figures (``XdpOffload.stats``) in ``snap`` under ``"offload"``. With tickets, a
    server counts its outstanding ones among its sessions (so least connections spreads them); the snapshot shows
    them apart, as its ``tickets``, and its ``active`` and ``total`` sessions without them."""
    snap["offload"] = offload
    tickets = offload.get("tickets")
    if tickets is None:
        return
    for row in snap["servers"]:
        held = row["tickets"] = tickets["by_server"].get(row["name"], 0)
        row["active"] -= held
        row["total"] -= held


def offload_tables(offload: Mapping[str, Any] | None) -> list[Table]:
    """The kernel offload's figures (:mod:`mplslb.offload.xdp`) and, with ``offload_syn``, its tickets (none without
    the offload)."""
    if not offload:
        return []
    modes = ", ".join(f"{port} {mode}" for port, mode in sorted(offload["attached"].items())) or "no port"
    table = _table(f"Kernel offload (XDP: {modes})", "what", "count")
    for what, key in (("label entries in the kernel", "entries"), ("frames switched in the kernel", "kernel_packets"),
                      ("bytes switched in the kernel", "kernel_bytes"), ("sessions measuring", "measuring"),
                      ("FINs taken", "fins"), ("SYNs passed up", "syn_passed"), ("SYNs shed", "syn_shed")):  # fmt: skip
        _add(table, what, str(offload[key]))
    for what, count in sorted(offload["errors"].items()):
        _add(table, f"map errors: {what}", str(count))
    tables = [table]
    tickets = offload.get("tickets")
    if tickets is not None:
        desk = _table("Tickets (offload_syn)", "what", "count")
        for key in ("outstanding", "waiting", "issued", "taken", "revoked", "refused", "syn_taken", "syn_no_ticket",
                    "syn_flow_live"):  # fmt: skip
            _add(desk, key.replace("_", " "), str(tickets.get(key, 0)))
        for name, count in sorted(tickets.get("by_server", {}).items()):
            _add(desk, f"outstanding for {name}", str(count))
        for reason, count in sorted(tickets["held"].items()):
            _add(desk, f"issues held: {reason}", str(count))
        tables.append(desk)
    return tables


def _table(title: str, *columns: str) -> Table:
    table = Table(title=Text(title), title_justify="left", title_style="bold")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def _add(table: Table, *cells: str) -> None:
    """Add a row of plain text: names, addresses (``[fd00::1]:80``) and details are never read as markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _si(value: float) -> str:
    """Bytes and byte rates as ipvsadm shows them: exact below 10,000, then K/M/G/T (powers of 1000)."""
    if value < 10_000:
        return f"{value:.0f}"
    for unit in ("K", "M", "G", "T"):
        value /= 1000.0
        if value < 10_000 or unit == "T":
            return f"{value:.0f}{unit}"
    return f"{value:.0f}"  # pragma: no cover


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _next_hop(row: Mapping[str, Any]) -> str:
    """The server's MAC and, when the balancer resolves it, the neighbour state: ``02:5e:..:01 reachable``."""
    mac = row.get("mac") or "-"
    neighbor = row.get("neighbor", "static")
    return mac if neighbor == "static" else f"{mac} {neighbor}"


def status_tables(snap: Mapping[str, Any]) -> list[Table]:
    """The status tables for a snapshot (as built by :func:`snapshot`, possibly after a JSON round trip)."""
    tables: list[Table] = []
    rates: Mapping[str, Any] | None = snap.get("rates")
    server_rates: Mapping[str, Mapping[str, float]] = rates.get("servers", {}) if rates else {}
    sessions = snap["sessions"]
    frames = snap["frames"]

    services = _table("Virtual services", "Prot LocalAddress:Port", "active")
    for vip in snap["vips"]:
        address = vip["address"]
        literal = f"[{address}]" if ":" in address else address
        for service in vip["services"]:
            active = service.get("active")
            _add(
                services,
                f"{service['proto'].upper()}  {literal}:{service['port']}",
                "-" if active is None else str(active),
            )
    _add(services, "all services", str(sessions["active"]))
    tables.append(services)

    totals = _table("Totals", "what", "count", "per second")
    _add(totals, "sessions started", str(sessions["started"]), _rate(rates["sessions_per_s"] if rates else None))
    _add(totals, "sessions active (peak)", f"{sessions['active']} ({sessions['peak']})", "")
    _add(totals, "frames in", str(frames["in"]), _rate(rates["frames_in_per_s"] if rates else None))
    _add(totals, "frames out", str(frames["out"]), _rate(rates["frames_out_per_s"] if rates else None))
    tables.append(totals)

    servers = _table(
        f"Real servers (scheduler {snap.get('algorithm', '?')})", "server", "address", "mac", "card/port", "state",
        "health",
        "weight", "active", "sessions", "sess/s", "refused", "resp ms",
    )  # fmt: skip
    for row in snap["servers"]:
        health = row.get("health")
        state = row["status"] if not row.get("down_reason") else f"{row['status']} ({row['down_reason']})"
        if row.get("overloaded"):
            state += " overloaded"
        if row.get("neighbor") in ("resolving", "unresolved"):
            state += f" {row['neighbor']}"
        srate = server_rates.get(row["name"])
        _add(
            servers,
            row["name"],
            row["address"],
            _next_hop(row),
            f"{row['line_card']}/{row['port']}",
            state,
            "-" if health is None else health["label"],
            str(row["weight"]),
            str(row["active"]),
            str(row["total"]),
            _rate(srate["sessions_per_s"] if srate else None),
            str(row.get("refused", 0)),
            "-" if row["rt_ms"] is None else f"{row['rt_ms']:.1f}",
        )
    tables.append(servers)

    traffic = _table(
        "Real server traffic (in = toward the server)", "server", "pkts in", "pkts out", "bytes in", "bytes out",
        "pps in", "pps out", "Bps in", "Bps out",
    )  # fmt: skip
    for row in snap["servers"]:
        srate = server_rates.get(row["name"])
        _add(
            traffic,
            row["name"],
            str(row["packets_in"]),
            str(row["packets_out"]),
            _si(row["bytes_in"]),
            _si(row["bytes_out"]),
            _rate(srate["packets_in_per_s"] if srate else None),
            _rate(srate["packets_out_per_s"] if srate else None),
            "-" if srate is None else _si(srate["bytes_in_per_s"]),
            "-" if srate is None else _si(srate["bytes_out_per_s"]),
        )
    tables.append(traffic)

    tables += cluster_tables(snap.get("cluster"))
    tables += offload_tables(snap.get("offload"))

    check = snap.get("health")
    if check is not None:
        target = f"{check['kind']} :{check['port']}{check['path'] or ''}"
        title = (
            f"Health checks ({target}, every {check['interval']:g}s, timeout {check['timeout']:g}s, "
            f"rise {check['rise']}, fall {check['fall']})"
        )
        hc = _table(title, "server", "verdict", "checks", "failed", "last result", "probe ms")
        for row in snap["servers"]:
            h = row.get("health")
            if h is None:
                _add(hc, row["name"], "not checked", "", "", "", "")
                continue
            last = "-" if h["last_ok"] is None else ("ok" if h["last_ok"] else "FAIL")
            if h["last_detail"]:
                last = f"{last}: {h['last_detail']}"
            _add(
                hc,
                row["name"],
                h["label"],
                str(h["checks"]),
                str(h["failed_checks"]),
                last,
                "-" if h["last_rtt_ms"] is None else f"{h['last_rtt_ms']:.1f}",
            )
        tables.append(hc)

    bgp = snap.get("bgp")
    if bgp is not None:
        tables.append(bgp_table(bgp))

    build = snap.get("fast_path_build")  # the daemon's: which one-frame path switches (native or python)
    title = "Packets at the balancer" + (f" (one-frame path: {build})" if build else "")
    paths = _table(title, "path", "frames", "share", "per second")
    fast, slow = frames["fast_path"], frames["slow_path"]
    for name, key, count in (
        ("fast path (label switched)", "fast_path", fast),
        ("slow path (analysed)", "slow_path", slow),
    ):
        share = f"{100.0 * count / (fast + slow):.1f}%" if fast + slow else "-"
        _add(paths, name, str(count), share, _rate(rates[f"{key}_per_s"] if rates else None))
    tables.append(paths)

    labels = snap["labels"]
    lt = _table("Session labels (pairs)", "what", "count")
    for name, key in (
        ("in use", "in_use"),
        ("free", "free"),
        ("in quarantine", "quarantined"),
        ("capacity", "capacity"),
        ("peak in use", "peak"),
        ("allocated", "allocated_total"),
        ("withdrawn", "withdrawn_total"),
        ("allocation failed", "exhausted"),
        ("reused before the quarantine's end", "reused_early"),
        ("labels installed (switching table)", "installed"),
    ):
        _add(lt, name, str(labels[key]))
    tables.append(lt)

    st = _table("Sessions ended and refused", "reason", "sessions")
    for reason, count in sessions["ended"].items():
        _add(st, f"ended: {reason}", str(count))
    for reason, count in sessions["refused"].items():
        _add(st, f"refused: {reason}", str(count))
    if not sessions["ended"] and not sessions["refused"]:
        _add(st, "(none)", "0")
    tables.append(st)

    drops = _table("Drops by reason", "reason", "frames")
    for reason, count in snap["drops"].items():
        _add(drops, reason, str(count))
    for port, counts in (snap.get("ports") or {}).items():
        if counts.get("kernel_dropped"):
            _add(drops, f"kernel, before the daemon read them: {port}", str(counts["kernel_dropped"]))
            if "labelled_dropped" in counts:
                _add(drops, f"  of them labelled (read first): {port}", str(counts["labelled_dropped"]))
    if not snap["drops"] and not any(c.get("kernel_dropped") for c in (snap.get("ports") or {}).values()):
        _add(drops, "(none)", "0")
    tables.append(drops)
    return tables


def agent_tables(snap: Mapping[str, Any]) -> list[Table]:
    """The status tables of an endpoint agent's snapshot (:func:`mplslb.agents.agent_snapshot`)."""
    agent = snap["agent"]
    about = _table(f"Agent ({agent['role']})", "what", "value")
    _add(about, "interface", agent["interface"])
    _add(about, "datapath", agent["datapath"])
    _add(about, "kept across restarts", agent.get("kept", "no"))
    _add(about, "virtual IPs", ", ".join(agent["vips"]))
    _add(about, "flows", str(agent["flows"]))
    traffic = _table("Traffic", "what", "frames")
    for name, count in agent["traffic"].items():
        _add(traffic, name, str(count))
    drops = _table("Drops by reason", "reason", "frames")
    for reason, count in agent["drops"].items():
        _add(drops, reason, str(count))
    if not agent["drops"]:
        _add(drops, "(none)", "0")
    return [about, traffic, drops]
