"""The study's Markdown report: tables and one paragraph per scenario, written from the run's own numbers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mplslb.balancing.algorithms import algorithm_names
from mplslb.study.consistency import CHANGES, HASH_BASELINES
from mplslb.study.queueing import ORACLES, RTT, SIZE_MEAN
from mplslb.study.report import (
    ADMISSION_LIMIT,
    HEADLINE,
    NEW_ALGORITHM,
    Scenario,
    StudyOptions,
    StudyResults,
    _loads_of,
    _mplslb,
    _same,
    admission_policies,
    aggregate,
    best_mplslb,
    make_figures,
    run_study,
)

__all__ = ["consistency_ok", "write_report", "write_study"]


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1e3:.0f}" if value >= 0.1 else f"{value * 1e3:.1f}"


def _cell(results: StudyResults, metric: str, **where: Any) -> str:
    mean, half = aggregate(results.records, metric, **where)
    if math.isnan(mean):
        return "-"
    return f"{_ms(mean)} ± {_ms(half)}"


def _p99(results: StudyResults, scenario: str, load: float, policy: str) -> float:
    return aggregate(results.records, "p99", scenario=scenario, load=load, policy=policy)[0]


def _util(results: StudyResults, scenario: str, load: float, policy: str) -> dict[str, float]:
    recs = [
        r for r in results.records if r["scenario"] == scenario and _same(r["load"], load) and r["policy"] == policy
    ]
    if not recs:
        return {}
    return {s: sum(r["utilisation"][s] for r in recs) / len(recs) for s in recs[0]["utilisation"]}


def _headline_load(results: StudyResults, scenario: Scenario) -> float:
    loads = _loads_of(results, scenario)
    return 0.8 if any(_same(ld, 0.8) for ld in loads) else loads[-1]


def _facts(results: StudyResults, scenario: Scenario) -> str:
    """The sentence every scenario paragraph starts with: best, oracles, worst, at the headline load."""
    name = scenario.name
    load = _headline_load(results, scenario)
    best, best_v = best_mplslb(results, name, load)
    jsq, lwl, rnd = (_p99(results, name, load, p) for p in ORACLES)
    own = _mplslb(results.policies)
    worst_v, worst = max((_p99(results, name, load, p), p) for p in own)
    top = _loads_of(results, scenario)[-1]
    best_top, best_top_v = best_mplslb(results, name, top)
    jsq_top = _p99(results, name, top, "oracle_jsq")
    return (
        f"At load {load}, the lowest p99 among mplslb's algorithms is `{best}`'s, {_ms(best_v)} ms, against "
        f"{_ms(jsq)} ms for the JSQ oracle ({best_v / jsq:.2f}x) and {_ms(lwl)} ms for the least-work-left oracle "
        f"({best_v / lwl:.2f}x); random gets {_ms(rnd)} ms and the worst mplslb algorithm, `{worst}`, "
        f"{_ms(worst_v)} ms. At load {top} the best is `{best_top}` with {_ms(best_top_v)} ms "
        f"({best_top_v / jsq_top:.2f}x JSQ)."
    )


def _overloaded(results: StudyResults, scenario: str, load: float) -> list[str]:
    """Policies whose p99 is over 10x the JSQ oracle's: they left some server overloaded."""
    jsq = _p99(results, scenario, load, "oracle_jsq")
    return [p for p in results.policies if _p99(results, scenario, load, p) > 10 * jsq]


def _explain(results: StudyResults, scenario: Scenario) -> str:
    """What the scenario's figure shows beyond the numbers: the reasons, from the run's own figures."""
    name = scenario.name
    load = _headline_load(results, scenario)
    over = _overloaded(results, name, load)
    over_txt = ", ".join(f"`{p}`" for p in over) if over else "none"
    rt = _p99(results, name, load, "response_time")
    lc = _p99(results, name, load, "least_connections")
    new = _p99(results, name, load, NEW_ALGORITHM) if NEW_ALGORITHM in results.policies else math.nan
    if name == "homogeneous":
        return (
            f"With identical servers, counting sessions is all it takes: `least_connections` and "
            f"`weighted_least_connections` (the same choice here) are at "
            f"{lc / _p99(results, name, load, 'oracle_jsq'):.2f}x "
            f"the oracle, because a session's requests are what occupies a server and the balancer sees every session "
            f"start and end. Policies that ignore load (round robin, the hashes, random) pay for the variance of the "
            f"work: p99 {_ms(_p99(results, name, load, 'round_robin'))} ms for `round_robin`, "
            f"{_ms(_p99(results, name, load, 'maglev'))} ms for `maglev`. `response_time` ({_ms(rt)} ms) is worse than "
            f"least connections: its estimate mixes SYN to SYN-ACK samples (a server round trip, "
            "0.1 ms here) with request to first byte samples in one average, so a server that "
            f"has just taken many sessions looks fast and takes more."
        )
    if name == "heterogeneous":
        u = _util(results, name, load, "round_robin")
        return (
            f"Policies blind to capacity send a third of the sessions to the speed-1 server, which cannot take "
            f"them (utilisation of s1 under `round_robin`: {u.get('s1', math.nan):.2f}): p99 grows without bound "
            f"(over 10x the oracle: {over_txt}). The weighted algorithms use the configured weights; JSQ is not "
            f"the bound here, since it counts requests and not speed: least-work-left, which knows speeds and queued "
            f"work, is lower still."
        )
    if name == "slow_server":
        u = _util(results, name, load, "least_connections")
        return (
            f"The configuration says nothing of the slow server, so only what the balancer measures can reveal it. "
            f"Counting sessions does not: `least_connections` keeps the slow server busy (utilisation "
            f"{u.get('slow', math.nan):.2f}) and its p99 ({_ms(lc)} ms) is set by the requests served there, like "
            f"the JSQ oracle's. Response time measurement does reveal it: `response_time` gets {_ms(rt)} ms"
            + (f", `{NEW_ALGORITHM}` {_ms(new)} ms" if not math.isnan(new) else "")
            + f". Blind policies overload it (over 10x JSQ: {over_txt})."
        )
    if name == "speed_change":
        return (
            "s0 serves at a quarter of its speed in the middle third of the run; the loads are fractions of the "
            "capacity before the change, so at 0.95 the pool is overloaded while it lasts and every policy's queue "
            "grows. The p99-over-time figure (below) shows how quickly each policy moves sessions away from s0 "
            f"when it slows down and back when it recovers. Over 10x JSQ at load {load}: {over_txt}."
        )
    if name == "bursty":
        return (
            "ON periods at twice the mean rate push the pool above its capacity for a while at load 0.8 and up; "
            "queues build in every policy and the percentiles are set by the bursts more than by the policy. "
            "Load-aware policies still keep the queues even during a burst, which round robin and the hashes do "
            "not."
        )
    if name == "trace":
        return (
            "The log's response sizes are heavy tailed (a few requests carry far more bytes than the mean) and its "
            "arrivals follow the day's traffic, so short stretches run above the mean load; a request that lands "
            "behind a large one waits, which is why p99 is well above the Poisson scenarios' at the same mean "
            "load. Each log line is a one-request session from its host, so the hash policies (keyed on client) "
            "are uneven where a few hosts send many requests."
        )
    if name == "pool_change":
        return (
            "Adding s4 at 20 % gives the pool more room; draining s1 at 40 % takes it away for new sessions "
            "(its sessions finish there); s1 is back at 60 %; s2 fails at 80 % and its sessions are "
            "interrupted (not counted in the latencies). The load-aware policies fill the new server at once; the "
            "hashes need the pool change to move keys, and round robin's share of the new server is its 1/N."
        )
    return ""


def _scenario_table(results: StudyResults, scenario: Scenario) -> list[str]:
    loads = _loads_of(results, scenario)
    lines = [
        "| policy | " + " | ".join(f"p99 @ {ld}" for ld in loads) + " |",
        "| --- | " + " | ".join("---:" for _ in loads) + " |",
    ]
    for policy in results.policies:
        cells = [_cell(results, "p99", scenario=scenario.name, load=ld, policy=policy) for ld in loads]
        lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
    load = _headline_load(results, scenario)
    lines += [
        "",
        f"At load {load}: mean, p50, p99.9 (ms) and slowdown (mean, p99):",
        "",
        "| policy | mean | p50 | p99.9 | slowdown mean | slowdown p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy in results.policies:
        where = {"scenario": scenario.name, "load": load, "policy": policy}
        sd_mean = aggregate(results.records, "slowdown_mean", **where)[0]
        sd_p99 = aggregate(results.records, "slowdown_p99", **where)[0]
        lines.append(
            f"| `{policy}` | {_cell(results, 'mean', **where)} | {_cell(results, 'p50', **where)} | "
            f"{_cell(results, 'p999', **where)} | {sd_mean:.1f} | {sd_p99:.1f} |"
        )
    return lines


def consistency_ok(results: StudyResults) -> bool:
    """True when every algorithm kept every counted session on its server through every change."""
    return all(c.kept == c.counted for pc in results.consistency for c in pc.changes)


def _consistency_section(results: StudyResults) -> list[str]:
    changes = [c[1] for c in CHANGES]
    lines = [
        "| policy | " + " | ".join(f"server {c}" for c in changes) + " |",
        "| --- | " + " | ".join("---:" for _ in changes) + " |",
    ]
    for pc in results.consistency:
        cells = [f"{c.kept}/{c.counted} ({100 * c.fraction:.0f} %)" for c in pc.changes]
        lines.append(f"| `{pc.policy}` (mplslb, labels) | " + " | ".join(cells) + " |")
    for name in HASH_BASELINES:
        cells = []
        for k in range(len(changes)):
            broken = sum(pc.changes[k].hash_broken[name] for pc in results.consistency)
            counted = sum(pc.changes[k].hash_counted[name] for pc in results.consistency)
            kept = counted - broken
            cells.append(f"{kept}/{counted} ({100 * kept / counted:.0f} %)" if counted else "-")
        lines.append(f"| hash only, `{name}` per packet | " + " | ".join(cells) + " |")
    return lines


def _admission_section(results: StudyResults) -> list[str]:
    recs = results.admission
    loads = sorted({r["load"] for r in recs})
    lines = [
        "| policy | " + " | ".join(f"@ {ld}: refused / p99 limit / p99 none" for ld in loads) + " |",
        "| --- | " + " | ".join("---:" for _ in loads) + " |",
    ]
    for policy in admission_policies():
        cells = []
        for ld in loads:
            refused = aggregate(recs, "refused", policy=policy, limit=ADMISSION_LIMIT, load=ld)[0]
            with_limit = aggregate(recs, "p99", policy=policy, limit=ADMISSION_LIMIT, load=ld)[0]
            without = aggregate(recs, "p99", policy=policy, limit=0, load=ld)[0]
            cells.append(f"{100 * refused:.1f} % / {_ms(with_limit)} / {_ms(without)}")
        lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
    return lines


def _headline(results: StudyResults) -> list[str]:
    scenario, load = HEADLINE
    if not any(r["scenario"] == scenario and _same(r["load"], load) for r in results.records):
        return ["(The headline scenario was not run.)"]
    jsq = _p99(results, scenario, load, "oracle_jsq")
    lwl = _p99(results, scenario, load, "oracle_lwl")
    best, best_v = best_mplslb(results, scenario, load)
    lines = [
        f"Heterogeneous servers (1:2:4) at load {load}: p99 of every policy and its ratio to the JSQ oracle.",
        "",
        "| policy | p99 (ms) | / oracle_jsq | / oracle_lwl |",
        "| --- | ---: | ---: | ---: |",
    ]
    for policy in results.policies:
        v = _p99(results, scenario, load, policy)
        lines.append(f"| `{policy}` | {_cell(results, 'p99', scenario=scenario, load=load, policy=policy)} | "
                     f"{v / jsq:.2f} | {v / lwl:.2f} |")  # fmt: skip
    verdict = "within" if best_v <= 1.1 * jsq else "not within"
    lines += [
        "",
        f"**The best mplslb algorithm here, `{best}`, has a p99 of {_ms(best_v)} ms: {best_v / jsq:.2f}x the JSQ "
        f"oracle's {_ms(jsq)} ms, {verdict} 10 %.** Against the least-work-left oracle ({_ms(lwl)} ms) the gap is "
        f"{100 * (best_v / lwl - 1):.0f} %: that oracle knows each queued request's work and each server's speed, "
        "which a balancer that only sees session starts, ends and response times does not: it sees how many "
        "sessions a server holds, not how much work they still bring.",
    ]
    return lines


def write_report(results: StudyResults, path: Path, figure_dir: str, files: Sequence[str]) -> None:
    """Write the Markdown report to ``path``; figures are linked as ``figure_dir``/name.png."""
    opts = results.options
    shown = set(files)

    def fig(name: str, alt: str) -> list[str]:
        if f"{name}.png" not in shown:
            return []
        return [f"![{alt}]({figure_dir}/{name}.png)", "", f"(SVG: [{name}.svg]({figure_dir}/{name}.svg))", ""]

    own = [p for p in results.policies if p not in ORACLES]
    lines = [
        "# How well does mplslb balance?",
        "",
        "Generated by `mplslb study`" + (" --quick" if opts.quick else "") + " (`make study`); every number below "
        "comes from that run. Seeds "
        f"{', '.join(map(str, opts.seeds))}; {opts.sessions} sessions per run (the request log: "
        + ("its first " + str(opts.sessions) if opts.quick else "all of it")
        + f"); the simulations took {results.wall.get('total', 0):.0f} s.",
        "",
        "## How it was measured",
        "",
        "* **Latency, slowdown, utilisation, admission (queue level).** `mplslb.study.queueing` drives mplslb's own "
        "objects: the `ServerPool` (weights, status, live session counts, the response-time EWMA), "
        "`AdmissionControl`, and each algorithm built by `make_algorithm`, called with a flow key for every new "
        "session as the balancer calls it. Frames are not simulated. A session is a TCP connection with 1 to 3 "
        f"requests (exponential work, mean {SIZE_MEAN * 1e3:.0f} ms on a speed-1 server) sent one after another, "
        f"each a client round trip ({RTT * 1e3:.1f} ms) after the previous response; it counts as active from its "
        "SYN to its FIN, as in the balancer, and the balancer's response-time samples are the ones the real "
        "balancer takes (SYN to SYN-ACK, and the first request to its first response byte). Servers have 2 FCFS "
        "workers. Response time is per request as the client sees it; slowdown is (wait + service) / service.",
        "* **Pool-change consistency (frame level).** The full simulator (`mplslb.sim`, the real `Balancer`, "
        "session table and labels, real frames) runs with four pool changes; which server each session's frames "
        "reached is read back from a capture of the server-side ports.",
        "* **Oracles and random** exist only in the simulator: `oracle_jsq` joins the server with the fewest "
        "requests queued or in service; `oracle_lwl` picks the server where the session's work would finish "
        "first, knowing every server's speed and the work queued there and still to come from its sessions; "
        "`random` picks uniformly. All policies see the same sessions and work for a given seed.",
        "* Loads are offered work over the starting pool's capacity. Figures show the mean over seeds with 95 % "
        "confidence intervals (Student t); percentiles are nearest-rank. A p99 that runs to seconds means the "
        "policy left a server overloaded: its queue grew for the whole run.",
        "",
        "Policies: "
        + ", ".join(f"`{p}`" for p in own)
        + " (mplslb), and "
        + ", ".join(f"`{p}`" for p in ORACLES)
        + ".",
        "",
    ]
    for name, reason in results.skipped.items():
        lines += [f"**Scenario `{name}` skipped:** {reason}.", ""]
    lines += ["## Headline", "", *_headline(results), ""]
    lines += fig("summary_p99", "p99 at load 0.8 relative to the JSQ oracle, every scenario")
    lines += [
        "The summary above puts every scenario side by side at load 0.8: each bar is a policy's p99 over the "
        "JSQ oracle's (1 = as good as JSQ; the dotted line is +10 %).",
        "",
    ]
    for scenario in results.scenarios:
        lines += [f"## {scenario.title}", "", scenario.description, ""]
        lines += fig(f"latency_{scenario.name}", f"{scenario.title}: latency by policy and load")
        lines += [_facts(results, scenario) + " " + _explain(results, scenario), ""]
        lines += [*_scenario_table(results, scenario), ""]
    lines += ["## Per-server utilisation", ""]
    lines += fig("utilisation", "per-server utilisation")
    lines += [
        "Busy worker time over run time, per server, at load 0.8 (queue level). With unequal servers the "
        "good policies do not equalise utilisation: they load the fast servers more, since a request waits "
        "less on a fast busy server than it is served on a slow idle one.",
        "",
    ]
    lines += ["## Admission control", ""]
    lines += fig("admission", "refusals and p99 of admitted sessions")
    lines += [
        f"Four identical servers, each with `max_sessions = {ADMISSION_LIMIT}` (queue level: the real "
        "`ServerPool` eligibility and `AdmissionControl`), against the same pool with no limit. Each cell: "
        "sessions refused / p99 of admitted sessions with the limit / p99 with no limit (ms).",
        "",
    ]
    lines += [*_admission_section(results), ""]
    lines += [*_admission_text(results), ""]
    lines += ["## Sessions through pool changes", ""]
    lines += fig("consistency", "sessions that kept their server through pool changes")
    lines += [
        "Frame level, one run per algorithm: a server added (web5 comes up), one drained (web2), one failed "
        "(web3: it stops answering and passive health takes it down), one removed (web4). Each cell counts the "
        "sessions that sent packets both before and after the change and were not on the failed or removed "
        "server (their server is gone), and how many of them had every packet reach one server. The hash-only "
        "rows run the same sessions' flow keys through mplslb's `maglev` and `source_hash` classes on the pool "
        "just before and just after the change, as a balancer without a session table would for every packet.",
        "",
    ]
    lines += [*_consistency_section(results), ""]
    ok = consistency_ok(results)
    lines += [
        ("**Every mplslb algorithm kept 100 % of the counted sessions on their server through every change**, "
         if ok else "**Some sessions changed server** (see the table), ")
        + "as the labels make it: after its first packet a session is switched on its label, whatever the pool "
        "does. " + _hash_text(results),
        "",
    ]  # fmt: skip
    lines += _series_section(results, fig)
    lines += _new_algorithm_section(results, fig)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def _hash_text(results: StudyResults) -> str:
    parts = []
    for k, (_, change, _) in enumerate(CHANGES):
        broken = sum(pc.changes[k].hash_broken["maglev"] for pc in results.consistency)
        counted = sum(pc.changes[k].hash_counted["maglev"] for pc in results.consistency)
        sbroken = sum(pc.changes[k].hash_broken["source_hash"] for pc in results.consistency)
        scounted = sum(pc.changes[k].hash_counted["source_hash"] for pc in results.consistency)
        if counted and scounted:
            parts.append(
                f"{change}: Maglev would have moved {100 * broken / counted:.0f} %, modulo hashing "
                f"{100 * sbroken / scounted:.0f} %"
            )
    return (
        "A hash-only balancer would have broken sessions on the other servers: " + "; ".join(parts) + ". Maglev "
        "moves few keys when a server leaves (its table keeps the other servers' slots) but about 1/N when one "
        "joins, and a drain is a removal for it, so the drained server's sessions move too; modulo hashing moves "
        "most keys on any change."
    )


def _admission_text(results: StudyResults) -> list[str]:
    recs = results.admission
    if not recs:
        return []
    loads = sorted({r["load"] for r in recs})
    top = loads[-1]
    policy = "least_connections"
    refused = aggregate(recs, "refused", policy=policy, limit=ADMISSION_LIMIT, load=top)[0]
    with_limit = aggregate(recs, "p99", policy=policy, limit=ADMISSION_LIMIT, load=top)[0]
    without = aggregate(recs, "p99", policy=policy, limit=0, load=top)[0]
    rr_refused = aggregate(recs, "refused", policy="round_robin", limit=ADMISSION_LIMIT, load=top)[0]
    rr_with = aggregate(recs, "p99", policy="round_robin", limit=ADMISSION_LIMIT, load=top)[0]
    rr_without = aggregate(recs, "p99", policy="round_robin", limit=0, load=top)[0]
    return [
        f"At load {top}, `least_connections` with the limit refuses {100 * refused:.1f} % of the sessions and "
        f"the admitted ones see a p99 of {_ms(with_limit)} ms, against {_ms(without)} ms with no limit; "
        f"`round_robin` refuses {100 * rr_refused:.1f} % and its p99 goes from {_ms(rr_without)} ms to "
        f"{_ms(rr_with)} ms (a full server is skipped, so the limit also turns round robin into a load-aware "
        "policy). The limit trades a few refused sessions for a bounded queue: the sessions let in never wait "
        "behind more than the limit allows, which is what claim 4's service acceptance control is for. Below "
        "saturation almost nothing is refused and the latencies are the same with or without the limit."
    ]


def _series_section(results: StudyResults, fig: Any) -> list[str]:
    block = fig("over_time", "p99 over time")
    if not block:
        return []
    return ["## Over time", "", *block,
            "p99 of the requests completed in each of 40 windows of one run (load 0.8, first seed), for the "
            "scenarios that change during the run; red lines mark the changes. In `speed_change`, policies "
            "that count sessions or measure response time move sessions off s0 while it is slow; in "
            "`pool_change` the failure of s2 at 80 % interrupts its sessions (not counted) and the load moves "
            "to the others.", ""]  # fmt: skip


def _new_algorithm_section(results: StudyResults, fig: Any) -> list[str]:
    if NEW_ALGORITHM not in algorithm_names() or NEW_ALGORITHM not in results.policies:
        return []
    lines = [f"## The new algorithm: `{NEW_ALGORITHM}`", ""]
    lines += fig("new_algorithm", "the new algorithm against the ones it builds on")
    rows = []
    for name in ("heterogeneous", "slow_server", "speed_change", "homogeneous", "bursty", "trace", "pool_change"):
        scenario = next((s for s in results.scenarios if s.name == name), None)
        if scenario is None:
            continue
        load = _headline_load(results, scenario)
        vals = {p: _p99(results, name, load, p) for p in
                ("weighted_least_connections", "response_time", NEW_ALGORITHM, "oracle_jsq", "oracle_lwl")}  # fmt: skip
        rows.append(f"| {name} @ {load} | " + " | ".join(_ms(v) for v in vals.values()) + " |")
    lines += [
        "| scenario | `weighted_least_connections` | `response_time` | "
        + f"`{NEW_ALGORITHM}`"
        + " | `oracle_jsq` | `oracle_lwl` |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    return lines


def write_study(options: StudyOptions, output: Path, log: Callable[[str], None] = print) -> StudyResults:
    """Run the study with ``options`` and write ``output``/study.md and its figures in ``output``/study/."""
    results = run_study(options, log)
    files = make_figures(results, output / "study", options.jobs)
    report = output / "study.md"
    write_report(results, report, "study", files)
    log(f"study: wrote {report} and {len(files)} figures in {output / 'study'}")
    return results
