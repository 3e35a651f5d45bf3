"""Run the whole benchmark suite, bounded in time, and print one table: each figure with the reference measured in the
same run, their ratio (figure / reference), the target and whether it is met. Writes bench/results.json.

    .venv/bin/python bench/run.py                 # everything (what `make bench` runs)
    .venv/bin/python bench/run.py --quick         # a smoke run: small tables, short runs
    .venv/bin/python bench/run.py --only single,batch

Sections, in the order they run: the engine (claim, single, new, batch, scale, memory: bench/engine.py), the cost of
session sync between cluster nodes (cluster: bench/cluster_sim.py), 1, 2 and 3 real nodes behind the BIRD ECMP
router in namespaces (cluster_lab: bench/cluster_lab.py, when root), a plain packet socket's reads and writes in
bursts against one system call a frame (sockets: bench/sockets.py, when root), a SYN flood on real ports, the
daemon's loop with receive rings against packet sockets (syn_flood: bench/syn_flood.py, when root), the daemon's
CPU per ``Connection:
close`` session with tickets against every SYN up to it (close_session: bench/close_session.py, when root), the wire
benchmarks (wire: every bench/wire_*.py, written by another hand, each run as a subprocess with --json, and --quick
when it takes it, when root and namespaces are available), the end-to-end comparison with HAProxy (e2e:
bench/e2e.py) and the py-spy profiles of the hot paths (profile: bench/pyspy.py, summaries in bench/profiles/). A
section that would not fit in what is left of the time budget is skipped and says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine
from common import BENCH, ROOT, Row, at_least, command_for, load_average, machine, skipped

SECTIONS = (
    *engine.SECTIONS,
    "cluster",
    "cluster_lab",
    "sockets",
    "syn_flood",
    "close_session",
    "wire",
    "e2e",
    "profile",
)
#: Rough seconds each section takes in a full run on the 2-core reference machine (quick runs take far less); a
#: section is started only if this much of the budget is left.
ESTIMATE = {
    "claim": 30,
    "single": 10,
    "new": 30,
    "batch": 20,
    "scale": 60,
    "memory": 70,
    "cluster": 40,
    "cluster_lab": 70,
    "sockets": 15,
    "syn_flood": 25,
    "close_session": 40,
    "wire": 230,
    "e2e": 520,
    "profile": 45,
}
#: The sections run by a bench script's ``rows(quick)``, in order: (section, module, what the log says).
SCRIPTED = (
    ("cluster", "cluster_sim", "costs of session sync"),
    ("cluster_lab", "cluster_lab", "3, 2 and 1 nodes in namespaces"),
    ("sockets", "sockets", "a plain packet socket's reads and writes in bursts and frame by frame"),
    ("syn_flood", "syn_flood", "a SYN flood on real ports: the loop's CPU per new session, rings and packet sockets"),
    ("close_session", "close_session", "the daemon's CPU per Connection: close session, with tickets and every SYN up"),
)
WIRE_TIMEOUT = 240.0
#: Seconds each wire benchmark takes in a full run (their own docs say so), to share the budget among them.
WIRE_EXPECTED = {"wire_offload.py": 240, "wire_ring.py": 50}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the wire offload benchmark (written by another hand: read its JSON generously) -------------------------------
_KEYS = {
    "benchmark": ("benchmark", "name", "what"),
    "figure": ("figure", "value", "result"),
    "unit": ("unit", "units"),
    "reference": ("reference", "reference_name", "ref"),
    "reference_figure": ("reference_figure", "reference_value", "ref_value", "ref_figure"),
    "target": ("target",),
    "met": ("met", "ok"),
    "note": ("note", "notes", "limits"),
    "skipped": ("skipped", "skip", "skip_reason"),
    "command": ("command",),
}


def _pick(item: dict[str, Any], field: str) -> Any:
    for key in _KEYS[field]:
        if key in item and item[key] is not None:
            return item[key]
    return None


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def wire_rows(data: Any, name: str, command: str) -> list[Row]:
    """Rows from the JSON a wire benchmark prints: a list of rows, or an object holding one (``rows``). Rows made
    with bench/common.Row come back as they were; other shapes are read generously."""
    if isinstance(data, dict):
        reason = data.get("skipped") or data.get("skip") or data.get("skip_reason")
        items = data.get("rows") or data.get("figures") or data.get("results") or []
        if reason and not items:
            return [skipped("wire", name, str(reason), command=command)]
        if not items:
            return figure_rows(data, command) or [skipped("wire", name, "printed no figures", command=command)]
    else:
        items = data
    fields = set(Row.__dataclass_fields__)
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        if {"benchmark", "figure", "unit", "reference", "reference_figure"} <= set(item):
            row = Row(**{k: v for k, v in item.items() if k in fields})
            row.section = "wire"
            row.command = row.command or command
            rows.append(row)
            continue
        met = _pick(item, "met")
        reason = _pick(item, "skipped")
        row = Row(
            "wire",
            str(_pick(item, "benchmark") or name),
            _number(_pick(item, "figure")),
            str(_pick(item, "unit") or ""),
            str(_pick(item, "reference") or ""),
            _number(_pick(item, "reference_figure")),
            target=str(_pick(item, "target") or "-"),
            met=met if isinstance(met, bool) else None,
            note=str(_pick(item, "note") or ""),
            command=str(_pick(item, "command") or command),
            skipped=str(reason) if reason and not isinstance(reason, bool) else ("skipped" if reason is True else ""),
        )
        if row.met is False and isinstance(item.get("gap"), int | float):
            row.gap = float(item["gap"])
        rows.append(row)
    return rows or [skipped("wire", name, "printed no rows", command=command)]


FORWARDERS = {
    "kernel_ipv4": "kernel IPv4 forwarding",
    "nft": "nftables netdev chain",
    "xdp_generic": "XDP offload (generic)",
    "xdp_native": "XDP offload (native)",
    "daemon_none": "daemon, userspace ring",
    "daemon_kernel": 'daemon, offload = "kernel"',
    "daemon_sockets": "daemon, packet sockets",
    "daemon_none_rx_on_gen": "daemon, userspace ring, its receive on the generator's CPU",
}
INSTALLS = (  # (key, what, reference key, reference)
    ("batched_sessions_per_s", "XDP map install, batched", "per_session_sync_sessions_per_s", "one sync per session"),
    (
        "balancer_udp_sessions_per_s",
        "sessions via receive, offload on",
        "balancer_udp_sessions_per_s_without_offload",
        "same, offload off",
    ),
    ("nft_batched_sessions_per_s", "nft install, one transaction", "batched_sessions_per_s", "XDP map, batched"),
)


def figure_rows(data: dict[str, Any], command: str) -> list[Row]:
    """Rows from a dict of figures by section (bench/wire_offload.py): forwarded frames/s against the kernel's
    IPv4 forwarding on the same testbed, and install rates against their own alternatives."""
    rows: list[Row] = []
    size = data.get("frame_bytes", 64)
    kernel = data.get("kernel_ipv4", {}).get("forwarded_pps") if isinstance(data.get("kernel_ipv4"), dict) else None
    for key, figures in data.items():
        if not isinstance(figures, dict) or key in ("machine", "install"):
            continue
        what = FORWARDERS.get(key, key.replace("_", " "))
        if "error" in figures:
            rows.append(skipped("wire", f"wire: {what}, {size} B", str(figures["error"])[:200], command=command))
            continue
        if "forwarded_pps" not in figures:
            continue
        own = key == "kernel_ipv4"
        note = f"offered {figures.get('offered_pps', 0):,.0f}/s by trafgen"
        if "attached" in figures:
            note += f"; XDP {figures['attached']}"
        row = Row(
            "wire",
            f"wire: {what}, {size} B",
            _number(figures["forwarded_pps"]),
            "frames/s",
            "offered by trafgen" if own else "kernel IPv4 forwarding, same testbed",
            _number(figures.get("offered_pps") if own else kernel),
            note=note,
            command=command,
            extra=figures,
        )
        if key == "daemon_none" and row.ratio is not None:  # the issue: userspace fast path vs kernel forwarding
            row.target = "ratio >= 1.0"
            at_least(row, row.ratio, 1.0)
        rows.append(row)
        offered = figures.get("offered_pps")
        if key == "daemon_kernel" and offered:  # the issue: 95 % or more of the offered rate forwarded
            share = Row(
                "wire",
                f"wire: {what}, {size} B, share of offered",
                _number(figures["forwarded_pps"]),
                "frames/s",
                "offered by trafgen",
                _number(offered),
                target="ratio >= 0.95",
                note=note,
                command=command,
            )
            if share.ratio is not None:
                at_least(share, share.ratio, 0.95)
            rows.append(share)
    rows += paced_rows(data.get("paced"), size, command)
    install = data.get("install")
    if isinstance(install, dict):
        for key, what, ref_key, ref in INSTALLS:
            if key in install:
                row = Row(
                    "wire",
                    f"wire: {what}",
                    _number(install[key]),
                    "sessions/s",
                    ref,
                    _number(install.get(ref_key)),
                    note=f"{install.get('sessions', '?')} sessions",
                    command=command,
                    extra=install if key == INSTALLS[0][0] else {},
                )
                if key != "nft_batched_sessions_per_s" and row.figure is not None:  # the issue: >= 5k sessions/s
                    row.target = ">= 5,000 sessions/s"
                    at_least(row, row.figure, 5000.0)
                rows.append(row)
    return rows


def paced_rows(paced: Any, size: int, command: str) -> list[Row]:
    """Rows from wire_offload.py's paced section: at each equal offered load, CPU time per forwarded frame of each
    path (the forwarding CPU's softirq time and the daemon's run time, what other work hardly touches) against the
    kernel's own IPv4 forwarding on the same core, with what each path lost."""
    if not isinstance(paced, dict) or "error" in paced:
        return []
    kernel = paced.get("kernel_ipv4", {})
    rows = []
    for key in FORWARDERS:
        by_rate = paced.get(key)
        if not isinstance(by_rate, dict):
            continue
        if "error" in by_rate:
            what = f"wire paced: {FORWARDERS[key]}, {size} B, CPU per frame"
            rows.append(skipped("wire", what, str(by_rate["error"])[:200], command=command))
            continue
        for rate, figures in by_rate.items():
            reference = kernel.get(rate, {})
            offered, forwarded = figures.get("offered_pps", 0), figures.get("forwarded_pps", 0)
            note = (
                f"offered {offered:,.0f}/s, forwarded {forwarded:,.0f}/s ({figures.get('loss', 0):.1%} lost); "
                f"CPU busy {figures.get('cpu_busy')}; kernel lost {reference.get('loss', 0):.1%}; "
                f"µs/frame: the forwarding CPU's softirq {figures.get('forward_softirq_us_per_frame')}, the daemon "
                f"{figures.get('daemon_us_per_frame')}; the forwarding CPU in all "
                f"{figures.get('forward_cpu_us_per_frame')}, both CPUs above the generator-only baseline "
                f"{figures.get('cpu_us_per_frame')}"
            )
            rows.append(
                Row(
                    "wire",
                    f"wire paced {int(rate) // 1000}k/s: {FORWARDERS[key]}, {size} B, CPU per frame",
                    _number(figures.get("path_us_per_frame")),
                    "µs/frame",
                    "kernel IPv4 forwarding, same load, one core (RPS)",
                    _number(reference.get("path_us_per_frame")),
                    note=note,
                    command=command,
                )
            )
    return rows


def wire_scripts() -> list[Path]:
    """The wire benchmarks (bench/wire_*.py, written by another hand), offload first."""
    return sorted(BENCH.glob("wire_*.py"), key=lambda p: (p.name != "wire_offload.py", p.name))


def run_wire(script: Path, quick: bool, timeout: float) -> list[Row]:
    """One wire benchmark as a subprocess: ``--json`` (and ``--quick`` when it takes it)."""
    name = script.stem.replace("_", " ")
    takes_quick = '"--quick"' in script.read_text()
    args = ["--json", *(["--quick"] if quick and takes_quick else [])]
    command = f".venv/bin/python bench/{script.name} " + " ".join(args)
    if os.geteuid() != 0:
        return [skipped("wire", name, "needs root for network namespaces", command=command)]
    if not Path("/proc/self/ns/net").exists():
        return [skipped("wire", name, "no network namespaces on this kernel", command=command)]
    try:
        done = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return [skipped("wire", name, f"did not finish within {timeout:.0f} s", command=command)]
    text = done.stdout.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
        for line in reversed(text.splitlines()):  # JSON on its last line, after any chatter
            try:
                data = json.loads(line)
                break
            except ValueError:
                continue
    if data is None:
        tail = (done.stderr.strip() or text)[-200:]
        return [skipped("wire", name, f"exit {done.returncode}, no JSON: {tail}", command=command)]
    return wire_rows(data, name, command)


# -- the table ---------------------------------------------------------------------------------------------------
def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def met_text(row: Row) -> str:
    if row.skipped:
        return "skipped"
    if row.met is None:
        return "-"
    if row.met:
        return "yes"
    return f"no (gap {row.gap:.3g}x)" if row.gap else "no"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=title, show_lines=False, header_style="bold")
    for name, justify in (
        ("benchmark", "left"),
        ("figure", "right"),
        ("unit", "left"),
        ("reference", "left"),
        ("reference figure", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("met?", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        met = met_text(row)
        style = {"yes": "green", "-": "", "skipped": "yellow"}.get(met, "red")
        reference = f"skipped: {row.skipped}" if row.skipped else row.reference
        ratio = row.ratio
        table.add_row(
            row.benchmark,
            fmt(row.figure),
            row.unit,
            reference,
            fmt(row.reference_figure),
            f"{ratio:.3g}" if ratio is not None else "-",
            row.target,
            f"[{style}]{met}[/{style}]" if style else met,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks and print one table of figures and references")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small tables, short runs")
    parser.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=1080.0, help="seconds the whole run may take (default 1080)")
    parser.add_argument("--output", default=str(BENCH / "results.json"), help="where to write the results")
    args = parser.parse_args(argv)
    chosen = tuple(s.strip() for s in args.only.split(",") if s.strip()) or SECTIONS
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    started = time.monotonic()
    load_before = load_average()
    deadline = started + args.budget
    rows: list[Row] = []
    durations: dict[str, float] = {}
    profiles: list[dict[str, object]] = []

    def fits(section: str) -> bool:
        need = ESTIMATE[section] * (0.25 if args.quick else 1.0)
        if time.monotonic() + need <= deadline:
            return True
        rows.append(
            skipped(
                section,
                f"{section} (whole section)",
                f"time budget: {need:.0f} s needed, not left",
                command=command_for(section, args.quick),
            )
        )
        return False

    engine_sections = tuple(s for s in engine.SECTIONS if s in chosen and fits(s))
    if engine_sections:
        engine_rows, engine_durations = engine.run_sections(engine_sections, args.quick, log=log)
        rows += engine_rows
        durations |= engine_durations
    for section, module, what in SCRIPTED:
        if section in chosen and fits(section):
            t0 = time.monotonic()
            log(f"{section}: {what} ...")
            rows += importlib.import_module(module).rows(args.quick)
            durations[section] = time.monotonic() - t0
    if "wire" in chosen and fits("wire"):
        t0 = time.monotonic()
        scale = 0.25 if args.quick else 1.0
        reserve = sum(ESTIMATE[s] * scale for s in ("e2e", "profile") if s in chosen)
        scripts = wire_scripts()
        if not any(p.name == "wire_offload.py" for p in scripts):
            rows.append(skipped("wire", "wire offload", "bench/wire_offload.py is not there yet"))
        for index, script in enumerate(scripts):
            later = sum(WIRE_EXPECTED.get(p.name, 60) * scale for p in scripts[index + 1 :])
            allowed = min(WIRE_TIMEOUT, deadline - time.monotonic() - reserve - later)
            if allowed < min(30.0, WIRE_EXPECTED.get(script.name, 60) * scale):
                rows.append(skipped("wire", script.stem, f"time budget: {max(allowed, 0):.0f} s left for it"))
                continue
            log(f"wire: bench/{script.name} (at most {allowed:.0f} s) ...")
            rows += run_wire(script, args.quick, allowed)
        durations["wire"] = time.monotonic() - t0
    if "e2e" in chosen and fits("e2e"):
        import e2e

        t0 = time.monotonic()
        rows += e2e.run(args.quick, profile="profile" in chosen, log=log)
        durations["e2e"] = time.monotonic() - t0
    if "profile" in chosen and fits("profile"):
        import pyspy

        t0 = time.monotonic()
        for target in pyspy.TARGETS:
            log(f"profile: {target} ...")
            try:
                profiles.append(pyspy.profile(target, seconds=2.0 if args.quick else 6.0))
            except Exception as exc:  # a profile is a help, not a figure: never fail the run for it
                profiles.append({"target": target, "tool": "none", "error": repr(exc)})
        durations["profile"] = time.monotonic() - t0
    took = time.monotonic() - started
    title = "mplslb benchmarks" + (" (quick)" if args.quick else "")
    title += ": ratio = figure / reference figure, both measured in this run"
    for r in rows:
        if r.command and args.quick and "--quick" not in r.command and r.command.startswith(".venv"):
            r.command += " --quick"
    print_table(rows, title)
    results = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": took,
        "durations_s": durations,
        "rows": [r.as_dict() for r in rows],
        "profiles": profiles,
    }
    Path(args.output).write_text(json.dumps(results, indent=1, default=str) + "\n")
    for p in profiles:
        if "file" in p:
            log(f"profile {p['target']}: {p['file']} ({p['tool']})")
    output = Path(args.output).resolve()
    print(f"load average before/after: {load_before} / {results['load_average_after']}")
    print(f"results: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}; took {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
