"""``draftwise bench --serve URL | --spawn --clients 1,2,4,8``: load on an OpenAI-compatible
server.

For each client count C and each method (interleaved: for C, every method, then the next C),
C clients send the selected questions' first turns as streaming greedy chat requests. Every
client asks every question once, each starting at its own place in the list
(:func:`client_orders`), so C requests are in flight from the level's start almost to its end:
with one shared list of N questions, N / C requests per client ended in a tail where fewer and
fewer clients were left (14 questions at 8 clients: a second wave of 6, then stragglers), and the
level measured a burst, not C concurrent clients. ``--rounds 2`` runs the levels again in
reverse order and merges them, so a drift in the machine's speed does not favour one level.
The level reports aggregate tokens/s
(all completion tokens over the level's wall time), per-request tokens/s (a request's tokens
over its time after the first token), time to first token and latency (p50, p99), and whether
each answer is identical to the same question's answer at one client. Speedups are against the
same method at one client, and against ``none`` at the same client count. Every request
prefills its whole prompt (``cache_prompt: false``): the same questions recur in every level and
round, and a slot's cached answer to one would make its next prefill free.

Clients use only the standard library (``http.client``), so the bench can point at any server
(llama.cpp's ``llama-server`` too: methods are sent as the ``draftwise`` extra field, which
other servers ignore).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoadResult", "await_health", "chart", "client_orders", "free_port", "markdown",
           "run_load", "spawn_server", "stop_server"]


@dataclass
class RequestRecord:
    question: str
    tokens: int
    ttft_s: float
    latency_s: float
    text: str
    error: str | None = None


@dataclass
class LoadResult:
    method: str
    clients: int
    wall_s: float
    records: list[RequestRecord]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is None]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        tokens = sum(r.tokens for r in ok)
        per_request = [r.tokens / (r.latency_s - r.ttft_s) for r in ok
                       if r.latency_s > r.ttft_s and r.tokens > 1]
        return {
            "method": self.method, "clients": self.clients, "requests": len(self.records),
            "failed": len(self.records) - len(ok), "tokens": tokens, "wall_s": self.wall_s,
            "aggregate_tok_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "per_request_tok_s": statistics.median(per_request) if per_request else 0.0,
            "ttft_p50_s": _quantile([r.ttft_s for r in ok], 0.5),
            "latency_p50_s": _quantile([r.latency_s for r in ok], 0.5),
            "latency_p99_s": _quantile([r.latency_s for r in ok], 0.99),
        }


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def request_body(model: str, prompt: str, method: str, max_tokens: int) -> dict[str, object]:
    """One greedy streaming chat request that prefills its whole prompt on either server:
    ``cache_prompt: false`` at the top level is llama-server's field, inside ``draftwise``
    ours (each ignores the other's)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False,
            "draftwise": {"method": method, "cache_prompt": False}}


def request(url: str, model: str, prompt: str, method: str, max_tokens: int,
            timeout: float = 600.0) -> RequestRecord:
    """One streaming greedy chat request; times the first token and the end."""
    parts = urllib.parse.urlsplit(url)
    body = request_body(model, prompt, method, max_tokens)
    start = time.perf_counter()
    ttft, text, tokens = 0.0, "", 0
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                            timeout=timeout)
    try:
        connection.request("POST", parts.path.rstrip("/") + "/v1/chat/completions",
                           json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            error = response.read().decode(errors="replace")[:200]
            return RequestRecord(prompt, 0, 0.0, time.perf_counter() - start, "",
                                 f"HTTP {response.status}: {error}")
        while line := response.readline():
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", ()):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if not text:
                        ttft = time.perf_counter() - start
                    text += piece
    except (OSError, http.client.HTTPException, ValueError) as error:
        return RequestRecord(prompt, 0, 0.0, time.perf_counter() - start, "",
                             f"{type(error).__name__}: {error}")
    finally:
        connection.close()
    return RequestRecord(prompt, tokens, ttft, time.perf_counter() - start, text)


def client_orders(prompts: Sequence[str], clients: int) -> list[list[str]]:
    """Each client's questions: all of them, client ``i`` starting at ``i * N // clients``
    (clients spread over the list: at any moment they ask different questions)."""
    n = len(prompts)
    return [[prompts[(i * n // clients + k) % n] for k in range(n)] for i in range(clients)]


def run_level(url: str, model: str, prompts: Sequence[str], method: str, clients: int,
              max_tokens: int) -> LoadResult:
    """``clients`` concurrent clients, each working through every prompt once."""
    lock = threading.Lock()
    records: list[RequestRecord] = []

    def client(mine: list[str]) -> None:
        for prompt in mine:
            record = request(url, model, prompt, method, max_tokens)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(mine,))
               for mine in client_orders(prompts, clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(method, clients, time.perf_counter() - start, records)


def run_load(url: str, prompts: Sequence[str], methods: Sequence[str], clients: Sequence[int],
             max_tokens: int, progress: bool = True, rounds: int = 1) -> list[LoadResult]:
    """Every (client count, method) level over ``prompts``, ``rounds`` times: odd rounds in
    the given order, even rounds in reverse, so that a machine getting faster or slower during
    the run weighs on every level alike (a level's rounds are merged: their records, and the
    sum of their wall times)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    url = server_root(url)
    model = _model_id(url)
    for method in methods:  # warm-up: first-call costs are nobody's throughput
        request(url, model, prompts[0], method, min(max_tokens, 16))
    levels = [(count, method) for count in clients for method in methods]
    merged: dict[tuple[int, str], LoadResult] = {}
    for round_ in range(rounds):
        for count, method in (levels if round_ % 2 == 0 else levels[::-1]):
            result = run_level(url, model, prompts, method, count, max_tokens)
            if progress:
                s = result.summary()
                print(f"draftwise: {method} x {count} clients"
                      f"{f' (round {round_ + 1})' if rounds > 1 else ''}: "
                      f"{s['aggregate_tok_s']:.1f} tok/s aggregate, {s['failed']} failed",
                      file=sys.stderr, flush=True)
            if (count, method) in merged:
                before = merged[(count, method)]
                result = LoadResult(method, count, before.wall_s + result.wall_s,
                                    [*before.records, *result.records])
            merged[(count, method)] = result
    return [merged[level] for level in levels]


def server_root(url: str) -> str:
    """The server's address without the API prefix: ``http://host:port/v1`` (what
    ``draftwise serve`` and llama-server print) and ``http://host:port`` both name it."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _model_id(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                            timeout=30)
    try:
        connection.request("GET", parts.path.rstrip("/") + "/v1/models")
        response = connection.getresponse()
        body = response.read()
    except OSError as error:
        raise ConnectionError(f"no server answers at {url}: {error}") from None
    finally:
        connection.close()
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{url}/v1/models answered HTTP {response.status} without a model list: "
                         "is it an OpenAI-compatible server?") from None


def summarize(results: Sequence[LoadResult]) -> list[dict[str, Any]]:
    """One row per (method, clients), with speedups and identity to the one-client answers."""
    rows = [r.summary() for r in results]
    alone: dict[str, dict[str, str]] = {}
    for result in results:
        if result.clients == min(r.clients for r in results):
            alone[result.method] = {r.question: r.text for r in result.ok}
    base = {(r["method"], r["clients"]): r["aggregate_tok_s"] for r in rows}
    lowest = min(r.clients for r in results)
    for row, result in zip(rows, results, strict=True):
        one = base.get((row["method"], lowest), 0.0)
        plain = base.get(("none", row["clients"]), 0.0)
        row["vs_one_client"] = row["aggregate_tok_s"] / one if one else 0.0
        row["vs_none"] = row["aggregate_tok_s"] / plain if plain else 0.0
        reference = alone.get("none") or alone.get(row["method"], {})
        same = [r.text == reference[r.question] for r in result.ok if r.question in reference]
        row["identical"] = sum(same) / len(same) if same else 0.0
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | clients | aggregate tok/s | vs 1 client | vs none | per-request tok/s "
             "| TTFT p50 | latency p50 | latency p99 | identical | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['clients']} | {r['aggregate_tok_s']:.1f} | "
            f"{r['vs_one_client']:.2f}x | {r['vs_none']:.2f}x | {r['per_request_tok_s']:.1f} | "
            f"{r['ttft_p50_s'] * 1e3:.0f} ms | {r['latency_p50_s']:.2f} s | "
            f"{r['latency_p99_s']:.2f} s | {r['identical']:.0%} | {r['failed']} |")
    lines.append("")
    lines.append("(identical: greedy answer equal to the same question's answer from `none` "
                 "at the fewest clients)")
    return "\n".join(lines) + "\n"


def chart(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["aggregate_tok_s"] for r in mine], marker="o", label=method)
        right.plot(clients, [r["latency_p50_s"] for r in mine], marker="o", label=method)
    left.set(xlabel="concurrent clients", ylabel="aggregate tokens/s",
             title="throughput")
    right.set(xlabel="concurrent clients", ylabel="seconds", title="latency p50")
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def await_health(process: subprocess.Popen[Any], port: int, timeout_s: float) -> str | None:
    """Wait until the server ``process`` started answers ``GET /health`` with 200 on ``port``:
    None then, else why not (``"exited with status N"``, ``"did not answer /health within
    T s"``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with status {process.returncode}"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return None
        except OSError:
            pass
        time.sleep(0.5)
    return f"did not answer /health within {timeout_s:.0f} s"


def spawn_server(args: Sequence[str], timeout_s: float = 600.0
                 ) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``draftwise serve`` with ``args`` on a free port; return its URL once healthy."""
    port = free_port()
    command = [sys.executable, "-m", "draftwise.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command)
    why = await_health(process, port, timeout_s)
    if why is not None:
        if process.poll() is None:
            process.kill()
        raise RuntimeError(f"the server {why}")
    return f"http://127.0.0.1:{port}", process


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGTERM ``process`` (a spawned server), then SIGKILL it if it has not exited within
    ``timeout_s``, saying so: a server that does not stop on SIGTERM is a bug to look into,
    and a bench that raised there left it running with the port and the cores."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"draftwise: the spawned server (pid {process.pid}) was still running "
              f"{timeout_s:.0f} s after SIGTERM; killed", file=sys.stderr, flush=True)
        process.kill()
        process.wait(timeout=30)


def write(rows: Sequence[dict[str, Any]], results: Sequence[LoadResult], out: Path,
          settings: dict[str, Any]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps({"settings": settings, "levels": list(rows)},
                                              indent=2), encoding="utf-8")
    with open(out / "load_records.jsonl", "w", encoding="utf-8") as file:
        for result in results:
            for record in result.records:
                file.write(json.dumps({"method": result.method, "clients": result.clients,
                                       **asdict(record)}) + "\n")
    (out / "load.md").write_text(markdown(rows), encoding="utf-8")
    written = ["load.json", "load_records.jsonl", "load.md"]
    try:
        chart(rows, out / "load.png")
        written.append("load.png")
    except ImportError:
        pass
    return written
