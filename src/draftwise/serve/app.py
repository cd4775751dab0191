"""``draftwise serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Requests are validated here (pydantic,
then the model's window, the method, the grammar) so that a bad one is refused with an
OpenAI-style error body before it takes a slot: 400 for a bad field, a prompt longer than the
window, an unknown method or an invalid schema; 404 for an unknown model; 429 with
``Retry-After`` when the queue is full. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from draftwise.api import Generator
from draftwise.constraints import ConstraintError, constraint_spec
from draftwise.drafters.base import UnknownMethodError
from draftwise.sampling import SamplingConfig
from draftwise.serve.protocol import ChatRequest, CompletionRequest
from draftwise.serve.scheduler import Event, Job, QueueFull, Scheduler

__all__ = ["ApiError", "create_app"]


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Mailbox:
    """Events from the scheduler thread into the event loop's queues, one loop wake-up per
    burst: a step reports to every active request within microseconds, and waking the loop
    once per event (a write to its self-pipe each) measured 3.5% of the scheduler thread's
    time at four clients."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class _Choice:
    """One choice of a request: its job and the events it has reported."""

    def __init__(self, index: int, mailbox: _Mailbox) -> None:
        self.index = index
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.mailbox = mailbox
        self.text = ""
        self.tokens = 0
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None
        self.job: Job | None = None

    def emit(self, event: Event) -> None:  # called from the scheduler thread
        self.mailbox.post(self.events, event)


class Server:
    """State shared by the endpoints: the generator, the scheduler and the counters."""

    def __init__(self, generator: Generator, method: str, max_batch: int, max_queue: int,
                 budget: str | int = "auto") -> None:
        self.generator = generator
        self.method = method
        self.scheduler = Scheduler(generator, max_batch, max_queue, budget)
        self.scheduler.check_method(method)
        self.model_id = generator.model.name
        self.created = int(time.time())
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._compile_lock = threading.Lock()
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    def check_model(self, name: str) -> None:
        if name not in (self.model_id, "default", self.generator.model.source):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_id!r}", "invalid_request_error", "model",
                           "model_not_found")

    def prepare(self, body: ChatRequest | CompletionRequest, prompt_ids: list[int],
                loop: asyncio.AbstractEventLoop) -> tuple[list[Job], list[_Choice]]:
        """Jobs for the request's ``n`` choices; raises :class:`ApiError` on a bad request."""
        window = self.generator.backend.max_length
        if len(prompt_ids) >= window:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the context window "
                                f"is {window}", param="messages", code="context_length_exceeded")
        options = body.draftwise
        method = options.method if options and options.method else self.method
        if options and options.budget is not None:
            method = f"{method}@{options.budget}"
        try:
            self.scheduler.check_method(method)
        except (UnknownMethodError, ValueError, OSError) as error:
            raise ApiError(400, str(error), param="draftwise.method") from error
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_new = min(limit or window, window - len(prompt_ids))
        sampling = SamplingConfig(temperature=body.temperature, top_p=body.top_p)
        constraint_args = self._constraint_args(body)
        try:
            spec = constraint_spec(**constraint_args) if constraint_args is not None else None
        except ConstraintError as error:
            raise ApiError(400, f"response_format: {error}", param="response_format") from error
        jobs, choices = [], []
        for i in range(body.n):
            constraint = None
            if spec is not None:  # a fresh grammar state per choice (compiled once, cached)
                try:
                    with self._compile_lock:
                        constraint = self.generator.constrain(spec)
                except ConstraintError as error:
                    raise ApiError(400, f"response_format: {error}",
                                   param="response_format") from error
            seed = (body.seed if body.seed is not None else uuid.uuid4().int % 2**31) + i
            config = self.generator.config(max_new_tokens=max_new, sampling=sampling, seed=seed)
            if body.ignore_eos:
                config = dataclasses.replace(config, eos_token_ids=())
            if loop not in self._mailboxes:
                self._mailboxes[loop] = _Mailbox(loop)
            choice = _Choice(i, self._mailboxes[loop])
            job = Job(list(prompt_ids), config, method, choice.emit, body.stops, constraint,
                      body.alternatives, cache_prompt=options.cache_prompt if options else True)
            choice.job = job
            jobs.append(job)
            choices.append(choice)
        return jobs, choices

    @staticmethod
    def _constraint_args(body: ChatRequest | CompletionRequest) -> dict[str, Any] | None:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"json_schema": {"type": "object"}, "whitespace": "flexible"}
        if fmt.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a json_schema field",
                           param="response_format")
        return {"json_schema": fmt.json_schema.schema_, "whitespace": "flexible"}

    def metrics(self) -> str:
        s = self.scheduler
        lines = [
            "# HELP draftwise_requests_total HTTP requests by endpoint and status.",
            "# TYPE draftwise_requests_total counter",
            *(f'draftwise_requests_total{{endpoint="{e}",status="{c}"}} {n}'
              for (e, c), n in sorted(self.requests.items())),
            "# TYPE draftwise_prompt_tokens_total counter",
            f"draftwise_prompt_tokens_total {self.prompt_tokens}",
            "# HELP draftwise_prompt_tokens_cached_total Prompt tokens whose cache entries a"
            " slot held from its request before (reused, not computed).",
            "# TYPE draftwise_prompt_tokens_cached_total counter",
            f"draftwise_prompt_tokens_cached_total {self.scheduler.cached_tokens}",
            "# TYPE draftwise_completion_tokens_total counter",
            f"draftwise_completion_tokens_total {self.completion_tokens}",
            "# TYPE draftwise_queue_depth gauge",
            f"draftwise_queue_depth {s.queue_depth}",
            "# TYPE draftwise_active_requests gauge",
            f"draftwise_active_requests {s.active}",
            "# HELP draftwise_steps_total Batched forward passes.",
            "# TYPE draftwise_steps_total counter",
            f"draftwise_steps_total {s.steps}",
            "# HELP draftwise_step_seconds Time in batched forward passes.",
            "# TYPE draftwise_step_seconds summary",
            f"draftwise_step_seconds_sum {s.step_seconds:.6f}",
            f"draftwise_step_seconds_count {s.steps}",
            "# HELP draftwise_step_rows_total Rows (roots and draft nodes) verified.",
            "# TYPE draftwise_step_rows_total counter",
            f"draftwise_step_rows_total {s.rows}",
            "# HELP draftwise_batch_size_steps_total Steps by the number of requests batched.",
            "# TYPE draftwise_batch_size_steps_total counter",
            *(f'draftwise_batch_size_steps_total{{size="{b}"}} {n}'
              for b, n in sorted(s.batch_sizes.items())),
            "# HELP draftwise_method_mat Mean tokens committed per request step.",
            "# TYPE draftwise_method_mat gauge",
            *(f'draftwise_method_mat{{method="{m}"}} {st.tokens / st.steps:.4f}'
              for m, st in sorted(s.methods.items()) if st.steps),
            "# HELP draftwise_method_acceptance Share of verified draft nodes accepted.",
            "# TYPE draftwise_method_acceptance gauge",
            *(f'draftwise_method_acceptance{{method="{m}"}} {st.accepted / st.drafted:.4f}'
              for m, st in sorted(s.methods.items()) if st.drafted),
        ]
        return "\n".join(lines) + "\n"


def create_app(generator: Generator, method: str = "pld", *, max_batch: int = 8,
               max_queue: int = 64, budget: str | int = "auto",
               scheduler_thread: bool = True) -> FastAPI:
    """The server's ASGI app. ``scheduler_thread``: the app's lifespan runs the scheduler in
    a thread of its own; else the caller runs ``app.state.server.scheduler.run_forever()``."""
    from draftwise.backends.fast import FastBackend

    if not isinstance(generator.backend, FastBackend):
        raise ValueError("the server runs on the quant or fast backend (a Llama/Qwen2 model)")
    server = Server(generator, method, max_batch, max_queue, budget)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if scheduler_thread:
            server.scheduler.start()
        yield
        server.scheduler.close()

    app = FastAPI(title="draftwise", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        server.requests[(request.url.path, error.status)] += 1
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(
            first.get("msg", "invalid request"))
        server.requests[(request.url.path, 400)] += 1
        return ApiError(400, message, param=where).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.scheduler
        return {"status": "ok", "model": server.model_id, "active": s.active,
                "queued": s.queue_depth}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                            "created": server.created, "owned_by": "draftwise"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        server.check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = await run_in_threadpool(generator.encode_chat, messages)
        except ValueError as error:
            raise ApiError(400, str(error), param="messages") from error
        return await _serve(body, request, ids, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
            if not ids or any(not 0 <= t < generator.backend.vocab_size for t in ids):
                raise ApiError(400, "prompt token ids must be in the vocabulary", param="prompt")
        else:
            try:
                ids = await run_in_threadpool(generator.encode, body.prompt, raw=True)
            except ValueError as error:
                raise ApiError(400, str(error), param="prompt") from error
        return await _serve(body, request, ids, chat=False)

    async def _serve(body: ChatRequest | CompletionRequest, request: Request, ids: list[int],
                     chat: bool) -> Any:
        # prepare() may compile a grammar: off the event loop
        jobs, choices = await run_in_threadpool(server.prepare, body, ids,
                                                asyncio.get_running_loop())
        try:
            server.scheduler.submit_all(jobs)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy ({error}); retry shortly",
                           "rate_limit_error", code="queue_full") from error
        server.prompt_tokens += len(ids) * len(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            server.requests[(request.url.path, 200)] += 1
            return StreamingResponse(
                _stream(body, request, choices, rid, created, kind, chat, len(ids)),
                media_type="text/event-stream")
        try:
            failure = await _collect(choices, request)
        finally:
            for choice in choices:
                if choice.finish_reason is None and choice.job is not None:
                    choice.job.cancel()
        if failure is not None:
            raise ApiError(500, failure, "server_error")
        server.requests[(request.url.path, 200)] += 1
        return {
            "id": rid, "object": kind, "created": created, "model": server.model_id,
            "choices": [_choice_body(c, chat) for c in choices],
            "usage": _usage(choices, len(ids)),
        }

    async def _collect(choices: list[_Choice], request: Request) -> str | None:
        error = None
        for choice in choices:
            while choice.finish_reason is None:
                try:
                    event = await asyncio.wait_for(choice.events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                _absorb(choice, event)
                if event.error and choice.finish_reason == "error":
                    error = event.error
        return error

    def _absorb(choice: _Choice, event: Event) -> None:
        choice.text += event.text
        choice.tokens += len(event.tokens)
        choice.logprobs.extend(_entries(event))
        server.completion_tokens += len(event.tokens)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason

    def _piece(token: int) -> str:
        text: str = generator.model.tokenizer.decode([token])
        return text

    def _entries(event: Event) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """``(token, logprob, alternatives)`` of each token in ``event`` that has logprobs."""
        return [(t, lp, top) for t, (lp, top) in zip(event.tokens, event.logprobs, strict=False)]

    def _logprobs(choice: _Choice, entries: list[tuple[int, float, list[tuple[int, float]]]],
                  chat: bool) -> dict[str, Any] | None:
        """OpenAI's logprobs object for ``(token, logprob, alternatives)`` entries, or None when
        the request did not ask for logprobs."""
        if choice.job is None or choice.job.logprobs is None:
            return None
        if chat:
            def item(token: int, lp: float) -> dict[str, Any]:
                text = _piece(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]}
                                for t, lp, top in entries]}
        pieces = [_piece(t) for t, _, _ in entries]
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{_piece(a): b for a, b in top} for _, _, top in entries],
                "text_offset": offsets}

    def _choice_body(choice: _Choice, chat: bool) -> dict[str, Any]:
        reason = {"eos": "stop", "context": "length"}.get(choice.finish_reason or "",
                                                          choice.finish_reason)
        logprobs = _logprobs(choice, choice.logprobs, chat)
        if chat:
            return {"index": choice.index, "finish_reason": reason, "logprobs": logprobs,
                    "message": {"role": "assistant", "content": choice.text}}
        return {"index": choice.index, "text": choice.text, "finish_reason": reason,
                "logprobs": logprobs}

    def _usage(choices: list[_Choice], prompt_tokens: int) -> dict[str, Any]:
        completion = sum(c.tokens for c in choices)
        steps = sum(c.job.run.stats.steps for c in choices
                    if c.job is not None and c.job.run is not None)
        first = choices[0].job.run if choices[0].job is not None else None
        cached = first.stats.cached_tokens if first is not None else 0
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "draftwise": {"steps": steps, "mat": round(completion / steps, 4) if steps
                              else 0.0, "method": choices[0].job.method if choices[0].job
                              else server.method}}

    async def _stream(body: ChatRequest | CompletionRequest, request: Request,
                      choices: list[_Choice], rid: str, created: int, kind: str, chat: bool,
                      prompt_tokens: int) -> AsyncIterator[str]:
        kind = kind + ".chunk" if chat else kind

        def chunk(choice_list: list[dict[str, Any]], usage: Any = None) -> str:
            payload: dict[str, Any] = {"id": rid, "object": kind, "created": created,
                                       "model": server.model_id, "choices": choice_list}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        pending: dict[asyncio.Future[Event], _Choice] = {}
        try:
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None, "logprobs": None} for c in choices])
            for choice in choices:
                pending[asyncio.ensure_future(choice.events.get())] = choice
            while pending:
                done, _ = await asyncio.wait(pending, timeout=1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if await request.is_disconnected():
                        return
                    continue
                for future in done:
                    choice = pending.pop(future)
                    event = future.result()
                    _absorb(choice, event)
                    fresh = _logprobs(choice, _entries(event), chat)
                    if event.error:
                        yield "data: " + json.dumps({"error": {
                            "message": event.error, "type": "server_error"}}) + "\n\n"
                    if event.text or event.finish_reason or (fresh and event.tokens):
                        reason = None
                        if event.finish_reason is not None:
                            reason = {"eos": "stop", "context": "length"}.get(
                                event.finish_reason, event.finish_reason)
                        if chat:
                            delta = {"content": event.text} if event.text else {}
                            item = {"index": choice.index, "delta": delta,
                                    "finish_reason": reason, "logprobs": fresh}
                        else:
                            item = {"index": choice.index, "text": event.text,
                                    "finish_reason": reason, "logprobs": fresh}
                        yield chunk([item])
                    if choice.finish_reason is None:
                        pending[asyncio.ensure_future(choice.events.get())] = choice
            options = body.stream_options
            if options is not None and options.include_usage:
                yield chunk([], _usage(choices, prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away (the generator is closed)
            for future in pending:
                future.cancel()
            for choice in choices:
                if choice.finish_reason is None and choice.job is not None:
                    choice.job.cancel()

    return app
