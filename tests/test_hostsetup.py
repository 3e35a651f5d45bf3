"""The host changes an agent makes (mplslb.hostsetup): recorded as data, so a log written by one agent that keeps
its datapath (``--keep``) and read by the next undoes exactly what the first did, in a real namespace (root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from mplslb.drivers.netns import entered
from mplslb.hostsetup import POLICY_TABLE, HostChanges, setup_server_kernel

VIP4, VIP6 = "10.99.0.10", "fd00:99::10"


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"mlbhs{os.getpid() % 100000}"
    netns.create(name)
    try:
        with entered(name), IPRoute() as ipr:
            ipr.link("add", ifname="w0", kind="veth", peer={"ifname": "w1"})
            for ifname in ("lo", "w0", "w1"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        yield name
    finally:
        netns.remove(name)


def host_state() -> tuple[set[str], int, int, str]:
    """The addresses on lo, the rules to the policy table, its routes, w0's rp_filter."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        addresses = {m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(index=lo)}
        rules = sum(
            1 for family in (2, 10) for r in ipr.get_rules(family=family) if r.get_attr("FRA_TABLE") == POLICY_TABLE
        )
        routes = sum(len(ipr.get_routes(family=family, table=POLICY_TABLE)) for family in (2, 10))
    return addresses, rules, routes, Path("/proc/sys/net/ipv4/conf/w0/rp_filter").read_text().strip()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a namespace")
def test_a_saved_log_taken_over_undoes_what_the_first_agent_did(namespace: str, tmp_path: Path) -> None:
    log = tmp_path / "agent.host.json"
    with entered(namespace):
        before = host_state()
        first = HostChanges()
        setup_server_kernel("w0", [VIP4, VIP6], first)
        during = host_state()
        assert {VIP4, VIP6} <= during[0] and during[1] == 2 and during[2] == 2 and during[3] == "2"
        first.save(log, role="server", vips=[VIP4, VIP6])
        del first  # the agent exits keeping the host as it is
        assert host_state() == during
        taken, about = HostChanges.load(log)
        assert about == {"role": "server", "vips": [VIP4, VIP6]} and len(taken) > 0
        assert taken.undo() == []
        assert host_state() == before


def test_a_log_that_is_not_one_is_refused_with_its_file(tmp_path: Path) -> None:
    log = tmp_path / "agent.host.json"
    log.write_text("{not json")
    with pytest.raises(ValueError, match=str(log)):
        HostChanges.load(log)
    log.write_text('{"about": {}, "undo": [["address", "format_disk", []]]}')
    with pytest.raises(ValueError, match="format_disk"):
        HostChanges.load(log)
    with pytest.raises(ValueError, match="no undo step"):
        HostChanges().add("something", "format_disk")


def test_keep_is_for_the_kernel_datapath_over_ethernet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from mplslb.agents import AgentConfig, choose_datapath
    from mplslb.offload import endpoint
    from mplslb.offload.bpf import PIN_ROOT

    common: dict[str, object] = {"role": "server", "interface": "eth0", "vips": ("10.0.0.100",), "keep": True}
    with pytest.raises(ValueError, match="--keep"):
        AgentConfig(**common, datapath="tun", kept="agent-server-eth0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--keep"):
        AgentConfig(**common, balancer="10.80.0.1", kept="agent-server-eth0")  # type: ignore[arg-type]
    kept = AgentConfig(**common, kept="agent-server-ns1-eth0")  # type: ignore[arg-type]
    assert kept.pins() == PIN_ROOT / "agent-server-ns1-eth0"
    assert kept.host_file().name == "agent-server-ns1-eth0.host.json"
    monkeypatch.setattr(endpoint, "unavailable_reason", lambda: "no clang")
    caplog.set_level(logging.WARNING, "mplslb")
    assert choose_datapath(kept) == "tun" and "event=keep_ignored" in caplog.text


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a namespace")
def test_a_tun_agent_lets_a_kept_kernel_datapath_go(namespace: str, tmp_path: Path) -> None:
    """A server agent on the kernel datapath with ``--keep`` exits leaving its programs attached, its pins and its
    host log; an agent of the same name on the tun datapath puts all of it back before it starts (the kept XDP
    program would otherwise take the labelled frames before the TUN agent), and leaves the host as it found it."""
    from mplslb.agents import Agent, AgentConfig, KernelAgent
    from mplslb.offload import bpf
    from mplslb.offload.endpoint import unavailable_reason

    if unavailable_reason():
        pytest.skip(f"the kernel datapath is not available here: {unavailable_reason()}")
    common: dict[str, object] = {
        "role": "server",
        "interface": "w0",
        "vips": (VIP4, VIP6),
        "kept": f"agent-server-{namespace}-w0",
    }
    kernel_config = AgentConfig(**common, datapath="kernel", keep=True)  # type: ignore[arg-type]
    with entered(namespace):
        before = host_state()
        ifindex = socket.if_nametoindex("w0")
        first = KernelAgent(kernel_config)
        assert first.close() == []  # kept: nothing put back
        assert bpf.xdp_state(ifindex)[1] != 0 and kernel_config.pins().is_dir() and kernel_config.host_file().exists()
        assert host_state() != before
        tun = Agent(AgentConfig(**common, datapath="tun"))  # type: ignore[arg-type]
        try:
            assert bpf.xdp_state(ifindex)[1] == 0, "the kept XDP program is still attached"
            assert not kernel_config.pins().exists() and not kernel_config.host_file().exists()
        finally:
            assert tun.close() == []
        assert host_state() == before


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_the_first_to_pin_mounts_the_bpf_filesystem_where_nothing_is_mounted() -> None:
    """A host where nothing mounted the BPF filesystem (a server host runs no daemon): the first agent or daemon to pin
    mounts it. Run in a mount namespace of its own with /sys/fs/bpf unmounted there, so the host's stays."""
    script = (
        "from mplslb.offload.bpf import BPFFS, ensure_bpffs\n"
        "def mounted():\n"
        "    return any(line.split()[1:3] == [str(BPFFS), 'bpf'] for line in open('/proc/self/mounts'))\n"
        "assert not mounted(), 'still mounted'\n"
        "ensure_bpffs(BPFFS / 'mplslb' / 'probe')\n"
        "assert mounted() and (BPFFS / 'mplslb' / 'probe').is_dir()\n"
        "print('mounted')\n"
    )
    unmount = (
        'while grep -q " /sys/fs/bpf bpf " /proc/self/mounts; do umount /sys/fs/bpf || exit 3; done; exec "$0" -c "$1"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", unmount, sys.executable, script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "mounted", done.stderr
