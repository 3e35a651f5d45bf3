"""What the endpoint agents change on their host, with pyroute2, and how they put it back.

Server side (claims 8, 12): the virtual IP lives on ``lo`` (so the host's programs accept packets to it and answer
from it), and a policy rule sends everything *from* the virtual IP to a table whose default route is the agent's TUN
device: replies leave through the agent, which labels them L + 1. Packets the agent writes into the TUN reach the
host as if they came from the client; the reverse-path check passes because the rule also answers "how would we
reach the client from the VIP": through the TUN.

Client side: a host route to each virtual IP through the TUN device, with the host's own address as the source, so
ordinary programs (curl, wrk) send to the VIP through the agent. Refusals (a TCP RST or an ICMP error from the VIP)
arrive unlabelled on the real interface, so that interface's reverse-path filter is set to loose.

The balancer's own host gets blackhole routes for the virtual IPs (:func:`setup_balancer`): the frames to them are
the daemon's, read from its packet sockets, and the host's stack must stay silent about them.

Every change is recorded in a :class:`HostChanges` and undone in reverse order by :meth:`HostChanges.undo`, which
never raises (an agent stopping on a signal must leave the host as it found it). Each record is data (what, the name
of the step that undoes it, its arguments), so an agent that leaves its host set up for the next one
(``--keep``) writes the records to a file (:meth:`HostChanges.save`) and the next agent takes them over
(:meth:`HostChanges.load`), to undo them when it is the one that puts the host back.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

POLICY_TABLE = 100
POLICY_PRIORITY = 100
IFA_F_NODAD = 0x02
_SYSCTL = Path("/proc/sys/net")


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _host_len(address: str) -> int:
    return 128 if ipaddress.ip_address(address).version == 6 else 32


class HostChanges:
    """A log of changes made to the host, undone in reverse order: each a step of :data:`UNDO_STEPS` by name, with
    its arguments (plain values, so the log can be written to a file and taken over)."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, str, list[Any]]] = []

    def add(self, what: str, step: str, *args: Any) -> None:
        if step not in UNDO_STEPS:
            raise ValueError(f"no undo step named {step!r}")
        self._undo.append((what, step, list(args)))

    def __len__(self) -> int:
        return len(self._undo)

    def undo(self) -> list[str]:
        """Undo everything; returns what could not be undone (already gone is fine)."""
        failed = []
        while self._undo:
            what, step, args = self._undo.pop()
            try:
                UNDO_STEPS[step](*args)
            except Exception as exc:  # cleanup goes on whatever one step says
                failed.append(f"{what}: {exc}")
        return failed

    def save(self, path: Path, **about: Any) -> None:
        """Write the log (and ``about``: what it was made for) to ``path``, atomically; the log stays here."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"about": about, "undo": self._undo}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> tuple[HostChanges, dict[str, Any]]:
        """The log :meth:`save` wrote and what it was made for; ``ValueError`` when it cannot be read as one."""
        try:
            data = json.loads(path.read_text())
            changes = cls()
            for what, step, args in data["undo"]:
                changes.add(str(what), str(step), *args)
            about = dict(data["about"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a log of host changes ({exc})") from None
        return changes, about


def set_sysctl(changes: HostChanges, path: str, value: str) -> None:
    """Write ``net/<path>`` (e.g. ``ipv4/conf/eth0/rp_filter``), remembering the old value."""
    target = _SYSCTL / path
    old = target.read_text().strip()
    if old == value:
        return
    target.write_text(value)
    changes.add(f"sysctl {path}", "sysctl", path, old)


def _write_sysctl(path: str, value: str) -> None:
    (_SYSCTL / path).write_text(value)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(f"no interface named {ifname!r}")
    return int(found[0])


def interface_addresses(ifname: str) -> dict[int, str]:
    """The first global address of each family on ``ifname``: {4: "...", 6: "..."}."""
    out: dict[int, str] = {}
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        for msg in ipr.get_addr(index=index):
            address = msg.get_attr("IFA_ADDRESS")
            version = ipaddress.ip_address(address).version
            if version == 6 and ipaddress.ip_address(address).is_link_local:
                continue
            out.setdefault(version, address)
    return out


def interface_mac(ifname: str) -> bytes:
    with IPRoute() as ipr:
        link = ipr.get_links(_index(ipr, ifname))[0]
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def _vips_on_lo(ipr: IPRoute, lo: int, vips: list[str], changes: HostChanges) -> None:
    """Each VIP on ``lo`` (index ``lo``): the host's programs accept packets to it and answer from it."""
    for vip in vips:
        family, plen = _family(vip), _host_len(vip)
        flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
        ipr.addr("add", index=lo, address=vip, prefixlen=plen, flags=flags)
        changes.add(f"address {vip} on lo", "address", lo, vip, plen)


def _rules_from_vips(ipr: IPRoute, vips: list[str], changes: HostChanges) -> None:
    """A rule sending everything from each VIP to the policy table, whose default route the caller sets."""
    for vip in vips:
        family, plen = _family(vip), _host_len(vip)
        ipr.rule("add", family=family, src=vip, src_len=plen, table=POLICY_TABLE, priority=POLICY_PRIORITY)
        changes.add(f"rule from {vip}", "rule", vip, plen, family)


def setup_server(tun: str, vips: list[str], changes: HostChanges) -> None:
    """VIPs on lo; replies from a VIP routed into ``tun``."""
    with IPRoute() as ipr:
        lo = _index(ipr, "lo")
        tun_index = _index(ipr, tun)
        _vips_on_lo(ipr, lo, vips, changes)
        for family in sorted({_family(v) for v in vips}):
            default = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
            ipr.route("add", dst=default, oif=tun_index, table=POLICY_TABLE, family=family)
            changes.add(f"default route table {POLICY_TABLE}", "route", default, tun_index, family)
        _rules_from_vips(ipr, vips, changes)
    set_sysctl(changes, f"ipv4/conf/{tun}/rp_filter", "0")


def setup_client(tun: str, interface: str, vips: list[str], changes: HostChanges) -> None:
    """A route to each VIP through ``tun``, sourced from ``interface``'s address; loose reverse-path filter."""
    sources = interface_addresses(interface)
    with IPRoute() as ipr:
        tun_index = _index(ipr, tun)
        for vip in vips:
            version = ipaddress.ip_address(vip).version
            family, plen = _family(vip), _host_len(vip)
            source = sources.get(version)
            if source is None:
                raise OSError(f"{interface} has no IPv{version} address to send to {vip} from")
            ipr.route("add", dst=f"{vip}/{plen}", oif=tun_index, prefsrc=source, family=family)
            changes.add(f"route to {vip}", "route", f"{vip}/{plen}", tun_index, family, None)
    set_sysctl(changes, f"ipv4/conf/{interface}/rp_filter", "2")
    set_sysctl(changes, f"ipv4/conf/{tun}/rp_filter", "0")


def setup_balancer(vips: list[str], changes: HostChanges) -> None:
    """Blackhole routes for the VIPs on the balancer's own host: frames to a VIP are the daemon's to handle, and the
    host's stack must neither forward them nor answer them (IPv6 would send "no route" unreachables that abort the
    client's connection)."""
    with IPRoute() as ipr:
        for vip in vips:
            family, plen = _family(vip), _host_len(vip)
            try:
                ipr.route("add", dst=f"{vip}/{plen}", type="blackhole", family=family)
            except Exception as exc:  # an existing route: leave it, say nothing is ours to undo
                if "exists" not in str(exc).lower() and getattr(exc, "code", None) != 17:
                    raise
                continue
            changes.add(f"blackhole {vip}", "blackhole", f"{vip}/{plen}", family)


def blackhole_del(dst: str, family: int) -> None:
    with IPRoute() as ipr, suppress(Exception):
        ipr.route("del", dst=dst, type="blackhole", family=family)


def ipr_addr_del(index: int, address: str, prefixlen: int) -> None:
    with IPRoute() as ipr, suppress(Exception):
        ipr.addr("del", index=index, address=address, prefixlen=prefixlen)


def route_del(dst: str, oif: int, family: int, table: int | None = POLICY_TABLE) -> None:
    with IPRoute() as ipr, suppress(Exception):
        if table is None:
            ipr.route("del", dst=dst, oif=oif, family=family)
        else:
            ipr.route("del", dst=dst, oif=oif, family=family, table=table)


def rule_del(src: str, src_len: int, family: int) -> None:
    with IPRoute() as ipr, suppress(Exception):
        ipr.rule("del", family=family, src=src, src_len=src_len, table=POLICY_TABLE, priority=POLICY_PRIORITY)


# -- the kernel datapath -----------------------------------------------------------------------------------------
#: The gateway the kernel datapath routes virtual-IP traffic to: an address that exists nowhere, reachable "onlink"
#: on the wire interface, with a permanent neighbour entry, so the host's stack hands such packets to the wire
#: interface (where the egress program labels them) without ever resolving it.
FAKE_GATEWAY = {4: "169.254.77.1", 6: "fe80::4d:1"}
#: Route MTU of virtual-IP traffic in the kernel datapath: the label takes 4 bytes of the wire's 1500, and TCP's
#: MSS follows the route MTU on both ends.
KERNEL_ROUTE_MTU = 1496
#: One segment per skb on the wire interface, only where the interface would still offload TCP segmentation with
#: its TX checksumming off: a labelled super-packet must be segmented by the stack, after the egress program.
GSO_MAX_SEGS = 1


def _neigh_add(ipr: IPRoute, index: int, gateway: str, mac: str, changes: HostChanges) -> None:
    family = _family(gateway)
    ipr.neigh("replace", dst=gateway, lladdr=mac, ifindex=index, state=0x80, family=family)  # NUD_PERMANENT
    changes.add(f"neighbour {gateway}", "neighbour", index, gateway, family)


def neigh_del(index: int, gateway: str, family: int) -> None:
    with IPRoute() as ipr, suppress(Exception):
        ipr.neigh("del", dst=gateway, ifindex=index, family=family)


def set_gso_max_segs(changes: HostChanges, interface: str, segs: int) -> None:
    """Cap the segments per skb the stack builds for ``interface``, remembering the old cap."""
    with IPRoute() as ipr:
        index = _index(ipr, interface)
        old = ipr.get_links(index)[0].get_attr("IFLA_GSO_MAX_SEGS")
        if old == segs:
            return
        ipr.link("set", index=index, gso_max_segs=segs)
    changes.add(f"gso_max_segs of {interface}", "gso_max_segs", index, old)


def _set_gso_segs(index: int, segs: int) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=index, gso_max_segs=segs)


def prepare_wire(interface: str, changes: HostChanges, *, super_packets: bool = False) -> None:
    """What the wire interface needs under the kernel datapath: no partial checksums (a frame the balancer reads
    through a packet socket and sends on must carry its final checksum), and so no segmentation offload: the stack
    segments a super-packet after the egress program has labelled it whole (each segment carries the label; the
    kernel drops TCP and UDP segmentation offload with TX checksumming). Should the interface keep TCP segmentation
    offload all the same, the stack is held to one segment per skb instead.

    With ``super_packets`` (a balancer whose kernel offload takes them, ``offload_gso``) it is the other way round:
    TX checksumming on, so the interface offers segmentation offload and a labelled super-packet leaves whole, to be
    segmented, if at all, past the balancer; the balancer's daemon finishes the partial checksums of the frames it
    reads itself."""
    if super_packets:
        if set_tx_checksum(interface, True):
            changes.add(f"tx checksumming of {interface}", "tx_checksum", interface, False)
        return
    if set_tx_checksum(interface, False):
        changes.add(f"tx checksumming of {interface}", "tx_checksum", interface, True)
    if _ethtool_value(interface, ETHTOOL_GTSO):
        set_gso_max_segs(changes, interface, GSO_MAX_SEGS)


# <linux/ethtool.h>: the legacy get/set commands of one value (struct ethtool_value)
SIOCETHTOOL, ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM, ETHTOOL_GTSO = 0x8946, 0x16, 0x17, 0x1E


def _ethtool_value(interface: str, cmd: int, value: int | None = None) -> int:
    """Run the ethtool command ``cmd`` on ``interface`` with ``value`` (a get: None); returns the value after it."""
    import array
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        buf = array.array("I", [cmd, 0 if value is None else value])
        addr, _ = buf.buffer_info()
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, struct.pack("16sP", interface.encode(), addr))
        return buf[1]


def set_tx_checksum(interface: str, on: bool) -> bool:
    """Turn TX checksum offload of ``interface`` on or off (ETHTOOL_STXCSUM); returns whether it changed."""
    if bool(_ethtool_value(interface, ETHTOOL_GTXCSUM)) == on:
        return False
    _ethtool_value(interface, ETHTOOL_STXCSUM, int(on))
    return True


def setup_server_kernel(interface: str, vips: list[str], changes: HostChanges, *, super_packets: bool = False) -> None:
    """VIPs on lo; replies from a VIP routed out of ``interface`` (route MTU for the label) to a fake gateway whose
    MAC the egress program replaces with the flow's balancer port."""
    own_mac = interface_mac(interface).hex(":")
    with IPRoute() as ipr:
        lo, wire = _index(ipr, "lo"), _index(ipr, interface)
        _vips_on_lo(ipr, lo, vips, changes)
        for version in sorted({ipaddress.ip_address(v).version for v in vips}):
            gateway, family = FAKE_GATEWAY[version], socket.AF_INET6 if version == 6 else socket.AF_INET
            _neigh_add(ipr, wire, gateway, own_mac, changes)
            default = "::/0" if version == 6 else "0.0.0.0/0"
            ipr.route("add", dst=default, gateway=gateway, oif=wire, table=POLICY_TABLE, family=family,
                      flags=0x4, metrics={"mtu": KERNEL_ROUTE_MTU})  # fmt: skip  # RTNH_F_ONLINK
            changes.add(f"default route table {POLICY_TABLE}", "route", default, wire, family)
        _rules_from_vips(ipr, vips, changes)
    set_sysctl(changes, f"ipv4/conf/{interface}/rp_filter", "2")
    prepare_wire(interface, changes, super_packets=super_packets)


def setup_client_kernel(interface: str, vips: list[str], gateway_mac: bytes, changes: HostChanges) -> None:
    """A route to each VIP out of ``interface`` to a fake gateway with the balancer's MAC, sourced from the
    interface's address, with the route MTU that leaves room for the label."""
    sources = interface_addresses(interface)
    with IPRoute() as ipr:
        wire = _index(ipr, interface)
        for version in sorted({ipaddress.ip_address(v).version for v in vips}):
            _neigh_add(ipr, wire, FAKE_GATEWAY[version], gateway_mac.hex(":"), changes)
        for vip in vips:
            version = ipaddress.ip_address(vip).version
            family, plen = _family(vip), _host_len(vip)
            source = sources.get(version)
            if source is None:
                raise OSError(f"{interface} has no IPv{version} address to send to {vip} from")
            ipr.route("add", dst=f"{vip}/{plen}", gateway=FAKE_GATEWAY[version], oif=wire, prefsrc=source,
                      family=family, flags=0x4, metrics={"mtu": KERNEL_ROUTE_MTU})  # fmt: skip
            changes.add(f"route to {vip}", "route", f"{vip}/{plen}", wire, family, None)
    set_sysctl(changes, f"ipv4/conf/{interface}/rp_filter", "2")
    prepare_wire(interface, changes)


#: The steps that undo a change, by the name :meth:`HostChanges.add` records.
UNDO_STEPS: dict[str, Callable[..., object]] = {
    "sysctl": _write_sysctl,
    "address": ipr_addr_del,
    "rule": rule_del,
    "route": route_del,
    "blackhole": blackhole_del,
    "neighbour": neigh_del,
    "gso_max_segs": _set_gso_segs,
    "tx_checksum": set_tx_checksum,
}
