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

``python bench/e2e.py --bulk [--variant KEY] [--rounds N] [--bulk-seconds S]`` measures only bulk transfer, of
one variant (default ``kernel+xdp+gso``), against HAProxy and no balancer in the same lab: N rounds of 1 and 16
parallel curl downloads of a sparse 1 GiB file, each cut at S seconds, and the medians.

``python bench/e2e.py --close [--variant KEY] [--rounds N] [--steer MODES] [--profile]`` measures only the
``Connection: close`` rows, of one variant (default ``kernel+xdp``), against HAProxy and no balancer in the same lab
(the daemon paused while they run): N rounds of wrk at -c16 and -c64 on each path. Each run reports the whole
machine's busy CPU per request (/proc/stat, softirq included, other work on the machine too: its load average is
recorded), each process's CPU per request (the lab's, HAProxy's, wrk's), each CPU's busy share, and for mplslb the
frames that reached the balancer daemon (its ``frames.in``) per session started in it and the daemon's CPU time per
session (all of it, and its user time alone: its system time includes the kernel's delivery of the frames it sends
into the lab's namespaces). ``--steer none,rps,pin`` interleaves the placements of STEERING in every round, applied
to every path alike (the whole grid takes one). Run it with another checkout's ``src`` on PYTHONPATH to compare two
versions of the balancer on the same machine. ``--keep-alive`` and ``--paced`` (keep-alive at a paced load,
bench/paced.lua: about the same offered load on every path, to compare latencies below saturation) do the same
for their modes, alone or together with ``--close``. Before its rounds each such run measures every process's CPU
for IDLE_SECONDS with no traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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
from wire_offload import cpu_ticks, steer

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


def run_wrk(
    lab: Any, client: int, url: str, *, seconds: int, connections: int, header: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
) -> dict[str, float]:  # fmt: skip
    """wrk from a client namespace (one thread); the figures it prints, parsed as Lab.wrk does. ``after``: its
    arguments after the URL (a script's)."""
    out = lab.run_in(
        lab.client_ns(client),
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *header, url, *after],
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


def _ticks(pid: int, *, user_only: bool = False) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + (0 if user_only else int(fields[12]))  # utime + stime (fields 14 and 15 of stat)


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


def cpu_busy_shares(before: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Each CPU's busy share since ``before`` (``cpu_ticks()``): ``cpu0_busy`` ... (0..1)."""
    return {f"cpu{c}_busy": (busy - before[c][0]) / max(total - before[c][1], 1)
            for c, (busy, total) in cpu_ticks().items() if c in before}  # fmt: skip


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every CPU, /proc/stat: all but idle and iowait), softirq
    included: where a veth's receive work and the kernel's forwarding run, which no process is billed for."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_share(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process used between two snapshots."""
    hz = os.sysconf("SC_CLK_TCK")
    return {key: (after[key] - before.get(key, 0)) / hz / seconds for key in after}


#: Where the lab's receive work runs, for every path alike (mplslb, HAProxy, no balancer). ``none``: the kernel's
#: default, a veth's peer processes a frame in its sender's context, on the sender's CPU (the balancer's send()
#: carries the receiving namespace's stack); ``rps``: Receive Packet Steering by flow hash over every CPU, on every
#: interface of the lab; ``pin``: the balancing process (the daemon, or HAProxy) pinned to CPU 0 and the switch's
#: ports facing the balancer steered to the other CPUs, so what the balancer sends is processed there.
STEERING = ("none", "rps", "pin")


def lab_ports(lab: Any) -> dict[str, list[str]]:
    """Every interface of the lab that has a receive queue, by namespace (not loopback, not bridges)."""
    script = ('for d in /sys/class/net/*; do n=${d##*/}; if [ "$n" != lo ] && [ ! -e "$d/bridge" ] && '
              '[ -e "$d/queues/rx-0/rps_cpus" ]; then echo "$n"; fi; done')  # fmt: skip
    return {ns: subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], capture_output=True, text=True,
                               timeout=10, check=True).stdout.split() for ns in lab.state.namespaces}  # fmt: skip


def set_steering(lab: Any, mode: str, ports: dict[str, list[str]], pids: list[int]) -> None:
    """Apply one of STEERING to the lab's interfaces (``ports``) and the balancing processes ``pids``."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    for ns, names in ports.items():
        for name in names:
            facing = ns == lab.ns("sw") and name.startswith("lb")  # the switch's ports to the balancer
            steer(ns, name, cpus if mode == "rps" else cpus[1:] if mode == "pin" and facing else None)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            with contextlib.suppress(OSError):  # a thread gone meanwhile
                os.sched_setaffinity(int(task.name), {cpus[0]} if mode == "pin" else set(cpus))


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


def profile_lab(
    lab: Any, url: str, *, seconds: int, connections: int, header: tuple[str, ...] = (), tag: str = ""
) -> dict[str, str]:
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
    run_wrk(lab, 0, url, seconds=seconds, connections=connections, header=header)
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
        wrk = " ".join(("wrk", f"-c{connections}", *header))
        title = f"{key} under {wrk} through mplslb (py-spy record --pid, 200 Hz, {seconds} s)"
        path = out / f"e2e{tag}-{key}.txt"
        path.write_text(summarize(raw.read_text(), title=title, idle=True, inclusive_top=60))
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


#: wrk's two ways of using connections: keep-alive (every request on the 16 or 64 open connections) and one
#: connection per request (``Connection: close``: a new session, a new pair of labels, for every request).
MODES = (("keep-alive", ()), ("close", ("-H", "Connection: close")))
#: The paced keep-alive load, measured in turns only (bench/paced.lua): each connection waits this many
#: milliseconds per 16 connections after every response, so -c16 and -c64 offer about 10-13k requests a second
#: (measured), below every path's saturation, and the latencies are compared at about the same load.
PACED_SCRIPT = Path(__file__).resolve().parent / "paced.lua"
PACED_DELAY_PER_16 = 1


def wrk_args(mode: str, connections: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """wrk's arguments for ``mode`` (one of MODES, or "paced"), before the URL and after it."""
    if mode == "paced":
        return ("-s", str(PACED_SCRIPT)), ("--", str(max(1, connections // 16) * PACED_DELAY_PER_16))
    return dict(MODES)[mode], ()


#: Sysctls set in the client and balancer namespaces for every variant alike: without them one connection per
#: request exhausts the client's ports within a second and every variant, the references too, collapses.
CLOSE_SYSCTLS = (("ipv4/ip_local_port_range", "1024 65535"), ("ipv4/tcp_tw_reuse", "1"))
BULK_FILE = "big"
BULK_BYTES = 1 << 30
BULK_STREAMS = 16


def lab_variants() -> list[tuple[str, str, dict[str, Any]]]:
    """The mplslb configurations measured: (key, description, LabSpec fields); the references (HAProxy, no
    balancer) are measured in the first one's lab, with the balancer paused."""
    from mplslb.lab import LabSpec

    fields = getattr(LabSpec, "__dataclass_fields__", {})
    if "datapath" in fields:
        # The TUN lab first: the references are measured in the first lab, and the kernel datapath changes the
        # servers' interfaces (no checksum offload, so no segmentation offload), which would handicap them.
        found = [
            ("tun", "TUN agents", {"datapath": "tun"}),
            ("kernel", "kernel endpoints", {"datapath": "kernel"}),
            ("kernel+xdp", "kernel endpoints, offload = kernel", {"datapath": "kernel", "offload": "kernel"}),
        ]
        if "offload_gso" in fields:  # super-packets whole through the balancer's offload
            gso = {"datapath": "kernel", "offload": "kernel", "offload_gso": True}
            found.append(("kernel+xdp+gso", "kernel endpoints, offload = kernel, offload_gso", gso))
        if "offload_syn" in fields:  # new sessions' SYNs taken in the kernel under tickets
            syn = {"datapath": "kernel", "offload": "kernel", "offload_syn": True}
            found.append(("kernel+xdp+syn", "kernel endpoints, offload = kernel, offload_syn", syn))
            if "offload_gso" in fields:  # the whole datapath in the kernel: both at once
                whole = {**gso, "offload_syn": True}
                found.append(("kernel+xdp+gso+syn", "kernel endpoints, offload = kernel, offload_gso, offload_syn",
                              whole))  # fmt: skip
                if "offload_prealloc" in fields:  # and the label map preallocated
                    found.append(("kernel+xdp+gso+syn+prealloc", "kernel endpoints, offload = kernel, offload_gso, "
                                  "offload_syn, offload_prealloc", {**whole, "offload_prealloc": True}))  # fmt: skip
        return found
    return [("tun", "TUN agents", {}), ("tun+xdp", "TUN agents, offload = kernel", {"offload": "kernel"})]


def set_sysctls(lab: Any, namespaces: list[str]) -> None:
    for ns in namespaces:
        for path, value in CLOSE_SYSCTLS:
            lab.run_in(ns, ["sh", "-c", f"echo '{value}' > /proc/sys/net/{path}"], check=True)


def route_direct(lab: Any) -> str:
    """Let client 1 reach server 1's own address through the balancer's namespace by kernel IP forwarding (no
    balancer at all: the testbed's physical limit); returns that server's URL."""
    from pyroute2 import NetNS

    lab.run_in(lab.lb, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], check=True)
    with NetNS(lab.client_ns(0)) as ns:
        ns.route("add", dst="10.78.0.0/16", gateway="10.77.0.1")
    with NetNS(lab.server_ns(0)) as ns:
        ns.route("add", dst="10.77.0.0/24", gateway="10.78.0.1")
    return f"http://{lab.server_addr(0)}/"


def make_bulk_files(lab: Any, servers: int, size: int = BULK_BYTES) -> None:
    """One sparse file of ``size`` bytes in every server's web root (links to one inode) and read once: nginx reads
    zeros from the page cache and the network moves the bytes. Unread, the first download of each part of it paid
    the kernel's zeroing of its pages (half the machine's CPU in a profile of one stream), and only that path paid."""
    paths = [lab.dir / lab.server_name(j) / "www" / BULK_FILE for j in range(servers)]
    with open(paths[0], "wb") as fh:
        fh.truncate(size)
    for path in paths[1:]:
        path.unlink(missing_ok=True)
        os.link(paths[0], path)
    chunk = bytearray(1 << 22)
    with open(paths[0], "rb", buffering=0) as fh:
        while fh.readinto(chunk):
            pass


def bulk(lab: Any, url: str, *, streams: int, seconds: float, procs: dict[str, list[int]]) -> dict[str, float]:
    """``streams`` parallel downloads of the big file (each cut at ``seconds``): MB/s in all, bytes, CPU seconds."""
    curl = f"curl -s -o /dev/null --max-time {seconds} -w '%{{size_download}}\\n' {url}{BULK_FILE}"
    script = " & ".join([curl] * streams) + " & wait"
    before, busy, t0 = cpu_snapshot(procs), machine_busy(), time.monotonic()
    out = lab.run_in(lab.client_ns(0), ["sh", "-c", script], timeout=seconds + 30).stdout
    elapsed = time.monotonic() - t0
    after, busy = cpu_snapshot(procs), machine_busy() - busy
    moved = sum(float(x) for x in out.split() if x.strip().replace(".", "", 1).isdigit())
    hz = os.sysconf("SC_CLK_TCK")
    cpu = {k: (after[k] - before.get(k, 0)) / hz for k in after}
    per_gb = busy / (moved / 1e9) if moved else float("nan")
    figures = {"mb_per_s": moved / 1e6 / elapsed, "bytes": moved, "seconds": elapsed, "cpu_s": sum(cpu.values()),
               "machine_cpu_s": busy, "machine_cpu_s_per_gb": per_gb}  # fmt: skip
    return figures | {f"cpu_s_{k}": v for k, v in cpu.items()}


Cell = tuple[dict[str, float], list[dict[str, float]], dict[str, float]]


def measure_grid(
    lab: Any, url: str, *, seconds: int, repeats: int, connections: tuple[int, ...], deadline: float,
    extra_procs: dict[str, list[int]] | None = None,
) -> dict[tuple[str, int], Cell]:  # fmt: skip
    """wrk for every mode and connection count: the median figures, every run, the CPU seconds per request of
    each process (lab processes, and ``extra_procs`` such as HAProxy)."""
    grid: dict[tuple[str, int], Cell] = {}
    procs = lab_processes(lab) | (extra_procs or {})
    hz = os.sysconf("SC_CLK_TCK")
    for mode, header in MODES:
        for conns in connections:
            if time.monotonic() + seconds * repeats + 5 > deadline:
                return grid
            run_wrk(lab, 0, url, seconds=1, connections=conns, header=header)  # warm-up
            runs: list[dict[str, float]] = []
            before, busy, ticks = cpu_snapshot(procs), machine_busy(), cpu_ticks()
            for _ in range(repeats):
                runs.append(run_wrk(lab, 0, url, seconds=seconds, connections=conns, header=header))
            after, busy = cpu_snapshot(procs), machine_busy() - busy
            served = sum(r.get("requests", 0.0) for r in runs) or 1.0
            cpu = {k: (after[k] - before.get(k, 0)) / hz / served * 1e6 for k in after}  # us per request
            cpu["whole machine"] = busy / served * 1e6
            grid[(mode, conns)] = (median_runs(runs) | cpu_busy_shares(ticks), runs, cpu)
    return grid


def run(quick: bool = False, *, profile: bool = False, steering: str = "none", log: Any = print) -> list[Row]:
    cmd = command_for("e2e", quick)
    reason = missing_requirements()
    variants = lab_variants()
    if reason:
        return [skipped("e2e", f"e2e requests/s, {what}", reason, command=cmd) for _, what, _ in variants]
    from mplslb.lab import VIP4, Lab, LabSpec

    seconds, repeats, connections = (1, 1, (16,)) if quick else (3, 2, (16, 64))
    bulk_seconds = 3.0 if quick else 8.0
    deadline = time.monotonic() + (150.0 if quick else 420.0)
    servers = 3
    mplslb_url = f"http://{VIP4}/"
    haproxy_url = f"http://10.77.0.1:{HAPROXY_PORT}/"
    ours: dict[str, dict[tuple[str, int], Cell]] = {}
    refs: dict[str, dict[tuple[str, int], Cell]] = {}
    bulks: dict[str, dict[int, dict[str, float]]] = {}
    extra: dict[str, Any] = {"seconds": seconds, "repeats": repeats, "steering": steering}
    failures: dict[str, str] = {}
    for index, (key, what, fields) in enumerate(variants):
        first = index == 0
        lab = Lab(LabSpec(name=f"bn{os.getpid() % 10**5}{index}", clients=1, servers=servers, **fields), root=LAB_ROOT)
        haproxy: subprocess.Popen[bytes] | None = None
        paused = False
        try:
            t0 = time.monotonic()
            lab.up()
            set_sysctls(lab, [lab.client_ns(0), lab.lb])
            ports = lab_ports(lab)
            set_steering(lab, steering, ports, [lab.state.pids["balancer"]])
            make_bulk_files(lab, servers)
            wait_until(lambda lab=lab: http_ok(lab, 0, mplslb_url), 30, "the VIP to answer through the balancer")
            log(f"e2e: lab ({what}) up in {time.monotonic() - t0:.1f} s; wrk through mplslb ...")
            ours[key] = measure_grid(
                lab, mplslb_url, seconds=seconds, repeats=repeats, connections=connections, deadline=deadline
            )
            procs = lab_processes(lab)
            bulks[key] = {n: bulk(lab, mplslb_url, streams=n, seconds=bulk_seconds, procs=procs)
                          for n in (1, BULK_STREAMS)}  # fmt: skip
            if profile and first and time.monotonic() + 30 < deadline:
                extra["profile"] = profile_lab(lab, mplslb_url, seconds=4, connections=16)
            if first:  # the references once, on the same namespaces and nginx servers, the balancer paused
                os.kill(lab.state.pids["balancer"], signal.SIGSTOP)
                paused = True
                log("e2e: wrk through HAProxy ...")
                haproxy = start_haproxy(lab, servers)
                wait_until(lambda lab=lab: http_ok(lab, 0, haproxy_url), 15, "HAProxy to answer")
                hp = {"haproxy": [haproxy.pid, *_children(haproxy.pid)]}
                set_steering(lab, steering, ports, hp["haproxy"])
                refs["haproxy"] = measure_grid(
                    lab, haproxy_url, seconds=seconds, repeats=repeats, connections=connections,
                    deadline=deadline + 60, extra_procs=hp,
                )  # fmt: skip
                bulks["haproxy"] = {n: bulk(lab, haproxy_url, streams=n, seconds=bulk_seconds, procs=procs | hp)
                                    for n in (1, BULK_STREAMS)}  # fmt: skip
                stop(haproxy)
                haproxy = None
                log("e2e: wrk straight to one nginx (no balancer) ...")
                direct_url = route_direct(lab)
                wait_until(lambda lab=lab, url=direct_url: http_ok(lab, 0, url), 15, "the server to answer")
                refs["direct"] = measure_grid(lab, direct_url, seconds=seconds, repeats=repeats,
                                              connections=connections, deadline=deadline + 120)  # fmt: skip
                bulks["direct"] = {n: bulk(lab, direct_url, streams=n, seconds=bulk_seconds, procs=procs)
                                   for n in (1, BULK_STREAMS)}  # fmt: skip
        except Exception as exc:
            log(f"e2e: {what}: failed: {exc!r}")
            failures[key] = f"lab run failed: {exc!r}"[:300]
        finally:
            tear_down(lab, haproxy, paused=paused, log=log)
    rows = e2e_rows(variants, ours, refs, bulks, failures, extra, cmd)
    names = {key: what for key, what, _ in variants}
    turn = next((k for k in TURNS if k in names), None)
    if turn is not None:
        log(f"e2e: {' and '.join(TURN_MODES)} through mplslb ({names[turn]}), HAProxy and no balancer in one lab, "
            "in turns ...")  # fmt: skip
        try:
            found = in_turns(turn, modes=TURN_MODES, rounds=1 if quick else 3, seconds=seconds,
                             connects=shutil.which("dumpcap") is not None and shutil.which("tshark") is not None,
                             log=log)  # fmt: skip
        except Exception as exc:
            log(f"e2e: in turns: failed: {exc!r}")
            rows += [skipped("e2e", f"e2e {mode}, {names[turn]}, in turns", f"lab run failed: {exc!r}"[:300],
                             command=cmd) for mode in TURN_MODES]  # fmt: skip
        else:
            for mode in TURN_MODES:
                rows += turn_rows(found, names[turn], mode, seconds, cmd)
            rows += connect_rows(found, names[turn], seconds, cmd)
            rows += idle_rows(found, names[turn], cmd)
    return rows


#: The variant also measured in turns with the references on its own namespaces, in both modes: the whole datapath
#: in the kernel (super-packets whole, new sessions' SYNs taken under tickets, the label map preallocated), one
#: configuration for both kinds of traffic; the first of these the lab offers.
TURNS = ("kernel+xdp+gso+syn+prealloc", "kernel+xdp+gso+syn", "kernel+xdp+gso", "kernel+xdp")
TURN_MODES = ("keep-alive", "paced", "close")


def turn_rows(runs: list[dict[str, Any]], what: str, mode: str, seconds: int, cmd: str) -> list[Row]:
    """The rows of ``mode`` measured in turns in one lab (:func:`in_turns`): requests/s against HAProxy's and
    against no balancer's, and the p99 against HAProxy's, each the median of the rounds (keep-alive's targets on
    all three, one connection per request's on the first); the paced mode's are :func:`paced_rows`."""
    if mode == "paced":
        return paced_rows(runs, what, seconds, cmd)
    medians = {(m["path"], m["connections"]): m for m in turn_medians(runs) if m["mode"] == mode}
    keep_alive = mode == "keep-alive"
    rows: list[Row] = []
    for conns in (16, 64):
        mine, hp, direct = (medians.get((path, conns)) for path in TURN_PATHS)
        if mine is None or hp is None or direct is None:
            continue
        per_path = [r for r in runs if r["connections"] == conns and r["mode"] == mode]
        note = (f"wrk -t1 -c{conns} -d{seconds}s, median of {mine['runs']} rounds; mplslb, HAProxy and no balancer "
                f"on the same namespaces and nginx, in turns (the balancer paused for the references); p50 "
                f"{mine.get('p50_ms', 0):.2f} ms (HAProxy {hp.get('p50_ms', 0):.2f}, no balancer "
                f"{direct.get('p50_ms', 0):.2f}), no balancer's p99 {direct.get('p99_ms', 0):.2f} ms; machine CPU "
                f"us/request: mplslb {mine.get('machine_cpu_us_per_request', 0):.0f}, HAProxy "
                f"{hp.get('machine_cpu_us_per_request', 0):.0f}, no balancer "
                f"{direct.get('machine_cpu_us_per_request', 0):.0f}")  # fmt: skip
        if not keep_alive:
            note += (f"; the daemon {mine.get('balancer_cpu_us_per_session', 0):.0f} us of CPU per session, "
                     f"{mine.get('frames_per_session', 0):.2f} frames per session reach it")  # fmt: skip
        name = f"{what}, in turns in one lab"
        target = 1.5 if keep_alive else 1.0
        row = Row("e2e", f"e2e {mode} -c{conns} requests/s, {name}", mine.get("requests_per_s"), "requests/s",
                  "HAProxy (TCP mode), same lab, in turns", hp.get("requests_per_s"), target=f"ratio >= {target}",
                  note=note, command=cmd, extra={"runs": per_path})  # fmt: skip
        rows.append(at_least(row, row.ratio, target) if row.ratio is not None else row)
        row = Row("e2e", f"e2e {mode} -c{conns} requests/s vs no balancer, {name}", mine.get("requests_per_s"),
                  "requests/s", "no balancer, same lab, in turns", direct.get("requests_per_s"),
                  target="ratio >= 0.7" if keep_alive else "-", command=cmd)  # fmt: skip
        rows.append(at_least(row, row.ratio, 0.7) if keep_alive and row.ratio is not None else row)
        row = Row("e2e", f"e2e {mode} -c{conns} p99 latency, {name}", mine.get("p99_ms"), "ms",
                  "same through HAProxy, in turns", hp.get("p99_ms"),
                  target="ratio <= 1.0 (no worse)" if keep_alive else "-", command=cmd)  # fmt: skip
        rows.append(at_most(row, row.ratio, 1.0) if keep_alive and row.ratio is not None else row)
    return rows


def paced_rows(runs: list[dict[str, Any]], what: str, seconds: int, cmd: str) -> list[Row]:
    """The paced keep-alive runs' rows (:func:`in_turns` with mode "paced"): each path's p99 at about the same
    offered load, mplslb's against HAProxy's, the medians of the rounds; the loads each path took in the note."""
    medians = {(m["path"], m["connections"]): m for m in turn_medians(runs) if m["mode"] == "paced"}
    rows: list[Row] = []
    for conns in (16, 64):
        mine, hp, direct = (medians.get((path, conns)) for path in TURN_PATHS)
        if mine is None or hp is None or direct is None:
            continue
        (_, after) = wrk_args("paced", conns)
        note = (f"wrk -t1 -c{conns} -d{seconds}s -s bench/paced.lua -- {after[-1]} (each connection waits "
                f"{after[-1]} ms after each response), median of {mine['runs']} rounds in turns: requests/s mplslb "
                f"{mine.get('requests_per_s', 0):,.0f}, HAProxy {hp.get('requests_per_s', 0):,.0f}, no balancer "
                f"{direct.get('requests_per_s', 0):,.0f}; p50 {mine.get('p50_ms', 0):.2f} ms (HAProxy "
                f"{hp.get('p50_ms', 0):.2f}, no balancer {direct.get('p50_ms', 0):.2f}), no balancer's p99 "
                f"{direct.get('p99_ms', 0):.2f} ms; machine CPU us/request: mplslb "
                f"{mine.get('machine_cpu_us_per_request', 0):.0f}, HAProxy "
                f"{hp.get('machine_cpu_us_per_request', 0):.0f}")  # fmt: skip
        per_path = [r for r in runs if r["connections"] == conns and r["mode"] == "paced"]
        rows.append(Row("e2e", f"e2e keep-alive -c{conns} p99 latency at a paced load, {what}, in turns in one lab",
                        mine.get("p99_ms"), "ms", "same through HAProxy at the same pacing, in turns",
                        hp.get("p99_ms"), target="-", note=note, command=cmd, extra={"runs": per_path}))  # fmt: skip
    return rows


def _shares(figures: dict[str, float]) -> str:
    return " / ".join(f"{v:.0%}" for k, v in sorted(figures.items()) if re.fullmatch(r"cpu\d+_busy", k))


def _busy(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.5)


def e2e_rows(
    variants: list[tuple[str, str, dict[str, Any]]],
    ours: dict[str, dict[tuple[str, int], Cell]],
    refs: dict[str, dict[tuple[str, int], Cell]],
    bulks: dict[str, dict[int, dict[str, float]]],
    failures: dict[str, str],
    extra: dict[str, Any],
    cmd: str,
) -> list[Row]:
    """One row per variant, mode and connection count against HAProxy (and one against no balancer), the p99
    against HAProxy's, and the bulk transfers."""
    rows: list[Row] = []
    hp, direct = refs.get("haproxy", {}), refs.get("direct", {})
    for (mode, conns), (ref, _, ref_cpu) in sorted(hp.items()):
        d = direct.get((mode, conns))
        row = Row("e2e", f"e2e {mode} -c{conns}: HAProxy requests/s", ref.get("requests_per_s"), "requests/s",
                  "no balancer (client to one nginx)", d[0].get("requests_per_s") if d else None,
                  note=f"p50 {ref.get('p50_ms', 0):.2f} ms, p99 {ref.get('p99_ms', 0):.2f} ms; CPU us/request: "
                  f"{_busy(ref_cpu)}", command=cmd)  # fmt: skip
        rows.append(row)
    for key, what, _ in variants:
        grid = ours.get(key)
        if not grid or not hp:
            why = failures.get(key) or failures.get(variants[0][0]) or "not measured"
            rows.append(skipped("e2e", f"e2e requests/s, {what}", why, command=cmd))
            continue
        for (mode, conns), (mine, runs, cpu) in sorted(grid.items()):
            ref_cell, d = hp.get((mode, conns)), direct.get((mode, conns))
            if ref_cell is None:
                continue
            ref = ref_cell[0]
            errors = mine.get("non_2xx", 0) + mine.get("socket_errors", 0)
            note = (f"wrk -t1 -c{conns} -d{extra['seconds']}s, median of {len(runs)}, steering {extra['steering']}; "
                    f"p50 {mine.get('p50_ms', 0):.2f} ms (HAProxy {ref.get('p50_ms', 0):.2f}); errors {errors:.0f}; "
                    f"CPU us/request: {_busy(cpu)}; CPUs busy: {_shares(mine)}")  # fmt: skip
            target = 1.5 if mode == "keep-alive" else 1.0
            row = Row("e2e", f"e2e {mode} -c{conns} requests/s, {what}", mine.get("requests_per_s"), "requests/s",
                      "HAProxy (TCP mode), same nginx", ref.get("requests_per_s"), target=f"ratio >= {target}",
                      note=note, command=cmd, extra={"runs": runs, "cpu_us_per_request": cpu})  # fmt: skip
            rows.append(at_least(row, row.ratio, target) if row.ratio is not None else row)
            if d is not None:
                row = Row("e2e", f"e2e {mode} -c{conns} requests/s vs no balancer, {what}",
                          mine.get("requests_per_s"), "requests/s", "no balancer (client to one nginx)",
                          d[0].get("requests_per_s"), target="ratio >= 0.7" if mode == "keep-alive" else "-",
                          command=cmd)  # fmt: skip
                rows.append(at_least(row, row.ratio, 0.7) if mode == "keep-alive" and row.ratio else row)
            row = Row("e2e", f"e2e {mode} -c{conns} p99 latency, {what}", mine.get("p99_ms"), "ms",
                      "same through HAProxy", ref.get("p99_ms"),
                      target="ratio <= 1.0 (no worse)" if mode == "keep-alive" else "-", command=cmd)  # fmt: skip
            rows.append(at_most(row, row.ratio, 1.0) if mode == "keep-alive" and row.ratio else row)
    for key, what, _ in variants:
        for streams in (1, BULK_STREAMS):
            mine_b = bulks.get(key, {}).get(streams)
            ref_b = bulks.get("haproxy", {}).get(streams)
            if mine_b is None or ref_b is None:
                continue
            d_b = bulks.get("direct", {}).get(streams, {})

            def per_gb(b: dict[str, float]) -> str:
                """CPU seconds per GB: the lab's processes (and HAProxy's), then the whole machine's."""
                if not b.get("bytes"):
                    return "-"
                return f"{b['cpu_s'] / (b['bytes'] / 1e9):.2f}/{b.get('machine_cpu_s_per_gb', float('nan')):.2f}"

            note = (f"{streams} x GET of a 1 GiB file, cut at {mine_b['seconds']:.0f} s; CPU s per GB (processes/"
                    f"machine): mplslb {per_gb(mine_b)}, HAProxy {per_gb(ref_b)}, no balancer {per_gb(d_b)}; "
                    f"no balancer {d_b.get('mb_per_s', 0):,.0f} MB/s")  # fmt: skip
            row = Row("e2e", f"bulk {streams} stream{'s' if streams > 1 else ''} MB/s, {what}", mine_b["mb_per_s"],
                      "MB/s", "HAProxy (TCP mode), same nginx", ref_b["mb_per_s"], target="ratio >= 1.0",
                      note=note, command=cmd, extra={"mplslb": mine_b, "haproxy": ref_b, "direct": d_b})  # fmt: skip
            rows.append(at_least(row, row.ratio, 1.0) if row.ratio is not None else row)
    if extra.get("profile") and rows:
        rows[0].extra["profile"] = extra["profile"]
    return rows


def turn_run(
    lab: Any, url: str, *, mode: str, seconds: int, connections: int, procs: dict[str, list[int]],
    daemon: int | None,
) -> dict[str, float]:  # fmt: skip
    """One wrk run of ``mode`` (keep-alive, ``close`` or paced: :func:`wrk_args`): its figures; per request, the
    whole machine's busy CPU (softirq included) and each process's (the lab's, HAProxy's, wrk's); each CPU's busy
    share of the run; with ``daemon`` (the balancer daemon, running), the frames that reached it and its CPU time
    per session started."""
    hz, (header, after) = os.sysconf("SC_CLK_TCK"), wrk_args(mode, connections)
    status = lab.status()["status"] if daemon else {}
    ticks, user = (_ticks(daemon), _ticks(daemon, user_only=True)) if daemon else (0, 0)
    kids0, before, busy, per_cpu = (
        resource.getrusage(resource.RUSAGE_CHILDREN),
        cpu_snapshot(procs),
        machine_busy(),
        cpu_ticks(),
    )
    figures = run_wrk(lab, 0, url, seconds=seconds, connections=connections, header=header, after=after)
    busy, shares, then = machine_busy() - busy, cpu_busy_shares(per_cpu), cpu_snapshot(procs)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk (and its nsenter), waited for
    us = 1e6 / (figures.get("requests") or 1.0)
    figures |= {"connections": connections, "machine_cpu_us_per_request": busy * us, **shares,
                "cpu_us_wrk": (kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime) * us}  # fmt: skip
    figures |= {f"cpu_us_{k}": (then[k] - before.get(k, 0)) / hz * us for k in then}
    # Other work on the machine counts in the machine's figures: the load average, and the busy time billed to no
    # process measured here (other processes', and softirq run in no measured process's context).
    figures["load1"] = os.getloadavg()[0]
    figures["machine_unbilled_us_per_request"] = figures["machine_cpu_us_per_request"] - sum(
        v for k, v in figures.items() if k.startswith("cpu_us_")
    )
    if daemon:
        now = lab.status()["status"]
        ticks, user = _ticks(daemon) - ticks, _ticks(daemon, user_only=True) - user
        started = now["sessions"]["started"] - status["sessions"]["started"] or 1
        per_session = 1e6 / hz / started
        figures |= {"sessions": started, "frames_per_session": (now["frames"]["in"] - status["frames"]["in"]) / started,
                    "balancer_cpu_us_per_session": ticks * per_session,
                    "balancer_user_us_per_session": user * per_session}  # fmt: skip
    return figures


TURN_PATHS = ("mplslb", "haproxy", "direct")


def warm_up(lab: Any, url: str, modes: tuple[str, ...]) -> None:
    """One second of wrk -c16 to ``url`` in each of ``modes``, not measured."""
    for mode in modes:
        header, after = wrk_args(mode, 16)
        run_wrk(lab, 0, url, seconds=1, connections=16, header=header, after=after)


def reference_lab(key: str, prefix: str, servers: int, **spec: Any) -> tuple[Any, dict[str, str]]:
    """One lab of variant ``key`` (one client, ``servers`` nginx servers; not yet up; ``spec``: more fields of its
    LabSpec) named ``prefix`` and this process's pid, and the URLs of the VIP and of HAProxy's frontend in it."""
    from mplslb.lab import VIP4, Lab, LabSpec

    fields = next(f for k, _, f in lab_variants() if k == key)
    name = f"{prefix}{os.getpid() % 10**5}"
    lab = Lab(LabSpec(name=name, clients=1, servers=servers, **fields, **spec), root=LAB_ROOT)
    return lab, {"mplslb": f"http://{VIP4}/", "haproxy": f"http://10.77.0.1:{HAPROXY_PORT}/"}


def in_turns(
    key: str, *, modes: tuple[str, ...] = ("close",), rounds: int, seconds: int,
    steering: tuple[str, ...] = ("none",), paths: tuple[str, ...] = TURN_PATHS, profile: bool = False,
    connects: bool = False, log: Any = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """wrk in each of ``modes`` at -c16 and -c64 through one lab variant and, on the same namespaces and nginx
    servers, through HAProxy and with no balancer (the daemon paused meanwhile): ``rounds`` rounds, each every
    steering of ``steering`` (STEERING) applied to every path alike, the paths in turns (their order reversed every
    other round; the daemon, once let go on, warmed up for a second before it is measured). With ``connects``, then
    one ``Connection: close`` run per path and count with the connects timed (:func:`connect_times`, mode
    "connect"). Every run (turn_run's figures, with its round, steering, path and mode)."""
    servers = 3
    lab, urls = reference_lab(key, "bc", servers)
    found: list[dict[str, Any]] = []
    haproxy: subprocess.Popen[bytes] | None = None
    paused = False
    try:
        lab.up()
        set_sysctls(lab, [lab.client_ns(0), lab.lb])
        wait_until(lambda: http_ok(lab, 0, urls["mplslb"]), 30, "the VIP to answer through the balancer")
        procs = lab_processes(lab)
        daemon = lab.state.pids["balancer"]
        if "haproxy" in paths:
            haproxy = start_haproxy(lab, servers)
            wait_until(lambda: http_ok(lab, 0, urls["haproxy"]), 15, "HAProxy to answer")
            procs["haproxy"] = [haproxy.pid, *_children(haproxy.pid)]
        if "direct" in paths:
            urls["direct"] = route_direct(lab)
            wait_until(lambda: http_ok(lab, 0, urls["direct"]), 15, "the server to answer")
        ports = lab_ports(lab)
        found.append(idle_cpu(procs, IDLE_SECONDS))
        for path in paths:  # warm-up: sessions, caches, server workers
            warm_up(lab, urls[path], modes)
        for round_ in range(rounds):
            for steer in steering:
                set_steering(lab, steer, ports, [daemon, *procs.get("haproxy", [])])
                for path in paths if round_ % 2 == 0 else paths[::-1]:
                    if path != "mplslb" and not paused:
                        os.kill(daemon, signal.SIGSTOP)  # the references run with the balancer paused
                        paused = True
                    elif path == "mplslb" and paused:
                        os.kill(daemon, signal.SIGCONT)
                        paused = False
                        warm_up(lab, urls[path], modes)  # what it missed meanwhile (timers, counters) done first
                    for mode in modes:
                        for conns in (16, 64):
                            figures = turn_run(lab, urls[path], mode=mode, seconds=seconds, connections=conns,
                                               procs=procs, daemon=daemon if path == "mplslb" else None)  # fmt: skip
                            log(f"e2e {mode} {key} round {round_} {steer} {path} -c{conns}: "
                                f"{figures.get('requests_per_s', 0):,.0f} requests/s, p99 "
                                f"{figures.get('p99_ms', 0):.1f} ms; CPU us/request: machine "
                                f"{figures['machine_cpu_us_per_request']:.0f}, "
                                + ", ".join(f"{k[7:]} {v:.0f}" for k, v in sorted(figures.items(),
                                                                                  key=lambda kv: -kv[1])
                                            if k.startswith("cpu_us_") and v >= 1)
                                + f"; CPUs busy {_shares(figures)}")  # fmt: skip
                            found.append({"round": round_, "steering": steer, "path": path, "mode": mode} | figures)
                if paused:
                    os.kill(daemon, signal.SIGCONT)
                    paused = False
        set_steering(lab, "none", ports, [daemon])
        for path in paths if connects else ():
            if path != "mplslb" and not paused:
                os.kill(daemon, signal.SIGSTOP)
                paused = True
            elif path == "mplslb" and paused:
                os.kill(daemon, signal.SIGCONT)
                paused = False
            if path == "mplslb":
                time.sleep(CONNECT_SETTLE)  # what a paused daemon missed (timers, polls) done before the warm-up
            warm_up(lab, urls[path], ("close",))
            for conns in (16, 64):
                figures = connect_times(lab, urls[path], seconds=seconds, connections=conns, procs=procs,
                                        daemon=daemon if path == "mplslb" else None)  # fmt: skip
                log(f"e2e connect {key} {path} -c{conns}: {figures.get('requests_per_s', 0):,.0f} requests/s, "
                    f"connect mean {figures['connect_mean_ms']:.3f} ms, p99.9 {figures['connect_p999_ms']:.2f} ms, "
                    f"{figures['connects_slow']:.0f} over {CONNECT_SLOW_MS:g} ms")  # fmt: skip
                found.append({"round": rounds, "steering": "none", "path": path, "mode": "connect"} | figures)
        if paused:
            os.kill(daemon, signal.SIGCONT)
            paused = False
        if profile:
            where = profile_lab(lab, urls["mplslb"], seconds=4, connections=64, header=wrk_args(modes[-1], 64)[0],
                                tag=f"-{modes[-1]}-{key}")  # fmt: skip
            log(f"e2e: profiles: {where}")
    finally:
        tear_down(lab, haproxy, paused=paused, log=log)
    return found


#: A connect that waited longer than this for its SYN-ACK counts as slow in :func:`connect_times` (the kernel's
#: path answers in tens of microseconds; a SYN that went up to the daemon waits for its loop).
CONNECT_SLOW_MS = 2.0
#: Seconds a daemon let go on after the references is left alone before its connects are timed: the timers and
#: polls of the sessions it stopped among take its first second (in a run right after a pause, 44 SYNs in 50,000
#: found no ticket and waited up to 198 ms).
CONNECT_SETTLE = 2.0
#: The capture filter of :func:`connect_times`: a SYN or SYN-ACK, labelled or not.
SYN_FILTER = "tcp[13] & 2 != 0 or (mpls and tcp[13] & 2 != 0)"


def connect_times(
    lab: Any, url: str, *, seconds: int, connections: int, procs: dict[str, list[int]], daemon: int | None
) -> dict[str, float]:
    """One wrk ``Connection: close`` run (:func:`turn_run`) with the client's SYNs and SYN-ACKs captured on its port
    (dumpcap, a kernel filter on the SYN flag, read back with tshark): how long each connect waited for its SYN-ACK
    at the client (wrk's latency starts once it is connected, so its p50 and p99 leave this out), in ms: mean, p50,
    p99, p99.9, the longest; how many waited over :data:`CONNECT_SLOW_MS` and the share of the connections' time
    they spent waiting; SYNs sent again, and SYNs never answered. With ``daemon``: the SYNs the program passed up to
    it in the run, for lack of a ticket and as a live session's."""
    where = Path(tempfile.mkdtemp(prefix="mplslb-connect-"))
    pcap = where / "syns.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", lab.client_ns(0), "dumpcap", "-q", "-i", "eth0", "-s", "128",
                            "-w", str(pcap), "-f", SYN_FILTER], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not pcap.exists() and time.monotonic() < deadline:  # dumpcap writes the file's header once capturing
            time.sleep(0.05)
        time.sleep(0.2)
        before = lab.status()["status"]["offload"].get("ticket_syns", {}) if daemon else {}
        figures = turn_run(lab, url, mode="close", seconds=seconds, connections=connections, procs=procs,
                           daemon=daemon)  # fmt: skip
        after = lab.status()["status"]["offload"].get("ticket_syns", {}) if daemon else {}
        time.sleep(0.2)
    finally:
        cap.send_signal(signal.SIGINT)
        try:
            cap.wait(10)
        except subprocess.TimeoutExpired:
            cap.kill()
            cap.wait(10)
    try:
        out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.time_epoch", "-e", "tcp.srcport",
                              "-e", "tcp.dstport", "-e", "tcp.flags.ack", "-e", "tcp.seq_raw"],
                             capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    finally:
        shutil.rmtree(where, ignore_errors=True)
    sent: dict[tuple[str, str], tuple[float, str]] = {}
    waits: list[float] = []
    again = 0
    for line in out.splitlines():
        at, sport, dport, ack, seq = line.split("\t")
        if ack in ("0", "False"):  # the client's SYN
            if sent.get((sport, dport), (0.0, ""))[1] == seq:
                again += 1
            else:
                sent[(sport, dport)] = (float(at), seq)
        elif (dport, sport) in sent:
            waits.append(float(at) - sent.pop((dport, sport))[0])
    ms = sorted(w * 1e3 for w in waits) or [0.0]
    slow = [w for w in ms if w > CONNECT_SLOW_MS]
    spent = connections * seconds * 1e3
    out_figures = {"connects": float(len(waits)), "connect_mean_ms": statistics.fmean(ms),
                   "connect_p50_ms": ms[len(ms) // 2], "connect_p99_ms": ms[min(len(ms) - 1, len(ms) * 99 // 100)],
                   "connect_p999_ms": ms[min(len(ms) - 1, len(ms) * 999 // 1000)], "connect_max_ms": ms[-1],
                   "connects_slow": float(len(slow)), "connect_slow_share": sum(slow) / spent,
                   "syns_sent_again": float(again), "syns_unanswered": float(len(sent))}  # fmt: skip
    for name in ("syn_flow_live", "syn_no_ticket"):
        if name in after:
            out_figures[f"{name}_up"] = float(after[name] - before.get(name, 0))
    return figures | out_figures


def connect_rows(runs: list[dict[str, Any]], what: str, seconds: int, cmd: str) -> list[Row]:
    """The connect-time runs' rows (:func:`in_turns` with ``connects``): mplslb's mean wait for a SYN-ACK against
    HAProxy's, with the tail and the slow connects' share in the note."""
    medians = {(m["path"], m["connections"]): m for m in turn_medians(runs) if m["mode"] == "connect"}
    rows: list[Row] = []
    for conns in (16, 64):
        mine, hp, direct = (medians.get((path, conns)) for path in TURN_PATHS)
        if mine is None or hp is None:
            continue

        def tail(m: dict[str, Any]) -> str:
            return (f"p50/p99/p99.9/max {m.get('connect_p50_ms', 0):.3f}/{m.get('connect_p99_ms', 0):.3f}/"
                    f"{m.get('connect_p999_ms', 0):.2f}/{m.get('connect_max_ms', 0):.1f} ms, "
                    f"{m.get('connects_slow', 0):.0f} over {CONNECT_SLOW_MS:g} ms ("
                    f"{m.get('connect_slow_share', 0):.1%} of the connections' time)")  # fmt: skip

        note = (f"wrk -t1 -c{conns} -d{seconds}s -H 'Connection: close', the client's SYNs and SYN-ACKs captured, "
                f"{mine['runs']} run(s) each: mplslb {tail(mine)}, SYNs up to the daemon "
                f"{mine.get('syn_no_ticket_up', 0):.0f} without a ticket and {mine.get('syn_flow_live_up', 0):.0f} "
                f"as a live flow's, {mine.get('requests_per_s', 0):,.0f} requests/s; HAProxy {tail(hp)}, "
                f"{hp.get('requests_per_s', 0):,.0f} requests/s"
                + (f"; no balancer {tail(direct)}" if direct else ""))  # fmt: skip
        per_path = [r for r in runs if r["connections"] == conns and r["mode"] == "connect"]
        rows.append(Row("e2e", f"e2e close -c{conns} connect time (SYN to SYN-ACK at the client), mean, {what}, "
                        "in turns in one lab", mine.get("connect_mean_ms"), "ms", "same through HAProxy",
                        hp.get("connect_mean_ms"), target="-", note=note, command=cmd,
                        extra={"runs": per_path}))  # fmt: skip
    return rows


#: Seconds the lab's processes are watched with no traffic at all (every balancer up, none paused).
IDLE_SECONDS = 5.0


def idle_cpu(procs: dict[str, list[int]], seconds: float) -> dict[str, Any]:
    """Each process's CPU over ``seconds`` of no traffic, in % of a core: a record of path and mode "idle"."""
    hz = os.sysconf("SC_CLK_TCK")
    before = cpu_snapshot(procs)
    time.sleep(seconds)
    after = cpu_snapshot(procs)
    shares = {f"idle_cpu_pct_{k}": (after[k] - before.get(k, 0)) / hz / seconds * 100 for k in after}
    return {"round": 0, "steering": "none", "path": "idle", "mode": "idle", "connections": 0, "seconds": seconds,
            **shares}  # fmt: skip


def idle_rows(runs: list[dict[str, Any]], what: str, cmd: str) -> list[Row]:
    """The balancer daemon's CPU with no traffic against HAProxy's, from :func:`idle_cpu`'s record in ``runs``."""
    idle = next((r for r in runs if r["mode"] == "idle"), None)
    if idle is None:
        return []
    pct = {k.removeprefix("idle_cpu_pct_"): v for k, v in idle.items() if k.startswith("idle_cpu_pct_")}
    agents = {k: v for k, v in pct.items() if k.startswith("agent")}
    note = (f"{idle['seconds']:.0f} s with no traffic, the lab up, HAProxy running beside it; the agents "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(agents.items())) + " % of a core")  # fmt: skip
    return [Row("e2e", f"e2e idle: the balancer daemon's CPU, {what}", round(pct.get("balancer", 0.0), 2),
                "% of a core", "HAProxy idle, same lab, same seconds", round(pct.get("haproxy", 0.0), 2),
                target="-", note=note, command=cmd, extra={"idle": idle})]  # fmt: skip


def turn_medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The median of every figure per steering, path, mode and connection count, in the order first run."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["steering"], r["path"], r["mode"], r["connections"]), []).append(r)
    return [{"steering": s, "path": p, "mode": m, "connections": c, "runs": len(got)}
            | {k: round(v, 3) for k, v in median_runs([{k: v for k, v in r.items() if isinstance(v, float)}
                                                      for r in got]).items()}
            for (s, p, m, c), got in groups.items()]  # fmt: skip


def tear_down(lab: Any, haproxy: subprocess.Popen[bytes] | None, *, paused: bool, log: Any) -> None:
    """Stop HAProxy, let a paused balancer daemon go on (so it can stop), take the lab down; say what it left."""
    if haproxy is not None:
        stop(haproxy)
    if paused:
        os.kill(lab.state.pids["balancer"], signal.SIGCONT)
    problems = lab.down()
    if problems:
        log(f"e2e: lab down: {problems}")


def bulk_only(
    key: str, *, rounds: int, seconds: float, log: Any = print
) -> dict[str, Any]:  # fmt: skip
    """Bulk transfer through one lab variant against HAProxy (TCP mode) and no balancer, on the same namespaces and
    nginx servers: ``rounds`` rounds, each 1 and 16 parallel downloads of the big file (cut at ``seconds``) through
    mplslb, then through HAProxy and straight to one server with the balancer paused. Every run and the medians."""
    servers = 3
    lab, urls = reference_lab(key, "bb", servers)
    runs: list[dict[str, Any]] = []
    haproxy: subprocess.Popen[bytes] | None = None
    paused = False
    try:
        lab.up()
        set_sysctls(lab, [lab.client_ns(0), lab.lb])
        make_bulk_files(lab, servers)
        wait_until(lambda: http_ok(lab, 0, urls["mplslb"]), 30, "the VIP to answer through the balancer")
        haproxy = start_haproxy(lab, servers)
        wait_until(lambda: http_ok(lab, 0, urls["haproxy"]), 15, "HAProxy to answer")
        urls["direct"] = route_direct(lab)
        wait_until(lambda: http_ok(lab, 0, urls["direct"]), 15, "the server to answer")
        procs = lab_processes(lab) | {"haproxy": [haproxy.pid, *_children(haproxy.pid)]}
        daemon = lab.state.pids["balancer"]
        for round_ in range(rounds):
            for what in ("mplslb", "haproxy", "direct"):
                if what != "mplslb" and not paused:
                    os.kill(daemon, signal.SIGSTOP)  # the references run with the balancer paused
                    paused = True
                for streams in (1, BULK_STREAMS):
                    figures = bulk(lab, urls[what], streams=streams, seconds=seconds, procs=procs)
                    runs.append({"round": round_, "path": what, "streams": streams} | figures)
                    log(f"e2e bulk {key} round {round_}: {what} x{streams}: {figures['mb_per_s']:,.1f} MB/s")
            os.kill(daemon, signal.SIGCONT)
            paused = False
        offload = lab.status()["status"].get("offload", {})
        log(f"e2e bulk: the offload's super-packet counters: {offload.get('gso')}")
    finally:
        tear_down(lab, haproxy, paused=paused, log=log)
    medians: dict[str, float] = {}
    cpu_per_gb: dict[str, float] = {}
    for what in ("mplslb", "haproxy", "direct"):
        for streams in (1, BULK_STREAMS):
            got = [r for r in runs if r["path"] == what and r["streams"] == streams]
            if got:
                medians[f"{what}_x{streams}"] = statistics.median(r["mb_per_s"] for r in got)
                cpu_per_gb[f"{what}_x{streams}"] = statistics.median(r["machine_cpu_s_per_gb"] for r in got)
    ratios = {f"x{n}": medians[f"mplslb_x{n}"] / medians[f"haproxy_x{n}"] for n in (1, BULK_STREAMS)
              if medians.get(f"haproxy_x{n}")}  # fmt: skip
    return {"variant": key, "rounds": rounds, "seconds": seconds, "medians_mb_per_s": medians,
            "medians_machine_cpu_s_per_gb": cpu_per_gb, "vs_haproxy": ratios, "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wrk via the mplslb agents and balancer vs HAProxy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the balancer daemon during one extra run")
    parser.add_argument("--close", action="store_true", help="only Connection: close, one variant and the references "
                        "on its namespaces, in turns")  # fmt: skip
    parser.add_argument("--keep-alive", action="store_true", help="only keep-alive, as --close (with it: both)")
    parser.add_argument("--paced", action="store_true", help="only keep-alive at a paced load (bench/paced.lua), as "
                        "--close (with it, --keep-alive: those too)")  # fmt: skip
    parser.add_argument("--variant", default="kernel+xdp", help="with --close, --keep-alive, --paced: the lab variant "
                        "(default kernel+xdp)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="with --close, --keep-alive, --paced or --bulk: rounds")
    parser.add_argument("--connects", action="store_true", help="with --close: then one run per path and count "
                        "with the client's connects timed from a capture")  # fmt: skip
    parser.add_argument("--bulk", action="store_true", help="only bulk transfer, one variant against the references")
    parser.add_argument("--bulk-seconds", type=float, default=8.0, help="with --bulk: each download's length (s)")
    parser.add_argument(
        "--steer",
        default="none",
        help=f"where the lab's receive work runs, one of {STEERING} "
        "(every path alike); with --close or --keep-alive a comma-separated list, interleaved in every round",
    )
    args = parser.parse_args(argv)
    steering = tuple(args.steer.split(","))
    modes = tuple(mode for mode, on in (("keep-alive", args.keep_alive), ("paced", args.paced), ("close", args.close))
                  if on)  # fmt: skip
    if not steering or set(steering) - set(STEERING) or (len(steering) > 1 and not modes):
        parser.error(f"--steer: one of {STEERING} (with --close or --keep-alive, several separated by commas)")
    if args.bulk:
        reason = missing_requirements()
        if reason:
            print(f"skipped: {reason}", file=sys.stderr)
            return 1
        key = args.variant if args.variant != "kernel+xdp" else "kernel+xdp+gso"
        found = bulk_only(key, rounds=args.rounds, seconds=args.bulk_seconds, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(found, indent=1) if args.json else json.dumps({k: v for k, v in found.items() if k != "runs"}))
        return 0
    if modes:
        reason = missing_requirements()
        if reason:
            print(f"skipped: {reason}", file=sys.stderr)
            return 1
        runs = in_turns(args.variant, modes=modes, rounds=args.rounds, seconds=3, steering=steering,
                        profile=args.profile, connects=args.connects and args.close,
                        log=lambda m: print(m, file=sys.stderr))  # fmt: skip
        medians = turn_medians(runs)
        print(json.dumps({"runs": runs, "medians": medians}, indent=1) if args.json else "\n".join(map(str, medians)))
        return 0
    rows = run(args.quick, profile=args.profile, steering=steering[0], log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        for r in rows:
            print(r.benchmark, r.figure, r.unit, "|", r.reference, r.reference_figure, "|", r.skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
