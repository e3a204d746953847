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
from ..models.parallel import check_expert_split, check_pipeline_parallel, check_tensor_parallel
from ..models.vision import text_config, vision_arch
from ..multimodal.encoder_cache import EncoderCacheManager
from ..multimodal.inputs import ImageInput
from ..multimodal.mrope import mrope_positions
from ..platform import Communicator, PlatformConfig, Registry, get_registry
from ..platform.faults import StepFaults
from ..pooling import PoolerConfig, PoolingParams, resolve_pooler_config
from ..sample.params import SamplingParams
from ..sched.request import Request, RequestStatus
from ..sched.scheduler import Scheduler, SchedulerOutput, swap_is_cheaper
from ..spec.ngram import NgramProposer
from ..spec.proposer import SpecCounters, check_speculative, make_proposer
from ..structured.manager import StructuredOutputManager
from ..worker.executor import make_executor
from ..worker.model_runner import PendingStep, RunnerOutput
from ..worker.setup import RunnerPlan, quantization_method, resolve_quantization
from .args import EngineArgs
from .messages import EngineCoreOutput, EngineStats

logger = logging.getLogger("runtime")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def kernel_report(registry: Registry, platform, runner, quantization: str, checkpoint_quantization: Optional[str]) -> str:
    """One line naming what runs the model and every fallback taken (``runtime serve`` prints it
    when ready; ``runtime plugins`` lists what is installed): the attention backend, the
    quantization method, backends of higher priority passed over and why, ops the platform has no
    kernel for (the core's plain-torch reference runs them), a quantized checkpoint run otherwise."""
    fallbacks = [f"attention {why}" for why in runner.attention_passed_over]
    reference = [op for op, source in registry.kernels(platform.name, runner.ops.deterministic).sources.items()
                 if source == "reference"]
    if reference:
        fallbacks.append(f"reference kernels for {', '.join(reference)}")
    if checkpoint_quantization and quantization != checkpoint_quantization:
        fallbacks.append(f"the {checkpoint_quantization} checkpoint runs as {quantization}")
    attention = ", ".join(sorted({cls.name for cls in runner.backend_classes}))
    return (f"platform {platform.name} ({platform.device_name()}): attention {attention}, quantization "
            f"{quantization}; fallbacks: {'; '.join(fallbacks) or 'none'}")


class EngineCore:
    """The scheduler, the KV-cache manager and an executor that runs each step on every rank."""

    def __init__(self, args: EngineArgs, registry: Registry | None = None, source: ModelSource | None = None):
        self.args = args
        registry = registry or get_registry()
        self.platform = registry.select_platform(args.device)
        self.source = source or open_model(args.model, args.load_format)
        config = self.source.hf_config
        self.dtype = self._resolve_dtype(args.dtype)
        self.vision = vision_arch(config)
        self._check_vision(args)
        self.max_model_len = self._resolve_max_model_len(args.max_model_len, text_config(config))
        budget = args.max_num_batched_tokens or min(max(2048, self.max_model_len), 8192)
        self.pooler_config: Optional[PoolerConfig] = None
        """The model's pooling, for an embedding engine (``--task embed``); None: it generates."""
        if args.task == "embed":
            self.pooler_config = resolve_pooler_config(self.source.path, config, args.pooler_config)
            # An embedding is computed in one step: by default a step holds the longest prompt.
            budget = args.max_num_batched_tokens or max(budget, self.max_model_len)
        self.max_num_seqs = args.max_num_seqs or self.platform.default_max_num_seqs()
        pconfig = PlatformConfig(dtype=self.dtype, block_size=args.block_size, max_model_len=self.max_model_len,
                                 max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                                 enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                                 kv_cache_dtype=args.kv_cache_dtype, deterministic=args.deterministic)
        self.platform.check_and_update_config(pconfig)
        self.block_size = pconfig.block_size
        settings = decoder_settings(config)
        architectures = getattr(config, "architectures", None) or ["?"]
        if self.pooler_config is None and all(name.endswith("Model") for name in architectures):
            raise ValueError(f"{architectures[0]} is a base model without an output layer: it cannot "
                             f"generate; serve it as an embedder with --task embed")
        check_tensor_parallel(args.tensor_parallel_size, settings.num_heads, settings.num_kv_heads,
                              settings.intermediate_size)
        check_expert_split(args.tensor_parallel_size, settings.moe, args.enable_expert_parallel)
        check_pipeline_parallel(args.pipeline_parallel_size, settings.num_layers)
        if args.lora is not None and settings.moe is not None:
            raise ValueError("LoRA adapters on mixture-of-experts models are not supported yet: serve the model "
                             "without --enable-lora")
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
        # one accepts, and the proposers read the accepted tokens: a step is queued ahead only
        # after one that verified none (see _looks_ahead).
        self.pipeline_depth = args.pipeline_parallel_size
        # An embedding engine only ever runs prompts: it has no decode steps to capture. M-RoPE
        # moves decode positions by a per-request delta that captured graphs do not take.
        mrope = self.vision is not None and self.vision.mrope_section is not None
        graphs = (self.platform.supports_graphs and not args.enforce_eager and self.pipeline_depth == 1
                  and self.pooler_config is None and not mrope)
        self.look_ahead = graphs and args.speculative is None
        # What speculative decoding keeps of it: once a step's results are applied, the next step
        # is scheduled and launched before they go back to the caller, whose work on them
        # (detokenizing, stop strings, streaming) then runs while the device computes. That step
        # is scheduled exactly as it would be at the next call; requests the caller finishes or
        # aborts meanwhile are skipped when its results come back, as with look-ahead.
        self.launch_early = graphs and args.speculative is not None
        check_speculative(args)
        host_tier_bytes = self._host_tier_bytes(args)
        self.plan = RunnerPlan(
            model=args.model, load_format=args.load_format, device=self.platform.name,
            dtype=str(self.dtype).removeprefix("torch."),
            block_size=self.block_size, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=pconfig.max_num_batched_tokens, kv_cache_dtype=pconfig.kv_cache_dtype,
            quantization=self.quantization, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, graphs=graphs, seed=args.seed,
            tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
            data_parallel_size=args.data_parallel_size,
            first_device=args.data_parallel_rank * args.tensor_parallel_size * args.pipeline_parallel_size,
            lora=args.lora, speculative=args.speculative, expert_parallel=args.enable_expert_parallel,
            kv_offloading_bytes=host_tier_bytes, pooling=self.pooler_config is not None,
            static_shape_buckets=pconfig.static_shape_buckets, deterministic=args.deterministic)
        quantization_method(registry, self.platform, self.quantization, self.source.quantization)  # fail before any rank starts
        self.executor = make_executor(self.plan, registry, self.platform, self.source,
                                      args.distributed_executor_backend, args.distributed_timeout)
        self.runner = self.executor.driver
        self.num_blocks = self.executor.num_blocks
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self._micro_batches: deque[tuple[SchedulerOutput, Optional[PendingStep]]] = deque()
        self._computing: set[str] = set()
        """Requests of the micro-batches in flight."""
        self.kv_manager = KVCacheManager(self.num_blocks, self.block_size, args.enable_prefix_caching,
                                         num_host_blocks=self.runner.num_host_blocks)
        self.preemption_mode = self._resolve_preemption_mode(args.preemption_mode if host_tier_bytes else "recompute")
        self.scheduler = Scheduler(self.kv_manager, self.max_num_seqs, pconfig.max_num_batched_tokens, args.scheduling_policy,
                                   max_loras=args.lora.max_loras if args.lora else None,
                                   num_speculative_tokens=args.speculative.num_speculative_tokens if args.speculative else 0,
                                   preemption_mode=self.preemption_mode,
                                   encoder_cache=EncoderCacheManager(pconfig.max_num_batched_tokens) if self.vision else None,
                                   encoder_budget=pconfig.max_num_batched_tokens)
        self.proposer = make_proposer(args.speculative, self.runner)
        # Greedy n-gram verifications follow one another on the device, read back a step late
        # (worker/verify_chain.py); one rank only: other ranks would need the device's inputs too.
        self.chains_verification = (self.launch_early and isinstance(self.proposer, NgramProposer)
                                    and self.executor.world_size == 1 and self.runner.enable_verify_chains(
                                        args.speculative.prompt_lookup_min, args.speculative.prompt_lookup_max))
        self.spec_counters = SpecCounters(args.speculative.num_speculative_tokens if args.speculative else 0)
        self.max_num_batched_tokens = pconfig.max_num_batched_tokens
        # Steps whose masks may be in use at once: one per micro-batch, or the look-ahead step and
        # the one before it; a mask row per sampled position (proposals included).
        self.structured = StructuredOutputManager(
            self.source.tokenizer, self.runner.settings.vocab_size, self.eos_token_ids, args.reasoning_parser,
            pin_memory=self.runner.asynchronous, buffers_in_flight=max(2, self.pipeline_depth) + 1,
            max_rows=self.max_num_seqs * (1 + (args.speculative.num_speculative_tokens if args.speculative else 0)))
        self._awaiting_grammar: dict[str, Request] = {}
        """Constrained requests whose grammar is still compiling: the scheduler gets them once it has."""
        self._unsampled: Optional[tuple[SchedulerOutput, PendingStep]] = None
        """The look-ahead step in flight, launched without sampling (see ``_launch``)."""
        self._verified_last = False
        """Whether the last step applied verified proposals (``_chain``)."""
        self._failed: list[EngineCoreOutput] = []
        self._faults = StepFaults()
        """Requests failed outside a step (a grammar that did not compile), reported by the next."""
        self.kernel_report = kernel_report(registry, self.platform, self.runner, self.quantization,
                                           self.source.quantization)
        logger.info("%s", self.kernel_report)
        if self.pooler_config is not None:
            logger.info("task embed: %s pooling, %snormalized (%s)", self.pooler_config.pooling_type,
                        "" if self.pooler_config.normalize else "not ", self.pooler_config.source)
        gib = 1 << 30
        activation_bytes = self.executor.activation_bytes
        logger.info("platform %s (%s), %s, dtype %s, quantization %s, weights %.2f GiB per rank, activation peak %s, "
                    "KV cache %d blocks = %d tokens (%.2f GiB per rank), max_model_len %d", self.platform.name,
                    self.platform.device_name(), self.executor.describe(), self.dtype, self.quantization,
                    self.runner.weight_bytes / gib,
                    "not measured" if activation_bytes is None else f"{activation_bytes / gib:.2f} GiB",
                    self.num_blocks, self.num_blocks * self.block_size,
                    self.num_blocks * self.runner.kv_bytes_per_block() / gib, self.max_model_len)

    def _check_vision(self, args: EngineArgs) -> None:
        if self.vision is None:
            return
        if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
            raise ValueError("vision-language models run on one rank for now: drop --tensor-parallel-size and "
                             "--pipeline-parallel-size (--data-parallel-size scales out)")
        if args.speculative is not None:
            raise ValueError("speculative decoding with a vision-language model is not supported: drop --speculative-config")
        if args.lora is not None:
            raise ValueError("LoRA adapters on vision-language models are not supported: drop --enable-lora")

    def _resolve_dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.platform.default_dtype()
        if name not in _DTYPES:
            raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]

    def _host_tier_bytes(self, args: EngineArgs) -> int:
        """Host memory for the KV cache's host tier: none where host and device share memory."""
        if not args.kv_offloading_bytes:
            return 0
        if self.platform.unified_memory:
            logger.info("platform %s shares memory between host and device: --kv-offloading-size and "
                        "--preemption-mode swap change nothing (give the memory to --kv-cache-memory)", self.platform.name)
            return 0
        if args.speculative is not None and args.speculative.method == "draft_model":
            raise ValueError("--kv-offloading-size copies the target model's KV blocks only, and a draft model "
                             "shares their block ids: drop --kv-offloading-size, or propose with ngram")
        return args.kv_offloading_bytes

    def _resolve_preemption_mode(self, mode: str) -> str:
        """``auto`` becomes swap or recompute by :func:`swap_is_cheaper` on this model and platform."""
        if mode != "auto":
            return mode
        element = torch.tensor([], dtype=self.dtype).element_size()
        kv_per_token = self.runner.kv_bytes_per_block() * self.plan.world_size / self.block_size
        flops_per_token = 2 * self.runner.weight_bytes * self.plan.world_size / element
        chosen = "swap" if swap_is_cheaper(kv_per_token, flops_per_token, self.platform.host_copy_bytes_per_s,
                                           self.platform.flops_per_s * self.plan.world_size) else "recompute"
        logger.info("--preemption-mode auto: %s (%.0f KV bytes and %.3g FLOPs per token)", chosen, kv_per_token,
                    flops_per_token)
        return chosen

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
        self.structured.shutdown()
        self.executor.shutdown()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.source.generation_eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None, pooling: PoolingParams | None = None,
                    mm_inputs: list[ImageInput] | None = None) -> None:
        """Queue a request; raises ValueError when it cannot fit the context or its adapter is bad.

        ``pooling``: an embedding request (the engine must run task embed, and every request
        of such an engine is one): its output is one vector, ``EngineCoreOutput.embedding``.
        ``mm_inputs``: the prompt's preprocessed images (runtime.multimodal.processor), whose
        placeholder tokens the prompt already holds, expanded."""
        spec = self._pooling_spec(pooling, len(prompt_token_ids))
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
        if spec is None and len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens, the context is {self.max_model_len}: "
                             f"shorten it or raise --max-model-len")
        request = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len, priority=priority,
                          lora_id=lora_request.lora_int_id if lora_request else 0, pooling=spec)
        if mm_inputs:
            self._attach_images(request, mm_inputs)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        if params.structured_outputs is not None:
            if request_id in self._awaiting_grammar or self.scheduler.get_request(request_id) is not None:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.structured.add(request)
            if not self.structured.is_ready(request_id):
                self._awaiting_grammar[request_id] = request
                return
        self.scheduler.add_request(request)

    def _pooling_spec(self, pooling: PoolingParams | None, prompt_len: int):
        """The request's ``PoolingSpec`` (None for a generation request); ValueError when the
        request does not suit the engine's task or cannot be computed in one step."""
        if self.pooler_config is None:
            if pooling is not None:
                raise ValueError("this engine generates text; embeddings need an engine started with --task embed "
                                 "(or --runner pooling)")
            return None
        if pooling is None:
            raise ValueError("this engine runs --task embed: it computes embeddings, not completions; serve the "
                             "model without --task embed to generate")
        limit = min(self.max_model_len, self.max_num_batched_tokens)
        if prompt_len > limit:
            raise ValueError(f"input has {prompt_len} tokens, this embedding engine takes at most {limit} "
                             f"(--max-model-len {self.max_model_len}, --max-num-batched-tokens "
                             f"{self.max_num_batched_tokens}): shorten it")
        return self.pooler_config.spec(pooling)

    def _attach_images(self, request: Request, images: list[ImageInput]) -> None:
        """Check that each image's placeholder run is in the prompt, and give the request its
        images (and, M-RoPE, its prompt's rotary positions)."""
        if self.vision is None:
            raise ValueError("the model takes no images: serve a vision-language model (docs/multimodal.md)")
        images = sorted(images, key=lambda image: image.offset)
        tokens = request.prompt_token_ids
        end = 0
        for image in images:
            run = tokens[image.offset:image.end]
            if image.offset < end or image.end > len(tokens) or run.count(self.vision.image_token_id) != image.length:
                raise ValueError(f"an image's placeholder tokens [{image.offset}, {image.end}) are not in the prompt")
            end = image.end
        request.mm_inputs = images
        if self.vision.mrope_section is not None:
            merge = self.source.hf_config.vision_config.spatial_merge_size
            request.rope_positions, request.rope_delta = mrope_positions(len(tokens), images, merge)

    def abort_requests(self, request_ids: list[str]) -> None:
        self._forget_grammars(request_ids)
        self.scheduler.abort_requests(request_ids)

    def finish_requests(self, request_ids: list[str]) -> None:
        """Finish requests the output processor stopped (a stop string matched)."""
        self._forget_grammars(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def _forget_grammars(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._awaiting_grammar.pop(rid, None)
            self.structured.remove(rid)

    def has_unfinished_requests(self) -> bool:
        return (self._in_flight is not None or bool(self._micro_batches) or self.scheduler.has_unfinished_requests()
                or bool(self._awaiting_grammar) or bool(self._failed))

    def _admit_compiled(self) -> None:
        """Hand the scheduler the requests whose grammar is ready (in arrival order, which its
        policy keeps); fail those whose grammar did not compile. With nothing else to run, wait
        a moment for a grammar rather than spin."""
        if not self._awaiting_grammar:
            return
        if not self.scheduler.has_unfinished_requests() and self._in_flight is None and not self._micro_batches:
            self.structured.wait(0.01)
        for rid, request in list(self._awaiting_grammar.items()):
            if not self.structured.is_ready(rid):
                continue
            del self._awaiting_grammar[rid]
            error = self.structured.error(rid)
            if error is None:
                self.scheduler.add_request(request)
            else:
                self.structured.remove(rid)
                self._failed.append(EngineCoreOutput(rid, [], finish_reason=RequestStatus.FINISHED_ABORTED.value,
                                                     error=error))

    def _launch(self, out: SchedulerOutput, previous: Optional[PendingStep] = None) -> Optional[PendingStep]:
        """Launch a step. A step with constrained requests queues its forward pass first and its
        sampling once their masks are filled (meanwhile, on the host): at once when the
        matchers are up to date, after the step in flight is applied when it is a look-ahead
        step (``previous``; see :meth:`_sample_in_flight`)."""
        if not self.structured.tracks_any(out.scheduled):
            return self.executor.launch(out, previous)
        pending = self.executor.launch(out, previous, sample=False)
        if pending is not None:
            if previous is None:
                self.executor.sample(pending, self.structured.bitmask(out.scheduled))
            else:
                self._unsampled = (out, pending)
        return pending

    def _sample_in_flight(self) -> None:
        """Sample the look-ahead step in flight, if its launch left that for now (the matchers
        have just seen the tokens of the step before it)."""
        if self._unsampled is not None:
            (out, pending), self._unsampled = self._unsampled, None
            self.executor.sample(pending, self.structured.bitmask(out.scheduled))

    def step(self) -> list[EngineCoreOutput]:
        """Compute one step and return what it produced.

        With look-ahead, the step launched by the previous call (if any) is this call's step, and
        the next one is launched before this one's tokens are read back. With ``launch_early``
        (speculative decoding) the previous call's launched step is this call's too, and the next
        one is launched once this one's results are applied, or looked ahead as without
        speculation where that costs no proposals (:meth:`_looks_ahead`).
        """
        self._faults.step()
        self._admit_compiled()
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if self._in_flight is not None:
            (out, pending), self._in_flight = self._in_flight, None
        else:
            out, pending = self._schedule_and_launch()
        proposing = True
        if pending is not None and self.launch_early and isinstance(self.proposer, NgramProposer):
            proposing = self._proposing(out)
            if proposing and self.chains_verification:
                self._in_flight = self._chain(out, pending)
        if self._in_flight is None and pending is not None and self._looks_ahead(out, proposing):
            following = self.scheduler.look_ahead(out)
            if following is not None:
                self._reset_preempted(following)
                if self.proposer is not None:
                    self.proposer.propose(following)  # no room for proposals: it forgets finished requests
                self._in_flight = (following, self._launch(following, pending))
        outputs = self._outputs(out, self.executor.collect(pending))
        self._sample_in_flight()
        if self.launch_early and self._in_flight is None and self.scheduler.has_unfinished_requests():
            self._in_flight = self._schedule_and_launch()
        return outputs

    def _chain(self, out: SchedulerOutput, pending: PendingStep) -> Optional[tuple[SchedulerOutput, PendingStep]]:
        """The verification after ``out`` launched behind it now, its inputs and proposals made
        on the device (``Scheduler.chain``, ``ModelRunner.launch_chained``); None where the next
        step needs the host: constrained requests, sampling other than the raw argmax, requests
        joining or leaving, a request pausing its proposals."""
        if self.structured.tracks_any(out.scheduled):
            return None
        reach = self.runner.chain_reach(out, pending)
        following = None if reach is None else self.scheduler.chain(out, reach)
        if following is None:
            return None
        return following, self.runner.launch_chained(following, pending)

    def _proposing(self, out: SchedulerOutput) -> bool:
        """Whether the step after ``out`` (in flight) is likely to find proposals, as far as the
        host knows: ``out`` verifies some (its own, or chained, the step before it), or some
        request's tokens read back so far propose (n-gram proposer). A chained step verifies
        1 + k rows a request whatever it proposes, where the host's step would be a plain decode
        (about 20% more device time at 135M parameters, batch 8), so it follows only such a step;
        otherwise the next step is a plain decode launched ahead (:meth:`_looks_ahead`), and a
        proposal that the token in flight brings up is taken one step later: by a chain, or by
        the host's step after it where the batch cannot chain."""
        if any(s.draft_token_ids for s in out.scheduled) or (
                out.scheduled and out.scheduled[0].chained and self._verified_last):
            return True
        return self.proposer.finds_any(s.request for s in out.scheduled if not s.request.proposal_pause)

    def _looks_ahead(self, out: SchedulerOutput, proposing: bool) -> bool:
        """Whether the step after ``out`` is scheduled and queued behind it now, before its tokens
        are read back.

        Always without speculative decoding. With it, a step ahead has no room for proposals (its
        requests' last tokens are still on the device), so it is taken only after a step that
        verified none, with a proposer that reads nothing but the tokens known when it proposes
        (``may_skip_steps``: the n-gram one; a draft model's K/V follows every step). With the
        n-gram proposer that is every such step whose requests' known tokens propose nothing
        (``proposing`` False, :meth:`_proposing`), one after another: a proposal found later is
        taken by a chain from the step in flight, or by the host's step after it. Otherwise
        (tokens that propose, another proposer) only where it costs little: every request of ``out``
        either pauses its proposals anyway (back-off) or had room for them and found none. That
        costs one step's chance of proposals, on every other step at most: a step launched ahead
        gave no request room. A decode step's host work then hides behind the device again while
        proposals find nothing (a paragraph before the part a request copies) or keep failing: at
        135M parameters on an H100 a step without that overlap took about 0.5 ms more
        (docs/speculative.md).
        """
        if self.look_ahead:
            return True
        if not self.launch_early or not getattr(self.proposer, "may_skip_steps", False):
            return False
        # Where a step verifies proposals (chained: may verify) the next one's positions are
        # known only once it is read back.
        if any(s.chained or s.draft_token_ids for s in out.scheduled):
            return False
        return not proposing or all(s.request.proposal_pause or s.max_drafts for s in out.scheduled)

    def _schedule_and_launch(self) -> tuple[SchedulerOutput, Optional[PendingStep]]:
        out = self.scheduler.schedule()
        self._reset_preempted(out)
        if self.proposer is not None:
            self.proposer.propose(out)
            self.structured.truncate_drafts(out.scheduled)
        return out, self._launch(out)

    def _reset_preempted(self, out: SchedulerOutput) -> None:
        for rid in out.preempted_ids:
            request = self.scheduler.get_request(rid)
            if request is not None:
                self.structured.reset(request)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Keep up to one micro-batch per pipeline stage in flight, each of requests the others
        do not hold (and at most its share of all of them), so every stage has work; then read
        back the oldest."""
        while len(self._micro_batches) < self.pipeline_depth:
            # An even share each, so that the requests spread over all the micro-batches.
            share = -(-(self.scheduler.num_running + self.scheduler.num_waiting) // self.pipeline_depth)
            out = self.scheduler.schedule(self._computing, max_seqs=max(1, share))
            self._reset_preempted(out)
            if not out.scheduled:
                if out.finished_ids or out.transfers:
                    self.executor.launch(out)  # the ranks forget the finished requests, copy blocks
                break
            # The last stage samples as soon as it has computed: the masks go with the launch.
            self._micro_batches.append((out, self.executor.launch(out, grammar=self.structured.bitmask(out.scheduled))))
            self._computing.update(s.request.request_id for s in out.scheduled)
        if not self._micro_batches:
            return self._take_failed()
        out, pending = self._micro_batches.popleft()
        self._computing.difference_update(s.request.request_id for s in out.scheduled)
        return self._outputs(out, self.executor.collect(pending))

    def _outputs(self, out: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Apply a step's results to the scheduler; what each request got from it."""
        counts = {rid: len(request.output_token_ids) for rid in result.sampled
                  if (request := self.scheduler.get_request(rid)) is not None}
        if self.chains_verification:
            for item in out.scheduled:
                if item.chained and item.request.status is RequestStatus.RUNNING:
                    item.resolve(result.drafts.get(item.request.request_id, []))
            self._verified_last = any(item.draft_token_ids for item in out.scheduled)
        if self.proposer is not None:
            self.spec_counters.count(out, result.sampled)
        updated = self.scheduler.update(out, result.sampled)
        outputs: dict[str, EngineCoreOutput] = {}
        for request in updated:
            rid = request.request_id
            if request.pooling is not None:
                outputs[rid] = EngineCoreOutput(rid, [], finish_reason=request.status.value,
                                                embedding=result.pooled[rid])
                continue
            new = request.output_token_ids[counts[rid]:]  # a finishing token drops the ones after it
            logprobs = result.logprobs.get(rid)
            error = self._advance_grammar(request)
            outputs[rid] = EngineCoreOutput(
                rid, new, new_logprobs=logprobs[:len(new)] if logprobs is not None else None,
                finish_reason=request.status.value if request.status.finished else None,
                stop_reason=request.stop_reason, error=error)
        for rid, entries in result.prompt_logprobs.items():
            outputs.setdefault(rid, EngineCoreOutput(rid, [])).prompt_logprobs = entries
        return self._take_failed() + list(outputs.values())

    def _advance_grammar(self, request: Request) -> Optional[str]:
        """Feed a constrained request's new tokens to its matcher; finish it once its grammar has
        ended (with ignore_eos too: nothing may follow); forget it once finished. The error that
        fails it, if its output left the grammar (which the mask rules out)."""
        self.structured.advance(request)
        error = self.structured.error(request.request_id)
        if error is not None and not request.status.finished:
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_ABORTED)
        elif self.structured.terminated(request) and not request.status.finished:
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
        if request.status.finished:
            self.structured.remove(request.request_id)
        return error

    def _take_failed(self) -> list[EngineCoreOutput]:
        failed, self._failed = self._failed, []
        return failed

    def stats(self) -> EngineStats:
        encoder = self.scheduler.encoder_cache
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_cache_usage=self.kv_manager.usage,
                           prefix_cache_queries=self.kv_manager.prefix_cache_queries,
                           prefix_cache_hits=self.kv_manager.prefix_cache_hits,
                           cpu_prefix_cache_queries=self.kv_manager.cpu_prefix_cache_queries,
                           cpu_prefix_cache_hits=self.kv_manager.cpu_prefix_cache_hits,
                           num_preemptions=self.scheduler.num_preemptions,
                           running_lora_ids=self.scheduler.lora_ids(RequestStatus.RUNNING),
                           waiting_lora_ids=self.scheduler.lora_ids(RequestStatus.WAITING),
                           encoder_cache_queries=encoder.queries if encoder is not None else 0,
                           encoder_cache_hits=encoder.hits if encoder is not None else 0,
                           **self.spec_counters.fields())
