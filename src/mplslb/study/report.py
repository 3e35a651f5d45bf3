"""The study's grid, figures and Markdown report (``mplslb study``).

Theory of operation
-------------------
A :class:`Scenario` names servers, an arrival process, pool events and the loads to run. For every scenario,
load and seed one task builds the workload once and runs every policy over it (common random numbers: the
policies see the same sessions and the same work), in a process pool. Each run is reduced to a few figures at
once (percentiles, utilisation, refusals), so little crosses between processes; figures over seeds are means
with 95 % confidence intervals. The pool-change consistency runs are frame-level (one per mplslb algorithm).

Everything is seeded: the same options give the same numbers, figures and report.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mplslb.balancing.algorithms import algorithm_names
from mplslb.study.consistency import CHANGES, HASH_BASELINES, PolicyConsistency, measure_consistency
from mplslb.study.metrics import mean_ci, summarize
from mplslb.study.queueing import (
    ORACLES,
    PoolEvent,
    ServerModel,
    Workload,
    onoff_workload,
    poisson_workload,
    policy_names,
    simulate,
    trace_workload,
    windowed_percentile,
)

__all__ = ["DEFAULT_TRACE", "SCENARIOS", "Scenario", "StudyOptions", "run_study"]

# The NASA-HTTP request log, read in place from the shared data folder beside the repository.
DEFAULT_TRACE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "traces" / "nasa_19950801.tsv"
FULL_LOADS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
SHORT_LOADS = (0.5, 0.8, 0.95)
ADMISSION_LOADS = (0.8, 0.9, 0.95, 1.0, 1.1)
ADMISSION_LIMIT = 6  # per-server live sessions: 2 workers busy and about 4 sessions waiting
HEADLINE = ("heterogeneous", 0.8)
NEW_ALGORITHM = "shortest_expected_delay"
SERIES_WINDOWS = 40


def _uniform(n: int) -> tuple[ServerModel, ...]:
    return tuple(ServerModel(f"s{i}") for i in range(n))


@dataclass(frozen=True)
class Scenario:
    """Servers, arrivals (``poisson``, ``onoff`` or ``trace``), pool events as (fraction of the run, action,
    server, new server, speed), the loads to run and a one-line description."""

    name: str
    title: str
    servers: tuple[ServerModel, ...]
    arrivals: str
    loads: tuple[float, ...]
    description: str
    events: tuple[tuple[float, str, str, ServerModel | None, float], ...] = ()
    series: bool = False  # also plot p99 over time (load 0.8, first seed)

    @property
    def capacity(self) -> float:
        """Work per second of the starting pool; loads are fractions of it."""
        return sum(s.capacity for s in self.servers)

    def pool_events(self, duration: float) -> tuple[PoolEvent, ...]:
        """The events at absolute times for a run whose arrivals last ``duration`` seconds."""
        return tuple(
            PoolEvent(frac * duration, action, server, model, speed)
            for frac, action, server, model, speed in self.events
        )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("homogeneous", "Homogeneous servers", _uniform(4), "poisson", FULL_LOADS,
             "4 identical servers (2 workers each), Poisson session arrivals, 1-3 requests per session."),
    Scenario("heterogeneous", "Heterogeneous capacity 1:2:4", (
        ServerModel("s1", 1.0, weight=1), ServerModel("s2", 2.0, weight=2), ServerModel("s4", 4.0, weight=4)),
        "poisson", FULL_LOADS,
        "3 servers of speed 1, 2 and 4, configured with weights 1, 2 and 4 (the operator knows the capacities)."),
    Scenario("slow_server", "One server 10x slower", (*_uniform(3), ServerModel("slow", 0.1)), "poisson", SHORT_LOADS,
             "4 servers, one 10x slower, all with weight 1 (a degraded server the configuration does not know of)."),
    Scenario("speed_change", "A server's speed changes mid-run", _uniform(4), "poisson", SHORT_LOADS,
             "4 identical servers; s0 drops to 1/4 speed for the middle third of the run, then recovers.",
             events=((1 / 3, "speed", "s0", None, 0.25), (2 / 3, "speed", "s0", None, 1.0)), series=True),
    Scenario("bursty", "Bursty arrivals (on/off)", _uniform(4), "onoff", SHORT_LOADS,
             "4 identical servers; arrivals alternate ON (2x the mean rate, mean 0.2 s) and OFF (0.5x, mean 0.4 s).",
             series=True),
    Scenario("trace", "NASA-HTTP request log replayed", _uniform(4), "trace", SHORT_LOADS,
             "4 identical servers; arrival times and response sizes of the NASA-HTTP log of 1 Aug 1995, time "
             "compressed to the load; a request's work is 20 % fixed plus 80 % in proportion to its bytes."),
    Scenario("pool_change", "Pool changes mid-run", _uniform(4), "poisson", SHORT_LOADS,
             "4 servers; at 20 % of the run s4 is added, at 40 % s1 is drained, at 60 % s1 is back up, at 80 % s2 "
             "fails (its sessions are interrupted).",
             events=((0.2, "add", "s4", ServerModel("s4"), 0.0), (0.4, "drain", "s1", None, 0.0),
                     (0.6, "up", "s1", None, 0.0), (0.8, "fail", "s2", None, 0.0)), series=True),
)  # fmt: skip


@dataclass(frozen=True)
class StudyOptions:
    """How big a study to run. :meth:`quick` is the test suite's size."""

    sessions: int = 10_000
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    loads: tuple[float, ...] | None = None  # None: each scenario's own
    consistency_sessions: int = 600
    jobs: int = 0  # 0: one per CPU
    trace: Path | None = DEFAULT_TRACE
    quick: bool = False

    @classmethod
    def quick_options(cls, trace: Path | None = DEFAULT_TRACE, jobs: int = 0) -> StudyOptions:
        """A small study (seconds): fewer sessions and seeds, two loads."""
        return cls(
            sessions=800, seeds=(1, 2), loads=(0.5, 0.8), consistency_sessions=100, jobs=jobs, trace=trace, quick=True
        )


@dataclass
class StudyResults:
    """Everything the figures and the report are drawn from."""

    options: StudyOptions
    scenarios: list[Scenario]
    skipped: dict[str, str]
    records: list[dict[str, Any]]
    admission: list[dict[str, Any]]
    consistency: list[PolicyConsistency]
    policies: list[str]
    wall: dict[str, float] = field(default_factory=dict)


# -- running ----------------------------------------------------------------------------------------------------


def _workload(scenario: Scenario, load: float, seed: int, options: StudyOptions) -> Workload:
    if scenario.arrivals == "trace":
        assert options.trace is not None
        return trace_workload(
            options.trace, load, scenario.capacity, seed, limit=options.sessions if options.quick else 0
        )
    if scenario.arrivals == "onoff":
        return onoff_workload(options.sessions, load, scenario.capacity, seed)
    return poisson_workload(options.sessions, load, scenario.capacity, seed)


def _run_task(args: tuple[Scenario, float, int, StudyOptions, list[str]]) -> list[dict[str, Any]]:
    """Every policy over one (scenario, load, seed): one record per policy."""
    scenario, load, seed, options, policies = args
    workload = _workload(scenario, load, seed, options)
    events = scenario.pool_events(workload.duration)
    out = []
    for policy in policies:
        result = simulate(scenario.servers, workload, policy, seed=seed, events=events)
        record: dict[str, Any] = {"scenario": scenario.name, "load": load, "seed": seed, "policy": policy}
        record.update(summarize(result.response, result.service))
        record["utilisation"] = result.utilisation
        record["interrupted"] = result.interrupted
        record["requests"] = int(result.response.size)
        if scenario.series and math.isclose(load, 0.8) and seed == options.seeds[0]:
            centres, values = windowed_percentile(result, SERIES_WINDOWS)
            record["series"] = (
                (centres / result.duration).tolist(),
                values.tolist(),
                [e.at / result.duration for e in events],
            )
        out.append(record)
    return out


def _run_admission(args: tuple[float, int, StudyOptions, str, int]) -> dict[str, Any]:
    load, seed, options, policy, limit = args
    servers = tuple(ServerModel(f"s{i}", max_sessions=limit) for i in range(4))
    workload = poisson_workload(options.sessions, load, sum(s.capacity for s in servers), seed)
    result = simulate(servers, workload, policy, seed=seed)
    record: dict[str, Any] = {"load": load, "seed": seed, "policy": policy, "limit": limit}
    record.update(summarize(result.response, result.service))
    record["refused"] = result.refused / result.sessions
    return record


def _run_consistency(args: tuple[str, int]) -> PolicyConsistency:
    policy, sessions = args
    return measure_consistency(policy, sessions=sessions)


def admission_policies() -> list[str]:
    """The policies of the admission-control figure (the new algorithm when it is registered)."""
    names = ["round_robin", "least_connections", "power_of_two"]
    return [*names, NEW_ALGORITHM] if NEW_ALGORITHM in algorithm_names() else names


def run_study(options: StudyOptions, log: Callable[[str], None] = print) -> StudyResults:
    """Run the whole grid (queue-level), the admission runs and the consistency runs (frame-level)."""
    policies = policy_names()
    scenarios: list[Scenario] = []
    skipped: dict[str, str] = {}
    for scenario in SCENARIOS:
        if scenario.arrivals == "trace" and (options.trace is None or not options.trace.is_file()):
            skipped[scenario.name] = f"the request log {options.trace} is not there; scenario skipped"
            log(f"study: {skipped[scenario.name]}")
            continue
        scenarios.append(scenario)
    tasks = [
        (scenario, load, seed, options, policies)
        for scenario in scenarios
        for load in (options.loads or scenario.loads)
        for seed in options.seeds
    ]
    admission_tasks = [
        (load, seed, options, policy, limit)
        for load in (options.loads or ADMISSION_LOADS)
        for seed in options.seeds
        for policy in admission_policies()
        for limit in (0, ADMISSION_LIMIT)
    ]
    jobs = options.jobs or os.cpu_count() or 1
    wall: dict[str, float] = {}
    log(
        f"study: {len(tasks)} runs of {len(policies)} policies, {len(admission_tasks)} admission runs, "
        f"{len(algorithm_names())} frame-level pool-change runs, {jobs} processes"
    )
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as executor:
        consistency_futures = [
            executor.submit(_run_consistency, (name, options.consistency_sessions)) for name in algorithm_names()
        ]
        records: list[dict[str, Any]] = []
        for done, batch in enumerate(executor.map(_run_task, tasks), 1):
            records.extend(batch)
            if done % max(1, len(tasks) // 10) == 0:
                log(f"study: grid {done}/{len(tasks)} ({time.perf_counter() - started:.0f} s)")
        wall["grid"] = time.perf_counter() - started
        admission = list(executor.map(_run_admission, admission_tasks))
        consistency = [f.result() for f in consistency_futures]
    wall["total"] = time.perf_counter() - started
    log(f"study: simulations done in {wall['total']:.0f} s")
    return StudyResults(options, scenarios, skipped, records, admission, consistency, policies, wall)


# -- aggregation ------------------------------------------------------------------------------------------------


def aggregate(records: Iterable[dict[str, Any]], metric: str, **where: Any) -> tuple[float, float]:
    """Mean over seeds and 95 % CI half-width of ``metric`` among the records matching ``where``."""
    values = [r[metric] for r in records if all(_same(r[k], v) for k, v in where.items())]
    return mean_ci(values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return bool(a == b)


def _mplslb(policies: Sequence[str]) -> list[str]:
    return [p for p in policies if p not in ORACLES]


def best_mplslb(results: StudyResults, scenario: str, load: float, metric: str = "p99") -> tuple[str, float]:
    """The mplslb algorithm with the lowest mean ``metric`` in ``scenario`` at ``load``, and that value."""
    ranked = sorted(
        (aggregate(results.records, metric, scenario=scenario, load=load, policy=p)[0], p)
        for p in _mplslb(results.policies)
    )
    value, name = ranked[0]
    return name, value


# -- figures ----------------------------------------------------------------------------------------------------

_METRICS = (
    ("mean", "mean response time (ms)", 1e3),
    ("p50", "p50 response time (ms)", 1e3),
    ("p99", "p99 response time (ms)", 1e3),
    ("p999", "p99.9 response time (ms)", 1e3),
    ("slowdown_mean", "mean slowdown", 1.0),
    ("slowdown_p99", "p99 slowdown", 1.0),
)


def _style(policy: str, policies: Sequence[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    if policy == "oracle_jsq":
        return {"color": "black", "linestyle": "--", "marker": "s", "linewidth": 2}
    if policy == "oracle_lwl":
        return {"color": "dimgray", "linestyle": "-.", "marker": "D", "linewidth": 2}
    if policy == "random":
        return {"color": "darkgray", "linestyle": ":", "marker": "x"}
    own = _mplslb(policies)
    cmap = plt.get_cmap("tab10")
    style: dict[str, Any] = {"color": cmap(own.index(policy) % 10), "marker": "o", "markersize": 4}
    if policy == NEW_ALGORITHM:
        style.update(linewidth=2.5, marker="*", markersize=9)
    return style


def _log_y(ax: Any) -> None:
    """A log y axis with labels on the decades only (labelled minor ticks make drawing many times slower)."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, out: Path, name: str) -> list[str]:
    """Write ``name``.png and ``name``.svg; returns the file names."""
    fig.savefig(out / f"{name}.png", dpi=72)
    fig.savefig(out / f"{name}.svg")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [f"{name}.png", f"{name}.svg"]


def _loads_of(results: StudyResults, scenario: Scenario) -> list[float]:
    return sorted({r["load"] for r in results.records if r["scenario"] == scenario.name})


def plot_scenario(results: StudyResults, scenario: Scenario, out: Path) -> list[str]:
    """The six latency panels of one scenario: every policy against load, with 95 % CIs over seeds."""
    import matplotlib.pyplot as plt

    loads = _loads_of(results, scenario)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (metric, label, scale) in zip(axes.flat, _METRICS, strict=True):
        for policy in results.policies:
            stats = [aggregate(results.records, metric, scenario=scenario.name, load=ld, policy=policy) for ld in loads]
            means = np.array([m for m, _ in stats]) * scale
            errs = np.array([h for _, h in stats]) * scale
            style = _style(policy, results.policies)
            ax.plot(loads, means, label=policy, **style)
            # A shaded band, not error bars: one artist per policy instead of one per point keeps drawing fast.
            ax.fill_between(loads, means - errs, means + errs, color=style["color"], alpha=0.15, linewidth=0)
        _log_y(ax)
        ax.set_xlabel("load (fraction of total capacity)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=9)
    fig.suptitle(f"{scenario.title}: response time and slowdown by policy and load (mean of seeds, 95 % CI)")
    fig.subplots_adjust(left=0.05, right=0.99, top=0.94, bottom=0.16, wspace=0.22, hspace=0.25)
    return _save(fig, out, f"latency_{scenario.name}")


def plot_summary(results: StudyResults, out: Path, load: float) -> list[str]:
    """p99 at ``load`` of every policy in every scenario, relative to the JSQ oracle."""
    import matplotlib.pyplot as plt

    names = [s.name for s in results.scenarios if any(_same(ld, load) for ld in _loads_of(results, s))]
    policies = results.policies
    fig, ax = plt.subplots(figsize=(14, 5.5))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        ratios = []
        for name in names:
            jsq = aggregate(results.records, "p99", scenario=name, load=load, policy="oracle_jsq")[0]
            value = aggregate(results.records, "p99", scenario=name, load=load, policy=policy)[0]
            ratios.append(value / jsq)
        style = _style(policy, policies)
        ax.bar(np.arange(len(names)) + i * width, ratios, width, label=policy, color=style["color"])
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(1.1, color="black", linewidth=0.8, linestyle=":")
    _log_y(ax)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_ylabel(f"p99 / p99 of oracle_jsq (load {load})")
    ax.set_title(f"p99 response time at load {load} relative to the JSQ oracle (dotted: +10 %)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(ncol=6, fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out, "summary_p99")


def plot_utilisation(results: StudyResults, out: Path, load: float) -> list[str]:
    """Per-server utilisation at ``load`` in the scenarios with unequal servers."""
    import matplotlib.pyplot as plt

    names = [n for n in ("heterogeneous", "slow_server", "homogeneous") if n in {s.name for s in results.scenarios}]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        recs = [r for r in results.records if r["scenario"] == name and _same(r["load"], load)]
        if not recs:
            continue
        servers = list(recs[0]["utilisation"])
        width = 0.8 / len(servers)
        for j, server in enumerate(servers):
            vals = [mean_ci([r["utilisation"][server] for r in recs if r["policy"] == p])[0] for p in results.policies]
            ax.bar(np.arange(len(results.policies)) + j * width, vals, width, label=server)
        ax.set_xticks(np.arange(len(results.policies)) + 0.4 - width / 2, results.policies, rotation=60, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}, load {load}")
        ax.set_ylabel("utilisation (busy worker time / run time)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, "utilisation")


def plot_admission(results: StudyResults, out: Path) -> list[str]:
    """Sessions refused with a per-server session limit, and the p99 of the admitted ones, against load."""
    import matplotlib.pyplot as plt

    recs = results.admission
    loads = sorted({r["load"] for r in recs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for policy in admission_policies():
        style = _style(policy, results.policies)
        color = style["color"]
        refused = [aggregate(recs, "refused", policy=policy, limit=ADMISSION_LIMIT, load=ld) for ld in loads]
        ax1.errorbar(loads, [100 * m for m, _ in refused], yerr=[100 * h for _, h in refused], color=color,
                     marker="o", capsize=2, label=policy)  # fmt: skip
        for limit, ls in ((0, ":"), (ADMISSION_LIMIT, "-")):
            p99 = [aggregate(recs, "p99", policy=policy, limit=limit, load=ld) for ld in loads]
            label = f"{policy}, " + (f"limit {limit}" if limit else "no limit")
            ax2.errorbar(loads, [1e3 * m for m, _ in p99], yerr=[1e3 * h for _, h in p99], color=color, linestyle=ls,
                         marker="o", capsize=2, label=label)  # fmt: skip
    ax1.set_xlabel("offered load")
    ax1.set_ylabel("sessions refused (%)")
    ax1.set_title(f"Refused with max_sessions = {ADMISSION_LIMIT} per server")
    ax2.set_xlabel("offered load")
    ax2.set_ylabel("p99 response time of admitted sessions (ms)")
    _log_y(ax2)
    ax2.set_title("p99 of the admitted sessions, with and without the limit")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "admission")


def plot_consistency(results: StudyResults, out: Path) -> list[str]:
    """Per pool change: sessions kept on their server by each mplslb algorithm (frame level) and by hash-only
    balancers."""
    import matplotlib.pyplot as plt

    changes = [c[1] for c in CHANGES]
    series: list[tuple[str, list[float], Any]] = []
    for pc in results.consistency:
        series.append((pc.policy, [100 * c.fraction for c in pc.changes], None))
    for name in HASH_BASELINES:
        vals = []
        for k in range(len(changes)):
            broken = sum(pc.changes[k].hash_broken[name] for pc in results.consistency)
            counted = sum(pc.changes[k].hash_counted[name] for pc in results.consistency)
            vals.append(100 * (1 - broken / counted) if counted else 100.0)
        series.append((f"hash only: {name}", vals, "black" if name == "maglev" else "gray"))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(series)
    for i, (label, vals, color) in enumerate(series):
        kwargs: dict[str, Any] = {"label": label}
        if color is not None:
            kwargs.update(color=color, hatch="//")
        ax.bar(np.arange(len(changes)) + i * width, vals, width, **kwargs)
    ax.set_xticks(np.arange(len(changes)) + 0.4 - width / 2, [f"server {c}" for c in changes])
    ax.set_ylabel("established sessions that kept their server (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Through each pool change: mplslb (session labels, frame-level simulation) vs hash-only balancers")
    ax.legend(ncol=4, fontsize=8, loc="lower left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, "consistency")


def plot_series(results: StudyResults, out: Path) -> list[str]:
    """p99 over time (windows of the run) at load 0.8, first seed, in the scenarios that change during the run."""
    import matplotlib.pyplot as plt

    names = [s.name for s in results.scenarios if s.series]
    names = [n for n in names if any("series" in r for r in results.records if r["scenario"] == n)]
    if not names:
        return []
    shown = [p for p in results.policies if p in ("least_connections", "response_time", "power_of_two",
                                                  "round_robin", NEW_ALGORITHM, *ORACLES)]  # fmt: skip
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in results.records:
            if r["scenario"] == name and "series" in r and r["policy"] in shown:
                x, y, marks = r["series"]
                ax.plot(x, np.array(y) * 1e3, label=r["policy"], **_style(r["policy"], results.policies))
        for m in marks:
            ax.axvline(m, color="red", alpha=0.4)
        _log_y(ax)
        ax.set_xlabel("time (fraction of the run); red: events")
        ax.set_ylabel("p99 response time in the window (ms)")
        ax.set_title(f"{name}, load 0.8")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "over_time")


def plot_new_algorithm(results: StudyResults, out: Path) -> list[str]:
    """The new algorithm against the algorithms it builds on and the oracles, p99 against load."""
    import matplotlib.pyplot as plt

    if NEW_ALGORITHM not in results.policies:
        return []
    names = [n for n in ("heterogeneous", "slow_server", "speed_change", "homogeneous")
             if n in {s.name for s in results.scenarios}]  # fmt: skip
    shown = ("weighted_least_connections", "least_connections", "response_time", NEW_ALGORITHM, "oracle_jsq",
             "oracle_lwl")  # fmt: skip
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        scenario = next(s for s in results.scenarios if s.name == name)
        loads = _loads_of(results, scenario)
        for policy in shown:
            stats = [aggregate(results.records, "p99", scenario=name, load=ld, policy=policy) for ld in loads]
            ax.errorbar(loads, [1e3 * m for m, _ in stats], yerr=[1e3 * h for _, h in stats], label=policy,
                        capsize=2, **_style(policy, results.policies))  # fmt: skip
        _log_y(ax)
        ax.set_xlabel("load")
        ax.set_ylabel("p99 response time (ms)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "new_algorithm")


def _figure_job(args: tuple[str, StudyResults, Path, tuple[Any, ...]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "mplslb-study"  # the same SVG bytes on every run
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: smaller files
    name, results, out, extra = args
    fn: Callable[..., list[str]] = globals()[name]
    return fn(results, *extra, out) if name == "plot_scenario" else fn(results, out, *extra)


def make_figures(results: StudyResults, out: Path, jobs: int = 0) -> list[str]:
    """Every figure of the study into ``out`` (drawn in ``jobs`` processes); returns the file names written."""
    out.mkdir(parents=True, exist_ok=True)
    load = 0.8 if any(_same(r["load"], 0.8) for r in results.records) else results.records[0]["load"]
    work: list[tuple[str, StudyResults, Path, tuple[Any, ...]]] = [
        ("plot_scenario", results, out, (scenario,)) for scenario in results.scenarios
    ]
    work += [("plot_summary", results, out, (load,)), ("plot_utilisation", results, out, (load,))]
    work += [(name, results, out, ()) for name in ("plot_admission", "plot_consistency", "plot_series")]
    work.append(("plot_new_algorithm", results, out, ()))
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as executor:
        return [f for files in executor.map(_figure_job, work) for f in files]
