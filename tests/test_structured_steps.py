"""Structured output step by step: the masks the manager fills into its reused host buffers equal
xgrammar's own (fresh buffers, separate matchers), whatever the batch size from step to step; a
request whose grammar has ended finishes, ignore_eos or not (as vLLM), with or without
look-ahead; and greedy constrained outputs equal HF transformers' greedy decoding under the same
grammar."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
import xgrammar as xgr

from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.loader.source import open_model
from runtime.sample.params import StructuredOutputsParams
from runtime.sched.request import Request
from runtime.sched.scheduler import ScheduledRequest
from runtime.structured.grammar import GrammarCompiler, grammar_key
from runtime.structured.manager import StructuredOutputManager
from tiny_models import make_tiny_checkpoint

TINY = dict(kv_cache_memory="16MiB", max_model_len=256)
CONSTRAINTS = [StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string"}},
                                             "required": ["a"]}, disable_any_whitespace=True),
               StructuredOutputsParams(regex=r"[0-9]{2,6}"),
               StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
               StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}},
                                       disable_any_whitespace=True),
               StructuredOutputsParams(regex=r"[a-z ]{4,30}")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def source(checkpoint):
    return open_model(str(checkpoint))


def _vocab_size(checkpoint) -> int:
    return transformers.AutoConfig.from_pretrained(checkpoint).vocab_size


def _reference_matcher(compiler: GrammarCompiler, params: StructuredOutputsParams) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiler.compile(grammar_key(params)))


def _allowed(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].nonzero().flatten()


def test_reused_buffers_hold_xgrammars_own_masks_across_batch_sizes(checkpoint, source):
    """Steps of 3, 1, 5, 2, 4 and 5 rows, the requests in a new order each step and an
    unconstrained one among them, through two buffers taking turns: each step's rows are the
    constrained ones, each mask equals a separate matcher's fill of a fresh bitmask, and a mask
    stays intact while the next step fills the other buffer."""
    vocab_size = _vocab_size(checkpoint)
    eos = frozenset(source.generation_eos_token_ids)
    manager = StructuredOutputManager(source.tokenizer, vocab_size, eos, buffers_in_flight=2)
    reference = GrammarCompiler(source.tokenizer, vocab_size, sorted(eos))
    requests, matchers = [], {}
    for i, params in enumerate(CONSTRAINTS):
        request = Request(f"c{i}", [5, 6 + i], SamplingParams(max_tokens=64, structured_outputs=params),
                          eos_token_ids=eos)
        manager.add(request)
        requests.append(request)
        matchers[request.request_id] = _reference_matcher(reference, params)
    plain = Request("plain", [7, 8], SamplingParams(max_tokens=64), eos_token_ids=eos)
    while not all(manager.is_ready(r.request_id) for r in requests):
        manager.wait(0.1)
    generator = torch.Generator().manual_seed(0)
    previous = None
    for step, size in enumerate([3, 1, 5, 2, 4, 5]):
        batch = [requests[(step + k) % len(requests)] for k in range(size)]
        batch.insert(size // 2, plain)
        items = [ScheduledRequest(r, r.num_tokens - 1, 1, []) for r in batch]
        grammar = manager.bitmask(items)
        constrained = [i for i, r in enumerate(batch) if r is not plain]
        assert grammar.rows == constrained
        for row, index in enumerate(constrained):
            expected = xgr.allocate_token_bitmask(1, vocab_size)
            matchers[batch[index].request_id].fill_next_token_bitmask(expected, 0)
            assert torch.equal(grammar.bitmask[row], expected[0]), (step, batch[index].request_id)
        if previous is not None:
            assert torch.equal(previous[0].bitmask, previous[1])
        previous = grammar, grammar.bitmask.clone()
        for row, index in enumerate(constrained):
            request = batch[index]
            allowed = _allowed(grammar.bitmask[row], vocab_size)
            # Any allowed token but a stop token: the grammars stay open for the next step.
            allowed = allowed[~torch.isin(allowed, torch.tensor(sorted(eos)))]
            token = int(allowed[torch.randint(len(allowed), (1,), generator=generator)])
            request.append_token(token)
            manager.advance(request)
            assert matchers[request.request_id].accept_token(token)
            assert manager.error(request.request_id) is None


def _engine(checkpoint, look_ahead: bool, **options) -> EngineCore:
    from test_decode_graphs import COMMON, _registry

    engine = EngineCore(EngineArgs(model=str(checkpoint), **(COMMON | options)), registry=_registry())
    engine.look_ahead = look_ahead
    return engine


def _engine_outputs(checkpoint, look_ahead: bool, requests, engine: EngineCore | None = None
                    ) -> dict[str, tuple[list[int], str]]:
    engine = engine or _engine(checkpoint, look_ahead)
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], reasons[rid]) for rid in tokens}


def test_an_ended_grammar_finishes_its_request_even_with_ignore_eos(checkpoint, source):
    """Short constraints, ignore_eos and room for 40 tokens: each constrained request stops
    where a separate matcher fed its tokens terminates (at the grammar's stop token, its last);
    the unconstrained request beside them runs its 40 tokens; the same with look-ahead."""
    vocab_size = _vocab_size(checkpoint)
    eos = sorted(source.generation_eos_token_ids)
    reference = GrammarCompiler(source.tokenizer, vocab_size, eos)
    constraints = CONSTRAINTS[1:4]
    requests = [(f"c{i}", [5 + i, 17, 23], SamplingParams(temperature=0.9, seed=i, max_tokens=40, ignore_eos=True,
                                                           structured_outputs=params))
                for i, params in enumerate(constraints)]
    requests.append(("plain", [9, 17, 23], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
    results = [_engine_outputs(checkpoint, look_ahead, requests) for look_ahead in (True, False)]
    assert results[0] == results[1]
    outputs = results[0]
    assert len(outputs["plain"][0]) == 40 and outputs["plain"][1] == "length"
    for (rid, _, _), params in zip(requests, constraints):
        tokens, reason = outputs[rid]
        assert reason == "stop" and len(tokens) < 40, (rid, tokens)
        matcher = _reference_matcher(reference, params)
        for token in tokens[:-1]:
            assert matcher.accept_token(token) and not matcher.is_terminated()
        assert tokens[-1] in eos and matcher.accept_token(tokens[-1]) and matcher.is_terminated()
        text = source.tokenizer.decode(tokens, skip_special_tokens=True)
        if params.json is not None:
            assert all(isinstance(item, int) for item in json.loads(text)), (rid, text)
        else:
            assert re.fullmatch(params.regex or "|".join(params.choice), text), (rid, text)


def test_constrained_requests_preempted_by_look_ahead_steps_keep_their_grammars(checkpoint):
    """Greedy constrained requests under a cache too small for all of them: look-ahead steps
    preempt some (each loses the token in flight for it, its matcher starts over and is fed its
    output again), and every output is what a cache large enough gives step by step."""
    from test_decode_graphs import SMALL_CACHE, _recorded_preemptions

    requests = [(f"c{i}", [(5 * i + 3 * j) % 150 + 5 for j in range(12 + 4 * i)],
                 SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                structured_outputs=CONSTRAINTS[4 if i % 2 else 3])) for i in range(6)]
    ahead = _engine(checkpoint, True, kv_cache_memory=SMALL_CACHE, block_size=8)
    preempted = _recorded_preemptions(ahead)
    outputs = _engine_outputs(checkpoint, True, requests, engine=ahead)
    assert preempted[0] > 0
    assert outputs == _engine_outputs(checkpoint, False, requests)


@torch.inference_mode()
def _hf_constrained_greedy(model, prompt: list[int], matcher: xgr.GrammarMatcher, vocab_size: int,
                           max_tokens: int) -> list[int]:
    """HF greedy decoding, each step's logits masked by ``matcher`` (xgrammar's own fill), until
    the grammar terminates."""
    ids, tokens = list(prompt), []
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    while len(tokens) < max_tokens and not matcher.is_terminated():
        logits = model(torch.tensor([ids])).logits[0, -1, :vocab_size].float()
        matcher.fill_next_token_bitmask(bitmask, 0)
        allowed = _allowed(bitmask[0], vocab_size)
        token = int(allowed[logits[allowed].argmax()])
        assert matcher.accept_token(token)
        ids.append(token)
        tokens.append(token)
    return tokens


def test_greedy_constrained_outputs_equal_hf_greedy_under_the_same_grammar(checkpoint, source):
    vocab_size = _vocab_size(checkpoint)
    reference = GrammarCompiler(source.tokenizer, vocab_size, sorted(source.generation_eos_token_ids))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = [[5 + i, 17, 23, 9] for i in range(len(CONSTRAINTS))]
    llm = LLM(str(checkpoint), **TINY)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, structured_outputs=c)
              for c in CONSTRAINTS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, constraint, out in zip(prompts, CONSTRAINTS, outputs):
        expected = _hf_constrained_greedy(model, prompt, _reference_matcher(reference, constraint), vocab_size, 24)
        assert list(out.outputs[0].token_ids) == expected, constraint
        assert out.outputs[0].finish_reason == ("stop" if len(expected) < 24 else "length")

