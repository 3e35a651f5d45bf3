"""Attacks from a host on the clients' Ethernet segment, end to end: the real lab (daemon, agents, stock nginx and
curl) with an attacker namespace on the bridge the clients share with the balancer's client port (root).

* Spoofed RSTs and FINs (unlabelled, from the attacker's MAC or the client's; and a labelled RST with the client's
  MAC, address, port and the session's own label, read off the wire) do not cut a client's download.
* Forged RSTs with a wrong sequence number (unlabelled and labelled) do not close an idle keep-alive connection,
  idle well past the linger, which then carries a request; a forged RST with the right sequence number (read off
  the wire, as only a host able to see the server's frames could) does close it. With and without the kernel
  offload.
* Frames with forged labels never reach a server.
* A spoofed SYN flood does not take a server down, the client's requests still succeed, and the half-open
  sessions it leaves (and their labels) are gone within the half-open timeout.
* With the kernel offload and ``offload_syn_rate``, the same flood is shed in the XDP program beyond the rate.

Frames are built with :mod:`mplslb.wire` and sent from a packet socket opened in the attacker's namespace; what
reaches the servers is read from packet sockets on the switch's ports towards them. Every loop is bounded in
count and time; the lab is torn down after the module, pass or fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import HeldDownload, running_lab
from mplslb.drivers.netns import entered
from mplslb.lab import VIP4, Lab, LabSpec
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet, mac_from_str
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import TCPFlag, build_tcp

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, packet sockets"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
]

ROOT = Path("/run/mplslb-test-labs")
ETH_P_ALL = 0x0003
SYN, ACK, FIN, RST, PSH = (int(f) for f in (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH))
FILE_SIZE = 3 * 1024 * 1024
#: While an attack runs, the test reads curl's output at about this many bytes/s (curl, its socket and the
#: connection's window wait on it, as with ``--limit-rate``): the download cannot end before the attack has, and
#: then goes on at full speed.
HELD_RATE = 100_000
HALF_OPEN = 2.0  # the lab's tcp_start timeout
LINGER = 1.0  # the lab's closed_linger
SNAPSHOT = 1.1  # the daemon refreshes the status snapshot every second
FLOOD_SECONDS = 10.0
FLOOD_RATE = 10_000  # SYNs per second the attacker aims at
FLOOD_REQUEST_TIME = 10.0  # curl's --max-time for the client's requests during a flood
CONTENT = random.Random(5).randbytes(FILE_SIZE)  # big.bin on every server
SHA256 = hashlib.sha256(CONTENT).hexdigest()


def lab_name(tag: str) -> str:
    return f"{tag}{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    from pyroute2 import netns

    the_lab = Lab(LabSpec(name=lab_name("atk"), clients=2, servers=2, attackers=1), root=ROOT)
    try:
        the_lab.up()
        for j in range(the_lab.spec.servers):
            (the_lab.dir / the_lab.server_name(j) / "www" / "big.bin").write_bytes(CONTENT)
        yield the_lab
    finally:
        pids = dict(the_lab.state.pids)
        assert the_lab.down() == []
        prefix = the_lab.spec.name + "-"
        assert [ns for ns in netns.listnetns() if ns.startswith(prefix)] == []
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


# -- helpers -------------------------------------------------------------------------------------------------------
def status(lab: Lab) -> dict[str, Any]:
    """A status snapshot the daemon took after this call (it takes one every second)."""
    first = lab.status()["status"]["time"]
    deadline = time.monotonic() + 5 * SNAPSHOT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        fresh: dict[str, Any] = lab.status()["status"]
        if fresh["time"] != first:
            return fresh
    raise AssertionError(f"no new status snapshot within {5 * SNAPSHOT} s")


def table(lab: Lab) -> list[dict[str, Any]]:
    """The sessions left in the balancer's table (the first 20), to say what a leftover is."""
    rows: list[dict[str, Any]] = lab.command(cmd="sessions", limit=20)["sessions"]
    return rows


def all_up(lab: Lab, timeout: float = 20.0) -> None:
    """Every server UP (brought back by the control plane if an earlier test took one down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servers = status(lab)["servers"]
        if all(s["status"] == "up" for s in servers):
            return
        for s in servers:
            if s["status"] != "up":
                lab.command(cmd="up", server=s["name"])
    raise AssertionError(f"servers not all up after {timeout} s: {status(lab)['servers']}")


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


@contextlib.contextmanager
def packet_socket(ns: str, ifname: str) -> Iterator[socket.socket]:
    with entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((ifname, 0))
        yield sock
    finally:
        sock.close()


class Sniffer:
    """Frames seen on a switch port, read by a thread until :meth:`stop` (bounded in count)."""

    def __init__(self, lab: Lab, ifname: str, keep: Callable[[bytes], bool], limit: int = 100_000) -> None:
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._cm = packet_socket(lab.ns("sw"), ifname)
        self._sock = self._cm.__enter__()
        self._keep, self._limit = keep, limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.frames) < self._limit:
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if ready:
                frame = self._sock.recv(65536)
                if self._keep(frame):
                    self.frames.append(frame)

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(5)
        self._cm.__exit__(None, None, None)
        return self.frames


def delta(new: dict[str, int], old: dict[str, int]) -> dict[str, int]:
    """What grew between two readings of a status counter dict."""
    return {k: v - old.get(k, 0) for k, v in new.items() if v != old.get(k, 0)}


def tcp_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, flags: int,
              *, seq: int, label: int | None = None, payload: bytes = b"") -> bytes:  # fmt: skip
    segment = build_tcp(src, dst, sport, dport, seq=seq, ack=0 if flags & ACK == 0 else 1, flags=flags,
                        payload=payload)  # fmt: skip
    packet = build_ipv4(src, dst, IPPROTO_TCP, len(segment)) + segment
    if label is None:
        return build_ethernet(dst_mac, src_mac, ETH_P_IP) + packet
    return build_ethernet(dst_mac, src_mac, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet


def label_and_port(frame: bytes) -> tuple[int, int] | None:
    """(label, TCP source port) of a labelled IPv4 TCP frame, else None."""
    if len(frame) < 14 + 4 + 20 + 20 or frame[12:14] != ETH_P_MPLS_UC.to_bytes(2, "big"):
        return None
    ip = 18
    if frame[ip] >> 4 != 4 or frame[ip + 9] != IPPROTO_TCP:
        return None
    tcp = ip + (frame[ip] & 0x0F) * 4
    return int.from_bytes(frame[14:17], "big") >> 4, int.from_bytes(frame[tcp : tcp + 2], "big")


def start_download(lab: Lab, client: int, port: int) -> HeldDownload:
    """big.bin from client ``client``'s port ``port``, held to HELD_RATE until released."""
    return HeldDownload(lab.client_ns(client), f"http://{VIP4}/big.bin", rate=HELD_RATE, size=FILE_SIZE,
                        curl_args=["-g", "--connect-timeout", "5", "--local-port", str(port)])  # fmt: skip


# -- a) spoofed RST and FIN ----------------------------------------------------------------------------------------
def test_spoofed_rst_and_fin_do_not_cut_a_download(lab: Lab) -> None:
    all_up(lab)
    rng = random.Random(11)
    client, cport = 0, 45111
    client_mac = mac_from_str(f"02:c1:00:00:00:{client + 1:02x}")
    attacker_mac = mac_from_str(lab.attacker_mac(0))
    lb_mac = mac_from_str("02:4c:00:00:00:00")
    src, vip = ip4(lab.client_addr(client)), ip4(VIP4)
    # The session's C2S label, read off the switch port of the client (as a host able to see the segment would).
    sniffer = Sniffer(lab, f"c{client + 1}", lambda f: f[6:12] == client_mac and label_and_port(f) is not None)
    download = start_download(lab, client, cport)
    try:
        deadline = time.monotonic() + 10
        label = None
        while label is None and time.monotonic() < deadline:
            time.sleep(0.1)
            label = next((lp[0] for f in list(sniffer.frames) if (lp := label_and_port(f)) and lp[1] == cport), None)
    finally:
        sniffer.stop()
    assert label is not None, "no labelled frame of the download seen from the client"
    before = status(lab)
    forged = []
    for flags in (RST, FIN | ACK):
        for mac in (attacker_mac, client_mac):
            forged.append(tcp_frame(lb_mac, mac, src, vip, cport, 80, flags, seq=rng.randrange(1 << 32)))
    forged.append(tcp_frame(lb_mac, client_mac, src, vip, cport, 80, RST, seq=rng.randrange(1 << 32), label=label))
    with packet_socket(lab.attacker_ns(0), "eth0") as sock:
        for frame in forged:
            sock.send(frame)
            time.sleep(0.3)
    ended_early = not download.in_flight()
    listed = subprocess.run([sys.executable, "-m", "mplslb", "sessions", "--socket", lab.control_socket, "--json"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    code, digest = download.release()
    assert not ended_early, f"the download ended before the attack did (curl: {code}): the test proves nothing"
    assert listed.returncode == 0, listed.stderr
    rows = [row for row in json.loads(listed.stdout)["sessions"] if row["c2s"] == label]
    assert [(r["client"], r["vip"], r["state"]) for r in rows] == [(f"{lab.client_addr(client)}:{cport}", f"{VIP4}:80",
                                                                    "established")]  # fmt: skip
    after = status(lab)
    print(
        f"label {label}; {len(forged)} forged frames sent; curl (exit, http): {code}; {download.received} of "
        f"{FILE_SIZE} B; "
        f"sessions ended meanwhile {delta(after['sessions']['ended'], before['sessions']['ended'])}, "
        f"drops {delta(after['drops'], before['drops'])}"
    )
    assert code == "0 200" and digest == SHA256, "the download was cut by spoofed RST/FIN"


# -- a2) forged RSTs on an idle keep-alive connection -------------------------------------------------------------
def tcp_fields(frame: bytes) -> tuple[int, int, int, int, int] | None:
    """(label, source port, destination port, seq, ack) of a labelled IPv4 TCP frame, else None."""
    if label_and_port(frame) is None:
        return None
    ip = 18
    tcp = ip + (frame[ip] & 0x0F) * 4
    if len(frame) < tcp + 16:
        return None
    sport, dport, seq, ack = struct.unpack_from("!HHII", frame, tcp)
    return int.from_bytes(frame[14:17], "big") >> 4, sport, dport, seq, ack


def http_get(sock: socket.socket) -> bytes:
    """One keep-alive request on ``sock``; its answer's body (bounded by the socket's timeout)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection mid-answer"
        body += chunk
    return body


@dataclass
class RstOutcome:
    """What the balancer made of forged RSTs on an idle keep-alive connection, then of the RST with the right
    sequence number."""

    forged_not_believed: dict[str, int]  # counted while the wrong-seq RSTs were judged
    forged_ended: dict[str, int]  # sessions ended meanwhile (by reason)
    reply_after: bytes  # the next request's answer on the same connection, after the linger
    right_ended: dict[str, int]  # sessions ended after the right-seq RST
    right_not_believed: dict[str, int]
    active_after: int  # live sessions once the right-seq RST's linger is over


def forged_rsts_on_an_idle_keep_alive_connection(lab: Lab, cport: int) -> RstOutcome:
    all_up(lab)
    client = 0
    client_mac = mac_from_str(f"02:c1:00:00:00:{client + 1:02x}")
    lb_mac = mac_from_str("02:4c:00:00:00:00")
    src, vip = ip4(lab.client_addr(client)), ip4(VIP4)
    # What a host seeing the client's segment reads off the wire: the session's label (the client's frames) and
    # the server's last acknowledgment number (its frames to the client): the sequence number the server expects.
    sniffer = Sniffer(lab, f"c{client + 1}", lambda f: client_mac in (f[:6], f[6:12]) and tcp_fields(f) is not None)

    def wire() -> tuple[int, int]:
        """(the C2S label, the server's last acknowledgment number), once the client's last ACK has passed."""
        time.sleep(0.5)
        fields = [t for f in list(sniffer.frames) if (t := tcp_fields(f))]
        label = next(t[0] for t in fields if t[1] == cport)
        server_ack = [t[4] for t in fields if t[2] == cport][-1]
        return label, server_ack

    def send(frames: list[bytes]) -> None:
        with packet_socket(lab.attacker_ns(0), "eth0") as raw:
            for frame in frames:
                raw.send(frame)
                time.sleep(0.2)

    with entered(lab.client_ns(client)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(10.0)
        sock.bind((lab.client_addr(client), cport))
        sock.connect((VIP4, 80))
        assert http_get(sock).startswith(b"server ")
        label, server_ack = wire()
        before = status(lab)
        wrong = [(server_ack + (1 << 31)) % (1 << 32), (server_ack + 16 * 65536) % (1 << 32)]
        send([
            tcp_frame(lb_mac, client_mac, src, vip, cport, 80, RST, seq=wrong[0]),
            tcp_frame(lb_mac, client_mac, src, vip, cport, 80, RST, seq=wrong[1], label=label),
            tcp_frame(lb_mac, client_mac, src, vip, cport, 80, FIN | ACK, seq=wrong[0]),
            tcp_frame(lb_mac, client_mac, src, vip, cport, 80, FIN | ACK, seq=wrong[1], label=label),
        ])  # fmt: skip
        time.sleep(3 * LINGER)  # idle well past the linger
        after = status(lab)
        not_believed = delta(after["sessions"]["not_believed"], before["sessions"]["not_believed"])
        forged_ended = delta(after["sessions"]["ended"], before["sessions"]["ended"])
        print(f"label {label}, server's last ack {server_ack}: forged seqs {wrong}; not believed {not_believed}")
        reply_after = http_get(sock)
        # The right sequence number: believed (and accepted by the server's stack); nothing follows, so the
        # session closes at the linger's end.
        label, server_ack = wire()
        before = status(lab)
        send([tcp_frame(lb_mac, client_mac, src, vip, cport, 80, RST, seq=server_ack, label=label)])
        deadline = time.monotonic() + 10 * LINGER + 3 * SNAPSHOT
        after = status(lab)
        while time.monotonic() < deadline and after["sessions"]["ended"] == before["sessions"]["ended"]:
            after = status(lab)  # ENDING (no longer active) until the linger's end, then closed
        right_ended = delta(after["sessions"]["ended"], before["sessions"]["ended"])
        right_not_believed = delta(after["sessions"]["not_believed"], before["sessions"]["not_believed"])
        print(f"right seq {server_ack}: ended {right_ended}, not believed {right_not_believed}")
        return RstOutcome(
            not_believed, forged_ended, reply_after, right_ended, right_not_believed, after["sessions"]["active"]
        )
    finally:
        sock.close()
        sniffer.stop()


def check_rst_outcome(outcome: RstOutcome) -> None:
    """Wrong-seq RSTs and FINs counted, not believed, the connection alive after the linger; the right RST closes it."""
    assert outcome.forged_not_believed == {"rst_out_of_window": 2, "fin_out_of_window": 2}, (
        "the forged RSTs and FINs did not reach the balancer, or were believed"
    )
    assert outcome.forged_ended == {}, "a session ended after the forged RSTs"
    assert outcome.reply_after.startswith(b"server "), "the idle connection did not survive the forged RSTs"
    assert outcome.right_ended == {"closed": 1} and outcome.active_after == 0, (
        "the RST with the right seq was not believed"
    )
    assert outcome.right_not_believed == {}


def test_forged_rsts_and_fins_with_a_wrong_seq_do_not_close_an_idle_keep_alive_connection(lab: Lab) -> None:
    outcome = forged_rsts_on_an_idle_keep_alive_connection(lab, 45333)
    check_rst_outcome(outcome)
    assert outcome.forged_not_believed["fin_out_of_window"] == 2  # one unlabelled, one labelled


@pytest.fixture(scope="module")
def kernel_lab() -> Iterator[Lab]:
    if shutil.which("clang") is None:
        pytest.skip("clang is needed to build the XDP program")

    spec = LabSpec(name=lab_name("atx"), clients=1, servers=1, attackers=1, offload="kernel")
    with running_lab(spec, ROOT) as the_lab:
        yield the_lab


def test_forged_rsts_and_fins_with_a_wrong_seq_do_not_close_an_idle_connection_in_the_kernel(kernel_lab: Lab) -> None:
    """The same with the kernel offload: the idle session's labels are in the kernel, which keeps the server's
    last acknowledgment number; the RSTs come up to userspace and are judged against it, and the first FIN under a
    label is recorded by the kernel with that number as it passed and judged against it when the daemon folds it."""
    assert status(kernel_lab)["offload"]["kind"] == "kernel"
    check_rst_outcome(forged_rsts_on_an_idle_keep_alive_connection(kernel_lab, 45334))


# -- b) forged labels ----------------------------------------------------------------------------------------------
def test_forged_labels_never_reach_a_server(lab: Lab) -> None:
    all_up(lab)
    rng = random.Random(12)
    marker = b"FORGED-LABEL-%d" % rng.randrange(1 << 30)
    before = status(lab)
    attacker_mac = mac_from_str(lab.attacker_mac(0))
    lb_mac = mac_from_str("02:4c:00:00:00:00")
    src, vip = ip4(lab.attacker_addr(0)), ip4(VIP4)
    # A live session to aim at, and the servers' switch ports watched for the marker.
    download = start_download(lab, 1, 45222)
    sniffers = [Sniffer(lab, f"s{j + 1}", lambda f: marker in f) for j in range(lab.spec.servers)]
    sent = 0
    try:
        time.sleep(1.0)
        in_use = list(range(16, 16 + 2 * 64))  # the lowest C2S/S2C labels, where the live sessions' labels lie
        with packet_socket(lab.attacker_ns(0), "eth0") as sock:
            for i in range(3000):
                label = rng.randrange(1 << 20) if i % 2 else rng.choice(in_use)
                flags = rng.choice((ACK, ACK | PSH, SYN, RST, FIN | ACK))
                sock.send(tcp_frame(lb_mac, attacker_mac, src, vip, rng.randrange(1024, 65536), 80, flags,
                                    seq=rng.randrange(1 << 32), label=label, payload=marker))  # fmt: skip
                sent += 1
                if i % 50 == 49:
                    time.sleep(0.05)  # about 1,000 frames/s: none lost to a full socket buffer on the way
        time.sleep(1.0)
    finally:
        reached = [f for s in sniffers for f in s.stop()]
    in_flight = download.in_flight()
    code, digest = download.release()
    after = status(lab)
    dropped = delta(after["drops"], before["drops"])
    print(f"{sent} forged frames; reached a server: {len(reached)}; balancer drops meanwhile: {dropped}")
    assert reached == [], f"{len(reached)} forged frames reached a server"
    # They did reach the balancer: its drop counters grew by (about: a loaded machine may lose a few before) as many.
    assert sum(dropped.values()) >= 0.9 * sent, "the forged frames did not reach the balancer"
    assert in_flight, f"the download ended before the forged frames did (curl: {code}): it was not aimed at"
    assert code == "0 200" and digest == SHA256


# -- c) spoofed SYN flood ------------------------------------------------------------------------------------------
@dataclass
class Flood:
    """What a spoofed SYN flood did: the status before, at its end and once its half-open sessions should be gone,
    the client's request results while it ran and the seconds they took, and the SYNs sent in how many seconds."""

    before: dict[str, Any]
    during: dict[str, Any]
    after: dict[str, Any]
    results: list[str]
    requesting: float
    sent: int
    seconds: float

    def report(self) -> str:
        before, during, after = self.before, self.during, self.after
        ok = sum(1 for r in self.results if r)
        return (
            f"flood: {self.sent} spoofed SYNs in {self.seconds:.1f} s = {self.sent / self.seconds:,.0f}/s offered; "
            f"sessions started {during['sessions']['started'] - before['sessions']['started']}, "
            f"peak {during['sessions']['peak']}, labels in use at the end of the flood {during['labels']['in_use']}; "
            f"ended {delta(after['sessions']['ended'], before['sessions']['ended'])}, "
            f"refused {delta(after['sessions']['refused'], before['sessions']['refused'])}, "
            f"drops {delta(after['drops'], before['drops'])}; "
            f"kernel drops {delta(port_drops(after), port_drops(before))}; "
            f"client: {ok}/{len(self.results)} requests answered while it ran, "
            f"{self.requesting / max(1, len(self.results)):.2f} s each; after: {after['sessions']['active']} sessions "
            f"{after['sessions']['by_state']}, {after['labels']['in_use']} labels in use; "
            f"servers {[(s['name'], s['status'], s['down_reason']) for s in after['servers']]}"
        )


def port_drops(status: dict[str, Any]) -> dict[str, int]:
    """Frames the kernel dropped before the daemon read them, per port, and of them the labelled ones."""
    out: dict[str, int] = {}
    for name, counts in status["ports"].items():
        out[name] = counts["kernel_dropped"]
        if "labelled_dropped" in counts:
            out[f"{name} labelled"] = counts["labelled_dropped"]
    return out


def half_open(status: dict[str, Any]) -> int:
    """Live sessions whose client has not completed the handshake (START or ANSWERED): the flood's."""
    by_state = status["sessions"]["by_state"]
    return int(by_state.get("start", 0) + by_state.get("answered", 0))


def leftovers(status: dict[str, Any]) -> tuple[int, int, int]:
    """What a flood may not leave behind: half-open sessions, labels held by no session in the table, and more
    sessions than the client's own last few. One of those, its closing frames lost to the flood, may still be
    closing: live (one FIN seen), or ENDING and lingering when its last FIN, retransmitted after the flood by a
    backed-off TCP, came late."""
    in_table = status["sessions"]["active"] + status["sessions"]["by_state"].get("ending", 0)
    return half_open(status), status["labels"]["in_use"] - in_table, max(0, in_table - 2)


def strangers(lab: Lab) -> list[dict[str, Any]]:
    """The sessions left in the table that are not the client's (client 0's): the flood's."""
    mine = f"{lab.client_addr(0)}:"
    return [row for row in table(lab) if not row["client"].startswith(mine)]


def syn_flood(lab: Lab) -> Flood:
    """FLOOD_RATE spoofed SYNs a second for FLOOD_SECONDS from the attacker, each from its own address and port
    (every one a new session), while client 0 makes requests one connection each, each given FLOOD_REQUEST_TIME
    seconds (time for three retransmissions of its SYN)."""
    all_up(lab)
    rng = random.Random(13)
    attacker_mac = mac_from_str(lab.attacker_mac(0))
    lb_mac = mac_from_str("02:4c:00:00:00:00")
    vip = ip4(VIP4)
    total = int(FLOOD_RATE * FLOOD_SECONDS)
    pool = [
        tcp_frame(
            lb_mac,
            attacker_mac,
            bytes((10, 66, i >> 8 & 0xFF, i & 0xFF)),
            vip,
            rng.randrange(1024, 65536),
            80,
            SYN,
            seq=rng.randrange(1 << 32),
        )
        for i in range(total)
    ]
    before = status(lab)
    results: list[str] = []
    requesting = [0.0]
    stop = threading.Event()

    def client_requests() -> None:
        deadline = time.monotonic() + FLOOD_SECONDS + 60
        while not stop.is_set() and time.monotonic() < deadline:
            begun = time.monotonic()
            results.extend(lab.curl(0, 5, timeout=200, max_time=FLOOD_REQUEST_TIME))
            requesting[0] += time.monotonic() - begun

    worker = threading.Thread(target=client_requests, daemon=True)
    worker.start()
    sent = 0
    try:
        time.sleep(0.5)
        with packet_socket(lab.attacker_ns(0), "eth0") as sock:
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < FLOOD_SECONDS and sent < total:
                if sent < FLOOD_RATE * elapsed:
                    for frame in pool[sent : sent + 64]:
                        sock.send(frame)
                        sent += 1
                else:
                    time.sleep(0.001)
            flood_seconds = time.monotonic() - started
        during = status(lab)
    finally:
        stop.set()
        worker.join(FLOOD_SECONDS + 120)
    # After the flood: the half-open sessions and their labels go within the half-open timeout (and the linger of
    # a closed session, and a snapshot's age).
    deadline = time.monotonic() + HALF_OPEN + LINGER + 3 * SNAPSHOT
    after = status(lab)
    while time.monotonic() < deadline and (after["sessions"]["active"] or after["labels"]["in_use"]):
        after = status(lab)
    return Flood(before, during, after, results, requesting[0], sent, flood_seconds)


def test_spoofed_syn_flood_takes_no_server_down_and_its_half_open_sessions_go(lab: Lab) -> None:
    """A flood at about twice what the userspace slow path starts a second (the lab runs no kernel offload): the
    daemon's socket drops frames it cannot read, the client's SYNs among them, so the client's requests wait for
    retransmitted SYNs and a few may fail; most are answered. No server goes down, nothing half-open is left, and
    once the flood stops every request succeeds."""
    flood = syn_flood(lab)
    print(flood.report())
    during, after, results = flood.during, flood.after, flood.results
    ok = sum(1 for r in results if r)
    assert all(s["status"] == "up" for s in during["servers"] + after["servers"]), "a server was marked down"
    ended = delta(after["sessions"]["ended"], flood.before["sessions"]["ended"])
    assert ended.get("server_down", 0) == 0, "a server was marked down during the flood (its sessions interrupted)"
    assert len(results) >= 5 and ok >= 0.5 * len(results), f"{len(results) - ok} of {len(results)} requests failed"
    # The client port reads labelled frames first, from a socket of their own: whatever the flood made the kernel
    # drop, it was none of the established sessions' frames.
    lanes = {name: counts["labelled_dropped"] - flood.before["ports"][name].get("labelled_dropped", 0)
             for name, counts in after["ports"].items() if "labelled_dropped" in counts}  # fmt: skip
    assert lanes and not any(lanes.values()), f"labelled frames dropped before the daemon read them: {lanes}"
    assert leftovers(after) == (0, 0, 0), f"half-open sessions or their labels outlived the timeout: {table(lab)}"
    assert strangers(lab) == [], "a flood's session outlived the half-open timeout"
    assert all(lab.curl(0, 10)), "requests failed after the flood"


SHED_RATE = 1_000  # the offload lab's offload_syn_rate: a tenth of the flood


@pytest.fixture(scope="module")
def shedding_lab() -> Iterator[Lab]:
    """The attack lab with the XDP offload shedding unlabelled SYNs beyond SHED_RATE a second."""
    spec = LabSpec(name=lab_name("shd"), clients=1, servers=2, attackers=1, offload="kernel",
                   offload_syn_rate=SHED_RATE)  # fmt: skip
    with running_lab(spec, ROOT) as the_lab:
        yield the_lab


def test_kernel_offload_sheds_a_syn_flood_beyond_its_rate(shedding_lab: Lab) -> None:
    """The same flood at ten times ``offload_syn_rate``: the XDP program drops the excess before userspace
    (``syn_shed``), the daemon starts sessions for at most the rate (per CPU bucket, rounded up, plus its burst),
    no server goes down, and once the flood stops every request succeeds and nothing half-open is left."""
    lab = shedding_lab
    flood = syn_flood(lab)
    print(flood.report())
    before, during, after = flood.before, flood.during, flood.after
    shed = delta(after["drops"], before["drops"]).get("syn_shed", 0)
    started = during["sessions"]["started"] - before["sessions"]["started"]
    cpus = os.cpu_count() or 1
    # Each CPU's bucket holds its share of the rate (rounded up) and as much burst.
    allowed = (SHED_RATE + cpus) * (flood.seconds + 1 + SNAPSHOT) + (SHED_RATE + cpus) + len(flood.results)
    assert shed > 0, "no SYN was shed in the kernel"
    accounted = shed + started
    assert accounted >= flood.sent * 0.9, f"SYNs unaccounted for: {flood.sent} sent, {shed} shed, {started} started"
    assert started <= allowed, f"{started} sessions started at a rate of {SHED_RATE}/s over {flood.seconds:.1f} s"
    assert all(s["status"] == "up" for s in during["servers"] + after["servers"]), "a server was marked down"
    assert leftovers(after) == (0, 0, 0), f"half-open sessions or their labels outlived the timeout: {table(lab)}"
    assert strangers(lab) == [], "a flood's session outlived the half-open timeout"
    # The flood over, the client's SYNs all pass again.
    assert all(lab.curl(0, 10)), "requests failed after the flood"
