"""Verifier: decides which draft tokens the target model accepts.

Contract (docs/design.md, "Lossless, precisely"): the emitted tokens are distributed exactly as
plain decoding with the same :class:`~draftwise.sampling.Sampling` would produce them.

* Greedy: from the root, take the target argmax at each node and descend into the child carrying
  it; stop where no child does. Emitted = accepted path + the argmax at the last node.
* Sampling, drafts without probabilities: at each node draw ``y ~ p``; descend into the child
  carrying ``y``, else emit ``y`` and stop.
* Sampling, drafts with probabilities: try the children in order, accepting child ``x`` with
  probability ``min(1, p(x) / q(x))``, else replacing ``p`` by ``normalize(max(0, p - q))``; after
  all children fail, sample the residual. ``q`` is the node's own ``draft_probs`` row: the
  distribution it was actually drawn from given its earlier siblings, which makes the rule exact
  both for siblings drawn independently and for siblings drawn without replacement.

Vocabulary: *accepted* draft tokens, the *recovered* token (the target's own choice where the
children were rejected) and the *bonus* token (after a path accepted down to a leaf).

Rows of ``logits`` are ``[root, node 0, node 1, ...]``: row ``i + 1`` predicts the token after
node ``i``. The verifier knows nothing about models, caches or tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftwise.sampling import Sampling, argmax_margin_rows, argmax_rows, top2_margins
from draftwise.tree import DraftTree

__all__ = ["Acceptance", "verify"]


@dataclass(frozen=True)
class Acceptance:
    """Outcome of verifying one tree.

    Attributes:
        path: accepted node indices, from the root's child down.
        tokens: emitted tokens: the accepted draft tokens, then the recovered or bonus token.
        bonus: True when the last token follows a leaf (every drafted level on the path accepted).
        margins: greedy only, the top-2 logit margin at each emitted position (near-tie report).
        argmax: greedy without a repetition penalty, every row's argmax as verification found
            it (row 0 = the root), for drafters that learn the target's greedy predictions
            without another pass over the rows; else empty.
    """

    path: tuple[int, ...]
    tokens: tuple[int, ...]
    bonus: bool
    margins: tuple[float, ...] = ()
    argmax: tuple[int, ...] = ()

    @property
    def accepted(self) -> int:
        """Number of accepted draft tokens."""
        return len(self.path)


def seen_rows(
    tree: DraftTree, committed_seen: torch.Tensor | None, rows: list[int]
) -> torch.Tensor | None:
    """``[len(rows), vocab]`` bool: tokens in the context of each row (committed + own path).

    Row ``0`` is the root; row ``i + 1`` is node ``i``, whose context includes its path.
    """
    if committed_seen is None:
        return None
    seen = committed_seen.unsqueeze(0).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        for node in tree.path_to(row - 1):
            seen[r, tree.tokens[node]] = True
    return seen


def verify(
    tree: DraftTree,
    logits: torch.Tensor,
    sampling: Sampling,
    rng: torch.Generator | None = None,
    committed_seen: torch.Tensor | None = None,
) -> Acceptance:
    """Verify ``tree`` against the target's ``logits: [N + 1, vocab]``.

    Parameters:
        committed_seen: ``[vocab]`` bool of tokens already in the context; needed only when the
            repetition penalty is on.
        rng: generator for sampling (unused for greedy).
    """
    if logits.shape[0] != len(tree) + 1:
        raise ValueError(f"logits has {logits.shape[0]} rows for a tree of {len(tree)} nodes")
    if sampling.config.repetition_penalty == 1.0:
        committed_seen = None
    if sampling.config.greedy:
        return _verify_greedy(tree, logits, sampling, committed_seen)
    return _verify_sampled(tree, logits, sampling, rng, committed_seen)


def _verify_greedy(
    tree: DraftTree, logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None
) -> Acceptance:
    children = tree.children_map()
    rows = list(range(len(tree) + 1))
    fused = argmax_margin_rows(logits) if seen is None else None  # targets and margins at once
    if fused is not None:
        targets, leads = fused[0].tolist(), fused[1].tolist()
    else:
        targets = sampling.greedy(logits, seen_rows(tree, seen, rows)).tolist()  # [N + 1]
    path: list[int] = []
    node = -1
    while True:
        target = targets[node + 1]
        child = next((c for c in children.get(node, ()) if tree.tokens[c] == target), None)
        if child is None:
            break
        path.append(child)
        node = child
    emitted_rows = [0] + [n + 1 for n in path]
    # the margins are of the raw logits: their argmax is the target unless a penalty applied
    if fused is not None:
        margins = tuple(leads[r] for r in emitted_rows)
    else:
        top = ([targets[r] for r in emitted_rows] if seen is None
               else argmax_rows(logits[emitted_rows]).tolist())
        margins = top2_margins(logits, top, emitted_rows)
    tokens = tuple(tree.tokens[n] for n in path) + (targets[node + 1],)
    return Acceptance(tuple(path), tokens, bonus=node not in children, margins=margins,
                      argmax=tuple(targets) if seen is None else ())


def _verify_sampled(
    tree: DraftTree,
    logits: torch.Tensor,
    sampling: Sampling,
    rng: torch.Generator | None,
    seen: torch.Tensor | None,
) -> Acceptance:
    children = tree.children_map()
    path: list[int] = []
    node = -1
    while True:
        row_seen = seen_rows(tree, seen, [node + 1])
        p = sampling.probs(logits[node + 1 : node + 2], row_seen)[0]  # [vocab], float64
        kids = children.get(node, [])
        if not kids:
            token = _draw(p, rng)
            break
        if tree.draft_probs is None:
            token = _draw(p, rng)
            child = next((c for c in kids if tree.tokens[c] == token), None)
        else:
            child, p = _rejection(tree, kids, p, rng)
            token = _draw(p, rng) if child is None else tree.tokens[child]
        if child is None:
            break
        path.append(child)
        node = child
    tokens = tuple(tree.tokens[n] for n in path) + (token,)
    return Acceptance(tuple(path), tokens, bonus=node not in children)


def _rejection(
    tree: DraftTree, kids: list[int], p: torch.Tensor, rng: torch.Generator | None
) -> tuple[int | None, torch.Tensor]:
    """Try ``kids`` in order with the rejection rule; returns (accepted child, residual p)."""
    assert tree.draft_probs is not None
    for child in kids:
        token = tree.tokens[child]
        q = tree.draft_probs[child].to(torch.float64)  # [vocab]
        q_x = float(q[token])
        if q_x <= 0.0:
            raise ValueError(f"node {child}: draft_probs gives its own token {token} probability 0")
        ratio = min(1.0, float(p[token]) / q_x)
        if float(torch.rand((), generator=rng, dtype=torch.float64)) < ratio:
            return child, p
        residual = (p - q).clamp_min(0.0)
        mass = float(residual.sum())
        if mass > 1e-12:  # exact arithmetic rejects with probability 0 when p == q
            p = residual / mass
    return None, p


def _draw(p: torch.Tensor, rng: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=rng).item())
