import pytest
import torch

from draftwise.tree import DraftTree, TreeBuilder


def test_chain_views() -> None:
    tree = DraftTree.chain([5, 6, 7])
    assert tree.parents == (-1, 0, 1)
    assert tree.depths == [0, 1, 2]
    assert tree.path_to(2) == [0, 1, 2]
    assert tree.path_tokens(2) == [5, 6, 7]
    assert tree.leaves() == [2]


def test_ancestor_mask_of_branching_tree() -> None:
    #   root -> 0 -> 1
    #        -> 2 -> 3
    #             -> 4
    tree = DraftTree((10, 11, 12, 13, 14), (-1, 0, -1, 2, 2))
    mask = tree.ancestor_mask()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert tree.children(-1) == [0, 2]
    assert tree.children_map() == {-1: [0, 2], 0: [1], 2: [3, 4]}
    assert tree.depths == [0, 1, 0, 1, 1]


def test_bad_parents_rejected() -> None:
    with pytest.raises(ValueError, match="parents\\[1\\]"):
        DraftTree((1, 2), (-1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        DraftTree((1, 2), (-1,))


def test_from_paths_shares_prefixes_and_respects_budget() -> None:
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5]], budget=4)
    assert tree.tokens == (1, 2, 3, 4)
    assert tree.parents == (-1, 0, 1, 1)
    unlimited = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5]])
    assert len(unlimited) == 5


def test_builder_reports_how_much_of_a_path_fit() -> None:
    builder = TreeBuilder(budget=3)
    assert builder.add_path([1, 2]) == 2
    assert builder.add_path([1, 2, 9, 9]) == 3
    assert builder.add_path([7]) == 0
    assert builder.full


def test_truncated_keeps_shallow_nodes_and_probs() -> None:
    probs = torch.eye(5)
    tree = DraftTree((10, 11, 12, 13, 14), (-1, 0, -1, 2, 3), probs)
    cut = tree.truncated(2)
    assert cut.tokens == (10, 11, 12, 13)
    assert cut.parents == (-1, 0, -1, 2)
    assert cut.draft_probs is not None and torch.equal(cut.draft_probs, probs[:4])
    assert len(tree.truncated(0)) == 0
