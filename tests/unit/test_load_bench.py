"""The load bench's bookkeeping (``draftwise bench --serve/--spawn``), without a server."""

from __future__ import annotations

import pytest

from draftwise.bench import load


def _fake_levels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    calls: list[tuple[int, str]] = []

    def run_level(url: str, model: str, prompts: list[str], method: str, clients: int,
                  max_tokens: int) -> load.LoadResult:
        calls.append((clients, method))
        seconds = float(len(calls))  # each level takes longer than the one before
        records = [load.RequestRecord(p, 10, 0.1, 1.0, f"{p}!") for p in prompts]
        return load.LoadResult(method, clients, seconds, records)

    monkeypatch.setattr(load, "run_level", run_level)
    monkeypatch.setattr(load, "_model_id", lambda url: "m")
    monkeypatch.setattr(load, "request", lambda *args, **kwargs: None)
    return calls


def test_rounds_alternate_the_order_of_levels_and_merge_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_levels(monkeypatch)
    results = load.run_load("http://x", ["a", "b"], ["none", "pld"], [1, 4], 16,
                            progress=False, rounds=2)
    levels = [(1, "none"), (1, "pld"), (4, "none"), (4, "pld")]
    assert calls == levels + levels[::-1]
    assert [(r.clients, r.method) for r in results] == levels
    # level k ran at call k + 1 and at call 8 - k: a steady drift weighs on each alike
    assert [r.wall_s for r in results] == [9.0, 9.0, 9.0, 9.0]
    assert all(len(r.records) == 4 for r in results)
    rows = load.summarize(results)
    assert all(row["identical"] == 1.0 and row["failed"] == 0 for row in rows)


def test_one_round_is_the_levels_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_levels(monkeypatch)
    results = load.run_load("http://x", ["a"], ["none"], [1, 2, 8], 16, progress=False)
    assert calls == [(1, "none"), (2, "none"), (8, "none")]
    assert [r.wall_s for r in results] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="rounds"):
        load.run_load("http://x", ["a"], ["none"], [1], 16, progress=False, rounds=0)


def test_every_request_prefills_its_whole_prompt_on_either_server() -> None:
    """llama-server reads a top-level ``cache_prompt``, draftwise serve its own field: without
    the first, llama-server reused a cached prefix and its first token looked faster."""
    body = load.request_body("m", "hello", "pld", 16)
    assert body["cache_prompt"] is False
    assert body["draftwise"] == {"method": "pld", "cache_prompt": False}
    assert body["temperature"] == 0 and body["stream"] is True


def test_the_url_a_server_prints_names_the_same_server() -> None:
    assert load.server_root("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert load.server_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert load.server_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_an_address_that_is_not_an_openai_server_is_named() -> None:
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such page")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ValueError, match="HTTP 404 without a model list"):
            load.run_load(url + "/v1", ["a"], ["none"], [1], 16, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConnectionError, match="no server answers"):
        load.run_load(url, ["a"], ["none"], [1], 16, progress=False)


def test_every_client_asks_every_question_from_its_own_place() -> None:
    prompts = [f"q{i}" for i in range(14)]
    orders = load.client_orders(prompts, 8)
    assert len(orders) == 8
    assert all(sorted(order) == sorted(prompts) for order in orders)
    # at each turn k the clients ask different questions (8 <= 14)
    for k in range(14):
        assert len({order[k] for order in orders}) == 8
    assert load.client_orders(prompts, 1) == [prompts]
    # more clients than questions: every question is still someone's first
    firsts = {order[0] for order in load.client_orders(["a", "b"], 3)}
    assert firsts == {"a", "b"}


def test_a_soak_counts_what_fails() -> None:
    """Against a port nothing listens on, every request fails and is counted by kind."""
    import socket

    from draftwise.bench.soak import run_soak

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    result = run_soak(f"http://127.0.0.1:{port}", ["hi"], seconds=0.3, clients=2,
                      progress=False, timeout=2.0)
    assert sum(result.sent.values()) > 0
    assert result.failed == result.sent
    assert result.errors and not result.healthy_after


def test_a_spawned_server_that_ignores_sigterm_is_killed() -> None:
    """stop_server: SIGTERM, then SIGKILL after the timeout (a server stuck in shutdown must
    not outlive the bench holding its port and the cores)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('ready', flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    load.stop_server(process, timeout_s=0.5)
    assert process.returncode is not None and process.returncode < 0  # killed by a signal
