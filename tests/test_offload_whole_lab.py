"""The lab with the whole balancer datapath in the kernel: ``offload = "kernel"`` with ``offload_gso`` and
``offload_syn`` together, the configuration the bench measures keep-alive and ``Connection: close`` in (root; slow).

New sessions' SYNs are taken in the kernel under tickets, the servers' super-packets cross the balancer whole, the
downloads arrive intact, every session ends on its FINs, and what stays in the kernel is the tickets' entries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

import test_offload_gso_lab as gso_lab
from helpers import running_lab
from mplslb.lab import VIP4, Lab, LabSpec
from test_offload_lab import status, wait_for

pytestmark = gso_lab.pytestmark  # root, slow, nginx, curl, nsenter and clang, as the offload_gso lab's
ROOT = gso_lab.ROOT
BULK = 8 << 20  # octets of the file every server serves


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    spec = LabSpec(name=f"w{os.getpid() % 100000}", offload="kernel", offload_gso=True, offload_syn=True)
    with running_lab(spec, ROOT) as the_lab:
        yield the_lab


def idle(snap: dict[str, Any]) -> bool:
    """No session live, nor any ticket waiting to be made one (taken on the flow of a session the kernel saw close)."""
    return bool(snap["sessions"]["active"] == 0 and snap["offload"]["tickets"]["waiting"] == 0)


def test_tickets_and_super_packets_together(lab: Lab) -> None:
    data = os.urandom(BULK)
    for j in range(lab.spec.servers):
        (lab.dir / lab.server_name(j) / "www" / "bulk.bin").write_bytes(data)
    served = hashlib.sha256(data).hexdigest()
    first, csum_errors = status(lab), gso_lab.tcp_csum_errors(lab)
    assert first["datapath"] == "kernel (XDP, tc for super-packets)"
    tickets = first["offload"]["tickets"]
    assert tickets["outstanding"] > 0 and first["offload"]["entries"] == 2 * tickets["outstanding"]
    downloads = 0
    for header in ("", "-H 'Connection: close'"):  # the server's FIN after its last super-packet, or on its own
        for _ in range(lab.spec.servers):
            url = f"http://{VIP4}/bulk.bin"
            done = lab.run_in(lab.client_ns(0), ["sh", "-c", f"curl -sS -m 60 {header} {url} | sha256sum"], timeout=90)
            assert done.stdout.split()[:1] == [served], done.stderr
            downloads += 1
    wait_for(lambda: idle(status(lab)), 30, "the downloads' sessions to end")
    after = status(lab)
    started = after["sessions"]["started"] - first["sessions"]["started"]
    taken = after["offload"]["tickets"]["syn_taken"] - tickets["syn_taken"]
    assert started == downloads and taken >= downloads - 1, (started, taken, after["offload"]["tickets"])
    gso = after["offload"]["gso"]
    moved = gso["gso_forwarded"] - first["offload"]["gso"]["gso_forwarded"]
    assert moved >= downloads * BULK // 65536, gso  # super-packets of at most 64 kB, or the servers segmented
    assert not any(v for k, v in gso.items() if k not in ("gso_forwarded", "gso_fin_cleared", "gso_passed_unlabelled"))
    assert not {k: v for k, v in after["drops"].items() if k.startswith("gso_") or k == "csum_partial_unreadable"}
    # the daemon saw neither the SYNs nor the bulk: a few frames a session at most (the FINs it sends on)
    frames = after["frames"]["in"] - first["frames"]["in"]
    assert frames < 3 * downloads, frames
    assert gso_lab.tcp_csum_errors(lab) == csum_errors
    wait_for(
        lambda: (s := status(lab))["offload"]["entries"] == 2 * s["offload"]["tickets"]["outstanding"],
        15,
        "the sessions' labels to leave the kernel (the tickets' stay)",
    )
