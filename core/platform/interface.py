"""The classes a platform plugin implements.

A plugin returns subclasses of these from the hooks in :mod:`runtime.platform.hookspecs`.
Each subclass names the platform it serves (``platform = "cpu"``), so a third party can add
one attention backend, kernel or quantization method to an existing platform without forking it.
Everything here is plain torch: the core never imports a vendor module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch


@dataclass
class PlatformConfig:
    """The engine settings a platform may inspect and adjust before anything is allocated.

    ``Platform.check_and_update_config`` may change ``block_size`` (a backend that needs 64),
    set ``static_shape_buckets`` (compilers that need fixed shapes), or turn a feature off by
    raising ``ValueError`` with the reason and the flag that avoids it.
    """

    dtype: torch.dtype
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_lora: bool = False
    speculative: bool = False
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    static_shape_buckets: tuple[int, ...] | None = None
    """Token counts, ascending, the last ``max_num_batched_tokens`` (``runtime.platform.buckets``):
    when set, the runner pads every step to the smallest that holds it, its sequences to a power
    of two up to ``max_num_seqs``, and its block table to full width (padding tokens have slot -1)."""
    deterministic: bool = False
    """(Contract 1.10.) ``--deterministic``: every row's result must not depend on the other rows of
    its batch. ``check_and_update_config`` refuses it on a platform without :attr:`Platform.supports_deterministic`."""


class Platform:
    """One kind of device: how to find it, how much memory it has, what it can do.

    Subclasses set the class attributes and implement the methods that raise
    ``NotImplementedError``. One instance is made per engine, after ``is_available()``.
    """

    name: ClassVar[str]
    """Short identifier used by ``--device NAME`` (``"cpu"``, ``"cuda"``, ...)."""
    device_type: ClassVar[str]
    """The torch device type tensors live on (``"cpu"``, ``"cuda"``, ``"hpu"``, ``"xla"``, ``"mps"``)."""
    priority: ClassVar[int] = 0
    """Automatic selection picks the available platform with the highest priority."""
    dist_backend: ClassVar[str] = "gloo"
    """torch.distributed backend for collectives on this platform."""
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    static_shapes: ClassVar[bool] = False
    """True where every step must use one of a few fixed shapes (TPU, Gaudi graphs)."""
    unified_memory: ClassVar[bool] = False
    """True where host and device share memory (Apple silicon, the CPU): KV offload and
    preemption by swap are no-ops, memory for a host tier being better spent on the cache itself."""
    host_copy_bytes_per_s: ClassVar[float] = 2.0e10
    """(Contract 1.9.) Rough bytes per second of a KV block copy between device and host memory
    (a PCIe 4.0 x16 link): ``--preemption-mode auto`` weighs it against :attr:`flops_per_s`."""
    flops_per_s: ClassVar[float] = 1.0e14
    """(Contract 1.9.) Rough dense-matmul throughput the model's forward pass reaches, per device."""
    inference_mode: ClassVar[bool] = True
    """(Contract 1.11.) Whether the runner runs steps under ``torch.inference_mode`` (else
    ``torch.no_grad``): torch-xla's lazy tensors cannot take a view of an ordinary tensor under it."""
    supports_graphs: ClassVar[bool] = False
    """True where the device can record a step's launches once and replay them (CUDA graphs):
    the runner then captures decode steps at start-up, unless ``--enforce-eager``, and
    implements :meth:`graph_pool` and :meth:`capture_graph`."""

    supports_deterministic: ClassVar[bool] = False
    """(Contract 1.10.) True where the platform runs ``--deterministic``: its attention backends,
    kernels and quantization methods that claim ``batch_invariant`` compute each row (token) with a
    reduction order that does not depend on which other rows share the batch, so a request's
    tokens and logprobs are bitwise the same alone and on a busy server."""

    @classmethod
    def is_available(cls) -> bool:
        """Whether this machine has the device and its software stack. Must not raise."""
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """(Contract 1.11.) None when the platform is available; otherwise why not, naming what is
        missing and how to get it, in one line: ``runtime plugins`` prints it, and ``--device NAME``
        fails with it. Must not raise. The default only knows :meth:`is_available`'s answer."""
        return None if cls.is_available() else "is_available() is False on this machine"

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def device_count(self) -> int:
        raise NotImplementedError

    def device_name(self, index: int = 0) -> str:
        raise NotImplementedError

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        """(free, total) bytes of the memory model weights and KV cache are allocated from."""
        raise NotImplementedError

    def default_dtype(self) -> torch.dtype:
        """The dtype ``--dtype auto`` resolves to when the checkpoint's own is not supported."""
        return self.supported_dtypes[0]

    def default_max_num_seqs(self) -> int:
        """``--max-num-seqs`` when the user gives none: how many sequences one step may hold.
        (Contract 1.3.) vLLM's default for most GPUs; a platform sizes it to what it runs well."""
        return 256

    def check_and_update_config(self, config: PlatformConfig) -> None:
        """Adjust ``config`` to what the platform needs, or raise ``ValueError`` naming the fix."""
        if config.dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ValueError(f"platform {self.name} does not support dtype {config.dtype}; use --dtype with one of: {names}")
        if config.deterministic and not self.supports_deterministic:
            raise ValueError(f"platform {self.name} does not support --deterministic (batch-invariant kernels); "
                             f"run without it or choose another --device")

    def kv_cache_memory(self, requested_bytes: int | None, gpu_memory_utilization: float, non_kv_bytes: int) -> int:
        """Bytes to give the KV cache. ``requested_bytes`` is ``--kv-cache-memory`` when set.

        ``non_kv_bytes`` is what the engine needs besides the cache: the weights, plus the
        activation peak it measured where :meth:`peak_memory_allocated` reports one.
        """
        if requested_bytes is not None:
            return requested_bytes
        free, total = self.memory_info()
        return max(0, int(total * gpu_memory_utilization) - (total - free) - non_kv_bytes)

    def synchronize(self) -> None:
        """Wait for queued device work (used by benchmarks and profiling)."""

    def mark_step(self) -> None:
        """(Contract 1.12.) Called once all of a step's device work is queued (forward pass,
        sampling, pooling) and before any of it is read back. A platform that traces lazily
        (torch-xla) compiles the step's whole graph here, or finds it compiled, and launches it:
        the step is then one program, and the KV cache's in-place writes are materialized instead
        of being carried, recomputed, into the next step's graph. Default: nothing (eager devices)."""

    def default_quantization(self, checkpoint_format: str, quantized_types: frozenset[str]) -> str | None:
        """The ``--quantization`` method to use when the user names none, for a checkpoint of this
        format storing these quantized tensor types (empty: dense); None keeps the weights as loaded."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak for :meth:`peak_memory_allocated`."""

    def peak_memory_allocated(self) -> int | None:
        """Most bytes the engine's tensors held on the device since :meth:`reset_peak_memory`, or
        None where the platform cannot tell: the engine then skips its activation profile."""
        return None

    def graph_pool(self) -> Any:
        """A memory pool that every captured graph of one engine shares (they never run at once)."""
        raise NotImplementedError

    def capture_graph(self, fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``fn``'s device work (already run once, so nothing compiles during capture);
        returns a replay function and ``fn``'s output tensor, which each replay rewrites."""
        raise NotImplementedError


KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
"""``--kv-cache-dtype`` names besides ``auto`` (the model's dtype) and the element type each stores."""


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer of a model needs from a backend."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    dtype: torch.dtype
    block_size: int
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    kv_cache_dtype: str = "auto"
    multi_query: bool = True
    """Several query tokens per sequence in one call (prefill chunks, speculative verification)."""
    deterministic: bool = False
    """(Contract 1.10.) ``--deterministic``: each query token's output must be bitwise the same
    whatever else is in the batch, and whether its sequence's tokens arrive in one prefill chunk,
    several, or one per decode step: a split plan fixed by the token's own context length."""

    @property
    def cache_dtype(self) -> torch.dtype:
        """Element type of the KV cache: ``dtype`` unless ``kv_cache_dtype`` names an fp8 format.

        fp8 caches store values unscaled (scale 1.0, as vLLM does without calibrated scales):
        e4m3 holds magnitudes up to 448, which covers the keys and values of common models.
        """
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype, self.dtype)


@dataclass
class AttentionMetadata:
    """Describes one flattened varlen batch; shared by every attention layer of a step.

    Tensors live on the platform's device. ``*_cpu`` fields are host copies the runner already
    has, so a backend never needs a device-to-host sync to plan its launch.
    """

    query_start_loc: torch.Tensor
    """[B+1] int32: request i's new tokens are rows query_start_loc[i]:query_start_loc[i+1]."""
    seq_lens: torch.Tensor
    """[B] int32: context length of request i including its new tokens."""
    block_table: torch.Tensor
    """[B, max_blocks] int32: physical block ids of request i's KV, in order; padding is 0."""
    slot_mapping: torch.Tensor
    """[T] int64: cache slot (block_id * block_size + offset) where token t's K/V is written;
    negative for a padding token (a fixed-shape batch, e.g. a graph replay): write nothing."""
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    backend_cache: dict[Any, Any] = field(default_factory=dict)
    """What a backend derives from this metadata (masks, gather indices) once per step and
    reuses in every layer; keys are the backend's own. The runner makes fresh metadata each step."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    """Paged attention for one platform: the single call that serves every phase.

    Semantics of :meth:`forward`: write the new tokens' K/V into ``kv_cache`` at
    ``meta.slot_mapping``, then let each query token attend causally to its own sequence's
    context: query token j of request i sits at position ``seq_lens[i] - q_len_i + j`` and sees
    positions ``<=`` its own (and, with a sliding window W, only the last W of them).
    """

    name: ClassVar[str]
    platform: ClassVar[str]
    priority: ClassVar[int] = 0
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None
    """None: any head size."""
    supported_block_sizes: ClassVar[tuple[int, ...] | None] = None
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)
    supports_sliding_window: ClassVar[bool] = False
    supports_logits_soft_cap: ClassVar[bool] = False
    supports_multi_query: ClassVar[bool] = True
    batch_invariant: ClassVar[bool] = False
    """(Contract 1.10.) True where the backend honours ``spec.deterministic`` (see :class:`AttentionSpec`)."""
    kv_cache_block_dim: ClassVar[int] = 1
    """Which dimension of ``kv_cache_shape`` indexes blocks (used by block copy)."""

    @classmethod
    def unsupported_reason(cls, spec: AttentionSpec) -> str | None:
        """None when this backend can run ``spec``; otherwise why not, in a few words."""
        if spec.dtype not in cls.supported_dtypes:
            return f"dtype {spec.dtype} not supported"
        if cls.supported_head_sizes is not None and spec.head_size not in cls.supported_head_sizes:
            return f"head size {spec.head_size} not in {cls.supported_head_sizes}"
        if cls.supported_block_sizes is not None and spec.block_size not in cls.supported_block_sizes:
            return f"block size {spec.block_size} not in {cls.supported_block_sizes}"
        if spec.kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            return f"kv cache dtype {spec.kv_cache_dtype} not supported"
        if spec.sliding_window is not None and not cls.supports_sliding_window:
            return "no sliding window"
        if spec.logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            return "no logits soft-capping"
        if spec.multi_query and not cls.supports_multi_query:
            return "only one query token per sequence"
        if spec.deterministic and not cls.batch_invariant:
            return "not batch-invariant (--deterministic)"
        return None

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor. Default: [2 (K, V), blocks, block_size, Hkv, D]."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """query [T, H, D], key/value [T, Hkv, D] -> output [T, H, D] (query's dtype)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Kernel:
    """One implementation of a named op for a platform; the highest priority wins.

    Op names and signatures are those of :mod:`runtime.platform.reference` (``OPS``);
    an op a platform does not register falls back to the reference implementation.
    """

    platform: str
    op: str
    fn: Callable[..., Any]
    priority: int = 0
    batch_invariant: bool = False
    """(Contract 1.10.) Each row of the result (a token, for ``linear``; a request, for sampling
    helpers) is bitwise the same whatever other rows are passed with it. Under ``--deterministic``
    only such kernels are chosen; the conformance suite checks the claim."""


class Communicator:
    """Collectives over one process group. Tensors are on the platform's device.

    ``all_reduce`` sums; ``all_gather``/``reduce_scatter`` concatenate/split along ``dim``.
    """

    platform: ClassVar[str]

    def __init__(self, group: Any = None):
        self.group = group

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def world_size(self) -> int:
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending ``tensor`` to rank ``dst`` without waiting for the receiver (contract
        1.4, used by pipeline parallelism); returns a handle whose ``wait()`` returns once the
        send is done. ``tensor`` must not change until then."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


@dataclass
class RawQuantizedTensor:
    """A weight as stored in a quantized checkpoint, before a method processes it.

    ``data`` holds the file's bytes for the tensor (numpy uint8 array, or a typed array for
    float types); ``shape`` is the logical (dequantized) torch shape, outermost first. A
    matrix's ``data`` has one row per weight row: quantization blocks run along a row.
    """

    format: str
    """Checkpoint format the method is registered for, e.g. ``"gguf"``."""
    qtype: str
    """Format-specific type name, e.g. ``"Q4_K"`` or ``"F16"``."""
    data: Any
    shape: tuple[int, ...]

    def rows(self, start: int, end: int) -> RawQuantizedTensor:
        """Rows [start, end) of a matrix, still quantized: a cut of ``data``'s rows (of a
        memory-mapped file, only those rows are read)."""
        return RawQuantizedTensor(self.format, self.qtype, self.data[start:end], (end - start, *self.shape[1:]))


class QuantizationMethod:
    """How one quantized checkpoint format is stored on a platform and multiplied.

    ``load`` turns a checkpoint tensor into whatever the method keeps (dense weights for
    dequantize-on-load; packed blocks and scales for a real kernel); ``apply`` computes
    ``x @ W.T (+ bias)`` from it; ``dequantize`` gives the dense weight, which the
    conformance suite compares ``apply`` against and which embeddings use.
    """

    name: ClassVar[str]
    platform: ClassVar[str]
    priority: ClassVar[int] = 0
    supported_qtypes: ClassVar[frozenset[str]] = frozenset()
    quantizes_dense: ClassVar[bool] = False
    """True when ``--quantization NAME`` may apply the method to a dense checkpoint's linear
    weights after loading (online quantization, e.g. fp8); :meth:`quantize` then does it."""
    quantize_lm_head: ClassVar[bool] = False
    """With ``quantizes_dense``: also quantize the output projection (tied embeddings included;
    the embedding lookup itself stays dense)."""
    batch_invariant: ClassVar[bool] = False
    """(Contract 1.10.) With :attr:`deterministic` set, ``apply`` computes each row of ``x`` bitwise
    the same whatever other rows come with it, for every form ``load``/``quantize`` keeps:
    ``--deterministic`` requires it."""
    deterministic: bool = False
    """(Contract 1.10.) Set on the instance by the engine under ``--deterministic``, before any
    ``load``: ``apply`` must then take batch-invariant paths only (a faster batch-dependent one may
    serve the default mode)."""

    def precision(self, qtype: str) -> torch.dtype | None:
        """How closely ``apply`` follows ``x @ dequantize(w).T`` for a checkpoint tensor of ``qtype``
        (contract 1.8): None, within the model dtype's rounding; ``torch.bfloat16``, products
        computed in bfloat16 (a packed kernel that dequantizes to bfloat16); ``torch.int8`` or an
        FP8 dtype, the weight requantized to that format per output channel. The conformance
        suite checks ``apply`` within the stated precision."""
        return None

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def load(self, raw: RawQuantizedTensor, dtype: torch.dtype, device: torch.device) -> Any:
        return self.dequantize(raw, dtype).to(device)

    def apply(self, weight: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def quantize(self, weight: torch.Tensor) -> Any:
        """What the method keeps for a dense ``[out, in]`` weight already on the device; ``apply``
        takes it. Only methods with ``quantizes_dense`` implement it."""
        raise NotImplementedError(f"quantization method {self.name} only loads {self.name} checkpoints")

    def quantize_experts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Contract 1.6.) A mixture-of-experts layer's stacked expert weights ``[E, out, in]``
        (already on the device) as the ``fused_moe`` op takes them quantized: float8 e4m3
        ``[E, out, in]`` and float32 scales ``[E, out]``, one per expert and output channel. None
        (the default): the method does not quantize experts, which stay dense."""
        return None
