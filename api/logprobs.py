"""Logprobs in OpenAI's two shapes: the completions API's parallel lists and chat's ``content`` list.

The engine gives, per token, a dict token id -> Logprob holding the chosen token (first) and the
top-k alternatives, each with its rank and decoded text.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

from runtime.engine.outputs import Logprob

from .protocol import ChatLogprob, ChatLogprobs, CompletionLogprobs, TopLogprob

# JSON has no -inf; vLLM reports impossible tokens as -9999.0.
_FLOOR = -9999.0

Entries = list[Optional[dict[int, Logprob]]]


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _FLOOR)


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: Entries,
                        text_offset: int = 0) -> CompletionLogprobs:
    """``entries`` aligned with ``token_ids``; a None entry (a prompt's first token) has no logprob.

    ``top_logprobs`` holds the chosen token and the top-k, as vLLM's (up to k + 1 entries);
    ``text_offset`` counts characters from ``text_offset`` on.
    """
    tokens = [entry[tid].decoded_token if entry else None for tid, entry in zip(token_ids, entries)]
    missing = [i for i, token in enumerate(tokens) if token is None]
    for i, text in zip(missing, tokenizer.batch_decode([[token_ids[i]] for i in missing])):
        tokens[i] = text
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=text_offset)) if tokens else []
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_value(entry[tid]) if entry else None for tid, entry in zip(token_ids, entries)],
        top_logprobs=[_top_dict(entry) if entry else None for entry in entries],
        text_offset=offsets)


def _top_dict(entry: dict[int, Logprob]) -> dict[str, float]:
    # Distinct tokens can decode alike (pieces of one character): the likelier one keeps the key.
    top: dict[str, float] = {}
    for lp in entry.values():
        top.setdefault(lp.decoded_token or "", _value(lp))
    return top


def _top(logprob: Logprob) -> TopLogprob:
    token = logprob.decoded_token or ""
    return TopLogprob(token=token, logprob=_value(logprob), bytes=list(token.encode()))


def chat_logprobs(token_ids: list[int], entries: Entries, top_k: int) -> ChatLogprobs:
    """Chat's shape: per token the chosen one and exactly the ``top_k`` most likely (by rank)."""
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = _top(entry[tid])
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_k), key=lambda lp: lp.rank)
        content.append(ChatLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes,
                                   top_logprobs=[_top(lp) for lp in top]))
    return ChatLogprobs(content=content)
