"""``draftwise serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Each route is a plain function over the
app's :class:`~draftwise.serve.server.Server`; requests are validated by pydantic
(:mod:`~draftwise.serve.protocol`), then by the server (the model's window, the method, the
grammar), so a bad one is refused with an OpenAI-style error body
(:mod:`~draftwise.serve.openai`) before it takes a slot: 400 for a bad field, a prompt longer
than the window, an unknown method or an invalid schema; 404 for an unknown model; 429 with
``Retry-After`` when the queue is full. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftwise.method import MethodBuilder
from draftwise.serve import openai
from draftwise.serve.guard import Guard
from draftwise.serve.openai import ApiError
from draftwise.serve.policy import ClientPolicy
from draftwise.serve.protocol import ChatRequest, CompletionRequest
from draftwise.serve.scheduler import Event, QueueFull
from draftwise.serve.server import Pending, Server

__all__ = ["ApiError", "create_app"]

routes = APIRouter()
DISCONNECT_CHECK_S = 0.5  # how often a non-streamed request looks for its client's departure


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


@routes.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    status, body = _server(request).health()
    return JSONResponse(body, status_code=status)


@routes.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    server = _server(request)
    return {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                        "created": server.created, "owned_by": "draftwise"}]}


@routes.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(_server(request).metrics(), media_type="text/plain; version=0.0.4")


@routes.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatRequest, request: Request) -> Any:
    server = _server(request)
    server.check_model(body.model)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await run_in_threadpool(server.model.encode_chat, messages)
    except ValueError as error:
        raise ApiError(400, str(error), param="messages") from error
    return await _generate(server, body, request, ids, chat=True)


@routes.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    server = _server(request)
    server.check_model(body.model)
    if isinstance(body.prompt, list):
        ids = list(body.prompt)
        if not ids or any(not 0 <= t < server.backend.vocab_size for t in ids):
            raise ApiError(400, "prompt token ids must be in the vocabulary", param="prompt")
    else:
        try:
            ids = await run_in_threadpool(server.model.encode, body.prompt, raw=True)
        except ValueError as error:
            raise ApiError(400, str(error), param="prompt") from error
    return await _generate(server, body, request, ids, chat=False)


async def _generate(server: Server, body: ChatRequest | CompletionRequest, request: Request,
                    ids: list[int], chat: bool) -> Any:
    await server.precompile(body)  # a grammar compiles on its own thread, bounded
    tenant = str(getattr(request.state, "tenant", ""))
    jobs, choices = await run_in_threadpool(server.prepare, body, ids,
                                            asyncio.get_running_loop(), tenant)
    try:
        server.scheduler.submit_all(jobs)
    except QueueFull as error:
        raise ApiError(429, f"the server is busy ({error}); retry shortly",
                       "rate_limit_error", code="queue_full") from error
    server.prompt_tokens += len(ids) * len(jobs)
    reply = _Reply(server, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                   "chat.completion" if chat else "text_completion", chat, len(ids))
    if body.stream:
        server.requests[(request.url.path, 200)] += 1
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(reply, request, choices, include_usage),
                                 media_type="text/event-stream")
    try:
        failure = await _collect(server, choices, request)
    finally:
        for choice in choices:
            choice.cancel_unfinished()
    if failure is not None:
        raise ApiError(500, failure, "server_error")
    server.requests[(request.url.path, 200)] += 1
    return {"id": reply.rid, "object": reply.kind, "created": reply.created,
            "model": server.model_id,
            "choices": [openai.choice_body(c, chat, server.piece) for c in choices],
            "usage": openai.usage(list(choices), len(ids))}


class _Reply:
    """What every part of one reply shares: its id, kind and creation time."""

    def __init__(self, server: Server, rid: str, kind: str, chat: bool,
                 prompt_tokens: int) -> None:
        self.server, self.rid, self.kind, self.chat = server, rid, kind, chat
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())

    def chunk(self, items: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        kind = self.kind + ".chunk" if self.chat else self.kind
        return openai.chunk(self.rid, kind, self.created, self.server.model_id, items, usage)


async def _collect(server: Server, choices: list[Pending], request: Request) -> str | None:
    """Wait for every choice to finish; the first error, or None (also when the client left:
    looked at every :data:`DISCONNECT_CHECK_S` seconds, however fast events come)."""
    error = None
    checked = time.monotonic()
    for choice in choices:
        while choice.finish_reason is None:
            try:
                event = await asyncio.wait_for(choice.events.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
            if event is None:
                continue
            server.absorb(choice, event)
            if event.error and choice.finish_reason == "error":
                error = event.error
    return error


async def _stream(reply: _Reply, request: Request, choices: list[Pending],
                  include_usage: bool) -> AsyncIterator[str]:
    server, chat = reply.server, reply.chat
    pending: dict[asyncio.Future[Event], Pending] = {}
    try:
        if chat:
            yield reply.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
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
                entries = server.absorb(choice, event)
                fresh = openai.logprobs_object(choice, entries, chat, server.piece)
                if event.error:
                    yield openai.error_chunk(event.error)
                if event.text or event.finish_reason or (fresh and event.tokens):
                    yield reply.chunk([openai.delta(choice, event.text, event.finish_reason,
                                                    fresh, chat)])
                if choice.finish_reason is None:
                    pending[asyncio.ensure_future(choice.events.get())] = choice
        if include_usage:
            yield reply.chunk([], openai.usage(list(choices), reply.prompt_tokens))
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client went away (the generator is closed)
        for future in pending:
            future.cancel()
        for choice in choices:
            choice.cancel_unfinished()


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    _server(request).requests[(request.url.path, error.status)] += 1
    return error.response()


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed, a body it cannot read) in
    OpenAI's shape."""
    assert isinstance(error, StarletteHTTPException)
    _server(request).requests[(request.url.path, error.status_code)] += 1
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return ApiError(error.status_code, str(error.detail), kind).response()


async def _invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":  # (its location is a character offset)
        _server(request).requests[(request.url.path, 400)] += 1
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                        .rstrip(": ")).response()
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(
        first.get("msg", "invalid request"))
    _server(request).requests[(request.url.path, 400)] += 1
    return ApiError(400, message, param=where).response()


def create_app(methods: MethodBuilder, method: str = "pld", *, max_batch: int = 8,
               max_queue: int = 64, scheduler_thread: bool = True,
               policy: ClientPolicy | None = None, api_keys: frozenset[str] = frozenset(),
               metrics_public: bool = False, max_body: int = 4 << 20) -> FastAPI:
    """The server's ASGI app over the model and backend ``methods`` builds for; ``method``:
    the method of requests that name none; ``policy``: what clients may ask for;
    ``api_keys``, ``metrics_public``, ``max_body``: see :class:`~draftwise.serve.guard.Guard`.
    ``scheduler_thread``: the app's lifespan runs the scheduler in a thread of its own; else
    the caller runs ``app.state.server.scheduler.run_forever()``."""
    server = Server(methods, method, max_batch, max_queue, policy)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if scheduler_thread:
            server.scheduler.start()
        yield
        server.scheduler.close()

    app = FastAPI(title="draftwise", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(routes)
    app.add_middleware(Guard, api_keys=api_keys, metrics_public=metrics_public,
                       max_body=max_body)
    return app
