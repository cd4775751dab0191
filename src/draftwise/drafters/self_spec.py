"""Registered model drafters: ``draft`` (a second, smaller model) and ``self`` (layer skipping).

Both are :class:`~draftwise.drafters.draft_model.ModelDrafter` s that need the target before the
first request: :meth:`attach` receives the target's loaded model and backend (the
:class:`~draftwise.api.Generator` calls it).

``self`` drafts with the target itself minus a set of layers (the idea of SWIFT, Draft & Verify
and Kangaroo: a shallow sub-network of the model, no trained adapter), sharing the target's
weights through :meth:`~draftwise.backends.decoder.DecoderBackend.skipping`. The skipped set is
chosen on the fly: the first requests try each candidate set for ``trial_steps`` steps and keep
the one with the most committed tokens per unit of cost, where a step costs one target pass plus
each draft pass's share of the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from draftwise.drafters.base import StepResult, register
from draftwise.drafters.draft_model import ModelDrafter, check_same_vocabulary
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["DraftConfig", "DraftDrafter", "SelfSpecConfig", "SelfSpecDrafter", "skip_candidates"]


@dataclass(frozen=True)
class DraftConfig:
    """Attributes:
    model: the draft model: 'default', a .gguf file or a transformers folder (same tokenizer).
    backend: backend of the draft model: auto, hf or fast.
    depth: most draft tokens per step (per path).
    width: candidates per level; > 1 drafts a tree (top-k, or Gumbel-top-k when sampling).
    stop_threshold: stop a chain once the next token's estimated rejection exceeds this (1 = off).
    dtype: the draft model's weights: float32, float64 or bfloat16.
    cache_dir: where converted models and tuned kernels are kept (default: ~/.cache/draftwise).
    """

    model: str = field(default="", metadata={"file": True})
    backend: str = "auto"
    depth: int = 5
    width: int = 1
    stop_threshold: float = 1.0
    dtype: str = "float32"
    cache_dir: str = field(default="", metadata={"file": True})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("draft needs a draft model: --draft MODEL (or draft:model=MODEL)")
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1, got {self.depth}, {self.width}")
        if not 0.0 < self.stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in (0, 1], got {self.stop_threshold}")
        if self.dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"dtype must be float32, float64 or bfloat16, got {self.dtype!r}")


@register("draft", DraftConfig, "a smaller draft model with the same tokenizer (--draft MODEL)",
          second_model=True)
class DraftDrafter(ModelDrafter):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config.depth, config.width, config.stop_threshold)
        from draftwise.backends.registry import make_backend
        from draftwise.models import default_cache_dir, load_model

        self.config = config
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.draft = load_model(config.model, cache_dir=cache, dtype=getattr(torch, config.dtype))
        self.backend = make_backend(self.draft, config.backend, cache)

    def attach(self, target: Any, target_backend: Any) -> None:
        """Check the draft shares the target's vocabulary (else :class:`DraftMismatchError`)."""
        check_same_vocabulary(self.draft, target, self.draft.name, target.name)


def skip_candidates(layers: int) -> list[frozenset[int]]:
    """Skipped-layer sets to try: evenly spread over the middle layers (the first and last two
    layers are always kept), skipping about a quarter, a third, and half of the layers."""
    middle = list(range(2, layers - 2))
    candidates = []
    for fraction in (0.25, 0.35, 0.5):
        count = min(len(middle), round(layers * fraction))
        if count <= 0:
            continue
        step = len(middle) / count
        chosen = frozenset(middle[int(i * step)] for i in range(count))
        if chosen not in candidates:
            candidates.append(chosen)
    return candidates


@dataclass(frozen=True)
class SelfSpecConfig:
    """Attributes:
    depth: most draft tokens per step.
    width: candidates per level (> 1 drafts a tree).
    stop_threshold: adaptive length threshold (1 = fixed length).
    skip: layers to skip, separated by '+' (empty = search on the fly).
    trial_steps: steps each candidate skipped set is tried during the search.
    """

    depth: int = 4
    width: int = 1
    stop_threshold: float = 1.0
    skip: tuple[str, ...] = ()
    trial_steps: int = 12

    def __post_init__(self) -> None:
        if self.depth < 1 or self.width < 1 or self.trial_steps < 1:
            raise ValueError("depth, width and trial_steps must be >= 1")
        if not 0.0 < self.stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in (0, 1], got {self.stop_threshold}")
        if any(not s.isdigit() for s in self.skip):
            raise ValueError(f"skip must list layer numbers, got {self.skip}")


@register("self", SelfSpecConfig, "self-speculation: the target with some layers skipped",
          second_model=True)
class SelfSpecDrafter(ModelDrafter):
    def __init__(self, config: SelfSpecConfig) -> None:
        super().__init__(config.depth, config.width, config.stop_threshold)
        self.config = config
        self.base: Any = None
        self.candidates: list[frozenset[int]] = []
        self.scores: dict[frozenset[int], list[float]] = {}
        self.chosen: frozenset[int] | None = None
        self._steps = 0
        self._drafted = False

    def attach(self, target: Any, target_backend: Any) -> None:
        """Build the shallow sub-network from the target's weights."""
        from draftwise.backends.decoder import DecoderBackend
        from draftwise.backends.fast import FastBackend

        self.base = (target_backend if isinstance(target_backend, DecoderBackend)
                     else FastBackend(target.model))
        layers = len(self.base.decoder.layers)
        if self.config.skip:
            self.candidates = [frozenset(int(s) for s in self.config.skip)]
        else:
            self.candidates = skip_candidates(layers)
        if not self.candidates:
            raise ValueError(f"a {layers}-layer model has no layers to skip")
        self.scores, self._steps = {}, 0
        self.chosen = self.candidates[0] if len(self.candidates) == 1 else None
        self._use(self.candidates[0])

    def _use(self, skip: frozenset[int]) -> None:
        self.current = skip
        self.backend = self.base.skipping(skip)
        self._tokens = []  # a new sub-network starts with an empty cache

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        super().begin(prompt_ids, sampling)
        if self.base is None:
            raise RuntimeError("self-speculation needs the target: attach() it first")

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        self._drafted = max_depth > 0
        if self.chosen is None:
            trial = min(self._steps // self.config.trial_steps, len(self.candidates) - 1)
            if self.candidates[trial] != self.current:
                self._use(self.candidates[trial])
        return super().propose(context, max_depth)

    def observe(self, step: StepResult) -> None:
        super().observe(step)
        if self.chosen is not None or not self._drafted:
            return  # a plain step (nothing asked of the draft) says nothing about the skip set
        layers = len(self.base.decoder.layers)
        share = (layers - len(self.current)) / layers  # a draft pass's cost in target passes
        cost = 1.0 + share * max(1, len(step.tree))
        self.scores.setdefault(self.current, []).append(len(step.acceptance.tokens) / cost)
        self._steps += 1
        if self._steps >= self.config.trial_steps * len(self.candidates):
            self.chosen = max(self.scores, key=lambda s: sum(self.scores[s]) /
                              len(self.scores[s]))
            self._use(self.chosen)
