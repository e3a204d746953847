"""Quantized HF-layout checkpoints: ``config.json``'s ``quantization_config`` and the packed tensors.

A GPTQ, AWQ, compressed-tensors or FP8 checkpoint stores each quantized projection as several
tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``weight_packed``, ``weight_scale``, ...).
:func:`read_quantized_weights` gathers a projection's parts and yields one ``RawQuantizedTensor``
under the projection's ``weight`` name, its ``data`` unpacked into the one form every platform
reads (``runtime.platform.packed``); every other tensor passes through as a ``StoredTensor``.

The layouts, from each format's published packer:

- GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` ``gptq``): ``qweight`` int32 [K * bits / 32, N],
  value j of a word at bit ``j * bits`` is input row ``word * 32 / bits + j``; ``qzeros`` int32
  [G, N * bits / 32] packed the same way along the output columns and stored one less than the
  zero point (``gptq_v2`` stores it as is); ``scales`` [G, N]; ``g_idx`` int32 [K], the group of
  each input row (act-order permutes it).
- AWQ (AutoAWQ GEMM): ``qweight`` int32 [K, N / 8] packed along the output columns, nibble i
  holding column ``8 * word + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; ``qzeros`` int32 [G, N / 8] likewise;
  ``scales`` [G, N].
- compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [N, K * bits / 32], value j of a
  word at bit ``j * bits``, each stored as ``q + 2**(bits-1)`` (signed values made unsigned);
  ``weight_scale`` [N, G]; ``weight_zero_point`` (asymmetric) int32 packed along N the same way;
  ``weight_g_idx`` [K]. ``float-quantized``: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` [N, 1]
  or one value, ``input_scale`` for static activation scales. ``int-quantized`` /
  ``naive-quantized``: ``weight`` int8 [N, K].
- FP8 (``quant_method: fp8``): ``weight`` float8_e4m3fn [N, K], ``weight_scale`` one value or
  [N], ``input_scale`` with ``activation_scheme: static``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from runtime.platform import RawQuantizedTensor
from runtime.platform.packed import Fp8Data, GroupQuantData

from .source import WeightStream
from .stored import StoredTensor

SUPPORTED_METHODS = ("gptq", "awq", "compressed-tensors", "fp8")
# Tensor suffixes that mark a module as quantized, per method; the module's other parts follow.
_MARKERS = {"gptq": {"qweight"}, "awq": {"qweight"}, "compressed-tensors": {"weight_packed", "weight_scale"},
            "fp8": {"weight_scale", "weight_scale_inv"}}
_PARTS = {"qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_scale_inv",
          "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale", "weight"}
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantization_config(hf_config: Any) -> dict | None:
    """The checkpoint's ``quantization_config`` as a dict (None for a dense checkpoint);
    ``ValueError`` naming the supported methods for any other."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: {', '.join(SUPPORTED_METHODS)} "
                         f"(and GGUF files)")
    if method == "awq" and str(config.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {config['version']!r} is not supported; only the GEMM layout is")
    if method == "gptq" and int(config.get("bits", 4)) not in (2, 4, 8):
        raise ValueError(f"GPTQ with {config['bits']} bits is not supported; supported: 2, 4, 8")
    if method == "fp8" and config.get("weight_block_size"):
        raise ValueError("block-wise FP8 checkpoints (weight_block_size) are not supported; per-tensor and "
                         "per-channel scales are")
    return config


def read_quantized_weights(files: list[Path], config: dict) -> WeightStream:
    """The checkpoint's tensors under HF names: each quantized projection once, as a
    ``RawQuantizedTensor`` named ``<module>.weight``, as soon as all its parts were read."""
    method = config["quant_method"]
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names[file] = list(f.keys())
    parts_of: dict[str, set[str]] = {}
    for keys in names.values():
        for name in keys:
            module, _, suffix = name.rpartition(".")
            if suffix in _PARTS:
                parts_of.setdefault(module, set()).add(suffix)
    quantized = {m for m, parts in parts_of.items() if parts & _MARKERS[method]}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file, keys in names.items():
        with safe_open(file, framework="pt") as f:
            for name in keys:
                module, _, suffix = name.rpartition(".")
                if module not in quantized or suffix not in _PARTS:
                    yield name, StoredTensor(f, name)
                    continue
                parts = pending.setdefault(module, {})
                parts[suffix] = f.get_tensor(name)
                if set(parts) == parts_of[module]:
                    yield f"{module}.weight", _raw(method, config, pending.pop(module), module)


def _raw(method: str, config: dict, parts: dict[str, torch.Tensor], module: str) -> RawQuantizedTensor:
    if method == "gptq":
        data = _gptq(parts, config)
    elif method == "awq":
        data = _awq(parts, config)
    elif method == "fp8":
        data = _fp8(parts, module)
    elif "weight_packed" in parts:
        data = _compressed_packed(parts)
    elif parts["weight"].dtype == torch.int8:
        data = _compressed_int8(parts)
    else:
        data = _fp8(parts, module)
    qtype = "fp8_e4m3" if isinstance(data, Fp8Data) else f"int{data.bits}"
    return RawQuantizedTensor(method, qtype, data, data.shape)


def unpack_words(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding ``32 / bits`` values each (value j at bit ``j * bits``) -> uint8 values,
    the words' values in sequence along ``dim`` (0: rows, 1: columns)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts[None, :, None]) & (2 ** bits - 1)
        return values.reshape(packed.shape[0] * per, packed.shape[1]).to(torch.uint8)
    values = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return values.reshape(packed.shape[0], packed.shape[1] * per).to(torch.uint8)


def _contiguous_groups(g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """``g_idx`` when it permutes the groups (act-order), None when it is column // group_size."""
    if g_idx is None or torch.equal(g_idx.long(), torch.arange(len(g_idx)) // group_size):
        return None
    return g_idx.to(torch.int32)


def _gptq(parts: dict[str, torch.Tensor], config: dict) -> GroupQuantData:
    bits = int(config.get("bits", 4))
    qweight = unpack_words(parts["qweight"], bits, dim=0).T.contiguous()
    zeros = unpack_words(parts["qzeros"], bits, dim=1).float()
    if config.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros += 1  # AutoGPTQ's v1 layout stores each zero point minus one
    k = qweight.shape[1]
    group_size = int(config.get("group_size", -1))
    group_size = k if group_size <= 0 else group_size
    return GroupQuantData(qweight, parts["scales"].T.contiguous(), zeros.T.contiguous(), bits, group_size,
                          _contiguous_groups(parts.get("g_idx"), group_size))


def _awq(parts: dict[str, torch.Tensor], config: dict) -> GroupQuantData:
    bits = int(config.get("bits", config.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"AWQ with {bits} bits is not supported; the GEMM layout is 4-bit")
    inverse = torch.tensor(_AWQ_ORDER).argsort()

    def columns(packed: torch.Tensor) -> torch.Tensor:
        values = unpack_words(packed, bits, dim=1)
        return values.reshape(values.shape[0], -1, 8)[:, :, inverse].reshape(values.shape)

    qweight = columns(parts["qweight"]).T.contiguous()
    if config.get("zero_point", True):
        zeros = columns(parts["qzeros"]).float().T.contiguous()
    else:
        zeros = torch.full(parts["scales"].T.shape, 2.0 ** (bits - 1))
    group_size = int(config.get("group_size", config.get("q_group_size", 128)))
    group_size = qweight.shape[1] if group_size <= 0 else group_size
    return GroupQuantData(qweight, parts["scales"].T.contiguous(), zeros, bits, group_size)


def _compressed_packed(parts: dict[str, torch.Tensor]) -> GroupQuantData:
    rows, k = (int(v) for v in parts["weight_shape"])
    bits = 32 * parts["weight_packed"].shape[1] // k
    if 32 % bits:
        raise ValueError(f"compressed-tensors weights of {bits} bits are not supported; supported: 2, 4, 8")
    qweight = unpack_words(parts["weight_packed"], bits, dim=1)[:, :k].contiguous()
    scales = parts["weight_scale"].reshape(rows, -1)
    if "weight_zero_point" in parts:
        zeros = unpack_words(parts["weight_zero_point"], bits, dim=0)[:rows].float()
    else:
        zeros = torch.full(scales.shape, 2.0 ** (bits - 1))
    group_size = k // scales.shape[1]
    return GroupQuantData(qweight, scales, zeros, bits, group_size,
                          _contiguous_groups(parts.get("weight_g_idx"), group_size))


def _compressed_int8(parts: dict[str, torch.Tensor]) -> GroupQuantData:
    weight = parts["weight"]
    scales = parts["weight_scale"].reshape(weight.shape[0], -1)
    zeros = torch.full(scales.shape, 128.0)
    if "weight_zero_point" in parts:
        zeros += parts["weight_zero_point"].reshape(scales.shape).float()
    qweight = (weight.to(torch.int16) + 128).to(torch.uint8)
    return GroupQuantData(qweight, scales, zeros, 8, weight.shape[1] // scales.shape[1])


def _fp8(parts: dict[str, torch.Tensor], module: str) -> Fp8Data:
    weight = parts["weight"]
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{module}.weight is {weight.dtype}, expected float8_e4m3fn for an FP8 checkpoint")
    if "weight_scale" not in parts:
        raise ValueError(f"{module} has no weight_scale (block-wise FP8 is not supported)")
    scale = parts["weight_scale"].float().flatten()
    if scale.numel() not in (1, weight.shape[0]):
        raise ValueError(f"{module}.weight_scale has {scale.numel()} values; expected one (per tensor) or "
                         f"{weight.shape[0]} (per output channel)")
    input_scale = parts.get("input_scale")
    return Fp8Data(weight, scale.expand(weight.shape[0]).contiguous(),
                   None if input_scale is None else input_scale.float().reshape(()))
