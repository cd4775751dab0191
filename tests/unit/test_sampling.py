import pytest
import torch

from draftwise.sampling import Sampling, SamplingConfig


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert Sampling(SamplingConfig()).greedy(logits).tolist() == [1, 0]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    sampling = Sampling(SamplingConfig(repetition_penalty=1.5))
    assert sampling.greedy(logits, seen).tolist() == [1]  # 2.0 / 1.5 < 1.9
    penalized = sampling.penalize(torch.tensor([[-1.0, 1.0]]), torch.tensor([[True, True]]))
    assert torch.allclose(penalized, torch.tensor([[-1.5, 1.0 / 1.5]]))


def test_temperature_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    probs = Sampling(SamplingConfig(temperature=2.0)).probs(logits)
    expected = torch.softmax(logits.double() / 2.0, dim=-1)
    assert torch.allclose(probs, expected)


def test_top_k_top_p_min_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = Sampling(SamplingConfig(temperature=1.0, top_k=2)).probs(logits)
    assert torch.allclose(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    top_p = Sampling(SamplingConfig(temperature=1.0, top_p=0.8)).probs(logits)
    assert torch.allclose(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    top_p_more = Sampling(SamplingConfig(temperature=1.0, top_p=0.81)).probs(logits)
    assert (top_p_more[0] > 0).tolist() == [True, True, True, False]
    min_p = Sampling(SamplingConfig(temperature=1.0, min_p=0.25)).probs(logits)
    assert (min_p[0] > 0).tolist() == [True, True, True, False]


def test_typical_keeps_tokens_near_entropy() -> None:
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    out = Sampling(SamplingConfig(temperature=1.0, typical_p=0.2)).probs(torch.log(probs))
    # entropy ~0.94 nats; surprisal 0.36 (token 0) vs 2.30 (others): token 0 is most typical
    assert out[0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("min_p", 1.0),
     ("typical_p", 1.5), ("repetition_penalty", 0.0)],
)
def test_invalid_values_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_probs_refuses_greedy() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Sampling(SamplingConfig()).probs(torch.zeros(1, 3))


@pytest.mark.parametrize(("rows", "vocab", "k"), [(1, 1000, 4), (3, 49152, 8), (5, 151936, 4),
                                                  (2, 50000, 8), (4, 4096, 16), (2, 8192, 1)])
def test_top_k_rows_is_torchs_top_k(rows: int, vocab: int, k: int) -> None:
    """The two-stage search (block maxima, then the chosen blocks) finds what torch.topk finds:
    values and, without ties (random float32 logits), indices."""
    from draftwise.sampling import top_k_rows

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab + k))
    logits[0, -1] = 100.0  # the largest entry in the last block
    values, indices = top_k_rows(logits, k)
    expected = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
