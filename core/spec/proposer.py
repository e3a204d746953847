"""Which proposer an engine uses, the settings it refuses, and the acceptance counters."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from ..sched.scheduler import SchedulerOutput
from .config import SpeculativeConfig
from .draft import DraftModelProposer
from .ngram import NgramProposer


class Proposer(Protocol):
    may_skip_steps: bool
    """Whether the engine may run a step without asking for proposals first (a step scheduled
    ahead, see ``EngineCore._looks_ahead``); :meth:`propose` still sees it, with no room."""

    def propose(self, out: SchedulerOutput) -> None:
        """Fill the room for proposed tokens of the step's decoding requests
        (``ScheduledRequest.set_drafts``), before the step is launched."""


def check_speculative(args: Any) -> None:
    """ValueError for settings speculative decoding does not support yet, naming the alternative."""
    if args.speculative is None:
        return
    if args.speculative.method == "draft_model" and args.tensor_parallel_size > 1:
        raise ValueError("a draft model with --tensor-parallel-size above 1 is not supported yet: use "
                         '"method": "ngram", or one rank')
    if args.pipeline_parallel_size > 1:
        raise ValueError("speculative decoding with --pipeline-parallel-size above 1 is not supported yet: use "
                         "--tensor-parallel-size to split the model, or drop --speculative-config")


def make_proposer(config: Optional[SpeculativeConfig], runner: Any) -> Optional[Proposer]:
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return DraftModelProposer(runner.draft)


class SpecCounters:
    """Proposals verified and accepted since start (vLLM's spec_decode metrics)."""

    def __init__(self, num_speculative_tokens: int):
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * num_speculative_tokens

    def count(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        for item in out.scheduled:
            tokens = sampled.get(item.request.request_id)
            if item.draft_token_ids and tokens:
                accepted = len(tokens) - 1
                self.num_drafts += 1
                self.num_draft_tokens += len(item.draft_token_ids)
                self.num_accepted_tokens += accepted
                for position in range(accepted):
                    self.accepted_per_position[position] += 1

    def fields(self) -> dict[str, Any]:
        """EngineStats' speculative-decoding fields."""
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_position": list(self.accepted_per_position)}
