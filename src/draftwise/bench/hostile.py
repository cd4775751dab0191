"""``draftwise bench --spawn | --serve URL --hostile``: hostile requests beside normal traffic.

First, normal greedy completions on the idle server give each prompt's answer and the idle
latency. Then a normal client keeps sending those completions while the hostile cases run one
after another, each checked for what it must get:

- ``ngram_options``: ``pld:max_ngram=2000`` -> 400 (options are bounded);
- ``server_files``: ``medusa:heads=`` / ``retrieval:datastore=`` naming a file that exists and
  one that does not -> the same 4xx status and message (nothing tells whether a file exists);
- ``huge_body``: a body past the limit -> 413;
- ``sampling``: ``temperature`` 1e-310, ``seed`` -1 and 2**64 - 1, ``max_tokens`` 10**12 ->
  200; ``seed`` 2**64 -> 400;
- ``malformed``: invalid JSON, a 1500-deep schema -> 400 with an OpenAI error body;
- ``long_prompt``: a prompt longer than any window -> 400 ``context_length_exceeded``;
- ``side_channel``: a "victim" prompt under one cache salt, then guesses of its secret digit
  under another: the right guess must not reuse more cached tokens than the wrong ones
  (prefix caches never cross tenants);
- ``disconnect``: a long non-streamed request whose client leaves after 1 s; the server must be
  idle again soon after (the request cancelled, not run to its end).

Any 5xx, any case answered otherwise, a normal answer that differs from its idle answer, or a
server that stops answering ``/health`` is a failure. Reported: each case's outcome, the normal
requests' latency during the run against idle (p50), and, for a spawned server, its resident
memory before and after.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CASES", "HostileResult", "markdown", "run_hostile"]

CASES = ("ngram_options", "server_files", "huge_body", "sampling", "malformed", "long_prompt",
         "side_channel", "disconnect")


@dataclass
class HostileResult:
    """What a hostile run saw."""

    outcomes: dict[str, str] = field(default_factory=dict)  # case -> "ok" or what went wrong
    statuses: list[int] = field(default_factory=list)  # every hostile reply's HTTP status
    normal_sent: int = 0
    normal_mismatched: int = 0
    normal_failed: int = 0
    idle_p50_s: float = 0.0
    busy_p50_s: float = 0.0
    rss_mb: tuple[float, float] | None = None  # (before, after), a spawned server's
    healthy_after: bool = False

    @property
    def failures(self) -> int:
        bad = sum(outcome != "ok" for outcome in self.outcomes.values())
        return (bad + sum(s >= 500 for s in self.statuses) + self.normal_mismatched
                + self.normal_failed + (not self.healthy_after))

    def summary(self) -> dict[str, Any]:
        return {"outcomes": self.outcomes, "responses_5xx": sum(s >= 500 for s in self.statuses),
                "normal_sent": self.normal_sent, "normal_mismatched": self.normal_mismatched,
                "normal_failed": self.normal_failed, "idle_p50_s": self.idle_p50_s,
                "busy_p50_s": self.busy_p50_s, "rss_mb": self.rss_mb,
                "healthy_after": self.healthy_after, "failures": self.failures}


class _Http:
    def __init__(self, url: str, headers: dict[str, str], timeout: float = 300.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers, self.timeout = headers, timeout

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection(self.host, self.port,
                                                timeout=timeout or self.timeout)
        try:
            connection.request(method, path, body, {"content-type": "application/json",
                                                    **self.headers, **(headers or {})})
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {"raw": payload[:200].decode(errors="replace")}
        return response.status, parsed if isinstance(parsed, dict) else {"raw": parsed}

    def complete(self, model: str, prompt: str | list[int], **fields: Any
                 ) -> tuple[int, dict[str, Any]]:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, **fields}
        return self.request("POST", "/v1/completions", json.dumps(body).encode())


def _openai_error(reply: dict[str, Any]) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def _cases(client: _Http, model: str, statuses: list[int]) -> dict[str, Callable[[], str]]:
    def send(prompt: str | list[int] = "Tell me about rivers.", **fields: Any
             ) -> tuple[int, dict[str, Any]]:
        status, reply = client.complete(model, prompt, **fields)
        statuses.append(status)
        return status, reply

    def expect(status: int, reply: dict[str, Any], wanted: int) -> str:
        if status != wanted:
            return f"HTTP {status}, wanted {wanted}: {str(reply)[:160]}"
        if wanted >= 400 and not _openai_error(reply):
            return f"HTTP {status} without an OpenAI error body: {str(reply)[:160]}"
        return "ok"

    def ngram_options() -> str:
        return expect(*send(draftwise={"method": "pld:max_ngram=2000"}), 400)

    def server_files() -> str:
        seen = set()
        for option in ("medusa:heads", "retrieval:datastore"):
            for path in ("/etc/hostname", "/nonexistent/x"):
                status, reply = send(draftwise={"method": f"{option}={path}"})
                if not 400 <= status < 500:
                    return f"{option}={path}: HTTP {status}"
                seen.add((option, status, str(reply.get("error", {}).get("message"))))
        if len(seen) != 2:
            return f"replies differ by whether the file exists: {sorted(seen)}"
        return "ok"

    def huge_body() -> str:
        # a body that declares 200 MB: refused before a byte of it is read or parsed
        status, reply = client.request("POST", "/v1/completions", b"{}",
                                       headers={"content-length": str(200 << 20)})
        statuses.append(status)
        return expect(status, reply, 413)

    def sampling() -> str:
        for fields in ({"temperature": 1e-310}, {"temperature": 1.0, "seed": -1},
                       {"temperature": 1.0, "seed": 2**64 - 1}, {"max_tokens": 10**12}):
            status, reply = send(**fields)
            if status != 200:
                return f"{fields}: HTTP {status}: {str(reply)[:160]}"
        return expect(*send(seed=2**64), 400)

    def malformed() -> str:
        status, reply = client.request("POST", "/v1/completions", b'{"model": "x", "prompt"')
        statuses.append(status)
        if (outcome := expect(status, reply, 400)) != "ok":
            return "invalid JSON: " + outcome
        deep = (b'{"type": "object", "properties": {"a": ' * 1500 + b'{"type": "object"}'
                + b"}}" * 1500)
        body = (b'{"model": "' + model.encode() + b'", "prompt": "hi", "response_format": '
                b'{"type": "json_schema", "json_schema": {"name": "x", "schema": ' + deep
                + b"}}}")
        status, reply = client.request("POST", "/v1/completions", body)
        statuses.append(status)
        return expect(status, reply, 400)

    def long_prompt() -> str:
        status, reply = send(prompt=[1] * 200_000)
        outcome = expect(status, reply, 400)
        if outcome == "ok" and reply["error"]["code"] != "context_length_exceeded":
            return f"code {reply['error']['code']!r}"
        return outcome

    def side_channel() -> str:
        secret = "The vault code is 7391. Never tell anyone the vault code."
        send(prompt=secret, max_tokens=1, cache_salt="victim")
        cached = []
        for digit in "0123456789":
            status, reply = send(prompt=secret[:18] + digit, max_tokens=1, cache_salt="guess")
            if status != 200:
                return f"HTTP {status}"
            cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        # the guesses share their own prefix (the same tenant's, rightly reused); the right
        # digit must not be told apart by reusing more of the victim's
        wrong = [c for digit, c in enumerate(cached) if digit != 7]
        return "ok" if cached[7] <= max(wrong) else f"cached tokens by guess: {cached}"

    def disconnect() -> str:
        body = json.dumps({"model": model, "prompt": "Count to a thousand.", "temperature": 0,
                           "max_tokens": 100_000, "ignore_eos": True}).encode()
        try:
            client.request("POST", "/v1/completions", body, timeout=1.0)
        except OSError:  # (a timeout too) the client left
            pass
        for _ in range(100):  # bounded: 20 s
            status, health = client.request("GET", "/health")
            if status == 200 and health.get("active", 1) <= 1:  # the normal client's, at most
                return "ok"
            time.sleep(0.2)
        return f"still busy 20 s after the client left: {health}"

    return {"ngram_options": ngram_options, "server_files": server_files,
            "huge_body": huge_body, "sampling": sampling, "malformed": malformed,
            "long_prompt": long_prompt, "side_channel": side_channel, "disconnect": disconnect}


def run_hostile(url: str, prompts: Sequence[str], model: str, *, api_key: str | None = None,
                rss: Callable[[], float] | None = None, max_tokens: int = 32) -> HostileResult:
    """Run every case of :data:`CASES` against the server at ``url`` beside a normal client
    sending greedy completions of ``prompts`` (see the module)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = _Http(url, headers)
    result = HostileResult()
    before = rss() if rss is not None else None
    expected, idle = {}, []
    for prompt in prompts:
        start = time.perf_counter()
        status, reply = client.complete(model, prompt, max_tokens=max_tokens)
        idle.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"a normal request on the idle server got HTTP {status}: {reply}")
        expected[prompt] = reply["choices"][0]["text"]
    result.idle_p50_s = statistics.median(idle)
    stop, busy = threading.Event(), []

    def normal() -> None:
        i = 0
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            i += 1
            start = time.perf_counter()
            try:
                status, reply = client.complete(model, prompt, max_tokens=max_tokens)
            except OSError:
                result.normal_failed += 1
                continue
            busy.append(time.perf_counter() - start)
            result.normal_sent += 1
            if status != 200:
                result.normal_failed += 1
            elif reply["choices"][0]["text"] != expected[prompt]:
                result.normal_mismatched += 1

    thread = threading.Thread(target=normal, daemon=True)
    thread.start()
    try:
        for name, case in _cases(client, model, result.statuses).items():
            try:
                result.outcomes[name] = case()
            except (OSError, ValueError, KeyError) as error:
                result.outcomes[name] = f"{type(error).__name__}: {error}"
    finally:
        stop.set()
        thread.join(timeout=300)
    result.busy_p50_s = statistics.median(busy) if busy else float("nan")
    status, _ = client.request("GET", "/health")
    result.healthy_after = status == 200
    if rss is not None and before is not None:
        time.sleep(2.0)
        result.rss_mb = (before, rss())
    return result


def markdown(result: HostileResult) -> str:
    lines = ["| case | outcome |", "|---|---|"]
    lines += [f"| {name} | {outcome} |" for name, outcome in result.outcomes.items()]
    lines.append("")
    lines.append(f"responses 5xx: {sum(s >= 500 for s in result.statuses)}; normal requests: "
                 f"{result.normal_sent}, answers changed: {result.normal_mismatched}, failed: "
                 f"{result.normal_failed}; latency p50 idle {result.idle_p50_s * 1e3:.0f} ms, "
                 f"during the run {result.busy_p50_s * 1e3:.0f} ms; /health after: "
                 f"{'200' if result.healthy_after else 'no answer'}")
    if result.rss_mb is not None:
        lines.append(f"RSS: {result.rss_mb[0]:.0f} MB before, {result.rss_mb[1]:.0f} MB after")
    lines.append(f"failures: {result.failures}")
    return "\n".join(lines) + "\n"
