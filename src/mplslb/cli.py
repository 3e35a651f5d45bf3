"""The ``mplslb`` command: a thin click layer over the core. Reads and checks configuration, then runs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mplslb.config import ConfigError
from mplslb.sim.config import EXAMPLE, sim_config_from_toml
from mplslb.sim.scenario import SimReport, run


@click.group()
@click.version_option(package_name="mplslb")
def main() -> None:
    """mplslb: a server load balancer that switches each client session on a pair of MPLS labels."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Scenario TOML (default: the bundled {EXAMPLE.name}).",
)
@click.option(
    "--capture",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("demo.pcap"),
    show_default=True,
    help="Capture of the client-side ports; the server-side ports go to NAME-servers.pcap beside it.",
)
@click.option("--no-capture", is_flag=True, help="Write no capture.")
@click.option("--seed", type=int, default=None, help="Override the scenario's seed.")
@click.option("--sessions", type=click.IntRange(min=1), default=None, help="Override the number of sessions.")
def demo(config_path: Path | None, capture: Path, no_capture: bool, seed: int | None, sessions: int | None) -> None:
    """Run the simulated network: clients, the balancer, servers, in one process. No root needed."""
    try:
        config = sim_config_from_toml(config_path or EXAMPLE)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if seed is not None:
        config = replace(config, seed=seed)
    if sessions is not None:
        config = replace(config, workload=replace(config.workload, sessions=sessions))
    if not no_capture and not capture.resolve().parent.is_dir():
        raise click.BadParameter(f"directory {capture.resolve().parent} does not exist", param_hint="--capture")
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(
        f"[bold]mplslb demo[/]: {config.workload.sessions} sessions from {config.workload.clients} clients, "
        f"{len(config.servers)} servers, algorithm [cyan]{config.balancer.algorithm if config.balancer else '-'}"
        f"[/], seed {config.seed}"
    )
    report = run(config, capture=None if no_capture else capture)
    print_report(report, console)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def print_report(report: SimReport, console: Console) -> None:
    """The demo's tables: sessions, servers, fast vs slow path, labels, drops."""
    stats = report.stats
    outcomes = report.outcomes()
    sessions = _table("Sessions", "what", "count")
    sessions.add_row("started (balancer)", str(stats.sessions_started))
    for reason, count in sorted(stats.sessions_ended.items()):
        sessions.add_row(f"ended: {reason}", str(count))
    sessions.add_row("still live at the end", str(stats.sessions_active))
    for reason, count in sorted(stats.refused.items()):
        sessions.add_row(f"refused: {reason}", str(count))
    for outcome, count in sorted(outcomes.items()):
        sessions.add_row(f"clients saw: {outcome}", str(count))
    console.print(sessions)

    servers = _table(
        "Servers", "server", "status", "weight", "card/port", "sessions", "active", "requests", "resp ms",
        "pkts in", "pkts out", "bytes in", "bytes out",
    )  # fmt: skip
    for row in stats.servers:
        servers.add_row(
            row.name,
            row.status,
            str(row.weight),
            f"{row.line_card}/{row.port}",
            str(row.total),
            str(row.active),
            str(report.server_served.get(row.name, 0)),
            "-" if row.rt_ms is None else f"{row.rt_ms:.1f}",
            str(row.packets_in),
            str(row.packets_out),
            str(row.bytes_in),
            str(row.bytes_out),
        )
    console.print(servers)

    total = stats.fast_path + stats.slow_path
    paths = _table("Packets at the balancer", "path", "frames", "share")
    for name, count in (("fast path (label switched)", stats.fast_path), ("slow path (analysed)", stats.slow_path)):
        paths.add_row(name, str(count), f"{100.0 * count / total:.1f}%" if total else "-")
    paths.add_row("frames in / out", f"{stats.frames_in} / {stats.frames_out}", "")
    console.print(paths)

    labels = stats.labels
    lt = _table("Session labels", "what", "count")
    for name, value in (
        ("in use (pairs)", labels.in_use_count),
        ("peak in use", labels.peak),
        ("allocated", labels.allocated_total),
        ("withdrawn", labels.withdrawn_total),
        ("in quarantine", labels.quarantined_count),
        ("reused before the quarantine's end", labels.reused_early),
        ("free", labels.free_count),
        ("sessions refused for want of labels", stats.refused.get("labels_exhausted", 0) + labels.exhausted),
    ):
        lt.add_row(name, str(value))
    console.print(lt)

    if stats.l7_hosts:
        hosts = _table("L7 analysis: Host of each session's first request", "Host", "sessions")
        for host, count in sorted(stats.l7_hosts.items(), key=lambda kv: -kv[1]):
            hosts.add_row(host, str(count))
        console.print(hosts)

    drops = _table("Drops by reason", "where: reason", "frames")
    for reason, count in sorted(stats.drops.items()):
        drops.add_row(f"balancer: {reason}", str(count))
    for reason, count in sorted(report.endpoint_drops.items()):
        drops.add_row(f"endpoints: {reason}", str(count))
    if not stats.drops and not report.endpoint_drops:
        drops.add_row("(none)", "0")
    console.print(drops)

    for line in report.applied_events:
        console.print(f"event: {line}")
    console.print(
        f"simulated {report.sim_time:.2f} s in {report.wall_time:.2f} s of wall time ({report.events_run} events)"
    )
    if report.capture:
        server_side = Path(report.capture)
        server_side = server_side.with_name(f"{server_side.stem}-servers{server_side.suffix}")
        console.print(
            f"capture: {report.capture} (client-side ports) and {server_side} (server-side ports); "
            f"try: tshark -r {report.capture} -Y mpls -T fields -e ip.src -e ipv6.src -e mpls.label"
        )


@main.command()
@click.option("--quick", is_flag=True, help="A small study (seconds): fewer sessions, seeds and loads.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs"),
    show_default=True,
    help="Writes OUTPUT/study.md and the figures in OUTPUT/study/.",
)
@click.option("--jobs", type=click.IntRange(min=0), default=0, help="Processes (0: one per CPU).")
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The request log to replay (default: ../shared/data/traces/nasa_19950801.tsv beside the repository).",
)
def study(quick: bool, output: Path, jobs: int, trace: Path | None) -> None:
    """How well does it balance? Simulate every algorithm over a grid of scenarios; write plots and a report."""
    from mplslb.study.markdown import consistency_ok, write_study
    from mplslb.study.report import DEFAULT_TRACE, StudyOptions

    trace = trace or DEFAULT_TRACE
    options = StudyOptions.quick_options(trace, jobs) if quick else StudyOptions(jobs=jobs, trace=trace)
    results = write_study(options, output, click.echo)
    if not consistency_ok(results):
        raise click.ClickException("some sessions changed server through a pool change: see the report")


# -- the real network: daemon, agents, status, lab ------------------------------------------------------------
def _enter_netns(name: str | None) -> None:
    """Move this (still single-threaded) process into network namespace ``name``."""
    if not name:
        return
    import os

    from mplslb.drivers.netns import NETNS_RUN_DIR, setns

    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def _log_lines() -> None:
    """One line per event on stderr, key=value (journald keeps stderr): see :mod:`mplslb.logfmt`."""
    from mplslb import logfmt

    logfmt.setup()


_NETNS = click.option("--netns", default=None, help="Run inside this network namespace (as 'ip netns' names it).")
_READY = click.option("--ready-file", default="", help="Write this file once running (for scripts and tests).")


@main.command("check-config")
@click.argument("config_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a balancer configuration without starting anything (as ``haproxy -c``): exit 0 when it loads,
    otherwise the file, the key and the reason, exit 1."""
    from mplslb.daemon import load_daemon_config

    try:
        config = load_daemon_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    bc = config.balancer
    click.echo(
        f"{config_path}: valid: {len(bc.ports)} ports, {len(bc.vips)} virtual IPs, {len(bc.servers)} servers, "
        f"algorithm {bc.algorithm}, offload {config.offload}"
    )


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_NETNS
@_READY
@click.option(
    "--state-dir",
    default="",
    help="Keep the sessions, labels and kernel offload here across restarts (as [state] persist = true does).",
)
@click.option("--fresh", is_flag=True, help="With kept state: start clean instead of adopting it.")
def balancer(config_path: Path, netns: str | None, ready_file: str, state_dir: str, fresh: bool) -> None:
    """The balancer daemon on real interfaces (root). Stops cleanly on SIGTERM/SIGINT; with kept state a new
    daemon adopts the established sessions."""
    from mplslb.daemon import StartError, load_daemon_config, run_daemon

    try:
        load_daemon_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _enter_netns(netns)
    _log_lines()
    from mplslb.offload.xdp import OffloadError

    try:
        sys.exit(run_daemon(config_path, ready_file=ready_file, state_dir=state_dir, fresh=fresh))
    except OffloadError as exc:
        raise click.ClickException(f"kernel offload: {exc}") from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except StartError as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("pcap_in", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("pcap_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", "port_map", multiple=True, help="MAC=PORT: frames from this source MAC arrive on PORT.")
@click.option("--default-port", default=0, show_default=True, help="Ingress port of frames no --port names.")
@click.option("--drain", default=0.0, show_default=True, help="Seconds of timers to run after the last frame.")
def replay(
    config_path: Path, pcap_in: Path, pcap_out: Path, port_map: tuple[str, ...], default_port: int, drain: float
) -> None:
    """Replay a capture through the balancer (no root, no interfaces) and write what it sends."""
    from mplslb.balancer import Balancer
    from mplslb.daemon import load_daemon_config
    from mplslb.drivers.pcapdrv import replay as run_replay
    from mplslb.wire.errors import WireError
    from mplslb.wire.ethernet import mac_from_str

    try:
        config = load_daemon_config(config_path, need_interfaces=False).balancer
        ports = {}
        for item in port_map:
            mac, _, port = item.partition("=")
            ports[mac_from_str(mac)] = int(port)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--port") from None
    balancer_ = Balancer(config)
    try:
        counts = run_replay(balancer_, pcap_in, pcap_out, port_map=ports, default_port=default_port, drain=drain)
    except WireError as exc:
        raise click.ClickException(f"{pcap_in}: {exc}") from None
    stats = balancer_.stats()
    click.echo(
        f"{counts.fed} frames in, {counts.written} out; fast path {stats.fast_path}, slow path {stats.slow_path}, "
        f"sessions {stats.sessions_started}, drops {sum(stats.drops.values())} {dict(sorted(stats.drops.items()))}"
    )


@main.group()
def agent() -> None:
    """Endpoint agents: let stock programs use session labels through a TUN device."""


def _agent_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--interface", required=True, help="The interface toward the balancer."),
            click.option("--vip", "vips", multiple=True, required=True, help="A virtual IP (repeat for more)."),
            click.option("--tun", default="", help="TUN device name (default: the kernel's choice)."),
            click.option("--balancer", "balancer_addr", default="", help="Use MPLS-in-UDP to this balancer address."),
            click.option("--udp-local", default="0.0.0.0", show_default=True, help="Local address for MPLS-in-UDP."),
            click.option("--udp-port", default=6635, show_default=True, help="MPLS-in-UDP port (RFC 7510: 6635)."),
            click.option(
                "--datapath",
                type=click.Choice(["auto", "kernel", "tun"]),
                default="auto",
                show_default=True,
                help="kernel: BPF programs on the interface; tun: packets through this process; "
                "auto: kernel where BPF and clang allow it.",
            ),
            click.option(
                "--super-packets",
                is_flag=True,
                help="Server, kernel datapath: labelled super-packets leave whole, for a balancer with offload_gso.",
            ),
            click.option(
                "--keep",
                is_flag=True,
                help="Kernel datapath: on exit leave the programs attached (their flows go on being labelled) and "
                "the host as set up, for the next agent on this interface, which takes them over (pinned under "
                "/sys/fs/bpf/mplslb/). Without it, an agent lets a kept datapath go as it starts.",
            ),
            click.option(
                "--control",
                "control_socket",
                default=None,
                help="The agent's control socket, for `mplslb status --socket` "
                "(default: /run/mplslb/agent-ROLE[-NETNS]-INTERFACE.sock; '' for none).",
            ),
            click.option(
                "--metrics", default="", help="Serve the agent's Prometheus /metrics on ADDRESS:PORT (default: none)."
            ),
            _NETNS,
            _READY,
        ]
    ):
        fn = option(fn)
    return fn


def _address_port(text: str) -> tuple[str, int]:
    addr, _, port = text.rpartition(":")
    if not addr or not port.isdigit():
        raise ValueError(f"--metrics: expected ADDRESS:PORT, got {text!r}")
    return addr.strip("[]"), int(port)


def agent_name(role: str, interface: str, netns: str | None) -> str:
    """An agent's name: one per role, namespace and interface, so agents never share a socket or a kept datapath."""
    return f"agent-{role}-{netns + '-' if netns else ''}{interface}"


def agent_socket(role: str, interface: str, netns: str | None) -> str:
    """An agent's default control socket (:func:`agent_name`)."""
    from mplslb.control.client import RUN_DIR

    return f"{RUN_DIR}/{agent_name(role, interface, netns)}.sock"


def _run_agent(role: str, gateway_mac: str, **kw: Any) -> None:
    from mplslb.agents import AgentConfig, run_agent
    from mplslb.wire.ethernet import mac_from_str

    try:
        config = AgentConfig(
            role=role,
            interface=kw["interface"],
            vips=tuple(kw["vips"]),
            tun=kw["tun"],
            gateway_mac=mac_from_str(gateway_mac) if gateway_mac else b"",
            balancer=kw["balancer_addr"],
            udp_local=kw["udp_local"],
            udp_port=kw["udp_port"],
            ready_file=kw["ready_file"],
            control_socket=(
                kw["control_socket"]
                if kw["control_socket"] is not None
                else agent_socket(role, kw["interface"], kw["netns"])
            ),
            metrics=_address_port(kw["metrics"]) if kw["metrics"] else None,
            datapath=kw["datapath"],
            super_packets=kw["super_packets"],
            kept=agent_name(role, kw["interface"], kw["netns"]),
            keep=kw["keep"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _enter_netns(kw["netns"])
    _log_lines()
    try:
        sys.exit(run_agent(config))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@agent.command("server")
@_agent_options
def agent_server(**kw: Any) -> None:
    """A labelled server: VIP on the host, replies from it labelled L + 1."""
    _run_agent("server", "", **kw)


@agent.command("client")
@_agent_options
@click.option("--gateway-mac", default="", help="The balancer port's MAC (over Ethernet).")
def agent_client(gateway_mac: str, **kw: Any) -> None:
    """A labelled client: VIP routed through the agent; first packet unlabelled, then label M - 1."""
    _run_agent("client", gateway_mac, **kw)


@main.command()
@click.option("--socket", "sock", default=None, help="The daemon's control socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON.")
def status(sock: str | None, as_json: bool) -> None:
    """Live tables from a running balancer (like ipvsadm -Ln --stats --rate) or an agent (its counters)."""
    import json

    from mplslb.control.client import DEFAULT_SOCKET, ControlError, request
    from mplslb.control.tables import agent_tables, status_tables

    try:
        reply = request(sock or DEFAULT_SOCKET, {"cmd": "status"})
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if "error" in reply:
        raise click.ClickException(str(reply["error"]))
    if as_json:
        click.echo(json.dumps(reply["status"], indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    snap = reply["status"]
    for table in agent_tables(snap) if "agent" in snap else status_tables(snap):
        console.print(table)


# -- live changes through the control socket (as HAProxy's runtime API and ipvsadm) -------------------------------
_SOCKET = click.option("--socket", "sock", default=None, help="The daemon's control socket.")


@main.command()
@_SOCKET
@click.option("--state", default=None, help="Only sessions in this state (start, established, ending...).")
@click.option("--server", default=None, help="Only this server's sessions.")
@click.option("--limit", type=click.IntRange(0, 10_000), default=100, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def sessions(sock: str | None, state: str | None, server: str | None, limit: int, as_json: bool) -> None:
    """The balancer's session table, oldest first (like ipvsadm -Lnc or HAProxy's show sess)."""
    import json

    req: dict[str, Any] = {"cmd": "sessions", "limit": limit}
    if state is not None:
        req["state"] = state
    if server is not None:
        req["server"] = server
    reply = _ask(sock, req)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    table = _table(f"Sessions: {len(reply['sessions'])} of {reply['total']}", "C2S", "client", "VIP", "server",
                   "state", "age s", "idle s", "deadline s", "packets in/out")  # fmt: skip
    for row in reply["sessions"]:
        table.add_row(
            str(row["c2s"]), row["client"], row["vip"], row["server"], row["state"], f"{row['age']:.1f}",
            f"{row['idle']:.1f}", f"{row['deadline_in']:.1f}", f"{row['c2s_packets']}/{row['s2c_packets']}",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _ask(sock: str | None, req: dict[str, Any]) -> dict[str, Any]:
    """Send one control request. A refusal is an error (exit 1) with the daemon's reason."""
    from mplslb.control.client import DEFAULT_SOCKET, ControlError, request

    try:
        reply = request(sock or DEFAULT_SOCKET, req, timeout=10.0)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    if "error" in reply:
        raise click.ClickException(str(reply["error"]))
    return reply


def _say(summary: str, reply: dict[str, Any]) -> None:
    """The new state, then one ``changed KEY:OLD->NEW`` line per change (or ``no change``)."""
    click.echo(summary)
    for change in reply.get("changes", []):
        click.echo(f"changed {change}")
    if not reply.get("changes"):
        click.echo("no change")


def _server_state(reply: dict[str, Any]) -> None:
    _say(f"server {reply['server']}: {reply['status']}, weight {reply['weight']}", reply)


@main.group("server")
def server_group() -> None:
    """Add, remove, drain, weigh, take down or up a server of a running balancer. New sessions follow at once;
    established sessions keep their server."""


@server_group.command("add")
@click.argument("name")
@click.option("--ip", "address", required=True, help="The server's address (health checks, display).")
@click.option("--mac", required=True, help="The server's MAC, where its sessions' frames go.")
@click.option("--port", "port_id", type=int, required=True, help="The balancer port (id) the server sits behind.")
@click.option("--weight", type=int, default=None, help="Weight (default 1).")
@click.option("--max-sessions", type=int, default=None, help="The server's own session limit (default 0: none).")
@_SOCKET
def server_add(
    name: str, address: str, mac: str, port_id: int, weight: int | None, max_sessions: int | None, sock: str | None
) -> None:
    """Add server NAME, checked as a [[servers]] entry of the configuration; it takes new sessions at once."""
    table: dict[str, Any] = {"name": name, "address": address, "mac": mac, "port": port_id}
    if weight is not None:
        table["weight"] = weight
    if max_sessions is not None:
        table["max_sessions"] = max_sessions
    _server_state(_ask(sock, {"cmd": "add", "server": table}))


@server_group.command("remove")
@click.argument("name")
@click.option("--now", is_flag=True, help="Interrupt its sessions and withdraw their labels instead of draining.")
@_SOCKET
def server_remove(name: str, now: bool, sock: str | None) -> None:
    """Remove server NAME: no new sessions; it leaves the pool when its last session ends (status removing)."""
    reply = _ask(sock, {"cmd": "remove", "server": name, "now": now})
    left = "" if reply["status"] == "removed" else f" ({reply['active']} sessions left)"
    _say(f"server {name}: {reply['status']}{left}", reply)


def _server_command(cmd: str, doc: str) -> None:
    @server_group.command(cmd, help=doc)
    @click.argument("name")
    @_SOCKET
    def run(name: str, sock: str | None) -> None:
        _server_state(_ask(sock, {"cmd": cmd, "server": name}))


_server_command("drain", "Drain server NAME: no new sessions; its sessions finish.")
_server_command("down", "Take server NAME down: its sessions are interrupted; health checks do not bring it back.")
_server_command("up", "Bring server NAME up (a drain ends); refused while its health check fails.")


@server_group.command("weight")
@click.argument("name")
@click.argument("weight", type=click.IntRange(min=0))
@_SOCKET
def server_weight(name: str, weight: int, sock: str | None) -> None:
    """Set server NAME's weight (0: no new sessions, its sessions stay)."""
    _server_state(_ask(sock, {"cmd": "weight", "server": name, "weight": weight}))


@main.group("set")
def set_group() -> None:
    """Change a running balancer's algorithm or admission limits, for new sessions."""


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--param")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


@set_group.command("algorithm")
@click.argument("name")
@click.option("--param", "params", multiple=True, help="KEY=VALUE, an algorithm parameter (repeat for more).")
@_SOCKET
def set_algorithm(name: str, params: tuple[str, ...], sock: str | None) -> None:
    """Choose servers for new sessions with algorithm NAME."""
    reply = _ask(sock, {"cmd": "algorithm", "name": name, "params": dict(_param(p) for p in params)})
    _say(f"algorithm {reply['algorithm']}", reply)


@set_group.command("limit")
@click.argument("name", type=click.Choice(["max-sessions", "max-new-per-second"]))
@click.argument("value", type=click.FloatRange(min=0))
@_SOCKET
def set_limit(name: str, value: float, sock: str | None) -> None:
    """Set an admission limit for new sessions (0: none)."""
    key = name.replace("-", "_")
    if key == "max_sessions" and not value.is_integer():
        raise click.BadParameter(f"max-sessions is a whole number, got {value}", param_hint="VALUE")
    reply = _ask(sock, {"cmd": "limit", "name": key, "value": int(value) if key == "max_sessions" else value})
    _say(f"{name} {reply['value']}", reply)


@main.command("reload")
@_SOCKET
def reload_config(sock: str | None) -> None:
    """Re-read the configuration file the daemon was started with and apply what changed (as SIGHUP); a file that
    does not load or changes what cannot change live is refused, naming the key, and nothing changes."""
    reply = _ask(sock, {"cmd": "reload"})
    _say(f"reloaded {reply['file']}", reply)


@main.group()
def lab() -> None:
    """A real network of namespaces on this machine (root): clients, the balancer, servers running nginx."""


def _lab_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--name", default="mlb", show_default=True, help="Prefix of the lab's namespaces."),
            click.option("--clients", default=3, show_default=True),
            click.option("--servers", default=3, show_default=True),
            click.option("--transport", type=click.Choice(["ethernet", "udp"]), default="ethernet", show_default=True),
            click.option(
                "--server-transport",
                type=click.Choice(["ethernet", "udp"]),
                default="ethernet",
                show_default=True,
                help="udp: the servers behind a router, reached as MPLS-in-UDP.",
            ),
            click.option("--servers-by-ip", is_flag=True, help="Name the servers by address only: MACs resolved."),
            click.option(
                "--nodes",
                default=1,
                show_default=True,
                help="Balancer nodes; more than one: behind a BGP/ECMP router (BIRD), both transports udp.",
            ),
            click.option("--cluster", is_flag=True, help="With --nodes: the nodes sync their sessions ([cluster])."),
            click.option("--algorithm", default="round_robin", show_default=True),
            click.option("--weights", default="", help="Comma-separated weights, one per server."),
            click.option("--offload", type=click.Choice(["none", "kernel"]), default="none", show_default=True),
            click.option(
                "--offload-gso",
                is_flag=True,
                help="With --offload kernel: super-packets through the balancer whole (offload_gso; servers' agents "
                "with --super-packets).",
            ),
            click.option(
                "--offload-syn",
                is_flag=True,
                help="With --offload kernel: new TCP sessions' SYNs taken in the kernel under tickets (offload_syn).",
            ),
            click.option(
                "--offload-prealloc",
                is_flag=True,
                help="With --offload kernel: the label and flow maps preallocated, 296 MiB of kernel memory "
                "(offload_prealloc).",
            ),
            click.option(
                "--datapath",
                type=click.Choice(["kernel", "tun", "auto"]),
                default="kernel",
                show_default=True,
                help="The agents' label datapath.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _lab(**kw: Any) -> Any:
    from mplslb.lab import Lab, LabSpec

    weights = tuple(int(w) for w in kw.pop("weights").split(",") if w.strip())
    if kw.get("nodes", 1) > 1:  # several nodes sit behind a router: MPLS-in-UDP on both sides
        kw["transport"] = kw["server_transport"] = "udp"
    try:
        return Lab(LabSpec(weights=weights, **kw))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@lab.command("up")
@_lab_options
def lab_up(**kw: Any) -> None:
    """Build the lab and start everything; leave it running."""
    from mplslb.lab import LabError

    the_lab = _lab(**kw)
    try:
        the_lab.up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"lab {the_lab.spec.name} is up; status: mplslb status --socket {the_lab.control_socket}")


@lab.command("down")
@click.option("--name", default="mlb", show_default=True)
def lab_down(name: str) -> None:
    """Stop the lab's processes and delete its namespaces."""
    from mplslb.lab import Lab, LabSpec

    problems = Lab(LabSpec(name=name)).down()
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"lab {name} is down")


@lab.command("run")
@_lab_options
@click.option("--requests", default=300, show_default=True, help="Sequential curl requests (over all clients).")
@click.option("--wrk-seconds", default=3, show_default=True)
def lab_run(requests: int, wrk_seconds: int, **kw: Any) -> None:
    """up, real traffic (a curl loop and wrk), the status tables, the per-server split and each agent's counters,
    then down."""
    from mplslb.control.tables import status_tables
    from mplslb.lab import LabError, split

    the_lab = _lab(**kw)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        the_lab.up()
        paths = the_lab.datapaths()
        console.print("agents' datapath: " + ", ".join(f"{name} {path}" for name, path in sorted(paths.items())))
        status = the_lab.status()["status"]
        console.print(
            f"balancer's datapath: {status.get('datapath', '?')}; "
            f"its one-frame path: {status.get('fast_path_build', '?')}"
        )
        per_client = max(1, requests // the_lab.spec.clients)
        bodies: list[str] = []
        for client in range(the_lab.spec.clients):
            bodies += the_lab.curl(client, per_client)
        counts = split(bodies)
        table = _table(f"curl: {len(bodies)} sequential requests, one connection each", "server", "responses")
        for name, count in sorted(counts.items()):
            table.add_row(name or "(failed)", str(count))
        console.print(table)
        figures = the_lab.wrk(0, seconds=wrk_seconds)
        console.print(
            "wrk (1 thread, 8 connections, {s} s): {rps:.0f} requests/s, p50 {p50} ms, p99 {p99} ms, "
            "non-2xx {bad:.0f}, socket errors {err:.0f}".format(
                s=wrk_seconds,
                rps=figures.get("requests_per_s", 0.0),
                p50=figures.get("p50_ms", "-"),
                p99=figures.get("p99_ms", "-"),
                bad=figures.get("non_2xx", 0.0),
                err=figures.get("socket_errors", 0.0),
            )
        )
        for status_table in status_tables(the_lab.status()["status"]):
            console.print(status_table)
        agents = _table("Agents", "agent", "datapath", "flows", "from wire", "from host", "drops")
        for name, agent in the_lab.agent_status().items():
            traffic, drops = agent["traffic"], agent["drops"]
            agents.add_row(
                name,
                agent["datapath"],
                str(agent["flows"]),
                str(traffic.get("from_wire", 0)),
                str(traffic.get("from_host", 0) + traffic.get("from_host_unlabelled", 0)),
                ", ".join(f"{reason} {count}" for reason, count in drops.items()) or "0",
            )
        console.print(agents)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for problem in the_lab.down():
            click.echo(f"warning: {problem}", err=True)
