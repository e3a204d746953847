"""Reader for GGUF files (llama.cpp's format): HF config from metadata, HF names, raw tensors.

Tensors leave this module still quantized (``RawQuantizedTensor``); the platform's ``gguf``
quantization method decides how to store and multiply them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from transformers import (AutoTokenizer, LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                          Qwen3MoeConfig)

from runtime.platform import RawQuantizedTensor

from .gguf_file import GgufFile
from .source import ModelSource, StoredSize, WeightStream, eos_token_ids

logger = logging.getLogger(__name__)

# llama.cpp writes Mistral and other Llama-shaped models as "llama" and runs them without a
# sliding window, so they become LlamaConfig here too; a "llama" with experts is Mixtral.
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                  "qwen2moe": Qwen2MoeConfig, "qwen3moe": Qwen3MoeConfig}
# llama.cpp normalises the top-k routing weights of these (its ``expert_weights_norm`` default
# where the file does not say): Mixtral and Qwen3-MoE, not Qwen2-MoE.
_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # Mixture-of-experts blocks, named as Qwen-MoE's (Mixtral's too: the model uses one naming).
    # The experts' projections are stacked, [experts, out, in], as HF stores no tensor.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Every Llama 3.x release uses these; rope_freqs is checked against them before they are trusted.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name, or None when it has no HF counterpart."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    return None


def unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, which interleaves each head's two rotary halves.

    Works on any array whose first axis is the weight's output rows (quantized bytes included:
    quant blocks run along a row, so moving whole rows never splits a block).
    """
    head_rows = data.shape[0] // n_head // 2
    return data.reshape(n_head, head_rows, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _meta(reader: GgufFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def _rope_parameters(reader: GgufFile, arch: str, head_dim: int, theta: float) -> dict:
    """HF ``rope_parameters`` from the rope metadata (and a Llama 3 ``rope_freqs`` tensor)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    kind = _meta(reader, f"{arch}.rope.scaling.type", "none")
    factor = _meta(reader, f"{arch}.rope.scaling.factor", _meta(reader, f"{arch}.rope.scale_linear"))
    if kind == "none" and factor not in (None, 1.0):
        kind = "linear"  # old files state only the deprecated rope.scale_linear
    if kind in ("linear", "yarn"):
        params.update(rope_type=kind, factor=float(factor))
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        if kind == "yarn":
            for gguf_key, hf_key in (("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                     ("yarn_beta_slow", "beta_slow")):
                value = _meta(reader, f"{arch}.rope.scaling.{gguf_key}")
                if value is not None:
                    params[hf_key] = float(value)
    elif kind != "none":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported; supported: linear, yarn")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        params = _llama3_rope(np.asarray(freqs.data, dtype=np.float64), head_dim, theta)
    return params


def _llama3_rope(divisors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recognise llama.cpp's per-frequency divisors as HF's ``llama3`` rope, or refuse the file.

    llama.cpp divides each rotary frequency by ``divisors[i]``; HF describes the same curve by
    four numbers, which the converter does not store, so the standard ones are checked instead.
    """
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": float(divisors.max()), **_LLAMA3_ROPE}
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (params["original_max_position_embeddings"] / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"])
    expected = 1 / ((1 - np.clip(smooth, 0, 1)) / params["factor"] + np.clip(smooth, 0, 1))
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-4):
        raise ValueError("GGUF rope_freqs tensor does not match Llama 3 rope scaling; per-frequency rope factors "
                         "are not supported otherwise (use the safetensors checkpoint)")
    return params


def build_config(reader: GgufFile) -> transformers.PretrainedConfig:
    """The HF config of a GGUF file, from its metadata and which tensors it holds."""
    arch = _meta(reader, "general.architecture")
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(CONFIG_CLASSES)}")
    names = {t.name for t in reader.tensors}
    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    heads = int(_meta(reader, f"{arch}.attention.head_count"))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length",
                         _meta(reader, f"{arch}.rope.dimension_count", hidden // heads)))
    theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab = _meta(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"])
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_meta(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_meta(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=_rope_parameters(reader, arch, head_dim, theta),
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"),
    )
    if arch == "llama":
        kwargs.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names)
    experts = int(_meta(reader, f"{arch}.expert_count", 0) or 0)
    if experts:
        return _moe_config(reader, arch, names, kwargs, experts)
    return CONFIG_CLASSES[arch](**kwargs)


def _moe_config(reader: GgufFile, arch: str, names: set[str], kwargs: dict, experts: int) -> transformers.PretrainedConfig:
    """Mixtral (a "llama" with experts), Qwen2-MoE or Qwen3-MoE: the experts from the metadata, the
    layers without a router (``ffn_gate_inp``) as ``mlp_only_layers``."""
    routed = dict(num_experts_per_tok=int(_meta(reader, f"{arch}.expert_used_count")))
    if arch == "llama":
        kwargs.pop("mlp_bias")
        return MixtralConfig(**kwargs, **routed, num_local_experts=experts)
    if arch not in _NORM_TOPK:
        raise ValueError(f"GGUF architecture {arch!r} with experts is not supported; supported: llama (Mixtral), "
                         f"qwen2moe, qwen3moe")
    dense = [i for i in range(kwargs["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    routed.update(num_experts=experts, mlp_only_layers=dense,
                  moe_intermediate_size=int(_meta(reader, f"{arch}.expert_feed_forward_length")),
                  norm_topk_prob=bool(_meta(reader, f"{arch}.expert_weights_norm", _NORM_TOPK[arch])))
    if arch == "qwen2moe":
        routed["shared_expert_intermediate_size"] = int(_meta(reader, f"{arch}.expert_shared_feed_forward_length", 0))
    return CONFIG_CLASSES[arch](**kwargs, **routed)


def tokenizer_cache_root() -> Path:
    """Where converted GGUF tokenizers are kept: ``$XDG_CACHE_HOME/runtime/tokenizers``
    (``~/.cache/runtime/tokenizers`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "runtime" / "tokenizers"


def load_tokenizer(path: Path) -> Any:
    """The HF fast tokenizer of a GGUF file, converted once (~9 s) and then read from the cache.

    The cache key covers the file's path, size and mtime and the transformers version, so a
    replaced file or a new converter converts again.
    """
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    cached = tokenizer_cache_root() / hashlib.sha256(key.encode()).hexdigest()[:32]
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    # Write beside the final name and rename, so a concurrent reader never sees half a tokenizer.
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        tokenizer.save_pretrained(partial)
        partial.rename(cached)
    except OSError as exc:  # read-only home, or another process won the race: both harmless
        logger.debug("tokenizer cache not written at %s: %s", cached, exc)
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


def read_weights(reader: GgufFile, config: transformers.PretrainedConfig) -> WeightStream:
    """Every tensor under its HF name as a ``RawQuantizedTensor`` in HF row order."""
    # Only llama.cpp's Llama converter permutes q/k; Qwen models keep HF's rotary layout.
    permuted_heads = {}
    if config.model_type in ("llama", "mixtral"):
        permuted_heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue  # rope_freqs: already folded into config.rope_parameters
        data = tensor.data
        for module, n_head in permuted_heads.items():
            if f".{module}." in name:
                data = unpermute_rows(data, n_head)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if name.endswith("shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, *shape)  # llama.cpp stores Qwen2-MoE's [1, hidden] gate as a vector
            data = data.reshape(shape)
        yield name, RawQuantizedTensor(format="gguf", qtype=tensor.tensor_type.name, data=data, shape=shape)


_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def open_gguf(path: Path) -> ModelSource:
    """Open a GGUF file: metadata now, tensors (memory-mapped) when the weights are iterated."""
    try:
        reader = GgufFile(path)
    except Exception as exc:  # garbage fails anywhere inside the parser; the user needs one line
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None
    config = build_config(reader)
    unknown = [t.name for t in reader.tensors if hf_name(t.name) is None and t.name != "rope_freqs.weight"]
    if unknown:
        raise ValueError(f"GGUF tensors with no Hugging Face counterpart: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    tokenizer = load_tokenizer(path)
    quantized = frozenset(t.tensor_type.name for t in reader.tensors) - _FLOAT_TYPES
    extra_eos = [_meta(reader, "tokenizer.ggml.eot_token_id"), _meta(reader, "tokenizer.ggml.eom_token_id")]
    return ModelSource(
        hf_config=config,
        tokenizer=tokenizer,
        format="gguf",
        path=path,
        chat_template=_meta(reader, "tokenizer.chat_template", getattr(tokenizer, "chat_template", None)),
        generation_eos_token_ids=eos_token_ids(config, tokenizer, *extra_eos),
        read_weights=lambda: read_weights(reader, config),
        stored_sizes=lambda: (StoredSize(hf_name(t.name) or t.name, int(np.prod(t.shape)), t.data.nbytes, t.tensor_type.name in _FLOAT_TYPES)
                              for t in reader.tensors),
        quantized_types=quantized,
        quantization="gguf" if quantized else None,
    )
