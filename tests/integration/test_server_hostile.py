"""Hostile input against ``draftwise serve`` on a tiny model (fast backend, no weights to load):
each case gets its 4xx with an OpenAI error body, and a normal request running beside them
completes with its usual answer. Every loop is bounded; nothing asserts a time."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import save_tiny_model_dir, serving

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "w3 w4 w5 w6 w3 w4 w5 w6 w3 w4"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    from draftwise.backends.registry import make_backend
    from draftwise.method import MethodBuilder
    from draftwise.models import load_model
    from draftwise.serve.app import create_app
    from draftwise.serve.policy import ClientPolicy

    folder = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-server"), seed=11)
    cache = tmp_path_factory.mktemp("cache")
    model = load_model(str(folder), progress=False)
    backend = make_backend(model, "fast", Path(cache), progress=False)
    methods = MethodBuilder(model, backend, budget=8, cache_dir=Path(cache))
    app = create_app(methods, "pld", max_batch=4, max_queue=8,
                     policy=ClientPolicy.of(["none", "pld", "composite", "medusa",
                                             "retrieval"], max_option=32),
                     api_keys=frozenset({KEY}), max_body=1 << 20)
    with serving(app) as url:
        yield url, app


def complete(url: str, **fields: Any) -> Any:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields}
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)


def error_of(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_keys_are_required_where_they_should_be(server: tuple[str, Any]) -> None:
    url, _ = server
    assert httpx.get(url + "/health").status_code == 200
    error_of(httpx.get(url + "/v1/models"), 401)
    error_of(httpx.get(url + "/metrics"), 401)
    error_of(httpx.post(url + "/v1/completions", json={"model": "default", "prompt": "w3"},
                        headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200


def test_bad_sampling_values_are_4xx_or_well_defined(server: tuple[str, Any]) -> None:
    url, _ = server
    greedy = complete(url).json()["choices"][0]["text"]
    tiny = complete(url, temperature=1e-310)  # too small to compute with: greedy
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy
    for seed in (-1, 2**64 - 1, -(2**63)):
        assert complete(url, temperature=1.0, seed=seed).status_code == 200
    assert "seed" in error_of(complete(url, seed=2**64), 400)["message"]
    assert complete(url, max_tokens=10**12).status_code == 200  # capped by the window


def test_methods_and_options_clients_may_not_choose(server: tuple[str, Any]) -> None:
    url, _ = server
    big = error_of(complete(url, draftwise={"method": "pld:max_ngram=2000"}), 400)
    assert "limit of 32" in big["message"] and big["param"] == "draftwise.method"
    messages = []
    for path in ("/etc/passwd", "/nonexistent/x"):
        messages.append(error_of(complete(url, draftwise={"method": f"medusa:heads={path}"}),
                                 400)["message"])
        messages.append(error_of(complete(url, draftwise={"method": f"retrieval:datastore="
                                                                      f"{path}"}), 400)["message"])
    assert messages[0] == messages[2] and messages[1] == messages[3]  # existence not told
    assert not any("passwd" in m or "nonexistent" in m for m in messages)
    assert "not offered" in error_of(complete(url, draftwise={"method": "aded"}), 400)["message"]
    assert "limit" in error_of(complete(url, draftwise={"budget": 100000}), 400)["message"]


def test_malformed_bodies_get_openai_errors(server: tuple[str, Any]) -> None:
    url, _ = server
    post = lambda body: httpx.post(  # noqa: E731
        url + "/v1/completions", content=body, headers={**AUTH, "content-type":
                                                        "application/json"})
    invalid = error_of(post(b'{"model": "default", "prompt": '), 400)
    assert invalid["param"] is None and "JSON" in invalid["message"]
    error_of(post(b"[" * 1500 + b"]" * 1500), 400)  # deeply nested
    deep = b'{"type": "object", "properties": {"a": ' * 1500 + b'{"type": "object"}' + b"}}" * 1500
    schema = b'{"type": "json_schema", "json_schema": {"name": "x", "schema": ' + deep + b"}}"
    error_of(post(b'{"model": "default", "prompt": "w3", "response_format": ' + schema + b"}"),
             400)
    error_of(post(b"x" * ((1 << 20) + 1)), 413)
    error_of(httpx.get(url + "/v1/nowhere", headers=AUTH), 404)
    window = server[1].state.server.backend.max_length
    long = error_of(complete(url, prompt=[3] * window), 400)
    assert long["param"] == "prompt" and long["code"] == "context_length_exceeded"


def test_a_deadline_ends_a_request(server: tuple[str, Any]) -> None:
    url, _ = server
    answer = complete(url, max_tokens=200, ignore_eos=True, draftwise={"deadline_s": 1e-6})
    assert answer.status_code == 200
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "length" and answer.json()["usage"]["completion_tokens"] < 200


def test_a_normal_request_keeps_its_answer_beside_hostile_ones(server: tuple[str, Any]) -> None:
    url, _ = server
    expected = complete(url, max_tokens=24).json()["choices"][0]["text"]
    hostile: list[dict[str, Any]] = [
        {"draftwise": {"method": "pld:max_ngram=2000"}},
        {"draftwise": {"method": "medusa:heads=/etc/passwd"}},
        {"seed": 2**70},
        {"temperature": 1e-310, "max_tokens": 64, "ignore_eos": True},
        {"max_tokens": 10**12, "ignore_eos": True, "draftwise": {"budget": "off"}},
        {"draftwise": {"method": "pld", "budget": 32}, "max_tokens": 64, "ignore_eos": True},
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        normal = pool.submit(complete, url, max_tokens=24)
        others = [pool.submit(complete, url, **fields) for fields in hostile]
        statuses = [f.result().status_code for f in others]
        assert normal.result().json()["choices"][0]["text"] == expected
    assert all(s < 500 for s in statuses), statuses
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_makes_health_503(tmp_path: Path) -> None:
    """A bug in the scheduler's own loop (not one request's) ends every request with the
    error and /health says so, so a supervisor can restart the process."""
    from draftwise.backends.fast import FastBackend
    from draftwise.engine import GenerationConfig
    from draftwise.method import MethodBuilder
    from draftwise.serve.scheduler import Event, Job
    from draftwise.serve.server import Server

    from ..conftest import tiny_hf_model

    class Model:
        name = source = "tiny"
        tokenizer = None
        eos_token_ids = ()

    backend = FastBackend(tiny_hf_model(seed=2))
    server = Server(MethodBuilder(Model(), backend, budget=4, cache_dir=tmp_path), "none",
                    max_batch=2, max_queue=2)
    scheduler = server.scheduler

    def broken() -> None:
        raise RuntimeError("a bug in the loop")

    scheduler._step = broken  # type: ignore[method-assign]
    events: list[Event] = []
    done = threading.Event()

    def emit(event: Event) -> None:
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    scheduler.submit(Job([1, 2, 3], GenerationConfig(max_new_tokens=4), "none", emit))
    scheduler.start()
    assert done.wait(60)
    scheduler._thread.join(timeout=60)  # (its exception is raised here, under this test)
    assert events[-1].finish_reason == "error" and "a bug in the loop" in str(events[-1].error)
    status, body = server.health()
    assert status == 503 and "a bug in the loop" in body["error"]


def test_the_hostile_bench_finds_no_failure(server: tuple[str, Any]) -> None:
    """``draftwise bench --hostile``'s cases against this server: every case answered as it
    must be, no 5xx, the normal client's answers unchanged."""
    from draftwise.bench.hostile import CASES, markdown, run_hostile

    url, _ = server
    result = run_hostile(url, [PROMPT, "w7 w8 w9 w7 w8"], "default", api_key=KEY,
                         max_tokens=12)
    assert set(result.outcomes) == set(CASES)
    assert result.failures == 0, markdown(result)
    assert result.normal_sent > 0


def test_schemas_waiting_to_compile_are_bounded_and_never_hold_up_others(
    server: tuple[str, Any]
) -> None:
    """Grammars compile one at a time on their own thread; with the compile queue full a new
    schema gets 429 at once, while a request without one is admitted as usual."""
    from draftwise.serve.server import COMPILES_WAITING

    url, app = server
    state = app.state.server
    state._compiling = COMPILES_WAITING + 1  # as if that many slow schemas were compiling
    try:
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"q": {"type": "integer"}}}}}
        refused = error_of(complete(url, response_format=schema), 429)
        assert refused["code"] == "compile_queue_full"
        assert complete(url).status_code == 200
    finally:
        state._compiling = 0


def test_a_prediction_is_drafted_from_and_counted(server: tuple[str, Any]) -> None:
    """OpenAI's ``prediction``: the same text with or without it; its tokens counted as
    accepted or rejected; a malformed one is a 400."""
    url, _ = server
    plain = complete(url, max_tokens=40, ignore_eos=True).json()
    text = plain["choices"][0]["text"]
    predicted = complete(url, max_tokens=40, ignore_eos=True,
                         prediction={"type": "content", "content": text}).json()
    assert predicted["choices"][0]["text"] == text
    details = predicted["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 20
    assert (details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"]
            == len(text.split()))  # (one word, one token)
    parts = complete(url, max_tokens=40, ignore_eos=True, prediction={
        "type": "content", "content": [{"type": "text", "text": text}]}).json()
    assert parts["choices"][0]["text"] == text
    assert "prediction" in error_of(complete(url, prediction={"type": "image"}), 400)["param"]
    assert plain["usage"]["completion_tokens_details"] == {}


def test_distinct_method_strings_grow_nothing_without_bound(server: tuple[str, Any]) -> None:
    """Per-slot engines, remembered method strings and metric labels stay bounded however many
    distinct method strings clients send."""
    from draftwise.serve.scheduler import CHECKED_METHODS, ENGINES_PER_SLOT

    url, app = server
    scheduler = app.state.server.scheduler
    for depth in range(1, 9):  # through the server: each builds an engine in some slot
        assert complete(url, max_tokens=2,
                        draftwise={"method": f"pld:depth={depth}"}).status_code == 200
    for n in range(CHECKED_METHODS + 40):
        scheduler.check_method(f"pld:max_ngram={1 + n % 32},depth={1 + n // 32}")
    assert len(scheduler._checked) == CHECKED_METHODS
    assert all(len(engines) <= ENGINES_PER_SLOT for engines in scheduler._engines.values())
    assert set(scheduler.methods) <= {"none", "pld", "composite", "medusa", "retrieval"}


def test_a_request_whose_delivery_fails_ends_alone(tmp_path: Path) -> None:
    """A failure delivering one request's tokens (its channel broken, its text undecodable)
    ends that request; the others in the same passes finish with their usual tokens."""
    from draftwise.backends.fast import FastBackend
    from draftwise.engine import GenerationConfig
    from draftwise.method import MethodBuilder
    from draftwise.serve.scheduler import Event, Job, Scheduler

    from ..conftest import tiny_hf_model

    class Words:
        def decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
            return " ".join(f"w{t}" for t in tokens)

    class Model:
        name = source = "tiny"
        tokenizer = Words()
        eos_token_ids = ()

    backend = FastBackend(tiny_hf_model(seed=2))
    methods = MethodBuilder(Model(), backend, budget=4, cache_dir=tmp_path)
    config = GenerationConfig(max_new_tokens=12)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]

    def run(broken: int | None) -> list[list[Event]]:
        events: list[list[Event]] = [[] for _ in prompts]

        def emitter(i: int) -> Any:
            def emit(event: Event) -> None:
                if i == broken:
                    raise ConnectionError("the client's channel is gone")
                events[i].append(event)
            return emit

        jobs = [Job(p, config, "pld", emitter(i)) for i, p in enumerate(prompts)]
        Scheduler(methods, max_batch=3).run_jobs(jobs)
        return events

    alone = run(None)
    with_broken = run(1)
    assert with_broken[1] == []
    for i in (0, 2):
        assert with_broken[i][-1].finish_reason == "length"
        assert ([t for e in with_broken[i] for t in e.tokens]
                == [t for e in alone[i] for t in e.tokens])
