"""The server configuration/state managing unit: validation, status changes, versions, passive health."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mplslb.balancing.servers import DownReason, Server, ServerConfig, ServerPool, ServerStatus

MAC = bytes.fromhex("020000000001")


def config(name: str = "a", **overrides: Any) -> ServerConfig:
    fields: dict[str, Any] = {"address": bytes([10, 0, 0, 1]), "mac": MAC, "port_id": 1}
    fields.update(overrides)
    return ServerConfig(name, **fields)


def pool_of(*names: str, **kwargs: Any) -> ServerPool:
    return ServerPool([config(name) for name in names], **kwargs)


# -- configuration ------------------------------------------------------------------------------------------


def test_config_defaults_and_ipv6_address() -> None:
    c = config("web1", address=bytes(16))
    assert (c.weight, c.max_sessions) == (1, 0)
    with pytest.raises(AttributeError):
        c.weight = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "name"),
        ({"address": b"\x0a\x00\x00"}, "address"),
        ({"address": "10.0.0.1"}, "address"),
        ({"mac": b"\x00" * 5}, "mac"),
        ({"port_id": -1}, "port_id"),
        ({"weight": -1}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"weight": True}, "weight"),
        ({"max_sessions": -3}, "max_sessions"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    name = overrides.pop("name", "a")
    with pytest.raises(ValueError, match=field):
        config(name, **overrides)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fail_threshold": 0}, "fail_threshold"),
        ({"rt_alpha": 0.0}, "rt_alpha"),
        ({"rt_alpha": 1.5}, "rt_alpha"),
        ({"rt_limit": -1.0}, "rt_limit"),
        ({"rt_limit": float("nan")}, "rt_limit"),
    ],
)
def test_bad_pool_parameters_raise(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerPool(**kwargs)


# -- membership ---------------------------------------------------------------------------------------------


def test_servers_start_up_with_their_configured_weight_and_stable_indices() -> None:
    pool = ServerPool([config("a", weight=3), config("b")])
    a, b = pool.servers
    assert (a.name, a.index, a.status, a.weight) == ("a", 0, ServerStatus.UP, 3)
    assert (b.name, b.index) == ("b", 1)
    assert pool.eligible() == [a, b]
    assert len(pool) == 2 and "a" in pool and "z" not in pool


def test_duplicate_name_is_refused() -> None:
    pool = pool_of("a")
    with pytest.raises(ValueError, match="duplicate"):
        pool.add(config("a"))
    assert len(pool) == 1


def test_get_unknown_raises_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="nope"):
        pool_of("a").get("nope")


def test_remove_marks_down_and_indices_are_not_reused() -> None:
    pool = pool_of("a", "b")
    removed = pool.remove("a")
    assert removed.status is ServerStatus.DOWN and removed.down_reason is DownReason.REMOVED
    assert [s.name for s in pool.servers] == ["b"]
    assert pool.add(config("a")).index == 2
    assert [s.index for s in pool.servers] == [1, 2]


def test_servers_list_is_a_copy() -> None:
    pool = pool_of("a")
    pool.servers.clear()
    assert len(pool.servers) == 1


# -- status, weight and the version -------------------------------------------------------------------------


def test_version_bumps_on_membership_status_and_weight_changes_only() -> None:
    pool = ServerPool()
    versions = [pool.version]

    def changed() -> bool:
        versions.append(pool.version)
        return versions[-1] != versions[-2]

    a = pool.add(config("a"))
    assert changed()
    pool.set_weight("a", 5)
    assert changed()
    pool.set_weight("a", 5)
    assert not changed()
    assert pool.drain("a")
    assert changed()
    assert not pool.drain("a")
    assert not changed()
    assert pool.mark_down("a", DownReason.HEALTH_CHECK)
    assert changed()
    assert not pool.mark_down("a", DownReason.ADMIN)
    assert not changed()
    assert pool.mark_up("a")
    assert changed()
    assert not pool.mark_up("a")
    assert not changed()
    pool.session_started(a)
    pool.record_response_time(a, 0.1)
    pool.record_failure(a, DownReason.NO_REPLY)
    pool.session_ended(a)
    assert not changed()  # per-session state is read live, not versioned
    pool.remove("a")
    assert changed()


def test_drain_down_and_weight_zero_stop_new_sessions_only() -> None:
    pool = pool_of("a", "b", "c", "d")
    a = pool.get("a")
    pool.session_started(a)
    pool.drain("a")
    pool.mark_down("b", DownReason.ADMIN)
    pool.set_weight("c", 0)
    assert [s.name for s in pool.eligible()] == ["d"]
    assert a.active == 1  # the drained server keeps its session
    assert pool.get("b").down_reason is DownReason.ADMIN
    pool.mark_up("a")
    pool.mark_up("b")
    pool.set_weight("c", 1)
    assert [s.name for s in pool.eligible()] == ["a", "b", "c", "d"]


@given(
    st.lists(st.sampled_from(["up", "drain", "down", "weight0", "full"]), min_size=1, max_size=8),
    st.integers(0, 3),
    st.integers(-2, 10),
)
def test_next_eligible_is_the_first_eligible_after_an_index_round_to_the_start(
    states: list[str], removed: int, after: int
) -> None:
    """``next_eligible(after)`` is the eligible server of lowest index above ``after``, else the eligible one of
    lowest index (None when none is eligible), also with gaps in the indices left by removed servers."""
    pool = ServerPool([config(f"s{i}", max_sessions=1) for i in range(len(states))])
    for i, state in enumerate(states):
        name = f"s{i}"
        if state == "drain":
            pool.drain(name)
        elif state == "down":
            pool.mark_down(name, DownReason.ADMIN)
        elif state == "weight0":
            pool.set_weight(name, 0)
        elif state == "full":
            pool.session_started(pool.get(name))
    for index in range(1, len(states), 2)[:removed]:
        pool.remove(f"s{index}")
    eligible = pool.eligible()
    above = [server for server in eligible if server.index > after]
    expected = above[0] if above else (eligible[0] if eligible else None)
    assert pool.next_eligible(after) is expected


def test_set_weight_rejects_negative() -> None:
    with pytest.raises(ValueError, match="weight"):
        pool_of("a").set_weight("a", -1)


def test_server_limit_makes_a_server_full() -> None:
    pool = ServerPool([config("a", max_sessions=2)])
    a = pool.get("a")
    pool.session_started(a)
    assert a.eligible
    pool.session_started(a)
    assert a.full and not a.eligible and a.in_service
    pool.session_ended(a)
    assert a.eligible
    assert (a.active, a.total) == (1, 2)


def test_session_ended_without_active_session_raises() -> None:
    pool = pool_of("a")
    with pytest.raises(ValueError, match="no active session"):
        pool.session_ended(pool.get("a"))


def test_session_refused_is_counted_on_the_server() -> None:
    pool = pool_of("a")
    pool.session_refused(pool.get("a"))
    assert pool.get("a").refused == 1


# -- passive health -----------------------------------------------------------------------------------------


def test_fail_threshold_consecutive_failures_take_a_server_down() -> None:
    pool = pool_of("a", fail_threshold=3)
    a = pool.get("a")
    assert not pool.record_failure(a, DownReason.NO_REPLY)
    assert not pool.record_failure(a, DownReason.NO_REPLY)
    pool.record_success(a)  # the streak starts over
    assert a.failures == 0
    assert not pool.record_failure(a, DownReason.NO_REPLY)
    assert not pool.record_failure(a, DownReason.NO_REPLY)
    assert pool.record_failure(a, DownReason.NO_REPLY)
    assert (a.status, a.down_reason) == (ServerStatus.DOWN, DownReason.NO_REPLY)
    assert not pool.record_failure(a, DownReason.NO_REPLY)  # already down: not "this failure took it down"
    assert pool.mark_up("a")
    assert (a.failures, a.down_reason) == (0, None)


def test_a_draining_server_that_fails_goes_down() -> None:
    pool = pool_of("a", fail_threshold=1)
    pool.drain("a")
    assert pool.record_failure(pool.get("a"), DownReason.REFUSED)
    assert pool.get("a").status is ServerStatus.DOWN


# -- down reasons -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "value", "passive", "lifted_by_check"),
    [
        (DownReason.ADMIN, "admin", False, False),
        (DownReason.HEALTH_CHECK, "health_check", False, True),
        (DownReason.NO_REPLY, "no_reply", True, True),
        (DownReason.REFUSED, "refused", True, True),
        (DownReason.REMOVED, "removed", False, False),
    ],
)
def test_down_reasons_say_whether_a_passing_check_lifts_them(
    reason: DownReason, value: str, passive: bool, lifted_by_check: bool
) -> None:
    assert str(reason) == value and f"{reason}" == value  # what snapshots and tables show
    assert (reason.passive, reason.lifted_by_check) == (passive, lifted_by_check)


def test_down_reasons_are_the_five_the_policy_knows() -> None:
    assert {r.value for r in DownReason} == {"admin", "health_check", "no_reply", "refused", "removed"}


def test_a_server_keeps_the_reason_it_first_went_down_for() -> None:
    pool = pool_of("a", fail_threshold=1)
    a = pool.get("a")
    assert a.down_reason is None
    pool.mark_down("a", DownReason.ADMIN)
    assert not pool.record_failure(a, DownReason.NO_REPLY)  # already down: an operator's down stays an operator's
    assert a.down_reason is DownReason.ADMIN
    assert pool.remove("a").down_reason is DownReason.ADMIN


# -- response time ------------------------------------------------------------------------------------------


def test_first_sample_sets_the_ewma_then_it_smooths() -> None:
    pool = pool_of("a", rt_alpha=0.5)
    a = pool.get("a")
    assert a.rt_ewma is None
    pool.record_response_time(a, 0.2)
    assert a.rt_ewma == pytest.approx(0.2)
    pool.record_response_time(a, 0.4)
    assert a.rt_ewma == pytest.approx(0.3)
    pool.record_response_time(a, 0.0)
    assert a.rt_ewma == pytest.approx(0.15)
    assert a.rt_samples == 3


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_response_time_sample_raises(bad: float) -> None:
    pool = pool_of("a")
    with pytest.raises(ValueError, match="response time"):
        pool.record_response_time(pool.get("a"), bad)


@given(
    alpha=st.floats(0.01, 1.0),
    samples=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=50),
)
def test_ewma_stays_within_the_range_of_its_samples(alpha: float, samples: list[float]) -> None:
    pool = pool_of("a", rt_alpha=alpha)
    a = pool.get("a")
    for sample in samples:
        pool.record_response_time(a, sample)
    assert a.rt_ewma is not None
    assert min(samples) - 1e-9 <= a.rt_ewma <= max(samples) + 1e-9
    assert a.rt_samples == len(samples)


def test_rt_limit_overload_stops_new_sessions_until_the_estimate_recovers() -> None:
    pool = pool_of("fast", "slow", rt_limit=0.5, rt_alpha=0.5)
    fast, slow = pool.servers
    pool.record_response_time(fast, 0.1)
    pool.record_response_time(slow, 2.0)
    assert slow.overloaded and not slow.eligible and slow.in_service
    assert pool.eligible() == [fast]
    # Samples keep coming (from its existing sessions or probes); it takes sessions again once it is fast.
    for _ in range(3):
        pool.record_response_time(slow, 0.1)
    assert slow.rt_ewma is not None and slow.rt_ewma < 0.5
    assert pool.eligible() == [fast, slow]


def test_no_rt_limit_means_never_overloaded() -> None:
    pool = pool_of("a")
    a = pool.get("a")
    pool.record_response_time(a, 1e6)
    assert not a.overloaded and a.eligible


def test_coming_back_up_from_down_forgets_the_old_estimate() -> None:
    pool = pool_of("a", rt_limit=0.5)
    a = pool.get("a")
    pool.record_response_time(a, 5.0)
    pool.mark_down("a", DownReason.ADMIN)
    pool.mark_up("a")
    assert a.rt_ewma is None and a.rt_samples == 0 and a.eligible


def test_undraining_keeps_the_estimate() -> None:
    pool = pool_of("a")
    a = pool.get("a")
    pool.record_response_time(a, 0.3)
    pool.drain("a")
    pool.mark_up("a")
    assert a.rt_ewma == pytest.approx(0.3)


def test_server_repr_is_readable() -> None:
    server = Server(config("a"), 7)
    assert "a" in repr(server) and "index=7" in repr(server)


def test_every_status_change_is_told_once() -> None:
    pool = pool_of("a", "b")
    told: list[tuple[str, str, object]] = []
    pool.on_status = lambda s: told.append((s.name, str(s.status), s.down_reason))
    pool.drain("a")
    pool.drain("a")  # no change
    pool.mark_down("a", DownReason.ADMIN)
    pool.mark_up("a")
    pool.mark_up("a")  # no change
    pool.remove("b")
    assert told == [
        ("a", "draining", None),
        ("a", "down", DownReason.ADMIN),
        ("a", "up", None),
        ("b", "down", DownReason.REMOVED),
    ]
