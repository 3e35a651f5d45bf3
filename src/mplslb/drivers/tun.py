"""A TUN device toward the host's IP stack, for the endpoint agents: IP packets in, IP packets out.

``/dev/net/tun`` is opened here, not through pyroute2's tuntap helper, because that helper closes the descriptor
(and a non-persistent device goes away with it). The device is created in the namespace of the opening thread;
``netns`` opens it inside a named one. It lives as long as the descriptor: :meth:`TunDevice.close` removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterable
from typing import Self

from pyroute2 import IPRoute

from mplslb.drivers.netns import entered

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union
NOOP_QDISC = "noop"
LINK_READY_WAIT = 2.0
LINK_READY_POLL = 0.005
MAX_PACKET = 1 << 16  # an IP packet (no GSO without IFF_VNET_HDR) always fits


class TunDevice:
    """A non-blocking TUN device (IFF_TUN | IFF_NO_PI): each read or write is one whole IP packet."""

    def __init__(self, name: str | None = None, *, netns: str | None = None) -> None:
        if name is not None and not 0 < len(name.encode()) < IFNAMSIZ:
            raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
        self.netns = netns
        self.drops: dict[str, int] = {}
        with entered(netns):
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack((name or "").encode(), IFF_TUN | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.name: str = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)

    def fileno(self) -> int:
        return self._fd

    def recv_burst(self, max_packets: int = 64) -> list[bytes]:
        """Up to ``max_packets`` IP packets the host sent into the device, oldest first; never blocks."""
        packets: list[bytes] = []
        readv, fd, buffers, view = os.readv, self._fd, [self._buf], self._view
        for _ in range(max_packets):
            try:
                n = readv(fd, buffers)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EIO while the device is down, for instance
                self._drop(f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
                break
            packets.append(bytes(view[:n]))
        return packets

    def send(self, packet: bytes | memoryview) -> int:
        """Hand one IP packet to the host stack; OSError (EINVAL for a non-IP packet, ...) is the caller's."""
        return os.write(self._fd, packet)

    def configure(
        self,
        *,
        up: bool = True,
        mtu: int | None = None,
        addresses: Iterable[tuple[str, int]] = (),
        wait: float = LINK_READY_WAIT,
    ) -> None:
        """Set the link up (or down), its MTU, and add ``(address, prefix length)`` pairs, through netlink.

        Bringing it up waits (at most ``wait`` seconds) for the kernel to attach the device's qdisc: until
        linkwatch has run, the device has the noop qdisc, which silently drops what the host sends into it."""
        with entered(self.netns), IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname=self.name)
            changes: dict[str, object] = {"state": "up" if up else "down"}
            if mtu is not None:
                changes["mtu"] = mtu
            ipr.link("set", index=index, **changes)
            for address, prefixlen in addresses:
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            deadline = time.monotonic() + wait
            while up and time.monotonic() < deadline:
                if ipr.get_links(index)[0].get("IFLA_QDISC") != NOOP_QDISC:
                    break
                time.sleep(LINK_READY_POLL)

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def close(self) -> None:
        """Close the descriptor; the (non-persistent) device disappears with it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
