"""Every message between the API processes and the engine core round-trips through its encoding
with every field intact, and a malformed message is refused rather than half-read."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine.messages import (AbortRequests, AddRequest, ClientReady, EngineCoreOutput, EngineStats, Failed,
                                     Ready, StepOutputs, decode_from_core, decode_to_core, encode)
from runtime.multimodal.inputs import ImageInput
from runtime.sample.params import SamplingParams

ids = st.text(min_size=1, max_size=40)
tokens = st.lists(st.integers(0, 2**31 - 1), max_size=20)
floats = st.floats(allow_nan=False, width=64)
unit = st.floats(0, 1, allow_nan=False)
small = st.integers(0, 2**40)

params = st.builds(
    SamplingParams, n=st.integers(1, 8), temperature=st.floats(0, 5), top_p=st.floats(0.01, 1), top_k=st.integers(0, 100),
    min_p=unit, presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.1, 3), seed=st.none() | st.integers(-2**63, 2**63 - 1),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=3), stop_token_ids=st.lists(st.integers(0, 10**6), max_size=3),
    include_stop_str_in_output=st.booleans(), ignore_eos=st.booleans(), max_tokens=st.none() | st.integers(100, 10**6),
    min_tokens=st.integers(0, 100), logprobs=st.none() | st.integers(0, 20), prompt_logprobs=st.none() | st.integers(0, 20),
    logit_bias=st.dictionaries(st.integers(0, 10**6), st.floats(-100, 100), max_size=4),
    skip_special_tokens=st.booleans(), spaces_between_special_tokens=st.booleans())

token_logprobs = st.tuples(tokens, st.lists(floats, max_size=20), st.integers(0, 10**6))
core_output = st.builds(
    EngineCoreOutput, request_id=ids, new_token_ids=tokens, new_logprobs=st.none() | st.lists(token_logprobs, max_size=3),
    prompt_logprobs=st.none() | st.lists(token_logprobs, max_size=3),
    finish_reason=st.none() | st.sampled_from(["stop", "length", "abort"]),
    stop_reason=st.none() | st.integers(0, 10**6) | st.text(min_size=1, max_size=8))
stats = st.builds(EngineStats, num_running=small, num_waiting=small, kv_cache_usage=unit, prefix_cache_queries=small,
                  prefix_cache_hits=small, num_preemptions=small, cpu_prefix_cache_queries=small,
                  cpu_prefix_cache_hits=small, encoder_cache_queries=small, encoder_cache_hits=small)
image = st.builds(ImageInput, hash=st.text(min_size=64, max_size=64, alphabet="0123456789abcdef"),
                  offset=st.integers(0, 10**6), length=st.integers(1, 10**4), data=st.binary(max_size=64),
                  shape=st.lists(st.integers(1, 1000), max_size=4), dtype=st.sampled_from(["float32", "float16"]),
                  grid_thw=st.none() | st.lists(st.integers(1, 100), min_size=3, max_size=3),
                  image_size=st.none() | st.lists(st.integers(1, 5000), min_size=2, max_size=2))

to_core = st.one_of(
    st.builds(AddRequest, request_id=ids, client=st.integers(0, 64), prompt_token_ids=tokens, params=params,
              priority=st.integers(-1000, 1000), arrival_time=st.none() | floats,
              mm_inputs=st.none() | st.lists(image, max_size=3)),
    st.builds(AbortRequests, request_ids=st.lists(ids, max_size=5)),
    st.builds(ClientReady, client=st.integers(0, 64)))
from_core = st.one_of(
    st.builds(StepOutputs, outputs=st.lists(core_output, max_size=5), stats=stats,
              refused=st.lists(st.tuples(ids, st.text(max_size=30)), max_size=3)),
    st.builds(Ready, max_model_len=st.integers(2, 10**7), vocab_size=st.integers(1, 10**7)),
    st.builds(Failed, message=st.text(max_size=60), while_loading=st.booleans()))


@settings(max_examples=300, deadline=None)
@given(to_core)
def test_messages_to_the_core_round_trip(message):
    decoded = decode_to_core(encode(message))
    assert type(decoded) is type(message) and decoded == message


@settings(max_examples=300, deadline=None)
@given(from_core)
def test_messages_from_the_core_round_trip(message):
    decoded = decode_from_core(encode(message))
    assert type(decoded) is type(message) and decoded == message


def test_malformed_messages_are_refused():
    add = AddRequest("r", 0, [1, 2], SamplingParams())
    with pytest.raises(msgspec.ValidationError):
        decode_from_core(encode(add))  # a message for the other direction
    raw = msgspec.msgpack.decode(encode(add))
    raw[4]["n"] = 0  # SamplingParams validates on the way in, as on construction
    with pytest.raises(msgspec.ValidationError, match="n must be an integer >= 1"):
        decode_to_core(msgspec.msgpack.encode(raw))
    with pytest.raises(msgspec.DecodeError):
        decode_to_core(encode(add)[:-3])
