"""The draft-model proposer: a smaller model with the target's vocabulary proposes greedily.

The draft model has its own KV cache with as many blocks as the target's and uses the target's
block tables, so a request's blocks hold both models' K/V and the prefix cache serves both. The
draft computes every known token the target computes in the same step (prompt chunks, the token
after the last accepted one), then proposes: the argmax after the last known token, then one
more forward pass per proposed token. Its K/V only shapes proposals: wherever it lags (a
request that finished before the draft caught up on its last tokens, a prefix block cached
then), proposals get worse, never the output, which verification decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..sched.scheduler import SchedulerOutput
from ..worker.input_buffers import step_inputs


class DraftModelProposer:
    may_skip_steps = False
    """Its K/V follows every step the target computes, from tokens known on the host."""

    def __init__(self, draft_runner: Any):
        self.runner = draft_runner
        self._computed: dict[str, int] = {}
        """Per request, how many leading positions hold the draft's K/V of the known tokens."""
        self._proposed: dict[str, tuple[int, int]] = {}
        """Per request with proposals in flight: (its token count then, the number proposed)."""

    def propose(self, out: SchedulerOutput) -> None:
        """Catch the draft up on the step's known tokens and fill each decoding request's room
        for proposals (``ScheduledRequest.set_drafts``)."""
        for rid in (*out.finished_ids, *out.preempted_ids):
            self._computed.pop(rid, None)
            self._proposed.pop(rid, None)
        self.runner.drop_requests(out.finished_ids)
        # Rows that propose first, those with the most room first (greedy_chain's order).
        items = sorted(out.scheduled, key=lambda item: -item.max_drafts)
        token_lists, starts, tables, last_rows, widths = [], [], [], [], []
        num_tokens = 0
        for item in items:
            request = item.request
            rid = request.request_id
            # A request new to the draft starts where the target does: prefix-cache hits hold
            # the draft's K/V too.
            computed = self._settle(rid, request.num_tokens) if rid in self._computed else item.start
            end = item.start + item.num_new_tokens
            if end <= computed:
                continue
            token_lists.append(request.all_token_ids[computed:end])
            starts.append(computed)
            tables.append(item.block_ids)
            num_tokens += end - computed
            self._computed[rid] = end
            if item.max_drafts:
                last_rows.append(num_tokens - 1)
                widths.append(item.max_drafts)
        if not token_lists:
            return
        first = step_inputs(np.fromiter((t for tokens in token_lists for t in tokens), np.int64, num_tokens),
                            starts, [len(t) for t in token_lists], tables, self.runner.block_size)
        chains = self.runner.greedy_chain(first, last_rows, widths)
        for item, chain in zip(items, chains):  # the proposing items are the first ones
            rid = item.request.request_id
            item.set_drafts(chain)
            # The chain's passes computed K/V for the last known token and all but the last proposal.
            self._computed[rid] = item.request.num_tokens + len(chain) - 1
            self._proposed[rid] = (item.request.num_tokens, len(chain))

    def _settle(self, rid: str, num_tokens: int) -> int:
        """The draft's valid K/V length once the previous proposals' fate is known: the
        positions of accepted proposals it computed stay, those of rejected ones do not."""
        proposed = self._proposed.pop(rid, None)
        if proposed is not None:
            before, count = proposed
            accepted = num_tokens - before - 1
            self._computed[rid] = before + min(accepted, count - 1)
        return self._computed[rid]
