"""``--load-format dummy`` (vLLM's name): every weight of the architecture config.json describes,
made up instead of read, for benchmarks that only need a model's shape.

The tensors are named and shaped as a checkpoint of the architecture's HF class stores them (the
class built on the meta device, so nothing is allocated), and go through the same loading path
as a checkpoint's: fused projections, tensor-parallel slices, vision towers and online
quantization work unchanged. Their
values are small (standard deviation 0.02, as HF initializes) and fixed: each tensor is a run of
one pseudo-random block whose length is a prime, from its own offset, so rows of a weight and
different weights are not copies of each other, and two engines given the same config see the
same weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers

from .source import WeightStream

BLOCK_LENGTH = 1_000_003
"""A prime: no weight shape is a multiple of it, so the repeats never line up with rows."""


def hf_parameter_shapes(config: Any) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of ``config``'s architecture holds, by name, with its shape, as
    ``save_pretrained`` would write them."""
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)), None)
    if model_class is None:
        raise ValueError(f"--load-format dummy needs config.json's architectures to name a transformers model class; "
                         f"got {architectures or 'none'}")
    with torch.device("meta"):
        model = model_class(config)
    # A tied weight once, under its first name, as a checkpoint stores it.
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    state = {name: tensor for name, tensor in model.state_dict().items() if name in kept}
    try:  # transformers 5 holds some weights fused (experts) and saves them under the hub's names
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        pass
    else:
        state = revert_weight_conversion(model, state)
    return {name: tensor.shape for name, tensor in state.items()}


def dummy_weights(config: Any) -> WeightStream:
    """(HF name, bfloat16 tensor) for every tensor of ``config``'s architecture."""
    generator = torch.Generator().manual_seed(0)
    block = (torch.randn(BLOCK_LENGTH, generator=generator) * 0.02).to(torch.bfloat16)
    for index, (name, shape) in enumerate(hf_parameter_shapes(config).items()):
        # Each tensor starts elsewhere in the block, so no two (layers, projections) are equal.
        numel, start = math.prod(shape), index * 7919 % BLOCK_LENGTH
        yield name, block.repeat(-(-(start + numel) // BLOCK_LENGTH))[start:start + numel].view(shape)
