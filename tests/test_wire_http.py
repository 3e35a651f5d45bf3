"""Peeking at HTTP/1.x request lines and the Host header."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mplslb.analyzer import TRUNCATED_HOST, PacketAnalyzer
from mplslb.switching.layout import REQUEST_COPY
from mplslb.wire.http import MAX_REQUEST_LINE, HTTPError, HttpRequest, peek_request


def test_full_request() -> None:
    payload = b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: x\r\nHost: www.example.org\r\nAccept: */*\r\n\r\n"
    assert peek_request(payload) == HttpRequest("GET", "/index.html?q=1", "HTTP/1.1", "www.example.org")


def test_memoryview_and_latin1() -> None:
    payload = b"POST /caf\xe9 HTTP/1.0\r\nHost: h\xe9\r\n\r\nbody"
    assert peek_request(memoryview(payload)) == HttpRequest("POST", "/caf\xe9", "HTTP/1.0", "h\xe9")


def test_host_is_case_insensitive_stripped_and_first_wins() -> None:
    payload = b"GET / HTTP/1.1\r\nhOST: \t a.example:8080 \r\nHost: b.example\r\n\r\n"
    assert peek_request(payload).host == "a.example:8080"


def test_host_after_the_header_block_is_ignored() -> None:
    assert peek_request(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: body\r\n").host is None


def test_incomplete_headers_give_host_if_seen() -> None:
    assert peek_request(b"GET / HTTP/1.1\r\nHost: a\r\nAcc").host == "a"
    assert peek_request(b"GET / HTTP/1.1\r\nAccept: */*\r\nHo").host is None
    assert peek_request(b"GET / HTTP/1.1\r\nHost: partial").host is None  # line not ended yet
    assert peek_request(b"GET / HTTP/1.1\r\n") == HttpRequest("GET", "/", "HTTP/1.1", None)


def test_bare_lf_line_ends_are_tolerated() -> None:
    assert peek_request(b"GET / HTTP/1.1\nHost: a\n\n") == HttpRequest("GET", "/", "HTTP/1.1", "a")


def test_authority_and_asterisk_forms() -> None:
    assert peek_request(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n").target == "example.org:443"
    assert peek_request(b"OPTIONS * HTTP/1.1\r\n\r\n").target == "*"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"G",
        b"GET",
        b"GET ",
        b"GET /a",
        b"GET /a ",
        b"GET /a H",
        b"GET /a HTTP/",
        b"GET /a HTTP/1.1",
        b"GET /a HTTP/1.1\r",
    ],
)
def test_incomplete(payload: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        peek_request(payload)
    assert info.value.reason == "http_incomplete"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"get / HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"GET /\r\n",  # HTTP/0.9
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/1.1 \r\n",
        b"G3T / HTTP/1.1\r\n",
        b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\n",  # method longer than 16
        b"ABCDEFGHIJKLMNOPQ",
        b"\r\n",
        b"GET /a HX",
        b"GET /a HTTP/1.1x",
        b"GET /\x00 HTTP/1.1\r\n",
        b"GET /" + b"a" * MAX_REQUEST_LINE,  # no line end within 8 KiB: never a request line we accept
    ],
)
def test_not_request(payload: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        peek_request(payload)
    assert info.value.reason == "http_not_request"


def test_long_line_under_the_limit_is_accepted() -> None:
    target = "/" + "a" * (MAX_REQUEST_LINE - 20)
    assert peek_request(f"GET {target} HTTP/1.1\r\n".encode()).target == target


methods = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=16)
targets = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100)
hosts = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)


@given(
    methods,
    targets,
    st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
    st.one_of(st.none(), hosts),
    st.integers(0, 200),
)
def test_round_trip_and_every_prefix(method: str, target: str, version: str, host: str | None, cut: int) -> None:
    head = f"{method} {target} {version}\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
    payload = head.encode("latin-1")
    assert peek_request(payload) == HttpRequest(method, target, version, host)
    prefix = payload[: min(cut, len(payload))]
    line_end = payload.index(b"\r\n") + 2
    if len(prefix) < line_end:
        with pytest.raises(HTTPError, match="http_incomplete"):
            peek_request(prefix)
    else:
        assert peek_request(prefix)[:3] == (method, target, version)


@given(
    targets,
    st.one_of(st.none(), hosts),
    st.integers(0, 400),
    st.integers(0, 400),
)
def test_a_copy_of_a_requests_first_octets_reads_as_the_request_or_as_truncated(
    target: str, host: str | None, padding: int, body: int
) -> None:
    """The analyzer's reading of the kernel's copy of a request (its first REQUEST_COPY octets): the whole
    request's reading when its request line and Host fit the copy, else the named outcome TRUNCATED_HOST, never
    "no Host" for a request that has one."""
    head = f"GET /{target} HTTP/1.1\r\nX-Pad: {'p' * padding}\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
    payload = head.encode("latin-1") + b"b" * body
    analyzer = PacketAnalyzer()
    whole = peek_request(payload)
    read = analyzer.read_copy(payload[:REQUEST_COPY], len(payload))
    host_end = payload.index(b"\r\n\r\n") + 2 if host else payload.index(b"\r\n") + 2
    if len(payload) <= REQUEST_COPY or (host and host_end <= REQUEST_COPY):
        assert read == whole
    else:
        assert read is not None and read.host == TRUNCATED_HOST
    assert PacketAnalyzer(l7=False).read_copy(payload[:REQUEST_COPY], len(payload)) is None


def test_a_copy_the_kernel_could_not_make_is_counted_as_truncated() -> None:
    assert PacketAnalyzer().read_copy(b"", 40) == HttpRequest("", "", "", TRUNCATED_HOST)
    assert PacketAnalyzer().read_copy(b"SSH-2.0-x\r\n" + b"x" * 300, 600) is None  # no request, whole or cut


# A line-by-line reading of a request's start, the plainest statement of what peek_request reads (it searches with
# two patterns instead): the request line, then the complete header lines one at a time up to the blank one.
_LINE = re.compile(rb"([A-Z]{1,16}) ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[0-9])")


def read_by_lines(payload: bytes) -> HttpRequest | str:
    head = payload[: MAX_REQUEST_LINE + 2]
    eol = head.find(b"\n", 0, MAX_REQUEST_LINE + 1)
    if eol < 0:
        try:
            peek_request(payload)
        except HTTPError as exc:  # the partial line's reading is peek_request's own, unchanged
            return exc.reason
        raise AssertionError("a request line without its end was read")
    match = _LINE.fullmatch(head[:eol].rstrip(b"\r"))
    if match is None:
        return "http_not_request"
    host = None
    lines = payload[eol + 1 :].split(b"\n")
    for line in lines[:-1]:  # the last piece has no line end yet (or is empty)
        line = line.rstrip(b"\r")
        if not line:
            break
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"host":
            host = value.strip(b" \t").decode("latin-1")
            break
    method, target, version = (part.decode("latin-1") for part in match.groups())
    return HttpRequest(method, target, version, host)


PIECES = (
    *(b"GET", b"POST", b"get", b" ", b"/", b"/a?b", b"HTTP/1.1", b"HTTP/1.", b"HTTP/2.0", b"\r", b"\n", b"\r\n"),
    *(b"Host", b"host", b"HOST", b"hOsT", b":", b": ", b"\t", b"a.example", b"X-H: v", b"Host :", b" Host:"),
    *(b"\x00", b"\xe9", b"\xff", b"\x80"),
)
pieces = st.sampled_from(PIECES)


@given(st.one_of(st.lists(pieces, max_size=40).map(b"".join), st.binary(max_size=300)), st.booleans())
@example(b"GET / HTTP/1.1\r\r\nHost: a\r \r\n\r\n", False)
@example(b"GET / HTTP/1.1\nX: y\n\r\r\nHost: b\n", True)
@example(b"GET / HTTP/1.1\r\nhost:\r\n", False)
def test_a_request_reads_as_line_by_line(payload: bytes, view: bool) -> None:
    """peek_request gives what the line-by-line reading gives, request or error, for bytes and for a view."""
    try:
        read: HttpRequest | str = peek_request(memoryview(payload) if view else payload)
    except HTTPError as exc:
        read = exc.reason
    assert read == read_by_lines(payload)
