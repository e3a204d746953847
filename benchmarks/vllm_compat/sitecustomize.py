"""Put on PYTHONPATH for vLLM 0.22.1 only (benchmarks/vision_gpu.py does): its LLaVA module imports
Pixtral helpers from transformers under the names of transformers 4.x, which transformers 5.x
(the lent GPU image has 5.17) renamed or dropped, so vLLM cannot even inspect a LLaVA config.
LLaVA-1.5 (a CLIP tower) calls none of them; the old names are restored only where missing."""

import importlib


def _missing(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"transformers' {name} is gone in this version; the vLLM shim only imports it")
    return call


def _restore_pixtral_names() -> None:
    wanted = {"modeling_pixtral": ("PixtralRotaryEmbedding", "apply_rotary_pos_emb", "position_ids_in_meshgrid"),
              "image_processing_pixtral": ("_num_image_tokens",)}
    for module_name, names in wanted.items():
        try:
            module = importlib.import_module(f"transformers.models.pixtral.{module_name}")
        except ImportError:
            continue
        for name in names:
            if not hasattr(module, name):
                renamed = getattr(module, name.replace("Pixtral", "PixtralVision"), None) if "Pixtral" in name else None
                setattr(module, name, renamed or _missing(name))


_restore_pixtral_names()
