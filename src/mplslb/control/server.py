"""The control socket: a Unix stream socket that answers one JSON line with one JSON line, HAProxy's stats
socket in spirit.

Requests: ``{"cmd": "status"}`` answers ``{"ok": true, "status": <snapshot>}``; every other command goes to the
``command`` callable (:func:`balancer_commands` gives the standard ones: servers added, removed, drained, weighted,
taken down and up; the algorithm and admission limits set; the configuration file reloaded).
A request the server cannot use gets ``{"error": "..."}``. One request per connection: the server closes the
connection once the reply is written.

The server never blocks and never raises out of :meth:`ControlServer.on_readable`: the listening socket and the
client connections sit in a private selector whose own descriptor (epoll/kqueue) is what :meth:`fileno` gives,
so a selectors-based loop registers it as one reader. Requests are bounded (``max_request`` bytes), so are the
connections held at once (``max_clients``; the oldest goes when a new one comes) and their lifetime
(``client_timeout``, enforced in :meth:`on_readable` and :meth:`on_timer`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mplslb.balancing.algorithms import algorithm_names
from mplslb.balancing.servers import DownReason, Server, ServerStatus
from mplslb.config import ConfigError, Section, read_server, show_value
from mplslb.sessions import Session, SessionState

if TYPE_CHECKING:
    from mplslb.balancer import Balancer
    from mplslb.health import HealthChecker

__all__ = ["COMMANDS", "LIMITS", "ControlServer", "balancer_commands", "follow_pool"]

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 16
CLIENT_TIMEOUT = 5.0
RECV_SIZE = 65536
COMMANDS = ("status", "sessions", "add", "remove", "drain", "weight", "down", "up", "algorithm", "limit", "reload")
#: The most rows one ``sessions`` request answers.
MAX_SESSION_ROWS = 10_000
#: The admission limits the ``limit`` command sets.
LIMITS = ("max_sessions", "max_new_per_second")

Request = dict[str, Any]
Reply = dict[str, Any]


class _Conn:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.outbuf = b""


class ControlServer:
    """Serves the control protocol on the Unix socket ``path`` (created with ``mode``; a stale socket file left by
    a dead daemon is replaced, a live one is an error)."""

    def __init__(
        self,
        path: str,
        get_snapshot: Callable[[], dict[str, Any]],
        command: Callable[[Request], Reply] | None = None,
        *,
        mode: int = 0o600,
        max_request: int = MAX_REQUEST,
        max_clients: int = MAX_CLIENTS,
        client_timeout: float = CLIENT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.get_snapshot = get_snapshot
        self.command = command
        self.max_request = max_request
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self.clock = clock
        self._conns: dict[int, _Conn] = {}  # by fd, in accept order
        self._closed = False
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, mode)
            self._inode = os.stat(path).st_ino
            listener.listen(max_clients)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)

    # -- loop integration --------------------------------------------------------------------------------------
    def fileno(self) -> int:
        """A descriptor readable while the listener or a connection is ready: register it as a reader."""
        fileno = getattr(self._selector, "fileno", None)
        if fileno is None:
            raise RuntimeError(f"{type(self._selector).__name__} has no descriptor to register; use run_once()")
        return int(fileno())

    def on_readable(self) -> None:
        """Accept, read, answer and write whatever is ready, without blocking. Never raises."""
        if not self._closed:
            self._process(self._selector.select(0))

    def run_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for something to do and do it: a loop of its own, for tests and tools."""
        if not self._closed:
            self._process(self._selector.select(max(0.0, timeout)))

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._conns)

    def next_deadline(self) -> float | None:
        """When the oldest connection times out, or None."""
        return min((c.deadline for c in self._conns.values()), default=None)

    def on_timer(self, now: float) -> None:
        """Close connections older than ``client_timeout``."""
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(conn)

    # -- connections -------------------------------------------------------------------------------------------
    def _process(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        try:
            for key, mask in events:
                if key.data is None:
                    self._accept()
                    continue
                conn: _Conn = key.data
                if self._conns.get(conn.sock.fileno()) is not conn:
                    continue  # closed earlier in this round
                if mask & selectors.EVENT_READ and not conn.outbuf:
                    self._read(conn)
                elif mask & selectors.EVENT_WRITE:
                    self._write(conn)
            self.on_timer(self.clock())
        except Exception:  # the daemon loop must survive whatever a client does; say what went wrong
            log.exception("control socket %s: unexpected error", self.path)

    def _accept(self) -> None:
        for _ in range(self.max_clients):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, a connection reset before accept(): try again later
                return
            if len(self._conns) >= self.max_clients:
                self._drop(next(iter(self._conns.values())))
            sock.setblocking(False)
            conn = _Conn(sock, self.clock() + self.client_timeout)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if data:
            conn.inbuf += data
            end = conn.inbuf.find(b"\n")
            if end < 0:
                if len(conn.inbuf) > self.max_request:
                    self._reply(conn, {"error": f"request too large (more than {self.max_request} bytes)"})
                return
            if end > self.max_request:
                self._reply(conn, {"error": f"request too large (more than {self.max_request} bytes)"})
                return
            line = bytes(conn.inbuf[:end])
        elif conn.inbuf:  # the client shut its side without a newline: what it sent is the request
            line = bytes(conn.inbuf)
        else:
            self._drop(conn)
            return
        self._reply(conn, self.handle(line))

    def _reply(self, conn: _Conn, reply: Reply) -> None:
        try:
            text = json.dumps(reply, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            text = json.dumps({"error": f"internal error: reply is not JSON: {exc}"})
        conn.outbuf = text.encode("utf-8") + b"\n"
        conn.inbuf.clear()
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    # -- requests ----------------------------------------------------------------------------------------------
    def handle(self, line: bytes) -> Reply:
        """Answer one request line (without its newline). Never raises."""
        try:
            req = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return {"error": "request is not UTF-8"}
        except (ValueError, RecursionError) as exc:
            return {"error": f"request is not JSON: {exc}"}
        if not isinstance(req, dict):
            return {"error": 'request must be a JSON object such as {"cmd": "status"}'}
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            return {"error": 'request needs a "cmd" string, e.g. {"cmd": "status"}'}
        try:
            if cmd == "status":
                return {"ok": True, "status": self.get_snapshot()}
            if self.command is None:
                return {"error": f"unknown command {cmd!r}; this server only answers status"}
            reply = self.command(req)
        except Exception as exc:
            return {"error": f"{cmd}: {type(exc).__name__}: {exc}"}
        if not isinstance(reply, dict):
            return {"error": f"{cmd}: internal error: the command gave no reply"}
        return reply

    # -- shutdown ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and the listener; remove the socket file if it is still ours."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left behind by a daemon that died
        return
    except OSError:
        pass  # e.g. a timeout: someone holds it, treat as live
    finally:
        probe.close()
    raise OSError(f"{path}: another daemon answers on this control socket")


def follow_pool(health: HealthChecker, balancer: Balancer, now: float) -> None:
    """Health-check exactly the servers in the pool: start checking added ones, stop checking those that left."""
    names = {server.name for server in balancer.pool}
    for name in health.names:
        if name not in names:
            health.remove(name)
    for name in names - set(health.names):
        health.add(name, now)


def _server_reply(name: str, server: Server, before: tuple[ServerStatus, int], changes: list[str]) -> Reply:
    status: ServerStatus = server.status
    return {
        "ok": True,
        "server": name,
        "status": str(status),
        "weight": server.weight,
        "changed": (status, server.weight) != before,
        "changes": changes,
    }


def _limit_value(name: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"limit: {name} must be a number >= 0 (0: no limit), got {value!r}")
    if name == "max_sessions" and not isinstance(value, int):
        raise ValueError(f"limit: max_sessions must be an integer >= 0 (0: no limit), got {value!r}")
    return value


def balancer_commands(
    balancer: Balancer,
    *,
    clock: Callable[[], float],
    health: HealthChecker | None = None,
    reload: Callable[[], Reply] | None = None,
) -> Callable[[Request], Reply]:
    """The standard ``command`` callable for :class:`ControlServer`, acting on ``balancer`` (in the loop thread).

    Servers (``S`` a server's name):

    * ``{"cmd": "add", "server": {"name": S, "address": A, "mac": M, "port": P, "weight": W, "max_sessions": N}}``:
      the keys and checks of a configuration file's ``[[servers]]`` entry; S takes new sessions at once.
    * ``{"cmd": "remove", "server": S}``: no new sessions to S; it leaves the pool when its last session ends
      (status ``removing`` meanwhile). With ``"now": true`` its sessions are interrupted and labels withdrawn.
    * ``{"cmd": "drain", "server": S}``: no new sessions to S; its sessions finish.
    * ``{"cmd": "weight", "server": S, "weight": W}``: W >= 0 (0 keeps S's sessions, sends it no new ones).
    * ``{"cmd": "down", "server": S}``: S down (reason ``admin``): its sessions are interrupted, labels withdrawn;
      health checks do not bring it back.
    * ``{"cmd": "up", "server": S}``: S up again, unless its health check says down (it then comes back by itself
      after ``rise`` passing probes).

    They reply ``{"ok": true, "server": S, "status": ..., "weight": ..., "changed": bool, "changes": [...]}``.

    Settings, for new sessions only (``changes`` lists ``key:old->new``):

    * ``{"cmd": "algorithm", "name": A, "params": {...}}``: the load-balancing algorithm.
    * ``{"cmd": "limit", "name": "max_sessions" | "max_new_per_second", "value": V}``: an admission limit (0: none).
    * ``{"cmd": "reload"}``: re-read the daemon's configuration file and apply what changed (``reload``).

    The session table (as ``ipvsadm -Lnc`` and HAProxy's ``show sess``):

    * ``{"cmd": "sessions", "state": T, "server": S, "limit": N}``: the sessions in the table (live, or ENDING and
      lingering), oldest first, at most N (default 100, at most :data:`MAX_SESSION_ROWS`), only those in state T
      and of server S when given. Replies ``{"ok": true, "total": M, "sessions": [...]}``, M the number that
      matched; each row gives the labels, the flow, the server, the state, its age, how long since a frame of it
      passed, when its deadline comes (negative: overdue), how long it has been ENDING, and its traffic.
    """

    def command(req: Request) -> Reply:
        cmd = req.get("cmd")
        if cmd not in COMMANDS or cmd == "status":
            return {"error": f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}"}
        if cmd == "reload":
            if reload is None:
                return {"error": "reload: this balancer has no configuration file to re-read"}
            return reload()
        if cmd == "algorithm":
            return set_algorithm(req)
        if cmd == "limit":
            return set_limit(req)
        if cmd == "add":
            return add(req)
        if cmd == "sessions":
            return sessions(req)
        name = req.get("server")
        if not isinstance(name, str) or not name:
            return {"error": f'{cmd}: needs a "server" name'}
        if name not in balancer.pool:
            known = ", ".join(s.name for s in balancer.pool.servers)
            return {"error": f"{cmd}: no server named {name!r} (servers: {known or 'none'})"}
        server = balancer.pool.get(name)
        before = (server.status, server.weight)
        if cmd == "remove":
            now = req.get("now", False)
            if not isinstance(now, bool):
                return {"error": f'remove: "now" must be true or false, got {now!r}'}
            if now:
                balancer.remove_server(name, clock())
            else:
                balancer.retire_server(name)
            gone = name not in balancer.pool
            if health is not None:
                follow_pool(health, balancer, clock())
            reply = _server_reply(name, server, before, [f"servers.{name}:{'removed' if gone else 'removing'}"])
            reply["status"] = "removed" if gone else str(server.status)
            reply["active"] = server.active
            return reply
        if server.leaving and cmd in ("drain", "up"):
            return {"error": f"{cmd}: {name} is being removed ({server.active} sessions left)"}
        if cmd == "drain":
            balancer.drain(name)
        elif cmd == "weight":
            weight = req.get("weight")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                return {"error": f'weight: "weight" must be an integer >= 0, got {weight!r}'}
            balancer.set_weight(name, weight)
        elif cmd == "down":
            balancer.mark_down(name, clock(), DownReason.ADMIN)
        else:
            if health is not None and name in health and not health.is_up(name):
                state = health.state(name)
                return {
                    "error": f"up: {name} fails its health check ({state.label}, last: {state.last_detail or '-'}); "
                    f"it comes back by itself after {state.rise} passing probes"
                }
            balancer.mark_up(name)
        changes = []
        if server.status is not before[0]:
            changes.append(f"servers.{name}.status:{before[0]}->{server.status}")
        if server.weight != before[1]:
            changes.append(f"servers.{name}.weight:{before[1]}->{server.weight}")
        return _server_reply(name, server, before, changes)

    def add(req: Request) -> Reply:
        table = req.get("server")
        if not isinstance(table, dict):
            return {"error": 'add: "server" must be an object with the keys of a [[servers]] entry'}
        roles = {p.port_id: p.role for p in balancer.config.ports}
        try:
            config = read_server(Section("add", "", table), roles, {})
            server = balancer.add_server(config)
        except ConfigError as exc:
            return {"error": str(exc)}
        if health is not None:
            follow_pool(health, balancer, clock())
        return _server_reply(config.name, server, (ServerStatus.DOWN, 0), [f"servers.{config.name}:added"])

    def set_algorithm(req: Request) -> Reply:
        name, params = req.get("name"), req.get("params", {})
        if not isinstance(name, str) or name not in algorithm_names():
            return {"error": f"algorithm: unknown algorithm {name!r}; choose from {', '.join(algorithm_names())}"}
        if not isinstance(params, dict):
            return {"error": f'algorithm: "params" must be an object, got {params!r}'}
        before = (balancer.config.algorithm, dict(balancer.config.algorithm_params))
        try:
            balancer.set_algorithm(name, params)
        except (ValueError, TypeError) as exc:
            return {"error": f"algorithm: {name}: {exc}"}
        changes = []
        if before[0] != name:
            changes.append(f"algorithm:{before[0]}->{name}")
        if before[1] != params:
            changes.append(f"algorithm_params:{show_value(before[1])}->{show_value(params)}")
        return {"ok": True, "algorithm": name, "params": params, "changes": changes}

    def set_limit(req: Request) -> Reply:
        name, value = req.get("name"), req.get("value")
        if name not in LIMITS:
            return {"error": f"limit: unknown limit {name!r}; limits: {', '.join(LIMITS)}"}
        try:
            value = _limit_value(name, value)
        except ValueError as exc:
            return {"error": str(exc)}
        before = getattr(balancer.admission, name)
        if name == "max_sessions":
            balancer.set_limits(max_sessions=int(value))
        else:
            balancer.set_limits(max_new_per_second=float(value))
        after = getattr(balancer.admission, name)
        changes = [f"limits.{name}:{before}->{after}"] if after != before else []
        return {"ok": True, "limit": name, "value": after, "changes": changes}

    def sessions(req: Request) -> Reply:
        state, server, limit = req.get("state"), req.get("server"), req.get("limit", 100)
        states = [str(s) for s in SessionState]
        if state is not None and state not in states:
            return {"error": f"sessions: unknown state {state!r}; states: {', '.join(states)}"}
        if server is not None and server not in balancer.pool:
            known = ", ".join(s.name for s in balancer.pool.servers)
            return {"error": f"sessions: no server named {server!r} (servers: {known or 'none'})"}
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_SESSION_ROWS:
            return {"error": f'sessions: "limit" must be an integer from 0 to {MAX_SESSION_ROWS}, got {limit!r}'}
        total, found = balancer.sessions.oldest(
            limit,
            state=None if state is None else SessionState(state),
            server=None if server is None else balancer.pool.get(server),
        )
        now = clock()
        return {"ok": True, "total": total, "sessions": [session_row(balancer, s, now) for s in found]}

    return command


def session_row(balancer: Balancer, session: Session, now: float) -> dict[str, Any]:
    """One session as the ``sessions`` command shows it (times in seconds relative to ``now``)."""
    key, switching = session.key, balancer.switching
    c2s, s2c = session.c2s, session.s2c
    (c2s_packets, c2s_bytes), (s2c_packets, s2c_bytes) = switching.traffic(c2s), switching.traffic(s2c)
    ending_at = balancer.sessions.ending_at[session.pair]
    return {
        "c2s": c2s,
        "s2c": s2c,
        "proto": key.proto,
        "client": f"{_address(key.src)}:{key.sport}",
        "vip": f"{_address(key.dst)}:{key.dport}",
        "server": session.server.config.name,
        "state": str(session.state),
        "age": now - session.started,
        "idle": now - switching.last_active(c2s, s2c),
        "deadline_in": session.deadline - now,
        "ending_for": now - ending_at if session.state is SessionState.ENDING else None,
        "c2s_packets": c2s_packets,
        "c2s_bytes": c2s_bytes,
        "s2c_packets": s2c_packets,
        "s2c_bytes": s2c_bytes,
    }


def _address(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))
