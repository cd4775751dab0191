"""The llama.cpp bench peers: skipped with a reason when they cannot run, checked for exactness
against their own plain decoding, and (where node-llama-cpp is installed) run for real."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from draftwise.bench.llamacpp import PeerUnavailable, start_peer
from draftwise.bench.report import mark_exactness
from draftwise.bench.runner import build_runners


def test_a_missing_package_or_model_is_a_named_reason(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="GGUF"):
        start_peer(tmp_path / "model.safetensors", folder=tmp_path)
    with pytest.raises(PeerUnavailable, match="npm install --prefix"):
        start_peer(tmp_path / "model.gguf", folder=tmp_path / "empty")


class _Stub:
    """Enough of a Generator for build_runners: a model source and ``with_method``."""

    def __init__(self, source: str) -> None:
        self.model = SimpleNamespace(source=source)
        self.engine = SimpleNamespace(drafter=None)

    def with_method(self, spec: str) -> _Stub:
        return self


def test_unavailable_peers_are_skipped_with_their_reason(tmp_path: Path) -> None:
    skipped: list[tuple[str, str]] = []
    runners = build_runners(_Stub(str(tmp_path / "folder-model")), ["none", "llamacpp-lookup"],
                            None, skipped=lambda spec, why: skipped.append((spec, why)))
    assert list(runners) == ["none"]
    # llamacpp-lookup brings its reference, llamacpp, along; the peer fails to start once
    assert [spec for spec, _ in skipped] == ["llamacpp", "llamacpp-lookup"]
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


def test_llamacpp_plain_and_lookup_agree_on_the_default_model() -> None:
    """Runs only where node-llama-cpp is installed (see the README's Bench section)."""
    from draftwise.models import ModelNotFoundError, default_model_path

    try:
        gguf = default_model_path()
        peer = start_peer(gguf, context=512, threads=2)
    except (PeerUnavailable, ModelNotFoundError) as error:
        pytest.skip(f"llama.cpp peer not available here: {error}")
    try:
        prompt = [1, 9690, 198, 4093, 198, 19161, 253, 1357, 314, 2, 198, 1, 520, 9531, 198]
        plain = peer.generate(prompt, 24, (2,), lookup=False)
        lookup = peer.generate(prompt, 24, (2,), lookup=True)
        assert 0 < len(plain["tokens"]) <= 24 and plain["seconds"] > 0
        assert lookup["tokens"] == plain["tokens"]
    finally:
        peer.close()
