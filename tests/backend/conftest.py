"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest

from draftwise.backends.quant import kernels_unavailable, load_kernels


@pytest.fixture(scope="module")
def ops() -> object:
    """The quantized kernels, built once per machine (skips where they cannot build)."""
    reason = kernels_unavailable()
    if reason:
        pytest.skip(f"quantized kernels cannot be built here: {reason}")
    from draftwise.models import default_cache_dir

    return load_kernels(default_cache_dir(), progress=False)
