"""Render bench/results.json as the Markdown table of docs/benchmarks.md (and the machine line above it).

.venv/bin/python bench/report.py [bench/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def met(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return "skipped: " + str(row["skipped"]).replace("|", "/")
    if row.get("met") is None:
        return "-"
    if row["met"]:
        return "**yes**"
    gap = row.get("gap")
    return f"no (gap {gap:.3g}x)" if gap else "no"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; Linux {m['kernel']}; "
        f"{m['implementation']} {m['python']}, numpy {m['numpy']}. Run {results['date']}, "
        f"`{results['command']}`, {results['duration_s']:.0f} s; load average before/after "
        f"{results.get('load_average_before', '-')} / {results.get('load_average_after', '-')}.",
        "",
        "| benchmark | figure | unit | reference | reference figure | ratio | target | met? |",
        "| --- | ---: | --- | --- | ---: | ---: | --- | --- |",
    ]
    for row in results["rows"]:
        ratio = row.get("ratio")
        cells = [
            row["benchmark"],
            fmt(row.get("figure")),
            row.get("unit", ""),
            row.get("reference", "") if not row.get("skipped") else "-",
            fmt(row.get("reference_figure")),
            f"{ratio:.3g}" if ratio is not None else "-",
            row.get("target", "-"),
            met(row),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else BENCH / "results.json"
    print(markdown(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
