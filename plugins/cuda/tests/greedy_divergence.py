"""How the GPU end-to-end tests compare greedy outputs: token for token, a different token only at
a near-tie of the reference, and equal tokens' logprobs within the dtype's tolerance."""

from __future__ import annotations

import gc
import math

import torch

LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.35}
"""Logprob tolerance per dtype (runtime_conformance's): how close a near-tie must be to excuse a different token."""


def release() -> None:
    """Engines hold their KV cache until collected; free it before the next one sizes its own."""
    gc.collect()
    torch.cuda.empty_cache()


def divergence(ours, ref, tolerance: float) -> str | None:
    """Where greedy ``ours`` departs from ``ref`` (CompletionOutputs with logprobs) beyond a near-tie."""
    for step, (token, ref_token) in enumerate(zip(ours.token_ids, ref.token_ids)):
        row = ref.logprobs[step]
        if token == ref_token:
            if abs(ours.logprobs[step][token].logprob - row[token].logprob) > tolerance:
                return (f"token {step} ({token}): logprob {ours.logprobs[step][token].logprob:.4f}, "
                        f"reference {row[token].logprob:.4f}")
            continue
        gap = row[ref_token].logprob - (row[token].logprob if token in row else -math.inf)
        return None if gap <= tolerance else f"token {step}: {token}, reference {ref_token} (logprob gap {gap:.4f})"
    return None if len(ours.token_ids) == len(ref.token_ids) else "different lengths"
