"""Random PEFT LoRA adapters for tiny checkpoints, written by PEFT itself (the independent reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

peft = pytest.importorskip("peft", reason="peft (the test extra) is the independent LoRA reference")

SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every projection, as most architectures name them."""
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
"""Every projection, as Phi-3 names them."""


def make_adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int, alpha: int = 16,
                 rslora: bool = False):
    """A random PEFT adapter (B not zero, so it changes the output) saved to ``out``; the PEFT model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                             use_rslora=rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random B is large next to a tiny model's weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    model.save_pretrained(out)
    return model.eval()
