"""Reader for checkpoints in Hugging Face layout: config.json, tokenizer files, *.safetensors."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Iterator

from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from .quantized import quantization_config, read_quantized_weights
from .source import ModelSource, StoredSize, WeightStream, eos_token_ids, generation_config_eos
from .stored import StoredTensor

INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the model's weights, in load order.

    The index decides when present: hub repos sometimes also carry a ``consolidated.safetensors``
    with the same weights under other names, which must not be read twice.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {directory} has no *.safetensors weights (other weight formats are not supported)")
    return files


def read_weights(files: list[Path]) -> WeightStream:
    """Every tensor of ``files`` under its stored (HF) name, as a ``StoredTensor`` that reads only
    what its consumer indexes. Each file stays open while the stream yields its tensors."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, StoredTensor(f, name)


_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def stored_sizes(files: list[Path]) -> Iterator[StoredSize]:
    """Each tensor's size from the files' headers (no tensor data is read)."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                stored = f.get_slice(name)
                numel, dtype = math.prod(stored.get_shape()), stored.get_dtype()
                yield StoredSize(name, numel, numel * _ELEMENT_BYTES.get(dtype, 1), dtype in _FLOAT_DTYPES)


def open_tokenizer(directory: Path):
    """The HF tokenizer in a model directory; a ``ValueError`` naming the directory if none loads."""
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:  # transformers explains over several lines; keep the first
        reason = str(exc).strip().splitlines()[0]
        raise ValueError(f"could not load a tokenizer from {directory} (expected tokenizer.json): {reason}") from None


def open_safetensors(directory: Path, dummy: bool = False) -> ModelSource:
    """Open a local HF-layout model directory; nothing is fetched from a hub. ``dummy``: made-up
    weights of the config's architecture instead of the directory's files (``--load-format dummy``)."""
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    tokenizer = open_tokenizer(directory)
    quantization = quantization_config(config)
    if dummy:
        if quantization is not None:
            raise ValueError(f"--load-format dummy makes dense weights; {directory} is a {quantization['quant_method']} "
                             f"checkpoint: load its files, or give a dense model's config and a --quantization that "
                             f"quantizes at load")
        from .dummy import dummy_weights
        read, sizes = (lambda: dummy_weights(config)), None
    else:
        files = weight_files(directory)
        read = (lambda: read_weights(files)) if quantization is None else (lambda: read_quantized_weights(files, quantization))
        sizes = functools.partial(stored_sizes, files)
    return ModelSource(
        hf_config=config,
        tokenizer=tokenizer,
        format="safetensors",
        path=directory,
        chat_template=getattr(tokenizer, "chat_template", None),
        generation_eos_token_ids=eos_token_ids(config, tokenizer, generation_config_eos(directory)),
        read_weights=read,
        stored_sizes=sizes,
        quantization=None if quantization is None else quantization["quant_method"],
    )
