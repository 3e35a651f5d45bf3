"""The sustained ``Connection: close`` loop (bench/close_sustained.py) runs wrk back to back through one lab and
reports each run's figures, the label pairs' among them; a run whose wrk could not start counts none. Nothing
timed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import close_sustained
import e2e

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(bool(e2e.missing_requirements()), reason=e2e.missing_requirements() or "ok"),
    pytest.mark.skipif(shutil.which("clang") is None, reason="clang is needed to build the XDP program"),
]


def test_runs_back_to_back_report_requests_and_label_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    real = e2e.turn_run
    calls: list[int] = []

    def turn_run(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(kwargs["connections"])
        figures = real(*args, **kwargs)
        return {} if len(calls) == 3 else figures  # the third as wrk refused at its start reports it

    monkeypatch.setattr(e2e, "turn_run", turn_run)
    said: list[str] = []
    rows = close_sustained.run(3, 1, log=said.append, quarantine_min=0.5)
    assert [r["connections"] for r in rows] == calls == [16, 64, 16]
    assert [r["wrk_ran"] for r in rows] == [True, True, False] and "wrk refused at its start" in said[2]
    assert all(r["requests_per_s"] > 0 and r["polls"] >= 0 for r in rows[:2]) and rows[2]["requests_per_s"] == 0
    for row in rows:  # far from running out: no pair reused early, none refused
        assert row["labels_exhausted"] == 0 and row["reused_early"] == 0 and row["slots_refused"] == 0, row
        assert row["labels_free"] > 0 and row["labels_free"] + row["labels_quarantined"] <= 524_279, row
