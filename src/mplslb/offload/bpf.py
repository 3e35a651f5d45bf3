"""The bpf(2) system call through ctypes, and a loader for the one small BPF object file mplslb builds.

Theory of operation
-------------------
Only the commands the kernel offload needs are wrapped: creating a map, updating, deleting and looking up its elements
one by one and in batches, reading a ring buffer map in place (:class:`RingBuffer`), loading a program, attaching it to
an interface with a BPF link, reading an object's info, and running a program on a frame (``BPF_PROG_TEST_RUN``, for
tests). Every ``union bpf_attr`` is packed with :mod:`struct` into a zeroed buffer whose size is passed to the kernel,
so fields this module does not set are zero, as the kernel requires. Errors raise :class:`BpfError` (an ``OSError`` with
the errno and, for a program the verifier refused, the verifier's log).

The loader (:func:`load_program`) reads the ELF object clang writes for ``-target bpf``: the program's section, its
relocations and the symbol table. Maps are not described in the object: the caller creates them and passes their
file descriptors by symbol name; every ``ld_imm64`` the relocations name gets ``BPF_PSEUDO_MAP_FD`` and the fd.
That is all a program without BTF, globals or subprograms needs, and it keeps libbpf out of the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

# enum bpf_cmd (<linux/bpf.h>)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
PROG_LOAD_ATTEMPTS = 5  # libbpf's number
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_QUEUE = 22
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_XDP = 37  # enum bpf_attach_type
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
BPF_F_NO_PREALLOC = 1
BPF_ANY = 0
BPF_EXIST = 2  # update only an element that exists
BPF_PSEUDO_MAP_FD = 1
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_DROP = 1
XDP_PASS = 2
XDP_REDIRECT = 4
OBJ_NAME_LEN = 16

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351, "i686": 357}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
#: This machine's bpf(2) number (None: unknown architecture).
_NR_BPF = _SYS_BPF.get(platform.machine())
_syscall = _libc.syscall

ATTR_SIZE = 128  # large enough for every command used here; the kernel zero-checks the bytes it does not know
_U64 = struct.Struct("=Q")
#: A batch command's attr: in and out batch positions, keys, values, count, map fd (then elem and map flags, 0).
_BATCH = struct.Struct("=QQQQII")
_U32 = struct.Struct("=I")
#: Machines whose loads are not reordered with other loads, nor stores with other stores (x86's total store order,
#: s390's): a plain load there reads what a release store published, as an acquiring load would.
ORDERED_MACHINES = frozenset({"x86_64", "i686", "s390x"})
#: A ring buffer map can be read in place here (:class:`RingBuffer`).
ORDERED_LOADS = platform.machine() in ORDERED_MACHINES
LOG_SIZE = 1 << 20


class BpfError(OSError):
    """A failed bpf(2) command; ``log`` holds the verifier's output when a program was refused."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


def available() -> bool:
    """True when this machine's architecture has a known bpf(2) number."""
    return platform.machine() in _SYS_BPF


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """Run one bpf(2) command on a packed ``union bpf_attr``; returns the kernel's non-negative result."""
    if _NR_BPF is None:
        raise BpfError(38, f"{what}: bpf(2) on {platform.machine()}")  # ENOSYS
    result: int = _syscall(_NR_BPF, cmd, ctypes.byref(attr), len(attr))
    if result < 0:
        raise BpfError(ctypes.get_errno(), what)
    return result


def _attr(fmt: str, *values: int | bytes, size: int = ATTR_SIZE) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def _bytes_at(data: bytes) -> int:
    """The address of ``data``'s octets, for a command that only reads them (no copy; ``data`` must outlive the
    call)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


# -- maps ----------------------------------------------------------------------------------------------------------
def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int = 0, name: str) -> int:
    """A new map; returns its file descriptor (the caller closes it)."""
    raw_name = name.encode()[: OBJ_NAME_LEN - 1]
    attr = _attr("=IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0, raw_name)
    return bpf(BPF_MAP_CREATE, attr, f"creating map {name}")


class Map:
    """A map's file descriptor with fixed-size keys and values, and the element commands on it."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str) -> None:
        self.fd, self.key_size, self.value_size, self.name = fd, key_size, value_size, name
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        # One attr buffer reused by update/delete/lookup: key and value pointers never change.
        self._elem = _attr("=IIQQQ", fd, 0, ctypes.addressof(self._key), ctypes.addressof(self._value), 0)
        self._del = _attr("=IIQ", fd, 0, ctypes.addressof(self._key))  # nothing may follow the key for a delete
        self._elem_ref, self._del_ref = ctypes.byref(self._elem), ctypes.byref(self._del)
        self._batch = ctypes.create_string_buffer(ATTR_SIZE)  # the batch commands' attr, filled for each call

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int, name: str) -> Map:
        """A new map. A per-CPU array's elements are read and written with a value for every possible CPU, each
        ``value_size`` rounded up to 8 octets, as the kernel lays them out."""
        fd = map_create(map_type, key_size, value_size, max_entries, flags=flags, name=name)
        if map_type == BPF_MAP_TYPE_PERCPU_ARRAY:
            value_size = -(-value_size // 8) * 8 * possible_cpus()
        return cls(fd, key_size, value_size, name)

    # The element commands run per session on the daemon's path: the syscall is made directly on the reused attr
    # (no message built unless it fails) and a missing key is told by the result, not an exception.
    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        ctypes.memmove(self._key, key, self.key_size)
        ctypes.memmove(self._value, value, self.value_size)
        _U64.pack_into(self._elem, 24, flags)
        if _syscall(_NR_BPF, BPF_MAP_UPDATE_ELEM, self._elem_ref, ATTR_SIZE) < 0:
            self._failed(f"updating {self.name}")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        ctypes.memmove(self._key, key, self.key_size)
        if _syscall(_NR_BPF, BPF_MAP_DELETE_ELEM, self._del_ref, ATTR_SIZE) < 0:
            return self._failed(f"deleting from {self.name}", missing_ok=True)
        return True

    def lookup(self, key: bytes) -> bytes | None:
        ctypes.memmove(self._key, key, self.key_size)
        _U64.pack_into(self._elem, 24, 0)  # no flags (an update may have left its own)
        if _syscall(_NR_BPF, BPF_MAP_LOOKUP_ELEM, self._elem_ref, ATTR_SIZE) < 0:
            self._failed(f"looking up in {self.name}", missing_ok=True)
            return None
        return self._value.raw

    @staticmethod
    def _failed(what: str, *, missing_ok: bool = False) -> bool:
        """An element command failed: False when the key was missing and ``missing_ok``, otherwise raises."""
        err = ctypes.get_errno()  # (a map exists only where bpf(2) has a number: it made or opened the map)
        if missing_ok and err == 2:  # ENOENT
            return False
        raise BpfError(err, what)

    def update_batch(self, keys: bytes, values: bytes, count: int) -> int:
        """Update ``count`` elements (keys and values packed back to back) in one call; returns how many were
        done (all of them, or an error is raised naming how far it got)."""
        if count == 0:
            return 0
        attr = self._batch_attr(_bytes_at(keys), _bytes_at(values), count)
        try:
            bpf(BPF_MAP_UPDATE_BATCH, attr, f"batch update of {self.name}")
        except BpfError as exc:
            done = struct.unpack_from("=I", attr, 32)[0]
            raise BpfError(exc.errno or 0, f"batch update of {self.name} stopped after {done} of {count}") from None
        return count

    def delete_batch(self, keys: bytes, count: int) -> int:
        """Delete ``count`` keys in one call; keys that are not there stop the batch (ENOENT), so the rest are then
        deleted one by one. Returns how many were there."""
        if count == 0:
            return 0
        attr = self._batch_attr(_bytes_at(keys), 0, count)
        try:
            bpf(BPF_MAP_DELETE_BATCH, attr, f"batch delete from {self.name}")
        except BpfError as exc:
            if exc.errno != 2:
                raise
            done = int(struct.unpack_from("=I", attr, 32)[0])
            size = self.key_size
            deleted = done
            for i in range(done + 1, count):
                deleted += self.delete(keys[i * size : (i + 1) * size])
            return deleted
        return count

    def _batch_attr(self, keys: int, values: int, count: int) -> ctypes.Array[ctypes.c_char]:
        """The reused attr of a batch command on this map, from its start (no in or out batch position)."""
        attr = self._batch
        _BATCH.pack_into(attr, 0, 0, 0, keys, values, count, self.fd)
        return attr

    def lookup_batch(self, chunk: int = 4096) -> tuple[bytes, bytes, int]:
        """Every element: (keys, values, count), packed back to back, read ``chunk`` elements per call."""
        keys_out: list[bytes] = []
        values_out: list[bytes] = []
        total = 0
        kbuf = ctypes.create_string_buffer(self.key_size * chunk)
        vbuf = ctypes.create_string_buffer(self.value_size * chunk)
        in_batch = ctypes.create_string_buffer(8)
        out_batch = ctypes.create_string_buffer(8)
        first = True
        while True:
            attr = _attr("=QQQQII", 0 if first else _addr(in_batch), _addr(out_batch), _addr(kbuf), _addr(vbuf),
                         chunk, self.fd)  # fmt: skip
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr, f"batch lookup in {self.name}")
            except BpfError as exc:
                if exc.errno != 2:  # ENOENT: this was the last batch
                    raise
                done = True
            count = struct.unpack_from("=I", attr, 32)[0]
            if count:
                keys_out.append(ctypes.string_at(kbuf, count * self.key_size))
                values_out.append(ctypes.string_at(vbuf, count * self.value_size))
                total += count
            if done:
                break
            ctypes.memmove(in_batch, out_batch, 8)
            first = False
        return b"".join(keys_out), b"".join(values_out), total

    def clear(self) -> int:
        """Delete every element, read in batches and deleted in one call; returns how many there were."""
        keys, _, count = self.lookup_batch()
        return self.delete_batch(keys[: count * self.key_size], count) if count else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Queue:
    """A queue map's file descriptor (no keys): push at the back, pop from the front (``BPF_MAP_TYPE_QUEUE``)."""

    def __init__(self, fd: int, value_size: int, name: str) -> None:
        self.fd, self.value_size, self.name = fd, value_size, name
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = _attr("=IIQQQ", fd, 0, 0, ctypes.addressof(self._value), 0)  # no key pointer: a queue has none
        self._ref = ctypes.byref(self._attr)

    @classmethod
    def create(cls, value_size: int, max_entries: int, *, name: str) -> Queue:
        return cls(map_create(BPF_MAP_TYPE_QUEUE, 0, value_size, max_entries, name=name), value_size, name)

    def push(self, value: bytes) -> bool:
        """Push ``value``; False when the queue is full."""
        ctypes.memmove(self._value, value, self.value_size)
        if _syscall(_NR_BPF, BPF_MAP_UPDATE_ELEM, self._ref, ATTR_SIZE) < 0:
            err = ctypes.get_errno()
            if err == errno.E2BIG:
                return False
            raise BpfError(err, f"pushing to {self.name}")
        return True

    def pop(self) -> bytes | None:
        """The value at the front, taken off the queue; None when it is empty."""
        if _syscall(_NR_BPF, BPF_MAP_LOOKUP_AND_DELETE_ELEM, self._ref, ATTR_SIZE) < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"popping from {self.name}")
        return self._value.raw

    def take_all(self) -> list[bytes]:
        """Every value in the queue, front first, taken off it (one system call each, and one that finds it
        empty)."""
        out: list[bytes] = []
        while (value := self.pop()) is not None:
            out.append(value)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: A ring buffer record's header: its length, with these two bits, then its page offset (unused here).
RINGBUF_BUSY = 1 << 31  # reserved by a program, not committed yet
RINGBUF_DISCARD = 1 << 30  # discarded by the program: skipped
RINGBUF_HDR_SIZE = 8


def ring_size(record: int, records: int) -> int:
    """The smallest size a ring buffer map takes (a power of two, at least a page) that holds ``records`` records
    of ``record`` octets, each with its header, 8-aligned: more than they take, as the kernel refuses a record
    that would fill the ring to its last octet."""
    need = records * ((record + RINGBUF_HDR_SIZE + 7) & ~7)
    return max(mmap.PAGESIZE, 1 << need.bit_length())


class RingBuffer:
    """A ring buffer map (``BPF_MAP_TYPE_RINGBUF``) a program writes records into (``bpf_ringbuf_output``), read
    in place through ``mmap``: no system call per record, nor for finding it empty.

    The kernel maps a consumer page (the position read up to, written here), then a producer page (the position
    written up to) and the data twice over, so a record that wraps reads as one slice. A program publishes a
    record by clearing its header's busy bit, and the producer position, with release stores; they are read here
    with plain loads, which is only right where loads are kept in order (:data:`ORDERED_LOADS`): elsewhere the
    caller uses a :class:`Queue`.
    """

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd, self.size, self.name = fd, size, name
        page = mmap.PAGESIZE
        try:
            self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as exc:
            raise BpfError(exc.errno or 0, f"mapping ring buffer {name}") from None
        self._data = page  # where the data starts in the producer's mapping
        self._mask = size - 1

    @classmethod
    def create(cls, size: int, *, name: str) -> RingBuffer:
        """A new ring buffer of ``size`` octets (a power of two, a multiple of the page size: :func:`ring_size`)."""
        fd = map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, size, name=name)
        try:
            return cls(fd, size, name)
        except BpfError:
            os.close(fd)
            raise

    def take_all(self) -> list[bytes]:
        """Every record committed since the last call, oldest first; the space they held is given back to the
        program. Stops at the first record still reserved (the rest follow at the next call)."""
        consumer, producer = self._consumer, self._producer
        (at,) = _U64.unpack_from(consumer, 0)
        (end,) = _U64.unpack_from(producer, 0)
        if at == end:
            return []
        out: list[bytes] = []
        data, mask = self._data, self._mask
        while at < end:
            start = data + (at & mask)
            (length,) = _U32.unpack_from(producer, start)
            if length & RINGBUF_BUSY:
                break
            if not length & RINGBUF_DISCARD:
                out.append(producer[start + RINGBUF_HDR_SIZE : start + RINGBUF_HDR_SIZE + length])
            at += ((length & ~RINGBUF_DISCARD) + RINGBUF_HDR_SIZE + 7) & ~7
        _U64.pack_into(consumer, 0, at)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            self._consumer.close()
            self._producer.close()
            os.close(self.fd)
            self.fd = -1


# -- programs ------------------------------------------------------------------------------------------------------
class ElfProgram(NamedTuple):
    """One program section of a BPF object: its instructions and the map symbol each ``ld_imm64`` refers to."""

    section: str
    insns: bytes
    map_refs: tuple[tuple[int, str], ...]  # (instruction index, symbol name)
    license: str


def read_elf_program(data: bytes, section: str) -> ElfProgram:
    """The program in ``section`` of the ELF64 little-endian relocatable object ``data``."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, kind, _, _, offset, size, link, info, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize
        )
        sections.append((name, kind, offset, size, link, info, entsize))
    shstr_off = sections[shstrndx][2]

    def cstr(base: int, at: int) -> str:
        return data[base + at : data.index(b"\0", base + at)].decode()

    names = [cstr(shstr_off, s[0]) for s in sections]
    if section not in names:
        raise ValueError(f"no section {section!r} in the object (sections: {', '.join(n for n in names if n)})")
    index = names.index(section)
    insns = data[sections[index][2] : sections[index][2] + sections[index][3]]
    license_text = ""
    if "license" in names:
        lic = sections[names.index("license")]
        license_text = data[lic[2] : lic[2] + lic[3]].split(b"\0")[0].decode()
    refs: list[tuple[int, str]] = []
    SHT_REL = 9
    for i, (_, kind, offset, size, link, info, entsize) in enumerate(sections):
        if kind != SHT_REL or info != index:
            continue
        symtab = sections[link]
        strtab_off = sections[symtab[4]][2]
        for r in range(size // (entsize or 16)):
            r_offset, r_info = struct.unpack_from("<QQ", data, offset + r * (entsize or 16))
            sym = r_info >> 32
            st_name = struct.unpack_from("<I", data, symtab[2] + sym * (symtab[6] or 24))[0]
            refs.append((r_offset // 8, cstr(strtab_off, st_name)))
        del i
    return ElfProgram(section, insns, tuple(refs), license_text)


def prog_load(prog_type: int, insns: bytes, *, license_text: str, name: str, expected_attach_type: int = 0) -> int:
    """Load a program; returns its fd. A refusal raises :class:`BpfError` with the verifier's log."""
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lbuf = ctypes.create_string_buffer(license_text.encode() + b"\0")
    log = ctypes.create_string_buffer(LOG_SIZE)
    raw_name = name.encode()[: OBJ_NAME_LEN - 1]
    attr = _attr("=IIQQIIQII16sII", prog_type, len(insns) // 8, _addr(ibuf), _addr(lbuf), 0, 0, 0, 0, 0, raw_name,
                 0, expected_attach_type)  # fmt: skip
    try:
        return _prog_load(attr, name)
    except BpfError as exc:
        # Load again with the verifier's log on: the first attempt without it is the fast path.
        struct.pack_into("=IIQ", attr, 24, 1, LOG_SIZE, _addr(log))
        try:
            return _prog_load(attr, name)
        except BpfError:
            raise BpfError(exc.errno or 0, f"loading program {name}", log.value.decode(errors="replace")) from None


def _prog_load(attr: ctypes.Array[ctypes.c_char], name: str) -> int:
    """BPF_PROG_LOAD, again when the kernel says EAGAIN (a signal came while the verifier ran: a debugger's or
    profiler's stop is one), as libbpf does, up to :data:`PROG_LOAD_ATTEMPTS` times."""
    for _ in range(PROG_LOAD_ATTEMPTS - 1):
        try:
            return bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
        except BpfError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    return bpf(BPF_PROG_LOAD, attr, f"loading program {name}")


def load_program(
    obj: bytes, section: str, maps: Mapping[str, int], *, prog_type: int, name: str, expected_attach_type: int = 0
) -> int:
    """Load ``section`` of the object ``obj`` with each map symbol replaced by the fd in ``maps``."""
    prog = read_elf_program(obj, section)
    insns = bytearray(prog.insns)
    for index, symbol in prog.map_refs:
        if symbol not in maps:
            raise ValueError(f"the program refers to map {symbol!r}, which was not created")
        at = index * 8
        if insns[at] != 0x18:  # BPF_LD | BPF_IMM | BPF_DW
            raise ValueError(f"relocation at instruction {index} is not a 64-bit immediate load")
        insns[at + 1] = (insns[at + 1] & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)
        struct.pack_into("<i", insns, at + 4, maps[symbol])
    return prog_load(prog_type, bytes(insns), license_text=prog.license or "GPL", name=name,
                     expected_attach_type=expected_attach_type)  # fmt: skip


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """Attach ``prog_fd`` to ``ifindex`` with a BPF link; the attachment lasts as long as the returned fd (and its
    duplicates) stays open, so a process that dies leaves nothing attached."""
    return bpf(BPF_LINK_CREATE, _attr("=IIII", prog_fd, ifindex, attach_type, flags), f"attaching to ifindex {ifindex}")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Make the link ``link_fd`` run ``prog_fd`` instead of its program, atomically (an upgrade in place)."""
    bpf(BPF_LINK_UPDATE, _attr("=III", link_fd, prog_fd, 0), "replacing a link's program")


class ProgInfo(NamedTuple):
    prog_type: int
    prog_id: int
    name: str
    tag: bytes = b""  # the kernel's hash of the instructions (map references left out)
    run_time_ns: int = 0  # time spent in the program and its runs, counted while kernel.bpf_stats_enabled is 1
    run_cnt: int = 0


def _info(fd: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(256)
    attr = _attr("=IIQ", fd, len(info), _addr(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading {what} info")
    return info.raw


def prog_info(fd: int) -> ProgInfo:
    info = _info(fd, "program")
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    name = info[64:80].split(b"\0")[0].decode(errors="replace")
    run_time_ns, run_cnt = struct.unpack_from("=QQ", info, _PROG_INFO_RUN_TIME)
    return ProgInfo(prog_type, prog_id, name, info[8:16], run_time_ns, run_cnt)


_PROG_INFO_RUN_TIME = 192  # struct bpf_prog_info: run_time_ns, then run_cnt


def prog_ids() -> list[int]:
    """The ids of every program loaded in the system (``BPF_PROG_GET_NEXT_ID``), in order."""
    ids: list[int] = []
    while True:
        attr = _attr("=II", ids[-1] if ids else 0, 0)
        try:
            bpf(BPF_PROG_GET_NEXT_ID, attr, "listing programs")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return ids
            raise
        ids.append(struct.unpack_from("=I", attr.raw, 4)[0])


class MapInfo(NamedTuple):
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_fits(fd: int, map_type: int, key_size: int, value_size: int, max_entries: int) -> bool:
    """Whether the map ``fd`` (a pinned one, say) has this type, key and value sizes and number of entries."""
    info = map_info(fd)
    return (info.map_type, info.key_size, info.value_size, info.max_entries) == (
        map_type, key_size, value_size, max_entries,
    )  # fmt: skip


def map_info(fd: int) -> MapInfo:
    info = _info(fd, "map")
    name = info[24:40].split(b"\0")[0].decode(errors="replace")
    map_type, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("=IIIIII", info, 0)
    return MapInfo(map_type, map_id, key_size, value_size, max_entries, flags, name)


class LinkInfo(NamedTuple):
    link_type: int
    link_id: int
    prog_id: int
    ifindex: int  # of an XDP link; 0 once its device is gone


def link_info(fd: int) -> LinkInfo:
    info = _info(fd, "link")
    link_type, link_id, prog_id = struct.unpack_from("=III", info, 0)
    return LinkInfo(link_type, link_id, prog_id, struct.unpack_from("=I", info, 16)[0])


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link at ``path`` in a bpffs: it lives on after every fd to it is closed."""
    raw = ctypes.create_string_buffer(path.encode())
    bpf(BPF_OBJ_PIN, _attr("=QII", _addr(raw), fd, 0), f"pinning at {path}")


def obj_get(path: str) -> int:
    """A new fd to the object pinned at ``path``."""
    raw = ctypes.create_string_buffer(path.encode())
    return bpf(BPF_OBJ_GET, _attr("=QII", _addr(raw), 0, 0), f"opening pinned {path}")


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0), f"opening program id {prog_id}")


class TestRun(NamedTuple):
    retval: int
    data: bytes


def prog_test_run(prog_fd: int, frame: bytes, *, ingress_ifindex: int = 0) -> TestRun:
    """Run an XDP program once on ``frame`` (``BPF_PROG_TEST_RUN``); returns its verdict and the frame after it.
    ``ingress_ifindex`` (a device of the caller's namespace) is what the program reads as ``ingress_ifindex``."""
    din = ctypes.create_string_buffer(frame, len(frame))
    dout = ctypes.create_string_buffer(len(frame) + 256)
    ctx = ctypes.create_string_buffer(struct.pack("=IIIIII", 0, len(frame), 0, ingress_ifindex, 0, 0), 24)
    attr = _attr("=IIIIQQIIIIQQ", prog_fd, 0, len(frame), len(dout), _addr(din), _addr(dout), 1, 0,
                 len(ctx) if ingress_ifindex else 0, 0, _addr(ctx) if ingress_ifindex else 0, 0)  # fmt: skip
    bpf(BPF_PROG_TEST_RUN, attr, "running the program on a frame")
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    return TestRun(retval, dout.raw[:size_out])


#: Where ``ingress_ifindex`` lies in ``struct __sk_buff``: a test run's context up to and with it (the fields before
#: it must be zero, the kernel takes it as the skb's input interface).
_SKB_INGRESS_IFINDEX_AT = 36


def prog_test_run_skb(prog_fd: int, frame: bytes, *, ingress_ifindex: int = 0) -> TestRun:
    """Run a SCHED_CLS program once on ``frame`` (an Ethernet frame the kernel wraps in an skb, as on a tc hook);
    returns its verdict and the frame after it (grown or shrunk as the program made it). ``ingress_ifindex`` is
    what the program reads as ``skb->ingress_ifindex``."""
    din = ctypes.create_string_buffer(frame, len(frame))
    dout = ctypes.create_string_buffer(len(frame) + 256)
    ctx = ctypes.create_string_buffer(_SKB_INGRESS_IFINDEX_AT + 4)
    struct.pack_into("=I", ctx, _SKB_INGRESS_IFINDEX_AT, ingress_ifindex)
    attr = _attr("=IIIIQQIIIIQQ", prog_fd, 0, len(frame), len(dout), _addr(din), _addr(dout), 1, 0,
                 len(ctx) if ingress_ifindex else 0, 0, _addr(ctx) if ingress_ifindex else 0, 0)  # fmt: skip
    bpf(BPF_PROG_TEST_RUN, attr, "running the program on a frame")
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    return TestRun(retval, dout.raw[:size_out])


__all__ = [
    "BpfError",
    "ElfProgram",
    "LinkInfo",
    "Map",
    "MapInfo",
    "ProgInfo",
    "Queue",
    "TestRun",
    "link_create",
    "link_info",
    "link_update",
    "load_program",
    "map_create",
    "map_info",
    "obj_get",
    "obj_pin",
    "prog_fd_by_id",
    "prog_info",
    "prog_load",
    "prog_test_run",
    "prog_test_run_skb",
    "read_elf_program",
]


# -- pins ----------------------------------------------------------------------------------------------------------
#: How long the XDP programs a removed pin held may take to leave their interfaces, at most (seconds).
UNPIN_WAIT = 1.0


#: The BPF filesystem, and where mplslb pins what outlives its processes: one directory per daemon instance
#: (its program, maps and links) and per kept agent datapath.
BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "mplslb"


def ensure_bpffs(pins: Path) -> None:
    """Make ``pins`` (under /sys/fs/bpf) usable: mount the BPF filesystem there if nothing is mounted yet, as
    systemd does at boot, and create the directory."""
    mounted = any(
        line.split()[1:3] == [str(BPFFS), "bpf"] for line in Path("/proc/self/mounts").read_text().splitlines()
    )
    if not mounted:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, b"mode=0700") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mounting the BPF filesystem at {BPFFS}: {os.strerror(err)}")
    pins.mkdir(parents=True, exist_ok=True)


def possible_cpus() -> int:
    """How many CPUs a per-CPU map has a value for (the kernel's possible CPUs)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


def xdp_state(ifindex: int) -> tuple[str, int]:
    """(link kind, id of the attached XDP program or 0) of an interface in this namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ifindex)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    xdp = link.get_attr("IFLA_XDP")
    prog_id = (xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None) or 0
    return kind, int(prog_id)


def unpin(pins: Path, ifindexes: Iterable[int] = (), *, keep_dir: bool = False) -> None:
    """Remove everything pinned in the directory ``pins`` (and the directory, unless ``keep_dir``): what it held goes
    once nothing else holds it. Then wait, :data:`UNPIN_WAIT` at most, for the interfaces ``ifindexes`` to have no
    XDP program left (the links are freed as their last reference goes)."""
    if not pins.is_dir():
        return
    for entry in pins.iterdir():
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
    if not keep_dir:
        with contextlib.suppress(OSError):
            pins.rmdir()
    ports = list(ifindexes)
    deadline = time.monotonic() + UNPIN_WAIT
    while ports and time.monotonic() < deadline and any(xdp_state(i)[1] for i in ports):
        time.sleep(0.01)
