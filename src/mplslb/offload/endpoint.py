"""The endpoints' label datapath in the kernel: :mod:`mplslb.endpoint`'s behaviour as BPF programs on the wire
interface, so the agents move no packets through Python.

Theory of operation
-------------------
``mplslb_endpoint.c`` holds four programs; a :class:`KernelEndpoint` loads the two of its role and attaches them to
the wire interface with BPF links: generic XDP on ingress (``xdp/server`` or ``xdp/client``: take the label stack
off, remember the flow, hand the IP packet to the host's stack) and tcx egress (``tc/server`` or ``tc/client``: push
the flow's label and address the frame to the balancer). The links, the programs and the maps live as long as this
object's file descriptors: an agent that dies, even by SIGKILL, leaves nothing attached. Unless they are pinned
(``pins``, the agent's ``--keep``): then the maps, the programs and the links are pinned there as they are attached,
so they stay attached and go on labelling while no agent runs, and the next :meth:`KernelEndpoint.attach` with the
same pins takes them over when they fit (the maps' layout, named by :data:`ENDPOINT_FP`, sizes and types; the links
on the same interface, running the pinned programs): the flows and counters go on, this agent's VIPs and addresses
are written into the kept maps, and a program built otherwise is swapped in through the links. Pins that do not fit
are let go and everything is attached afresh.

The maps (created here, their fds patched into the programs):

* ``flows``: LRU hash, ``struct flow_key`` (as the local host sends the flow) -> ``struct flow`` (label, peer MAC,
  CLOCK_MONOTONIC ns of last use). The kernel bounds it (least recently used entries go first when it is full);
  :meth:`expire` forgets flows idle for ``flow_timeout`` as :meth:`mplslb.endpoint.Endpoint.on_timer` does.
* ``vips``: the virtual IPs (server: replies from them are labelled; client: packets to them are).
* ``config``: this host's MAC, the balancer's MAC (client), the TTL of the pushed entry.
* ``counters``: per CPU, one ``__u64`` per name of :data:`~mplslb.switching.layout.ENDPOINT_COUNTERS` (summed when
  read).

What the kernel cannot do the way the Python endpoint does (TCP option checks, more than
:data:`~mplslb.switching.layout.IPV6_EXT_MAX` IPv6 extension headers, 802.1Q tags) is listed in
docs/architecture.md; :mod:`mplslb.offload.endpoint_fuzz` compares the two frame by frame (tests/test_endpoint_kernel.py
and ``make fuzz-endpoints``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mplslb.endpoint import ENDPOINT_FLOW_TIMEOUT
from mplslb.flow import FlowKey
from mplslb.offload import bpf
from mplslb.offload.build import BuildError, build_object
from mplslb.state import fingerprint
from mplslb.switching.layout import (
    ENDPOINT_CONFIG,
    ENDPOINT_CONFIG_FIELDS,
    ENDPOINT_COUNTERS,
    ENDPOINT_TTL,
    FAMILY_V4,
    FAMILY_V6,
    FLOW,
    FLOW_FIELDS,
    FLOW_KEY,
    FLOW_KEY_FIELDS,
    IPV4_ADDR_LEN,
    IPV6_ADDR_LEN,
    VIP_KEY,
    VIP_KEY_FIELDS,
    struct_offsets,
)

SOURCE = Path(__file__).with_name("mplslb_endpoint.c")
ROLES = ("server", "client")
MAX_FLOWS = 65536
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
log = logging.getLogger("mplslb.agent")
#: The fingerprint of what the maps hold: their pins carry it, so a kept map is taken over only by a build that reads
#: and writes it the same way.
_LAYOUT = [FLOW_KEY_FIELDS, FLOW_FIELDS, VIP_KEY_FIELDS, ENDPOINT_CONFIG_FIELDS, ENDPOINT_COUNTERS]
ENDPOINT_FP = fingerprint(_LAYOUT)[:12]
#: The maps, by their symbol in the programs, in the order :class:`KernelEndpoint` makes them.
MAP_SYMBOLS = ("flows", "vips", "config", "counters", "scratch")
#: A flow's last use, as numpy reads it from a batch of the flow map's values.
_LAST_USE = np.dtype({"names": ["last_ns"], "formats": ["=u8"], "offsets": [struct_offsets(FLOW_FIELDS)["last_ns"]],
                      "itemsize": FLOW.size})  # fmt: skip


class KernelDatapathError(RuntimeError):
    """The kernel datapath cannot be set up here (no clang, no bpf(2), a refused program...)."""


def unavailable_reason() -> str:
    """Why the kernel datapath cannot run on this host, or "" when it can (root, bpf(2), clang)."""
    if not bpf.available():
        return "bpf(2) is not known on this architecture"
    if os.geteuid() != 0:
        return "loading BPF programs needs root"
    try:
        build_object(SOURCE)
    except BuildError as exc:
        return str(exc).splitlines()[0]
    return ""


def flow_key_of(raw: bytes) -> FlowKey:
    proto, family, sport, dport, _, src, dst = FLOW_KEY.unpack(raw)
    n = IPV4_ADDR_LEN if family == FAMILY_V4 else IPV6_ADDR_LEN
    return FlowKey(proto, src[:n], sport, dst[:n], dport)


class KernelEndpoint:
    """The kernel datapath of one endpoint: programs, maps and (once :meth:`attach` ran) the links on the wire."""

    def __init__(
        self,
        role: str,
        *,
        mac: bytes,
        vips: Iterable[str | bytes],
        gateway_mac: bytes = b"",
        flow_timeout: float = ENDPOINT_FLOW_TIMEOUT,
        ttl: int = ENDPOINT_TTL,
        max_flows: int = MAX_FLOWS,
        fallback: float = 0.0,
        pins: Path | None = None,
    ) -> None:
        """``pins``: pin the maps, programs and links there when attached, and take over what a previous endpoint
        pinned there (see the module docstring)."""
        if role not in ROLES:
            raise ValueError("role must be server or client")
        if len(mac) != 6 or (role == "client" and len(gateway_mac) != 6):
            raise ValueError("MAC addresses are 6 bytes (a client needs the balancer's)")
        self.role = role
        self.flow_timeout = flow_timeout
        self.links: list[int] = []
        self.attached: str = ""
        self.progs: dict[str, int] = {}
        self.maps: list[bpf.Map] = []
        self.pins = pins
        self.adopted = False
        try:
            self._obj = build_object(SOURCE)
        except BuildError as exc:
            raise KernelDatapathError(str(exc)) from None
        try:
            self.flows = self._map(bpf.BPF_MAP_TYPE_LRU_HASH, FLOW_KEY.size, FLOW.size, max_flows, "mplslb_flows")
            self.vips = self._map(bpf.BPF_MAP_TYPE_HASH, VIP_KEY.size, _U32.size, 64, "mplslb_vips")
            self.config = self._map(bpf.BPF_MAP_TYPE_ARRAY, _U32.size, ENDPOINT_CONFIG.size, 1, "mplslb_epcfg")
            self.counters = self._map(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _U32.size, _U64.size, len(ENDPOINT_COUNTERS),
                                      "mplslb_epcount")  # fmt: skip
            # where an ICMP error's quote lies, passed through memory the verifier cannot see into (see the C)
            self.scratch = self._map(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, _U32.size, _U64.size, 1, "mplslb_epscr")
            for vip in vips:
                packed = ipaddress.ip_address(vip).packed if isinstance(vip, str) else bytes(vip)
                family = FAMILY_V6 if len(packed) == IPV6_ADDR_LEN else FAMILY_V4
                self.vips.update(VIP_KEY.pack(packed.ljust(IPV6_ADDR_LEN, b"\0"), family), _U32.pack(1))
            fallback_ms = round(fallback * 1000)
            self.config.update(_U32.pack(0), ENDPOINT_CONFIG.pack(mac, gateway_mac or bytes(6), ttl, fallback_ms))
            if pins is None or not (pins / "prog_xdp").exists():  # else loaded over the kept maps, if they fit
                self.progs = self._load(self._map_fds())
        except (OSError, ValueError) as exc:
            self.close()
            raise KernelDatapathError(f"kernel datapath: {exc}") from None

    def _map_fds(self) -> dict[str, int]:
        return {symbol: m.fd for symbol, m in zip(MAP_SYMBOLS, self.maps, strict=True)}

    def _prog_name(self, way: str) -> str:
        return f"mplslb_{'srv' if self.role == 'server' else 'cli'}_{way}"

    def _load(self, fds: dict[str, int]) -> dict[str, int]:
        """Both programs of the role over the maps ``fds``: {"xdp": fd, "tc": fd}."""
        progs = {"xdp": bpf.load_program(self._obj, f"xdp/{self.role}", fds, prog_type=bpf.BPF_PROG_TYPE_XDP,
                                         name=self._prog_name("in"))}  # fmt: skip
        try:
            progs["tc"] = bpf.load_program(self._obj, f"tc/{self.role}", fds, prog_type=bpf.BPF_PROG_TYPE_SCHED_CLS,
                                           name=self._prog_name("out"))  # fmt: skip
        except OSError:
            os.close(progs["xdp"])
            raise
        return progs

    def _map(self, kind: int, key_size: int, value_size: int, entries: int, name: str) -> bpf.Map:
        m = bpf.Map.create(kind, key_size, value_size, entries, flags=0, name=name)
        self.maps.append(m)
        return m

    def attach(self, interface: str) -> None:
        """Attach both programs to ``interface`` (generic XDP ingress, tcx egress) with BPF links; with ``pins``,
        take over what is pinned there when it fits, else pin what is attached."""
        try:
            ifindex = socket.if_nametoindex(interface)
            if self.pins is not None:
                why = self._adopt(ifindex)
                if not why:
                    self.adopted = True
                    self.attached = interface
                    log.info("event=datapath_adopted interface=%s pins=%s flows=%d", interface, self.pins,
                             self.flow_count())  # fmt: skip
                    return
                if why != "reason=no_pins":
                    log.warning("event=datapath_not_adopted %s pins=%s", why, self.pins)
                bpf.unpin(self.pins, [ifindex])
            if not self.progs:
                self.progs = self._load(self._map_fds())
            self.links.append(bpf.link_create(self.progs["xdp"], ifindex, bpf.BPF_XDP, bpf.XDP_FLAGS_SKB_MODE))
            self.links.append(bpf.link_create(self.progs["tc"], ifindex, bpf.BPF_TCX_EGRESS))
            if self.pins is not None:
                self._pin()
        except OSError as exc:
            self.detach()
            raise KernelDatapathError(f"attaching the kernel datapath to {interface}: {exc}") from None
        self.attached = interface

    def _pin_path(self, what: str) -> str:
        assert self.pins is not None
        return str(self.pins / what)

    def _pin(self) -> None:
        """Pin the maps, the programs, then the links (last: until then a killed agent leaves nothing attached)."""
        assert self.pins is not None
        bpf.ensure_bpffs(self.pins)
        for symbol, m in zip(MAP_SYMBOLS, self.maps, strict=True):
            bpf.obj_pin(m.fd, self._pin_path(f"{symbol}_{ENDPOINT_FP}"))
        for name, fd in self.progs.items():
            bpf.obj_pin(fd, self._pin_path(f"prog_{name}"))
        for name, fd in zip(("xdp", "tc"), self.links, strict=True):
            bpf.obj_pin(fd, self._pin_path(f"link_{name}"))

    def _adopt(self, ifindex: int) -> str:
        """Take over the pinned maps, programs and links when they fit (``""``), else say why."""
        fds: list[int] = []
        try:
            why = self._adopt_fds(ifindex, fds)
        except OSError as exc:
            why = f"reason=adopt_failed error={str(exc).replace(' ', '_')}"
        if why:
            for fd in fds:
                os.close(fd)
        return why

    def _adopt_fds(self, ifindex: int, fds: list[int]) -> str:
        try:
            old = {name: bpf.obj_get(self._pin_path(f"prog_{name}")) for name in ("xdp", "tc")}
        except OSError:
            return "reason=no_pins"
        fds.extend(old.values())
        kept: dict[str, int] = {}
        for symbol, ours in zip(MAP_SYMBOLS, self.maps, strict=True):
            try:
                fd = bpf.obj_get(self._pin_path(f"{symbol}_{ENDPOINT_FP}"))
            except OSError:
                return "reason=map_layout_changed"
            fds.append(fd)
            kept[symbol] = fd
            want = bpf.map_info(ours.fd)
            if not bpf.map_fits(fd, want.map_type, want.key_size, want.value_size, want.max_entries):
                return "reason=map_layout_changed"
        links: list[int] = []
        for name in ("xdp", "tc"):
            try:
                fd = bpf.obj_get(self._pin_path(f"link_{name}"))
            except OSError:
                return f"reason=link_missing link={name}"
            fds.append(fd)
            links.append(fd)
            info = bpf.link_info(fd)
            if info.ifindex != ifindex or info.prog_id != bpf.prog_info(old[name]).prog_id:
                return f"reason=link_detached link={name}"
        if bpf.prog_info(old["xdp"]).name != self._prog_name("in"):
            return "reason=role_changed"
        new = self._load(kept)
        fds.extend(new.values())
        for link, name in zip(links, ("xdp", "tc"), strict=True):
            if bpf.prog_info(new[name]).tag != bpf.prog_info(old[name]).tag:  # built otherwise: swapped in
                bpf.link_update(link, new[name])
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._pin_path(f"prog_{name}"))
                bpf.obj_pin(new[name], self._pin_path(f"prog_{name}"))
        # this endpoint's settings into the kept maps, then the kept maps and programs are this object's
        kept_maps = [bpf.Map(kept[symbol], m.key_size, m.value_size, m.name) for symbol, m in zip(MAP_SYMBOLS,
                     self.maps, strict=True)]  # fmt: skip
        vips, config = kept_maps[1], kept_maps[2]
        vips.clear()
        ours_vips, _, ours_count = self.vips.lookup_batch()
        for i in range(ours_count):
            vips.update(ours_vips[i * VIP_KEY.size : (i + 1) * VIP_KEY.size], _U32.pack(1))
        config.update(_U32.pack(0), self.config.lookup(_U32.pack(0)) or b"")
        for m in self.maps:
            m.close()
        for fd in self.progs.values():
            os.close(fd)
        for name in ("xdp", "tc"):
            os.close(old[name])
        self.maps = kept_maps
        self.flows, self.vips, self.config, self.counters, self.scratch = kept_maps
        self.progs = new
        self.links = links
        fds.clear()  # every descriptor is this object's now
        return ""

    def detach(self) -> None:
        for fd in self.links:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links.clear()
        self.attached = ""

    def close(self, *, keep: bool = False) -> None:
        """Detach, unload, free the maps (idempotent). With ``keep`` (and pins), what is pinned stays attached and
        labelling for the next endpoint; without it, the pins go too."""
        if not keep and self.pins is not None:
            bpf.unpin(self.pins)
        self.detach()
        for fd in self.progs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.progs.clear()
        for m in self.maps:
            m.close()
        self.maps.clear()

    def __enter__(self) -> KernelEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the control plane ---------------------------------------------------------------------------------------
    def flow_table(self) -> dict[FlowKey, tuple[int, bytes, int]]:
        """Every flow the kernel knows: key -> (label, peer MAC, last use in CLOCK_MONOTONIC ns)."""
        keys, values, count = self.flows.lookup_batch()
        out: dict[FlowKey, tuple[int, bytes, int]] = {}
        for i in range(count):
            last_ns, label, peer, _, _, _ = FLOW.unpack_from(values, i * FLOW.size)
            out[flow_key_of(keys[i * FLOW_KEY.size : (i + 1) * FLOW_KEY.size])] = (label, peer, last_ns)
        return out

    def expire(self, now: float | None = None) -> int:
        """Forget flows idle for ``flow_timeout`` (``now`` in ``time.monotonic`` seconds); returns how many. The map
        is read in batches and the stale keys deleted in one call, their octets as read: a full map (65,536 flows)
        costs some tens of milliseconds, not a Python object per flow."""
        now_ns = int((time.monotonic() if now is None else now) * 1e9)
        keys, values, count = self.flows.lookup_batch()
        if not count:
            return 0
        last = np.frombuffer(values, dtype=_LAST_USE, count=count)["last_ns"]
        stale = np.flatnonzero(last <= np.uint64(max(now_ns - int(self.flow_timeout * 1e9), 0)))
        if not stale.size:
            return 0
        rows = np.frombuffer(keys, dtype=np.uint8, count=count * FLOW_KEY.size).reshape(count, FLOW_KEY.size)
        return self.flows.delete_batch(rows[stale].tobytes(), int(stale.size))

    def flow_count(self) -> int:
        """How many flows the kernel knows."""
        return self.flows.lookup_batch()[2]

    def counts(self) -> dict[str, int]:
        """Every counter by name (frames through and drops by reason), read in one call."""
        keys, values, count = self.counters.lookup_batch(chunk=len(ENDPOINT_COUNTERS))
        totals = np.frombuffer(values, dtype="=u8", count=count * self.counters.value_size // _U64.size)
        totals = totals.reshape(count, -1).sum(axis=1, dtype=np.uint64)  # each CPU's count, summed
        out = dict.fromkeys(ENDPOINT_COUNTERS, 0)
        for i in range(count):
            index = _U32.unpack_from(keys, i * _U32.size)[0]
            if index < len(ENDPOINT_COUNTERS):
                out[ENDPOINT_COUNTERS[index]] = int(totals[i])
        return out

    def reset_counters(self) -> None:
        zero = bytes(self.counters.value_size)  # every CPU's
        for i in range(len(ENDPOINT_COUNTERS)):
            self.counters.update(_U32.pack(i), zero)

    def clear_flows(self) -> None:
        """Forget every flow: the keys as read, deleted in one call."""
        self.flows.clear()

    def run_ingress(self, frame: bytes) -> bpf.TestRun:
        """The ingress program on one frame (``BPF_PROG_TEST_RUN``), maps and counters as on the wire."""
        return bpf.prog_test_run(self.progs["xdp"], frame)

    def run_egress(self, frame: bytes) -> bpf.TestRun:
        """The egress program on one frame (``BPF_PROG_TEST_RUN``)."""
        return bpf.prog_test_run_skb(self.progs["tc"], frame)
