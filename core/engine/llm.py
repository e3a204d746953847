"""LLM: offline batch generation, vLLM's Python API."""

from __future__ import annotations

import gc
import itertools
from typing import Any, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from ..lora import LoRARequest
from ..multimodal.chat import render_with_images, split_images
from ..multimodal.inputs import ImageInput
from ..multimodal.media import MediaPolicy, load_image
from ..multimodal.processor import ImageProcessor
from ..pooling import PoolingParams
from ..sample.params import SamplingParams
from ..structured.grammar import check
from .args import EngineArgs
from .chat import load_chat_template, render_chat
from .core import EngineCore
from .output_processor import OutputProcessor
from .outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from .submit import submit


def check_structured_outputs(params: Sequence[SamplingParams]) -> None:
    """ValueError naming the first invalid constraint, before any request is queued."""
    for sp in {id(p): p for p in params}.values():
        if sp.structured_outputs is not None:
            check(sp.structured_outputs)

PromptType = Union[str, list[int], dict[str, Any]]
Encoded = tuple[Optional[str], list[int], Optional[list[ImageInput]]]
"""A prompt as the engine takes it: text (if any), token ids, images."""


class LLM:
    """``LLM(model, **engine_args)``; engine arguments are the CLI flags in snake case.

    ``model`` is an HF-layout directory or a .gguf file; None loads the embedded default
    (SmolLM2-135M-Instruct Q4_1).
    """

    def __init__(self, model: Optional[str] = None, **engine_args: Any):
        unknown = set(engine_args) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        self.engine_args = EngineArgs(model=model, **engine_args)
        if self.engine_args.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 is for `runtime serve`; offline, run one LLM per device set "
                             "(tensor_parallel_size splits one model across devices)")
        self.engine = EngineCore(self.engine_args)
        self.tokenizer = self.engine.source.tokenizer
        self.chat_template = load_chat_template(self.engine_args.chat_template) or self.engine.source.chat_template
        self.processor = OutputProcessor(self.tokenizer, final_only=True)
        self.image_processor = (ImageProcessor(self.engine.source.hf_config, self.engine.source.path, self.tokenizer,
                                               self.engine_args.image_limit)
                                if self.engine.vision is not None else None)
        self.media_policy = MediaPolicy(self.engine_args.allowed_local_media_path, self.engine_args.allow_remote_media)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, priority: Optional[list[int]] = None,
                 lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None) -> list[RequestOutput]:
        """Generate for each prompt: a string, a list of token ids, or a dict as vLLM's:
        ``{"prompt": text}`` or ``{"prompt_token_ids": [...]}``, with ``"multi_modal_data":
        {"image": PIL image or list of them}`` for a vision-language model (the prompt holds one
        placeholder, e.g. ``<image>``, where each image goes).

        ``lora_request``: the LoRA adapter to generate with (the engine needs ``enable_lora``),
        one for every prompt or a list with one per prompt (None: the base model).
        Returns one RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        check_structured_outputs(params)
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, params, use_tqdm, priority, self._adapters_per_prompt(lora_request, len(prompts)))

    def chat(self, messages: Union[list[dict[str, Any]], list[list[dict[str, Any]]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, use_tqdm: bool = True,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Optional[list[dict[str, Any]]] = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a list of conversations.

        ``tools``: OpenAI's function tools, rendered by the chat template (or, for a template
        without tool support, as a system message; docs/api.md#tool-calling). A message's
        content may be a list of parts: ``{"type": "text", "text": ...}``, ``{"type":
        "image_url", "image_url": {"url": ...}}`` (``data:`` URIs; ``file://`` under
        ``allowed_local_media_path``) and ``{"type": "image_pil", "image_pil": PIL image}``."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        template = load_chat_template(chat_template) or self.chat_template
        encoded = []
        for conversation in conversations:
            shaped, sources = split_images(conversation)

            def render(msgs: list[dict[str, Any]]) -> str:
                return render_chat(self.tokenizer, msgs, template, add_generation_prompt, continue_final_message, tools)

            placeholder = self.image_processor.placeholder if self.image_processor is not None else ""
            text = render_with_images(render, shaped, len(sources), placeholder)
            images = [load_image(s, self.media_policy) if isinstance(s, str) else s for s in sources]
            encoded.append(self._with_images(text, self.tokenizer.encode(text, add_special_tokens=False), images))
        params = self._params_per_prompt(sampling_params, len(encoded))
        check_structured_outputs(params)
        return self._run(encoded, params, use_tqdm, None, [None] * len(encoded))

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]],
              pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """The embedding of each prompt (a string, a list of token ids, or ``{"prompt_token_ids": [...]}``),
        in input order; the engine needs ``task="embed"`` (or ``runner="pooling"``).

        ``pooling_params``: ``dimensions`` and ``use_activation`` (default: the model's), one for
        every prompt or a list with one per prompt. Raises ValueError naming the first prompt
        that cannot be embedded (too long, dimensions the model does not offer), before any runs.
        """
        if self.engine.pooler_config is None:
            raise ValueError("LLM.embed needs an embedding engine: LLM(model, task='embed') (or runner='pooling')")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self._encode(p)[1] for p in prompts]
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            pooling = [pooling_params or PoolingParams()] * len(encoded)
        else:
            pooling = list(pooling_params)
            if len(pooling) != len(encoded):
                raise ValueError(f"got {len(pooling)} pooling params for {len(encoded)} prompts")
        ids = [str(next(self._ids)) for _ in encoded]
        vectors: dict[str, bytes] = {}
        bar = tqdm(total=len(encoded), desc="Embedded prompts", disable=not use_tqdm)
        try:
            for i, (rid, token_ids, params) in enumerate(zip(ids, encoded, pooling)):
                try:
                    self.engine.add_request(rid, token_ids, SamplingParams(max_tokens=1), pooling=params)
                except ValueError as exc:
                    raise ValueError(f"prompt {i}: {exc}") from None
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.error is not None:
                        raise ValueError(f"prompt {ids.index(out.request_id)} failed: {out.error}")
                    if out.embedding is not None:
                        vectors[out.request_id] = out.embedding
                        bar.update(1)
        except BaseException:
            self.engine.abort_requests(ids)
            raise
        finally:
            bar.close()
        return [EmbeddingRequestOutput(rid, token_ids, EmbeddingOutput(np.frombuffer(vectors[rid], "<f4").tolist()))
                for rid, token_ids in zip(ids, encoded)]

    def _params_per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        sampling_params = list(sampling_params)
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
        return sampling_params

    @staticmethod
    def _adapters_per_prompt(lora_request, count: int) -> list[Optional[LoRARequest]]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * count
        adapters = list(lora_request)
        if len(adapters) != count:
            raise ValueError(f"got {len(adapters)} LoRA requests for {count} prompts")
        return adapters

    def _encode(self, prompt: PromptType) -> Encoded:
        if isinstance(prompt, str):
            return self._with_images(prompt, self.tokenizer.encode(prompt), [])
        if isinstance(prompt, dict):
            text = prompt.get("prompt")
            token_ids = list(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else self.tokenizer.encode(text)
            data = prompt.get("multi_modal_data") or {}
            unknown = set(data) - {"image"}
            if unknown:
                raise ValueError(f"multi_modal_data holds {', '.join(sorted(unknown))}: only images are supported")
            images = data.get("image", [])
            return self._with_images(text, token_ids, images if isinstance(images, (list, tuple)) else [images])
        return self._with_images(None, list(prompt), [])

    def _with_images(self, text: Optional[str], token_ids: list[int], images: list[Any]) -> Encoded:
        """The prompt with its images preprocessed and their placeholders expanded."""
        if self.image_processor is None:
            if images:
                raise ValueError("the model takes no images: load a vision-language model (docs/multimodal.md)")
            return text, token_ids, None
        token_ids, inputs = self.image_processor.process(token_ids, images)
        return text, token_ids, inputs or None

    def _run(self, encoded: list[Encoded], params: list[SamplingParams], use_tqdm: bool,
             priority: Optional[list[int]], adapters: list[Optional[LoRARequest]]) -> list[RequestOutput]:
        order: list[str] = []
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(encoded), desc="Processed prompts", disable=not use_tqdm)
        # What exists before the run (the model, imported libraries: millions of objects) stays out
        # of the collector's full passes until the run ends: one such pass cost 0.35 s of an 18.7 s
        # run of an 8B model on an H100 host. Unfreezing hands it all back, so nothing leaks.
        gc.freeze()
        try:
            # Under fcfs the requests that fill the first two steps are queued first and the rest
            # once those run: queueing is then hidden behind the device (admission order is the same).
            head = self._first_steps_share(encoded) if self.engine_args.scheduling_policy == "fcfs" else len(encoded)
            self._submit(encoded, params, priority, adapters, order, head)
            while self.engine.has_unfinished_requests():
                step = self.engine.step()
                failed = next((out for out in step if out.error is not None), None)
                if failed is not None:
                    raise ValueError(f"request {self.processor.parent_of(failed.request_id)} failed: {failed.error}")
                outputs, stopped = self.processor.process(step)
                if stopped:
                    self.engine.finish_requests(stopped)
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                if len(order) < len(encoded):
                    self._submit(encoded, params, priority, adapters, order, len(encoded))
        except BaseException:
            self._abort_all(order)
            raise
        finally:
            gc.unfreeze()
            bar.close()
        return [finished[rid] for rid in order]

    def _first_steps_share(self, encoded: list[Encoded]) -> int:
        """How many prompts two full steps take: two token budgets, at most max_num_seqs."""
        budget, tokens = 2 * self.engine.max_num_batched_tokens, 0
        for count, (_, token_ids, _) in enumerate(encoded, start=1):
            tokens += len(token_ids)
            if tokens >= budget or count >= self.engine.max_num_seqs:
                return count
        return len(encoded)

    def _submit(self, encoded: list[Encoded], params: list[SamplingParams],
                priority: Optional[list[int]], adapters: list[Optional[LoRARequest]], order: list[str],
                end: int) -> None:
        """Queue prompts ``len(order)`` to ``end``, appending their ids to ``order``."""
        for i in range(len(order), end):
            text, token_ids, images = encoded[i]
            rid = str(next(self._ids))
            submit(self.engine, self.processor, rid, text, token_ids, params[i], priority[i] if priority else 0,
                   adapters[i], images)
            order.append(rid)

    def _abort_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort_requests(self.processor.abort(rid))
