"""The load balancing algorithm unit: registry, distribution properties, eligibility, determinism."""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mplslb.balancing.algorithms import (
    ALGORITHMS,
    Algorithm,
    Maglev,
    algorithm_names,
    flow_hash,
    make_algorithm,
    register,
)
from mplslb.balancing.servers import DownReason, Server, ServerConfig, ServerPool, ServerStatus
from mplslb.flow import FlowKey

MAC = bytes.fromhex("020000000001")
VIP = bytes([192, 0, 2, 1])
KEY = FlowKey(6, bytes([198, 51, 100, 7]), 40000, VIP, 80)

ALL_NAMES = [
    "least_connections",
    "maglev",
    "power_of_two",
    "response_time",
    "round_robin",
    "shortest_expected_delay",
    "source_hash",
    "weighted_least_connections",
    "weighted_round_robin",
]


def config(name: str, weight: int = 1, max_sessions: int = 0) -> ServerConfig:
    return ServerConfig(name, bytes([10, 0, 0, 1]), MAC, 1, weight=weight, max_sessions=max_sessions)


def pool_of(*weights: int, **kwargs: Any) -> ServerPool:
    return ServerPool([config(f"s{i}", weight) for i, weight in enumerate(weights)], **kwargs)


def client_key(i: int, sport: int = 40000) -> FlowKey:
    return FlowKey(6, struct.pack("!I", 0x0B000000 + i), sport, VIP, 80)


def flow_keys(n: int) -> list[FlowKey]:
    return [client_key(i, 1024 + i % 60000) for i in range(n)]


def pick(algorithm: Algorithm, pool: ServerPool, key: FlowKey = KEY, *, keep: bool = True) -> Server:
    """Choose a server; with ``keep`` the session stays open (counts toward ``active``)."""
    server = algorithm.choose(pool, key, 0.0)
    assert server is not None
    if keep:
        pool.session_started(server)
    return server


def names(servers: list[Server]) -> list[str]:
    return [server.name for server in servers]


# -- registry -----------------------------------------------------------------------------------------------


def test_all_algorithms_are_registered_by_name() -> None:
    assert algorithm_names() == ALL_NAMES
    for name in ALL_NAMES:
        algorithm = make_algorithm(name)
        assert algorithm.name == name and isinstance(algorithm, ALGORITHMS[name])


def test_unknown_algorithm_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown load balancing algorithm 'fastest'.*round_robin"):
        make_algorithm("fastest")


def test_bad_parameters_raise_value_error() -> None:
    with pytest.raises(ValueError, match="bad parameters for algorithm 'round_robin'"):
        make_algorithm("round_robin", seed=3)


def test_register_refuses_a_second_class_under_a_taken_name() -> None:
    class Impostor(Algorithm):
        name: ClassVar[str] = "round_robin"

        def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
            return None

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)
    assert ALGORITHMS["round_robin"] is not Impostor


def test_flow_hash_is_stable_across_processes() -> None:
    # A pinned value: keyed BLAKE2b does not depend on PYTHONHASHSEED, unlike hash().
    assert flow_hash(KEY) == 0x50E784BA09439900
    assert flow_hash(KEY) != flow_hash(KEY._replace(sport=40001))


# -- every algorithm: eligible servers only -----------------------------------------------------------------


server_states = st.fixed_dictionaries(
    {
        "status": st.sampled_from(list(ServerStatus)),
        "weight": st.integers(0, 4),
        "max_sessions": st.integers(0, 3),
        "active": st.integers(0, 4),
        "rt": st.one_of(st.none(), st.floats(0.0, 2.0)),
    }
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(ALL_NAMES), states=st.lists(server_states, max_size=6), sport=st.integers(0, 65535))
def test_every_algorithm_chooses_only_eligible_servers(name: str, states: list[dict[str, Any]], sport: int) -> None:
    pool = ServerPool(rt_limit=1.0)
    for i, state in enumerate(states):
        server = pool.add(config(f"s{i}", state["weight"], state["max_sessions"]))
        server.status = state["status"]
        server.active = state["active"]
        if state["rt"] is not None:
            pool.record_response_time(server, state["rt"])
    algorithm = make_algorithm(name, **({"table_size": 251} if name == "maglev" else {}))
    for i in range(5):
        chosen = algorithm.choose(pool, client_key(i, sport), 0.0)
        if pool.eligible():
            assert chosen is not None and chosen.eligible
        else:
            assert chosen is None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_algorithm_skips_down_draining_weight_zero_and_full_servers(name: str) -> None:
    pool = ServerPool([config("down"), config("draining"), config("zero"), config("full", max_sessions=1)])
    pool.add(config("ok"))
    pool.mark_down("down", DownReason.ADMIN)
    pool.drain("draining")
    pool.set_weight("zero", 0)
    pool.session_started(pool.get("full"))
    algorithm = make_algorithm(name)
    for i in range(50):
        assert pick(algorithm, pool, client_key(i, 1000 + i), keep=False).name == "ok"
    pool.mark_down("ok", DownReason.ADMIN)
    assert algorithm.choose(pool, KEY, 0.0) is None


# -- round robin --------------------------------------------------------------------------------------------


@given(n=st.integers(1, 8), k=st.integers(1, 10))
def test_round_robin_splits_exactly(n: int, k: int) -> None:
    pool = pool_of(*([1] * n))
    algorithm = make_algorithm("round_robin")
    counts = Counter(pick(algorithm, pool).name for _ in range(k * n))
    assert sorted(counts.values()) == [k] * n


def test_round_robin_cycles_in_index_order_and_skips_an_ineligible_server() -> None:
    pool = pool_of(1, 1, 1)
    algorithm = make_algorithm("round_robin")
    assert [pick(algorithm, pool).name for _ in range(4)] == ["s0", "s1", "s2", "s0"]
    pool.drain("s1")
    assert [pick(algorithm, pool).name for _ in range(3)] == ["s2", "s0", "s2"]


# -- weighted round robin -----------------------------------------------------------------------------------


def test_weighted_round_robin_1_2_3_is_exact_over_600() -> None:
    pool = pool_of(1, 2, 3)
    algorithm = make_algorithm("weighted_round_robin")
    counts = Counter(pick(algorithm, pool).name for _ in range(600))
    assert counts == {"s0": 100, "s1": 200, "s2": 300}


def test_weighted_round_robin_is_smooth_like_nginx() -> None:
    # The sequence from nginx's commit introducing smooth weighted round robin: weights a=5, b=1, c=1.
    pool = pool_of(5, 1, 1)
    algorithm = make_algorithm("weighted_round_robin")
    assert [pick(algorithm, pool).name for _ in range(7)] == ["s0", "s0", "s1", "s0", "s2", "s0", "s0"]


@given(weights=st.lists(st.integers(1, 6), min_size=1, max_size=5), rounds=st.integers(1, 4))
def test_weighted_round_robin_is_exact_over_any_multiple_of_the_total_weight(weights: list[int], rounds: int) -> None:
    pool = pool_of(*weights)
    algorithm = make_algorithm("weighted_round_robin")
    counts = Counter(pick(algorithm, pool).name for _ in range(rounds * sum(weights)))
    assert counts == {f"s{i}": rounds * w for i, w in enumerate(weights)}


def test_weighted_round_robin_follows_a_weight_change() -> None:
    pool = pool_of(1, 1)
    algorithm = make_algorithm("weighted_round_robin")
    for _ in range(3):
        pick(algorithm, pool)
    pool.set_weight("s1", 3)
    counts = Counter(pick(algorithm, pool).name for _ in range(400))
    assert counts == {"s0": 100, "s1": 300}


# -- least connections --------------------------------------------------------------------------------------


def test_least_connections_prefers_the_least_loaded() -> None:
    pool = pool_of(1, 1, 1)
    s0, s1, s2 = pool.servers
    s0.active, s1.active, s2.active = 5, 2, 7
    algorithm = make_algorithm("least_connections")
    assert pick(algorithm, pool, keep=False) is s1
    # Sessions that stay open even the load out.
    for _ in range(7):
        pick(algorithm, pool)
    assert (s0.active, s1.active, s2.active) == (7, 7, 7)


def test_least_connections_rotates_ties_instead_of_favouring_the_first() -> None:
    pool = pool_of(1, 1, 1)
    algorithm = make_algorithm("least_connections")
    # Sessions end at once, so every choice is a three-way tie.
    assert [pick(algorithm, pool, keep=False).name for _ in range(6)] == ["s0", "s1", "s2"] * 2


# -- weighted least connections -----------------------------------------------------------------------------


def test_weighted_least_connections_keeps_active_proportional_to_weight() -> None:
    pool = pool_of(1, 3)
    algorithm = make_algorithm("weighted_least_connections")
    for _ in range(400):
        pick(algorithm, pool)
    assert [s.active for s in pool.servers] == [100, 300]


def test_weighted_least_connections_compares_active_per_weight() -> None:
    pool = pool_of(1, 3)
    light, heavy = pool.servers
    light.active, heavy.active = 2, 3  # 2/1 > 3/3: the heavier server is less loaded for its weight
    algorithm = make_algorithm("weighted_least_connections")
    assert pick(algorithm, pool, keep=False) is heavy
    light.active = 0
    assert pick(algorithm, pool, keep=False) is light


def test_weighted_least_connections_rotates_ties() -> None:
    pool = pool_of(2, 2)
    algorithm = make_algorithm("weighted_least_connections")
    assert [pick(algorithm, pool, keep=False).name for _ in range(4)] == ["s0", "s1", "s0", "s1"]


# -- response time ------------------------------------------------------------------------------------------


def test_response_time_tries_unmeasured_servers_first() -> None:
    pool = pool_of(1, 1, 1)
    s0, s1, s2 = pool.servers
    pool.record_response_time(s0, 0.001)
    algorithm = make_algorithm("response_time")
    first = pick(algorithm, pool)
    second = pick(algorithm, pool)
    assert {first, second} == {s1, s2}
    pool.record_response_time(s1, 0.5)
    pool.record_response_time(s2, 0.5)
    assert pick(algorithm, pool, keep=False) is s0


def test_response_time_prefers_the_faster_server_weighing_its_load() -> None:
    pool = pool_of(1, 1)
    fast, slow = pool.servers
    pool.record_response_time(fast, 0.01)
    pool.record_response_time(slow, 0.1)
    algorithm = make_algorithm("response_time")
    counts = Counter(pick(algorithm, pool).name for _ in range(110))
    # Expected wait rt * (active + 1) balances at about ten sessions on the fast one for each on the slow one.
    assert counts["s0"] == 100 and counts["s1"] == 10


def test_response_time_divides_by_weight() -> None:
    pool = pool_of(1, 4)
    a, b = pool.servers
    pool.record_response_time(a, 0.1)
    pool.record_response_time(b, 0.2)  # twice as slow, four times the capacity
    assert pick(make_algorithm("response_time"), pool, keep=False) is b


# -- source hash --------------------------------------------------------------------------------------------


def test_source_hash_is_sticky_per_client_across_ports_and_instances() -> None:
    pool = pool_of(1, 1, 1, 1)
    first = make_algorithm("source_hash")
    second = make_algorithm("source_hash")
    for i in range(200):
        chosen = {pick(alg, pool, client_key(i, sport)).name for alg in (first, second) for sport in (1, 2, 3)}
        assert len(chosen) == 1


def test_source_hash_spreads_clients() -> None:
    pool = pool_of(1, 1, 1, 1)
    algorithm = make_algorithm("source_hash")
    counts = Counter(pick(algorithm, pool, client_key(i), keep=False).name for i in range(4000))
    assert len(counts) == 4 and min(counts.values()) > 850


def test_source_hash_moves_only_the_clients_of_a_full_server() -> None:
    pool = ServerPool([config("s0"), config("s1"), config("s2", max_sessions=1)])
    algorithm = make_algorithm("source_hash")
    before = [pick(algorithm, pool, client_key(i), keep=False).name for i in range(300)]
    pool.session_started(pool.get("s2"))  # s2 is now full
    after = [pick(algorithm, pool, client_key(i), keep=False).name for i in range(300)]
    assert "s2" in before and "s2" not in after
    assert all(b == a for b, a in zip(before, after, strict=True) if b != "s2")


# -- maglev -------------------------------------------------------------------------------------------------


def test_maglev_table_size_must_be_prime() -> None:
    for bad in (65536, 1, 0, 100):
        with pytest.raises(ValueError, match="prime"):
            make_algorithm("maglev", table_size=bad)
    assert make_algorithm("maglev", table_size=251).choose(ServerPool(), KEY, 0.0) is None


def test_maglev_table_is_full_and_shares_follow_weights() -> None:
    pool = pool_of(1, 2, 3, 2)
    algorithm = Maglev()
    pick(algorithm, pool, keep=False)
    table = algorithm.table
    assert len(table) == 65537 and min(table) >= 0
    shares = Counter(algorithm.members[slot].name for slot in table)
    for i, weight in enumerate((1, 2, 3, 2)):
        assert shares[f"s{i}"] / len(table) == pytest.approx(weight / 8, rel=0.02)


def test_maglev_key_distribution_is_near_the_weights() -> None:
    pool = pool_of(1, 2, 3)
    algorithm = make_algorithm("maglev")
    counts = Counter(pick(algorithm, pool, key, keep=False).name for key in flow_keys(12000))
    for i, weight in enumerate((1, 2, 3)):
        assert counts[f"s{i}"] / 12000 == pytest.approx(weight / 6, abs=0.02)


@pytest.mark.parametrize("n", [5, 10])
def test_maglev_removing_one_server_moves_about_one_nth_of_keys(n: int) -> None:
    pool = pool_of(*([1] * n))
    algorithm = make_algorithm("maglev")
    keys = flow_keys(20000)
    before = [pick(algorithm, pool, key, keep=False).name for key in keys]
    pool.remove("s3")
    after = [pick(algorithm, pool, key, keep=False).name for key in keys]
    moved = sum(b != a for b, a in zip(before, after, strict=True)) / len(keys)
    spurious = sum(b != a and b != "s3" for b, a in zip(before, after, strict=True)) / len(keys)
    assert moved == pytest.approx(1 / n, abs=0.02)
    assert spurious < 0.02


def test_maglev_is_deterministic_across_instances_and_configuration_order() -> None:
    keys = flow_keys(2000)
    one = make_algorithm("maglev", table_size=4099)
    two = make_algorithm("maglev", table_size=4099)
    forward = ServerPool([config("a", 1), config("b", 2), config("c", 1)])
    backward = ServerPool([config("c", 1), config("b", 2), config("a", 1)])
    assert [pick(one, forward, k, keep=False).name for k in keys] == [
        pick(two, backward, k, keep=False).name for k in keys
    ]


def test_maglev_falls_through_a_full_server_to_the_next_slots() -> None:
    pool = ServerPool([config("s0"), config("s1"), config("s2", max_sessions=1)])
    algorithm = make_algorithm("maglev")
    keys = flow_keys(3000)
    before = [pick(algorithm, pool, key, keep=False).name for key in keys]
    pool.session_started(pool.get("s2"))
    after = [pick(algorithm, pool, key, keep=False).name for key in keys]
    assert "s2" not in after
    assert all(b == a for b, a in zip(before, after, strict=True) if b != "s2")
    spilled = Counter(a for b, a in zip(before, after, strict=True) if b == "s2")
    assert spilled["s0"] > 300 and spilled["s1"] > 300  # the overflow spreads, not onto one neighbour


def test_maglev_rebuilds_only_when_the_pool_version_changes() -> None:
    pool = pool_of(1, 1)
    algorithm = Maglev(table_size=251)
    pick(algorithm, pool)
    table = algorithm.table
    pick(algorithm, pool)
    assert algorithm.table is table
    pool.set_weight("s0", 2)
    pick(algorithm, pool)
    assert algorithm.table is not table


# -- power of two choices -----------------------------------------------------------------------------------


def test_power_of_two_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[str]:
        pool = pool_of(1, 1, 1, 1, 1)
        algorithm = make_algorithm("power_of_two", seed=seed)
        return [pick(algorithm, pool, keep=i % 3 == 0).name for i in range(200)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_power_of_two_keeps_the_load_even() -> None:
    pool = pool_of(1, 1, 1, 1)
    algorithm = make_algorithm("power_of_two")
    for _ in range(400):
        pick(algorithm, pool)
    actives = [s.active for s in pool.servers]
    assert max(actives) - min(actives) <= 3


def test_power_of_two_takes_the_less_loaded_per_weight_of_two() -> None:
    pool = pool_of(1, 4)
    a, b = pool.servers
    a.active, b.active = 2, 4  # 2/1 against 4/4
    algorithm = make_algorithm("power_of_two", seed=123)
    assert all(pick(algorithm, pool, keep=False) is b for _ in range(20))


def test_shortest_expected_delay_prefers_capacity_when_idle() -> None:
    # Weights 1, 2, 4 and nobody busy: wlc would rotate from the first; sed goes to the weight-4 server.
    pool = pool_of(1, 2, 4)
    algorithm = make_algorithm("shortest_expected_delay")
    assert pick(algorithm, pool).name == "s2"


def test_shortest_expected_delay_counts_the_new_session() -> None:
    # Weights 1, 2, 4; scores (active + 1) / weight, ties rotating from after the last choice:
    # (1, 1/2, 1/4) s2; (1, 1/2, 1/2) tie, s1 comes first after s2; (1, 1, 1/2) s2; (1, 1, 3/4) s2;
    # (1, 1, 1) tie, s0 first after s2; (2, 1, 1) tie, s1 first after s0; (2, 3/2, 1) s2.
    pool = pool_of(1, 2, 4)
    algorithm = make_algorithm("shortest_expected_delay")
    assert [pick(algorithm, pool).name for _ in range(7)] == ["s2", "s1", "s2", "s2", "s0", "s1", "s2"]


def test_shortest_expected_delay_matches_wlc_with_equal_weights() -> None:
    pool_a, pool_b = pool_of(1, 1, 1), pool_of(1, 1, 1)
    sed, wlc = make_algorithm("shortest_expected_delay"), make_algorithm("weighted_least_connections")
    for i in range(30):
        a, b = pick(sed, pool_a, keep=i % 3 != 0), pick(wlc, pool_b, keep=i % 3 != 0)
        assert a.name == b.name
