"""Real captures from shared/data/pcap: every frame reads and dissects, and agrees with tshark frame by frame.

What we compare with tshark, per frame: the capture lengths and timestamp; the label stack; the IP addresses;
the transport protocol and its ports. Where the two dissectors differ by design:

* Pseudowires (an Ethernet frame carried under the labels, with a control word): tshark guesses and decodes
  the inner frame; we do not guess, report the outer stack with ``ip_version == 0``, and compare only the
  outer labels (tshark's list must start with them). This covers the 32-deep nested pseudowire of the
  suricata "too many layers" file, which therefore dissects (one label, non-IP) rather than failing.
* ICMP errors quote the offending datagram; tshark lists the quoted addresses and ports after the outer ones.
  We compare the outer addresses and do not look inside the quote.
* Frames tshark flags as malformed: those with a bad IPv4 header checksum (the anonymised captures) must raise
  ``ipv4_bad_checksum`` and dissect with ``verify_checksum=False``; frames listed in ``MALFORMED`` must raise
  the reason given there.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from mplslb.wire.errors import WireError
from mplslb.wire.frame import Dissection, dissect
from mplslb.wire.icmp import ICMP
from mplslb.wire.pcap import PcapRecord, read_pcap
from mplslb.wire.tcp import TCP
from mplslb.wire.udp import UDP

CAPTURE_DIRS = ("mpls", "mpls-edge", "plain")
CAPTURES = (
    "mpls-edge/suricata-verify_decode-too-many-layers.pcap",
    "mpls/arkime_mpls-basic.pcap",
    "mpls/libtrace_10_mpls_ip.pcap",
    "mpls/libtrace_ip-in-mpls.pcap.gz",
    "mpls/libtrace_mpls.pcap",
    "mpls/ndpi_BGP_redist.pcap",
    "mpls/tcpdump_lspping-fec-ldp.pcap",
    "mpls/tcpdump_lspping-fec-rsvp.pcap",
    "mpls/tcpdump_mpls-over-udp.pcap",
    "mpls/tcpdump_mpls-traceroute.pcap",
    "mpls/tcpreplay_test.pcap",
    "mpls/zeek_mixed-vlan-mpls.pcap",
    "plain/zeek_communityid-ipv6.pcap",
    "plain/zeek_http-get.pcap",
    "plain/zeek_ipv6-http-atomic-frag.pcap",
    "plain/zeek_wikipedia.pcap",
)

# (file, frame number) -> reason; tshark agrees: "IPv4 total length exceeds packet length (100 bytes)".
MALFORMED = {("mpls/tcpreplay_test.pcap", 11): "ipv4_bad_total_length"}

# Frames counted per file (from SOURCES.md / capinfos), so a reader that stops early is caught without tshark.
FRAME_COUNTS = {
    "mpls-edge/suricata-verify_decode-too-many-layers.pcap": 1,
    "mpls/arkime_mpls-basic.pcap": 58,
    "mpls/libtrace_10_mpls_ip.pcap": 10,
    "mpls/libtrace_ip-in-mpls.pcap.gz": 10507,
    "mpls/libtrace_mpls.pcap": 10,
    "mpls/ndpi_BGP_redist.pcap": 2,
    "mpls/tcpdump_lspping-fec-ldp.pcap": 13,
    "mpls/tcpdump_lspping-fec-rsvp.pcap": 10,
    "mpls/tcpdump_mpls-over-udp.pcap": 2,
    "mpls/tcpdump_mpls-traceroute.pcap": 18,
    "mpls/tcpreplay_test.pcap": 179,
    "mpls/zeek_mixed-vlan-mpls.pcap": 47,
    "plain/zeek_communityid-ipv6.pcap": 17,
    "plain/zeek_http-get.pcap": 14,
    "plain/zeek_ipv6-http-atomic-frag.pcap": 38,
    "plain/zeek_wikipedia.pcap": 136,
}

TSHARK_FIELDS = (
    "frame.number",
    "frame.len",
    "frame.cap_len",
    "frame.time_epoch",
    "frame.protocols",
    "mpls.label",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.checksum.status",
    "ipv6.src",
    "ipv6.dst",
    "tcp.srcport",
    "tcp.dstport",
    "udp.srcport",
    "udp.dstport",
)
CHECKSUM_BAD = "0"  # Wireshark's PROTO_CHECKSUM_E_BAD
TRANSPORTS = frozenset({"tcp", "udp", "icmp", "icmpv6"})
PSEUDOWIRE = "pwethcw"


class TsharkFrame(NamedTuple):
    fields: dict[str, list[str]]

    def first(self, name: str, index: int = 0) -> str:
        return self.fields[name][index]

    def all(self, name: str) -> list[str]:
        return self.fields[name]


def _path(shared_data: Path, name: str) -> Path:
    return shared_data / "pcap" / name


def _records(shared_data: Path, name: str) -> list[PcapRecord]:
    return list(read_pcap(_path(shared_data, name)))


@pytest.fixture(scope="module")
def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.skip("tshark is not installed (apt-get install tshark); it is the oracle for these tests")
    return path


_TSHARK_CACHE: dict[Path, list[TsharkFrame]] = {}


def _tshark_frames(tshark: str, path: Path) -> list[TsharkFrame]:
    if path not in _TSHARK_CACHE:
        cmd = [tshark, "-n", "-r", str(path), "-o", "ip.check_checksum:TRUE", "-T", "fields"]
        cmd += ["-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
        for field in TSHARK_FIELDS:
            cmd += ["-e", field]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows = []
        for line in out.splitlines():
            values = line.split("|")
            assert len(values) == len(TSHARK_FIELDS), line
            rows.append(
                TsharkFrame({k: (v.split(",") if v else []) for k, v in zip(TSHARK_FIELDS, values, strict=True)})
            )
        _TSHARK_CACHE[path] = rows
    return _TSHARK_CACHE[path]


def _dissections(records: list[PcapRecord], name: str) -> Iterator[tuple[int, PcapRecord, Dissection | WireError]]:
    for number, record in enumerate(records, start=1):
        try:
            yield number, record, dissect(record.data, record.linktype, orig_len=record.orig_len)
        except WireError as exc:
            yield number, record, exc


def test_every_capture_is_listed(shared_data: Path) -> None:
    found = {
        str(p.relative_to(shared_data / "pcap")) for d in CAPTURE_DIRS for p in (shared_data / "pcap" / d).iterdir()
    }
    assert found == set(CAPTURES)


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_reads_every_frame(shared_data: Path, name: str) -> None:
    records = _records(shared_data, name)
    assert len(records) == FRAME_COUNTS[name]
    assert all(0 < len(r.data) <= r.orig_len for r in records)


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_dissects_without_unexpected_errors(shared_data: Path, name: str) -> None:
    """Well-formed frames dissect; the malformed ones raise WireError with the expected reason."""
    for number, record, result in _dissections(_records(shared_data, name), name):
        if isinstance(result, WireError):
            expected = MALFORMED.get((name, number), "ipv4_bad_checksum")
            assert result.reason == expected, f"frame {number}: {result}"
            if expected == "ipv4_bad_checksum":
                dissect(record.data, record.linktype, orig_len=record.orig_len, verify_checksum=False)
        else:
            assert (name, number) not in MALFORMED


def test_too_many_layers_is_one_label_over_a_pseudowire(shared_data: Path) -> None:
    (record,) = _records(shared_data, "mpls-edge/suricata-verify_decode-too-many-layers.pcap")
    d = dissect(record.data, record.linktype)
    assert [e.label for e in d.labels] == [16]
    assert d.ip_version == 0 and d.ip is None and d.l4 is None


def test_mpls_over_udp_capture_gives_inner_labels_and_packet(shared_data: Path) -> None:
    records = _records(shared_data, "mpls/tcpdump_mpls-over-udp.pcap")
    d = dissect(records[0].data, records[0].linktype)
    assert d.udp_mpls and [e.label for e in d.labels] == [21]
    assert (str(ipaddress.ip_address(d.src)), str(ipaddress.ip_address(d.dst))) == ("10.3.0.10", "10.1.0.10")
    assert isinstance(d.l4, ICMP)


def _address(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _expected_transport(protocols: list[str], udp_mpls: bool) -> str | None:
    """tshark's transport layer right after the IP layer we describe (the inner one for MPLS in UDP)."""
    layers = protocols[0].split(":") if protocols else []
    start = layers.index("mpls", layers.index("udp")) if udp_mpls else 0
    ip_at = next(i for i in range(start, len(layers)) if layers[i] in ("ip", "ipv6"))
    after = [layer for layer in layers[ip_at + 1 :] if not layer.startswith("ipv6.")]
    return after[0] if after and after[0] in TRANSPORTS else None


def _our_transport(d: Dissection) -> str | None:
    if isinstance(d.l4, TCP):
        return "tcp"
    if isinstance(d.l4, UDP):
        return "udp"
    if isinstance(d.l4, ICMP):
        return "icmp" if d.ip_version == 4 else "icmpv6"
    return None


def _compare(number: int, record: PcapRecord, d: Dissection, t: TsharkFrame) -> None:
    where = f"frame {number}"
    assert int(t.first("frame.len")) == record.orig_len, where
    assert int(t.first("frame.cap_len")) == len(record.data), where
    assert float(t.first("frame.time_epoch")) == pytest.approx(record.timestamp, abs=1e-6), where
    tshark_labels = [int(x) for x in t.all("mpls.label")]
    ours = [e.label for e in d.labels]
    protocols = t.all("frame.protocols")
    if d.ip_version == 0:
        # Non-IP, or a pseudowire: only the outer stack is ours to compare.
        assert tshark_labels[: len(ours)] == ours, where
        if PSEUDOWIRE not in protocols[0]:
            assert tshark_labels == ours and not t.all("ip.src") and not t.all("ipv6.src"), where
        return
    assert tshark_labels == ours, where
    index = 1 if d.udp_mpls else 0  # MPLS in UDP: tshark lists the outer IP first
    family = "ip" if d.ip_version == 4 else "ipv6"
    assert _address(d.src) == t.first(f"{family}.src", index), where
    assert _address(d.dst) == t.first(f"{family}.dst", index), where
    if d.ip_version == 4:
        assert d.proto == int(t.first("ip.proto", index)), where
    transport = _our_transport(d)
    assert transport == _expected_transport(protocols, d.udp_mpls), where
    if transport in ("tcp", "udp"):
        port_index = 1 if d.udp_mpls and transport == "udp" else 0
        assert d.sport == int(t.first(f"{transport}.srcport", port_index)), where
        assert d.dport == int(t.first(f"{transport}.dstport", port_index)), where


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_agrees_with_tshark(shared_data: Path, tshark: str, name: str) -> None:
    records = _records(shared_data, name)
    frames = _tshark_frames(tshark, _path(shared_data, name))
    assert len(frames) == len(records)
    for number, record, result in _dissections(records, name):
        t = frames[number - 1]
        assert int(t.first("frame.number")) == number
        bad_checksum = t.all("ip.checksum.status")[:1] == [CHECKSUM_BAD]
        if isinstance(result, WireError):
            assert bad_checksum or (name, number) in MALFORMED, f"frame {number}: {result}"
            if (name, number) in MALFORMED:
                continue
            result = dissect(record.data, record.linktype, orig_len=record.orig_len, verify_checksum=False)
        else:
            # A header checksum tshark finds bad deep inside (e.g. inside a pseudowire) is not one we check.
            assert not bad_checksum or result.ip_version == 0 or result.udp_mpls, f"frame {number}"
        _compare(number, record, result, t)
