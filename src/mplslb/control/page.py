"""The balancer's status page: ``/`` (a live page), ``/status.json`` (the snapshot and its history) and the
page's script and style, beside Prometheus' ``/metrics``, on the daemon's HTTP endpoint.

Theory of operation
-------------------
:func:`status_app` is a WSGI application, served by :func:`serve` from a thread of its own (a threading
``wsgiref`` server, as prometheus_client's). It never touches the balancer: ``get_status()`` returns the latest
published snapshot and the history's points (:class:`~mplslb.control.history.StatusHistory`), both immutable
once published, and each request encodes what it is given.

``/status.json`` answers ``{"ok": true, "status": <snapshot>, "history": {"capacity": N, "points": [...]}}``:
the same snapshot as the control socket's ``status`` command, plus the recent points (all of them, or only those
after ``?since=T``, the ``t`` of the last point the caller has). Before the daemon has published a snapshot it
answers 503.

The page is three static files (``static/``: HTML, a hand-written script, a style sheet), read once from the
package. The script polls ``status.json`` every second and updates the DOM in place; charts are inline SVG
drawn by the script. Everything that comes from the configuration or the network (server names, addresses, drop
reasons, health-check details) reaches the DOM only as text nodes (``textContent``), never as markup; and every
response forbids inline scripts and any other origin (``Content-Security-Policy``), so nothing injected could
run. The page needs nothing outside the daemon: no build step, no CDN.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mplslb.control.history import HISTORY_CAPACITY, Point, points_since

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["HEADERS", "StatusSource", "serve", "status_app"]

#: The latest snapshot (None until there is one) and the history's points, oldest first.
StatusSource = Callable[[], tuple[Mapping[str, Any] | None, Sequence[Point]]]

#: Sent with every answer: no inline script or style, nothing from another origin, no framing, no sniffing.
HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
_JSON = "application/json"


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("mplslb.control") / "static"
    return {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in _STATIC.items()}


def _status_body(get_status: StatusSource, query: str, capacity: int) -> tuple[str, bytes]:
    """The HTTP status and body of ``/status.json``."""
    since: float | None = None
    values = parse_qs(query).get("since")
    if values:
        try:
            since = float(values[-1])
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            return "400 Bad Request", _dumps({"ok": False, "error": f"since: expected a number, got {values[-1]!r}"})
    snap, points = get_status()
    if snap is None:
        return "503 Service Unavailable", _dumps({"ok": False, "error": "the daemon has not taken a snapshot yet"})
    body = {
        "ok": True,
        "status": snap,
        "history": {"capacity": capacity, "points": list(points_since(points, since))},
    }
    try:
        return "200 OK", _dumps(body)
    except (TypeError, ValueError) as exc:
        return "500 Internal Server Error", _dumps({"ok": False, "error": f"the snapshot is not JSON: {exc}"})


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def status_app(
    get_status: StatusSource, metrics: WSGIApplication, *, capacity: int = HISTORY_CAPACITY
) -> WSGIApplication:
    """The endpoint's WSGI application: the page, ``/status.json`` from ``get_status()``, and ``/metrics``
    answered by ``metrics`` (prometheus_client's ``make_wsgi_app``). ``capacity`` is the history's, told to the
    page so it keeps as many points."""
    static = _static_files()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return metrics(environ, start_response)
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"only GET and HEAD\n", "text/plain; charset=utf-8"
            extra = [("Allow", "GET, HEAD")]
        elif path == "/status.json":
            (status, body), kind, extra = _status_body(get_status, environ.get("QUERY_STRING", ""), capacity), _JSON, []
        elif path in static:
            (body, kind), status, extra = static[path], "200 OK", []
        else:
            status, body, kind, extra = "404 Not Found", b"not found\n", "text/plain; charset=utf-8", []
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))), *HEADERS, *extra])
        return [b""] if method == "HEAD" else [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request."""


def serve(addr: str, port: int, app: WSGIApplication) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``app`` on ``addr:port`` (IPv4 or IPv6; port 0: any free port) from a daemon thread."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("Server", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name=f"http {addr}:{port}", daemon=True)
    thread.start()
    return httpd, thread
