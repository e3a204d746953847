"""A mixture-of-experts block in place of the MLP: a router, stacked experts run by the platform's
``fused_moe`` op, and (Qwen2-MoE) a shared expert behind a sigmoid gate.

Under tensor parallelism each rank holds, by default, a slice of every expert's intermediate
width (like the dense MLP): its products are partial sums. With expert parallelism
(``--enable-expert-parallel``) each rank holds whole experts, an equal share of them, and computes
every token's pairs routed to those (the hidden states are the same on every rank); pairs routed
elsewhere add nothing. Either way one all-reduce per block sums the ranks' outputs, the shared
expert's partial sums included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...platform import KernelSet, QuantizationMethod
from ..parallel import TensorParallel
from .linear import Linear
from .mlp import GatedMLP

# The HF activation names the experts' gated activation takes, as fused_moe names them.
MOE_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoESettings:
    """How an architecture's experts are shaped and routed."""

    num_experts: int
    top_k: int
    intermediate_size: int
    """Each routed expert's width (Qwen's ``moe_intermediate_size``)."""
    renormalize: bool
    """Divide the top-k routing weights by their sum (Mixtral always; Qwen's ``norm_topk_prob``)."""
    sparse_layers: list[bool] = field(default_factory=list)
    """Per layer: an MoE block (True) or the dense MLP of ``intermediate_size``."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's always-on expert, gated by sigmoid(x @ g); 0 for none."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"the config routes each token to {self.top_k} of {self.num_experts} experts; "
                             f"num_experts_per_tok must be between 1 and the number of experts")

    def num_parameters(self, hidden: int) -> int:
        """One MoE block's parameters: router, experts, shared expert and its gate."""
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.shared_expert_intermediate_size else 0
        return self.num_experts * (hidden + 3 * hidden * self.intermediate_size) + shared


class FusedExperts(nn.Module):
    """A layer's routed experts, stacked: ``w13`` [E, 2I, H] (gate rows, then up rows) and ``w2``
    [E, H, I], this rank's share (see the module's docstring). After ``quantize`` they may be
    float8 with per-expert, per-channel scales (``w13_scale`` [E, 2I], ``w2_scale`` [E, H])."""

    def __init__(self, moe: MoESettings, hidden_size: int, activation: str, ops: KernelSet, tp: TensorParallel,
                 expert_parallel: bool):
        super().__init__()
        if activation not in MOE_ACTIVATIONS:
            raise ValueError(f"unsupported expert activation {activation!r}; supported: {', '.join(MOE_ACTIVATIONS)}")
        self.activation = MOE_ACTIVATIONS[activation]
        self.ops, self.top_k, self.renormalize = ops, moe.top_k, moe.renormalize
        self.hidden_size = hidden_size
        if expert_parallel:
            self.first_expert, self.end_expert = tp.split(moe.num_experts)
            self.columns = (0, moe.intermediate_size)
        else:
            self.first_expert, self.end_expert = 0, moe.num_experts
            self.columns = tp.split(moe.intermediate_size)
        experts, width = self.end_expert - self.first_expert, self.columns[1] - self.columns[0]
        self.w13 = nn.Parameter(torch.empty(experts, 2 * width, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(experts, hidden_size, width), requires_grad=False)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        expert_map = None
        if experts != moe.num_experts:
            # Global expert id -> index in this rank's stack, -1 for another rank's expert.
            expert_map = torch.full((moe.num_experts,), -1, dtype=torch.int32)
            expert_map[self.first_expert:self.end_expert] = torch.arange(experts, dtype=torch.int32)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self.loaded: set[tuple[str, int]] = set()

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.ops.fused_moe(x, router_logits, self.w13, self.w2, self.top_k, self.renormalize, self.activation,
                                  self.expert_map, self.w13_scale, self.w2_scale)

    def holds(self, expert: int) -> bool:
        return self.first_expert <= expert < self.end_expert

    def load(self, projection: str, value: Any, expert: int | None) -> None:
        """Load ``projection`` (gate_proj, up_proj or down_proj) of one expert (``value`` indexed
        like its [out, in] weight) or, with ``expert`` None, of every expert (``value`` indexed
        like [E, out, in], GGUF's stacked layout). Only this rank's experts and columns are read."""
        experts = [expert] if expert is not None else range(self.first_expert, self.end_expert)
        first, end = self.columns
        for global_id in experts:
            if not self.holds(global_id):
                continue
            local = global_id - self.first_expert
            stacked = (slice(global_id, global_id + 1),) if expert is None else ()
            if projection == "down_proj":
                rows = slice(0, value.shape[-2])  # explicit bounds: a quantized tensor's rows are cut by them
                piece, target = value[(*stacked, rows, slice(first, end))], self.w2.data[local]
            else:
                piece = value[(*stacked, slice(first, end))]
                rows = slice(0, end - first) if projection == "gate_proj" else slice(end - first, 2 * (end - first))
                target = self.w13.data[local, rows]
            piece = piece[0] if stacked else piece
            if tuple(piece.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint expert {global_id} {projection} slice has shape {tuple(piece.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(piece.to(target.dtype))
            self.loaded.add((projection, local))

    def missing(self) -> list[str]:
        """The expert weights no checkpoint tensor filled."""
        return [f"experts.{self.first_expert + local}.{projection}" for local in range(self.w13.shape[0])
                for projection in EXPERT_PROJECTIONS if (projection, local) not in self.loaded]

    def quantize(self, method: QuantizationMethod) -> bool:
        """Hand the stacks to ``method.quantize_experts``; False where the method keeps experts dense."""
        quantized = [method.quantize_experts(w.data) for w in (self.w13, self.w2)]
        if any(q is None for q in quantized):
            return False
        (self.w13.data, w13_scale), (self.w2.data, w2_scale) = quantized
        self.w13_scale = nn.Parameter(w13_scale, requires_grad=False)
        self.w2_scale = nn.Parameter(w2_scale, requires_grad=False)
        return True


class SparseMoeBlock(nn.Module):
    """Router -> routed experts (+ gated shared expert) -> one all-reduce under tensor parallelism.
    Parameter names are the Qwen-MoE checkpoints' (``gate``, ``experts``, ``shared_expert``,
    ``shared_expert_gate``); Mixtral's are renamed to them on loading."""

    def __init__(self, moe: MoESettings, hidden_size: int, activation: str, ops: KernelSet,
                 tp: TensorParallel = TensorParallel(), expert_parallel: bool = False):
        super().__init__()
        self.gate = Linear(hidden_size, moe.num_experts, ops)
        self.experts = FusedExperts(moe, hidden_size, activation, ops, tp, expert_parallel)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, moe.shared_expert_intermediate_size, activation, ops, tp=tp,
                                          reduce=False)
            self.shared_expert_gate = Linear(hidden_size, 1, ops)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            # Each token's gate logit is spread over its row before the sigmoid: torch's CPU kernel
            # runs whole chunks of a tensor on the vector path and its tail on a scalar one, so one
            # logit a token would take either by the batch's size (--deterministic).
            out = out + torch.sigmoid(self.shared_expert_gate(x).expand_as(shared)) * shared
        return self.tp.all_reduce(out)

    def routers(self) -> list[Linear]:
        """The small projections that pick and weigh experts: kept dense by ``--quantization``."""
        return [self.gate] + ([self.shared_expert_gate] if self.shared_expert_gate is not None else [])

