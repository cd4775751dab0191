"""Structured output: grammars as token masks over draft trees (see :mod:`.base`)."""

from draftwise.constraints.base import (
    Constraint,
    ConstraintError,
    ConstraintSpec,
    ConstraintStats,
    ConstraintTimeout,
    GrammarError,
    apply_mask,
    unpack_masks,
)
from draftwise.constraints.llg import Compiler, byte_tokenizer, check_grammar
from draftwise.constraints.spec import check_output, constraint_spec

__all__ = [
    "Compiler",
    "Constraint",
    "ConstraintError",
    "ConstraintSpec",
    "ConstraintStats",
    "ConstraintTimeout",
    "GrammarError",
    "apply_mask",
    "byte_tokenizer",
    "check_grammar",
    "check_output",
    "constraint_spec",
    "unpack_masks",
]
