"""The persistent state (mplslb.state): a balancer built over a state directory adopts the sessions, label pairs and
label switching entries a previous one left there, refuses state it cannot trust (saying why), and never adopts an
entry that disagrees with its session, whatever instant the previous one was killed at."""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

from helpers import DAEMON_TOML, PORT_MAC, SERVERS, client_tcp, labelled, reply_tcp_packet, standard_config
from mplslb import labels as labels_module
from mplslb import sessions as sessions_module
from mplslb import state as state_module
from mplslb.balancer import Balancer
from mplslb.config import BalancerConfig
from mplslb.sessions import LIVE_STATES, SessionState
from mplslb.state import HUGE_PAGE, STATE_FILE, StateStore, open_balancer
from mplslb.switching import table as table_module
from mplslb.switching.layout import LABEL_SPACE, ROW_SIZE
from mplslb.switching.table import flow_key
from mplslb.wire.tcp import TCPFlag

SYN, ACK, RST = int(TCPFlag.SYN), int(TCPFlag.ACK), int(TCPFlag.RST)
C2S_MIN, C2S_MAX = 17, 17 + 2 * 31  # 32 pairs: small tables, fast tests
CONFIG = standard_config(c2s_min=C2S_MIN, c2s_max=C2S_MAX, label_quarantine=30.0, endpoint_flow_timeout=30.0)
SERVER_MAC = {s.name: s.mac for s in SERVERS}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def build(state_dir: Path, config: BalancerConfig = CONFIG, *, now: float = 1.0, fresh: bool = False) -> Balancer:
    balancer, store, _ = open_balancer(config, state_dir, now=now, fresh=fresh)
    balancer.store = store  # type: ignore[attr-defined]  # kept for close()
    return balancer


def close(balancer: Balancer) -> None:
    balancer.store.close()  # type: ignore[attr-defined]


def open_session(balancer: Balancer, sport: int, now: float = 1.0) -> int:
    """An established TCP session from client 0's port ``sport`` (SYN, SYN-ACK, ACK); returns its C2S label."""
    out = balancer.receive(0, client_tcp(SYN, sport=sport), now)
    assert len(out) == 1, balancer.drops
    c2s = _label(out[0][1])
    server = balancer.sessions.by_c2s(c2s)
    assert server is not None
    reply = labelled(PORT_MAC[server.server.config.port_id], server.server.mac, c2s + 1,
                     reply_tcp_packet(SYN | ACK, sport=sport))  # fmt: skip
    assert len(balancer.receive(server.server.config.port_id, reply, now)) == 1
    assert len(balancer.receive(0, client_tcp(ACK, sport=sport), now)) == 1  # the handshake completes
    assert server.state is SessionState.ESTABLISHED
    return c2s


def _label(frame: bytes) -> int:
    return int.from_bytes(frame[14:17], "big") >> 4


def forward_c2s(balancer: Balancer, c2s: int, *, sport: int = 0) -> tuple[int, bytes]:
    """Where a labelled client frame of ``c2s``'s session (from ``sport`` if given) goes: (port, next hop MAC);
    (-1, b"") when dropped."""
    from helpers import client_addr, client_mac, ip_packet, tcp_segment
    from mplslb.wire.ip import IPPROTO_TCP

    session = balancer.sessions.by_c2s(c2s)
    sport = sport or (session.key.sport if session is not None else 1)
    src, dst = client_addr(0), CONFIG.vips[0].address
    packet = ip_packet(src, dst, IPPROTO_TCP, tcp_segment(src, dst, sport, 80, ACK, b""))
    out = balancer.receive(0, labelled(PORT_MAC[0], client_mac(0), c2s, packet), 5.0)
    return (out[0][0], out[0][1][:6]) if out else (-1, b"")


def test_without_a_store_the_tables_keep_their_heap_arrays() -> None:
    balancer = Balancer(CONFIG)
    assert isinstance(balancer.sessions.state, bytearray) and isinstance(balancer.sessions.deadline, array)
    assert isinstance(balancer.switching.rows.obj, mmap.mmap)  # an anonymous mapping of its own
    assert balancer.switching.rows.nbytes == ROW_SIZE * LABEL_SPACE
    assert np.frombuffer(balancer.switching.rows, dtype=np.uint8).ctypes.data % HUGE_PAGE == 0  # whole huge pages
    assert balancer.switching.out_port[20] == balancer.switching.in_port[20] == -1
    assert not balancer.switching._persistent


def _mapping_of(address: int) -> dict[str, str]:
    """The fields of this process's mapping (``/proc/self/smaps``) that holds ``address``."""
    found: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            if inside:
                break
            inside = low <= address < high
        elif inside:
            key, _, value = line.partition(":")
            found[key] = value.strip()
    return found


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8, count=1).ctypes.data)


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are disabled in this kernel")
def test_the_heap_tables_ask_for_huge_pages() -> None:
    balancer = Balancer(CONFIG)
    rows = _mapping_of(_address(balancer.switching.rows))
    assert "hg" in rows["VmFlags"].split()  # MADV_HUGEPAGE, before the rows were touched
    assert int(rows["AnonHugePages"].split()[0]) * 1024 >= HUGE_PAGE  # and granted
    assert state_module.huge_pages_of(balancer.switching.rows) == int(rows["AnonHugePages"].split()[0]) * 1024
    if _thp_mode() == "madvise":  # only what is advised gets huge pages: a heap array has ordinary ones
        assert state_module.huge_pages_of(balancer.sessions.state) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_a_state_directory_on_a_huge_page_tmpfs_puts_the_rows_on_huge_pages(tmp_path: Path) -> None:
    """On a tmpfs that gives huge pages to the ranges advised so (``huge=advise``), the rows of a new state file
    start at a huge page's offset and are advised: the persistent rows are on huge pages as the heap's are."""
    mount = tmp_path / "huge"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=advise,size=512m", "mlbhuge", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode:
        pytest.skip(f"a tmpfs with huge=advise cannot be mounted here: {made.stderr.strip()}")
    try:
        balancer = build(mount / "state")
        rows = _mapping_of(_address(balancer.switching.rows))
        assert "hg" in rows["VmFlags"].split()
        assert int(rows["ShmemPmdMapped"].split()[0]) * 1024 >= HUGE_PAGE
        assert state_module.huge_pages_of(balancer.switching.rows) == int(rows["ShmemPmdMapped"].split()[0]) * 1024
        c2s = open_session(balancer, 40000)
        close(balancer)
        del balancer
        again = build(mount / "state")  # adopted from the same file, rows and all
        assert again.sessions.by_c2s(c2s) is not None
        assert "hg" in _mapping_of(_address(again.switching.rows))["VmFlags"].split()
        close(again)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_sessions_labels_and_entries_survive_a_restart(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(state_dir)
    labels = [open_session(first, 40000 + i) for i in range(5)]
    where = {c2s: forward_c2s(first, c2s) for c2s in labels}
    servers = {c2s: first.sessions.by_c2s(c2s).server.config.name for c2s in labels}  # type: ignore[union-attr]
    # One session ends: its pair goes to quarantine with its release time.
    first.receive(0, client_tcp(RST | ACK, sport=40004), 2.0)
    first.on_timer(4.5)  # after the closed session's linger
    assert first.labels.is_quarantined(labels[4])
    release = first.labels.next_deadline()
    active = {s.name: s.active for s in first.pool}
    close(first)
    del first

    caplog.set_level(logging.INFO, "mplslb.state")
    second = build(state_dir, now=5.0)
    assert "event=state_adopted sessions=4 live=4 quarantined=1" in caplog.text
    assert len(second.sessions) == 4 and second.live == 4
    assert {s.name: s.active for s in second.pool} == active
    for c2s in labels[:4]:
        session = second.sessions.by_c2s(c2s)
        assert session is not None and session.server.config.name == servers[c2s]
        assert forward_c2s(second, c2s) == where[c2s]
    # The flow-key index was rebuilt: an unlabelled frame of an existing session finds it.
    out = second.receive(0, client_tcp(ACK, b"GET / HTTP/1.1\r\n\r\n", sport=40001), 5.0)
    assert len(out) == 1 and _label(out[0][1]) == labels[1]
    # The quarantine was rebuilt from the release times: the ended pair is not handed out before its time.
    assert second.labels.is_quarantined(labels[4]) and second.labels.next_deadline() == release
    assert second.labels.in_use_count == 4
    fresh_c2s = open_session(second, 41000, now=5.0)
    assert fresh_c2s not in labels
    # Ending an adopted session counts off its server.
    server = second.sessions.by_c2s(labels[0]).server  # type: ignore[union-attr]
    before = server.active
    second.receive(0, client_tcp(RST | ACK, sport=40000), 4.0)
    second.on_timer(6.5)
    assert server.active == before - 1 and second.sessions.by_c2s(labels[0]) is None
    close(second)


def test_the_labels_last_acks_survive_a_restart(state_dir: Path) -> None:
    """An RST after a restart is judged by the server's last ACK from before it: a wrong sequence number is not
    believed, the right one is."""
    first = build(state_dir)
    c2s = open_session(first, 40000)
    ack = first.switching.acks[c2s + 1]
    assert ack  # the server's SYN-ACK acknowledged the SYN
    close(first)
    del first
    second = build(state_dir, now=2.0)
    assert second.switching.acks[c2s + 1] == ack
    session = second.sessions.by_c2s(c2s)
    assert session is not None
    wrong = (ack + (1 << 31)) & 0xFFFF_FFFF
    for seq, state in ((wrong, SessionState.ESTABLISHED), (ack & 0xFFFF_FFFF, SessionState.ENDING)):
        assert len(second.receive(0, client_tcp(RST, sport=40000, seq=seq), 2.0)) == 1
        assert session.state is state
    assert second.sessions.not_believed == {"rst_out_of_window": 1}
    close(second)


def test_an_unanswered_syn_waits_again_after_a_restart(state_dir: Path) -> None:
    """The answer to a SYN may come while no daemon runs: the restart's gap is not the server's failure."""
    first = build(state_dir)
    out = first.receive(0, client_tcp(SYN, sport=40000), 1.0)
    c2s = _label(out[0][1])
    close(first)
    second = build(state_dir, now=30.0)  # long after the SYN's deadline (tcp_start 10 s)
    second.on_timer(30.5)
    session = second.sessions.by_c2s(c2s)
    assert session is not None and session.server.failures == 0
    server = session.server.config
    reply = labelled(PORT_MAC[server.port_id], server.mac, c2s + 1, reply_tcp_packet(SYN | ACK, sport=40000))
    assert len(second.receive(server.port_id, reply, 31.0)) == 1
    assert session.state is SessionState.ANSWERED
    assert len(second.receive(0, client_tcp(ACK, sport=40000), 31.0)) == 1
    assert session.state is SessionState.ESTABLISHED
    second.on_timer(45.0)  # the established session's idle timeout is minutes
    assert second.sessions.by_c2s(c2s) == session and session.server.failures == 0
    close(second)


def test_flow_bindings_half_open_and_ending_sessions_survive_a_restart(state_dir: Path) -> None:
    """What main derives from the rows comes back: each label's flow binding (a frame of another flow under a
    session's label is still dropped as label_wrong_flow), an ENDING session (counted for no server, closed at its
    close's time plus the linger when quiet), and the half-open sessions oldest first."""
    first = build(state_dir)
    bound, ending = open_session(first, 40000), open_session(first, 40001)
    first.receive(0, client_tcp(RST | ACK, sport=40001), 2.0)  # the client resets: ENDING, lingering
    assert first.sessions.by_c2s(ending).state is SessionState.ENDING  # type: ignore[union-attr]
    half = [_label(first.receive(0, client_tcp(SYN, sport=42000 + i), 2.0 + i / 10)[0][1]) for i in range(3)]
    flows = {label: first.switching.flow[label] for label in (bound, bound + 1, ending, ending + 1)}
    active = {s.name: s.active for s in first.pool}
    assert (first.live, first.sessions.half_open) == (4, 3)
    close(first)
    del first

    second = build(state_dir, now=2.5)
    assert {label: second.switching.flow[label] for label in flows} == flows
    assert all(second.switching.bound[label] for label in flows)
    assert forward_c2s(second, bound)[0] == 2  # its own flow goes to its server ...
    wrong = second.drops.get("label_wrong_flow", 0) + second.switching.drops.get("label_wrong_flow", 0)
    assert forward_c2s(second, bound, sport=40009) == (-1, b"")  # ... another flow under its label does not
    assert second.drops.get("label_wrong_flow", 0) + second.switching.drops.get("label_wrong_flow", 0) == wrong + 1
    # The ENDING session: kept, counted for no server, closing at its close's time plus the linger.
    session = second.sessions.by_c2s(ending)
    assert session is not None and session.state is SessionState.ENDING
    assert second.sessions.ending_at[session.pair] == 2.0
    assert session.deadline == 2.0 + CONFIG.timeouts.closed_linger
    assert {s.name: s.active for s in second.pool} == active and second.live == 4
    # The half-open sessions: counted, evicted oldest first, their wait started again at the adoption.
    assert second.sessions.half_open == 3
    oldest = second.sessions.oldest_half_open()
    assert oldest is not None and oldest.c2s == half[0] and oldest.deadline == 2.5 + CONFIG.timeouts.tcp_start
    second.on_timer(4.5)  # past the linger, nothing of the ENDING session passed since its close: closed
    assert second.sessions.by_c2s(ending) is None and second.labels.is_quarantined(ending)
    assert second.sessions.by_c2s(bound) is not None and second.sessions.half_open == 3
    close(second)


def test_servers_by_address_take_the_mac_their_sessions_hold(state_dir: Path) -> None:
    """A server configured by its address alone is known by the MAC its adopted sessions' labels hold: it takes new
    sessions at once, while the resolver confirms the MAC (STALE, probed from the adoption)."""
    from mplslb.resolver import NeighborState
    from test_resolver import arp_reply

    config = replace(CONFIG, servers=tuple(replace(s, mac=b"") for s in SERVERS))
    first = build(state_dir, config)
    for server in SERVERS:
        assert first.receive(server.port_id, arp_reply(server.mac, server.address, PORT_MAC[server.port_id]), 1.0) == []
    assert all(s.mac == SERVER_MAC[s.name] for s in first.pool)
    labels = [open_session(first, 40000 + i) for i in range(3)]
    close(first)
    second = build(state_dir, config, now=2.0)
    assert all(second.sessions.by_c2s(c2s) is not None for c2s in labels)
    assert {s.name: s.mac for s in second.pool} == {s.name: SERVER_MAC[s.name] for s in SERVERS}
    assert all(n.state is NeighborState.STALE for n in second.resolver.neighbors.values())
    assert second.resolver.next_deadline() == 2.0  # confirmed at once
    open_session(second, 41000, now=2.0)  # a new session needs no ARP reply first
    close(second)


def test_a_changed_configuration_is_refused_and_moved_aside(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(state_dir)
    open_session(first, 40000)
    close(first)
    caplog.set_level(logging.INFO, "mplslb.state")
    other = replace(CONFIG, c2s_max=C2S_MAX + 2)
    second = build(state_dir, other)
    assert "event=state_not_adopted reason=config_changed fields=labels" in caplog.text
    assert len(second.sessions) == 0
    assert (state_dir / (STATE_FILE + ".old")).exists()
    close(second)
    third = build(state_dir, other)  # the new state is adopted next time
    assert "event=state_adopted sessions=0" in caplog.text
    close(third)


def test_fresh_starts_clean_on_purpose(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(state_dir)
    open_session(first, 40000)
    close(first)
    caplog.set_level(logging.INFO, "mplslb.state")
    second = build(state_dir, fresh=True)
    assert "reason=fresh_requested" in caplog.text and len(second.sessions) == 0
    close(second)


def test_a_changed_layout_is_refused(state_dir: Path) -> None:
    store = StateStore(state_dir, {"x": 1})
    store.array("a", "B", 10)[3] = 7
    assert not store.finish()
    store.close()
    store = StateStore(state_dir, {"x": 1})
    assert store.array("a", "B", 10)[3] == 7 and store.finish()
    store.close()
    store = StateStore(state_dir, {"x": 1})
    store.array("a", "I", 10)
    assert store.reason == "reason=layout_changed field=a old=Bx10 new=Ix10"
    store.close()
    store = StateStore(state_dir, {"x": 1})
    store.array("a", "B", 10)
    store.array("b", "d", 4)
    assert not store.finish() and store.reason == "reason=layout_changed field=b old=absent new=dx4"
    store.close()
    store = StateStore(state_dir, {"x": 2})
    assert store.reason == "reason=config_changed fields=x"
    store.close()


def test_a_torn_header_is_refused(state_dir: Path) -> None:
    build(state_dir).store.close()  # type: ignore[attr-defined]
    with open(state_dir / STATE_FILE, "r+b") as f:
        f.write(b"\0")
    store = StateStore(state_dir, {})
    assert store.reason == "reason=torn_header"
    store.close()


def test_the_state_directory_is_locked(state_dir: Path) -> None:
    first = build(state_dir)
    with pytest.raises(state_module.StateError, match="in use by another mplslb balancer"):
        StateStore(state_dir, {})
    close(first)


def test_servers_are_mapped_by_name(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(state_dir)
    labels = [open_session(first, 40000 + i) for i in range(6)]
    names = {c2s: first.sessions.by_c2s(c2s).server.config.name for c2s in labels}  # type: ignore[union-attr]
    close(first)
    assert set(names.values()) == {"s1", "s2", "s3"}
    # s2 is gone, s3 and s1 swapped places in the list: indices change, names do not.
    caplog.set_level(logging.INFO, "mplslb.state")
    second = build(state_dir, replace(CONFIG, servers=(SERVERS[2], SERVERS[0])))
    assert "repaired_server_gone=2" in caplog.text and "renumbered=4" in caplog.text
    for c2s, name in names.items():
        session = second.sessions.by_c2s(c2s)
        if name == "s2":
            assert session is None and second.labels.is_quarantined(c2s) and not second.switching.valid[c2s]
        else:
            assert session is not None and session.server.config.name == name
            assert forward_c2s(second, c2s)[1] == SERVER_MAC[name]
    assert {s.name: s.active for s in second.pool} == {"s3": 2, "s1": 2}
    close(second)
    third = build(state_dir, replace(CONFIG, servers=(SERVERS[2], SERVERS[0])))  # the new numbering was kept
    assert len(third.sessions) == 4
    assert all(third.sessions.by_c2s(c2s).server.config.name == n for c2s, n in names.items() if n != "s2")  # type: ignore[union-attr]
    close(third)


def test_a_server_moved_to_another_mac_loses_its_sessions(state_dir: Path) -> None:
    first = build(state_dir)
    labels = [open_session(first, 40000 + i) for i in range(3)]
    close(first)
    moved = replace(SERVERS[0], mac=b"\x02\x00\x00\x00\x00\x99")
    second = build(state_dir, replace(CONFIG, servers=(moved, *SERVERS[1:])))
    assert [second.sessions.by_c2s(c2s) is None for c2s in labels] == [True, False, False]
    close(second)


LB_TOML = DAEMON_TOML


def test_the_daemon_keeps_state_when_asked(tmp_path: Path) -> None:
    from mplslb.config import ConfigError
    from mplslb.daemon import load_daemon_config

    path = tmp_path / "edge-1.toml"
    path.write_text(LB_TOML)
    config = load_daemon_config(path)
    assert config.state_dir == "" and config.instance == "edge-1"  # off by default
    path.write_text(LB_TOML + "[state]\npersist = true\n")
    assert load_daemon_config(path).state_dir == "/run/mplslb/state/edge-1"
    path.write_text(LB_TOML + '[state]\npersist = true\ninstance = "a"\ndir = "/tmp/x"\n')
    config = load_daemon_config(path)
    assert (config.state_dir, config.instance) == ("/tmp/x", "a")
    for bad, key in (('instance = "../x"', "state.instance"), ('persist = false\ndir = "/tmp/x"', "state.dir"),
                     ("persist = 1", "state.persist"), ("keep = true", "state.keep")):  # fmt: skip
        path.write_text(LB_TOML + f"[state]\n{bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_daemon_config(path)


# -- crash safety --------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """The daemon died here (a BaseException: no handler of the code under test takes it for an error)."""


TRACED = {
    Path(m.__file__).resolve()  # type: ignore[arg-type]
    for m in (sessions_module, labels_module, table_module, state_module)
}


def run_until_killed(op: Callable[[], object], at: int | None, on_line: Callable[[], None]) -> int:
    """Run ``op``; at every line executed in the tables' modules call ``on_line`` and, at the ``at``-th, raise
    :class:`Killed`. Returns how many lines ran."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            on_line()
            if count == at:
                raise Killed
            count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if Path(frame.f_code.co_filename).resolve() in TRACED else None

    sys.settrace(tracer)
    try:
        op()
    except Killed:
        pass
    finally:
        sys.settrace(None)
    return count


class Snapshots:
    """The bytes of every persistent array for the pairs and labels of the test's label range, read from the file
    (what a process mapping it after a kill would see)."""

    def __init__(self, state_dir: Path, layout: list[tuple[str, str, int, int]]) -> None:
        self.fd = os.open(state_dir / STATE_FILE, os.O_RDONLY)
        self.names = state_dir / state_module.SERVERS_FILE
        self.slices: list[tuple[int, int]] = [(0, len(state_module.MAGIC))]  # the header's magic
        for name, typecode, count, offset in layout:
            size = array(typecode).itemsize
            if name.startswith("switching."):
                per = count // table_module.LABEL_SPACE
                first, last = C2S_MIN * per, (C2S_MAX + 2) * per
            else:
                first, last = 0, count
            self.slices.append((offset + first * size, (last - first) * size))
        self.states: list[tuple[bytes, bytes]] = []  # (the arrays' bytes, the server names file)

    def take(self) -> None:
        now = (b"".join(os.pread(self.fd, size, at) for at, size in self.slices), self.names.read_bytes())
        if not self.states or self.states[-1] != now:
            self.states.append(now)

    def write(self, state_dir: Path, state: tuple[bytes, bytes]) -> None:
        arrays, names = state
        fd = os.open(state_dir / STATE_FILE, os.O_WRONLY)
        try:
            at = 0
            for offset, size in self.slices:
                os.pwrite(fd, arrays[at : at + size], offset)
                at += size
        finally:
            os.close(fd)
        (state_dir / state_module.SERVERS_FILE).write_bytes(names)

    def close(self) -> None:
        os.close(self.fd)


def check_consistent(balancer: Balancer) -> None:
    """Every installed label belongs to a live session and is bound exactly as that session says; every live
    session has both labels and its pair in use; the pool counts what the table holds."""
    t, sessions = balancer.switching, balancer.sessions
    for label in np.flatnonzero(t.arrays().valid).tolist():
        c2s = label if label & 1 else label - 1
        session = sessions.by_c2s(c2s)
        assert session is not None, f"label {label} installed without its session"
        server, key = session.server.config, session.key
        if label == c2s:
            flow = flow_key(key.src, key.dst, (key.sport, key.dport))
            expect = (server.port_id, server.mac, session.client_port, session.client_mac, key.src, flow)
        else:
            flow = flow_key(key.dst, key.src, (key.dport, key.sport))
            expect = (session.client_port, session.client_mac, server.port_id, server.mac, key.dst, flow)
        got = (
            t.out_port[label],
            t.rewrite[label][:6],
            t.in_port[label],
            t.peer[label],
            t.peer_ip[label],
            t.flow[label],
        )
        assert got == expect, f"label {label}: entry {got} disagrees with its session {expect}"
    for session in sessions.sessions():
        assert t.valid[session.c2s] and t.valid[session.s2c] and balancer.labels.in_use(session.c2s)
    assert balancer.labels.in_use_count == len(sessions)
    stats = balancer.labels.stats()
    assert stats.in_use_count + stats.quarantined_count + stats.free_count == stats.capacity
    counts = {s.name: 0 for s in balancer.pool}
    for session in sessions.sessions():
        counts[session.server.config.name] += session.state in LIVE_STATES and session.state is not SessionState.ENDING
    assert {s.name: s.active for s in balancer.pool} == counts
    assert sessions.live == sum(counts.values())


def copy_dir(src: Path, dst: Path) -> None:
    """A copy of a state directory, holes kept (the file is mostly holes)."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name == STATE_FILE:
            with open(entry, "rb") as fin, open(dst / entry.name, "wb") as fout:
                size = os.fstat(fin.fileno()).st_size
                fout.truncate(size)
                at = 0
                while at < size:
                    try:
                        data = os.lseek(fin.fileno(), at, os.SEEK_DATA)
                    except OSError:
                        break
                    hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                    os.copy_file_range(fin.fileno(), fout.fileno(), hole - data, data, data)
                    at = hole
        elif entry.is_file():
            shutil.copy(entry, dst / entry.name)


def crash_states(base: Path, op: Callable[[Balancer], object]) -> Iterator[tuple[Path, int]]:
    """Every distinct state the file goes through while ``op`` runs on a balancer over a copy of ``base``, each
    written over another copy of ``base`` (the state a kill at that instant leaves)."""
    work = base.parent / "work"
    copy_dir(base, work)
    balancer = build(work)
    snaps = Snapshots(work, balancer.store.layout)  # type: ignore[attr-defined]
    yield from _crash_states(base, work, snaps, lambda: op(balancer), lambda: close(balancer))


def adoption_crash_states(base: Path, config: BalancerConfig) -> Iterator[tuple[Path, int]]:
    """The same for the adoption of ``base`` by a balancer with ``config``."""
    work = base.parent / "work"
    copy_dir(base, work)
    header = (work / STATE_FILE).read_bytes()[: state_module.HEADER_SIZE]
    length = int.from_bytes(header[12:16], sys.byteorder)
    layout = [tuple(f) for f in json.loads(header[16 : 16 + length])["layout"]]
    snaps = Snapshots(work, layout)  # type: ignore[arg-type]
    built: list[Balancer] = []
    yield from _crash_states(base, work, snaps, lambda: built.append(build(work, config, now=5.0)),
                             lambda: [close(b) for b in built])  # fmt: skip


def _crash_states(
    base: Path, work: Path, snaps: Snapshots, op: Callable[[], object], done: Callable[[], object]
) -> Iterator[tuple[Path, int]]:
    snaps.take()
    lines = run_until_killed(op, None, snaps.take)
    snaps.take()
    done()
    assert lines > 20 and len(snaps.states) > 5, (lines, len(snaps.states))
    for k, state in enumerate(snaps.states):
        crashed = base.parent / f"crash{k}"
        copy_dir(base, crashed)
        snaps.write(crashed, state)
        yield crashed, k
        shutil.rmtree(crashed)
    snaps.close()
    shutil.rmtree(work)


def new_session(balancer: Balancer) -> None:
    balancer.receive(1, client_tcp(SYN, sport=45000, port=1), 2.0)


def end_session(balancer: Balancer) -> None:
    balancer.receive(0, client_tcp(RST | ACK, sport=40001), 2.0)
    balancer.on_timer(4.5)


@pytest.mark.parametrize("op", [new_session, end_session])
def test_a_kill_at_any_instant_never_leaves_an_entry_at_odds_with_its_session(
    tmp_path: Path, op: Callable[[Balancer], None]
) -> None:
    base = tmp_path / "base"
    first = build(base)
    kept = [open_session(first, 40000 + i) for i in range(3)]
    where = {c2s: forward_c2s(first, c2s) for c2s in kept}
    close(first)
    seen: dict[str, int] = {}
    states = 0
    for crashed, _k in crash_states(base, op):
        states += 1
        adopted, store, report = open_balancer(CONFIG, crashed, now=5.0)
        assert report is not None
        for what, n in report.repaired.items():
            seen[what] = seen.get(what, 0) + n
        check_consistent(adopted)
        for c2s in kept:  # the sessions the operation did not touch are all there, forwarded as before
            if adopted.sessions.by_c2s(c2s) is not None:
                assert forward_c2s(adopted, c2s) == where[c2s]
        assert sum(adopted.sessions.by_c2s(c2s) is not None for c2s in kept) >= len(kept) - 1
        open_session(adopted, 47000, now=5.0)  # and it goes on working
        check_consistent(adopted)
        store.close()
    print(f"{op.__name__}: {states} distinct crash states adopted, repaired {seen}")
    assert seen, "no crash state needed a repair: the test does not cut where it should"


def test_a_kill_during_adoption_leaves_state_that_adopts_or_is_refused(tmp_path: Path) -> None:
    """Adoption writes too (repairs, renumbering): killed at any instant of it, the next adoption is consistent,
    or refuses a file left invalid on purpose (renumbering), never misroutes."""
    base = tmp_path / "base"
    first = build(base)
    kept = [open_session(first, 40000 + i) for i in range(6)]
    names = {c2s: first.sessions.by_c2s(c2s).server.config.name for c2s in kept}  # type: ignore[union-attr]
    stray = first.labels.allocate(1.0)  # a pair allocated and never used
    assert stray is not None
    orphan = stray + 2 * 3  # labels installed without their session
    first.switching.install(orphan, out_port=2, next_hop=SERVER_MAC["s1"], in_port=0, peer=b"\x02\0\0\0\0\1")
    close(first)
    config = replace(CONFIG, servers=(SERVERS[2], SERVERS[0]))  # s2 gone, s3 and s1 renumbered
    outcomes: dict[str, int] = {}
    for crashed, _k in adoption_crash_states(base, config):
        adopted, store, report = open_balancer(config, crashed, now=6.0)
        outcome = "adopted" if report is not None else store.reason
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome in ("adopted", "reason=torn_header"), outcome
        check_consistent(adopted)
        for c2s, name in names.items():
            session = adopted.sessions.by_c2s(c2s)
            if session is not None:
                assert name != "s2" and session.server.config.name == name
                assert forward_c2s(adopted, c2s)[1] == SERVER_MAC[name]
        store.close()
    print(f"adoption killed at each of its distinct states: {outcomes}")
    assert outcomes.get("adopted", 0) > 5


def test_names_are_written_before_a_row_refers_to_them(state_dir: Path) -> None:
    first = build(state_dir)
    open_session(first, 40000)
    names = json.loads((state_dir / state_module.SERVERS_FILE).read_text())
    server = first.sessions.sessions()[0].server
    assert names[f"server.{server.index}"] == server.config.name
    close(first)


# -- the kernel offload's pins -------------------------------------------------------------------------------------
from mplslb.drivers.netns import entered  # noqa: E402
from mplslb.offload.bpf import PIN_ROOT  # noqa: E402
from mplslb.offload.xdp import MAP_PIN, REQUEST_PIN, SYN_PIN, TICKET_PINS, XdpOffload  # noqa: E402
from test_offload import INSTALLS, A, B, C, E, needs_kernel, obj, offload_in, topo, xdp_state_in  # noqa: E402, F401


def remove_pins(pins: Path, lb: str, offload: XdpOffload) -> None:
    """Whatever happened: nothing of the test stays pinned."""
    with entered(lb):
        offload.close()
    if pins.is_dir():
        for entry in pins.iterdir():
            entry.unlink()
        pins.rmdir()


@needs_kernel
def test_pinned_offload_outlives_its_daemon_and_is_adopted(topo: tuple[str, str], obj: bytes) -> None:  # noqa: F811
    lb, _ = topo
    pins = PIN_ROOT / f"t{os.getpid() % 100000}"
    first = Balancer(CONFIG)
    for label in (A, B, E):
        first.switching.install(label, **INSTALLS[label])
    offload = offload_in(lb, first, obj, pins=pins)
    try:
        assert not offload.adopted and offload.entries == 3
        prog_ids = {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()}
        offload.close(keep=True)  # the daemon goes: its program stays attached, its map filled
        assert {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()} == prog_ids and 0 not in prog_ids
        links = {f"link_p{i}" for i in range(4)}
        kept_maps = {MAP_PIN, SYN_PIN, REQUEST_PIN, *TICKET_PINS.values()}
        assert {p.name for p in pins.iterdir()} == {*kept_maps, "prog", *links}
        # The next daemon's table (as adopted): A as it was, B rebound, C new, E gone.
        second = Balancer(CONFIG)
        second.switching.install(A, **INSTALLS[A])
        second.switching.install(B, **INSTALLS[B] | {"peer": b"\x02\x00\x00\x00\x00\x77"})
        second.switching.install(C, **INSTALLS[C])
        offload = offload_in(lb, second, obj, pins=pins)
        assert offload.adopted and not offload.upgraded
        assert {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()} == prog_ids  # the same program
        assert offload.entries == 3 and offload.lookup(E) is None and offload.lookup(C) is not None
        entry = offload.lookup(B)
        assert entry is not None and entry[3] == b"\x02\x00\x00\x00\x00\x77"
        offload.close(keep=True)
        # --fresh: everything pinned is let go and the program loaded anew.
        offload = offload_in(lb, second, obj, pins=pins, fresh=True)
        assert not offload.adopted and offload.entries == 3
        assert not {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()} & prog_ids
        with entered(lb):
            offload.close()  # not kept: unpinned and detached
        assert list(pins.iterdir()) == []
        assert all(xdp_state_in(lb, i)[1] == 0 for i in offload.ifindex.values())
    finally:
        remove_pins(pins, lb, offload)


@needs_kernel
def test_an_upgraded_program_is_swapped_in_over_the_pinned_map(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Another build of the program (here: one more instruction) replaces the pinned one on every port through its
    links, keeping the map and its entries."""
    from mplslb.offload.build import SOURCE, build_object

    for source in (SOURCE, *SOURCE.parent.glob("*.h")):
        shutil.copy(source, tmp_path / source.name)
    text = (tmp_path / SOURCE.name).read_text()
    marker = "int mplslb_xdp(struct xdp_md *ctx)\n{\n"
    assert marker in text
    (tmp_path / SOURCE.name).write_text(text.replace(marker, marker + '\tasm volatile("r0 = 0" ::: "r0");\n'))
    upgraded = build_object(tmp_path / SOURCE.name, directory=tmp_path / "cache")
    assert upgraded != obj
    lb, _ = topo
    pins = PIN_ROOT / f"u{os.getpid() % 100000}"
    balancer = Balancer(CONFIG)
    balancer.switching.install(A, **INSTALLS[A])
    offload = offload_in(lb, balancer, obj, pins=pins)
    try:
        before = {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()}
        offload.close(keep=True)
        offload = offload_in(lb, balancer, upgraded, pins=pins)
        assert offload.adopted and offload.upgraded and offload.entries == 1 and offload.lookup(A) is not None
        after = {xdp_state_in(lb, i)[1] for i in offload.ifindex.values()}
        assert len(after) == 1 and not after & before and 0 not in after
    finally:
        remove_pins(pins, lb, offload)


@needs_kernel
def test_flow_bound_entries_and_the_syn_buckets_are_adopted_as_they_are(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    state_dir: Path,
) -> None:
    """The kept map's entries carry the labels' flow binding: the adopted table rebuilds the same binding, so every
    entry is kept as it is (nothing rewritten) and the kept program still refuses another flow under a label. The
    SYN map is kept too, its buckets taking the new daemon's rate."""
    from helpers import VIP, ipv4, tcp_segment
    from mplslb.offload import bpf
    from mplslb.offload.xdp import syn_share
    from mplslb.switching.layout import F_FLOW, SYN_BUCKET
    from mplslb.wire.ip import IPPROTO_TCP
    from test_offload import C0, FLOW_INSTALLS, F, G, from_client, v4_tcp

    lb, _ = topo
    pins = PIN_ROOT / f"f{os.getpid() % 100000}"
    first = build(state_dir)
    for label, kwargs in FLOW_INSTALLS.items():
        first.switching.install(label, **kwargs)
    offload = offload_in(lb, first, obj, pins=pins, syn_rate=1000)
    try:
        assert offload.entries == len(FLOW_INSTALLS)
        offload.close(keep=True)
        close(first)
        second = build(state_dir)
        offload = offload_in(lb, second, obj, pins=pins, syn_rate=2000)
        assert offload.adopted and offload.entries == len(FLOW_INSTALLS) and offload.writes == 0
        for label in (F, G):
            entry = offload.lookup(label)
            assert entry is not None and entry[4] & F_FLOW
        other_flow = from_client(F, ipv4(C0, VIP, IPPROTO_TCP, tcp_segment(C0, VIP, 40001, 80, ACK)))
        with entered(lb):
            assert offload.run(from_client(F, v4_tcp(ACK)), 0).retval == bpf.XDP_REDIRECT
            assert offload.run(other_flow, 0).retval == bpf.XDP_PASS  # up to userspace, which drops it
        assert second.receive(0, other_flow, 3.0) == [] and second.switching.drops["label_wrong_flow"] == 1
        assert offload._syn is not None
        raw = offload._syn.lookup(b"\0\0\0\0") or b""
        assert {SYN_BUCKET.unpack_from(raw, at)[0] for at in range(0, len(raw), SYN_BUCKET.size)} == {
            syn_share(2000, os.cpu_count() or 1)
        }
    finally:
        remove_pins(pins, lb, offload)
        close(second if "second" in locals() else first)


@needs_kernel
def test_a_handshake_the_kernel_saw_while_no_daemon_ran_is_folded_by_the_next(
    topo: tuple[str, str],  # noqa: F811
    obj: bytes,  # noqa: F811
    state_dir: Path,
) -> None:
    """A new session's labels are in the kept map from its SYN on, measured there: the SYN-ACK and the client's ACK
    that the pinned program forwards while no daemon runs are recorded in its entry, which the next daemon keeps
    and folds at its first poll: the adopted session is established, not left to its half-open deadline. Its
    request, copied into its kept request slot meanwhile, is read then too (its Host counted)."""
    import socket

    from helpers import PORT_MAC, PSH, SYN, VIP, client_addr, client_mac, ether, ipv4, tcp_segment
    from mplslb.offload import bpf
    from mplslb.sessions import SessionState
    from mplslb.wire.ip import IPPROTO_TCP
    from test_offload import from_client, from_server, label_of, v4_tcp

    lb, _ = topo
    pins = PIN_ROOT / f"m{os.getpid() % 100000}"
    first = build(state_dir, now=time.monotonic())
    offload = offload_in(lb, first, obj, pins=pins, measured=first.measured)
    try:
        ((_, sent),) = first.receive(0, ether(PORT_MAC[0], client_mac(0), v4_tcp(SYN)), time.monotonic())
        offload.sync()
        c2s = label_of(sent)
        session = first.sessions.by_c2s(c2s)
        assert session is not None and offload.lookup(c2s) is not None and offload.lookup(c2s + 1) is not None
        port, mac = session.server.config.port_id, session.server.mac
        offload.close(keep=True)
        close(first)
        c0 = client_addr(0)
        synack = from_server(c2s + 1, ipv4(VIP, c0, IPPROTO_TCP, tcp_segment(VIP, c0, 80, 40000, SYN | ACK)),
                             port=port, mac=mac)  # fmt: skip
        request = from_client(c2s, v4_tcp(ACK | PSH, b"GET / HTTP/1.1\r\nHost: kept.example\r\n\r\n"))
        prog = bpf.obj_get(str(pins / "prog"))
        try:
            with entered(lb):
                for at, frame in ((port, synack), (0, from_client(c2s, v4_tcp(ACK))), (0, request)):
                    run = bpf.prog_test_run(prog, frame, ingress_ifindex=socket.if_nametoindex(f"p{at}"))
                    assert run.retval == bpf.XDP_REDIRECT
        finally:
            os.close(prog)
        second = build(state_dir, now=time.monotonic())
        offload = offload_in(lb, second, obj, pins=pins, measured=second.measured)
        assert offload.adopted and offload.lookup(c2s) is not None
        adopted = second.sessions.by_c2s(c2s)
        assert adopted is not None and adopted.state is SessionState.START
        offload.poll()
        assert adopted.state is SessionState.ESTABLISHED and adopted.server.answered_at > 0
        assert second.l7_hosts == {"kept.example": 1} and adopted.request_at > 0
        assert adopted.server.rt_ewma is None  # answered before the adopted session's wait began: no time taken
    finally:
        remove_pins(pins, lb, offload)
        close(second if "second" in locals() else first)


@needs_kernel
def test_the_ticket_maps_are_kept_and_the_kept_sessions_flows_entered_again(
    topo: tuple[str, str],  # noqa: F811
    state_dir: Path,
) -> None:
    """With kept state and tickets (offload_syn) the ticket maps are pinned with the program. A daemon killed with
    tickets out and a SYN taken but not folded leaves the next one none of them: its first SYN takes one of the new
    tickets. A daemon that stops gives its tickets back, so the kept program takes no SYN while no daemon runs (each
    goes up); the session a taken ticket made is kept. The next daemon adopts the maps: the kept session's flow is
    in the flow map again (its SYN, sent again, goes up to it rather than taking a ticket), and the tickets it
    issues are the ones the kept program takes, their records read from the kept ring."""
    import socket

    from helpers import SYN as SYN_FLAG
    from helpers import VIP, client_addr, client_mac, ether, ipv4, tcp_segment
    from mplslb.drivers.loop import Loop
    from mplslb.offload import bpf
    from mplslb.offload.bpf import unpin
    from mplslb.offload.driver import OffloadedBalancer
    from mplslb.wire.ip import IPPROTO_TCP
    from test_offload import label_of, on_veths

    lb, _ = topo
    config = on_veths(standard_config(c2s_min=17, c2s_max=17 + 2 * 4095))  # tickets both times, past a quarantine
    pins = PIN_ROOT / f"k{os.getpid() % 100000}"
    c0 = client_addr(0)

    def syn(sport: int) -> bytes:
        return ether(PORT_MAC[0], client_mac(0), ipv4(c0, VIP, IPPROTO_TCP, tcp_segment(c0, VIP, sport, 80, SYN_FLAG)))

    def started(balancer: Balancer) -> OffloadedBalancer:
        with entered(lb):
            return OffloadedBalancer(balancer, Loop(), pins=pins, tickets=True)

    def through(core: OffloadedBalancer, frame: bytes) -> bpf.TestRun:
        with entered(lb):
            return core.offload.run(frame, 0)

    first = build(state_dir, config, now=time.monotonic())
    second: Balancer | None = None
    core = started(first)
    try:
        # A daemon killed with its tickets out and a SYN taken but not folded: the next one starts with none of them.
        assert core.desk is not None and core.desk.outstanding
        stale = label_of(through(core, syn(40999)).data)
        queued = set(core.desk.outstanding) - {stale}
        core.offload.close(keep=True)  # no TicketDesk.close: as a kill leaves it
        close(first)
        first = build(state_dir, config, now=time.monotonic())
        core = started(first)
        assert core.offload.adopted and core.desk is not None and core.desk.outstanding
        assert first.sessions.by_c2s(stale) is None and stale not in core.offload._flows
        assert core.offload.lookup(stale) is None and core.offload.lookup(stale + 1) is None
        # The taken ticket's pair waits out a quarantine (its SYN went out); the ones left in the queue do not.
        assert set(core.offload.untaken) == queued and first.labels.is_quarantined(stale)
        assert first.labels.quarantined_count == 1 and not any(first.labels.is_quarantined(c) for c in queued)
        assert all(core.offload.lookup(c) is None for c in queued - set(core.desk.outstanding))
        # Stopped as the daemon stops: its tickets given back first.
        taken = through(core, syn(41000))
        assert taken.retval == bpf.XDP_REDIRECT
        c2s = label_of(taken.data)
        assert core.desk.fold(time.monotonic()) == 1 and first.sessions.by_c2s(c2s) is not None
        core.close(keep=True)
        close(first)
        assert set(TICKET_PINS.values()) <= {p.name for p in pins.iterdir()}
        prog = bpf.obj_get(str(pins / "prog"))
        try:
            with entered(lb):
                idle = bpf.prog_test_run(prog, syn(41001), ingress_ifindex=socket.if_nametoindex("p0"))
        finally:
            os.close(prog)
        assert idle.retval == bpf.XDP_PASS  # every ticket given back: no daemon, no SYN taken

        second = build(state_dir, config, now=time.monotonic())
        core = started(second)
        assert core.offload.adopted and core.desk is not None and core.desk.outstanding
        kept = second.sessions.by_c2s(c2s)
        assert kept is not None and kept.key.sport == 41000
        before = core.offload.ticket_counters()
        assert through(core, syn(41000)).retval == bpf.XDP_PASS  # the kept session's flow: up to it
        after = core.offload.ticket_counters()
        assert after["syn_flow_live"] == before["syn_flow_live"] + 1 and after["syn_taken"] == before["syn_taken"]
        fresh = through(core, syn(41002))
        assert fresh.retval == bpf.XDP_REDIRECT
        made = label_of(fresh.data)
        assert made in core.desk.outstanding and core.desk.fold(time.monotonic()) == 1
        session = second.sessions.by_c2s(made)
        assert made != c2s and session is not None and session.key.sport == 41002
    finally:
        with entered(lb):
            core.close()
        unpin(pins)
        close(second if second is not None else first)
