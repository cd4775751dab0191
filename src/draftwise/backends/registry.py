"""Backends by name, like the drafters' registry: ``make_backend(model, "fast", cache_dir)``.

Each backend registers a builder ``(model, cache_dir, exact, progress) -> KVBackend`` under a
name with a line of help; :func:`make_backend` resolves ``auto`` and reports unknown names with
the list. Whatever needs a backend for a model it loaded itself (a draft-model drafter, the
bench) calls :func:`make_backend`, so nothing below the face imports ``api.py``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from draftwise.backends.base import KVBackend

__all__ = ["auto_backend", "available_backends", "backend_help", "make_backend",
           "register_backend"]

Builder = Callable[[Any, Path, bool, bool], KVBackend]
_BACKENDS: dict[str, tuple[Builder, str]] = {}


def register_backend(name: str, help: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _BACKENDS[name] = (builder, help)
        return builder

    return add


def available_backends() -> tuple[str, ...]:
    """``auto`` and every registered backend name."""
    return ("auto", *_BACKENDS)


def backend_help() -> str:
    """One line per backend, for ``--backend``'s help."""
    lines = [f"{name}: {help}" for name, (_, help) in _BACKENDS.items()]
    return "; ".join(lines) + ("; auto: quant for a GGUF file where its kernels build here, "
                               "else fast where it supports the model, else hf")


def make_backend(
    model: Any, name: str, cache_dir: Path, *, exact: bool = False, progress: bool = True
) -> KVBackend:
    """The backend ``name`` for ``model`` (a :class:`~draftwise.models.LoadedModel`).

    ``auto``: for a GGUF file, the quant backend where its kernels can be built here and it
    implements the family; otherwise the fast backend where it implements the family; else
    transformers."""
    if name == "auto":
        name = auto_backend(model)
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[name][0](model, cache_dir, exact, progress)


def auto_backend(model: Any) -> str:
    """What ``auto`` resolves to for ``model`` on this machine."""
    from draftwise.backends.fast import UnsupportedModelError, check_config

    try:
        check_config(model.config)
    except UnsupportedModelError:
        return "hf"
    if str(model.source).lower().endswith(".gguf"):
        from draftwise.backends.quant import kernels_unavailable

        if kernels_unavailable() is None:
            return "quant"
    return "fast"


@register_backend("hf", "transformers, any causal LM")
def _hf(model: Any, cache_dir: Path, exact: bool, progress: bool) -> KVBackend:
    from draftwise.backends.hf import HFBackend

    if exact:
        raise ValueError("exact verification is a fast-backend mode: add --backend fast")
    return HFBackend(model.model)


@register_backend("fast", "compact Llama/Qwen2 forward with matrix kernels chosen for this "
                  "machine (tuned once, cached)")
def _fast(model: Any, cache_dir: Path, exact: bool, progress: bool) -> KVBackend:
    from draftwise.backends.fast import FastBackend
    from draftwise.backends.kernels import KernelChoice
    from draftwise.machine import machine_key

    ident = f"{model.source}|{model.model.dtype}|{machine_key()}"
    path = cache_dir / "kernels" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return FastBackend(model.model, kernels=KernelChoice.load(path), exact=exact)
    choice = KernelChoice()
    backend = FastBackend(model.model, kernels=choice, exact=exact)
    if progress:
        print("draftwise: choosing matrix kernels for this machine once (cached)", file=sys.stderr)
    backend.tune(progress=progress)
    choice.save(path)
    return backend


@register_backend("quant", "the fast forward on a GGUF file's own 4/6/8-bit blocks with C++ "
                  "kernels (built once, cached)")
def _quant(model: Any, cache_dir: Path, exact: bool, progress: bool) -> KVBackend:
    from draftwise.backends.quant import (
        KernelsUnavailable,
        QuantBackend,
        float32_summary,
        load_kernels,
    )

    if not str(model.source).lower().endswith(".gguf"):
        raise ValueError(
            f"--backend quant runs GGUF files; {model.source} is not one (use fast or hf)"
        )
    ops, reason = None, None
    try:
        ops = load_kernels(cache_dir, progress)
    except KernelsUnavailable as error:
        reason = str(error)
        print(f"draftwise: quantized kernels unavailable ({reason}): running on float32 "
              "copies of the weights, at the fast backend's speed", file=sys.stderr)
    backend = QuantBackend(model.source, model.config, ops=ops, slow_reason=reason,
                           exact=exact)
    if backend.capabilities.float32_tensors:
        print("draftwise: no quantized kernel for "
              + float32_summary(backend.capabilities.float32_tensors)
              + ": those tensors run in float32", file=sys.stderr)
    return backend
