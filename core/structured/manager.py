"""The engine core's structured output: one grammar matcher per constrained request.

Grammars compile on a thread pool, never on the step loop: a constrained request waits (outside
the scheduler, see ``EngineCore``) until its grammar is ready while the others keep stepping.
Compiled grammars are cached by their key, so a schema seen before costs a dictionary look-up.

Each step, :meth:`bitmask` fills one bitmask row per verified position of every constrained
request (xgrammar's batch fill, on several threads, for plain decode steps); the sampler masks
those logit rows. After the step, :meth:`advance` feeds each request's new tokens to its matcher.
Speculative proposals are cut at the first token the grammar rejects before the step runs
(:meth:`truncate_drafts`), and the rows after each kept proposal are filled by accepting the
proposals one by one and rolling them back: the target's distributions are masked at every
position, and rejection sampling then emits only tokens the grammar allows.

With a reasoning parser, a request is unconstrained until the end-of-thinking token: in its
prompt (after any start-of-thinking token: the template closed the span) or in its output.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..reasoning import reasoning_markers
from ..sched.request import Request
from ..sched.scheduler import ScheduledRequest
from .bitmask import BitmaskBuffers, GrammarBitmask
from .grammar import GrammarCompiler, GrammarKey, check

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger("runtime")


@dataclass
class _State:
    key: GrammarKey
    grammar: Future
    matcher: Optional[xgr.GrammarMatcher] = None
    thinking: bool = False
    """Reasoning not ended yet: no constraint, tokens not fed to the matcher."""
    consumed: int = 0
    """Output tokens accounted for (fed to the matcher, or thinking)."""
    error: Optional[str] = None


@dataclass
class _Reasoning:
    start_ids: list[int]
    end_id: int


class StructuredOutputManager:
    """Owner of every constrained request's grammar state, on the engine core's rank 0."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int],
                 reasoning_parser: Optional[str] = None, compile_threads: Optional[int] = None,
                 fill_threads: int | str = "auto", pin_memory: bool = False, buffers_in_flight: int = 3,
                 max_rows: int = 0):
        """``pin_memory``: fill the masks into pinned host buffers (a device that copies from
        them asynchronously); ``buffers_in_flight``: steps whose masks may be in use at once
        (launched, not collected) plus one; ``max_rows``: the most rows a step constrains, to
        size those buffers once; ``fill_threads``: xgrammar's batch-fill threads."""
        self.vocab_size = vocab_size
        self._fill_threads = fill_threads
        self._tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        threads = compile_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="runtime-grammar")
        self._compiler: Optional[Future] = None
        self._grammars: dict[GrammarKey, Future] = {}
        self._states: dict[str, _State] = {}
        self._reasoning = self._reasoning_tokens(reasoning_parser, tokenizer)
        self._buffers = BitmaskBuffers(-(-vocab_size // 32), buffers_in_flight, pin_memory, max_rows)

    @functools.cached_property
    def _batch(self) -> xgr.BatchGrammarMatcher:
        import xgrammar as xgr

        return xgr.BatchGrammarMatcher(self._fill_threads)

    @staticmethod
    def _reasoning_tokens(name: Optional[str], tokenizer: Any) -> Optional[_Reasoning]:
        if name is None:
            return None
        markers = reasoning_markers(name)
        (end_id,) = markers.end_token_ids(tokenizer)
        start_ids = tokenizer.encode(markers.start, add_special_tokens=False)
        return _Reasoning(start_ids if len(start_ids) == 1 else [], end_id)

    # -- requests ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Start compiling ``request``'s grammar (ValueError for an invalid constraint)."""
        key = check(request.sampling_params.structured_outputs)
        grammar = self._grammars.get(key)
        if grammar is None:
            if self._compiler is None:
                # The vocabulary's token table takes a moment to build: once, on the pool too.
                self._compiler = self._pool.submit(GrammarCompiler, self._tokenizer, self.vocab_size, self._eos)
            grammar = self._pool.submit(lambda: self._compiler.result().compile(key))
            self._grammars[key] = grammar
        self._states[request.request_id] = _State(key, grammar, thinking=self._thinking_after(request.prompt_token_ids))

    def _thinking_after(self, prompt_token_ids: list[int]) -> bool:
        """Whether a request with this prompt starts inside a thinking span: unless the prompt's
        last reasoning marker is an end-of-thinking token (the template closed the span)."""
        if self._reasoning is None:
            return False
        markers = {self._reasoning.end_id, *self._reasoning.start_ids}
        last = next((t for t in reversed(prompt_token_ids) if t in markers), None)
        return last != self._reasoning.end_id

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def is_ready(self, request_id: str) -> bool:
        """The request's grammar has compiled (or failed: see :meth:`error`); it may be scheduled."""
        import xgrammar as xgr
        state = self._states.get(request_id)
        if state is None or state.matcher is not None or state.error is not None:
            return True
        if not state.grammar.done():
            return False
        try:
            state.matcher = xgr.GrammarMatcher(state.grammar.result())
        except Exception as exc:  # noqa: BLE001  (fails this request only; the message says why)
            self._grammars.pop(state.key, None)  # not cached: a later request may try again
            state.error = str(exc)
        return True

    def error(self, request_id: str) -> Optional[str]:
        state = self._states.get(request_id)
        return None if state is None else state.error

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for a pending grammar (when nothing else can run)."""
        pending = [s.grammar for s in self._states.values() if not s.grammar.done()]
        if pending:
            wait(pending, timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- steps ------------------------------------------------------------------------------

    def tracks_any(self, items: list[ScheduledRequest]) -> bool:
        """Whether a request of the step that samples has a grammar (masked now or later)."""
        return bool(self._states) and any(item.sample and item.request.request_id in self._states for item in items)

    def _matcher(self, request: Request) -> Optional[xgr.GrammarMatcher]:
        """``request``'s matcher, once its grammar applies (compiled, thinking over)."""
        state = self._states.get(request.request_id)
        return None if state is None or state.thinking else state.matcher

    def constrains(self, request: Request) -> bool:
        """Whether ``request``'s next token is masked."""
        matcher = self._matcher(request)
        return matcher is not None and not matcher.is_terminated()

    def terminated(self, request: Request) -> bool:
        """Whether ``request``'s grammar has ended: its output is complete (the engine finishes
        it, ignore_eos or not, as vLLM does)."""
        matcher = self._matcher(request)
        return matcher is not None and matcher.is_terminated()

    def advance(self, request: Request) -> None:
        """Feed the matcher the output tokens it has not seen; a rejected token (which masking
        rules out) marks the request failed."""
        state = self._states.get(request.request_id)
        if state is None or state.matcher is None or state.error is not None:
            return
        tokens = request.output_token_ids
        for token in tokens[state.consumed:]:
            state.consumed += 1
            if state.thinking:
                state.thinking = token != self._reasoning.end_id
            elif not state.matcher.is_terminated() and not state.matcher.accept_token(token):
                state.error = f"the output left its grammar at token {token} (output position {state.consumed - 1})"
                logger.error("request %s: %s", request.request_id, state.error)
                return

    def reset(self, request: Request) -> None:
        """A preempted request is recomputed: its matcher starts over and is fed its output again."""
        state = self._states.get(request.request_id)
        if state is None or state.matcher is None:
            return
        state.matcher.reset()
        state.consumed = 0
        state.thinking = self._thinking_after(request.prompt_token_ids)
        self.advance(request)

    def truncate_drafts(self, items: list[ScheduledRequest]) -> None:
        """Cut each constrained request's proposals at the first token its grammar rejects or that
        would end it (the target samples that one itself), and a thinking request's before the
        end-of-thinking token (the rows after it would need masks): every verified row is then
        a position the grammar can reach and mask."""
        for item in items:
            if not item.draft_token_ids:
                continue
            state = self._states.get(item.request.request_id)
            if state is None or state.matcher is None:
                continue
            drafts = item.draft_token_ids
            if state.thinking:
                if self._reasoning.end_id in drafts:
                    item.truncate_drafts(drafts.index(self._reasoning.end_id))
                continue
            matcher, kept = state.matcher, 0
            while kept < len(drafts) and matcher.accept_token(drafts[kept]):
                kept += 1
                if matcher.is_terminated():
                    matcher.rollback(1)
                    kept -= 1
                    break
            if kept:
                matcher.rollback(kept)
            item.truncate_drafts(kept)

    def bitmask(self, items: list[ScheduledRequest]) -> Optional[GrammarBitmask]:
        """The masks of a step's sampled rows, in the runner's order (each sampling request's
        rows: its last token's, then one per proposal); None when no row is constrained."""
        import xgrammar as xgr
        rows: list[int] = []
        plain: list[xgr.GrammarMatcher] = []
        speculative: list[tuple[int, xgr.GrammarMatcher, list[int]]] = []
        row = 0
        for item in items:
            if not item.sample:
                continue
            request = item.request
            if self.constrains(request):
                matcher = self._states[request.request_id].matcher
                if item.draft_token_ids:
                    speculative.append((len(rows), matcher, item.draft_token_ids))
                    rows.extend(range(row, row + len(item.draft_token_ids) + 1))
                else:
                    plain.append(matcher)
                    rows.append(row)
            row += 1 + len(item.draft_token_ids)
        if not rows:
            return None
        bitmask = self._buffers.take(len(rows))
        if speculative:
            first = 0
            plain_index = []
            for index, matcher, drafts in speculative:
                plain_index.extend(range(first, index))
                for j, token in enumerate(drafts):
                    matcher.fill_next_token_bitmask(bitmask, index + j)
                    matcher.accept_token(token)  # validated by truncate_drafts
                matcher.fill_next_token_bitmask(bitmask, index + len(drafts))
                if drafts:
                    matcher.rollback(len(drafts))
                first = index + len(drafts) + 1
            plain_index.extend(range(first, len(rows)))
        else:
            plain_index = list(range(len(rows)))
        if len(plain) > 1:
            self._batch.batch_fill_next_token_bitmask(plain, bitmask, plain_index)
        elif plain:
            plain[0].fill_next_token_bitmask(bitmask, plain_index[0])
        return GrammarBitmask(rows, bitmask)
