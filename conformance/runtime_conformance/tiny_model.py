"""A tiny random Llama checkpoint in HF layout, written on the fly: the suite needs no model hub."""

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


def write_tiny_llama(path: Path, head_size: int, seed: int = 0) -> Path:
    """Two layers, 4 query and 2 KV heads of ``head_size``; float32 weights in model.safetensors."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_size, max_position_embeddings=256, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, tie_word_embeddings=False,
        # At HF's default 0.02 a tiny random model's logits are near-uniform; at 0.2 greedy output varies.
        initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path
