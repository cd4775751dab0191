"""Methods: the one place a method spec is read, checked and built.

A *method spec* is ``NAME[:key=value,...][@BUDGET]``: a registered drafter with its config's
options (:mod:`draftwise.drafters`), and optionally the verification budget for this method
(``@auto``: each tree sized to what pays on this machine; ``@off``: the drafter's whole tree;
``@N``: the N likeliest nodes). ``--draft MODEL`` and ``--heads FILE`` on the command line are
folded into the spec (``draft:model=MODEL``, ``hydra:heads=FILE``).

:meth:`MethodSpec.parse` reads and validates a spec without loading anything (a bad spec fails
before the model loads); :class:`MethodBuilder` is the composition root: it turns a spec into the
``(drafter, sizer)`` pair an :class:`~draftwise.engine.Engine` runs, for one loaded model and
backend. :class:`~draftwise.api.Generator`, the server's scheduler, the CLI and the bench all
build methods here, so a method means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from draftwise.backends.base import KVBackend
from draftwise.cost import cached_step_cost
from draftwise.drafters.base import (
    TargetBound,
    UnknownMethodError,
    create_drafter,
    drafter_config,
    keeps_second_model,
    parse_method,
)
from draftwise.drafters.suffix import SUFFIX_TOKENS, SuffixCache
from draftwise.engine import Engine
from draftwise.machine import machine_key
from draftwise.sizing import CostCurve, SizingConfig, TreeSizer

__all__ = ["SUFFIX_TOKENS", "Budget", "MethodBuilder", "MethodSpec", "NotServableError",
           "parse_budget"]

Budget = int | str  # a node count, "auto" or "off"


class NotServableError(UnknownMethodError):
    """A method the server cannot run for its clients (it keeps a second model or cache per
    request)."""


def parse_budget(text: str | int | None) -> Budget:
    """``"auto"`` (cost-optimal), ``"off"`` (verify the drafter's whole tree) or a node count;
    None is ``"auto"``."""
    if text is None:
        return "auto"
    if isinstance(text, int) or text.strip().isdigit():
        value = int(text)
        if value < 0:
            raise ValueError(f"budget must be >= 0, got {value}")
        return value
    word = text.strip().lower()
    if word not in ("auto", "off"):
        raise ValueError(f"budget must be 'auto', 'off' or a node count, got {text!r}")
    return word


@dataclass(frozen=True)
class MethodSpec:
    """A validated method spec.

    Attributes:
        drafter: the drafter part, ``NAME[:key=value,...]`` (as written, options in order).
        budget: the spec's own ``@BUDGET``, or None where it names none (the caller's default
            applies: :meth:`budget_or`).
    """

    drafter: str
    budget: Budget | None = None

    @classmethod
    def parse(cls, text: str, *, draft: str | None = None,
              heads: str | None = None) -> MethodSpec:
        """Read and validate ``text`` (the drafter's name and options, and the budget) without
        building anything. ``draft``/``heads``: the command line's ``--draft``/``--heads``,
        folded into a ``draft``/``medusa``/``hydra`` spec that does not name its own.

        Raises :class:`~draftwise.drafters.UnknownMethodError` (unknown name or option, an
        option's value out of range) or ValueError (a bad budget)."""
        drafter, sep, at = text.strip().rpartition("@")
        if not sep:
            drafter, at = text.strip(), ""
        drafter = _fold_files(drafter, draft, heads)
        drafter_config(drafter)  # the name, each option's type and its config's own checks
        return cls(drafter, parse_budget(at) if sep else None)

    @property
    def name(self) -> str:
        """The drafter's registered name (``"pld"``)."""
        return parse_method(self.drafter)[0]

    @property
    def options(self) -> dict[str, str]:
        """The drafter's options as written (``{"max_ngram": "4"}``)."""
        return parse_method(self.drafter)[1]

    def budget_or(self, default: Budget) -> Budget:
        """The spec's budget, else ``default``."""
        return self.budget if self.budget is not None else default

    def __str__(self) -> str:
        return self.drafter if self.budget is None else f"{self.drafter}@{self.budget}"


def _fold_files(drafter: str, draft: str | None, heads: str | None) -> str:
    """``draft`` + ``--draft X`` -> ``draft:model=X``; ``medusa``/``hydra`` + ``--heads F`` ->
    ``hydra:heads=F`` (a spec naming its own model or heads wins)."""
    name, _, options = drafter.partition(":")
    for wanted, key, value in (("draft", "model", draft), ("medusa", "heads", heads),
                               ("hydra", "heads", heads)):
        if value is None or name.strip() != wanted or f"{key}=" in options:
            continue
        drafter += ("," if options else ":") + f"{key}={value}"
    return drafter


REMEMBER_INTERVAL_S = 5.0  # the most often a method's learned sizer state is written


class MethodBuilder:
    """Builds methods for one loaded model and backend.

    Parameters:
        model: the target's :class:`~draftwise.models.LoadedModel` (model drafters and draft
            heads attach to it).
        backend: the target's backend.
        budget: the verification budget for specs that name none.
        cache_dir: where this machine's step-cost curve is cached.
        cost: the step-cost curve to size with, if known (tests, a builder's copy); else it is
            measured on ``backend`` once per machine and cached, the first time a method sizes
            its trees automatically.
        remember: whether an automatically sized method starts from what the same method
            learned before on this model, backend and machine, in any process (kept in
            ``cache_dir/sizers``, one small file per method, written at the end of a request,
            at most once per :data:`REMEMBER_INTERVAL_S` per method).
        suffix_tokens: size of the cross-request suffix cache (earlier requests' outputs, per
            tenant, oldest evicted first) the ``suffix`` drafter drafts from; 0 turns it off.
    """

    def __init__(self, model: Any, backend: KVBackend, *, budget: Budget | str = "auto",
                 cache_dir: Path, cost: CostCurve | None = None, remember: bool = True,
                 suffix_tokens: int = SUFFIX_TOKENS) -> None:
        self.model = model
        self.backend = backend
        self.budget = parse_budget(budget)
        self.cache_dir = cache_dir
        self.remember = remember
        self._cost = cost
        self._written: dict[str, float] = {}  # method -> when its sizer was last written
        self.suffix = SuffixCache(suffix_tokens) if suffix_tokens > 0 else None

    def cost_curve(self) -> CostCurve:
        """This machine's step-cost curve for the model and backend (measured once, then
        cached in ``cache_dir``)."""
        if self._cost is None:
            caps = self.backend.capabilities
            key = f"{self.model.source}|{self.model.dtype}|{type(self.backend).__name__}"
            self._cost = CostCurve(cached_step_cost(self.backend, key + caps.cost_tag,
                                                    self.cache_dir))
        return self._cost

    def spec(self, method: MethodSpec | str) -> MethodSpec:
        return method if isinstance(method, MethodSpec) else MethodSpec.parse(method)

    def engine(self, method: MethodSpec | str, backend: Any = None) -> Engine:
        """A fresh :class:`Engine` running ``method`` on ``backend`` (default: the target's;
        a server passes its slot's region of the pool): its own drafter (attached to the
        target where it needs it) and sizer."""
        spec = self.spec(method)
        drafter = create_drafter(spec.drafter)
        if isinstance(drafter, TargetBound):
            drafter.attach(self.model, self.backend)
        sizer = self.sizer(spec)
        learned = (partial(self._keep, spec) if sizer is not None and self.remember
                   and sizer.config.budget is None else None)
        return Engine(backend if backend is not None else self.backend, drafter, sizer,
                      learned=learned, suffix=self.suffix)

    def sizer(self, spec: MethodSpec) -> TreeSizer | None:
        """The spec's tree sizer: None for plain decoding and ``@off``; a pinned node count;
        or cost-optimal sizing on this machine's step-cost curve."""
        budget = spec.budget_or(self.budget)
        if spec.name == "none" or budget == "off":
            return None
        if isinstance(budget, int):
            return TreeSizer(SizingConfig(budget=budget))
        sizer = TreeSizer(SizingConfig(), self.cost_curve())
        if self.remember:
            with contextlib.suppress(OSError, ValueError):  # nothing kept, or not readable
                sizer.restore(json.loads(self._learned_file(spec).read_text()))
        return sizer

    def _learned_file(self, spec: MethodSpec) -> Path:
        caps = self.backend.capabilities
        ident = (f"{self.model.source}|{self.model.dtype}|{type(self.backend).__name__}"
                 f"{caps.cost_tag}|{machine_key()}|{spec.drafter}")
        return self.cache_dir / "sizers" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"

    def _keep(self, spec: MethodSpec, sizer: TreeSizer) -> None:
        """Write what ``sizer`` learned for the next process (see ``remember``); a cache that
        cannot be written only loses the carry-over."""
        key, now = str(spec), time.monotonic()
        if now - self._written.get(key, -REMEMBER_INTERVAL_S) < REMEMBER_INTERVAL_S:
            return
        self._written[key] = now
        path = self._learned_file(spec)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(sizer.snapshot()))
            temporary.replace(path)  # whole or not at all, whoever writes last

    def check_servable(self, method: MethodSpec | str) -> MethodSpec:
        """The spec, if the server can run it for a client: a training-free drafter, or draft
        heads on the target's own weights (which must fit this model). Raises
        :class:`NotServableError` for methods that keep a second model or cache per request."""
        spec = self.spec(method)
        if keeps_second_model(spec.name):  # refused before anything is built or loaded
            raise NotServableError(
                f"method {spec.name!r} drafts with a second model or cache; the server runs "
                "training-free methods and draft heads")
        drafter = create_drafter(spec.drafter)
        if isinstance(drafter, TargetBound):
            drafter.attach(self.model, self.backend)  # draft heads: their file must fit
        return spec
