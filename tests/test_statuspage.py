"""The status page and what goes with running the daemon as a service: the snapshot history, the HTTP endpoint's
``/`` and ``/status.json``, the page in a real browser (headless chromium through selenium: a hostile server name
stays text; the lab's servers, and a drain shown without a reload), sd_notify readiness on a real datagram
socket, the logfmt lines, and the systemd units checked by ``systemd-analyze verify``."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Net, handshake
from mplslb import logfmt
from mplslb.control import ControlServer, RateTracker, request, snapshot
from mplslb.control.history import HISTORY_CAPACITY, StatusHistory, points_since
from mplslb.control.metrics import MetricsServer, start_metrics_server
from mplslb.control.page import HEADERS
from mplslb.sdnotify import notify, reloading_message, socket_address

WALL_LIMIT = 10.0
REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "packaging" / "systemd"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class Source:
    """A balancer with one live session, snapshots taken by hand and published as the daemon loop publishes."""

    def __init__(self) -> None:
        self.net = Net()
        self.server, _ = handshake(self.net)
        self.rates = RateTracker()
        self.history = StatusHistory()
        self.published: tuple[dict[str, Any] | None, tuple[dict[str, Any], ...]] = (None, ())
        self.now = 100.0

    def tick(self, seconds: float = 1.0) -> dict[str, Any]:
        self.now += seconds
        snap = snapshot(self.net.balancer, rates=self.rates, now=self.now)
        self.history.record(snap)
        self.published = (snap, self.history.points())
        return snap


def synthetic(t: float, started: int, frames: int, servers: dict[str, int]) -> dict[str, Any]:
    """The parts of a snapshot the history reads."""
    return {
        "time": t,
        "sessions": {"active": sum(servers.values()) % 7, "started": started},
        "frames": {"in": frames, "out": frames // 2, "fast_path": frames, "slow_path": started},
        "servers": [
            {
                "name": name,
                "status": "up",
                "active": total % 3,
                "total": total,
                "packets_in": 2 * total,
                "packets_out": total,
            }
            for name, total in servers.items()
        ],
    }


# -- the history ----------------------------------------------------------------------------------------------------
def test_history_points_carry_counts_and_per_second_rates() -> None:
    history = StatusHistory()
    assert history.record(synthetic(10.0, 5, 100, {"s1": 3, "s2": 2}))
    assert history.record(synthetic(12.0, 9, 160, {"s1": 6, "s2": 3}))
    first, second = history.points()
    assert first["t"] == 10.0 and first["sessions_per_s"] is None and first["servers"]["s1"]["sessions_per_s"] is None
    assert second["t"] == 12.0
    assert second["sessions"] == synthetic(12.0, 9, 160, {"s1": 6, "s2": 3})["sessions"]["active"]
    assert second["sessions_per_s"] == 2.0  # (9 - 5) / 2 s
    assert second["frames_in_per_s"] == 30.0
    assert second["frames_out_per_s"] == 15.0
    assert second["slow_path_per_s"] == 2.0
    assert second["servers"]["s1"] == {
        "status": "up",
        "active": 0,
        "sessions_per_s": 1.5,
        "packets_in_per_s": 3.0,
        "packets_out_per_s": 1.5,
    }
    assert second["servers"]["s2"]["sessions_per_s"] == 0.5
    json.dumps(history.points(), allow_nan=False)


def test_history_is_a_bounded_ring_and_published_views_never_change() -> None:
    history = StatusHistory(capacity=5)
    views = []
    for i in range(12):
        assert history.record(synthetic(float(i), i, 10 * i, {"s1": i}))
        views.append(history.points())
    assert len(history) == 5
    assert [p["t"] for p in history.points()] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert [p["t"] for p in views[2]] == [0.0, 1.0, 2.0]  # what a reader held is untouched by later records
    assert all(p["sessions_per_s"] == 1.0 for p in history.points())
    assert StatusHistory().capacity == HISTORY_CAPACITY == 300


def test_history_skips_readings_too_close_or_out_of_order() -> None:
    history = StatusHistory(min_gap=0.5)
    assert history.record(synthetic(10.0, 0, 0, {"s1": 0}))
    assert not history.record(synthetic(10.0, 1, 1, {"s1": 1}))  # same time
    assert not history.record(synthetic(9.0, 1, 1, {"s1": 1}))  # earlier
    assert not history.record(synthetic(10.2, 1, 1, {"s1": 1}))  # closer than min_gap
    assert history.record(synthetic(11.0, 4, 8, {"s1": 4}))
    assert [p["t"] for p in history.points()] == [10.0, 11.0]
    assert history.points()[-1]["sessions_per_s"] == 4.0  # measured from the last kept point
    with pytest.raises(ValueError, match="capacity"):
        StatusHistory(capacity=0)
    with pytest.raises(ValueError, match="min_gap"):
        StatusHistory(min_gap=float("nan"))


def test_history_new_servers_have_no_rate_and_a_counter_that_went_down_starts_over() -> None:
    history = StatusHistory()
    history.record(synthetic(1.0, 0, 0, {"s1": 10}))
    history.record(synthetic(2.0, 0, 0, {"s1": 4, "s2": 7}))  # s1 removed and added again; s2 new
    servers = history.points()[-1]["servers"]
    assert servers["s1"]["sessions_per_s"] == 4.0
    assert servers["s2"]["sessions_per_s"] is None
    history.record(synthetic(3.0, 0, 0, {"s2": 9}))  # s1 gone
    assert set(history.points()[-1]["servers"]) == {"s2"}
    assert history.points()[-1]["servers"]["s2"]["sessions_per_s"] == 2.0


def test_points_since_gives_only_newer_points() -> None:
    history = StatusHistory()
    for t in (1.0, 2.0, 3.0, 4.0):
        history.record(synthetic(t, 0, 0, {}))
    points = history.points()
    assert [p["t"] for p in points_since(points, None)] == [1.0, 2.0, 3.0, 4.0]
    assert [p["t"] for p in points_since(points, 2.0)] == [3.0, 4.0]
    assert [p["t"] for p in points_since(points, 2.5)] == [3.0, 4.0]
    assert list(points_since(points, 4.0)) == []
    assert [p["t"] for p in points_since(points, 0.0)] == [1.0, 2.0, 3.0, 4.0]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        # gaps above the history's 0.5 s least gap by more than a sum of floats can round away
        st.tuples(st.floats(0.501, 30.0), st.integers(0, 1000), st.integers(0, 10**6)),
        min_size=1,
        max_size=40,
    ),
    capacity=st.integers(1, 10),
)
def test_history_rates_are_the_increase_over_the_gap(steps: list[tuple[float, int, int]], capacity: int) -> None:
    history = StatusHistory(capacity=capacity)
    t, started, frames = 0.0, 0, 0
    expected = []
    for gap, new, more in steps:
        previous = (t, started, frames)
        t, started, frames = t + gap, started + new, frames + more
        assert history.record(synthetic(t, started, frames, {"s1": started}))
        expected.append((t, (started - previous[1]) / (t - previous[0]), (frames - previous[2]) / (t - previous[0])))
    points = history.points()
    assert len(points) == min(capacity, len(steps))
    for point, (when, sessions_rate, frames_rate) in zip(points, expected[-len(points) :], strict=True):
        assert point["t"] == when
        if len(steps) > len(points) or point is not points[0]:
            assert point["sessions_per_s"] == pytest.approx(sessions_rate)
            assert point["frames_in_per_s"] == pytest.approx(frames_rate)
            assert point["servers"]["s1"]["sessions_per_s"] == pytest.approx(sessions_rate)
        assert all(v is None or v >= 0 for k, v in point.items() if k.endswith("_per_s"))


# -- the HTTP endpoint ----------------------------------------------------------------------------------------------
@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def endpoint(source: Source) -> Iterator[MetricsServer]:
    server = start_metrics_server(0, "127.0.0.1", lambda: source.published[0], page=lambda: source.published)
    try:
        yield server
    finally:
        server.close()


def get(port: int, path: str, *, method: str = "GET", host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=WALL_LIMIT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_status_json_is_the_control_sockets_snapshot_plus_the_history(source: Source, endpoint: MetricsServer) -> None:
    status, _, body = get(endpoint.port, "/status.json")
    assert status == 503 and json.loads(body) == {"ok": False, "error": "the daemon has not taken a snapshot yet"}
    for _ in range(3):
        source.tick()
    path = os.path.join(tempfile.mkdtemp(prefix="mplslb-page-"), "ctl.sock")
    control = ControlServer(path, lambda: source.published[0])  # type: ignore[arg-type,return-value]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            control.run_once(0.02)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        from_socket = request(path, {"cmd": "status"})
    finally:
        stop.set()
        thread.join(WALL_LIMIT)
        control.close()
        os.rmdir(os.path.dirname(path))
    status, headers, body = get(endpoint.port, "/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    reply = json.loads(body)
    assert reply["ok"] is True
    assert reply["status"] == from_socket["status"]
    assert reply["status"]["servers"][0]["name"] == "s1"
    assert reply["history"]["capacity"] == 300
    assert [p["t"] for p in reply["history"]["points"]] == [101.0, 102.0, 103.0]
    assert reply["history"]["points"][-1]["sessions"] == 1
    # ?since= gives only the newer points; a bad value is refused
    reply = json.loads(get(endpoint.port, "/status.json?since=101.5")[2])
    assert [p["t"] for p in reply["history"]["points"]] == [102.0, 103.0]
    for bad in ("abc", "nan", "inf"):
        status, _, body = get(endpoint.port, f"/status.json?since={bad}")
        assert status == 400 and "since" in json.loads(body)["error"]


def test_the_page_its_files_and_the_metrics_share_the_endpoint(source: Source, endpoint: MetricsServer) -> None:
    source.tick()
    status, headers, body = get(endpoint.port, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="page.js"></script>' in body and b'<table id="servers">' in body
    for name, value in HEADERS:
        assert headers[name] == value
    assert "script-src 'self'" in headers["Content-Security-Policy"]  # no inline script can run
    assert b"<script>" not in body and re.search(rb"\son\w+\s*=", body) is None  # none written either
    status, headers, body = get(endpoint.port, "/page.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in body and b"insertAdjacentHTML" not in body and b"eval(" not in body
    assert get(endpoint.port, "/page.css")[0] == 200
    status, _, body = get(endpoint.port, "/metrics")
    assert status == 200 and b"mplslb_sessions_active 1.0" in body
    assert get(endpoint.port, "/nothing")[0] == 404
    status, headers, _ = get(endpoint.port, "/", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(endpoint.port, "/status.json", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_the_endpoint_listens_on_ipv6_too(source: Source) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    source.tick()
    try:
        server = start_metrics_server(0, "::1", lambda: source.published[0], page=lambda: source.published)
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        status, _, body = get(server.port, "/status.json", host="[::1]")
        assert status == 200 and json.loads(body)["ok"] is True
    finally:
        server.close()


# -- sd_notify --------------------------------------------------------------------------------------------------------
def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False  # not started by systemd: nothing to do
    assert notify("READY=1", {"NOTIFY_SOCKET": "relative/name"}) is False
    short = tempfile.mkdtemp(prefix="mplslb-notify-")
    path = os.path.join(short, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(WALL_LIMIT)
        assert notify("READY=1\nSTATUS=balancing", {"NOTIFY_SOCKET": path}) is True
        assert listener.recv(4096) == b"READY=1\nSTATUS=balancing"
    os.unlink(path)
    assert notify("READY=1", {"NOTIFY_SOCKET": path}) is False  # nobody listens: reported, not raised
    os.rmdir(short)
    name = f"mplslb-test-{os.getpid()}"
    assert socket_address("@" + name) == b"\0" + name.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name.encode())
        listener.settimeout(WALL_LIMIT)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert listener.recv(4096) == b"STOPPING=1"
    assert reloading_message(12.5) == "RELOADING=1\nMONOTONIC_USEC=12500000"


# -- log lines --------------------------------------------------------------------------------------------------------
def test_log_lines_are_logfmt_on_the_given_stream() -> None:
    assert logfmt.value("s1") == "s1"
    assert logfmt.value("web 1") == '"web 1"'
    assert logfmt.value('a"b=c') == '"a\\"b=c"'
    assert logfmt.value("") == '""'
    assert logfmt.value("x\ny") == '"x\\ny"'
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        logfmt.setup(stream)
        logging.getLogger("mplslb.balancer").info("event=started status_page=%s", "http://127.0.0.1:9108/")
    finally:
        root.handlers, root.level = saved[0], saved[1]
    line = stream.getvalue()
    assert line.endswith(" level=INFO logger=mplslb.balancer event=started status_page=http://127.0.0.1:9108/\n")
    fields = dict(pair.split("=", 1) for pair in line.split())
    assert fields["ts"].endswith("Z") and len(fields["ts"]) == len("2026-01-01T00:00:00.000Z")
    time.strptime(fields["ts"][: -len(".000Z")], "%Y-%m-%dT%H:%M:%S")


# -- systemd units ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units, with ExecStart pointed at this environment's ``mplslb`` (the units
    name /usr/local/bin/mplslb, where pip installs it for root)."""
    here = Path(sys.executable).parent / "mplslb"
    if not here.exists():
        pytest.skip(f"no mplslb entry point beside {sys.executable}")
    units = sorted(UNITS.glob("*.service"))
    assert {u.name for u in units} == {
        "mplslb-balancer.service",
        "mplslb-agent-server@.service",
        "mplslb-agent-client@.service",
    }
    for unit in units:
        text = unit.read_text()
        assert "/usr/local/bin/mplslb " in text
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/mplslb", str(here)))
    balancer = (UNITS / "mplslb-balancer.service").read_text()
    assert "Type=notify" in balancer and "ExecReload=/bin/kill -HUP $MAINPID" in balancer
    assert "MPLSLB_CONFIG=/etc/mplslb/lb.toml" in balancer
    names = ["mplslb-balancer.service", "mplslb-agent-server@eth0.service", "mplslb-agent-client@eth0.service"]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{n}" for n in names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "mplslb" not in output, output  # no warning about our units (unknown keys are only warned about)


# -- the page in a browser --------------------------------------------------------------------------------------------
def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (make debs installs chromium and chromium-driver)"
    return ""


needs_browser = pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "-")


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """Headless chromium driven by Debian's chromedriver; quit (chromedriver and chromium stopped) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mplslb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root has no user namespace sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_dom(driver: Any, predicate: Any, what: str, timeout: float = 15.0) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    ).until(predicate, f"waiting for {what}")


def server_cells(driver: Any) -> dict[str, list[str]]:
    """The servers table as the page shows it: name -> the row's cells."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#servers tbody tr'))"
        ".map(tr => Array.from(tr.children).map(td => td.textContent));"
    )
    return {row[0]: row for row in rows}


STATE = 3  # the servers table's columns: name, address, card/port, state, weight, active, sessions...


@needs_browser
def test_the_page_shows_names_as_text_and_follows_changes_without_reload(source: Source) -> None:
    hostile = "<img src=x onerror=\"document.title='pwned'\">&amp;<script>alert(1)</script>"
    state: dict[str, Any] = {}

    def publish() -> None:
        snap, points = source.published
        snap = copy.deepcopy(snap)
        assert snap is not None
        snap["servers"][1]["name"] = hostile
        snap["drops"] = {"<b>bad</b> reason": 3}
        points = copy.deepcopy(points)
        for point in points:
            point["servers"][hostile] = point["servers"].pop("s2")
        state["published"] = (snap, points)

    source.tick()
    publish()
    server = start_metrics_server(0, "127.0.0.1", lambda: state["published"][0], page=lambda: state["published"])
    try:
        with browser() as driver:
            driver.get(f"http://127.0.0.1:{server.port}/")
            wait_dom(driver, lambda d: len(server_cells(d)) == 3, "the three servers")
            cells = server_cells(driver)
            assert set(cells) == {"s1", hostile, "s3"}
            assert driver.title == "mplslb status"
            assert driver.execute_script("return document.querySelectorAll('img, b, #servers script').length") == 0
            drops = driver.execute_script("return document.querySelector('#drops tbody').textContent")
            assert "<b>bad</b> reason" in drops
            driver.execute_script("window.mplslbMarker = 42;")
            # a change in the daemon shows within a poll, in the same document
            source.net.balancer.drain("s3")
            source.tick()
            publish()
            wait_dom(driver, lambda d: server_cells(d)["s3"][STATE] == "draining", "s3 shown draining")
            assert driver.execute_script("return window.mplslbMarker") == 42
            for _ in range(2):
                source.tick()
            publish()
            wait_dom(
                driver,
                lambda d: d.execute_script("return document.querySelectorAll('#chart-sessions polyline').length") > 0,
                "the sessions chart's line",
            )
            legend = driver.execute_script(
                "return Array.from(document.querySelectorAll('#legend-servers li')).map(li => li.textContent)"
            )
            assert sorted(legend) == sorted(["s1", hostile, "s3"])
            # the daemon going away is shown, the page stays
            server.close()
            wait_dom(driver, lambda d: "no answer" in d.find_element("id", "conn").text, "the lost connection")
            assert driver.execute_script("return window.mplslbMarker") == 42
    finally:
        server.close()


# -- the lab: the real daemon's page --------------------------------------------------------------------------------
LAB_ROOT = Path("/run/mplslb-test-labs")


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Any, socket.socket]]:
    """The lab, its balancer started as systemd would start a Type=notify service: with $NOTIFY_SOCKET naming a
    datagram socket of ours (a path: abstract sockets belong to a network namespace). Yields the lab and that
    socket; the balancer's STOPPING=1 is checked when the lab goes down."""
    from pyroute2 import netns

    from mplslb.lab import Lab, LabSpec

    short = tempfile.mkdtemp(prefix="mplslb-notify-")
    path = os.path.join(short, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(WALL_LIMIT)
    the_lab = Lab(LabSpec(name=f"p{os.getpid() % 100000}", clients=1, servers=2, datapath="auto"), root=LAB_ROOT)
    saved = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = path  # inherited by the processes the lab starts; only the balancer speaks
    try:
        try:
            the_lab.up()
        finally:
            if saved is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = saved
        yield the_lab, listener
        assert the_lab.down() == []
        assert listener.recv(4096) == b"STOPPING=1"
    finally:
        the_lab.down()
        listener.close()
        os.unlink(path)
        os.rmdir(short)
        assert [ns for ns in netns.listnetns() if ns.startswith(the_lab.spec.name + "-")] == []


def drain(the_lab: Any, name: str) -> None:
    """``mplslb server drain NAME`` where the CLI has that command; otherwise the control request it sends."""
    from mplslb.cli import main

    if "server" in getattr(main, "commands", {}):
        argv = [sys.executable, "-m", "mplslb", "server", "drain", name, "--socket", the_lab.control_socket]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    else:
        assert the_lab.command(cmd="drain", server=name)["status"] == "draining"


@needs_browser
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN and packet sockets")
@pytest.mark.skipif(
    any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
    reason="nginx, curl and nsenter are needed (make test installs them)",
)
def test_the_lab_balancers_page_shows_its_servers_and_a_drain_without_reload(lab: tuple[Any, socket.socket]) -> None:
    from mplslb.drivers.netns import entered

    the_lab, notifications = lab
    # Ready for systemd once its ports, control socket and HTTP endpoint are open; the start line names the page.
    assert notifications.recv(4096) == b"READY=1\nSTATUS=balancing; status page http://127.0.0.1:9108/"
    started = [line for line in the_lab.log("balancer").splitlines() if "event=started" in line]
    assert len(started) == 1 and " status_page=http://127.0.0.1:9108/ " in started[0], started
    names = [the_lab.server_name(j) for j in range(the_lab.spec.servers)]
    # The endpoint listens on 127.0.0.1 of the balancer's namespace: the browser runs there.
    with entered(the_lab.lb), browser() as driver:
        driver.get("http://127.0.0.1:9108/")
        wait_dom(
            driver,
            lambda d: all(server_cells(d).get(n, [""] * 4)[STATE] == "up" for n in names),
            "every server of the lab shown up",
            timeout=30.0,
        )
        assert set(server_cells(driver)) == set(names)
        driver.execute_script("window.mplslbMarker = 7;")
        bodies = the_lab.curl(0, 6)
        assert all(bodies), bodies
        total = 6  # the servers' "sessions" column counts every session sent to them
        wait_dom(driver, lambda d: sum(int(c[6]) for c in server_cells(d).values()) >= total, "the curl sessions")
        drained = names[1]
        drain(the_lab, drained)
        wait_dom(driver, lambda d: server_cells(d)[drained][STATE] == "draining", f"{drained} shown draining")
        assert driver.execute_script("return window.mplslbMarker") == 7  # the same document: no reload
        assert {n: c[STATE] for n, c in server_cells(driver).items() if n != drained} == {
            n: "up" for n in names if n != drained
        }
        assert driver.execute_script("return document.querySelectorAll('#chart-servers polyline').length") > 0
    # A reload, as systemd's ExecReload asks it (SIGHUP) or the CLI: RELOADING=1 with its time, then READY=1.
    assert the_lab.command(cmd="reload")["ok"] is True
    reloading = notifications.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC="), reloading
    assert notifications.recv(4096) == b"READY=1"
