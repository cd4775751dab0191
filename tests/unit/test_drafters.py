"""Training-free drafters on hand-written token arrays and hand-made logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draftwise.drafters import StepResult, create_drafter
from draftwise.drafters.aded import AdedConfig, AdedDrafter, TrigramModel
from draftwise.drafters.composite import CompositeConfig, CompositeDrafter
from draftwise.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from draftwise.drafters.recycling import RecyclingConfig, TokenRecyclingDrafter, rank_template
from draftwise.drafters.retrieval import Datastore, RetrievalConfig, RetrievalDrafter, read_corpus
from draftwise.drafters.trie import CountingTrie
from draftwise.tree import DraftTree
from draftwise.verify import Acceptance

VOCAB = 10


def logits_ranking(*rows: list[int]) -> torch.Tensor:
    """Logits whose top tokens per row are the listed ones, in that order."""
    out = torch.zeros(len(rows), VOCAB)
    for r, ranking in enumerate(rows):
        for position, token in enumerate(ranking):
            out[r, token] = 10.0 - position
    return out


def step(tree: DraftTree, logits: torch.Tensor, path: tuple[int, ...], tokens: tuple[int, ...]
         ) -> StepResult:
    return StepResult(tree, Acceptance(path, tokens, bonus=False), logits)


# Token Recycling -------------------------------------------------------------------------------

def test_rank_template_is_wide_at_the_root_and_deep_along_rank_zero() -> None:
    template = rank_template(k=3, max_nodes=6, max_depth=4, decay=1.5)
    assert template[0] == (0,)
    assert (0, 0) in template and (0, 0, 0) in template
    assert all(path[:-1] in template for path in template if len(path) > 1)


def test_recycling_drafts_from_the_target_top_k_of_every_verified_node() -> None:
    drafter = TokenRecyclingDrafter(RecyclingConfig(k=2, max_nodes=4, max_depth=2))
    assert len(drafter.propose([1, 5], 8)) == 0  # nothing learned yet: root is 5
    tree = DraftTree((7,), (-1,))
    # root 5 -> top [3, 4]; rejected node 7 -> top [8, 9]
    drafter.observe(step(tree, logits_ranking([3, 4], [8, 9]), (), (3,)))
    drafted = drafter.propose([1, 5], 8)
    # template (0,), (1,), (0,0), ... : 5 -> 3, 5 -> 4; 3 unknown so no deeper nodes
    assert drafted.tokens == (3, 4)
    drafted = drafter.propose([2, 7], 8)  # the rejected node's successors were recycled
    assert drafted.tokens[:2] == (8, 9)


def test_recycling_table_is_kept_across_requests() -> None:
    drafter = TokenRecyclingDrafter(RecyclingConfig(k=1, max_nodes=2, max_depth=2))
    drafter.propose([0], 8)
    drafter.observe(step(DraftTree.empty(), logits_ranking([6]), (), (6,)))  # root 0 -> 6
    drafter.propose([0, 6], 8)
    drafter.observe(step(DraftTree.empty(), logits_ranking([2]), (), (2,)))  # 6 -> 2
    drafter.begin([4, 4])
    assert drafter.propose([0], 8).tokens == (6, 2)


# ADED ------------------------------------------------------------------------------------------

def test_trigram_model_prefers_recent_evidence_and_falls_back_to_bigram() -> None:
    model = TrigramModel(decay=0.5)
    model.observe_sequence([1, 2, 3, 1, 2, 4, 1, 2, 4])
    best = model.distribution(1, 2, 2)
    assert best[0][0] == 4 and best[1][0] == 3
    assert abs(sum(p for _, p in best) - 1.0) < 1e-9
    assert model.distribution(9, 2, 1)[0][0] == 4  # unseen pair: bigram on the last token
    assert model.distribution(9, 9, 1) == []


def test_aded_search_exploits_the_likely_path_and_explores_siblings() -> None:
    drafter = AdedDrafter(AdedConfig(budget=6, max_depth=4, candidates=2, exploration=1.0))
    context = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 1, 2]
    drafter.begin(context)
    tree = drafter.propose(context, 8)
    assert len(tree) == 6
    assert tree.tokens[0] == 3  # (1, 2) -> 3 seen twice, -> 5 once: most likely first
    assert tree.path_tokens(tree.children(0)[0])[:2] == [3, 4]
    assert 5 in [tree.tokens[c] for c in tree.children(-1)]  # the sibling is explored


def test_aded_learns_from_target_logits() -> None:
    drafter = AdedDrafter(AdedConfig(budget=1, top_k=1))
    drafter.begin([8, 9])
    drafter.propose([8, 9], 8)
    drafter.observe(step(DraftTree.empty(), logits_ranking([6]), (), (6,)))
    assert drafter.propose([8, 9], 8).tokens == (6,)


# Lookahead -------------------------------------------------------------------------------------

def test_lookahead_jacobi_window_and_ngram_pool() -> None:
    drafter = LookaheadDrafter(LookaheadConfig(window=3, ngram=2, trie_depth=0, seed=0))
    context = [1, 2, 3]
    drafter.begin(context)
    assert len(drafter.propose(context, 8)) == 3  # a window of random context tokens
    drafter._guesses = guesses = [4, 5, 6]  # distinct guesses, to read the pool unambiguously
    tree = drafter.propose(context, 8)
    assert tree.tokens == (4, 5, 6) and tree.parents == (-1, 0, 1)
    # target predictions after root, g1, g2, g3: 7 (rejects g1 unless g1 == 7), 8, 9, 4
    logits = logits_ranking([7], [8], [9], [4])
    drafter.observe(step(tree, logits, (), (7,)))
    # pool: 2-grams (guess at p, prediction at p + 1)
    assert drafter.pool[guesses[0]][0] == (8,)
    assert drafter.pool[guesses[1]][0] == (9,)
    # next window: predictions for positions after the new root (one token committed)
    assert drafter._guesses == [8, 9, 4]


def test_counting_trie_drafts_most_frequent_branches() -> None:
    trie = CountingTrie(depth=3)
    trie.extend([1, 2, 3, 1, 2, 4, 1, 2, 3])
    tree = trie.draft([9, 1, 2], budget=3, max_depth=2)
    assert tree.tokens[0] == 3  # seen twice after (1, 2)
    assert set(tree.tokens) >= {3, 4}


# Retrieval -------------------------------------------------------------------------------------

def test_datastore_suffix_array_finds_all_occurrences(tmp_path) -> None:
    store = Datastore.build([[1, 2, 3, 4], [2, 3, 5], [7, 2, 3, 4]], key_length=4)
    lo, hi = store.matches([2, 3])
    starts = sorted(int(s) for s in store.suffixes[lo:hi])
    assert [store.tokens[s + 2] for s in starts] == [4, 5, 4]
    assert store.matches([3, 2]) [0] == store.matches([3, 2])[1]
    store.save(tmp_path / "s.npz")
    again = Datastore.load(tmp_path / "s.npz")
    assert np.array_equal(again.tokens, store.tokens)


def test_retrieval_drafts_frequent_continuations_not_crossing_documents(tmp_path) -> None:
    Datastore.build([[1, 2, 3, 4], [2, 3, 5], [7, 2, 3, 4, 6]], key_length=4).save(
        tmp_path / "s.npz")
    drafter = RetrievalDrafter(RetrievalConfig(datastore=str(tmp_path / "s.npz"), max_ngram=3,
                                               min_ngram=2, depth=3, budget=8))
    tree = drafter.propose([9, 2, 3], 8)
    assert tree.tokens[0] == 4  # 4 follows (2, 3) twice, 5 once
    assert 5 in tree.tokens and 6 in tree.tokens
    assert -1 not in tree.tokens


def test_retrieval_errors_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="datastore=PATH"):
        create_drafter("retrieval")
    with pytest.raises(ValueError, match="no datastore"):
        create_drafter(f"retrieval:datastore={tmp_path / 'none.npz'}")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n{"turns": ["b", "c"]}\n')
    assert read_corpus(corpus) == ["a", "b\nc"]


# Composite -------------------------------------------------------------------------------------

def test_composite_merges_shared_prefixes_and_counts_per_part() -> None:
    drafter = CompositeDrafter(CompositeConfig(parts=("pld", "aded"), budget=8))
    context = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    drafter.begin(context)
    merged = drafter.propose(context, 8)
    assert merged.tokens[0] == 3  # both parts continue (1, 2) with 3: stored once
    assert len(set(zip(merged.parents, merged.tokens, strict=True))) == len(merged)
    path = tuple(merged.path_to(merged.children(0)[0]))
    drafter.observe(step(merged, torch.zeros(len(merged) + 1, VOCAB), path, (3, 4, 1)))
    assert drafter.stats["pld"].accepted >= 1 and drafter.stats["aded"].accepted >= 1
    assert drafter.stats["pld"].proposed >= drafter.stats["pld"].accepted
