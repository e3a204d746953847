"""The plugin's C kernels, compiled on first use with the machine's C compiler.

torch ships no 4-bit matmul for x86 that beats ``int4_avx2.c`` on an AVX2-only CPU (int4.py's
docstring), and a wheel of our own would need a build per platform: the source travels with the
package and is compiled once per machine into ``$RUNTIME_CACHE_DIR`` (default
``~/.cache/runtime``), keyed by the source and flags, so an edit or a new flag rebuilds it.
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

SOURCE = Path(__file__).with_name("int4_avx2.c")
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread
# pool, sized by torch.set_num_threads.
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)


def cache_dir() -> Path:
    return Path(os.environ.get("RUNTIME_CACHE_DIR") or Path.home() / ".cache" / "runtime") / "native"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels with their argument types set, or None where they are off or could not
    be built (the reason logged once)."""
    if os.environ.get("RUNTIME_CPU_NATIVE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None  # no AVX2 and FMA to run them
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler (cc, gcc or $CC): the int4 CPU matmul stays on torch's kernel")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, *LIBS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"int4_avx2-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.warning("could not build the int4 CPU kernel (%s): the int4 matmul stays on torch's kernel", detail)
        return None
    lib.int4_matmul.restype = ctypes.c_int
    lib.int4_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 5
    return lib


def _compile(compiler: str, target: Path) -> None:
    # Build beside the target and rename: processes starting together (pytest-xdist workers, the
    # server's engine and a benchmark) never load a half-written library.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), *LIBS], check=True, capture_output=True)
        os.replace(built, target)
    for stale in target.parent.glob("int4_avx2-*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)  # an earlier source's build (a process still using it keeps its mapping)
