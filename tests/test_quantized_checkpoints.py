"""GPTQ, AWQ, compressed-tensors and FP8 checkpoints: recognised from config.json, unpacked
exactly, multiplied within the kernel's precision, and generating HF transformers' greedy
tokens on the same weights dequantized (tests/quantized_checkpoints.py packs them from the
formats' specifications; compressed-tensors through its own package)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from runtime import LLM, SamplingParams
from runtime.loader import open_model
from runtime.loader.quantized import quantization_config, read_quantized_weights
from runtime.loader.safetensors import weight_files
from runtime.platform import RawQuantizedTensor, get_registry
from runtime.models.layers.linear import Linear
from runtime.models.parallel import TensorParallel
from runtime.platform.packed import cut_columns
from runtime.worker.model_runner import ModelRunner
from runtime_conformance.tolerances import tolerance

from hf_reference import assert_greedy_matches, hf_greedy
from quantized_checkpoints import Scheme, write_quantized
from tiny_models import make_tiny_checkpoint

# 128 input features to the attention and gate/up projections, 256 to down: every group size fits.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)

UNPACK_SCHEMES = [
    Scheme("gptq", 4, 32, symmetric=True),
    Scheme("gptq", 4, 64, symmetric=False, act_order=True),
    Scheme("gptq", 4, 128, symmetric=False),
    Scheme("gptq", 4, -1, symmetric=True),
    Scheme("gptq", 8, 128, symmetric=True, act_order=True),
    Scheme("gptq", 8, -1, symmetric=False),
    Scheme("awq", 4, 32, symmetric=False),
    Scheme("awq", 4, 128, symmetric=False),
    Scheme("compressed-tensors", 4, 32, symmetric=True),
    Scheme("compressed-tensors", 4, 128, symmetric=False, act_order=True),
    Scheme("compressed-tensors", 8, -1, symmetric=True),
    Scheme("compressed-tensors", float8=True, fp8_scale="channel"),
    Scheme("compressed-tensors", float8=True, fp8_scale="tensor", static_input=True),
    Scheme("fp8", float8=True, fp8_scale="tensor"),
    Scheme("fp8", float8=True, fp8_scale="channel", static_input=True),
]
# One tiny model per format generates against HF (each costs an engine start).
GENERATION_SCHEMES = [
    Scheme("gptq", 4, 32, symmetric=False, act_order=True),
    Scheme("gptq", 8, 128, symmetric=True),
    Scheme("awq", 4, 64, symmetric=False),
    Scheme("compressed-tensors", 4, 128, symmetric=True),
    Scheme("fp8", float8=True, fp8_scale="tensor"),
]
PROMPTS = ["Hello! How are", "The capital of France", "def add(a, b):"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "llama", seed=3, **SHAPE)


def _loaded(path) -> dict[str, RawQuantizedTensor]:
    config = transformers.AutoConfig.from_pretrained(path)
    raws = {}
    for name, value in read_quantized_weights(weight_files(path), quantization_config(config)):
        if isinstance(value, RawQuantizedTensor):
            raws[name] = value
    return raws


@pytest.mark.parametrize("scheme", UNPACK_SCHEMES, ids=lambda s: s.id)
def test_loader_unpacks_exactly_and_the_cpu_product_matches_float64(scheme, dense_dir, tmp_path):
    reference = write_quantized(dense_dir, tmp_path / "q", scheme)
    raws = _loaded(tmp_path / "q")
    assert sorted(raws) == sorted(reference)
    method = get_registry().quantization_method("cpu", scheme.format)
    generator = torch.Generator().manual_seed(0)
    for name, raw in raws.items():
        dense = reference[name]
        assert raw.shape == tuple(dense.shape)
        torch.testing.assert_close(raw.data.dequantize(torch.float64), dense, rtol=0, atol=0, msg=name)
        x = torch.randn(3, dense.shape[1], generator=generator)
        expected = x.double() @ dense.T
        got = method.apply(method.load(raw, torch.float32, torch.device("cpu")), x).double()
        # Products in bfloat16 (the int4 kernel) or exact; 2**-7 of the output's magnitude is
        # two bfloat16 steps, far below what a wrong nibble, scale or zero point moves.
        allowed = 2 ** -7 * (x.double().abs() @ dense.abs().T) + 1e-6
        assert bool(((got - expected).abs() <= allowed).all()), f"{scheme.id} {name}"


def test_int4_weights_stay_packed_on_the_cpu(dense_dir, tmp_path):
    """A 4-bit GPTQ model's projections keep ~4.5 bits a weight, not a dense copy."""
    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 32))
    llm = LLM(str(tmp_path / "q"), kv_cache_memory="16MiB", max_model_len=128)
    assert llm.engine.quantization == "gptq"
    linears = [m for m in llm.engine.runner.model.modules() if getattr(m, "quant_method", None) is not None]
    assert len(linears) == 2 * 4  # qkv, o, gate_up, down of two layers
    for linear in linears:
        assert linear.weight.numel() == 0
        assert linear.stored_bytes <= linear.out_features * linear.in_features * (4 + 32 / 32) / 8


class _DenseProjectionAllocations(TorchDispatchMode):
    """Counts every float tensor allocated with a projection weight's [out, in] shape."""

    def __init__(self, shapes: set[tuple[int, int]]):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided) and result.is_floating_point()
                and not result.is_meta and tuple(result.shape) in self.shapes):
            self.count += 1
        return result


def test_a_packed_checkpoint_loads_without_ever_allocating_its_dense_projections(dense_dir, tmp_path):
    """The model is built with its projections' dense weights deferred: the packed ones never get
    one, so a checkpoint whose packed weights fit a device loads there. The dense checkpoint,
    loaded the same way, allocates each projection (the count can see them)."""
    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 32))
    shapes = {(128 + 2 * 64, 128), (128, 128), (2 * 256, 128), (128, 256)}  # qkv, o, gate_up, down
    registry = get_registry()
    counts = {}
    for name in ("dense", "q"):
        source = open_model(str(dense_dir if name == "dense" else tmp_path / "q"))
        with _DenseProjectionAllocations(shapes) as allocations:
            ModelRunner(source.hf_config, source.weights(), registry.select_platform("cpu"), registry, torch.float32,
                        16, 128)
        counts[name] = allocations.count
    assert counts == {"dense": 2 * 4, "q": 0}


def test_the_memory_check_sizes_a_packed_checkpoint_as_stored(dense_dir, tmp_path, monkeypatch):
    """Before loading, a 4-bit checkpoint needs its stored bytes (packed weights, dense float
    tensors and a dense embedding table), not its dense size: a device with room for the former
    but not the latter loads it; the dense checkpoint is refused there."""
    from runtime_cpu.platform import CpuPlatform
    from safetensors import safe_open

    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 32))
    stored = 0
    for file in weight_files(tmp_path / "q"):
        with safe_open(file, framework="pt") as f:
            stored += sum(4 * f.get_tensor(k).numel() if f.get_tensor(k).is_floating_point()
                          else f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    dense = sum(4 * t.numel() for t in transformers.AutoModelForCausalLM.from_pretrained(dense_dir).parameters())
    assert stored < dense / 2
    free = (stored + dense) // 2
    monkeypatch.setattr(CpuPlatform, "memory_info", lambda self, index=0: (free, 2 * dense))
    with pytest.raises(ValueError, match="model needs .* GiB for its weights in float32, only .* GiB is free on cpu"):
        LLM(str(dense_dir), kv_cache_memory="16MiB", max_model_len=128, dtype="float32")
    llm = LLM(str(tmp_path / "q"), kv_cache_memory="16MiB", max_model_len=128, dtype="float32")
    assert llm.engine.quantization == "gptq"


@pytest.mark.parametrize("scheme", GENERATION_SCHEMES, ids=lambda s: s.id)
def test_greedy_matches_hf_on_the_dequantized_weights(scheme, dense_dir, tmp_path):
    reference = write_quantized(dense_dir, tmp_path / "q", scheme)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, dense in reference.items():
            hf.get_parameter(name).copy_(dense.float())
    llm = LLM(str(tmp_path / "q"), kv_cache_memory="16MiB", max_model_len=128)
    assert llm.engine.quantization == scheme.format
    # The int4 kernel computes in bfloat16 (its declared precision): a near-tie is then what the
    # conformance suite allows bfloat16 (float32 products pass at 1e-3, as the CPU's default dtype).
    precision = get_registry().quantization_method("cpu", scheme.format).precision("int4" if scheme.bits == 4 else "")
    near_tie = tolerance(precision).logprob if precision is not None and not scheme.float8 else 1e-3
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
        tokens, rows = hf_greedy(hf, out.prompt_token_ids, NEW_TOKENS)
        assert_greedy_matches(out.outputs[0].token_ids, tokens, rows, near_tie=near_tie, context=f"{scheme.id} {prompt!r}")


def test_quantization_flag_chooses_and_refuses(dense_dir, tmp_path):
    write_quantized(dense_dir, tmp_path / "q", Scheme("awq", 4, 64, symmetric=False))
    options = dict(kv_cache_memory="16MiB", max_model_len=128)
    with pytest.raises(ValueError, match=r"--quantization gptq cannot run this checkpoint on cpu: it loads gptq "
                                         r"checkpoints and this one is awq; choose one of: awq, int8, none"):
        LLM(str(tmp_path / "q"), quantization="gptq", **options)
    with pytest.raises(ValueError, match="the cpu platform has no marlin method; choose one of: awq, int8, none"):
        LLM(str(tmp_path / "q"), quantization="marlin", **options)
    dense = LLM(str(tmp_path / "q"), quantization="none", **options)
    assert not any(getattr(m, "quant_method", None) for m in dense.engine.runner.model.modules())


def test_row_parallel_cut_keeps_groups_or_refuses(dense_dir, tmp_path):
    reference = write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 64, symmetric=False))
    name = "model.layers.0.mlp.down_proj.weight"
    raw = _loaded(tmp_path / "q")[name]
    half = cut_columns(raw, 128, 256)
    torch.testing.assert_close(half.data.dequantize(torch.float64), reference[name][:, 128:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fall on the checkpoint's quantization groups of 64 columns"):
        cut_columns(raw, 96, 192)


def test_unsupported_checkpoint_methods_are_named(dense_dir, tmp_path):
    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 32))
    path = tmp_path / "q" / "config.json"
    path.write_text(path.read_text().replace('"quant_method": "gptq"', '"quant_method": "bitsandbytes"'))
    with pytest.raises(ValueError, match="checkpoint quantization 'bitsandbytes' is not supported; supported: gptq, awq, "
                                         "compressed-tensors, fp8"):
        LLM(str(tmp_path / "q"), kv_cache_memory="16MiB", max_model_len=128)


def _rank_model(path, tp: TensorParallel):
    """One rank's model as a tensor-parallel rank loads it (loading needs no communicator)."""
    source = open_model(str(path))
    registry = get_registry()
    return ModelRunner(source.hf_config, source.weights(), registry.select_platform("cpu"), registry, torch.float32,
                       16, 128, tp=tp).model


def test_tensor_parallel_ranks_keep_their_packed_slices(dense_dir, tmp_path):
    """Each rank of two keeps its rows (column-parallel) or its whole groups of input columns
    (row-parallel) still packed: its product with the identity is the full weight's slice."""
    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 32, symmetric=False))
    full = _rank_model(tmp_path / "q", TensorParallel())
    for rank in range(2):
        ranked = _rank_model(tmp_path / "q", TensorParallel(rank, 2))
        for name, linear in ranked.named_modules():
            if not isinstance(linear, Linear) or linear.quant_method is None:
                continue
            whole = full.get_submodule(name)
            columns = linear.columns or (0, whole.in_features)
            # The identity in blocks of 64 rows, which the int4 path multiplies on its kernel at any
            # size (from int4.DENSE_MIN_ROWS rows it would dequantize, rounding otherwise): one-hot
            # rows then give the rank's slice the same bits as the whole weight.
            expected = torch.cat([whole(block) for block in torch.eye(whole.in_features).split(64)])[columns[0]:columns[1]]
            rows = [torch.arange(*linear.rows[i]) + sum(whole.partitions[:i]) for i in range(len(whole.partitions))] \
                if linear.rows else [torch.arange(whole.out_features)]
            got = torch.cat([linear.quant_method.apply(linear.quant_weight, block)
                             for block in torch.eye(linear.in_features).split(64)])
            assert torch.equal(got, expected[:, torch.cat(rows)]), (rank, name)


def test_tensor_parallel_split_inside_a_group_is_refused(dense_dir, tmp_path):
    write_quantized(dense_dir, tmp_path / "q", Scheme("gptq", 4, 128))
    with pytest.raises(ValueError, match=r"input columns \[64, 128\) do not fall on the checkpoint's quantization "
                                         r"groups of 128 columns"):
        _rank_model(tmp_path / "q", TensorParallel(1, 2))
