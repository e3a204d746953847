"""Tiny random-weight HF checkpoints for every architecture the runtime serves.

``make_tiny_checkpoint(tmp_dir, "qwen2")`` writes a directory that looks like a hub download
(config.json, generation_config.json, model.safetensors, tokenizer files with a chat template),
so tests load it through the same loader users hit and compare against HF transformers.
``make_tiny_gguf`` writes a tiny Llama as llama.cpp's converter would (weights and metadata only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Special tokens come first so their ids are stable: <unk>=0, <s>=1, </s>=2, <pad>=3, ...
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Large language models predict the next token from the previous ones.",
    "Once upon a time there was a small robot who loved to count: 1, 2, 3, 4, 5.",
    "def add(a, b):\n    return a + b  # numbers, strings and lists all work",
    "Hello! How are you today? I am fine, thank you very much.",
]

# Distinctive features stay at each architecture's own defaults (Gemma-2 soft-capping, Qwen-2
# q/k/v biases, Phi-3 fused projections); pass overrides such as sliding_window=16 to exercise more.
# Gemma ties its embeddings in real checkpoints, but a random tied Gemma scales the embedding by
# sqrt(hidden) and just repeats its input token; untied, its greedy output varies. Qwen-2 keeps
# the tie so tied heads are covered.
_ARCHS: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, {}),
    "gemma": (transformers.GemmaConfig, {"tie_word_embeddings": False}),
    "gemma2": (transformers.Gemma2Config, {"query_pre_attn_scalar": 16, "tie_word_embeddings": False}),
    "phi3": (transformers.Phi3Config, {"original_max_position_embeddings": 512}),
}
ARCHITECTURES = tuple(_ARCHS)
# Mixture-of-experts models, kept apart so the dense tests do not grow. Each routes to several of
# 8 experts; Qwen2-MoE adds its shared expert, Qwen3-MoE keeps its middle layer dense
# (mlp_only_layers) and renormalises the top-k weights (norm_topk_prob), Qwen2-MoE does not.
_MOE_ARCHS: dict[str, tuple[type, dict]] = {
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {"num_experts": 8, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                                                "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                                                "norm_topk_prob": True, "num_hidden_layers": 3, "mlp_only_layers": [1]}),
}
MOE_ARCHITECTURES = tuple(_MOE_ARCHS)
_ARCHS.update(_MOE_ARCHS)


def make_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~300 tokens) trained offline, with bos/eos/pad and a chat template.

    Byte-level so any text encodes and decodes losslessly, as real tokenizers do.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_config(arch: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    """The small config of ``arch`` (see :data:`ARCHITECTURES`), with ``overrides`` applied last."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(_ARCHS)}")
    config_cls, arch_defaults = _ARCHS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        # HF's 0.02 leaves a 64-wide random model with near-uniform logits or a repeated token;
        # at 0.2 greedy output varies and the top-2 logit gap is typically ~0.3.
        initializer_range=0.2,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if arch == "phi3":
        del kwargs["head_dim"]  # Phi-3 derives it from hidden_size / num_attention_heads
    kwargs.update(arch_defaults)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_tiny_checkpoint(tmp_dir: str | Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Write a random ``arch`` checkpoint in HF layout under ``tmp_dir/arch`` and return that path.

    ``overrides`` are config fields (``num_hidden_layers=3``, ``sliding_window=16``, ...).
    generation_config.json lists both ``</s>`` and ``<|im_end|>`` as end-of-generation tokens,
    as chat models do. The same ``seed`` and overrides give the same weights.
    """
    tokenizer = make_tiny_tokenizer()
    config = make_tiny_config(arch, overrides.pop("vocab_size", len(tokenizer)), **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [EOS_ID, IM_END_ID]
    path = Path(tmp_dir) / arch
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for k)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def make_tiny_gguf(tmp_dir: str | Path, vocab_size: int = 96, seed: int = 0, **overrides) -> Path:
    """Write a random untied tiny Llama as a GGUF file under ``tmp_dir`` and return its path.

    As llama.cpp writes it: GGUF tensor names, q/k rows in llama.cpp's rotary order, matrices
    quantized to Q8_0 (vectors F32), and the metadata ``runtime.loader.gguf.build_config`` reads.
    There is no tokenizer, so read it with ``GgufFile`` and ``build_config``, not ``open_model``.
    """
    config = make_tiny_config("llama", vocab_size, tie_word_embeddings=False, **overrides)
    torch.manual_seed(seed)
    state = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    path = Path(tmp_dir) / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_gguf_shape(writer, config, vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    permuted_heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in state.items():
        base, suffix = name.rsplit(".", 1)
        values, module = tensor.numpy(), base.rsplit(".", 1)[-1]
        if module in permuted_heads:
            values = llama_cpp_permute(values, permuted_heads[module])
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if values.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path



def _write_gguf_shape(writer: gguf.GGUFWriter, config: Any, vocab_size: int) -> None:
    """The metadata every tiny GGUF file carries: vocabulary, widths, layers and heads."""
    writer.add_vocab_size(vocab_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)

# llama.cpp's architecture for each tiny MoE model ("llama" with experts is Mixtral).
GGUF_MOE_ARCHS = {"mixtral": gguf.MODEL_ARCH.LLAMA, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
                  "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}


def make_tiny_moe_gguf(tmp_dir: str | Path, arch: str, vocab_size: int = 96, seed: int = 0) -> tuple[Path, Any, dict]:
    """Write a random tiny MoE model as llama.cpp's converter lays it out and return (path, its HF
    config, the HF state dict of what the file holds).

    Each layer's experts are stacked per projection into one 3-D tensor (``blk.N.ffn_gate_exps``
    etc., ``[experts, out, in]``) quantized to Q8_0; everything else stays F32, Mixtral's q/k rows
    in llama.cpp's rotary order. The returned state dict has the experts as the file's Q8_0 values
    dequantize to (by the ``gguf`` package), for an HF model to load as the reference.
    """
    # llama.cpp's Qwen3-MoE has no dense layers (its tensor map names no ffn_gate for them).
    dense = {"mlp_only_layers": []} if arch == "qwen3_moe" else {}
    config = make_tiny_config(arch, vocab_size, tie_word_embeddings=False, **dense)
    torch.manual_seed(seed)
    state = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    gguf_arch = GGUF_MOE_ARCHS[arch]
    name = gguf.MODEL_ARCH_NAMES[gguf_arch]
    path = Path(tmp_dir) / f"tiny-{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), name)
    _write_gguf_shape(writer, config, vocab_size)
    writer.add_key_length(config.head_dim)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch != "mixtral":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(config.norm_topk_prob)
    if arch == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def add_stack(base: str, values: np.ndarray) -> np.ndarray:
        """Write one projection of every expert as a Q8_0 stack; return what the file holds."""
        stacked = gguf.quants.quantize(values, q8)
        writer.add_tensor(f"{names.get_name(base)}.weight", stacked, raw_dtype=q8)
        return gguf.quants.dequantize(stacked, q8)

    for hf, tensor in list(state.items()):
        values = tensor.numpy()
        if hf.endswith(".mlp.experts.gate_up_proj"):  # transformers keeps [experts, gate rows + up rows, in]
            layer = hf.removesuffix(".gate_up_proj")
            gate, up = np.split(values, 2, axis=1)
            state[hf] = torch.from_numpy(np.concatenate([add_stack(f"{layer}.gate_proj", gate),
                                                         add_stack(f"{layer}.up_proj", up)], axis=1))
            continue
        if hf.endswith(".mlp.experts.down_proj"):
            state[hf] = torch.from_numpy(add_stack(hf, values))
            continue
        base, suffix = hf.rsplit(".", 1)
        if base.endswith("shared_expert_gate"):
            values = values[0]  # a vector in llama.cpp's files
        if arch == "mixtral" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            values = llama_cpp_permute(values, heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, config, state
