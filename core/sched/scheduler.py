"""The scheduler: continuous batching under one token budget per step.

There are no prefill and decode phases. Each step, running requests are served first (a decode
token, or the next chunk of an unfinished prompt), then waiting requests are admitted into what
is left of the budget; a prompt longer than that is chunked, so decodes never wait behind it.
When the cache runs out of blocks, the lowest-priority running request is preempted: later
recomputed from its prompt and the output it had so far, or, preempted by swap, its KV kept in
the KV manager's host tier and copied back when it resumes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..kv.host_pool import KVTransfers
from ..kv.manager import KVCacheManager
from ..multimodal.encoder_cache import EncoderCacheManager
from ..multimodal.inputs import ImageInput
from .request import Request, RequestStatus

POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap", "auto")
"""``--preemption-mode`` values; the engine resolves ``auto`` to one of the others (:func:`swap_is_cheaper`)."""


def swap_is_cheaper(kv_bytes_per_token: float, flops_per_token: float, host_bytes_per_s: float,
                    flops_per_s: float) -> bool:
    """The cost model of ``--preemption-mode auto``, per token of a preempted request: a swap
    copies its KV to the host and back (``2 * kv_bytes_per_token`` over the host link), a
    recompute runs the model over it once more (``flops_per_token``, about twice the parameter
    count). Both grow linearly with the request's length, so one answer fits every request;
    attention's quadratic part and prefix-cache hits, which tilt the balance either way for
    long or shared prompts, are left out."""
    return 2 * kv_bytes_per_token / host_bytes_per_s < flops_per_token / flops_per_s


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute ``request.all_token_ids[start:start + num_new_tokens]``."""

    request: Request
    start: int
    """``num_computed_tokens`` at schedule time, prefix-cache hits included."""
    num_new_tokens: int
    block_ids: list[int]
    """The request's whole block table."""
    max_drafts: int = 0
    """Proposed tokens this chunk has room for (speculative decoding): their KV slots are
    allocated and the step's token budget counts them; :meth:`set_drafts` adds them."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Proposed tokens computed after the request's last token, for the target to verify."""
    chained: bool = False
    """A verification made on the device behind the step in flight (:meth:`Scheduler.chain`):
    its start, last token and proposals are known once that step and this one are read back
    (:meth:`resolve`); until then ``start`` is the step in flight's."""
    token_pending: bool = field(init=False)
    """This chunk is the one token still being sampled on the device by the step in flight
    (a look-ahead step): its id is not known on the host."""
    misses_known: int = field(init=False)
    """The request's ``proposal_misses`` when this step was scheduled: a chained step may verify
    proposals made before the miss of the step ahead of it was read back."""
    _num_tokens: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Snapshots: update() appends the sampled token, which must not change what this step was.
        self.token_pending = self.request.num_pending_tokens > 0
        self.misses_known = self.request.proposal_misses
        self._num_tokens = self.request.num_tokens + self.request.num_pending_tokens

    @property
    def sample(self) -> bool:
        """Whether this chunk reaches the request's last token, so its logits choose the next one."""
        return self.start + self.num_new_tokens - len(self.draft_token_ids) == self._num_tokens

    def set_drafts(self, draft_token_ids: list[int]) -> None:
        """Compute these proposed tokens (at most ``max_drafts``) after the last token."""
        if len(draft_token_ids) > self.max_drafts or self.draft_token_ids:
            raise ValueError(f"{len(draft_token_ids)} proposed tokens, room for {self.max_drafts}")
        self.num_new_tokens += len(draft_token_ids)
        self.draft_token_ids = list(draft_token_ids)

    def resolve(self, draft_token_ids: list[int]) -> None:
        """A chained verification as it ran, once the step before it is applied: from the
        request's last token, with these proposals (read back with its tokens)."""
        self.start = self.request.num_computed_tokens
        self._num_tokens = self.request.num_tokens
        self.num_new_tokens = 1 + len(draft_token_ids)
        self.draft_token_ids = list(draft_token_ids)

    def truncate_drafts(self, count: int) -> None:
        """Keep only the first ``count`` proposed tokens (their slots stay allocated, unused)."""
        self.num_new_tokens -= len(self.draft_token_ids) - count
        self.draft_token_ids = self.draft_token_ids[:count]


@dataclass
class SchedulerOutput:
    """What one step computes, and which requests the runner should forget.

    The runner executes every scheduled request, even one aborted after schedule() returned:
    a request admitted in the same step may have hit its freshly cached blocks, and reads the
    KV this step writes there.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    """Preempted this step: their blocks are gone, they restart from scratch when readmitted."""
    finished_ids: list[str] = field(default_factory=list)
    """Finished or aborted since the previous schedule()."""
    transfers: KVTransfers = field(default_factory=KVTransfers)
    """Block copies between the device cache and the host tier, made before the forward pass."""
    encoder_inputs: list[ImageInput] = field(default_factory=list)
    """Images the runner encodes this step (before the forward pass), keeping the outputs."""
    encoder_freed: list[str] = field(default_factory=list)
    """Hashes of encoder outputs the runner drops (before encoding this step's images)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owner of every unfinished request: decides what each step computes, and applies results.

    ``policy`` orders admission and preemption: ``"fcfs"`` by arrival; ``"priority"`` by
    ``(priority, arrival)``, lower first. Preemption picks the running request last in that order.
    ``preemption_mode``: ``"recompute"`` drops the victim's KV; ``"swap"`` moves it to the KV
    manager's host tier (recomputing when the tier has no room).
    ``encoder_cache``: a vision model's encoder-cache accounts; a step encodes images of at most
    ``encoder_budget`` placeholder tokens (one larger image alone), a prompt chunk stopping
    before an image that does not fit, so a burst of images never stalls the decodes.
    """

    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        max_loras: int | None = None,
        num_speculative_tokens: int = 0,
        preemption_mode: str = "recompute",
        encoder_cache: EncoderCacheManager | None = None,
        encoder_budget: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {preemption_mode!r}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.max_loras = max_loras
        """Distinct LoRA adapters one step may use (the device's slots); None: no adapters."""
        self.num_speculative_tokens = num_speculative_tokens
        """Room for proposed tokens given to each decoding request (speculative decoding)."""
        self.preemption_mode = preemption_mode
        self.encoder_cache = encoder_cache
        self.encoder_budget = encoder_budget
        self.num_preemptions = 0
        """Preemptions since start, all requests together."""
        self.num_swaps = 0
        """Those of them by swap."""
        self._requests: dict[str, Request] = {}
        self._keys: dict[str, tuple] = {}
        self._arrivals = itertools.count()
        # Heap of (policy key, request); keys are unique, so requests are never compared.
        self._waiting: list[tuple[tuple, Request]] = []
        # In admission order: a newly admitted prompt's chunks come after the running decodes.
        self._running: list[Request] = []
        self._finished_ids: list[str] = []

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def lora_ids(self, status: RequestStatus) -> list[int]:
        """The LoRA adapters of the running (RUNNING) or waiting (WAITING, preempted included) requests."""
        if status is RequestStatus.RUNNING:
            requests = self._running
        else:
            requests = [request for _, request in self._waiting]
        return sorted({r.lora_id for r in requests if r.lora_id})

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, if any."""
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a new request; ids must be unique among unfinished requests."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        priority = request.priority if self.policy == "priority" else 0
        # The counter breaks arrival-time ties in the order requests were added.
        key = (priority, request.arrival_time, next(self._arrivals))
        self._requests[request.request_id] = request
        self._keys[request.request_id] = key
        request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (key, request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Abort requests (e.g. the client went away); their blocks are freed at once. Unknown ids are ignored."""
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests with a finished ``status`` (e.g. the detokenizer found a stop string)."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        ending = {request_id: self._requests[request_id] for request_id in request_ids
                  if request_id in self._requests}
        queued = {id(request) for request in ending.values() if request.status is not RequestStatus.RUNNING}
        if queued:
            # The queue is rebuilt once for them all: once a request, a client gone with thousands
            # queued (n x prompts of them) held the engine for minutes.
            self._waiting = [entry for entry in self._waiting if id(entry[1]) not in queued]
            heapq.heapify(self._waiting)
        for request in ending.values():
            self._finish(request, status)

    def schedule(self, in_flight: frozenset[str] | set[str] = frozenset(), max_seqs: int | None = None) -> SchedulerOutput:
        """Choose this step's work: running requests first, then admissions, within the budget.

        ``in_flight``: requests whose previous step has not been applied yet (pipeline
        micro-batches); they are neither scheduled nor preempted (when the policy would preempt
        one, the step stops short instead). ``max_seqs``: at most this many requests in the
        step (a micro-batch's share of them).
        """
        return self._schedule(look_ahead=False, in_flight=in_flight, max_seqs=max_seqs or self.max_num_seqs)

    def _schedule(self, look_ahead: bool, in_flight: frozenset[str] | set[str] = frozenset(),
                  max_seqs: int | None = None) -> SchedulerOutput:
        """``look_ahead``: the previous step is still in flight (see :meth:`look_ahead`), so a
        request whose coming token ends it by length is left out; a request preempted then loses
        the token being sampled for it (:meth:`_preempt`)."""
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[str] = []
        short = False
        adapters: set[int] = set()  # the LoRA ids of this step's requests (0: the base model)
        encoding: dict[str, ImageInput] = {}  # images this step encodes, by hash

        for request in list(self._running):
            if budget == 0 or len(scheduled) == max_seqs:
                break
            if request.status is not RequestStatus.RUNNING or request.request_id in in_flight:
                continue  # preempted as a victim for an earlier request of this loop, or still computing
            num_tokens = request.num_tokens + request.num_pending_tokens
            if request.num_pending_tokens and num_tokens >= request.max_total_tokens:
                continue  # the token being sampled ends it
            if not self._adapter_fits(request, adapters):
                continue  # waits for a step with a free adapter slot
            num_new = min(num_tokens - request.num_computed_tokens, budget)
            num_new, images = self._fit_images(request, request.num_computed_tokens, num_new, encoding)
            if num_new == 0:
                continue  # its last step's token was not sampled, or its next image waits for encoder room
            # A decoding request's proposed tokens: each accepted one and the token after the
            # last must fit its max_tokens and the context (the request's max_total_tokens).
            # A step scheduled ahead (the request's last token still on the device) has none, yet
            # counts towards a pause like any step without them.
            drafts = 0
            if self.num_speculative_tokens and num_new == 1:
                if request.proposal_pause:
                    request.proposal_pause -= 1
                elif not request.num_pending_tokens:
                    drafts = max(0, min(self.num_speculative_tokens, budget - 1,
                                        request.max_total_tokens - request.num_tokens - 1))
            # Running requests are served in admission order but preempted in policy order, so
            # the victim may already be scheduled this step: its work is then withdrawn.
            while (block_ids := self.kv.allocate_slots(request, num_new + drafts)) is None:
                victim = max(self._running, key=lambda r: self._keys[r.request_id])
                if victim.request_id in in_flight or (
                        victim.num_pending_tokens and victim.sampling_params.seed is not None):
                    # The policy's victim is still computing: wait for its step rather than
                    # preempt a request the policy ranks higher. A seeded victim's stream has
                    # drawn its token in flight already: dropped, the draw would shift every
                    # later one, so it too waits for the step.
                    short = True
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone.num_new_tokens + undone.max_drafts
                if victim is request:
                    break
            if block_ids is None:
                break
            scheduled[request.request_id] = ScheduledRequest(request, request.num_computed_tokens, num_new, block_ids,
                                                             max_drafts=drafts)
            self._hold_images(request, images, encoding)
            budget -= num_new + drafts
            adapters.add(request.lora_id)

        # After a preemption blocks are short: admitting now would only evict what was just computed.
        other_adapters: list[tuple[tuple, Request]] = []
        while (not preempted and not short and self._waiting and budget > 0 and len(self._running) < self.max_num_seqs
               and len(scheduled) != max_seqs):
            request = self._waiting[0][1]
            if not self._adapter_fits(request, adapters):
                # Set aside (not skipped for good): it keeps its place for the next step.
                other_adapters.append(heapq.heappop(self._waiting))
                continue
            if self.kv.is_swapped(request):
                num_hits = request.num_computed_tokens
                num_new = min(request.num_tokens - num_hits, budget)
                num_new, images = self._fit_images(request, num_hits, num_new, encoding)
                block_ids = self.kv.swap_in(request, num_new) if num_new else None
            else:
                hit_ids, num_hits = self.kv.get_computed_blocks(request)
                num_new = min(request.num_tokens - num_hits, budget)
                if request.pooling is not None and num_new < request.num_tokens - num_hits:
                    break  # an embedding is computed in one step: it waits for a step with room for it
                num_new, images = self._fit_images(request, num_hits, num_new, encoding)
                block_ids = self.kv.allocate_slots(request, num_new, hit_ids, num_hits) if num_new else None
            if block_ids is None:
                break  # no skipping ahead: smaller requests behind it would starve it
            heapq.heappop(self._waiting)
            request.num_computed_tokens = num_hits
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            scheduled[request.request_id] = ScheduledRequest(request, num_hits, num_new, block_ids)
            self._hold_images(request, images, encoding)
            budget -= num_new
            adapters.add(request.lora_id)
        for entry in other_adapters:
            heapq.heappush(self._waiting, entry)

        finished, self._finished_ids = self._finished_ids, []
        freed = self.encoder_cache.take_freed() if self.encoder_cache is not None else []
        rows = list(scheduled.values())
        if len(adapters - {0}) > 1:
            # The LoRA kernels multiply a tile of consecutive tokens once per adapter in it: with
            # each adapter's rows side by side most tiles take one product, not one per adapter
            # (the sort is stable: within an adapter the order above). A row's result does not
            # depend on where it sits in the step.
            rows.sort(key=lambda item: item.request.lora_id)
        return SchedulerOutput(rows, preempted, finished, self.kv.take_transfers(), list(encoding.values()), freed)

    def _fit_images(self, request: Request, start: int, num_new: int, encoding: dict[str, ImageInput]
                    ) -> tuple[int, list[ImageInput]]:
        """Cut a chunk of ``num_new`` tokens from ``start`` so that every image whose placeholder
        it covers is cached, encoded this step already, or fits what is left of the step's encoder
        budget and the cache: the chunk stops before the first image that does not. Returns the
        chunk's size and the images it covers (for :meth:`_hold_images` once the chunk is
        scheduled)."""
        if not request.mm_inputs or self.encoder_cache is None:
            return num_new, []
        end, covered = start + num_new, []
        pending = sum(image.length for image in encoding.values())
        for image in request.mm_inputs:
            if image.end <= start or image.offset >= end:
                continue
            if self.encoder_cache.holds(image.hash) or image.hash in encoding:
                covered.append(image)
                continue
            # An image larger than the whole budget runs alone, in a step that encodes nothing else.
            fits = pending + image.length <= self.encoder_budget or pending == 0
            if fits and self.encoder_cache.can_add(image.length, pending):
                covered.append(image)
                pending += image.length
                continue
            end = image.offset
            break
        return max(0, end - start), covered

    def _hold_images(self, request: Request, images: list[ImageInput], encoding: dict[str, ImageInput]) -> None:
        """A scheduled chunk's images: referenced if cached, else accounted and queued to encode."""
        for image in images:
            if self.encoder_cache.holds(image.hash):
                self.encoder_cache.reference(image.hash, request.request_id)
            else:
                self.encoder_cache.add(image, request.request_id)
                encoding[image.hash] = image

    def _adapter_fits(self, request: Request, adapters: set[int]) -> bool:
        """Whether ``request`` may join a step using ``adapters`` (0 stands for the base model)."""
        if not request.lora_id or request.lora_id in adapters or self.max_loras is None:
            return True
        return len(adapters - {0}) < self.max_loras

    def look_ahead(self, output: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``output``, made while ``output`` is still in flight, so the runner can
        queue it behind ``output`` on the device and the host's work overlaps the device's.

        ``output`` is committed first: its requests count as computed, and each one that samples
        holds one pending token (``Request.num_pending_tokens``) that the next step takes as
        input straight from the device. The next step is then scheduled as :meth:`schedule`
        would, admissions, prompt chunks and preemptions included, except that a request that the
        pending token ends by length is left out. A request that the pending
        token ends otherwise (EOS, a stop string, an abort) is computed once more and dropped at
        :meth:`update`. None, committing nothing, where a sampled token decides how the next one
        is sampled (penalties, min_tokens) or prompt logprobs are asked for; None also when
        nothing can be scheduled and nothing was preempted.
        """
        if not output.scheduled:
            return None
        for item in output.scheduled:
            request, params = item.request, item.request.sampling_params
            if request.status is RequestStatus.RUNNING and (
                    params.prompt_logprobs is not None
                    or item.sample and (len(request.output_token_ids) < params.min_tokens or params.presence_penalty
                                        or params.frequency_penalty or params.repetition_penalty != 1.0)):
                return None
        for item in output.scheduled:
            request = item.request
            if request.status is RequestStatus.RUNNING:
                request.num_computed_tokens = item.start + item.num_new_tokens
                request.num_pending_tokens += item.sample
        following = self._schedule(look_ahead=True)
        # A step that only preempts still carries its victims' swap-out copies and their ids
        # (for the workers): it is launched as a step without rows.
        if following.scheduled or following.preempted_ids or following.transfers:
            return following
        self._finished_ids = following.finished_ids + self._finished_ids
        return None

    def chain(self, output: SchedulerOutput, reach: int) -> SchedulerOutput | None:
        """The verification after ``output`` (in flight, a decode or verification step of every
        running request) for the same requests, made on the device without the host in between
        (``worker/verify_chain.py``): each request's last token and up to k proposals, from
        wherever ``output``'s accepted tokens end. Their blocks are allocated for the furthest
        that can be (``output`` accepting all of its proposals), within ``reach`` positions.

        A request that pauses its proposals (back-off) gets no room for them, and the step
        counts towards its pause, as in :meth:`schedule`.

        None, changing nothing but blocks allocated ahead, where the step after ``output`` must
        be scheduled by :meth:`schedule` instead: requests are waiting or have finished since the
        last schedule (so the runner forgets them), ``output`` leaves a running request out or
        holds one that has stopped, a request could pass ``reach``, or blocks are short (no
        preemption here).
        """
        query_len = 1 + self.num_speculative_tokens
        items = output.scheduled
        if (not self.num_speculative_tokens or self._waiting or self._finished_ids or len(items) != len(self._running)
                or query_len * len(items) > self.max_num_batched_tokens):
            return None
        # Worst case for the next step: this one accepts all of its proposals.
        furthest = 2 * query_len
        for item in items:
            request = item.request
            if request.status is not RequestStatus.RUNNING or request.num_computed_tokens + furthest > reach:
                return None
        rows = []
        for item in items:
            block_ids = self.kv.allocate_slots(item.request, furthest)
            if block_ids is None:
                return None
            rows.append(ScheduledRequest(item.request, item.request.num_computed_tokens, 1, block_ids,
                                         max_drafts=0 if item.request.proposal_pause else self.num_speculative_tokens,
                                         chained=True))
        for row in rows:
            if row.request.proposal_pause:
                row.request.proposal_pause -= 1
        return SchedulerOutput(rows)

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply a step's results: advance progress, append sampled tokens, finish what stopped.

        ``sampled`` maps request ids to the tokens the step produced for them: one, or with
        proposed tokens the accepted ones and the token after them. Only the accepted ones' KV
        counts as computed; the rejected ones' slots are written again by later steps. A token
        that finishes the request drops those after it. Requests aborted since ``output`` was
        made are skipped; embedding requests finish. Returns the requests that got a token (or
        their vector), finished included; finished ones have already released their blocks.
        """
        updated: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue
            if request.pooling is not None:
                # Its vector is made: done, and its blocks go back to the pool at once.
                request.num_computed_tokens = item.start + item.num_new_tokens
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                updated.append(request)
                continue
            tokens = sampled.get(request.request_id) if item.sample else None
            rejected = len(item.draft_token_ids) - (len(tokens) - 1 if tokens else 0)
            request.num_computed_tokens = item.start + item.num_new_tokens - rejected
            if request.mm_inputs and self.encoder_cache is not None:
                self.encoder_cache.release_computed(request.request_id, request.mm_inputs, request.num_computed_tokens)
            request.count_proposals(len(item.draft_token_ids), len(item.draft_token_ids) - rejected, item.misses_known)
            if item.sample and request.num_pending_tokens:
                request.num_pending_tokens -= 1
            if not tokens:
                continue
            for token in tokens:
                request.append_token(token)
                status = request.check_stop()
                if status is not None:
                    self._finish(request, status)
                    break
            updated.append(request)
        return updated

    def _preempt(self, request: Request) -> None:
        """Swap a running request's KV out to the host tier, or drop it; it waits to be resumed
        where it was, or recomputed (prompt + output so far).

        It rejoins the waiting queue under its original key, so it keeps its place in the
        policy order: under fcfs, the head, ahead of everything that arrived after it. Preempted
        by a look-ahead step (never a seeded request), it drops the token still being sampled for
        it (the step in flight's :meth:`update` skips it) and resumes from the tokens known, its
        last one computed again. (Stopping a look-ahead step short instead would cut every one
        under a full cache at its first request needing a block: an offline MoE run, whose steps
        cost nearly the same at 100 rows as at 1,000, took 2.5x the steps that way.)
        """
        # With a token still sampling, every known token's KV is (being) computed: the last is
        # computed again on resuming, to sample from it (so it is not swapped out either).
        request.num_pending_tokens = 0
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        self._running.remove(request)
        self._release_images(request)
        if self.preemption_mode == "swap" and self.kv.swap_out(request):
            self.num_swaps += 1
        else:
            self.kv.free(request)  # before num_computed_tokens is reset: free() reads it
            request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self._waiting, (self._keys[request.request_id], request))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """End ``request``: a running one leaves the running set here, a queued one must already
        be out of the queue (``finish_requests``)."""
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        self.kv.free(request)
        self._release_images(request)
        request.status = status
        request.num_pending_tokens = 0  # a token still being sampled for it is dropped at update
        del self._requests[request.request_id]
        del self._keys[request.request_id]
        self._finished_ids.append(request.request_id)

    def _release_images(self, request: Request) -> None:
        """A request leaving the running set no longer pins its images' encoder outputs."""
        if request.mm_inputs and self.encoder_cache is not None:
            self.encoder_cache.release_all(request.request_id, request.mm_inputs)
