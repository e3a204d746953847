"""Queueing a request in the core: one core request per sample of an n-sample request.

Shared by the offline ``LLM`` and the engine core process so both treat n and seeds alike.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..lora import LoRARequest
from ..multimodal.inputs import ImageInput
from ..pooling import PoolingParams
from ..sample.params import SamplingParams
from .core import EngineCore
from .output_processor import OutputProcessor, child_id


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sample ``index`` of an n-sample request, as the core sees it.

    Each sample is its own core request with n=1; a seeded request's samples get seeds
    ``seed + index`` so they differ from each other yet the whole request stays reproducible.
    """
    if params.n == 1:
        return params
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


def add_samples(core: EngineCore, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                priority: int = 0, arrival_time: Optional[float] = None,
                lora_request: Optional[LoRARequest] = None, pooling: Optional[PoolingParams] = None,
                mm_inputs: Optional[list[ImageInput]] = None) -> list[str]:
    """Queue the n samples of a request in ``core``, all or none; returns their core-level ids.
    An embedding request (``pooling``) is one core request under its own id.

    Raises ValueError (from the core) when the request cannot run, leaving nothing behind.
    """
    if pooling is not None:
        core.add_request(request_id, prompt_token_ids, params, priority=priority, arrival_time=arrival_time,
                         lora_request=lora_request, pooling=pooling, mm_inputs=mm_inputs)
        return [request_id]
    ids = [child_id(request_id, index, params.n) for index in range(params.n)]
    for index, cid in enumerate(ids):
        try:
            core.add_request(cid, prompt_token_ids, sample_params(params, index), priority=priority,
                             arrival_time=arrival_time, lora_request=lora_request, mm_inputs=mm_inputs)
        except ValueError:
            core.abort_requests(ids[:index])
            raise
    return ids


def submit(core: EngineCore, processor: OutputProcessor, request_id: str, prompt: Optional[str],
           prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
           lora_request: Optional[LoRARequest] = None, mm_inputs: Optional[list[ImageInput]] = None) -> None:
    """Track a request in ``processor`` and queue its n samples in ``core``: all or none."""
    processor.add_request(request_id, prompt, prompt_token_ids, params)
    try:
        add_samples(core, request_id, prompt_token_ids, params, priority, lora_request=lora_request,
                    mm_inputs=mm_inputs)
    except ValueError:
        processor.abort(request_id)
        raise
