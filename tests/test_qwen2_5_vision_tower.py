"""Qwen2.5-VL's vision transformer alone against HF transformers' in float64: several windowed
and full-attention blocks, windows of 4x4 merged tokens over grids they do not divide, the merger's
rows back in the image's order. The greedy test in test_vision_models.py covers the whole model;
this one bounds the tower's error tightly and checks the windows are what makes it match."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers

from runtime.models.vision import vision_weight_name
from runtime.models.vision.encoder import build_encoder, load_encoder

GRIDS = [[1, 10, 14], [1, 6, 4], [1, 22, 18]]


def _tiny_qwen2_5_vl() -> transformers.PreTrainedModel:
    vision = dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=[1, 3], initializer_range=0.2)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None,
                                           eos_token_id=None, architectures=["Qwen2_5_VLForConditionalGeneration"])
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).double().eval()


@torch.inference_mode()
def test_qwen2_5_vl_tower_matches_hf_in_float64():
    model = _tiny_qwen2_5_vl()
    patches = torch.randn(sum(t * h * w for t, h, w in GRIDS), 3 * 2 * 14 * 14, dtype=torch.float64)
    reference = model.model.visual(patches, grid_thw=torch.tensor(GRIDS))
    reference = getattr(reference, "pooler_output", reference)

    encoder = build_encoder(model.config).double()
    load_encoder(encoder, {vision_weight_name(name): value for name, value in model.state_dict().items()
                           if "visual." in name})
    images = [SimpleNamespace(grid_thw=grid) for grid in GRIDS]
    rows = torch.cat(encoder(patches, images))
    # Both rotate queries and keys in float32 (HF's choice too), so float64 agrees to ~1e-7 relative.
    scale = reference.abs().max()
    assert (rows - reference).abs().max() <= 1e-6 * scale

    # The windows change the result: attending fully in every block departs from HF by far more.
    encoder.visual.full_attention = set(range(len(encoder.visual.blocks)))
    assert (torch.cat(encoder(patches, images)) - reference).abs().max() > 1e-2 * scale
