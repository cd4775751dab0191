"""Prompt lookup on hand-written token arrays."""

import pytest

from draftwise.drafters import UnknownMethodError, available_methods, create_drafter
from draftwise.drafters.ngram import PromptLookupConfig, PromptLookupDrafter


def drafter(**kwargs: int) -> PromptLookupDrafter:
    return PromptLookupDrafter(PromptLookupConfig(**kwargs))


def test_longest_match_continuation() -> None:
    d = drafter(max_ngram=3, min_ngram=1, depth=3, budget=3, max_matches=1)
    context = [1, 2, 3, 4, 5, 9, 2, 3]
    d.begin(context)
    tree = d.propose(context, max_depth=8)
    assert tree.tokens == (4, 5, 9)
    assert tree.parents == (-1, 0, 1)


def test_several_matches_merge_into_a_tree_most_recent_first() -> None:
    d = drafter(max_ngram=1, min_ngram=1, depth=2, budget=8, max_matches=4)
    context = [7, 1, 2, 7, 1, 3, 7]
    d.begin(context)
    tree = d.propose(context, max_depth=8)
    # matches of [7] end at 4 (-> 1 3) and 1 (-> 1 2): shared prefix "1" stored once
    assert tree.tokens == (1, 3, 2)
    assert tree.parents == (-1, 0, 0)


def test_no_match_gives_empty_tree() -> None:
    d = drafter()
    d.begin([1, 2, 3])
    assert len(d.propose([1, 2, 3], max_depth=8)) == 0


def test_budget_and_depth_are_respected() -> None:
    d = drafter(max_ngram=2, min_ngram=1, depth=10, budget=4)
    context = list(range(10)) + [0, 1]
    d.begin(context)
    tree = d.propose(context, max_depth=3)
    assert tree.tokens == (2, 3, 4)
    tree = d.propose(context, max_depth=10)
    assert len(tree) == 4


def test_index_follows_the_growing_context() -> None:
    d = drafter(max_ngram=2, min_ngram=2, depth=2, budget=4, max_matches=1)
    d.begin([5, 6, 8])
    assert len(d.propose([5, 6, 8], 8)) == 0
    tree = d.propose([5, 6, 8, 1, 5, 6], 8)  # new output appended: [5 6] now matches
    assert tree.tokens == (8, 1)
    tree = d.propose([4, 4, 4], 8)  # a new request: the index starts over
    assert tree.tokens == (4,)


def test_registry_builds_configured_drafters() -> None:
    assert {"none", "pld"} <= set(available_methods())
    d = create_drafter("pld:budget=16,max_ngram=4")
    assert isinstance(d, PromptLookupDrafter)
    assert d.config.budget == 16 and d.config.max_ngram == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nope", "unknown method 'nope'"), ("pld:bogus=1", "no option 'bogus'"),
     ("pld:budget=x", "cannot read 'x'"), ("pld:budget", "not key=value")],
)
def test_registry_errors_are_named(spec: str, message: str) -> None:
    with pytest.raises(UnknownMethodError, match=message):
        create_drafter(spec)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="budget"):
        create_drafter("pld:budget=0")
