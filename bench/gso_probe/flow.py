"""One bulk TCP transfer for the GSO probe (``run.sh``).

``flow.py serve PORT TOTAL`` sends TOTAL bytes (a random 1 MiB block over and over) to the first client and
closes; ``flow.py fetch HOST PORT SECONDS`` reads until the sender closes or SECONDS pass. Both print the bytes,
the seconds and a CRC32 of the stream: a transfer that completed intact prints the same CRC on both sides.
``flow.py txcsum-off IFNAME`` turns the interface's TX checksumming off (ETHTOOL_STXCSUM), as the kernel
datapath's agents do, without needing ethtool.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import sys
import time
import zlib

BLOCK = os.urandom(1 << 20)
TIMEOUT = 30.0  # any one accept, send or receive; the caller bounds the whole run


def serve(port: int, total: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    sent, crc, t0 = 0, 0, time.monotonic()
    block = memoryview(BLOCK)
    try:
        while sent < total:
            chunk = block[: min(len(BLOCK), total - sent)]
            conn.sendall(chunk)
            crc = zlib.crc32(chunk, crc)
            sent += len(chunk)
    except OSError as exc:
        print(f"send stopped: {exc}")
    conn.close()
    print(f"sent {sent} {time.monotonic() - t0:.2f}s crc {crc:08x}")


def fetch(host: str, port: int, seconds: float) -> None:
    conn = socket.create_connection((host, port), timeout=TIMEOUT)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got, crc, t0 = 0, 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            n = conn.recv_into(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            got += n
    except OSError as exc:
        print(f"receive stopped: {exc}")
    elapsed = time.monotonic() - t0
    print(f"got {got} {elapsed:.2f}s {got / elapsed / 1e6:.1f} MB/s crc {crc:08x}")


def tx_checksum_off(ifname: str) -> None:
    siocethtool, ethtool_stxcsum = 0x8946, 0x17
    value = array.array("I", [ethtool_stxcsum, 0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), siocethtool, struct.pack("16sP", ifname.encode(), value.buffer_info()[0]))


if __name__ == "__main__":
    if sys.argv[1] == "txcsum-off":
        tx_checksum_off(sys.argv[2])
    elif sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        fetch(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
