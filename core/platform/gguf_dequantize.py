"""Dequantize-on-load for GGUF checkpoints, shared by platforms that multiply dense weights.

Like :mod:`runtime.platform.distributed`, a ready implementation of a contract class: a plugin
subclasses it and names its platform. Decoding is the ``gguf`` package's.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from .interface import QuantizationMethod, RawQuantizedTensor


FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


class GgufDequantizeMethod(QuantizationMethod):
    """GGUF tensors dequantized once at load; ``apply`` is the default dense ``F.linear``."""

    name = "gguf"
    supported_qtypes = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})

    def dequantize(self, raw: RawQuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``raw.shape`` tensor in ``dtype`` on the host; ``ValueError`` for an unsupported qtype.

        ``raw.data`` is the tensor as ``gguf.GGUFReader`` (and ``runtime.loader.gguf_file``)
        exposes it: rows of block bytes for quantized types, a typed array for float types.
        """
        if raw.qtype not in self.supported_qtypes:
            supported = ", ".join(sorted(self.supported_qtypes))
            raise ValueError(f"GGUF tensor type {raw.qtype} is not supported on {self.platform}; supported types: {supported}")
        values = dequantize(np.asarray(raw.data), GGMLQuantizationType[raw.qtype]).reshape(raw.shape)
        # F32 comes back as a view of the read-only file mapping; torch needs memory it may own.
        if not values.flags.writeable:
            values = values.copy()
        return torch.from_numpy(values).to(dtype)
