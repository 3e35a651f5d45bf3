"""The lab with ``offload_gso`` (namespaces, daemon, agents, nginx, curl): the servers' super-packets cross the
balancer whole through its tc program and reach curl intact, and every session still ends on its FIN (root; slow).

The lab is :class:`mplslb.lab.Lab` with ``LabSpec(offload="kernel", offload_gso=True)``: the servers' agents run
``--super-packets`` and the daemon ``offload_gso = true``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import running_lab
from mplslb.lab import VIP4, Lab, LabSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, packet sockets and bpf(2)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
    pytest.mark.skipif(shutil.which("clang") is None, reason="clang is needed to build the BPF programs"),
]

ROOT = Path("/run/mplslb-test-labs")
BULK = 24 << 20  # octets of the file every server serves
CLOSES = 6  # downloads with Connection: close (the server's FIN after a burst of super-packets)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LabSpec(name=f"g{os.getpid() % 100000}", offload="kernel", offload_gso=True), ROOT) as the_lab:
        yield the_lab


def status(lab: Lab) -> dict[str, Any]:
    time.sleep(1.1)  # the daemon refreshes its snapshot every second
    reply: dict[str, Any] = lab.status()["status"]
    return reply


@pytest.fixture(scope="module")
def served(lab: Lab) -> str:
    """The same random file on every server; its sha256."""
    data = os.urandom(BULK)
    for j in range(lab.spec.servers):
        (lab.dir / lab.server_name(j) / "www" / "bulk.bin").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_super_packets_cross_the_balancer_whole_and_intact(lab: Lab, served: str) -> None:
    """One download per server over IPv4 and over IPv6: each hashes the same, the tc program switched the servers'
    super-packets (none dropped), and the daemon read nothing longer than one segment."""
    first = status(lab)
    assert first["offload"]["gso_frame_max"] == 1500 + 18 and first["datapath"] == "kernel (XDP, tc for super-packets)"
    for url in (f"http://{VIP4}/bulk.bin", "http://[fd00::100]/bulk.bin"):
        for _ in range(lab.spec.servers):
            done = lab.run_in(lab.client_ns(0), ["sh", "-c", f"curl -sS -m 60 {url} | sha256sum"], timeout=90)
            assert done.stdout.split()[:1] == [served], done.stderr
    after = status(lab)
    gso = after["offload"]["gso"]
    moved = gso["gso_forwarded"] - first["offload"]["gso"]["gso_forwarded"]
    # 6 x 24 MB in super-packets of at most 64 kB: at least 2,300 of them, or the servers segmented
    assert moved >= 6 * BULK // 65536, gso
    assert not any(v for k, v in gso.items() if k not in ("gso_forwarded", "gso_fin_cleared", "gso_passed_unlabelled"))
    assert not {k: v for k, v in after["drops"].items() if k.startswith("gso_") or k == "csum_partial_unreadable"}
    # the daemon saw each session's first frames and FINs, not its bulk
    frames = after["frames"]["in"] - first["frames"]["in"]
    assert frames < 40 * 2 * lab.spec.servers, frames


def test_every_session_ends_on_its_fin_with_super_packets(lab: Lab, served: str) -> None:
    """Downloads that close the connection after the response (the server's FIN may ride on its last super-packet,
    whose FIN the tc program clears and the server sends again alone): each hashes the same, and every session ends
    and leaves the kernel, as the FINs reached the session manager."""
    before, csum_errors = status(lab), tcp_csum_errors(lab)
    url = f"http://{VIP4}/bulk.bin"
    for _ in range(CLOSES):
        done = lab.run_in(
            lab.client_ns(0), ["sh", "-c", f"curl -sS -m 60 -H 'Connection: close' {url} | sha256sum"], timeout=90
        )
        assert done.stdout.split()[:1] == [served], done.stderr
    deadline = time.monotonic() + 20
    after = status(lab)
    while time.monotonic() < deadline and (after["sessions"]["active"] or after["offload"]["entries"]):
        after = status(lab)
    assert after["sessions"]["active"] == 0 and after["offload"]["entries"] == 0, after["sessions"]
    assert after["sessions"]["started"] - before["sessions"]["started"] == CLOSES
    assert after["offload"]["gso"]["gso_tcp_end"] == 0
    # the servers' FINs the daemon read and sent on carried partial checksums: it finished them
    assert tcp_csum_errors(lab) == csum_errors
    assert "csum_partial_unreadable" not in after["drops"]


def tcp_csum_errors(lab: Lab) -> int:
    """The client's TCP segments dropped for a bad checksum (InCsumErrors of /proc/net/snmp, its namespace)."""
    return lab.snmp(lab.client_ns(0), "Tcp")["InCsumErrors"]
