"""The study: its statistics on hand-computed cases, the queue-level simulator's bookkeeping, a quick run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mplslb.balancing.algorithms import algorithm_names
from mplslb.cli import main
from mplslb.study.metrics import consistency_fraction, mean_ci, percentile, slowdown, summarize, t_quantile_975
from mplslb.study.queueing import ServerModel, Workload, poisson_workload, policy_names, simulate


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 99) == 99
    assert percentile(values, 50) == 50
    assert percentile(values, 100) == 100
    assert percentile(list(range(1, 11)), 50) == 5
    assert percentile(list(range(1, 11)), 99.9) == 10
    assert percentile([7.0], 99.9) == 7.0
    # Order does not matter, and the result is always one of the values.
    assert percentile([3.0, 1.0, 2.0, 4.0], 75) == 3.0
    assert math.isnan(percentile([], 99))
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_mean_ci_student_t() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    # s = 1, n = 3, t(2) = 4.303: half-width 4.303 / sqrt(3)
    assert half == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([5.0]) == (5.0, 0.0)
    assert mean_ci([4.0, 4.0, 4.0, 4.0]) == (4.0, 0.0)
    mean, half = mean_ci([1.0, float("nan"), 3.0])
    assert mean == 2.0 and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert all(math.isnan(x) for x in mean_ci([]))
    assert t_quantile_975(1) == 12.706 and t_quantile_975(100) == 1.960


def test_slowdown() -> None:
    out = slowdown([2.0, 3.0, 1.0], [1.0, 1.5, 0.0])
    assert out.tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError):
        slowdown([1.0], [1.0, 2.0])


def test_summarize() -> None:
    response = np.arange(1, 1001, dtype=np.float64)
    service = np.full(1000, 0.5)
    s = summarize(response, service)
    assert s["mean"] == 500.5
    assert s["p50"] == 500 and s["p99"] == 990 and s["p999"] == 999
    assert s["slowdown_mean"] == 1001.0 and s["slowdown_p99"] == 1980.0


def test_consistency_fraction() -> None:
    assert consistency_fraction([["a", "a"], ["a", "b"], ["c"], []]) == (2, 3)
    assert consistency_fraction([]) == (0, 0)
    assert consistency_fraction([["b", "b", "b"]]) == (1, 1)


def test_policies_are_mplslbs_own_plus_the_references() -> None:
    assert policy_names() == [*algorithm_names(), "oracle_jsq", "oracle_lwl", "random"]


def test_simulate_one_server_by_hand() -> None:
    # One server, one worker, speed 2: two one-request sessions, the second arriving while the first is served.
    server = ServerModel("only", speed=2.0, workers=1)
    workload = Workload(
        arrivals=np.array([0.0, 0.001]),
        clients=np.array([0, 1], dtype=np.int64),
        requests=np.array([1, 1], dtype=np.int64),
        work=np.array([0.02, 0.01]),
    )
    result = simulate([server], workload, "round_robin")
    rtt = 0.0011
    # First: arrives at rtt, served 10 ms. Second: arrives at 1 ms + rtt, waits until the first is done, 5 ms.
    assert result.service.tolist() == pytest.approx([0.010, 0.005])
    assert result.response.tolist() == pytest.approx([0.010 + rtt, (rtt + 0.015) - (0.001 + rtt) + rtt])
    assert result.refused == 0 and result.interrupted == 0 and result.served == {"only": 2}


def test_simulate_is_deterministic_and_refuses_over_the_limit() -> None:
    servers = [ServerModel(f"s{i}", max_sessions=2) for i in range(2)]
    workload = poisson_workload(2000, 1.1, sum(s.capacity for s in servers), seed=3)
    a = simulate(servers, workload, "power_of_two", seed=3)
    b = simulate(servers, workload, "power_of_two", seed=3)
    assert a.response.tolist() == b.response.tolist()
    assert a.refused > 0
    assert a.sessions == 2000


def test_quick_study_writes_the_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["study", "--quick", "--output", str(tmp_path), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "study.md").read_text()
    for name in ("latency_homogeneous", "latency_heterogeneous", "consistency", "admission", "utilisation"):
        assert (tmp_path / "study" / f"{name}.png").is_file()
        assert (tmp_path / "study" / f"{name}.svg").is_file()
        assert f"study/{name}.png" in report
    assert "## Sessions through pool changes" in report
    # The consistency rows of mplslb's algorithms: every change kept 100 % of the sessions counted.
    rows = [line for line in report.splitlines() if "(mplslb, labels)" in line]
    assert len(rows) == len(algorithm_names())
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        for cell in cells:
            kept, counted = cell.split(" ")[0].split("/")
            assert kept == counted and int(counted) > 0, row
            assert cell.endswith("(100 %)"), row
    assert "kept 100 % of the counted sessions on their server through every change" in report
