"""Replaying a capture through the balancer: frames in at their timestamps, outputs written at the same times."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import (
    ACK,
    PORT_MAC,
    SERVER_BY_MAC,
    SYN,
    client_mac,
    client_tcp,
    client_udp,
    labelled,
    reply_tcp_packet,
    standard_balancer,
)
from mplslb.drivers.pcapdrv import ReplayCounts, replay
from mplslb.sessions import Timeouts
from mplslb.wire.ethernet import ETH_P_MPLS_UC
from mplslb.wire.pcap import LINKTYPE_RAW, PcapWriter, read_pcap

T0 = 1_700_000_000.0
MPLS = ETH_P_MPLS_UC.to_bytes(2, "big")


def top_label(frame: bytes) -> int:
    assert frame[12:14] == MPLS
    return int.from_bytes(frame[14:17], "big") >> 4


def write_capture(path: Path, records: list[tuple[float, bytes]], **kwargs: int) -> Path:
    with PcapWriter(path, **kwargs) as writer:
        for when, frame in records:
            writer.write(frame, when)
    return path


def session_capture(path: Path) -> tuple[Path, int, bytes]:
    """A client's SYN, the chosen server's labelled SYN-ACK, a DNS query, and a query long after: the capture, the
    session's C2S label and the server's MAC (learned from a scratch balancer: allocation is deterministic)."""
    syn = client_tcp(SYN, sport=40000)
    ((_, to_server),) = standard_balancer().receive(0, syn, T0)
    c2s, server_mac = top_label(to_server), to_server[0:6]
    server = SERVER_BY_MAC[server_mac]
    syn_ack = labelled(PORT_MAC[server.port_id], server_mac, c2s + 1, reply_tcp_packet(SYN | ACK))
    records = [
        (T0, syn),
        (T0 + 0.010, syn_ack),
        (T0 + 0.020, client_udp(b"q1", client=1, sport=5353)),
        (T0 + 1000.0, client_udp(b"q2", client=2, sport=5354)),  # long after the UDP session's idle timeout
    ]
    return write_capture(path, records), c2s, server_mac


def test_replay_feeds_frames_at_their_times_and_writes_outputs_at_the_same_times(tmp_path):
    capture, c2s, server_mac = session_capture(tmp_path / "in.pcap")
    balancer = standard_balancer()
    port_map = {s.mac: s.port_id for s in SERVER_BY_MAC.values()}
    counts = replay(balancer, capture, tmp_path / "out.pcap", port_map=port_map, default_port=0)
    assert (counts.records, counts.fed, counts.written) == (4, 4, 4)
    assert counts.timers >= 1 and counts.skipped_linktype == counts.skipped_truncated == counts.out_of_order == 0
    out = list(read_pcap(tmp_path / "out.pcap"))
    assert [r.timestamp for r in out] == pytest.approx([T0, T0 + 0.010, T0 + 0.020, T0 + 1000.0], abs=1e-6)
    syn_out, syn_ack_out, dns_out, late_out = (r.data for r in out)
    assert top_label(syn_out) == c2s and syn_out[0:6] == server_mac
    assert top_label(syn_ack_out) == c2s + 1 and syn_ack_out[0:6] == client_mac(0)
    assert all(top_label(f) % 2 == 1 for f in (dns_out, late_out))  # C2S labels of new sessions
    stats = balancer.stats()
    assert stats.sessions_started == 3 and stats.sessions_ended.get("idle_timeout", 0) >= 1  # the timers ran


def test_replay_equals_feeding_the_balancer_by_hand(tmp_path):
    capture, _, _ = session_capture(tmp_path / "in.pcap")
    port_map = {s.mac: s.port_id for s in SERVER_BY_MAC.values()}
    replay(standard_balancer(), capture, tmp_path / "out.pcap", port_map=port_map)
    by_hand = standard_balancer()
    expected: list[bytes] = []
    for record in read_pcap(capture):
        while (deadline := by_hand.next_deadline()) is not None and deadline <= record.timestamp:
            expected += [f for _, f in by_hand.on_timer(deadline)]
        port = port_map.get(record.data[6:12], 0)
        expected += [f for _, f in by_hand.receive(port, record.data, record.timestamp)]
    assert [r.data for r in read_pcap(tmp_path / "out.pcap")] == expected


def test_port_map_may_be_a_function(tmp_path):
    capture, _, _ = session_capture(tmp_path / "in.pcap")
    seen: list[bytes] = []

    def port_of(frame: bytes) -> int:
        seen.append(frame)
        return SERVER_BY_MAC[frame[6:12]].port_id if frame[6:12] in SERVER_BY_MAC else 0

    counts = replay(standard_balancer(), capture, tmp_path / "out.pcap", port_map=port_of)
    assert len(seen) == 4 and counts.written == 4


def test_unmapped_server_frames_are_dropped_by_the_balancer_not_the_replay(tmp_path):
    capture, _, _ = session_capture(tmp_path / "in.pcap")
    balancer = standard_balancer()
    counts = replay(balancer, capture, tmp_path / "out.pcap")  # everything enters on port 0
    assert counts.fed == 4 and counts.written == 3
    assert balancer.stats().drops == {"label_wrong_ingress": 1}


def test_other_link_types_are_skipped_and_counted(tmp_path):
    raw = write_capture(tmp_path / "raw.pcap", [(T0, client_udp()[14:]), (T0 + 1, client_udp()[14:])],
                        linktype=LINKTYPE_RAW)  # fmt: skip
    counts = replay(standard_balancer(), raw, tmp_path / "out.pcap")
    assert counts == ReplayCounts(records=2, skipped_linktype=2)
    assert list(read_pcap(tmp_path / "out.pcap")) == []


def test_frames_cut_by_the_snap_length_are_skipped(tmp_path):
    cut = write_capture(tmp_path / "cut.pcap", [(T0, client_udp(b"x" * 200))], snaplen=64)
    counts = replay(standard_balancer(), cut, tmp_path / "out.pcap")
    assert (counts.records, counts.fed, counts.skipped_truncated) == (1, 0, 1)


def test_time_never_goes_back(tmp_path):
    records = [(T0 + 5, client_udp(b"a", sport=1000)), (T0, client_udp(b"b", sport=1001))]
    capture = write_capture(tmp_path / "in.pcap", records)
    counts = replay(standard_balancer(), capture, tmp_path / "out.pcap")
    assert counts.out_of_order == 1
    assert [r.timestamp for r in read_pcap(tmp_path / "out.pcap")] == pytest.approx([T0 + 5, T0 + 5])


def test_drain_fires_the_timers_after_the_last_frame(tmp_path):
    capture = write_capture(tmp_path / "in.pcap", [(T0, client_udp())])
    balancer = standard_balancer(timeouts=Timeouts(udp=10.0))
    counts = replay(balancer, capture, tmp_path / "out.pcap")
    assert counts.timers == 0 and balancer.live == 1
    balancer = standard_balancer(timeouts=Timeouts(udp=10.0))
    counts = replay(balancer, capture, tmp_path / "out.pcap", drain=60.0)
    assert counts.timers >= 1 and balancer.live == 0


def test_streams_and_writers_are_accepted(tmp_path):
    capture, _, _ = session_capture(tmp_path / "in.pcap")
    sink = io.BytesIO()
    port_map = {s.mac: s.port_id for s in SERVER_BY_MAC.values()}
    with open(capture, "rb") as source:
        counts = replay(standard_balancer(), source, sink, port_map=port_map)
    assert len(list(read_pcap(io.BytesIO(sink.getvalue())))) == counts.written == 4
    with PcapWriter(tmp_path / "w.pcap") as writer:
        replay(standard_balancer(), capture, writer, port_map=port_map)
        replay(standard_balancer(), capture, writer, port_map=port_map)  # a writer given stays open
    assert len(list(read_pcap(tmp_path / "w.pcap"))) == 8


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_output_labels(tmp_path):
    capture, c2s, _ = session_capture(tmp_path / "in.pcap")
    port_map = {s.mac: s.port_id for s in SERVER_BY_MAC.values()}
    replay(standard_balancer(), capture, tmp_path / "out.pcap", port_map=port_map)
    result = subprocess.run(
        ["tshark", "-n", "-r", str(tmp_path / "out.pcap"), "-T", "fields", "-e", "mpls.label", "-e", "ip.dst"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == 4
    assert rows[0] == [str(c2s), "10.0.0.100"] and rows[1] == [str(c2s + 1), "10.1.0.1"]
