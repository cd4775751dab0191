"""Draft heads (medusa, hydra) on a tiny float64 model: training, files, exactness."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from draftwise.backends.fast import FastBackend
from draftwise.drafters import create_drafter
from draftwise.drafters.heads import DraftHeads, HeadsMismatchError
from draftwise.engine import Engine, GenerationConfig
from draftwise.heads_train import TrainConfig, train_heads
from draftwise.sampling import SamplingConfig

from ..conftest import tiny_hf_model
from .test_sampling_distribution import assert_matches


class WordTokenizer:
    """Enough of a tokenizer for training: 'w12 w5 ...' -> ids, no chat template."""

    chat_template = None

    def __call__(self, text: str) -> Any:
        class Encoded:
            input_ids = [int(w[1:]) for w in text.split()]

        return Encoded()


def corpus_file(path: Path, vocab: int, seed: int) -> Path:
    """Text the tiny model continues predictably: repeated random phrases."""
    rng = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(2, vocab, (6,), generator=rng).tolist() for _ in range(12)]
    lines = []
    for _ in range(40):
        picks = torch.randint(0, len(phrases), (12,), generator=rng).tolist()
        lines.append(" ".join(f"w{t}" for p in picks for t in phrases[p]))
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, FastBackend]:
    model = tiny_hf_model("llama", "sdpa", vocab=48, seed=3)
    model.name = "tiny"  # type: ignore[attr-defined]
    return model, FastBackend(model)


@pytest.fixture(scope="module")
def trained(tiny: tuple[Any, FastBackend], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Path, dict[str, Any]]]:
    model, backend = tiny
    folder = tmp_path_factory.mktemp("heads")
    data = corpus_file(folder / "corpus.txt", 48, seed=1)
    out = {}
    for kind in ("medusa", "hydra"):
        config = TrainConfig(kind=kind, heads=3, vocab=32, chunk=64, epochs=8, lr=1e-2,
                             batch=128, held_out=0.2, seed=0)
        path = folder / f"{kind}.safetensors"
        result = train_heads(backend, WordTokenizer(), "tiny", str(data), path, config,
                             folder / "cache", progress=False)
        out[kind] = (path, result)
    return out


def test_training_lowers_held_out_loss_and_raises_acceptance(
    trained: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    for kind, (_, result) in trained.items():
        first, last = result["history"][0], result["history"][-1]
        assert sum(last["held_out_loss"]) < sum(first["held_out_loss"]), kind
        assert last["top1"][0] > first["top1"][0], kind
        assert last["chained"][1] <= last["top1"][0]  # chained rates can only fall


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_head_drafted_trees_give_plain_greedy_output(
    tiny: tuple[Any, FastBackend], trained: dict[str, tuple[Path, dict[str, Any]]], kind: str
) -> None:
    model, backend = tiny
    config = GenerationConfig(max_new_tokens=40)
    drafter = create_drafter(f"{kind}:heads={trained[kind][0]},top_k=3,depth=3")
    drafter.attach(model, backend)  # type: ignore[attr-defined]
    accepted = 0
    for prompt in ([5, 9, 12, 30, 7], [40, 2, 2, 17], [3]):
        plain = Engine(backend, create_drafter("none")).generate(prompt, config).tokens
        run = Engine(backend, drafter).generate(prompt, config)
        assert run.tokens == plain, (kind, prompt)
        assert max(run.stats.tree_sizes) > 0  # the heads drafted
        accepted += run.stats.new_tokens - run.stats.steps
    assert accepted > 0  # and some drafts were accepted: the tree path was exercised


def test_sampling_with_heads_follows_the_target(
    tiny: tuple[Any, FastBackend], trained: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    """The first two sampled tokens, over many seeds, against their exact probabilities."""
    model, backend = tiny
    prompt = [5, 9, 12, 30, 7]
    sampling = SamplingConfig(temperature=1.5)
    from draftwise.sampling import Sampling

    with torch.inference_mode():
        backend.prefill(prompt)
        first = Sampling(sampling).probs(backend.forward_tree(_empty())[0:1])[0]
        expected: dict[tuple[int, ...], float] = {}
        for a in range(backend.vocab_size):
            backend.prefill([*prompt, a])
            second = Sampling(sampling).probs(backend.forward_tree(_empty())[0:1])[0]
            for b in range(backend.vocab_size):
                if float(first[a] * second[b]) > 0:
                    expected[(a, b)] = float(first[a] * second[b])
    drafter = create_drafter(f"hydra:heads={trained['hydra'][0]}")
    drafter.attach(model, backend)  # type: ignore[attr-defined]
    engine = Engine(backend, drafter)
    n = 1500
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(n):
        run = engine.generate(prompt, GenerationConfig(max_new_tokens=2, sampling=sampling,
                                                       seed=seed))
        counts[tuple(run.tokens[:2])] += 1
    # cells: pairs with probability above 1%, the rest pooled (n is small for 2304 cells)
    big = {k: v for k, v in expected.items() if v > 0.01}
    pooled = Counter({(k if k in big else ("rest",)): c for k, c in counts.items()})
    merged: Counter[tuple[Any, ...]] = Counter()
    for k, c in counts.items():
        merged[k if k in big else ("rest",)] += c
    assert_matches(merged, {**big, ("rest",): 1.0 - sum(big.values())}, n)
    assert pooled  # (kept for the message on failure)


def test_head_files_round_trip_and_refuse_another_model(
    tiny: tuple[Any, FastBackend], trained: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path: Path
) -> None:
    model, backend = tiny
    path = trained["hydra"][0]
    heads = DraftHeads.load(path)
    copy = tmp_path / "copy.safetensors"
    heads.save(copy)
    again = DraftHeads.load(copy)
    assert torch.equal(again.vocab, heads.vocab) and again.kind == "hydra"
    for a, b in zip(heads.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    other = tiny_hf_model("llama", "sdpa", vocab=48, seed=11)  # same shapes, other weights
    with pytest.raises(HeadsMismatchError, match="trained for tiny"):
        create_drafter(f"hydra:heads={path}").attach(other, FastBackend(other))  # type: ignore[attr-defined]
    wider = tiny_hf_model("llama", "sdpa", vocab=64, seed=3)
    with pytest.raises(HeadsMismatchError, match="vocabulary of 48"):
        create_drafter(f"hydra:heads={path}").attach(wider, FastBackend(wider))  # type: ignore[attr-defined]
    with pytest.raises(HeadsMismatchError, match="medusa"):
        create_drafter(f"hydra:heads={trained['medusa'][0]}").attach(model, backend)  # type: ignore[attr-defined]


def _empty() -> Any:
    from draftwise.tree import DraftTree

    return DraftTree.empty()
