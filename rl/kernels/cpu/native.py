"""The cpu backend's C kernels (csrc/*.c, *.h): built once per machine, loaded with ctypes.

The sources are compiled together into one shared library with the system C compiler (`cc`,
or $CC) into rl/kernels/cpu/_build (or $LOCKSTEP_BUILD_DIR, or ~/.cache/lockstep when the
package is read-only), named by a hash of the sources, compiler, flags and CPU kind; processes racing to
build it each write their own file and rename it into place. The flags fix the arithmetic:
no -ffast-math (the compiler may not reorder a sum) and -ffp-contract=off (no fused
multiply-add), so each kernel's documented order is what runs, whatever the vector width
-march=native gives. The build fingerprint (rl/model/fingerprint.py) hashes these sources.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c11", "-shared", "-fPIC")
LIBS = ("-lm",)


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def _build_dirs() -> list[Path]:
    env = os.environ.get("LOCKSTEP_BUILD_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [Path(__file__).with_name("_build"), Path.home() / ".cache" / "lockstep"]


def _compiler() -> str:
    wanted = os.environ.get("CC")
    cc = shutil.which(wanted) if wanted else (shutil.which("cc") or shutil.which("gcc"))
    if not cc:
        raise NativeBuildError("lockstep's CPU kernels need a C compiler to build "
                               f"{', '.join(p.name for p in SOURCES)}: "
                               + (f"$CC={wanted!r} was not found" if wanted
                                  else "install gcc (or set $CC); neither 'cc' nor 'gcc' is on PATH"))
    return cc


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (a library built on
    one machine is never loaded on another kind, e.g. from a copied or shared directory)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)) or platform.machine()


def library_path() -> Path:
    """Build (if needed) and return the shared library's path."""
    cc = _compiler()
    digest = hashlib.sha256("\0".join((cc, _cpu_identity()) + FLAGS + LIBS).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    name = f"lockstep-cpu-{digest.hexdigest()[:16]}.so"
    errors = []
    for directory in _build_dirs():
        target = directory / name
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", dir=directory)
            os.close(fd)
        except OSError as err:
            errors.append(f"{directory}: {err}")
            continue
        result = subprocess.run([cc, *FLAGS, *map(str, SOURCES), *LIBS, "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise NativeBuildError(f"compiling {', '.join(map(str, SOURCES))} with {cc} failed "
                                   f"(exit {result.returncode}):\n{result.stderr.strip()}")
        os.replace(tmp, target)
        return target
    raise NativeBuildError("no writable build directory for the CPU kernels: " + "; ".join(errors))


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    return ctypes.CDLL(str(library_path()))
