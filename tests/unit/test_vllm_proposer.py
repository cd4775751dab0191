"""The vLLM proposer against a fake model runner: rows moving, requests joining and leaving,
empty drafts, the suffix cache across requests. No vLLM needed."""

from __future__ import annotations

import numpy as np
import pytest

from draftwise.integrations.vllm import GONE_AFTER, ChainProposer, first_chain
from draftwise.tree import DraftTree

WIDTH = 64  # the runner's max_model_len


class FakeRunner:
    """vLLM's input batch as the proposer sees it: a token table, per-row counts, and each
    row's sampled tokens; requests keep their rows until one ends, then the last row moves
    into the hole (vLLM condenses the batch)."""

    def __init__(self, rows: int = 4) -> None:
        self.table = np.zeros((rows, WIDTH), dtype=np.int32)
        self.counts = np.zeros(rows, dtype=np.int32)
        self.requests: list[list[int]] = []  # per row: the request's tokens so far

    def join(self, tokens: list[int]) -> None:
        self.requests.append(list(tokens))

    def leave(self, row: int) -> None:
        self.requests[row] = self.requests[-1]
        self.requests.pop()

    def step(self, proposer: ChainProposer, sampled: list[list[int]]) -> list[list[int]]:
        for row, (request, new) in enumerate(zip(self.requests, sampled, strict=True)):
            request.extend(new)
            self.table[row, : len(request)] = request
            self.counts[row] = len(request)
        return proposer.propose(sampled, self.counts, self.table)


def test_first_chain_follows_each_nodes_first_child() -> None:
    tree = DraftTree((5, 6, 7, 8, 9), (-1, 0, -1, 1, 1))
    assert first_chain(tree, 8) == [5, 6, 8]
    assert first_chain(tree, 2) == [5, 6]
    assert first_chain(DraftTree.empty(), 4) == []


def test_rows_follow_their_requests_when_the_batch_moves() -> None:
    proposer = ChainProposer("pld", 4, suffix_tokens=0)
    runner = FakeRunner()
    a = [1, 2, 3, 4, 5, 6, 1, 2]  # drafts 3 4 5 6 after "1 2"
    b = [9, 8, 7, 6, 9, 8]  # drafts 7 6 9 8 (running on into its own end, as prompt lookup does)
    c = [20, 21, 22, 23]
    for prompt in (a, b, c):
        runner.join(prompt[:-1])
    assert runner.step(proposer, [[a[-1]], [b[-1]], [c[-1]]]) == [[3, 4, 5, 6], [7, 6, 9, 8],
                                                                   []]
    assert proposer.requests == 3
    runner.leave(0)  # c moves to row 0
    drafts = runner.step(proposer, [[24], [7]])
    assert drafts[1] == [6, 9, 8, 7]  # b's "8 7" continues as before
    assert proposer.requests == 3  # c was followed to its new row; a is not yet over
    for _ in range(GONE_AFTER):
        runner.step(proposer, [[25], [6]])
    assert proposer.requests == 2  # a went unseen long enough: over


def test_empty_sampled_rows_get_no_draft_and_new_requests_start_fresh() -> None:
    proposer = ChainProposer("pld", 3, suffix_tokens=0)
    runner = FakeRunner()
    runner.join([1, 2, 3, 1])
    runner.join([4, 5, 4])
    assert runner.step(proposer, [[], [5]]) == [[], [4, 5]]
    # a request whose tokens do not continue any followed one is new, even in a known row
    runner.leave(0)
    runner.leave(0)
    runner.join([4, 5, 9, 4])
    assert runner.step(proposer, [[5]]) == [[9, 4, 5]]


def test_the_suffix_method_drafts_an_ended_requests_output() -> None:
    proposer = ChainProposer("suffix", 6)
    runner = FakeRunner()
    answer = [30, 31, 32, 33, 34, 35, 36, 37]
    runner.join([1, 2, 3])
    for token in answer:
        runner.step(proposer, [[token]])
    runner.leave(0)
    runner.join([7, 7, 7])  # another prompt
    runner.step(proposer, [[30]])
    for _ in range(GONE_AFTER):
        runner.step(proposer, [[31]] if _ == 0 else [[99]])
    runner.leave(0)
    runner.join([5, 5, 5])
    drafts = runner.step(proposer, [[30]])
    assert drafts == [[]]  # one token matches nothing
    assert runner.step(proposer, [[31]]) == [[32, 33]]  # a two-token match: two tokens


def test_methods_that_need_logits_are_refused() -> None:
    for method in ("recycling", "aded", "composite:parts=pld+recycling"):
        with pytest.raises(ValueError, match="logits"):
            ChainProposer(method, 4)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        ChainProposer("pld", 0)


def test_bench_methods_map_to_vllm_speculative_configs() -> None:
    from draftwise.bench.vllm_engine import CLASS, speculative_config
    from draftwise.drafters import UnknownMethodError

    assert speculative_config("none", 8) is None
    assert speculative_config("ngram:prompt_lookup_min=2,prompt_lookup_max=5", 8) == {
        "method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2,
        "prompt_lookup_max": 5}
    assert speculative_config("suffix", 4) == {"method": "suffix", "num_speculative_tokens": 4}
    ours = {"method": "custom_class", "model": CLASS, "num_speculative_tokens": 6}
    assert speculative_config("draftwise/suffix", 6) == ours
    assert speculative_config("composite:parts=pld+suffix", 6) == ours
    for refused in ("recycling", "composite:parts=pld+aded"):
        with pytest.raises(UnknownMethodError, match="logits"):
            speculative_config(refused, 6)
    with pytest.raises(UnknownMethodError):
        speculative_config("draftwise/nope", 6)
