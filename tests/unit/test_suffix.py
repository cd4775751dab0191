"""The suffix drafter and its cross-request cache: matches, bounds, eviction, isolation."""

from __future__ import annotations

import random

import pytest

from draftwise.drafters import UnknownMethodError, create_drafter
from draftwise.drafters.suffix import SuffixCache, SuffixDrafter, SuffixIndex


def chains(drafter: SuffixDrafter, context: list[int], depth: int = 16) -> list[list[int]]:
    tree = drafter.propose(context, depth)
    leaves = set(range(len(tree))) - set(tree.parents)
    return sorted(tree.path_tokens(leaf) for leaf in leaves)


def suffix(spec: str = "suffix") -> SuffixDrafter:
    drafter = create_drafter(spec)
    assert isinstance(drafter, SuffixDrafter)
    return drafter


def test_index_measures_each_match_backwards_and_skips_matches_without_a_continuation() -> None:
    index = SuffixIndex()
    doc = index.add([1, 2, 3, 9, 5, 2, 3, 7, 2, 3])
    # (length, doc, where the continuation starts): most recent first; the last "2 3" has
    # nothing after it
    assert index.matches([8, 1, 2, 3], longest=8, scan=8) == [(2, doc, 7), (3, doc, 3)]
    assert index.matches([1, 2, 3], longest=2, scan=8) == [(2, doc, 7), (2, doc, 3)]
    assert index.matches([1, 2, 3], longest=8, scan=1) == [(2, doc, 7)]
    assert index.matches([4, 4], longest=8, scan=8) == []


def test_drafts_from_the_request_itself_like_prompt_lookup() -> None:
    drafter = suffix()
    prompt = [5, 6, 7, 8, 9, 10, 11, 1, 2]
    drafter.begin(prompt)
    # the context ends in "6 7": what followed it before is drafted, one token per matched
    # token at most (depth_per_match = 1)
    assert chains(drafter, [*prompt, 6, 7]) == [[8, 9]]
    # a three-token match drafts up to twelve tokens at four per matched token: here, all
    # that followed (the draft runs on into the context's own end, as the text would repeat)
    deep = suffix("suffix:depth_per_match=4")
    deep.begin(prompt)
    assert chains(deep, [*prompt, 5, 6, 7]) == [[8, 9, 10, 11, 1, 2, 5, 6, 7]]


def test_a_second_request_drafts_from_the_first_ones_output() -> None:
    cache = SuffixCache(1000)
    first, second = suffix(), suffix()
    output = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    first.share(cache, "alice")
    first.begin([1, 2, 3])
    first.end(output)
    assert cache.tokens == len(output)
    second.share(cache, "alice")
    second.begin([7, 8, 9, 40, 41, 42, 43])  # the earlier answer's start: a 4-token match
    assert chains(second, [7, 8, 9, 40, 41, 42, 43]) == [[44, 45, 46, 47]]


def test_tenants_never_see_each_others_outputs() -> None:
    cache = SuffixCache(1000)
    writer = suffix()
    writer.share(cache, "alice")
    writer.begin([1])
    writer.end([40, 41, 42, 43, 44])
    for tenant, expected in (("alice", [[42, 43]]), ("bob", []), ("", [])):
        reader = suffix()
        reader.share(cache, tenant)
        reader.begin([9, 40, 41])
        assert chains(reader, [9, 40, 41]) == expected, tenant


def test_the_cache_is_bounded_and_evicts_the_oldest_output_first() -> None:
    rng = random.Random(0)
    cache = SuffixCache(500)
    kept: list[tuple[str, list[int]]] = []
    for request in range(400):
        tenant = f"t{request % 7}"  # many tenants share one bound
        output = [rng.randrange(50) for _ in range(rng.randrange(3, 120))]
        cache.add(tenant, output)
        kept.append((tenant, output))
        assert cache.tokens <= 500
        held = sum(len(doc) for index in cache._tenants.values() for doc in index.docs.values())
        assert held == cache.tokens
        # the index stays proportional to the tokens held (dropped ones are cleared)
        for index in cache._tenants.values():
            assert sum(len(links) for links in index._links.values()) == index.tokens
            assert len(index._heads) <= 2 * index.tokens + 1024
    # what is held is exactly the newest outputs that fit
    newest, total = [], 0
    for _, output in reversed(kept):
        if total + len(output) > 500:
            break
        newest.append(output)
        total += len(output)
    held_docs = sorted(list(doc) for index in cache._tenants.values()
                       for doc in index.docs.values())
    assert held_docs == sorted(newest)


def test_an_output_longer_than_the_cache_keeps_its_end_and_a_zero_cache_keeps_nothing() -> None:
    cache = SuffixCache(10)
    cache.add("a", list(range(100)))
    assert cache.tokens == 10
    assert cache.matches("a", [95, 96], longest=8, scan=8) == [(2, [97, 98, 99])]
    empty = SuffixCache(0)
    empty.add("a", list(range(100)))
    assert empty.tokens == 0 and empty.tenants == 0
    with pytest.raises(ValueError, match=">= 0"):
        SuffixCache(-1)


def test_options_are_checked() -> None:
    with pytest.raises(UnknownMethodError):
        create_drafter("suffix:nope=1")
    with pytest.raises(ValueError, match="min_match"):
        create_drafter("suffix:min_match=1")
    with pytest.raises(ValueError, match="budget"):
        create_drafter("suffix:budget=0")
