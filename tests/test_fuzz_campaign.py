"""The fuzz campaign (``make fuzz``) in a short bounded run: hostile frames through receive, receive_batch,
receive_block and (as root, with clang) the XDP program, every path agreeing with the one-frame path frame for
frame and counter for counter, every frame accounted for, no exception; and the campaign's own checks catch a
path that disagrees."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from mplslb import fuzz
from mplslb.balancer import Balancer

FRAMES = 20_000


def test_short_campaign_every_path_agrees_and_every_frame_is_accounted_for() -> None:
    kernel = os.geteuid() == 0 and (shutil.which("clang") is not None or bool(os.environ.get("MPLSLB_CLANG")))
    report = fuzz.campaign(FRAMES, seed=7, kernel=kernel)
    s = report.stats
    assert report.frames == s.frames_in == FRAMES
    assert s.frames_in == s.frames_out + sum(s.drops.values()) + sum(s.refused.values())
    # The frames reached every stage: labels switched (by the kernel too), sessions opened and ended, drops of
    # the switching unit and of the analyser, answers to ARP and neighbour solicitations.
    assert s.fast_path > 0.05 * FRAMES and s.sessions_started > 100 and sum(s.sessions_ended.values()) > 10
    assert {"label_unknown", "label_wrong_ingress", "mpls_ttl_expired", "unknown_port"} <= set(s.drops)
    assert s.neighbor_replies > 0
    assert set(report.kinds) == set(fuzz.Mutator.KINDS)
    if kernel:
        assert report.kernel == "yes" and report.redirected > 0
    assert "frames_in" in "\n".join(report.lines())


def test_the_same_seed_gives_the_same_frames() -> None:
    def frames(seed: int) -> list[tuple[int, bytes]]:
        rng = random.Random(seed)
        b = Balancer(fuzz.campaign_config())
        return fuzz.Mutator(rng, []).frames(fuzz.base_set(b, rng), 500)

    assert frames(3) == frames(3) != frames(4)


def test_a_path_that_differs_is_caught() -> None:
    paths = fuzz.Paths(fuzz.campaign_config(), None)
    rng = random.Random(1)
    chunk = fuzz.Mutator(rng, []).frames(fuzz.base_set(paths.one, rng), 200)
    original = Balancer.receive_batch

    def lossy(self: Balancer, frames: list[tuple[int, bytes]], now: float) -> list[tuple[int, bytes]]:
        return original(self, frames, now)[1:]

    Balancer.receive_batch = lossy  # type: ignore[method-assign]
    try:
        with pytest.raises(fuzz.Mismatch, match="receive_batch sent"):
            paths.run(chunk, fuzz.START)
    finally:
        Balancer.receive_batch = original  # type: ignore[method-assign]


def test_a_frame_not_accounted_for_is_caught() -> None:
    b = Balancer(fuzz.campaign_config())
    rng = random.Random(2)
    for port, frame in fuzz.Mutator(rng, []).frames(fuzz.base_set(b, rng), 300):
        b.receive(port, frame, fuzz.START)
    assert fuzz.accounting_errors(b) == []
    b.frames_in += 1  # a frame that came in and left no trace
    assert len(fuzz.accounting_errors(b)) == 2


kernel_endpoints = pytest.mark.skipif(
    os.geteuid() != 0 or (shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG")),
    reason="needs root and clang: the endpoints' programs run in the kernel",
)
ENDPOINT_FRAMES = 4_000


@kernel_endpoints
def test_short_endpoint_campaign_both_datapaths_agree() -> None:
    """The endpoints' campaign (``make fuzz-endpoints``) in a short bounded run: every frame and packet through the
    kernel's programs and the Python endpoint of its role alike; the frames reached every outcome of both roles."""
    from mplslb.offload import endpoint_fuzz

    report = endpoint_fuzz.campaign(ENDPOINT_FRAMES, seed=5)
    assert report.frames == ENDPOINT_FRAMES and report.epochs == 2
    for role in ("server", "client"):
        assert report.delivered[role] > 100 and report.labelled[role] > 20, report.lines()
        assert len(report.drops[role]) > 10, report.drops[role]
    assert {"not_c2s_label", "no_session_label", "not_for_vip"} <= set(report.drops["server"])
    assert {"not_s2c_label", "mpls_truncated", "ipv4_bad_checksum"} <= set(report.drops["client"])
    assert "other differences 0" in report.lines()


@kernel_endpoints
def test_an_endpoint_datapath_that_differs_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python endpoint whose labelled replies carry a TTL one lower than the kernel's: the campaign stops at the
    first such frame, naming the seed, the frame and the role."""
    from mplslb.endpoint import ServerEndpoint
    from mplslb.offload import endpoint_fuzz

    original = ServerEndpoint.from_host

    def lowered(self: ServerEndpoint, packet: bytes | memoryview, now: float) -> bytes | None:
        frame = original(self, packet, now)
        return None if frame is None else frame[:17] + bytes([(frame[17] - 1) & 0xFF]) + frame[18:]

    monkeypatch.setattr(ServerEndpoint, "from_host", lowered)
    with pytest.raises(fuzz.Mismatch, match=r"seed 5, frame \d+, server egress"):
        endpoint_fuzz.campaign(ENDPOINT_FRAMES, seed=5)
