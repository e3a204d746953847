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
    vocab = logits.shape[-1]
    out = logits.clone()
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k).long()
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    out = out.masked_fill(logits < kth, float("-inf"))
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    probs_sorted = sorted_logits.float().masked_fill(ranks >= k.unsqueeze(-1), float("-inf")).softmax(-1)
    # The running sum in integers (units of 2**-40, exact in any order): a float sum's rounding depends
    # on how the device's scan groups the additions, which on CUDA changes with the number of rows,
    # and a row's mask must not depend on its batch (--deterministic).
    units = (probs_sorted * FIXED_POINT).round().long()
    before = units.cumsum(-1) - units
    limit = (top_p.double() * FIXED_POINT).ceil().long().unsqueeze(-1)
    # top_p >= 1 is off: rounded probabilities can sum past 1 before a long tail ends and would cut it.
    keep_sorted = (before < limit) | (top_p >= 1).unsqueeze(-1)
    keep_sorted[:, 0] = True
    threshold = sorted_logits.masked_fill(~keep_sorted, float("inf")).min(-1, keepdim=True).values
    out = out.masked_fill(logits < threshold, float("-inf"))
    probs = logits.float().softmax(-1)
    out = out.masked_fill(probs < min_p.float().unsqueeze(-1) * probs.max(-1, keepdim=True).values, float("-inf"))
    return out
