"""The n-gram proposer (prompt lookup): a sequence that repeats itself, as code edits, quotes and
extraction do, proposes the tokens that followed the last time its latest n tokens occurred."""

from __future__ import annotations

import numpy as np

from ..sched.scheduler import SchedulerOutput


def propose_ngram(token_ids: np.ndarray, num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the sequence's
    last n tokens, for the largest n in [min_n, max_n] that occurs; [] when none does.

    The candidates are the positions holding the last token, checked backwards for n - 1 more
    tokens at once; a sequence of L tokens costs O(L) and a few vector compares.
    """
    length = len(token_ids)
    if num_tokens < 1 or length < min_n + 1:
        return []
    # Occurrences ending before the last token, so that at least one token follows each.
    ends = np.flatnonzero(token_ids[:-1] == token_ids[-1])
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        candidates = ends[ends >= n - 1]
        for back in range(1, n):
            if not len(candidates):
                break
            candidates = candidates[token_ids[candidates - back] == token_ids[length - 1 - back]]
        if len(candidates):
            start = int(candidates[-1]) + 1
            return token_ids[start:start + num_tokens].tolist()
    return []


class NgramProposer:
    """Proposes from each request's own tokens (prompt and output); no device work."""

    may_skip_steps = True
    """A step it does not see (the engine's look-ahead) costs it nothing: it reads the tokens known
    when it proposes."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}
        """Per request, its tokens as an array (grown by doubling) and how many it holds: a step
        copies only the tokens added since the last, not the whole list (tens of microseconds
        per request and step for a few hundred tokens)."""

    def propose(self, out: SchedulerOutput) -> None:
        """Fill each decoding request's room for proposed tokens (see ``ScheduledRequest.set_drafts``)."""
        for rid in out.finished_ids:
            self._arrays.pop(rid, None)
        for item in out.scheduled:
            if item.max_drafts:
                item.set_drafts(propose_ngram(self._token_array(item.request), item.max_drafts, self.min_n,
                                              self.max_n))

    def finds_any(self, requests) -> bool:
        """Whether some request's known tokens (prompt and output read back so far) propose
        anything: where none do, the step after the one in flight is unlikely to either (the
        engine then looks it ahead rather than chain a verification, ``EngineCore._proposing``).
        Only the shortest n is searched: any longer one that occurs contains it."""
        return any(len(propose_ngram(self._token_array(request), 1, self.min_n, self.min_n)) for request in requests)

    def _token_array(self, request) -> np.ndarray:
        """The request's ``all_token_ids`` (which only grows) as an array."""
        tokens = request.all_token_ids
        array, held = self._arrays.get(request.request_id, (None, 0))
        if array is None or len(array) < len(tokens):
            grown = np.empty(max(2 * len(tokens), 64), dtype=np.int64)
            if array is not None:
                grown[:held] = array[:held]
            array = grown
        array[held:len(tokens)] = tokens[held:]
        self._arrays[request.request_id] = (array, len(tokens))
        return array[:len(tokens)]
