"""Mixture-of-experts architectures: Mixtral (a Mistral whose MLP is 8 experts, 2 per token) and
Qwen2-MoE / Qwen3-MoE (many small experts; Qwen2-MoE adds a shared expert behind a sigmoid gate;
``decoder_sparse_step`` and ``mlp_only_layers`` keep some layers dense)."""

from __future__ import annotations

from typing import Any

from .decoder import DecoderSettings
from .layers.moe import MoESettings
from .llama import common_settings


def _sparse_layers(config: Any) -> list[bool]:
    """Per layer, whether it has experts: HF's rule for Qwen-MoE (every ``decoder_sparse_step``-th
    layer, counting from 1, except ``mlp_only_layers``)."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]


def mixtral(config: Any) -> DecoderSettings:
    moe = MoESettings(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                      intermediate_size=config.intermediate_size, renormalize=True,
                      sparse_layers=[True] * config.num_hidden_layers)
    return common_settings(config, moe=moe)


def _qwen_moe(config: Any, shared: int) -> MoESettings:
    return MoESettings(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                       intermediate_size=config.moe_intermediate_size,
                       renormalize=bool(getattr(config, "norm_topk_prob", False)),
                       sparse_layers=_sparse_layers(config) if config.num_experts else [False] * config.num_hidden_layers,
                       shared_expert_intermediate_size=shared)


def qwen2_moe(config: Any) -> DecoderSettings:
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    return common_settings(config, qkv_bias=bool(getattr(config, "qkv_bias", True)), moe=_qwen_moe(config, shared))


def qwen3_moe(config: Any) -> DecoderSettings:
    bias = bool(getattr(config, "attention_bias", False))
    return common_settings(config, qkv_bias=bias, o_bias=bias, qk_norm=True, moe=_qwen_moe(config, 0))
