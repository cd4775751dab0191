"""Drafter contract and the registry of drafters by name.

A drafter guesses future tokens. Its lifecycle per request is ``begin(prompt_ids)``, then per step
``propose(context) -> DraftTree`` and ``observe(step)``. It owns its state (tables, indexes, draft
models) and takes only its own frozen config dataclass. It never touches the engine loop, the KV
cache or the acceptance rule, so a drafter cannot make the output wrong — only slower.

Methods are looked up by name: ``create_drafter("pld:max_ngram=4,budget=16")`` builds the
registered class with its config's fields parsed from the spec. There is no ``if method == ...``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree
from draftwise.verify import Acceptance

__all__ = [
    "Drafter",
    "StepResult",
    "TargetBound",
    "UnknownMethodError",
    "register",
    "create_drafter",
    "drafter_config",
    "available_methods",
    "file_options",
    "keeps_second_model",
    "parse_method",
]


class UnknownMethodError(ValueError):
    """A method name or method option that no registered drafter has."""


@dataclass(frozen=True)
class StepResult:
    """What a drafter may learn from one verified step.

    Attributes:
        tree: the tree that was verified.
        acceptance: which nodes were accepted and which tokens were emitted.
        logits: ``[N + 1, vocab]`` target logits (row 0 = root, row i + 1 = node i).
        hidden: the target's final-normed hidden state that predicted the step's last token
            (the new root), where the backend keeps it (fast, quant); else None.
    """

    tree: DraftTree
    acceptance: Acceptance
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class Drafter(Protocol):
    """Proposes draft trees; learns from verified steps."""

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        """Start a request whose committed tokens are ``prompt_ids``, decoded with
        ``sampling`` (model drafters draft with the same transforms as the target)."""
        ...

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        """A tree below the last token of ``context`` (prompt + output), no deeper than
        ``max_depth`` levels."""
        ...

    def observe(self, step: StepResult) -> None:
        """Called after each verified step, with the tokens it committed."""
        ...


@runtime_checkable
class TargetBound(Protocol):
    """A drafter that needs the target before its first request (model drafters)."""

    def attach(self, target: Any, target_backend: Any) -> None:
        """Receive the target's :class:`~draftwise.models.LoadedModel` and backend; raise
        if the drafter cannot serve this target (e.g. another vocabulary)."""
        ...


_Factory = Callable[[Any], Drafter]


@dataclass(frozen=True)
class _Entry:
    config_class: type[Any]
    factory: _Factory
    summary: str
    second_model: bool


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str, config_class: type[Any], summary: str, *, second_model: bool = False
) -> Callable[[_Factory], _Factory]:
    """Class decorator: register a drafter built from ``config_class`` under ``name``.

    ``second_model``: the drafter keeps a second model or cache of its own per request (a
    draft model, a layer-skipping copy): a server refuses it for its clients."""

    def wrap(factory: _Factory) -> _Factory:
        if name in _REGISTRY:
            raise ValueError(f"drafter {name!r} registered twice")
        _REGISTRY[name] = _Entry(config_class, factory, summary, second_model)
        return factory

    return wrap


def file_options(name: str) -> frozenset[str]:
    """The options of the registered drafter ``name`` that name a file or folder (declared with
    ``field(metadata={"file": True})`` in its config): a server never lets a client set them."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}")
    return frozenset(f.name for f in dataclasses.fields(_REGISTRY[name].config_class)
                     if f.metadata.get("file"))


def keeps_second_model(name: str) -> bool:
    """Whether the registered drafter ``name`` keeps a model or cache of its own per request
    (declared at registration; see :func:`register`)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}")
    return _REGISTRY[name].second_model


def available_methods() -> dict[str, str]:
    """``{name: one-line summary}`` of every registered drafter."""
    _load_builtin()
    return {name: entry.summary for name, entry in sorted(_REGISTRY.items())}


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """``"pld:budget=16,max_ngram=4"`` -> ``("pld", {"budget": "16", "max_ngram": "4"})``."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UnknownMethodError(f"method option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def create_drafter(spec: str, **overrides: Any) -> Drafter:
    """Build the drafter a method spec names, e.g. ``"pld"`` or ``"pld:budget=16"``."""
    config = drafter_config(spec, **overrides)  # validates the name and the options first
    return _REGISTRY[parse_method(spec)[0]].factory(config)


def drafter_config(spec: str, **overrides: Any) -> Any:
    """The validated config a method spec describes, without building the drafter (which
    may load a model)."""
    _load_builtin()
    name, options = parse_method(spec)
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownMethodError(f"unknown method {name!r}; available: {known}")
    config_class = _REGISTRY[name].config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in fields:
            raise UnknownMethodError(
                f"method {name!r} has no option {key!r}; options: {', '.join(fields) or 'none'}"
            )
        values[key] = _coerce(raw, hints[key], f"{name}:{key}")
    values.update(overrides)
    return config_class(**values)


def _coerce(raw: str, hint: Any, where: str) -> Any:
    """Parse a method option string into its config field's type."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", ""):
            return None
        hint = args[0]
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
        if typing.get_origin(hint) is tuple:
            return tuple(part for part in raw.split("+") if part)
    except ValueError as error:
        raise UnknownMethodError(f"{where}: cannot read {raw!r} as {hint.__name__}") from error
    raise UnknownMethodError(f"{where}: option of type {hint} cannot be set from text")


def _load_builtin() -> None:
    """Import the built-in drafter modules so they register themselves."""
    import draftwise.drafters.aded  # noqa: F401
    import draftwise.drafters.composite  # noqa: F401
    import draftwise.drafters.heads  # noqa: F401
    import draftwise.drafters.lookahead  # noqa: F401
    import draftwise.drafters.ngram  # noqa: F401
    import draftwise.drafters.recycling  # noqa: F401
    import draftwise.drafters.retrieval  # noqa: F401
    import draftwise.drafters.self_spec  # noqa: F401
    import draftwise.drafters.suffix  # noqa: F401
