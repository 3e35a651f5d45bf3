"""The ring driver benchmark (bench/wire_ring.py) measures sessions as a deployment has them: each past its
handshake (the client's SYN and the server's SYN-ACK through the driver, trafgen's frames the client's ACKs), so
the frames switched are the fast path's and not the reports of half-open sessions; every frame read is written and
the namespace is gone afterwards. Nothing timed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import wire_ring

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a namespace, veths, packet sockets"),
    pytest.mark.skipif(bool(wire_ring.missing_requirements()), reason=wire_ring.missing_requirements() or "ok"),
]

SESSIONS = 8


@pytest.mark.parametrize("mode", wire_ring.MODES[:2], ids=lambda m: m[0])
def test_the_sessions_are_past_their_handshake_and_every_frame_read_is_written(
    mode: tuple[str, bool, bool], tmp_path: Path
) -> None:
    args = argparse.Namespace(seconds=0.3, warmup=0.2, sessions=SESSIONS, size=64)
    with wire_ring.testbed() as bed:
        name = bed[0]
        figures = wire_ring.run_driver(bed, mode, args, tmp_path)
    assert name not in netns.listnetns()
    assert figures["states"] == {"established": SESSIONS}
    assert figures["read"] > 0 and figures["written"] == figures["read"]
    assert figures["forwarded"] > 0 and figures["send_errors"] == {}
