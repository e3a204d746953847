"""End to end on a GPU: the conformance suite passes on ``cuda``, and models generate on ``cuda``
the greedy tokens they generate on ``cpu`` (tiny random models of every architecture in float32
and bfloat16, and the embedded GGUF model in float32).

Skipped without a GPU. ``RUNTIME_CUDA_CONFORMANCE_REPORT`` (a path) keeps the suite's JSON
report; ``RUNTIME_CUDA_GGUF`` names a .gguf file to use instead of the embedded model.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO_TESTS = Path(__file__).resolve().parents[3] / "tests"
# Logprob tolerance per dtype (runtime_conformance's): how close a near-tie must be to excuse a different token.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.35}
MAX_TOKENS = 12


def _release() -> None:
    """Engines hold their KV cache until collected; free it before the next one sizes its own."""
    gc.collect()
    torch.cuda.empty_cache()


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


def _divergence(ours, ref, tolerance: float) -> str | None:
    """Where greedy ``ours`` departs from ``ref`` (CompletionOutputs with logprobs) beyond a near-tie."""
    for step, (token, ref_token) in enumerate(zip(ours.token_ids, ref.token_ids)):
        row = ref.logprobs[step]
        if token == ref_token:
            if abs(ours.logprobs[step][token].logprob - row[token].logprob) > tolerance:
                return f"token {step} ({token}): logprob {ours.logprobs[step][token].logprob:.4f}, cpu {row[token].logprob:.4f}"
            continue
        gap = row[ref_token].logprob - (row[token].logprob if token in row else -math.inf)
        return None if gap <= tolerance else f"token {step}: {token}, cpu {ref_token} (cpu logprob gap {gap:.4f})"
    return None if len(ours.token_ids) == len(ref.token_ids) else "different lengths"


def _greedy(path, device: str, dtype: str, request, max_tokens: int = MAX_TOKENS, **engine_args):
    """The CompletionOutputs of ``request(llm, params)`` (greedy, with logprobs) on a fresh engine."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    llm = LLM(str(path), device=device, dtype=dtype, kv_cache_memory="32MiB", **engine_args)
    outputs = [o.outputs[0] for o in request(llm, params)]
    del llm
    _release()
    return outputs


def _prompts(prompts):
    return lambda llm, params: llm.generate(prompts, params, use_tqdm=False)


# (architecture, config overrides): every tiny architecture, Mistral also with a window the prompts exceed.
MODELS = {"llama": {}, "mistral": {}, "mistral-window8": {"sliding_window": 8}, "qwen2": {}, "qwen3": {},
          "gemma": {}, "gemma2": {}, "phi3": {}}


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
                if (d := _divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"{name} on cuda ({dtype}) differs from cpu: " + "; ".join(problems)


def test_embedded_gguf_greedy_matches_cpu():
    from runtime.loader.source import embedded_model_path

    path = os.environ.get("RUNTIME_CUDA_GGUF")
    if not path:
        try:
            path = str(embedded_model_path())
        except ValueError as exc:
            pytest.skip(str(exc))
    question = [{"role": "user", "content": "What is the capital of France?"}]

    def chat(llm, params):
        return llm.chat(question, params, use_tqdm=False)

    [reference] = _greedy(path, "cpu", "float32", chat, max_tokens=16, max_model_len=512)
    [ours] = _greedy(path, "cuda", "float32", chat, max_tokens=16, max_model_len=512)
    problem = _divergence(ours, reference, LOGPROB_TOLERANCE["float32"])
    assert problem is None, f"embedded GGUF on cuda differs from cpu: {problem}"
    assert "Paris" in ours.text, f"cuda answered {ours.text!r}"
