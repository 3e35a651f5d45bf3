"""The whole lab (namespaces, daemon, agents, nginx, curl, wrk) with ``offload = "kernel"``: everything works as
without the offload, and established sessions' frames are switched by the kernel (root; slow).

The lab is :class:`mplslb.lab.Lab` with ``LabSpec(offload="kernel")``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import running_lab
from mplslb.lab import Lab, LabSpec, split

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN, packet sockets and bpf(2)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
    pytest.mark.skipif(shutil.which("clang") is None, reason="clang is needed to build the XDP program"),
]

ROOT = Path("/run/mplslb-test-labs")


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LabSpec(name=f"o{os.getpid() % 100000}", offload="kernel"), ROOT) as the_lab:
        yield the_lab


def status(lab: Lab) -> dict[str, Any]:
    time.sleep(1.1)  # the daemon refreshes its snapshot every second
    reply: dict[str, Any] = lab.status()["status"]
    return reply


def test_curl_through_the_offloaded_balancer(lab: Lab) -> None:
    first = status(lab)
    assert first["offload"]["kind"] == "kernel" and first["datapath"] == "kernel (XDP)"
    assert first["fast_path_build"] == "native"  # frames the program passes up are switched in C
    assert set(first["offload"]["attached"]) == {"lc0p0", "lc1p0", "lc1p1"}
    bodies = lab.curl(0, 60) + lab.curl(1, 60, v6=True)
    assert all(bodies), f"failed requests: {bodies.count('')}"
    assert set(split(bodies)) == {"s1", "s2", "s3"}
    # Every session ended on its FINs (which the kernel recorded) and its labels left the kernel.
    wait_for(lambda: status(lab)["offload"]["entries"] == 0, 15, "the sessions' labels to leave the kernel")
    after = status(lab)
    assert after["sessions"]["active"] == 0
    assert after["offload"]["deletes"] == after["offload"]["writes"] > 0
    # Of each session the daemon sees the SYN and the request (L7 analysis counts its Host): the kernel forwards the
    # rest, records the response-time measurement and the two FINs (userspace measuring saw 8 or more, the kernel's
    # measurement alone 4).
    started = after["sessions"]["started"] - first["sessions"]["started"]
    frames = after["frames"]["in"] - first["frames"]["in"]
    assert started == 120 and frames < 3 * started, (frames, started)
    assert after["offload"]["records"] >= started
    assert after["offload"]["fins"] - first["offload"]["fins"] > started, (after["offload"], started)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_keep_alive_traffic_is_switched_by_the_kernel(lab: Lab) -> None:
    """wrk keeps its connections open: after each session's first exchange (which the balancer times in
    userspace) its frames go through the kernel and never reach the daemon."""
    before = status(lab)
    figures = lab.wrk(0, seconds=3, connections=4)
    assert figures.get("requests", 0) > 100 and figures["non_2xx"] == 0 and figures["socket_errors"] == 0
    after = status(lab)
    kernel = after["offload"]["kernel_packets"] - before["offload"]["kernel_packets"]
    userspace = after["frames"]["in"] - before["frames"]["in"]
    # Each request is at least two frames (request, response); most of them went through the kernel.
    assert kernel > figures["requests"], (kernel, userspace, figures)
    assert kernel > 4 * userspace, (kernel, userspace, figures)
    wait_for(lambda: status(lab)["offload"]["entries"] == 0, 15, "wrk's sessions to end")


def test_label_pairs_are_reused_before_their_quarantines_end_when_none_is_free() -> None:
    """24 label pairs, each quarantined for 60 s while others are free and reusable after half a second when none
    is: 72 sessions one after the other, about five a second, all complete through the kernel offload, the pairs
    gone round three times (a pair comes back no sooner than its FIN is polled, the close's linger of 1 s has passed
    and then the minimum; at this pace that leaves room), none refused for want of one."""
    spec = LabSpec(name=f"r{os.getpid() % 100000}", offload="kernel", label_pairs=24, quarantine_min=0.5)
    with running_lab(spec, ROOT) as lab:
        failed = 0
        for _ in range(72):
            failed += lab.curl(0, 1) == [""]
            time.sleep(0.15)
        snap = status(lab)
        labels = snap["labels"]
        assert labels["capacity"] == 24 and labels["allocated_total"] >= 72, labels
        assert failed == 0 and snap["sessions"]["refused"].get("labels_exhausted", 0) == 0, (failed, snap["sessions"])
        assert labels["reused_early"] >= 72 - 2 * 24, labels


@pytest.fixture(scope="module")
def syn_lab() -> Iterator[Lab]:
    spec = LabSpec(name=f"q{os.getpid() % 100000}", offload="kernel", offload_syn=True)
    with running_lab(spec, ROOT) as the_lab:
        yield the_lab


def test_close_mode_sessions_start_in_the_kernel_with_offload_syn(syn_lab: Lab) -> None:
    """With ``offload_syn`` new sessions' SYNs are taken in the kernel under tickets: ``Connection: close`` requests
    (curl, IPv4 and IPv6; wrk) all complete, over every server, and the daemon receives almost no frame per session
    (a SYN goes up only when its flow is a lingering session's or no ticket is left)."""
    first = status(syn_lab)
    tickets = first["offload"]["tickets"]
    assert tickets["outstanding"] > 0 and first["offload"]["entries"] == 2 * tickets["outstanding"]
    bodies = syn_lab.curl(0, 60) + syn_lab.curl(1, 60, v6=True)
    assert all(bodies), f"failed requests: {bodies.count('')}"
    assert set(split(bodies)) == {"s1", "s2", "s3"}
    after = status(syn_lab)
    started = after["sessions"]["started"] - first["sessions"]["started"]
    frames = after["frames"]["in"] - first["frames"]["in"]
    taken = after["offload"]["tickets"]["syn_taken"] - tickets["syn_taken"]
    assert started == 120 and taken >= 110 and frames <= started // 10, (started, taken, frames, after["offload"])
    assert after["offload"]["tickets"]["taken"] == after["offload"]["tickets"]["syn_taken"]
    if shutil.which("wrk") is not None:
        figures = syn_lab.wrk(0, seconds=3, connections=16, headers=("Connection: close",))
        assert figures.get("requests", 0) > 100 and figures["non_2xx"] == 0 and figures["socket_errors"] == 0
        # a ticket taken on the flow of a session the kernel saw close is made a session after the next poll
        wait_for(lambda: status(syn_lab)["offload"]["tickets"]["waiting"] == 0, 10, "the waiting tickets")
        done = status(syn_lab)
        sessions = done["sessions"]["started"] - after["sessions"]["started"]
        frames = done["frames"]["in"] - after["frames"]["in"]
        assert sessions >= figures["requests"] and frames < sessions // 2, (sessions, frames, done["offload"])
    # Every session ended on its FINs: what stays in the kernel is the tickets' entries.
    try:
        wait_for(lambda: status(syn_lab)["sessions"]["active"] == 0, 30, "the sessions to end")
    except AssertionError:
        snap = status(syn_lab)
        raise AssertionError(str((snap["sessions"], snap["offload"], snap["drops"], snap.get("refused")))) from None
    last = status(syn_lab)
    assert last["offload"]["entries"] == 2 * last["offload"]["tickets"]["outstanding"]
