"""Sampling helpers: top-k / top-p / min-p masking of a batch of logits, one setting per row."""

import torch

FIXED_POINT = 2.0 ** 40
"""Units per probability 1 of the top-p running sum: 2**40 * vocab stays far inside int64."""


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; top_k [B] int (<= 0 or >= V: off); top_p [B] float (1: off); min_p [B] (0: off).

    Returns logits with excluded tokens set to -inf. top-k keeps the k largest (ties at the
    k-th value kept); top-p keeps the smallest set of largest tokens whose probability sum
    reaches p, judged on the distribution renormalised over the top-k survivors (vLLM's and
    HF's order; the most likely token always kept); min-p keeps tokens with
    prob >= min_p * max prob (the same before or after top-k, being relative to the maximum).
    """
    # In place where it can be, and each [B, V] temporary dropped once used: at a full batch over a
    # large vocabulary (256 x 151,936) every such tensor is 148 MiB, or 297 as int64, and the worst
    # case of this op is part of what the engine reserves beside the KV cache.
    vocab = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k).long()
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    out = logits.masked_fill(logits < kth, float("-inf"))
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    probs_sorted = sorted_logits.float().masked_fill(ranks >= k.unsqueeze(-1), float("-inf")).softmax(-1)
    # The running sum in integers (units of 2**-40, exact in any order): a float sum's rounding depends
    # on how the device's scan groups the additions, which on CUDA changes with the number of rows,
    # and a row's mask must not depend on its batch (--deterministic).
    running = probs_sorted.mul_(FIXED_POINT).round_().long()
    del probs_sorted
    running.cumsum_(-1)
    limit = (top_p.double() * FIXED_POINT).ceil().long().unsqueeze(-1)
    # A token is kept while the sum of the tokens before it is under the limit (the first always).
    # top_p >= 1 is off: rounded probabilities can sum past 1 before a long tail ends and would cut it.
    keep_sorted = torch.ones_like(logits, dtype=torch.bool)
    keep_sorted[:, 1:] = (running[:, :-1] < limit) | (top_p >= 1).unsqueeze(-1)
    del running
    threshold = sorted_logits.masked_fill_(~keep_sorted, float("inf")).min(-1, keepdim=True).values
    del sorted_logits, keep_sorted
    out.masked_fill_(logits < threshold, float("-inf"))
    probs = logits.float().softmax(-1)
    out.masked_fill_(probs < min_p.float().unsqueeze(-1) * probs.max(-1, keepdim=True).values, float("-inf"))
    return out
