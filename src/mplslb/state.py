"""The balancer's persistent state: sessions, label pairs and label switching entries that outlive the daemon.

Theory of operation
-------------------
The session table, the label manager and the label switching table keep every record in fixed-size arrays, one
element per row (per label pair, per label). Each of them takes its arrays from one *allocator* passed in:
``alloc.array(name, typecode, count, fill)``. The default, :data:`HEAP`, hands out ordinary ``bytearray`` and
``array.array`` objects, exactly what the tables made themselves before, so the simulator, the tests and a daemon
without persistence run as they always did. A :class:`StateStore` hands out ``memoryview`` slices of one file
mapped ``MAP_SHARED`` (``state.bin`` in the state directory): every write the tables make is in the page cache the
moment it is made, so it outlives the process however it ends (SIGTERM or SIGKILL; not a reboot, see below), and a
new daemon that maps the same file finds every row as the old one left it. Adding a field to a table is one more
``alloc.array`` line; the store notices the new layout and starts clean.

The file: a header (one 64 KiB area), then each array at a page-aligned offset (records of 2 MiB or more at a huge
page's). The header holds a magic number, the format version, and a JSON description: the layout (each array's name,
typecode, count and offset, and their fingerprint), the configuration fingerprint (what must not change for the rows
to mean the same thing: the label range, the ports and their interfaces and MACs, the virtual IPs and their ports;
see :func:`config_identity`), and the boot id. The magic is written last when a file is made and cleared first when
it is being rewritten in a way a crash could tear (the server renumbering below), so a torn header never passes for
a valid one.

Servers are mapped by name: a row names its server by the pool's index, and the store keeps the index -> name table
in ``servers.json`` (replaced atomically, written before the first row that uses a new index). A new daemon maps
each old index to the server of that name in its configuration; the sessions of a server no longer configured are
interrupted at adoption.

Adoption (:func:`open_balancer`): when the header, the layout and the configuration all agree, the balancer is built
over the mapped arrays and :func:`adopt` rebuilds what is derived (the flow-key index, the free and quarantine rings
of the label manager, the switching table's count of installed labels, its rows holding the rest, flow bindings and
MACs too; the session counts, the half-open sessions' queue, the deadlines, the pool's active-session counters; an
ENDING session counts for no server and lingers until its close's time plus the linger). Otherwise the reason is
logged as one ``key=value`` line, the old files are moved aside (``*.old``) and the daemon starts clean;
``--fresh`` starts clean on purpose. :data:`FORMAT_VERSION` changes with what a column's values mean (the session
state codes).

Crash safety: the tables order their writes so a record becomes valid last and invalid first. A session row's
state byte is written after all its fields and cleared first when the row is freed; a label's ``valid`` byte
likewise; a new session's labels are installed after its row, and withdrawn before it is freed; the label manager
writes a pair's release time before marking it quarantined. So whatever instant the daemon is killed at, the
arrays hold complete records and, at worst, a pair half-way through being set up or taken down. :func:`adopt`
checks every pair: a session row is kept only if both its labels are installed with exactly the bindings the row
and its server imply (ports, next hops, peers, peer IPs, flow bindings; a server whose MAC is still being resolved
agrees with the one both its labels hold) and its pair is in use; anything else (a row without its labels, labels
without their row, a pair allocated and never used) is cleaned: its labels withdrawn, the pair put in quarantine,
the row freed. The counts are reported (``repaired``). A frame is therefore never forwarded by an
entry that disagrees with its session.

Time: the tables hold CLOCK_MONOTONIC times (the daemon's loop clock is ``time.monotonic``, and the kernel offload's
``bpf_ktime_get_ns`` is the same clock). It is system-wide and keeps counting across processes, so a deadline or a
release time written by one daemon means the same instant to the next, but it restarts at boot: the header keeps
the boot id (``/proc/sys/kernel/random/boot_id``) and state from another boot is not adopted (on most systems
``/run`` is a tmpfs cleared at boot anyway; where it is not, the boot id still tells).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, overload

import numpy as np

if TYPE_CHECKING:
    from mplslb.balancer import Balancer
    from mplslb.config import BalancerConfig

log = logging.getLogger("mplslb.state")

#: A table's array: ``bytearray`` or ``array.array`` on the heap, ``memoryview`` over a mapped file. Each supports
#: what the tables use: indexing, slice assignment, ``np.frombuffer``, ``struct.unpack_from``.
Column = Any

MAGIC: Final = b"MPLSLBST"
#: Changes whenever what a column's values mean changes (the session state codes, the switching entry's fields).
FORMAT_VERSION: Final = 2
HEADER_SIZE: Final = 1 << 16
_HEADER = struct.Struct("=8sII")  # magic, format version, length of the JSON description after it
STATE_FILE: Final = "state.bin"
SERVERS_FILE: Final = "servers.json"
LOCK_FILE: Final = "lock"
DEFAULT_ROOT: Final = Path("/run/mplslb/state")
BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
#: A transparent huge page on x86-64 and arm64 with 4 KiB pages.
HUGE_PAGE: Final = 2 << 20


class StateError(RuntimeError):
    """The state directory cannot be used (another daemon holds it, it cannot be created)."""


class Allocator:
    """Where a table takes its arrays from (see the module's docstring). Typed as the heap's arrays; a persistent
    store's ``memoryview`` columns behave the same for every use the tables make of them."""

    persistent = False

    @overload
    def array(self, name: str, typecode: Literal["B"], count: int, fill: int = 0) -> bytearray: ...
    @overload
    def array(self, name: str, typecode: Literal["i", "I", "q", "Q"], count: int, fill: int = 0) -> array[int]: ...
    @overload
    def array(self, name: str, typecode: Literal["d"], count: int, fill: float = 0) -> array[float]: ...
    def array(self, name: str, typecode: str, count: int, fill: float = 0) -> Column:
        """``count`` elements of ``typecode`` called ``name``, zeroed or ``fill``-ed when new."""
        return self._array(name, typecode, count, fill)

    def _array(self, name: str, typecode: str, count: int, fill: float) -> Column:
        raise NotImplementedError

    def records(self, name: str, dtype: np.dtype[Any], count: int, fill: Mapping[str, float]) -> memoryview:
        """``count`` records of ``dtype`` called ``name``, as one octet view starting at a multiple of the record's
        size (a power of two up to a page: a record then never straddles a cache line); zeroed when new, and
        ``fill``'s fields set."""
        size = dtype.itemsize
        raw, new, align = self._record_area(name, size * count, size)
        view = memoryview(raw)
        start = -np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data % align
        view = view[start : start + size * count]
        if new and fill:
            rows = np.frombuffer(view, dtype=dtype)
            for field_name, value in fill.items():
                rows[field_name] = value
        return view

    def _record_area(self, name: str, octets: int, size: int) -> tuple[Column, bool, int]:
        """Room for ``octets`` of records of ``size`` octets once aligned: the area, whether it is new, and the
        alignment its records start at (a multiple of ``size``)."""
        raw, new = self._array_new(name, "B", octets + size, 0)
        return raw, new, size

    def _array_new(self, name: str, typecode: str, count: int, fill: float) -> tuple[Column, bool]:
        """:meth:`array`, and whether it was made new (zeroed or ``fill``-ed) rather than adopted."""
        return self._array(name, typecode, count, fill), True

    def remember(self, key: str, value: str) -> None:
        """Keep ``key`` -> ``value`` (a server index's name) as long as the arrays, before anything refers to it."""


class HeapArrays(Allocator):
    """The default allocator: arrays on the heap, as the tables always had them; nothing outlives the process.

    Records of :data:`HUGE_PAGE` octets or more (the switching table's rows: 128 MiB) are an anonymous mapping of
    their own, aligned to :data:`HUGE_PAGE` and advised ``MADV_HUGEPAGE`` before a page of it is touched: where
    transparent huge pages are enabled (``always`` or ``madvise``), a row read at a random label then costs its
    cache misses and no walk through 4 KiB page tables (the rows of every label in use span 32,768 such pages, far
    more than the TLB holds). Without them the mapping is ordinary pages. The other arrays are read per new session,
    not per frame, and stay on the heap as they are (huge pages for the flow keys and their index measured no
    faster)."""

    def _array(self, name: str, typecode: str, count: int, fill: float) -> Column:
        if typecode == "B" and not fill:
            return bytearray(count)
        return array(typecode, [fill]) * count

    def _record_area(self, name: str, octets: int, size: int) -> tuple[Column, bool, int]:
        if octets < HUGE_PAGE:
            return super()._record_area(name, octets, size)
        area = mmap.mmap(-1, octets + HUGE_PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # no THP in this kernel: ordinary pages
            area.madvise(mmap.MADV_HUGEPAGE)
        return area, True, HUGE_PAGE


HEAP: Final = HeapArrays()


def huge_pages_of(buffer: Column) -> int:
    """Octets of the mapping that holds ``buffer``'s first octet which are on huge pages (``AnonHugePages``, or
    ``ShmemPmdMapped`` and ``FilePmdMapped`` for a state file, in ``/proc/self/smaps``); 0 when none are or when it
    cannot be told."""
    address = np.frombuffer(buffer, dtype=np.uint8, count=1).ctypes.data
    inside = False
    octets = 0
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head, _, rest = line.partition(" ")
                if not head.endswith(":"):  # a mapping's first line: "low-high perms ..."
                    if inside:
                        break
                    low, _, high = head.partition("-")
                    inside = int(low, 16) <= address < int(high, 16)
                elif inside and head in ("AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:"):
                    octets += int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 0
    return octets


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def config_identity(config: BalancerConfig) -> dict[str, Any]:
    """What must be the same for a new daemon to adopt the state: rows name ports by id and labels by number, and a
    label's entry is bound to ports, MACs and addresses. Servers are not in it (they are mapped by name)."""
    cluster = config.cluster  # a cluster node's labels are its own slice: the node and the slices are the state's
    return {
        **({"cluster": [cluster.node, cluster.nodes]} if cluster is not None else {}),
        "labels": [config.c2s_min, config.c2s_max],
        "ports": [
            [p.port_id, p.role, p.kind, p.interface, p.mac.hex(), p.line_card, p.number, p.address.hex()]
            for p in sorted(config.ports, key=lambda p: p.port_id)
        ],
        "vips": sorted([v.address.hex(), list(v.tcp_ports), list(v.udp_ports)] for v in config.vips),
    }


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _page_align(offset: int) -> int:
    return -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE


class StateStore(Allocator):
    """The allocator over a state directory: adopts ``state.bin`` when it is compatible, else makes a new one.

    After the tables have taken their arrays, :meth:`finish` says whether the old state was adopted; if not,
    :attr:`reason` says why (``key=value`` words) and the arrays handed out were fresh ones. Call :meth:`discard`
    and build again with a new store when adoption was refused after arrays were handed out from the old file
    (:func:`open_balancer` does all this).
    """

    persistent = True

    def __init__(self, directory: Path, identity: Mapping[str, Any], *, fresh: bool = False) -> None:
        self.dir = directory
        self.identity = dict(identity)
        self.config_fp = fingerprint(self.identity)
        self.boot_id = boot_id()
        self.path = directory / STATE_FILE
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"state directory {directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StateError(f"state directory {directory} is in use by another mplslb balancer") from None
        self._maps: list[mmap.mmap] = []
        self._fields: list[tuple[str, str, int, int]] = []  # (name, typecode, count, offset) handed out
        self._old: dict[str, tuple[str, int, int]] = {}  # the adopted file's layout: name -> (typecode, count, offset)
        self._names: dict[str, str] = {}
        self.adopting = False
        self.reason = "reason=fresh_requested" if fresh else ""
        self._fd = -1
        self._end = HEADER_SIZE
        self._new: Path | None = None
        if not fresh:
            self.reason = self._check_header()
            self.adopting = not self.reason
        self.made_new = not self.adopting
        if self.adopting:
            self._fd = os.open(self.path, os.O_RDWR)
            self._names = self._read_names()
        else:
            self._new = directory / (STATE_FILE + ".new")
            self._fd = os.open(self._new, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, HEADER_SIZE)

    # -- the header ----------------------------------------------------------------------------------------------
    def _check_header(self) -> str:
        """Why the file in the directory cannot be adopted (``key=value`` words), or ``""``."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except FileNotFoundError:
            return "reason=no_state"
        except OSError as exc:
            return f"reason=unreadable error={exc.strerror or exc}"
        if len(head) < _HEADER.size:
            return "reason=torn_header"
        magic, version, length = _HEADER.unpack_from(head)
        if magic != MAGIC:
            return "reason=torn_header"
        if version != FORMAT_VERSION:
            return f"reason=format_version old={version} new={FORMAT_VERSION}"
        try:
            desc = json.loads(head[_HEADER.size : _HEADER.size + length])
        except ValueError:
            return "reason=torn_header"
        if desc.get("boot_id") != self.boot_id:
            return "reason=rebooted"
        if desc.get("config_fp") != self.config_fp:
            old = desc.get("config", {})
            keys = self.identity.keys() | old.keys()
            changed = ",".join(sorted(k for k in keys if old.get(k) != self.identity.get(k)))
            return f"reason=config_changed fields={changed or '?'}"
        self._old = {name: (tc, count, offset) for name, tc, count, offset in desc.get("layout", [])}
        return ""

    def _write_header(self, fd: int) -> None:
        layout = [list(f) for f in self._fields]
        desc = {
            "layout": layout,
            "layout_fp": fingerprint([f[:3] for f in self._fields]),
            "config": self.identity,
            "config_fp": self.config_fp,
            "boot_id": self.boot_id,
        }
        body = json.dumps(desc, sort_keys=True).encode()
        if _HEADER.size + len(body) > HEADER_SIZE:
            raise ValueError("state layout too large for the header")
        os.pwrite(fd, _HEADER.pack(b"\0" * 8, FORMAT_VERSION, len(body)) + body, 0)
        os.pwrite(fd, MAGIC, 0)  # valid last

    def invalidate(self) -> None:
        """Clear the magic: until :meth:`validate`, a crash leaves a file that the next daemon will not adopt."""
        os.pwrite(self._fd, b"\0" * len(MAGIC), 0)

    def validate(self) -> None:
        os.pwrite(self._fd, MAGIC, 0)

    # -- the allocator -------------------------------------------------------------------------------------------
    def _array(self, name: str, typecode: str, count: int, fill: float) -> Column:
        """The adopted file's array, or a new zeroed (``fill``-ed) one."""
        itemsize = array(typecode).itemsize
        size = max(count * itemsize, 1)
        if any(f[0] == name for f in self._fields):
            raise ValueError(f"state array {name!r} allocated twice")
        if self.adopting:
            old = self._old.get(name)
            if old is None or old[0] != typecode or old[1] != count:
                was = "absent" if old is None else f"{old[0]}x{old[1]}"
                self.reason = f"reason=layout_changed field={name} old={was} new={typecode}x{count}"
                self.adopting = False
            else:
                self._fields.append((name, typecode, count, old[2]))
                return self._map(old[2], size).cast(typecode)  # type: ignore[call-overload]
        if not self.made_new:  # adoption refused half-way: heap arrays until the caller builds again
            return HEAP._array(name, typecode, count, fill)
        offset = _page_align(self._end)
        self._end = offset + size
        os.ftruncate(self._fd, _page_align(self._end))
        self._fields.append((name, typecode, count, offset))
        view = self._map(offset, size).cast(typecode)  # type: ignore[call-overload]
        if fill:
            np.frombuffer(view, dtype=np.dtype(typecode)).fill(fill)
        return view

    def _record_area(self, name: str, octets: int, size: int) -> tuple[Column, bool, int]:
        """Records of a huge page or more start at a huge page's offset in a new file, and their mapping is advised
        ``MADV_HUGEPAGE``: where the state directory's file system gives huge pages to the ranges advised so (a
        tmpfs mounted ``huge=advise``, or any tmpfs with ``shmem_enabled`` at ``advise``), the rows are on them as
        the heap's are (:class:`HeapArrays`); a tmpfs mounted ``huge=within_size`` or ``always`` gives them anyway.
        An adopted file keeps the offsets it has."""
        if octets < HUGE_PAGE:
            return super()._record_area(name, octets, size)
        if not self.adopting and self.made_new:
            self._end = -(-self._end // HUGE_PAGE) * HUGE_PAGE
        maps = len(self._maps)
        area, new, align = super()._record_area(name, octets, size)
        if len(self._maps) > maps:  # mapped from the file (not heap arrays after a refusal half-way)
            with contextlib.suppress(AttributeError, OSError):
                self._maps[-1].madvise(mmap.MADV_HUGEPAGE)
        return area, new, align

    def _array_new(self, name: str, typecode: str, count: int, fill: float) -> tuple[Column, bool]:
        adopting = self.adopting
        column = self._array(name, typecode, count, fill)
        return column, not (adopting and self.adopting)

    def _map(self, offset: int, size: int) -> memoryview:
        mapped = mmap.mmap(self._fd, _page_align(size), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=offset)  # fmt: skip
        self._maps.append(mapped)
        return memoryview(mapped)[:size]

    def remember(self, key: str, value: str) -> None:
        """Keep ``key`` -> ``value`` (a server index's name) durably before anything refers to it."""
        if self._names.get(key) == value:
            return
        self._names[key] = value
        self._write_names(self._names)

    def names(self) -> dict[str, str]:
        return dict(self._names)

    def _read_names(self) -> dict[str, str]:
        try:
            data = json.loads((self.dir / SERVERS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_names(self, names: Mapping[str, str]) -> None:
        tmp = self.dir / (SERVERS_FILE + ".tmp")
        tmp.write_text(json.dumps(dict(names), sort_keys=True))
        os.replace(tmp, self.dir / SERVERS_FILE)

    def set_names(self, names: Mapping[str, str]) -> None:
        self._names = dict(names)
        self._write_names(self._names)

    # -- ending the build ----------------------------------------------------------------------------------------
    def finish(self) -> bool:
        """The tables have their arrays: True when the old state was adopted. A new file gets its header (and
        becomes ``state.bin``) here."""
        if self.adopting:
            missing = sorted(set(self._old) - {f[0] for f in self._fields})
            if missing:
                self.reason = f"reason=layout_changed removed={','.join(missing)}"
                self.adopting = False
                return False
            return True
        if self._new is None:
            return False
        self.move_aside()
        self._write_names({})
        self._write_header(self._fd)
        os.replace(self._new, self.path)
        self._new = None
        return False

    def discard(self) -> None:
        """Give up this build (adoption refused after arrays were handed out): unmap, keep the lock."""
        self._release_maps()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def move_aside(self) -> None:
        """Keep the refused state as ``state.bin.old`` (and its server names) for a post-mortem."""
        for name in (STATE_FILE, SERVERS_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.dir / name, self.dir / (name + ".old"))

    def _release_maps(self) -> None:
        for mapped in self._maps:
            with contextlib.suppress(BufferError):  # a table still holds a view: the mapping goes with it
                mapped.close()
        self._maps.clear()

    def close(self) -> None:
        """Unmap what can be unmapped and release the directory's lock (the file stays for the next daemon)."""
        self.discard()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    @property
    def layout(self) -> list[tuple[str, str, int, int]]:
        return list(self._fields)


@dataclass
class AdoptReport:
    """What adoption found: sessions kept, and what it cleaned and why."""

    sessions: int = 0
    live: int = 0
    quarantined: int = 0
    repaired: dict[str, int] = field(default_factory=dict)
    renumbered: int = 0

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.repaired[what] = self.repaired.get(what, 0) + n

    def line(self) -> str:
        repaired = " ".join(f"repaired_{k}={v}" for k, v in sorted(self.repaired.items()))
        return (
            f"event=state_adopted sessions={self.sessions} live={self.live} quarantined={self.quarantined} "
            f"renumbered={self.renumbered} {repaired}"
        ).rstrip()


def open_balancer(
    config: BalancerConfig, directory: Path, *, now: float, fresh: bool = False
) -> tuple[Balancer, StateStore, AdoptReport | None]:
    """A balancer over the state in ``directory``: adopted when compatible (the report says what was kept and
    repaired), else a clean one (the old state moved aside, the reason logged). Returns the store to keep open."""
    from mplslb.balancer import Balancer

    identity = config_identity(config)
    store = StateStore(directory, identity, fresh=fresh)
    try:
        balancer = Balancer(config, store=store)
        if store.finish():
            report = adopt(balancer, store, now)
            log.info("%s dir=%s", report.line(), directory)
            return balancer, store, report
        if not store.made_new:  # refused half-way through the build (the layout): build again over a new file
            reason = store.reason
            store.close()
            store = StateStore(directory, identity, fresh=True)
            store.reason = reason
            balancer = Balancer(config, store=store)
            store.finish()
    except BaseException:
        store.close()
        raise
    level = logging.INFO if store.reason in ("reason=no_state", "reason=fresh_requested") else logging.WARNING
    log.log(level, "event=state_not_adopted %s dir=%s", store.reason, directory)
    return balancer, store, None


def adopt(balancer: Balancer, store: StateStore, now: float) -> AdoptReport:
    """Rebuild what is derived from the adopted rows, after checking every pair (see the module's docstring)."""
    report = AdoptReport()
    sessions, labels, switching, pool = balancer.sessions, balancer.labels, balancer.switching, balancer.pool
    switching.restore()
    # Old server index -> the configured server of that name (None: no longer configured).
    by_index: dict[int, Any] = {}
    for key, name in store.names().items():
        if key.startswith("server."):
            by_index[int(key[len("server.") :])] = pool.get(name) if name in pool else None
    rows = np.flatnonzero(np.frombuffer(sessions.state, dtype=np.uint8))
    c2s_min = sessions.c2s_min
    valid = switching.arrays().valid
    pairs = sessions.rows
    all_c2s = c2s_min + 2 * np.arange(pairs)
    # The label manager's pairs are the table's rows from ``first`` on: all of them, or a cluster node's own slice
    # (the other rows hold its peers' sessions, whose pairs are theirs: mplslb.cluster).
    first = (labels.c2s_min - c2s_min) // 2
    own = np.zeros(pairs, dtype=bool)
    own[first : first + labels.capacity] = True
    in_use = np.zeros(pairs, dtype=bool)
    in_use[first : first + labels.capacity] = np.frombuffer(labels.pair_states, dtype=np.uint8) == labels.IN_USE
    occupied = np.zeros(pairs, dtype=bool)
    occupied[rows] = True
    installed = (valid[all_c2s] != 0) | (valid[all_c2s + 1] != 0)
    # Pairs with anything of a session but no row: labels without a row, a pair allocated and never used.
    orphans = np.flatnonzero(~occupied & (installed | in_use))
    for pair in orphans.tolist():
        _clean(balancer, pair, now)
    report.count("orphan_labels", int(np.count_nonzero(installed[orphans])))
    report.count("unused_pairs", int(np.count_nonzero(~installed[orphans])))
    final_codes = sessions.final_codes()
    for pair in rows.tolist():
        server = by_index.get(sessions.server[pair])
        why = ""
        if server is None:
            why = "server_gone"
        elif sessions.state[pair] in final_codes:
            why = "ended"
        elif (own[pair] and not in_use[pair]) or not _bindings_agree(balancer, pair, server):
            why = "torn_session"
        if why:
            _clean(balancer, pair, now)
            report.count(why)
    # Renumber rows whose server has another index in this daemon's pool (the file is invalid meanwhile).
    kept = np.flatnonzero(np.frombuffer(sessions.state, dtype=np.uint8))
    remap = {old: server.index for old, server in by_index.items() if server is not None and server.index != old}
    if remap and kept.size:
        store.invalidate()
        column = np.frombuffer(sessions.server, dtype=np.uint32)
        old = column[kept].copy()
        for was, new in remap.items():
            column[kept[old == was]] = new
        report.renumbered = int(np.isin(old, list(remap)).sum())
    store.set_names({f"server.{s.index}": s.name for s in pool.servers})
    store.validate()
    labels.restore()
    servers = {s.index: s for s in pool.servers}
    # A half-open session's wait starts again (an unanswered SYN's answer, an answered one's ACK, may have come
    # while no daemon ran: the restart's gap is never taken for the server's failure to answer); an ENDING one
    # lingers until its close's time plus the linger, and counts for no server.
    live = sessions.restore(servers, now)
    for pair in live:
        pool.session_started(servers[sessions.server[pair]])
    # A server resolved by its address takes the MAC its sessions' labels hold while the resolver confirms it (the
    # labels of any session holding another follow it).
    held: dict[str, bytes] = {}
    for pair in np.flatnonzero(np.frombuffer(sessions.state, dtype=np.uint8)).tolist():
        server = servers[sessions.server[pair]]
        if not server.mac:
            held.setdefault(server.name, switching.next_hop_of(c2s_min + 2 * pair))
    balancer.recall_macs(held, now)
    report.sessions = len(sessions)
    report.live = len(live)
    report.quarantined = labels.quarantined_count
    return report


def _bindings_agree(balancer: Balancer, pair: int, server: Any) -> bool:
    """Both labels of ``pair`` are installed exactly as the session row and its server say: ports, next hops, peers,
    peer IPs and each direction's flow binding. A server whose MAC is not known yet (resolved from its address)
    agrees with the one its labels hold, as long as both labels hold the same."""
    from mplslb.switching.table import flow_key

    t, s = balancer.switching, balancer.sessions
    c2s = s.c2s_min + 2 * pair
    s2c = c2s + 1
    if not (t.valid[c2s] and t.valid[s2c]):
        return False
    key = s.key_of(pair)
    client_port, client_mac = s.client_port[pair], bytes(s.client_mac[pair * 6 : pair * 6 + 6])
    port, mac = server.config.port_id, server.mac or t.next_hop_of(c2s)
    c2s_row = (t.out_port[c2s], t.next_hop_of(c2s), t.in_port[c2s], t.peer[c2s], t.peer_ip[c2s], t.flow[c2s])
    s2c_row = (t.out_port[s2c], t.next_hop_of(s2c), t.in_port[s2c], t.peer[s2c], t.peer_ip[s2c], t.flow[s2c])
    c2s_flow = flow_key(key.src, key.dst, (key.sport, key.dport))
    s2c_flow = flow_key(key.dst, key.src, (key.dport, key.sport))
    return c2s_row == (port, mac, client_port, client_mac, key.src, c2s_flow) and s2c_row == (
        client_port,
        client_mac,
        port,
        mac,
        key.dst,
        s2c_flow,
    )


def _clean(balancer: Balancer, pair: int, now: float) -> None:
    """Take whatever is left of ``pair`` out of service, invalid first: its labels withdrawn, the pair
    quarantined, its row freed."""
    sessions, labels, switching = balancer.sessions, balancer.labels, balancer.switching
    c2s = sessions.c2s_min + 2 * pair
    switching.withdraw(c2s)
    switching.withdraw(c2s + 1)
    if labels.c2s_min <= c2s <= labels.c2s_max:  # not a peer's pair (mplslb.cluster)
        labels.quarantine_pair(c2s, now)
    sessions.drop_row(pair)


def default_dir(instance: str) -> Path:
    return DEFAULT_ROOT / instance


__all__ = [
    "HEAP",
    "AdoptReport",
    "Allocator",
    "Column",
    "HeapArrays",
    "StateError",
    "StateStore",
    "adopt",
    "config_identity",
    "default_dir",
    "open_balancer",
]
