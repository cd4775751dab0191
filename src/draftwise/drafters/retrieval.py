"""Retrieval drafting (REST, He et al. 2024): continuations of the context found in a datastore.

A datastore is a corpus tokenized once with the target's tokenizer and saved with a suffix array
(``.npz``: ``tokens`` — documents separated by -1 — and ``suffixes``, the start positions sorted
by their next ``key_length`` tokens). Drafting looks up the longest suffix of the context (from
``max_ngram`` down to ``min_ngram`` tokens) by binary search, gathers the continuations of up to
``max_occurrences`` matches, and merges the most frequent into a tree (a counting trie, best-first
by count), as REST does.

Building needs the tokenizer, so it lives in :func:`build_datastore` (``draftwise datastore``);
the drafter itself only reads token ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from draftwise.drafters.base import StepResult, register
from draftwise.drafters.trie import CountingTrie
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["Datastore", "RetrievalConfig", "RetrievalDrafter", "build_datastore", "read_corpus"]


class DatastoreError(ValueError):
    """A datastore or corpus file is missing or malformed."""


class Datastore:
    """Tokens plus a suffix array truncated to ``key_length`` tokens."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray, key_length: int) -> None:
        self.tokens = tokens  # [T] int32, -1 between documents
        self.suffixes = suffixes  # [S] int64 start positions, sorted by their next key tokens
        self.key_length = key_length

    @classmethod
    def build(cls, documents: Iterable[Sequence[int]], key_length: int = 8) -> Datastore:
        pieces: list[int] = []
        for doc in documents:
            pieces.extend(int(t) for t in doc)
            pieces.append(-1)
        tokens = np.asarray(pieces, dtype=np.int32)
        padded = np.concatenate([tokens, np.full(key_length, -1, dtype=np.int32)])
        starts = np.nonzero(tokens >= 0)[0]
        keys = [padded[starts + j] for j in reversed(range(key_length))]  # primary key last
        order = np.lexsort(keys) if len(starts) else np.zeros(0, dtype=np.int64)
        return cls(tokens, starts[order].astype(np.int64), key_length)

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, suffixes=self.suffixes, key_length=self.key_length)

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        file = Path(path)
        if not file.is_file():
            raise DatastoreError(
                f"no datastore at {str(file)!r}: build one with 'draftwise datastore CORPUS "
                "--out FILE.npz'"
            )
        try:
            with np.load(file) as data:
                return cls(data["tokens"], data["suffixes"], int(data["key_length"]))
        except (OSError, KeyError, ValueError) as error:
            raise DatastoreError(f"{file} is not a draftwise datastore: {error}") from error

    def _key(self, start: int, n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in self.tokens[start : start + n])

    def matches(self, suffix: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)`` range of ``suffixes`` whose next tokens start with ``suffix``."""
        n = len(suffix)
        target = tuple(int(t) for t in suffix)
        lo, hi = 0, len(self.suffixes)
        while lo < hi:  # first key >= target
            mid = (lo + hi) // 2
            if self._key(int(self.suffixes[mid]), n) < target:
                lo = mid + 1
            else:
                hi = mid
        first, hi = lo, len(self.suffixes)
        while lo < hi:  # first key > target
            mid = (lo + hi) // 2
            if self._key(int(self.suffixes[mid]), n) <= target:
                lo = mid + 1
            else:
                hi = mid
        return first, lo


@dataclass(frozen=True)
class RetrievalConfig:
    """Attributes:
    datastore: path of a datastore built by 'draftwise datastore'.
    max_ngram: longest context suffix looked up (<= the datastore's key length).
    min_ngram: shortest suffix looked up.
    depth: longest continuation taken from a match.
    max_occurrences: most matches whose continuations are counted.
    budget: most draft nodes.
    """

    datastore: str = field(default="", metadata={"file": True})
    max_ngram: int = 6
    min_ngram: int = 2
    depth: int = 6
    max_occurrences: int = 64
    budget: int = 16

    def __post_init__(self) -> None:
        if not self.datastore:
            raise ValueError(
                "retrieval needs datastore=PATH (build one with 'draftwise datastore')"
            )
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}")
        for name in ("depth", "max_occurrences", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@register("retrieval", RetrievalConfig, "REST: continuations from a datastore (suffix array)")
class RetrievalDrafter:
    def __init__(self, config: RetrievalConfig) -> None:
        self.config = config
        self.store = Datastore.load(config.datastore)
        if config.max_ngram > self.store.key_length:
            raise ValueError(
                f"max_ngram {config.max_ngram} exceeds the datastore's key length "
                f"{self.store.key_length}"
            )

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        pass

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        cfg, store = self.config, self.store
        depth = min(cfg.depth, max_depth)
        if depth <= 0:
            return DraftTree.empty()
        for n in range(min(cfg.max_ngram, len(context)), cfg.min_ngram - 1, -1):
            lo, hi = store.matches(context[len(context) - n :])
            if hi <= lo:
                continue
            trie = CountingTrie(depth)
            for start in store.suffixes[lo : min(hi, lo + cfg.max_occurrences)]:
                begin = int(start) + n
                continuation = store.tokens[begin : begin + depth]
                cut = np.nonzero(continuation < 0)[0]
                if len(cut):
                    continuation = continuation[: cut[0]]
                if len(continuation):
                    trie.count_path(continuation.tolist())
            return trie.draft([], cfg.budget, depth, max_prefix=0, min_prefix=0)
        return DraftTree.empty()

    def observe(self, step: StepResult) -> None:
        pass


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a corpus: a ``.jsonl`` file (each line's ``text``, or its ``turns``
    joined) or any other text file (blank-line-separated paragraphs)."""
    file = Path(path)
    if not file.is_file():
        raise DatastoreError(f"no corpus at {str(file)!r}")
    text = file.read_text("utf-8")
    if file.suffix.lower() != ".jsonl":
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = record.get("text") if "text" in record else "\n".join(record["turns"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise DatastoreError(f"{file}, line {number}: needs 'text' or 'turns'") from error
        if not isinstance(value, str):
            raise DatastoreError(f"{file}, line {number}: 'text' must be a string")
        documents.append(value)
    return documents


def build_datastore(
    documents: Iterable[str], encode: Callable[[str], list[int]], out: Path, key_length: int = 8
) -> Datastore:
    store = Datastore.build((encode(doc) for doc in documents), key_length)
    store.save(out)
    return store
