"""The node's BGP speaker with a real BIRD 2 (root: it runs in a namespace of its own): it starts withdrawn,
announces while the loop beats healthy, withdraws when told why or when the beats stop, and takes BIRD with it
when closed."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from mplslb.bgp import BgpConfig, BgpSpeaker, BirdControl, parse_protocols
from mplslb.drivers.netns import entered

BIRD = shutil.which("bird") or ("/usr/sbin/bird" if Path("/usr/sbin/bird").exists() else None)
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace"),
    pytest.mark.skipif(BIRD is None, reason="BIRD 2 (Debian bird2) is needed; make test installs it"),
]
WAIT = 10.0  # seconds any change may take, at most


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"bgpt{os.getpid() % 100000}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.addr("add", index=ns.link_lookup(ifname="lo")[0], address="10.66.0.1", prefixlen=32)
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def speaker(namespace: str, tmp_path: Path) -> Iterator[BgpSpeaker]:
    config = BgpConfig(
        local_as=65001,
        router_id="10.66.0.1",
        neighbors=("10.66.0.2",),  # nobody: the session never comes up, the static protocol is what is watched
        neighbor_as=65000,
        announce=("10.0.0.100/32", "10.80.0.1/32"),
        loop_timeout=1.0,
        state_dir=str(tmp_path / "bgp"),
    )
    with entered(namespace):
        the_speaker = BgpSpeaker(config)
    try:
        yield the_speaker
    finally:
        the_speaker.close()


def static_state(speaker: BgpSpeaker) -> str:
    control = BirdControl(speaker.socket_path)
    try:
        (announce,) = [p for p in parse_protocols(control.command("show protocols")) if p.name == "announce4"]
    finally:
        control.close()
    return announce.state


def wait_until(speaker: BgpSpeaker, state: str, *, beating: tuple[bool, str] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        if beating is not None:
            speaker.beat(*beating)
        try:
            if static_state(speaker) == state:
                return
        except OSError:
            pass  # BIRD still starting
        if time.monotonic() > deadline:
            raise AssertionError(f"announce4 not {state} after {WAIT} s")
        time.sleep(0.05)


def test_announces_only_while_the_loop_beats_healthy(speaker: BgpSpeaker) -> None:
    wait_until(speaker, "down")  # started withdrawn
    wait_until(speaker, "up", beating=(True, ""))
    wait_until(speaker, "down", beating=(False, "no_server_up"))
    deadline = time.monotonic() + WAIT
    while speaker.status().get("reason") != "no_server_up" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert speaker.status()["reason"] == "no_server_up" and not speaker.status()["announcing"]
    wait_until(speaker, "up", beating=(True, ""))
    wait_until(speaker, "down")  # no more beats: the loop stalled
    while speaker.status().get("reason") != "loop_stalled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert speaker.status()["reason"] == "loop_stalled"
    row = speaker.status()["peers"][0]
    assert row["neighbor"] == "10.66.0.2" and not row["established"] and row["announced"] == []


def test_close_withdraws_and_stops_bird(speaker: BgpSpeaker) -> None:
    wait_until(speaker, "up", beating=(True, ""))
    proc = speaker.proc
    assert proc is not None
    speaker.close()
    assert proc.poll() is not None
