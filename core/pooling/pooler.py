"""Hidden states -> embedding vectors, for every pooled request of a step in a few tensor ops."""

from __future__ import annotations

import numpy as np
import torch

from .params import PoolingSpec


def _index(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)


def pool(hidden: torch.Tensor, starts: np.ndarray, ends: np.ndarray, specs: list[PoolingSpec]) -> torch.Tensor:
    """The vectors of requests whose tokens are rows ``starts[i]:ends[i]`` of ``hidden`` [T, H]:
    [N, H] float32, each pooled by its spec (LAST: the last row, CLS: the first, MEAN: the mean
    of all), components past its ``dimensions`` zeroed, then scaled to unit length where it
    normalizes (after the cut, so a truncated vector is a unit vector too)."""
    device, width = hidden.device, hidden.shape[-1]
    types = np.array([s.pooling_type for s in specs])
    pooled = hidden[_index(np.where(types == "CLS", starts, ends - 1), device)].float()
    mean = np.flatnonzero(types == "MEAN")
    if len(mean):
        lengths = ends[mean] - starts[mean]
        offsets = np.repeat(starts[mean] - (np.cumsum(lengths) - lengths), lengths)
        tokens = np.arange(int(lengths.sum())) + offsets
        segment = _index(np.repeat(np.arange(len(mean)), lengths), device)
        sums = torch.zeros(len(mean), width, dtype=torch.float32, device=device)
        sums.index_add_(0, segment, hidden[_index(tokens, device)].float())
        pooled[_index(mean, device)] = sums / torch.from_numpy(lengths.astype(np.float32)).to(device).unsqueeze(-1)
    dims = np.array([s.dimensions for s in specs])
    if (dims < width).any():
        kept = torch.arange(width, device=device).unsqueeze(0) < _index(dims, device).unsqueeze(-1)
        pooled = pooled * kept
    normalize = torch.from_numpy(np.array([s.normalize for s in specs])).to(device).unsqueeze(-1)
    return torch.where(normalize, torch.nn.functional.normalize(pooled, dim=-1), pooled)


def vector_bytes(row: np.ndarray, spec: PoolingSpec) -> bytes:
    """One pooled row as it travels: its kept components, float32 little-endian (what
    OpenAI's base64 encoding holds, so the API sends these bytes as they are)."""
    return row[:spec.dimensions].astype("<f4", copy=False).tobytes()
