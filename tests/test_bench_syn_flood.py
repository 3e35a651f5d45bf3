"""The SYN flood benchmark (bench/syn_flood.py) opens a session for every SYN it sends, with receive rings and with
packet sockets, and removes its namespace; nothing timed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import syn_flood

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace, veth pairs, packet sockets"),
]


def test_every_syn_opens_a_session_in_both_modes_and_the_namespace_goes() -> None:
    found = syn_flood.measure(600, 200, 1)
    assert found["ring"]["sessions"] == found["packet"]["sessions"] == [600]
    assert found["ring"]["cpu_us_per_session"] > 0 and found["packet"]["cpu_us_per_session"] > 0
    assert f"mlbsf{os.getpid()}" not in netns.listnetns()


def test_the_run_table_gets_the_ring_row_with_the_packet_sockets_reference() -> None:
    (row,) = syn_flood.rows(quick=True)
    assert row.section == "syn_flood" and row.figure and row.reference_figure and not row.skipped
    assert "4,000 TCP SYNs" in row.note
