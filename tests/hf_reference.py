"""Greedy generation with HF transformers, the independent reference for model outputs."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import transformers


def embedded_hf_model() -> transformers.PreTrainedModel:
    """HF transformers' own reading of the embedded GGUF, in float32 (a fresh copy each call).

    Reading the GGUF takes HF ~40 s on a 2-core machine and four test modules need it: the first
    reader in a machine keeps HF's result as a safetensors checkpoint (keyed by the file's size
    and time), which later readers load in seconds; the values are HF's conversion either way.
    """
    from runtime.loader.source import embedded_model_path

    path = embedded_model_path()
    stat = path.stat()
    kept = Path(tempfile.gettempdir()) / f"runtime-test-embedded-hf-{stat.st_size}-{stat.st_mtime_ns}"
    if (kept / "config.json").exists():
        return transformers.AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    staging = Path(tempfile.mkdtemp(prefix=kept.name + ".", dir=kept.parent))
    # save_pretrained refuses a model read from a GGUF ("quantized with gguf"): keep its config
    # without that mark, and its tensors (save_model keeps the tied embedding once).
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_model(model, str(staging / "model.safetensors"))
    try:
        staging.rename(kept)  # atomic: a reader never sees half a checkpoint
    except OSError:  # another test process kept it first
        shutil.rmtree(staging, ignore_errors=True)
    return model.eval()


def embedded_greedy_and_chat(llm, prompts: list[str], new_tokens: int):
    """An engine's greedy outputs of ``prompts`` (EOS ignored) and its chat answer to "What is the
    capital of France?": what every test of the embedded model checks (the answer names Paris)."""
    from runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    return outputs, chat


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's full log-softmax row, ignoring EOS (as ``ignore_eos``)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past = out.past_key_values
    tokens, rows = [], []
    logits = out.logits[0, -1].float()
    for _ in range(max_new_tokens):
        logprobs = logits.log_softmax(-1)
        token = int(logprobs.argmax())
        tokens.append(token)
        rows.append(logprobs)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return tokens, rows


def assert_greedy_matches(ours: list[int], reference: list[int], reference_rows: list[torch.Tensor],
                          near_tie: float = 1e-3, context: str = "") -> None:
    """Token-for-token equality; a divergence is accepted only at a near-tie of the reference,
    where our token must be within ``near_tie`` of the reference's best logprob (then stop)."""
    assert len(ours) == len(reference), f"{context}: {len(ours)} tokens, reference has {len(reference)}"
    for step, (mine, theirs) in enumerate(zip(ours, reference)):
        if mine == theirs:
            continue
        row = reference_rows[step]
        gap = float(row[theirs] - row[mine])
        assert gap < near_tie, (f"{context}: step {step} chose {mine}, reference {theirs}, "
                                f"reference logprob gap {gap:.4g} is not a near-tie")
        return


@torch.inference_mode()
def hf_embeddings(model: transformers.PreTrainedModel, prompts: list[list[int]], pooling: str, normalize: bool,
                  dimensions: int | None = None) -> list[torch.Tensor]:
    """Each prompt's embedding from HF's base model (the final norm's output), computed alone in
    float64 after the forward pass: the LAST token's hidden state, the MEAN over all, or the
    first (CLS); the first ``dimensions`` components, then scaled to unit length if ``normalize``."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    vectors = []
    for ids in prompts:
        hidden = base(torch.tensor([ids])).last_hidden_state[0].double()
        vector = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling][:dimensions]
        vectors.append(vector / vector.norm() if normalize else vector)
    return vectors
