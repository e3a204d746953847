"""The Llama family: Llama 2/3/3.1, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

from typing import Any

from .decoder import DecoderSettings, sliding_windows


def common_settings(config: Any, **overrides: Any) -> DecoderSettings:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    values = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        activation=getattr(config, "hidden_act", "silu"),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attn_scale=head_dim ** -0.5,
        sliding_windows=sliding_windows(config, layers),
    )
    values.update(overrides)
    return DecoderSettings(**values)


def llama(config: Any) -> DecoderSettings:
    bias = bool(getattr(config, "attention_bias", False))
    return common_settings(config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


def qwen2(config: Any) -> DecoderSettings:
    return common_settings(config, qkv_bias=True)


def qwen3(config: Any) -> DecoderSettings:
    bias = bool(getattr(config, "attention_bias", False))
    return common_settings(config, qkv_bias=bias, o_bias=bias, qk_norm=True)
