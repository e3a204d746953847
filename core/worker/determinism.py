"""What ``--deterministic`` requires of a platform's kernels and quantization methods (contract 1.10).

A request is reproducible on a busy server only if every op on its path computes each row from
that row alone: one op that picks its blocking by the batch's size (torch's own matmul does)
makes a row's logits depend on its neighbours. The engine therefore refuses the mode, naming the
op, rather than run it half batch-invariant.
"""

from __future__ import annotations

from typing import Any

from ..platform import KernelSet, QuantizationMethod

DENSE_PATH = ("linear", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul",
              "apply_top_k_top_p_min_p", "apply_token_bitmask")
"""Ops every decoder step may run."""
LORA_PATH = ("lora_add",)
MOE_PATH = ("fused_moe",)


def check_batch_invariant(ops: KernelSet, settings: Any, lora: bool) -> None:
    """Raise ValueError naming each op this model runs for which the platform has no batch-invariant kernel."""
    needed = DENSE_PATH + (MOE_PATH if settings.moe is not None else ()) + (LORA_PATH if lora else ())
    missing = [op for op in needed if op in ops.not_batch_invariant]
    if missing:
        raise ValueError(f"--deterministic needs batch-invariant kernels, and this platform has none for "
                         f"{', '.join(missing)}: run without --deterministic" + (" or without --enable-lora" if
                                                                               "lora_add" in missing else ""))


def check_batch_invariant_method(method: QuantizationMethod) -> None:
    """Raise ValueError where a quantization method does not claim a batch-invariant ``apply``."""
    if not method.batch_invariant:
        raise ValueError(f"--deterministic needs a batch-invariant quantization method, and {method.name} on "
                         f"{method.platform} is not: run without --deterministic or choose another --quantization")
