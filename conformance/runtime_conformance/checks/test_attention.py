"""Attention: every backend of the platform against the reference paged attention (float64 math).

Each check feeds a scenario (see :mod:`runtime_conformance.paged`) step by step, as the engine
would: prefill, decode, chunked prefill, prefill after a prefix hit, mixed batches, several
query tokens per sequence (speculative verification), sequences over many blocks. On top:
GQA/MQA ratios, every declared head size, block size and dtype, sliding window and soft-capping
where declared, every declared fp8 KV-cache dtype, and where the new K/V land in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from runtime.platform import KV_CACHE_DTYPES, AttentionBackend, AttentionSpec

from ..compare import dtype_name
from ..paged import SCENARIOS, PagedRun
from ..params import case, parametrize, unsupported
from ..specs import block_sizes, dtypes, head_sizes, main_dtype, spec_for

HEAD_LAYOUTS = {"mha": (4, 4), "gqa4": (8, 2), "gqa8": (16, 2), "mqa": (8, 1)}
# (sliding window, soft cap): a window of 1 sees only the token itself; 37 spans blocks.
FEATURES = {"window1": (1, None), "window5": (5, None), "window37": (37, None),
            "softcap5": (None, 5.0), "softcap30": (None, 30.0), "window7-softcap5": (7, 5.0)}


@dataclass(frozen=True)
class AttentionCase:
    backend: type[AttentionBackend]
    spec: AttentionSpec
    scenario: str


def pytest_generate_tests(metafunc):
    makers = {"test_scenario": _scenarios, "test_head_layout": _head_layouts, "test_block_size": _block_sizes,
              "test_feature": _features, "test_kv_cache_dtype": _kv_cache_dtypes, "test_kv_written_to_slots": _kv_slots}
    parametrize(metafunc, makers[metafunc.function.__name__])


def _each_backend(target, cases_of):
    """``cases_of(backend, platform)`` for each backend the suite can check; one "unsupported" case for each other."""
    if not target.backends:
        yield unsupported("none", "no attention backend registered")
    for backend in target.backends:
        if not dtypes(backend, target.platform):
            yield unsupported(backend.name, f"{backend.name} declares no dtype the platform supports")
        elif not backend.supports_multi_query:
            yield unsupported(backend.name, f"{backend.name} takes one query token per sequence; the suite fills "
                                            "caches with multi-token steps")
        else:
            yield from cases_of(backend, target.platform)


def _scenarios(target):
    return _each_backend(target, lambda b, p: [
        case(AttentionCase(b, spec_for(b, dtype), name), f"{b.name}-{dtype_name(dtype)}-{name}")
        for dtype in dtypes(b, p) for name in SCENARIOS])


def _head_layouts(target):
    return _each_backend(target, lambda b, p: [
        case(AttentionCase(b, spec_for(b, main_dtype(b, p), num_heads=h, num_kv_heads=kv, head_size=size), "mixed"),
             f"{b.name}-{layout}-head{size}")
        for layout, (h, kv) in HEAD_LAYOUTS.items() for size in head_sizes(b)])


def _block_sizes(target):
    return _each_backend(target, lambda b, p: [
        case(AttentionCase(b, spec_for(b, main_dtype(b, p), block_size=size), name), f"{b.name}-block{size}-{name}")
        for size in block_sizes(b) for name in ("many_blocks", "prefix_hit")])


def _features(target):
    def cases(b, p):
        for name, (window, cap) in FEATURES.items():
            missing = [what for what, wanted, declared in (("sliding window", window, b.supports_sliding_window),
                                                           ("soft-capping", cap, b.supports_logits_soft_cap))
                       if wanted is not None and not declared]
            if missing:
                yield unsupported(f"{b.name}-{name}", f"{b.name} declares no {' and no '.join(missing)}")
                continue
            for dtype in dtypes(b, p):
                spec = spec_for(b, dtype, sliding_window=window, logits_soft_cap=cap)
                yield case(AttentionCase(b, spec, "mixed"), f"{b.name}-{dtype_name(dtype)}-{name}")
    return _each_backend(target, cases)


def _kv_cache_dtypes(target):
    def cases(b, p):
        for kv in KV_CACHE_DTYPES:
            if kv not in b.supported_kv_cache_dtypes:
                yield unsupported(f"{b.name}-{kv}", f"{b.name} declares no kv_cache_dtype {kv}")
                continue
            for dtype in dtypes(b, p):
                spec = spec_for(b, dtype, kv_cache_dtype=kv)
                # A declared cache dtype the device cannot hold (e4m3 before compute capability 8.9).
                reason = b.unsupported_reason(spec)
                if reason is not None:
                    yield unsupported(f"{b.name}-{dtype_name(dtype)}-{kv}", f"{b.name} on this device: {reason}")
                    continue
                for name in SCENARIOS:
                    yield case(AttentionCase(b, spec, name), f"{b.name}-{dtype_name(dtype)}-{kv}-{name}")
    return _each_backend(target, cases)


def _kv_slots(target):
    return _each_backend(target, lambda b, p: [
        case(AttentionCase(b, spec_for(b, dtype), "mixed"), f"{b.name}-{dtype_name(dtype)}") for dtype in dtypes(b, p)])


def _paged_run(case: AttentionCase, target) -> PagedRun:
    reason = case.backend.unsupported_reason(case.spec)
    assert reason is None, f"{case.backend.name} rejects a spec within its declarations: {reason}"
    return PagedRun(SCENARIOS[case.scenario], case.spec, case.backend, target.device,
                    mark_step=target.platform.mark_step)


def _run(case: AttentionCase, target, check_cache: bool = False) -> None:
    run = _paged_run(case, target)
    if check_cache and not run.default_layout:
        pytest.skip("unsupported: the backend's own cache layout cannot be read slot by slot; the other attention "
                    "checks verify its K/V by reading them back in later steps")
    run.run(case.backend(case.spec), check_cache)


def test_scenario(case, target):
    _run(case, target)


def test_head_layout(case, target):
    _run(case, target)


def test_block_size(case, target):
    _run(case, target)


def test_feature(case, target):
    _run(case, target)


def test_kv_cache_dtype(case, target):
    """Every scenario over an fp8 cache, against the reference holding torch's saturating cast of
    the same K/V (see :mod:`runtime_conformance.paged`); in the default layout the stored values
    must also be exactly those, slot by slot."""
    run = _paged_run(case, target)
    run.run(case.backend(case.spec), check_cache=run.default_layout)


def test_kv_written_to_slots(case, target):
    _run(case, target, check_cache=True)
