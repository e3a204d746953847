"""Tiny random vision-language checkpoints (LLaVA-1.5, Qwen2-VL) written from transformers
configs, with their image processors, and HF transformers' greedy output as the reference.

``make_tiny_llava`` / ``make_tiny_qwen2_vl`` write a directory laid out as a hub download:
config.json, model.safetensors, tokenizer files with a chat template, preprocessor_config.json.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from tiny_models import EOS_ID, IM_END_ID, make_tiny_tokenizer

# A LLaVA-style template: it loops over the content parts and writes <image> for each image.
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_image(seed: int, width: int, height: int) -> Image.Image:
    """An RGB image of random pixels (a different one per seed)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def mixed_prompts(placeholder: str) -> list[tuple[str, list[Image.Image]]]:
    """One image, two images (two sizes), and text only: served together in one batch."""
    return [
        (f"<|im_start|>user\n{placeholder}\nWhat is in the picture?<|im_end|>\n", [random_image(1, 40, 30)]),
        (f"The first {placeholder} and the second {placeholder} differ", [random_image(2, 64, 50), random_image(3, 30, 44)]),
        ("The capital of France is", []),
    ]


def engine_prompts(prompts: list[tuple[str, list[Image.Image]]]) -> list:
    """(text, images) pairs as ``LLM.generate`` takes them."""
    return [{"prompt": text, "multi_modal_data": {"image": images}} if images else text for text, images in prompts]


def _save(model: transformers.PreTrainedModel, tokenizer, image_processor, path: Path) -> Path:
    model.generation_config.eos_token_id = [EOS_ID, IM_END_ID]
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def make_tiny_llava(tmp_dir: str | Path, seed: int = 0, next_: bool = False, siglip: bool = False,
                    strategy: str | None = None, feature_layer: int | list[int] | None = None) -> Path:
    """LLaVA-1.5 shaped: a 3-layer CLIP tower on 28 px images (patch 7: 16 image tokens, the
    CLS row dropped, features of the second-to-last layer), the GELU projector, a tiny Llama.
    ``next_``: LLaVA-NeXT, the same tower over any-resolution tiles (grids up to 2x2 of 28 px).
    ``siglip``: a SigLIP tower instead, every row of its last layer kept (strategy ``full``).
    ``strategy``, ``feature_layer``: another ``vision_feature_select_strategy`` or
    ``vision_feature_layer`` (a list: those layers' features side by side) than the tower's usual."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                 patch_size=7)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=512, initializer_range=0.2, eos_token_id=EOS_ID)
    common = dict(text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  initializer_range=0.2)
    if siglip:
        common.update(vision_config=transformers.SiglipVisionConfig(**tower), vision_feature_layer=-1,
                      vision_feature_select_strategy=strategy or "full")
    else:
        common.update(vision_config=transformers.CLIPVisionConfig(**tower, projection_dim=32),
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy or "default")
    if feature_layer is not None:
        common["vision_feature_layer"] = feature_layer
    name = "llava" + ("_next" if next_ else "") + ("_siglip" if siglip else "") + (f"_{strategy}" if strategy else "")
    name += "_layers" if feature_layer is not None else ""
    torch.manual_seed(seed)
    if next_:
        pinpoints = [[28, 56], [56, 28], [56, 56]]
        model = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
        with torch.no_grad():
            model.model.image_newline.normal_()  # HF starts it at zero-ish; a distinct row tests its place
        processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                         image_grid_pinpoints=pinpoints)
    elif siglip:
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
        processor = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    else:
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return _save(model, tokenizer, processor, Path(tmp_dir) / name)


def make_tiny_qwen2_vl(tmp_dir: str | Path, seed: int = 0, v2_5: bool = False) -> Path:
    """Qwen2-VL shaped: a 2-block vision transformer (patch 14, 2x2 merge) at native resolution
    between 56x56 and 112x112 pixels, M-RoPE sections [2, 3, 3], a tiny Qwen2 decoder. Its chat
    template prints content as a string (the placeholders then go before the text). ``v2_5``:
    Qwen2.5-VL's tower instead, windows of 2x2 merged tokens in block 0, full attention in block 1."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]})
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=EOS_ID)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3, initializer_range=0.2)
    config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    if v2_5:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1], initializer_range=0.2)
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                          video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                          vision_end_token_id=ids("<|vision_end|>"), initializer_range=0.2)
    torch.manual_seed(seed)
    model = model_class(config)
    processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                                   merge_size=2, temporal_patch_size=2)
    return _save(model, tokenizer, processor, Path(tmp_dir) / ("qwen2_5_vl" if v2_5 else "qwen2_vl"))


def hf_processor(path: Path):
    """HF's own processor of the checkpoint (tokenizer + image processor + placeholder expansion)."""
    config = transformers.AutoConfig.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    if config.model_type in ("llava", "llava_next"):
        processor_class = transformers.LlavaNextProcessor if config.model_type == "llava_next" else transformers.LlavaProcessor
        clip = config.vision_config.model_type == "clip_vision_model"
        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if clip else 0, image_token="<image>")
    model_class = transformers.Qwen2_5_VLModel if config.model_type == "qwen2_5_vl" else transformers.Qwen2VLModel
    return Qwen2VLReferenceProcessor(image_processor, tokenizer, config.vision_config.spatial_merge_size, model_class)


class Qwen2VLReferenceProcessor:
    """What transformers' Qwen2VLProcessor does for images (it needs torchvision for its video
    half): each ``<|image_pad|>`` becomes t*h*w / merge^2 copies, from the image processor's grid."""

    def __init__(self, image_processor, tokenizer, merge: int, model_class):
        self.image_processor, self.tokenizer, self.merge = image_processor, tokenizer, merge
        self.model_class = model_class

    def __call__(self, text: list[str], images=None, return_tensors: str = "pt") -> dict:
        pad = "<|image_pad|>"
        inputs = {}
        if images:
            inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = iter((inputs["image_grid_thw"].prod(-1) // self.merge ** 2).tolist())
            pieces = text[0].split(pad)
            text = [pieces[0] + "".join(pad * next(counts) + piece for piece in pieces[1:])]
        encoded = dict(self.tokenizer(text, return_tensors="pt"))
        if "mm_token_type_ids" in inspect.signature(self.model_class.get_rope_index).parameters:
            # Newer transformers place image tokens' rotary positions by these types (text 0, image 1).
            pad_id = self.tokenizer.convert_tokens_to_ids(pad)
            encoded["mm_token_type_ids"] = (encoded["input_ids"] == pad_id).int()
        return {**encoded, **inputs}


@torch.inference_mode()
def hf_vision_greedy(path: Path, prompts: list[tuple[str, list[Image.Image]]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy continuation of each (prompt text, images), EOS ignored."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # No end-of-sequence token: greedy runs its full length, as the runtime's ignore_eos does
    # (min_new_tokens would mask EOS out of the choice instead).
    model.generation_config.eos_token_id = None
    processor = hf_processor(path)
    outputs = []
    for text, images in prompts:
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return outputs
