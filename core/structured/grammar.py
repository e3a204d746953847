"""A request's constraint (``StructuredOutputsParams``) as an xgrammar grammar.

Two steps with different costs. :func:`check` parses the constraint into a grammar without a
tokenizer (well under a millisecond for common schemas): the API process and ``LLM.generate``
call it, so an invalid schema, regex or grammar is refused with its cause before reaching the
engine. :class:`GrammarCompiler` compiles it against the model's vocabulary (the token-mask cache:
milliseconds to a second), in the engine core, off its step loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..sample.params import StructuredOutputsParams

if TYPE_CHECKING:
    # Imported where used: xgrammar takes seconds to import, and the CLI, the API processes and
    # engines that see no constrained request never need it.
    import xgrammar as xgr

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class GrammarKey:
    """What identifies a compiled grammar: the kind and its canonical text (the cache key)."""

    kind: str
    text: str
    any_whitespace: bool = True


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    """The cache key of ``params``: equal constraints (a schema as a dict or as its JSON text)
    share one compiled grammar."""
    kind = params.kind
    whitespace = not params.disable_any_whitespace
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(schema).__name__}")
        return GrammarKey("json", json.dumps(schema, sort_keys=True), whitespace)
    if kind == "json_object":
        # Any JSON object (xgrammar's built-in JSON grammar would also take arrays and scalars).
        return GrammarKey("json", json.dumps({"type": "object"}), whitespace)
    if kind == "regex":
        return GrammarKey("regex", params.regex)
    if kind == "choice":
        # A choice is the regex of its literal alternatives.
        return GrammarKey("regex", "|".join(re.escape(choice) for choice in params.choice))
    if kind == "grammar":
        return GrammarKey("grammar", params.grammar)
    return GrammarKey("structural_tag", _structural_tag_text(params.structural_tag))


def _structural_tag_text(value: Any) -> str:
    """xgrammar's structural-tag JSON; vLLM's older form (``structures`` of begin/schema/end and
    ``triggers``) is rewritten as the equivalent ``triggered_tags`` format."""
    tag = json.loads(value) if isinstance(value, str) else value
    if not isinstance(tag, dict):
        raise ValueError("structured_outputs.structural_tag must be a JSON object")
    if "structures" in tag:
        tags = [{"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s["schema"]},
                 "end": s["end"]} for s in tag["structures"]]
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []),
                                                    "tags": tags}}
    return json.dumps(tag, sort_keys=True)


def _message(exc: BaseException) -> str:
    """xgrammar's error without its C++ source location."""
    return _CPP_PREFIX.sub("", str(exc).strip())


def check(params: StructuredOutputsParams) -> GrammarKey:
    """Parse ``params`` into a grammar (no tokenizer needed); raises ValueError naming the
    constraint and what is wrong with it. Returns its key."""
    import xgrammar as xgr
    try:
        key = grammar_key(params)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"structured_outputs.{params.kind} is malformed: {exc}") from None
    try:
        if key.kind == "json":
            xgr.Grammar.from_json_schema(key.text, any_whitespace=key.any_whitespace)
        elif key.kind == "regex":
            xgr.Grammar.from_regex(key.text)
        elif key.kind == "grammar":
            xgr.Grammar.from_ebnf(key.text)
        elif key.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(key.text)
    except Exception as exc:  # noqa: BLE001  (xgrammar raises RuntimeError and its own types)
        what = "choice" if params.kind == "choice" else params.kind
        raise ValueError(f"structured_outputs.{what} is invalid: {_message(exc)}") from None
    return key


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar matches it, special tokens (``<pad>``, ``<|im_start|>``, ...)
    blanked: xgrammar never lets a blank token into a grammar (stop tokens still end it), where
    it would otherwise match their text inside a JSON string, text the detokenizer then drops."""
    import xgrammar as xgr
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    vocab = [""] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            vocab[index] = token
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for index in special:
        if index < vocab_size:
            vocab[index] = ""
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids,
                             add_prefix_space=detected.add_prefix_space)


class GrammarCompiler:
    """Compiles keys against one model's vocabulary. Thread-safe; xgrammar caches what it compiled."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_threads: int = 1):
        import xgrammar as xgr
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(tokenizer_info(tokenizer, vocab_size, stop_token_ids),
                                             max_threads=max_threads)

    def compile(self, key: GrammarKey) -> xgr.CompiledGrammar:
        """The compiled grammar of ``key``; raises ValueError naming the problem."""
        try:
            if key.kind == "json":
                # Strict (xgrammar's default, as vLLM): objects take no property the schema does
                # not name unless it says additionalProperties, arrays no item it does not describe.
                return self._compiler.compile_json_schema(key.text, any_whitespace=key.any_whitespace)
            if key.kind == "regex":
                return self._compiler.compile_regex(key.text)
            if key.kind == "grammar":
                return self._compiler.compile_grammar(key.text)
            return self._compiler.compile_structural_tag(key.text)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"structured output ({key.kind}) failed to compile: {_message(exc)}") from None
