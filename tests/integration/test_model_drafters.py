"""Model drafters (a draft model, self-speculation): exact in float64, exact in distribution."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from draftwise.backends.fast import FastBackend
from draftwise.backends.hf import HFBackend
from draftwise.drafters import create_drafter
from draftwise.drafters.draft_model import DraftMismatchError
from draftwise.engine import Engine, GenerationConfig
from draftwise.models import load_model
from draftwise.sampling import Sampling, SamplingConfig

from ..conftest import save_tiny_model_dir
from .test_sampling_distribution import assert_matches

PROMPTS = [[5, 9, 2, 30, 11, 5, 9, 2, 14], [7, 7, 7, 7], [3]]
NEW = 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    return {
        "target": save_tiny_model_dir(root / "target", seed=1, layers=6),
        "other": save_tiny_model_dir(root / "other", seed=2),
        "foreign": save_tiny_model_dir(root / "foreign", seed=3, words=48),
    }


def target(folder: Path):
    loaded = load_model(str(folder), progress=False)
    loaded.model = loaded.model.to(torch.float64)
    return loaded


def plain(loaded, prompt: list[int], config: GenerationConfig) -> list[int]:
    return Engine(HFBackend(loaded.model), create_drafter("none")).generate(prompt, config).tokens


def drafter_for(spec: str, loaded, backend):
    drafter = create_drafter(spec)
    drafter.attach(loaded, backend)
    return drafter


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_draft_equal_to_target_accepts_everything(folders: dict[str, Path], depth: int) -> None:
    loaded = target(folders["target"])
    backend = HFBackend(loaded.model)
    spec = f"draft:model={folders['target']},dtype=float64,backend=hf,depth={depth}"
    run = Engine(backend, drafter_for(spec, loaded, backend)).generate(
        PROMPTS[0], GenerationConfig(max_new_tokens=(depth + 1) * 6)
    )
    assert run.tokens == plain(loaded, PROMPTS[0], GenerationConfig(max_new_tokens=(depth + 1) * 6))
    assert run.stats.mat == depth + 1
    assert run.stats.histogram == {depth + 1: 6}


@pytest.mark.parametrize(
    "options",
    ["depth=4", "depth=3,width=2", "depth=6,stop_threshold=0.5", "depth=4,backend=fast",
     "depth=2,width=3,backend=fast"],
)
@pytest.mark.parametrize("target_backend", ["hf", "fast"])
def test_draft_model_greedy_equals_plain(
    folders: dict[str, Path], options: str, target_backend: str
) -> None:
    loaded = target(folders["target"])
    backend = HFBackend(loaded.model) if target_backend == "hf" else FastBackend(loaded.model)
    engine = Engine(backend, drafter_for(f"draft:model={folders['other']},{options}", loaded,
                                         backend))
    for prompt in PROMPTS:
        config = GenerationConfig(max_new_tokens=NEW)
        assert engine.generate(prompt, config).tokens == plain(loaded, prompt, config), prompt


@pytest.mark.parametrize("options", ["", "skip=2+3", "width=2,depth=3", "stop_threshold=0.6"])
def test_self_speculation_greedy_equals_plain(folders: dict[str, Path], options: str) -> None:
    loaded = target(folders["target"])
    backend = FastBackend(loaded.model)
    drafter = drafter_for(f"self:trial_steps=3,{options}".rstrip(","), loaded, backend)
    engine = Engine(backend, drafter)
    for prompt in PROMPTS:
        config = GenerationConfig(max_new_tokens=NEW)
        assert engine.generate(prompt, config).tokens == plain(loaded, prompt, config), prompt
    assert drafter.chosen is not None  # the search finished and kept one skipped set
    assert drafter.chosen in drafter.candidates


def test_vocabulary_mismatch_is_a_named_error(folders: dict[str, Path]) -> None:
    loaded = target(folders["target"])
    with pytest.raises(DraftMismatchError, match="do not share a vocabulary"):
        drafter_for(f"draft:model={folders['foreign']}", loaded, HFBackend(loaded.model))
    with pytest.raises(ValueError, match="--draft MODEL"):
        create_drafter("draft")


@pytest.mark.parametrize(
    ("draft", "options", "accepted_share"),
    [("other", "depth=3", 0.02), ("other", "depth=2,width=3", 0.02),
     ("target", "depth=3", 0.5), ("target", "depth=2,width=3", 0.5)],
)
def test_draft_model_sampling_follows_the_target_distribution(
    folders: dict[str, Path], draft: str, options: str, accepted_share: float
) -> None:
    """Chains carry draft probabilities (rejection rule); trees are Gumbel-top-k draws without
    replacement (residual rule for siblings without replacement). A foreign draft exercises
    rejections and residuals; the target's own weights (float32) exercise acceptances."""
    loaded = target(folders["target"])
    backend = HFBackend(loaded.model)
    sampling_config = SamplingConfig(temperature=1.5)
    sampling = Sampling(sampling_config)
    prompt = [4, 9, 4, 9]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    p1 = sampling.probs(logits[None])[0]
    second = torch.zeros_like(p1)
    with torch.inference_mode():
        for a in range(len(p1)):
            after = loaded.model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1]
            second += p1[a] * sampling.probs(after[None])[0]
    engine = Engine(backend, drafter_for(f"draft:model={folders[draft]},{options}", loaded,
                                         backend))
    n = 3000
    first_counts: Counter = Counter()
    second_counts: Counter = Counter()
    accepted = 0
    for seed in range(n):
        run = engine.generate(
            prompt, GenerationConfig(max_new_tokens=2, sampling=sampling_config, seed=seed)
        )
        first_counts[run.tokens[0]] += 1
        second_counts[run.tokens[1]] += 1
        accepted += run.stats.steps == 1
    assert accepted > n * accepted_share  # the first draft token was accepted that often
    assert_matches(first_counts, {a: float(p) for a, p in enumerate(p1)}, n)
    assert_matches(second_counts, {b: float(p) for b, p in enumerate(second)}, n)
