"""Engine arguments: the CLI flags in snake case, shared by ``LLM(...)``, ``runtime generate`` and ``runtime serve``."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Optional, Union

from ..lora.config import LoRAConfig
from ..multimodal.processor import parse_image_limit
from ..platform import KV_CACHE_DTYPES
from ..pooling.config import parse_pooler_override
from ..reasoning import reasoning_markers
from ..sched.scheduler import PREEMPTION_MODES
from ..spec.config import SpeculativeConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(value: Union[str, int, None]) -> Optional[int]:
    """Bytes from an int or a size such as ``"4GiB"``, ``"512MB"``, ``"1.5G"``; None stays None."""
    if value is None or isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"kv_cache_memory {value!r} is not a size; use bytes or a size such as 4GiB or 512MiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


TASKS = ("generate", "embed")
RUNNERS = {"generate": "generate", "pooling": "embed"}
"""vLLM's ``--runner`` values and the task each means."""


@dataclass
class EngineArgs:
    """Everything that configures an engine. Names match vLLM's flags where the concept is shared."""

    model: Optional[str] = None
    """HF-layout directory or .gguf file; None: the embedded SmolLM2-135M-Instruct Q4_1."""
    load_format: str = "auto"
    """auto: the model's files; dummy (vLLM's name): made-up weights of the architecture in the
    directory's config.json, its tokenizer used as is, nothing else read (benchmarks of a shape)."""
    device: str = "auto"
    """Platform name (``runtime plugins`` lists them) or auto: the available one of highest priority."""
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    """Most sequences in one step; None: the platform's default (cpu 64, cuda 512)."""
    max_num_batched_tokens: Optional[int] = None
    """Token budget of one step; default max(2048, max_model_len) capped at 8192."""
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: Union[str, int, None] = None
    """Bytes for the KV cache (or ``"4GiB"``); default: the platform decides."""
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2, where the attention backend supports it."""
    quantization: Optional[str] = None
    """As vLLM's ``--quantization``: the checkpoint's own format (``gptq``, ``awq``,
    ``compressed-tensors``, ``fp8``, ``gguf``), whose weights the platform keeps packed where it
    can; a method that quantizes dense weights after loading (``fp8`` on cuda, ``int8`` on cpu;
    a quantized checkpoint is dequantized first); ``"none"``: every weight dequantized, exactly;
    None: the platform's choice, else the checkpoint's format (docs/quantization.md)."""
    scheduling_policy: str = "fcfs"
    seed: int = 0
    enforce_eager: bool = False
    deterministic: bool = False
    """Batch-invariant mode: a request's tokens and logprobs are bitwise the same alone or beside any
    other requests (each token computed with a reduction order fixed by its own inputs; the platform
    must support it, docs/python-api.md#deterministic-mode). Slower; the default mode is not."""
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None
    tensor_parallel_size: int = 1
    """Ranks that split every layer (Megatron style), one device each; >1 starts worker processes."""
    distributed_executor_backend: Optional[str] = None
    """How ranks beyond the first run: mp (worker processes on this machine; the default) or ray."""
    pipeline_parallel_size: int = 1
    """Stages the layers are split into, in order, each on its own ranks (times tensor_parallel_size);
    up to this many micro-batches are in flight so no stage idles."""
    data_parallel_size: int = 1
    """Engine cores (each with its own copy of the model) behind one server, requests balanced by load."""
    data_parallel_rank: int = 0
    """Which of them this engine is: it uses the devices from rank x tensor_parallel_size x
    pipeline_parallel_size on (set by the server)."""
    enable_expert_parallel: bool = False
    """Mixture-of-experts models: each tensor-parallel rank holds an equal share of the experts,
    whole, instead of a slice of every expert (vLLM's flag; docs/models.md)."""
    distributed_timeout: float = 300.0
    """Seconds a collective may wait for a rank before the engine fails, naming it."""
    enable_lora: bool = False
    """Serve LoRA adapters (requests name one with a ``LoRARequest``; docs/lora.md)."""
    max_loras: int = 1
    """Distinct adapters in one step (device slots)."""
    max_lora_rank: int = 16
    """The largest adapter rank accepted: 8, 16, 32, 64, 128 or 256."""
    max_cpu_loras: Optional[int] = None
    """Adapters kept loaded on the host; default max_loras."""
    speculative_config: Union[str, dict, SpeculativeConfig, None] = None
    """Speculative decoding, as vLLM's ``--speculative-config`` (JSON text or a dict), e.g.
    ``{"method": "ngram", "num_speculative_tokens": 4}`` (docs/speculative.md)."""
    kv_offloading_size: Optional[float] = None
    """GiB of host memory (all ranks together) for the KV cache's host tier: blocks evicted from
    the device's prefix cache are copied there and copied back on a later hit; None or 0: none.
    A no-op on platforms whose host and device share memory (docs/kv-offload.md)."""
    preemption_mode: str = "recompute"
    """What happens to a preempted request's KV: ``recompute`` (dropped, computed again on
    resume), ``swap`` (kept in the host tier, copied back; needs ``kv_offloading_size``) or
    ``auto`` (swap where the platform copies a token's KV faster than it recomputes it)."""
    task: str = "generate"
    """``generate`` (completions) or ``embed``: the model computes embeddings (``LLM.embed``,
    ``POST /v1/embeddings``) from its hidden states, pooled as ``pooler_config`` says (docs/embeddings.md)."""
    runner: Optional[str] = None
    """vLLM's ``--runner``: ``generate`` or ``pooling`` (the same as task embed); None: as ``task`` says."""
    pooler_config: Union[str, dict, None] = None
    """vLLM's ``--pooler-config`` for task embed, JSON text or a dict: ``pooling_type`` (LAST,
    MEAN or CLS) and/or ``use_activation`` (normalize), over the checkpoint's sentence-transformers
    settings (default: LAST, normalized)."""
    limit_mm_per_prompt: Union[str, dict, int, None] = None
    """Vision-language models: images one prompt may hold, as vLLM's ``--limit-mm-per-prompt``
    (JSON ``{"image": 2}``); default 4. Each step encodes images of at most
    ``max_num_batched_tokens`` placeholder tokens (docs/multimodal.md)."""
    allowed_local_media_path: Optional[str] = None
    """Directory whose image files (``file://`` URLs in chat content) may be read; None: none."""
    allow_remote_media: bool = False
    """Fetch ``http(s)://`` image URLs (off by default: the server fetches no address a client names)."""
    reasoning_parser: Optional[str] = None
    """The model's thinking format (``deepseek_r1``, ``qwen3``): the server returns the thinking as
    ``reasoning_content`` and structured output constrains only what follows it."""

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.data_parallel_size < 1 or not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_size must be >= 1 and data_parallel_rank in [0, size), got "
                             f"{self.data_parallel_size} and {self.data_parallel_rank}")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be mp or ray, got {self.distributed_executor_backend!r}")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout must be > 0 seconds, got {self.distributed_timeout}")
        if self.reasoning_parser is not None:
            reasoning_markers(self.reasoning_parser)
        self._resolve_task()
        if self.kv_offloading_size is not None and not self.kv_offloading_size >= 0:
            raise ValueError(f"kv_offloading_size must be >= 0 GiB, got {self.kv_offloading_size}: give the host "
                             f"memory for offloaded KV blocks, or 0 for none")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption_mode!r}")
        self.kv_offloading_bytes = int((self.kv_offloading_size or 0) * (1 << 30))
        if self.preemption_mode != "recompute" and not self.kv_offloading_bytes:
            raise ValueError(f"preemption_mode {self.preemption_mode} keeps preempted requests' KV in host memory: "
                             f"set kv_offloading_size (--kv-offloading-size GiB) too")
        self.kv_cache_memory_bytes = parse_size(self.kv_cache_memory)
        self.image_limit = parse_image_limit(self.limit_mm_per_prompt)
        self.speculative = SpeculativeConfig.parse(self.speculative_config)
        self.lora = (LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras or self.max_loras)
                     if self.enable_lora else None)

    def _resolve_task(self) -> None:
        """``task`` from ``task`` and vLLM's ``runner``, which must agree; what embed cannot do."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.runner is not None:
            if self.runner not in RUNNERS:
                raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
            if self.task != "generate" and RUNNERS[self.runner] != self.task:
                raise ValueError(f"runner {self.runner} contradicts task {self.task}: give one of them")
            self.task = RUNNERS[self.runner]
        if self.task != "embed":
            if self.pooler_config is not None:
                raise ValueError("pooler_config is for embedding models: add --task embed (or --runner pooling)")
            return
        if self.pooler_config is not None:
            parse_pooler_override(self.pooler_config)  # a mistake fails here, not in the engine core process
        unsupported = [name for name, on in (("speculative_config", self.speculative_config is not None),
                                              ("enable_lora", self.enable_lora),
                                              ("tensor_parallel_size > 1", self.tensor_parallel_size > 1),
                                              ("pipeline_parallel_size > 1", self.pipeline_parallel_size > 1),
                                              ("kv_offloading_size", bool(self.kv_offloading_size)),
                                              ("reasoning_parser", self.reasoning_parser is not None)) if on]
        if unsupported:
            raise ValueError(f"task embed does not support {', '.join(unsupported)} yet: drop it (scale an embedding "
                             f"model out with --data-parallel-size)")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
