"""Model runner: a scheduled batch -> flat tensors -> forward -> logits -> sampled tokens.

Owns the device state: the model, the KV-cache tensors, and per-request sampler generators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..lora.config import LoRAConfig
from ..lora.manager import LoRARegistry, LoRASlots
from ..models import DecoderForCausalLM, decoder_settings
from ..models.batch import ForwardBatch
from ..models.layers.linear import Linear, deferred_dense_weights
from ..models.parallel import PipelineParallel, TensorParallel
from ..models.vision import text_config, text_weights, vision_arch
from ..models.vision.encoder import build_encoder, load_encoder
from ..multimodal.mrope import step_rope_positions
from ..kv.host_pool import KVTransfers
from ..platform import Platform, QuantizationMethod, Registry
from ..platform.buckets import bucket_for, sequence_buckets
from ..platform.reference import host_cache_shape
from ..pooling import PoolingSpec
from ..pooling.pooler import pool, vector_bytes
from ..sample.sampler import RecentRowColumns, Sampler, SamplerOutput, SamplingMetadata, argmax_only, top_logprobs
from ..sample.params import SamplingParams
from ..sample.static_shapes import full_grammar_mask, static_sampling_metadata
from ..sched.request import Request
from ..sched.scheduler import ScheduledRequest, SchedulerOutput
from ..spec.rejection import DraftLayout, rejection_sample
from ..structured.bitmask import GrammarBitmask
from .decode_graphs import DecodeGraphs, capture_sizes
from .determinism import check_batch_invariant, check_batch_invariant_method
from .encoder_outputs import EncoderOutputs
from .input_buffers import InputBuffers, StepInputs, asynchronous_copies, host_to_device, step_inputs
from .pipeline import StageLink
from .verify_batch import pad_verification, verification_size
from .verify_chain import VerificationChain

def _without_autograd(method):
    """Run a runner method under ``torch.inference_mode``, or ``torch.no_grad`` where the platform
    says inference mode does not work for it (``Platform.inference_mode``)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.inference_mode() if self.platform.inference_mode else torch.no_grad():
            return method(self, *args, **kwargs)
    return wrapper


TokenLogprobs = tuple[list[int], list[float], int]
"""(token ids, logprobs, rank of the first id): first the sampled/actual token, then the top-k."""


@dataclass
class RunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    """Per request the step's tokens: one, or with proposals the accepted ones and the one after."""
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request that asked, one entry per token of ``sampled``."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request, entries for the prompt positions this step covered (the first prompt token has none)."""
    pooled: dict[str, bytes] = field(default_factory=dict)
    """Per embedding request of the step, its vector (float32 little-endian)."""
    drafts: dict[str, list[int]] = field(default_factory=dict)
    """Per request of a chained verification step, the tokens proposed for it on the device
    (``ScheduledRequest.resolve``)."""


@dataclass
class PendingStep:
    """A launched step whose results are still on the device."""

    scheduled: list[ScheduledRequest]
    query_start_loc: np.ndarray
    hidden: torch.Tensor
    """Final hidden states (a pipeline stage before the last: what it hands on); a graph's
    output, rewritten by its next replay. Read only for prompt logprobs, which a look-ahead
    (decode-only) step never follows."""
    requests: list[Request] = field(default_factory=list)
    """The requests that sample, in the rows of ``sampled``."""
    sampled: SamplerOutput | None = None
    host_sampled: SamplerOutput | None = None
    """``sampled`` in host memory once ``ready`` has passed."""
    layout: DraftLayout | None = None
    """Where each request's verified rows are, for a step with proposed tokens."""
    ready: torch.Event | None = None
    handed_on: Any = None
    """A pipeline stage's send of ``hidden`` to the next stage, while in progress."""
    pooled_requests: list[Request] = field(default_factory=list)
    """The embedding requests, in the rows of ``host_pooled``."""
    host_pooled: torch.Tensor | None = None
    """Their vectors [N, hidden] float32 in host memory once ``ready`` has passed."""
    logits: tuple[torch.Tensor, SamplingMetadata] | None = None
    """The sampled rows' logits and sampling metadata, queued by a launch that left the
    sampling for later (see :meth:`ModelRunner.launch`)."""
    chained: bool = False
    """Launched by :meth:`ModelRunner.launch_chained`: its emitted tokens stay in the chain's
    device state, where a step chained behind it reads them."""
    host_verified: torch.Tensor | None = None
    """Those, then the proposals [B, k] and their counts [B], flat in host memory once ``ready``
    has passed."""


MAX_CHAIN_HISTORY = 1 << 20
"""Tokens of history (requests x width) a chain of verifications keeps on the device at most: the
n-gram search's graph holds a few int64 copies of it, memory the KV cache's sizing did not set
aside (40 MB each at this bound). Larger batches of long requests verify on the host path, where
the host's share of a step is small beside the device's anyway."""


def _sample_rows(scheduled: list[ScheduledRequest]) -> list[int]:
    """The rows of a step's requests that sample a token (embedding requests pool instead)."""
    return [i for i, s in enumerate(scheduled) if s.sample and s.request.pooling is None]


class ModelRunner:
    def __init__(self, hf_config: Any, weights: Any, platform: Platform, registry: Registry, dtype: torch.dtype,
                 block_size: int, max_model_len: int, kv_cache_dtype: str = "auto",
                 quantization: QuantizationMethod | None = None, keep_packed: bool = True,
                 tp: TensorParallel = TensorParallel(),
                 device_index: int = 0, pp: PipelineParallel = PipelineParallel(),
                 lora: LoRAConfig | None = None, expert_parallel: bool = False, pooling: bool = False,
                 deterministic: bool = False):
        """``pooling``: the runner of an embedding engine (no output projection; its requests are pooled).
        ``deterministic``: batch-invariant kernels and quantization methods only (``--deterministic``)."""
        self.platform, self.dtype, self.block_size = platform, dtype, block_size
        self.pooling = pooling
        self.device = platform.device(device_index)
        self.asynchronous = asynchronous_copies(self.device)
        self.settings = decoder_settings(hf_config)
        specs = [dataclasses.replace(spec, deterministic=deterministic)
                 for spec in self.settings.attention_specs(dtype, block_size, kv_cache_dtype, tp, pp)]
        self.pp = pp
        self.stage_link: StageLink | None = None
        """How this pipeline stage meets its neighbours; None on one stage, and while profiling
        (each stage then runs alone, on zeros in place of the previous stage's output)."""
        self.num_kv_heads = specs[0].num_kv_heads
        """KV heads this rank caches (its tensor-parallel share)."""
        backend_classes = [registry.select_attention_backend(platform.name, spec) for spec in specs]
        self.backend_classes = backend_classes
        self.attention_passed_over = sorted({why for spec in specs
                                             for why in registry.attention_passed_over(platform.name, spec)})
        """Backends of higher priority that could not run this model (see ``EngineCore.kernel_report``)."""
        self.cache_dtype = specs[0].cache_dtype
        ops = registry.kernels(platform.name, deterministic)
        if deterministic:
            check_batch_invariant(ops, self.settings, lora is not None)
        self.vision = vision_arch(hf_config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            # Only a checkpoint's own packed weights are kept packed; dense ones to be quantized
            # after loading need their dense copy anyway.
            deferred = deferred_dense_weights() if keep_packed and quantization is None else contextlib.nullcontext()
            with torch.device(self.device), deferred:
                model = DecoderForCausalLM(self.settings, text_config(hf_config), max_model_len, ops,
                                           [cls(spec) for cls, spec in zip(backend_classes, specs)], tp, pp,
                                           expert_parallel, lm_head=not pooling)
            with torch.device(self.device):
                encoder = build_encoder(hf_config)
        finally:
            torch.set_default_dtype(previous)

        def checkpoint_method(fmt: str) -> QuantizationMethod:
            method = registry.quantization_method(platform.name, fmt)
            if deterministic:
                check_batch_invariant_method(method)
                method.deterministic = True
            return method

        vision_tensors: dict[str, torch.Tensor] = {}
        if encoder is not None:
            weights = text_weights(weights, vision_tensors)
        model.load_weights(weights, checkpoint_method, keep_packed)
        deferred_left = [name for name, param in model.named_parameters() if param.is_meta]
        if deferred_left:
            raise ValueError(f"the checkpoint filled no dense weight for {', '.join(deferred_left[:3])}")
        self.encoder_outputs: EncoderOutputs | None = None
        """A vision model's image encoder and its outputs by image hash."""
        if encoder is not None:
            load_encoder(encoder, vision_tensors)
            self.encoder_outputs = EncoderOutputs(encoder.eval(), self.device, dtype)
        if quantization is not None:
            if deterministic:
                check_batch_invariant_method(quantization)
                quantization.deterministic = True
            model.quantize_weights(quantization)
        self.model = model.eval()
        self.lora_config = lora
        self.lora_registry = LoRARegistry(self.settings, lora.max_lora_rank, lora.max_cpu_loras) if lora else None
        """The adapters requests name (the engine registers each before scheduling it)."""
        self.lora_slots: LoRASlots | None = None
        self.ops = ops
        self.sampler = Sampler(ops.apply_top_k_top_p_min_p)
        self.generators: dict[str, torch.Generator] = {}
        self.recent_row_columns = RecentRowColumns()
        self.prompt_logprobs_next: dict[str, int] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.host_caches: list[torch.Tensor] = []
        """The host tier's copy of each layer's cache (KV offload, preemption by swap); block first."""
        self.num_host_blocks = 0
        self.buffers: InputBuffers | None = None
        self.static_buckets: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        """(token buckets, sequence buckets) of a static-shape platform; see :meth:`prepare_inputs`."""
        self.decode_graphs: DecodeGraphs | None = None
        self.num_speculative_tokens = 0
        self.verify_chain: VerificationChain | None = None
        """Set by :meth:`enable_verify_chains` (n-gram proposals, verification graphs captured)."""
        """k of the verification graphs (0: none captured)."""
        self.draft: ModelRunner | None = None
        """The draft model's runner, on rank 0 of an engine proposing with a draft model."""

    @property
    def weight_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return dense + sum(m.stored_bytes for m in self.model.modules() if isinstance(m, Linear) and m.quant_method is not None)

    def kv_bytes_per_block(self) -> int:
        s = self.settings
        per_layer = [math.prod(cls.kv_cache_shape(1, self.block_size, self.num_kv_heads, s.head_dim))
                     for cls in self.backend_classes]
        return sum(per_layer) * torch.tensor([], dtype=self.cache_dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.settings
        self.kv_caches = [torch.zeros(cls.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, s.head_dim),
                                      dtype=self.cache_dtype, device=self.device) for cls in self.backend_classes]
        # Weights and caches materialized before the first step (a lazily traced device): its
        # program is then the same as every later step's of its shapes.
        self.platform.mark_step()

    def allocate_host_cache(self, num_blocks: int) -> None:
        """The host tier's tensors: ``num_blocks`` blocks of every layer, in pinned memory where
        copies to the device are asynchronous (they need it; ``asynchronous_copies``). On the CPU they are a second
        tensor in the same memory, which is what lets the CPU platform exercise the host tier."""
        pinned = self.asynchronous
        self.host_caches = [torch.empty(host_cache_shape(tuple(cache.shape), cls.kv_cache_block_dim, num_blocks),
                                        dtype=cache.dtype, pin_memory=pinned)
                            for cache, cls in zip(self.kv_caches, self.backend_classes)]
        self.num_host_blocks = num_blocks

    def _swap(self, transfers: KVTransfers) -> None:
        """Queue a step's block copies (``KVTransfers``), offloads first, one op call per
        direction and cache layout, before anything of the step reads or writes those blocks."""
        by_block_dim: dict[int, list[int]] = {}
        for layer, cls in enumerate(self.backend_classes):
            by_block_dim.setdefault(cls.kv_cache_block_dim, []).append(layer)
        for pairs, to_host in ((transfers.to_host, True), (transfers.to_device, False)):
            if not pairs:
                continue
            index = torch.tensor(pairs, dtype=torch.int64)
            for block_dim, layers in by_block_dim.items():
                self.ops.swap_blocks([self.kv_caches[i] for i in layers], [self.host_caches[i] for i in layers],
                                     index, block_dim, to_host=to_host)

    def drop_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.prompt_logprobs_next.pop(rid, None)

    def prepare_inputs(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                       static_shape_buckets: tuple[int, ...] | None = None) -> None:
        """Allocate the persistent input tensors every step copies into (see input_buffers.py).
        With ``static_shape_buckets`` every step is padded to one of those token counts and one of
        :func:`~runtime.platform.buckets.sequence_buckets`' sequence counts (static-shape platforms)."""
        self.static_buckets = None if static_shape_buckets is None else (
            static_shape_buckets, sequence_buckets(max_num_seqs))
        max_blocks = math.ceil(max_model_len / self.block_size)
        graph_rows = capture_sizes(max_num_seqs)[-1] if self.platform.supports_graphs else 0
        self.buffers = InputBuffers(max(max_num_batched_tokens, graph_rows), max(max_num_seqs, graph_rows),
                                    max_blocks, self.device)
        self.max_model_len = max_model_len
        if self.lora_registry is not None:
            self.lora_slots = LoRASlots(self.model, self.settings, self.lora_registry, self.lora_config.max_loras,
                                        self.buffers.max_tokens, self.ops, self.device, self.dtype)

    def profile_activation_memory(self, max_num_batched_tokens: int, max_num_seqs: int) -> int | None:
        """Peak bytes a worst-case step needs beyond the weights, or None where the platform
        cannot measure: a full token budget of prefill over as many sequences as a step may
        hold, every row sampled with top-k, top-p and logprobs (the [rows, vocab] buffers), or
        of an embedding engine every row mean-pooled."""
        if self.platform.peak_memory_allocated() is None:
            return None
        num_seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
        tokens = min(max_num_batched_tokens, num_seqs * (self.max_model_len - 1))
        lengths = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20, max_tokens=1)
        generator = np.random.default_rng(0)
        scheduled, next_block = [], 1  # block 0 is the null block
        for i, length in enumerate(lengths):
            request = Request(f"profile-{i}", generator.integers(0, self.settings.vocab_size, length).tolist(), params,
                              eos_token_ids=frozenset(), max_model_len=self.max_model_len,
                              pooling=PoolingSpec("MEAN", True, self.settings.hidden_size) if self.pooling else None)
            blocks = math.ceil(length / self.block_size)
            scheduled.append(ScheduledRequest(request, 0, length, list(range(next_block, next_block + blocks))))
            next_block += blocks
        self.allocate_kv_cache(next_block)
        self.platform.reset_peak_memory()
        before = self.platform.peak_memory_allocated()
        self.execute(SchedulerOutput(scheduled=scheduled))
        peak = self.platform.peak_memory_allocated() - before
        self.drop_requests([s.request.request_id for s in scheduled])
        self.kv_caches = []
        return peak

    @_without_autograd
    def capture_decode_graphs(self, max_num_seqs: int, num_speculative_tokens: int = 0) -> None:
        """Capture decode steps for batch sizes up to ``max_num_seqs`` (after the KV cache exists),
        and with ``num_speculative_tokens`` k verification steps of 1 + k tokens per sequence."""
        self.decode_graphs = DecodeGraphs(self.platform, self.model, self.buffers, self.kv_caches,
                                          self.max_model_len, max_num_seqs, lora=self.lora_slots,
                                          num_speculative_tokens=num_speculative_tokens)
        self.num_speculative_tokens = num_speculative_tokens
        self.decode_graphs.capture()

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step and read its results back."""
        return self.collect(self.launch(out))

    def enable_verify_chains(self, min_n: int, max_n: int) -> bool:
        """Let n-gram verification steps follow one another without the host in between
        (:meth:`launch_chained`); False where no verification graphs were captured."""
        if self.decode_graphs is None or not self.num_speculative_tokens or self.lora_slots is not None \
                or self.encoder_outputs is not None:
            return False
        self.verify_chain = VerificationChain(self.platform, self.buffers, self.block_size, self.num_speculative_tokens,
                                              min_n, max_n, self.device, self.model.compute_logits, self.decode_graphs,
                                              self.ops.propose_ngram_batched)
        return True

    def chain_reach(self, out: SchedulerOutput, previous: PendingStep | None) -> int | None:
        """How far (in positions) the requests of ``previous`` may reach for the verification
        after it to be chained behind it (:meth:`launch_chained`); None where it cannot be: a
        request that is not greedy on the raw logits or asks for logprobs, a step that was not a
        decode or verification of every request, or no graph for its size."""
        chain = self.verify_chain
        if chain is None or previous is None:
            return None
        scheduled = out.scheduled
        if len(previous.requests) != len(scheduled) or self.decode_graphs.size_for(
                len(scheduled), 1 + self.num_speculative_tokens) is None:
            return None
        for s in scheduled:
            params = s.request.sampling_params
            if (not s.sample or s.num_new_tokens != 1 + len(s.draft_token_ids)
                    or params.prompt_logprobs is not None or not argmax_only(s.request)):
                return None
        if previous.chained:
            return chain.capacity
        sampled = previous.sampled
        if sampled is None or sampled.num_tokens is not None or sampled.logprobs is not None:
            return None
        capacity = self._chain_capacity(scheduled)
        return capacity if len(scheduled) * capacity <= MAX_CHAIN_HISTORY else None

    def _chain_capacity(self, scheduled: list[ScheduledRequest]) -> int:
        """Tokens a new chain's histories hold: room for a few dozen steps past the longest
        request (the n-gram search costs the whole width each step), within the block table."""
        longest = max(s.request.num_tokens for s in scheduled)
        return min(self.buffers.width * self.block_size, self.max_model_len,
                   1 << (longest + 64 * (1 + self.num_speculative_tokens) - 1).bit_length())

    @_without_autograd
    def launch_chained(self, out: SchedulerOutput, previous: PendingStep) -> PendingStep:
        """Queue the verification after ``previous`` (still in flight) for the same requests,
        its inputs made on the device from ``previous``'s tokens (see verify_chain.py); its
        proposals are read back with its tokens (``RunnerOutput.drafts``). Call only where
        :meth:`chain_reach` allowed it and the requests' blocks reach that far."""
        scheduled, chain = out.scheduled, self.verify_chain
        batch, query_len = len(scheduled), 1 + self.num_speculative_tokens
        size = self.decode_graphs.size_for(batch, query_len)
        if not previous.chained:
            chain.begin([s.request.all_token_ids for s in scheduled], self._chain_capacity(scheduled), size,
                        *self._greedy_verified(previous))
        tables = np.zeros((batch, max(len(s.block_ids) for s in scheduled)), dtype=np.int64)
        for row, s in zip(tables, scheduled):
            row[:len(s.block_ids)] = s.block_ids
        results = chain.step(tables, np.array([s.max_drafts for s in scheduled], dtype=np.int64))
        pending = PendingStep(scheduled, np.arange(batch + 1, dtype=np.int64) * query_len,
                              self.decode_graphs.output(size, query_len), requests=[s.request for s in scheduled])
        pending.chained = True
        self.platform.mark_step()
        # The next chained step's graph rewrites ``results``: a copy of this step's, on the host.
        pending.host_verified = results.clone() if self.device.type == "cpu" else \
            results.to("cpu", non_blocking=self.asynchronous)
        if self.asynchronous:
            pending.ready = torch.Event(device=self.device)
            pending.ready.record()
        return pending

    def _greedy_verified(self, pending: PendingStep) -> tuple[torch.Tensor, torch.Tensor]:
        """A launched step's emitted tokens [B, W] (-1 past each count) and counts [B] on the
        device, every request greedy on the raw logits: the argmax of its verified rows up to the
        first that disagrees with a proposal (``DraftLayout.emitted``, on the device)."""
        argmax = pending.sampled.token_ids
        if pending.layout is None:
            batch = len(pending.requests)
            return argmax[:batch].unsqueeze(1), torch.ones(batch, dtype=torch.int64, device=argmax.device)
        tokens, counts, _ = rejection_sample(None, argmax, None, [], pending.layout)
        return tokens, counts

    @_without_autograd
    def launch(self, out: SchedulerOutput, previous: PendingStep | None = None,
               grammar: GrammarBitmask | None = None, sample: bool = True) -> PendingStep | None:
        """Queue a step's forward pass and sampling on the device; nothing waits for it.

        ``previous`` is the step still in flight when ``out`` is a look-ahead step: the tokens
        it is sampling (``ScheduledRequest.token_pending``) are copied into this step's input
        ids on the device. ``grammar`` masks the sampled rows (structured output). With
        ``sample=False`` only the forward pass is queued and :meth:`sample` queues the sampling
        later: the engine fills a step's grammar masks while its forward pass runs.
        """
        if self.verify_chain is not None:
            self.verify_chain.stop()  # this step's inputs come from the host: the histories go stale
        self.drop_requests(out.finished_ids)
        if out.transfers:
            self._swap(out.transfers)
        scheduled = out.scheduled
        if not scheduled:
            return None
        step = self._step_inputs(scheduled)
        graph_size = self.decode_graphs.size_for(len(scheduled)) if self.decode_graphs is not None else None
        # Decodes of requests with images run as any decode (a graph), unless M-RoPE moves their positions.
        images = self.encoder_outputs is not None and any(
            s.request.mm_inputs and (s.start < s.request.mm_inputs[-1].end or s.request.rope_positions is not None)
            for s in scheduled)
        if self.encoder_outputs is not None:
            self.encoder_outputs.update(out)
        verify_size = None if images or self.decode_graphs is None else verification_size(
            scheduled, self.num_speculative_tokens, self.buffers.width * self.block_size, self.decode_graphs.size_for)
        query_start = step.query_start_loc
        if graph_size is not None and len(step.input_ids) == len(scheduled) and not images:
            self._place_adapters(scheduled, step.query_start_loc, graph_size)
            self.buffers.load(step, padded_seqs=graph_size)
            self._copy_pending_tokens(scheduled, step.query_start_loc, previous)
            hidden = self.decode_graphs.run(graph_size)
        elif verify_size is not None:
            query_len = 1 + self.num_speculative_tokens
            padded = pad_verification(step, query_len, verify_size, self.block_size)
            query_start = padded.query_start_loc  # verification finds each request's rows from its start
            self._place_adapters(scheduled, query_start[:len(scheduled) + 1], verify_size * query_len)
            self.buffers.load(padded, max_seq_len=self.max_model_len)
            hidden = self.decode_graphs.run(verify_size, query_len)
        else:
            static = self._static_shape(step)
            self._place_adapters(scheduled, step.query_start_loc, static[0] if static else len(step.input_ids))
            input_ids, positions, meta = self.buffers.load(step, static_shape=static)
            self._copy_pending_tokens(scheduled, step.query_start_loc, previous)
            batch = ForwardBatch(input_ids, positions, meta, self.kv_caches)
            if images:
                self._add_images(scheduled, batch, step)
            hidden = self.model(batch, self._stage_input(len(input_ids)))
        pending = PendingStep(scheduled, query_start, hidden)
        if not self.pp.is_last:
            if self.stage_link is not None:
                pending.handed_on = self.stage_link.send(hidden)
            self.platform.mark_step()
            return pending
        if sample:
            self.sample(pending, grammar)
        elif self.static_buckets is None and not any(s.draft_token_ids for s in scheduled):
            # Sampling waits for the host's grammar masks: queue the logits now, so that only the
            # masking and the sampler follow the masks.
            sample_rows = _sample_rows(scheduled)
            if sample_rows:
                pending.logits = self._logits(pending, sample_rows)
        return pending

    @_without_autograd
    def sample(self, pending: PendingStep, grammar: GrammarBitmask | None = None) -> None:
        """Queue the sampling of a launched step (once), its rows masked by ``grammar``."""
        scheduled, query_start_loc, hidden = pending.scheduled, pending.query_start_loc, pending.hidden
        self._pool(pending)
        sample_rows = _sample_rows(scheduled)
        if sample_rows:
            pending.requests = [scheduled[i].request for i in sample_rows]
            drafted = any(scheduled[i].draft_token_ids for i in sample_rows)
            mask = None if grammar is None or (self.static_buckets is not None and not drafted) \
                else grammar.on(self.device)
            if drafted:
                pending.sampled, pending.layout = self._verify(scheduled, sample_rows, query_start_loc, hidden, mask)
            elif self.static_buckets is not None:
                pending.sampled = self._sample_static(scheduled, sample_rows, query_start_loc, hidden, grammar)
            else:
                logits, sampling = pending.logits or self._logits(pending, sample_rows)
                sampling.grammar = mask
                pending.sampled = self.sampler(logits, sampling)
        self.platform.mark_step()
        self._copy_results_to_host(pending)
        if self.asynchronous:
            pending.ready = torch.Event(device=self.device)
            pending.ready.record()

    def _logits(self, pending: PendingStep, sample_rows: list[int]) -> tuple[torch.Tensor, SamplingMetadata]:
        """The logits of a step's sampled rows (no proposals, dynamic shapes) and their sampling
        metadata: all of the sampling but the sampler itself."""
        query_start_loc, hidden = pending.query_start_loc, pending.hidden
        if len(sample_rows) == int(query_start_loc[-1]):
            last_hidden = hidden[:len(sample_rows)]  # one token per row, every row sampled: a decode step
        else:
            last = host_to_device([int(query_start_loc[i + 1]) - 1 for i in sample_rows], torch.int64, self.device)
            last_hidden = hidden[last]
        requests = [pending.scheduled[i].request for i in sample_rows]
        sampling = SamplingMetadata.from_requests(requests, self.settings.vocab_size, self.device, self.generators,
                                                  self.recent_row_columns)
        return self.model.compute_logits(last_hidden), sampling

    def _copy_results_to_host(self, pending: PendingStep) -> None:
        """Queue the copies of the step's tokens (and vectors) to host memory, now, in stream order:
        reading the device tensors later would also wait for whatever was queued after them (a
        look-ahead step)."""
        if self.device.type == "cpu":
            pending.host_sampled = pending.sampled
            return
        if pending.host_pooled is not None:
            pending.host_pooled = pending.host_pooled.to("cpu", non_blocking=True)
        if pending.sampled is not None:
            pending.host_sampled = SamplerOutput(*(
                None if t is None else t.to("cpu", non_blocking=self.asynchronous)
                for t in (getattr(pending.sampled, f.name) for f in fields(SamplerOutput))))

    def _sample_static(self, scheduled: list[ScheduledRequest], sample_rows: list[int], query_start: np.ndarray,
                       hidden: torch.Tensor, grammar: GrammarBitmask | None) -> SamplerOutput:
        """Sample a static-shape step with every row-count padded to its sequence bucket, so
        sampling adds no shape to the step's program (``runtime.sample.static_shapes``). The
        padding rows sample from the first token's hidden state; :meth:`collect` reads only the
        real rows."""
        rows = bucket_for(len(scheduled), self.static_buckets[1])
        last = [int(query_start[i + 1]) - 1 for i in sample_rows]
        last_hidden = hidden[host_to_device(last + [0] * (rows - len(last)), torch.int64, self.device)]
        requests = [scheduled[i].request for i in sample_rows]
        sampling = static_sampling_metadata(requests, rows, self.settings.vocab_size, self.device, self.generators)
        if grammar is not None:
            sampling.grammar = full_grammar_mask(grammar.rows, grammar.bitmask, rows, self.device)
        return self.sampler(self.model.compute_logits(last_hidden), sampling)

    def _pool(self, pending: PendingStep) -> None:
        """Queue the vectors of the step's embedding requests (each computed whole in this step),
        into ``host_pooled`` (on the device until :meth:`sample` copies them to host memory)."""
        rows = [i for i, s in enumerate(pending.scheduled) if s.request.pooling is not None]
        if not rows:
            return
        pending.pooled_requests = [pending.scheduled[i].request for i in rows]
        starts, ends = pending.query_start_loc[rows], pending.query_start_loc[np.array(rows) + 1]
        vectors = pool(pending.hidden, starts, ends, [r.pooling for r in pending.pooled_requests])
        pending.host_pooled = vectors

    def _verify(self, scheduled: list[ScheduledRequest], sample_rows: list[int], query_start: np.ndarray,
                hidden: torch.Tensor, mask: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[SamplerOutput, DraftLayout]:
        """Sample a step with proposed tokens: the logits of each sampling request's last token
        and of its proposals, verified together (``Sampler.verify``)."""
        drafts = [scheduled[i].draft_token_ids for i in sample_rows]
        requests = [scheduled[i].request for i in sample_rows]
        # From each request's first row: a verification graph's step pads requests after their tokens.
        last_known = [int(query_start[i]) + scheduled[i].num_new_tokens - 1 - len(d) for i, d in zip(sample_rows, drafts)]
        rows = np.concatenate([np.arange(first, first + len(d) + 1) for first, d in zip(last_known, drafts)])
        layout = DraftLayout(requests, drafts, self.device)
        # Rows rise by construction: one run of them (batch 1, or every request with k proposals) is a
        # view, with no copy of the row ids to the device and no gather before the lm_head.
        contiguous = int(rows[-1]) - int(rows[0]) + 1 == len(rows)
        logits = self.model.compute_logits(hidden[int(rows[0]):int(rows[-1]) + 1] if contiguous
                                           else hidden[host_to_device(rows.tolist(), torch.int64, self.device)])
        if mask is None and all(argmax_only(request) for request in requests):
            # Every row's token is its argmax (matched on the host, DraftLayout.emitted): no per-row
            # sampling settings to build (one per verified row) and no float32 copy of the logits.
            return SamplerOutput(logits.argmax(-1)), layout
        sampling = SamplingMetadata.from_requests(layout.row_views, self.settings.vocab_size, self.device, self.generators,
                                                  self.recent_row_columns)
        sampling.grammar = mask
        return self.sampler.verify(logits, sampling, layout), layout

    def _add_images(self, scheduled: list[ScheduledRequest], batch: ForwardBatch, step: StepInputs) -> None:
        """Put the encoder's rows in place of the step's placeholder tokens' embeddings and
        (M-RoPE) give every token its rotary positions."""
        batch.mm_embeds = self.encoder_outputs.gather(scheduled, step.query_start_loc)
        if self.vision.mrope_section is not None and any(s.request.rope_positions is not None for s in scheduled):
            rope = step_rope_positions([(s.start, s.num_new_tokens) for s in scheduled],
                                       [s.request.rope_positions for s in scheduled],
                                       [s.request.rope_delta for s in scheduled])
            batch.rope_positions = torch.from_numpy(rope).to(self.device, non_blocking=True)

    def _place_adapters(self, scheduled: list[ScheduledRequest], query_start: np.ndarray, padded_tokens: int) -> None:
        """Put the step's adapters in device slots and write each token's slot."""
        if self.lora_slots is None:
            return
        lora_ids = [s.request.lora_id for s in scheduled]
        slot_of = self.lora_slots.place({i for i in lora_ids if i})
        row_slots = np.array([slot_of[i] if i else -1 for i in lora_ids], dtype=np.int64)
        self.lora_slots.set_tokens(np.repeat(row_slots, np.diff(query_start)), padded_tokens)

    def _stage_input(self, num_tokens: int) -> torch.Tensor | None:
        """What the previous pipeline stage computed for this step (None on the first stage)."""
        if self.pp.is_first:
            return None
        if self.stage_link is None:
            return torch.zeros(2, num_tokens, self.settings.hidden_size, dtype=self.dtype, device=self.device)
        return self.stage_link.receive(num_tokens)

    def _copy_pending_tokens(self, scheduled: list[ScheduledRequest], query_start: np.ndarray,
                             previous: PendingStep | None) -> None:
        """Write the tokens ``previous`` samples into this step's device input ids, where its
        rows take them (a row whose token is pending computes just that token)."""
        rows = [i for i, s in enumerate(scheduled) if s.token_pending]
        if not rows:
            return
        sampled_row = {request.request_id: row for row, request in enumerate(previous.requests)}
        sources = [sampled_row[scheduled[i].request.request_id] for i in rows]
        positions = query_start[rows]
        tokens = previous.sampled.token_ids
        if sources == list(range(len(rows))) and np.array_equal(positions, np.arange(len(rows))):
            self.buffers.input_ids[:len(rows)].copy_(tokens[:len(rows)])  # a decode step in the same order
        else:
            index = host_to_device(positions.tolist(), torch.int64, self.device)
            self.buffers.input_ids.index_copy_(0, index, tokens[host_to_device(sources, torch.int64, self.device)])

    @_without_autograd
    def collect(self, pending: PendingStep | None) -> RunnerOutput:
        """Wait for a launched step and read its tokens (and logprobs) back."""
        result = RunnerOutput()
        if pending is None:
            return result
        if pending.ready is not None:
            # Also what lets the next step refill the staging memory this one's inputs came from.
            pending.ready.synchronize()
        if pending.handed_on is not None:
            pending.handed_on.wait()
        if pending.host_verified is not None:
            self._collect_chained(pending, result)
            return result
        sampled = pending.host_sampled
        if sampled is not None:
            if pending.layout is None:
                tokens = [[token] for token in sampled.token_ids.tolist()]
                first_rows = range(len(tokens))
            else:
                tokens, first_rows = pending.layout.emitted(sampled), pending.layout.row_start.tolist()
            counts = [len(t) for t in tokens]
            for request, request_tokens in zip(pending.requests, tokens):
                result.sampled[request.request_id] = request_tokens
            if sampled.logprobs is not None:
                ids, lps, ranks = sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.sampled_ranks.tolist()
                for request, first, n in zip(pending.requests, first_rows, counts):
                    k = request.sampling_params.logprobs
                    if k is not None:
                        result.logprobs[request.request_id] = [(ids[row][:k + 1], lps[row][:k + 1], ranks[row])
                                                               for row in range(first, first + n)]
        if pending.host_pooled is not None:
            vectors = pending.host_pooled.numpy()
            for request, row in zip(pending.pooled_requests, vectors):
                result.pooled[request.request_id] = vector_bytes(row, request.pooling)
        if self.pp.is_last:
            self._prompt_logprobs(pending.scheduled, pending.hidden, pending.query_start_loc, result)
        return result

    def _collect_chained(self, pending: PendingStep, result: RunnerOutput) -> None:
        batch, k = len(pending.requests), self.num_speculative_tokens
        emitted, counts, drafts, num_drafts = np.split(
            pending.host_verified.numpy(), np.cumsum([batch * (1 + k), batch, batch * k]))
        emitted, drafts = emitted.reshape(batch, 1 + k), drafts.reshape(batch, k)
        for b, request in enumerate(pending.requests):
            result.sampled[request.request_id] = emitted[b, :counts[b]].tolist()
            result.drafts[request.request_id] = drafts[b, :num_drafts[b]].tolist()

    def _loaded_event(self) -> torch.Event | None:
        """Marks the last load's copies as queued (None where loads are done at once: the CPU, and
        devices whose copies are synchronous, see ``asynchronous_copies``)."""
        if not self.asynchronous:
            return None
        event = torch.Event(device=self.device)
        event.record()
        return event

    def _static_shape(self, step: StepInputs) -> tuple[int, int] | None:
        """The (tokens, sequences) bucket a static-shape platform pads ``step`` to, else None."""
        if self.static_buckets is None:
            return None
        token_buckets, seq_buckets = self.static_buckets
        return bucket_for(len(step.input_ids), token_buckets), bucket_for(len(step.seq_lens), seq_buckets)

    def _step_inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        # A pending token is not in all_token_ids yet: 0 here, written on the device at launch.
        # Proposed tokens are not in it either: they follow the request's known tokens.
        counts = [s.num_new_tokens for s in scheduled]
        input_ids = np.fromiter(itertools.chain.from_iterable(
            (0,) if s.token_pending
            else s.request.all_token_ids[s.start:s.start + s.num_new_tokens - len(s.draft_token_ids)] + s.draft_token_ids
            if s.draft_token_ids else s.request.all_token_ids[s.start:s.start + s.num_new_tokens] for s in scheduled),
            np.int64, sum(counts))
        return step_inputs(input_ids, [s.start for s in scheduled], counts, [s.block_ids for s in scheduled],
                           self.block_size)

    @_without_autograd
    def greedy_chain(self, first: StepInputs, last_rows: list[int], widths: list[int]) -> list[list[int]]:
        """Greedy continuations without sampling or a read-back between passes (a draft model
        proposing): ``first`` is computed and the argmax after each of its ``last_rows`` (token
        indices) starts a chain; pass j then feeds chain i its latest token at the next
        position, for the chains with ``widths[i] > j`` (widths sorted largest first, so those
        are the first rows). Returns each chain's ``widths[i]`` tokens. Passes after the first
        replay the decode graphs where this runner captured them; the first, of one or two known
        tokens per request beside prompt chunks, runs eagerly."""
        input_ids, positions, meta = self.buffers.load(first)
        hidden = self.model(ForwardBatch(input_ids, positions, meta, self.kv_caches))
        rows = host_to_device(last_rows, torch.int64, self.device)
        tokens = [self.model.compute_logits(hidden[rows]).argmax(-1)]
        next_positions = first.positions[last_rows] + 1
        seq_of_row = np.searchsorted(first.query_start_loc, last_rows, side="right") - 1
        tables = first.block_table[seq_of_row]
        loaded = [self._loaded_event()]
        for j in range(1, max(widths, default=0)):
            n = sum(1 for w in widths if w > j)
            step = step_inputs(np.zeros(n, dtype=np.int64), next_positions[:n], [1] * n,
                               list(tables[:n]), self.block_size)
            if j >= 2 and loaded[j - 2] is not None:
                loaded[j - 2].synchronize()  # its staging half is the one this load refills
            graph_size = self.decode_graphs.size_for(n) if self.decode_graphs is not None else None
            input_ids, positions, meta = self.buffers.load(step, padded_seqs=graph_size)
            loaded.append(self._loaded_event())
            self.buffers.input_ids[:n].copy_(tokens[-1][:n])
            if graph_size is None:
                hidden = self.model(ForwardBatch(input_ids, positions, meta, self.kv_caches))
            else:
                hidden = self.decode_graphs.run(graph_size)
            tokens.append(self.model.compute_logits(hidden[:n]).argmax(-1))
            next_positions = next_positions[:n] + 1
        chains = [t.tolist() for t in tokens]
        return [[chains[j][i] for j in range(w)] for i, w in enumerate(widths)]

    def _prompt_logprobs(self, scheduled, hidden: torch.Tensor, query_start: np.ndarray, result: RunnerOutput) -> None:
        """Logprob of each prompt token given the ones before it, for requests that asked."""
        for i, s in enumerate(scheduled):
            request = s.request
            k = request.sampling_params.prompt_logprobs
            if k is None:
                continue
            # Position p's logits predict token p + 1; a resumed request never repeats what it sent.
            first = max(s.start, self.prompt_logprobs_next.get(request.request_id, 0))
            end = min(s.start + s.num_new_tokens, request.num_prompt_tokens - 1)
            if first >= end:
                continue
            rows = torch.arange(first - s.start, end - s.start, device=hidden.device) + int(query_start[i])
            logprobs = self.model.compute_logits(hidden[rows]).log_softmax(-1)
            targets = torch.tensor(request.prompt_token_ids[first + 1:end + 1], device=hidden.device)
            actual = logprobs.gather(-1, targets.unsqueeze(-1))
            ranks = (logprobs > actual).sum(-1) + 1
            top_values, top_ids = top_logprobs(logprobs, k)
            ids = torch.cat([targets.unsqueeze(-1), top_ids], -1)
            vals = torch.cat([actual, top_values], -1)
            result.prompt_logprobs[request.request_id] = [
                (row_ids, row_vals, rank) for row_ids, row_vals, rank in zip(ids.tolist(), vals.tolist(), ranks.tolist())]
            self.prompt_logprobs_next[request.request_id] = end
