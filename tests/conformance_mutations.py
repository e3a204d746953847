"""Mutated kernels the conformance suite must catch: each is a reference op or the reference
attention with one systematic fault (accumulation in a narrow dtype, a mask or window off by
one, a scale dropped, an index shifted, an activation approximated wrongly, ...).

Not shipped with the suite: tests/test_conformance_mutations.py runs each mutation through the
suite's own check functions, in process, in every dtype the CPU platform declares, and
requires each to be caught by a margin. ``python tests/conformance_mutations.py`` prints the
table of mutations, the checks that caught them and by how much (docs/plugins.md quotes it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.platform import AttentionBackend
from runtime.platform.reference import OPS, paged_attention
from runtime.platform.reference.attention import ReferenceAttentionBackend, gather_kv, write_kv
from runtime_conformance.compare import Margin, dtype_name, recording
from runtime_conformance.kernel_checks import CHECKS
from runtime_conformance.paged import SCENARIOS, PagedRun
from runtime_conformance.specs import spec_for

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NARROW = {torch.float32: torch.bfloat16, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
"""Where a mutation lowers precision: float32 work done in bfloat16 (as TF32 or a bf16 "float32"
would), float16 and bfloat16 work done in the dtype itself instead of float32."""
MARGIN = 1.5
"""A mutation is caught by a margin when a check fails on a comparison whose mean error is at
least this many times the mean limit: a fault in one value cannot do that."""


@dataclass(frozen=True)
class Mutation:
    name: str
    fault: str
    checks: tuple[str, ...]
    """What to run: a kernel op's check, or ``attention:SCENARIO[:FEATURE]`` (FEATURE ``window5``,
    ``softcap30``, ``gqa4``, ... as runtime_conformance.checks.test_attention names them)."""
    kernel: Callable | None = None
    """The mutated op (kernel mutations), taking the reference op's arguments."""
    attention: Callable | None = None
    """(query, key, value, kv_cache, meta, spec) -> output (attention mutations)."""
    dtypes: tuple[torch.dtype, ...] = DTYPES
    """Where it is a fault: rounding cos/sin to the model dtype (as HF does) or summing a token's
    experts in it (as vLLM's moe_sum does) is what production bfloat16 kernels do, within the
    contract's rounding; in float32 the same is a narrow-precision fault."""


def _narrow(dtype: torch.dtype) -> torch.dtype:
    return NARROW[dtype]


def _linear_narrow_accumulation(x, weight, bias=None):
    acc = _narrow(x.dtype)
    out = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=acc)
    for k in range(0, x.shape[-1], 16):  # a tile of 16 along the reduction, the sum rounded after each
        out = (out.float() + F.linear(x[..., k:k + 16].float(), weight[:, k:k + 16].float())).to(acc)
    return (out if bias is None else out + bias.to(acc)).to(x.dtype)


def _rms_norm_eps_outside_sqrt(x, weight, eps):
    xf = x.float()
    return (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight.float()).to(x.dtype)


def _rotary_cache_in_dtype(positions, query, key, cache, is_neox=True):
    return OPS["rotary_embedding"](positions, query, key, cache.to(_narrow(query.dtype)).float(), is_neox)


def _moe_sum_in_dtype(x, logits, w13, w2, top_k, renormalize, activation="silu", expert_map=None, w13_scale=None,
                      w2_scale=None):
    """Each token's k experts summed in the input dtype: the k=1 pass of the reference per expert, added up narrow."""
    weights, ids = torch.topk(torch.softmax(logits.float(), -1), top_k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    acc = _narrow(x.dtype)
    out = torch.zeros(x.shape, dtype=acc)
    for j in range(top_k):
        one_hot = torch.full_like(logits, -1e9).scatter(1, ids[:, j:j + 1], 0.0)  # routes every token to its j-th expert
        expert = OPS["fused_moe"](x, one_hot, w13, w2, 1, False, activation, expert_map, w13_scale, w2_scale)
        out = (out.float() + weights[:, j:j + 1] * expert.float()).to(acc)
    return out.to(x.dtype)


def _reference_attention(**changes):
    """The reference attention with some of its arguments replaced (each a function of the spec)."""
    def forward(query, key, value, kv_cache, meta, spec):
        args = {"scale": spec.scale, "sliding_window": spec.sliding_window, "logits_soft_cap": spec.logits_soft_cap,
                "compute_dtype": torch.float32}
        args.update({name: change(spec) for name, change in changes.items()})
        return paged_attention(query, key, value, kv_cache, meta, **args)
    return forward


def _attention_narrow_accumulation(query, key, value, kv_cache, meta, spec):
    """Scores and softmax in float32, the probability-weighted sum of V kept in a narrow dtype,
    rounded after each tile of 16 keys (a kernel whose output accumulator is narrow)."""
    write_kv(key, value, kv_cache, meta.slot_mapping)
    acc, out = _narrow(query.dtype), torch.empty_like(query)
    starts = meta.query_start_loc.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        q = query[starts[i]:starts[i + 1]].float()
        k, v = gather_kv(kv_cache, meta.block_table[i], seq_len)
        group = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * spec.scale
        causal = torch.arange(seq_len) <= torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        total = torch.zeros(q.shape, dtype=acc)
        for t in range(0, seq_len, 16):
            total = (total.float() + torch.einsum("hqk,khd->qhd", probs[..., t:t + 16], v[t:t + 16])).to(acc)
        out[starts[i]:starts[i + 1]] = total.to(query.dtype)
    return out


def _attention_diagonal_masked(query, key, value, kv_cache, meta, spec):
    """Each query sees the positions before its own, not its own: the causal mask off by one."""
    write_kv(key, value, kv_cache, meta.slot_mapping)
    shorter = meta.seq_lens - 1
    shifted = dataclasses.replace(meta, seq_lens=shorter, seq_lens_cpu=shorter.tolist(),
                                  slot_mapping=torch.full_like(meta.slot_mapping, -1))
    return paged_attention(query, key, value, kv_cache, shifted, spec.scale, spec.sliding_window,
                           spec.logits_soft_cap, compute_dtype=torch.float32).nan_to_num()


def _attention_kv_head_modulo(query, key, value, kv_cache, meta, spec):
    """Query head h reads KV head h % Hkv instead of h // (H / Hkv): GQA groups interleaved, not contiguous."""
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    group = heads // kv_heads
    position = torch.tensor([(h % kv_heads) * group + h // kv_heads for h in range(heads)])
    moved = torch.empty_like(query)
    moved[:, position] = query
    out = paged_attention(moved, key, value, kv_cache, meta, spec.scale, spec.sliding_window, spec.logits_soft_cap,
                          compute_dtype=torch.float32)
    return out[:, position]


_GENERIC = ("attention:decode", "attention:mixed")
MUTATIONS = [
    Mutation("linear-narrow-accumulation", "the product accumulated in tiles of 16, rounded to a narrow dtype after each",
             ("linear",), kernel=_linear_narrow_accumulation),
    Mutation("rms_norm-eps-outside-sqrt", "x / (sqrt(mean(x^2)) + eps) instead of x / sqrt(mean(x^2) + eps)",
             ("rms_norm",), kernel=_rms_norm_eps_outside_sqrt),
    Mutation("rms_norm-offset-weight", "the weight applied as (1 + w), Gemma's convention on the wrong model",
             ("rms_norm",), kernel=lambda x, w, eps: OPS["rms_norm"](x, (1 + w.float()).to(w.dtype), eps)),
    Mutation("rotary-position-shifted", "every token rotated for the position after its own",
             ("rotary_embedding",), kernel=lambda p, q, k, c, neox=True: OPS["rotary_embedding"](p + 1, q, k, c, neox)),
    Mutation("rotary-cos-sin-narrow", "cos/sin rounded to a narrow dtype before the rotation",
             ("rotary_embedding",), kernel=_rotary_cache_in_dtype, dtypes=(torch.float32,)),
    Mutation("qk-norm-after-rotary", "each head rotated first and normed after, the two steps in the wrong order",
             ("qk_norm_rotary_embedding",),
             kernel=lambda p, q, k, qw, kw, eps, c, neox=True: tuple(
                 OPS["rms_norm"](t, w, eps) for t, w in zip(OPS["rotary_embedding"](p, q, k, c, neox), (qw, kw)))),
    Mutation("qk-norm-weights-swapped", "the key's norm weight on the query heads and the query's on the keys",
             ("qk_norm_rotary_embedding",),
             kernel=lambda p, q, k, qw, kw, eps, c, neox=True: OPS["qk_norm_rotary_embedding"](p, q, k, kw, qw, eps, c,
                                                                                             neox)),
    Mutation("rotary-layout-swapped", "interleaved pairs rotated where NeoX halves are asked, and back",
             ("rotary_embedding",), kernel=lambda p, q, k, c, neox=True: OPS["rotary_embedding"](p, q, k, c, not neox)),
    Mutation("silu_and_mul-halves-swapped", "silu applied to the up half, multiplied by the gate",
             ("silu_and_mul",), kernel=lambda x: OPS["silu_and_mul"](torch.cat(x.chunk(2, -1)[::-1], -1))),
    Mutation("gelu_and_mul-approximation-swapped", "the tanh approximation where erf is asked, and erf for tanh",
             ("gelu_and_mul",),
             kernel=lambda x, approximate="none": OPS["gelu_and_mul"](x, "tanh" if approximate == "none" else "none")),
    Mutation("lora_shrink-scale-dropped", "the adapter's scale not applied", ("lora_shrink",),
             kernel=lambda x, a, slots, scale: OPS["lora_shrink"](x, a, slots, 1.0)),
    Mutation("lora_expand-next-slot", "each token reads the B of the slot after its own", ("lora_expand",),
             kernel=lambda s, b, slots, base: OPS["lora_expand"](s, b, torch.where(slots >= 0, (slots + 1) % b.shape[0], slots), base)),
    Mutation("lora_add-scale-dropped", "the adapter's scale not applied", ("lora_add",),
             kernel=lambda y, x, a, b, slots, slices, scale: OPS["lora_add"](y, x, a, b, slots, slices, 1.0)),
    Mutation("linear_lora-adapters-dropped", "the projection alone, no adapter added", ("linear_lora",),
             kernel=lambda x, w, bias, a, b, slots, slices, scale: OPS["linear"](x, w, bias)),
    Mutation("linear_lora-partitions-swapped", "each partition's adapter product added to the other's columns",
             ("linear_lora",),
             kernel=lambda x, w, bias, a, b, slots, slices, scale: OPS["linear_lora"](
                 x, w, bias, a.roll(a.shape[1] // len(slices), 1) if len(slices) > 1 else a * 0, b, slots, slices, scale)),
    Mutation("fused_moe-renormalize-ignored", "the top-k weights never divided by their sum", ("fused_moe",),
             kernel=lambda x, lg, w13, w2, k, renorm, *a, **kw: OPS["fused_moe"](x, lg, w13, w2, k, False, *a, **kw)),
    Mutation("fused_moe-narrow-sum", "each token's experts summed in a narrow dtype", ("fused_moe",),
             kernel=_moe_sum_in_dtype, dtypes=(torch.float32,)),
    Mutation("attention-narrow-scores", "scores and softmax computed in a narrow dtype", ("attention:mixed",),
             attention=_reference_attention(compute_dtype=lambda spec: _narrow(spec.dtype)), dtypes=(torch.float32,)),
    Mutation("attention-narrow-accumulation", "the weighted sum of V accumulated in a narrow dtype, tiles of 16 keys",
             _GENERIC + ("attention:long_context",), attention=_attention_narrow_accumulation),
    Mutation("attention-scale-dropped", "scores not multiplied by the softmax scale", _GENERIC,
             attention=_reference_attention(scale=lambda spec: 1.0)),
    Mutation("attention-diagonal-masked", "the causal mask off by one: a query does not see its own position",
             _GENERIC, attention=_attention_diagonal_masked),
    Mutation("attention-kv-head-modulo", "GQA query head h reads KV head h % Hkv",
             ("attention:mixed:gqa4", "attention:decode:gqa8"), attention=_attention_kv_head_modulo),
    Mutation("attention-window-off-by-one", "a sliding window of W sees W + 1 positions",
             ("attention:mixed:window5", "attention:mixed:window37"),
             attention=_reference_attention(sliding_window=lambda spec: spec.sliding_window + 1)),
    Mutation("attention-soft-cap-dropped", "logits never soft-capped",
             ("attention:mixed:softcap5", "attention:mixed:softcap30"),
             attention=_reference_attention(logits_soft_cap=lambda spec: None)),
]


def _attention_spec(feature: str | None, dtype: torch.dtype):
    from runtime_conformance.checks.test_attention import FEATURES, HEAD_LAYOUTS
    if feature in HEAD_LAYOUTS:
        heads, kv_heads = HEAD_LAYOUTS[feature]
        return spec_for(ReferenceAttentionBackend, dtype, num_heads=heads, num_kv_heads=kv_heads)
    window, cap = FEATURES[feature] if feature else (None, None)
    return spec_for(ReferenceAttentionBackend, dtype, sliding_window=window, logits_soft_cap=cap)


def _mutant_backend(forward: Callable) -> type[AttentionBackend]:
    return type("Mutant", (ReferenceAttentionBackend,),
                {"forward": lambda self, q, k, v, cache, meta: forward(q, k, v, cache, meta, self.spec)})


@dataclass
class Outcome:
    check: str
    dtype: str
    message: str | None
    """The check's failure, None when it passed."""
    margin: Margin | None
    """The failing comparison's statistics."""

    @property
    def ratio(self) -> float:
        """The failing comparison's mean error over its mean limit (0 when the check passed)."""
        if self.message is None:
            return 0.0
        return self.margin.mean / self.margin.limit_mean if self.margin else float("inf")


def run(mutation: Mutation, dtype: torch.dtype) -> list[Outcome]:
    """Every check of ``mutation`` in ``dtype``, on the CPU, through the suite's own check code."""
    outcomes = []
    for check in mutation.checks:
        with recording() as margins:
            try:
                if mutation.kernel is not None:
                    CHECKS[check](mutation.kernel, dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
                else:
                    _, scenario, *feature = check.split(":")
                    spec = _attention_spec(feature[0] if feature else None, dtype)
                    backend = _mutant_backend(mutation.attention)
                    PagedRun(SCENARIOS[scenario], spec, backend, torch.device("cpu")).run(backend(spec))
                message = None
            except AssertionError as error:
                message = str(error)
        closest = max(margins, key=lambda m: m.used) if margins and message else None
        outcomes.append(Outcome(check, dtype_name(dtype), message, closest))
    return outcomes


def table() -> str:
    """Markdown: each mutation, in each dtype the checks that caught it and the mean error over its limit."""
    lines = ["| mutation | fault | " + " | ".join(dtype_name(d) for d in DTYPES) + " |",
             "| --- | --- |" + " --- |" * len(DTYPES)]
    for mutation in MUTATIONS:
        cells = []
        for dtype in DTYPES:
            caught = [o for o in run(mutation, dtype) if o.message] if dtype in mutation.dtypes else None
            cells.append("not checked" if caught is None else
                         ", ".join(f"{o.check} ({o.ratio:.3g}x)" for o in caught) or "**missed**")
        lines.append(f"| {mutation.name} | {mutation.fault} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
