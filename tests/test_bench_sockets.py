"""The packet socket benchmark (bench/sockets.py) runs its variants over the same frames and cleans up its
namespace; nothing timed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import sockets

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace, a veth pair, packet sockets"),
]


def test_every_variant_reads_or_writes_every_frame_and_the_namespace_goes() -> None:
    result = sockets.measure(argparse.Namespace(frames=300, burst=16, rounds=1))
    assert set(result) == {"recv_burst (recvmmsg)", "recvmsg_into per frame", "recv_into per frame (floor)",
                           "send_many (sendmmsg)", "send per frame"}  # fmt: skip
    assert all(figures["median_us"] > 0 for figures in result.values())
    assert not [ns for ns in netns.listnetns() if ns == f"mlbsock{os.getpid()}"]


def test_the_run_table_gets_a_read_and_a_send_row_each_with_its_reference() -> None:
    rows = sockets.rows(quick=True)
    assert [r.section for r in rows] == ["sockets", "sockets"]
    assert all(r.figure and r.reference_figure and not r.skipped for r in rows)
    assert "recvmmsg" in rows[0].benchmark and "sendmmsg" in rows[1].benchmark
