"""The plugin's C kernels, compiled on first use with the machine's C compiler.

torch ships no 4-bit matmul for x86 that beats ``int4_avx2.c`` on an AVX2-only CPU (int4.py's
docstring), and at a decode step's few rows its attention, RMSNorm and rotary embedding cost
more in op dispatch than in arithmetic (``attention_avx2.c``, ``rows_avx2.c``). A wheel of our
own would need a build per platform: the sources travel with the package and are compiled once
per machine into ``$RUNTIME_CACHE_DIR/native`` (default ``~/.cache/runtime/native``), keyed by
the sources and flags, so an edit or a new flag builds anew beside the old build.

Without a compiler or AVX2, or with ``RUNTIME_CPU_NATIVE=0``, ``library`` returns None and
callers keep their torch path: the kernels are an acceleration, never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("int4_avx2.c", "attention_avx2.c", "rows_avx2.c"))
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread
# pool, sized by torch.set_num_threads.
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)


def cache_dir() -> Path:
    return Path(os.environ.get("RUNTIME_CACHE_DIR") or Path.home() / ".cache" / "runtime") / "native"


def compiler_path() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def buildable() -> bool:
    """Whether the kernels can be built and run here: a C compiler, and AVX2 with FMA (which
    torch's AVX2 and AVX-512 builds of its own kernels imply)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and compiler_path() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their argument types set, or None where they are off or could not
    be built (the reason logged once)."""
    if os.environ.get("RUNTIME_CPU_NATIVE", "1") == "0":
        return None
    if not buildable():
        logger.info("no C compiler (cc, gcc or $CC) or no AVX2: the CPU plugin's kernels stay torch ops")
        return None
    compiler = compiler_path()
    sources = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(sources + " ".join((compiler, *FLAGS, *LIBS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels_avx2-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("could not build the CPU plugin's C kernels (%s): they stay torch ops", detail)
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.int4_matmul.restype = ctypes.c_int
    lib.int4_matmul.argtypes = [pointer] * 4 + [size] * 5
    lib.paged_decode_attention.restype = ctypes.c_int
    lib.paged_decode_attention.argtypes = [pointer, size, size, pointer, pointer, size, pointer, pointer, *[size] * 6, real,
                                           size, real, pointer, size, pointer, size, pointer]
    lib.rms_norm.restype = None
    lib.rms_norm.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer, size, size, real]
    lib.rotary_neox.restype = None
    lib.rotary_neox.argtypes = [pointer, size, pointer, size, pointer, size, pointer, pointer, pointer, size, size, size,
                                size]
    return lib


def _compile(compiler: str, target: Path) -> None:
    # Build beside the target and rename: processes starting together (pytest-xdist workers, the
    # server's engine and a benchmark) never load a half-written library.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), *LIBS], check=True, capture_output=True)
        os.replace(built, target)
