"""The service acceptance control unit: limits, the new-session token bucket, refusal reasons and counts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mplslb.balancing.admission import AdmissionControl, Refusal, RefuseWith
from mplslb.balancing.servers import DownReason, ServerConfig, ServerPool

MAC = bytes.fromhex("020000000001")


def config(name: str, **kwargs: Any) -> ServerConfig:
    return ServerConfig(name, bytes([10, 0, 0, 1]), MAC, 1, **kwargs)


def admit(control: AdmissionControl, now: float = 0.0, active: int = 0, free: int = 100) -> Refusal | None:
    return control.admit(active_sessions=active, labels_free=free, now=now)


def test_refusal_values_are_counter_names() -> None:
    assert [r.value for r in Refusal] == [
        "global_session_limit",
        "server_session_limit",
        "no_server_available",
        "labels_exhausted",
        "new_session_rate_limit",
    ]
    assert [r.value for r in RefuseWith] == ["rst", "icmp", "drop"]


def test_defaults_admit_everything_while_labels_last() -> None:
    control = AdmissionControl()
    assert control.refuse_with is RefuseWith.RST
    assert all(admit(control, now=0.0, active=10**6) is None for _ in range(1000))
    assert admit(control, free=0) is Refusal.LABELS_EXHAUSTED


def test_global_session_limit() -> None:
    control = AdmissionControl(max_sessions=3)
    assert admit(control, active=2) is None
    assert admit(control, active=3) is Refusal.GLOBAL_LIMIT


def test_checks_run_in_order_global_labels_rate() -> None:
    control = AdmissionControl(max_sessions=1, max_new_per_second=1.0)
    assert admit(control) is None  # takes the only token
    assert admit(control, active=1, free=0) is Refusal.GLOBAL_LIMIT
    assert admit(control, active=0, free=0) is Refusal.LABELS_EXHAUSTED
    assert admit(control, active=0, free=5) is Refusal.RATE_LIMIT


def test_a_refused_session_takes_no_token() -> None:
    control = AdmissionControl(max_sessions=1, max_new_per_second=1.0)
    assert admit(control, active=1) is Refusal.GLOBAL_LIMIT
    assert control.tokens == 1.0
    assert admit(control, active=0) is None


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    control = AdmissionControl(max_new_per_second=10.0)
    assert control.burst == 10.0
    assert [admit(control, now=5.0) for _ in range(11)] == [None] * 10 + [Refusal.RATE_LIMIT]
    assert admit(control, now=5.05) is Refusal.RATE_LIMIT  # half a token
    assert admit(control, now=5.1) is None
    assert admit(control, now=5.1) is Refusal.RATE_LIMIT
    # A long quiet spell refills only up to the burst.
    assert [admit(control, now=100.0) for _ in range(11)] == [None] * 10 + [Refusal.RATE_LIMIT]


def test_slow_rate_has_a_burst_of_one() -> None:
    control = AdmissionControl(max_new_per_second=0.5)
    assert control.burst == 1.0
    assert admit(control, now=0.0) is None
    assert admit(control, now=1.9) is Refusal.RATE_LIMIT
    assert admit(control, now=2.0) is None


def test_a_clock_stepping_back_adds_no_tokens() -> None:
    control = AdmissionControl(max_new_per_second=1.0)
    assert admit(control, now=10.0) is None
    assert admit(control, now=5.0) is Refusal.RATE_LIMIT
    assert admit(control, now=10.5) is Refusal.RATE_LIMIT
    assert admit(control, now=11.0) is None


@given(
    rate=st.floats(0.1, 50.0),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=200),
)
def test_admitted_sessions_never_exceed_burst_plus_rate_times_elapsed(rate: float, gaps: list[float]) -> None:
    control = AdmissionControl(max_new_per_second=rate)
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        if admit(control, now=now) is None:
            admitted += 1
        assert admitted <= control.burst + rate * now + 1e-9


def test_refusal_for_no_server_tells_full_from_absent() -> None:
    control = AdmissionControl()
    assert control.refusal_for_no_server(ServerPool()) is Refusal.NO_SERVER
    pool = ServerPool([config("a", max_sessions=1), config("b")])
    pool.session_started(pool.get("a"))
    pool.mark_down("b", DownReason.HEALTH_CHECK)
    assert control.refusal_for_no_server(pool) is Refusal.SERVER_LIMIT
    pool.drain("a")
    assert control.refusal_for_no_server(pool) is Refusal.NO_SERVER
    pool.mark_up("a")
    pool.set_weight("a", 0)
    assert control.refusal_for_no_server(pool) is Refusal.NO_SERVER


def test_an_overloaded_server_counts_as_at_its_limit() -> None:
    pool = ServerPool([config("a")], rt_limit=0.2)
    pool.record_response_time(pool.get("a"), 1.0)
    assert pool.eligible() == []
    assert AdmissionControl().refusal_for_no_server(pool) is Refusal.SERVER_LIMIT


def test_count_increments_the_counter_of_the_reason() -> None:
    control = AdmissionControl()
    assert control.refused == dict.fromkeys(Refusal, 0)
    control.count(Refusal.RATE_LIMIT)
    control.count(Refusal.RATE_LIMIT)
    control.count(Refusal.NO_SERVER)
    assert control.refused[Refusal.RATE_LIMIT] == 2
    assert control.refused[Refusal.NO_SERVER] == 1
    assert control.refused_total == 3
    assert admit(control, free=0) is Refusal.LABELS_EXHAUSTED
    assert control.refused[Refusal.LABELS_EXHAUSTED] == 0  # deciding is not counting


def test_refuse_with_accepts_the_config_string() -> None:
    assert AdmissionControl(refuse_with="icmp").refuse_with is RefuseWith.ICMP  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_sessions": -1}, "max_sessions"),
        ({"max_sessions": 2.5}, "max_sessions"),
        ({"max_new_per_second": -1.0}, "max_new_per_second"),
        ({"max_new_per_second": float("inf")}, "max_new_per_second"),
        ({"refuse_with": "reject"}, "refuse_with"),
    ],
)
def test_bad_settings_raise_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionControl(**kwargs)
