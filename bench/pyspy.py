"""Profiles of the hot paths with py-spy (sampling, from outside the process), and their summaries.

``profile(target)`` runs ``bench/engine.py --profile-target TARGET`` under ``py-spy record --format raw`` (collapsed
stacks) and summarises the samples spent inside the workload loop: the functions and the source lines where the
time is spent (self time, where the sample's innermost Python frame is), and the inclusive share of each mplslb
function. When py-spy is missing or cannot attach, cProfile runs the same workload in process instead, and the
summary says so.
"""

from __future__ import annotations

import cProfile
import io
import linecache
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "profiles"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
TARGETS = {
    "single": "one-frame fast path (Balancer.receive on labelled 64 B frames)",
    "new": "new sessions (Balancer.receive on TCP SYNs of fresh flows)",
    "block": "block fast path (Balancer.receive_block, blocks of 4096 labelled 64 B frames)",
}
#: The bench function whose samples count for each target (frame building and set-up do not).
WITHIN = dict.fromkeys(TARGETS, "hot_loop")


def _short(path: str) -> str:
    """py-spy names files relative to their sys.path entry (mplslb/balancer.py, numpy/...): keep that."""
    at = path.find("mplslb/")
    return path[at:] if at >= 0 else path


def _source(where: str) -> str:
    """The text of ``file:line in func`` from the working tree (the profile names lines of the code as it ran)."""
    location = where.split(" in ", 1)[0]
    path, _, line = location.rpartition(":")
    candidates = [ROOT / "src" / path, BENCH / path] if path.startswith("mplslb/") else [BENCH / path]
    for candidate in candidates:
        if candidate.exists() and line.isdigit():
            return linecache.getline(str(candidate), int(line)).strip()[:110]
    return ""


def summarize(
    raw: str, *, title: str, within: str = "", top: int = 15, idle: bool = False, inclusive_top: int = 0
) -> str:
    """A text summary of py-spy's collapsed stacks. ``within``: keep only samples whose stack has a frame of that
    function name (the workload loop), so set-up time does not count. ``idle``: samples waiting in a selector's
    ``select`` (an event loop with nothing to do) are counted apart, and the tables show the busy samples.
    ``inclusive_top``: rows of the inclusive table (``top`` when 0)."""
    self_funcs: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        parsed = []
        for frame in frames:
            m = _FRAME.match(frame.strip())
            if m:
                parsed.append((m.group("func"), _short(m.group("file")), m.group("line") or "?"))
        if within and not any(func == within for func, _, _ in parsed):
            continue
        if not parsed:
            continue
        func, file, lineno = parsed[-1]
        if idle and func.endswith("select") and file.startswith("selectors"):
            waiting += count
            continue
        total += count
        self_funcs[f"{func} ({file})"] += count
        self_lines[f"{file}:{lineno} in {func}"] += count
        for name in {f"{f} ({fl})" for f, fl, _ in parsed if fl.startswith("mplslb/")}:
            inclusive[name] += count
    out = [f"{title}", f"samples in the workload: {total}"]
    if idle:
        share = waiting / (waiting + total) if waiting + total else 0.0
        out.append(f"samples waiting in select (idle): {waiting} ({share:.0%} of all); the tables show the busy ones")
    out.append("")
    if not total:
        return "\n".join([*out, "(no samples)"]) + "\n"

    def table(header: str, counts: Counter[str], source: bool = False, rows: int = top) -> None:
        out.append(header)
        for name, count in counts.most_common(rows):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
            text = _source(name) if source else ""
            if text:
                out.append(f"            {text}")
        out.append("")

    table("self time by function (innermost Python frame; C calls count in their caller):", self_funcs)
    table("self time by line:", self_lines, source=True)
    table("inclusive time of mplslb functions:", inclusive, rows=inclusive_top or top)
    return "\n".join(out)


def top_entries(summary: str, section: str, n: int = 5) -> list[str]:
    """The first ``n`` entries of one table of a summary (for results.json and the docs)."""
    lines = summary.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(section))
    except StopIteration:
        return []
    entries: list[str] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if line.strip()[0].isdigit() or not entries:
            entries.append(line.strip())
        else:  # the source text of the entry above
            entries[-1] += f"  |  {line.strip()}"
    return entries[:n]


def profile(target: str, *, seconds: float = 6.0, rate: int = 500) -> dict[str, object]:
    """Profile one target; writes bench/profiles/TARGET.txt and returns what it found."""
    OUT.mkdir(exist_ok=True)
    py_spy = Path(sys.executable).parent / "py-spy"
    raw_path = Path(tempfile.mkdtemp(prefix="mplslb-pyspy-")) / f"{target}.raw"  # raw stacks: not kept
    workload = [sys.executable, str(BENCH / "engine.py"), "--profile-target", target, "--seconds", str(seconds)]
    tool = "py-spy record"
    summary = ""
    if py_spy.exists():
        done = subprocess.run(
            [str(py_spy), "record", "-r", str(rate), "-f", "raw", "-o", str(raw_path), "--", *workload],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            cwd=ROOT,
        )
        if done.returncode == 0 and raw_path.exists():
            title = f"{TARGETS[target]}: py-spy record -r {rate} -f raw, {seconds:.0f} s of workload"
            summary = summarize(raw_path.read_text(), title=title, within=WITHIN[target])
        else:
            tool = f"cProfile (py-spy failed: {done.stderr.strip()[-200:]})"
    else:
        tool = "cProfile (py-spy is not installed)"
    shutil.rmtree(raw_path.parent, ignore_errors=True)
    if not summary:
        summary = _cprofile(target, seconds, tool)
    (OUT / f"{target}.txt").write_text(summary)
    return {
        "target": target,
        "tool": tool,
        "file": str((OUT / f"{target}.txt").relative_to(ROOT)),
        "top_functions": top_entries(summary, "self time by function"),
        "top_lines": top_entries(summary, "self time by line"),
    }


def _cprofile(target: str, seconds: float, tool: str) -> str:
    sys.path.insert(0, str(BENCH))
    import engine

    profiler = cProfile.Profile()
    profiler.enable()
    engine.profile_loop(target, seconds)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    return f"{TARGETS[target]}: {tool}\n\nself time by function (cProfile tottime):\n{text.getvalue()}"


if __name__ == "__main__":
    for name in sys.argv[1:] or list(TARGETS):
        print(profile(name))
