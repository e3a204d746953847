"""Turns the core's token outputs into RequestOutputs: detokenizes incrementally, applies stop
strings, assembles logprobs, and folds the n samples of a request into one result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..sample.params import SamplingParams
from .messages import EngineCoreOutput
from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class _Sample:
    completion: CompletionOutput
    detokenizer: IncrementalDetokenizer
    parent: "_Request"


@dataclass
class _Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None

    @property
    def finished(self) -> bool:
        if len(self.samples) == 1:
            return self.samples[0].completion.finish_reason is not None
        return all(s.completion.finish_reason is not None for s in self.samples)


def child_id(request_id: str, index: int, n: int) -> str:
    """Core-level id of sample ``index``; n == 1 keeps the caller's id."""
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    """``final_only`` (the offline ``LLM``, which returns finished requests only): a request's
    RequestOutput is made once, when it finishes, and no step computes stream deltas."""

    def __init__(self, tokenizer: Any, final_only: bool = False):
        self.tokenizer = tokenizer
        self.final_only = final_only
        self._samples: dict[str, _Sample] = {}
        self._requests: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams) -> list[str]:
        """Track a request; returns the core-level ids of its n samples."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        state = _Request(request_id, prompt, prompt_token_ids, params)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        ids = []
        for index in range(params.n):
            cid = child_id(request_id, index, params.n)
            sample = _Sample(CompletionOutput(index, logprobs=[] if params.logprobs is not None else None),
                             IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params), state)
            state.samples.append(sample)
            self._samples[cid] = sample
            ids.append(cid)
        self._requests[request_id] = state
        return ids

    def child_ids(self, request_id: str) -> list[str]:
        state = self._requests.get(request_id)
        if state is None:
            return []
        return [child_id(request_id, i, state.params.n) for i in range(state.params.n)]

    def parent_of(self, core_request_id: str) -> Optional[str]:
        """The request a core-level id is a sample of (None once it is forgotten)."""
        sample = self._samples.get(core_request_id)
        return None if sample is None else sample.parent.request_id

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the core-level ids to abort."""
        ids = self.child_ids(request_id)
        for cid in ids:
            self._samples.pop(cid, None)
        self._requests.pop(request_id, None)
        return ids

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """(changed requests' outputs, core-level ids a stop string finished)."""
        changed: dict[str, _Request] = {}
        stopped: list[str] = []
        for out in outputs:
            sample = self._samples.get(out.request_id)
            if sample is None:
                continue
            state = sample.parent
            completion = sample.completion
            if out.prompt_logprobs and state.prompt_logprobs is not None and completion.index == 0:
                state.prompt_logprobs.extend(self._logprob_dict(e) for e in out.prompt_logprobs)
            if not self.final_only:
                completion.delta_token_ids = []
                completion.delta_logprobs = None
            if out.new_token_ids:
                new_ids, stop = self._add_tokens(sample.detokenizer, out.new_token_ids, out.finish_reason == "stop")
                new_logprobs = out.new_logprobs[:len(new_ids)] if out.new_logprobs else None
                if not self.final_only:
                    completion.delta_token_ids = list(new_ids)
                completion.token_ids.extend(new_ids)
                if new_logprobs:
                    entries = [self._logprob_dict(e) for e in new_logprobs]
                    completion.logprobs.extend(entries)
                    if not self.final_only:
                        completion.delta_logprobs = entries
                    total = sum(values[0] for _, values, _ in new_logprobs)
                    completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + total
                if stop is not None and out.finish_reason is None:
                    completion.finish_reason, completion.stop_reason = "stop", stop
                    stopped.append(out.request_id)
            if out.finish_reason is not None and completion.finish_reason is None:
                completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
                sample.detokenizer.finish()
            if not self.final_only:
                completion.text = sample.detokenizer.text
                completion.delta_text = sample.detokenizer.output_text_delta(finished=completion.finish_reason is not None)
            changed[state.request_id] = state
        results = []
        for rid, state in changed.items():
            finished = state.finished
            if self.final_only:
                if not finished:
                    continue
                for s in state.samples:
                    s.completion.text = s.detokenizer.text
            results.append(RequestOutput(rid, state.prompt, state.prompt_token_ids, [s.completion for s in state.samples],
                                         finished=finished, prompt_logprobs=state.prompt_logprobs))
            if finished:
                self.abort(rid)
        return results, stopped

    @staticmethod
    def _add_tokens(detokenizer: IncrementalDetokenizer, token_ids: list[int],
                    stop_terminated: bool) -> tuple[list[int], Optional[str]]:
        """Feed a step's tokens to the detokenizer; (the tokens kept, the stop string matched).
        A step with accepted proposals brings several tokens: those after the one completing a
        stop string are dropped, as a step of one token at a time would never have made them."""
        if len(token_ids) == 1 or not detokenizer.has_stop_strings:
            return token_ids, detokenizer.add_tokens(token_ids, stop_terminated=stop_terminated)
        for count, token_id in enumerate(token_ids, 1):
            stop = detokenizer.add_tokens([token_id], stop_terminated=stop_terminated and count == len(token_ids))
            if stop is not None:
                return token_ids[:count], stop
        return token_ids, None

    def _logprob_dict(self, entry) -> dict[int, Logprob]:
        ids, values, rank = entry
        result: dict[int, Logprob] = {}
        for position, (token_id, value) in enumerate(zip(ids, values)):
            if token_id in result:
                continue
            result[token_id] = Logprob(value, rank if position == 0 else position,
                                       self.tokenizer.decode([token_id]))
        return result
