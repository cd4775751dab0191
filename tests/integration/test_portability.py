"""The float64 exactness suite gives the same verdicts on every x86 instruction set.

torch picks its vector kernels at run time (AVX-512, AVX2 or none) and honours
``ATEN_CPU_CAPABILITY``; MKL honours ``MKL_ENABLE_INSTRUCTIONS``. Running the tree-forward and
exactness tests in a child process under each narrower capability catches a tolerance that only
holds by luck of one CPU's rounding (the suite once failed on AVX2-only machines that way).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ["tests/backend/test_tree_forward.py", "tests/integration/test_exactness.py",
         "tests/backend/test_fast_backend.py"]
CHILD = "DRAFTWISE_PORTABILITY_CHILD"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(CHILD) == "1", reason="already inside the portability run")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_exactness_suite_passes_on_narrower_instruction_sets(capability: str) -> None:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MKL_ENABLE_INSTRUCTIONS="AVX2",
               **{CHILD: "1"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(CHILD) == "1", reason="already inside the portability run")
@pytest.mark.parametrize("isa", ["avx2", "avx-vnni", "avx512-vnni"])
def test_quant_kernels_pass_on_every_build(isa: str) -> None:
    """The quantized kernels are built for the widest instruction set the CPU has (AVX-512
    VNNI with AMX tiles, AVX-512 VNNI, AVX-VNNI or AVX2); each narrower build this CPU can run
    passes the quant tests too.
    (A build the CPU lacks falls back to the next narrower one.)"""
    from draftwise.backends.quant import kernels_unavailable

    if kernels_unavailable():
        pytest.skip(f"quantized kernels cannot be built here: {kernels_unavailable()}")
    env = dict(os.environ, DRAFTWISE_QUANT_ISA=isa, **{CHILD: "1"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/backend/test_quant_backend.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]
