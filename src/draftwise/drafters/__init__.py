"""Drafters: everything that proposes draft trees, registered by name."""

from draftwise.drafters.base import (
    Drafter,
    StepResult,
    UnknownMethodError,
    available_methods,
    create_drafter,
    parse_method,
    register,
)

__all__ = [
    "Drafter",
    "StepResult",
    "UnknownMethodError",
    "available_methods",
    "create_drafter",
    "parse_method",
    "register",
]
