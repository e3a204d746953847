"""The ops of this package as ``Kernel`` registrations for one platform.

A platform plugin (runtime-cuda, runtime-rocm) returns ``kernels(its name)`` from its
``runtime_kernels`` hook; this package registers nothing by itself (it has no entry point).

- ``rms_norm``, ``fused_add_rms_norm``, ``rotary_embedding``, ``qk_norm_rotary_embedding``, ``silu_and_mul``,
  ``gelu_and_mul``: ``kernels.py``.
- ``linear``: ``skinny_matmul.py``'s kernel for few rows, the vendor BLAS (cuBLAS, hipBLASLt)
  otherwise; under ``--deterministic`` ``batch_invariant.py``'s one-plan kernel.
- ``lora_shrink`` / ``lora_expand``: ``lora.py``'s kernels, one launch for every adapter of the step;
  ``lora_add``: one shrink and one expand launch for every partition of a fused projection too;
  ``linear_lora``: for the skinny kernel's steps, the shrink and then the skinny matmul adding the
  adapters' products to its tile (no expand launch), else ``linear`` and ``lora_add``.
- ``fused_moe``: ``moe.py``'s grouped GEMMs, one launch for gate/up (with the activation) and one
  for down over the token/expert pairs sorted by expert.
- ``apply_token_bitmask``: ``bitmask.py``'s kernel, structured output's mask of every constrained row.
- ``propose_ngram_batched``: ``ngram.py``'s kernel, the n-gram proposer's search for every request in one launch.
- ``swap_blocks``: ``swap.py``'s asynchronous copies between the KV cache and its pinned host copy
  on a side stream (KV offload, preemption by swap).
"""

from __future__ import annotations

import functools

from runtime.platform import Kernel

from . import batch_invariant
from .bitmask import apply_token_bitmask
from .kernels import fused_add_rms_norm, gelu_and_mul, qk_norm_rotary_embedding, rms_norm, rotary_embedding, silu_and_mul
from .lora import linear_lora, lora_add, lora_expand, lora_shrink
from .moe import fused_moe
from .ngram import propose_ngram_batched
from .skinny_matmul import linear
from .swap import swap_blocks
from .tile_plans import TilePlans

BATCH_INVARIANT = {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "qk_norm_rotary_embedding", "silu_and_mul",
                   "gelu_and_mul", "apply_token_bitmask", "swap_blocks", "propose_ngram_batched"}
"""Ops whose kernels compute each row on its own, whatever else is in the batch (contract 1.10)."""

OPS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "qk_norm_rotary_embedding": qk_norm_rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "linear": linear,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "lora_add": lora_add,
    "linear_lora": linear_lora,
    "fused_moe": fused_moe,
    "apply_token_bitmask": apply_token_bitmask,
    "propose_ngram_batched": propose_ngram_batched,
    "swap_blocks": swap_blocks,
}


def kernels(platform: str, plans: TilePlans) -> list[Kernel]:
    """Every op of this package, registered for ``platform``, launched with ``plans``' tiles."""
    tiled = {op: functools.update_wrapper(functools.partial(fn, plan=plans.skinny_matmul), fn)
             for op, fn in (("linear", linear), ("linear_lora", linear_lora))}
    return [Kernel(platform, op, tiled.get(op, fn), batch_invariant=op in BATCH_INVARIANT) for op, fn in OPS.items()] + [
        Kernel(platform, "linear", batch_invariant.linear, priority=-1, batch_invariant=True)]
