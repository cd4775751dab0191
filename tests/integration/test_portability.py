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
