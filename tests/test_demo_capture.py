"""The demo's captures, read by tshark: labels are where the claims say, and pair up as C2S odd, S2C = C2S + 1."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from mplslb.sim.config import EXAMPLE, sim_config_from_toml
from mplslb.sim.scenario import VIP4, VIP6, Workload, run

pytestmark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="tshark is not installed (make test installs it)"
)

FIELDS = ("frame.number", "mpls.label", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport",
          "udp.srcport", "udp.dstport", "tcp.flags.syn", "tcp.flags.ack")  # fmt: skip
VIPS = {"10.0.0.100", "fd00::100"}


def tshark_rows(path: Path) -> list[dict[str, str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]


@pytest.fixture(scope="module")
def demo_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    from dataclasses import replace

    config = sim_config_from_toml(EXAMPLE)
    config = replace(config, workload=replace(config.workload, sessions=600))
    path = tmp_path_factory.mktemp("demo") / "demo.pcap"
    report = run(config, capture=path)
    return path, path.with_name("demo-servers.pcap"), report


def flow_of(row: dict[str, str]) -> tuple[str, str, str, str, str, bool]:
    """(proto, client, client port, vip, vip port, from_client) of a frame."""
    src = row["ip.src"] or row["ipv6.src"]
    dst = row["ip.dst"] or row["ipv6.dst"]
    proto = "tcp" if row["tcp.srcport"] else "udp"
    sport = row["tcp.srcport"] or row["udp.srcport"]
    dport = row["tcp.dstport"] or row["udp.dstport"]
    if dst in VIPS:
        return proto, src, sport, dst, dport, True
    assert src in VIPS, f"frame {row['frame.number']} neither to nor from a VIP: no address was rewritten"
    return proto, dst, dport, src, sport, False


def test_demo_capture_client_side_labels_pair_up(demo_capture: tuple[Path, Path, object]) -> None:
    client_side, _, _ = demo_capture
    rows = tshark_rows(client_side)
    assert len(rows) > 1000
    c2s_of: dict[tuple[str, ...], int] = {}
    first_seen: dict[tuple[str, ...], bool] = {}
    s2c_frames = 0
    pending_s2c: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for row in rows:
        *key, from_client = flow_of(row)
        flow = tuple(key)
        label = int(row["mpls.label"]) if row["mpls.label"] else None
        if flow not in first_seen:
            first_seen[flow] = True
            assert from_client and label is None, f"first frame of {flow} must be the client's, unlabelled"
            continue
        if label is None:
            continue  # a UDP flow's requests before its first reply, or a refusal
        if from_client:
            assert label % 2 == 1
            assert c2s_of.setdefault(flow, label) == label, "a session's C2S label never changes"
        else:
            assert label % 2 == 0
            s2c_frames += 1
            pending_s2c[flow].append(label)
    # Every labelled S2C frame's label is its session's C2S + 1 (sessions whose client sent labelled frames).
    checked = 0
    for flow, labels in pending_s2c.items():
        if flow in c2s_of:
            assert set(labels) == {c2s_of[flow] + 1}
            checked += len(labels)
    assert s2c_frames > 500 and checked >= 0.95 * s2c_frames


def test_demo_capture_server_side_all_labelled_vip_addressed(demo_capture: tuple[Path, Path, object]) -> None:
    _, server_side, report = demo_capture
    rows = tshark_rows(server_side)
    assert rows
    pairs: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for row in rows:
        assert row["mpls.label"], f"frame {row['frame.number']} on a server-side port is unlabelled"
        *key, from_client = flow_of(row)
        label = int(row["mpls.label"])
        assert label % 2 == (1 if from_client else 0)
        pairs[tuple(key)].add(label if from_client else label - 1)
    assert all(len(c2s) == 1 for c2s in pairs.values()), "both directions of a session use one label pair"
    assert len(pairs) == report.stats.sessions_started  # type: ignore[attr-defined]


def test_demo_vip_constants_match_capture_filter() -> None:
    import ipaddress

    assert {str(ipaddress.ip_address(VIP4)), str(ipaddress.ip_address(VIP6))} == VIPS
    assert Workload().sessions > 0
