"""Fault: the Q8_0 weights a quantized matmul uses are scaled by each row's first block scale.

``dequantize`` stays right, so only comparing ``apply(load(w), x)`` with dequantize-then-matmul
can find it.
"""

import numpy as np
import torch
from runtime_cpu.quant import CpuGgufMethod as GgufDequantizeMethod

from ._cpu import cpu_plugin

PLATFORM = "broken-quant-scale"
Q8_0_BLOCK_BYTES = 34  # float16 scale + 32 int8 quants


class FirstBlockScale(GgufDequantizeMethod):
    def precision(self, qtype):
        return None  # it claims the exact product: it keeps every type dense

    def load(self, raw, dtype, device):
        if raw.qtype != "Q8_0":
            return super().load(raw, dtype, device)
        blocks = np.asarray(raw.data).reshape(raw.shape[0], -1, Q8_0_BLOCK_BYTES)
        scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float32)
        quants = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.float32)
        weight = (quants * scales[:, :1]).reshape(raw.shape)
        return torch.from_numpy(weight).to(dtype).to(device)


plugin = cpu_plugin(PLATFORM, quantization=FirstBlockScale)
