"""The BGP speaker's pure parts: ``[bgp]`` read and refused with file, key and reason; the BIRD configurations it
writes (checked by the real ``bird -p`` when installed); BIRD's control-socket replies (captured from BIRD 2.0.12)
parsed into the status rows and shown as a table."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from helpers import standard_balancer
from mplslb.bgp import (
    BgpConfig,
    BirdError,
    bird_config,
    is_final,
    parse_protocols,
    parse_routes,
    parse_server_time,
    peer_rows,
    read_bgp,
    reply_lines,
    router_bird_config,
)
from mplslb.config import ConfigError, Section, load_toml
from mplslb.control.metrics import SnapshotCollector
from mplslb.control.tables import bgp_table, snapshot

# Replies read from BIRD 2.0.12's control socket (a node speaker with one established neighbour, then one whose
# neighbour went away), byte for byte.
SHOW_PROTOCOLS = """\
2002-Name       Proto      Table      State  Since         Info
1002-device1    Device     ---        up     2026-12-01 02:44:54  
 bfd1       BFD        ---        up     2026-12-01 02:44:54  
 announce4  Static     master4    up     2026-12-01 02:45:03  
 up1        BGP        ---        up     2026-12-01 02:44:58  Established   
0000 
"""  # noqa: W291 - BIRD pads its columns
SHOW_PROTOCOLS_DOWN = """\
2002-Name       Proto      Table      State  Since         Info
1002-device1    Device     ---        up     2026-12-01 02:44:54  
 bfd1       BFD        ---        up     2026-12-01 02:44:54  
 announce4  Static     master4    up     2026-12-01 02:45:03  
 up1        BGP        ---        start  2026-12-01 02:45:05  Active        Received: Administrative shutdown
0000 
"""  # noqa: W291
SHOW_ROUTE_EXPORT = """\
1007-Table master4:
 10.0.0.100/32        blackhole [announce4 2026-12-01 02:44:57] * (200)
 10.80.0.1/32         blackhole [announce4 2026-12-01 02:44:57] * (200)
0000 
"""  # noqa: W291
SHOW_STATUS = """\
1000-BIRD 2.0.12
1011-Router ID is 10.99.0.2
 Hostname is vm
 Current server time is 2026-12-01 02:45:03
 Last reboot on 2026-12-01 02:44:54
 Last reconfiguration on 2026-12-01 02:44:54
0013 Daemon is up and running
"""
DISABLED = "0009-announce4: disabled\n0000 \n"
SYNTAX_ERROR = "9001 syntax error, unexpected CF_SYM_UNDEFINED, expecting END or CF_SYM_KNOWN or TEXT or ALL\n"

GOOD = """
[bgp]
local_as = 65001
router_id = "10.90.1.2"
neighbors = ["10.90.1.1"]
neighbor_as = 65000
"""
SERVICE = ["10.0.0.100", "fd00::100", "10.80.0.1"]


def load(tmp_path: Path, text: str) -> BgpConfig | None:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    source, data = load_toml(path)
    top = Section(source, "", data)
    config = read_bgp(top, SERVICE)
    top.done()
    return config


def test_no_bgp_table_is_no_speaker(tmp_path: Path) -> None:
    assert load(tmp_path, "") is None


def test_announce_defaults_to_the_service_addresses_of_the_neighbours_family(tmp_path: Path) -> None:
    config = load(tmp_path, GOOD)
    assert config is not None
    assert config.announce == ("10.0.0.100/32", "10.80.0.1/32")  # no IPv6 neighbour: fd00::100 is not announced
    assert config.peer_names() == {"peer1": "10.90.1.1"}
    assert (config.bfd, config.bfd_interval, config.bfd_multiplier, config.hold_time) == (True, 0.1, 3, 3)


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ("local_as = 0", "bgp.local_as", "within 1..4294967295"),
        ('local_as = "x"', "bgp.local_as", "expected int"),
        ('router_id = "fd00::1"', "bgp.router_id", "IPv4"),
        ("neighbors = []", "bgp.neighbors", "at least one"),
        ('neighbors = ["10.90.1.300"]', "bgp.neighbors", "does not appear to be"),
        ('announce = ["10.0.0.1/24"]', "bgp.announce", "host bits set"),
        ('announce = ["fd00::100/128"]', "bgp.announce", "no neighbour of its address family"),
        ("announce = []", "bgp.announce", "nothing to announce"),
        ("hold_time = 2", "bgp.hold_time", ">= 3"),
        ("keepalive_time = 3", "bgp.keepalive_time", "below hold_time"),
        ("bfd_interval = 0", "bgp.bfd_interval", ">= 0.01"),
        ("bfd = 1", "bgp.bfd", "expected bool"),
        ("colour = 1", "bgp.colour", "unknown key"),
    ],
)
def test_a_bad_bgp_table_names_file_key_and_reason(tmp_path: Path, change: str, key: str, reason: str) -> None:
    name = change.split(" = ")[0]
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(f"{name} =")) + f"\n{change}\n"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.source == str(tmp_path / "lb.toml")
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, GOOD.replace("neighbor_as = 65000", ""))
    assert (caught.value.key, caught.value.reason) == ("bgp.neighbor_as", "is required")


def node_config(**overrides: object) -> BgpConfig:
    base: dict[str, object] = dict(
        local_as=65001,
        router_id="10.90.1.2",
        neighbors=("10.90.1.1", "fd90::1"),
        neighbor_as=65000,
        announce=("10.0.0.100/32", "10.80.0.1/32", "fd00::100/128"),
    )
    return BgpConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_the_node_speaker_starts_withdrawn_and_exports_only_its_prefixes() -> None:
    text = bird_config(node_config())
    assert "protocol static announce4 {\n  disabled yes;\n  ipv4;\n  route 10.0.0.100/32 blackhole;" in text
    assert "protocol static announce6 {\n  disabled yes;\n  ipv6;\n  route fd00::100/128 blackhole;" in text
    assert "protocol kernel" not in text  # nothing announced is ever installed on the node
    assert 'export where proto = "announce4"; next hop self;' in text
    assert 'ipv6 { import none; export where proto = "announce6"; next hop self; }' in text
    assert "min rx interval 100 ms; min tx interval 100 ms; multiplier 3;" in text
    assert "bfd on;" in text and "bfd off;" in bird_config(node_config(bfd=False))
    assert "protocol bfd" not in bird_config(node_config(bfd=False))


BIRD = shutil.which("bird") or ("/usr/sbin/bird" if Path("/usr/sbin/bird").exists() else None)


@pytest.mark.skipif(BIRD is None, reason="BIRD 2 (Debian bird2) is not installed; make test installs it")
@pytest.mark.parametrize(
    "text",
    [
        bird_config(node_config()),
        bird_config(node_config(bfd=False, neighbors=("10.90.1.1",), announce=("10.0.0.100/32",))),
        router_bird_config("10.79.0.1", 65000, [("10.90.1.2", 65001), ("10.90.2.2", 65001)], bfd_interval=0.2),
    ],
)
def test_bird_accepts_the_configurations(tmp_path: Path, text: str) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(text)
    assert BIRD is not None
    done = subprocess.run([BIRD, "-p", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_the_router_merges_equal_paths_into_one_multipath_route() -> None:
    text = router_bird_config("10.79.0.1", 65000, [("10.90.1.2", 65001), ("10.90.2.2", 65002)], bfd_interval=0.2)
    assert "merge paths on;" in text and "export all;" in text
    assert "neighbor 10.90.1.2 as 65001;" in text and "neighbor 10.90.2.2 as 65002;" in text
    assert "min rx interval 200 ms;" in text and text.count("bfd on;") == 2


def test_a_reply_ends_at_a_code_followed_by_a_space() -> None:
    assert [is_final(line) for line in SHOW_PROTOCOLS.splitlines()] == [False] * 5 + [True]
    assert is_final("0013 Daemon is up and running") and not is_final(" 0013 indented")


def test_show_protocols_gives_each_protocol_its_state_since_and_info() -> None:
    protocols = parse_protocols(reply_lines(SHOW_PROTOCOLS))
    assert [p.name for p in protocols] == ["device1", "bfd1", "announce4", "up1"]
    up1 = protocols[-1]
    assert (up1.proto, up1.state, up1.since, up1.info) == ("BGP", "up", "2026-12-01 02:44:58", "Established")
    down = parse_protocols(reply_lines(SHOW_PROTOCOLS_DOWN))[-1]
    assert (down.state, down.info) == ("start", "Active        Received: Administrative shutdown")


def test_show_route_export_gives_the_prefixes_and_show_status_the_clock() -> None:
    assert parse_routes(reply_lines(SHOW_ROUTE_EXPORT)) == ["10.0.0.100/32", "10.80.0.1/32"]
    assert parse_routes(reply_lines("0000 \n")) == []
    assert parse_server_time(reply_lines(SHOW_STATUS)) == dt.datetime(2026, 12, 1, 2, 45, 3)
    assert reply_lines(DISABLED) == [(9, "announce4: disabled"), (0, "")]
    with pytest.raises(BirdError, match="syntax error"):
        reply_lines(SYNTAX_ERROR)


def test_status_rows_say_which_neighbours_are_established_for_how_long_and_what_they_get() -> None:
    now = parse_server_time(reply_lines(SHOW_STATUS))
    exported = {"up1": parse_routes(reply_lines(SHOW_ROUTE_EXPORT))}
    peers = {"up1": "10.99.0.1", "up2": "10.99.0.9"}
    rows = peer_rows(parse_protocols(reply_lines(SHOW_PROTOCOLS)), peers, exported, now)
    assert rows[0]["established"] and rows[0]["state"] == "Established" and rows[0]["uptime_s"] == 5.0
    assert rows[0]["announced"] == ["10.0.0.100/32", "10.80.0.1/32"]
    assert rows[1]["state"] == "unknown" and not rows[1]["established"] and rows[1]["announced"] == []
    down = peer_rows(parse_protocols(reply_lines(SHOW_PROTOCOLS_DOWN)), peers, exported, now)[0]
    assert not down["established"] and down["state"] == "Active" and down["announced"] == []

    console = Console(width=200, record=True)
    bgp = {"speaker": "running", "announcing": True, "local_as": 65001, "router_id": "10.99.0.2", "peers": rows}
    console.print(bgp_table(bgp))
    shown = console.export_text()
    assert "BGP (AS 65001, router id 10.99.0.2, speaker running, announcing)" in shown
    assert "10.99.0.1" in shown and "Established" in shown and "5s" in shown
    assert "10.0.0.100/32, 10.80.0.1/32" in shown
    console.print(bgp_table({**bgp, "announcing": False, "reason": "no_server_up", "peers": [down]}))
    assert "withdrawn (no_server_up)" in console.export_text()


def test_metrics_say_whether_the_node_announces_and_which_sessions_are_up() -> None:
    rows = peer_rows(
        parse_protocols(reply_lines(SHOW_PROTOCOLS)),
        {"up1": "10.99.0.1", "up2": "10.99.0.9"},
        {},
        parse_server_time(reply_lines(SHOW_STATUS)),
    )
    snap = {**snapshot(standard_balancer(), now=0.0), "bgp": {"announcing": True, "peers": rows}}
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    assert "mplslb_bgp_announcing 1.0" in text
    assert 'mplslb_bgp_peer_established{neighbor="10.99.0.1"} 1.0' in text
    assert 'mplslb_bgp_peer_established{neighbor="10.99.0.9"} 0.0' in text
