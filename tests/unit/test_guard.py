"""The server's guard: API keys in front of /v1 and /metrics, and the body limit, before any
route parses anything."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from draftwise.serve.guard import Guard

httpx = pytest.importorskip("httpx")


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """An app that answers with the body's length and the tenant it was given."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    payload = json.dumps({"size": len(body), "tenant": scope["state"]["tenant"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": payload})


def call(guard: Guard, method: str, path: str, **kwargs: Any) -> Any:
    async def go() -> Any:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_v1_and_metrics_need_a_key_and_health_does_not() -> None:
    guard = Guard(echo, api_keys=frozenset({"k1", "k2"}))
    for path in ("/v1/models", "/v1/chat/completions", "/metrics"):
        answer = call(guard, "POST", path, content=b"{}")
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        wrong = call(guard, "POST", path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    assert call(guard, "GET", "/health").status_code == 200
    ok = call(guard, "POST", "/v1/completions", content=b"{}",
              headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200
    assert ok.json()["tenant"] == hashlib.sha256(b"k2").hexdigest()[:16]
    public = Guard(echo, api_keys=frozenset({"k1"}), metrics_public=True)
    assert call(public, "GET", "/metrics").status_code == 200
    assert call(Guard(echo), "GET", "/v1/models").json()["tenant"] == ""  # no keys: open


def test_a_body_over_the_limit_is_413_declared_or_streamed() -> None:
    guard = Guard(echo, max_body=1000)
    assert call(guard, "POST", "/v1/completions", content=b"x" * 1000).json()["size"] == 1000
    declared = call(guard, "POST", "/v1/completions", content=b"x" * 1001)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(50):
            yield b"y" * 100

    streamed = call(guard, "POST", "/v1/completions", content=chunks())
    assert streamed.status_code == 413
    with pytest.raises(ValueError, match="max_body"):
        Guard(echo, max_body=0)
