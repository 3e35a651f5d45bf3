"""Configuration files: the bundled example loads; every bad key or value is a ConfigError naming file and key.

Two loaders: :func:`mplslb.config.balancer_config_from_section` (a balancer's own file, with ports, VIPs and
servers) and :func:`mplslb.sim.config.sim_config_from_toml` (the demo's scenario, whose ``[balancer]`` table goes
through the first). Each bad case is written to a file and loaded; the error must carry that file and the dotted
key of the offending value, and its message must start with both.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mplslb.balancer import Balancer
from mplslb.balancing.admission import RefuseWith
from mplslb.config import ConfigError, Section, balancer_config_from_section, load_toml
from mplslb.sim.config import EXAMPLE, sim_config_from_toml
from mplslb.sim.scenario import SimConfig, Workload, balancer_config_for


def write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_balancer(path: Path):  # type: ignore[no-untyped-def]
    source, data = load_toml(path)
    top = Section(source, "", data)
    config = balancer_config_from_section(top)
    top.done()
    return config


def assert_config_error(exc: ConfigError, path: Path, key: str) -> None:
    assert exc.source == str(path)
    assert exc.key == key, str(exc)
    assert str(exc) == f"{path}: {key}: {exc.reason}"
    assert exc.reason


# -- what loads ------------------------------------------------------------------------------------------------
def test_the_bundled_example_loads() -> None:
    config = sim_config_from_toml(EXAMPLE)
    assert config.seed == 7
    b = config.balancer
    assert b is not None
    assert (b.algorithm, b.l7, b.max_sessions, b.max_new_per_second, b.refuse_with) == (
        "weighted_least_connections",
        True,
        200,
        0.0,
        RefuseWith.RST,
    )
    assert (b.timeouts.tcp_start, b.timeouts.udp, b.timeouts.closed_linger) == (1.0, 1.0, 0.5)
    assert (b.label_quarantine, b.fail_threshold, b.rt_alpha) == (120.0, 3, 0.2)
    assert [(s.name, s.weight, s.max_sessions, s.workers) for s in config.servers] == [
        ("web1", 1, 0, 4),
        ("web2", 2, 0, 8),
        ("web3", 1, 0, 4),
        ("web4", 1, 15, 2),
    ]
    assert [(e.at, e.action, e.server) for e in config.events] == [
        (3.0, "fail", "web3"),
        (5.0, "drain", "web1"),
        (6.5, "recover", "web3"),
    ]
    assert (config.workload.clients, config.workload.sessions, config.workload.hosts[0]) == (
        80,
        4000,
        "www.example.com",
    )
    assert (config.client_ports, config.server_ports) == (2, 2)
    Balancer(balancer_config_for(config))  # and the balancer accepts what the loader accepted


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = sim_config_from_toml(write(tmp_path, "", "empty.toml"))
    defaults = SimConfig()
    assert config.servers == defaults.servers and config.workload == Workload() and config.events == ()
    assert config.balancer is not None and config.balancer.algorithm == "round_robin"


BALANCER_FILE = """\
algorithm = "maglev"
l7 = false

[[ports]]
id = 0
line_card = 0
number = 3
mac = "02:b0:00:00:00:00"
role = "client"

[[ports]]
id = 1
line_card = 1
mac = "02-B1-00-00-00-00"
role = "server"
name = "uplink"

[[vip]]
address = "10.0.0.100"
tcp = [80, 443]
udp = [53]

[[vip]]
address = "fd00::100"

[[servers]]
name = "s1"
address = "10.2.0.11"
mac = "02:5e:00:00:00:01"
port = 1
weight = 3
max_sessions = 50

[limits]
refuse_with = "icmp"
max_new_per_second = 100

[labels]
c2s_min = 101
c2s_max = 2001
"""


def test_a_balancer_file_loads(tmp_path: Path) -> None:
    config = load_balancer(write(tmp_path, BALANCER_FILE, "lb.toml"))
    assert [(p.port_id, p.line_card, p.number, p.mac.hex(":"), p.role, p.name) for p in config.ports] == [
        (0, 0, 3, "02:b0:00:00:00:00", "client", "port0"),
        (1, 1, 1, "02:b1:00:00:00:00", "server", "uplink"),
    ]
    assert [(v.address.hex(), v.tcp_ports, v.udp_ports) for v in config.vips] == [
        ("0a000064", (80, 443), (53,)),
        ("fd000000000000000000000000000100", (80,), ()),
    ]
    [server] = config.servers
    assert (server.name, server.port_id, server.weight, server.max_sessions) == ("s1", 1, 3, 50)
    assert (config.algorithm, config.l7, config.refuse_with, config.max_new_per_second) == (
        "maglev",
        False,
        RefuseWith.ICMP,
        100.0,
    )
    assert (config.c2s_min, config.c2s_max) == (101, 2001)
    Balancer(config)


# -- what does not: the demo's scenario file --------------------------------------------------------------------
SIM_ERRORS: list[tuple[str, str, str]] = [
    # unknown keys, at every level
    ("unknown_top", "colour = 1", "colour"),
    ("unknown_balancer", "[balancer]\nalgo = 'x'", "balancer.algo"),
    ("unknown_limits", "[balancer.limits]\nmax_session = 3", "balancer.limits.max_session"),
    ("unknown_timeouts", "[balancer.timeouts]\ntcp_syn = 3.0", "balancer.timeouts.tcp_syn"),
    ("unknown_labels", "[balancer.labels]\nmin = 17", "balancer.labels.min"),
    ("unknown_health", "[balancer.health]\nprobe = true", "balancer.health.probe"),
    ("unknown_workload", "[workload]\nusers = 3", "workload.users"),
    ("unknown_network", "[network]\nlatency = 1.0", "network.latency"),
    ("unknown_server", "[[servers]]\nname = 'a'\ncpu = 2", "servers[0].cpu"),
    ("unknown_second_server", "[[servers]]\nname = 'a'\n[[servers]]\nname = 'b'\nram = 1", "servers[1].ram"),
    ("unknown_event", "[[events]]\nat = 1.0\naction = 'fail'\nserver = 'web1'\nwhy = 'x'", "events[0].why"),
    ("ports_in_sim", "[balancer]\nports = []", "balancer.ports"),
    ("vip_in_sim", "[[balancer.vip]]\naddress = '10.0.0.1'", "balancer.vip"),
    ("servers_in_sim", "[[balancer.servers]]\nname = 'x'", "balancer.servers"),
    # wrong types
    ("seed_float", "seed = 1.5", "seed"),
    ("balancer_not_table", "balancer = 3", "balancer"),
    ("limits_not_table", "[balancer]\nlimits = 3", "balancer.limits"),
    ("algorithm_int", "[balancer]\nalgorithm = 3", "balancer.algorithm"),
    ("l7_string", "[balancer]\nl7 = 'yes'", "balancer.l7"),
    ("params_not_table", "[balancer]\nalgorithm_params = 3", "balancer.algorithm_params"),
    ("max_sessions_float", "[balancer.limits]\nmax_sessions = 1.5", "balancer.limits.max_sessions"),
    ("max_sessions_bool", "[balancer.limits]\nmax_sessions = true", "balancer.limits.max_sessions"),
    ("rate_string", "[balancer.limits]\nmax_new_per_second = 'fast'", "balancer.limits.max_new_per_second"),
    ("timeout_string", "[balancer.timeouts]\nudp = '1s'", "balancer.timeouts.udp"),
    ("quarantine_bool", "[balancer.labels]\nquarantine = false", "balancer.labels.quarantine"),
    ("c2s_min_float", "[balancer.labels]\nc2s_min = 17.0", "balancer.labels.c2s_min"),
    ("fail_threshold_string", "[balancer.health]\nfail_threshold = '3'", "balancer.health.fail_threshold"),
    ("clients_float", "[workload]\nclients = 2.5", "workload.clients"),
    ("hosts_string", "[workload]\nhosts = 'www'", "workload.hosts"),
    ("trace_int", "[workload]\ntrace = 1", "workload.trace"),
    ("client_ports_string", "[network]\nclient_ports = 'two'", "network.client_ports"),
    ("servers_not_array", "[servers]\nname = 'a'", "servers"),
    ("events_not_array", "events = 3", "events"),
    ("server_without_name", "[[servers]]\nweight = 1", "servers[0].name"),
    ("server_name_int", "[[servers]]\nname = 1", "servers[0].name"),
    ("server_workers_float", "[[servers]]\nname = 'a'\nworkers = 1.5", "servers[0].workers"),
    ("event_at_string", "[[events]]\nat = 'soon'\naction = 'fail'\nserver = 'web1'", "events[0].at"),
    ("event_without_action", "[[events]]\nat = 1.0\nserver = 'web1'", "events[0].action"),
    (
        "event_weight_float",
        "[[events]]\nat = 1.0\naction = 'weight'\nserver = 'web1'\nweight = 0.5",
        "events[0].weight",
    ),
    # bad values
    ("negative_max_sessions", "[balancer.limits]\nmax_sessions = -1", "balancer.limits.max_sessions"),
    ("negative_rate", "[balancer.limits]\nmax_new_per_second = -0.5", "balancer.limits.max_new_per_second"),
    ("negative_rt_limit", "[balancer.limits]\nmax_response_time = -1", "balancer.limits.max_response_time"),
    ("unknown_algorithm", "[balancer]\nalgorithm = 'random'", "balancer.algorithm"),
    ("bad_refuse_with", "[balancer.limits]\nrefuse_with = 'ignore'", "balancer.limits.refuse_with"),
    ("negative_quarantine", "[balancer.labels]\nquarantine = -1", "balancer.labels.quarantine"),
    ("even_c2s_min", "[balancer.labels]\nc2s_min = 18", "balancer.labels.c2s_min"),
    ("reserved_c2s_min", "[balancer.labels]\nc2s_min = 15", "balancer.labels.c2s_min"),
    ("fail_threshold_0", "[balancer.health]\nfail_threshold = 0", "balancer.health.fail_threshold"),
    ("rt_alpha_0", "[balancer.health]\nrt_alpha = 0", "balancer.health.rt_alpha"),
    ("rt_alpha_above_1", "[balancer.health]\nrt_alpha = 1.5", "balancer.health.rt_alpha"),
    ("no_clients", "[workload]\nclients = 0", "workload.clients"),
    ("no_sessions", "[workload]\nsessions = 0", "workload.sessions"),
    ("zero_rate", "[workload]\nrate = 0", "workload.rate"),
    ("udp_fraction_above_1", "[workload]\nudp_fraction = 1.5", "workload.udp_fraction"),
    ("ipv6_fraction_negative", "[workload]\nipv6_fraction = -0.1", "workload.ipv6_fraction"),
    ("missing_trace", "[workload]\ntrace = '/nonexistent/trace.tsv'", "workload.trace"),
    ("client_ports_0", "[network]\nclient_ports = 0", "network.client_ports"),
    ("server_ports_65", "[network]\nserver_ports = 65", "network.server_ports"),
    ("server_workers_0", "[[servers]]\nname = 'a'\nworkers = 0", "servers[0].workers"),
    ("server_service_time_negative", "[[servers]]\nname = 'a'\nservice_time = -1.0", "servers[0].service_time"),
    ("server_weight_negative", "[[servers]]\nname = 'a'\nweight = -1", "servers[0].weight"),
    ("duplicate_server", "[[servers]]\nname = 'a'\n[[servers]]\nname = 'a'", "servers[1].name"),
    ("unknown_action", "[[events]]\nat = 1.0\naction = 'explode'\nserver = 'web1'", "events[0].action"),
    ("unknown_event_server", "[[events]]\nat = 1.0\naction = 'fail'\nserver = 'web9'", "events[0].server"),
    (
        "event_server_not_in_file",
        "[[servers]]\nname = 'a'\n[[events]]\nat = 1.0\naction = 'down'\nserver = 'web1'",
        "events[0].server",
    ),
]

SIM_REGRESSIONS: list[tuple[str, str, str, str]] = [
    (
        "negative_timeout",
        "[balancer.timeouts]\ntcp_start = -1",
        "balancer.timeouts.tcp_start",
        "was a bug: a bad [balancer.timeouts] value is reported under the key 'balancer.timeouts.(values)' "
        "(Section.build('(values)', Timeouts, ...)), not the offending key",
    ),
    (
        "even_c2s_max",
        "[balancer.labels]\nc2s_max = 1000",
        "balancer.labels.c2s_max",
        "was a bug: a bad labels.c2s_max (even, or below c2s_min) is reported under the key 'balancer.labels.c2s_min'",
    ),
    (
        "server_max_sessions_negative",
        "[[servers]]\nname = 'a'\nmax_sessions = -1",
        "servers[0].max_sessions",
        "was a bug: sim_config_from_toml reports a negative [[servers]] max_sessions under 'servers[0].weight'",
    ),
    (
        "nan_rate_limit",
        "[balancer.limits]\nmax_new_per_second = nan",
        "balancer.limits.max_new_per_second",
        "was a bug: nan passes the 'value < 0' check; the loader accepts it and Balancer() raises ValueError "
        "(AdmissionControl: must be finite) when the demo builds the network",
    ),
    (
        "inf_rate_limit",
        "[balancer.limits]\nmax_new_per_second = inf",
        "balancer.limits.max_new_per_second",
        "was a bug: inf is accepted by the loader; AdmissionControl raises ValueError (must be finite) in Balancer()",
    ),
    (
        "inf_max_response_time",
        "[balancer.limits]\nmax_response_time = inf",
        "balancer.limits.max_response_time",
        "was a bug: inf was accepted by the loader; ServerPool raised ValueError in Balancer()",
    ),
    (
        "nan_quarantine",
        "[balancer.labels]\nquarantine = nan",
        "balancer.labels.quarantine",
        "was a bug: nan passes 'quarantine < 0'; LabelManager raises ValueError (must be finite) in Balancer()",
    ),
    (
        "inf_quarantine",
        "[balancer.labels]\nquarantine = inf",
        "balancer.labels.quarantine",
        "was a bug: inf is accepted by the loader; LabelManager raises ValueError (must be finite) in Balancer()",
    ),
    (
        "bad_algorithm_params",
        "[balancer]\nalgorithm_params = { bogus = 1 }",
        "balancer.algorithm_params",
        "was a bug: algorithm_params are not checked by the loader; make_algorithm raises ValueError in Balancer()",
    ),
    (
        "nan_workload_rate",
        "[workload]\nrate = nan",
        "workload.rate",
        "was a bug: nan passes the 'rate <= 0' check (so do session_timeout and trace_speedup): the run draws NaN "
        "arrival times",
    ),
    (
        "negative_event_weight",
        "[[events]]\nat = 1.0\naction = 'weight'\nserver = 'web1'\nweight = -1",
        "events[0].weight",
        "was a bug: a negative event weight is accepted; ServerPool.set_weight raises ValueError mid-simulation",
    ),
    (
        "host_not_a_string",
        "[workload]\nhosts = [1, 2]",
        "workload.hosts",
        "was a bug: list elements are not type-checked (workload.hosts, also [[vip]] tcp/udp elements are only "
        "checked by VirtualService): hosts = [1, 2] is accepted",
    ),
]


@pytest.mark.parametrize(("name", "text", "key"), SIM_ERRORS, ids=[c[0] for c in SIM_ERRORS])
def test_bad_scenario_files(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        sim_config_from_toml(path)
    assert_config_error(info.value, path, key)


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [pytest.param(n, t, k, id=n) for n, t, k, _ in SIM_REGRESSIONS],
)
def test_bad_scenario_values_named_at_load(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        sim_config_from_toml(path)
    assert_config_error(info.value, path, key)


def test_sim_error_cases_are_distinct() -> None:
    names = [c[0] for c in SIM_ERRORS] + [c[0] for c in SIM_REGRESSIONS]
    assert len(names) == len(set(names))


def test_unreadable_and_broken_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        sim_config_from_toml(missing)
    assert_config_error(info.value, missing, "(file)")
    broken = write(tmp_path, "[balancer\nalgorithm = 1\n")
    with pytest.raises(ConfigError) as info:
        sim_config_from_toml(broken)
    assert_config_error(info.value, broken, "(syntax)")
    duplicate = write(tmp_path, "seed = 1\nseed = 2\n", "dup.toml")
    with pytest.raises(ConfigError) as info:
        sim_config_from_toml(duplicate)
    assert_config_error(info.value, duplicate, "(syntax)")


# -- what does not: a balancer's own file ------------------------------------------------------------------------
def _replace(old: str, new: str) -> str:
    assert old in BALANCER_FILE
    return BALANCER_FILE.replace(old, new, 1)


SECOND = """
[[servers]]
name = "s2"
address = "{addr}"
mac = "{mac}"
port = 1
"""

BALANCER_ERRORS: list[tuple[str, str, str]] = [
    ("unknown_port_key", _replace('role = "client"', 'role = "client"\nspeed = 10'), "ports[0].speed"),
    ("unknown_vip_key", _replace("udp = [53]", "udp = [53]\nsctp = [1]"), "vip[0].sctp"),
    ("unknown_server_key", _replace("weight = 3", "weight = 3\nzone = 'a'"), "servers[0].zone"),
    ("unknown_top_key", "speed = 1\n" + BALANCER_FILE, "speed"),
    ("port_without_id", _replace("id = 0\n", ""), "ports[0].id"),
    ("port_id_string", _replace("id = 0\n", "id = 'zero'\n"), "ports[0].id"),
    ("port_without_mac", _replace('mac = "02:b0:00:00:00:00"\n', ""), "ports[0].mac"),
    ("bad_port_mac", _replace('mac = "02:b0:00:00:00:00"', 'mac = "02:b0:00:00:00"'), "ports[0].mac"),
    ("bad_port_mac_hex", _replace('mac = "02:b0:00:00:00:00"', 'mac = "02:b0:00:00:00:zz"'), "ports[0].mac"),
    ("port_mac_int", _replace('mac = "02:b0:00:00:00:00"', "mac = 2"), "ports[0].mac"),
    ("bad_role", _replace('role = "client"', 'role = "router"'), "ports[0].role"),
    ("line_card_string", _replace("line_card = 0", "line_card = 'a'"), "ports[0].line_card"),
    ("ports_not_array", _replace("[[ports]]\nid = 0", "[ports]\nid = 0").split("[[ports]]")[0], "ports"),
    ("bad_vip_address", _replace('address = "10.0.0.100"', 'address = "10.0.0.300"'), "vip[0].address"),
    ("vip_address_int", _replace('address = "10.0.0.100"', "address = 10"), "vip[0].address"),
    ("vip_tcp_port_0", _replace("tcp = [80, 443]", "tcp = [0]"), "vip[0].tcp"),
    ("vip_tcp_not_list", _replace("tcp = [80, 443]", "tcp = 80"), "vip[0].tcp"),
    ("vip_tcp_string_element", _replace("tcp = [80, 443]", "tcp = ['80']"), "vip[0].tcp"),
    ("server_unknown_port", _replace("port = 1\n", "port = 7\n"), "servers[0].port"),
    ("bad_server_ip", _replace('address = "10.2.0.11"', 'address = "10.2.0"'), "servers[0].address"),
    ("bad_server_mac", _replace('mac = "02:5e:00:00:00:01"', 'mac = "02:5e"'), "servers[0].mac"),
    ("server_without_address", _replace('address = "10.2.0.11"\n', ""), "servers[0].address"),
    ("server_weight_negative", _replace("weight = 3", "weight = -3"), "servers[0].weight"),
    ("server_weight_string", _replace("weight = 3", "weight = 'x'"), "servers[0].weight"),
    ("c2s_min_above_c2s_max", _replace("c2s_min = 101", "c2s_min = 2003"), "labels.c2s_min"),
    (
        "server_same_address",
        _replace(
            "max_sessions = 50\n", "max_sessions = 50\n" + SECOND.format(addr="10.2.0.11", mac="02:5e:00:00:00:02")
        ),
        "servers[1].address",
    ),
    (
        "server_same_mac",
        _replace(
            "max_sessions = 50\n", "max_sessions = 50\n" + SECOND.format(addr="10.2.0.12", mac="02:5E:00:00:00:01")
        ),
        "servers[1].mac",
    ),
]


def test_a_duplicate_server_address_names_both_servers(tmp_path: Path) -> None:
    text = _replace(
        "max_sessions = 50\n", "max_sessions = 50\n" + SECOND.format(addr="10.2.0.11", mac="02:5e:00:00:00:09")
    )
    path = write(tmp_path, text, "lb.toml")
    with pytest.raises(
        ConfigError, match=r"servers\[1\]\.address: 10\.2\.0\.11 is already the address of servers\[0\]"
    ):
        load_balancer(path)


BALANCER_REGRESSIONS: list[tuple[str, str, str, str]] = [
    (
        "vip_udp_port_out_of_range",
        _replace("udp = [53]", "udp = [70000]"),
        "vip[0].udp",
        "was a bug: balancer_config_from_section builds VirtualService under the key 'tcp', so a bad udp port is "
        "reported as vip[0].tcp",
    ),
    (
        "server_max_sessions_negative",
        _replace("max_sessions = 50", "max_sessions = -1"),
        "servers[0].max_sessions",
        "was a bug: ServerConfig is built under the key 'weight': a bad max_sessions is reported as servers[0].weight",
    ),
    (
        "server_empty_name",
        _replace('name = "s1"', 'name = ""'),
        "servers[0].name",
        "was a bug: an empty server name is reported as servers[0].weight (ServerConfig built under 'weight')",
    ),
    (
        "server_on_a_client_port",
        _replace("port = 1\n", "port = 0\n"),
        "servers[0].port",
        "was a bug: a server on a client port passes the 'no port with id' check and is caught by BalancerConfig, "
        "reported under the key '(balancer)'",
    ),
    (
        "even_c2s_max",
        _replace("c2s_max = 2001", "c2s_max = 2000"),
        "labels.c2s_max",
        "was a bug: an even c2s_max is reported under the key labels.c2s_min",
    ),
]


@pytest.mark.parametrize(("name", "text", "key"), BALANCER_ERRORS, ids=[c[0] for c in BALANCER_ERRORS])
def test_bad_balancer_files(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = write(tmp_path, text, "lb.toml")
    with pytest.raises(ConfigError) as info:
        load_balancer(path)
    assert_config_error(info.value, path, key)


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [pytest.param(n, t, k, id=n) for n, t, k, _ in BALANCER_REGRESSIONS],
)
def test_bad_balancer_values_named_by_their_key(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = write(tmp_path, text, "lb.toml")
    with pytest.raises(ConfigError) as info:
        load_balancer(path)
    assert_config_error(info.value, path, key)


def test_balancer_file_needs_both_port_roles_and_a_vip(tmp_path: Path) -> None:
    no_server_port = _replace('role = "server"', 'role = "client"')
    path = write(tmp_path, no_server_port, "lb.toml")
    with pytest.raises(ConfigError, match="server port") as info:
        load_balancer(path)
    assert info.value.source == str(path)
    without_vips = BALANCER_FILE.split("[[vip]]")[0] + "[[servers]]" + BALANCER_FILE.split("[[servers]]")[1]
    path = write(tmp_path, without_vips, "novip.toml")
    with pytest.raises(ConfigError, match="virtual IP") as info:
        load_balancer(path)
    assert info.value.source == str(path)


@pytest.mark.parametrize(("name", "text", "key"), BALANCER_ERRORS, ids=[c[0] for c in BALANCER_ERRORS])
def test_check_config_names_file_key_and_reason(tmp_path: Path, name: str, text: str, key: str) -> None:
    from click.testing import CliRunner

    from mplslb.cli import main

    path = write(tmp_path, text, "lb.toml")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert f"Error: {path}: {key}: " in result.output


def test_check_config_accepts_the_labs_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mplslb.cli import main
    from mplslb.lab import Lab, LabSpec

    path = write(tmp_path, Lab(LabSpec(), root=tmp_path).balancer_toml(), "lb.toml")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{path}: valid: 3 ports, 2 virtual IPs, 3 servers")
