"""A GGUF file's metadata and tensor table, read in one pass.

``gguf.GGUFReader`` builds a numpy view for every item of every metadata array: ~20 s on a
2-core machine for the embedded model's 49k-token vocabulary and merges, more than half of the
engine's start-up. This reads the same layout with ``struct`` (tens of milliseconds) and gives
each tensor the memory-mapped view GGUFReader gives (``data``: typed values for the float and
integer types, rows of block bytes for the quantized ones, and for BF16), so the platforms'
``gguf`` methods see the same arrays. Type codes and block sizes come from the gguf package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF value type -> struct format (8 is a string, 9 an array)."""
_STRING, _ARRAY = 8, 9
_TYPED = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}
"""Tensor types whose data is an array of that numpy type; every other type is bytes."""


@dataclass
class GgufTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    """Dimensions in GGUF order (innermost first), as GGUFReader gives them."""
    data: np.ndarray
    """Memory-mapped: values in numpy's order (outermost first), or rows of block bytes."""


class GgufFile:
    """``fields``: metadata key -> Python value (a list for arrays); ``tensors``: in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._memory = np.memmap(self.path, mode="r")
        self._buffer = memoryview(self._memory)
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError("GGUF magic invalid")
        version, tensor_count, field_count = struct.unpack_from("<IQQ", self._buffer, 4)
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} (or a big-endian file) is not supported; versions: {_VERSIONS}")
        self._offset = 24
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            (value_type,) = self._unpack("<I")
            self.fields[key] = self._value(value_type)
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment}: must be a power of two")
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, data_start + offset) for name, dims, kind, offset in infos]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("GGUF file names a tensor twice")

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        start = self._offset
        self._offset += length
        return bytes(self._buffer[start:self._offset]).decode("utf-8")

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type == _STRING:
                return [self._string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self._value(self._unpack("<I")[0]) for _ in range(count)]
            fmt = _SCALARS[item_type]
            items = np.frombuffer(self._buffer, dtype=np.dtype(fmt), count=count, offset=self._offset)
            self._offset += items.nbytes
            return items.tolist()
        if value_type not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self._unpack(_SCALARS[value_type])[0]

    def _tensor_info(self) -> tuple[str, np.ndarray, GGMLQuantizationType, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = np.array(self._unpack(f"<{n_dims}Q"), dtype=np.uint64)
        kind, offset = self._unpack("<IQ")
        return name, dims, GGMLQuantizationType(kind), offset

    def _tensor(self, name: str, dims: np.ndarray, kind: GGMLQuantizationType, start: int) -> GgufTensor:
        elements = int(np.prod(dims))
        np_dims = tuple(int(d) for d in reversed(dims.tolist()))
        if kind in _TYPED:
            item, count = np.dtype(_TYPED[kind]), elements
        else:
            block, type_size = GGML_QUANT_SIZES[kind]
            item, count = np.dtype(np.uint8), elements * type_size // block
            np_dims = quant_shape_to_byte_shape(np_dims, kind)
        end = start + count * item.itemsize
        if end > len(self._memory):
            raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
        return GgufTensor(name, kind, dims, self._memory[start:end].view(item).reshape(np_dims))
