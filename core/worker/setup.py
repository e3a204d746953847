"""Building a rank's model runner: the same steps, in the same order, on every rank.

The engine core resolves the engine arguments once into a ``RunnerPlan`` (dtype, context
length, block size, budgets, quantization, parallel sizes); each rank turns the plan into a
loaded ``ModelRunner`` with ``build_runner``. Under tensor parallelism the steps that size the
KV cache are collectives, so the ranks agree on one block count (the smallest any rank can hold)
and fail together when it is too small.

Ranks are numbered stage by stage: global rank r is tensor-parallel rank ``r % tp`` of pipeline
stage ``r // tp``; rank 0 (the engine core's) is the first stage's first rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..loader.source import ModelSource, open_model
from ..lora.config import LoRAConfig
from ..spec.config import SpeculativeConfig
from ..models import decoder_settings
import torch.distributed as dist

from ..models.parallel import PipelineParallel, TensorParallel
from ..platform import Platform, QuantizationMethod, Registry
from .model_runner import ModelRunner
from .pipeline import StageLink

_GIB = 1 << 30
logger = logging.getLogger("runtime")


@dataclass(frozen=True)
class RunnerPlan:
    """Everything a rank needs to build its runner, resolved once by the engine core."""

    model: Optional[str]
    device: str
    """The platform's name."""
    dtype: str
    """A torch dtype's name, e.g. ``bfloat16``."""
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str
    quantization: str
    """A method the platform offers for dense weights, or ``none``."""
    kv_cache_memory_bytes: Optional[int]
    gpu_memory_utilization: float
    graphs: bool
    """Capture decode graphs (the platform supports them and ``--enforce-eager`` is off)."""
    seed: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    first_device: int = 0
    """Rank r uses device first_device + r (data-parallel engines use disjoint devices)."""
    lora: Optional[LoRAConfig] = None
    speculative: Optional[SpeculativeConfig] = None
    expert_parallel: bool = False
    """Split a mixture-of-experts model's experts across the tensor-parallel ranks, whole."""
    kv_offloading_bytes: int = 0
    """Host memory for the KV cache's host tier, all ranks together; 0: none."""
    pooling: bool = False
    """An embedding engine (``--task embed``): the runner pools hidden states, computes no logits."""
    static_shape_buckets: Optional[tuple[int, ...]] = None
    """The platform's token buckets (``PlatformConfig.static_shape_buckets``): every step padded to one."""
    deterministic: bool = False
    """Batch-invariant kernels only (``--deterministic``)."""
    load_format: str = "auto"
    """``--load-format``: the model's files, or made-up weights (``dummy``)."""

    @property
    def world_size(self) -> int:
        """Ranks of one engine: tensor-parallel ranks times pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fingerprint(self, source: ModelSource) -> int:
        """A number every rank must share: this plan and the model's configuration (a rank that
        opened another model, or resolved another setting, differs)."""
        config = source.hf_config.to_dict() if hasattr(source.hf_config, "to_dict") else dict(vars(source.hf_config))
        text = json.dumps([asdict(self), config], sort_keys=True, default=str)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def resolve_quantization(registry: Registry, platform: Platform, source: ModelSource, requested: Optional[str]) -> str:
    """``--quantization`` as vLLM reads it: a checkpoint method (``gptq``, ``awq``,
    ``compressed-tensors``, ``fp8``, ``gguf``) names the checkpoint's own format and keeps its
    weights packed; a method that quantizes dense weights (``int8`` on cpu, ``fp8`` on cuda)
    quantizes the (dequantized) weights after loading; ``none`` dequantizes everything. Without
    one, the platform's choice for the checkpoint, else the checkpoint's own format. A
    ``ValueError`` lists what the platform offers for a combination it cannot run."""
    methods = registry.quantization_methods(platform.name)
    checkpoint = source.quantization
    if requested is None:
        return platform.default_quantization(source.format, source.quantized_types) or checkpoint or "none"
    if requested == "none":
        return requested
    for_checkpoint = sorted({m.name for m in methods if m.name == checkpoint})
    for_dense = sorted({m.name for m in methods if m.quantizes_dense})
    offered = ", ".join(sorted(set(for_checkpoint + for_dense)) + ["none"])
    if requested == checkpoint and for_checkpoint:
        return requested
    if requested in for_dense:
        return requested
    names = {m.name for m in methods}
    if requested in names and requested != checkpoint:
        why = f"it loads {requested} checkpoints and this one is {checkpoint or 'not quantized'}"
    else:
        why = f"the {platform.name} platform has no {requested} method"
    raise ValueError(f"--quantization {requested} cannot run this checkpoint on {platform.name}: {why}; "
                     f"choose one of: {offered}")


def quantization_method(registry: Registry, platform: Platform, name: str,
                        checkpoint: Optional[str] = None) -> Optional[QuantizationMethod]:
    """The method that quantizes the dense weights after loading for a resolved ``--quantization
    name`` (:func:`resolve_quantization`): None for ``none`` and for the checkpoint's own format,
    whose method loads the packed tensors instead."""
    if name in ("none", checkpoint):
        return None
    offered = sorted({m.name for m in registry.quantization_methods(platform.name) if m.quantizes_dense})
    if name not in offered:
        raise ValueError(f"--quantization {name} is not offered on {platform.name}; "
                         f"choose one of: {', '.join(offered + ['none'])}")
    return registry.quantization_method(platform.name, name)


@dataclass
class RankPlace:
    """Where one rank sits: its tensor-parallel group, its pipeline stage, and the whole engine
    (``world``: every rank, to agree on settings and the KV block count)."""

    tp: TensorParallel = field(default_factory=TensorParallel)
    pp: PipelineParallel = PipelineParallel()
    world: TensorParallel = field(default_factory=TensorParallel)
    rank: int = 0


def join_groups(registry: Registry, platform: Platform, plan: RunnerPlan, rank: int) -> RankPlace:
    """This rank's place, after the process group is initialised: one tensor-parallel group per
    pipeline stage (every rank creates every group, in the same order, as torch requires)."""
    communicator = registry.communicator(platform.name)
    tp_size, pp_size = plan.tensor_parallel_size, plan.pipeline_parallel_size
    world = TensorParallel(rank, plan.world_size, communicator())
    stage = rank // tp_size
    if pp_size == 1:
        tp = world
    else:
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        tp = TensorParallel(rank % tp_size, tp_size, communicator(groups[stage]) if tp_size > 1 else None)
    return RankPlace(tp, PipelineParallel(stage, pp_size), world, rank)


def weight_bytes(plan: RunnerPlan, source: ModelSource) -> int:
    """Bytes the model's weights take on the device in ``plan.dtype``: every parameter dense, or,
    for a checkpoint whose own quantized weights are kept packed, the tensors as stored (float
    ones converted to the dtype; a quantized embedding table also dense, as lookups read it
    dequantized). The packed figure is a lower bound: a method that expands a format on load
    needs more, and the KV-cache sizing after loading reports that shortfall."""
    element = torch.tensor([], dtype=plan.torch_dtype).element_size()
    if source.quantization is None or plan.quantization != source.quantization or source.stored_sizes is None:
        return decoder_settings(source.hf_config).num_parameters() * element
    total = 0
    for tensor in source.stored_sizes():
        total += tensor.numel * element if tensor.is_float else tensor.stored_bytes
        if not tensor.is_float and tensor.name.endswith("embed_tokens.weight"):
            total += tensor.numel * element
    return total


def check_weights_fit(plan: RunnerPlan, platform: Platform, source: ModelSource, device_index: int = 0) -> None:
    """Fail before loading when this rank's share of the weights cannot fit its device."""
    needed = weight_bytes(plan, source) / plan.world_size
    free, _ = platform.memory_info(device_index)
    if needed > free:
        share = "" if plan.world_size == 1 else f" (its share across {plan.world_size} ranks)"
        raise ValueError(f"model needs {needed / _GIB:.2f} GiB for its weights{share} in {plan.dtype}, only "
                         f"{free / _GIB:.2f} GiB is free on {platform.name}: choose a smaller --dtype, a smaller model, "
                         f"another --device or a larger --tensor-parallel-size or --pipeline-parallel-size")


def build_runner(plan: RunnerPlan, registry: Registry, platform: Platform, source: Optional[ModelSource] = None,
                 place: RankPlace | None = None, device_index: int = 0) -> tuple[ModelRunner, int, Optional[int]]:
    """Load this rank's runner and give it a KV cache; returns (runner, blocks, activation peak bytes).

    Every rank of the engine must call this with the same plan: the block count is agreed by a
    collective, and decode graphs capture the model's collectives.
    """
    source = source or open_model(plan.model, plan.load_format)
    place = place or RankPlace()
    world = place.world
    if world.size > 1:
        _check_ranks_agree(plan.fingerprint(source), world, platform, device_index)
    check_weights_fit(plan, platform, source, device_index)
    ranks = world.size * plan.data_parallel_size
    if platform.device_type == "cpu" and ranks > 1:
        # The ranks share this machine's cores: one share each, not all of them each.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    torch.manual_seed(plan.seed)
    runner = ModelRunner(source.hf_config, source.weights(), platform, registry, plan.torch_dtype, plan.block_size,
                         plan.max_model_len, plan.kv_cache_dtype,
                         quantization_method(registry, platform, plan.quantization, source.quantization),
                         keep_packed=plan.quantization == source.quantization, tp=place.tp, device_index=device_index,
                         pp=place.pp, lora=plan.lora, expert_parallel=plan.expert_parallel, pooling=plan.pooling,
                         deterministic=plan.deterministic)
    runner.prepare_inputs(plan.max_num_batched_tokens, plan.max_num_seqs, plan.max_model_len, plan.static_shape_buckets)
    activation_bytes = runner.profile_activation_memory(plan.max_num_batched_tokens, plan.max_num_seqs)
    draft = None
    if plan.speculative is not None and plan.speculative.method == "draft_model" and place.rank == 0:
        draft = build_draft_runner(plan, registry, platform, source, device_index)
    per_block = runner.kv_bytes_per_block() + (draft.kv_bytes_per_block() if draft else 0)
    budget = platform.kv_cache_memory(plan.kv_cache_memory_bytes, plan.gpu_memory_utilization,
                                      runner.weight_bytes + (draft.weight_bytes if draft else 0) + (activation_bytes or 0))
    num_blocks = _smallest(budget // per_block, world, runner.device)
    needed = math.ceil(plan.max_model_len / plan.block_size) + 1  # +1: block 0 is the null block
    if num_blocks < needed:
        where = "" if world.size == 1 else " on the rank with the least memory"
        raise ValueError(
            f"one sequence of --max-model-len {plan.max_model_len} needs {needed * per_block / _GIB:.3f} GiB of KV cache, "
            f"only {num_blocks * per_block / _GIB:.3f} GiB is available for it{where}: lower --max-model-len or raise "
            f"--kv-cache-memory (or --gpu-memory-utilization)")
    runner.allocate_kv_cache(num_blocks)
    if draft is not None:
        draft.allocate_kv_cache(num_blocks)
        runner.draft = draft
        logger.info("draft model %s: weights %.2f GiB, KV cache %.2f GiB (the target's %d blocks, its block tables)",
                    plan.speculative.model, draft.weight_bytes / _GIB, num_blocks * draft.kv_bytes_per_block() / _GIB,
                    num_blocks)
    if plan.kv_offloading_bytes:
        num_host_blocks = _smallest(plan.kv_offloading_bytes // world.size // runner.kv_bytes_per_block(), world,
                                    runner.device)
        if num_host_blocks < 1:
            raise ValueError(f"--kv-offloading-size {plan.kv_offloading_bytes / _GIB:g} GiB holds no KV block "
                             f"({runner.kv_bytes_per_block() * world.size} bytes across the ranks): raise it")
        runner.allocate_host_cache(num_host_blocks)
        logger.info("KV host tier: %d blocks = %d tokens (%.2f GiB per rank)", num_host_blocks,
                    num_host_blocks * plan.block_size, num_host_blocks * runner.kv_bytes_per_block() / _GIB)
    if place.pp.size > 1:
        tp_size = place.tp.size
        runner.stage_link = StageLink(world.comm, None if place.pp.is_first else place.rank - tp_size,
                                      None if place.pp.is_last else place.rank + tp_size,
                                      runner.settings.hidden_size, plan.torch_dtype, runner.device)
    if plan.graphs:
        k = plan.speculative.num_speculative_tokens if plan.speculative is not None else 0
        runner.capture_decode_graphs(plan.max_num_seqs, k)
        if draft is not None:
            # The draft's passes after its first are decode steps of one token per proposing request.
            draft.capture_decode_graphs(plan.max_num_seqs)
    return runner, num_blocks, activation_bytes


def build_draft_runner(plan: RunnerPlan, registry: Registry, platform: Platform, target: ModelSource,
                       device_index: int) -> ModelRunner:
    """The draft model's runner on the target's device (speculative decoding), its inputs
    prepared, no KV cache yet; ValueError when its vocabulary is not the target's."""
    source = open_model(plan.speculative.model, plan.load_format)
    target_vocab, draft_vocab = target.tokenizer.get_vocab(), source.tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        raise ValueError(f"draft model {plan.speculative.model} has another tokenizer than the target "
                         f"({len(draft_vocab)} against {len(target_vocab)} tokens, or other ids): a draft model must "
                         f"share the target's vocabulary (e.g. a smaller model of the same family)")
    quantization = resolve_quantization(registry, platform, source, None)
    draft = ModelRunner(source.hf_config, source.weights(), platform, registry, plan.torch_dtype, plan.block_size,
                        plan.max_model_len, plan.kv_cache_dtype,
                        quantization_method(registry, platform, quantization, source.quantization),
                        keep_packed=quantization == source.quantization, device_index=device_index,
                        deterministic=plan.deterministic)
    # A step's first draft pass also catches up on the token after each request's last accepted one.
    draft.prepare_inputs(plan.max_num_batched_tokens + plan.max_num_seqs, plan.max_num_seqs, plan.max_model_len)
    return draft


def _smallest(value: int, tp: TensorParallel, device: Any) -> int:
    if tp.size == 1:
        return int(value)
    return int(tp.all_gather(torch.tensor([value], dtype=torch.int64, device=device), dim=0).min())


def _check_ranks_agree(fingerprint: int, tp: TensorParallel, platform: Platform, device_index: int) -> None:
    prints = tp.all_gather(torch.tensor([fingerprint], dtype=torch.int64, device=platform.device(device_index)), dim=0)
    differing = [rank for rank, value in enumerate(prints.tolist()) if value != prints[0].item()]
    if differing:
        raise ValueError(f"ranks {', '.join(map(str, differing))} opened a different model or configuration than rank 0 "
                         f"(model, dtype and engine settings must match on every rank)")
