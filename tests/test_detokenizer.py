"""IncrementalDetokenizer against tokenizer.decode of the whole sequence, on a small byte-level
BPE tokenizer trained here (few merges, so multi-byte characters are split across tokens)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.sample.params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog",
    "naïve café — Ünïcödé ✓ 中文 🚀🎉 and plain ascii text",
]
TEXTS = [
    "héllo wörld 日本語 🙂 and more",
    "naïve café 🚀🎉 中文, hello!",
    "🙂🙂 日本 plain ✓",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk: int = 1) -> tuple[str, str | None]:
    """Feed tokens ``chunk`` at a time, as an engine would; return (all streamed text, stop string)."""
    streamed, stop = "", None
    for start in range(0, len(token_ids), chunk):
        stop = detokenizer.add_tokens(token_ids[start:start + chunk])
        streamed += detokenizer.output_text_delta()
        assert streamed == detokenizer.text[:len(streamed)]
        if stop is not None:
            break
    return streamed + detokenizer.output_text_delta(finished=True), stop


@pytest.mark.parametrize("text", TEXTS)
def test_text_matches_full_decode_at_every_step(tokenizer, text):
    prompt = encode(tokenizer, "the quick brown fox")
    ids = encode(tokenizer, text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    streamed, pending_steps = "", 0
    for i, token_id in enumerate(ids):
        assert detokenizer.add_tokens([token_id]) is None
        delta = detokenizer.output_text_delta()
        assert "\ufffd" not in delta
        streamed += delta
        reference = tokenizer.decode(ids[:i + 1])
        if reference.endswith("\ufffd"):
            pending_steps += 1
            # The stream holds back the whole token that starts the unfinished character.
            assert reference.rstrip("\ufffd").startswith(detokenizer.text)
        else:
            assert detokenizer.text == reference
    assert pending_steps > 0, "the text should split some character across tokens"
    assert streamed + detokenizer.output_text_delta(finished=True) == detokenizer.text == text


@pytest.mark.parametrize("chunk", [2, 5])
def test_several_tokens_per_step(tokenizer, chunk):
    ids = encode(tokenizer, TEXTS[0])
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "hi"), SamplingParams())
    assert stream(detokenizer, ids, chunk) == (TEXTS[0], None)


def test_prompt_ending_mid_character(tokenizer):
    ids = encode(tokenizer, "ok 日本語 🙂 done")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:cut], ids[cut:]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert stream(detokenizer, output)[0] == tokenizer.decode(output)


def spans_tokens(tokenizer, ids: list[int], stop: str) -> bool:
    return all(stop not in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_string_across_tokens_is_never_streamed(tokenizer, chunk):
    text = "héllo wörld 日本語 🙂 and more"
    ids = encode(tokenizer, text)
    assert spans_tokens(tokenizer, ids, "wörld 日")
    params = SamplingParams(stop=["more", "wörld 日", "本語 🙂 and"])
    streamed, stop = stream(IncrementalDetokenizer(tokenizer, [], params), ids, chunk)
    assert stop == "wörld 日"  # the earliest match wins, whatever the list order
    assert streamed == "héllo "


def test_include_stop_str_in_output(tokenizer):
    ids = encode(tokenizer, "héllo wörld 日本語 🙂 and more")
    params = SamplingParams(stop=["日本"], include_stop_str_in_output=True)
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    streamed, stop = stream(detokenizer, ids)
    assert stop == "日本"
    assert streamed == detokenizer.text == "héllo wörld 日本"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = encode(tokenizer, "hello world hello world")
    first_world_end = next(i for i in range(len(ids)) if "world" in tokenizer.decode(ids[:i + 1]))
    params = SamplingParams(stop=["world"], min_tokens=first_world_end + 1)
    streamed, stop = stream(IncrementalDetokenizer(tokenizer, [], params), ids)
    assert stop == "world"
    assert streamed == "hello world hello "


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_left_out_unless_included(tokenizer, include):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = encode(tokenizer, "hello") + [eos]
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    assert detokenizer.add_tokens(ids, stop_terminated=True) is None
    assert detokenizer.output_text_delta(finished=True) == ("hello<|endoftext|>" if include else "hello")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    prompt = encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = encode(tokenizer, "héllo<|im_end|><|endoftext|> 🙂")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=skip))
    assert stream(detokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detokenizer.text) != skip


@pytest.mark.parametrize("spaces", [True, False])
def test_spaces_between_special_tokens(spaces):
    """A WordPiece decoder joins tokens with spaces; False removes the one between two special tokens."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]", "<a>", "<b>"], show_progress=False)
    backend.train_from_iterator(["hello world foo bar"] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = encode(tokenizer, "hello <a><b> world <b>")
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
    text = stream(IncrementalDetokenizer(tokenizer, [], params), ids)[0]
    assert text == ("hello <a> <b> world <b>" if spaces else "hello <a><b> world <b>")


def test_first_token_decoded_in_prompt_context():
    """A Metaspace (SentencePiece-style) decoder drops a leading space at the start of a text;
    the output continues the prompt, so its first word keeps the space."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["hello world foo bar"] * 3, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    prompt, output = encode(tokenizer, "hello bar"), encode(tokenizer, " world foo")
    assert tokenizer.decode(output) == "world foo"
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert stream(detokenizer, output)[0] == " world foo"


def _feed(processor, outputs_by_step):
    """Run EngineCoreOutputs through ``processor``; returns (every RequestOutput, stopped ids)."""
    results, stopped = [], []
    for step in outputs_by_step:
        got, stop = processor.process(step)
        results += got
        stopped += stop
    return results, stopped


def test_final_only_processor_returns_each_request_once_as_the_stream_ends(tokenizer):
    """The offline LLM's processor: one RequestOutput per request, at its end, whose text and
    tokens are what the streaming processor ends with (a stop string and n=2 included)."""
    from runtime.engine.messages import EngineCoreOutput
    from runtime.engine.output_processor import OutputProcessor

    plain, stopping = encode(tokenizer, TEXTS[0]), encode(tokenizer, TEXTS[1])
    requests = [("plain", SamplingParams(max_tokens=len(plain)), [plain]),
                ("stop", SamplingParams(max_tokens=len(stopping), stop=["中"]), [stopping]),
                ("pair", SamplingParams(n=2, max_tokens=len(plain)), [plain, plain[::-1]])]
    steps = []
    for position in range(max(len(plain), len(stopping))):
        step = []
        for rid, params, samples in requests:
            for index, tokens in enumerate(samples):
                if position < len(tokens):
                    cid = rid if params.n == 1 else f"{index}_{rid}"
                    step.append(EngineCoreOutput(cid, [tokens[position]],
                                                 finish_reason="length" if position == len(tokens) - 1 else None))
        steps.append(step)

    def run(final_only: bool):
        processor = OutputProcessor(tokenizer, final_only=final_only)
        for rid, params, _ in requests:
            processor.add_request(rid, None, [1, 2], params)
        return _feed(processor, steps)

    streamed, streamed_stops = run(False)
    final, final_stops = run(True)
    assert all(out.finished for out in final) and len(final) == len({out.request_id for out in final}) == 3
    last = {out.request_id: out for out in streamed}
    for out in final:
        expected = last[out.request_id]
        assert [(c.text, c.token_ids, c.finish_reason) for c in out.outputs] == \
               [(c.text, c.token_ids, c.finish_reason) for c in expected.outputs]
    by_id = {out.request_id: out for out in final}
    assert by_id["plain"].outputs[0].text == tokenizer.decode(plain)
    assert by_id["stop"].outputs[0].finish_reason == "stop" and "中" not in by_id["stop"].outputs[0].text
    assert final_stops == streamed_stops == ["stop"]
