"""Packed weights of HF-hub quantized checkpoints, as the loader hands them to a platform.

GPTQ, AWQ and compressed-tensors each pack integer weights their own way (along the input or
the output dimension, nibbles in sequence or interleaved, zero points off by one or signed);
the loader unpacks every one of them into :class:`GroupQuantData`, so a platform writes one
repacking step into its kernel's layout instead of three. FP8 checkpoints become
:class:`Fp8Data`. Both are the ``data`` of a ``RawQuantizedTensor`` and, like GGUF's block
rows, have one row per output row: ``data[start:end]`` keeps those rows, :meth:`columns` a
range of input columns (a row-parallel shard), ``cat_rows`` stacks partitions (fused q/k/v).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .interface import RawQuantizedTensor


@dataclass
class GroupQuantData:
    """Integer weights with one scale and zero point per group of input columns.

    ``W[n, k] = (qweight[n, k] - zeros[n, g]) * scales[n, g] (+ offsets[n, g])`` with ``g = g_idx[k]``
    (or ``k // group_size`` when ``g_idx`` is None: groups are contiguous runs of columns).
    """

    qweight: torch.Tensor
    """[N, K] uint8, unsigned values 0 .. 2**bits - 1 (one per byte: unpacked)."""
    scales: torch.Tensor
    """[N, G] in the checkpoint's float type."""
    zeros: torch.Tensor
    """[N, G] float32 zero points in the same unsigned units (2**(bits-1) for symmetric schemes)."""
    bits: int
    group_size: int
    """Columns per group; K for one group per row (``group_size: -1`` in a config)."""
    g_idx: torch.Tensor | None = None
    """[K] int32 group of each input column (GPTQ's act-order); None: contiguous groups."""
    offsets: torch.Tensor | None = None
    """[N, G] float32 added after scaling (GGUF's minimums, ``runtime.platform.gguf_groups``); None: none."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def __getitem__(self, rows: slice) -> GroupQuantData:
        return replace(self, qweight=self.qweight[rows], scales=self.scales[rows], zeros=self.zeros[rows],
                       offsets=None if self.offsets is None else self.offsets[rows])

    def columns(self, start: int, end: int) -> GroupQuantData:
        """Input columns [start, end): with contiguous groups only whole groups can be cut (a
        ``ValueError`` says so otherwise); with ``g_idx`` every group stays, columns pick theirs."""
        if self.g_idx is not None:
            return replace(self, qweight=self.qweight[:, start:end], g_idx=self.g_idx[start:end])
        size = self.group_size
        if start % size or (end % size and end != self.qweight.shape[1]):
            raise ValueError(f"input columns [{start}, {end}) do not fall on the checkpoint's quantization groups of "
                             f"{size} columns: this split needs a tensor-parallel size whose share of the input "
                             f"features is a multiple of {size}")
        groups = slice(start // size, -(-end // size))
        return replace(self, qweight=self.qweight[:, start:end], scales=self.scales[:, groups],
                       zeros=self.zeros[:, groups], offsets=None if self.offsets is None else self.offsets[:, groups])

    def group_of_columns(self) -> torch.Tensor:
        """[K] int64: the group index of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.qweight.shape[1]) // self.group_size

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [N, K] weight, computed in float64 and rounded once to ``dtype``."""
        groups = self.group_of_columns()
        scales, zeros = self.scales.double()[:, groups], self.zeros.double()[:, groups]
        dense = (self.qweight.double() - zeros) * scales
        if self.offsets is not None:
            dense += self.offsets.double()[:, groups]
        return dense.to(dtype)


@dataclass
class Fp8Data:
    """An FP8 weight: ``W[n, k] = weight[n, k] * scale[n]`` (a per-tensor scale repeated per row)."""

    weight: torch.Tensor
    """[N, K] float8_e4m3fn."""
    scale: torch.Tensor
    """[N] float32."""
    input_scale: torch.Tensor | None = None
    """Static activation scale (W8A8 static), a float32 scalar; None: scaled per token at run time."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def __getitem__(self, rows: slice) -> Fp8Data:
        return replace(self, weight=self.weight[rows], scale=self.scale[rows])

    def columns(self, start: int, end: int) -> Fp8Data:
        return replace(self, weight=self.weight[:, start:end])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.double() * self.scale.double()[:, None]).to(dtype)


PackedData = GroupQuantData | Fp8Data


def cat_rows(parts: list[PackedData]) -> PackedData:
    """Partitions stored apart (q, k and v) as one packed weight, rows in order."""
    first = parts[0]
    if isinstance(first, GroupQuantData):
        if any(p.g_idx is not None for p in parts):
            if not all(p.g_idx is not None and torch.equal(p.g_idx, first.g_idx) for p in parts):
                raise ValueError("fused projections (q/k/v or gate/up) with different act-order column orders (g_idx) "
                                 "cannot be kept packed as one weight; use --quantization none")
        if any((p.bits, p.group_size) != (first.bits, first.group_size) for p in parts):
            raise ValueError("fused projections quantized with different bits or group sizes cannot share one weight")
    tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts])
               for f in fields(first) if f.name in ("qweight", "scales", "zeros", "offsets", "weight", "scale")
               and getattr(parts[0], f.name) is not None}
    if isinstance(first, Fp8Data) and first.input_scale is not None:
        # One input feeds every partition: the largest static scale covers all of them (as vLLM does).
        tensors["input_scale"] = torch.stack([p.input_scale for p in parts]).max()
    return replace(first, **tensors)


def cat_raw_rows(parts: list[RawQuantizedTensor]) -> RawQuantizedTensor:
    """Quantized partitions of one fused projection as one tensor: their rows stacked."""
    first = parts[0]
    if any((p.format, p.qtype) != (first.format, first.qtype) for p in parts):
        kinds = ", ".join(sorted({f"{p.format} {p.qtype}" for p in parts}))
        raise ValueError(f"fused projection stored in several quantized types ({kinds}) cannot be kept packed; "
                         f"use --quantization none")
    rows = sum(p.shape[0] for p in parts)
    if isinstance(first.data, np.ndarray):
        data = np.concatenate([np.asarray(p.data) for p in parts])
    else:
        data = cat_rows([p.data for p in parts])
    return RawQuantizedTensor(first.format, first.qtype, data, (rows, *first.shape[1:]))


def cut_columns(raw: RawQuantizedTensor, start: int, end: int) -> RawQuantizedTensor:
    """Input columns [start, end) of a quantized matrix, still quantized. GGUF rows are runs of
    blocks (32 or 256 values): the cut must fall on block boundaries, or a ValueError says so."""
    shape = (raw.shape[0], end - start)
    if not isinstance(raw.data, np.ndarray):
        return RawQuantizedTensor(raw.format, raw.qtype, raw.data.columns(start, end), shape)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[raw.qtype]]
    if start % block or end % block:
        raise ValueError(f"input columns [{start}, {end}) split GGUF {raw.qtype} blocks of {block} values: this "
                         f"tensor-parallel size cannot keep the weights packed (use --quantization none)")
    data = np.asarray(raw.data)
    if data.dtype == np.uint8:
        data = data[:, start // block * size:end // block * size]
    else:
        data = data[:, start:end]
    return RawQuantizedTensor(raw.format, raw.qtype, data, shape)
