"""Tiny random checkpoints in HF layout (a Llama and models with the features platforms declare),
written on the fly: the suite needs no model hub."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB_SIZE = 256
BOS_ID, EOS_ID = 1, 2


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over made-up words: the checks feed token ids, it only has to load."""
    vocab = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID, **{f"w{i}": i for i in range(3, VOCAB_SIZE)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


FEATURE_MODELS: dict[str, tuple[type, dict, str]] = {
    # Gemma-2's sliding window (8 tokens, shorter than a whole prompt's prefill and longer than a
    # 4-token chunk) on alternate layers, attention soft-capping at 2 and final soft-capping at 5
    # (both bite: the random model's raw scores reach several units) and a GELU MLP.
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                                               hidden_activation="gelu_pytorch_tanh"),
               "sliding window, soft-capping, GELU"),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True), "q/k/v biases, tied embeddings"),
    "qwen3": (transformers.Qwen3Config, {}, "q/k norms"),
}
"""The architectures whose features the end-to-end checks cover beside the plain Llama: config
class, feature settings, and what they exercise."""


def write_tiny_model(path: Path, head_size: int, arch: str = "llama", seed: int = 0) -> Path:
    """Two layers, 4 query and 2 KV heads of ``head_size``; float32 weights in model.safetensors.
    ``arch`` is ``llama`` or one of :data:`FEATURE_MODELS`."""
    config_cls, features = (transformers.LlamaConfig, {}) if arch == "llama" else FEATURE_MODELS[arch][:2]
    fields = dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_size, max_position_embeddings=256, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, tie_word_embeddings=False,
        # At HF's default 0.02 a tiny random model's logits are near-uniform; at 0.2 greedy output varies.
        initializer_range=0.2)
    if arch == "gemma2":
        fields["query_pre_attn_scalar"] = head_size
    config = config_cls(**{**fields, **features})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":
        with torch.no_grad():  # HF initialises biases to zero: make them count
            for name, param in model.named_parameters():
                if name.endswith("_proj.bias"):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path
