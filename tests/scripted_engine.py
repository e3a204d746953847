"""An engine whose "model" answers with scripted text, token by token, behind the real app.

The API's handlers (rendering, validation, parsing, streaming) run unchanged in process; only
the model is replaced, so a test decides exactly what the model writes (a tool call in some
format, a thinking span) and sees what the server makes of it, and what the engine was asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from runtime.engine.args import EngineArgs
from runtime.engine.messages import EngineStats
from runtime.engine.outputs import CompletionOutput, RequestOutput
from runtime.sample.params import SamplingParams


def token_pieces(tokenizer: Any, text: str) -> list[tuple[int, str]]:
    """``text`` as a model would stream it: each token with the text it adds."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    assert decoded[-1] == text, "scripted replies must survive a round trip through the tokenizer"
    return [(token, decoded[i + 1][len(decoded[i]):]) for i, token in enumerate(ids)]


@dataclass
class Received:
    prompt: str
    params: SamplingParams


class ScriptedStream:
    """A request's outputs: the reply's tokens one per step, ending with ``stop`` (or ``length``
    when the reply is longer than ``max_tokens``)."""

    def __init__(self, request_id: str, prompt: str, prompt_token_ids: list[int], pieces: list[tuple[int, str]],
                 params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.pieces = pieces[:params.max_tokens]
        self.reason = "length" if len(pieces) > params.max_tokens else "stop"
        self.n = params.n
        self.step = 0

    def abort(self) -> None:
        self.step = len(self.pieces)

    def __aiter__(self) -> "ScriptedStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.step >= len(self.pieces):
            raise StopAsyncIteration
        self.step += 1
        done = self.step == len(self.pieces)
        token_id, piece = self.pieces[self.step - 1]
        text = "".join(p for _, p in self.pieces[:self.step])
        ids = [t for t, _ in self.pieces[:self.step]]
        outputs = [CompletionOutput(index=i, text=text, token_ids=ids, finish_reason=self.reason if done else None,
                                    delta_text=piece, delta_token_ids=[token_id]) for i in range(self.n)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, finished=done)


class ScriptedEngine:
    """What the app needs of an AsyncEngine. ``reply`` (text, or a function of the prompt text)
    is what every request gets; ``received`` records each request's prompt and params."""

    max_model_len = 4096
    image_processor = None
    """A text-only model (no images in chat)."""
    pooler_config = None
    """A generating engine (not --task embed)."""

    def __init__(self, tokenizer: Any, reasoning_parser: Optional[str] = None, chat_template: Optional[str] = None):
        self.args = EngineArgs(reasoning_parser=reasoning_parser)
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.vocab_size = len(tokenizer)
        self.reply: Union[str, Callable[[str], str]] = ""
        self.received: list[Received] = []

    def add_request(self, request_id: str, prompt: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, observer=None, lora_request=None, mm_inputs=None) -> ScriptedStream:
        self.received.append(Received(prompt, params))
        reply = self.reply(prompt) if callable(self.reply) else self.reply
        return ScriptedStream(request_id, prompt, prompt_token_ids, token_pieces(self.tokenizer, reply), params)

    def check_ready(self) -> None:
        pass

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def stats(self) -> EngineStats:
        return EngineStats()

    async def start(self) -> "ScriptedEngine":
        return self

    async def shutdown(self) -> None:
        pass
