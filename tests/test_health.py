"""Active health checks: the sans-I/O state machine with passed-in time, the probe driver against real sockets on
the loopback, and the verdicts acting on a real Balancer."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from helpers import VIP, Net, client_addr, handshake, make_config, tcp
from mplslb.balancer import Balancer
from mplslb.balancing.health_policy import apply_result, apply_transition, feed_probe_rtt, reconcile
from mplslb.balancing.servers import DownReason
from mplslb.health import HealthCheckConfig, HealthChecker, HealthProbeDriver, ProbeResult
from mplslb.wire.tcp import TCPFlag

SYN = int(TCPFlag.SYN)
LOOPBACK = bytes([127, 0, 0, 1])
LOOPBACK6 = bytes(15) + b"\x01"
WALL_LIMIT = 10.0  # seconds any real-socket wait may take before the test fails


# -- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"kind": "icmp"}, "kind"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": True}, "port"),
        ({"interval": 0}, "interval"),
        ({"interval": float("inf")}, "interval"),
        ({"timeout": -1.0}, "timeout"),
        ({"rise": 0}, "rise"),
        ({"fall": 1.5}, "fall"),
        ({"path": "health"}, "path"),
        ({"path": "/a b"}, "path"),
        ({"path": "/x\r\nX-Evil: 1"}, "path"),
        ({"expect_status": 99}, "expect_status"),
        ({"expect_status": ()}, "expect_status"),
        ({"expect_status": (200, "204")}, "expect_status"),
        ({"host": ""}, "host"),
        ({"host": "a\r\nb"}, "host"),
        ({"init_state": "maybe"}, "init_state"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    base: dict[str, Any] = {"kind": "http"}
    with pytest.raises(ValueError, match=field_name):
        HealthCheckConfig(**{**base, **kwargs})


def test_http_probe_request_names_the_host_and_asks_to_close() -> None:
    assert HealthCheckConfig("http", path="/ping").http_request(LOOPBACK) == (
        b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert b"Host: [::1]:8080\r\n" in HealthCheckConfig("http", port=8080).http_request(LOOPBACK6)
    assert b"Host: shop.example\r\n" in HealthCheckConfig("http", host="shop.example").http_request(LOOPBACK)
    assert HealthCheckConfig("http", expect_status=(200, 204)).expected == {200, 204}


# -- the state machine, time passed in ---------------------------------------------------------------------------
def checker(**kwargs: Any) -> HealthChecker:
    return HealthChecker(HealthCheckConfig(**{"kind": "tcp", **kwargs}), ["s1"], now=0.0)


def feed(c: HealthChecker, results: str, now: float = 0.0) -> list[str | None]:
    """Feed results as a string of '+' (pass) and '-' (fail); returns the transitions."""
    return [c.result("s1", r == "+", now) for r in results]


def test_default_starting_state_is_up_but_unproven_like_haproxy() -> None:
    c = checker(rise=2, fall=3)
    assert c.is_up("s1") and c.state("s1").label == "up (unchecked)"
    # HAProxy's default init-state "up": the first failure takes a server that never passed down at once.
    assert feed(c, "-") == ["down"]
    assert not c.is_up("s1")


def test_fall_consecutive_failures_take_a_proven_server_down() -> None:
    c = checker(rise=2, fall=3)
    assert feed(c, "+") == [None]
    assert feed(c, "--") == [None, None]
    assert c.is_up("s1") and c.state("s1").label == "up 2/3 failed"
    assert feed(c, "+--") == [None, None, None]  # a pass in between starts the count over
    assert feed(c, "-") == ["down"]
    assert c.state("s1").failures == 3


def test_rise_consecutive_successes_bring_it_back() -> None:
    c = checker(rise=3, fall=1, init_state="fully-up")
    assert feed(c, "-") == ["down"]
    assert feed(c, "++") == [None, None]
    assert c.state("s1").label == "down 2/3 passed"
    assert feed(c, "-++") == [None, None, None]  # a failure in between starts the count over
    assert feed(c, "+") == ["up"]
    assert c.state("s1").label == "up" and c.state("s1").health == 3  # rise + fall - 1: fully up


@pytest.mark.parametrize(
    ("init_state", "up", "to_flip", "flip"),
    [
        ("fully-up", True, "---", "down"),
        ("up", True, "-", "down"),
        ("down", False, "+", "up"),
        ("fully-down", False, "++", "up"),
    ],
)
def test_init_states(init_state: str, up: bool, to_flip: str, flip: str) -> None:
    c = checker(rise=2, fall=3, init_state=init_state)
    assert c.is_up("s1") is up
    assert feed(c, to_flip) == [None] * (len(to_flip) - 1) + [flip]


def test_probes_are_scheduled_by_interval_and_time_out() -> None:
    c = checker(interval=2.0, timeout=1.0)
    assert c.next_deadline() == 0.0 and c.due(0.0) == ["s1"]
    c.started("s1", 0.0)
    assert c.due(5.0) == []  # never two probes of one server at once
    assert c.next_deadline() == 1.0 and c.expired(0.99) == []
    assert c.expired(1.0) == ["s1"]
    c.result("s1", False, 1.0, detail="timeout")
    assert c.next_deadline() == 2.0  # interval from the previous start, not from its end
    assert c.due(1.9) == [] and c.due(2.0) == ["s1"]
    c.started("s1", 2.0)
    c.result("s1", True, 2.01, rtt=0.01)
    assert c.next_deadline() == 4.0
    state = c.state("s1")
    assert (state.checks, state.failed_checks, state.last_rtt, state.in_flight) == (2, 1, 0.01, False)


def test_a_dead_server_flips_within_fall_intervals_plus_timeout() -> None:
    interval, timeout, fall = 2.0, 1.5, 3
    c = checker(interval=interval, timeout=timeout, fall=fall, init_state="fully-up")
    now, first_start, flipped_at = 0.0, None, None
    for _ in range(20):  # every probe times out
        deadline = c.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        for name in c.expired(now):
            if c.result(name, False, now, detail="timeout") == "down":
                flipped_at = now
        for name in c.due(now):
            c.started(name, now)
            first_start = now if first_start is None else first_start
        if flipped_at is not None:
            break
    assert first_start == 0.0 and flipped_at is not None
    assert flipped_at - first_start <= fall * interval + timeout
    assert flipped_at == (fall - 1) * interval + timeout


def test_membership_changes() -> None:
    c = HealthChecker(HealthCheckConfig("tcp"))
    c.add("a")  # no time: due at the first look, whatever its time
    assert c.next_deadline() == float("-inf") and c.due(-100.0) == ["a"]
    with pytest.raises(ValueError, match="already"):
        c.add("a")
    c.add("b", now=10.0)
    assert c.due(5.0) == ["a"] and c.names == ["a", "b"]
    c.started("a", 5.0)
    assert c.remove("a") and not c.remove("a")
    assert c.result("a", False, 6.0) is None  # a late result for a removed server is ignored
    with pytest.raises(KeyError, match="'a'"):
        c.is_up("a")
    assert "b" in c and len(c) == 1


# -- the probe driver, real sockets --------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server: _HTTPServer = self.server  # type: ignore[assignment]
        server.paths.append(self.path)
        try:
            self.send_response(server.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the probe closes (RST) once it has the status line

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    status = 200

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.paths: list[str] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[_HTTPServer]:
    server = _HTTPServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop(server, thread)


def stop(server: _HTTPServer, thread: threading.Thread) -> None:
    if thread.is_alive():
        server.shutdown()
        thread.join(timeout=WALL_LIMIT)
    server.server_close()


@dataclass
class Probing:
    """A driver whose clock is the test's: probes start only when the test says, one round at a time."""

    config: HealthCheckConfig
    address: bytes = LOOPBACK
    now: float = 0.0
    results: list[ProbeResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.checker = HealthChecker(self.config, ["s1"], now=0.0)
        self.driver = HealthProbeDriver(
            self.checker, lambda name: self.address, on_result=self.results.append, clock=lambda: self.now
        )

    def round(self) -> ProbeResult:
        """Jump to the next deadline, start the due probe and wait (in real time, bounded) for its result."""
        deadline = self.checker.next_deadline()
        assert deadline is not None
        self.now = max(self.now, deadline)
        before = len(self.results)
        self.driver.on_timer(self.now)
        wait_for(lambda: not self.driver.in_flight, self.driver)
        assert len(self.results) == before + 1
        return self.results[-1]


def wait_for(done: Callable[[], bool], driver: HealthProbeDriver) -> None:
    """Serve the driver from its descriptor (as a loop would) until ``done()``, within WALL_LIMIT."""
    end = time.monotonic() + WALL_LIMIT
    while not done():
        assert time.monotonic() < end, "the probe did not finish in time"
        select.select([driver.fileno()], [], [], 0.05)
        driver.on_ready()


def test_http_probe_follows_the_server_200_then_500_then_stopped(http_server: _HTTPServer) -> None:
    cfg = HealthCheckConfig(
        "http", port=http_server.server_address[1], path="/health", interval=2.0, timeout=1.0, rise=2, fall=2
    )
    p = Probing(cfg)
    try:
        for _ in range(2):
            r = p.round()
            assert (r.ok, r.detail, r.transition) == (True, "HTTP 200", None)
            assert r.rtt is not None and r.rtt >= 0
        assert http_server.paths == ["/health", "/health"]

        http_server.status = 500
        first = p.round()
        assert (first.ok, first.detail, first.transition) == (False, "HTTP 500", None)
        second = p.round()
        assert (second.ok, second.transition) == (False, "down")
        assert second.at - first.at <= cfg.fall * cfg.interval + cfg.timeout  # first.at: when that probe started

        http_server.status = 200
        assert [p.round().transition for _ in range(2)] == [None, "up"]

        http_server.shutdown()
        http_server.server_close()  # the port is closed: connects are refused
        refused = [p.round() for _ in range(2)]
        assert [(r.ok, r.detail) for r in refused] == [(False, "connect: ECONNREFUSED")] * 2
        assert refused[-1].transition == "down" and not p.checker.is_up("s1")
    finally:
        p.driver.close()


def test_http_probe_accepts_any_expected_status(http_server: _HTTPServer) -> None:
    http_server.status = 204
    p = Probing(HealthCheckConfig("http", port=http_server.server_address[1], expect_status=(200, 204)))
    try:
        assert p.round().ok
        http_server.status = 200
        assert p.round().ok
    finally:
        p.driver.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener that never accepts: the kernel completes connects, nobody ever answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def test_tcp_probe_passes_when_the_port_accepts(listener: socket.socket) -> None:
    p = Probing(HealthCheckConfig("tcp", port=listener.getsockname()[1]))
    try:
        r = p.round()
        assert (r.ok, r.detail) == (True, "connected") and r.rtt is not None
    finally:
        p.driver.close()


def test_tcp_probe_over_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.bind(("::1", 0))
    except OSError:
        sock.close()
        pytest.skip("no IPv6 loopback")
    sock.listen(4)
    p = Probing(HealthCheckConfig("tcp", port=sock.getsockname()[1]), address=LOOPBACK6)
    try:
        assert p.round().ok
    finally:
        p.driver.close()
        sock.close()


def test_http_probe_to_a_server_that_never_answers_times_out(listener: socket.socket) -> None:
    p = Probing(HealthCheckConfig("http", port=listener.getsockname()[1], timeout=1.0, fall=1))
    try:
        p.driver.on_timer(0.0)
        assert p.driver.in_flight == ["s1"]
        for _ in range(3):  # let the connect complete and the request go out; no answer comes
            select.select([p.driver.fileno()], [], [], 0.05)
            p.driver.on_ready()
        assert p.results == [] and p.checker.next_deadline() == 1.0
        p.driver.on_timer(1.0)
        (r,) = p.results
        assert (r.ok, r.detail, r.transition) == (False, "timeout after 1s", "down")
        assert p.driver.in_flight == []
    finally:
        p.driver.close()


def test_run_once_drives_probes_on_the_real_clock_and_times_out(listener: socket.socket) -> None:
    results: list[ProbeResult] = []
    cfg = HealthCheckConfig("http", port=listener.getsockname()[1], interval=0.05, timeout=0.1, fall=2)
    c = HealthChecker(cfg, ["s1"])
    driver = HealthProbeDriver(c, lambda name: LOOPBACK, on_result=results.append)
    try:
        end = time.monotonic() + WALL_LIMIT
        while not any(r.transition for r in results):
            assert time.monotonic() < end, "no verdict in time"
            driver.run_once(0.05)
        assert [r.detail for r in results] == ["timeout after 0.1s"] * len(results)
        assert results[-1].transition == "down" and len(results) == 1  # init "up": the first failure flips
    finally:
        driver.close()


def test_a_missing_address_is_a_failed_probe_not_a_busy_loop() -> None:
    results: list[ProbeResult] = []
    c = HealthChecker(HealthCheckConfig("tcp", interval=2.0), ["gone"], now=0.0)
    driver = HealthProbeDriver(c, lambda name: None, on_result=results.append, clock=lambda: 0.0)
    try:
        driver.on_timer(0.0)
        assert [(r.ok, r.detail) for r in results] == [(False, "no address")]
        assert c.next_deadline() == 2.0
    finally:
        driver.close()


# -- verdicts acting on the balancer ---------------------------------------------------------------------------
def health_for(b: Balancer, **kwargs: Any) -> HealthChecker:
    cfg = HealthCheckConfig(**{"kind": "tcp", "rise": 2, "fall": 2, "init_state": "fully-up", **kwargs})
    return HealthChecker(cfg, [s.name for s in b.pool.servers], now=0.0)


def new_sessions_reach(net: Net, n: int, first_port: int) -> set[str]:
    names = set()
    for i in range(n):
        out = net.from_client(1, tcp(client_addr(1), VIP, first_port + i, 80, SYN))
        names.update(name for name, _ in net.deliver_to_servers(out))
    return names


def test_health_down_interrupts_the_servers_sessions_and_up_brings_it_back() -> None:
    net = Net()
    b = net.balancer
    name, c2s = handshake(net)
    c = health_for(b)
    assert [c.result(name, False, t) for t in (1.0, 2.0)] == [None, "down"]
    assert apply_transition(b, name, "down", 2.0)
    server = b.pool.get(name)
    assert (str(server.status), server.down_reason) == ("down", DownReason.HEALTH_CHECK)
    # Its session was interrupted and both labels withdrawn.
    assert b.sessions.by_c2s(c2s) is None and b.switching.entry(c2s) is None and b.switching.entry(c2s + 1) is None
    assert b.stats().sessions_ended == {"server_down": 1}
    net.now = 2.0
    assert name not in new_sessions_reach(net, 6, 1000)
    # Passing probes: up again after `rise`, and new sessions reach it again.
    assert [c.result(name, True, t) for t in (3.0, 4.0)] == [None, "up"]
    assert apply_transition(b, name, "up", 4.0)
    assert str(server.status) == "up"
    assert name in new_sessions_reach(net, 6, 2000)


def test_health_up_does_not_undo_an_operator_down() -> None:
    b = Balancer(make_config())
    b.mark_down("s1", 0.0, DownReason.ADMIN)
    assert not apply_transition(b, "s1", "down", 1.0)
    assert not apply_transition(b, "s1", "up", 2.0)
    assert b.pool.get("s1").down_reason is DownReason.ADMIN
    assert not apply_transition(b, "gone", "down", 2.0)  # a server removed meanwhile is ignored


@pytest.mark.parametrize(
    ("reason", "lifted"),
    [
        (DownReason.HEALTH_CHECK, True),
        (DownReason.NO_REPLY, True),
        (DownReason.REFUSED, True),
        (DownReason.ADMIN, False),
    ],
)
def test_a_passing_check_lifts_health_downs_but_not_an_operators(reason: DownReason, lifted: bool) -> None:
    b = Balancer(make_config())
    b.mark_down("s1", 0.0, reason)
    assert apply_transition(b, "s1", "up", 1.0) is lifted
    server = b.pool.get("s1")
    assert (str(server.status), server.down_reason) == (("up", None) if lifted else ("down", reason))


def test_a_removed_server_stays_removed_whatever_its_check_says() -> None:
    b = Balancer(make_config())
    c = health_for(b)
    removed = b.pool.get("s1")
    b.remove_server("s1", 0.0)
    assert removed.down_reason is DownReason.REMOVED
    assert not apply_transition(b, "s1", "up", 1.0) and not apply_transition(b, "s1", "down", 1.0)
    assert reconcile(b, c, 1.0) == [] and c.is_up("s1")  # the checker is the caller's to prune
    assert "s1" not in b.pool and str(removed.status) == "down"


def test_reconcile_leaves_the_verdict_alone_for_an_operators_down() -> None:
    b = Balancer(make_config())
    c = health_for(b)
    b.mark_down("s2", 1.0, DownReason.ADMIN)
    assert reconcile(b, c, 1.0) == [] and c.is_up("s2")
    assert b.pool.get("s2").down_reason is DownReason.ADMIN


def test_reconcile_lets_probes_revive_a_passively_failed_server() -> None:
    b = Balancer(make_config())
    c = health_for(b)
    b.mark_down("s2", 1.0, DownReason.NO_REPLY)  # as the balancer does after unanswered SYNs
    assert reconcile(b, c, 1.0) == ["s2"] and not c.is_up("s2")
    assert reconcile(b, c, 1.5) == []
    transitions = [c.result("s2", True, t) for t in (2.0, 3.0)]
    assert transitions == [None, "up"]
    apply_result(b, ProbeResult("s2", True, 3.0, None, "connected", "up"))
    assert str(b.pool.get("s2").status) == "up"


def test_reconcile_takes_down_a_server_marked_up_while_it_fails_its_check() -> None:
    b = Balancer(make_config())
    c = health_for(b)
    for t in (1.0, 2.0):
        c.result("s3", False, t)
    apply_transition(b, "s3", "down", 2.0)
    b.mark_up("s3")  # an operator insists
    assert reconcile(b, c, 3.0) == ["s3"]
    assert b.pool.get("s3").down_reason is DownReason.HEALTH_CHECK


def test_probe_rtt_feeds_the_estimate_only_when_sessions_cannot() -> None:
    b = Balancer(make_config(rt_limit=0.1))
    server = b.pool.get("s1")
    assert feed_probe_rtt(b, "s1", 0.02) and server.rt_ewma == pytest.approx(0.02)  # no estimate yet
    assert not feed_probe_rtt(b, "s1", 0.5) and server.rt_ewma == pytest.approx(0.02)  # sessions measure it
    b.pool.record_response_time(server, 3.0)
    assert server.overloaded
    # Overloaded: no new sessions, so no session samples; probes are how it can recover.
    while server.overloaded:
        assert feed_probe_rtt(b, "s1", 0.02)
    b.mark_down("s1", 0.0, DownReason.ADMIN)
    assert not feed_probe_rtt(b, "s1", 0.02)
    assert not feed_probe_rtt(b, "nobody", 0.02)


def test_driver_and_balancer_end_to_end(http_server: _HTTPServer) -> None:
    """A daemon's wiring: probes to a real HTTP server stand in for s1's; a 500 takes s1 down in the balancer."""
    net = Net()
    b = net.balancer
    name, c2s = handshake(net)
    cfg = HealthCheckConfig("http", port=http_server.server_address[1], rise=1, fall=1, init_state="fully-up")
    p = Probing(cfg)
    p.checker.remove("s1")
    p.checker.add(name, now=0.0)
    p.driver.on_result = lambda r: apply_result(b, r)
    try:
        p.driver.on_timer(0.0)
        wait_for(lambda: not p.driver.in_flight, p.driver)
        assert b.pool.get(name).rt_ewma is not None  # the probe RTT seeded the missing estimate
        http_server.status = 500
        p.driver.on_timer(2.0)
        wait_for(lambda: not p.driver.in_flight, p.driver)
        assert str(b.pool.get(name).status) == "down" and b.sessions.by_c2s(c2s) is None
    finally:
        p.driver.close()
