"""Grammar-aligned sampling: ASAp (Park et al., 2024, "Grammar-Aligned Decoding").

Masked (grammar-constrained) sampling draws each token from the model's distribution restricted
to the tokens that keep the output *viable*. That is not the model's distribution conditioned on
the grammar: a prefix the model rarely completes grammatically keeps its full prior mass, so
constrained samples over-represent it. The exact target is

    P(w | w in L) = P(w) [w in L] / P(L),   i.e. at each prefix u:  P(t | u) * EFG(u t) / EFG(u)

with EFG(u) = P(a model completion of u is in L), the *expected future grammaticality*.

ASAp draws n samples of one prompt, each with an estimate of EFG, and refines the estimate after
each sample. It keeps a trie of the sampled prefixes; each node caches the model's distribution
there, the grammar mask, and its EFG estimate. Unexplored children are estimated from the mask
(1 if allowed, else 0: the optimistic guess constrained sampling makes). After a sample, the
estimates on its path are recomputed bottom-up:

    EFG(u) = sum_t P(t | u) * (EFG(u t) if u t is in the trie else allowed(u, t))

(EOS counts as a complete, grammatical ending). Estimates only fall as the trie grows and are
exact once every viable prefix has been visited, so the samples converge to ``P(w | w in L)``;
with a finite language that happens after finitely many samples. The maximum length is part of
the language: at the last position only EOS is allowed. Samples that hit a dead end (no allowed
continuation with probability left) are returned as incomplete and teach the trie to avoid it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from draftwise.backends.base import KVBackend
from draftwise.constraints.base import Constraint, ConstraintError
from draftwise.sampling import Sampling, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["AlignedSample", "AlignedSampler"]


@dataclass
class AlignedSample:
    """Attributes:
    tokens: the sampled tokens (ending with EOS when complete).
    complete: it ended with EOS inside the grammar (False: a dead end or the length cap).
    """

    tokens: list[int]
    complete: bool


@dataclass
class _Node:
    probs: torch.Tensor  # [vocab] float64: the model's sampling distribution after this prefix
    allowed: torch.Tensor  # [vocab] bool: the grammar's mask (EOS only at the length cap)
    children: dict[int, _Node] = field(default_factory=dict)
    value: float = 1.0  # EFG estimate of this prefix

    def weights(self) -> torch.Tensor:
        """Unnormalized ASAp distribution: P(t | u) * EFG estimate of u t."""
        weights = torch.where(self.allowed, self.probs, torch.zeros_like(self.probs))
        for token, child in self.children.items():
            weights[token] = self.probs[token] * child.value
        return weights

    def refresh(self) -> None:
        self.value = float(self.weights().sum())


class _PrefixCache:
    """Keeps a KV backend on the current prefix; gives the logits after any sequence."""

    def __init__(self, backend: KVBackend) -> None:
        self.backend = backend
        self.tokens: list[int] = []  # committed in the backend, root included

    def logits_after(self, sequence: Sequence[int]) -> torch.Tensor:
        common = 0
        for a, b in zip(self.tokens, sequence, strict=False):
            if a != b:
                break
            common += 1
        backend = self.backend
        if common == 0:
            backend.prefill(list(sequence))
            pending: list[int] = []
        else:
            backend.rewind(common, sequence[common - 1])
            pending = [int(t) for t in sequence[common:]]
        logits = backend.forward_tree(DraftTree.chain(pending))  # root + pending
        if pending:  # keep them: the cache now holds the sequence, its last token the root
            backend.commit(list(range(len(pending) - 1)), pending[-1])
        else:
            backend.discard()
        self.tokens = [int(t) for t in sequence]
        return logits[-1]


class AlignedSampler:
    """Draws grammar-aligned samples of one prompt (see the module docstring).

    Parameters:
        backend: the target model's KV backend.
        constraint: a fresh grammar state (left as is: each sample walks a fork of it).
        prompt_ids: the prompt.
        sampling: the model's sampling transforms (temperature > 0).
        eos_token_ids: tokens that end a sample.
        max_new_tokens: the longest sample (EOS included).
        seed: seed of the sampler's generator.
    """

    def __init__(
        self,
        backend: KVBackend,
        constraint: Constraint,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        eos_token_ids: Sequence[int],
        max_new_tokens: int,
        seed: int = 0,
    ) -> None:
        if sampling.greedy:
            raise ValueError("grammar-aligned sampling needs temperature > 0")
        if not eos_token_ids:
            raise ValueError("grammar-aligned sampling needs an EOS token to end samples")
        self.cache = _PrefixCache(backend)
        self.constraint = constraint
        self.prompt = [int(t) for t in prompt_ids]
        self.sampling = Sampling(sampling)
        self.eos = sorted({int(t) for t in eos_token_ids})
        self.max_new_tokens = max_new_tokens
        self.rng = torch.Generator().manual_seed(seed)
        self.model_calls = 0
        self.root = self._node([], constraint)

    @property
    def grammaticality(self) -> float:
        """The current estimate of P(L | prompt): the chance a plain model sample is valid."""
        return self.root.value

    def _node(self, path: list[int], state: Constraint) -> _Node:
        """A new trie node for ``prompt + path`` (``state``: the grammar after ``path``)."""
        logits = self.cache.logits_after(self.prompt + path)[None]
        self.model_calls += 1
        seen = None
        if self.sampling.config.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[torch.tensor(self.prompt + path, dtype=torch.long)] = True
            seen = seen[None]
        probs = self.sampling.probs(logits, seen)[0]
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        mask = state.mask()
        allowed[: mask.shape[0]] = mask
        if len(path) == self.max_new_tokens - 1:  # the length cap is part of the language
            cap = torch.zeros_like(allowed)
            cap[self.eos] = True
            allowed &= cap
        node = _Node(probs, allowed)
        node.refresh()
        return node

    def sample(self) -> AlignedSample:
        """One sample; the trie's estimates are updated with what it found."""
        if self.root.value <= 0.0:
            raise ConstraintError(
                "no output the grammar allows has any probability under the model here"
            )
        path: list[int] = []
        nodes = [self.root]
        walker = self.constraint.fork()
        complete = False
        while True:
            node = nodes[-1]
            weights = node.weights()
            if float(weights.sum()) <= 0.0:
                break  # a dead end: its value is now 0, and the next samples avoid it
            token = int(torch.multinomial(weights, 1, generator=self.rng))
            path.append(token)
            if token in self.eos:
                complete = True
                break
            walker.commit([token])
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = self._node(path, walker)
            nodes.append(child)
        for node in reversed(nodes):
            node.refresh()
        return AlignedSample(path, complete)

    def samples(self, n: int) -> list[AlignedSample]:
        return [self.sample() for _ in range(n)]
