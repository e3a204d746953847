"""Checkpoint tensors that are read when indexed, so a tensor-parallel rank reads only its slice."""

from __future__ import annotations

from typing import Any

import torch


class StoredTensor:
    """One tensor of an open safetensors file: its shape now, its bytes when indexed or read.

    ``tensor[a:b]`` and ``tensor[a:b, c:d]`` read only those rows (and columns); :meth:`read`
    reads it whole in one read. Valid while the weight stream that yielded it is on it (see
    ``ModelSource.weights``).
    """

    def __init__(self, file: Any, name: str):
        """``file`` is the ``safetensors.safe_open`` handle holding tensor ``name``."""
        self.name = name
        self._file = file
        self._slice = file.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor:
        return self._slice[index]

    def read(self) -> torch.Tensor:
        """The whole tensor, in the checkpoint's dtype."""
        return self._file.get_tensor(self.name)


def materialize(value: Any) -> Any:
    """A weight stream's value in memory: a ``StoredTensor`` read whole; anything else as it is
    (tensors, and GGUF's ``RawQuantizedTensor``, whose bytes are memory-mapped already)."""
    return value.read() if isinstance(value, StoredTensor) else value
