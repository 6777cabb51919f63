"""One API request through the scheduler: its sequences (prompts x n choices), their text, and
the answer (one JSON body, or SSE chunks, one per choice per decode block).

Choice j of prompt p (index p * n + j) is sampled with key fold_in(key(seed), j): exactly what
`model.generate([prompt] * n, seed=seed)` gives that prompt alone. Without a seed, the request
draws a random one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from runtime.engine.generation import validate
from runtime.errors import RequestError
from runtime.serve import schemas
from runtime.serve.errors import ApiError, invalid
from runtime.serve.scheduler import QueueFull, Sequence, Update
from runtime.serve.text import TextStream

log = logging.getLogger("mamba2_aot.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat: as many as the artifact allows)
_ERRORS = {"timeout": (504, "timeout"), "aborted": (503, "shutting_down"), "internal": (500, "internal_error")}


class Choice:
    """One sequence's progress as the client sees it."""

    def __init__(self, index: int, prompt: list[int], text: TextStream):
        self.index = index
        self.prompt = prompt
        self.text = text
        self.seq: Sequence | None = None
        self.tokens: list[int] = []  # the tokens the answer counts (up to a stop string)
        self.out = ""
        self.finish_reason: str | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None


class Exchange:
    """A request from its parsed body to its last byte: prepare (tokenize, check, build the
    sequences), submit, then `body()` or `events()`; `finish()` logs it once."""

    def __init__(self, service, kind: str, arrived: float):
        self.service = service
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.arrived = arrived
        self.params: schemas.Params | None = None
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self.first_token_at: float | None = None
        self.status: int | None = None
        self._updates: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        service.exchanges.add(self)

    # -- before the scheduler ------------------------------------------------------------------
    def prepare(self, params: schemas.Params) -> None:
        """Tokenize, check against the artifact and build one Sequence per choice (runs in a
        worker thread: tokenizing and key derivation are CPU work)."""
        self.params = params
        svc, model = self.service, self.service.model
        text = svc.text
        if params.kind == "chat":
            prompts = [text.encode(text.render_chat(params.messages), special_tokens=False)]
        else:
            prompts = [text.encode(p) if isinstance(p, str) else p for p in params.prompts]
        limits = model.limits
        for p in prompts:
            if not p:
                raise invalid(self._prompt_param(), "the prompt is empty after tokenization")
            if len(p) > limits["max_prompt_tokens"]:
                raise invalid(self._prompt_param(), f"the prompt has {len(p)} tokens, over the artifact's "
                                      f"limit of {limits['max_prompt_tokens']}")
        self.prompt_tokens = sum(map(len, prompts))
        deadline = None if svc.config.request_timeout is None else self.arrived + svc.config.request_timeout
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        for p_index, prompt in enumerate(prompts):
            max_new = params.max_tokens or self._default_max_tokens(len(prompt))
            try:
                req = validate(model, [prompt] * params.n, max_new, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, min_p=params.min_p, seed=seed, stop=params.stop_token_ids,
                               ignore_eos=params.ignore_eos)
            except RequestError as e:
                raise ApiError(400, str(e), code="invalid_value") from None
            s = req.settings
            for j, row in enumerate(req.rows):
                c = Choice(p_index * params.n + j, prompt, TextStream(text, prompt, params.stop))
                sampling = (float(s.temperature[j]), int(s.top_k[j]), float(s.top_p[j]), float(s.min_p[j]))
                c.seq = Sequence(row, sampling, req.keys[j], self._emitter(c), deadline)
                self.choices.append(c)

    def _prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def _default_max_tokens(self, prompt_len: int) -> int:
        limits = self.service.model.limits
        cap = limits["max_new_tokens"]
        if limits["max_context"] is not None:
            cap = max(1, min(cap, limits["max_context"] - prompt_len))
        return min(DEFAULT_MAX_TOKENS, cap) if self.kind == "completion" else cap

    def _emitter(self, choice: Choice):
        def emit(update: Update) -> None:  # the scheduler thread
            try:
                self._loop.call_soon_threadsafe(self._updates.put_nowait, (choice, update, time.monotonic()))
            except RuntimeError:  # the event loop is gone: nobody waits any more
                pass
        return emit

    def submit(self) -> None:
        try:
            self.service.scheduler.submit([c.seq for c in self.choices])
        except QueueFull:
            raise ApiError(429, "the server's queue is full: retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                self.service.scheduler.cancel(c.seq)

    # -- results -----------------------------------------------------------------------------
    async def _next(self) -> tuple[Choice, str, list[int]]:
        """The next piece of some choice: (choice, new text, its tokens); raises ApiError when a
        sequence ended in an error (the others are cancelled)."""
        while True:
            c, update, at = await self._updates.get()
            if c.finish_reason is not None:
                continue  # after a stop string: the scheduler had already made more
            if update.error is not None:
                self.cancel()
                status, code = _ERRORS[update.error]
                raise ApiError(status, update.message, code=code)
            final = update.finish_reason is not None
            new, counted = c.text.feed(update.tokens, final)
            tokens = update.tokens[:counted]
            c.tokens.extend(tokens)
            c.out += new
            if tokens:
                c.first_at = c.first_at or at
                c.last_at = at
                self.first_token_at = self.first_token_at or at
            if c.text.stopped:
                c.finish_reason = "stop"
                self.service.scheduler.cancel(c.seq)
            elif final:
                c.finish_reason = update.finish_reason
            return c, new, tokens

    def _open(self) -> int:
        return sum(c.finish_reason is None for c in self.choices)

    async def body(self) -> dict:
        """The whole (non-streamed) response."""
        while self._open():
            await self._next()
        p = self.params
        choices = [schemas.choice(self.kind, c.index, c.out, c.finish_reason,
                                  c.tokens if p.return_token_ids else None,
                                  c.prompt if p.return_token_ids else None) for c in self.choices]
        return schemas.envelope(self.kind, self.id, self.created, p.model, choices,
                                usage_=schemas.usage(self.prompt_tokens, self.completion_tokens))

    async def events(self) -> AsyncIterator[str]:
        """SSE lines: one chunk per choice per decode block, usage if asked, then [DONE]."""
        p = self.params
        chunk = lambda choices: "data: " + json.dumps(schemas.envelope(  # noqa: E731
            self.kind, self.id, self.created, p.model, choices, chunk=True, with_usage=p.include_usage)) + "\n\n"
        if self.kind == "chat":
            for c in self.choices:
                yield chunk([schemas.delta(self.kind, c.index, None, None, role=True)])
        try:
            while self._open():
                c, new, tokens = await self._next()
                if tokens or new or c.finish_reason is not None:
                    yield chunk([schemas.delta(self.kind, c.index, new, c.finish_reason,
                                               tokens if p.return_token_ids else None)])
        except ApiError as e:
            self.finish(e.status)
            yield "data: " + json.dumps(e.body()) + "\n\n"
        else:
            if p.include_usage:
                yield "data: " + json.dumps(schemas.envelope(
                    self.kind, self.id, self.created, p.model, [], chunk=True,
                    usage_=schemas.usage(self.prompt_tokens, self.completion_tokens))) + "\n\n"
            self.finish(200)
        yield "data: [DONE]\n\n"

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    # -- the end -----------------------------------------------------------------------------
    def finish(self, status: int) -> None:
        """Record the request once: metrics and one log line (499: the client went away)."""
        if self.status is not None:
            return
        self.status = status
        self.service.exchanges.discard(self)
        now = time.monotonic()
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrived
        self.service.metrics.record(self, status, ttft, now - self.arrived)
        reasons = ",".join(sorted({c.finish_reason for c in self.choices if c.finish_reason})) or "-"
        log.info("request %s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s",
                 self.id, status, self.prompt_tokens, self.completion_tokens,
                 "-" if ttft is None else f"{ttft:.3f}s", now - self.arrived, reasons)
