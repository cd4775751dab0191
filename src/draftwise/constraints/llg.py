"""The llguidance adapter: JSON Schema, regex and Lark grammars as :class:`Constraint` s.

llguidance (PyPI ``llguidance``) compiles a grammar against a tokenizer into a matcher that gives
token masks in tens of microseconds, consumes tokens and rolls them back. This module adds what
draftwise promises around it:

* a :class:`Compiler` per tokenizer that caches compiled grammars by (kind, source, whitespace):
  a request gets a cheap ``deep_copy`` of the cached matcher, sharing the compiled grammar;
* a compile timeout (the compile runs in a daemon thread; llguidance drops the GIL while it builds);
* no silent approximations: an invalid grammar, a regex that does not parse, or a JSON Schema
  keyword llguidance does not implement raises :class:`GrammarError` quoting llguidance's message
  (its ``lenient`` mode, which ignores such keywords, is never switched on);
* compact JSON whitespace by default (see :class:`ConstraintSpec`).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from draftwise.constraints.base import (
    Constraint,
    ConstraintError,
    ConstraintSpec,
    ConstraintTimeout,
    GrammarError,
)

__all__ = ["Compiler", "LLGuidanceConstraint", "byte_tokenizer", "check_grammar"]

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FLEXIBLE = {"whitespace_flexible": True}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as error:  # pragma: no cover - it is a dependency
        raise ConstraintError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from error
    return llguidance


def _one_line(message: str) -> str:
    """llguidance's messages draw carets over several lines; errors here are one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _refusal(spec: ConstraintSpec, message: str) -> GrammarError:
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[spec.kind]
    return GrammarError(f"invalid or unsupported {what}: llguidance says: {_one_line(message)}")


def check_grammar(spec: ConstraintSpec) -> None:
    """Raise :class:`GrammarError` for a spec that cannot compile for any tokenizer (syntax,
    unsupported keywords) — cheap, so callers can fail before loading a model."""
    llg = _llguidance()
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(_grammar(spec))
    if failed:
        raise _refusal(spec, "; ".join(messages))


def _grammar(spec: ConstraintSpec) -> str:
    """llguidance's grammar text for ``spec`` (not yet validated)."""
    llg = _llguidance()
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as error:
            raise GrammarError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object or a boolean")
        options = COMPACT if spec.whitespace == "compact" else FLEXIBLE
        try:
            return str(llg.LLMatcher.grammar_from_json_schema(schema, defaults=options))
        except ValueError as error:
            raise GrammarError(f"llguidance: {_one_line(str(error))}") from None
    if spec.kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(spec.source))
    source = spec.source
    if "::=" in source:  # GBNF (llama.cpp's EBNF dialect): llguidance converts it to Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            source = gbnf_to_lark(source)
        except Exception as error:  # noqa: BLE001 - quoted to the user
            raise GrammarError(
                f"llguidance could not read the GBNF grammar: {_one_line(str(error))}"
            ) from None
    return str(llg.LLMatcher.grammar_from_lark(source))


class LLGuidanceConstraint(Constraint):
    """One request's llguidance matcher behind the :class:`Constraint` contract."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        super().__init__(vocab_size, eos_token_ids)
        self.matcher = matcher

    def _fill(self, row: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"llguidance refused token {token}: {self.matcher.get_error()}")

    def _rollback(self, count: int) -> None:
        if count and not self.matcher.rollback(count):
            raise ConstraintError(f"llguidance could not roll back {count} tokens")

    def _fork(self) -> LLGuidanceConstraint:
        fork = LLGuidanceConstraint(self.matcher.deep_copy(), self.vocab_size, sorted(self.eos))
        fork.stats = self.stats
        return fork

    def _valid_prefix(self, tokens: Sequence[int]) -> int:
        return int(self.matcher.validate_tokens(list(tokens))) if tokens else 0

    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""

    def is_accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


class Compiler:
    """Compiles :class:`ConstraintSpec` s for one tokenizer, caching the results.

    Parameters:
        tokenizer: a transformers fast tokenizer, an ``llguidance.LLTokenizer``, or an object
            llguidance's ``TokenizerWrapper`` accepts (``tokens``, ``eos_token_id``, callable).
        vocab_size: the model's vocabulary (logit columns); may exceed the tokenizer's.
        eos_token_ids: the tokens that end generation; the grammar allows them once it is complete.
        timeout_s: the most seconds one compilation may take.
        cache_size: compiled grammars kept (the least recently used go first), so that many
            distinct schemas cannot grow the cache without bound.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        timeout_s: float = 10.0,
        cache_size: int = 64,
    ) -> None:
        if not timeout_s > 0:
            raise ConstraintError(f"the compile timeout must be > 0 seconds, got {timeout_s}")
        self.source_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.timeout_s = timeout_s
        self._tokenizer: Any = None
        if cache_size < 1:
            raise ConstraintError(f"the grammar cache must hold >= 1 grammar, got {cache_size}")
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[ConstraintSpec, Any] = collections.OrderedDict()

    @property
    def tokenizer(self) -> Any:
        """The llguidance tokenizer (built on first use, ~0.4 s for a 49k vocabulary)."""
        if self._tokenizer is None:
            llg = _llguidance()
            tok = self.source_tokenizer
            eos = list(self.eos_token_ids) or None
            try:
                if isinstance(tok, llg.LLTokenizer):
                    self._tokenizer = tok
                elif hasattr(tok, "backend_tokenizer"):
                    from llguidance.hf import from_tokenizer

                    self._tokenizer = from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=eos)
                else:
                    self._tokenizer = llg.LLTokenizer(
                        llg.TokenizerWrapper(tok), n_vocab=self.vocab_size, eos_token=eos
                    )
            except Exception as error:  # noqa: BLE001 - quoted to the user
                raise ConstraintError(
                    f"llguidance cannot read this model's tokenizer (it needs each token's "
                    f"bytes): {_one_line(str(error))}"
                ) from None
        return self._tokenizer

    def is_cached(self, spec: ConstraintSpec) -> bool:
        """Whether ``spec`` is compiled already (:meth:`compile` then only copies it)."""
        return spec in self._cache

    def compile(self, spec: ConstraintSpec) -> LLGuidanceConstraint:
        """A fresh constraint for one request (compiled once per spec, then copied)."""
        template = self._cache.get(spec)
        elapsed, cached = 0.0, template is not None
        if template is None:
            _ = self.tokenizer  # built once per compiler; not part of a grammar's compile time
            start = time.perf_counter()
            template = self._compile(spec)
            elapsed = time.perf_counter() - start
            self._cache[spec] = template
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        constraint = LLGuidanceConstraint(
            template.deep_copy(), self.vocab_size, self.eos_token_ids
        )
        constraint.stats.compile_s, constraint.stats.cached = elapsed, cached
        return constraint

    def _compile(self, spec: ConstraintSpec) -> Any:
        llg = _llguidance()
        grammar = _grammar(spec)
        tokenizer = self.tokenizer
        outcome: dict[str, Any] = {}

        def build() -> None:
            try:
                failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
                if failed:
                    outcome["error"] = "; ".join(messages)
                    return
                matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
                if matcher.is_error():
                    outcome["error"] = matcher.get_error()
                    return
                outcome["matcher"] = matcher
            except Exception as error:  # noqa: BLE001 - quoted to the user
                outcome["error"] = str(error)

        worker = threading.Thread(target=build, name="draftwise-grammar-compile", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise ConstraintTimeout(
                f"compiling the {spec.kind.replace('_', ' ')} took longer than "
                f"{self.timeout_s:g} s; simplify it or raise the timeout"
            )
        if "error" in outcome:
            raise _refusal(spec, outcome["error"])
        return outcome["matcher"]


class _ByteTokens:
    """A byte-level vocabulary: token ``b`` is byte ``b`` (0..255), then special tokens."""

    def __init__(self, specials: Sequence[str]) -> None:
        self.tokens = [bytes([b]) for b in range(256)] + [s.encode() for s in specials]
        self.eos_token_id = 256
        self.bos_token_id = None
        self.special_token_ids = list(range(256, 256 + len(specials)))

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


def byte_tokenizer(specials: Sequence[str] = ("<eos>",)) -> _ByteTokens:
    """A byte-level tokenizer (ids 0..255 are bytes, 256.. the ``specials``, 256 = EOS) that
    :class:`Compiler` accepts: the exact, tokenization-free view of a grammar, for tests."""
    return _ByteTokens(specials)
