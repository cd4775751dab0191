"""Model drafters: a small draft model (SpS), or the target itself with layers skipped.

:class:`ModelDrafter` drafts with any :class:`~draftwise.backends.base.KVBackend` — a second,
smaller model sharing the tokenizer (``draft``), or a shallow copy of the target that skips
layers (``self``, :mod:`draftwise.drafters.self_spec`). Its KV cache follows the target's
commits: each step it rewinds to the longest common prefix of what it has cached and the
committed context, feeds the new tokens, then drafts.

* **Chains** (``width == 1``): one token per draft forward pass. Greedy takes the draft's argmax;
  sampling draws from the draft's distribution after the *same* sampling transforms as the
  target, and each node carries that distribution so the verifier applies the exact rejection
  rule.
* **Trees** (``width > 1``): level by level, each node gets ``width`` children: the top-k for
  greedy, or k draws *without replacement* (Gumbel-top-k, as in Recursive Speculative Decoding)
  for sampling. Sibling ``j`` carries the draft distribution with siblings ``< j`` removed and
  renormalized — the distribution it was actually drawn from — which makes the verifier's
  residual rule exact for siblings drawn without replacement.
* **Adaptive length** (SpecDec++'s threshold policy without a trained head): the probability
  that the next draft token is rejected is estimated from the draft's own confidence, mapped
  through running acceptance rates per confidence bin; drafting stops once it exceeds
  ``stop_threshold`` (1.0 = fixed length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from draftwise.backends.base import KVBackend
from draftwise.drafters.base import StepResult
from draftwise.sampling import GREEDY, Sampling, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["DraftMismatchError", "ModelDrafter", "check_same_vocabulary"]

_BINS = 10


class DraftMismatchError(ValueError):
    """The draft model's vocabulary differs from the target's."""


def check_same_vocabulary(draft: Any, target: Any, draft_name: str, target_name: str) -> None:
    """Raise :class:`DraftMismatchError` unless the two tokenizers map text to the same ids
    and the two models score the same number of ids."""
    draft_vocab, target_vocab = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    draft_size = int(draft.model.config.vocab_size)
    target_size = int(target.model.config.vocab_size)
    if draft_vocab != target_vocab or draft_size != target_size:
        raise DraftMismatchError(
            f"draft {draft_name} ({len(draft_vocab)} tokens, {draft_size} logits) and target "
            f"{target_name} ({len(target_vocab)} tokens, {target_size} logits) do not share a "
            "vocabulary: a draft model must use the target's tokenizer"
        )


class ModelDrafter:
    """Drafts chains or trees with a model behind a KV backend."""

    def __init__(self, depth: int, width: int, stop_threshold: float) -> None:
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got {depth}, {width}")
        if not 0.0 < stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in (0, 1], got {stop_threshold}")
        self.depth, self.width, self.stop_threshold = depth, width, stop_threshold
        self.backend: KVBackend | None = None
        self.sampling = Sampling(SamplingConfig())
        self.rng = torch.Generator().manual_seed(0)
        self._tokens: list[int] = []  # committed in the draft backend, root included
        self._accepted = [0.0] * _BINS  # running acceptance per draft-confidence bin
        self._offered = [0.0] * _BINS
        self._confidence: dict[tuple[int, ...], float] = {}  # draft path -> confidence

    # lifecycle ------------------------------------------------------------------------------

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        # The draft generator is seeded once, at construction, and never reset: a draft that
        # repeated the same draws for every request would not be random, and the rejection
        # rule is exact only for drafts actually drawn from their recorded distributions.
        self.sampling = Sampling(sampling)

    def _require_backend(self) -> KVBackend:
        if self.backend is None:
            raise RuntimeError("the drafter has no model yet: attach it to a target first")
        return self.backend

    def _sync(self, context: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Bring the draft cache to ``context`` and run the tokens it lacks.

        Returns the ``[vocab]`` logits after the context and the tokens fed (the *pending*
        ones). The forward pass is left open: the caller commits or discards it."""
        backend = self._require_backend()
        common = 0
        for a, b in zip(self._tokens, context, strict=False):
            if a != b:
                break
            common += 1
        if common == 0:
            backend.prefill(list(context))
            pending: list[int] = []
        else:
            backend.rewind(common, context[common - 1])
            pending = [int(t) for t in context[common:]]
        self._tokens = [int(t) for t in context]
        logits = backend.forward_tree(DraftTree.chain(pending))  # root + pending
        return logits[-1], pending

    def _distribution(self, logits: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """Draft probabilities over the vocabulary with the target's sampling transforms."""
        seen = None
        if self.sampling.config.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[torch.tensor([*self._tokens, *path], dtype=torch.long)] = True
            seen = seen[None]
        if self.sampling.config.greedy:
            scores = self.sampling.penalize(logits[None].double(), seen)[0]
            return torch.softmax(scores, dim=-1)
        return self.sampling.probs(logits[None], seen)[0]

    # drafting -------------------------------------------------------------------------------

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        depth = min(self.depth, max_depth)
        if depth <= 0:
            return DraftTree.empty()
        first, pending = self._sync(context)
        if self.width == 1:
            return self._chain(first, pending, depth)
        backend = self._require_backend()
        if pending:  # cache the context but its end, which stays the root of the tree passes
            backend.commit(tuple(range(len(pending) - 1)), pending[-1])
        else:
            backend.discard()
        return self._tree(first, depth)

    def _stop(self, confidence: float, reach: float) -> bool:
        """SpecDec++-style: stop once the next token's estimated rejection passes the
        threshold (the estimate: running acceptance in the draft-confidence bin)."""
        if self.stop_threshold >= 1.0:
            return False
        b = min(int(confidence * _BINS), _BINS - 1)
        rate = (self._accepted[b] + (b + 0.5) / _BINS) / (self._offered[b] + 1.0)
        return 1.0 - rate * reach > self.stop_threshold

    def _chain(self, logits: torch.Tensor, pending: list[int], depth: int) -> DraftTree:
        """One token per draft pass; each pass is committed so the next one only runs the
        newest token."""
        backend = self._require_backend()
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        reach = 1.0
        opened, is_open = len(pending), True  # the sync pass is open, with its pending nodes
        for level in range(depth):
            q = self._distribution(logits, tokens)  # [vocab]
            if self.sampling.config.greedy:
                token = int(torch.argmax(q))
            else:
                token = int(torch.multinomial(q, 1, generator=self.rng))
            confidence = float(q[token])
            if level > 0 and self._stop(confidence, reach):
                break
            reach *= confidence
            tokens.append(token)
            rows.append(q)
            self._confidence[tuple(tokens)] = confidence
            backend.commit(tuple(range(opened)), token)  # keep the pass; token is the root
            self._tokens.append(token)
            opened, is_open = 0, False
            if level + 1 < depth:
                logits = backend.forward_tree(DraftTree.empty())[0]
                is_open = True
        if is_open:
            backend.discard()
        probs = None if self.sampling.config.greedy else torch.stack(rows)
        return DraftTree.chain(tokens, probs)

    def _children(self, q: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``width`` children of one node with the distribution each was drawn from."""
        if self.sampling.config.greedy:
            top = torch.topk(q, min(self.width, q.shape[-1])).indices.tolist()
            return [(int(t), q) for t in top]
        # Gumbel-top-k: k draws without replacement; sibling j is drawn from q without the
        # earlier siblings, renormalized
        gumbel = -torch.log(-torch.log(torch.rand(q.shape, generator=self.rng,
                                                  dtype=torch.float64).clamp_min(1e-300)))
        keys = torch.log(q.clamp_min(1e-300)) + gumbel
        keys[q <= 0] = float("-inf")
        order = torch.topk(keys, min(self.width, int((q > 0).sum()))).indices.tolist()
        children = []
        remaining = q.clone()
        for token in order:
            children.append((int(token), remaining / remaining.sum()))
            remaining[token] = 0.0
        return children

    def _tree(self, logits: torch.Tensor, depth: int) -> DraftTree:
        backend = self._require_backend()
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        frontier = [(-1, logits)]  # (node, logits after it)
        tree = DraftTree.empty()  # the tree so far, as of the last draft pass
        for level in range(depth):
            new: list[int] = []
            for node, node_logits in frontier:
                path = tree.path_tokens(node)
                for token, q in self._children(self._distribution(node_logits, path)):
                    tokens.append(token)
                    parents.append(node)
                    rows.append(q)
                    new.append(len(tokens) - 1)
            if level + 1 == depth or not new:
                break
            tree = DraftTree(tuple(tokens), tuple(parents))
            all_logits = backend.forward_tree(tree)  # [N + 1, vocab]
            backend.discard()
            # expand only the most likely node of each level beyond the first (beam of width)
            scored = sorted(new, key=lambda i: -float(rows[i][tokens[i]]))[: self.width]
            frontier = [(i, all_logits[i + 1]) for i in scored]
        probs = None if self.sampling.config.greedy else torch.stack(rows)
        return DraftTree(tuple(tokens), tuple(parents), probs)

    def observe(self, step: StepResult) -> None:
        accepted = set(step.acceptance.path)
        tree = step.tree
        for node in range(len(tree)):
            parent = tree.parents[node]
            if parent >= 0 and parent not in accepted:
                continue  # never offered
            confidence = self._confidence.get(tuple(tree.path_tokens(node)))
            if confidence is None:
                continue
            b = min(int(confidence * _BINS), _BINS - 1)
            self._offered[b] += 1.0
            self._accepted[b] += node in accepted
        self._confidence.clear()

