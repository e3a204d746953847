"""What crosses the sockets between the API processes and the engine core process.

msgspec structs, encoded as MessagePack arrays (field names never travel). The API processes
send ``ClientReady`` once, then ``AddRequest`` and ``AbortRequests``, into the core's one inbox;
the core sends each API process ``Ready`` (or ``Failed``) once the model has loaded and every API
process is ready (or the load failed), then one ``StepOutputs`` per step: the new token ids,
logprobs and finish state of that process's requests, plus the engine's counters. Text never crosses: the API processes tokenize and detokenize.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from ..lora import LoRARequest
from ..multimodal.inputs import ImageInput
from ..pooling import PoolingParams
from ..sample.params import SamplingParams
from ..worker.model_runner import TokenLogprobs


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one step produced for one (core-level) request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[TokenLogprobs]] = None
    prompt_logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    error: Optional[str] = None
    """Why the request failed (finish_reason ``abort``): its grammar failed to compile, say.
    Only that request fails."""
    embedding: Optional[bytes] = None
    """An embedding request's vector, float32 little-endian (with its finish_reason ``stop``)."""


class EngineStats(msgspec.Struct, array_like=True):
    """The core's counters after a step: what ``/metrics`` reports about the engine."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    cpu_prefix_cache_queries: int = 0
    """Tokens looked up in the KV cache's host tier (those the device's prefix cache missed)."""
    cpu_prefix_cache_hits: int = 0
    running_lora_ids: list[int] = msgspec.field(default_factory=list)
    """The LoRA adapters of running requests (and of waiting ones, below)."""
    waiting_lora_ids: list[int] = msgspec.field(default_factory=list)
    spec_num_drafts: int = 0
    """Speculative decoding, since start: proposals verified (one per request and step with drafts)."""
    spec_num_draft_tokens: int = 0
    """Tokens proposed and verified."""
    spec_num_accepted_tokens: int = 0
    """Proposed tokens the target accepted."""
    spec_accepted_per_position: list[int] = msgspec.field(default_factory=list)
    """Accepted tokens by position in the proposal (index 0: the first proposed token)."""
    encoder_cache_queries: int = 0
    """Vision-language models, since start: images a scheduled prompt chunk needed the encoder output of."""
    encoder_cache_hits: int = 0
    """Those whose output was cached already (the image was not encoded again)."""


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    """Queue a request (with its n samples) for the API process numbered ``client``."""

    request_id: str
    client: int
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: Optional[float] = None
    """``time.monotonic()`` when the API process received it (one clock for every process)."""
    lora_request: Optional[LoRARequest] = None
    pooling: Optional[PoolingParams] = None
    """An embedding request (``params`` is then unused): see ``EngineCore.add_request``."""
    mm_inputs: Optional[list[ImageInput]] = None
    """The prompt's preprocessed images (a vision-language model)."""


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    """Stop these core-level requests and free their KV blocks before the next step."""

    request_ids: list[str]


class ClientReady(msgspec.Struct, tag=True, array_like=True):
    """API process ``client`` has its tokenizer: the core announces ``Ready`` once all have."""

    client: int


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    """One step's news for one API process."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    refused: list[tuple[str, str]] = []
    """(request id, why) for requests the core could not queue (``AddRequest`` ids)."""


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The model is loaded and every API process can serve (so all turn ready together); what the
    API processes need to validate requests."""

    max_model_len: int
    vocab_size: int
    kernels: str = ""
    """``EngineCore.kernel_report``: what runs the model, and the fallbacks taken."""


class Failed(msgspec.Struct, tag=True, array_like=True):
    """The core failed to load, or died while serving; it exits after sending this."""

    message: str
    while_loading: bool


ToCore = Union[AddRequest, AbortRequests, ClientReady]
FromCore = Union[StepOutputs, Ready, Failed]

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
"""Any message to bytes."""
decode_to_core = msgspec.msgpack.Decoder(ToCore).decode
"""Bytes from an API process to the message (in the core)."""
decode_from_core = msgspec.msgpack.Decoder(FromCore).decode
"""Bytes from the core to the message (in an API process)."""
