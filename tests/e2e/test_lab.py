"""The real thing: namespaces, veth pairs, the daemon, the agents, stock nginx and curl (root; run in CI).

Each lab gets a name unique to this test process and is torn down after its tests, pass or fail; the last test of
each module checks that nothing it created is left.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import tcp
from mplslb.drivers.afpacket import PacketPort
from mplslb.drivers.netns import entered
from mplslb.lab import VIP4, Lab, LabSpec, split
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet, mac_from_str
from mplslb.wire.mpls import pack_entry, parse_stack
from mplslb.wire.tcp import TCPFlag

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN and packet sockets"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
]

ROOT = Path("/run/mplslb-test-labs")


def lab_name(tag: str) -> str:
    return f"{tag}{os.getpid() % 100000}"


def wait_for(predicate, timeout: float, what: str, step: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_nothing_left(the_lab: Lab) -> None:
    from pyroute2 import netns

    prefix = the_lab.spec.name + "-"
    assert [ns for ns in netns.listnetns() if ns.startswith(prefix)] == []
    assert not the_lab.dir.exists()
    for pid in the_lab.state.pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    the_lab = Lab(LabSpec(name=lab_name("e"), algorithm="weighted_round_robin"), root=ROOT)
    pids: dict[str, int] = {}
    try:
        the_lab.up()
        pids = dict(the_lab.state.pids)
        yield the_lab
    finally:
        problems = the_lab.down()
        the_lab.state.pids = pids
        assert problems == []
        assert_nothing_left(the_lab)


def status(lab: Lab) -> dict:  # type: ignore[type-arg]
    time.sleep(1.1)  # the daemon refreshes its snapshot every second
    return lab.status()["status"]


def test_round_robin_1000_sequential_curl_requests_all_answered_and_evenly_split(lab: Lab) -> None:
    lab.command(cmd="weight", server="s1", weight=1)  # equal weights: smooth WRR is plain round robin
    bodies: list[str] = []
    for client in range(3):
        bodies += lab.curl(client, 334 if client < 2 else 332)
    assert len(bodies) == 1000 and all(bodies), f"failed requests: {bodies.count('')}"
    counts = split(bodies)
    assert set(counts) == {"s1", "s2", "s3"}
    assert all(abs(n - 1000 / 3) <= 1 for n in counts.values()), counts


def test_weighted_round_robin_1_2_3_split_within_2_percent(lab: Lab) -> None:
    for name, weight in (("s1", 1), ("s2", 2), ("s3", 3)):
        assert lab.command(cmd="weight", server=name, weight=weight).get("ok"), name
    bodies = lab.curl(0, 600)
    counts = split(bodies)
    assert all(bodies)
    for name, share in (("s1", 1 / 6), ("s2", 2 / 6), ("s3", 3 / 6)):
        assert abs(counts[name] / 600 - share) <= 0.02, counts
    for name in ("s1", "s2", "s3"):
        lab.command(cmd="weight", server=name, weight=1)


def test_ipv6_vip_curl(lab: Lab) -> None:
    bodies = lab.curl(1, 150, v6=True)
    assert all(bodies) and set(split(bodies)) == {"s1", "s2", "s3"}


def _capture(lab: Lab, path: Path, interfaces: list[str]) -> subprocess.Popen[bytes]:
    argv = ["nsenter", f"--net=/var/run/netns/{lab.lb}", "--", "tshark", "-q", "-w", str(path)]
    for interface in interfaces:
        argv += ["-i", interface]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: path.exists() and path.stat().st_size > 0, 15, "tshark to start")
    time.sleep(1.5)  # the file header is written before every interface captures: give them time
    return proc


def _tshark_rows(path: Path) -> list[dict[str, str]]:
    fields = ["frame.interface_name", "mpls.label", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "tcp.flags"]
    argv = ["tshark", "-r", str(path), "-Y", "tcp.port == 80 && (ip.addr == 10.0.0.100)", "-T", "fields"]
    argv += ["-E", "separator=\t", "-E", "occurrence=f"] + [x for f in fields for x in ("-e", f)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout
    return [dict(zip(fields, line.split("\t"), strict=True)) for line in out.splitlines()]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_capture_on_the_balancers_ports_shows_label_pairs_and_no_address_rewriting(lab: Lab, tmp_path: Path) -> None:
    before = status(lab)["frames"]
    path = tmp_path / "lb.pcapng"
    os.chmod(tmp_path, 0o777)
    proc = _capture(lab, path, ["lc0p0", "lc1p0", "lc1p1"])
    try:
        bodies = lab.curl(2, 30)
    finally:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(10)
    after = status(lab)["frames"]
    assert all(bodies)
    rows = _tshark_rows(path)
    sessions: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        client_port = row["tcp.srcport"] if row["ip.dst"] == VIP4 else row["tcp.dstport"]
        sessions.setdefault((row["frame.interface_name"][:3], client_port), []).append(row)
    client_side = {port: frames for (side, port), frames in sessions.items() if side == "lc0"}
    assert len(client_side) == 30
    labelled_in = 0
    for frames in client_side.values():
        first = frames[0]
        assert first["ip.dst"] == VIP4 and not first["mpls.label"], "a session's first packet is unlabelled"
        c2s = {int(f["mpls.label"]) for f in frames[1:] if f["ip.dst"] == VIP4}
        s2c = {int(f["mpls.label"]) for f in frames if f["ip.src"] == VIP4}
        assert len(c2s) == 1 and len(s2c) == 1, frames
        (c2s_label,) = c2s
        assert c2s_label % 2 == 1 and s2c == {c2s_label + 1}
        assert all(f["mpls.label"] for f in frames[1:])
        labelled_in += len(frames) - 1 - sum(1 for f in frames if f["ip.src"] == VIP4)
    server_side = [row for (side, _), frames in sessions.items() if side == "lc1" for row in frames]
    assert server_side and all(row["mpls.label"] for row in server_side)
    for row in server_side:  # no address rewriting: toward servers the destination is the VIP, back the source
        assert VIP4 in (row["ip.src"], row["ip.dst"])
    labelled_in += sum(1 for row in server_side if row["ip.src"] == VIP4)
    fast = after["fast_path"] - before["fast_path"]
    assert fast >= labelled_in > 0  # every labelled frame that reached the balancer went by the fast path


def test_killing_one_nginx_others_take_over_and_other_sessions_survive(lab: Lab) -> None:
    spec = lab.spec
    # A long-lived keep-alive session from client 0, to learn which server it is on.
    with entered(lab.client_ns(0)):
        keep = socket.create_connection((VIP4, 80), timeout=5)
    try:

        def ask() -> str:
            keep.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1].endswith(b"\n"):
                chunk = keep.recv(4096)
                assert chunk, "the kept session was closed"
                data += chunk
            return data.split(b"\r\n\r\n", 1)[1].decode().strip()

        kept_on = ask()
        victim = next(j for j in range(spec.servers) if f"server {lab.server_name(j)}" != kept_on)
        victim_name = lab.server_name(victim)
        lab.kill_nginx(victim)
        bound = spec.fall * spec.health_interval + spec.health_timeout + 2.0
        wait_for(
            lambda: {s["name"]: s for s in lab.status()["status"]["servers"]}[victim_name]["status"] == "down",
            bound + 2.0,
            f"{victim_name} to be marked down",
        )
        bodies = lab.curl(1, 60)
        assert all(bodies), f"{bodies.count('')} requests failed after the health check's bound"
        assert victim_name not in split(bodies)
        assert ask() == kept_on  # the session on another server was not broken
    finally:
        keep.close()
        lab.start_nginx(victim)
    wait_for(
        lambda: {s["name"]: s for s in lab.status()["status"]["servers"]}[victim_name]["status"] == "up",
        15,
        f"{victim_name} to come back after rise successes",
    )
    log = lab.log("balancer")
    assert "event=config_loaded" in log
    assert "fast_path_build=native" in log  # the one-frame path's C build, installed with the package
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        # the label switching rows on huge pages (all 128 MiB unless the kernel found too few free 2 MiB pages)
        huge = re.search(r"rows_on_huge_pages_mib=(\d+)\b", log)
        assert huge is not None and 0 < int(huge.group(1)) <= 128
    assert f"event=server_down server={victim_name} reason=health_check" in log
    assert f"event=server_up server={victim_name}" in log


def test_bad_traffic_is_dropped_and_counted_and_forged_labels_reach_no_server(lab: Lab) -> None:
    lb_mac = mac_from_str("02:4c:00:00:00:00")
    attacker_mac = mac_from_str("02:c1:00:00:00:01")  # client c1's own MAC
    # The victim: a live keep-alive session of client c2; its label is read off the switch port facing the
    # balancer's client-side port (what the balancer sends arrives there).
    with entered(lab.ns("sw")):
        sniffer = PacketPort("lbc0", accept={ETH_P_MPLS_UC})
    with entered(lab.client_ns(1)):
        victim = socket.create_connection((VIP4, 80), timeout=5)
    try:
        victim.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        assert victim.recv(4096).startswith(b"HTTP/1.1 200")
        s2c = None
        deadline = time.monotonic() + 5
        while s2c is None and time.monotonic() < deadline:
            for frame in sniffer.recv_burst():
                if frame[0:6] == mac_from_str("02:c1:00:00:00:02"):
                    s2c = parse_stack(frame, 14)[0][0].label
            time.sleep(0.01)
        assert s2c is not None and s2c % 2 == 0
        c2s = s2c - 1
        before = status(lab)
        marker = b"FORGED-" + os.urandom(8).hex().encode()
        victim_ip = lab.client_addr(1)
        payload = tcp(bytes(map(int, victim_ip.split("."))), bytes(map(int, VIP4.split("."))), 40000, 80,
                      int(TCPFlag.ACK | TCPFlag.PSH), payload=marker)  # fmt: skip
        frames = {
            "random": build_ethernet(lb_mac, attacker_mac, ETH_P_MPLS_UC) + os.urandom(60),
            "truncated_mpls": build_ethernet(lb_mac, attacker_mac, ETH_P_MPLS_UC) + b"\x00\x01",
            "unknown_label": build_ethernet(lb_mac, attacker_mac, ETH_P_MPLS_UC) + pack_entry(99_999) + payload,
            "forged_same_ip": build_ethernet(lb_mac, attacker_mac, ETH_P_MPLS_UC) + pack_entry(c2s) + payload,
        }
        with entered(lab.client_ns(0)):
            port = PacketPort("eth0")
        watchers = []
        for j in range(lab.spec.servers):
            with entered(lab.server_ns(j)):
                watchers.append(PacketPort("eth0", accept={ETH_P_MPLS_UC, ETH_P_IP}))
        try:
            for frame in frames.values():
                port.send(frame)
            time.sleep(0.5)
            seen = [f for w in watchers for f in w.recv_burst(1000) if marker in f]
        finally:
            port.close()
            for w in watchers:
                w.close()
        assert seen == [], "a forged frame reached a server"
        after = status(lab)
        drops = Counter(after["drops"]) - Counter(before["drops"])
        assert drops["label_unknown"] >= 1 and drops["label_wrong_ingress"] >= 1
        assert drops["mpls_truncated"] >= 1
        assert sum(drops.values()) >= len(frames)
        victim.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        assert victim.recv(4096).startswith(b"HTTP/1.1 200")  # the victim's session is unharmed
    finally:
        victim.close()
        sniffer.close()


def test_wrk_through_the_agents_and_the_balancer(lab: Lab) -> None:
    figures = lab.wrk(0, seconds=2, connections=8)
    assert figures.get("requests", 0) > 100  # a stock load generator, unchanged, through labels
    assert figures["non_2xx"] == 0 and figures["socket_errors"] == 0


def test_drained_server_takes_no_new_sessions_and_its_sessions_finish(lab: Lab) -> None:
    with entered(lab.client_ns(2)):
        keep = socket.create_connection((VIP4, 80), timeout=5)
    try:
        keep.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        first = keep.recv(4096)
        server = first.split(b"\r\n\r\n", 1)[1].decode().split()[1]
        assert lab.command(cmd="drain", server=server).get("ok")
        bodies = lab.curl(0, 30)
        assert all(bodies) and server not in split(bodies)
        keep.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        assert keep.recv(4096).endswith(f"server {server}\n".encode())  # the existing session goes on
    finally:
        keep.close()
        lab.command(cmd="weight", server=server, weight=1)
        lab.command(cmd="up", server=server)
    wait_for(
        lambda: {s["name"]: s for s in lab.status()["status"]["servers"]}[server]["status"] == "up",
        10,
        f"{server} back up",
    )


def test_prometheus_metrics_are_served(lab: Lab) -> None:
    out = lab.run_in(lab.lb, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:9108/metrics"]).stdout
    for name in ("mplslb_sessions_started_total", "mplslb_labels_in_use", "mplslb_server_up", "mplslb_frames_total"):
        assert name in out
    assert 'mplslb_server_up{server="s1"} 1.0' in out
    assert 'mplslb_port_kernel_drops_total{port="lc0p0"}' in out  # lost before the daemon read them
    ports = lab.status()["status"]["ports"]
    assert set(ports) == {"lc0p0", "lc1p0", "lc1p1"} and ports["lc0p0"]["kernel_received"] > 0


def test_status_command_prints_the_tables(lab: Lab) -> None:
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mplslb", "status", "--socket", lab.control_socket],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for heading in ("Real servers", "Session labels", "fast path", "s1", "s2", "s3"):
        assert heading in done.stdout


def test_agents_show_their_counters_in_status_and_count_bad_frames_by_reason(lab: Lab) -> None:
    import sys

    assert all(lab.curl(0, 5))
    before = lab.agent_status()
    assert set(before) == {"c1", "c2", "c3", "s1", "s2", "s3"}
    assert all(agent["datapath"] == "kernel" for agent in before.values())
    assert sum(before[s]["traffic"].get("from_wire", 0) for s in ("s1", "s2", "s3")) >= 5
    assert before["c1"]["traffic"].get("from_host_unlabelled", 0) >= 5  # each curl's first packet
    # Bad frames for server s1, sent from the balancer's side of its segment: each counted under its reason.
    with entered(lab.lb):
        port = PacketPort("lc1p0")
    try:
        s1, lb = mac_from_str("02:5e:00:00:00:01"), mac_from_str("02:4c:00:00:00:10")
        port.send(build_ethernet(s1, lb, ETH_P_MPLS_UC) + b"\x00\x01")  # a label stack entry cut short
        syn = tcp(bytes([10, 77, 0, 11]), bytes(map(int, VIP4.split("."))), 40001, 80, int(TCPFlag.SYN))
        port.send(build_ethernet(s1, lb, ETH_P_MPLS_UC) + pack_entry(1000) + syn)  # an S2C label toward a server
    finally:
        port.close()

    def drops() -> Counter[str]:
        return Counter(lab.agent_status()["s1"]["drops"]) - Counter(before["s1"]["drops"])

    wait_for(lambda: drops()["mpls_truncated"] >= 1 and drops()["not_c2s_label"] >= 1, 5, "s1's drop counters")
    done = subprocess.run(
        [sys.executable, "-m", "mplslb", "status", "--socket", lab.agent_socket("s1")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for text in ("Agent (server)", "kernel", "from_wire", "mpls_truncated", "not_c2s_label"):
        assert text in done.stdout


def test_an_icmp_error_from_a_server_reaches_the_client_through_the_labels(lab: Lab) -> None:
    """Nothing listens on the VIPs' UDP service on the servers: each server's host answers a datagram with an
    ICMP port unreachable from the VIP, which its endpoint labels with the flow's S2C label; the client's endpoint
    takes it off and the client's socket learns the port is closed (ECONNREFUSED) instead of waiting."""
    from mplslb.lab import LAB_UDP_PORT

    before = lab.agent_status()
    with entered(lab.client_ns(0)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(5)
        sock.connect((VIP4, LAB_UDP_PORT))
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
    finally:
        sock.close()
    after = lab.agent_status()
    labelled = sum(after[s]["traffic"].get("from_host", 0) - before[s]["traffic"].get("from_host", 0)
                   for s in ("s1", "s2", "s3"))  # fmt: skip
    assert labelled >= 1  # the error left a server labelled, not unlabelled or dropped


@pytest.fixture(scope="module")
def udp_lab() -> Iterator[Lab]:
    the_lab = Lab(LabSpec(name=lab_name("u"), transport="udp"), root=ROOT)
    pids: dict[str, int] = {}
    try:
        the_lab.up()
        pids = dict(the_lab.state.pids)
        yield the_lab
    finally:
        assert the_lab.down() == []
        the_lab.state.pids = pids
        assert_nothing_left(the_lab)


def test_curl_to_nginx_over_mpls_in_udp_across_a_router(udp_lab: Lab) -> None:
    bodies: list[str] = []
    for client in range(3):
        bodies += udp_lab.curl(client, 100)
    assert all(bodies), f"{bodies.count('')} failed"
    counts = split(bodies)
    assert all(abs(n - 100) <= 1 for n in counts.values()) and len(counts) == 3
    snap = status(udp_lab)  # the daemon refreshes its snapshot every second
    assert snap["frames"]["fast_path"] > snap["frames"]["slow_path"]
    agents = udp_lab.agent_status()
    assert {agent["datapath"] for agent in agents.values()} == {"tun"}
    assert sum(agents[s]["traffic"].get("from_wire", 0) for s in ("s1", "s2", "s3")) >= 300


UDP_BULK = 16 * 1024 * 1024  # thousands of full-size segments, a few seconds through the udp lab


def test_a_single_unlimited_download_over_mpls_in_udp_is_carried_in_whole_datagrams(udp_lab: Lab) -> None:
    """The agents' TUN MTU leaves room for the outer IP and UDP headers and the label, so TCP's MSS keeps every
    datagram within the wire's MTU: nothing is fragmented (fragments carry no ports, and a router balancing nodes
    by ports sends them to another node than the session's, where the download stalls)."""
    import hashlib

    data = os.urandom(UDP_BULK)
    for j in range(udp_lab.spec.servers):
        (udp_lab.dir / udp_lab.server_name(j) / "www" / "bulk.bin").write_bytes(data)
    where = (udp_lab.lb, udp_lab.client_ns(0))
    before = [udp_lab.snmp(ns, "Ip") for ns in where]
    done = udp_lab.run_in(udp_lab.client_ns(0), ["sh", "-c", f"curl -sS -m 60 http://{VIP4}/bulk.bin | sha256sum"],
                          timeout=90)  # fmt: skip
    after = [udp_lab.snmp(ns, "Ip") for ns in where]
    assert done.stdout.split()[:1] == [hashlib.sha256(data).hexdigest()], done.stderr
    fragmented = {f"{ns} {name}": a[name] - b[name] for ns, b, a in zip(where, before, after, strict=True)
                  for name in ("FragCreates", "ReasmReqds") if a[name] != b[name]}  # fmt: skip
    assert fragmented == {}


def test_a_lab_that_fails_half_way_up_is_torn_down(monkeypatch: pytest.MonkeyPatch) -> None:
    the_lab = Lab(LabSpec(name=lab_name("f"), clients=1, servers=1), root=ROOT)

    def broken() -> None:
        raise RuntimeError("the balancer could not start")

    monkeypatch.setattr(the_lab, "_start_balancer", broken)
    with pytest.raises(RuntimeError, match="could not start"):
        the_lab.up()
    assert_nothing_left(the_lab)


BULK = 32 * 1024 * 1024  # tens of megabytes per download: far past where a segmentation fault in the datapath shows


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bulk_downloads_cross_the_datapath_intact(lab: Lab, v6: bool) -> None:
    """Every server serves the same large file; each download (one per server, round robin) hashes the same."""
    import hashlib

    data = os.urandom(BULK)
    for j in range(lab.spec.servers):
        (lab.dir / lab.server_name(j) / "www" / "bulk.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    url = "http://[fd00::100]/bulk.bin" if v6 else f"http://{VIP4}/bulk.bin"
    servers = [lab.server_name(j) for j in range(lab.spec.servers)]
    before = lab.agent_status()
    for _ in range(lab.spec.servers):
        done = lab.run_in(lab.client_ns(0), ["sh", "-c", f"curl -sS -m 120 {url} | sha256sum"], timeout=150)
        assert done.stdout.split()[:1] == [want], done.stderr
    after = lab.agent_status()
    # The servers labelled super-packets whole and the stack segmented them after the push: each segment arrived.
    assert all(gso_labelled(after, s) > gso_labelled(before, s) for s in servers), (before, after)


def gso_labelled(agents: dict, name: str) -> int:  # type: ignore[type-arg]
    return int(agents[name]["traffic"].get("from_host_gso", 0))
