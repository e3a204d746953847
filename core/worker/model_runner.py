"""Model runner: a scheduled batch -> flat tensors -> forward -> logits -> sampled tokens.

Owns the device state: the model, the KV-cache tensors, and per-request sampler generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..models import DecoderForCausalLM, decoder_settings
from ..models.batch import ForwardBatch
from ..models.layers.linear import Linear
from ..platform import AttentionMetadata, Platform, QuantizationMethod, Registry
from ..sample.sampler import Sampler, SamplingMetadata
from ..sched.scheduler import SchedulerOutput

TokenLogprobs = tuple[list[int], list[float], int]
"""(token ids, logprobs, rank of the first id): first the sampled/actual token, then the top-k."""


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request, entries for the prompt positions this step covered (the first prompt token has none)."""


class ModelRunner:
    def __init__(self, hf_config: Any, weights: Any, platform: Platform, registry: Registry, dtype: torch.dtype,
                 block_size: int, max_model_len: int, kv_cache_dtype: str = "auto",
                 quantization: QuantizationMethod | None = None):
        self.platform, self.dtype, self.block_size = platform, dtype, block_size
        self.device = platform.device()
        self.settings = decoder_settings(hf_config)
        specs = self.settings.attention_specs(dtype, block_size, kv_cache_dtype)
        backend_classes = [registry.select_attention_backend(platform.name, spec) for spec in specs]
        self.backend_classes = backend_classes
        self.cache_dtype = specs[0].cache_dtype
        ops = registry.kernels(platform.name)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(self.device):
                model = DecoderForCausalLM(self.settings, hf_config, max_model_len, ops,
                                           [cls(spec) for cls, spec in zip(backend_classes, specs)])
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(weights, lambda fmt: registry.quantization_method(platform.name, fmt))
        if quantization is not None:
            model.quantize_weights(quantization)
        self.model = model.eval()
        self.sampler = Sampler(ops.apply_top_k_top_p_min_p)
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_logprobs_next: dict[str, int] = {}
        self.kv_caches: list[torch.Tensor] = []

    @property
    def weight_bytes(self) -> int:
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return dense + sum(m.stored_bytes for m in self.model.modules() if isinstance(m, Linear) and m.quant_method is not None)

    def kv_bytes_per_block(self) -> int:
        s = self.settings
        per_layer = [math.prod(cls.kv_cache_shape(1, self.block_size, s.num_kv_heads, s.head_dim)) for cls in self.backend_classes]
        return sum(per_layer) * torch.tensor([], dtype=self.cache_dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        s = self.settings
        self.kv_caches = [torch.zeros(cls.kv_cache_shape(num_blocks, self.block_size, s.num_kv_heads, s.head_dim),
                                      dtype=self.cache_dtype, device=self.device) for cls in self.backend_classes]

    def drop_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.prompt_logprobs_next.pop(rid, None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.drop_requests(out.finished_ids)
        scheduled = out.scheduled
        if not scheduled:
            return RunnerOutput()
        bs = self.block_size
        starts = np.array([s.start for s in scheduled], dtype=np.int64)
        counts = np.array([s.num_new_tokens for s in scheduled], dtype=np.int64)
        query_start = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        row_of_token = np.repeat(np.arange(len(scheduled)), counts)
        positions = np.arange(total) - query_start[row_of_token] + starts[row_of_token]
        max_blocks = max(len(s.block_ids) for s in scheduled)
        block_table = np.zeros((len(scheduled), max_blocks), dtype=np.int64)
        for i, s in enumerate(scheduled):
            block_table[i, :len(s.block_ids)] = s.block_ids
        slots = block_table[row_of_token, positions // bs] * bs + positions % bs
        input_ids = np.concatenate([np.asarray(s.request.all_token_ids[s.start:s.start + s.num_new_tokens], dtype=np.int64)
                                    for s in scheduled])
        seq_lens = starts + counts

        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.from_numpy(query_start.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_table=torch.from_numpy(block_table.astype(np.int32)).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            max_query_len=int(counts.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens.tolist())
        batch = ForwardBatch(torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), meta, self.kv_caches)
        hidden = self.model(batch)

        result = RunnerOutput()
        sample_rows = [i for i, s in enumerate(scheduled) if s.sample]
        if sample_rows:
            last = torch.tensor([int(query_start[i + 1]) - 1 for i in sample_rows], device=dev)
            logits = self.model.compute_logits(hidden[last])
            requests = [scheduled[i].request for i in sample_rows]
            sampling = SamplingMetadata.from_requests(requests, logits.shape[-1], dev, self.generators)
            sampled = self.sampler(logits, sampling)
            token_ids = sampled.token_ids.tolist()
            for row, request in enumerate(requests):
                result.sampled[request.request_id] = token_ids[row]
            if sampled.logprobs is not None:
                ids, lps, ranks = sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.sampled_ranks.tolist()
                for row, request in enumerate(requests):
                    k = request.sampling_params.logprobs
                    if k is not None:
                        result.logprobs[request.request_id] = (ids[row][:k + 1], lps[row][:k + 1], ranks[row])
        self._prompt_logprobs(scheduled, hidden, query_start, result)
        return result

    def _prompt_logprobs(self, scheduled, hidden: torch.Tensor, query_start: np.ndarray, result: RunnerOutput) -> None:
        """Logprob of each prompt token given the ones before it, for requests that asked."""
        for i, s in enumerate(scheduled):
            request = s.request
            k = request.sampling_params.prompt_logprobs
            if k is None:
                continue
            # Position p's logits predict token p + 1; a resumed request never repeats what it sent.
            first = max(s.start, self.prompt_logprobs_next.get(request.request_id, 0))
            end = min(s.start + s.num_new_tokens, request.num_prompt_tokens - 1)
            if first >= end:
                continue
            rows = torch.arange(first - s.start, end - s.start, device=hidden.device) + int(query_start[i])
            logprobs = self.model.compute_logits(hidden[rows]).log_softmax(-1)
            targets = torch.tensor(request.prompt_token_ids[first + 1:end + 1], device=hidden.device)
            actual = logprobs.gather(-1, targets.unsqueeze(-1))
            ranks = (logprobs > actual).sum(-1) + 1
            top = logprobs.topk(k, dim=-1) if k > 0 else None
            ids = torch.cat([targets.unsqueeze(-1), top.indices], -1) if top is not None else targets.unsqueeze(-1)
            vals = torch.cat([actual, top.values], -1) if top is not None else actual
            result.prompt_logprobs[request.request_id] = [
                (row_ids, row_vals, rank) for row_ids, row_vals, rank in zip(ids.tolist(), vals.tolist(), ranks.tolist())]
            self.prompt_logprobs_next[request.request_id] = end
