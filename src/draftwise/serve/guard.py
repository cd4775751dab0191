"""What every HTTP request passes before a route sees it: the API key and the body's size.

:class:`Guard` is plain ASGI middleware. With API keys set, every ``/v1`` route (and
``/metrics`` unless it is public) needs ``Authorization: Bearer KEY`` with one of them, else 401
with an OpenAI error body; ``/health`` stays open. The request's tenant — a digest of its key —
goes to the route in ``scope["state"]["tenant"]`` (cached prompt prefixes never cross tenants).
A body longer than ``max_body`` bytes is refused with 413 before it is parsed, whether it
declares its length or not: the guard reads at most ``max_body + 1`` bytes and replays them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["Guard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """ASGI middleware: API keys and the body limit (see the module).

    Parameters:
        app: the application behind it.
        api_keys: accepted keys (empty: no key needed).
        metrics_public: ``/metrics`` without a key.
        max_body: the most bytes a request body may have.
    """

    def __init__(self, app: App, *, api_keys: frozenset[str] = frozenset(),
                 metrics_public: bool = False, max_body: int = 4 << 20) -> None:
        if max_body < 1:
            raise ValueError(f"max_body must be >= 1 byte, got {max_body}")
        self.app, self.api_keys = app, api_keys
        self.metrics_public, self.max_body = metrics_public, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        tenant = ""
        if self.api_keys and (path.startswith("/v1")
                              or (path == "/metrics" and not self.metrics_public)):
            key = self._key(scope)
            if key is None or not any(hmac.compare_digest(key, k) for k in self.api_keys):
                await _error(send, 401, "a valid API key is needed: send it as "
                                        "'Authorization: Bearer KEY'", "invalid_api_key")
                return
            tenant = hashlib.sha256(key.encode()).hexdigest()[:16]
        scope.setdefault("state", {})["tenant"] = tenant
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _error(send, 413, f"the request body is larger than this server's limit of "
                                    f"{self.max_body} bytes", "request_too_large")
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read(receive)
            if body is None:
                await _error(send, 413, f"the request body is larger than this server's limit "
                                        f"of {self.max_body} bytes", "request_too_large")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    def _key(scope: Scope) -> str | None:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, key = bytes(value).decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and key.strip():
                    return str(key.strip())
        return None

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes ``max_body`` (the rest is not read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # (a disconnect: the route sees an empty body)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` once, then what the connection sends (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Send, status: int, message: str, code: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                    "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
