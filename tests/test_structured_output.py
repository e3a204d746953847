"""Structured output in the core: every output is in its grammar's language (checked with
independent parsers: jsonschema, re, ast), unconstrained rows are untouched, and speculative
decoding, preemption, look-ahead and the reasoning gate keep both true."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import msgspec
import pytest
import torch

from json_schemas import SCHEMAS
from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore
from runtime.engine.messages import AddRequest, decode_to_core, encode
from runtime.loader.source import open_model
from runtime.platform.reference import apply_token_bitmask
from runtime.sample.params import StructuredOutputsParams
from runtime.structured.bitmask import GrammarBitmask
from runtime.structured.grammar import GrammarCompiler
from runtime.worker.mirror import Mask
from tiny_models import make_tiny_checkpoint

TINY = dict(kv_cache_memory="16MiB", max_model_len=256)
ARITHMETIC = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]?
"""


def structured(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kind)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), **TINY)


def parse(text: str):
    """JSON, control characters in strings allowed: xgrammar 0.2.9 lets them into strings with a
    maxLength, and a random model picks them."""
    return json.loads(text, strict=False)


def texts(outputs) -> list[str]:
    return [out.outputs[0].text for out in outputs]


def test_reference_bitmask_op_masks_exactly_the_cleared_bits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 70, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)
    expected = logits.clone()
    for i, row in enumerate([3, 1]):
        for token in range(70):
            if not (int(bitmask[i, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    got = apply_token_bitmask(logits, bitmask, torch.tensor([3, 1]))
    assert got is logits and torch.equal(got, expected)


def test_conformance_checks_the_bitmask_op():
    """The suite passes the reference and names a kernel that masks the wrong bit."""
    from runtime_conformance.kernel_checks import check_apply_token_bitmask

    check_apply_token_bitmask(apply_token_bitmask, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))

    def reversed_bits(logits, bitmask, rows):  # bit 0 taken for token 31 of each word
        flipped = torch.zeros_like(bitmask)
        for bit in range(32):
            flipped |= ((bitmask >> bit) & 1) << (31 - bit)
        return apply_token_bitmask(logits, flipped, rows)

    with pytest.raises(AssertionError, match="apply_token_bitmask .*the tokens masked differ"):
        check_apply_token_bitmask(reversed_bits, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))


def test_fifty_json_schemas_all_validate(llm):
    """One batch, greedy and sampled rows: each output parses and validates with jsonschema."""
    names = list(SCHEMAS)
    assert len(names) >= 50
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=64,
                             structured_outputs=structured(json=SCHEMAS[name], disable_any_whitespace=True))
              for i, name in enumerate(names)]
    outputs = llm.generate([f"Example {i}:" for i in range(len(names))], params, use_tqdm=False)
    for name, out in zip(names, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        jsonschema.validate(parse(completion.text), SCHEMAS[name])


def test_json_object_regex_choice_and_grammar(llm):
    regex = r"[A-Z]{2}-[0-9]{3}"
    choices = ["positive", "negative", "neutral"]
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=40, structured_outputs=kind) for s, kind in enumerate([
        structured(regex=regex), structured(regex=regex), structured(choice=choices), structured(choice=choices),
        structured(grammar=ARITHMETIC), structured(grammar=ARITHMETIC),
        structured(json_object=True, disable_any_whitespace=True)])]
    # json_object is an object, never an array or a scalar, however much the model wants "[".
    tokenizer = llm.get_tokenizer()
    params[-1].logit_bias = {tokenizer.convert_tokens_to_ids("["): 10.0, tokenizer.convert_tokens_to_ids("}"): 5.0}
    outputs = texts(llm.generate(["a", "b", "c", "d", "e", "f", "g"], params, use_tqdm=False))
    assert all(re.fullmatch(regex, text) for text in outputs[:2]), outputs[:2]
    assert all(text in choices for text in outputs[2:4]), outputs[2:4]
    for text in outputs[4:6]:
        tree = ast.parse(text, mode="eval")  # Python's own parser: arithmetic of +-*/, parentheses, numbers
        assert all(isinstance(node, (ast.Expression, ast.BinOp, ast.Constant, ast.operator)) for node in ast.walk(tree)), text
    assert isinstance(json.loads(outputs[6]), dict)


def test_unconstrained_rows_are_unchanged_token_for_token(llm):
    """Greedy and seeded rows alone, then beside constrained rows: the same tokens."""
    plain = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.9, top_k=20, seed=12, max_tokens=24, ignore_eos=True)]
    prompts = ["The capital of France", "Once upon a time", "def add(a, b):"]
    alone = [out.outputs[0].token_ids for out in llm.generate(prompts, plain, use_tqdm=False)]
    constrained = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=structured(regex="[a-z ]+"))
    mixed = llm.generate(["x", prompts[0], "y", prompts[1], prompts[2]],
                         [constrained, plain[0], constrained, plain[1], plain[2]], use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (1, 3, 4)] == alone
    assert re.fullmatch("[a-z ]+", mixed[0].outputs[0].text)


def _schema_params(temperature: float = 0.0, max_tokens: int = 48) -> list[SamplingParams]:
    names = ["three fields", "array of objects", "nested object", "pattern code", "string enum", "order"]
    return [SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens,
                           structured_outputs=structured(json=SCHEMAS[name], disable_any_whitespace=True))
            for i, name in enumerate(names)], [SCHEMAS[name] for name in names]


def test_speculative_decoding_keeps_outputs_valid_and_greedy_outputs_equal(checkpoint, llm):
    """n-gram proposals are cut to what the grammar accepts and verified on masked rows: greedy
    outputs equal those without proposals; sampled ones validate."""
    params, schemas = _schema_params()
    prompts = ['{"a": "b", "a": "b", "a": "b"} ' * 3 + str(i) for i in range(len(params))]
    plain = texts(llm.generate(prompts, params, use_tqdm=False))
    spec = LLM(str(checkpoint), speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                    "prompt_lookup_min": 1, "prompt_lookup_max": 3}, **TINY)
    assert texts(spec.generate(prompts, params, use_tqdm=False)) == plain
    sampled, _ = _schema_params(temperature=1.0)
    for text, schema in zip(texts(spec.generate(prompts, sampled, use_tqdm=False)), schemas):
        jsonschema.validate(parse(text), schema)
    assert spec.engine.stats().spec_num_draft_tokens > 0


def test_preempted_requests_restart_their_grammar(checkpoint, llm):
    """A cache too small for the batch preempts requests; they recompute and their matchers
    replay their output: the same greedy outputs, all valid."""
    params, schemas = _schema_params(max_tokens=64)
    prompts = [f"Request number {i} wants a long answer" for i in range(len(params))]
    expected = texts(llm.generate(prompts, params, use_tqdm=False))
    small = LLM(str(checkpoint), kv_cache_memory=14 * 8192, max_model_len=96, max_num_batched_tokens=32)
    assert texts(small.generate(prompts, params, use_tqdm=False)) == expected
    assert small.engine.stats().num_preemptions > 0
    for text, schema in zip(expected, schemas):
        jsonschema.validate(parse(text), schema)


def test_look_ahead_samples_constrained_steps_once_their_masks_are_filled(checkpoint):
    """With decode graphs (a CPU stand-in) the next step is launched before this one's tokens are
    known: constrained rows are sampled after the matchers see them, with the same outputs as
    step by step."""
    from test_decode_graphs import COMMON, _count_look_aheads, _registry

    params, schemas = _schema_params(temperature=0.8)
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    results = []
    for look_ahead in (True, False):
        engine = EngineCore(EngineArgs(model=str(checkpoint), **COMMON), registry=_registry())
        engine.look_ahead = look_ahead
        counted = _count_look_aheads(engine)
        for i, sp in enumerate(params[:4] + [plain]):
            engine.add_request(str(i), [5 + i, 17, 23, 9], sp)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        results.append((tokens, counted[0]))
    (ahead, launched_ahead), (step_by_step, _) = results
    assert launched_ahead > 0 and ahead == step_by_step
    tokenizer = open_model(str(checkpoint)).tokenizer
    for i, schema in enumerate(schemas[:4]):
        jsonschema.validate(parse(tokenizer.decode(ahead[str(i)], skip_special_tokens=True)), schema)


def test_speculative_steps_launched_ahead_sample_constrained_rows_after_their_masks(checkpoint):
    """With decode graphs (the CPU stand-in) and n-gram proposals, steps that verify none are
    followed by one launched ahead (EngineCore._looks_ahead): greedy outputs, constrained and
    not, equal those of the engine without proposals, and the constrained ones validate."""
    from test_decode_graphs import COMMON, _registry

    params, schemas = _schema_params()
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[5 + i, 17, 23, 9, 5 + i, 17, 23] for i in range(5)]
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    results = []
    for speculative in (ngram, None):
        engine = EngineCore(EngineArgs(model=str(checkpoint), speculative_config=speculative, **COMMON),
                            registry=_registry())
        ahead = [0]
        launch = engine.runner.launch

        def counted(out, previous=None, *args, **kwargs):
            ahead[0] += previous is not None and bool(out.scheduled)
            return launch(out, previous, *args, **kwargs)

        engine.runner.launch = counted
        for i, sp in enumerate(params[:4] + [plain]):
            engine.add_request(str(i), prompts[i], sp)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        results.append((tokens, ahead[0], engine.stats().spec_num_drafts))
    (spec, spec_ahead, drafts), (without, _, _) = results
    assert spec_ahead > 0 and drafts > 0
    assert spec == without
    tokenizer = open_model(str(checkpoint)).tokenizer
    for i, schema in enumerate(schemas[:4]):
        jsonschema.validate(parse(tokenizer.decode(spec[str(i)], skip_special_tokens=True)), schema)


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """The tiny Llama with <think> and </think> as single tokens (ids 320 and 321)."""
    import transformers

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("thinking"), "llama", vocab_size=336)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    tokenizer.save_pretrained(path)
    return path


def test_reasoning_gate_constrains_only_after_the_end_of_thinking(thinking_checkpoint):
    """With --reasoning-parser, tokens before </think> are free (a token the grammar forbids is
    sampled), after it the output follows the grammar."""
    llm = LLM(str(thinking_checkpoint), reasoning_parser="qwen3", **TINY)
    tokenizer = llm.get_tokenizer()
    end, forbidden = tokenizer.convert_tokens_to_ids("</think>"), tokenizer.encode("#", add_special_tokens=False)[0]
    schema = SCHEMAS["three fields"]

    def params(bias: dict[int, float]) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=48, logit_bias=bias, skip_special_tokens=False,
                              structured_outputs=structured(json=schema, disable_any_whitespace=True))

    thinking, closes, closed = llm.generate(
        [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [5, 6, 7]},
         {"prompt_token_ids": [5, tokenizer.convert_tokens_to_ids("<think>"), 6, end, 7]}],
        [params({forbidden: 100.0}), params({forbidden: 50.0, end: 100.0}), params({forbidden: 100.0})], use_tqdm=False)
    # Still thinking: the biased token every time, though the grammar forbids it.
    assert thinking.outputs[0].token_ids[:8] == [forbidden] * 8
    # </think> first (biased most), then the grammar masks both biased tokens: valid JSON.
    ids = closes.outputs[0].token_ids
    assert ids[0] == end and forbidden not in ids
    jsonschema.validate(parse(tokenizer.decode(ids[1:], skip_special_tokens=True)), schema)
    # The prompt closed the span (a template without thinking): constrained from the first token.
    jsonschema.validate(parse(closed.outputs[0].text), schema)


def test_invalid_constraints_raise_before_anything_is_queued(llm):
    for kind, words in [(dict(regex="[a-"), "regex"), (dict(grammar="root ::= nothing"), "grammar"),
                        (dict(json={"type": "integer", "minimum": 5, "maximum": 1}), "json"),
                        (dict(json="{not json"), "json")]:
        with pytest.raises(ValueError, match=f"structured_outputs.{words}"):
            llm.generate(["a"], SamplingParams(structured_outputs=structured(**kind)), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        structured(regex="a", choice=["b"])


def test_a_grammar_that_fails_to_compile_fails_only_its_request(checkpoint, monkeypatch):
    engine = EngineCore(EngineArgs(model=str(checkpoint), **TINY))
    compile_ = GrammarCompiler.compile

    def failing(self, key):
        if key.kind == "regex" and key.text == "b+":
            raise ValueError("structured output (regex) failed to compile: out of budget")
        return compile_(self, key)

    monkeypatch.setattr(GrammarCompiler, "compile", failing)
    engine.add_request("bad", [5, 6], SamplingParams(max_tokens=4, structured_outputs=structured(regex="b+")))
    engine.add_request("good", [5, 6], SamplingParams(temperature=0, max_tokens=8, structured_outputs=structured(regex="a+")))
    engine.add_request("plain", [5, 6], SamplingParams(temperature=0, max_tokens=8))
    outputs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert [o.error for o in outputs["bad"]] == ["structured output (regex) failed to compile: out of budget"]
    assert outputs["bad"][0].finish_reason == "abort"
    assert outputs["good"][-1].finish_reason in ("stop", "length") and all(o.error is None for o in outputs["good"])
    assert len(sum((o.new_token_ids for o in outputs["plain"]), [])) == 8


def test_grammars_are_compiled_once_per_schema(checkpoint):
    engine = EngineCore(EngineArgs(model=str(checkpoint), **TINY))
    manager = engine.structured
    schema = SCHEMAS["order"]
    engine.add_request("a", [5], SamplingParams(structured_outputs=structured(json=schema)))
    engine.add_request("b", [6], SamplingParams(structured_outputs=structured(json=json.dumps(schema))))
    assert len(manager._grammars) == 1
    while engine.has_unfinished_requests():
        engine.step()


def test_constraints_cross_the_process_boundary():
    """The engine core process and the workers receive the params and masks as sent."""
    params = SamplingParams(max_tokens=5, structured_outputs=structured(json={"type": "object", "properties": {
        "a": {"type": "integer"}}}, disable_any_whitespace=True))
    message = decode_to_core(encode(AddRequest("r", 0, [1, 2], params)))
    assert message.params == params and message.params.structured_outputs.kind == "json"
    bitmask = torch.tensor([[-1, 5, 0], [7, -2**31, 3]], dtype=torch.int32)
    crossed = msgspec.msgpack.decode(msgspec.msgpack.encode(Mask.of(GrammarBitmask([4, 1], bitmask))), type=Mask)
    assert crossed.grammar().rows == [4, 1] and torch.equal(crossed.grammar().bitmask, bitmask)


@pytest.mark.slow
def test_embedded_model_answers_in_the_schema():
    """Meaning survives the mask: the embedded model fills the schema with the right answer."""
    llm = LLM(max_model_len=512)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}}, "required": ["capital"]}
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                   SamplingParams(temperature=0, max_tokens=24,
                                  structured_outputs=structured(json=schema, disable_any_whitespace=True)),
                   use_tqdm=False)[0].outputs[0]
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert "Paris" in value["capital"]


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_ranks_apply_the_masks_where_they_sample(checkpoint, llm, tp, pp):
    """Tensor-parallel ranks all sample (the masks follow each step to them); pipeline stages hand
    the masks to the last stage with the launch. Greedy outputs equal one rank's."""
    params, schemas = _schema_params()
    prompts = [f"Parallel request {i}" for i in range(len(params))]
    expected = texts(llm.generate(prompts, params, use_tqdm=False))
    parallel = LLM(str(checkpoint), tensor_parallel_size=tp, pipeline_parallel_size=pp, **TINY)
    try:
        assert texts(parallel.generate(prompts, params, use_tqdm=False)) == expected
    finally:
        parallel.engine.shutdown()
    for text, schema in zip(expected, schemas):
        jsonschema.validate(parse(text), schema)
