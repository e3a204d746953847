"""Every rank runs the same runner code on the same steps: rank 0 sends the others each step.

The scheduler runs once, on rank 0. Each step it sends the other ranks what its runner is told
(msgspec arrays, not pickled objects): the requests new to them, each scheduled request's share
of the step and block table, the requests to forget, and when to read a step back. Each worker
keeps its own copy of each request's tokens (``StepMirror``).

With one pipeline stage every rank samples (the logits are gathered to all, the generators
seeded alike, so the tokens agree) and no worker replies. With several, only the last stage
samples: its ranks read each step back as soon as it is computed, and its first rank sends
rank 0 what the step produced (``StepResult``); rank 0 passes the tokens to the earlier stages'
workers with the read-back (``Collect.sampled``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import msgspec

import torch

from ..sample.params import SamplingParams
from ..kv.host_pool import KVTransfers
from ..sched.request import Request
from ..sched.scheduler import ScheduledRequest, SchedulerOutput
from ..structured.bitmask import GrammarBitmask
from .model_runner import ModelRunner, PendingStep, RunnerOutput


class NewRequest(msgspec.Struct, array_like=True):
    request_id: str
    token_ids: list[int]
    """Prompt and output so far (a request first sent after a preemption has both)."""
    num_prompt_tokens: int
    params: SamplingParams


class Scheduled(msgspec.Struct, array_like=True):
    request_id: str
    start: int
    num_new_tokens: int
    block_ids: list[int]
    token_pending: bool
    num_tokens: int
    draft_token_ids: list[int] = []
    """Proposed tokens computed after the known ones (speculative decoding)."""


class Mask(msgspec.Struct, array_like=True):
    """A ``GrammarBitmask``: its rows and its int32 words as bytes."""

    rows: list[int]
    words: int
    bitmask: bytes

    @classmethod
    def of(cls, grammar: Optional[GrammarBitmask]) -> Optional["Mask"]:
        if grammar is None:
            return None
        return cls(grammar.rows, grammar.bitmask.shape[1], grammar.bitmask.numpy().tobytes())

    def grammar(self) -> GrammarBitmask:
        words = torch.frombuffer(bytearray(self.bitmask), dtype=torch.int32)
        return GrammarBitmask(self.rows, words.view(len(self.rows), self.words))


class Launch(msgspec.Struct, tag=True, array_like=True):
    step: int
    new_requests: list[NewRequest]
    scheduled: list[Scheduled]
    finished_ids: list[str]
    previous: Optional[int] = None
    """The step in flight whose sampled tokens this one's pending rows take (look-ahead)."""
    sample: bool = True
    """False: the forward pass only; a ``Sample`` message follows (structured output's masks)."""
    grammar: Optional[Mask] = None
    to_host: list[tuple[int, int]] = []
    """The step's ``KVTransfers``: (device block, host block) copies to the host tier, then back."""
    to_device: list[tuple[int, int]] = []
    preempted_ids: list[str] = []
    """Requests preempted this step: each worker forgets its copy of their tokens (a look-ahead
    step's victim drops the token in flight for it, which the copy would otherwise take), and
    one readmitted is sent again whole. Their runner state stays, seeded streams included."""


class Sample(msgspec.Struct, tag=True, array_like=True):
    """Sample launched step ``step`` (launched with ``sample=False``), masked by ``grammar``."""

    step: int
    grammar: Optional[Mask] = None


class Collect(msgspec.Struct, tag=True, array_like=True):
    step: int
    sampled: Optional[dict[str, list[int]]] = None
    """The step's tokens, for ranks that did not sample them (pipeline stages before the last)."""


class Stop(msgspec.Struct, tag=True, array_like=True):
    pass


WORKER_READY = b"ready"
"""What each worker first sends on the results socket, before it joins the process group."""


TokenLogprobsEntry = tuple[list[int], list[float], int]


class StepResult(msgspec.Struct, array_like=True):
    """What a step produced (a ``RunnerOutput``), sent by the last pipeline stage to rank 0."""

    step: int
    sampled: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobsEntry]]
    prompt_logprobs: dict[str, list[TokenLogprobsEntry]]

    @classmethod
    def of(cls, step: int, output: RunnerOutput) -> "StepResult":
        return cls(step, output.sampled, output.logprobs, output.prompt_logprobs)

    def output(self) -> RunnerOutput:
        return RunnerOutput(self.sampled, self.logprobs, self.prompt_logprobs)


StepMessage = Union[Launch, Sample, Collect, Stop]
encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(StepMessage).decode
decode_result = msgspec.msgpack.Decoder(StepResult).decode


class StepSender:
    """Rank 0's side: turns what its runner is told into messages, sending each request once."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._steps: dict[int, int] = {}
        self._next = 0

    @property
    def latest(self) -> int | None:
        """The number of the last step sent (None before the first)."""
        return self._next - 1 if self._next else None

    def launch(self, out: SchedulerOutput, previous: Optional[PendingStep], grammar: Optional[GrammarBitmask] = None,
               sample: bool = True) -> tuple[Launch, int]:
        """The message for launching ``out``, and the step number to name it by when collecting."""
        new = []
        for item in out.scheduled:
            request = item.request
            if request.request_id not in self._known:
                self._known.add(request.request_id)
                new.append(NewRequest(request.request_id, list(request.all_token_ids), request.num_prompt_tokens,
                                      request.sampling_params))
        for rid in (*out.finished_ids, *out.preempted_ids):
            self._known.discard(rid)
        step = self._next
        self._next += 1
        message = Launch(step, new, [Scheduled(s.request.request_id, s.start, s.num_new_tokens, s.block_ids,
                                               s.token_pending, s._num_tokens, s.draft_token_ids)
                                     for s in out.scheduled],
                         list(out.finished_ids), None if previous is None else self._steps[id(previous)], sample,
                         Mask.of(grammar), out.transfers.to_host, out.transfers.to_device, list(out.preempted_ids))
        return message, step

    def sample(self, pending: PendingStep, grammar: Optional[GrammarBitmask]) -> Sample:
        return Sample(self._steps[id(pending)], Mask.of(grammar))

    def name(self, pending: PendingStep, step: int) -> None:
        """Remember which step number ``pending`` (rank 0's launched step) was sent as."""
        self._steps[id(pending)] = step

    def collect(self, pending: PendingStep) -> Collect:
        return Collect(self._steps.pop(id(pending)))


class StepMirror:
    """A worker's side: replays rank 0's launches and read-backs on its own runner.

    ``send_result`` is set on the last pipeline stage's first rank of a pipeline: it is given
    each step's encoded ``StepResult`` for rank 0.
    """

    def __init__(self, runner: ModelRunner, max_model_len: int, send_result: Callable[[bytes], None] | None = None):
        self.runner = runner
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.pending: dict[int, Optional[PendingStep]] = {}
        self.send_result = send_result
        self.collects_at_launch = runner.pp.size > 1 and runner.pp.is_last

    def handle(self, message: Launch | Sample | Collect) -> None:
        if isinstance(message, Sample):
            pending = self.pending.get(message.step)
            if pending is not None:
                self.runner.sample(pending, message.grammar.grammar() if message.grammar else None)
            return
        if isinstance(message, Collect):
            if message.step in self.pending:  # not a last pipeline stage, which collected at launch
                result = self.runner.collect(self.pending.pop(message.step))
                self._apply(result.sampled if message.sampled is None else message.sampled)
            return
        for new in message.new_requests:
            request = Request(new.request_id, new.token_ids[:new.num_prompt_tokens], new.params,
                              max_model_len=self.max_model_len)
            for token in new.token_ids[new.num_prompt_tokens:]:
                request.append_token(token)
            self.requests[new.request_id] = request
        scheduled = []
        for item in message.scheduled:
            entry = ScheduledRequest(self.requests[item.request_id], item.start, item.num_new_tokens, item.block_ids,
                                     max_drafts=len(item.draft_token_ids), draft_token_ids=item.draft_token_ids)
            # What rank 0's snapshot said: this copy knows no pending tokens of its own.
            entry.token_pending, entry._num_tokens = item.token_pending, item.num_tokens
            scheduled.append(entry)
        previous = self.pending.get(message.previous) if message.previous is not None else None
        transfers = KVTransfers(message.to_host, message.to_device)
        pending = self.runner.launch(SchedulerOutput(scheduled=scheduled, finished_ids=message.finished_ids,
                                                     transfers=transfers), previous,
                                     message.grammar.grammar() if message.grammar else None, message.sample)
        if self.collects_at_launch:
            if pending is not None:
                result = self.runner.collect(pending)
                self._apply(result.sampled)
                if self.send_result is not None:
                    self.send_result(encode(StepResult.of(message.step, result)))
        else:
            self.pending[message.step] = pending
        for rid in (*message.finished_ids, *message.preempted_ids):
            self.requests.pop(rid, None)

    def _apply(self, sampled: dict[str, list[int]]) -> None:
        """Append what a step sampled, as rank 0's scheduler does (for requests it still has;
        tokens past one that finishes a request are appended too, and the request is forgotten
        when rank 0 says it finished)."""
        for rid, tokens in sampled.items():
            request = self.requests.get(rid)
            if request is not None:
                for token in tokens:
                    request.append_token(token)
