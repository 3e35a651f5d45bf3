"""The control socket's client: one JSON request line out, one JSON reply line back."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

__all__ = ["DEFAULT_SOCKET", "MAX_REPLY", "RUN_DIR", "ControlError", "request"]

#: Where the daemon and the agents keep their sockets and locks.
RUN_DIR = "/run/mplslb"
DEFAULT_SOCKET = f"{RUN_DIR}/control.sock"
#: The largest reply read (a status snapshot of thousands of servers fits well within it).
MAX_REPLY = 64 * 1024 * 1024
RECV_SIZE = 65536


class ControlError(Exception):
    """The daemon could not be asked, or its answer could not be read; the message says which and where."""


def request(path: str, req: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send ``req`` to the control socket at ``path`` and return the reply (which may be ``{"error": ...}``).

    ``timeout`` bounds the whole exchange. Raises :class:`ControlError` if there is no daemon, it does not answer
    in time, or the answer is not a JSON object.
    """
    data = json.dumps(req, separators=(",", ":")).encode("utf-8") + b"\n"
    deadline = time.monotonic() + timeout
    buf = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(data)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise ControlError(f"{path}: reply larger than {MAX_REPLY} bytes")
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path} (is the daemon running?)") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing answers on {path} (a stale socket of a daemon that died?)") from None
    except TimeoutError:
        raise ControlError(f"no reply from {path} within {timeout:g}s") from None
    except OSError as exc:
        if not buf:  # with part of an answer in hand, a hard close after it is not an error
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    line = bytes(buf).split(b"\n", 1)[0]
    if not line:
        raise ControlError(f"{path}: the daemon closed the connection without a reply")
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"{path}: the reply is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: the reply is not a JSON object")
    return reply
