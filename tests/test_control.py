"""Status and control: the snapshot and its rates, the status tables, the control socket and its client, and the
Prometheus endpoint."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from helpers import VIP, Net, client_addr, handshake, label_of, make_config, tcp
from mplslb.balancer import Balancer
from mplslb.balancing.servers import DownReason
from mplslb.control import (
    ControlError,
    ControlServer,
    RateTracker,
    balancer_commands,
    request,
    snapshot,
    status_tables,
)
from mplslb.control.metrics import start_metrics_server
from mplslb.health import HealthCheckConfig, HealthChecker
from mplslb.wire.tcp import TCPFlag

WALL_LIMIT = 10.0


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    """A socket path short enough for AF_UNIX (108 bytes), in tmp_path when it fits."""
    path = str(tmp_path / "ctl.sock")
    if len(path) < 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="mplslb-")
    try:
        yield os.path.join(short, "ctl.sock")
    finally:
        if os.path.exists(os.path.join(short, "ctl.sock")):
            os.unlink(os.path.join(short, "ctl.sock"))
        os.rmdir(short)


class Daemon:
    """A balancer with one live session, health checks and rates, as a daemon loop holds them."""

    def __init__(self) -> None:
        self.net = Net()
        self.balancer: Balancer = self.net.balancer
        self.session_server, self.c2s = handshake(self.net)
        self.health = HealthChecker(HealthCheckConfig("http", path="/hc", rise=2, fall=2), ["s1", "s2", "s3"], now=0.0)
        self.rates = RateTracker()
        self.now = 0.0

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.balancer, health=self.health, rates=self.rates, now=self.now)


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
def served(daemon: Daemon, sock_path: str) -> Iterator[ControlServer]:
    """The control server on a background thread, run until the test ends."""
    server = ControlServer(
        sock_path, daemon.snapshot, balancer_commands(daemon.balancer, clock=lambda: daemon.now, health=daemon.health)
    )
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.run_once(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=WALL_LIMIT)
        server.close()


def raw(path: str, data: bytes, *, shut: bool = False) -> bytes:
    """Send raw bytes and read the reply until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WALL_LIMIT)
        sock.connect(path)
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- the snapshot ---------------------------------------------------------------------------------------------------
def test_snapshot_is_json_and_holds_everything_status_shows(daemon: Daemon) -> None:
    snap = json.loads(json.dumps(daemon.snapshot(), allow_nan=False))
    assert [v["address"] for v in snap["vips"]] == ["10.0.0.100", "fd00::100"]
    services = {(v["address"], s["proto"], s["port"]): s["active"] for v in snap["vips"] for s in v["services"]}
    assert services == {
        ("10.0.0.100", "tcp", 80): 1,
        ("10.0.0.100", "udp", 53): 0,
        ("fd00::100", "tcp", 80): 0,
        ("fd00::100", "udp", 53): 0,
    }
    assert snap["sessions"]["active"] == 1 and snap["sessions"]["started"] == 1
    assert snap["labels"]["in_use"] == 1 and snap["labels"]["installed"] == 2
    assert snap["frames"]["slow_path"] >= 1
    rows = {row["name"]: row for row in snap["servers"]}
    assert set(rows) == {"s1", "s2", "s3"}
    row = rows[daemon.session_server]
    assert row["active"] == 1 and row["address"].startswith("10.2.0.") and row["status"] == "up"
    assert row["health"]["label"] == "up (unchecked)"
    assert snap["health"]["path"] == "/hc" and snap["rates"]["sessions_per_s"] == 0.0


def test_rate_tracker_averages_windows_as_ipvs_does() -> None:
    r = RateTracker(window=2.0, alpha=0.25)
    assert not r.update({("a",): 0, ("b",): 100}, 0.0)
    assert not r.update({("a",): 10, ("b",): 100}, 1.0)  # less than a window: ignored
    assert r.update({("a",): 20, ("b",): 50}, 2.0)
    assert r.rate(("a",)) == 10.0  # the first window sets the rate
    assert r.rate(("b",)) == 25.0  # the counter went down (reset): its new value is the increase
    assert r.update({("a",): 60, ("c",): 5}, 4.0)
    assert r.rate(("a",)) == 10.0 + 0.25 * (20.0 - 10.0)
    assert r.rate(("b",)) == 0.0 and r.rate(("c",)) == 0.0  # gone; new (no rate until its second window)
    with pytest.raises(ValueError, match="window"):
        RateTracker(window=0)


def test_snapshot_rates_follow_the_counters(daemon: Daemon) -> None:
    daemon.snapshot()
    handshake(daemon.net, 1, sport=41000)
    handshake(daemon.net, 1, sport=41001)
    daemon.now = 2.0
    snap = daemon.snapshot()
    assert snap["rates"]["sessions_per_s"] == 1.0  # two sessions in two seconds
    assert sum(s["sessions_per_s"] for s in snap["rates"]["servers"].values()) == 1.0


# -- tables ---------------------------------------------------------------------------------------------------------
def render(snap: dict[str, Any]) -> str:
    console = Console(record=True, width=200)
    for table in status_tables(snap):
        console.print(table)
    return console.export_text()


def test_status_tables_render_servers_services_and_figures(daemon: Daemon) -> None:
    daemon.health.result("s2", False, 0.5, detail="HTTP 503")
    text = render(json.loads(json.dumps(daemon.snapshot())))
    for expected in (
        "Virtual services",
        "TCP  10.0.0.100:80",
        "UDP  [fd00::100]:53",
        "Real servers",
        "s1",
        "s2",
        "s3",
        "sess/s",
        "resp ms",
        "Real server traffic",
        "pkts in",
        "Health checks (http :80/hc",
        "FAIL: HTTP 503",
        "Packets at the balancer",
        "fast path",
        "Session labels",
        "in quarantine",
        "Drops by reason",
    ):
        assert expected in text, expected


def test_status_tables_without_health_or_rates() -> None:
    snap = snapshot(Balancer(make_config()), now=0.0)
    assert snap["health"] is None and snap["rates"] is None
    text = render(snap)
    assert "Health checks" not in text and "s1" in text and "(none)" in text
    assert "one-frame path" not in text  # a balancer's own snapshot; the daemon's says which path it runs
    assert "Packets at the balancer (one-frame path: native)" in render({**snap, "fast_path_build": "native"})


def test_the_kernels_drops_at_a_port_show_their_labelled_part_in_status_and_metrics() -> None:
    """A port whose labelled frames have a socket of their own reports their drops apart, in the status tables and
    the Prometheus metrics; a port without one shows its total only."""
    from prometheus_client import CollectorRegistry, generate_latest

    from mplslb.control.metrics import SnapshotCollector

    snap = snapshot(Balancer(make_config()), now=0.0)
    snap["ports"] = {
        "client0": {"kernel_received": 900, "kernel_dropped": 120, "labelled_received": 300, "labelled_dropped": 0},
        "server0": {"kernel_received": 500, "kernel_dropped": 7},
    }
    text = render(snap)
    assert "kernel, before the daemon read them: client0" in text and "of them labelled (read first): client0" in text
    assert (
        "kernel, before the daemon read them: server0" in text and "of them labelled (read first): server0" not in text
    )
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snap))
    metrics = generate_latest(registry).decode()
    assert 'mplslb_port_kernel_drops_total{port="client0"} 120.0' in metrics
    assert 'mplslb_port_kernel_labelled_drops_total{port="client0"} 0.0' in metrics
    assert 'mplslb_port_kernel_labelled_drops_total{port="server0"}' not in metrics


# -- the control socket ---------------------------------------------------------------------------------------------
def test_status_over_the_socket(served: ControlServer, daemon: Daemon) -> None:
    reply = request(served.path, {"cmd": "status"})
    assert reply["ok"] is True
    assert [row["name"] for row in reply["status"]["servers"]] == ["s1", "s2", "s3"]
    assert reply["status"]["sessions"]["active"] == 1


def test_commands_change_the_balancer(served: ControlServer, daemon: Daemon) -> None:
    b = daemon.balancer
    name = daemon.session_server
    assert request(served.path, {"cmd": "drain", "server": "s2"}) == {
        "ok": True, "server": "s2", "status": "draining", "weight": 1, "changed": True,
        "changes": ["servers.s2.status:up->draining"],
    }  # fmt: skip
    assert request(served.path, {"cmd": "weight", "server": "s3", "weight": 3})["weight"] == 3
    assert b.pool.get("s3").weight == 3
    reply = request(served.path, {"cmd": "down", "server": name})
    assert reply["status"] == "down" and b.pool.get(name).down_reason is DownReason.ADMIN
    reasons = {row["name"]: row["down_reason"] for row in json.loads(json.dumps(daemon.snapshot()))["servers"]}
    assert reasons == {s: "admin" if s == name else "" for s in ("s1", "s2", "s3")}  # the strings, as ever
    assert b.sessions.by_c2s(daemon.c2s) is None  # its session was interrupted
    assert request(served.path, {"cmd": "up", "server": name})["status"] == "up"
    assert request(served.path, {"cmd": "up", "server": "s2"})["status"] == "up"  # ends the drain
    # Unchanged state is reported as such.
    assert request(served.path, {"cmd": "up", "server": "s2"})["changed"] is False


def test_add_and_remove_over_the_socket(served: ControlServer, daemon: Daemon) -> None:
    b, health = daemon.balancer, daemon.health
    entry = {"name": "s4", "address": "10.2.0.4", "mac": "02:5e:00:00:00:04", "port": 2, "weight": 2}
    assert request(served.path, {"cmd": "add", "server": entry}) == {
        "ok": True, "server": "s4", "status": "up", "weight": 2, "changed": True, "changes": ["servers.s4:added"],
    }  # fmt: skip
    assert b.pool.get("s4").config.max_sessions == 0 and "s4" in health  # health-checked from now on
    # Checked as a [[servers]] entry of a configuration file is, naming the key.
    for bad, message in (
        ({**entry, "name": "s5"}, "server 's5': address: 10.2.0.4 is already the address of server 's4'"),
        ({**entry, "name": "s5", "address": "10.2.0.5", "port": 0}, "port 0 is a client-side port"),
        ({**entry, "name": "s5", "address": "10.2.0.5", "mac": "zz"}, "add: mac: "),
        ({**entry, "name": "s5", "address": "10.2.0.5", "colour": "red"}, "add: colour: unknown key"),
        ({"name": "s5", "port": 2}, "add: address: is required"),
    ):
        reply = request(served.path, {"cmd": "add", "server": bad})
        assert message in reply.get("error", ""), (bad, reply)
    assert "s5" not in b.pool
    # The server with the session drains out; an idle one leaves at once.
    name = daemon.session_server
    reply = request(served.path, {"cmd": "remove", "server": name})
    assert (reply["status"], reply["active"], reply["changes"]) == ("removing", 1, [f"servers.{name}:removing"])
    rows = {row["name"]: row["status"] for row in daemon.snapshot()["servers"]}
    assert rows[name] == "removing"
    assert "being removed" in request(served.path, {"cmd": "up", "server": name})["error"]
    assert request(served.path, {"cmd": "remove", "server": "s4"})["status"] == "removed"
    assert "s4" not in b.pool and "s4" not in health
    reply = request(served.path, {"cmd": "remove", "server": name, "now": True})
    assert reply["status"] == "removed" and b.sessions.by_c2s(daemon.c2s) is None
    assert [s.name for s in b.pool] == [s for s in ("s1", "s2", "s3") if s != name]


def test_algorithm_and_limits_over_the_socket(served: ControlServer, daemon: Daemon) -> None:
    b = daemon.balancer
    reply = request(served.path, {"cmd": "algorithm", "name": "maglev", "params": {"table_size": 251}})
    assert reply["changes"] == ["algorithm:round_robin->maglev", "algorithm_params:{}->{table_size=251}"]
    assert b.config.algorithm == "maglev" and daemon.snapshot()["algorithm"] == "maglev"
    assert (
        "table_size"
        in request(served.path, {"cmd": "algorithm", "name": "maglev", "params": {"table_size": 4}})["error"]
    )
    assert "unknown algorithm 'x'" in request(served.path, {"cmd": "algorithm", "name": "x"})["error"]
    assert b.config.algorithm == "maglev"
    reply = request(served.path, {"cmd": "limit", "name": "max_sessions", "value": 10})
    assert reply == {"ok": True, "limit": "max_sessions", "value": 10, "changes": ["limits.max_sessions:0->10"]}
    assert request(served.path, {"cmd": "limit", "name": "max_new_per_second", "value": 2.5})["value"] == 2.5
    assert b.admission.max_sessions == 10 and b.admission.max_new_per_second == 2.5
    for bad in ({"name": "max_sessions", "value": 1.5}, {"name": "max_sessions", "value": -1},
                {"name": "max_new_per_second", "value": True}, {"name": "speed", "value": 1}):  # fmt: skip
        assert "limit: " in request(served.path, {"cmd": "limit", **bad})["error"]
    assert "no configuration file" in request(served.path, {"cmd": "reload"})["error"]


def test_up_is_refused_while_the_health_check_fails(served: ControlServer, daemon: Daemon) -> None:
    daemon.health.result("s2", False, 0.5, detail="HTTP 503")
    assert request(served.path, {"cmd": "down", "server": "s2"})["ok"]
    reply = request(served.path, {"cmd": "up", "server": "s2"})
    assert "fails its health check" in reply["error"] and "HTTP 503" in reply["error"]
    assert str(daemon.balancer.pool.get("s2").status) == "down"


def test_sessions_over_the_socket_list_the_table_oldest_first(served: ControlServer, daemon: Daemon) -> None:
    b, net = daemon.balancer, daemon.net
    daemon.now = 1.0
    net.now = 0.5
    later = net.from_client(1, tcp(client_addr(1), VIP, 41000, 80, TCPFlag.SYN, seq=7))  # a half-open one, later
    late_c2s = label_of(later[0][1])
    reply = request(served.path, {"cmd": "sessions"})
    assert reply["ok"] is True and reply["total"] == 2
    first, second = reply["sessions"]
    assert (first["c2s"], first["s2c"], first["state"]) == (daemon.c2s, daemon.c2s + 1, "established")
    vip = f"{ipaddress.ip_address(VIP)}:80"
    assert first["client"] == f"{ipaddress.ip_address(client_addr(0))}:40000" and first["vip"] == vip
    assert first["server"] == daemon.session_server and first["c2s_packets"] == 2 and first["s2c_packets"] == 1
    assert (second["c2s"], second["state"]) == (late_c2s, "start") and second["proto"] == 6
    assert second["age"] == pytest.approx(0.5) and second["idle"] == pytest.approx(0.5)
    timeout = b.sessions.timeouts.tcp_start
    assert second["deadline_in"] == pytest.approx(timeout - 0.5) and second["ending_for"] is None
    only = request(served.path, {"cmd": "sessions", "state": "start", "limit": 1})
    assert only["total"] == 1 and [row["c2s"] for row in only["sessions"]] == [late_c2s]
    assert request(served.path, {"cmd": "sessions", "limit": 0}) == {"ok": True, "total": 2, "sessions": []}
    other = next(s.name for s in b.pool.servers if s.name not in (daemon.session_server, second["server"]))
    assert request(served.path, {"cmd": "sessions", "server": other})["total"] == 0


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"cmd": "reboot"}, "unknown command"),
        ({"cmd": "drain"}, '"server"'),
        ({"cmd": "drain", "server": "s9"}, "no server named 's9'"),
        ({"cmd": "weight", "server": "s1"}, "weight"),
        ({"cmd": "weight", "server": "s1", "weight": -1}, "weight"),
        ({"cmd": "weight", "server": "s1", "weight": "3"}, "weight"),
        ({"cmd": "weight", "server": "s1", "weight": True}, "weight"),
        ({"cmd": "sessions", "state": "asleep"}, "unknown state 'asleep'"),
        ({"cmd": "sessions", "server": "s9"}, "no server named 's9'"),
        ({"cmd": "sessions", "limit": -1}, '"limit"'),
        ({"cmd": "sessions", "limit": True}, '"limit"'),
        ({"cmd": "sessions", "limit": 10_001}, '"limit"'),
        ({"server": "s1"}, '"cmd"'),
    ],
)
def test_bad_commands_get_errors(served: ControlServer, daemon: Daemon, req: dict[str, Any], message: str) -> None:
    reply = request(served.path, req)
    assert set(reply) == {"error"} and message in reply["error"]
    assert [s.weight for s in daemon.balancer.pool.servers] == [1, 1, 1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"cmd": 1}\n', '"cmd"'),
        (b"\xff\xfe\n", "UTF-8"),
        (b"[" * 100_000 + b"\n", "too large"),
        (b"[" * 50_000 + b"\n", "not JSON"),  # nesting deep enough to break a recursive parser
    ],
)
def test_malformed_requests_are_answered_with_errors(served: ControlServer, data: bytes, message: str) -> None:
    reply = json.loads(raw(served.path, data))
    assert message in reply["error"]
    assert request(served.path, {"cmd": "status"})["ok"]  # and the server carries on


def test_a_request_ended_by_shutdown_instead_of_newline_is_served(served: ControlServer) -> None:
    assert json.loads(raw(served.path, b'{"cmd": "status"}', shut=True))["ok"]
    assert raw(served.path, b"", shut=True) == b""  # nothing asked, nothing answered


def test_the_loop_integration_path_and_the_socket_file(sock_path: str, daemon: Daemon) -> None:
    """Driven the way the daemon loop does it: select on fileno(), then on_readable(); no thread for the server."""
    server = ControlServer(sock_path, daemon.snapshot)
    replies: list[dict[str, Any]] = []
    client = threading.Thread(target=lambda: replies.append(request(sock_path, {"cmd": "status"}, timeout=WALL_LIMIT)))
    try:
        assert os.stat(sock_path).st_mode & 0o777 == 0o600
        client.start()
        end = time.monotonic() + WALL_LIMIT
        while not replies:
            assert time.monotonic() < end, "no reply in time"
            select.select([server.fileno()], [], [], 0.05)
            server.on_readable()
        assert replies[0]["ok"]
        # Without a command callable only status is served.
        assert "unknown command" in server.handle(b'{"cmd": "drain", "server": "s1"}')["error"]
    finally:
        client.join(timeout=WALL_LIMIT)
        server.close()
    assert not os.path.exists(sock_path)
    server.close()  # twice is fine


def test_stale_socket_is_replaced_a_live_one_is_not(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    server = ControlServer(sock_path, dict)
    try:
        with pytest.raises(OSError, match="another daemon"):
            ControlServer(sock_path, dict)
    finally:
        server.close()
    Path(sock_path).write_text("not a socket")
    try:
        with pytest.raises(FileExistsError, match="not a socket"):
            ControlServer(sock_path, dict)
    finally:
        os.unlink(sock_path)


def test_client_errors_name_the_problem(sock_path: str) -> None:
    with pytest.raises(ControlError, match="no control socket"):
        request(sock_path, {"cmd": "status"})
    # A server that accepts but never answers: the client gives up after its timeout.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(sock_path)
        mute.listen(1)
        with pytest.raises(ControlError, match="no reply"):
            request(sock_path, {"cmd": "status"}, timeout=0.2)


def test_idle_and_excess_connections_are_bounded(sock_path: str) -> None:
    now = [0.0]
    server = ControlServer(sock_path, dict, max_clients=2, client_timeout=5.0, clock=lambda: now[0])
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in socks:
            s.settimeout(WALL_LIMIT)
            s.connect(sock_path)
        for _ in range(5):
            server.run_once(0.05)
        assert server.connections == 2
        assert socks[0].recv(1) == b""  # the oldest went when the third came
        assert server.next_deadline() == 5.0
        now[0] = 5.0
        server.on_timer(5.0)  # silent clients are dropped after client_timeout
        assert server.connections == 0 and server.next_deadline() is None
        assert socks[2].recv(1) == b""
    finally:
        for s in socks:
            s.close()
        server.close()


# -- Prometheus -----------------------------------------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WALL_LIMIT) as response:
        return str(response.read().decode("utf-8"))


def test_metrics_endpoint_exports_the_snapshot(daemon: Daemon) -> None:
    daemon.balancer.pool.record_response_time(daemon.balancer.pool.get(daemon.session_server), 0.004)
    daemon.health.result("s3", False, 0.5, detail="HTTP 503")
    latest: dict[str, Any] = {"snap": daemon.snapshot()}
    rt = next(r["rt_ms"] for r in latest["snap"]["servers"] if r["name"] == daemon.session_server) / 1000.0
    assert rt > 0
    server = start_metrics_server(0, "127.0.0.1", lambda: latest["snap"])
    try:
        text = scrape(server.port)
        name = daemon.session_server
        for line in (
            "mplslb_sessions_active 1.0",
            "mplslb_sessions_started_total 1.0",
            'mplslb_frames_total{path="fast"}',
            'mplslb_frames_total{path="slow"} 1.0',
            "mplslb_labels_in_use 1.0",
            "mplslb_labels_free ",
            "mplslb_labels_quarantined 0.0",
            'mplslb_vip_sessions_active{port="80",proto="tcp",vip="10.0.0.100"} 1.0',
            f'mplslb_server_up{{server="{name}"}} 1.0',
            f'mplslb_server_active{{server="{name}"}} 1.0',
            f'mplslb_server_sessions_total{{server="{name}"}} 1.0',
            f'mplslb_server_packets_in_total{{server="{name}"}} 2.0',  # the SYN and the handshake's ACK
            f'mplslb_server_bytes_out_total{{server="{name}"}}',
            f'mplslb_server_response_time_seconds{{server="{name}"}} {rt}',
            'mplslb_server_weight{server="s2"} 1.0',
            'mplslb_server_health{server="s3"} 0.0',
            'mplslb_server_health_checks_failed_total{server="s3"} 1.0',
            'mplslb_server_state{server="s1",state="up"} 1.0',
        ):
            assert line in text, line
        # Ended and refused sessions and drops appear under their reasons once there are any.
        daemon.balancer.mark_down(name, 1.0, DownReason.ADMIN)
        latest["snap"] = daemon.snapshot()
        text = scrape(server.port)
        assert 'mplslb_sessions_ended_total{reason="server_down"} 1.0' in text
        assert f'mplslb_server_up{{server="{name}"}} 0.0' in text
        assert f'mplslb_server_state{{server="{name}",state="down"}} 1.0' in text
        # Before the loop has published a snapshot there is nothing of ours to export.
        latest["snap"] = None
        assert "mplslb_" not in scrape(server.port)
    finally:
        server.close()
    assert not server.thread.is_alive()


class _Agent:
    """An agent's figures as the endpoint datapath keeps them (a server that took two frames, dropped one)."""

    datapath = "kernel"

    def __init__(self) -> None:
        from mplslb.agents import AgentConfig

        self.config = AgentConfig(role="server", interface="eth0", vips=("10.0.0.100",))

    def flows(self) -> int:
        return 2

    def traffic(self) -> dict[str, int]:
        return {"from_wire": 2, "from_host": 2}

    def drops(self) -> dict[str, int]:
        return {"mpls_truncated": 1}


def test_agent_metrics_and_status_tables_show_its_counters() -> None:
    from mplslb.agents import agent_snapshot
    from mplslb.control.metrics import AgentCollector
    from mplslb.control.tables import agent_tables

    snap = agent_snapshot(_Agent())
    server = start_metrics_server(0, "127.0.0.1", lambda: snap, collector=AgentCollector)
    try:
        text = scrape(server.port)
    finally:
        server.close()
    for line in (
        "mplslb_agent_flows 2.0",
        'mplslb_agent_frames_total{what="from_wire"} 2.0',
        'mplslb_agent_drops_total{reason="mpls_truncated"} 1.0',
    ):
        assert line in text, line
    console = Console(width=120, record=True)
    for table in agent_tables(json.loads(json.dumps(snap))):
        console.print(table)
    out = console.export_text()
    assert "Agent (server)" in out and "mpls_truncated" in out and "from_wire" in out
    assert snap["agent"]["kept"] == "no" and "kept across restarts" in out
