"""What an automatically sized method learned carries over to the next process's engine for
the same method, model, backend and machine, and to no other method."""

from __future__ import annotations

from pathlib import Path

import torch

from draftwise.backends.fast import FastBackend
from draftwise.engine import GenerationConfig
from draftwise.method import MethodBuilder
from draftwise.sizing import CostCurve

from ..conftest import tiny_hf_model


class _Model:
    name = source = "tiny-learned"
    tokenizer = None
    eos_token_ids = ()
    dtype = torch.float64


def _builder(backend: FastBackend, cache: Path, remember: bool = True) -> MethodBuilder:
    return MethodBuilder(_Model(), backend, cache_dir=cache, cost=CostCurve({1: 1.0, 64: 1.5}),
                         remember=remember)


def test_a_second_process_starts_from_what_the_first_learned(tmp_path: Path) -> None:
    backend = FastBackend(tiny_hf_model(seed=3))
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]  # something for prompt lookup to copy
    first = _builder(backend, tmp_path).engine("pld")
    assert first.sizer is not None and first.sizer.snapshot()["buckets"] == []
    run = first.generate(prompt, GenerationConfig(max_new_tokens=24))
    learned = first.sizer.snapshot()
    assert run.stats.steps > 0 and learned["buckets"]  # it verified drafts and learned

    again = _builder(backend, tmp_path).engine("pld")  # a new builder: as a new process would
    assert again.sizer is not None
    assert again.sizer.snapshot() == learned  # (few observations: nothing to scale down)
    assert again.sizer.drafting_rate() == first.sizer.drafting_rate()

    other = _builder(backend, tmp_path).engine("recycling")  # another method learns alone
    assert other.sizer is not None and other.sizer.snapshot()["buckets"] == []
    cold = _builder(backend, tmp_path, remember=False).engine("pld")
    assert cold.sizer is not None and cold.sizer.snapshot()["buckets"] == []


def test_an_unreadable_kept_state_starts_cold(tmp_path: Path) -> None:
    backend = FastBackend(tiny_hf_model(seed=3))
    first = _builder(backend, tmp_path).engine("pld")
    first.generate([5, 6, 7, 5, 6, 7, 5, 6], GenerationConfig(max_new_tokens=8))
    (kept,) = (tmp_path / "sizers").iterdir()
    kept.write_text("{not json")
    again = _builder(backend, tmp_path).engine("pld")
    assert again.sizer is not None and again.sizer.snapshot()["buckets"] == []
