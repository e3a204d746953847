"""EngineCore: builds the pieces from EngineArgs and runs one step at a time.

schedule -> execute -> update. It speaks token ids only; text is the OutputProcessor's job.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Optional

import torch

from ..kv.manager import KVCacheManager
from ..loader.source import ModelSource, open_model
from ..lora import LoRARequest
from ..models import decoder_settings
from ..models.parallel import check_pipeline_parallel, check_tensor_parallel
from ..platform import Communicator, PlatformConfig, Registry, get_registry
from ..sample.params import SamplingParams
from ..sched.request import Request, RequestStatus
from ..sched.scheduler import Scheduler, SchedulerOutput
from ..spec.proposer import SpecCounters, check_speculative, make_proposer
from ..worker.executor import make_executor
from ..worker.model_runner import PendingStep, RunnerOutput
from ..worker.setup import RunnerPlan, quantization_method, resolve_quantization
from .args import EngineArgs
from .messages import EngineCoreOutput, EngineStats

logger = logging.getLogger("runtime")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


class EngineCore:
    """The scheduler, the KV-cache manager and an executor that runs each step on every rank."""

    def __init__(self, args: EngineArgs, registry: Registry | None = None, source: ModelSource | None = None):
        self.args = args
        registry = registry or get_registry()
        self.platform = registry.select_platform(args.device)
        self.source = source or open_model(args.model)
        config = self.source.hf_config
        self.dtype = self._resolve_dtype(args.dtype)
        self.max_model_len = self._resolve_max_model_len(args.max_model_len, config)
        budget = args.max_num_batched_tokens or min(max(2048, self.max_model_len), 8192)
        self.max_num_seqs = args.max_num_seqs or self.platform.default_max_num_seqs()
        pconfig = PlatformConfig(dtype=self.dtype, block_size=args.block_size, max_model_len=self.max_model_len,
                                 max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                                 enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                                 kv_cache_dtype=args.kv_cache_dtype)
        self.platform.check_and_update_config(pconfig)
        self.block_size = pconfig.block_size
        settings = decoder_settings(config)
        check_tensor_parallel(args.tensor_parallel_size, settings.num_heads, settings.num_kv_heads,
                              settings.intermediate_size)
        check_pipeline_parallel(args.pipeline_parallel_size, settings.num_layers)
        if args.lora is not None and args.tensor_parallel_size * args.pipeline_parallel_size > 1:
            raise ValueError("LoRA adapters with --tensor-parallel-size or --pipeline-parallel-size above 1 are not "
                             "supported yet: serve adapters on one rank per engine (--data-parallel-size to scale out)")
        if args.pipeline_parallel_size > 1 and registry.communicator(self.platform.name).isend is Communicator.isend:
            raise ValueError(f"the {self.platform.name} platform's communicator has no isend (contract 1.4), which "
                             f"pipeline stages need: upgrade the plugin or split with --tensor-parallel-size")
        self.quantization = resolve_quantization(registry, self.platform, self.source, args.quantization)
        # Look-ahead queues step n+1 behind step n, so the host's work between two steps
        # (read-back, update, detokenizing, scheduling) overlaps the device's; it pays where decode
        # steps are graph replays, the host's part of a step being then mostly that work.
        # Several pipeline stages overlap instead through micro-batches (see _step_pipelined).
        # With speculative decoding the next step's inputs depend on how many proposals this
        # one accepts, and the proposers read the accepted tokens: nothing to queue ahead.
        self.pipeline_depth = args.pipeline_parallel_size
        graphs = self.platform.supports_graphs and not args.enforce_eager and self.pipeline_depth == 1
        self.look_ahead = graphs and args.speculative is None
        check_speculative(args)
        self.plan = RunnerPlan(
            model=args.model, device=self.platform.name, dtype=str(self.dtype).removeprefix("torch."),
            block_size=self.block_size, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=pconfig.max_num_batched_tokens, kv_cache_dtype=pconfig.kv_cache_dtype,
            quantization=self.quantization, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, graphs=graphs, seed=args.seed,
            tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
            data_parallel_size=args.data_parallel_size,
            first_device=args.data_parallel_rank * args.tensor_parallel_size * args.pipeline_parallel_size,
            lora=args.lora, speculative=args.speculative)
        quantization_method(registry, self.platform, self.quantization, self.source.quantization)  # fail before any rank starts
        self.executor = make_executor(self.plan, registry, self.platform, self.source,
                                      args.distributed_executor_backend, args.distributed_timeout)
        self.runner = self.executor.driver
        self.num_blocks = self.executor.num_blocks
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self._micro_batches: deque[tuple[SchedulerOutput, Optional[PendingStep]]] = deque()
        self._computing: set[str] = set()
        """Requests of the micro-batches in flight."""
        self.kv_manager = KVCacheManager(self.num_blocks, self.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_manager, self.max_num_seqs, pconfig.max_num_batched_tokens, args.scheduling_policy,
                                   max_loras=args.lora.max_loras if args.lora else None,
                                   num_speculative_tokens=args.speculative.num_speculative_tokens if args.speculative else 0)
        self.proposer = make_proposer(args.speculative, self.runner)
        self.spec_counters = SpecCounters(args.speculative.num_speculative_tokens if args.speculative else 0)
        self.max_num_batched_tokens = pconfig.max_num_batched_tokens
        gib = 1 << 30
        activation_bytes = self.executor.activation_bytes
        logger.info("platform %s (%s), %s, dtype %s, quantization %s, weights %.2f GiB per rank, activation peak %s, "
                    "KV cache %d blocks = %d tokens (%.2f GiB per rank), max_model_len %d", self.platform.name,
                    self.platform.device_name(), self.executor.describe(), self.dtype, self.quantization,
                    self.runner.weight_bytes / gib,
                    "not measured" if activation_bytes is None else f"{activation_bytes / gib:.2f} GiB",
                    self.num_blocks, self.num_blocks * self.block_size,
                    self.num_blocks * self.runner.kv_bytes_per_block() / gib, self.max_model_len)

    def _resolve_dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.platform.default_dtype()
        if name not in _DTYPES:
            raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]

    @staticmethod
    def _resolve_max_model_len(requested: Optional[int], config) -> int:
        limit = int(getattr(config, "max_position_embeddings", 0) or 2048)
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(f"--max-model-len {requested} exceeds the model's context length {limit}; lower it")
        return requested

    def shutdown(self) -> None:
        """Stop the other ranks' workers (a one-rank engine has none)."""
        self.executor.shutdown()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.source.generation_eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Queue a request; raises ValueError when it cannot fit the context or its adapter is bad."""
        if lora_request is not None:
            if self.runner.lora_registry is None:
                raise ValueError(f"request names LoRA adapter {lora_request.lora_name!r} but LoRA is not enabled: "
                                 f"start the engine with --enable-lora")
            self.runner.lora_registry.register(lora_request)
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.runner.settings.vocab_size
        if max(prompt_token_ids) >= vocab or min(prompt_token_ids) < 0:
            raise ValueError(f"prompt contains token ids outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, the context is {self.max_model_len}: "
                             f"shorten it or raise --max-model-len")
        request = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len, priority=priority,
                          lora_id=lora_request.lora_int_id if lora_request else 0)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def finish_requests(self, request_ids: list[str]) -> None:
        """Finish requests the output processor stopped (a stop string matched)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self._in_flight is not None or bool(self._micro_batches) or self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """Compute one step and return what it produced.

        With look-ahead, the step launched by the previous call (if any) is this call's step, and
        the next one is launched before this one's tokens are read back.
        """
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if self._in_flight is not None:
            (out, pending), self._in_flight = self._in_flight, None
        else:
            out = self.scheduler.schedule()
            if self.proposer is not None:
                self.proposer.propose(out)
            pending = self.executor.launch(out)
        if self.look_ahead and pending is not None:
            following = self.scheduler.look_ahead(out)
            if following is not None:
                self._in_flight = (following, self.executor.launch(following, pending))
        return self._outputs(out, self.executor.collect(pending))

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Keep up to one micro-batch per pipeline stage in flight, each of requests the others
        do not hold (and at most its share of all of them), so every stage has work; then read
        back the oldest."""
        while len(self._micro_batches) < self.pipeline_depth:
            # An even share each, so that the requests spread over all the micro-batches.
            share = -(-(self.scheduler.num_running + self.scheduler.num_waiting) // self.pipeline_depth)
            out = self.scheduler.schedule(self._computing, max_seqs=max(1, share))
            if not out.scheduled:
                if out.finished_ids:
                    self.executor.launch(out)  # the ranks forget the finished requests
                break
            self._micro_batches.append((out, self.executor.launch(out)))
            self._computing.update(s.request.request_id for s in out.scheduled)
        if not self._micro_batches:
            return []
        out, pending = self._micro_batches.popleft()
        self._computing.difference_update(s.request.request_id for s in out.scheduled)
        return self._outputs(out, self.executor.collect(pending))

    def _outputs(self, out: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Apply a step's results to the scheduler; what each request got from it."""
        counts = {rid: len(request.output_token_ids) for rid in result.sampled
                  if (request := self.scheduler.get_request(rid)) is not None}
        if self.proposer is not None:
            self.spec_counters.count(out, result.sampled)
        updated = self.scheduler.update(out, result.sampled)
        outputs: dict[str, EngineCoreOutput] = {}
        for request in updated:
            rid = request.request_id
            new = request.output_token_ids[counts[rid]:]  # a finishing token drops the ones after it
            logprobs = result.logprobs.get(rid)
            outputs[rid] = EngineCoreOutput(
                rid, new, new_logprobs=logprobs[:len(new)] if logprobs is not None else None,
                finish_reason=request.status.value if request.status.finished else None,
                stop_reason=request.stop_reason)
        for rid, entries in result.prompt_logprobs.items():
            outputs.setdefault(rid, EngineCoreOutput(rid, [])).prompt_logprobs = entries
        return list(outputs.values())

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_cache_usage=self.kv_manager.usage,
                           prefix_cache_queries=self.kv_manager.prefix_cache_queries,
                           prefix_cache_hits=self.kv_manager.prefix_cache_hits,
                           num_preemptions=self.scheduler.num_preemptions,
                           running_lora_ids=self.scheduler.lora_ids(RequestStatus.RUNNING),
                           waiting_lora_ids=self.scheduler.lora_ids(RequestStatus.WAITING),
                           **self.spec_counters.fields())
