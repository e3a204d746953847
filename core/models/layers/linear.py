"""Linear layers whose weights may come from a quantization method, and fused projections."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from typing import Any, Iterator

import torch
from torch import nn

from ...platform import KernelSet, QuantizationMethod, RawQuantizedTensor
from ...platform.packed import cat_raw_rows, cut_columns
from ..parallel import TensorParallel

_DEFER_DENSE = contextvars.ContextVar("defer_dense_weights", default=False)


@contextlib.contextmanager
def deferred_dense_weights() -> Iterator[None]:
    """Linear layers built inside allocate their dense weight only when a dense tensor is loaded
    into it. A quantized checkpoint's layers that stay packed then never hold the dense copy, so
    a model loads wherever its packed weights fit, not only where the dense model would."""
    token = _DEFER_DENSE.set(True)
    try:
        yield
    finally:
        _DEFER_DENSE.reset(token)


class Linear(nn.Module):
    """y = x @ W.T + b. ``W`` is a dense parameter, or what ``quant_method.load`` returned.

    ``partitions`` lists the output sizes of fused projections (q/k/v, gate/up): a checkpoint
    that stores them apart loads each into its row range with :meth:`load_partition`. A dense
    weight is multiplied by the platform's ``linear`` op.

    Under tensor parallelism (models/parallel.py) a rank keeps a slice of the checkpoint's
    weight: ``rows`` gives, per partition, the [start, end) of the checkpoint rows it holds
    (column-parallel; rows past the checkpoint's end stay zero, for padded vocabularies);
    ``columns`` the [start, end) of the input columns (row-parallel), whose partial products
    ``reduce`` sums across the group before the bias is added. ``stored`` gives the checkpoint's
    partition sizes, for a fused tensor stored whole (Phi-3's qkv_proj) that a rank cuts up.
    Loading indexes the checkpoint tensor once per partition with the rank's rows and columns,
    so a lazily read one (``StoredTensor``) reads only the rank's slice.
    """

    def __init__(self, in_features: int, out_features: int | list[int], ops: KernelSet, bias: bool = False,
                 rows: list[tuple[int, int]] | None = None, columns: tuple[int, int] | None = None,
                 reduce: TensorParallel | None = None, stored: list[int] | None = None):
        super().__init__()
        self.ops = ops
        self.partitions = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features, self.out_features = in_features, sum(self.partitions)
        self._deferred_home = torch.empty(0).device
        """Where a deferred dense weight (``deferred_dense_weights``), on the meta device until
        :meth:`dense_weight`, is to be allocated."""
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features,
                                               device="meta" if _DEFER_DENSE.get() else None), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.quant_method: QuantizationMethod | None = None
        self.quant_weight: Any = None
        self.rows, self.columns = rows, columns
        self.reduce = reduce if reduce is not None and reduce.size > 1 else None
        self.stored = stored
        self.lora: nn.Module | None = None
        """The LoRA slots of this projection (core/lora/manager.py) when adapters are enabled."""
        self._packed_parts: dict[int, RawQuantizedTensor] = {}
        """Quantized partitions read so far, kept packed until the last one arrives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.reduce is not None else self.bias
        if self.quant_method is not None:
            y = self.quant_method.apply(self.quant_weight, x, bias)
            if self.lora is not None:
                y = self.lora.add_to(x, y)
        elif self.lora is not None:
            y = self.lora.project(x, self.weight, bias)
        else:
            y = self.ops.linear(x, self.weight, bias)
        if self.reduce is not None:
            y = self.reduce.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y

    @property
    def sharded(self) -> bool:
        return self.rows is not None or self.columns is not None

    @property
    def stored_bytes(self) -> int:
        """Bytes the weight occupies as stored: the dense parameter, or every tensor the method keeps."""
        return _tensor_bytes(self.quant_weight) if self.quant_method is not None else _tensor_bytes(self.weight)

    @property
    def home(self) -> torch.device:
        """The device the layer's weights live on."""
        return self._deferred_home if self.weight.is_meta else self.weight.device

    def dense_weight(self) -> nn.Parameter:
        """The dense weight parameter, allocated now if it was deferred."""
        if self.weight.is_meta:
            self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype,
                                                    device=self._deferred_home),
                                       requires_grad=False)
        return self.weight

    def partition_rows(self, index: int) -> slice:
        start = sum(self.partitions[:index])
        return slice(start, start + self.partitions[index])

    def shard(self, name: str, index: int, value: Any, start: int, size: int) -> torch.Tensor:
        """This rank's part of partition ``index`` of checkpoint tensor ``name`` (weight or bias),
        which occupies rows [start, start + size) of ``value``, in one indexing of ``value``: a
        lazily stored tensor then reads only those rows (and, row-parallel, columns)."""
        first, end = self.rows[index] if self.rows is not None else (0, size)
        rows = slice(start + first, start + min(end, size))
        if self.columns is not None and name == "weight":
            return value[rows, self.columns[0]:self.columns[1]]
        return value[rows]

    def load_whole(self, name: str, value: Any) -> None:
        """Load a checkpoint tensor holding every partition (this rank keeps its slice of each).
        ``value`` is anything indexed like a tensor."""
        sizes = self.stored if len(self.partitions) > 1 else [value.shape[0]]
        if value.shape[0] != sum(sizes):
            raise ValueError(f"checkpoint {name} has {value.shape[0]} rows, expected "
                             f"{' + '.join(map(str, sizes))} = {sum(sizes)}")
        for index, start in enumerate(itertools.accumulate(sizes[:-1], initial=0)):
            self._copy_partition(name, index, self.shard(name, index, value, start, sizes[index]))

    def load_partition(self, name: str, index: int, value: Any) -> None:
        """Load partition ``index`` stored as a tensor of its own, indexed like in :meth:`load_whole`."""
        self._copy_partition(name, index, self.shard(name, index, value, 0, value.shape[0]))

    def load_packed(self, index: int | None, raw: RawQuantizedTensor, method: QuantizationMethod) -> bool:
        """Keep a quantized checkpoint weight packed: partition ``index`` stored apart, or (None)
        the tensor holding every partition. This rank's rows (and, row-parallel, input columns)
        are cut from the packed data; once every partition is in, they are stacked and handed to
        ``method.load`` as one weight. False, loading nothing, where the packed rows cannot fill
        the partition (a vocabulary padded for tensor parallelism): load it dense instead."""
        sizes = self.stored if len(self.partitions) > 1 else [raw.shape[0]]
        if index is None and raw.shape[0] != sum(sizes):
            raise ValueError(f"checkpoint weight has {raw.shape[0]} rows, expected {' + '.join(map(str, sizes))} = {sum(sizes)}")
        pieces = ({index: (0, raw.shape[0])} if index is not None
                  else {i: (start, sizes[i]) for i, start in enumerate(itertools.accumulate(sizes[:-1], initial=0))})
        for i, (start, size) in pieces.items():
            first, end = self.rows[i] if self.rows is not None else (0, size)
            if min(end, size) - first != self.partitions[i]:
                return False
            part = raw.rows(start + first, start + min(end, size))
            self._packed_parts[i] = part if self.columns is None else cut_columns(part, *self.columns)
        if len(self._packed_parts) == len(self.partitions):
            whole = cat_raw_rows([self._packed_parts.pop(i) for i in range(len(self.partitions))])
            stored = method.load(whole, self.weight.dtype, self.home)
            if isinstance(stored, torch.Tensor):
                if stored.shape != self.weight.shape:
                    raise ValueError(f"quantized checkpoint weight has shape {tuple(stored.shape)}, expected "
                                     f"{tuple(self.weight.shape)}")
                self.dense_weight().data.copy_(stored)
            else:
                self.quant_method, self.quant_weight = method, stored
                self.weight = nn.Parameter(torch.empty(0, device=self.home, dtype=self.weight.dtype), requires_grad=False)
        return True

    def _copy_partition(self, name: str, index: int, value: torch.Tensor) -> None:
        target = self.bias if name == "bias" else self.dense_weight()
        rows = self.partition_rows(index)
        if self.rows is not None and value.shape[0] < self.partitions[index]:
            rows = slice(rows.start, rows.start + value.shape[0])  # a padded vocabulary's last rows stay zero
            target.data[rows.stop:self.partition_rows(index).stop] = 0
        if value.shape != target[rows].shape:
            raise ValueError(f"checkpoint {name} partition {index} has shape {tuple(value.shape)}, expected {tuple(target[rows].shape)}")
        target.data[rows] = value.to(target.dtype)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a method's stored weight: a tensor, a sequence or a dataclass of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0
