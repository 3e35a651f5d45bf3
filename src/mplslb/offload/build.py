"""Build the BPF programs from their C sources with clang, once per source and compiler, into a cache directory.

Each source (``mplslb_xdp.c``, ``mplslb_endpoint.c`` beside this file) includes ``mplslb_layout.h``, generated here
from :mod:`mplslb.switching.layout` (every frame offset, bit and bound, and the structs the maps hold), so the
kernel programs and the userspace fast paths read frames with the same numbers, and ``mplslb_bpf.h`` beside them
(the BPF interface they share). clang alone is needed (Debian: ``clang``); no kernel headers, no libbpf. The
object is cached as ``<source>-<digest>.o`` where the digest covers the source, the headers, the flags (with a
variant's ``-D`` macros) and the compiler's path, in ``$MPLSLB_CACHE_DIR``, else ``$XDG_CACHE_HOME/mplslb``, else
``~/.cache/mplslb``; it is written to a temporary name and renamed, so concurrent daemons never read half a file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mplslb.switching.layout import c_header

SOURCE = Path(__file__).with_name("mplslb_xdp.c")
CFLAGS = ("-O2", "-target", "bpf", "-mcpu=v2", "-Wall", "-Werror", "-c")
COMPILE_TIMEOUT = 120.0
LAYOUT_HEADER = "mplslb_layout.h"


class BuildError(RuntimeError):
    """The program could not be built (no clang, or clang refused the source)."""


def find_clang() -> str:
    """The clang to use: ``$MPLSLB_CLANG``, ``clang`` on the PATH, or the newest versioned one Debian installs."""
    explicit = os.environ.get("MPLSLB_CLANG")
    if explicit:
        return explicit
    found = shutil.which("clang")
    if found:
        return found
    versioned = sorted(glob.glob("/usr/bin/clang-[0-9]*") + glob.glob("/usr/lib/llvm-*/bin/clang"))
    if versioned:
        return versioned[-1]
    raise BuildError("clang is needed to build the XDP program (Debian package: clang)")


def cache_dir() -> Path:
    explicit = os.environ.get("MPLSLB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mplslb"


def build_object(
    source: Path = SOURCE,
    *,
    clang: str | None = None,
    directory: Path | None = None,
    defines: Mapping[str, int] | None = None,
) -> bytes:
    """The compiled object of ``source``: from the cache, or compiled now and cached. ``defines``: ``-D`` macros
    (a variant of the program, cached apart)."""
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read the XDP program source {source}: {exc.strerror}") from None
    compiler = clang or find_clang()
    header = c_header().encode()
    shared = b"".join(path.read_bytes() for path in sorted(source.parent.glob("*.h")))
    flags = (*CFLAGS, *(f"-D{name}={value}" for name, value in sorted((defines or {}).items())))
    parts = [text, header, shared, " ".join(flags).encode(), compiler.encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    where = directory or cache_dir()
    target = where / f"{source.stem}-{digest}.o"
    try:
        return target.read_bytes()
    except OSError:
        pass
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        where = Path(tempfile.gettempdir())  # an unwritable cache only costs a compile per start
        target = where / target.name
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".tmp", dir=where)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix="mplslb-layout") as include:
            Path(include, LAYOUT_HEADER).write_bytes(header)
            command = [compiler, *flags, "-I", include, str(source), "-o", tmp]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BuildError(f"running {compiler}: {exc}") from None
        if done.returncode != 0:
            raise BuildError(f"{compiler} could not build {source.name}:\n{done.stderr.strip()}")
        data = Path(tmp).read_bytes()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data
