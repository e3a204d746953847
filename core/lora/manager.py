"""Adapters on the host and in device slots, and the per-token slot buffer the layers read.

The host keeps up to ``--max-cpu-loras`` loaded adapters (least recently used first out; one
evicted is read from its directory again when a request needs it). The device has
``--max-loras`` slots: per adapted projection, A [slots, partitions x max rank, in] and
B [slots, out, max rank] tensors holding all its partitions (q, k, v of qkv), an adapter of
smaller rank zero-padded; the platform's ``linear_lora`` (a quantized projection: ``lora_add``
after it) applies them all in one call. A step's adapters are placed in slots before it runs
(the scheduler admits at most ``--max-loras`` distinct adapters a step), and each token's slot
(-1: none) is written to one persistent buffer, so a captured decode graph reads the slots and
weights of whatever step it replays. A step with no adapted token runs no LoRA kernel at all
(see :attr:`LoRASlots.active`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.decoder import DecoderSettings
from .adapter import LoRAAdapter, load_adapter, partition_sizes
from .request import LoRARequest


class LoRARegistry:
    """The adapters requests have named, by id; the most recently used ones loaded on the host."""

    def __init__(self, settings: DecoderSettings, max_rank: int, max_cpu_loras: int):
        self.settings, self.max_rank, self.max_cpu_loras = settings, max_rank, max_cpu_loras
        self._requests: dict[int, LoRARequest] = {}
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()

    def register(self, request: LoRARequest) -> None:
        """Check and load ``request``'s adapter (ValueError naming the problem); known ids are free."""
        if request.lora_int_id < 1:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: lora_int_id must be >= 1, got {request.lora_int_id}")
        known = self._requests.get(request.lora_int_id)
        if known is not None:
            if known.lora_path != request.lora_path:
                raise ValueError(f"LoRA id {request.lora_int_id} already names {known.lora_path}, not "
                                 f"{request.lora_path}: give each adapter its own id")
            return
        self._remember(load_adapter(request.lora_name, request.lora_int_id, request.lora_path, self.settings,
                                    self.max_rank))
        self._requests[request.lora_int_id] = request

    def get(self, lora_id: int) -> LoRAAdapter:
        adapter = self._loaded.get(lora_id)
        if adapter is None:
            request = self._requests[lora_id]
            adapter = load_adapter(request.lora_name, lora_id, request.lora_path, self.settings, self.max_rank)
            self._remember(adapter)
        self._loaded.move_to_end(lora_id)
        return adapter

    def _remember(self, adapter: LoRAAdapter) -> None:
        self._loaded[adapter.int_id] = adapter
        while len(self._loaded) > self.max_cpu_loras:
            self._loaded.popitem(last=False)


class LinearLoRA(nn.Module):
    """One projection's slots, its partitions stacked: A [S, n * R, in] (partition i's rows i * R
    on) and B [S, out, R] (each partition's rows of the output), so one ``lora_add`` serves them all."""

    def __init__(self, slots: "LoRASlots", outs: list[int], width: int, ops: Any):
        super().__init__()
        self.slots, self.ops, self.outs = slots, ops, tuple(outs)
        count, rank = slots.num_slots, slots.max_rank
        self.lora_a = nn.Parameter(torch.zeros(count, len(outs) * rank, width), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(count, sum(outs), rank), requires_grad=False)

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base projection of ``x``, a quantized one) plus each token's adapter delta, in place."""
        if not self.slots.active:
            return y
        return self.ops.lora_add(y, x, self.lora_a, self.lora_b, self.slots.token_slots[:x.shape[0]], self.outs, 1.0)

    def project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``linear(x, weight, bias)`` plus each token's adapter delta: one ``linear_lora`` call, in
        which a platform may add the delta inside the projection's own kernel."""
        if not self.slots.active:
            return self.ops.linear(x, weight, bias)
        return self.ops.linear_lora(x, weight, bias, self.lora_a, self.lora_b, self.slots.token_slots[:x.shape[0]],
                                    self.outs, 1.0)


class LoRASlots:
    """The device side: which adapter each slot holds, the projections' slot tensors, and the
    per-token slot buffer."""

    def __init__(self, model: nn.Module, settings: DecoderSettings, registry: LoRARegistry, num_slots: int,
                 max_tokens: int, ops: Any, device: torch.device, dtype: torch.dtype):
        self.registry, self.num_slots, self.max_rank = registry, num_slots, registry.max_rank
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.active = False
        """Whether the step being launched has adapted tokens: the layers add adapters only then,
        and a decode step replays the graphs captured with it on only then."""
        self._held: list[int] = [0] * num_slots
        """The adapter id in each slot (0: empty)."""
        self._last_used: list[int] = [0] * num_slots
        self._clock = 0
        self.layers: dict[tuple[int, str], LinearLoRA] = {}
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                for index in model.stage_layers:
                    layer = model.layers[index]
                    for module, (outs, width) in partition_sizes(settings).items():
                        linear = layer.get_submodule(module)
                        linear.lora = LinearLoRA(self, outs, width, ops)
                        self.layers[(index, module)] = linear.lora
        finally:
            torch.set_default_dtype(previous)

    def place(self, lora_ids: set[int]) -> dict[int, int]:
        """Put the adapters ``lora_ids`` (at most ``num_slots``) in slots; their slot by id."""
        self._clock += 1
        placed = {lora_id: slot for slot, lora_id in enumerate(self._held) if lora_id in lora_ids}
        for lora_id in lora_ids - placed.keys():
            free = [slot for slot in range(self.num_slots) if slot not in placed.values()]
            slot = min(free, key=lambda s: (self._held[s] != 0, self._last_used[s]))
            self._load(slot, self.registry.get(lora_id))
            placed[lora_id] = slot
        for slot in placed.values():
            self._last_used[slot] = self._clock
        return placed

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        rank = self.max_rank
        for (index, module), lora in self.layers.items():
            a_slot, b_slot = lora.lora_a.data[slot], lora.lora_b.data[slot]
            a_slot.zero_()
            b_slot.zero_()
            start = 0
            for partition, out in enumerate(lora.outs):
                pair = adapter.weights.get((index, module, partition))
                if pair is not None:
                    a, b = pair
                    a_slot[partition * rank:partition * rank + a.shape[0]] = a.to(a_slot.dtype)
                    b_slot[start:start + out, :b.shape[1]] = b.to(b_slot.dtype)
                start += out
        self._held[slot] = adapter.int_id

    def set_tokens(self, token_slots: np.ndarray, padded_tokens: int) -> None:
        """Write each token's slot for the next step; rows up to ``padded_tokens`` (a graph's
        padding) get -1. A step without adapted tokens writes nothing: no LoRA kernel reads the
        buffer then (eager layers skip LoRA, and its decode graphs were captured without it)."""
        self.active = bool((token_slots >= 0).any())
        if not self.active:
            return
        staged = torch.full((padded_tokens,), -1, dtype=torch.int64)
        staged[:len(token_slots)] = torch.from_numpy(np.asarray(token_slots, dtype=np.int64))
        if self.token_slots.device.type != "cpu":
            # Pinned, so the copy queues behind the step in flight instead of waiting for it; torch's
            # caching host allocator keeps the block until the copy has read it.
            staged = staged.pin_memory()
        self.token_slots[:padded_tokens].copy_(staged, non_blocking=True)
