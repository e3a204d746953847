"""Greedy generation with HF transformers, the independent reference for model outputs."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's full log-softmax row, ignoring EOS (as ``ignore_eos``)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past = out.past_key_values
    tokens, rows = [], []
    logits = out.logits[0, -1].float()
    for _ in range(max_new_tokens):
        logprobs = logits.log_softmax(-1)
        token = int(logprobs.argmax())
        tokens.append(token)
        rows.append(logprobs)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return tokens, rows


def assert_greedy_matches(ours: list[int], reference: list[int], reference_rows: list[torch.Tensor],
                          near_tie: float = 1e-3, context: str = "") -> None:
    """Token-for-token equality; a divergence is accepted only at a near-tie of the reference,
    where our token must be within ``near_tie`` of the reference's best logprob (then stop)."""
    assert len(ours) == len(reference), f"{context}: {len(ours)} tokens, reference has {len(reference)}"
    for step, (mine, theirs) in enumerate(zip(ours, reference)):
        if mine == theirs:
            continue
        row = reference_rows[step]
        gap = float(row[theirs] - row[mine])
        assert gap < near_tie, (f"{context}: step {step} chose {mine}, reference {theirs}, "
                                f"reference logprob gap {gap:.4g} is not a near-tie")
        return
