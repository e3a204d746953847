"""Vision-language models against HF transformers: tiny random LLaVA-1.5 and Qwen2-VL, greedy
outputs for prompts with one and two images, equal token for token; the encoder cache; the
scheduler's encoder budget; images in chat messages."""

from __future__ import annotations

import base64
import io

import pytest

from runtime import LLM, SamplingParams
from runtime.multimodal.encoder_cache import EncoderCacheManager
from runtime.multimodal.inputs import ImageInput
from runtime.sched.request import Request
from runtime.sched.scheduler import Scheduler
from runtime.kv.manager import KVCacheManager
from vision_models import engine_prompts, hf_vision_greedy, make_tiny_llava, make_tiny_qwen2_vl, mixed_prompts, random_image

pytestmark = pytest.mark.xdist_group("vision")

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = make_tiny_llava(tmp_path_factory.mktemp("llava"))
    # A small token budget chunks the prompts through their images (and splits an image's rows).
    llm = LLM(str(path), kv_cache_memory="16MiB", max_model_len=256, max_num_batched_tokens=24)
    yield path, llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    path = make_tiny_llava(tmp_path_factory.mktemp("llava_next"), next_=True)
    llm = LLM(str(path), kv_cache_memory="16MiB", max_model_len=512)
    yield path, llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    path = make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))
    llm = LLM(str(path), kv_cache_memory="16MiB", max_model_len=256)
    yield path, llm
    llm.engine.shutdown()


def test_llava_greedy_matches_hf(llava):
    path, llm = llava
    prompts = mixed_prompts("<image>")
    outputs = llm.generate(engine_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)
    # Each image's 16 rows replaced one placeholder: the prompt grew by 15 tokens per image.
    texts = [llm.tokenizer.encode(text) for text, _ in prompts]
    assert [len(o.prompt_token_ids) - len(t) for o, t in zip(outputs, texts)] == [15, 30, 0]


def test_llava_next_greedy_matches_hf(llava_next):
    """Any-resolution tiles: a wide, a tall and a square image pick different grids."""
    path, llm = llava_next
    prompts = mixed_prompts("<image>")
    outputs = llm.generate(engine_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)


def test_qwen2_vl_greedy_matches_hf(qwen2_vl):
    path, llm = qwen2_vl
    prompts = mixed_prompts("<|vision_start|><|image_pad|><|vision_end|>")
    outputs = llm.generate(engine_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)


def test_same_image_is_encoded_once_and_its_prefix_reused(llava):
    path, llm = llava
    runner, scheduler, kv = llm.engine.runner, llm.engine.scheduler, llm.engine.kv_manager
    image, other = random_image(7, 33, 33), random_image(8, 33, 33)
    text = "<image>\nDescribe the picture in a few words please, and then the colours."
    encoded, hits = runner.encoder_outputs.images_encoded, scheduler.encoder_cache.hits
    first = llm.generate([{"prompt": text, "multi_modal_data": {"image": image}}], GREEDY, use_tqdm=False)
    assert runner.encoder_outputs.images_encoded == encoded + 1
    # An equal copy after other text: the encoder output is reused, not recomputed.
    later = "The same: <image> and so on"
    reused = llm.generate([{"prompt": later, "multi_modal_data": {"image": image.copy()}}], GREEDY, use_tqdm=False)
    assert runner.encoder_outputs.images_encoded == encoded + 1
    assert scheduler.encoder_cache.hits == hits + 1
    assert reused[0].outputs[0].token_ids == hf_vision_greedy(path, [(later, [image])], NEW_TOKENS)[0]
    # The first prompt again: its blocks, image rows included, hit the prefix cache.
    cached = kv.prefix_cache_hits
    again = llm.generate([{"prompt": text, "multi_modal_data": {"image": image.copy()}}], GREEDY, use_tqdm=False)
    assert kv.prefix_cache_hits - cached >= 16
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    # Another image behind the same text: the blocks holding its rows must not hit.
    cached = kv.prefix_cache_hits
    changed = llm.generate([{"prompt": text, "multi_modal_data": {"image": other}}], GREEDY, use_tqdm=False)
    assert runner.encoder_outputs.images_encoded == encoded + 2
    assert kv.prefix_cache_hits == cached
    assert changed[0].outputs[0].token_ids == hf_vision_greedy(path, [(text, [other])], NEW_TOKENS)[0]


def test_chat_with_image_parts(llava):
    path, llm = llava
    image = random_image(11, 50, 40)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is this?"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    # The template writes the placeholder where the part is: the reference renders the same text.
    text = "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == text
    assert out.outputs[0].token_ids == hf_vision_greedy(path, [(text, [image])], NEW_TOKENS)[0]
    with pytest.raises(ValueError, match="--allow-remote-media"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}],
                 GREEDY, use_tqdm=False)


def _image(name: str, offset: int, length: int) -> ImageInput:
    return ImageInput(name * 64, offset, length, b"", [0], "float32")


def test_scheduler_stops_a_chunk_before_an_image_the_encoder_budget_cannot_take():
    """Two 16-row images, an encoder budget of 20 rows a step: the first step encodes the
    first image and its chunk stops before the second; the next step encodes the second."""
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, encoder_cache=EncoderCacheManager(64),
                          encoder_budget=20)
    first, second = _image("a", 2, 16), _image("b", 20, 16)
    request = Request("r", list(range(40)), SamplingParams(max_tokens=1), max_model_len=128)
    request.mm_inputs = [first, second]
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(0, 20)]
    assert [i.hash for i in out.encoder_inputs] == [first.hash]
    scheduler.update(out, {})
    out = scheduler.schedule()
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(20, 20)]
    assert [i.hash for i in out.encoder_inputs] == [second.hash]


def test_encoder_cache_evicts_only_unreferenced_outputs():
    cache = EncoderCacheManager(capacity=32)
    a, b, c = _image("a", 0, 16), _image("b", 0, 16), _image("c", 0, 16)
    cache.add(a, "r1")
    cache.add(b, "r2")
    assert not cache.can_add(16)  # both referenced
    cache.release_computed("r1", [a], num_computed=16)
    assert cache.can_add(16)
    cache.add(c, "r3")
    assert cache.take_freed() == [a.hash] and not cache.holds(a.hash) and cache.holds(b.hash)


def test_qwen2_5_vl_window_attention_matches_hf(tmp_path):
    """Qwen2.5-VL's windows (2x2 merged tokens) over images whose grids do not divide into them."""
    path = make_tiny_qwen2_vl(tmp_path, v2_5=True)
    llm = LLM(str(path), kv_cache_memory="8MiB", max_model_len=256)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [(f"See {placeholder} and {placeholder}.", [random_image(4, 112, 84), random_image(5, 70, 100)]),
               (f"{placeholder} What is it?", [random_image(6, 56, 56)])]
    outputs = llm.generate(engine_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)
    llm.engine.shutdown()


def test_qwen2_vl_refuses_a_video_placeholder(qwen2_vl):
    path, llm = qwen2_vl
    with pytest.raises(ValueError, match="video inputs are not supported"):
        llm.generate("<|vision_start|><|video_pad|><|vision_end|> What happens?", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="only images"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"video": [random_image(1, 56, 56)]}}, GREEDY, use_tqdm=False)


def test_chat_through_a_template_that_prints_content_as_a_string(qwen2_vl):
    """The tiny Qwen2-VL's template prints ``content`` whole: the placeholders go before the text."""
    path, llm = qwen2_vl
    image = random_image(12, 60, 36)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_pil", "image_pil": image}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == text
    assert out.outputs[0].token_ids == hf_vision_greedy(path, [(text, [image])], NEW_TOKENS)[0]
