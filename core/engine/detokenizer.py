"""Incremental detokenization of one request: generated tokens -> text, stop strings, stream deltas."""

from __future__ import annotations

from typing import Optional

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ..sample.params import SamplingParams

# The decode stream starts from the end of the prompt so the first output token is decoded in
# context (a SentencePiece-style decoder would otherwise drop its leading space). vLLM's window.
_MIN_PRIME_TOKENS = 4
_MAX_PRIME_TOKENS = 24


class IncrementalDetokenizer:
    """Turns a request's generated tokens into text as they arrive.

    Decoding goes through tokenizers' ``DecodeStream``, which keeps a few tokens of context and
    waits while a character's bytes are split across tokens, so no step re-decodes the sequence
    and ``text`` never ends in half a character. Stop strings are searched in the new tail only.

    ``tokenizer`` is a transformers tokenizer backed by HF tokenizers (``backend_tokenizer``),
    which transformers 5 gives for every model it can convert, GGUF included.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} has no HF tokenizers backend; a fast tokenizer is required")
        self._tokenizer = backend
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Until the request ends, the last len(stop)-1 characters may be the start of a stop string
        # that must not be streamed. An included stop string is output anyway: nothing to hold.
        self._hold_back = max(map(len, self._stop)) - 1 if self._stop and not self._include_stop else 0
        # Decoders that separate tokens with spaces (WordPiece, ...) put one between two special
        # tokens too; spaces_between_special_tokens=False asks for them joined, as vLLM does.
        self._added_tokens: dict[int, str] = {}
        if not params.skip_special_tokens and not params.spaces_between_special_tokens:
            self._added_tokens = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._last_was_added = False
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        for token_id in self._prompt_context(prompt_token_ids):
            self._step(token_id)

        self.text = ""
        """The output text so far (truncated at a matched stop string)."""
        self.stop_matched: Optional[str] = None
        """The stop string that ended the request, once one has."""
        self._num_tokens = 0
        self._emitted = 0
        self._pending: list[int] = []
        """Tokens the stream holds back as an incomplete character."""

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stop)

    def add_tokens(self, token_ids: list[int], stop_terminated: bool = False) -> Optional[str]:
        """Append generated tokens; return the stop string they completed, if any.

        On a match ``text`` ends before the stop string, or after it with
        include_stop_str_in_output, and the request is finished. ``stop_terminated``: the last
        token is a stop token (EOS or stop_token_ids) ending the request; as in vLLM its text is
        left out unless include_stop_str_in_output. Stop strings count only once more than
        min_tokens tokens are out (vLLM's rule).
        """
        skip_last = stop_terminated and not self._include_stop
        search_from = len(self.text)
        for token_id in token_ids[:-1] if skip_last else token_ids:
            self.text += self._decode_next(token_id)
            self._num_tokens += 1
            if self._num_tokens <= self._min_tokens:
                search_from = len(self.text)
        if self._stop and self.stop_matched is None and len(self.text) > search_from:
            self._truncate_at_stop(search_from)
        return self.stop_matched

    def finish(self) -> None:
        """The request ended without a stop string: decode what the stream still held back, so
        the text ends as a full decode would (with U+FFFD for a character cut off by the end)."""
        if self._pending and self.stop_matched is None:
            self.text += self._tokenizer.decode(self._pending, skip_special_tokens=self._skip_special_tokens)
        self._pending = []

    def output_text_delta(self, finished: bool = False) -> str:
        """The text not returned before, less what must wait: while the request is unfinished
        (``finished`` False and no stop string matched), the characters that may still turn out
        to begin a stop string, and a trailing U+FFFD, which may be a character whose remaining
        bytes have not arrived."""
        end = len(self.text)
        if not finished and self.stop_matched is None:
            end -= self._hold_back
            while end > self._emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def _truncate_at_stop(self, search_from: int) -> None:
        match: Optional[tuple[int, str]] = None
        for stop in self._stop:
            # A match may begin up to len(stop)-1 characters before the new text.
            index = self.text.find(stop, max(0, search_from - len(stop) + 1))
            if index != -1 and (match is None or index < match[0]):
                match = (index, stop)
        if match is not None:
            index, stop = match
            self.text = self.text[: index + len(stop) if self._include_stop else index]
            self.stop_matched = stop

    def _decode_next(self, token_id: int) -> str:
        piece = self._step(token_id)
        self._pending = [] if piece else self._pending + [token_id]
        if self._added_tokens:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_was_added:
                piece = content
            self._last_was_added = content is not None
        return piece

    def _step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._tokenizer, token_id) or ""
        except Exception as error:
            # A decoder whose output for a longer window does not extend the shorter one's breaks
            # the stream (vLLM #17448); restart it without context rather than fail the request.
            if "Invalid prefix" not in str(error):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._tokenizer, token_id) or ""

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt suffix (of at least a few tokens) that decodes without a broken
        character, so the stream's first prefix is clean text; none if no short one does."""
        shortest = min(len(prompt_token_ids), _MIN_PRIME_TOKENS)
        for n in range(shortest, min(len(prompt_token_ids), _MAX_PRIME_TOKENS) + 1):
            suffix = prompt_token_ids[-n:]
            if "\ufffd" not in self._tokenizer.decode(suffix, skip_special_tokens=self._skip_special_tokens):
                return suffix
        return []
