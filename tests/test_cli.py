"""The ``mplslb`` command: the demo runs, prints its tables and writes both captures; bad configs fail cleanly."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from helpers import make_config
from mplslb.balancer import Balancer
from mplslb.cli import main
from mplslb.control import ControlServer, balancer_commands
from mplslb.wire.pcap import LINKTYPE_ETHERNET, PcapRecord, read_pcap

MPLS = b"\x88\x47"
TABLES = ("Sessions", "Servers", "Packets at the balancer", "Session labels", "Drops by reason")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def label_of(frame: bytes) -> int:
    return int.from_bytes(frame[14:17], "big") >> 4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    capture = tmp_path_factory.mktemp("demo") / "d.pcap"
    return invoke("demo", "--sessions", "200", "--capture", str(capture)), capture


def test_demo_exits_zero_and_prints_the_tables(demo_run: tuple[Result, Path]) -> None:
    result, capture = demo_run
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("mplslb demo: 200 sessions")
    for title in TABLES:
        assert re.search(rf"^{re.escape(title)}\b", out, re.MULTILINE), title
    assert re.search(r"started \(balancer\)\s*\S\s*200\b", out)
    assert re.search(r"allocated\s*\S\s*200\b", out)
    assert str(capture) in out and str(capture.with_name("d-servers.pcap")) in out


def _frames(path: Path) -> list[PcapRecord]:
    assert path.is_file(), path
    return list(read_pcap(path))


def test_demo_writes_both_captures(demo_run: tuple[Result, Path]) -> None:
    result, capture = demo_run
    assert result.exit_code == 0, result.output
    clients = _frames(capture)
    servers = _frames(capture.with_name("d-servers.pcap"))
    assert clients and servers
    for records in (clients, servers):
        assert {r.linktype for r in records} == {LINKTYPE_ETHERNET}
        assert all(r.orig_len == len(r.data) for r in records)
        stamps = [r.timestamp for r in records]
        assert stamps == sorted(stamps)
    # Each session's first frame reaches the balancer unlabelled on the client side...
    unlabelled = [r for r in clients if r.data[12:14] != MPLS]
    assert len(unlabelled) >= 200
    # ...while every frame on the server side carries a session label: odd toward a server, even back.
    assert all(r.data[12:14] == MPLS for r in servers)
    balancer_macs = {r.data[6:12] for r in servers if label_of(r.data) % 2 == 1}
    assert all(r.data[0:6] in balancer_macs for r in servers if label_of(r.data) % 2 == 0)
    # Every frame the balancer took in or sent out was captured once.
    match = re.search(r"frames in / out\s*\S\s*(\d+) / (\d+)", result.output)
    assert match is not None
    assert len(clients) + len(servers) == int(match[1]) + int(match[2])


def test_demo_without_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default capture would be ./demo.pcap
    result = invoke("demo", "--sessions", "20", "--no-capture", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "seed 3" in result.output.splitlines()[0]
    assert list(tmp_path.iterdir()) == []
    assert "capture:" not in result.output


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[balancer.limits]\nmax_sessions = -1\n", "balancer.limits.max_sessions"),
        ("[workload]\nsessions = 'many'\n", "workload.sessions"),
        ("[balancer]\nalgorithm = 'random'\n", "balancer.algorithm"),
        ("[[events]]\nat = 1.0\naction = 'explode'\nserver = 'web1'\n", "events[0].action"),
        ("[network]\nspeed = 10\n", "network.speed"),
        ("[balancer\n", "(syntax)"),
    ],
)
def test_demo_with_a_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    capture = tmp_path / "never.pcap"
    result = invoke("demo", "--config", str(config), "--capture", str(capture))
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean error, no traceback
    assert f"Error: {config}: {key}: " in result.output
    assert not capture.exists()


def test_demo_with_a_missing_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = invoke("demo", "--config", str(missing), "--no-capture")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert f"{missing}: (file): " in result.output


def test_demo_rejects_zero_sessions() -> None:
    result = invoke("demo", "--sessions", "0", "--no-capture")
    assert result.exit_code == 2 and "--sessions" in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and re.search(r"\d+\.\d+\.\d+", result.output)


def test_demo_with_a_nan_limit_fails_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "nan.toml"
    config.write_text("[balancer.limits]\nmax_new_per_second = nan\n")
    result = invoke("demo", "--config", str(config), "--no-capture")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "balancer.limits.max_new_per_second" in result.output


def test_demo_capture_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    result = invoke("demo", "--sessions", "5", "--capture", str(tmp_path / "no" / "such" / "d.pcap"))
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)


# -- live changes through the control socket ------------------------------------------------------------------------
@pytest.fixture
def control() -> Iterator[tuple[str, Balancer]]:
    """A balancer behind a real control socket served on a thread; yields the socket path and the balancer."""
    short = tempfile.mkdtemp(prefix="mplslb-")  # AF_UNIX paths are short; tmp_path may not be
    path = os.path.join(short, "c.sock")
    balancer = Balancer(make_config())
    reloads = iter([{"ok": True, "file": "/etc/lb.toml", "changes": ["servers.s1.weight:1->0"]}])
    server = ControlServer(
        path,
        dict,
        balancer_commands(
            balancer,
            clock=lambda: 0.0,
            reload=lambda: next(reloads, {"error": "reload refused: /etc/lb.toml: ports[0].interface: no"}),
        ),
    )
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.run_once(0.02)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, balancer
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
        os.rmdir(short)


def test_server_subcommands_change_the_pool_and_say_what_changed(control: tuple[str, Balancer]) -> None:
    sock, b = control
    add = ["server", "add", "s4", "--ip", "10.2.0.4", "--mac", "02:5e:00:00:00:04", "--port", "2", "--weight", "3"]
    result = invoke(*add, "--socket", sock)
    assert result.exit_code == 0, result.output
    assert result.output == "server s4: up, weight 3\nchanged servers.s4:added\n"
    assert b.pool.get("s4").weight == 3
    result = invoke(*add, "--socket", sock)  # the same again: refused, naming the key
    assert result.exit_code == 1 and "name: duplicate server name 's4'" in result.output
    assert invoke("server", "weight", "s4", "0", "--socket", sock).output == (
        "server s4: up, weight 0\nchanged servers.s4.weight:3->0\n"
    )
    assert invoke("server", "drain", "s1", "--socket", sock).output.endswith("servers.s1.status:up->draining\n")
    assert invoke("server", "up", "s1", "--socket", sock).output.startswith("server s1: up")
    assert invoke("server", "down", "s2", "--socket", sock).output.startswith("server s2: down")
    result = invoke("server", "remove", "s4", "--socket", sock)
    assert result.output == "server s4: removed\nchanged servers.s4:removed\n"
    result = invoke("server", "remove", "s9", "--now", "--socket", sock)
    assert result.exit_code == 1 and "no server named 's9'" in result.output
    assert [s.name for s in b.pool] == ["s1", "s2", "s3"]


def test_set_and_reload_subcommands(control: tuple[str, Balancer]) -> None:
    sock, b = control
    result = invoke("set", "algorithm", "maglev", "--param", "table_size=251", "--socket", sock)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == ["algorithm maglev", "changed algorithm:round_robin->maglev"]
    assert b.config.algorithm_params == {"table_size": 251}
    assert invoke("set", "algorithm", "bogus", "--socket", sock).exit_code == 1
    result = invoke("set", "limit", "max-sessions", "100", "--socket", sock)
    assert result.output == "max-sessions 100\nchanged limits.max_sessions:0->100\n"
    assert invoke("set", "limit", "max-sessions", "100", "--socket", sock).output.endswith("no change\n")
    assert invoke("set", "limit", "max-new-per-second", "2.5", "--socket", sock).exit_code == 0
    assert (b.admission.max_sessions, b.admission.max_new_per_second) == (100, 2.5)
    assert invoke("set", "limit", "max-sessions", "1.5", "--socket", sock).exit_code == 2
    assert invoke("reload", "--socket", sock).output == "reloaded /etc/lb.toml\nchanged servers.s1.weight:1->0\n"
    result = invoke("reload", "--socket", sock)
    assert result.exit_code == 1 and "ports[0].interface" in result.output


def test_live_subcommands_without_a_daemon(tmp_path: Path) -> None:
    result = invoke("server", "drain", "s1", "--socket", str(tmp_path / "none.sock"))
    assert result.exit_code == 1 and "no control socket" in result.output
