"""The llama.cpp bench peers: the command and requests they make and how their answers are read,
skipped with a reason when they cannot run, checked for exactness against their own plain
decoding, and (where a native llama-server or node-llama-cpp is installed) run for real."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from draftwise.bench.llamacpp import (
    PeerUnavailable,
    completion_request,
    find_llama_server,
    parse_completion,
    server_command,
    start_peer,
)
from draftwise.bench.llamacpp_npm import start_npm_peer
from draftwise.bench.report import mark_exactness
from draftwise.bench.runner import build_runners


def test_a_missing_package_or_model_is_a_named_reason(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="GGUF"):
        start_peer(tmp_path / "model.safetensors")
    with pytest.raises(PeerUnavailable, match="npm install --prefix"):
        start_npm_peer(tmp_path / "model.gguf", folder=tmp_path / "empty")
    with pytest.raises(PeerUnavailable, match="no llama-server at"):
        find_llama_server(str(tmp_path / "nowhere" / "llama-server"))


def test_the_server_command_for_each_variant() -> None:
    binary, gguf, draft = Path("/x/llama-server"), Path("/m/t.gguf"), Path("/m/d.gguf")
    plain = server_command(binary, gguf, port=8123, threads=2, context=4096)
    assert plain[:3] == ["/x/llama-server", "-m", "/m/t.gguf"]
    flags = dict(zip(plain[3::2], plain[4::2], strict=False))
    assert flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert flags["-t"] == flags["-tb"] == "2" and flags["-c"] == "4096" and flags["-np"] == "1"
    assert "--spec-default" not in plain and "-md" not in plain
    spec = server_command(binary, gguf, port=1, threads=2, context=512, variant="spec")
    assert spec[-1] == "--spec-default"
    with_draft = server_command(binary, gguf, port=1, threads=2, context=512, variant="draft",
                                draft=draft)
    assert with_draft[with_draft.index("-md") + 1] == "/m/d.gguf"
    assert with_draft[with_draft.index("--spec-type") + 1] == "draft-simple"
    with pytest.raises(PeerUnavailable, match="--draft"):
        server_command(binary, gguf, port=1, threads=2, context=512, variant="draft")
    with pytest.raises(ValueError, match="variant"):
        server_command(binary, gguf, port=1, threads=2, context=512, variant="eagle")


def test_requests_are_greedy_on_token_ids_without_a_prompt_cache() -> None:
    body = completion_request([1, 2, 3], 64)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 64
    assert body["temperature"] == 0.0 and body["top_k"] == 1
    assert body["cache_prompt"] is False and body["return_tokens"] is True
    assert body["stream"] is False


def test_answers_are_cut_at_the_end_of_sequence_and_count_drafts() -> None:
    answer = {"content": "ignored", "tokens": [5, 6, 2, 7],
              "timings": {"prompt_ms": 12.5, "predicted_per_second": 20.0, "draft_n": 9,
                          "draft_n_accepted": 4}}
    record = parse_completion(answer, (2,), 0.75)
    assert record["tokens"] == [5, 6] and record["seconds"] == 0.75
    assert (record["validated"], record["refuted"]) == (4, 5)
    assert record["prefill_ms"] == 12.5 and record["decode_tok_s"] == 20.0
    plain = parse_completion({"tokens": [5, 6], "timings": {}}, (2,), 0.5)
    assert plain["tokens"] == [5, 6] and (plain["validated"], plain["refuted"]) == (0, 0)
    with pytest.raises(RuntimeError, match="error"):
        parse_completion({"error": {"code": 400, "message": "bad"}}, (2,), 0.1)


class _Stub:
    """Enough of a Generator for build_runners: a model source and ``with_method``."""

    def __init__(self, source: str) -> None:
        self.model = SimpleNamespace(source=source)
        self.engine = SimpleNamespace(drafter=None, suffix=None)

    def with_method(self, spec: str) -> _Stub:
        return self


def test_unavailable_peers_are_skipped_with_their_reason(tmp_path: Path) -> None:
    skipped: list[tuple[str, str]] = []
    runners = build_runners(_Stub(str(tmp_path / "folder-model")),
                            ["none", "llamacpp-spec", "llamacpp-lookup"], None,
                            skipped=lambda spec, why: skipped.append((spec, why)))
    assert list(runners) == ["none"]
    # a llama.cpp speculation brings its reference, llamacpp, along
    assert [spec for spec, _ in skipped] == ["llamacpp", "llamacpp-spec", "llamacpp-lookup"]
    assert all("GGUF" in why for _, why in skipped)


def _record(method: str, tokens: list[int], reference: str = "none") -> dict[str, Any]:
    return {"question_id": "q", "turn": 0, "method": method, "token_ids": tokens,
            "greedy": True, "reference": reference}


def test_a_peers_speculation_is_checked_against_its_own_plain_decoding() -> None:
    records = [
        _record("none", [1, 2, 3, 4]),
        _record("llamacpp", [1, 2, 9, 9]),
        _record("llamacpp-lookup", [1, 2, 9, 9], reference="llamacpp"),
        _record("pld", [1, 2, 3, 4]),
    ]
    mark_exactness(records)
    verdicts = {r["method"]: (r["identical"], r["first_divergence"]) for r in records}
    assert verdicts == {"none": (True, None), "llamacpp": (False, 2),
                        "llamacpp-lookup": (True, None), "pld": (True, None)}


_PROMPT = [1, 9690, 198, 4093, 198, 19161, 253, 1357, 314, 2, 198, 1, 520, 9531, 198]


def test_native_llama_server_plain_and_spec_agree_on_the_default_model() -> None:
    """Runs only where a native llama-server is found (docs/usage.md says how to build one)."""
    from draftwise.models import ModelNotFoundError, default_model_path

    try:
        gguf = default_model_path()
        if find_llama_server() is None:
            pytest.skip("no native llama-server here (see docs/usage.md)")
        plain_peer = start_peer(gguf, context=512, threads=2)
        spec_peer = start_peer(gguf, variant="spec", context=512, threads=2)
    except (PeerUnavailable, ModelNotFoundError) as error:
        pytest.skip(f"llama.cpp peer not available here: {error}")
    try:
        plain = plain_peer.generate(_PROMPT, 24, (2,))
        spec = spec_peer.generate(_PROMPT, 24, (2,))
        assert 0 < len(plain["tokens"]) <= 24 and plain["seconds"] > 0
        assert spec["tokens"] == plain["tokens"]
        assert "native" in plain_peer.label
    finally:
        plain_peer.close()
        spec_peer.close()


def test_llamacpp_plain_and_lookup_agree_on_the_default_model() -> None:
    """Runs only where node-llama-cpp is installed (see docs/usage.md)."""
    from draftwise.models import ModelNotFoundError, default_model_path

    try:
        gguf = default_model_path()
        peer = start_npm_peer(gguf, context=512, threads=2)
    except (PeerUnavailable, ModelNotFoundError) as error:
        pytest.skip(f"llama.cpp peer not available here: {error}")
    try:
        plain = peer.generate(_PROMPT, 24, (2,), lookup=False)
        lookup = peer.generate(_PROMPT, 24, (2,), lookup=True)
        assert 0 < len(plain["tokens"]) <= 24 and plain["seconds"] > 0
        assert lookup["tokens"] == plain["tokens"]
    finally:
        peer.close()
