"""The wire format: pydantic models mirroring OpenAI's request and response schemas, with vLLM's
extra sampling fields. Litestar validates request bodies against them and builds the OpenAPI
schema from them, so what the schema says is what the server checks.

Unknown fields are rejected (400 naming them) so a typo never silently changes nothing. Fields
OpenAI clients send that do not change the output (``user``, ``store``, ...) are accepted and
ignored; fields whose meaning this server does not implement (``functions``, ...) are declared so
the schema shows them, and setting them is a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .limits import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

_INT64 = dict(ge=-(2**63), le=2**63 - 1 - MAX_N)  # room for seed + sample index


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _unsupported(feature: str, allowed: Any = None) -> AfterValidator:
    """Accept only ``allowed`` (None: absent or null); anything else is a 400 naming the field."""

    def check(value: Any) -> Any:
        if value is not None and value != allowed:
            raise ValueError(f"not supported by this server ({feature})")
        return value

    return AfterValidator(check)


Unsupported = Optional[Any]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


# -- requests ----------------------------------------------------------------------------------


class StreamOptions(_Model):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request (its ``choices`` empty)."""
    continuous_usage_stats: bool = False
    """vLLM extra: put the usage so far in every chunk."""


class JsonSchemaFormat(_Model):
    """OpenAI's ``response_format.json_schema``."""

    name: str = Field(description="The schema's name (a-z, A-Z, 0-9, _ and -).")
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema", description="A JSON schema; absent: any JSON object.")
    strict: Optional[bool] = Field(None, description="Accepted: the output always follows the schema strictly.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Model):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (output valid for ``json_schema.schema``); vLLM's ``structural_tag`` too."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    format: Optional[dict[str, Any]] = Field(None, description="structural_tag: xgrammar's structural-tag format.")
    structures: Optional[list[dict[str, Any]]] = Field(None, description="structural_tag (vLLM's older form).")
    triggers: Optional[list[str]] = Field(None, description="structural_tag (vLLM's older form).")

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class StructuredOutputsRequest(_Model):
    """vLLM's ``structured_outputs`` request field: exactly one constraint."""

    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json", description="A JSON schema.")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = Field(None, description="An EBNF grammar (xgrammar's / GBNF syntax, root rule `root`).")
    json_object: Optional[bool] = None
    structural_tag: Optional[Union[dict[str, Any], str]] = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    disable_fallback: bool = Field(False, description="Accepted (there is one backend).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SamplingFields(_Model):
    """Fields shared by completions and chat completions: OpenAI's, then vLLM's extras."""

    model: Optional[str] = Field(None, description="A served model name; default: the first one.")
    n: int = Field(1, ge=1, le=MAX_N, description="Completions per prompt.")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, **_INT64, description="Per-request seed: sampling is reproducible.")
    stop: Optional[Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]]] = Field(
        None, description="Strings that end the output (not included).")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias added to its logit.")
    user: Optional[str] = Field(None, description="Accepted and ignored.")
    # vLLM's extra sampling parameters
    top_k: Optional[int] = Field(None, ge=-1, le=2**31 - 1, description="0 or -1: off.")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0, le=2**31 - 1)]]] = Field(
        None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1,
                          description="Lower runs first under --scheduling-policy priority.")
    # Structured output (docs/api.md): at most one of these.
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="vLLM's older field: structured_outputs.json.")
    guided_regex: Optional[str] = Field(None, description="vLLM's older field: structured_outputs.regex.")
    guided_choice: Optional[list[str]] = Field(None, description="vLLM's older field: structured_outputs.choice.")
    guided_grammar: Optional[str] = Field(None, description="vLLM's older field: structured_outputs.grammar.")
    guided_whitespace_pattern: Optional[str] = Field(None, description="Accepted and ignored.")
    guided_decoding_backend: Optional[str] = Field(None, description="Accepted and ignored (xgrammar).")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


TokenIds = list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Union[str, list[str], TokenIds, list[TokenIds]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    max_tokens: Optional[int] = Field(16, ge=1, description="null: up to the context length.")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (and logprobs).")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Top logprobs per token.")
    add_special_tokens: bool = Field(True, description="vLLM extra: add BOS etc. when tokenizing the prompt.")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="Only equal to n is supported.")
    suffix: Annotated[Unsupported, _unsupported("suffix insertion")] = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported by this server")
        return self


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(description="A data: URI (base64 PNG, JPEG or WebP); a file:// URL under "
                                 "--allowed-local-media-path; http(s) only with --allow-remote-media.")
    detail: Optional[Literal["auto", "low", "high"]] = Field(None, description="Accepted and ignored.")


class ImagePart(_Model):
    """An image in a user message (vision-language models; docs/multimodal.md)."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ChatToolCall(_Model):
    """A tool call: in an assistant message sent back, and in a response's ``message.tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for function names."""


class FunctionDefinition(_Model):
    name: str = Field(pattern=FUNCTION_NAME, description="Letters, digits, _ and -, at most 64.")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON Schema of the arguments object; "
                                                                   "absent: no arguments.")
    strict: Optional[bool] = Field(None, description="Accepted; the arguments always follow the schema with "
                                                     "tool_choice required or named, never enforced with auto.")


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    """``{"type": "function", "function": {"name": ...}}``: call this function."""

    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ChatToolCall]] = Field(None, description="An assistant message's calls.")
    tool_call_id: Optional[str] = Field(None, description="A tool message: the call it answers.")
    reasoning_content: Optional[str] = Field(None, description="An assistant message's thinking, passed to chat "
                                                               "templates that render it.")
    refusal: Optional[str] = Field(None, description="Accepted and ignored.")

    @model_validator(mode="after")
    def _tool_calls_from_the_assistant(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages have tool calls")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_urls(self) -> list[str]:
        """The URLs of the content's image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]

    def template_fields(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' shape); with images, the
        content is its parts (``{"type": "image"}`` for each image)."""
        content: Any = self.text()
        if self.image_urls():
            content = [{"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                       for part in self.content]
        fields: dict[str, Any] = {"role": self.role, "content": content}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.tool_calls:
            fields["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return fields


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="null: up to the context length.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Needs logprobs: true.")
    add_generation_prompt: bool = Field(True, description="vLLM extra: end the prompt with the assistant header.")
    continue_final_message: bool = Field(False, description="vLLM extra: let the model continue the last message.")
    tools: Optional[list[ChatTool]] = Field(None, description="Functions the model may call.")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        None, description='"none", "auto" (needs --enable-auto-tool-choice), "required" or a named function; '
                          'default "auto" with tools, "none" without.')
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one call (exactly one with "
                                                                  "required); default true.")
    store: Optional[bool] = Field(None, description="Accepted and ignored.")
    metadata: Optional[dict[str, str]] = Field(None, description="Accepted and ignored.")
    service_tier: Optional[str] = Field(None, description="Accepted and ignored.")
    modalities: Annotated[Unsupported, _unsupported("output modalities other than text", ["text"])] = None
    functions: Annotated[Unsupported, _unsupported("function calling")] = None
    function_call: Annotated[Unsupported, _unsupported("function calling", "none")] = None
    audio: Annotated[Unsupported, _unsupported("audio output")] = None
    prediction: Annotated[Unsupported, _unsupported("predicted outputs")] = None
    reasoning_effort: Annotated[Unsupported, _unsupported("reasoning effort")] = None
    web_search_options: Annotated[Unsupported, _unsupported("web search")] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        return self

    @field_validator("tools")
    @classmethod
    def _distinct_function_names(cls, tools: Optional[list[ChatTool]]) -> Optional[list[ChatTool]]:
        names = [tool.function.name for tool in tools or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"function names must be distinct; given more than once: {', '.join(twice)}")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_the_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is None or choice == "none":
            return choice
        tools = info.data.get("tools")
        if not tools:
            raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} needs tools")
        names = [tool.function.name for tool in tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"function {choice.function.name!r} is not among the tools ({', '.join(names)})")
        return choice


class TokenizeRequest(_Model):
    """POST /tokenize: give ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = Field(None, description="Default: true for a prompt, false for messages.")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[list[ChatTool]] = Field(None, description="Rendered with the messages, as chat completions does.")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    """POST /detokenize."""

    model: Optional[str] = None
    tokens: TokenIds


# -- responses ---------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Optional[Literal["stop", "length", "abort", "tool_calls"]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: Union[int, str, None] = Field(None, description="The stop string or token id that ended the choice.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = Field(None, description="The thinking, with --reasoning-parser.")
    tool_calls: list[ChatToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None
    system_fingerprint: Optional[str] = None


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: the first brings ``id``, ``type`` and the name, the next ones
    pieces of the arguments text; pieces with the same ``index`` make one call."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``object`` is text_completion, as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "runtime"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    deterministic: bool = False
    """Whether the server runs in batch-invariant mode (``--deterministic``): a request's tokens and
    logprobs do not depend on the other requests it is batched with."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    deterministic: bool = False
    """``--deterministic``: batch-invariant mode (see :class:`ModelCard`)."""


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error the server returns, whatever the status."""

    error: ErrorInfo
