"""Statistics of the study: percentiles, confidence intervals over seeds, slowdown, session consistency.

Percentiles use the nearest-rank definition: the p-th percentile of n values is the
smallest value with at least p % of the values at or below it. It is always one of the observed values, which
is what a latency percentile should be, and it is easy to check by hand (p99 of 1..100 is 99).

Confidence intervals are over independent seeds (one value per seed, e.g. one run's p99), with Student's t,
since a study has few seeds and the per-run values are close to normal even when the latencies are not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "consistency_fraction",
    "mean_ci",
    "percentile",
    "slowdown",
    "summarize",
    "t_quantile_975",
]

FloatArray = npt.NDArray[np.float64]

# Two-sided 95 % Student t quantiles (0.975) by degrees of freedom; beyond 30 the normal value is close enough.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (>= 1)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.960


def percentile(values: Sequence[float] | FloatArray, q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; NaN when there are none."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan
    # Rank ceil(q/100 * n), with a tolerance so that float error (0.999 * 1000 = 999.0000000000001) does not
    # push the rank one past the value it should name.
    rank = max(1, math.ceil(q / 100.0 * arr.size - 1e-9))
    return float(np.partition(arr, rank - 1)[rank - 1])


def mean_ci(values: Sequence[float] | FloatArray) -> tuple[float, float]:
    """Mean of per-seed values and the half-width of its 95 % confidence interval (0 for a single value).

    NaN values (a run that produced no sample) are left out.
    """
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, 0.0
    half = t_quantile_975(arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, half


def slowdown(response: Sequence[float] | FloatArray, service: Sequence[float] | FloatArray) -> FloatArray:
    """Response time divided by the request's own service time on the server that served it (>= 1 when the
    response includes the service). Requests with no service time (0) are given a slowdown of 1."""
    resp = np.asarray(response, dtype=np.float64)
    serv = np.asarray(service, dtype=np.float64)
    if resp.shape != serv.shape:
        raise ValueError(f"response and service differ in shape: {resp.shape} vs {serv.shape}")
    out = np.ones_like(resp)
    np.divide(resp, serv, out=out, where=serv > 0)
    return out


def summarize(response: FloatArray, service: FloatArray) -> dict[str, float]:
    """The per-run figures the study plots: mean, p50, p99, p99.9 of response time, mean and p99 of slowdown."""
    sd = slowdown(response, service)
    empty = response.size == 0
    return {
        "mean": math.nan if empty else float(response.mean()),
        "p50": percentile(response, 50),
        "p99": percentile(response, 99),
        "p999": percentile(response, 99.9),
        "slowdown_mean": math.nan if empty else float(sd.mean()),
        "slowdown_p99": percentile(sd, 99),
    }


def consistency_fraction(paths: Iterable[Sequence[str]]) -> tuple[int, int]:
    """Of the sessions given (each as the servers its packets reached, in order), how many reached one server
    only: ``(kept, total)``. Sessions with no packet are not counted."""
    kept = total = 0
    for servers in paths:
        if not servers:
            continue
        total += 1
        if len(set(servers)) == 1:
            kept += 1
    return kept, total
