"""Several balancer nodes behind a router (root): ``Lab(LabSpec(nodes=3))`` builds a router namespace running stock
BIRD 2 with multipath routes hashed on the UDP ports, three nodes whose daemons announce the VIP and the
MPLS-in-UDP service addresses by BGP (with BFD) while healthy, stock nginx servers and curl clients behind the
router.

A second lab's nodes sync their sessions (``[cluster]``): downloads and keep-alive connections in flight when the
node they went through is killed or cut off carry on through the nodes the router sends their frames to next; the
count of sessions lost is printed and asserted to be 0. (The first lab does not sync: a session whose two
directions reached two nodes would fail there, so it also proves the per-session entropy.)

Each test leaves the three nodes announced as it found them. The withdrawal times are printed (``-s``), never
asserted.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mplslb.control.client import request
from mplslb.lab import VIP4, Lab, LabSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.alone,  # node changes under load, timed against BGP and the sync: nothing else may share the CPUs
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN and packet sockets"),
    pytest.mark.skipif(
        any(
            shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
            for t in ("nginx", "curl", "nsenter", "bird", "nft")
        ),
        reason="nginx, curl, nsenter, bird (bird2) and nft are needed (make test installs them)",
    ),
]

ROOT = Path("/run/mplslb-test-labs")
NODES = 3
SERVICE = (VIP4, "10.80.0.1", "10.81.0.1")  # what every healthy node announces
WITHDRAW_WAIT = 15.0  # seconds a withdrawal may take before the test gives up (about 1 s expected)
REJOIN_WAIT = 30.0


def node_status(lab: Lab, i: int) -> dict[str, Any]:
    status: dict[str, Any] = request(lab.node_socket(i), {"cmd": "status"})["status"]
    return status


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def wait_until(predicate: Any, timeout: float) -> bool:
    """Whether ``predicate`` held within ``timeout`` seconds (for the caller to assert)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    the_lab = Lab(
        LabSpec(name=f"cl{os.getpid() % 100000}", nodes=NODES, clients=1, servers=2, transport="udp",
                server_transport="udp"),
        root=ROOT,
    )  # fmt: skip
    speakers: list[int] = []
    try:
        the_lab.up()
        yield the_lab
        speakers = [node_status(the_lab, i)["bgp"]["pid"] for i in range(NODES)]
    finally:
        pids = dict(the_lab.state.pids)
        problems = the_lab.down()
        assert problems == []
        from pyroute2 import netns

        assert [ns for ns in netns.listnetns() if ns.startswith(the_lab.spec.name + "-")] == []
        assert not the_lab.dir.exists()
        assert not [pid for pid in [*pids.values(), *speakers] if pid_alive(pid)]


@pytest.fixture
def three(lab: Lab) -> Lab:
    """The lab with every node announced (as each test leaves it)."""
    for prefix in SERVICE:
        lab.wait_next_hops(prefix, NODES, REJOIN_WAIT)
    return lab


def sessions_by_node(lab: Lab) -> list[int]:
    time.sleep(1.1)  # the daemons refresh their snapshot every second
    return [node_status(lab, i)["sessions"]["started"] for i in range(NODES)]


def rejoin(lab: Lab, i: int) -> float:
    lab.start_node(i)
    return lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)


def test_the_router_has_a_next_hop_per_node_and_sessions_spread_over_the_nodes(three: Lab) -> None:
    lab = three
    hops = [lab.node_addr(i) for i in range(NODES)]
    assert all(lab.next_hops(prefix) == hops for prefix in SERVICE)
    policy = lab.run_in(lab.ns("rt"), ["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"]).stdout.strip()
    assert policy == "3"
    before = sessions_by_node(lab)
    bodies = lab.curl(0, 30)
    assert all(body.startswith("server s") for body in bodies), bodies
    carried = [after - was for after, was in zip(sessions_by_node(lab), before, strict=True)]
    print(f"\n30 sessions through the router, by node: {carried}")
    # Each session's two directions reach one node (its server's replies carry the client's entropy port), so
    # every request is answered; the sessions' ports spread them over the nodes.
    assert sum(carried) == 30
    assert sum(1 for n in carried if n) >= 2


def test_status_shows_the_established_neighbour_and_what_is_announced(three: Lab) -> None:
    lab = three
    wait_for(lambda: node_status(lab, 1)["bgp"]["peers"][0]["announced"], 5.0, "the status's BGP rows")
    bgp = node_status(lab, 1)["bgp"]
    assert bgp["announcing"] and bgp["healthy"] and bgp["speaker"] == "running"
    (peer,) = bgp["peers"]
    assert peer["neighbor"] == "10.90.2.1" and peer["established"] and peer["state"] == "Established"
    assert sorted(peer["announced"]) == sorted(f"{p}/32" for p in SERVICE)
    shown = subprocess.run(
        [sys.executable, "-m", "mplslb", "status", "--socket", lab.node_socket(1)],
        capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert "BGP (AS 65001, router id 10.90.2.2, speaker running, announcing)" in shown
    assert "10.90.2.1" in shown and "Established" in shown and "10.0.0.100/32" in shown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_or_killed_node_is_withdrawn_and_new_sessions_take_the_others(three: Lab, sig: int) -> None:
    lab, node = three, 2
    speaker = node_status(lab, node)["bgp"]["pid"]
    start = time.monotonic()
    proc = lab.stop_node(node, sig, wait=False)
    took = lab.wait_next_hops(VIP4, NODES - 1, WITHDRAW_WAIT)
    print(f"\n{signal.Signals(sig).name}: node n{node + 1} left the router's ECMP set after {took * 1000:.0f} ms")
    try:
        proc.wait(10)
        assert lab.node_addr(node) not in lab.next_hops(VIP4)
        assert lab.wait_next_hops("10.80.0.1", NODES - 1, WITHDRAW_WAIT) < WITHDRAW_WAIT
        wait_for(lambda: not pid_alive(speaker), 10.0, "the node's BIRD to follow its daemon")
        print(f"its BIRD (pid {speaker}) gone {(time.monotonic() - start) * 1000:.0f} ms after the signal")
        assert all(body.startswith("server s") for body in lab.curl(0, 10))
    finally:
        print(f"rejoined in {rejoin(lab, node):.1f} s after its daemon started again")


def test_a_node_whose_link_is_cut_is_taken_out_by_bfd(three: Lab) -> None:
    lab, node = three, 0
    lab.cut_node_link(node)
    try:
        took = lab.wait_next_hops(VIP4, NODES - 1, WITHDRAW_WAIT)
        print(f"\nlink cut: node n{node + 1} left the router's ECMP set after {took * 1000:.0f} ms (BFD)")
        assert lab.node_addr(node) not in lab.next_hops(VIP4)
        assert all(body.startswith("server s") for body in lab.curl(0, 10))
    finally:
        lab.mend_node_link(node)
    print(f"link mended: back after {lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT):.1f} s")


def test_nodes_with_no_server_up_withdraw_and_announce_again_when_one_is_back(three: Lab) -> None:
    lab = three
    for j in range(lab.spec.servers):
        lab.kill_nginx(j)
    try:
        took = lab.wait_next_hops(VIP4, 0, WITHDRAW_WAIT)
        print(f"\nevery server down: every node withdrawn after {took:.1f} s (health checks: fall 2, every 0.5 s)")
        for i in range(NODES):
            wait_for(lambda i=i: node_status(lab, i)["bgp"].get("reason") == "no_server_up", 5.0, "the reason")
    finally:
        for j in range(lab.spec.servers):
            lab.start_nginx(j)
    lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)
    assert all(body.startswith("server s") for body in lab.curl(0, 5))


# -- nodes that sync their sessions ------------------------------------------------------------------------------
DOWNLOADS = 20
#: Each download's size: 2 MB by default, so that the four tests under load fit ``make test`` (the lab carries
#: about 6 MB/s on the 2-core reference machine, 20 x 20 MB took over a minute a test);
#: MPLSLB_CLUSTER_DOWNLOAD_MB=20 (`make cluster`) for the full size.
DOWNLOAD_BYTES = int(float(os.environ.get("MPLSLB_CLUSTER_DOWNLOAD_MB", "2")) * 1_000_000)
CONTENT = random.Random(11).randbytes(DOWNLOAD_BYTES)  # big.bin on every server
SHA256 = hashlib.sha256(CONTENT).hexdigest()
#: curl --limit-rate (bytes/s): each download lasts about 12 s (longer at the full size, the 20 of them at most
#: 5 MB/s together), well past the node change.
RATE = min(250_000, DOWNLOAD_BYTES * 2 // 25)
WRK_SECONDS = 12
#: A request unanswered this long counts as a wrk socket error (a frame lost with a node waits for TCP's retransmission,
#: longer on a loaded machine: wrk's default, 2 s, is not about sessions lost).
WRK_TIMEOUT = 10.0
#: Unlimited downloads one after the other (their sessions spread over the nodes by their ports).
SINGLE_DOWNLOADS = 3
SLICES = NODES + 1  # the label space cut for a fourth node from the start ([cluster] nodes)


@pytest.fixture(scope="module")
def clustered_lab() -> Iterator[Lab]:
    pytest.importorskip("mplslb.cluster", reason="needs the nodes' session sync ([cluster], mplslb.cluster)")
    spec = LabSpec(name=f"cf{os.getpid() % 100000}", nodes=NODES, clients=1, servers=2, transport="udp",
                   server_transport="udp", cluster=True, slices=SLICES, node_state=True)  # fmt: skip
    the_lab = Lab(spec, root=ROOT)
    try:
        the_lab.up()
        for j in range(spec.servers):
            (the_lab.dir / the_lab.server_name(j) / "www" / "big.bin").write_bytes(CONTENT)
        yield the_lab
    finally:
        pids = dict(the_lab.state.pids)
        assert the_lab.down() == []
        assert not the_lab.dir.exists()
        assert not [pid for pid in pids.values() if pid_alive(pid)]


@pytest.fixture
def clustered(clustered_lab: Lab) -> Lab:
    """The nodes syncing their sessions, every one announced and synced (as each test leaves it)."""
    lab = clustered_lab
    assert lab.members == list(range(NODES))
    for prefix in SERVICE:
        lab.wait_next_hops(prefix, NODES, REJOIN_WAIT)
    wait_for(lambda: all(node_status(lab, i)["cluster"]["synced"] for i in lab.members), REJOIN_WAIT, "synced")
    return lab


def drops_by_node(lab: Lab) -> dict[int, dict[str, int]]:
    """Each running node's drops by reason and the sessions it refused, for a failure's message."""
    out: dict[int, dict[str, int]] = {}
    for i in lab.members:
        status = node_status(lab, i)
        out[i] = dict(status["drops"]) | {f"refused {k}": v for k, v in status["sessions"]["refused"].items()}
    return out


def frames_in(lab: Lab, i: int) -> int:
    return int(node_status(lab, i)["frames"]["in"])


def first_success(lab: Lab, timeout: float) -> float:
    """Seconds until a new session succeeds (one curl after another, each bounded)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        done = lab.run_in(lab.client_ns(0), ["curl", "-s", "--max-time", "1", "-o", "/dev/null", "-w", "%{http_code}",
                                             "-H", "Connection: close", f"http://{VIP4}/"], timeout=10)  # fmt: skip
        if done.stdout == "200":
            return time.monotonic() - start
    raise AssertionError(f"no new session succeeded within {timeout} s")


class Load:
    """wrk's keep-alive connections and DOWNLOADS rate-limited downloads from client c1, running while a test changes
    the nodes; :meth:`finish` waits for them (bounded) and says how many downloads were lost."""

    def __init__(self, lab: Lab, tmp: Path, *, wrk_seconds: int = WRK_SECONDS) -> None:
        self.outs = [tmp / f"{k}.bin" for k in range(DOWNLOADS)]
        limit = DOWNLOAD_BYTES / RATE * 3 + 90
        argv = ["curl", "-s", "--max-time", f"{limit:.0f}", "--limit-rate", str(RATE), "-w", "%{http_code}",
                f"http://{VIP4}/big.bin"]  # fmt: skip
        self.limit = limit
        self.downloads = [
            subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{lab.client_ns(0)}", "--", *argv, "-o", str(out)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for out in self.outs
        ]
        self.pool = ThreadPoolExecutor(1)
        self.wrk_seconds = wrk_seconds
        self.wrk = self.pool.submit(lab.wrk, 0, seconds=wrk_seconds, connections=8, timeout=WRK_TIMEOUT)
        wait_for(lambda: all(o.exists() and o.stat().st_size > 0 for o in self.outs), 20.0, "every download started")

    def finish(self) -> tuple[int, list[str], dict[str, float]]:
        """(downloads lost: not complete or not the right sha256, curl's codes, wrk's figures)."""
        figures = self.wrk.result(timeout=self.wrk_seconds + 60)
        codes = [proc.communicate(timeout=self.limit + 30)[0] for proc in self.downloads]
        lost = sum(1 for code, out in zip(codes, self.outs, strict=True)
                   if code != "200" or hashlib.sha256(out.read_bytes()).hexdigest() != SHA256)  # fmt: skip
        return lost, codes, figures

    def pause(self) -> None:
        """Stop the downloads (SIGSTOP): their connections stay open, idle, so they outlast a slow node change."""
        for proc in self.downloads:
            if proc.poll() is None:
                proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in self.downloads:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for proc in self.downloads:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.pool.shutdown(wait=True)


SOCKET_ERRORS = ("connect_errors", "read_errors", "write_errors", "timeouts")


def shown(lost: int, figures: dict[str, float]) -> str:
    return (
        f"sessions lost {lost} of {DOWNLOADS} downloads of {DOWNLOAD_BYTES / 1e6:g} MB; wrk "
        f"{figures.get('requests', 0):.0f} requests, {figures['socket_errors']:.0f} socket errors "
        f"({', '.join(f'{k} {figures[k]:.0f}' for k in SOCKET_ERRORS)}), "
        f"{figures['non_2xx']:.0f} non-2xx"
    )


def test_single_unlimited_downloads_through_the_nodes_arrive_whole(clustered: Lab, tmp_path: Path) -> None:
    """Full-size segments at full speed, one session at a time (each from its own port, so over the nodes): every
    datagram is carried whole, none fragmented (the router would send a fragment, which has no ports, to another node
    than its session's) and every download hashes right."""
    lab = clustered
    where = [lab.node_ns(i) for i in lab.members]
    before = [lab.snmp(ns, "Ip")["ReasmReqds"] for ns in where]
    out = tmp_path / "big.bin"
    argv = ["curl", "-sS", "--max-time", "30", "-o", str(out), "-w", "%{http_code}", f"http://{VIP4}/big.bin"]
    hashed = []
    for _ in range(SINGLE_DOWNLOADS):
        out.unlink(missing_ok=True)
        done = lab.run_in(lab.client_ns(0), argv, timeout=45)
        hashed.append(done.stdout == "200" and hashlib.sha256(out.read_bytes()).hexdigest() == SHA256)
    reassembled = [lab.snmp(ns, "Ip")["ReasmReqds"] - b for ns, b in zip(where, before, strict=True)]
    assert hashed == [True] * SINGLE_DOWNLOADS
    assert reassembled == [0] * len(where)


@pytest.mark.parametrize("how", ["sigkill", "link_cut"])
def test_established_sessions_carry_on_when_their_node_leaves(clustered: Lab, how: str, tmp_path: Path) -> None:
    lab, node = clustered, 1
    load = Load(lab, tmp_path)
    try:
        before = frames_in(lab, node)
        time.sleep(1.1)  # the daemons refresh their snapshot every second
        carried = frames_in(lab, node) - before
        if how == "sigkill":
            lab.stop_node(node, signal.SIGKILL, wait=False)
        else:
            lab.cut_node_link(node)
        left = lab.wait_next_hops(VIP4, NODES - 1, WITHDRAW_WAIT)
        new = first_success(lab, 30.0)
        lost, codes, figures = load.finish()
        print(
            f"\n{how}: node n{node + 1} ({carried} frames in its last second) left the ECMP set after "
            f"{left * 1000:.0f} ms; a new session succeeded {new:.2f} s later; {shown(lost, figures)}"
        )
        assert lost == 0, codes
        assert figures["socket_errors"] == 0 and figures["non_2xx"] == 0 and figures.get("requests", 0) > 0
    finally:
        load.close()
        if how == "sigkill":
            lab.start_node(node)
        else:
            lab.mend_node_link(node)
        lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)


def allocated(lab: Lab) -> dict[int, int]:
    """Label pairs each node has handed out (its own new sessions; replicas are not counted)."""
    time.sleep(1.1)  # the daemons refresh their snapshot every second
    return {i: int(node_status(lab, i)["labels"]["allocated_total"]) for i in lab.members}


def test_a_fourth_node_joins_under_load_and_takes_new_sessions(clustered: Lab, tmp_path: Path) -> None:
    lab = clustered
    load = Load(lab, tmp_path)
    added = None
    try:
        added = lab.add_node()
        joined = lab.wait_next_hops(VIP4, NODES + 1, REJOIN_WAIT)
        # it announced itself once synced; its status snapshot, refreshed every second, may not say so yet
        synced = wait_until(lambda: node_status(lab, added)["cluster"]["synced"], 3.0)
        cluster = node_status(lab, added)["cluster"]
        assert synced and cluster["node"] == added + 1 and cluster["nodes"] == SLICES
        assert {p["address"] for p in cluster["peers"]} == {f"{lab.node_addr(i)}:6640" for i in range(NODES)}
        before = allocated(lab)
        bodies = lab.curl(0, 40)
        # A busy daemon refreshes its snapshot later than every second: read until the 40 are in (or the time is up).
        spread: dict[int, int] = {}

        def counted() -> bool:
            spread.update({i: n - before[i] for i, n in allocated(lab).items()})
            return sum(spread.values()) >= 40

        wait_until(counted, 6.0)
        lost, codes, figures = load.finish()
        print(
            f"\nnode n{added + 1} joined the ECMP set {joined:.1f} s after its daemon started, with "
            f"{cluster['replicas']} replicas; 40 new sessions by node {spread}; {shown(lost, figures)}"
        )
        assert all(body.startswith("server s") for body in bodies), bodies
        assert sum(spread.values()) == 40 and all(spread[i] > 0 for i in lab.members) and len(spread) == NODES + 1
        assert lost == 0, codes
        assert figures["socket_errors"] == 0 and figures["non_2xx"] == 0 and figures.get("requests", 0) > 0
        for i in range(NODES):  # the others took the new node as a peer by a reload
            peers = node_status(lab, i)["cluster"]["peers"]
            assert f"{lab.node_addr(added)}:6640" in [p["address"] for p in peers]
        status = subprocess.run(
            [sys.executable, "-m", "mplslb", "status", "--socket", lab.node_socket(added)],
            capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "COLUMNS": "200"},
        ).stdout  # fmt: skip
        assert f"Cluster: node {added + 1} of {SLICES}" in status and "NOT SYNCED" not in status
        assert all(f"{lab.node_addr(i)}:6640" in status for i in range(NODES)) and "alive" in status
        assert f"BGP (AS 65001, router id {lab.node_addr(added)}" in status and "10.0.0.100/32" in status
    finally:
        load.close()
        if added is not None:
            lab.remove_node(added)
        lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)


def test_a_restarted_node_adopts_its_kept_state_and_rejoins_under_load(clustered: Lab, tmp_path: Path) -> None:
    lab, node = clustered, 2
    # wrk runs through the restart; the downloads are paused across it (a restart under load takes longer than
    # they last) and go on through the three nodes once it is back.
    load = Load(lab, tmp_path, wrk_seconds=25)
    try:
        load.pause()
        lab.stop_node(node, signal.SIGTERM)
        lab.wait_next_hops(VIP4, NODES - 1, WITHDRAW_WAIT)
        lab.start_node(node)
        back = lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)
        load.resume()
        adopted = [line for line in lab.log(lab.node_key(node)).splitlines() if "event=state_adopted" in line]
        before = frames_in(lab, node)
        # Each request has time for two retransmissions of its SYN: the router's ECMP set has just changed.
        bodies = lab.curl(0, 20, max_time=10)
        time.sleep(1.1)  # the daemons refresh their snapshot every second
        carried = frames_in(lab, node) - before
        lost, codes, figures = load.finish()
        print(
            f"\nnode n{node + 1} restarted: {adopted[0] if adopted else '?'}; back in the ECMP set {back:.1f} s after "
            f"its daemon started, {carried} frames through it in the next second; {shown(lost, figures)}; "
            f"drops by node {drops_by_node(lab)}"
        )
        assert adopted and "sessions=0 " not in adopted[0]
        failed = [i for i, body in enumerate(bodies) if not body.startswith("server s")]
        assert not failed, f"requests {failed} of 20 failed; drops by node: {drops_by_node(lab)}"
        assert node_status(lab, node)["cluster"]["synced"] and carried > 0
        assert lost == 0, codes
        assert figures["socket_errors"] == 0 and figures["non_2xx"] == 0 and figures.get("requests", 0) > 0
    finally:
        load.close()
        if lab.procs[lab.node_key(node)].poll() is not None:
            lab.start_node(node)
        lab.wait_next_hops(VIP4, NODES, REJOIN_WAIT)
