"""Under tensor parallelism a rank reads only its slices of the checkpoint: what it loads equals
the slices of what one rank holding everything loads, and the checkpoint reads are recorded to
show that each sharded matrix is read about half per rank of two, never whole (safetensors'
``StoredTensor``; GGUF's quantized rows, cut before dequantizing). Unsharded loading reads each
tensor whole, once."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pytest
import torch

from runtime.loader import StoredTensor, open_model
from runtime.loader.gguf import build_config, read_weights
from runtime.loader.gguf_file import GgufFile
from runtime.models.decoder import DecoderForCausalLM
from runtime.models.layers.linear import Linear
from runtime.models.parallel import TensorParallel
from runtime.platform import get_registry
from runtime.worker.model_runner import ModelRunner

from tiny_models import make_tiny_checkpoint, make_tiny_gguf

RANKS = [TensorParallel(rank, 2) for rank in range(2)]


def load(hf_config, weights, tp: TensorParallel = TensorParallel()) -> DecoderForCausalLM:
    """The model one rank of ``tp`` loads (no communicator: loading does not communicate), quantized
    tensors dequantized (``--quantization none``; packed slices: test_quantized_checkpoints.py)."""
    registry = get_registry()
    platform = registry.select_platform("cpu")
    return ModelRunner(hf_config, weights, platform, registry, torch.float32, 16, 128, keep_packed=False, tp=tp).model


def rank_slice(full: torch.Tensor, partitions: list[int], rows: list[tuple[int, int]] | None,
               columns: tuple[int, int] | None) -> torch.Tensor:
    """What a rank holds of ``full``, cut from the loaded tensor rather than the checkpoint: per
    partition its rows (zero rows past the end, for a padded vocabulary) and its columns."""
    pieces = []
    for index, part in enumerate(full.split(partitions)):
        if rows is not None:
            first, end = rows[index]
            kept = part[first:end]
            part = torch.cat([kept, kept.new_zeros(end - first - len(kept), *kept.shape[1:])])
        pieces.append(part if columns is None else part[:, columns[0]:columns[1]])
    return torch.cat(pieces)


def assert_rank_holds_slices(full: DecoderForCausalLM, ranked: DecoderForCausalLM) -> None:
    """Every parameter of ``ranked`` equals its slice of ``full``'s, as ``ranked``'s modules say."""
    full_params = dict(full.named_parameters())
    for name, param in ranked.named_parameters():
        module_name, _, kind = name.rpartition(".")
        module = ranked.get_submodule(module_name) if module_name else None
        if name == "embed_tokens":
            expected = rank_slice(full.embed_tokens, [full.settings.vocab_size], ranked.vocab_rows, None)
        elif isinstance(module, Linear) and module.sharded:
            expected = rank_slice(full_params[name], full.get_submodule(module_name).partitions, module.rows,
                                  module.columns if kind == "weight" else None)
        else:
            expected = full_params[name]
        assert torch.equal(param, expected), name


# GQA with fewer KV heads than ranks, q/k/v biases and tied embeddings, a vocabulary the ranks
# do not divide, fused projections stored whole.
SAFETENSORS_CASES = {"llama": ("llama", {}), "llama-kv1": ("llama", {"num_key_value_heads": 1}),
                     "qwen2": ("qwen2", {}), "llama-odd-vocab": ("llama", {"vocab_size": 333}), "phi3": ("phi3", {})}


@pytest.mark.parametrize("arch,overrides", SAFETENSORS_CASES.values(), ids=SAFETENSORS_CASES.keys())
def test_a_rank_loads_the_slices_of_the_full_model(arch, overrides, tmp_path):
    source = open_model(str(make_tiny_checkpoint(tmp_path, arch, **overrides)))
    full = load(source.hf_config, source.weights())
    for tp in RANKS:
        assert_rank_holds_slices(full, load(source.hf_config, source.weights(), tp))


@pytest.fixture
def stored_reads(monkeypatch) -> dict[str, list[tuple[str, int]]]:
    """Per checkpoint tensor, each read of a ``StoredTensor``: ("slice" or "whole", elements)."""
    reads = defaultdict(list)
    index, read = StoredTensor.__getitem__, StoredTensor.read

    def recording_index(self, key):
        part = index(self, key)
        reads[self.name].append(("slice", part.numel()))
        return part

    def recording_read(self):
        whole = read(self)
        reads[self.name].append(("whole", whole.numel()))
        return whole

    monkeypatch.setattr(StoredTensor, "__getitem__", recording_index)
    monkeypatch.setattr(StoredTensor, "read", recording_read)
    return reads


def matrices(source) -> dict[str, int]:
    """Elements of every matrix of the checkpoint (every one is sharded under tensor parallelism)."""
    return {name: value.shape.numel() for name, value in source.weights() if len(value.shape) == 2}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_a_rank_of_two_reads_half_of_each_matrix(arch, tmp_path, stored_reads):
    source = open_model(str(make_tiny_checkpoint(tmp_path, arch)))
    sizes = matrices(source)
    assert any("qkv_proj" in name for name in sizes) == (arch == "phi3")  # phi3 covers fused whole-stored
    for tp in RANKS:
        stored_reads.clear()
        load(source.hf_config, source.weights(), tp)
        for name, size in sizes.items():
            assert all(how == "slice" for how, _ in stored_reads[name]), (name, stored_reads[name])
            assert sum(n for _, n in stored_reads[name]) / size == pytest.approx(0.5, abs=0.01), name


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_unsharded_loading_reads_each_tensor_whole_in_one_read(arch, tmp_path, stored_reads):
    source = open_model(str(make_tiny_checkpoint(tmp_path, arch)))
    load(source.hf_config, source.weights())
    for name, value in source.weights():
        assert [n for _, n in stored_reads[name]] == [value.shape.numel()], name


# --- GGUF -------------------------------------------------------------------------------------

class RecordingRows:
    """A GGUF tensor's ``data`` that records how many rows are taken from it (all of them when it
    is read as one array, which is how a whole tensor is dequantized)."""

    def __init__(self, data: np.ndarray, rows_taken: list[int]):
        self.data, self.rows_taken = data, rows_taken
        self.shape = data.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        part = self.data[rows]
        self.rows_taken.append(len(part))
        return part

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.rows_taken.append(len(self.data))
        return np.asarray(self.data, dtype=dtype)


def recorded_gguf_weights(path, rows_taken: dict[str, list[int]]):
    """The GGUF file's weight stream, each tensor's rows taken recorded under its HF name."""
    reader = GgufFile(path)
    for name, raw in read_weights(reader, build_config(reader)):
        yield name, dataclasses.replace(raw, data=RecordingRows(raw.data, rows_taken[name]))


ROW_SLICED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
              "embed_tokens.weight", "lm_head.weight")
"""Column-parallel matrices and the vocabulary's: a rank keeps a range of their rows. (Row-parallel
o_proj and down_proj are dequantized in whole rows, see ``decoder._DequantizedRows``.)"""


def test_a_gguf_rank_dequantizes_only_its_rows(tmp_path):
    path = make_tiny_gguf(tmp_path)
    reader = GgufFile(path)
    config = build_config(reader)
    rows = {name: raw.shape[0] for name, raw in read_weights(reader, config) if name.endswith(ROW_SLICED)}
    assert len(rows) == 5 * config.num_hidden_layers + 2
    full = load(config, recorded_gguf_weights(path, defaultdict(list)))
    for tp in RANKS:
        rows_taken = defaultdict(list)
        ranked = load(config, recorded_gguf_weights(path, rows_taken), tp)
        assert_rank_holds_slices(full, ranked)  # q/k: llama.cpp's row order is undone before the cut
        for name, total in rows.items():
            assert all(taken < total for taken in rows_taken[name]), (name, rows_taken[name])
            assert sum(rows_taken[name]) * 2 == total, (name, rows_taken[name])
