"""LLaVA's tower and feature-selection variants against HF transformers: a SigLIP tower (no class
row, every row kept) under LLaVA-1.5 and LLaVA-NeXT, CLIP with its class row kept, several
layers' features, and the LLaVA-NeXT combinations HF cannot tile, refused."""

from __future__ import annotations

import pytest
import transformers

from runtime import LLM, SamplingParams
from runtime.models.vision.clip import LlavaEncoder
from runtime.models.vision.llava_next import LlavaNextEncoder
from vision_models import engine_prompts, hf_vision_greedy, make_tiny_llava, mixed_prompts

pytestmark = pytest.mark.xdist_group("vision")

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("next_, siglip, strategy, layer", [
    (False, True, None, None), (True, True, None, None), (False, False, "full", None), (False, True, "default", None),
    (True, False, None, [0, -2, -1])],
    ids=["llava-siglip", "llava-next-siglip", "llava-clip-full", "llava-siglip-default", "llava-next-clip-layers"])
def test_llava_tower_and_strategy_variants_match_hf(tmp_path, next_, siglip, strategy, layer):
    """SigLIP (no class row, every row kept) under LLaVA-1.5 and LLaVA-NeXT; CLIP with its class
    row kept; SigLIP with its first patch dropped (HF's "default" drops the first row whatever it
    is); three layers' features side by side (the embeddings' included)."""
    path = make_tiny_llava(tmp_path, next_=next_, siglip=siglip, strategy=strategy, feature_layer=layer)
    llm = LLM(str(path), kv_cache_memory="8MiB", max_model_len=512)
    prompts = mixed_prompts("<image>")[:2]
    outputs = llm.generate(engine_prompts(prompts), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_vision_greedy(path, prompts, NEW_TOKENS)
    llm.engine.shutdown()


@pytest.mark.parametrize("siglip, strategy", [(False, "full"), (True, "default")], ids=["clip-full", "siglip-default"])
def test_llava_next_refuses_tiles_that_are_not_patch_grids(siglip, strategy):
    """HF lays each tile's rows out as a side x side map: with CLIP's class row kept or a row of
    SigLIP's dropped, that view fails or mixes rows of neighbouring tiles, so the runtime refuses."""
    tower = (transformers.SiglipVisionConfig if siglip else transformers.CLIPVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7)
    config = transformers.LlavaNextConfig(vision_config=tower, text_config=transformers.LlamaConfig(hidden_size=64),
                                          vision_feature_select_strategy=strategy, vision_feature_layer=-1)
    with pytest.raises(ValueError, match=f"vision_feature_select_strategy '{'full' if siglip else 'default'}'"):
        LlavaNextEncoder(config)


def test_llava_refuses_a_tower_other_than_clip_or_siglip():
    config = transformers.LlavaConfig(vision_config={"model_type": "siglip2_vision_model"},
                                      text_config=transformers.LlamaConfig(hidden_size=64))
    with pytest.raises(ValueError, match="vision_config.model_type 'siglip2_vision_model' is not supported"):
        LlavaEncoder(config)
