"""Verifier cases on hand-made logits: accepted, recovered and bonus tokens."""

import pytest
import torch

from draftwise.sampling import Sampling, SamplingConfig
from draftwise.tree import DraftTree
from draftwise.verify import verify

GREEDY = Sampling(SamplingConfig())


def one_hot_logits(argmaxes: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(argmaxes), vocab)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


def test_greedy_full_chain_gets_bonus() -> None:
    tree = DraftTree.chain([3, 4])
    result = verify(tree, one_hot_logits([3, 4, 6]), GREEDY)
    assert result.path == (0, 1)
    assert result.tokens == (3, 4, 6)
    assert result.bonus


def test_greedy_rejection_recovers_target_token() -> None:
    tree = DraftTree.chain([3, 5])
    result = verify(tree, one_hot_logits([3, 4, 6]), GREEDY)
    assert result.path == (0,)
    assert result.tokens == (3, 4)
    assert not result.bonus


def test_greedy_descends_into_later_sibling() -> None:
    # root children: node0 (token 2), node1 (token 3); node1 -> node2 (token 7)
    tree = DraftTree((2, 3, 7), (-1, -1, 1))
    result = verify(tree, one_hot_logits([3, 0, 7, 1]), GREEDY)
    assert result.path == (1, 2)
    assert result.tokens == (3, 7, 1)


def test_empty_tree_is_plain_decoding() -> None:
    result = verify(DraftTree.empty(), one_hot_logits([5]), GREEDY)
    assert result.tokens == (5,) and result.path == () and result.bonus


def test_greedy_margins_reported_per_emitted_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.0, 0.0, 4.0]])
    result = verify(DraftTree.chain([1]), logits, GREEDY)
    assert result.tokens == (1, 2)
    assert result.margins == pytest.approx((0.5, 4.0))


def test_greedy_reports_every_rows_argmax_for_the_drafters() -> None:
    """Drafters that learn the target's greedy predictions (lookahead) read them from the
    acceptance instead of another pass over the rows: every row's, rejected branches too; none
    where a repetition penalty made the targets differ from the argmax."""
    tree = DraftTree((2, 3, 7), (-1, -1, 1))
    result = verify(tree, one_hot_logits([3, 6, 7, 1]), GREEDY)
    assert result.argmax == (3, 6, 7, 1)
    penalized = Sampling(SamplingConfig(repetition_penalty=2.0))
    seen = torch.zeros(8, dtype=torch.bool)
    assert verify(tree, one_hot_logits([3, 6, 7, 1]), penalized, committed_seen=seen).argmax == ()


def test_repetition_penalty_sees_the_nodes_own_path() -> None:
    # After node 0 (token 1) the raw argmax is token 1 again; the penalty must see node 0's
    # token in that row's context even though it is not committed yet.
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 1.5]])
    sampling = Sampling(SamplingConfig(repetition_penalty=2.0))
    committed = torch.zeros(3, dtype=torch.bool)
    result = verify(DraftTree.chain([1]), logits, sampling, committed_seen=committed)
    assert result.tokens == (1, 2)


def test_logits_rows_must_match_tree() -> None:
    with pytest.raises(ValueError, match="rows"):
        verify(DraftTree.chain([1, 2]), torch.zeros(2, 4), GREEDY)


def test_sampling_with_point_mass_target_is_deterministic() -> None:
    sampling = Sampling(SamplingConfig(temperature=1.0))
    logits = torch.full((3, 6), -1e9)
    logits[0, 4] = 0.0
    logits[1, 2] = 0.0
    logits[2, 1] = 0.0
    rng = torch.Generator().manual_seed(0)
    result = verify(DraftTree((4, 2), (-1, 0)), logits, sampling, rng)
    assert result.tokens == (4, 2, 1)


def test_rejection_rule_refuses_zero_draft_probability() -> None:
    sampling = Sampling(SamplingConfig(temperature=1.0))
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    tree = DraftTree.chain([1], draft_probs=probs)
    with pytest.raises(ValueError, match="probability 0"):
        verify(tree, torch.zeros(2, 3), sampling, torch.Generator().manual_seed(0))
