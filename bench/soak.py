"""``make soak``: short sessions through the real lab for a while, the memory of every mplslb process watched.

The lab (:class:`mplslb.lab.Lab`: the balancer daemon, a client agent per client, a server agent and a stock nginx
per server) carries wrk's requests with ``Connection: close`` from every client at once, each request its own TCP
session (its own label pair), for ``--duration`` seconds. Every ``--sample`` seconds the resident set (``VmRSS`` of
``/proc/<pid>/status``) of the balancer and of each agent is read. Growth is measured after the warm-up (the first
20 % of the run): from the first sample after it to the last sample of the run; any process that grew more than
``--max-growth`` (5 %) fails the run (exit 1). After the load, the sessions must end: the balancer's live sessions
and labels in use go back to zero within a bound (the lab's timeouts plus margin). The lab is torn down always.

``python bench/soak.py [--duration 300] [--sample 5]`` (root, nginx, wrk, curl, nsenter).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mplslb.lab import Lab, LabSpec

ROOT = Path("/run/mplslb-soak")
WARM_UP = 0.2  # share of the run before growth is measured
SETTLE = 30.0  # seconds the sessions may take to end after the load, at most


EVENTS = ("event=server_", "event=refusing")  # what explains interrupted and refused sessions
MAX_EVENTS = 40


def missing_requirements() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, packet sockets)"
    for tool in ("nginx", "wrk", "curl", "nsenter"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (make debs installs it)"
    return ""


def rss_kib(pid: int) -> int | None:
    """The resident set of ``pid`` in KiB, None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Result:
    seconds: float
    processes: list[str]
    samples: list[tuple[float, dict[str, int | None]]] = field(default_factory=list)
    wrk: list[dict[str, float]] = field(default_factory=list)
    sessions_started: int = 0
    after: dict[str, Any] = field(default_factory=dict)
    settled_in: float | None = None
    events: list[str] = field(default_factory=list)  # the balancer's server status changes and refusals

    def growth(self) -> dict[str, tuple[int, int, int, float]]:
        """Per process: (RSS after the warm-up, peak after it, last, growth from the first to the last) in KiB."""
        out = {}
        measured = [(t, rss) for t, rss in self.samples if t >= WARM_UP * self.seconds]
        for name in self.processes:
            values = [rss[name] for _, rss in measured if rss.get(name) is not None]
            if len(values) < 2:
                continue
            first, last = values[0], values[-1]
            assert first is not None and last is not None
            out[name] = (first, max(v for v in values if v is not None), last, (last - first) / first)
        return out

    def lines(self, max_growth: float) -> list[str]:
        header = f"{'t (s)':>7} " + " ".join(f"{name:>12}" for name in self.processes)
        rows = [f"RSS in MiB of each process, every sample ({len(self.samples)}):", header]
        for t, rss in self.samples:
            cells = " ".join(f"{(rss.get(n) or 0) / 1024:>12.1f}" for n in self.processes)
            rows.append(f"{t:>7.1f} {cells}")
        requests = sum(w.get("requests", 0.0) for w in self.wrk)
        errors = sum(w.get("socket_errors", 0.0) + w.get("non_2xx", 0.0) for w in self.wrk)
        rows.append(
            f"load: {requests:,.0f} requests (each its own session) in {self.seconds:.0f} s = "
            f"{requests / self.seconds:,.0f}/s, wrk errors {errors:,.0f}; sessions started at the balancer "
            f"{self.sessions_started:,}"
        )
        rows.append(f"growth after the warm-up (first {WARM_UP:.0%}), first sample -> last (peak):")
        for name, (first, peak, last, growth) in self.growth().items():
            verdict = "FAIL" if growth > max_growth else "ok"
            rows.append(
                f"  {name:<12} {first / 1024:8.1f} -> {last / 1024:8.1f} MiB (peak {peak / 1024:.1f}) "
                f"{growth:+7.2%}  {verdict}"
            )
        sessions = self.after.get("sessions", {})
        labels = self.after.get("labels", {})
        settled = "never" if self.settled_in is None else f"{self.settled_in:.1f} s after the load"
        rows.append(
            f"after the load: {sessions.get('active')} live sessions, {labels.get('in_use')} labels in use "
            f"(zero {settled}); sessions ended {sessions.get('ended')}; refused {sessions.get('refused')}; "
            f"live by state {sessions.get('by_state')}"
        )
        if self.events:
            rows.append(f"the balancer's server changes and refusals ({len(self.events)} lines):")
            rows += [f"  {line}" for line in self.events[:MAX_EVENTS]]
        return rows


def soak(duration: float, *, sample: float = 5.0, connections: int = 8, name: str | None = None) -> Result:
    """Run the soak; the lab is always torn down."""
    lab = Lab(LabSpec(name=name or f"soak{os.getpid() % 100000}", clients=2, servers=3), root=ROOT)
    try:
        lab.up()
        pids = {key: pid for key, pid in lab.state.pids.items() if key == "balancer" or key.startswith("agent-")}
        result = Result(seconds=duration, processes=list(pids))
        seconds = max(1, round(duration))
        wrk: list[dict[str, float]] = []

        def load(client: int) -> None:
            wrk.append(lab.wrk(client, seconds=seconds, connections=connections, headers=("Connection: close",)))

        threads = [threading.Thread(target=load, args=(c,), daemon=True) for c in range(lab.spec.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < seconds:
            result.samples.append((elapsed, {key: rss_kib(pid) for key, pid in pids.items()}))
            time.sleep(min(sample, max(0.0, seconds - elapsed)))
        result.samples.append((time.monotonic() - started, {key: rss_kib(pid) for key, pid in pids.items()}))
        for thread in threads:
            thread.join(seconds + 60)
        result.wrk = wrk
        load_ended = time.monotonic()
        while time.monotonic() - load_ended < SETTLE:
            time.sleep(1.1)  # the daemon refreshes its status snapshot every second
            result.after = lab.status()["status"]
            if result.after["sessions"]["active"] == 0 and result.after["labels"]["in_use"] == 0:
                result.settled_in = time.monotonic() - load_ended
                break
        result.sessions_started = int(result.after.get("sessions", {}).get("started", 0))
        result.events = [line for line in lab.log("balancer").splitlines() if any(e in line for e in EVENTS)]
        return result
    finally:
        problems = lab.down()
        if problems:
            print(f"teardown: {problems}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between two RSS samples (default 5)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections per client (default 8)")
    parser.add_argument("--max-growth", type=float, default=0.05, help="RSS growth that fails the run (0.05)")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"soak: cannot run here: {missing}")
        return 1
    print(f"soak: {args.duration:.0f} s of short sessions through the lab, RSS sampled every {args.sample:.0f} s")
    result = soak(args.duration, sample=args.sample, connections=args.connections)
    print("\n".join(result.lines(args.max_growth)))
    grown = [name for name, (_, _, _, growth) in result.growth().items() if growth > args.max_growth]
    if grown:
        print(f"FAILED: grew more than {args.max_growth:.0%} after the warm-up: {', '.join(grown)}")
        return 1
    if result.settled_in is None:
        print(f"FAILED: sessions or labels still in use {SETTLE:.0f} s after the load")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
