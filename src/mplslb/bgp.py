"""The node's BGP speaker: a stock BIRD 2 the daemon runs as its child, announcing the node's addresses to its
routers only while the node is healthy.

Theory of operation
-------------------
Several balancer nodes sit behind ECMP routers that learn the virtual IPs and the nodes' MPLS-in-UDP service
addresses by BGP; every healthy node announces the same prefixes (anycast), and a router spreads flows over the
nodes announcing them. ``[bgp]`` in the daemon's configuration (:func:`read_bgp`) makes the daemon write a BIRD
configuration (:func:`bird_config`) and start ``bird -f`` as its child, in its network namespace, with
``PR_SET_PDEATHSIG``: a daemon killed outright takes its speaker with it, the BGP session closes and the routers
withdraw the node at once instead of after the hold time.

The announced prefixes are static routes (blackholes, never installed here: the speaker has no kernel protocol) of
one BIRD ``static`` protocol per family, exported to the BGP neighbours only. The configuration starts that
protocol disabled; announcing is ``enable announce4``, withdrawing ``disable announce4``, sent on BIRD's control
socket. So a speaker that restarts, or a daemon that has not yet judged itself healthy, announces nothing, and one
command withdraws everything of a family at once. (The alternative, routes in a kernel table BIRD imports, needs
routes in the node's kernel that traffic must never follow and leaves them behind a killed daemon.)

The node is healthy when its packet loop is alive (it beats every :data:`BEAT_INTERVAL`; a beat older than
``loop_timeout`` withdraws), at least one server is up, and, with clustering, its session state is synced. The
daemon's loop computes that and calls :meth:`BgpSpeaker.beat`; the speaker's own thread talks to BIRD, so a slow or
absent BIRD never stalls the packet loop, and a stalled loop stops beating and is withdrawn.

BFD (``bfd = true``, BIRD's ``protocol bfd``) takes a node whose link is cut out of the routers' ECMP set within
``bfd_interval * bfd_multiplier``; without it the BGP hold time (3 s at least) decides.

``mplslb status`` shows each neighbour's session (state and uptime, from ``show protocols`` and ``show status``) and
what is exported to it (``show route export``). BIRD's replies are parsed sans-I/O (:func:`reply_lines`,
:func:`parse_protocols`, :func:`parse_routes`, :func:`parse_server_time`).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mplslb.config import Section
from mplslb.logfmt import value

log = logging.getLogger("mplslb.bgp")

#: How often the daemon's loop tells the speaker it is alive and whether the node is healthy (seconds).
BEAT_INTERVAL = 0.2
#: How often the speaker reads BIRD's state for the status (seconds).
STATUS_INTERVAL = 1.0
#: One BIRD command's reply may take this long at most (seconds).
COMMAND_TIMEOUT = 2.0
STOP_TIMEOUT = 3.0
PR_SET_PDEATHSIG = 1
AS_MAX = 4294967295
STATIC_NAME = {4: "announce4", 6: "announce6"}
_FINAL = re.compile(r"^(\d{4}) ")
_CODED = re.compile(r"^(\d{4})[ -](.*)$")
_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?"
_PROTOCOL = re.compile(rf"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+({_TIME}|\S+)\s*(.*?)\s*$")
_SERVER_TIME = re.compile(rf"Current server time is ({_TIME})")


@dataclass(frozen=True)
class BgpConfig:
    """``[bgp]``: the node's AS, its routers (neighbours, all in ``neighbor_as``) and what it announces."""

    local_as: int
    router_id: str
    neighbors: tuple[str, ...]
    neighbor_as: int
    announce: tuple[str, ...]  # prefixes, "10.0.0.100/32"
    bfd: bool = True
    bfd_interval: float = 0.1  # seconds, both ways
    bfd_multiplier: int = 3
    hold_time: int = 3
    keepalive_time: int = 1
    loop_timeout: float = 2.0
    bird: str = "bird"
    state_dir: str = ""  # BIRD's configuration and control socket; "" for /run/mplslb/bgp-<pid>, removed at exit

    def families(self) -> set[int]:
        return {ipaddress.ip_network(p).version for p in self.announce}

    def peer_names(self) -> dict[str, str]:
        """BIRD protocol name -> neighbour address."""
        return {f"peer{i + 1}": addr for i, addr in enumerate(self.neighbors)}


def read_bgp(top: Section, default_announce: Iterable[str]) -> BgpConfig | None:
    """The ``[bgp]`` table, None when absent. ``announce`` defaults to ``default_announce`` (the VIPs and the
    MPLS-in-UDP ports' addresses) of the neighbours' families. A bad value names its key."""
    sec = top.section("bgp")
    if not sec.table:
        sec.done()
        return None
    local_as = sec.require("local_as", int)
    neighbor_as = sec.require("neighbor_as", int)
    for key, number in (("local_as", local_as), ("neighbor_as", neighbor_as)):
        if not 1 <= number <= AS_MAX:
            raise sec.error(key, f"an AS number is within 1..{AS_MAX}, got {number}")
    router_id = sec.require("router_id", str)
    try:
        ipaddress.IPv4Address(router_id)
    except ValueError as exc:
        raise sec.error("router_id", f"a router id is written as an IPv4 address: {exc}") from None
    neighbors = sec.items("neighbors", str, [])
    if not neighbors:
        raise sec.error("neighbors", "at least one neighbour address is needed")
    families = {sec.convert("neighbors", n, ipaddress.ip_address).version for n in neighbors}
    if "announce" in sec.table:
        announce = sec.items("announce", str, [])
        prefixes = [str(sec.convert("announce", p, lambda t: ipaddress.ip_network(t, strict=True))) for p in announce]
        for prefix in prefixes:
            if ipaddress.ip_network(prefix).version not in families:
                raise sec.error("announce", f"{prefix}: no neighbour of its address family to announce it to")
    else:
        prefixes = [str(ipaddress.ip_network(a)) for a in default_announce]
        prefixes = [p for p in prefixes if ipaddress.ip_network(p).version in families]
    if not prefixes:
        raise sec.error("announce", "nothing to announce")
    bfd_interval = sec.number("bfd_interval", float, 0.1, minimum=0.01)
    hold_time = sec.number("hold_time", int, 3, minimum=3)
    keepalive_time = sec.number("keepalive_time", int, 1, minimum=1)
    if keepalive_time >= hold_time:
        raise sec.error("keepalive_time", f"must be below hold_time ({hold_time}), got {keepalive_time}")
    config = BgpConfig(
        local_as=local_as,
        router_id=router_id,
        neighbors=tuple(str(ipaddress.ip_address(n)) for n in neighbors),
        neighbor_as=neighbor_as,
        announce=tuple(dict.fromkeys(prefixes)),
        bfd=sec.get("bfd", bool, True),
        bfd_interval=bfd_interval,
        bfd_multiplier=sec.number("bfd_multiplier", int, 3, minimum=1),
        hold_time=hold_time,
        keepalive_time=keepalive_time,
        loop_timeout=sec.number("loop_timeout", float, 2.0, minimum=BEAT_INTERVAL * 2),
        bird=sec.get("bird", str, "bird"),
        state_dir=sec.get("state_dir", str, ""),
    )
    sec.done()
    return config


def _bfd_block(interval: float, multiplier: int) -> list[str]:
    ms = max(1, round(interval * 1000))
    return [
        "protocol bfd {",
        f'  interface "*" {{ min rx interval {ms} ms; min tx interval {ms} ms; multiplier {multiplier}; }};',
        "}",
    ]


_HEADER = [
    "log stderr all;",
    "timeformat protocol iso long;",
    "timeformat base iso long;",
    "timeformat route iso long;",
    "protocol device { scan time 10; }",
]


def bird_config(config: BgpConfig) -> str:
    """The node speaker's BIRD configuration: the announced prefixes in disabled static protocols, exported (next
    hop self) to each neighbour; nothing imported, nothing installed in the kernel."""
    lines = [f"router id {config.router_id};", *_HEADER]
    families = sorted(config.families())
    for family in families:
        name = STATIC_NAME[family]
        lines += [f"protocol static {name} {{", "  disabled yes;", f"  ipv{family};"]
        lines += [f"  route {p} blackhole;" for p in config.announce if ipaddress.ip_network(p).version == family]
        lines += ["}"]
    if config.bfd:
        lines += _bfd_block(config.bfd_interval, config.bfd_multiplier)
    for name, neighbor in config.peer_names().items():
        family = ipaddress.ip_address(neighbor).version
        lines += [
            f"protocol bgp {name} {{",
            f"  local as {config.local_as};",
            f"  neighbor {neighbor} as {config.neighbor_as};",
            f"  hold time {config.hold_time}; keepalive time {config.keepalive_time}; connect retry time 1;",
            "  error wait time 1, 5;",
            f"  bfd {'on' if config.bfd else 'off'};",
        ]
        if family in families:
            lines += [f'  ipv{family} {{ import none; export where proto = "{STATIC_NAME[family]}"; next hop self; }};']
        lines += ["}"]
    return "\n".join(lines) + "\n"


def router_bird_config(
    router_id: str,
    local_as: int,
    neighbors: Iterable[tuple[str, int]],
    *,
    bfd_interval: float = 0.1,
    bfd_multiplier: int = 3,
    hold_time: int = 3,
    names: Sequence[str] = (),
) -> str:
    """An ECMP router's BIRD configuration: BGP (with BFD) to each ``(address, AS)`` neighbour, every route they
    announce imported, and equal routes merged into one multipath kernel route (``merge paths``). ``names`` names
    the neighbours' protocols (``node1``, ``node2``... by default): a reconfiguration keeps a protocol whose name
    and settings stay, and its session with it."""
    lines = [f"router id {router_id};", *_HEADER]
    lines += ["protocol kernel {", "  ipv4 { import none; export all; };", "  merge paths on;", "}"]
    lines += _bfd_block(bfd_interval, bfd_multiplier)
    for i, (address, asn) in enumerate(neighbors):
        lines += [
            f"protocol bgp {names[i] if names else f'node{i + 1}'} {{",
            f"  local as {local_as};",
            f"  neighbor {address} as {asn};",
            f"  hold time {hold_time}; keepalive time 1; connect retry time 1;",
            "  error wait time 1, 5;",
            "  bfd on;",
            "  ipv4 { import all; export none; };",
            "}",
        ]
    return "\n".join(lines) + "\n"


# -- BIRD's replies, sans-I/O --------------------------------------------------------------------------------
class BirdError(RuntimeError):
    """BIRD refused a command (a reply code of 8000 and above)."""


def is_final(line: str) -> bool:
    """Whether ``line`` ends a reply on BIRD's control socket (a code followed by a space)."""
    return _FINAL.match(line) is not None


def reply_lines(text: str) -> list[tuple[int, str]]:
    """Each line of a reply as (code, text); a continuation line (leading space) has the code of the line before.
    Raises :class:`BirdError` for an error reply."""
    out: list[tuple[int, str]] = []
    code = 0
    for line in text.splitlines():
        match = _CODED.match(line)
        if match:
            code, line = int(match.group(1)), match.group(2)
        elif line.startswith(" "):
            line = line[1:]
        if code >= 8000:
            raise BirdError(line.strip() or f"error {code}")
        out.append((code, line))
    return out


@dataclass(frozen=True)
class Protocol:
    name: str
    proto: str
    table: str
    state: str
    since: str
    info: str


def parse_protocols(lines: list[tuple[int, str]]) -> list[Protocol]:
    """The rows of ``show protocols`` (code 1002)."""
    out = []
    for code, line in lines:
        if code != 1002:
            continue
        match = _PROTOCOL.match(line)
        if match:
            out.append(Protocol(*match.groups()))
    return out


def parse_routes(lines: list[tuple[int, str]]) -> list[str]:
    """The prefixes of ``show route`` (code 1007), in order."""
    out = []
    for code, line in lines:
        if code != 1007 or not line or line[0].isspace():
            continue
        first = line.split(None, 1)[0]
        try:
            out.append(str(ipaddress.ip_network(first)))
        except ValueError:
            continue
    return out


def parse_server_time(lines: list[tuple[int, str]]) -> dt.datetime | None:
    """BIRD's clock, from ``show status``."""
    for _, line in lines:
        match = _SERVER_TIME.search(line)
        if match:
            return _parse_time(match.group(1))
    return None


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def peer_rows(
    protocols: list[Protocol],
    peers: dict[str, str],
    exported: dict[str, list[str]],
    now: dt.datetime | None,
) -> list[dict[str, Any]]:
    """One status row per configured neighbour: its session's state, for how long, and what it is sent."""
    by_name = {p.name: p for p in protocols}
    rows = []
    for name, address in peers.items():
        proto = by_name.get(name)
        since = _parse_time(proto.since) if proto is not None else None
        uptime = (now - since).total_seconds() if proto is not None and since and now else None
        established = proto is not None and proto.state == "up" and proto.info.startswith("Established")
        rows.append(
            {
                "name": name,
                "neighbor": address,
                "state": (proto.info.split()[0] if proto.info else proto.state) if proto is not None else "unknown",
                "established": established,
                "since": proto.since if proto is not None else "",
                "uptime_s": max(uptime, 0.0) if uptime is not None else None,
                "info": proto.info if proto is not None else "",
                "announced": exported.get(name, []) if established else [],
            }
        )
    return rows


# -- talking to BIRD -------------------------------------------------------------------------------------------
class BirdControl:
    """A connection to BIRD's control socket: one command at a time, each reply read to its final line."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self.file = self.sock.makefile("r", encoding="utf-8", errors="replace", newline="\n")
            self._read()  # the greeting
        except BaseException:
            self.sock.close()
            raise

    def _read(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("BIRD closed its control socket")
            lines.append(line)
            if is_final(line):
                return "".join(lines)

    def command(self, text: str) -> list[tuple[int, str]]:
        self.sock.sendall(text.encode() + b"\n")
        return reply_lines(self._read())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Wanted:
    healthy: bool = False
    reason: str = "starting"
    beat_at: float = field(default_factory=lambda: float("-inf"))


class BgpSpeaker:
    """BIRD as the daemon's child, and the thread that keeps its announcements in step with the node's health."""

    def __init__(self, config: BgpConfig) -> None:
        self.config = config
        self.dir = Path(config.state_dir or f"/run/mplslb/bgp-{os.getpid()}")
        self._own_dir = not config.state_dir and not self.dir.exists()  # removed at close
        self.socket_path = str(self.dir / "bird.ctl")
        self.proc: subprocess.Popen[bytes] | None = None
        self._wanted = _Wanted()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._applied = False  # whether BIRD announces (its configuration starts with nothing announced)
        self._status: dict[str, Any] = {"announcing": False, "speaker": "starting", "pid": None, "peers": []}
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "bird.conf"
        conf.write_text(bird_config(config))
        bird = shutil.which(config.bird) or config.bird
        try:
            check = subprocess.run([bird, "-p", "-c", str(conf)], capture_output=True, text=True, check=False)
        except OSError as exc:
            raise RuntimeError(f"cannot run {bird!r} (BIRD 2, Debian package bird2): {exc.strerror or exc}") from None
        if check.returncode != 0:
            raise RuntimeError(f"BIRD refuses its configuration {conf}: {check.stderr.strip() or check.stdout}")
        self._argv = [bird, "-f", "-c", str(conf), "-s", self.socket_path]
        self._start_bird()
        self._thread = threading.Thread(target=self._run, name="bgp", daemon=True)
        self._thread.start()

    def _start_bird(self) -> None:
        # BIRD's log lines go to the daemon's stderr (journald, the lab's log file).
        self.proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._applied = False  # its configuration starts every announcement disabled
        self._status = {**self._status, "pid": self.proc.pid}
        log.info("event=bgp_speaker_started pid=%d socket=%s", self.proc.pid, value(self.socket_path))

    # -- the daemon's loop side --------------------------------------------------------------------------------
    def beat(self, healthy: bool, reason: str, now: float | None = None) -> None:
        """The loop is alive; announce if ``healthy``, else withdraw saying ``reason``."""
        with self._lock:
            changed = healthy != self._wanted.healthy
            self._wanted = _Wanted(healthy, reason, time.monotonic() if now is None else now)
        if changed:
            self._wake.set()

    def status(self) -> dict[str, Any]:
        return self._status

    # -- the speaker's thread ----------------------------------------------------------------------------------
    def _want(self) -> tuple[bool, str]:
        with self._lock:
            wanted = self._wanted
        if time.monotonic() - wanted.beat_at > self.config.loop_timeout:
            return False, "loop_stalled" if wanted.beat_at > float("-inf") else wanted.reason
        return wanted.healthy, wanted.reason

    def _run(self) -> None:
        control: BirdControl | None = None
        next_status = 0.0
        while not self._stop.is_set():
            self._wake.wait(BEAT_INTERVAL)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("event=bgp_speaker_exited status=%s restarting=yes", self.proc.returncode)
                if control is not None:
                    control.close()
                    control = None
                self._status = {**self._status, "speaker": "exited", "announcing": False, "peers": []}
                time.sleep(1.0)
                self._start_bird()
                continue
            want, reason = self._want()
            try:
                if control is None:
                    control = BirdControl(self.socket_path)
                if want != self._applied:
                    self._apply(control, want, reason)
                    next_status = 0.0  # show the change at once
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_INTERVAL
                    self._status = self._read_status(control, want, reason)
            except (OSError, ConnectionError, BirdError) as exc:
                if control is not None:
                    control.close()
                    control = None
                self._status = {**self._status, "speaker": f"unreachable: {exc}"}
        if control is not None:
            control.close()

    def _apply(self, control: BirdControl, want: bool, reason: str) -> None:
        verb = "enable" if want else "disable"
        for family in sorted(self.config.families()):
            control.command(f"{verb} {STATIC_NAME[family]}")
        self._applied = want
        if want:
            log.warning("event=bgp_announce prefixes=%s", value(",".join(self.config.announce)))
        else:
            log.warning(
                "event=bgp_withdraw reason=%s prefixes=%s", value(reason), value(",".join(self.config.announce))
            )

    def _read_status(self, control: BirdControl, want: bool, reason: str) -> dict[str, Any]:
        protocols = parse_protocols(control.command("show protocols"))
        now = parse_server_time(control.command("show status"))
        peers = self.config.peer_names()
        exported = {name: self._exported(control, name) for name in peers}
        return {
            "speaker": "running",
            "pid": self.proc.pid if self.proc is not None else None,
            "healthy": want,
            "reason": "" if want else reason,
            "announcing": bool(self._applied),
            "prefixes": list(self.config.announce),
            "local_as": self.config.local_as,
            "router_id": self.config.router_id,
            "bfd": self.config.bfd,
            "peers": peer_rows(protocols, peers, exported, now),
        }

    @staticmethod
    def _exported(control: BirdControl, peer: str) -> list[str]:
        """What BIRD sends ``peer``; nothing while its session is down (BIRD answers "No valid tables")."""
        try:
            return parse_routes(control.command(f"show route export {peer}"))
        except BirdError:
            return []

    def close(self) -> None:
        """Withdraw everything, then stop BIRD (its sessions close with a Cease, so the routers withdraw too)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(STOP_TIMEOUT)
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                self._stop_bird(proc)
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_bird(self, proc: subprocess.Popen[bytes]) -> None:
        if self._applied:
            try:
                control = BirdControl(self.socket_path, timeout=1.0)
                try:
                    self._apply(control, False, "stopping")
                finally:
                    control.close()
            except (OSError, ConnectionError, BirdError) as exc:
                log.warning("event=bgp_withdraw_failed reason=%s", value(str(exc)))
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
