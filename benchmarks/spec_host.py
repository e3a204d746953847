"""Host time of a speculative step, on the CPU with a tiny random model (the model's own time is
then small, so what is left is the host's work per step: scheduling, proposing, input
preparation, verification, read-back, update).

Usage: .venv/bin/python benchmarks/spec_host.py [--batch 1 8] [--tokens 96] [--repeats 3] [--proposer oracle|ngram]
                                               [--json OUT.json]

The engine runs on tests/test_decode_graphs.py's replay platform, so steps take the paths a
CUDA engine takes (decode graphs, verification graphs, eager) and each path is counted. Each
request's proposals come from an oracle that knows its greedy output (a run without proposals;
tests/test_spec_graph_paths.py's OracleProposer), so batches mix full acceptance, partial
acceptance and requests without proposals (``--proposer ngram``: the engine's n-gram proposer
instead, on the same repetitive prompts). Per setting, from the run of ``--repeats`` with the
least host time: host ms per decode step and per output token (the step's wall time less the
model's forward passes), ms per step in each phase, and the tensor ops per step outside the
forward pass (on a GPU, kernel launches and copies the host pays for one by one).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from test_decode_graphs import _registry  # noqa: E402
from test_spec_graph_paths import OracleProposer  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from runtime.engine.args import EngineArgs  # noqa: E402
from runtime.engine.core import EngineCore  # noqa: E402
from runtime.sample.params import SamplingParams  # noqa: E402

K = 4


def _engine(path: Path, speculative: bool) -> EngineCore:
    spec = {"method": "ngram", "num_speculative_tokens": K} if speculative else None
    return EngineCore(EngineArgs(model=str(path), device="replay_cpu", max_num_seqs=8, max_model_len=512,
                                 kv_cache_memory="16MiB", speculative_config=spec), registry=_registry())


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched outside the model's forward pass: on a GPU each is a
    kernel launch (or a copy) the host pays for, outside any graph."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not self.paused
        return func(*args, **(kwargs or {}))


def _timed(owner, name: str, totals: collections.Counter, counter: OpCounter) -> None:
    original = getattr(owner, name)
    forward = name == "forward"

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        paused, counter.paused = counter.paused, counter.paused or forward
        try:
            return original(*args, **kwargs)
        finally:
            counter.paused = paused
            totals[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _generate(engine: EngineCore, prompts: list[list[int]], tokens: int, on_start=lambda: None
              ) -> tuple[dict[str, list[int]], int, float]:
    """(outputs, decode steps, seconds of those steps): the first step (the prefills) left out;
    ``on_start`` is called once it is done."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = collections.defaultdict(list)
    steps, start = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        if start is None:
            on_start()
            start = time.perf_counter()
        else:
            steps += 1
    return dict(outputs), steps, time.perf_counter() - start


def measure(path: Path, batch: int, tokens: int, repeats: int, proposer: str) -> list[dict]:
    prompts = [[10 + (i * 7 + j * 3) % 200 for j in range(24 + 5 * i)] for i in range(batch)]
    plain = _engine(path, speculative=False)
    reference, _, _ = _generate(plain, prompts, tokens)
    spec = _engine(path, speculative=True)
    rows = []
    for label, engine in (("none", plain), (proposer, spec)):
        if engine is spec and proposer == "oracle":
            spec.proposer = OracleProposer(reference)
            spec.chains_verification = False  # a chain proposes by n-gram on the device, not by the oracle
        phases: collections.Counter = collections.Counter()
        counter = OpCounter()
        runner = engine.runner
        for owner, name in ((engine.scheduler, "schedule"), (engine.scheduler, "look_ahead"),
                            (engine.scheduler, "update"), (runner, "launch"), (runner, "sample"), (runner, "collect"),
                            (runner.decode_graphs, "run"), (runner.model, "forward")):
            _timed(owner, name, phases, counter)
        if engine.proposer is not None:
            _timed(engine.proposer, "propose", phases, counter)
        best = None
        for _ in range(repeats):
            runner.decode_graphs.replays.clear()
            outputs, steps, seconds = _generate(engine, prompts, tokens, phases.clear)
            if outputs != reference:
                raise AssertionError(f"{label}: outputs differ from the run without proposals")
            host = seconds - phases["forward"]
            if best is None or host < best[1]:
                best = (steps, host, dict(phases), dict(runner.decode_graphs.replays))
        steps, host, times, replays = best
        with counter:
            _generate(engine, prompts, tokens, lambda: setattr(counter, "ops", 0))
        row = {"proposals": label, "batch": batch, "steps": steps, "host_ms_per_step": round(1e3 * host / steps, 3),
               "host_ms_per_token": round(1e3 * host / (batch * (tokens - 1)), 4),
               "ops_per_step": round(counter.ops / steps, 1),
               "phase_ms_per_step": {name: round(1e3 * t / steps, 3) for name, t in times.items()},
               "graph_replays": {f"{size}x{query}": n for (size, query), n in sorted(replays.items())},
               "eager_steps": steps + 1 - sum(replays.values())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proposer", choices=["oracle", "ngram"], default="oracle",
                        help="ngram: the engine's own n-gram proposer (k = 4, lookup 2 to 5) on prompts that repeat")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(tmp, "llama")
        rows = [row for batch in args.batch for row in measure(path, batch, args.tokens, args.repeats, args.proposer)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
