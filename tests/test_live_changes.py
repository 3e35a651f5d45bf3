"""Live changes to a running balancer: servers added and removed (draining or at once), the algorithm and the
admission limits switched, a new configuration applied by difference (what a reload does) or refused whole. New
sessions follow each change; established sessions keep their server and labels.

The first part drives the sans-I/O balancer frame by frame; the last runs the real lab (namespaces, the daemon,
nginx, curl) and changes its pool under load with ``mplslb server remove`` and with SIGHUP (root; slow).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from helpers import ACK, RST, SYN, VIP, Net, client_addr, handshake, ip, label_of, mac, make_config, running_lab, tcp
from mplslb.balancing.servers import ServerConfig, ServerStatus
from mplslb.config import ConfigError, PortConfig, diff_configs
from mplslb.endpoint import ServerEndpoint
from mplslb.lab import VIP4, Lab, LabSpec, split
from mplslb.sessions import Timeouts

S4 = ServerConfig("s4", ip("10.2.0.4"), mac(0x5E, 4), port_id=2)


def with_server(net: Net, config: ServerConfig) -> None:
    """Give ``net`` the endpoint of a server added to its balancer at run time."""
    net.servers[config.name] = ServerEndpoint(mac=config.mac, vips=[VIP])
    net.server_by_mac[config.mac] = config.name
    net.server_port[config.name] = config.port_id


def new_session(net: Net, sport: int, i: int = 0) -> str | None:
    """A new session's SYN: the server it went to, or None when it was refused."""
    out = net.from_client(i, tcp(client_addr(i), VIP, sport, 80, SYN))
    if not out or label_of(out[0][1]) is None:
        return None
    ((name, _),) = net.deliver_to_servers(out)
    return name


def still_switched(net: Net, name: str, sport: int, i: int = 0) -> bool:
    """The established session on ``sport`` still reaches ``name`` on its label."""
    out = net.from_client(i, tcp(client_addr(i), VIP, sport, 80, ACK, seq=101, ack=501))
    return [n for n, _ in net.deliver_to_servers(out)] == [name]


def reset(net: Net, sport: int, i: int = 0) -> None:
    """The client ends its session on ``sport`` with a RST (a final state at once)."""
    net.deliver_to_servers(net.from_client(i, tcp(client_addr(i), VIP, sport, 80, RST | ACK, seq=101, ack=501)))


# -- servers ------------------------------------------------------------------------------------------------------
def test_an_added_server_takes_new_sessions_at_once() -> None:
    net = Net(make_config(n_servers=2))
    b = net.balancer
    b.add_server(S4)
    with_server(net, S4)
    assert [new_session(net, 41000 + i) for i in range(6)] == ["s1", "s2", "s4"] * 2
    assert [s.name for s in b.config.servers] == ["s1", "s2", "s4"]  # the running configuration has it


@pytest.mark.parametrize(
    ("server", "key", "reason"),
    [
        (replace(S4, name="s1"), "name", "duplicate server name 's1'"),
        (replace(S4, address=ip("10.2.0.2")), "address", "10.2.0.2 is already the address of server 's2'"),
        (replace(S4, mac=mac(0x5E, 1)), "mac", "02:5e:00:00:00:01 is already the mac of server 's1'"),
        (replace(S4, port_id=0), "port", "port 0 is a client-side port, not a server port"),
        (replace(S4, port_id=9), "port", "no port with id 9"),
    ],
)
def test_an_added_server_is_checked_as_a_configured_one(server: ServerConfig, key: str, reason: str) -> None:
    b = Net(make_config(n_servers=2)).balancer
    with pytest.raises(ConfigError) as caught:
        b.add_server(server)
    assert caught.value.key == key and reason in caught.value.reason
    assert [s.name for s in b.pool] == ["s1", "s2"] and len(b.config.servers) == 2


def test_remove_drains_then_the_server_leaves_with_its_last_session() -> None:
    net = Net(make_config(n_servers=2))
    b = net.balancer
    name, _ = handshake(net, sport=40000)
    other = "s2" if name == "s1" else "s1"
    handshake(net, sport=40001)  # the other server's
    assert b.retire_server(name) is False  # it has a session: it drains out
    server = b.pool.get(name)
    assert server.status is ServerStatus.REMOVING and name in b.pool
    assert name not in {s.name for s in b.config.servers}
    assert [new_session(net, 42000 + i) for i in range(4)] == [other] * 4  # no new session goes to it
    assert still_switched(net, name, 40000)  # its established session is untouched
    assert b.pool.mark_up(name) is False  # nothing brings a leaving server back
    reset(net, 40000)
    assert name not in b.pool  # it left with its last session
    assert [new_session(net, 43000 + i) for i in range(2)] == [other] * 2


def test_remove_of_a_server_without_sessions_is_immediate_and_now_interrupts() -> None:
    net = Net(make_config(n_servers=3))
    b = net.balancer
    name, c2s = handshake(net)
    idle = next(s.name for s in b.pool if s.name != name)
    assert b.retire_server(idle) is True and idle not in b.pool
    b.remove_server(name, net.now)  # --now
    assert name not in b.pool
    assert b.sessions.by_c2s(c2s) is None and b.switching.installed == 0  # interrupted, labels withdrawn
    assert b.stats().sessions_ended == {"server_down": 1}


def test_algorithm_and_limits_apply_to_new_sessions_only() -> None:
    net = Net(make_config(n_servers=2))
    b = net.balancer
    first, _ = handshake(net, sport=40000)
    handshake(net, sport=40001)
    handshake(net, sport=40002)  # round robin: the first server has two sessions, the other one
    busy = b.pool.get(first)
    assert busy.active == 2
    b.set_algorithm("least_connections")
    assert b.config.algorithm == "least_connections"
    other = "s2" if first == "s1" else "s1"
    assert new_session(net, 41000) == other  # the one with fewer sessions
    assert still_switched(net, first, 40000)
    with pytest.raises(ValueError, match="unknown load balancing algorithm"):
        b.set_algorithm("random")
    assert b.config.algorithm == "least_connections"
    b.set_limits(max_sessions=b.live)
    assert new_session(net, 41001) is None and b.stats().refused == {"global_session_limit": 1}
    assert still_switched(net, first, 40000)
    b.set_limits(max_sessions=0, max_new_per_second=1.0)
    assert b.config.max_sessions == 0 and b.config.max_new_per_second == 1.0
    assert new_session(net, 41002) is not None and new_session(net, 41003) is None  # a burst of one
    assert b.stats().refused == {"global_session_limit": 1, "new_session_rate_limit": 1}  # counts carry on


# -- a new configuration: the difference ---------------------------------------------------------------------------
def test_diff_says_what_changed_and_what_cannot() -> None:
    old = make_config(n_servers=3)
    s1, s2, _ = old.servers
    new = replace(
        old,
        servers=(replace(s1, weight=0), replace(s2, max_sessions=5), S4),
        algorithm="maglev",
        max_sessions=100,
        timeouts=Timeouts(udp=30.0),
    )
    diff = diff_configs(old, new)
    assert diff.refused == ()
    assert diff.added == (S4,) and diff.removed == ("s3",)
    assert [s.name for s in diff.updated] == ["s1", "s2"]
    assert set(diff.settings) == {"algorithm", "max_sessions", "timeouts"}
    assert diff.changes == (
        "servers.s1.weight:1->0",
        "servers.s2.max_sessions:0->5",
        "servers.s4:added",
        "servers.s3:removed",
        "algorithm:round_robin->maglev",
        "limits.max_sessions:0->100",
        "timeouts.udp:300.0->30.0",
    )
    assert diff_configs(old, old) == diff_configs(new, new) == type(diff)()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"servers": "address"}, "servers[0].address"),
        ({"servers": "port_id"}, "servers[0].port"),
        ({"ports": "interface"}, "ports[2].interface"),
        ({"ports": "add"}, "ports"),
        ({"vips": "tcp"}, "vip[0].tcp"),
        ({"c2s_max": 1001}, "labels.c2s_max"),
        ({"label_quarantine": 90.0}, "labels.quarantine"),
    ],
)
def test_diff_refuses_what_cannot_change_live_naming_the_key(change: dict[str, Any], key: str) -> None:
    old = make_config(n_servers=2)
    what, value = next(iter(change.items()))
    if what == "servers":
        other = {"address": ip("10.2.0.99"), "port_id": 3}[value]
        new = replace(old, servers=(replace(old.servers[0], **{value: other}), old.servers[1]))
    elif what == "ports":
        if value == "add":
            new = replace(old, ports=(*old.ports, PortConfig(4, 1, 2, mac(0xB0, 4), "server")))
        else:
            new = replace(old, ports=(*old.ports[:2], replace(old.ports[2], interface="x"), old.ports[3]))
    elif what == "vips":
        new = replace(old, vips=(replace(old.vips[0], tcp_ports=(80, 443)), old.vips[1]))
    else:
        new = replace(old, **change)
    refused = diff_configs(old, new).refused
    assert [k for k, _ in refused] == [key]
    assert "cannot change" in refused[0][1]


def test_reconfigure_applies_the_difference_and_leaves_sessions_alone() -> None:
    net = Net(make_config(n_servers=3))
    b = net.balancer
    name, c2s = handshake(net)
    keep = [s for s in b.config.servers if s.name != name]
    new = replace(
        b.config,
        servers=(replace(keep[0], weight=0), keep[1], S4),
        algorithm="least_connections",
        max_new_per_second=50.0,
        timeouts=Timeouts(tcp_established=60.0),
        rt_limit=0.5,
    )
    changes = b.reconfigure(new)
    assert f"servers.{name}:removed" in changes and "servers.s4:added" in changes
    assert f"servers.{keep[0].name}.weight:1->0" in changes
    assert b.pool.get(name).status is ServerStatus.REMOVING  # it drains out
    assert b.sessions.by_c2s(c2s) is not None and still_switched(net, name, 40000)
    assert b.pool.get(keep[0].name).weight == 0
    assert type(b.algorithm).__name__ == "LeastConnections" and b.admission.max_new_per_second == 50.0
    assert b.sessions.timeouts.tcp_established == 60.0 and b.pool.get("s4").overloaded is False
    with_server(net, S4)
    assert new_session(net, 41000) in {keep[1].name, "s4"}
    assert b.config == replace(new, servers=(replace(keep[0], weight=0), keep[1], S4))
    assert b.reconfigure(b.config) == ()


def test_a_refused_reconfiguration_changes_nothing() -> None:
    net = Net(make_config(n_servers=2))
    b = net.balancer
    before = b.config
    # A weight change that would apply, and an added server with s2's MAC: refused whole, naming the entry.
    clash = replace(S4, mac=before.servers[1].mac)
    with pytest.raises(ConfigError, match=r"servers\[2\]\.mac: 02:5e:00:00:00:02 is already the mac of server 's2'"):
        b.reconfigure(replace(before, servers=(replace(before.servers[0], weight=7), before.servers[1], clash)))
    bad_port = PortConfig(2, 1, 0, before.ports[2].mac, "server", interface="elsewhere")
    with pytest.raises(ConfigError, match=r"ports\[2\]\.interface"):
        b.reconfigure(replace(before, ports=(*before.ports[:2], bad_port, before.ports[3]), algorithm="maglev"))
    assert b.config == before and b.pool.get("s1").weight == 1 and len(b.pool) == 2
    assert type(b.algorithm).__name__ == "RoundRobin"


def test_a_server_being_removed_cannot_come_back_under_its_name_until_it_left() -> None:
    net = Net(make_config(n_servers=2))
    b = net.balancer
    name, _ = handshake(net)
    config = b.pool.get(name).config
    b.retire_server(name)
    with pytest.raises(ConfigError, match="still being removed"):
        b.add_server(config)
    with pytest.raises(ConfigError, match=r"servers\[1\]\.name: .*still being removed"):
        b.reconfigure(replace(b.config, servers=(*b.config.servers, config)))
    reset(net, 40000)
    b.add_server(config)  # gone: a new server under the old name
    assert b.pool.get(name).status is ServerStatus.UP


# == the real lab: nginx behind the daemon, changed under load =====================================================
LAB_ROOT = Path("/run/mplslb-test-labs")
lab_only = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN and packet sockets"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
]
LOAD_SECONDS = 4
CURLS = 200  # sequential requests, one session each, around the change (about 2 s here); each bounded by --max-time
BIG = 2**20  # a download held open across the change (HOLD)
#: A download that stops reading after the first line of its body (which names the server) until told "go" on
#: stdin, with a small receive buffer: most of the body is still to cross the balancer when it goes on, whatever
#: the timing, so a session the change broke would fail it. Prints the server, then "done LENGTH" or the error.
HOLD = r"""
import socket, sys
try:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.settimeout(30)
    s.connect((sys.argv[1], 80))
    s.sendall(b"GET /big HTTP/1.1\r\nHost: lab\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or b"\n" not in data.split(b"\r\n\r\n", 1)[1]:
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError("closed before the body")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")).split(b":")[1])
    print(body.split(b"\n", 1)[0].decode().removeprefix("server "), flush=True)
    sys.stdin.readline()
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    print("done", len(body) if len(body) == length else f"short {len(body)} of {length}", flush=True)
except Exception as exc:
    print("failed", type(exc).__name__, exc, flush=True)
"""


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LabSpec(name=f"v{os.getpid() % 100000}"), LAB_ROOT) as the_lab:
        for j in range(the_lab.spec.servers):
            name = the_lab.server_name(j)
            (the_lab.dir / name / "www" / "big").write_text(f"server {name}\n" + "x" * BIG)
        yield the_lab


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``mplslb`` command against the lab's daemon."""
    argv = [sys.executable, "-m", "mplslb", *args, "--socket", lab.control_socket]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def pool(lab: Lab) -> dict[str, str]:
    """Server -> status, from a fresh snapshot (the daemon publishes one each second)."""
    time.sleep(1.1)
    return {row["name"]: row["status"] for row in lab.status()["status"]["servers"]}


def hold_download(lab: Lab) -> tuple[subprocess.Popen[str], str]:
    """Start a HOLD download from client 2 and wait for its first line: its session is open and mid-body."""
    argv = ["nsenter", f"--net=/var/run/netns/{lab.client_ns(2)}", "--", sys.executable, "-c", HOLD, VIP4]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    first = proc.stdout.readline().strip() if ready else "no answer in 30 s"
    return proc, first


def under_load(
    lab: Lab, change: Any, downloads_on: tuple[str, ...] = ("s1", "s2", "s3")
) -> tuple[list[str], dict[str, float]]:
    """Load, and ``change()`` in the middle of it; returns the bodies of the curl loop and wrk's figures, and
    checks that the held downloads, on the servers ``downloads_on``, completed after the change.

    The load: three HOLD downloads first, one after the other (three new sessions in a row: round robin gives one
    to each server in service), then a bounded sequential curl loop (client 0, a session per request) and wrk
    (client 1, 4 keep-alive connections, LOAD_SECONDS). ``change()`` runs a second after the loop started; then
    the downloads read the rest of their bodies.
    """
    bodies: list[str] = []
    figures: dict[str, float] = {}
    held = []
    try:
        for _ in downloads_on:
            held.append(hold_download(lab))
        assert sorted(first for _, first in held) == sorted(downloads_on), held
        loops = [
            threading.Thread(target=lambda: bodies.extend(lab.curl(0, CURLS))),
            threading.Thread(target=lambda: figures.update(lab.wrk(1, seconds=LOAD_SECONDS, connections=4))),
        ]
        for loop in loops:
            loop.start()
        try:
            time.sleep(1.0)
            change()
        finally:
            for loop in loops:
                loop.join(timeout=LOAD_SECONDS + 150)
        assert not any(loop.is_alive() for loop in loops)
        done = [proc.communicate("go\n", timeout=60)[0].strip() for proc, _ in held]
        assert done == [f"done {BIG + len('server sN') + 1}"] * len(held), done
    finally:
        for proc, _ in held:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return bodies, figures


def no_request_failed(bodies: list[str], figures: dict[str, float]) -> None:
    assert len(bodies) == CURLS and all(bodies), f"failed curl requests: {bodies.count('')} of {CURLS}"
    assert figures.get("requests", 0) > 0, figures
    assert figures["socket_errors"] == 0 and figures["non_2xx"] == 0, figures


def reload_lines(lab: Lab) -> list[str]:
    """The daemon's reload log lines, oldest first."""
    return re.findall(r"event=reload_\w+ .*", lab.log("balancer"))


def sighup(lab: Lab, toml: str) -> str:
    """Write the lab's configuration file and send the daemon SIGHUP; returns the reload's log line."""
    done = len(reload_lines(lab))
    (lab.dir / "lb.toml").write_text(toml)
    os.kill(lab.state.pids["balancer"], signal.SIGHUP)
    wait_for(lambda: len(reload_lines(lab)) > done, 10, "the reload's log line")
    return reload_lines(lab)[-1]


def without_server(toml: str, name: str) -> str:
    """``toml`` without the [[servers]] entry of ``name``."""
    blocks = toml.split("\n\n")
    return "\n\n".join(b for b in blocks if not (b.startswith("[[servers]]") and f'name = "{name}"' in b))


def with_weight(toml: str, name: str, weight: int) -> str:
    """``toml`` with server ``name``'s weight set."""
    blocks = toml.split("\n\n")
    return "\n\n".join(
        re.sub(r"weight = \d+", f"weight = {weight}", b) if f'name = "{name}"' in b else b for b in blocks
    )


def lab_test(fn: Any) -> Any:
    for mark in lab_only:
        fn = mark(fn)
    return fn


@lab_test
def test_server_remove_under_load_fails_no_request_and_new_sessions_follow_the_pool(lab: Lab) -> None:
    assert set(split(lab.curl(0, 30))) == {"s1", "s2", "s3"}
    replies: list[subprocess.CompletedProcess[str]] = []
    bodies, figures = under_load(lab, lambda: replies.append(cli(lab, "server", "remove", "s2")))
    (removed,) = replies
    assert removed.returncode == 0, removed.stderr
    # It had sessions (a download at least): it drains out, its sessions finish on it.
    assert removed.stdout.startswith("server s2: removing (") and "changed servers.s2:removing" in removed.stdout
    no_request_failed(bodies, figures)  # the sessions s2 had (wrk's keep-alive ones among them) finished on it
    wait_for(lambda: "s2" not in pool(lab), 20, "s2 to leave the pool once its sessions ended")
    after = split(lab.curl(0, 60))
    assert set(after) == {"s1", "s3"} and min(after.values()) >= 25, after  # round robin over the new pool
    added = cli(lab, "server", "add", "s2", "--ip", lab.server_addr(1), "--mac", "02:5e:00:00:00:02", "--port", "2")
    assert added.returncode == 0 and "changed servers.s2:added" in added.stdout, added.stderr
    assert split(lab.curl(0, 30)) == {"s1": 10, "s2": 10, "s3": 10}


@lab_test
def test_sighup_applies_a_new_configuration_under_load(lab: Lab) -> None:
    original = (lab.dir / "lb.toml").read_text()
    lines: list[str] = []
    try:
        # s1 to weight 0 and s3 out of the file: new sessions go to s2 alone.
        bodies, figures = under_load(
            lab, lambda: lines.append(sighup(lab, with_weight(without_server(original, "s3"), "s1", 0)))
        )
        no_request_failed(bodies, figures)
        assert lines[-1].startswith("event=reload_ok"), lines
        assert "servers.s1.weight:1->0" in lines[-1] and "servers.s3:removed" in lines[-1]
        wait_for(lambda: "s3" not in pool(lab), 20, "s3 to leave the pool once its sessions ended")
        assert split(lab.curl(0, 30)) == {"s2": 30}
        # The first file again: s3, a server of the lab the running configuration does not have, is added.
        bodies, figures = under_load(lab, lambda: lines.append(sighup(lab, original)), downloads_on=("s2",) * 3)
        no_request_failed(bodies, figures)
        assert "servers.s3:added" in lines[-1] and "servers.s1.weight:0->1" in lines[-1], lines
        assert split(lab.curl(0, 30)) == {"s1": 10, "s2": 10, "s3": 10}
    finally:
        (lab.dir / "lb.toml").write_text(original)


@lab_test
def test_a_reload_that_cannot_apply_is_refused_naming_the_key_and_nothing_changes(lab: Lab) -> None:
    original = (lab.dir / "lb.toml").read_text()
    try:
        for text, key, reason in (
            (
                original.replace('interface = "lc1p0"', 'interface = "lc1p9"'),
                "ports[1].interface",
                "lc1p0 -> lc1p9: cannot",
            ),
            (with_weight(original, "s1", -1), "servers[0].weight", "must be >= 0"),
            (original.replace("[[servers]]", "[[servers]", 1), "(syntax)", ""),
            (original.replace('[health_check]\nkind = "http"', '[health_check]\nkind = "tcp"'), "health_check", ""),
        ):
            (lab.dir / "lb.toml").write_text(text)
            refused = cli(lab, "reload")
            assert refused.returncode == 1, refused.stdout
            assert f"{lab.dir / 'lb.toml'}: {key}: {reason}" in refused.stderr, refused.stderr
            assert f"event=reload_refused file={lab.dir / 'lb.toml'} key={key} " in reload_lines(lab)[-1]
        assert pool(lab) == {"s1": "up", "s2": "up", "s3": "up"}
        assert split(lab.curl(0, 30)) == {"s1": 10, "s2": 10, "s3": 10}
        (lab.dir / "lb.toml").write_text(original)
        same = cli(lab, "reload")
        assert same.returncode == 0 and same.stdout.splitlines()[1:] == ["no change"], same.stdout
    finally:
        (lab.dir / "lb.toml").write_text(original)
