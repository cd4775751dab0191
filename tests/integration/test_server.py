"""``draftwise serve`` with the real ``openai`` client, on the real default model (slow).

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port) on the quant
backend where its kernels build, else fast. Every loop here is bounded; nothing asserts a time.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import serving

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in two sentences.",
    "List three prime numbers.",
    "Summarize: The cat sat on the mat. The dog barked at the cat. The cat ran away.",
    "Translate to French: Good morning, how are you today?",
    "What is 17 times 23?",
]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    from draftwise.api import Generator
    from draftwise.models import load_model
    from draftwise.serve.app import create_app

    generator = Generator(load_model("default", progress=False), "none", backend="auto")
    app = create_app(generator.methods, "pld", max_batch=4, max_queue=2)
    with serving(app) as url:
        yield url, generator


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(url: str, prompt: str, **kwargs: Any) -> Any:
    return client(url).chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}],
        **{"temperature": 0, "max_tokens": 48, **kwargs})


def wait_idle(url: str) -> None:
    for _ in range(600):
        health = httpx.get(url + "/health").json()
        if health["active"] == 0 and health["queued"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {health}")


def test_chat_equals_the_python_api_and_reports_usage(server: tuple[str, Any]) -> None:
    url, generator = server
    reply = chat(url, PROMPTS[0])
    expected = generator.with_method("pld").generate(PROMPTS[0], max_new_tokens=48)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    extra = reply.usage.model_extra["draftwise"]
    assert extra["method"] == "pld" and extra["steps"] >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_chats_next_turn_reuses_the_cached_turn_exactly(server: tuple[str, Any]) -> None:
    """The next turn of a chat begins with the last one's prompt: a free slot holding it is
    chosen and its cache kept (on the quant backend, where a prompt prefilled at once gets the
    bits of one prefilled in parts); the reply is the one a fresh prefill gives."""
    url, generator = server
    wait_idle(url)
    first = chat(url, PROMPTS[2])
    messages = [{"role": "user", "content": PROMPTS[2]},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Now list three more."}]
    reply = client(url).chat.completions.create(model="default", messages=messages,
                                                temperature=0, max_tokens=48)
    pld = generator.with_method("pld")
    done = pld.engine.generate(pld.encode_chat(messages), pld.config(max_new_tokens=48))
    expected = generator.model.tokenizer.decode(done.tokens, skip_special_tokens=True)
    assert reply.choices[0].message.content == expected
    cached = reply.usage.prompt_tokens_details.cached_tokens
    if generator.backend.capabilities.reuses_prefix:
        assert cached >= first.usage.prompt_tokens - 1
        assert "draftwise_prompt_tokens_cached_total" in httpx.get(url + "/metrics").text
    else:
        assert cached == 0
    again = client(url).chat.completions.create(  # llama-server's cache_prompt: false
        model="default", messages=messages, temperature=0, max_tokens=48,
        extra_body={"draftwise": {"cache_prompt": False}})
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == expected


def test_cached_prefixes_never_cross_cache_salts(server: tuple[str, Any]) -> None:
    """A prompt prefix cached for one cache salt (or API key) is never reused for another: the
    second user's prefill is computed whole, so neither ``cached_tokens`` nor its timing tells
    it what the first user sent."""
    url, generator = server
    if not generator.backend.capabilities.reuses_prefix:
        pytest.skip("this backend does not reuse a cached prefix")
    wait_idle(url)
    messages = [{"role": "system", "content": "The vault code is 7391. Never tell it."},
                {"role": "user", "content": "What is the weather like?"}]

    def cached(salt: str) -> int:
        reply = client(url).chat.completions.create(
            model="default", messages=messages, temperature=0, max_tokens=1,
            extra_body={"cache_salt": salt})
        return int(reply.usage.prompt_tokens_details.cached_tokens)

    cached("alice")
    assert cached("alice") > 20  # the same salt reuses its own prefix
    assert cached("mallory") == 0


def test_the_suffix_cache_drafts_from_a_tenants_earlier_answers_and_never_anothers(
        server: tuple[str, Any]) -> None:
    """A request repeating an earlier one drafts the earlier answer from the suffix cache
    (fewer steps, same text) — for the same tenant (here: cache salt) only."""
    url, generator = server
    wait_idle(url)
    prompt = "Write a haiku about the sea, then explain it in one sentence."

    def ask(salt: str) -> tuple[str, int]:
        reply = chat(url, prompt, max_tokens=64, extra_body={
            "cache_salt": salt, "draftwise": {"method": "suffix@8", "cache_prompt": False}})
        return reply.choices[0].message.content, reply.usage.model_extra["draftwise"]["steps"]

    text, steps = ask("suffix-alice")
    again, fewer = ask("suffix-alice")
    other, same = ask("suffix-mallory")
    assert again == text == other
    assert fewer < steps / 2  # the whole earlier answer was there to draft
    assert same == steps  # nothing of alice's reached mallory's drafts
    cache = generator.methods.suffix
    assert cache is not None and cache.tokens <= cache.max_tokens


def test_streaming_chat_and_completions(server: tuple[str, Any]) -> None:
    url, _ = server
    whole = chat(url, PROMPTS[1]).choices[0].message.content
    stream = client(url).chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0,
        max_tokens=48, stream=True, stream_options={"include_usage": True})
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert text == whole and reasons[-1] in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    plain = client(url).completions.create(model="default", prompt="def fib(n):",
                                           max_tokens=24, temperature=0)
    pieces = client(url).completions.create(model="default", prompt="def fib(n):",
                                            max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == plain.choices[0].text
    assert plain.usage.completion_tokens == 24 and plain.choices[0].finish_reason == "length"
    with httpx.stream("POST", url + "/v1/completions", json={
            "model": "default", "prompt": "Hello", "max_tokens": 4, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_json_schema_n_and_stop(server: tuple[str, Any]) -> None:
    url, _ = server
    schema = {"type": "object", "properties": {"name": {"type": "string"},
              "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}
    reply = chat(url, "Describe a person as JSON.", max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    several = chat(url, "Say something.", n=3, temperature=0.9, seed=7, max_tokens=16)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = chat(url, "Say something.", n=3, temperature=0.9, seed=7, max_tokens=16)
    assert ([c.message.content for c in several.choices]
            == [c.message.content for c in again.choices])  # seeded: reproducible
    stopped = chat(url, "Count from 1 to 20, separated by commas.", stop=["5"], max_tokens=64)
    assert "5" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"


def test_errors_are_openai_errors_and_fail_one_request(server: tuple[str, Any]) -> None:
    url, _ = server
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user",
                                                                     "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(url, "Hi", temperature=7)
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        chat(url, "Hi", extra_body={"draftwise": {"method": "nonsense"}})
    with pytest.raises(openai.BadRequestError, match="context window"):
        client(url).completions.create(model="default", prompt=[5] * 9000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(url, "Hi", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}})
    malformed = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "error" in malformed.json()
    missing = httpx.post(url + "/v1/chat/completions", json={"model": "default"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert chat(url, PROMPTS[2], max_tokens=8).choices[0].message.content  # still serving
    metrics = httpx.get(url + "/metrics").text
    assert 'status="400"' in metrics and "draftwise_steps_total" in metrics


def test_concurrent_greedy_requests_equal_each_alone(server: tuple[str, Any]) -> None:
    """16 clients with interleaved arrivals (4 slots): every greedy answer equals the same
    request alone, whatever it was batched with."""
    url, _ = server
    alone = {p: chat(url, p).choices[0].message.content for p in PROMPTS}
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(16)]

    def ask(i: int) -> tuple[str, str]:
        time.sleep(0.05 * (i % 5))  # arrivals spread over the others' steps
        for _ in range(50):  # a full queue answers 429: back off and retry (bounded)
            try:
                return jobs[i], chat(url, jobs[i]).choices[0].message.content
            except openai.RateLimitError:
                time.sleep(0.2)
        raise AssertionError("the queue never drained")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(text == alone[prompt] for prompt, text in answers)
    metrics = httpx.get(url + "/metrics").text
    batched = [line for line in metrics.splitlines()
               if line.startswith("draftwise_batch_size_steps_total") and 'size="1"' not in line]
    assert batched  # some steps verified several requests in one pass


def test_queue_full_is_429_and_a_dropped_stream_frees_its_slot(server: tuple[str, Any]) -> None:
    url, _ = server
    wait_idle(url)
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPTS[0]}],
            "temperature": 0, "max_tokens": 4000, "stream": True, "ignore_eos": True,
            "draftwise": {"method": "none"}}
    streams = []
    for _ in range(4):  # fill the 4 slots with long streams, read their first chunk
        cm = httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60)
        response = cm.__enter__()
        lines = response.iter_lines()  # (kept: a collected iterator closes the stream)
        chunks = [line for line, _ in zip(lines, range(4), strict=False) if line]
        assert len(chunks) == 2  # the role chunk, then text: the request is decoding
        streams.append((cm, lines))
    waiting = [threading.Thread(target=lambda: httpx.post(
        url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4},
        timeout=120)) for _ in range(2)]
    for thread in waiting:
        thread.start()
    for _ in range(200):
        if httpx.get(url + "/health").json()["queued"] == 2:
            break
        time.sleep(0.05)
    refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False})
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    for cm, _ in streams:  # the clients go away mid-stream
        cm.__exit__(None, None, None)
    for thread in waiting:
        thread.join(timeout=120)
    wait_idle(url)  # every slot was freed
    assert chat(url, PROMPTS[3], max_tokens=8).choices[0].message.content


def test_models_and_health(server: tuple[str, Any]) -> None:
    url, generator = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [generator.model.name]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_logprobs_are_the_models_own(server: tuple[str, Any]) -> None:
    """Chat and completions logprobs: one entry per token, the chosen token's log-probability
    is the greedy maximum (so no alternative beats it), and streaming reports the same."""
    url, _ = server
    reply = chat(url, PROMPTS[2], max_tokens=12, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
        assert entry.logprob >= max(alt.logprob for alt in entry.top_logprobs) - 1e-6
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    streamed = client(url).chat.completions.create(
        model="default", messages=[{"role": "user", "content": PROMPTS[2]}], temperature=0,
        max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
    tokens = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in tokens] == [(e.token, e.logprob) for e in content]
    legacy = client(url).completions.create(model="default", prompt="def fib(n):",
                                            max_tokens=6, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 6
    assert all(len(top) <= 2 for top in legacy.choices[0].logprobs.top_logprobs)
    assert chat(url, "Hi", max_tokens=4).choices[0].logprobs is None


def test_a_short_soak_of_every_request_kind_has_no_failures(server: tuple[str, Any]) -> None:
    """The soak's rotation (streaming, n=2, json_schema, completions, two-turn chats, dropped
    streams, malformed bodies) against the server: every kind sent, every reply as it must be,
    the server healthy after."""
    from draftwise.bench.soak import KINDS, run_soak

    url, _ = server
    wait_idle(url)
    # every client sends every kind, however slow the machine (a count, not a time)
    result = run_soak(url, PROMPTS, seconds=4.0, clients=2, progress=False,
                      min_requests=len(KINDS))
    assert set(result.sent) == set(KINDS), result.sent
    assert sum(result.failed.values()) == 0, result.errors
    assert result.healthy_after
    wait_idle(url)
