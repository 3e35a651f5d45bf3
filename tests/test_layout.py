"""The fast paths' one layout: the C programs are built from it and agree with it, value by value and field by field."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from mplslb.offload.build import LAYOUT_HEADER, SOURCE, BuildError, build_object, find_clang
from mplslb.switching import layout
from mplslb.wire import mpls
from mplslb.wire.ethernet import ETH_P_MPLS_UC

C_SOURCES = sorted(SOURCE.parent.glob("*.c"))
HOST_CC = shutil.which("gcc") or shutil.which("cc")
#: Numbers a C program may write as literals: the octets of a big-endian 32-bit word and their shifts (0-3, 8, 16,
#: 24), the octet mask, and what is not frame layout (the kernel's XDP verdicts and BPF helper ids, declared once).
ALLOWED_LITERALS = {"0", "1", "2", "3", "8", "16", "24", "0xff"}
_NOT_LAYOUT = re.compile(r"^\s*(#define XDP_|static .*\(\*bpf_\w+\)\(.*= \(void \*\)\d+;)")


def host_program(tmp_path: Path) -> str:
    """Compile, with the host's C compiler, a program that prints every constant and ``struct entry``'s layout
    as the generated header gives them to C; returns what it printed."""
    if HOST_CC is None:
        pytest.skip("no host C compiler (gcc)")
    (tmp_path / LAYOUT_HEADER).write_text(layout.c_header())
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{LAYOUT_HEADER}"', "int main(void) {"]
    for name in layout.constants():
        lines.append(f'\tprintf("%s %lld\\n", "{name}", (long long)({name}));')
    for cname, fields in layout.C_STRUCTS.items():
        for name, *_ in fields:
            lines.append(f'\tprintf("offsetof.{cname}.%s %zu\\n", "{name}", offsetof(struct {cname}, {name}));')
        lines.append(f'\tprintf("sizeof.{cname} %zu\\n", sizeof(struct {cname}));')
    lines += ["\treturn 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    subprocess.run([HOST_CC, "-Wall", "-Werror", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")],
                   check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    return subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout


def test_the_c_header_gives_c_every_value_of_the_python_layout(tmp_path: Path) -> None:
    printed = dict(line.split(" ", 1) for line in host_program(tmp_path).splitlines())
    assert {name: int(printed[name]) for name in layout.constants()} == layout.constants()
    offsets = {name: int(printed[f"offsetof.entry.{name}"]) for name, *_ in layout.KERNEL_ENTRY_FIELDS}
    assert offsets == layout.struct_offsets(layout.KERNEL_ENTRY_FIELDS)
    assert int(printed["sizeof.entry"]) == layout.KERNEL_ENTRY.size
    for cname, fields in layout.C_STRUCTS.items():
        offsets = {name: int(printed[f"offsetof.{cname}.{name}"]) for name, *_ in fields}
        assert offsets == layout.struct_offsets(fields), cname
        assert int(printed[f"sizeof.{cname}"]) == struct.calcsize(layout.struct_format(fields)), cname


def test_the_layout_is_the_wire_codecs_layout() -> None:
    assert layout.LABEL_SPACE == 1 << mpls.LABEL_BITS == mpls.LABEL_MAX + 1
    assert layout.RESERVED_LABEL_MAX == mpls.RESERVED_LABEL_MAX == max(mpls.ReservedLabel)
    assert layout.ENTRY is mpls.ENTRY
    frame = bytes(6) + bytes(range(1, 7)) + ETH_P_MPLS_UC.to_bytes(2, "big") + mpls.pack_entry(1001, 5, True, 63)
    assert frame[layout.ETH_SRC : layout.ETH_SRC + layout.ETH_ALEN] == bytes(range(1, 7))
    assert int.from_bytes(frame[layout.ETH_TYPE : layout.ETH_TYPE + 2], "big") == layout.ETH_P_MPLS_UC
    (entry,) = layout.ENTRY.unpack_from(frame, layout.LSE_AT)
    assert (
        entry >> layout.LABEL_SHIFT == 1001 and entry & layout.MPLS_BOS and frame[layout.LSE_AT + layout.LSE_TTL] == 63
    )
    assert len(frame) == layout.IP_AT == layout.LABELLED_MIN


@pytest.mark.parametrize("source", C_SOURCES, ids=[p.name for p in C_SOURCES])
def test_c_programs_take_their_layout_from_the_header(source: Path) -> None:
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", source.read_text(), flags=re.S)
    assert f'#include "{LAYOUT_HEADER}"' in text
    defined = set(re.findall(r"#define\s+(\w+)", text))
    assert not defined & set(layout.C_CONSTANTS), "a C program defines a layout name of its own"
    assert "struct entry {" not in text and "typedef" not in text, "struct entry and the types come from the header"
    literals = set()
    for line in text.splitlines():
        if not _NOT_LAYOUT.search(line) and "SEC(" not in line:
            literals |= set(re.findall(r"(?<![\w.])(0x[0-9a-fA-F]+|\d+)(?![\w.])", line))
    assert {x.lower() for x in literals} <= ALLOWED_LITERALS, "frame numbers belong in mplslb.switching.layout"


@pytest.mark.parametrize("source", C_SOURCES, ids=[p.name for p in C_SOURCES])
def test_c_programs_build_from_the_layout(source: Path, tmp_path: Path) -> None:
    try:
        find_clang()
    except BuildError as exc:
        pytest.skip(str(exc))
    obj = build_object(source, directory=tmp_path)
    assert obj[:4] == b"\x7fELF"
    assert build_object(source, directory=tmp_path) == obj  # cached by a digest that covers the header
    assert len(list(tmp_path.glob("*.o"))) == 1


def test_the_switching_row_structs_lie_on_the_row_offsets() -> None:
    """The structs that write a label's row at once put each field at its ``ROW_*`` offset, inside the row: the
    numbers and MACs fill the first line, the flow binding the second up to the generation word."""
    assert layout.ROW.size == layout.ROW_SIZE // 2
    offsets = [struct.calcsize(layout.ROW.format[: 1 + n]) for n in range(len(layout.ROW.format))]
    assert 4 * layout.ROW_IN_PORT in offsets and 8 * layout.ROW_PACKETS in offsets and 8 * layout.ROW_REWRITE in offsets
    binding = layout.ROW_BINDING
    assert layout.ROW_FLOW + struct.calcsize(f"={layout.FLOW_MAX}s") == layout.ROW_FLOW_LEN
    assert layout.ROW_FLOW_LEN + 1 == layout.ROW_PEER_IP_LEN
    assert layout.ROW_FLOW + binding.size - layout.PEER_IP_MAX == layout.ROW_PEER_IP
    assert layout.ROW_FLOW + binding.size <= 4 * layout.ROW_GENERATION < layout.ROW_SIZE
    pair = layout.ROW_PAIR
    assert pair.size == 2 * layout.ROW_SIZE
    row = pair.format[1 : 1 + (len(pair.format) - 1) // 2]
    assert struct.calcsize("=" + row) == layout.ROW_SIZE
    assert struct.calcsize("=" + layout.ROW.format[1:] + layout.ROW_BINDING.format[1:]) == 4 * layout.ROW_GENERATION
