"""Registration: the plugin loads under this runtime's contract, and what it declares is sane and
consistent with what its classes do."""

from __future__ import annotations

import math
import re

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from runtime.platform import CONTRACT_VERSION, AttentionBackend, Communicator, PlatformConfig
from runtime.platform.registry import KernelSet

from ..params import case, parametrize, unsupported
from ..specs import dtypes, spec_for
from ..tolerances import TOLERANCES

# The dtypes the suite can check: those it states a tolerance for.
FLOAT_DTYPES = tuple(TOLERANCES)


def pytest_generate_tests(metafunc):
    makers = {"test_attention_backend_declarations": _backends, "test_quantization_declarations": _methods}
    if metafunc.function.__name__ in makers:
        parametrize(metafunc, makers[metafunc.function.__name__])


def _backends(target):
    return [case(b, b.name) for b in target.backends] or [unsupported("none", "no attention backend registered")]


def _methods(target):
    return ([case(m, f"{m.name}-{m.__name__}") for m in target.quantization_methods]
            or [unsupported("none", "no quantization methods registered (quantized checkpoints cannot load)")])


def test_platform_loaded(target):
    assert target.platform is not None, f"platform {target.name!r} did not load: {target.problem}"


def test_contract_version(target):
    plugin = target.plugin
    assert plugin is not None, f"no loaded plugin provides platform {target.name!r}: {target.problem}"
    declared = SpecifierSet(plugin.RUNTIME_CONTRACT)
    assert Version(CONTRACT_VERSION) in declared, f"RUNTIME_CONTRACT {plugin.RUNTIME_CONTRACT!r} excludes {CONTRACT_VERSION}"
    major = Version(CONTRACT_VERSION).major
    assert Version(f"{major + 1}.0") not in declared, (
        f"RUNTIME_CONTRACT {plugin.RUNTIME_CONTRACT!r} admits contract {major + 1}.0, whose hooks may change "
        f"incompatibly; bound it: '>={major}.0,<{major + 1}'")


def test_platform_metadata(target):
    platform = target.require_platform()
    cls = type(platform)
    problems = []
    if not isinstance(cls.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", cls.name):
        problems.append(f"name {cls.name!r} is not a short lowercase identifier usable as --device")
    try:
        if platform.device(0).type != cls.device_type:
            problems.append(f"device(0) is {platform.device(0)}, not of device_type {cls.device_type!r}")
    except Exception as exc:
        problems.append(f"device(0) failed for device_type {cls.device_type!r}: {exc}")
    if not isinstance(cls.priority, int):
        problems.append(f"priority {cls.priority!r} is not an int")
    if not isinstance(cls.dist_backend, str) or not cls.dist_backend:
        problems.append(f"dist_backend {cls.dist_backend!r} is not a torch.distributed backend name")
    declared = tuple(cls.supported_dtypes)
    if not declared or any(d not in FLOAT_DTYPES for d in declared):
        problems.append(f"supported_dtypes {declared} must be a non-empty tuple of {FLOAT_DTYPES}")
    seqs = platform.default_max_num_seqs()
    if not isinstance(seqs, int) or seqs < 1:
        problems.append(f"default_max_num_seqs() {seqs!r} is not a positive int")
    if platform.default_dtype() not in declared:
        problems.append(f"default_dtype() {platform.default_dtype()} is not in supported_dtypes {declared}")
    if cls.is_available() is not True:
        problems.append(f"is_available() returned {cls.is_available()!r}, not True, though the platform was selected")
    count = platform.device_count()
    if not isinstance(count, int) or count < 1:
        problems.append(f"device_count() is {count!r}, expected an int >= 1")
    else:
        problems += [f"device_name({i}) is {platform.device_name(i)!r}" for i in range(count)
                     if not isinstance(platform.device_name(i), str) or not platform.device_name(i)]
    assert not problems, "platform metadata: " + "; ".join(problems)


def test_config_adjustment(target):
    platform = target.require_platform()
    config = PlatformConfig(dtype=platform.default_dtype(), block_size=16, max_model_len=256, max_num_seqs=8,
                            max_num_batched_tokens=256, enable_prefix_caching=True)
    platform.check_and_update_config(config)
    assert config.block_size >= 1, f"check_and_update_config set block_size {config.block_size}"
    missing = [d for d in FLOAT_DTYPES if d not in platform.supported_dtypes]
    if missing:
        config.dtype = missing[0]
        with pytest.raises(ValueError, match=".+"):
            platform.check_and_update_config(config)


def test_every_dtype_has_attention(target):
    platform = target.require_platform()
    uncovered = [d for d in platform.supported_dtypes if not any(d in dtypes(b, platform) for b in target.backends)]
    assert not uncovered, (f"platform declares dtypes {uncovered} that no attention backend of {target.name} supports; "
                           f"models in them cannot run")


def test_attention_backend_declarations(case, target):
    backend: type[AttentionBackend] = case
    platform = target.require_platform()
    problems = []
    usable = dtypes(backend, platform)
    if not usable:
        pytest.fail(f"{backend.name}: supported_dtypes {backend.supported_dtypes} share none with the platform's")
    for attr in ("supported_head_sizes", "supported_block_sizes"):
        value = getattr(backend, attr)
        if value is not None and (not value or any(not isinstance(v, int) or v < 1 for v in value)):
            problems.append(f"{attr} {value!r} must be None (any) or a non-empty tuple of positive ints")
    spec = spec_for(backend, usable[0])
    shapes = [tuple(backend.kv_cache_shape(n, spec.block_size, spec.num_kv_heads, spec.head_size)) for n in (3, 5)]
    dim = backend.kv_cache_block_dim
    if any(len(s) <= dim or s[dim] != n for s, n in zip(shapes, (3, 5))):
        problems.append(f"kv_cache_shape {shapes[0]} (3 blocks) does not index blocks in kv_cache_block_dim {dim}")
    elif [s[:dim] + s[dim + 1:] for s in shapes][0] != [s[:dim] + s[dim + 1:] for s in shapes][1]:
        problems.append(f"kv_cache_shape changes more than dimension {dim} with the number of blocks: {shapes}")
    elif math.prod(shapes[0]) < 2 * 3 * spec.block_size * spec.num_kv_heads * spec.head_size:
        problems.append(f"kv_cache_shape {shapes[0]} is too small to hold K and V of 3 blocks")
    if backend.unsupported_reason(spec) is not None:
        problems.append(f"unsupported_reason rejects a declared spec: {backend.unsupported_reason(spec)}")
    undeclared = {f"dtype {d}": spec_for(backend, d) for d in FLOAT_DTYPES if d not in backend.supported_dtypes}
    if not backend.supports_sliding_window:
        undeclared["sliding window"] = spec_for(backend, usable[0], sliding_window=8)
    if not backend.supports_logits_soft_cap:
        undeclared["soft-capping"] = spec_for(backend, usable[0], logits_soft_cap=30.0)
    if backend.supported_head_sizes is not None:
        odd = next(h for h in (24, 40, 72, 320) if h not in backend.supported_head_sizes)
        undeclared[f"head size {odd}"] = spec_for(backend, usable[0], head_size=odd)
    if backend.supported_block_sizes is not None:
        odd = next(b for b in (3, 5, 7, 96) if b not in backend.supported_block_sizes)
        undeclared[f"block size {odd}"] = spec_for(backend, usable[0], block_size=odd)
    problems += [f"unsupported_reason accepts {what}, which the backend does not declare"
                 for what, s in undeclared.items() if backend.unsupported_reason(s) is None]
    assert not problems, f"{backend.name}: " + "; ".join(problems)


def test_kernel_declarations(target):
    target.require_platform()
    if not target.kernels:
        pytest.skip("unsupported: no kernels registered; every op runs the core's reference implementation")
    KernelSet(target.kernels)  # raises for an op the contract does not know
    bad = [k.op for k in target.kernels if not callable(k.fn)]
    assert not bad, f"kernels for {bad} are not callable"


def test_quantization_declarations(case, target):
    method = case
    problems = []
    if not isinstance(method.name, str) or not method.name:
        problems.append(f"name {method.name!r} is not a checkpoint format name")
    # An online-only method (quantizes_dense) loads no checkpoint tensors, so it has no types to list.
    if any(not isinstance(q, str) for q in method.supported_qtypes) or not (method.supported_qtypes or method.quantizes_dense):
        problems.append(f"supported_qtypes {method.supported_qtypes!r} must be a set of type names, "
                        f"non-empty unless the method has quantizes_dense")
    method()  # the registry instantiates methods without arguments
    assert not problems, f"{method.__name__}: " + "; ".join(problems)


def test_communicator_declared(target):
    target.require_platform()
    if target.communicator is None:
        pytest.skip("unsupported: no communicator registered (no --tensor-parallel-size > 1)")
    assert issubclass(target.communicator, Communicator), f"{target.communicator} is not a Communicator"
