"""Capture files: hand-built pcap and pcapng in every variant we read, PcapWriter round trips, tshark."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mplslb.wire.pcap import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_PPP,
    LINKTYPE_RAW,
    PcapError,
    PcapRecord,
    PcapWriter,
    read_pcap,
)

FRAME_A = bytes.fromhex("ffffffffffff 020000000001 0806") + bytes(46)
FRAME_B = bytes(range(70))


def test_linktype_constants() -> None:
    assert (LINKTYPE_ETHERNET, LINKTYPE_PPP, LINKTYPE_RAW, LINKTYPE_C_HDLC, LINKTYPE_LINUX_SLL) == (
        1,
        9,
        101,
        104,
        113,
    )


def classic(order: str, magic: int, linktype: int, records: list[tuple[int, int, bytes, int]]) -> bytes:
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for seconds, fraction, data, orig in records:
        out += struct.pack(order + "IIII", seconds, fraction, len(data), orig) + data
    return out


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize(("magic", "tick"), [(0xA1B2C3D4, 1e-6), (0xA1B23C4D, 1e-9)])
def test_classic_both_orders_and_resolutions(order: str, magic: int, tick: float) -> None:
    data = classic(order, magic, LINKTYPE_PPP, [(100, 250, FRAME_A, 60), (101, 7, FRAME_B[:10], 70)])
    records = list(read_pcap(io.BytesIO(data)))
    assert records == [
        PcapRecord(100 + 250 * tick, LINKTYPE_PPP, FRAME_A, 60),
        PcapRecord(101 + 7 * tick, LINKTYPE_PPP, FRAME_B[:10], 70),
    ]


def test_classic_fcs_bits_masked_from_linktype() -> None:
    data = classic("<", 0xA1B2C3D4, 0x10000000 | LINKTYPE_ETHERNET, [(0, 0, FRAME_A, 60)])
    assert next(read_pcap(io.BytesIO(data))).linktype == LINKTYPE_ETHERNET


def test_empty_classic_file_has_no_records() -> None:
    assert list(read_pcap(io.BytesIO(classic("<", 0xA1B2C3D4, 1, [])))) == []


def block(order: str, block_type: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    total = len(body) + 12
    return struct.pack(order + "II", block_type, total) + body + struct.pack(order + "I", total)


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


def shb(order: str) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order: str, linktype: int, options: bytes = b"", snaplen: int = 0) -> bytes:
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + options)


def epb(order: str, interface: int, ticks: int, data: bytes, orig: int | None = None) -> bytes:
    fixed = struct.pack(order + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), orig or len(data))
    return block(order, 6, fixed + data)


def spb(order: str, data: bytes) -> bytes:
    return block(order, 3, struct.pack(order + "I", len(data)) + data)


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_blocks(order: str) -> None:
    nanoseconds = option(order, 9, b"\x09") + option(order, 0, b"")
    base2 = option(order, 9, b"\x8a") + option(order, 14, struct.pack(order + "q", 1000))  # 2**-10 s, +1000 s
    data = (
        shb(order)
        + idb(order, LINKTYPE_ETHERNET)
        + idb(order, LINKTYPE_RAW, nanoseconds)
        + idb(order, LINKTYPE_PPP, base2)
        + block(order, 5, b"interface statistics, skipped")
        + epb(order, 0, 1_500_000_123_456, FRAME_A)
        + epb(order, 1, 1_500_000_123_456_789_012, FRAME_B, orig=100)
        + epb(order, 2, 3 * 1024 + 512, b"\xff\x03")
        + block(order, 0x0BAD, b"custom")
        + spb(order, FRAME_B[:5])
    )
    records = list(read_pcap(io.BytesIO(data)))
    assert [(r.linktype, r.data, r.orig_len) for r in records] == [
        (LINKTYPE_ETHERNET, FRAME_A, len(FRAME_A)),
        (LINKTYPE_RAW, FRAME_B, 100),
        (LINKTYPE_PPP, b"\xff\x03", 2),
        (LINKTYPE_ETHERNET, FRAME_B[:5], 5),  # a simple packet block belongs to interface 0
    ]
    assert records[0].timestamp == pytest.approx(1_500_000.123456)
    assert records[1].timestamp == pytest.approx(1_500_000_123.456789012)
    assert records[2].timestamp == pytest.approx(1003.5)


def test_pcapng_new_section_switches_byte_order_and_interfaces() -> None:
    data = shb("<") + idb("<", LINKTYPE_ETHERNET) + epb("<", 0, 1, FRAME_A)
    data += shb(">") + idb(">", LINKTYPE_RAW) + epb(">", 0, 2, FRAME_B)
    assert [(r.linktype, r.data) for r in read_pcap(io.BytesIO(data))] == [
        (LINKTYPE_ETHERNET, FRAME_A),
        (LINKTYPE_RAW, FRAME_B),
    ]


def test_gzip_of_either_format(tmp_path: Path) -> None:
    plain = classic("<", 0xA1B2C3D4, 1, [(5, 0, FRAME_A, 60)])
    ng = shb("<") + idb("<", 1) + epb("<", 0, 5_000_000, FRAME_A)
    for data in (plain, ng):
        path = tmp_path / "x.pcap.gz"
        path.write_bytes(gzip.compress(data))
        assert [(r.timestamp, r.data) for r in read_pcap(path)] == [(5.0, FRAME_A)]
        assert [r.data for r in read_pcap(io.BytesIO(gzip.compress(data)))] == [FRAME_A]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "pcap_truncated"),
        (b"\xd4\xc3", "pcap_truncated"),
        (b"NOPE" + bytes(20), "pcap_bad_magic"),
        (classic("<", 0xA1B2C3D4, 1, [])[:20], "pcap_truncated"),
        (classic("<", 0xA1B2C3D4, 1, [(0, 0, FRAME_A, 60)])[:-1], "pcap_truncated"),
        (classic("<", 0xA1B2C3D4, 1, [(0, 0, FRAME_A, 60)])[:30], "pcap_truncated"),
        (shb("<")[:-2], "pcap_truncated"),
        (shb("<")[:8] + b"XXXX" + shb("<")[12:], "pcap_bad_magic"),
        (shb("<") + epb("<", 0, 0, FRAME_A), "pcap_truncated"),  # packet on an undeclared interface
        (shb("<") + struct.pack("<II", 6, 13) + bytes(9), "pcap_truncated"),  # length not a multiple of 4
        (shb("<") + block("<", 6, b"\x00" * 8), "pcap_truncated"),
        (shb("<") + idb("<", 1)[:-4] + b"\x00\x00\x00\x00", "pcap_truncated"),  # trailer disagrees
        (gzip.compress(classic("<", 0xA1B2C3D4, 1, [(0, 0, FRAME_A, 60)]), mtime=0)[:-12], "pcap_bad_gzip"),
        (b"\x1f\x8b" + bytes(30), "pcap_bad_gzip"),
    ],
)
def test_errors(data: bytes, reason: str) -> None:
    with pytest.raises(PcapError) as info:
        list(read_pcap(io.BytesIO(data)))
    assert info.value.reason == reason


def test_writer_header_bytes() -> None:
    out = io.BytesIO()
    with PcapWriter(out, LINKTYPE_RAW, snaplen=1500) as writer:
        writer.write(b"\x45abc", 1.25)
    assert out.getvalue() == bytes.fromhex(
        "d4c3b2a1 0200 0400 00000000 00000000 dc050000 6500000001000000 90d00300 04000000 04000000 45616263"
    )


def test_writer_cuts_at_snaplen_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    with PcapWriter(path, snaplen=64) as writer:
        writer.write(FRAME_A, 1_600_000_000.000001)
        writer.write(FRAME_B, 1_600_000_000.9999996)  # rounds up to the next second
    records = list(read_pcap(path))
    assert (
        records
        == [
            PcapRecord(pytest.approx(1_600_000_000.000001), LINKTYPE_ETHERNET, FRAME_A, 60),  # type: ignore[arg-type]
            PcapRecord(pytest.approx(1_600_000_001.0), LINKTYPE_ETHERNET, FRAME_B[:64], 70),  # type: ignore[arg-type]
        ]
    )


def test_writer_rejects_negative_time() -> None:
    with PcapWriter(io.BytesIO()) as writer, pytest.raises(ValueError):
        writer.write(b"x", -1.0)


def test_writer_leaves_a_given_stream_open() -> None:
    out = io.BytesIO()
    PcapWriter(out).close()
    assert not out.closed and len(out.getvalue()) == 24


@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=300), st.integers(0, 2**32 - 1), st.integers(0, 999_999)),
        max_size=10,
    )
)
def test_round_trip(frames: list[tuple[bytes, int, int]]) -> None:
    out = io.BytesIO()
    with PcapWriter(out) as writer:
        for data, seconds, micros in frames:
            writer.write(data, seconds + micros / 1e6)
    out.seek(0)
    records = list(read_pcap(out))
    assert [(r.data, r.orig_len) for r in records] == [(d, len(d)) for d, _, _ in frames]
    assert [round(r.timestamp * 1e6) for r in records] == [s * 1_000_000 + m for _, s, m in frames]


@pytest.fixture(scope="module")
def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.skip("tshark is not installed (apt-get install tshark); it is the oracle for this test")
    return path


def test_tshark_reads_what_we_write(tmp_path: Path, tshark: str) -> None:
    from mplslb.wire.ethernet import ETH_P_MPLS_UC, build_ethernet
    from mplslb.wire.ip import IPPROTO_UDP
    from mplslb.wire.ipv4 import build_ipv4
    from mplslb.wire.mpls import stack_of
    from mplslb.wire.udp import build_udp

    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    path = tmp_path / "ours.pcap"
    with PcapWriter(path) as writer:
        for i in range(5):
            datagram = build_udp(src, dst, 1000 + i, 53, b"q")
            frame = build_ethernet(bytes(6), bytes(6), ETH_P_MPLS_UC) + stack_of([100 + i, 17])
            writer.write(frame + build_ipv4(src, dst, IPPROTO_UDP, len(datagram)) + datagram, 1_700_000_000 + i / 10)
    cmd = [
        tshark,
        "-n",
        "-r",
        str(path),
        "-T",
        "fields",
        "-e",
        "frame.time_epoch",
        "-e",
        "mpls.label",
        "-e",
        "udp.srcport",
    ]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        epoch, labels, sport = line.split("\t")
        assert float(epoch) == pytest.approx(1_700_000_000 + i / 10, abs=1e-6)
        assert (labels, int(sport)) == (f"{100 + i},17", 1000 + i)


def test_we_read_what_editcap_converts(tmp_path: Path, tshark: str) -> None:
    editcap = shutil.which("editcap")
    if editcap is None:
        pytest.skip("editcap (part of tshark's package) is not installed")
    ours = tmp_path / "ours.pcap"
    with PcapWriter(ours) as writer:
        writer.write(FRAME_A, 12.5)
        writer.write(FRAME_B, 13.25)
    for fmt in ("pcapng", "nsecpcap"):
        converted = tmp_path / f"converted.{fmt}"
        subprocess.run([editcap, "-F", fmt, str(ours), str(converted)], check=True, capture_output=True)
        assert [(r.timestamp, r.data) for r in read_pcap(converted)] == [(12.5, FRAME_A), (13.25, FRAME_B)]
