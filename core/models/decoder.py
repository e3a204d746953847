"""One decoder-only transformer, written once; each architecture is a set of switches on it.

``DecoderSettings`` says how an architecture differs (biases, q/k norm, Gemma's embedding
scale and sandwich norms, soft-capping, sliding windows). Parameter names are HF's, so a
checkpoint loads by name; separately stored q/k/v and gate/up load into fused projections.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..loader.stored import StoredTensor, materialize
from ..platform import AttentionBackend, AttentionSpec, KernelSet, QuantizationMethod, RawQuantizedTensor
from ..platform.packed import Fp8Data, GroupQuantData
from .batch import ForwardBatch
from .layers.attention import SelfAttention
from .layers.linear import Linear
from .layers.mlp import GatedMLP
from .layers.moe import FusedExperts, MoESettings, SparseMoeBlock
from .layers.norm import RMSNorm
from .layers.rotary import RotaryEmbedding
from .parallel import PipelineParallel, TensorParallel

logger = logging.getLogger(__name__)


@dataclass
class DecoderSettings:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    activation: str
    tie_word_embeddings: bool
    attn_scale: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    embedding_scale: float | None = None
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    attn_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    sliding_windows: list[int | None] = field(default_factory=list)
    """Per layer: the window, or None for full attention."""
    moe: MoESettings | None = None
    """Mixture-of-experts models: the experts, and which layers have them in place of the MLP."""
    mrope_section: tuple[int, ...] | None = None
    """Qwen2-VL: rotary frequencies per position axis (time, height, width); None: plain rotary."""

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` has an MoE block in place of the dense MLP."""
        return self.moe is not None and self.moe.sparse_layers[layer]

    def num_parameters(self) -> int:
        """Parameter count, known before any weight is read (to check the model fits)."""
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attention = (self.hidden_size * qkv + self.num_heads * self.head_dim * self.hidden_size
                     + (4 if self.sandwich_norms else 2) * self.hidden_size
                     + (2 * self.head_dim if self.qk_norm else 0)
                     + (qkv if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0))
        mlp = (3 * self.hidden_size * self.intermediate_size
               + (2 * self.intermediate_size + self.hidden_size if self.mlp_bias else 0))
        sparse = sum(self.is_sparse(i) for i in range(self.num_layers))
        moe = sparse * self.moe.num_parameters(self.hidden_size) if sparse else 0
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attention + (self.num_layers - sparse) * mlp + moe + embeddings + self.hidden_size

    def attention_specs(self, dtype: torch.dtype, block_size: int, kv_cache_dtype: str = "auto",
                        tp: TensorParallel = TensorParallel(),
                        pp: PipelineParallel = PipelineParallel()) -> list[AttentionSpec]:
        """Per layer of ``pp``'s stage, what attention must support on one rank of ``tp`` (its
        share of the heads)."""
        heads = self.num_heads // tp.size
        kv_first, kv_end = tp.kv_heads(self.num_kv_heads)
        return [AttentionSpec(heads, kv_end - kv_first, self.head_dim, self.attn_scale, dtype, block_size,
                              sliding_window=self.sliding_windows[i], logits_soft_cap=self.attn_soft_cap,
                              kv_cache_dtype=kv_cache_dtype)
                for i in pp.layers(self.num_layers)]


def sliding_windows(config: Any, num_layers: int) -> list[int | None]:
    """Per-layer windows from ``layer_types`` (newer configs) or a model-wide ``sliding_window``."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]
    if window and getattr(config, "use_sliding_window", True) is not False:
        return [window] * num_layers
    return [None] * num_layers


class DecoderLayer(nn.Module):
    def __init__(self, index: int, cache_index: int, s: DecoderSettings, backend: AttentionBackend,
                 rotary: RotaryEmbedding, ops: KernelSet, tp: TensorParallel, expert_parallel: bool = False):
        super().__init__()
        self.self_attn = SelfAttention(cache_index, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, backend, rotary, ops,
                                       qkv_bias=s.qkv_bias, o_bias=s.o_bias, qk_norm_eps=s.rms_norm_eps if s.qk_norm else None,
                                       tp=tp)
        if s.is_sparse(index):
            self.mlp = SparseMoeBlock(s.moe, s.hidden_size, s.activation, ops, tp, expert_parallel)
        else:
            self.mlp = GatedMLP(s.hidden_size, s.intermediate_size, s.activation, ops, bias=s.mlp_bias, tp=tp)
        norm = lambda: RMSNorm(s.hidden_size, s.rms_norm_eps, ops, unit_offset=s.norm_unit_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = s.sandwich_norms
        if s.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch)
        if self.sandwich:
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


# Checkpoints that store projections apart: projection -> (fused projection, partition index).
FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PART_RE = re.compile(r"^(layers\.\d+\.(?:self_attn|mlp|mlp\.shared_expert))\.([qkv]_proj|gate_proj|up_proj)\.(weight|bias)$")
# An MoE block's routed experts: one expert's projection (HF), or every expert's stacked (GGUF).
_EXPERT_RE = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(?:(\d+)\.)?(gate_proj|up_proj|down_proj)\.weight$")
# Mixtral's names for its MoE block and its experts' projections -> the Qwen-MoE names used here.
_MIXTRAL_NAMES = [(re.compile(r"\.block_sparse_moe\."), ".mlp."),
                  (re.compile(r"(\.experts\.\d+)\.w1\."), r"\1.gate_proj."),
                  (re.compile(r"(\.experts\.\d+)\.w2\."), r"\1.down_proj."),
                  (re.compile(r"(\.experts\.\d+)\.w3\."), r"\1.up_proj.")]


class DecoderForCausalLM(nn.Module):
    """forward(batch) -> hidden [T, hidden]; compute_logits(hidden rows) -> [N, vocab] float32.

    With ``tp`` of size > 1 this is one rank's share (models/parallel.py): the embedding table and
    lm_head hold a slice of the vocabulary (padded to a multiple of the size), and every
    projection its slice of heads or width; ``compute_logits`` gathers the full vocabulary.

    With ``pp`` of size > 1 this is one pipeline stage: it holds only its layers (the others are
    ``StageGap`` placeholders, so parameter names stay the checkpoint's). ``forward`` of a stage
    other than the first takes the previous stage's output; a stage other than the last returns
    the hidden state and the residual stacked ([2, T, hidden]) for the next.
    """

    def __init__(self, settings: DecoderSettings, config: Any, max_model_len: int, ops: KernelSet,
                 backends: list[AttentionBackend], tp: TensorParallel = TensorParallel(),
                 pp: PipelineParallel = PipelineParallel(), expert_parallel: bool = False, lm_head: bool = True):
        """``lm_head=False``: no output projection (an embedding model's runner never computes
        logits; a checkpoint's lm_head, or its absence in a base-model checkpoint, is ignored)."""
        super().__init__()
        s = self.settings = settings
        self.ops, self.tp, self.pp = ops, tp, pp
        self.stage_layers = pp.layers(s.num_layers)
        self.vocab_first, _, share = tp.padded_split(s.vocab_size)
        self.vocab_rows = [(self.vocab_first, self.vocab_first + share)] if tp.size > 1 else None
        needs_table = pp.is_first or (pp.is_last and s.tie_word_embeddings)
        self.embed_tokens = nn.Parameter(torch.empty(share if needs_table else 0, s.hidden_size), requires_grad=False)
        rotary = RotaryEmbedding(s.head_dim, config, max_model_len, ops, mrope_section=s.mrope_section)
        first = self.stage_layers.start
        self.layers = nn.ModuleList(
            DecoderLayer(i, i - first, s, backends[i - first], rotary, ops, tp, expert_parallel)
            if i in self.stage_layers else StageGap()
            for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps, ops, unit_offset=s.norm_unit_offset) if pp.is_last else None
        self.lm_head = (Linear(s.hidden_size, share, ops, rows=self.vocab_rows)
                        if pp.is_last and not s.tie_word_embeddings and lm_head else None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its slice of the vocabulary; the others contribute zeros.
        local = input_ids - self.vocab_first
        mine = (local >= 0) & (local < self.embed_tokens.shape[0])
        hidden = F.embedding(torch.where(mine, local, 0), self.embed_tokens)
        return self.tp.all_reduce(hidden * mine.unsqueeze(-1).to(hidden.dtype))

    def forward(self, batch: ForwardBatch, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        if self.pp.is_first:
            hidden, residual = self.embed(batch.input_ids), None
            if batch.mm_embeds is not None:
                index, rows = batch.mm_embeds
                hidden = hidden.index_copy(0, index, rows.to(hidden.dtype))
            if self.settings.embedding_scale is not None:
                hidden = hidden * torch.tensor(self.settings.embedding_scale, dtype=hidden.dtype)
        else:
            hidden, residual = intermediate[0], intermediate[1]
        for i in self.stage_layers:
            hidden, residual = self.layers[i](hidden, residual, batch)
        if not self.pp.is_last:
            return torch.stack((hidden, residual))
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.embed_tokens) if self.lm_head is None else self.lm_head(hidden)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)[:, :self.settings.vocab_size]
        logits = logits.float()
        cap = self.settings.final_logit_soft_cap
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | StoredTensor | RawQuantizedTensor]],
                     quant_method: Callable[[str], QuantizationMethod], keep_packed: bool = True) -> None:
        """Fill parameters from (HF name, value) pairs; raises if any parameter stays unloaded.

        ``quant_method(format)`` gives the platform's method for a quantized checkpoint tensor.
        With ``keep_packed`` a quantized linear weight goes to that method's ``load`` (packed, if
        the method keeps it so), fused partitions and tensor-parallel slices cut from the packed
        data; without, every quantized tensor is dequantized (``--quantization none``, or a method
        that quantizes the dense weights afterwards). Embedding tables are always dequantized; a
        tied output projection then gets the method's packed copy of the table.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        dtype = self.embed_tokens.dtype
        for hf_name, value in weights:
            name = _module_name(hf_name)
            if name is None or not self._holds(name):
                continue
            expert = _EXPERT_RE.match(name)
            if expert:
                prefix, number, projection = expert.groups()
                experts: FusedExperts = modules[prefix]
                if number is None or experts.holds(int(number)):
                    # GGUF stacks every expert in one (quantized) tensor: dequantized whole here.
                    view = _dense(value, quant_method, dtype) if number is None else _dense_view(value, quant_method, dtype)
                    experts.load(projection, view, None if number is None else int(number))
                continue
            packed = keep_packed and isinstance(value, RawQuantizedTensor) and hf_name.endswith(".weight")
            part = _PART_RE.match(name)
            if part:
                prefix, piece, kind = part.groups()
                fused, index = FUSED_PARTS[piece]
                linear = modules[f"{prefix}.{fused}"]
                if not (packed and linear.load_packed(index, value, quant_method(value.format))):
                    linear.load_partition(kind, index, _dense_view(value, quant_method, dtype))
                loaded.add(f"{prefix}.{fused}.{kind}#{index}")
                continue
            if name == "embed_tokens" and self.embed_tokens.numel() > 0:
                self._load_vocab_rows(_dense_view(value, quant_method, dtype))
                if packed and self.lm_head is None and self.pp.is_last and self.settings.tie_word_embeddings:
                    if self._tie_packed_head(value, quant_method(value.format)):
                        loaded.add("lm_head.weight")
                loaded.add(name)
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} matches no parameter of {type(self).__name__}")
            module = modules.get(name.rsplit(".", 1)[0])
            if isinstance(module, Linear) and packed and module.load_packed(None, value, quant_method(value.format)):
                loaded.add(name)
                continue
            if isinstance(module, Linear) and module.sharded:
                # A rank reads only its slice of the checkpoint's tensor (of a quantized one it
                # dequantizes only its rows); the platform's --quantization applies to the slice afterwards.
                module.load_whole(name.rsplit(".", 1)[1], _dense_view(value, quant_method, dtype))
            else:
                tensor = _dense(value, quant_method, dtype)
                param = module.dense_weight() if isinstance(module, Linear) and name.endswith(".weight") else params[name]
                if tensor.shape != param.shape:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(name)
        self._check_all_loaded(loaded)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.finish_loading()

    def _tie_packed_head(self, table: RawQuantizedTensor, method: QuantizationMethod) -> bool:
        """A quantized embedding table tied to the output: the lookup keeps the dense rows, the
        output projection multiplies the packed table (as llama.cpp does), unless the method
        keeps it dense anyway or the rank's vocabulary slice is padded. Whether it did."""
        head = Linear(self.settings.hidden_size, self.embed_tokens.shape[0], self.ops, rows=self.vocab_rows)
        head = head.to(self.embed_tokens.device, self.embed_tokens.dtype)
        if head.load_packed(None, table, method) and head.quant_method is not None:
            self.lm_head = head
            return True
        return False

    def _holds(self, name: str) -> bool:
        """Whether this model (this pipeline stage) has a parameter for checkpoint tensor ``name``;
        a tied checkpoint's lm_head copy is never used."""
        if name.startswith("layers."):
            return int(name.split(".", 2)[1]) in self.stage_layers
        if name == "embed_tokens":
            return self.embed_tokens.numel() > 0
        if name.startswith("lm_head."):
            return self.lm_head is not None
        if name.startswith("norm."):
            return self.norm is not None
        return True

    def _load_vocab_rows(self, table: Any) -> None:
        """The embedding table's rows of this rank's vocabulary slice, the only ones read from
        ``table`` (indexed like a tensor); the padding rows stay zero."""
        expected = (self.settings.vocab_size, self.embed_tokens.shape[1])
        if tuple(table.shape) != expected:
            raise ValueError(f"checkpoint embedding has shape {tuple(table.shape)}, model expects {expected}")
        rows = table[self.vocab_first:min(self.vocab_first + self.embed_tokens.shape[0], self.settings.vocab_size)]
        self.embed_tokens.data.zero_()
        self.embed_tokens.data[:rows.shape[0]] = rows.to(self.embed_tokens.dtype)

    def quantize_weights(self, method: QuantizationMethod) -> None:
        """Hand every dense linear weight to ``method.quantize`` (``--quantization``), layer by layer
        so the dense copy of one weight is freed before the next is quantized; MoE experts to
        ``method.quantize_experts`` (routers stay dense, as their few outputs pick the experts)."""
        blocks = [m for m in self.modules() if isinstance(m, SparseMoeBlock)]
        routers = {id(router) for block in blocks for router in block.routers()}
        kept_dense = sum(not block.experts.quantize(method) for block in blocks)
        if kept_dense:
            logger.warning("quantization %s does not quantize mixture-of-experts weights: the experts of %d layers "
                           "stay in the model's dtype", method.name, kept_dense)
        targets = [m for m in self.modules() if isinstance(m, Linear) and m.quant_method is None and id(m) not in routers]
        if method.quantize_lm_head and self.lm_head is None and self.pp.is_last:
            # Tied embeddings: the lookup keeps the dense table, the output projection gets its own copy.
            self.lm_head = Linear(self.settings.hidden_size, self.embed_tokens.shape[0], self.ops).to(self.embed_tokens.device)
            self.lm_head.weight.data = self.embed_tokens.data
            targets.append(self.lm_head)
        elif not method.quantize_lm_head and self.lm_head is not None:
            targets.remove(self.lm_head)
        for linear in targets:
            linear.quant_weight = method.quantize(linear.weight.data)
            linear.quant_method = method
            linear.weight.data = torch.empty(0, device=linear.weight.device, dtype=linear.weight.dtype)

    def _check_all_loaded(self, loaded: set[str]) -> None:
        missing = []
        for mod_name, module in self.named_modules():
            if isinstance(module, Linear) and len(module.partitions) > 1:
                for kind in ("weight", "bias") if module.bias is not None else ("weight",):
                    whole = f"{mod_name}.{kind}" in loaded
                    parts = all(f"{mod_name}.{kind}#{i}" in loaded for i in range(len(module.partitions)))
                    if not (whole or parts):
                        missing.append(f"{mod_name}.{kind}")
            if isinstance(module, FusedExperts):
                missing.extend(f"{mod_name.removesuffix('.experts')}.{m}" for m in module.missing())
        fused = {n for n, m in self.named_modules()
                 if (isinstance(m, Linear) and len(m.partitions) > 1) or isinstance(m, FusedExperts)}
        for name, _ in self.named_parameters():
            if name.rsplit(".", 1)[0] not in fused and name not in loaded and self._holds(name):
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing weights: {shown}")


class StageGap(nn.Module):
    """A layer another pipeline stage holds."""

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("a pipeline stage ran a layer another stage holds")


def _module_name(hf_name: str) -> str | None:
    """HF parameter name -> this module's name (None for tensors the runtime does not use)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    name = hf_name.removeprefix("model.")
    if ".block_sparse_moe." in name:
        for pattern, replacement in _MIXTRAL_NAMES:
            name = pattern.sub(replacement, name)
    return "embed_tokens" if name == "embed_tokens.weight" else name


def _dequantize(raw: RawQuantizedTensor, quant_method: Callable[[str], QuantizationMethod],
                dtype: torch.dtype) -> torch.Tensor:
    """A quantized checkpoint tensor as a dense one: hub formats' unpacked data by its own
    definition (any platform can run them dequantized), GGUF's by the platform's method."""
    if isinstance(raw.data, (GroupQuantData, Fp8Data)):
        return raw.data.dequantize(dtype)
    return quant_method(raw.format).dequantize(raw, dtype)


def _dense(value: torch.Tensor | StoredTensor | RawQuantizedTensor,
           quant_method: Callable[[str], QuantizationMethod], dtype: torch.dtype) -> torch.Tensor:
    """The whole checkpoint tensor in memory, dequantized, in ``dtype``."""
    if isinstance(value, RawQuantizedTensor):
        return _dequantize(value, quant_method, dtype)
    return materialize(value).to(dtype)


def _dense_view(value: torch.Tensor | StoredTensor | RawQuantizedTensor,
                quant_method: Callable[[str], QuantizationMethod], dtype: torch.dtype) -> Any:
    """``value`` indexed like its dense tensor, reading (and dequantizing) only what is indexed."""
    if isinstance(value, RawQuantizedTensor):
        return _DequantizedRows(value, quant_method, dtype)
    return value


class _DequantizedRows:
    """A quantized checkpoint matrix indexed like its dense weight, in ``dtype``: the indexed rows
    are cut from the stored blocks (``RawQuantizedTensor.rows``) and only they are dequantized."""

    def __init__(self, raw: RawQuantizedTensor, quant_method: Callable[[str], QuantizationMethod], dtype: torch.dtype):
        self.raw, self.quant_method, self.dtype = raw, quant_method, dtype
        self.shape = torch.Size(raw.shape)

    def __getitem__(self, index: slice | tuple[slice, slice]) -> torch.Tensor:
        rows, *columns = index if isinstance(index, tuple) else (index,)
        if len(self.shape) < 2:  # a vector (bias) is one run of blocks: small, dequantized whole
            return _dequantize(self.raw, self.quant_method, self.dtype)[rows]
        dense = _dequantize(self.raw.rows(rows.start, rows.stop), self.quant_method, self.dtype)
        # Columns (row-parallel weights) are cut after dequantizing whole rows: a column range is
        # a run of bytes inside every row (a few KiB, a page or two), so cutting the bytes would
        # save little reading, and the range's ends need not fall on block boundaries (256 values
        # for k-quants), where the bytes could be cut.
        return dense[:, columns[0]] if columns else dense
