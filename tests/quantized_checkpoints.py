"""Quantized HF-layout checkpoints written from each format's published specification.

``write_quantized(dense_dir, out_dir, scheme)`` rounds every decoder projection of a tiny dense
checkpoint (tests/tiny_models.py) to the scheme's integers or FP8, packs them as that format's
own packer does (GPTQ and AWQ below, from their specifications; compressed-tensors through its
own package), writes config.json's ``quantization_config``, and returns the dense weights the
packed ones stand for, computed here in float64: the reference any loader must reproduce.
The lm_head stays dense, as quantizers leave it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class Scheme:
    format: str
    """gptq, awq, compressed-tensors, fp8."""
    bits: int = 4
    group_size: int = 128
    """-1: one group per output row."""
    symmetric: bool = True
    act_order: bool = False
    float8: bool = False
    """FP8 weights: the fp8 format, or compressed-tensors' float-quantized one."""
    fp8_scale: str = "channel"
    """FP8 weight scales: tensor or channel."""
    static_input: bool = False
    """FP8: a calibrated activation scale (W8A8 static)."""

    @property
    def id(self) -> str:
        if self.float8:
            return f"{self.format}-fp8-{self.fp8_scale}{'-static' if self.static_input else ''}"
        return (f"{self.format}-int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"
                f"{'-actorder' if self.act_order else ''}")


def pack_words(values: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Unsigned ``values`` packed ``32 / bits`` to an int32 word along ``dim``, value j of a word
    at bit ``j * bits`` (GPTQ's qweight along rows, its qzeros and compressed-tensors along columns)."""
    per = 32 // bits
    moved = np.moveaxis(values.astype(np.uint32), dim, -1)
    words = moved.reshape(*moved.shape[:-1], -1, per) << (np.arange(per, dtype=np.uint32) * bits)
    return np.ascontiguousarray(np.moveaxis(np.bitwise_or.reduce(words, axis=-1), -1, dim)).view(np.int32)


def quantize_groups(weight: torch.Tensor, scheme: Scheme, generator: torch.Generator):
    """(q [N, K] uint8, scales [N, G] float16, zeros [N, G] float64, g_idx [K] or None): round-to-
    nearest per group; act-order groups are a random permutation of the columns."""
    n, k = weight.shape
    size = k if scheme.group_size == -1 else scheme.group_size
    levels = 2 ** scheme.bits
    g_idx = torch.arange(k) // size
    if scheme.act_order:
        # GPTQ orders columns by the input's statistics, so projections of one input (q/k/v,
        # gate/up) share their order: seeded by the input width here.
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(k))]
    w = weight.double()
    groups = k // size
    members = [g_idx == g for g in range(groups)]
    if scheme.symmetric:
        amax = torch.stack([w[:, m].abs().amax(1) for m in members], 1)
        scales = (amax / (levels / 2 - 1)).clamp(min=1e-8).half()
        zeros = torch.full((n, groups), levels / 2, dtype=torch.float64)
    else:
        low = torch.stack([w[:, m].amin(1) for m in members], 1).clamp(max=0)
        high = torch.stack([w[:, m].amax(1) for m in members], 1).clamp(min=0)
        scales = ((high - low) / (levels - 1)).clamp(min=1e-8).half()
        zeros = torch.round(-low / scales.double()).clamp(0, levels - 1)
    q = torch.round(w / scales.double()[:, g_idx] + zeros[:, g_idx]).clamp(0, levels - 1).to(torch.uint8)
    return q, scales, zeros, (g_idx.to(torch.int32) if scheme.act_order or scheme.format == "gptq" else None)


def dequantized(q, scales, zeros, g_idx, k: int, size: int) -> torch.Tensor:
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // size
    return (q.double() - zeros[:, groups]) * scales.double()[:, groups]


def _gptq(prefix, q, scales, zeros, g_idx, bits):
    return {f"{prefix}.qweight": torch.from_numpy(pack_words(q.T.numpy(), bits, 0)),
            f"{prefix}.qzeros": torch.from_numpy(pack_words((zeros.T - 1).to(torch.uint8).numpy(), bits, 1)),
            f"{prefix}.scales": scales.T.contiguous(), f"{prefix}.g_idx": g_idx}


def _awq(prefix, q, scales, zeros):
    def columns(values: torch.Tensor) -> torch.Tensor:  # [R, C] -> nibble i of word c holds column 8c + order[i]
        v = values.numpy().reshape(values.shape[0], -1, 8)[:, :, AWQ_ORDER].reshape(values.shape)
        return torch.from_numpy(pack_words(v, 4, 1))
    return {f"{prefix}.qweight": columns(q.T.contiguous()), f"{prefix}.qzeros": columns(zeros.T.to(torch.uint8)),
            f"{prefix}.scales": scales.T.contiguous()}


def _compressed(prefix, q, scales, zeros, g_idx, scheme):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (scheme.bits - 1)
    tensors = {f"{prefix}.weight_packed": pack_to_int32((q.int() - offset).to(torch.int8), scheme.bits),
               f"{prefix}.weight_scale": scales, f"{prefix}.weight_shape": torch.tensor(q.shape)}
    if not scheme.symmetric:
        tensors[f"{prefix}.weight_zero_point"] = pack_to_int32((zeros - offset).to(torch.int8), scheme.bits, packed_dim=0)
    if scheme.act_order:
        tensors[f"{prefix}.weight_g_idx"] = g_idx
    return tensors


def _fp8(prefix, weight, scheme, generator):
    per_row = scheme.fp8_scale == "channel"
    amax = weight.double().abs().amax(1, keepdim=True) if per_row else weight.double().abs().max().reshape(1)
    scale = (amax / 448).float()
    q = (weight.double() / scale.double().reshape(-1, 1) if per_row else weight.double() / scale.double()).to(
        torch.float8_e4m3fn)
    tensors = {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale if per_row else scale.reshape(())}
    if scheme.static_input:
        tensors[f"{prefix}.input_scale"] = (torch.rand((), generator=generator) * 0.01 + 0.01).float()
    dense = q.double() * (scale.double() if per_row else scale.double()).reshape(-1, 1)
    return tensors, dense


def _config(scheme: Scheme) -> dict:
    if scheme.format == "gptq":
        return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
                "desc_act": scheme.act_order, "sym": scheme.symmetric, "checkpoint_format": "gptq"}
    if scheme.format == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
                "version": "gemm"}
    if scheme.format == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static" if scheme.static_input else "dynamic"}
    if scheme.float8:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": scheme.fp8_scale}
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if scheme.static_input else "token",
                  "dynamic": not scheme.static_input}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}}}
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
               "strategy": "channel" if scheme.group_size == -1 else "group",
               "group_size": None if scheme.group_size == -1 else scheme.group_size,
               "actorder": "group" if scheme.act_order else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def write_quantized(dense_dir: Path, out_dir: Path, scheme: Scheme, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``scheme``'s checkpoint of ``dense_dir`` to ``out_dir``; the float64 dense weights it
    stands for, by HF parameter name."""
    shutil.copytree(dense_dir, out_dir)
    generator = torch.Generator().manual_seed(seed)
    state = load_file(out_dir / "model.safetensors")
    tensors, reference = {}, {}
    for name, weight in state.items():
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in PROJECTIONS):
            tensors[name] = weight
            continue
        if scheme.float8:
            packed, reference[name] = _fp8(prefix, weight, scheme, generator)
            tensors.update(packed)
            continue
        q, scales, zeros, g_idx = quantize_groups(weight, scheme, generator)
        size = weight.shape[1] if scheme.group_size == -1 else scheme.group_size
        reference[name] = dequantized(q, scales, zeros, g_idx, weight.shape[1], size)
        if scheme.format == "gptq":
            tensors.update(_gptq(prefix, q, scales, zeros, g_idx, scheme.bits))
        elif scheme.format == "awq":
            tensors.update(_awq(prefix, q, scales, zeros))
        else:
            tensors.update(_compressed(prefix, q, scales, zeros, g_idx, scheme))
    (out_dir / "model.safetensors").unlink()
    save_file(tensors, out_dir / "model.safetensors")
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = _config(scheme)
    (out_dir / "config.json").write_text(json.dumps(config))
    return reference
