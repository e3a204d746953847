"""Reference kernels: plain torch, obviously correct. Conformance compares plugins with these,
and a platform falls back to them for any op it does not register.

``OPS`` names every op of the contract; a ``Kernel`` must use one of these names and the
same signature.
"""

from .activation import gelu_and_mul, silu_and_mul
from .attention import ReferenceAttentionBackend, paged_attention
from .grammar import apply_token_bitmask
from .kv import copy_blocks, host_cache_shape, swap_blocks
from .linear import linear
from .lora import linear_lora, linear_lora_from, lora_add, lora_add_per_slice, lora_expand, lora_shrink
from .moe import MOE_ACTIVATIONS, fused_moe, select_experts
from .norm import fused_add_rms_norm, rms_norm
from .rotary import build_cos_sin_cache, qk_norm_rotary_embedding, rotary_embedding, rotary_embedding_from
from .sampling import apply_top_k_top_p_min_p
from .spec import propose_ngram_batched

OPS = {
    "linear": linear,
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "qk_norm_rotary_embedding": qk_norm_rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
    "lora_add": lora_add,
    "linear_lora": linear_lora,
    "fused_moe": fused_moe,
    "copy_blocks": copy_blocks,
    "swap_blocks": swap_blocks,
    "apply_top_k_top_p_min_p": apply_top_k_top_p_min_p,
    "apply_token_bitmask": apply_token_bitmask,
    "propose_ngram_batched": propose_ngram_batched,
}

BATCH_INVARIANT = frozenset({
    "rms_norm", "fused_add_rms_norm", "rotary_embedding", "qk_norm_rotary_embedding", "silu_and_mul", "gelu_and_mul",
    "copy_blocks",
    "swap_blocks", "apply_top_k_top_p_min_p", "apply_token_bitmask", "propose_ngram_batched",
})
"""Ops whose reference computes each row on its own (elementwise, or a reduction along the row):
``--deterministic`` may fall back to them. The matmul ops (``linear``, LoRA, ``fused_moe``) are not:
torch's matmul picks its blocking by the number of rows (contract 1.10)."""

__all__ = ["BATCH_INVARIANT", "MOE_ACTIVATIONS", "OPS", "ReferenceAttentionBackend", "build_cos_sin_cache",
           "host_cache_shape", "linear_lora_from", "lora_add_per_slice", "paged_attention", "rotary_embedding_from",
           "select_experts", *OPS]
