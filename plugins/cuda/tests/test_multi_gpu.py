"""Tensor and pipeline parallelism across GPUs (NCCL, CUDA graphs on): each layout generates the
greedy tokens one GPU does, 32 prompts x 64 tokens, for tiny random models of several
architectures in float32 (also with the ranks as Ray actors, where ray is installed) and for a
Llama-3-8B-shaped model (made-up bf16 weights) in bfloat16; a worker killed or stopped mid-run
ends the engine within the collective timeout with its rank named (issue 21).

Each case is skipped where the machine has fewer GPUs than its layout needs. The float32 cases
hold the tiny models to float32's tolerance: a rank's partial sums are added in another order
than one GPU's, which moves a logprob by far less than 1e-3.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from greedy_divergence import LOGPROB_TOLERANCE, divergence, release

from runtime import LLM, SamplingParams

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")]

REPO = Path(__file__).resolve().parents[3]
PROMPTS, NEW_TOKENS = 32, 64
LAYOUTS = [(2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2)]
"""(tensor-parallel size, pipeline stages)."""


def layout_param(tp: int, pp: int, *values):
    return pytest.param(*values, tp, pp, id=f"tp{tp}xpp{pp}",
                        marks=pytest.mark.skipif(tp * pp > GPUS, reason=f"needs {tp * pp} GPUs, {GPUS} here"))


def greedy(path: Path, dtype: str, prompts: list[list[int]], **engine_args) -> list:
    """Each prompt's CompletionOutput (greedy, EOS ignored, with logprobs) on a fresh engine."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    llm = LLM(str(path), device="cuda", dtype=dtype, max_model_len=256, **engine_args)
    try:
        return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
        del llm
        release()


def assert_same_greedy(outputs: list, reference: list, dtype: str, what: str) -> None:
    problems = [f"prompt {i}: {d}" for i, (o, r) in enumerate(zip(outputs, reference))
                if (d := divergence(o, r, LOGPROB_TOLERANCE[dtype]))]
    assert not problems, f"{what} differs from one GPU: " + "; ".join(problems[:8])


# Eight query heads (one a rank at tp 8) and two KV heads (replicated past tp 2); the MoE models'
# experts split by width, or whole a rank with expert parallelism.
TINY = {"llama": ("llama", {}), "qwen3": ("qwen3", {}), "gemma2": ("gemma2", {}),
        "mixtral": ("mixtral", {}), "mixtral-ep": ("mixtral", {"enable_expert_parallel": True}),
        "qwen3_moe": ("qwen3_moe", {})}
TINY_CASES = ([layout_param(tp, pp, "llama") for tp, pp in LAYOUTS]
              + [layout_param(tp, pp, name) for name in ("qwen3", "gemma2") for tp, pp in [(2, 1), (1, 2)]]
              + [layout_param(2, 1, name) for name in ("mixtral", "mixtral-ep", "qwen3_moe")])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (checkpoint, prompts, one GPU's float32 outputs), built on first use."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_checkpoint

    built = {}

    def get(name: str):
        arch, _ = TINY[name]
        if arch not in built:
            path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, num_attention_heads=8,
                                        num_key_value_heads=2)
            rng = random.Random(0)
            prompts = [[rng.randrange(6, 250) for _ in range(rng.randrange(1, 120))] for _ in range(PROMPTS)]
            built[arch] = path, prompts, greedy(path, "float32", prompts, kv_cache_memory="64MiB")
        return built[arch]
    return get


@pytest.mark.parametrize("name,tp,pp", TINY_CASES)
def test_a_tiny_model_generates_at_each_layout_what_one_gpu_does(name, tp, pp, tiny):
    path, prompts, reference = tiny(name)
    outputs = greedy(path, "float32", prompts, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                     kv_cache_memory="64MiB", **TINY[name][1])
    assert_same_greedy(outputs, reference, "float32", f"{name} at tp {tp} x pp {pp}")


@pytest.mark.parametrize("tp,pp", [layout_param(2, 1), layout_param(1, 2)])
def test_the_ray_executor_generates_what_one_gpu_does(tp, pp, tiny):
    """The ranks as Ray actors, one GPU a bundle, instead of this process's children."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    path, prompts, reference = tiny("llama")
    ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        outputs = greedy(path, "float32", prompts, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                         distributed_executor_backend="ray", kv_cache_memory="64MiB")
    finally:
        ray.shutdown()
    assert_same_greedy(outputs, reference, "float32", f"llama on ray at tp {tp} x pp {pp}")


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    """A Llama-3-8B-shaped directory (config and tokenizer; weights made up at load), its prompts
    and one GPU's bfloat16 outputs."""
    sys.path.insert(0, str(REPO / "plugins" / "cuda" / "benchmarks"))
    from decode_llama8b import write_config_and_tokenizer

    path = tmp_path_factory.mktemp("llama8b")
    write_config_and_tokenizer(path)
    rng = random.Random(1)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(8, 160))] for _ in range(PROMPTS)]
    return path, prompts, greedy(path, "bfloat16", prompts, load_format="dummy", kv_cache_memory="2GiB")


@pytest.mark.parametrize("tp,pp", [layout_param(tp, pp) for tp, pp in LAYOUTS])
def test_the_llama8b_shaped_model_generates_at_each_layout_what_one_gpu_does(tp, pp, llama8b):
    path, prompts, reference = llama8b
    outputs = greedy(path, "bfloat16", prompts, load_format="dummy", kv_cache_memory="2GiB",
                     tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert_same_greedy(outputs, reference, "bfloat16", f"the 8B-shaped model at tp {tp} x pp {pp}")


# Run in a process of its own: NCCL's watchdog may end the process whose collective waits for the
# failed rank (the engine names the rank in its log first), which must not be pytest's.
FAIL_A_WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from tiny_models import make_tiny_checkpoint
    from runtime import LLM, SamplingParams

    path = make_tiny_checkpoint({tmp!r}, "llama")
    llm = LLM(str(path), device="cuda", dtype="float32", distributed_timeout={timeout}, kv_cache_memory="16MiB",
              max_model_len=256, tensor_parallel_size={tp}, pipeline_parallel_size={pp})
    executor = llm.engine.executor
    launch, launches = executor.launch, []

    def launch_then_fail(*args, **kwargs):
        launches.append(1)
        if len(launches) == 10:  # mid-generation
            print("signalling", executor._workers[0].pid, flush=True)
            os.kill(executor._workers[0].pid, {signal})
        return launch(*args, **kwargs)

    executor.launch = launch_then_fail
    try:
        llm.generate([{{"prompt_token_ids": [5, 6, 7]}}] * 4, SamplingParams(max_tokens=200, ignore_eos=True),
                     use_tqdm=False)
    except RuntimeError as error:
        print("raised:", error, flush=True)
        llm.engine.shutdown()  # ends a stopped worker too
        sys.exit(3)
    print("finished without an error", flush=True)
""")


FAULTS = {"killed": (signal.SIGKILL, r"worker rank 1 \(pid \d+\) exited with code -9"),
          "stopped": (signal.SIGSTOP, r"worker rank 1 stopped responding \(no heartbeat\)")}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("tp,pp", [layout_param(2, 1), layout_param(1, 2)])
def test_a_failed_worker_ends_the_engine_naming_its_rank_within_the_timeout(tp, pp, fault, tmp_path):
    timeout, (sig, message) = 30, FAULTS[fault]
    script = FAIL_A_WORKER.format(tests=str(REPO / "tests"), tmp=str(tmp_path), timeout=timeout, tp=tp, pp=pp,
                                  signal=int(sig))
    # A session of its own, so that no worker (a stopped one, or one whose parent NCCL ended) outlives the test.
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []  # (when read, line), read as they come so that the pipe never fills
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in run.stdout))
    reader.start()
    try:
        run.wait(300 + timeout)  # start-up (two processes, CUDA graphs), the signal, the timeout
    except subprocess.TimeoutExpired:
        pass
    ended = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    reader.join()
    log = "".join(line for _, line in lines)
    signalled_at = next((when for when, line in lines if line.startswith("signalling")), None)
    assert signalled_at is not None, log[-3000:]
    assert ended - signalled_at < timeout + 30, f"ran {ended - signalled_at:.0f} s after the signal:\n{log[-3000:]}"
    assert run.returncode != 0 and "finished without an error" not in log, log[-3000:]
    assert re.search(message, log), log[-3000:]
