"""End to end on a GPU: the conformance suite passes on ``cuda``, and models generate on ``cuda``
the greedy tokens they generate on ``cpu`` (tiny random models of every architecture, MoE ones
too, in float32 and bfloat16; GPTQ/AWQ checkpoints against their dequantized weights; JSON-schema
constrained decoding; the embedded GGUF model in float32).

Skipped without a GPU. ``RUNTIME_CUDA_CONFORMANCE_REPORT`` (a path) keeps the suite's JSON
report; ``RUNTIME_CUDA_GGUF`` names a .gguf file to use instead of the embedded model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greedy_divergence import LOGPROB_TOLERANCE, divergence, release

from runtime import LLM, LoRARequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
MAX_TOKENS = 12


def test_conformance_suite_passes(tmp_path):
    pytest.importorskip("runtime_conformance", reason="runtime-conformance is not installed")
    report = Path(os.environ.get("RUNTIME_CUDA_CONFORMANCE_REPORT") or tmp_path / "conformance.json")
    # What `runtime conformance --platform cuda` runs, in a process of its own.
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "runtime_conformance", "--pyargs", "runtime_conformance",
                          "--runtime-platform", "cuda", "--runtime-report", str(report), "-q", "-p", "no:cacheprovider"],
                         cwd=tmp_path, capture_output=True, text=True)
    summary = json.loads(report.read_text()) if report.exists() else {}
    failed = [c["id"] for c in summary.get("checks", []) if c.get("outcome") == "fail"]
    assert run.returncode == 0, f"conformance failed ({len(failed)} checks: {failed[:10]}):\n{run.stdout[-4000:]}"


def _greedy(path, device: str, dtype: str, request, max_tokens: int = MAX_TOKENS, **engine_args):
    """The CompletionOutputs of ``request(llm, params)`` (greedy, with logprobs) on a fresh engine."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    llm = LLM(str(path), device=device, dtype=dtype, kv_cache_memory="32MiB", **engine_args)
    outputs = [o.outputs[0] for o in request(llm, params)]
    del llm
    release()
    return outputs


def _prompts(prompts):
    return lambda llm, params: llm.generate(prompts, params, use_tqdm=False)


# (architecture, config overrides): every tiny architecture, Mistral also with a window the prompts exceed.
MODELS = {"llama": {}, "mistral": {}, "mistral-window8": {"sliding_window": 8}, "qwen2": {}, "qwen3": {},
          "gemma": {}, "gemma2": {}, "phi3": {}, "mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (checkpoint path, prompts, cpu float32 greedy outputs), built on first use."""
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    built = {}

    def get(name: str):
        if name not in built:
            arch = name.split("-")[0]
            path = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, **MODELS[name])
            rng = random.Random(0)
            shared = [rng.randrange(6, 300) for _ in range(24)]  # a prefix-cache hit between two prompts
            prompts = [[rng.randrange(6, 300) for _ in range(n)] for n in (5, 17, 40, 1)]
            prompts += [shared + [7, 8, 9], shared + [10] * 9]
            built[name] = path, prompts, _greedy(path, "cpu", "float32", _prompts(prompts))
        return built[name]
    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_greedy_matches_cpu(name, dtype, tiny):
    path, prompts, reference = tiny(name)
    outputs = _greedy(path, "cuda", dtype, _prompts(prompts))
    problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(outputs, reference))
                if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"{name} on cuda ({dtype}) differs from cpu: " + "; ".join(problems)


QUANT_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
"""Wide enough for groups of 128 input columns."""


@pytest.fixture(scope="module")
def quant_dense(tmp_path_factory):
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "llama", seed=3, **QUANT_SHAPE)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["gptq-4-32-asym-actorder", "gptq-8-128-sym", "awq-4-64-asym", "gptq-4-128-sym",
                                    "gptq-4-128-asym-actorder"])
def test_packed_checkpoint_greedy_matches_its_dequantized_weights_on_cpu(scheme, dtype, quant_dense, tmp_path):
    """The W4A16/W8A16 Triton GEMM (weights kept packed) against the CPU running a dense copy of
    the same weights, dequantized in float64 by each format's definition, in the same dtype (4 bits
    in groups of 128 in bfloat16 multiply on the pairs kernel, the others on the tile kernel)."""
    sys.path.insert(0, str(REPO_TESTS))
    from quantized_checkpoints import Scheme, write_quantized
    from safetensors.torch import load_file, save_file

    fmt, bits, group, sym, *order = scheme.split("-")
    dense = write_quantized(quant_dense, tmp_path / "q", Scheme(fmt, int(bits), int(group), symmetric=sym == "sym",
                                                                   act_order=bool(order)))
    reference_dir = Path(shutil.copytree(quant_dense, tmp_path / "dequantized"))
    weights = load_file(reference_dir / "model.safetensors")
    save_file({name: dense[name].float() if name in dense else w for name, w in weights.items()},
              reference_dir / "model.safetensors")
    rng = random.Random(1)
    prompts = [[rng.randrange(6, 300) for _ in range(n)] for n in (5, 17, 40)]
    # The same dtype on both sides: the dense bfloat16 model itself departs from float32 by more than
    # the near-tie tolerance on these prompts (gap 0.58 at gptq-4-32 act-order, seen on the CPU alone).
    reference = _greedy(reference_dir, "cpu", dtype, _prompts(prompts))
    outputs = _greedy(tmp_path / "q", "cuda", dtype, _prompts(prompts))
    problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(outputs, reference))
                if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"{scheme} on cuda ({dtype}) differs from its dequantized weights on cpu: " + "; ".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_json_schema_outputs_match_cpu_and_validate(dtype, tiny):
    """Constrained decoding on cuda (the bitmask kernel on the logits): greedy outputs are the
    CPU's, token for token up to near-ties, and each validates against its schema."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    sys.path.insert(0, str(REPO_TESTS))
    from json_schemas import SCHEMAS
    from runtime.sample.params import StructuredOutputsParams

    path, _, _ = tiny("llama")
    names = list(SCHEMAS)[:12]

    def run(llm, _params):
        params = [SamplingParams(temperature=0.0, max_tokens=64, logprobs=5, structured_outputs=StructuredOutputsParams(
            json=SCHEMAS[name], disable_any_whitespace=True)) for name in names]
        return llm.generate([f"Example {i}:" for i in range(len(names))], params, use_tqdm=False)

    reference = _greedy(path, "cpu", "float32", run)
    outputs = _greedy(path, "cuda", dtype, run)
    problems = [f"{name}: {d}" for name, o, r in zip(names, outputs, reference)
                if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"constrained decoding on cuda ({dtype}) differs from cpu: " + "; ".join(problems)
    for name, out in zip(names, outputs):
        assert out.finish_reason == "stop", (name, out.text)
        jsonschema.validate(json.loads(out.text, strict=False), SCHEMAS[name])


def _embedded_gguf() -> str:
    """The embedded model's GGUF file (or ``RUNTIME_CUDA_GGUF``'s); skips without one."""
    from runtime.loader.source import embedded_model_path

    path = os.environ.get("RUNTIME_CUDA_GGUF")
    if not path:
        try:
            path = str(embedded_model_path())
        except ValueError as exc:
            pytest.skip(str(exc))
    return path


def _ask_capital(llm, params):
    return llm.chat([{"role": "user", "content": "What is the capital of France?"}], params, use_tqdm=False)


def test_embedded_gguf_greedy_matches_cpu():
    path = _embedded_gguf()
    # quantization "none": both dequantize the file's blocks at load (the CPU would otherwise
    # requantize them to int8, its default for quantized GGUF, and compute something else).
    [reference] = _greedy(path, "cpu", "float32", _ask_capital, max_tokens=16, max_model_len=512, quantization="none")
    [ours] = _greedy(path, "cuda", "float32", _ask_capital, max_tokens=16, max_model_len=512, quantization="none")
    problem = divergence(ours, reference, LOGPROB_TOLERANCE["float32"])
    assert problem is None, f"embedded GGUF on cuda differs from cpu: {problem}"
    assert "Paris" in ours.text, f"cuda answered {ours.text!r}"


def test_embedded_gguf_packed_matches_dequantized():
    """The file's Q4_1 projections kept packed (the WNA16 GEMM, their minimums as offsets: the
    default) against the same file dequantized at load, both float32 on cuda: the weights are the
    same float32 values, only the order of the sums differs."""
    path = _embedded_gguf()
    [dense] = _greedy(path, "cuda", "float32", _ask_capital, max_tokens=16, max_model_len=512, quantization="none")
    [packed] = _greedy(path, "cuda", "float32", _ask_capital, max_tokens=16, max_model_len=512)
    problem = divergence(packed, dense, LOGPROB_TOLERANCE["float32"])
    assert problem is None, f"packed GGUF on cuda differs from the dequantized file: {problem}"
    assert "Paris" in packed.text, f"cuda answered {packed.text!r}"


def test_fp8_quantization_tracks_bfloat16(tmp_path):
    """``quantization="fp8"`` against the same tiny Llama unquantized, both bfloat16 on cuda.

    The bounds come from running this comparison with the FP8 matmul emulated on the CPU (the
    same quantization of weights and activations, 64 prompts): this random 2-layer model amplifies
    e4m3's ~3 % error per matmul into top-5 first-step logprobs that move by 0.18 on average
    (bfloat16 vs float32 alone: 0.02), and 45 of 64 first tokens agreed, every disagreement at a
    top-2 gap under 0.5. With agreement p ~ 0.7, fewer than 32 of 64 is a 3.5-sigma event
    (binomial sd 3.7); a broken matmul agrees on almost none.
    """
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    from runtime.models.layers.linear import Linear

    path = make_tiny_checkpoint(tmp_path, "llama")
    rng = random.Random(1)
    prompts = [[rng.randrange(6, 300) for _ in range(rng.randrange(1, 40))] for _ in range(64)]
    # A few decode steps too, so the quantized layers also run inside the captured CUDA graphs.
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5)

    def run(**engine_args):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory="32MiB", **engine_args)
        outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        runner = llm.engine.runner
        quantized = [tuple(m.quant_weight.weight.shape) for m in runner.model.modules()
                     if isinstance(m, Linear) and m.quant_method is not None]
        weight_bytes = runner.weight_bytes
        del llm, runner
        release()
        return outputs, weight_bytes, quantized

    dense, dense_bytes, _ = run()
    fp8, fp8_bytes, quantized = run(quantization="fp8")
    # qkv, o, gate_up and down of both layers (not the output projection), each now one byte per
    # element and a float32 scale per output row instead of two bytes per element.
    assert len(quantized) == 4 * 2
    assert fp8_bytes == dense_bytes - sum(n * k * 2 - (n * k + 4 * n) for n, k in quantized)
    assert all(len(o.token_ids) == params.max_tokens for o in fp8)

    diffs, agree = [], 0
    for ours, ref in zip(fp8, dense):
        row, got = ref.logprobs[0], ours.logprobs[0]
        diffs += [abs(got[t].logprob - lp.logprob) for t, lp in row.items() if t in got]
        if ours.token_ids[0] == ref.token_ids[0]:
            agree += 1
            continue
        top = sorted((lp.logprob for lp in row.values()), reverse=True)
        assert top[0] - top[1] < 1.5, f"fp8 changed a first token the dense model preferred by {top[0] - top[1]:.2f}"
    mean_diff = sum(diffs) / len(diffs)
    assert mean_diff < 0.4, f"fp8 moved the top-5 first-step logprobs by {mean_diff:.3f} on average"
    assert agree >= 32, f"fp8 agreed with bfloat16 on {agree} of 64 first tokens"


# --kv-cache-dtype fp8 against the model-dtype cache on the same GPU. A tiny random model amplifies
# the cache's rounding (e4m3 keeps 3 mantissa bits: up to 2^-4 relative per value) far more than a
# trained one, so the bounds are statistical, set from these models run on the CPU with the reference
# attention over an e4m3 cache (bfloat16, two seeds): first-step top-5 logprobs moved by at most 0.51,
# continuations parted only at near-ties (logprob gap < 0.9), and the greedy choice at a prompt
# position agreed 84-94% of the time. Halving the stored K or V, a scale bug, moves first-step
# logprobs by 1.1-2.2 and drops that agreement to 29-44%.
FP8_LOGPROB_TOLERANCE = 1.0
FP8_MIN_AGREEMENT = 0.7


@pytest.mark.parametrize("name", ["llama", "mistral-window8", "gemma2"])
def test_fp8_kv_cache_tracks_the_model_dtype_cache(name, tmp_path):
    sys.path.insert(0, str(REPO_TESTS))
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, name.split("-")[0], **MODELS[name])
    rng = random.Random(1)
    prompts = [[rng.randrange(6, 300) for _ in range(n)] for n in (64, 48, 40, 33, 17, 5, 1)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=1)
    runs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", kv_cache_memory="32MiB", kv_cache_dtype=kv_cache_dtype)
        runs[kv_cache_dtype] = llm.generate(prompts, params, use_tqdm=False)
        del llm
        release()

    def greedy(row):
        return min(row, key=lambda token: row[token].rank)

    shifts, agree, positions, problems = [], 0, 0, []
    for i, (ours, ref) in enumerate(zip(runs["fp8"], runs["auto"])):
        first, ref_first = ours.outputs[0].logprobs[0], ref.outputs[0].logprobs[0]
        shifts += [abs(first[t].logprob - ref_first[t].logprob) for t in ref_first if t in first]
        if problem := divergence(ours.outputs[0], ref.outputs[0], FP8_LOGPROB_TOLERANCE):
            problems.append(f"prompt {i}: {problem}")
        # Every prompt position predicts from the same prefix in both runs, so one flip does not cascade.
        for row, ref_row in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            agree += greedy(row) == greedy(ref_row)
            positions += 1
    assert max(shifts) <= FP8_LOGPROB_TOLERANCE, f"first-step logprobs moved by up to {max(shifts):.3f}"
    assert not problems, "fp8 continuations part from auto's beyond a near-tie: " + "; ".join(problems)
    assert agree >= FP8_MIN_AGREEMENT * positions, f"greedy choice agrees at {agree} of {positions} prompt positions"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_mixed_lora_batch_matches_cpu(name, dtype, tiny, tmp_path):
    """Three adapters (ranks 8 and 16, one rsLoRA) and the base model in one batch, on cuda with
    CUDA graphs (slot indices in the persistent buffers), against the CPU plugin (whose LoRA is
    checked against PEFT in CI), two slots for three adapters so one waits for a slot."""
    sys.path.insert(0, str(REPO_TESTS))
    from lora_adapters import FUSED, SEPARATE, make_adapter

    path, prompts, _ = tiny(name)
    targets = FUSED if name == "phi3" else SEPARATE
    adapters = []
    for i, (rank, rslora) in enumerate([(8, False), (16, True), (16, False)]):
        make_adapter(path, tmp_path / f"a{i}", rank, targets, seed=20 + i, rslora=rslora)
        adapters.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    chosen = [adapters[i % 3] if i % 4 != 3 else None for i in range(len(prompts))]

    def run(llm, params):
        return llm.generate(prompts, params, use_tqdm=False, lora_request=chosen)

    lora = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16}
    reference = _greedy(path, "cpu", "float32", run, **lora)
    outputs = _greedy(path, "cuda", dtype, run, **lora)
    problems = [f"prompt {i} ({c.name if c else 'base'}): {d}" for i, (o, r, c) in enumerate(zip(outputs, reference, chosen))
                if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"{name} with LoRA on cuda ({dtype}) differs from cpu: " + "; ".join(problems)
    assert any(o.token_ids != r.token_ids for o, r in zip(outputs, tiny(name)[2])), "the adapters changed nothing"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_greedy_output_matches_without_proposals(dtype, tiny, tmp_path):
    """On cuda: n-gram proposals, and the model as its own draft (every proposal accepted only if
    the draft's K/V is right), give the tokens of the same engine without proposals; decode and
    verification steps replay graphs (test_gpu_verify_graphs.py counts the replays)."""
    path, prompts, _ = tiny("llama")
    repetitive = [(p * 3)[:len(p) * 2 + 1] for p in prompts if len(p) > 3]

    def run(llm, params):
        return llm.generate([{"prompt_token_ids": p} for p in repetitive], params, use_tqdm=False)

    plain = _greedy(path, "cuda", dtype, run, max_tokens=24)
    configs = [{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
               {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3}]
    for config in configs:
        ours = _greedy(path, "cuda", dtype, run, max_tokens=24, speculative_config=config)
        problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(ours, plain))
                    if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
        assert not problems, f"{config['method']} on cuda ({dtype}) changed the output: " + "; ".join(problems)
