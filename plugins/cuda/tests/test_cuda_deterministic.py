"""--deterministic on the CUDA plugin: the one-plan matmul and the fixed attention plan give a row
the same bits alone and inside batches of 2 to 64 random rows (runtime_conformance's check), and,
on a GPU, engines in bfloat16 with CUDA graphs return a request's tokens and logprobs bitwise the
same alone and mixed into a busy batch (every tiny architecture and the Llama-3-8B shape).

Without a GPU only the matmul's values are checked (under Triton's interpreter, float32): the
interpreter runs tl.dot as a numpy matmul of the whole tile, whose rows are not independent of
each other as the GPU's matrix units are, and its attention takes minutes.
"""

from __future__ import annotations

import gc
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from runtime_conformance.batch_invariance import (RowDims, RowOp, assert_batch_invariant, assert_chunking_invariant,
                                                  attention_row_op, row_ops)

batch_invariant = pytest.importorskip("runtime_triton.batch_invariant", reason="runtime-triton's kernels need triton")
from runtime_cuda.backend import CudaTritonAttentionBackend  # noqa: E402

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
LLAMA3_8B_ROWS = RowDims(hidden=4096, out_features=6144, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                         vocab=128256, rope_theta=500000.0)
"""The conformance check's row ops at Llama-3-8B's sizes: a kernel may change its plan with the width."""
LLAMA3_8B_LINEARS = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
"""(in, out) of every projection: fused qkv, o, fused gate/up, down, lm_head."""
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter's tl.dot mixes a tile's rows")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_batch_invariant_linear_matches_torch(dtype, device, require_dot):
    require_dot(dtype)
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype).to(device) for shape in ((70, 200), (130, 200), (130,)))
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
    tolerance = 1e-4 if dtype == torch.float32 else 0.25
    assert (batch_invariant.linear(x, w, b).double() - expected).abs().max().item() < tolerance


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_the_persistent_variant_computes_every_tile_once(with_bias, device):
    """Past 256 rows on Hopper the matmul walks its tiles from one program per multiprocessor in
    groups of row tiles, its operands copied by tensor descriptors: with ragged edges in every
    dimension, two groups (the second partial) and more tiles than programs, every output element
    is the pointer kernel's and the float64 product's."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(device) for shape in ((150, 72), (200, 72), (200,)))
    b = b if with_bias else None
    tiling = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)
    out = torch.full((150, 200), float("nan"), device=device)
    batch_invariant.launch_persistent(x, w, b, out, tiling, programs=3)
    assert torch.equal(out, batch_invariant.linear(x, w, b, plan=tiling))
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert (out.double() - expected).abs().max().item() < 1e-4


def test_a_plan_too_large_for_shared_memory_shrinks_and_is_remembered(monkeypatch):
    """The few-row plans were tuned on an H100's shared memory: on a GPU with less, the launch
    (Triton's OutOfResources, at compile time) is retried with fewer stages, then a shallower K step,
    and the plan that fit is used straight away next time. The kernel is a stand-in that only fits
    two stages and 64-deep K steps."""
    from small_shared_memory import KernelFitting

    launches = []
    monkeypatch.setattr(batch_invariant, "_matmul_kernel", KernelFitting(launches, max_stages=2, max_k=64))
    monkeypatch.setattr(batch_invariant, "FITTED_TILES", {})
    x, w = torch.randn(3, 512).bfloat16(), torch.randn(4096, 512).bfloat16()
    assert batch_invariant.tiles(3, x.dtype, 4096, 512, 132)["BLOCK_K"] == 256
    batch_invariant.linear(x, w)
    assert launches == [(256, 4), (256, 3), (256, 2), (256, 1), (128, 2), (128, 1), (64, 2)]
    launches.clear()
    batch_invariant.linear(x, w)
    assert launches == [(64, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter's tl.dot mixes a tile's rows")
def test_batch_invariant_linear_rows_do_not_depend_on_the_batch(dtype, device):
    assert_batch_invariant(row_ops(batch_invariant.linear, dtype, device)["linear"], f"cuda linear ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter's tl.dot mixes a tile's rows")
def test_deterministic_attention_plan_does_not_depend_on_the_batch(dtype, device):
    assert_batch_invariant(attention_row_op(CudaTritonAttentionBackend, dtype, device), f"triton attention ({dtype})")


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def _engine_alone_and_mixed(model: str, dtype: str, sampled: int, greedy: int):
    sys.path.insert(0, str(REPO_TESTS))
    from determinism import mixed_jobs, run_schedule, targets

    from runtime.engine.args import EngineArgs
    from runtime.engine.core import EngineCore

    # CUDA graphs stay on (no enforce_eager): decode steps replay captured batch-invariant kernels.
    core = EngineCore(EngineArgs(model=model, dtype=dtype, deterministic=True, max_model_len=512,
                                 max_num_batched_tokens=64, kv_cache_memory="2GiB", enable_prefix_caching=True))
    rng = random.Random(0)
    vocab = min(core.runner.settings.vocab_size, 30000)
    target_jobs = targets(rng, vocab, sampled, greedy, max_tokens=16)
    alone = {rid: run_schedule(core, [(0, rid, prompt, params)])[rid] for _, rid, prompt, params in target_jobs}
    mixed = run_schedule(core, mixed_jobs(rng, vocab, target_jobs, others=40, last_step=12))
    core.shutdown()
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return alone, mixed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_tiny_models_in_bfloat16_do_not_depend_on_the_batch(arch, tmp_path):
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    alone, mixed = _engine_alone_and_mixed(str(make_tiny_checkpoint(tmp_path, arch)), "bfloat16", sampled=10, greedy=10)
    for rid in alone:
        assert mixed[rid] == alone[rid], f"{arch} {rid}: tokens or logprobs differ alone and mixed into a batch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama3_8b_shape_does_not_depend_on_the_batch(tmp_path):
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    # A 16 GB checkpoint: reuse the benchmarks' random one (benchmarks/gpu_serve.sh boot) when it is there.
    shared = Path(os.environ.get("RUNTIME_LLAMA8B_DIR", "/nonexistent"))
    path = shared if (shared / "config.json").exists() else make_tiny_checkpoint(tmp_path, "llama", **LLAMA3_8B)
    alone, mixed = _engine_alone_and_mixed(str(path), "bfloat16", sampled=20, greedy=20)
    problems = [_first_difference(rid, alone[rid], mixed[rid]) for rid in alone if mixed[rid] != alone[rid]]
    assert not problems, "Llama-3-8B shape, alone vs mixed: " + "; ".join(problems)


def _first_difference(rid: str, alone: tuple[list, list], mixed: tuple[list, list]) -> str:
    """Where a request's output first departs: the token (the sampler or the logits) or only its
    logprobs (the logits: then the forward pass depends on the batch)."""
    (tokens, logprobs), (mixed_tokens, mixed_logprobs) = alone, mixed
    for i, (a, b) in enumerate(zip(tokens, mixed_tokens)):
        if a != b or logprobs[i] != mixed_logprobs[i]:
            same = "same logprobs" if logprobs[i] == mixed_logprobs[i] else "logprobs differ"
            return f"{rid} output {i}: token {a} alone, {b} mixed ({same})"
    return f"{rid}: {len(tokens)} tokens alone, {len(mixed_tokens)} mixed"


def _deterministic_cuda_ops():
    from runtime.platform.registry import get_registry

    return get_registry().kernels("cuda", deterministic=True)


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
                                "apply_top_k_top_p_min_p"])
def test_what_deterministic_mode_runs_does_not_depend_on_the_batch_at_llama3_8b_sizes(op):
    """Every op ``--deterministic`` picks on cuda (kernel or the core's reference run on the GPU)."""
    fn = getattr(_deterministic_cuda_ops(), op)
    assert_batch_invariant(row_ops(fn, torch.bfloat16, torch.device("cuda"), LLAMA3_8B_ROWS)[op], f"{op} at 8B sizes")


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("k,n", LLAMA3_8B_LINEARS, ids=lambda v: str(v))
def test_deterministic_linear_does_not_depend_on_the_batch_at_llama3_8b_sizes(k, n):
    dims = RowDims(hidden=k, out_features=n)
    op = row_ops(_deterministic_cuda_ops().linear, torch.bfloat16, torch.device("cuda"), dims)["linear"]
    # Past 64, 256 and 2048 rows too: the kernel's tiles change with the row count (its reduction order does not).
    assert_batch_invariant(op, f"linear [{n}, {k}]", sizes=(2, 9, 64, 65, 300, 1100, 2100))


@pytest.mark.gpu
@GPU_ONLY
def test_deterministic_attention_plan_does_not_depend_on_the_batch_at_llama3_8b_sizes():
    op = attention_row_op(CudaTritonAttentionBackend, torch.bfloat16, torch.device("cuda"), LLAMA3_8B_ROWS)
    assert_batch_invariant(op, "triton attention at 8B sizes")
    assert_chunking_invariant(CudaTritonAttentionBackend, torch.bfloat16, torch.device("cuda"), LLAMA3_8B_ROWS)


@pytest.mark.gpu
@GPU_ONLY
def test_the_samplers_log_softmax_does_not_depend_on_the_batch_at_llama3_8b_vocab():
    """The sampler's logprobs are torch's log_softmax over the vocabulary on the GPU."""
    op = RowOp(lambda n, g: {"logits": torch.randn(n, LLAMA3_8B_ROWS.vocab, generator=g) * 3},
               lambda a, r: a["logits"][r].cuda().log_softmax(-1))
    assert_batch_invariant(op, "log_softmax over 128256")


@pytest.mark.gpu
@GPU_ONLY
def test_the_whole_sampler_does_not_depend_on_the_batch_at_llama3_8b_vocab():
    """Temperature, top-k 40, top-p 0.9, softmax and each seeded row's own noise, as the engine's
    deterministic sampler runs them, on bfloat16-valued logits (ties at the top-k/top-p edges)."""
    from types import SimpleNamespace

    from runtime import SamplingParams
    from runtime.sample.sampler import Sampler, SamplingMetadata

    sampler = Sampler(_deterministic_cuda_ops().apply_top_k_top_p_min_p)

    def run(a, rows):
        requests = [SimpleNamespace(request_id=str(r), output_token_ids=[], prompt_token_ids=[1],
                                    eos_token_ids=set(), sampling_params=a["params"][r]) for r in rows.tolist()]
        meta = SamplingMetadata.from_requests(requests, LLAMA3_8B_ROWS.vocab, "cuda", {})
        out = sampler(a["logits"][rows].cuda(), meta)
        return out.token_ids, out.logprob_token_ids, out.logprobs

    def make(n, g):
        params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=i, logprobs=3) if i % 4 != 3 else
                  SamplingParams(temperature=1.0) for i in range(n)]
        return {"logits": (torch.randn(n, LLAMA3_8B_ROWS.vocab, generator=g) * 3).bfloat16().float(), "params": params}

    assert_batch_invariant(RowOp(make, run), "the sampler over 128256")


@pytest.mark.gpu
@GPU_ONLY
def test_top_logprobs_do_not_depend_on_the_batch_at_llama3_8b_vocab():
    """bfloat16 logits tie often; the reported top logprobs keep ties in token-id order in any batch."""
    from runtime.sample.sampler import top_logprobs

    op = RowOp(lambda n, g: {"logits": (torch.randn(n, LLAMA3_8B_ROWS.vocab, generator=g) * 3).bfloat16().float()},
               lambda a, r: top_logprobs(a["logits"][r].cuda().log_softmax(-1), 5))
    assert_batch_invariant(op, "top_logprobs over 128256")
