"""The session sync's socket: one UDP socket per node, driven by the daemon's loop.

Theory of operation
-------------------
:class:`ClusterLink` binds ``[cluster] sync_address:sync_port``, hands every datagram it reads to the sans-I/O
:class:`~mplslb.cluster.ClusterSync` with the sender's address, and every ``flush`` seconds, and once more as it closes,
sends what :meth:`~mplslb.cluster.ClusterSync.poll` returns. Reads are bounded per wake-up so frames are never
starved; send errors (a peer down: ECONNREFUSED, ENETUNREACH; a full queue: ENOBUFS) are counted by errno name, never
raised.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket

from mplslb.cluster import ClusterSync
from mplslb.drivers.loop import Loop, Timer

#: Datagrams read per wake-up at most.
READ_BURST = 256
#: The socket buffers asked for (a full dump to a joining peer is a burst).
BUFFER_BYTES = 4 << 20


class ClusterLink:
    """The UDP socket between a node's :class:`~mplslb.cluster.ClusterSync` and its peers."""

    def __init__(self, sync: ClusterSync, loop: Loop) -> None:
        self.sync = sync
        self.loop = loop
        config = sync.config
        family = socket.AF_INET6 if ipaddress.ip_address(config.sync_address).version == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
            self.sock.bind((config.sync_address, config.sync_port))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.errors: dict[str, int] = {}
        loop.add_reader(self.sock, self.readable)
        self._timer: Timer | None = None
        self._tick()

    def readable(self) -> None:
        now = self.loop.clock()
        for _ in range(READ_BURST):
            try:
                data, source = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error from an earlier send to a peer that is down
                self._count(exc)
                continue
            host = str(ipaddress.ip_address(source[0].split("%")[0]))
            self.sync.receive(data, (host, source[1]), now)

    def _tick(self) -> None:
        now = self.loop.clock()
        self._send(now)
        self._timer = self.loop.call_at(now + self.sync.config.flush, self._tick)

    def _send(self, now: float) -> None:
        for address, datagram in self.sync.poll(now):
            try:
                self.sock.sendto(datagram, address)
            except OSError as exc:
                self._count(exc)

    def _count(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        self.errors[name] = self.errors.get(name, 0) + 1

    def close(self) -> None:
        """Send what changed since the last flush (sessions opened, changed or ending in it: the peers carry them
        while this node is away), then close the socket."""
        if self.sock.fileno() < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._send(self.loop.clock())
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.loop.remove_reader(self.sock)
        self.sock.close()
