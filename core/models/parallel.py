"""Tensor and pipeline parallelism for the one decoder: which slice of each weight a rank holds,
and the collectives that put the pieces back together (Megatron's split); which layers a
pipeline stage holds.

Column-parallel projections (q/k/v, gate/up, lm_head) keep a slice of the output rows: each rank
computes its heads or its part of the intermediate width, no communication. Row-parallel ones
(o, down) keep the matching slice of the input columns: each rank's product is a partial sum, and
one all-reduce per projection completes it. The embedding table is split by vocabulary rows:
a rank looks up the ids in its range, zeros the rest, and an all-reduce sums the pieces. Logits
are gathered from the ranks' vocabulary slices. KV heads split like query heads; when there are
fewer KV heads than ranks, each KV head is replicated on ``size / num_kv_heads`` ranks.

A pipeline stage holds a contiguous run of layers: the first also the embedding, the last the
final norm and lm_head (and the embedding table too when the two are tied). Stages hand each
other the hidden state and the residual; the runner does the sending (worker/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..platform import Communicator


@dataclass
class TensorParallel:
    """This rank's place in its tensor-parallel group; ``comm`` is None when ``size`` is 1."""

    rank: int = 0
    size: int = 1
    comm: Optional[Communicator] = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else self.comm.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.size == 1 else self.comm.all_gather(x, dim=dim)

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of ``total`` (which the size divides)."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    def padded_split(self, total: int) -> tuple[int, int, int]:
        """(start, end, share) of this rank's share of ``total`` rounded up to a multiple of the
        size; ``end`` is clipped to ``total`` (the last ranks may hold fewer real rows)."""
        share = -(-total // self.size)
        start = min(self.rank * share, total)
        return start, min(start + share, total), share

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """[first, end) of the KV heads this rank holds: a share of them, or the one it replicates."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads)
        head = self.rank * num_kv_heads // self.size
        return head, head + 1


def valid_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    """Tensor-parallel sizes this shape splits into: the query heads and the intermediate width
    divide evenly, and the KV heads either divide or are replicated whole."""
    return [n for n in range(1, num_heads + 1)
            if num_heads % n == 0 and intermediate_size % n == 0
            and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]


def check_tensor_parallel(size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Raise ValueError naming the valid sizes when the model does not split ``size`` ways."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {size}")
    valid = valid_sizes(num_heads, num_kv_heads, intermediate_size)
    if size not in valid:
        raise ValueError(f"the model ({num_heads} attention heads, {num_kv_heads} KV heads, intermediate size "
                         f"{intermediate_size}) does not split across --tensor-parallel-size {size}; valid sizes: "
                         f"{', '.join(map(str, valid))}")


def check_expert_split(size: int, moe: Any, expert_parallel: bool) -> None:
    """Raise ValueError when a mixture-of-experts model's experts do not split ``size`` ways:
    whole experts per rank with ``expert_parallel``, else each expert's intermediate width (and
    the shared expert's). ``moe`` is the model's ``MoESettings``, None for a dense model."""
    if moe is None:
        if expert_parallel:
            raise ValueError("--enable-expert-parallel needs a mixture-of-experts model; this one has no experts")
        return
    if expert_parallel and moe.num_experts % size:
        raise ValueError(f"the model's {moe.num_experts} experts do not split evenly across --tensor-parallel-size "
                         f"{size} with --enable-expert-parallel; use a size that divides {moe.num_experts}")
    widths = [] if expert_parallel else [moe.intermediate_size]
    widths += [moe.shared_expert_intermediate_size] if moe.shared_expert_intermediate_size else []
    for width in widths:
        if width % size:
            hint = "" if expert_parallel else " or --enable-expert-parallel"
            raise ValueError(f"the experts' intermediate size {width} does not split across --tensor-parallel-size "
                             f"{size}; use a size that divides it{hint}")


@dataclass(frozen=True)
class PipelineParallel:
    """This rank's pipeline stage: ``rank`` of ``size`` stages."""

    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        """This stage's layers: an equal share each, the first stages taking one more where the
        count does not divide (the last stage also computes logits and samples)."""
        share, extra = divmod(num_layers, self.size)
        start = self.rank * share + min(self.rank, extra)
        return range(start, start + share + (self.rank < extra))


def check_pipeline_parallel(size: int, num_layers: int) -> None:
    """Raise ValueError when ``size`` stages cannot each hold a layer."""
    if size < 1:
        raise ValueError(f"--pipeline-parallel-size must be >= 1, got {size}")
    if size > num_layers:
        raise ValueError(f"the model has {num_layers} layers, fewer than --pipeline-parallel-size {size}: "
                         f"use at most {num_layers} stages")
