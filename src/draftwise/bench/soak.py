"""``draftwise bench --spawn | --serve URL --soak SECONDS``: a server under a mixed load for a
while, checked request by request.

The largest ``--clients`` count of clients each send, for ``SECONDS``, a fixed rotation of
request kinds (each client starting at its own place in it), with the standard library's
``http.client`` so any OpenAI-compatible server can be soaked:

- ``stream``: a streaming greedy chat; must end with ``data: [DONE]``, a finish reason, usage;
- ``sampled``: ``n=2`` sampled choices with a seed; must return two choices;
- ``schema``: ``response_format: json_schema``; the content must parse and carry the required
  keys (the server's grammar is what keeps it valid);
- ``completion``: ``/v1/completions`` on a plain prompt;
- ``two_turn``: a chat, then its second turn with the first reply in the history;
- ``drop``: a streaming chat the client closes after the first chunks (the server must cancel
  it and free its slot: later requests still succeed);
- ``malformed``: a body that is not JSON, or a field out of range; must be HTTP 400 with an
  OpenAI-style ``{"error": {...}}`` body;
- ``hostile``: in turn, an unbounded method option, an option naming a server file, a seed past
  64 bits, a body declaring 200 MB (each must be a 4xx with an OpenAI error body) and a
  temperature too small to compute with (must be answered as greedy).

Any other outcome (a refused connection, a 5xx, an unfinished stream, a wrong shape) is a
failure, with its message kept. HTTP 429 (queue full) is counted apart: a bounded queue refusing
work is the server doing its job. For a spawned server the resident memory is read from
``/proc`` every ``rss_every`` seconds, so a leak shows as a rising series after warm-up.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "SoakResult", "markdown", "process_rss", "run_soak"]

KINDS = ("stream", "sampled", "schema", "completion", "two_turn", "drop", "malformed",
         "hostile")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "year": {"type": "integer"}},
          "required": ["name", "year"], "additionalProperties": False}


class Unexpected(Exception):
    """A reply that is not what the request kind must get."""


class _Status(Exception):
    """A reply with an HTTP status other than 200 (429 is counted apart, not as a failure)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status


@dataclass
class SoakResult:
    seconds: float
    clients: int
    sent: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # HTTP 429: the queue was full
    errors: list[str] = field(default_factory=list)  # the first few failures' messages
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    healthy_after: bool = False

    def summary(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "clients": self.clients,
                "requests": sum(self.sent.values()), "failed": sum(self.failed.values()),
                "refused_429": self.refused, "by_kind": dict(self.sent),
                "failed_by_kind": dict(self.failed), "errors": self.errors,
                "rss_mb": self.rss_mb, "healthy_after": self.healthy_after}


class _Client:
    def __init__(self, url: str, model: str, method: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.model, self.method, self.timeout = model, method, timeout

    def _post(self, path: str, body: bytes) -> tuple[int, http.client.HTTPResponse,
                                                     http.client.HTTPConnection]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        connection.request("POST", path, body, {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response, connection

    def _json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {"model": self.model, "draftwise": {"method": self.method}, **body}
        status, response, connection = self._post(path, json.dumps(body).encode())
        try:
            payload = response.read()
        finally:
            connection.close()
        if status != 200:
            raise _Status(status, payload.decode(errors="replace")[:200])
        reply: dict[str, Any] = json.loads(payload)
        return reply

    def chat(self, messages: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        reply = self._json("/v1/chat/completions", {"messages": messages, **fields})
        for choice in reply["choices"]:
            if choice.get("finish_reason") is None or "content" not in choice["message"]:
                raise Unexpected(f"an unfinished choice: {choice}")
        return reply

    def stream(self, prompt: str, drop_after: int | None = None) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": 64, "stream": True,
                "stream_options": {"include_usage": True}, "draftwise": {"method": self.method}}
        status, response, connection = self._post("/v1/chat/completions",
                                                  json.dumps(body).encode())
        try:
            if status != 200:
                raise _Status(status, response.read().decode(errors="replace")[:200])
            chunks, finished, usage, done = 0, False, False, False
            while line := response.readline():
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                    break
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    return  # the client goes away mid-stream
                usage = usage or bool(chunk.get("usage"))
                finished = finished or any(c.get("finish_reason") for c in chunk["choices"])
            if not (done and finished and usage):
                raise Unexpected(f"a stream ended without [DONE], a finish reason or usage "
                                 f"({chunks} chunks)")
        finally:
            connection.close()

    def hostile(self, which: int) -> None:
        """One of the server issue's hostile requests, in turn, and the reply it must get."""
        base = {"model": self.model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8}
        cases: list[tuple[dict[str, Any], int, dict[str, str]]] = [
            ({**base, "draftwise": {"method": "pld:max_ngram=2000"}}, 400, {}),
            ({**base, "draftwise": {"method": "medusa:heads=/etc/passwd"}}, 400, {}),
            ({**base, "seed": 2**64}, 400, {}),
            ({}, 413, {"content-length": str(200 << 20)}),
            ({**base, "temperature": 1e-310}, 200, {}),
        ]
        fields, wanted, headers = cases[which % len(cases)]
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(fields).encode(),
                               {"content-type": "application/json", **headers})
            response = connection.getresponse()
            status, payload = response.status, response.read()
        finally:
            connection.close()
        if status == 429:
            raise _Status(status, "")
        reply = json.loads(payload) if payload else {}
        shaped = wanted == 200 or isinstance(reply.get("error"), dict)
        if status != wanted or not shaped:
            raise Unexpected(f"hostile case {which % len(cases)} got HTTP {status} (wanted "
                             f"{wanted}): {payload[:200]!r}")

    def malformed(self, which: int) -> None:
        if which % 2 == 0:
            body = b'{"model": "default", "messages": [{"role": "user", "content": "hi"}'
        else:
            body = json.dumps({"model": self.model, "temperature": -1,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, response, connection = self._post("/v1/chat/completions", body)
        try:
            payload = response.read()
        finally:
            connection.close()
        if status == 429:
            raise _Status(status, "")
        error = json.loads(payload).get("error") if payload else None
        if status != 400 or not isinstance(error, dict) or "message" not in error:
            raise Unexpected(f"a malformed request got HTTP {status}: {payload[:200]!r}")


def _one(client: _Client, kind: str, prompt: str, n: int) -> None:
    """Send one request of ``kind``; raise :class:`Unexpected` or :class:`_Status` when its
    reply is not what that kind must get."""
    user = [{"role": "user", "content": prompt}]
    if kind == "stream":
        client.stream(prompt)
    elif kind == "drop":
        client.stream(prompt, drop_after=3)
    elif kind == "sampled":
        reply = client.chat(user, temperature=0.8, seed=n, n=2, max_tokens=32)
        if len(reply["choices"]) != 2:
            raise Unexpected(f"n=2 returned {len(reply['choices'])} choices")
    elif kind == "schema":
        reply = client.chat([{"role": "user", "content": "Name a famous scientist and the "
                              "year they were born, as JSON."}], temperature=0, max_tokens=64,
                            response_format={"type": "json_schema", "json_schema": {
                                "name": "scientist", "schema": SCHEMA}})
        choice = reply["choices"][0]
        if choice["finish_reason"] == "stop":  # complete: must be the schema's JSON
            value = json.loads(choice["message"]["content"])
            if not isinstance(value, dict) or set(value) != {"name", "year"}:
                raise Unexpected(f"json_schema content off schema: {value!r}")
    elif kind == "completion":
        reply = client._json("/v1/completions", {"prompt": prompt, "temperature": 0,
                                                 "max_tokens": 32})
        if not reply["choices"] or "text" not in reply["choices"][0]:
            raise Unexpected(f"a completion without text: {reply}")
    elif kind == "two_turn":
        first = client.chat(user, temperature=0, max_tokens=32)
        answer = first["choices"][0]["message"]["content"]
        client.chat([*user, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "Say that again in one sentence."}],
                    temperature=0, max_tokens=32)
    elif kind == "malformed":
        client.malformed(n)
    elif kind == "hostile":
        client.hostile(n // len(KINDS))
    else:
        raise ValueError(f"unknown request kind {kind!r}")


def run_soak(url: str, prompts: Sequence[str], seconds: float, clients: int,
             method: str = "pld", model: str = "default", rss: Callable[[], float] | None = None,
             rss_every: float = 30.0, progress: bool = True,
             timeout: float = 600.0, min_requests: int = 0) -> SoakResult:
    """``clients`` clients send the rotation of :data:`KINDS` for ``seconds``, each at least
    ``min_requests`` requests however long they take (``len(KINDS)``: every client sends
    every kind); ``rss``: the server's resident memory in MB (None: not sampled)."""
    if seconds <= 0 or clients < 1 or not prompts:
        raise ValueError("a soak needs seconds > 0, clients >= 1 and some prompts")
    result = SoakResult(seconds, clients)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def work(index: int) -> None:
        client = _Client(url, model, method, timeout)
        n = index
        while time.monotonic() < deadline or n - index < min_requests:
            kind = KINDS[n % len(KINDS)]
            prompt = prompts[n % len(prompts)]
            try:
                _one(client, kind, prompt, n)
                failure = None
            except _Status as error:
                failure = None if error.status == 429 else str(error)
                if error.status == 429:
                    with lock:
                        result.refused += 1
                    time.sleep(0.5)
            except (Unexpected, OSError, http.client.HTTPException, ValueError,
                    KeyError, TypeError) as error:
                failure = f"{kind}: {type(error).__name__}: {error}"
            with lock:
                result.sent[kind] += 1
                if failure is not None:
                    result.failed[kind] += 1
                    if len(result.errors) < 10:
                        result.errors.append(failure)
            n += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    next_sample = start
    while any(thread.is_alive() for thread in threads):
        now = time.monotonic()
        if rss is not None and now >= next_sample:
            result.rss_mb.append((round(now - start, 1), round(rss(), 1)))
            next_sample += rss_every
            if progress:
                sent, failed = sum(result.sent.values()), sum(result.failed.values())
                print(f"draftwise: soak {now - start:.0f}/{seconds:.0f} s: {sent} requests, "
                      f"{failed} failed, RSS {result.rss_mb[-1][1]:.0f} MB", flush=True,
                      file=sys.stderr)
        time.sleep(0.2)
    if rss is not None:
        result.rss_mb.append((round(time.monotonic() - start, 1), round(rss(), 1)))
    result.healthy_after = _healthy(url)
    return result


def _healthy(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                            timeout=30)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def process_rss(pid: int) -> Callable[[], float]:
    """The resident memory of process ``pid`` in MB (Linux ``/proc``)."""
    def read() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")
    return read


def markdown(result: SoakResult) -> str:
    lines = ["| kind | requests | failed |", "|---|---:|---:|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {result.sent[kind]} | {result.failed[kind]} |")
    summary = result.summary()
    lines.append(f"| all | {summary['requests']} | {summary['failed']} |")
    lines.append("")
    lines.append(f"{result.clients} clients for {result.seconds:.0f} s; HTTP 429 (queue full): "
                 f"{result.refused}; /health after: "
                 f"{'200' if result.healthy_after else 'no answer'}")
    if result.rss_mb:
        series = ", ".join(f"{mb:.0f} MB at {at:.0f} s" for at, mb in result.rss_mb)
        lines.append(f"RSS: {series}")
    for error in result.errors:
        lines.append(f"- {error}")
    return "\n".join(lines) + "\n"
