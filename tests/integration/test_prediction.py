"""Predicted outputs, proven in float64: whatever the prediction — right, wrong, empty, longer
than the output, shifted by an insertion or a deletion — greedy output equals plain greedy,
and a prediction that matches is accepted many tokens per step."""

from __future__ import annotations

import pytest

from draftwise.backends.reference import ReferenceBackend, ReferenceModel
from draftwise.drafters import create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.prediction import Prediction
from draftwise.sampling import SamplingConfig

PROMPT = [5, 9, 2, 30, 11, 5, 9, 2, 14, 22, 5, 9]
NEW = 64


@pytest.fixture(scope="module")
def answer(reference_model: ReferenceModel) -> list[int]:
    run = Engine(ReferenceBackend(reference_model), create_drafter("none")).generate(
        PROMPT, GenerationConfig(max_new_tokens=NEW))
    return list(run.tokens)


def predictions(answer: list[int]) -> dict[str, list[int]]:
    inserted = answer[:20] + [3, 3, 3, 3, 3, 3] + answer[20:]
    deleted = answer[:20] + answer[28:]
    return {"right": answer, "wrong": [(t + 1) % 32 for t in answer], "empty": [],
            "longer": answer + answer[:30], "inserted": inserted, "deleted": deleted}


@pytest.mark.parametrize("method", ["none", "pld", "recycling", "composite"])
@pytest.mark.parametrize("kind", ["right", "wrong", "empty", "longer", "inserted", "deleted"])
def test_any_prediction_leaves_greedy_output_unchanged(
    reference_model: ReferenceModel, answer: list[int], method: str, kind: str
) -> None:
    tokens = predictions(answer)[kind]
    prediction = Prediction(tokens)
    run = Engine(ReferenceBackend(reference_model), create_drafter(method)).generate(
        PROMPT, GenerationConfig(max_new_tokens=NEW), prediction=prediction)
    assert run.tokens == answer
    assert run.stats.accepted_prediction_tokens == prediction.accepted
    assert prediction.accepted + prediction.rejected == len(tokens)
    if kind in ("right", "longer"):
        assert prediction.accepted == NEW - run.stats.steps  # every step but its last token
        assert run.stats.mat > 4
    elif kind in ("inserted", "deleted"):  # re-anchored after the edit
        assert prediction.accepted >= NEW // 2
    elif kind == "wrong":
        assert prediction.accepted <= 4


def test_sampled_output_with_a_prediction_follows_the_seed(
    reference_model: ReferenceModel, answer: list[int]
) -> None:
    """Sampling with a prediction: its drafts carry no probabilities, so the verifier draws
    from the target and descends on a match (the rule tests/integration/
    test_sampling_distribution.py checks); a seed makes the run reproducible."""
    config = GenerationConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=0.8),
                              seed=3)
    engine = Engine(ReferenceBackend(reference_model), create_drafter("none"))
    first = engine.generate(PROMPT, config, prediction=Prediction(answer)).tokens
    again = Engine(ReferenceBackend(reference_model), create_drafter("none")).generate(
        PROMPT, config, prediction=Prediction(answer)).tokens
    assert first == again and len(first) == 24


def test_the_cursor_rejoins_after_an_insertion_and_skips_after_a_deletion() -> None:
    predicted = list(range(100, 140))
    p = Prediction(predicted, anchors=(3,))
    assert p.propose([], 4) == [100, 101, 102, 103]
    assert p.propose([100, 101], 3) == [102, 103, 104]
    out = [100, 101, 102, 7, 8]  # an insertion: lost
    assert p.propose(out, 3) == []
    out += [103, 104, 105]  # rejoins where it left
    assert p.propose(out, 3) == [106, 107, 108]
    out += [120, 121, 122]  # a deletion: skips ahead
    assert p.propose(out, 2) == [123, 124]
    with pytest.raises(ValueError, match="anchor"):
        Prediction([1, 2], anchors=(0,))


@pytest.mark.parametrize("kind", ["right", "wrong", "inserted"])
def test_a_sized_method_sizes_the_prediction_by_this_requests_record(
    reference_model: ReferenceModel, answer: list[int], kind: str
) -> None:
    """With an automatic sizer, a right prediction is soon verified many tokens deep (its
    request's record says it is reliable; the method's buckets know nothing of it) and a wrong
    one is soon cut short; the output is plain greedy's either way."""
    from draftwise.sizing import CostCurve, SizingConfig, TreeSizer

    curve = CostCurve({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 16: 2.0, 64: 5.0})
    prediction = Prediction(predictions(answer)[kind])
    run = Engine(ReferenceBackend(reference_model), create_drafter("pld"),
                 TreeSizer(SizingConfig(), curve)).generate(
        PROMPT, GenerationConfig(max_new_tokens=NEW), prediction=prediction)
    assert run.tokens == answer
    if kind == "right":
        assert run.stats.mat > 8 and prediction.accepted >= NEW - run.stats.steps
    elif kind == "wrong":
        assert run.stats.mean_tree_size < 4  # not verifying a prediction that keeps failing
    else:
        assert prediction.accepted >= NEW // 2
