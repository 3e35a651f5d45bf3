"""The selector loop (timers, readers, stopping) and the drivers that pump frames through a core, on socketpairs."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from helpers import PORT_MAC, SERVER_BY_MAC, SYN, FakeClock, client_mac, client_tcp, client_udp, mac, standard_balancer
from mplslb.drivers.loop import BalancerDriver, EndpointDriver, Loop
from mplslb.endpoint import ClientEndpoint
from mplslb.sessions import Timeouts
from mplslb.wire.ethernet import ETH_P_MPLS_UC

BOUND = 5.0  # no test here runs longer than this


class DgramPort:
    """A port over a SOCK_DGRAM socketpair: the driver side is ``inner``, the test plays the wire on ``outer``."""

    def __init__(self) -> None:
        self.inner, self.outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inner.setblocking(False)
        self.outer.setblocking(False)

    def fileno(self) -> int:
        return self.inner.fileno()

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        frames = []
        for _ in range(max_frames):
            try:
                frames.append(self.inner.recv(65536))
            except BlockingIOError:
                break
        return frames

    def send(self, frame: bytes) -> int:
        return self.inner.send(frame)

    def wire_out(self) -> list[bytes]:
        out = []
        for _ in range(1000):
            try:
                out.append(self.outer.recv(65536))
            except BlockingIOError:
                break
        return out

    def close(self) -> None:
        self.inner.close()
        self.outer.close()


class FullPort(DgramPort):
    def send(self, frame: bytes) -> int:
        raise OSError(errno.ENOBUFS, "No buffer space available")


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def later() -> Iterator[Callable[..., None]]:
    """Runs a call on another thread after a delay; every such thread is finished when the test ends."""
    timers: list[threading.Timer] = []

    def start(delay: float, fn: Callable[..., object], *args: object) -> None:
        timer = threading.Timer(delay, fn, args=args)
        timers.append(timer)
        timer.start()

    try:
        yield start
    finally:
        for timer in timers:
            timer.cancel()
            timer.join(BOUND)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# -- timers ---------------------------------------------------------------------------------------------------
def test_timers_fire_in_time_order_when_due():
    clock = FakeClock(0.0)
    loop = Loop(clock=clock)
    fired: list[str] = []
    loop.call_at(5.0, lambda: fired.append("a"))
    loop.call_at(1.0, lambda: fired.append("b"))
    loop.call_at(3.0, lambda: fired.append("c"))
    loop.run_once(0)
    assert fired == []
    clock.now = 4.0
    loop.run_once(0)
    assert fired == ["b", "c"]
    assert loop.next_timer() == 5.0
    clock.now = 5.0
    loop.run_once(0)
    assert fired == ["b", "c", "a"] and loop.next_timer() is None
    loop.close()


def test_cancelled_timer_does_not_fire():
    clock = FakeClock(0.0)
    loop = Loop(clock=clock)
    fired: list[int] = []
    timer = loop.call_at(1.0, lambda: fired.append(1))
    loop.call_at(2.0, lambda: fired.append(2))
    timer.cancel()
    assert loop.next_timer() == 2.0
    clock.now = 3.0
    loop.run_once(0)
    assert fired == [2]
    loop.close()


def test_a_timer_added_for_now_waits_for_the_next_turn():
    clock = FakeClock(0.0)
    loop = Loop(clock=clock)
    fired: list[int] = []

    def again() -> None:
        fired.append(len(fired))
        loop.call_at(clock.now, again)  # would spin forever if run in the same turn

    loop.call_at(0.0, again)
    loop.run_once(0)
    loop.run_once(0)
    assert fired == [0, 1]
    loop.close()


def test_call_later_uses_the_injected_clock():
    clock = FakeClock(50.0)
    loop = Loop(clock=clock)
    loop.call_later(2.5, lambda: None)
    assert loop.next_timer() == 52.5
    loop.close()


def test_run_sleeps_until_the_next_timer_not_max_wait(loop):
    loop.max_wait = 30.0
    start = time.monotonic()
    loop.call_later(0.05, loop.stop)
    loop.run(until=start + BOUND)
    assert 0.04 <= time.monotonic() - start < 1.0


# -- readers --------------------------------------------------------------------------------------------------
def test_reader_runs_when_its_descriptor_is_readable(loop, pair):
    a, b = pair
    got: list[bytes] = []
    loop.add_reader(a, lambda: got.append(a.recv(100)))
    loop.run_once(0)
    assert got == []
    b.send(b"ping")
    loop.run_once(BOUND)
    assert got == [b"ping"]
    loop.remove_reader(a)
    b.send(b"again")
    loop.run_once(0)
    assert got == [b"ping"]


def test_reader_wakes_the_loop_before_max_wait(loop, pair, later):
    a, b = pair
    loop.max_wait = 30.0
    loop.add_reader(a.fileno(), lambda: (a.recv(100), loop.stop()))
    later(0.05, b.send, b"x")
    start = time.monotonic()
    loop.run(until=start + BOUND)
    assert time.monotonic() - start < 1.0


# -- stopping -------------------------------------------------------------------------------------------------
def test_run_returns_at_until(loop):
    start = time.monotonic()
    loop.run(until=start + 0.1)
    assert 0.09 <= time.monotonic() - start < 1.0


def test_run_returns_when_the_event_is_set(loop, later):
    stop = threading.Event()
    later(0.05, stop.set)
    start = time.monotonic()
    loop.run(stop=stop, until=start + BOUND)
    assert stop.is_set() and time.monotonic() - start < 1.0


def test_stop_from_another_thread_wakes_the_selector(loop, later):
    loop.max_wait = 30.0
    later(0.05, loop.stop)
    start = time.monotonic()
    loop.run(until=start + BOUND)
    assert time.monotonic() - start < 1.0


def test_stop_from_a_signal_handler(loop):
    loop.max_wait = 30.0
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: loop.stop())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        loop.run(until=start + BOUND)
        assert time.monotonic() - start < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_timer_added_from_a_signal_handler_runs_once_it_wakes_the_loop(loop):
    """As the daemon's SIGHUP handler does: a timer for now, then ``wake``; the loop runs it at its next turn, not
    once its wait would have ended."""
    loop.max_wait = 30.0
    ran: list[float] = []

    def handler(signum: int, frame: object) -> None:
        loop.call_at(loop.clock(), lambda: (ran.append(time.monotonic()), loop.stop()))
        loop.wake()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        loop.run(until=start + BOUND)
        assert len(ran) == 1 and ran[0] - start < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_stop_before_run_makes_the_next_run_return_at_once(loop):
    loop.stop()
    start = time.monotonic()
    loop.run(until=start + BOUND)
    assert time.monotonic() - start < 0.5
    loop.call_later(0.05, loop.stop)  # the flag was cleared: this run waits for its own stop
    loop.run(until=start + BOUND)
    assert time.monotonic() - start >= 0.04


# -- the balancer driver --------------------------------------------------------------------------------------
@pytest.fixture
def ports() -> Iterator[dict[int, DgramPort]]:
    made = {p: DgramPort() for p in (0, 1, 2, 3)}
    try:
        yield made
    finally:
        for port in made.values():
            port.close()


def test_balancer_driver_reads_a_burst_and_writes_what_the_balancer_sends(ports):
    clock = FakeClock()
    loop = Loop(clock=clock)
    balancer = standard_balancer()
    driver = BalancerDriver(balancer, ports, loop)
    for sport in (40000, 40001, 40002):
        ports[0].outer.send(client_tcp(SYN, sport=sport))
    loop.run_once(0)
    out = {p: port.wire_out() for p, port in ports.items()}
    sent = out[2] + out[3]
    assert len(sent) == 3 and all(f[12:14] == ETH_P_MPLS_UC.to_bytes(2, "big") for f in sent)
    assert all(SERVER_BY_MAC[f[0:6]].port_id == p for p in (2, 3) for f in out[p])
    assert driver.frames_read == {0: 3, 1: 0, 2: 0, 3: 0}
    assert sum(driver.frames_written.values()) == 3 and not driver.send_errors
    driver.close()
    loop.close()


def test_balancer_driver_runs_the_balancers_timers(ports):
    clock = FakeClock()
    loop = Loop(clock=clock)
    balancer = standard_balancer(timeouts=Timeouts(udp=10.0))
    driver = BalancerDriver(balancer, ports, loop)
    assert loop.next_timer() is None
    ports[0].outer.send(client_udp())
    loop.run_once(0)
    assert balancer.live == 1
    deadline = balancer.next_deadline()
    assert deadline is not None and loop.next_timer() == deadline
    clock.now = deadline + 0.001
    loop.run_once(0)
    assert balancer.live == 0 and balancer.stats().sessions_ended.get("idle_timeout") == 1
    assert loop.next_timer() == balancer.next_deadline()  # re-armed (label quarantine) or None
    driver.close()
    loop.close()


def test_balancer_driver_counts_send_errors_instead_of_raising():
    full = {p: (FullPort() if p == 2 else DgramPort()) for p in (0, 1, 2, 3)}
    try:
        loop = Loop(clock=FakeClock())
        driver = BalancerDriver(standard_balancer(), full, loop)
        full[0].outer.send(client_tcp(SYN, sport=40000))  # round robin: the first server is on port 2
        loop.run_once(0)
        assert driver.send_errors == {"enobufs": 1}
        assert driver.frames_written[2] == 0
        driver.close()
        loop.close()
    finally:
        for port in full.values():
            port.close()


def test_balancer_driver_counts_frames_for_ports_it_does_not_have():
    only = {0: DgramPort(), 1: DgramPort()}
    try:
        loop = Loop(clock=FakeClock())
        driver = BalancerDriver(standard_balancer(), only, loop)
        only[0].outer.send(client_tcp(SYN))
        loop.run_once(0)
        assert driver.drops == {"unknown_port": 1}
        driver.close()
        loop.close()
    finally:
        for port in only.values():
            port.close()


# -- the endpoint driver --------------------------------------------------------------------------------------
def test_endpoint_driver_moves_packets_between_host_and_wire():
    host, wire = DgramPort(), DgramPort()
    try:
        loop = Loop(clock=FakeClock())
        client = ClientEndpoint(mac=client_mac(), gateway_mac=PORT_MAC[0])
        driver = EndpointDriver(client, host, wire, loop)
        frame = client_udp()
        host.outer.send(frame[14:])  # the host stack writes the IP packet into the TUN
        loop.run_once(0)
        assert wire.wire_out() == [frame]  # first packet of a flow: unlabelled, to the gateway
        wire.outer.send(bytes(2))  # garbage from the wire: dropped by the endpoint
        loop.run_once(0)
        assert host.wire_out() == []
        assert driver.frames_read == {"host": 1, "wire": 1} and driver.frames_written == {"host": 0, "wire": 1}
        assert mac(0xB0, 0) == frame[0:6]
        driver.close()
        loop.close()
    finally:
        host.close()
        wire.close()
