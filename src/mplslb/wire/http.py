"""A peek at the first bytes of an HTTP/1.x request (RFC 9112): the request line and the Host header.

Only what the balancer needs to pick a server by host or path; bodies and the rest of the headers are ignored.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mplslb.wire.errors import WireError

MAX_REQUEST_LINE = 8192  # bytes searched for the end of the request line
MAX_METHOD_LEN = 16
CRLF = b"\r\n"
LF = b"\n"
CR = b"\r"

# method SP request-target SP HTTP-version; the method is upper-case letters only (all registered ones are). The
# CRs before the line's LF are not the line's.
_REQUEST_LINE = re.compile(rb"([A-Z]{1,%d}) ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[0-9])\r*" % MAX_METHOD_LEN)
# What a request line can start with before its end has arrived.
_PARTIAL_VERSION = rb"H(?:T(?:T(?:P(?:/(?:1(?:\.[0-9]?)?)?)?)?)?)?"
_PARTIAL_LINE = re.compile(
    rb"[A-Z]{0,%d}|[A-Z]{1,%d} (?:[\x21-\x7e\x80-\xff]+(?: (?:%s)?)?)?"
    % (MAX_METHOD_LEN, MAX_METHOD_LEN, _PARTIAL_VERSION)
)
# From a line's end: the next complete line when it is empty (CRs only: the headers' end) or a Host header (the
# field name is what comes before the first colon, in any case), its value up to the line's end.
_HOST_LINE = re.compile(rb"\n(?:\r*\n|[Hh][Oo][Ss][Tt]:([^\n]*)\n)")


class HTTPError(WireError):
    """Payload that is not (or not yet) an HTTP/1.x request line."""


class HttpRequest(NamedTuple):
    method: str
    target: str
    version: str
    host: str | None  # the first Host header among the complete header lines present, stripped


def peek_request(payload: bytes | memoryview) -> HttpRequest:
    """Parse the request line and look for Host among the header lines present.

    Raises ``http_incomplete`` when the request line has not ended yet (no line end in the payload, which is
    shorter than 8 KiB and so far looks like a request line), ``http_not_request`` otherwise. Lines may end in
    CRLF or a bare LF (RFC 9112 section 2.2). Header lines after the request line need not all have arrived.
    """
    data = payload if type(payload) is bytes else bytes(payload)
    eol = data.find(LF, 0, MAX_REQUEST_LINE + 1)
    if eol < 0:
        head = data[: MAX_REQUEST_LINE + len(CRLF)]
        if len(head) >= MAX_REQUEST_LINE or _PARTIAL_LINE.fullmatch(head.rstrip(CR)) is None:
            raise HTTPError("http_not_request", "no HTTP/1.x request line")
        raise HTTPError("http_incomplete", f"request line not ended after {len(head)} bytes")
    match = _REQUEST_LINE.fullmatch(data, 0, eol)
    if match is None:
        raise HTTPError("http_not_request", "no HTTP/1.x request line")
    method, target, version = match.groups()
    # The first Host header among the complete lines before the blank line that ends the headers.
    line = _HOST_LINE.search(data, eol)
    value = None if line is None else line[1]
    return HttpRequest(
        method.decode("latin-1"),
        target.decode("latin-1"),
        version.decode("latin-1"),
        None if value is None else value.rstrip(CR).strip(b" \t").decode("latin-1"),
    )
