"""The plugin's tests run its Triton kernels on a GPU when there is one, else on the CPU under
Triton's interpreter (tiny shapes), so CI without a GPU still checks every kernel it can.

TRITON_INTERPRET must be set before triton is first imported: a kernel is bound to the
interpreter or to the compiler when its ``@triton.jit`` runs, at import. The plugin itself
imports its kernels only where the CUDA platform is available, so nothing has imported them
before this file on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The reasons a check cannot run under the interpreter, said once.
INTERPRETER_BF16_DOT = ("Triton's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits "
                        "(triton/runtime/interpreter.py create_dot), so bfloat16 tl.dot kernels (attention, "
                        "the skinny matmul, LoRA) are checked on a GPU only")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU through the interpreter."""
    pytest.importorskip("triton", reason="runtime-cuda's kernels need triton (pip install triton)")
    if not HAS_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        from runtime_triton import kernels

        if not isinstance(kernels._rms_norm_kernel, InterpretedFunction):
            pytest.skip("runtime_triton's kernels were imported before TRITON_INTERPRET=1 was set, so they need a GPU; "
                        "run these tests in their own pytest process")
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture
def require_dot(device):
    """``require_dot(dtype)`` skips a check of a tl.dot kernel in a dtype the interpreter gets wrong."""
    def check(dtype: torch.dtype) -> None:
        if device.type == "cpu" and dtype == torch.bfloat16:
            pytest.skip(INTERPRETER_BF16_DOT)
    return check
