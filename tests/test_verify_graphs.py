"""Verification steps replayed from graphs (speculative decoding), on the CPU.

The hardware-independent part: which captured shape a step maps to, and the padding of every
sequence to 1 + k query tokens, checked against the reference attention kernel on the unpadded
step. Then whole engines on tests/test_decode_graphs.py's replay platform (a "graph" reruns the
captured forward on the runner's persistent buffers, so it sees exactly what a CUDA graph would):
greedy output with proposals and graphs equals the eager engine's without proposals, seeded
sampling draws the same tokens as the eager engine with proposals, and the draft model's passes
replay its own decode graphs. The CUDA versions are in plugins/cuda/tests/test_gpu_verify_graphs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_decode_graphs import _registry, _run
from test_spec_decode import _repetitive_prompts
from tiny_models import make_tiny_checkpoint

from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.platform import AttentionMetadata
from runtime.platform.reference import paged_attention
from runtime.sample.params import SamplingParams
from runtime.sched.request import Request
from runtime.sched.scheduler import ScheduledRequest
from runtime.worker import model_runner
from runtime.worker.input_buffers import step_inputs
from runtime.worker.verify_batch import pad_verification, verification_size

LADDERS = {1: [1, 2, 4, 8], 5: [1, 2, 4, 8]}


def _size_for(num_seqs: int, query_len: int) -> int | None:
    sizes = [s for s in LADDERS.get(query_len, []) if s >= num_seqs]
    return sizes[0] if sizes else None


def _scheduled(start: int, num_new: int, drafts: list[int]) -> ScheduledRequest:
    """A request of ``start + num_new`` known tokens computing the last ``num_new`` (one: a decode)."""
    request = Request(str(start), list(range(10, 10 + start + num_new)), SamplingParams(), max_model_len=256)
    item = ScheduledRequest(request, start, num_new, [1, 2, 3], max_drafts=4)
    item.set_drafts(drafts)
    return item


def test_a_step_maps_to_the_verification_graph_of_its_batch_size_or_runs_eagerly():
    decodes = [_scheduled(8, 1, [5, 6, 7]), _scheduled(9, 1, []), _scheduled(6, 1, [4])]
    assert verification_size(decodes, 4, 64, _size_for) == 4  # 3 sequences: the size-4 graph of 5 tokens each
    assert verification_size(decodes[:1], 4, 64, _size_for) == 1
    assert verification_size([_scheduled(9, 1, [])], 4, 64, _size_for) is None  # no proposal: a plain decode graph
    assert verification_size(decodes + [_scheduled(0, 3, [])], 4, 64, _size_for) is None  # a prompt
    assert verification_size(decodes, 4, 13, _size_for) is None  # 9 + 5 positions would reach past the block table
    assert verification_size(decodes, 4, 14, _size_for) == 4
    assert verification_size(decodes * 3, 4, 64, _size_for) is None  # 9 sequences: past the ladder
    assert verification_size(decodes, 0, 64, _size_for) is None  # no verification graphs captured


def test_padding_keeps_every_real_token_and_its_attention():
    """Two requests verifying 3 and 0 proposals, padded to 4 sequences of 5 tokens: each real
    token's attention output and every K/V written equal the reference kernel's on the unpadded
    step; padded tokens write nothing."""
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    starts, counts = [7, 5], [4, 1]
    tables = [[3, 5, 7], [2, 6]]
    step = step_inputs(np.arange(5, dtype=np.int64) + 20, starts, counts, tables, block_size)
    padded = pad_verification(step, 5, 4, block_size)
    assert padded.query_start_loc.tolist() == [0, 5, 10, 15, 20]
    assert padded.seq_lens.tolist() == [12, 10, 5, 5]
    real_rows = [0, 1, 2, 3, 5]
    assert padded.input_ids[real_rows].tolist() == step.input_ids.tolist()
    assert padded.positions[real_rows].tolist() == step.positions.tolist()
    assert padded.slot_mapping[real_rows].tolist() == step.slot_mapping.tolist()
    assert (np.delete(padded.slot_mapping, real_rows) == -1).all()
    assert padded.block_table[:2, :3].tolist() == [[3, 5, 7], [2, 6, 0]] and not padded.block_table[2:].any()

    torch.manual_seed(0)
    cache = torch.randn(2, 8, block_size, kv_heads, dim, dtype=torch.float64)
    query = torch.randn(20, heads, dim, dtype=torch.float64)
    key, value = torch.randn(2, 20, kv_heads, dim, dtype=torch.float64)

    def attend(inputs, rows):
        kv = cache.clone()
        meta = AttentionMetadata(
            query_start_loc=torch.from_numpy(inputs.query_start_loc), seq_lens=torch.from_numpy(inputs.seq_lens),
            block_table=torch.from_numpy(inputs.block_table), slot_mapping=torch.from_numpy(inputs.slot_mapping),
            max_query_len=int(np.diff(inputs.query_start_loc).max()), max_seq_len=int(inputs.seq_lens.max()),
            query_start_loc_cpu=inputs.query_start_loc.tolist(), seq_lens_cpu=inputs.seq_lens.tolist())
        return paged_attention(query[rows], key[rows], value[rows], kv, meta, dim ** -0.5, None, None), kv

    rows = list(range(len(padded.input_ids)))
    # The unpadded step reads the same query/key/value rows as the real tokens of the padded one.
    expected, expected_cache = attend(step, real_rows)
    got, got_cache = attend(padded, rows)
    torch.testing.assert_close(got[real_rows], expected, rtol=0, atol=1e-12)
    assert torch.equal(got_cache, expected_cache)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("verify_graphs"), "llama")


COMMON = dict(device="replay_cpu", max_num_seqs=6, max_model_len=128, kv_cache_memory="4MiB",
              max_num_batched_tokens=64)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = _repetitive_prompts(7, seed=3)
MAX_TOKENS = [20, 9, 24, 14, 18, 11, 22]


def _padded_steps(monkeypatch) -> list[tuple[list[int], int]]:
    """Records each verification graph step: its sequences' query lengths and its padded size."""
    steps = []

    def recorded(step, query_len, size, block_size):
        steps.append((np.diff(step.query_start_loc).tolist(), size))
        return pad_verification(step, query_len, size, block_size)

    monkeypatch.setattr(model_runner, "pad_verification", recorded)
    return steps


def test_greedy_output_with_verification_graphs_equals_eager_output_without_proposals(checkpoint, monkeypatch):
    steps = _padded_steps(monkeypatch)
    graphs = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=NGRAM, **COMMON), registry=_registry())
    graphs.chains_verification = False  # the host's padded steps; test_verify_chain.py covers chained ones
    assert graphs.runner.decode_graphs.ladders[5] == [1, 2, 4, 8]
    with_graphs = _run(graphs, PROMPTS, MAX_TOKENS)
    eager = EngineCore(EngineArgs(model=str(checkpoint), enforce_eager=True, **COMMON), registry=_registry())
    assert with_graphs == _run(eager, PROMPTS, MAX_TOKENS)
    replays = graphs.runner.decode_graphs.replays
    assert sum(n for (_, query_len), n in replays.items() if query_len == 5) == len(steps) > 5
    # Steps that padded requests with fewer than 4 proposals, and steps with padding sequences.
    assert any(min(lengths) < 5 for lengths, _ in steps) and any(len(lengths) < size for lengths, size in steps)
    stats = graphs.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert graphs.kv_manager.usage == 0


def test_seeded_sampling_draws_the_same_tokens_with_and_without_verification_graphs(checkpoint):
    params = dict(temperature=0.8, top_k=20, top_p=0.95, seed=11)
    outputs = []
    for eager in (False, True):
        engine = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=NGRAM, enforce_eager=eager,
                                       **COMMON), registry=_registry())
        # A seeded request's draws follow its proposals, which follow the schedule: the eager
        # engine launches early too, so a request arriving between steps joins the same step.
        engine.launch_early = True
        outputs.append(_run(engine, PROMPTS, MAX_TOKENS, **params))
        if not eager:
            assert any(query_len == 5 for _, query_len in engine.runner.decode_graphs.replays)
    assert outputs[0] == outputs[1]


def test_draft_model_passes_replay_the_drafts_decode_graphs(checkpoint):
    """The target as its own draft: every proposal accepted, which holds only if the graphs'
    draft passes computed what the eager ones do; output equal to the eager engine's."""
    draft = {"method": "draft_model", "model": str(checkpoint), "num_speculative_tokens": 3}
    options = COMMON | dict(kv_cache_memory="8MiB")
    graphs = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=draft, **options), registry=_registry())
    with_graphs = _run(graphs, PROMPTS[:4], MAX_TOKENS[:4])
    eager = EngineCore(EngineArgs(model=str(checkpoint), enforce_eager=True, **options), registry=_registry())
    assert with_graphs == _run(eager, PROMPTS[:4], MAX_TOKENS[:4])
    assert sum(graphs.runner.draft.decode_graphs.replays.values()) > 0
    assert any(query_len == 4 for _, query_len in graphs.runner.decode_graphs.replays)
    stats = graphs.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
