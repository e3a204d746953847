"""A soak: an OpenAI-compatible server under a mixed, randomised load for a while, checked as it goes.

Clients (``concurrency`` of them, each one request at a time) send completions and chat
completions, streamed or not, with random lengths, ``n``, logprobs and stop strings; 10% of them
hang up mid-stream and 5% send invalid requests. What must hold, whatever the load:

- no 5xx and no broken connection; every invalid request is a 400 in OpenAI's error shape;
- every greedy request gets the text it gets alone (measured one at a time before the load), each
  of its ``n`` samples, cut at the first stop string it was given; a sample that leaves it for
  the runner-up of a near-tie (a token of the top 5 alone) is counted apart, with the gap;
- once the load stops, the KV cache is back to its idle usage (``/metrics``);
- the server's memory (the RSS of its process tree) is flat after warm-up: the report gives the
  slope of a least-squares line through the samples taken after ``warm_up_s``.

``runtime.bench.soak.run_soak`` is used by ``benchmarks/soak.py`` (minutes, the embedded model) and
by ``tests/reliability/test_soak.py`` (seconds, a tiny model).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

from .client import sse_lines

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "The quick brown fox",
    "Explain why the sky is blue.",
    "In 1969, the first person to walk on the moon",
]
DECK = 20
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass
class SoakConfig:
    url: str
    """The server's root, ``http://host:port``."""
    model: str
    duration_s: float
    concurrency: int = 8
    max_tokens: int = 32
    """The longest output asked for; lengths are drawn up to it."""
    disconnect_rate: float = 0.10
    invalid_rate: float = 0.05
    warm_up_s: float = 10.0
    """RSS samples before this are left out of the slope (caches, allocator pools fill up)."""
    server_pid: Optional[int] = None
    """The server's process (its children are counted too); None: no RSS figures."""
    min_requests: int = 0
    """Go on past ``duration_s`` until this many requests were sent (a slow machine still checks enough)."""
    seed: int = 0


@dataclass
class Case:
    """One greedy request whose text alone is known."""

    path: str
    prompt: str
    max_tokens: int
    text: str = ""
    tokens: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    """The text alone, token by token: (the token, its top-5 alternatives' logprobs)."""

    def runner_up_gap(self, text: str) -> Optional[float]:
        """Where ``text`` leaves this case's text alone: if it took a token that was among the top 5
        there, how far below the token alone chose it was (nats); else None. A small gap is a
        near-tie that batched arithmetic may legitimately tip (docs/reliability.md)."""
        differs = next((i for i, (a, b) in enumerate(zip(text, self.text)) if a != b), min(len(text), len(self.text)))
        offset = 0
        for token, top in self.tokens:
            if offset + len(token) > differs:
                rest = text[offset:]
                gaps = [top[token] - logprob for alt, logprob in top.items()
                        if alt and alt != token and rest.startswith(alt) and token in top]
                return min(gaps) if gaps else None
            offset += len(token)
        return None

    def body(self, model: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0, **extra}
        if self.path == CHAT:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


@dataclass
class SoakReport:
    sent: Counter = field(default_factory=Counter)
    """Requests by kind: greedy, sampled, disconnect, invalid."""
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    """5xx, broken connections, wrong statuses, malformed answers: each one breaks the guarantee."""
    mismatches: list[str] = field(default_factory=list)
    """Greedy samples whose text differs from the request's text alone, not at a near-tie."""
    near_ties: list[tuple[float, str]] = field(default_factory=list)
    """Greedy samples that left the text alone for a token of its top 5, with the logprob gap."""
    tokens: int = 0
    kv_usage_idle: float = 0.0
    kv_usage_after: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the start, bytes) of the server's process tree."""
    warm_up_s: float = 0.0
    duration_s: float = 0.0

    @property
    def rss_slope_mib_per_min(self) -> Optional[float]:
        points = [(t, b) for t, b in self.rss if t >= self.warm_up_s]
        if len(points) < 3:
            return None
        mean_t = sum(t for t, _ in points) / len(points)
        mean_b = sum(b for _, b in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        slope = sum((t - mean_t) * (b - mean_b) for t, b in points) / var
        return slope * 60 / 2**20

    def figures(self) -> dict[str, Any]:
        after = [b for t, b in self.rss if t >= self.warm_up_s]
        return {
            "duration_s": round(self.duration_s, 1),
            "requests": dict(self.sent), "requests_total": sum(self.sent.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "server_errors_5xx": sum(v for k, v in self.statuses.items() if isinstance(k, int) and k >= 500),
            "failures": len(self.failures), "failure_examples": self.failures[:5],
            "greedy_mismatches": len(self.mismatches), "mismatch_examples": self.mismatches[:5],
            "greedy_near_ties": len(self.near_ties),
            "near_tie_largest_gap_nats": round(max(g for g, _ in self.near_ties), 4) if self.near_ties else None,
            "near_tie_examples": [w for _, w in sorted(self.near_ties, reverse=True)[:3]],
            "completion_tokens": self.tokens,
            "kv_cache_usage_idle": self.kv_usage_idle, "kv_cache_usage_after": self.kv_usage_after,
            "rss_mib_after_warm_up": [round(after[0] / 2**20, 1), round(after[-1] / 2**20, 1)] if after else None,
            "rss_mib_max": round(max(b for _, b in self.rss) / 2**20, 1) if self.rss else None,
            "rss_slope_mib_per_min": (None if self.rss_slope_mib_per_min is None
                                      else round(self.rss_slope_mib_per_min, 3)),
        }


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (as they are now; one that exits meanwhile is left out)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{current}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        found.append(current)
        stack.extend(children)
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants."""
    total = 0
    for current in process_tree(pid):
        try:
            match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{current}/status").read_text(), re.MULTILINE)
        except FileNotFoundError:
            continue
        total += int(match.group(1)) * 1024 if match else 0  # a zombie has no VmRSS
    return total


async def read_metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    """``runtime:<name>`` from the server's /metrics."""
    text = (await client.get(f"{url}/metrics")).text
    match = re.search(rf"^runtime:{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"runtime:{name} is not in {url}/metrics")
    return float(match.group(1))


async def wait_idle(client: httpx.AsyncClient, url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await read_metric(client, url, "num_requests_running") == 0
                and await read_metric(client, url, "num_requests_waiting") == 0):
            return True
        await asyncio.sleep(0.1)
    return False


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` ended before the first of ``stops`` it holds, as the server ends an output."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


def invalid_bodies(model: str, max_model_len: int) -> list[tuple[str, Any]]:
    """(path, body) pairs the server must refuse with a 400; bytes are sent as they are."""
    user = [{"role": "user", "content": "hi"}]
    return [
        (COMPLETIONS, {"model": model, "prompt": "a", "n": 0}),
        (CHAT, {"model": model, "messages": user, "temperature": 5}),
        (COMPLETIONS, {"model": model, "prompt": "a", "logprobs": 99}),
        (COMPLETIONS, {"model": model, "prompt": "a", "stop": [f"s{i}" for i in range(100)]}),
        (CHAT, {"model": model, "messages": user, "max_tokenz": 3}),
        (COMPLETIONS, {"model": model, "prompt": [1] * (max_model_len + 1)}),
        (CHAT, {"model": model, "messages": user, "logit_bias": {str(i): 1 for i in range(2000)}}),
        (COMPLETIONS, b'{"model": "x", "prompt": "a",'),
    ]


class Soak:
    def __init__(self, config: SoakConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = SoakReport(warm_up_s=config.warm_up_s)
        lengths = sorted({1, 4, 8, config.max_tokens // 2, config.max_tokens} - {0})
        self.cases = [Case(path, prompt, lengths[i % len(lengths)])
                      for i, (path, prompt) in enumerate((p, q) for q in PROMPTS for p in (COMPLETIONS, CHAT))]
        self.invalid: list[tuple[str, Any]] = []
        self.deck: list[str] = []

    async def references(self, client: httpx.AsyncClient) -> None:
        """Each case's text alone, with its top logprobs: one request at a time, nothing else running."""
        for case in self.cases:
            top = {"logprobs": 5} if case.path == COMPLETIONS else {"logprobs": True, "top_logprobs": 5}
            response = await client.post(self.config.url + case.path, json=case.body(self.config.model, **top))
            response.raise_for_status()
            choice = response.json()["choices"][0]
            if case.path == COMPLETIONS:
                case.text = choice["text"]
                logprobs = choice["logprobs"]
                case.tokens = list(zip(logprobs["tokens"], logprobs["top_logprobs"]))
            else:
                case.text = choice["message"]["content"] or ""
                case.tokens = [(t["token"], {alt["token"]: alt["logprob"] for alt in t["top_logprobs"]})
                               for t in choice["logprobs"]["content"]]
        # A text holding U+FFFD was cut through a multi-byte character: its tokens' strings do not
        # add up to it (three byte tokens, one character), so neither stop strings taken from it
        # nor the place where another output leaves it are well defined. Those prompts still come
        # as sampled requests.
        self.cases = [case for case in self.cases if "\ufffd" not in case.text]
        if not self.cases:
            raise RuntimeError("every greedy case's text alone holds U+FFFD: no case to check against")

    def fail(self, what: str) -> None:
        self.report.failures.append(what)

    async def send(self, client: httpx.AsyncClient, path: str, body: dict[str, Any],
                   hang_up: bool = False) -> Optional[list[dict[str, Any]]]:
        """The choices of one request (a stream's chunks joined per choice); None if it failed or hung up."""
        try:
            if not body.get("stream"):
                response = await client.post(self.config.url + path, json=body)
                self.report.statuses[response.status_code] += 1
                if response.status_code != 200:
                    self.fail(f"{path} {response.status_code}: {response.text[:200]}")
                    return None
                data = response.json()
                self.report.tokens += data["usage"]["completion_tokens"]
                return [{"text": c["text"] if path == COMPLETIONS else c["message"]["content"] or "",
                         "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs")}
                        for c in sorted(data["choices"], key=lambda c: c["index"])]
            async with client.stream("POST", self.config.url + path, json=body) as response:
                self.report.statuses[response.status_code] += 1
                if response.status_code != 200:
                    self.fail(f"{path} stream {response.status_code}: {(await response.aread())[:200]!r}")
                    return None
                return await self._join(path, response, body.get("n", 1), hang_up)
        except (httpx.TransportError, json.JSONDecodeError, KeyError) as exc:
            self.fail(f"{path}: {type(exc).__name__}: {exc}")
            return None

    async def _join(self, path: str, response: httpx.Response, n: int, hang_up: bool):
        choices = [{"text": "", "finish_reason": None, "logprobs": []} for _ in range(n)]
        done = False
        async for line in sse_lines(response):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self.fail(f"{path} stream error: {chunk['error']}")
                return None
            for c in chunk["choices"]:
                text = c["text"] if path == COMPLETIONS else (c["delta"].get("content") or "")
                choices[c["index"]]["text"] += text
                choices[c["index"]]["finish_reason"] = c["finish_reason"] or choices[c["index"]]["finish_reason"]
                if c.get("logprobs"):
                    choices[c["index"]]["logprobs"].append(c["logprobs"])
            if chunk.get("usage") and not chunk["choices"]:
                self.report.tokens += chunk["usage"]["completion_tokens"]
            if hang_up and any(c["text"] for c in choices):
                return None  # leaving the block closes the connection mid-stream
        if not done:
            self.fail(f"{path} stream ended without [DONE]")
            return None
        return choices

    async def greedy(self, client: httpx.AsyncClient, hang_up: bool = False) -> None:
        case = self.rng.choice(self.cases)
        n = self.rng.choice([1, 1, 2, 3])
        stream = hang_up or self.rng.random() < 0.5
        extra: dict[str, Any] = {"n": n, "stream": stream}
        if stream:
            extra["stream_options"] = {"include_usage": True}
        stops: list[str] = []
        if self.rng.random() < 0.3 and len(case.text) > 4:
            start = self.rng.randrange(len(case.text) - 2)
            stops = [case.text[start:start + self.rng.randint(1, 3)], "\u2603never"]
            extra["stop"] = stops
        if self.rng.random() < 0.3:
            extra.update({"logprobs": self.rng.randint(0, 5)} if case.path == COMPLETIONS
                         else {"logprobs": True, "top_logprobs": self.rng.randint(0, 5)})
        choices = await self.send(client, case.path, case.body(self.config.model, **extra), hang_up)
        if choices is None:
            return
        expected = cut_at_stop(case.text, stops)
        for i, choice in enumerate(choices):
            if choice["text"] != expected:
                gap = case.runner_up_gap(choice["text"])
                what = (f"{case.path} {case.prompt!r} n={n} stream={stream} stop={stops} sample {i}: "
                        f"{choice['text']!r} != alone {expected!r}")
                if gap is None:
                    self.report.mismatches.append(what)
                else:
                    self.report.near_ties.append((gap, what))
            if choice["finish_reason"] not in ("stop", "length"):
                self.fail(f"{case.path} finish_reason {choice['finish_reason']!r}")

    async def sampled(self, client: httpx.AsyncClient) -> None:
        path = self.rng.choice([COMPLETIONS, CHAT])
        case = Case(path, self.rng.choice(PROMPTS), self.rng.randint(1, self.config.max_tokens))
        n = self.rng.randint(1, 3)
        body = case.body(self.config.model, temperature=0.9, top_p=0.95, n=n, seed=self.rng.randrange(2**31),
                         stream=self.rng.random() < 0.5, stop=[" the", "."][: self.rng.randint(0, 2)] or None)
        choices = await self.send(client, path, body)
        if choices is not None and (len(choices) != n or any(c["finish_reason"] not in ("stop", "length")
                                                             for c in choices)):
            self.fail(f"{path} sampled: {len(choices)} choices for n={n}: {choices}")

    async def invalid_request(self, client: httpx.AsyncClient) -> None:
        path, body = self.rng.choice(self.invalid)
        try:
            if isinstance(body, bytes):
                response = await client.post(self.config.url + path, content=body,
                                             headers={"content-type": "application/json"})
            else:
                response = await client.post(self.config.url + path, json=body)
        except httpx.TransportError as exc:
            self.fail(f"invalid request: {type(exc).__name__}: {exc}")
            return
        self.report.statuses[response.status_code] += 1
        error = response.json().get("error") if response.headers.get("content-type") == "application/json" else None
        if response.status_code != 400 or not error or set(error) != {"message", "type", "param", "code"}:
            self.fail(f"invalid request {str(body)[:80]} got {response.status_code}: {response.text[:200]}")

    def next_kind(self) -> str:
        """Kinds dealt from shuffled decks of ``DECK``, so that every run of that many requests
        holds each kind in its share, however short the run."""
        if not self.deck:
            invalid = round(DECK * self.config.invalid_rate)
            disconnect = round(DECK * self.config.disconnect_rate)
            greedy = (DECK - invalid - disconnect) // 2
            self.deck = (["invalid"] * invalid + ["disconnect"] * disconnect + ["greedy"] * greedy
                         + ["sampled"] * (DECK - invalid - disconnect - greedy))
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    async def client_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline or sum(self.report.sent.values()) < self.config.min_requests:
            kind = self.next_kind()
            self.report.sent[kind] += 1
            if kind == "invalid":
                await self.invalid_request(client)
            elif kind == "disconnect":
                await self.greedy(client, hang_up=True)
            elif kind == "greedy":
                await self.greedy(client)
            else:
                await self.sampled(client)

    async def sample_rss(self, start: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.report.rss.append((time.monotonic() - start, tree_rss(self.config.server_pid)))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> SoakReport:
        config = self.config
        limits = httpx.Limits(max_connections=config.concurrency + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            models = (await client.get(f"{config.url}/v1/models")).json()["data"]
            self.invalid = invalid_bodies(config.model, models[0]["max_model_len"])
            await self.references(client)
            if not await wait_idle(client, config.url):
                raise RuntimeError("the server did not go idle after the reference requests")
            self.report.kv_usage_idle = await read_metric(client, config.url, "kv_cache_usage_perc")
            start = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(self.sample_rss(start, stop)) if config.server_pid else None
            await asyncio.gather(*(self.client_loop(client, start + config.duration_s)
                                   for _ in range(config.concurrency)))
            self.report.duration_s = time.monotonic() - start
            if not await wait_idle(client, config.url):
                self.fail("requests still running 60 s after the load stopped")
            self.report.kv_usage_after = await read_metric(client, config.url, "kv_cache_usage_perc")
            stop.set()
            if sampler is not None:
                await sampler
        return self.report


def run_soak(config: SoakConfig) -> SoakReport:
    return asyncio.run(Soak(config).run())
