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
