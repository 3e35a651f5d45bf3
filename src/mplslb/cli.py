"""The ``mplslb`` command: a thin click layer over the core. Reads and checks configuration, then runs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
