"""GGUF block types unpacked into :class:`~runtime.platform.packed.GroupQuantData`.

Every type here is an affine map of small unsigned integers, one scale a group of input columns
and either one zero point for the whole type or a per-group minimum added after scaling:

- Q4_0 ``d * (q - 8)``, Q5_0 ``d * (q - 16)``, Q8_0 ``d * (q - 128)`` (the signed byte made
  unsigned): groups of 32, one zero point;
- Q4_1, Q5_1 ``d * q + m``: groups of 32, the minimum ``m`` as the offset;
- Q4_K, Q5_K ``d * sc * q - dmin * mn`` (6-bit ``sc`` and ``mn`` per 32 values of a 256-value
  super-block), Q2_K the same with 4-bit ``sc`` and ``mn`` per 16 values;
- Q6_K ``d * sc * (q - 32)`` (signed 8-bit ``sc`` per 16 values), Q3_K ``d * (sc - 32) * (q - 4)``
  (6-bit ``sc`` per 16 values; a value's third bit set means no 4 is taken off).

Scales and offsets are products of a float16 and a small integer, exact in float32. A platform
with a group-quantized kernel repacks the result into its layout (the 4-bit types into a 4-bit
one, Q5/Q6/Q8 into an 8-bit one: ``bits`` is the storage the values need at most, rounded up to
4 or 8), so GGUF and the hub's GPTQ/AWQ checkpoints share one kernel. The bit layouts follow
ggml-common.h; the tests check every type against the ``gguf`` package's dequantization.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from .interface import RawQuantizedTensor
from .packed import GroupQuantData

# qtype -> (storage bits, values a group)
GGUF_GROUP_TYPES = {
    "Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q2_K": (4, 16), "Q3_K": (4, 16),
    "Q5_0": (8, 32), "Q5_1": (8, 32), "Q5_K": (8, 32), "Q6_K": (8, 16), "Q8_0": (8, 32),
}


def group_quant(raw: RawQuantizedTensor) -> GroupQuantData:
    """A GGUF matrix of a type in ``GGUF_GROUP_TYPES`` (``raw.data``: rows of blocks) unpacked."""
    rows, cols = raw.shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[raw.qtype]]
    blocks = np.ascontiguousarray(raw.data).view(np.uint8).reshape(rows * cols // block, size)
    q, scales, zero, offsets = _UNPACK[raw.qtype](blocks)
    bits, group = GGUF_GROUP_TYPES[raw.qtype]
    groups = cols // group
    scales = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, groups))
    return GroupQuantData(
        torch.from_numpy(np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, cols)), scales,
        torch.full((rows, groups), float(zero)), bits, group,
        offsets=None if offsets is None else torch.from_numpy(
            np.ascontiguousarray(offsets, dtype=np.float32).reshape(rows, groups)))


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[blocks, runs, n] bytes -> [blocks, runs, 2, n]: each run's low nibbles, then its high ones."""
    return (packed[:, :, None, :] >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F


def _bits(packed: np.ndarray, planes: int, width: int) -> np.ndarray:
    """[blocks, n] bytes -> [blocks, planes, n]: field ``p`` (``width`` bits at bit ``p * width``) of every byte."""
    shifts = (np.arange(planes, dtype=np.uint8) * width)[:, None]
    return (packed[:, None, :] >> shifts) & ((1 << width) - 1)


def _legacy(blocks: np.ndarray, with_min: bool, high_bits: bool, zero: int):
    """Q4_0, Q4_1, Q5_0, Q5_1: ``d`` (and ``m``), the fifth bits of the 32 values in one little-endian
    word (Q5), then 16 bytes: values 0-15 in the low nibbles, 16-31 in the high ones."""
    d = _half(blocks, 0)
    start = 4 if with_min else 2
    q = _nibbles(blocks[:, None, -16:]).reshape(-1, 32)
    if high_bits:
        fifth = np.unpackbits(blocks[:, start:start + 4], axis=1, bitorder="little")
        q = q | (fifth << 4)
    return q, d, zero, _half(blocks, 2) if with_min else None


def _q8_0(blocks: np.ndarray):
    return blocks[:, 2:].view(np.int8).astype(np.int16) + 128, _half(blocks, 0), 128, None


def _scale_min_k(blocks: np.ndarray, with_high: bool):
    """Q4_K, Q5_K: ``d``, ``dmin``, 12 bytes of 6-bit scales and mins, (Q5: 32 bytes of fifth bits,
    bit ``s`` of byte ``j`` for value ``j`` of sub-block ``s``), then 4 runs of 32 bytes whose low
    nibbles are sub-block ``2r`` and high nibbles ``2r + 1``."""
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    q = _nibbles(blocks[:, -128:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    if with_high:
        q = q | (_bits(blocks[:, 16:48], 8, 1) << 4)
    return q, _half(blocks, 0) * sc, 0, -_half(blocks, 2) * mn


def _q2_k(blocks: np.ndarray):
    """16 bytes of scales (low nibble) and mins (high), 64 bytes of 2-bit values (two runs of 32
    bytes, four sub-blocks of 16 a run: the bit pairs from the lowest), ``d``, ``dmin``."""
    packed = blocks[:, 16:80].reshape(-1, 2, 32)
    q = ((packed[:, :, None, :] >> (np.arange(4, dtype=np.uint8) * 2)[:, None]) & 3).reshape(-1, 16, 16)
    sc, mn = blocks[:, :16] & 0x0F, blocks[:, :16] >> 4
    return q, _half(blocks, 80) * sc, 0, -_half(blocks, 82) * mn


def _q3_k(blocks: np.ndarray):
    """32 bytes of third bits (bit ``p`` of byte ``j``: value ``j`` of the ``p``-th run of 32), 64
    bytes of 2-bit values as Q2_K's, 12 bytes of 6-bit scales (low nibbles from bytes 0-7, high
    pairs from bytes 8-11), ``d``. The stored value is ``low - 4`` where the third bit is clear."""
    packed = blocks[:, 32:96].reshape(-1, 2, 32)
    low = ((packed[:, :, None, :] >> (np.arange(4, dtype=np.uint8) * 2)[:, None]) & 3).reshape(-1, 8, 32)
    q = low | (_bits(blocks[:, :32], 8, 1) << 2)
    packed_scales = blocks[:, 96:108]
    low_scales = _nibbles(packed_scales[:, None, :8]).reshape(-1, 16)
    high_scales = _bits(packed_scales[:, 8:12], 4, 2).reshape(-1, 16)
    sc = (low_scales | (high_scales << 4)).astype(np.int16) - 32
    return q.reshape(-1, 16, 16), _half(blocks, 108) * sc, 4, None


def _q6_k(blocks: np.ndarray):
    """128 bytes of low nibbles (two halves of 64: low nibbles values 0-63 of the half, high ones
    64-127), 64 bytes of high bit pairs (two halves of 32 bytes: pair ``p`` of byte ``j`` for value
    ``32p + j`` of the half), 16 signed 8-bit scales, ``d``."""
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 256)
    high = _bits(blocks[:, 128:192].reshape(-1, 32), 4, 2).reshape(-1, 256)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return low | (high << 4), _half(blocks, 208) * sc, 32, None


_UNPACK = {
    "Q4_0": lambda b: _legacy(b, with_min=False, high_bits=False, zero=8),
    "Q4_1": lambda b: _legacy(b, with_min=True, high_bits=False, zero=0),
    "Q5_0": lambda b: _legacy(b, with_min=False, high_bits=True, zero=16),
    "Q5_1": lambda b: _legacy(b, with_min=True, high_bits=True, zero=0),
    "Q8_0": _q8_0,
    "Q4_K": lambda b: _scale_min_k(b, with_high=False),
    "Q5_K": lambda b: _scale_min_k(b, with_high=True),
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q6_K": _q6_k,
}
