"""Lookahead decoding (Fu et al. 2024), with Alipay Lookahead's trie retrieval.

Three branches share each step's one forward pass:

* **Jacobi window.** A chain of ``window`` guessed future tokens hangs below the root. Each
  chain node's logits are the target's prediction for the next position given the guesses
  before it — one Jacobi iteration. Those predictions, shifted by the tokens the step
  committed, are the next step's guesses (positions never predicted are refilled with tokens
  drawn from the context). The chain is verified like any draft, so a converged guess is
  accepted directly.
* **n-gram pool.** Each step's guesses and predictions form a trajectory over absolute
  positions. Reading the last ``ngram - 2`` levels of guesses and the new predictions along a
  diagonal (guess at p, next level's guess at p + 1, ..., prediction at p + ngram - 1) gives
  n-grams the target itself produced; they are pooled by their first token. Pooled n-grams
  starting with the root token are drafted as candidates.
* **Trie retrieval.** The most frequent continuations of the context's longest matched suffix
  in prompt + output, several branches at once (:class:`~draftwise.drafters.trie.CountingTrie`).

The drafter finds its chain in the verified tree by token path, so pruning by the engine's sizer
or merging by the composite drafter never confuses it. Greedy (argmax) predictions feed the
window and the pool whatever the sampling settings: drafts never change what is emitted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from draftwise.drafters.base import StepResult, register
from draftwise.drafters.trie import CountingTrie
from draftwise.sampling import GREEDY, SamplingConfig, argmax_rows
from draftwise.tree import DraftTree, TreeBuilder

__all__ = ["LookaheadConfig", "LookaheadDrafter"]


@dataclass(frozen=True)
class LookaheadConfig:
    """Attributes:
    window: Jacobi window length W (guessed future positions).
    ngram: n-gram size N collected from the trajectory (>= 2).
    pool_candidates: most pooled n-grams drafted per step (G).
    pool_size: most n-grams kept per first token.
    trie_depth: longest path counted by the trie retrieval (0 = off).
    trie_nodes: most trie-retrieved nodes per step.
    budget: most nodes per step, all branches together.
    seed: seed of the random refill of the window.
    """

    window: int = 4
    ngram: int = 3
    pool_candidates: int = 3
    pool_size: int = 8
    trie_depth: int = 6
    trie_nodes: int = 8
    budget: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2, got {self.ngram}")
        for name in ("pool_candidates", "pool_size", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.trie_depth < 0 or self.trie_nodes < 0:
            raise ValueError("trie_depth and trie_nodes must be >= 0")


@register("lookahead", LookaheadConfig, "Lookahead: Jacobi window + n-gram pool + trie retrieval")
class LookaheadDrafter:
    def __init__(self, config: LookaheadConfig) -> None:
        self.config = config
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self._rng = random.Random(config.seed)
        self._trie = CountingTrie(config.trie_depth) if config.trie_depth else None
        self._context: list[int] = []
        self._levels: list[dict[int, int]] = []  # recent guess levels: {absolute position: token}
        self._guesses: list[int] = []  # the next window, for positions root + 1, root + 2, ...
        self._root_position = 0

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        self._context = [int(t) for t in prompt_ids]
        self._levels = []
        self._guesses = []
        if self._trie is not None:
            self._trie = CountingTrie(self.config.trie_depth)
            self._trie.extend(self._context)

    def _sync(self, context: Sequence[int]) -> None:
        new = context[len(self._context) :]
        self._context.extend(int(t) for t in new)
        if self._trie is not None:
            self._trie.extend(new)

    def _refill(self) -> int:
        return self._rng.choice(self._context)

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        cfg = self.config
        self._sync(context)
        root = int(context[-1])
        self._root_position = len(context) - 1
        if max_depth <= 0:
            return DraftTree.empty()
        window = min(cfg.window, max_depth)
        while len(self._guesses) < window:
            self._guesses.append(self._refill())
        del self._guesses[window:]

        builder = TreeBuilder(cfg.budget)
        if self._trie is not None and cfg.trie_nodes:
            retrieved = self._trie.draft(context, min(cfg.trie_nodes, cfg.budget), max_depth)
            for node in range(len(retrieved)):
                builder.add_path(retrieved.path_tokens(node))
        for gram in self.pool.get(root, [])[: cfg.pool_candidates]:
            builder.add_path(gram[:max_depth])
        builder.add_path(self._guesses)
        return builder.build()

    def observe(self, step: StepResult) -> None:
        cfg, tree = self.config, step.tree
        base = self._root_position
        # Follow the window chain through the verified tree by its tokens.
        rows = [0]  # logits row after the root, then after each chain node found
        node = -1
        children = tree.children_map()
        for token in self._guesses:
            node = next((c for c in children.get(node, []) if tree.tokens[c] == token), -2)
            if node == -2:
                break
            rows.append(node + 1)
        known = step.acceptance.argmax  # for positions base + 1, ...
        predictions = ([known[r] for r in rows] if known
                       else argmax_rows(step.logits[rows]).tolist())
        level = {base + 1 + i: g for i, g in enumerate(self._guesses[: len(rows) - 1])}
        predicted = {base + 1 + i: p for i, p in enumerate(predictions)}
        self._collect(level, predicted)

        committed = len(step.acceptance.tokens)
        new_root = base + committed
        self._guesses = [
            predicted[p] for p in range(new_root + 1, new_root + 1 + cfg.window) if p in predicted
        ]

    def _collect(self, level: dict[int, int], predicted: dict[int, int]) -> None:
        """Pool the diagonal n-grams of the last ``ngram - 2`` guess levels + predictions."""
        cfg = self.config
        self._levels = (self._levels + [level])[-(cfg.ngram - 1) :]
        levels = self._levels[-(cfg.ngram - 1) :]
        if len(levels) < cfg.ngram - 1:
            return
        for start in levels[0]:
            gram = []
            for offset, guesses in enumerate(levels):
                token = guesses.get(start + offset)
                if token is None:
                    break
                gram.append(token)
            else:
                last = predicted.get(start + len(levels))
                if last is not None:
                    gram.append(last)
                    self._pool(tuple(gram))

    def _pool(self, gram: tuple[int, ...]) -> None:
        first, rest = gram[0], gram[1:]
        entries = self.pool.setdefault(first, [])
        if rest in entries:
            entries.remove(rest)
        entries.insert(0, rest)  # most recent first
        del entries[self.config.pool_size :]
