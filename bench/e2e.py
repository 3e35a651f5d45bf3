"""End-to-end benchmark: wrk through the client agent, the balancer daemon and the server agents to nginx, against
wrk through HAProxy (TCP mode) to the same nginx servers, on the same namespaces, in the same run.

The lab (``mplslb.lab.Lab``) is one client namespace, the balancer namespace and three servers running stock nginx.
The mplslb path is ``wrk -> client agent (TUN) -> balancer daemon -> server agent (TUN) -> nginx`` on the virtual IP.
HAProxy 2.x runs inside the balancer namespace (``nsenter``), listening on 10.77.0.1:8080 (the client-side port's
address) with the three servers' real addresses as backends, one thread (the balancer daemon is one Python
process: like for like). While HAProxy is measured the balancer daemon is paused (SIGSTOP) so it does not spend a
core analysing frames that are not its own; it is resumed afterwards.

Figures: requests/s and p50/p99 latency (wrk --latency), median of the timed runs after a warm-up. Needs root,
network namespaces, nginx, wrk, nsenter and haproxy; each missing piece is reported as a skip with its reason.

The share of a core that each lab process (balancer, agents, nginx) used during the mplslb runs is read from
/proc and reported with the figures: it shows which process limits the path.

``python bench/e2e.py [--quick] [--json] [--profile]`` (``--profile``: py-spy samples the balancer daemon, the
client agent and a server agent during one extra wrk run; summaries in bench/profiles/e2e-*.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Row, at_least, at_most, command_for, skipped

HAPROXY_PORT = 8080
LAB_ROOT = Path("/run/mplslb-bench")


def missing_requirements() -> str:
    """Why the end-to-end benchmark cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, TUN devices, packet sockets)"
    for tool in ("nginx", "wrk", "nsenter", "haproxy", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (make bench installs it)"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespaces on this kernel"
    try:
        from pyroute2 import netns  # noqa: F401
    except ImportError:
        return "pyroute2 is missing"
    return ""


def run_wrk(lab: Any, client: int, url: str, *, seconds: int, connections: int) -> dict[str, float]:
    """wrk from a client namespace (one thread); the figures it prints, parsed as Lab.wrk does."""
    out = lab.run_in(
        lab.client_ns(client),
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        timeout=seconds + 30,
    ).stdout
    figures: dict[str, float] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        figures["requests_per_s"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        figures["requests"] = float(m.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non_2xx"] = float(errors.group(1)) if errors else 0.0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["socket_errors"] = float(sum(int(g) for g in sock.groups())) if sock else 0.0
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.MULTILINE):
            figures[f"p{pct}_ms"] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return figures


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in runs for k in r}
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in sorted(keys)}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_ok(lab: Any, client: int, url: str) -> bool:
    done = lab.run_in(
        lab.client_ns(client), ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]
    )
    return done.stdout.strip() == "200"


def haproxy_config(lab: Any, servers: int) -> str:
    backends = "\n".join(f"    server s{j + 1} {lab.server_addr(j)}:80" for j in range(servers))
    return f"""global
    maxconn 4096
    nbthread 1
    log stderr format short local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 10.77.0.1:{HAPROXY_PORT}
    default_backend nginx
backend nginx
    balance roundrobin
{backends}
"""


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def lab_processes(lab: Any) -> dict[str, list[int]]:
    """The lab's processes by key (nginx: its master and workers)."""
    procs: dict[str, list[int]] = {}
    for key, pid in lab.state.pids.items():
        procs[key] = [pid, *_children(pid)] if key.startswith("nginx") else [pid]
    return procs


def cpu_snapshot(procs: dict[str, list[int]]) -> dict[str, int]:
    return {key: sum(_ticks(pid) for pid in pids) for key, pids in procs.items()}


def cpu_share(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process used between two snapshots."""
    hz = os.sysconf("SC_CLK_TCK")
    return {key: (after[key] - before.get(key, 0)) / hz / seconds for key in after}


def measure(
    lab: Any, url: str, *, seconds: int, connections: int, repeats: int, deadline: float
) -> tuple[dict[str, float], list[dict[str, float]], dict[str, float]]:
    """Median wrk figures of the timed runs, every run, and the share of a core each lab process used."""
    run_wrk(lab, 0, url, seconds=1, connections=connections)  # warm-up: sessions, caches, server workers
    runs: list[dict[str, float]] = []
    procs = lab_processes(lab)
    before, t0 = cpu_snapshot(procs), time.monotonic()
    while len(runs) < repeats and (not runs or time.monotonic() + seconds + 5 < deadline):
        runs.append(run_wrk(lab, 0, url, seconds=seconds, connections=connections))
    cpu = cpu_share(before, cpu_snapshot(procs), time.monotonic() - t0)
    return median_runs(runs), runs, cpu


def profile_lab(lab: Any, url: str, *, seconds: int, connections: int) -> dict[str, str]:
    """py-spy samples the balancer daemon, the client agent and one server agent during one extra wrk run; returns
    where each summary went (or why not)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        return {"error": "py-spy is not installed in the venv"}
    from pyspy import summarize

    out = BENCH / "profiles"
    out.mkdir(exist_ok=True)
    keys = [k for k in ("balancer", "agent-c1", "agent-s1") if k in lab.state.pids]
    spies = {}
    for key in keys:
        raw = Path(tempfile.mkdtemp(prefix="mplslb-pyspy-")) / f"e2e-{key}.raw"  # raw stacks: not kept
        argv = [str(py_spy), "record", "--pid", str(lab.state.pids[key]), "-r", "200", "-d", str(seconds)]
        spies[key] = (
            raw,
            subprocess.Popen([*argv, "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        )
    time.sleep(0.5)
    run_wrk(lab, 0, url, seconds=seconds, connections=connections)
    found: dict[str, str] = {}
    for key, (raw, spy) in spies.items():
        try:
            _, err = spy.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
            found[key] = "py-spy did not finish"
            continue
        if spy.returncode != 0 or not raw.exists():
            found[key] = f"py-spy failed: {err.decode(errors='replace')[-200:]}"
            continue
        title = f"{key} under wrk -c{connections} through mplslb (py-spy record --pid, 200 Hz, {seconds} s)"
        path = out / f"e2e-{key}.txt"
        path.write_text(summarize(raw.read_text(), title=title, idle=True))
        shutil.rmtree(raw.parent, ignore_errors=True)
        found[key] = str(path.relative_to(BENCH.parent))
    return found


def start_haproxy(lab: Any, servers: int) -> subprocess.Popen[bytes]:
    cfg = lab.dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(lab, servers))
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    log_file = open(lab.dir / "haproxy.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{lab.lb}", "--", haproxy_bin, "-db", "-f", str(cfg)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log_file.close()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


#: The balancer's receive path in each lab: a TPACKET_V3 ring (``ring = true``: blocks handed over when full or when
#: the retire timer fires, 1 ms rounded up to a jiffy, 4 ms at HZ=250; with the zero-copy block path and a TX ring)
#: and the shipped default, a plain packet socket (``ring = false``), which hands over every frame at once.
VARIANTS = (("ring", "TPACKET_V3 ring (ring = true)"), ("plain", "plain socket (default)"))


def run(quick: bool = False, *, profile: bool = False, log: Any = print) -> list[Row]:
    cmd = command_for("e2e", quick)
    reason = missing_requirements()
    if reason:
        return [
            skipped("e2e", f"e2e {figure}, {what}", reason, command=cmd)
            for _, what in VARIANTS
            for figure in ("requests/s", "p99 latency", "p50 latency")
        ]
    from mplslb.lab import VIP4, Lab, LabSpec

    class PlainSocketLab(Lab):
        def balancer_toml(self) -> str:
            return "ring = false\n" + super().balancer_toml()

    class RingLab(Lab):
        def balancer_toml(self) -> str:
            return "ring = true\n" + super().balancer_toml()

    seconds, repeats, connections = (2, 1, 16) if quick else (5, 3, 16)
    deadline = time.monotonic() + (120.0 if quick else 300.0)
    servers = 3
    mplslb_url = f"http://{VIP4}/"
    haproxy_url = f"http://10.77.0.1:{HAPROXY_PORT}/"
    ours: dict[str, tuple[dict[str, float], list[dict[str, float]], dict[str, float]]] = {}
    theirs: tuple[dict[str, float], list[dict[str, float]], dict[str, float]] | None = None
    extra: dict[str, Any] = {"seconds": seconds, "connections": connections}
    failures: dict[str, str] = {}
    for index, (key, what) in enumerate(VARIANTS):
        last = index == len(VARIANTS) - 1
        lab_class = PlainSocketLab if key == "plain" else RingLab
        lab = lab_class(LabSpec(name=f"bn{os.getpid() % 10**5}{index}", clients=1, servers=servers), root=LAB_ROOT)
        haproxy: subprocess.Popen[bytes] | None = None
        paused = False
        try:
            t0 = time.monotonic()
            lab.up()
            wait_until(lambda lab=lab: http_ok(lab, 0, mplslb_url), 30, "the VIP to answer through the balancer")
            log(f"e2e: lab ({what}) up in {time.monotonic() - t0:.1f} s; wrk through mplslb ...")
            ours[key] = measure(
                lab, mplslb_url, seconds=seconds, connections=connections, repeats=repeats, deadline=deadline
            )
            if profile and last and time.monotonic() + 30 < deadline:
                extra["profile"] = profile_lab(lab, mplslb_url, seconds=4, connections=connections)
            if last:  # HAProxy once, on the same namespaces and nginx servers
                log("e2e: wrk through HAProxy ...")
                os.kill(lab.state.pids["balancer"], signal.SIGSTOP)
                paused = True
                haproxy = start_haproxy(lab, servers)
                wait_until(lambda lab=lab: http_ok(lab, 0, haproxy_url), 15, "HAProxy to answer")
                theirs = measure(
                    lab, haproxy_url, seconds=seconds, connections=connections, repeats=repeats, deadline=deadline + 60
                )
        except Exception as exc:
            log(f"e2e: {what}: failed: {exc!r}")
            failures[key] = f"lab run failed: {exc!r}"[:300]
        finally:
            if haproxy is not None:
                stop(haproxy)
            if paused:
                os.kill(lab.state.pids["balancer"], signal.SIGCONT)
            problems = lab.down()
            if problems:
                log(f"e2e: lab down: {problems}")
    rows: list[Row] = []
    for key, what in VARIANTS:
        names = [f"e2e {figure}, {what}" for figure in ("requests/s", "p99 latency", "p50 latency")]
        if key not in ours or theirs is None:
            why = failures.get(key) or failures.get(VARIANTS[-1][0]) or "not measured"
            rows += [skipped("e2e", name, why, command=cmd) for name in names]
            continue
        mine, runs, cpu = ours[key]
        ref, ref_runs, ref_cpu = theirs
        errors = (
            f"errors: mplslb {mine.get('non_2xx', 0) + mine.get('socket_errors', 0):.0f}, "
            f"HAProxy {ref.get('non_2xx', 0) + ref.get('socket_errors', 0):.0f}"
        )
        busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        note = (
            f"wrk -t1 -c{connections} -d{seconds}s, median of {len(runs)}/{len(ref_runs)} runs; 1 client, "
            f"{servers} nginx; HAProxy 1 thread, balancer paused meanwhile; {errors}; "
            f"CPU (share of a core) during the mplslb runs: {busy}"
        )
        data = extra | {"mplslb_runs": runs, "haproxy_runs": ref_runs, "mplslb_cpu": cpu, "haproxy_run_cpu": ref_cpu}
        row = Row(
            "e2e",
            names[0],
            mine.get("requests_per_s"),
            "requests/s",
            "HAProxy (TCP mode), same nginx",
            ref.get("requests_per_s"),
            target="ratio >= 1.0",
            note=note,
            command=cmd,
            extra=data,
        )
        rows.append(at_least(row, row.ratio, 1.0) if row.ratio is not None else row)
        for pct, name in (("99", names[1]), ("50", names[2])):
            row = Row(
                "e2e",
                name,
                mine.get(f"p{pct}_ms"),
                "ms",
                "same through HAProxy",
                ref.get(f"p{pct}_ms"),
                target="ratio <= 1.0 (no worse)" if pct == "99" else "-",
                command=cmd,
            )
            rows.append(at_most(row, row.ratio, 1.0) if pct == "99" and row.ratio is not None else row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wrk via the mplslb agents and balancer vs HAProxy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the balancer daemon during one extra run")
    args = parser.parse_args(argv)
    rows = run(args.quick, profile=args.profile, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        for r in rows:
            print(r.benchmark, r.figure, r.unit, "|", r.reference, r.reference_figure, "|", r.skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
