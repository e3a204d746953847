"""Reading a PEFT LoRA directory into per-projection weights the model's layers can use.

A PEFT checkpoint stores, per targeted module, ``lora_A`` [r, in] and ``lora_B`` [out, r]; the
layer's output becomes ``W x + scale * B (A x)`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
under rsLoRA). Here the scale is folded into B, and every target is expressed against this
runtime's projections: a module the checkpoint keeps apart (``q_proj``) is one partition of a
fused projection (``qkv_proj``); a fused target (Phi-3's ``qkv_proj``) covers all partitions,
its A shared and its B cut by partition rows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.decoder import DecoderSettings

# PEFT module name -> (this runtime's module, partition index or None for every partition).
TARGETS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "self_attn.qkv_proj": ("self_attn.qkv_proj", None),
    "self_attn.o_proj": ("self_attn.o_proj", 0),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.gate_up_proj": ("mlp.gate_up_proj", None),
    "mlp.down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass
class LoRAAdapter:
    """An adapter's weights on the host, scale folded into B: ``weights[(layer, module, partition)]``
    is (A [r, in], B [out_partition, r]) in float32."""

    name: str
    int_id: int
    path: str
    rank: int
    weights: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def partition_sizes(settings: DecoderSettings) -> dict[str, tuple[list[int], int]]:
    """Per adaptable module: its partitions' output sizes and its input size (one rank holding all)."""
    s = settings
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return {
        "self_attn.qkv_proj": ([q, kv, kv], s.hidden_size),
        "self_attn.o_proj": ([s.hidden_size], q),
        "mlp.gate_up_proj": ([s.intermediate_size, s.intermediate_size], s.hidden_size),
        "mlp.down_proj": ([s.hidden_size], s.intermediate_size),
    }


def load_adapter(name: str, int_id: int, path: str | Path, settings: DecoderSettings, max_rank: int) -> LoRAAdapter:
    """Read and check the PEFT directory ``path``; ValueError naming the problem and the fix."""
    directory = Path(path)
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ValueError(f"LoRA adapter {name!r}: {file} not found (a PEFT adapter directory holds "
                             f"adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"LoRA adapter {name!r}: {config_file} is not valid JSON ({exc})") from None
    _check_config(name, config)
    sizes = partition_sizes(settings)
    pieces: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(weights_file, framework="pt") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA weight of a decoder layer "
                                 f"projection (embedding, lm_head and extra trained modules are not supported)")
            layer, module, which = int(match[1]), match[2], match[3]
            if module not in TARGETS:
                raise ValueError(f"LoRA adapter {name!r}: target module {module!r} is not supported; "
                                 f"supported: {', '.join(sorted(t.split('.')[1] for t in TARGETS))}")
            if not 0 <= layer < settings.num_layers:
                raise ValueError(f"LoRA adapter {name!r}: layer {layer} does not exist (the model has "
                                 f"{settings.num_layers}): it was trained for another model")
            pieces.setdefault((layer, module), {})[which] = f.get_tensor(key).float()
    weights: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for (layer, module), pair in pieces.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        if r > max_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {r}, above --max-lora-rank {max_rank}: "
                             f"raise --max-lora-rank to at least {r}")
        rank = max(rank, r)
        target, partition = TARGETS[module]
        outs, width = sizes[target]
        expected_out = sum(outs) if partition is None else outs[partition]
        if a.shape != (r, width) or b.shape != (expected_out, r):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}, this model needs A ({r}, {width}) and B ({expected_out}, {r}): "
                             f"it was trained for another base model")
        b = b * _scale(config, f"model.layers.{layer}.{module}", r)
        if partition is None:
            for index, part in enumerate(b.split(outs, dim=0)):
                weights[(layer, target, index)] = (a, part.contiguous())
        else:
            weights[(layer, target, partition)] = (a, b)
    if not weights:
        raise ValueError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    return LoRAAdapter(name, int_id, str(directory), rank, weights)


def _check_config(name: str, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {name!r}: DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {name!r}: modules_to_save {config['modules_to_save']} (fully trained "
                         f"modules such as lm_head or embeddings) are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")


def _scale(config: dict, module_path: str, rank: int) -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA); ``alpha_pattern`` overrides alpha for the
    modules whose path ends with a key, as PEFT matches it."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
