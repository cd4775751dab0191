"""Constraint: a grammar's state over the committed tokens, and its masks over a draft tree.

A constraint limits which tokens may come next (a JSON Schema, a regex, a Lark grammar). The engine
treats it as one more transform of the logits, applied identically in plain and speculative
decoding, so output under a constraint is identical to constrained plain decoding (greedy) or
distributed identically (sampling):

* :meth:`Constraint.forced` — tokens the grammar allows exactly one of, in a row, from the
  committed state. Plain constrained decoding would emit each of them whatever the model says,
  so the engine puts them at the top of the tree as free drafts (always accepted) or, when they
  end the generation, emits them without a model step.
* :meth:`Constraint.tree_masks` — walks the tree from the committed state, giving the mask of
  allowed tokens at the root and at every node (the bonus position included) and pruning nodes the
  grammar forbids.
* :meth:`Constraint.commit` — advances the state by the tokens a step emitted; only committed
  tokens ever advance it, so a rejected branch never touches it.

Exploration (forced tokens, pruning, tree walks) runs on *forks* — copies of the committed state —
never by consuming and rolling back the committed state itself: the committed matcher only ever
consumes committed tokens, exactly like constrained plain decoding's. (llguidance 1.9's rollback
can leave a matcher whose masks differ from a fresh replay of the same tokens after a long
history of walks; the MaskBench regression test caught it.)

An adapter (one per grammar engine) supplies the primitives: fill a packed mask, consume one
token, count the valid prefix of a token list, fork, roll back, and report errors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from draftwise.tree import DraftTree

__all__ = [
    "Constraint",
    "ConstraintError",
    "ConstraintSpec",
    "ConstraintStats",
    "ConstraintTimeout",
    "GrammarError",
    "apply_mask",
    "unpack_masks",
]

KINDS = ("json_schema", "regex", "grammar")
WHITESPACE = ("compact", "flexible")


class ConstraintError(ValueError):
    """A constraint could not be built or followed (the message quotes the grammar engine)."""


class GrammarError(ConstraintError):
    """The grammar, regex or schema is invalid, or uses a feature the engine does not support."""


class ConstraintTimeout(ConstraintError):
    """Compiling the grammar took longer than the allowed time."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What output must match.

    Attributes:
        kind: ``json_schema``, ``regex`` or ``grammar`` (Lark/EBNF text).
        source: the schema (JSON text), regex or grammar text.
        whitespace: JSON only: ``compact`` (the default) emits ``{"a": 1, "b": [2, 3]}`` with
            exactly one space after ``:`` and ``,`` and nowhere else, so a small model cannot loop
            on newlines; ``flexible`` allows any JSON whitespace.
    """

    kind: str
    source: str
    whitespace: str = "compact"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; one of {KINDS}")
        if self.whitespace not in WHITESPACE:
            raise ConstraintError(
                f"whitespace must be one of {WHITESPACE}, got {self.whitespace!r}"
            )


@dataclass
class ConstraintStats:
    """Attributes:
    compile_s: grammar compilation (0 when it came from the cache).
    masks: token masks computed; mask_s: their wall time.
    forced: tokens emitted because the grammar allowed only them.
    pruned: draft nodes removed because the grammar forbids them.
    """

    compile_s: float = 0.0
    cached: bool = False
    masks: int = 0
    mask_s: float = 0.0
    forced: int = 0
    pruned: int = 0

    @property
    def mask_us(self) -> float:
        """Mean microseconds per mask."""
        return 1e6 * self.mask_s / self.masks if self.masks else 0.0


class Constraint(ABC):
    """One request's grammar state; see the module docstring for the contract."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.words = (vocab_size + 31) // 32
        self.finished = False  # an EOS was committed
        self._here: torch.Tensor | None = None  # packed mask of the committed state, once known
        self.stats = ConstraintStats()

    # the part an adapter supplies ---------------------------------------------------------------

    @abstractmethod
    def _fill(self, row: torch.Tensor) -> None:
        """Write the packed mask (``int32[words]``, bit ``t % 32`` of word ``t // 32``) of the
        current state into ``row``."""

    @abstractmethod
    def _consume(self, token: int) -> None:
        """Advance by ``token`` (already known to be allowed)."""

    @abstractmethod
    def _rollback(self, count: int) -> None:
        """Undo the last ``count`` consumed tokens."""

    @abstractmethod
    def _fork(self) -> Constraint:
        """An independent copy of the current state (sharing ``stats``)."""

    @abstractmethod
    def _valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` the grammar accepts in a row from the current state (no
        state change)."""

    @abstractmethod
    def error(self) -> str:
        """The engine's error message, or "" when the state is healthy."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """The tokens so far form a complete match (EOS may come next)."""

    # the contract -------------------------------------------------------------------------------

    def _masks(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.words, dtype=torch.int32)

    def _timed_fill(self, row: torch.Tensor) -> None:
        import time

        start = time.perf_counter()
        self._fill(row)
        self.stats.mask_s += time.perf_counter() - start
        self.stats.masks += 1
        self._check()

    def _check(self) -> None:
        message = self.error()
        if message:
            raise ConstraintError(f"the grammar engine stopped: {message}")

    def _committed_row(self) -> torch.Tensor:
        """The packed mask of the committed state, computed once per state (each step needs it
        in :meth:`forced` and again as the root row of :meth:`tree_masks`)."""
        if self._here is None:
            self._here = self._masks(1)[0]
            self._timed_fill(self._here)
        return self._here

    def mask(self) -> torch.Tensor:
        """``[vocab]`` bool: tokens allowed next after the committed tokens."""
        return unpack_masks(self._committed_row()[None], self.vocab_size)[0]

    def allows(self, packed_row: torch.Tensor, token: int) -> bool:
        return 0 <= token < self.vocab_size and bool(
            (int(packed_row[token >> 5]) >> (token & 31)) & 1
        )

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that are, one after another, the only token the grammar allows."""
        tokens: list[int] = []
        state: Constraint | None = None
        while len(tokens) < limit:
            if state is None:
                row = self._committed_row()
            else:
                row = self._masks(1)[0]
                state._timed_fill(row)
            nonzero = torch.nonzero(row).flatten()
            if len(nonzero) != 1:
                break
            word = int(nonzero[0])
            bits = int(row[word]) & 0xFFFFFFFF
            if bits & (bits - 1):
                break  # more than one bit set in that word
            token = word * 32 + bits.bit_length() - 1
            if token >= self.vocab_size:
                break
            tokens.append(token)
            if token in self.eos:
                break  # the end: never consumed (see commit)
            state = state or self._fork()
            state._consume(token)
            if state.error():
                break
        return tokens

    def prune(self, tree: DraftTree, after: Sequence[int] = ()) -> DraftTree:
        """Drop the draft nodes the grammar forbids (cheap: no masks), with their subtrees and
        everything after an EOS; forbidden nodes carrying ``draft_probs`` stay, as leaves (see
        :meth:`tree_masks`). A pre-filter: a mask may still forbid a node this keeps (e.g. a
        non-canonical tokenization of text the grammar forces), so :meth:`tree_masks` decides.
        ``after``: tokens (allowed, no EOS) between the committed state and the tree's root,
        e.g. forced tokens."""
        if len(tree) == 0:
            return tree
        state: Constraint = self
        if after:
            state = self._fork()
            for token in after:
                state._consume(int(token))
        valid = [False] * len(tree)
        for leaf in tree.leaves():
            path = tree.path_to(leaf)
            tokens = [tree.tokens[n] for n in path]
            end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), len(tokens))
            count = state._valid_prefix(tokens[:end])
            for node in path[:count]:
                valid[node] = True
        state._check()

        def reachable(node: int) -> bool:  # the verifier may visit it: its parent was kept
            parent = tree.parents[node]
            return parent < 0 or (valid[parent] and tree.tokens[parent] not in self.eos)

        sampled = tree.draft_probs is not None
        keep = [i for i in range(len(tree)) if valid[i] or (sampled and reachable(i))]
        self.stats.pruned += len(tree) - len(keep)
        return tree if len(keep) == len(tree) else tree.subset(keep)

    def tree_masks(self, tree: DraftTree) -> tuple[DraftTree, torch.Tensor]:
        """Prune ``tree`` to what the grammar allows; masks of the root and each kept node.

        Returns ``(kept tree, masks: [kept + 1, vocab] bool)``: row 0 is the root's mask, row
        ``i + 1`` the mask after kept node ``i``. A forbidden node that carries ``draft_probs`` is
        kept as a leaf (its row allows everything and is never used): the rejection rule must still
        reject it and take its residual, or later siblings drawn from the draft would be verified
        against the wrong distribution. Every other forbidden node goes, with its subtree.
        """
        children = tree.children_map()
        packed = self._masks(len(tree) + 1)
        keep: list[int] = []
        forbidden: set[int] = set()

        def walk(node: int, state: Constraint) -> None:
            if node < 0:
                packed[0] = self._committed_row()
            else:
                state._timed_fill(packed[node + 1])
            row = packed[node + 1]
            allowed: list[int] = []
            for child in children.get(node, ()):
                token = tree.tokens[child]
                if self.allows(row, token):
                    keep.append(child)
                    if token in self.eos:
                        packed[child + 1] = -1  # nothing follows EOS; its row is never used
                    else:
                        allowed.append(child)  # its subtree is walked below
                elif tree.draft_probs is not None:
                    keep.append(child)
                    forbidden.add(child)
            for i, child in enumerate(allowed):
                # the last child may take the node's own state: nobody needs it after
                branch = state if i == len(allowed) - 1 else state._fork()
                branch._consume(tree.tokens[child])
                walk(child, branch)

        walk(-1, self._fork())
        self._check()
        keep.sort()
        masks = unpack_masks(packed[[0] + [k + 1 for k in keep]], self.vocab_size)
        for i, node in enumerate(keep):
            if node in forbidden:
                masks[i + 1] = True
        kept = tree if len(keep) == len(tree) else tree.subset(keep)
        return kept, masks

    def commit(self, tokens: Sequence[int]) -> None:
        """Advance the committed state by ``tokens``; each must be allowed (checked without
        computing masks). An EOS ends the grammar's part: it is checked, never consumed."""
        tokens = [int(t) for t in tokens]
        end = next((i for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        body = tokens[:end]
        valid = self._valid_prefix(body)
        if valid < len(body):
            raise ConstraintError(f"token {body[valid]} is not allowed by the grammar here")
        if end < len(tokens):
            state = self._fork()
            for token in body:
                state._consume(token)
            row = self._masks(1)[0]
            state._timed_fill(row)
            if not self.allows(row, tokens[end]):
                raise ConstraintError("the grammar does not allow the output to end here")
        if body:
            self._here = None
        for token in body:
            self._consume(token)
        self._check()
        if end < len(tokens):
            # EOS is never consumed: matchers disagree on whether consuming it can be undone
            self.finished = True

    def fork(self) -> Constraint:
        """An independent copy of this state (e.g. to explore continuations)."""
        return self._fork()

    def rollback(self, count: int) -> None:
        """Undo the last ``count`` committed tokens (the engine never needs this: it explores
        on forks)."""
        self._here = None
        self._rollback(count)
        self._check()


def unpack_masks(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``int32[rows, words]`` packed masks -> ``bool[rows, vocab_size]``."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (packed.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]
    return unpacked.reshape(packed.shape[0], -1)[:, :vocab_size].bool()


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Forbidden tokens get logit ``-inf``; ``allowed`` may be narrower than ``logits`` (model
    vocabularies are often padded past the tokenizer's), the extra columns are forbidden."""
    if allowed.shape[-1] < logits.shape[-1]:
        extra = logits.shape[-1] - allowed.shape[-1]
        pad = torch.zeros(*allowed.shape[:-1], extra, dtype=torch.bool)
        allowed = torch.cat([allowed, pad], dim=-1)
    return logits.masked_fill(~allowed, float("-inf"))
