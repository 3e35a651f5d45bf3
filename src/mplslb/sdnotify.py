"""systemd's readiness protocol (``sd_notify(3)``): tell the service manager the daemon is ready, reloading or
stopping.

Theory of operation
-------------------
A unit with ``Type=notify`` starts the daemon with ``$NOTIFY_SOCKET`` naming an ``AF_UNIX`` datagram socket: a
path, or an abstract name written with a leading ``@``. Each message is one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``). Without
``$NOTIFY_SOCKET`` (not started by systemd, or another ``Type``) :func:`notify` does nothing. A failure to send is
returned, never raised: the daemon runs on whether or not anyone listens.

``RELOADING=1`` carries ``MONOTONIC_USEC``, the ``CLOCK_MONOTONIC`` time of the reload in microseconds, which
systemd (``Type=notify-reload``) uses to match the ``READY=1`` that ends the reload.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "reloading_message", "socket_address"]


def socket_address(value: str) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, an abstract name (``@name`` -> ``b"\\0name"``), or None
    for an empty or unusable value."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def reloading_message(monotonic: float | None = None) -> str:
    """``RELOADING=1`` with the time of the reload (now, by default) as systemd wants it."""
    now = time.monotonic() if monotonic is None else monotonic
    return f"RELOADING=1\nMONOTONIC_USEC={int(now * 1_000_000)}"


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``...) to the service manager. True when
    it was sent, False when there is no ``$NOTIFY_SOCKET`` or it could not be reached."""
    env = os.environ if environ is None else environ
    address = socket_address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError:
        return False
    return True
