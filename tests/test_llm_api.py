"""The Python API and the CLI as a user meets them: sampling options, stop conditions, n > 1,
seeds, chat, aborts, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers

from runtime import LLM, SamplingParams
from runtime.engine.args import EngineArgs, parse_size
from runtime.engine.core import EngineCore

from tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.xdist_group("llm_api")
OPTIONS = dict(kv_cache_memory="16MiB", max_model_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("api"), "llama")


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), **OPTIONS)


def greedy(max_tokens=24, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_stop_string_truncates_text(llm):
    full = llm.generate("The capital of", greedy(), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = llm.generate("The capital of", greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate("The capital of", greedy(stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_end_generation(llm):
    full = llm.generate("Hello there", greedy(), use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[5]
    out = llm.generate("Hello there", greedy(stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_id)
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_n_samples_seeded_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    first = llm.generate("Once upon", params, use_tqdm=False)[0]
    again = llm.generate("Once upon", params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3


def test_seeded_request_independent_of_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate("A quick brown", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["Hello", "A quick brown", "def add"], [others, seeded, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_logprobs_shape_and_consistency(llm):
    out = llm.generate("Hello", greedy(max_tokens=6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the best
        assert len(entry) in (3, 4)
        assert max(e.logprob for e in entry.values()) == entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_chat_uses_the_template(llm, checkpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, greedy(max_tokens=4), use_tqdm=False)[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    with pytest.raises(ValueError, match=r"messages\[0\].role 'wizard'"):
        llm.chat([{"role": "wizard", "content": "x"}], use_tqdm=False)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("n", 0),
                                         ("presence_penalty", 3.0), ("min_p", 2.0), ("logprobs", -1)])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_prompt_too_long_is_rejected_with_numbers(llm):
    with pytest.raises(ValueError, match="prompt has 300 tokens, the context is 256"):
        llm.generate({"prompt_token_ids": [10] * 300}, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_prompts_beyond_the_first_steps_are_queued_while_those_run(checkpoint):
    """With max_num_seqs 2, generate queues two prompts, steps, then queues the rest: every
    output is the one each prompt gets alone, in input order, and a bad prompt among the later
    ones still fails the call and leaves the engine empty."""
    small = LLM(str(checkpoint), max_num_seqs=2, **OPTIONS)
    prompts = [[10 + i, 20 + 2 * i, 30, 7 * i % 50 + 5] * (1 + i % 3) for i in range(7)]
    params = [greedy(max_tokens=1 + 3 * i) for i in range(7)]
    assert small._first_steps_share([(None, p, None) for p in prompts]) == 2
    together = small.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    alone = [small.generate({"prompt_token_ids": p}, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    assert [o.prompt_token_ids for o in together] == prompts
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    with pytest.raises(ValueError, match="prompt has 300 tokens"):
        small.generate([{"prompt_token_ids": p} for p in prompts[:4]] + [{"prompt_token_ids": [10] * 300}],
                       use_tqdm=False)
    assert not small.engine.has_unfinished_requests() and small.engine.kv_manager.usage == 0


def test_dense_checkpoint_is_not_requantized_by_default(llm, checkpoint):
    assert llm.engine.quantization == "none"
    with pytest.raises(ValueError, match="--quantization fp8 cannot run this checkpoint on cpu: it loads fp8 checkpoints "
                                         "and this one is not quantized; choose one of: int8, none"):
        LLM(str(checkpoint), quantization="fp8", **OPTIONS)


def test_unknown_engine_argument(checkpoint):
    with pytest.raises(TypeError, match="unknown engine argument.*max_num_seq\\b"):
        LLM(str(checkpoint), max_num_seq=4)


def test_abort_frees_blocks_within_the_step(checkpoint):
    engine = EngineCore(EngineArgs(model=str(checkpoint), **OPTIONS))
    engine.add_request("a", list(range(10, 50)), greedy(max_tokens=100))
    engine.add_request("b", list(range(10, 30)), greedy(max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.kv_manager.usage > 0
    engine.abort_requests(["a", "b"])
    assert engine.kv_manager.usage == 0 and not engine.has_unfinished_requests()


def test_parse_size():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MB") == 512_000_000 and parse_size(1024) == 1024
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_reads_stdin_and_matches_the_api(llm, checkpoint):
    out = run_cli("generate", "--model", checkpoint, "--max-tokens", "8", "--ignore-eos", "--kv-cache-memory", "16MiB",
                  "--max-model-len", "256", stdin="Hello there\nThe capital of\n")
    assert out.returncode == 0, out.stderr
    expected = llm.generate(["Hello there", "The capital of"], greedy(max_tokens=8), use_tqdm=False)
    assert out.stdout == "".join(f"### {p}\n{o.outputs[0].text}\n" for p, o in zip(["Hello there", "The capital of"], expected))


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent/model", "hi"], "not found"),
    (["generate", "--temperature", "-2", "hi"], "temperature must be >= 0"),
    (["generate", "--kv-cache-memory", "lots", "hi"], "not a size"),
    (["generate", "--speculative-config", "{method: ngram}", "hi"], "--speculative-config is not valid JSON"),
    (["generate", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "k": 1}', "hi"],
     "unknown keys ['k']"),
])
def test_cli_errors_are_one_line(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("runtime generate: error:"), out.stderr
