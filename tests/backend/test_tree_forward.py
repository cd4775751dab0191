"""Tree attention at every node equals causal attention over that node's root path."""

from __future__ import annotations

import pytest
import torch

from draftwise.backends.base import KVBackend, PromptTooLongError
from draftwise.backends.fast import FastBackend
from draftwise.backends.hf import HFBackend
from draftwise.backends.reference import ReferenceBackend, ReferenceModel
from draftwise.tree import DraftTree

from ..conftest import tiny_hf_model

PROMPT = [3, 17, 5, 9, 22, 1, 30]
#   root -> 0 -> 1 -> 2
#        -> 3 -> 4
#             -> 5
TREE = DraftTree((4, 8, 15, 16, 23, 42 % 32), (-1, 0, 1, -1, 3, 3))

BACKENDS = ["reference", "llama-eager", "llama-sdpa", "qwen2-sdpa", "fast-llama", "fast-qwen2",
            "exact-llama"]


def make_backend(kind: str, reference_model: ReferenceModel) -> tuple[KVBackend, object]:
    """The backend and a function ``ids -> [len(ids), vocab]`` plain causal logits."""
    if kind == "reference":
        return ReferenceBackend(reference_model), reference_model.full_forward
    variant, family = kind.split("-")
    if variant in ("fast", "exact"):
        model = tiny_hf_model(family, "sdpa", vocab=32)
        backend: KVBackend = FastBackend(model, exact=variant == "exact")
    else:
        family, attn = kind.split("-")
        model = tiny_hf_model(family, attn, vocab=32)
        backend = HFBackend(model)

    @torch.inference_mode()
    def full(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids])).logits[0]

    return backend, full


# Every backend here computes in float64 except one step: transformers' eager attention takes
# its softmax in float32 (``softmax(..., dtype=torch.float32)``) and casts back. Each attention
# probability then carries a relative error of up to one float32 unit roundoff (2**-24), and
# the tree forward and the path forward round differently (different masked lengths, different
# summation order on different SIMD widths). Through the value sum, the output projection and
# the remaining layers that error reaches the logits scaled by the logits' own size; 64 unit
# roundoffs of that size is a bound with room for the two layers and the sums in between,
# independent of which CPU rounds. Everything else is float64 end to end: 1e-9.
FLOAT32_SOFTMAX = {"llama-eager"}


def tolerance(kind: str, expected: torch.Tensor) -> float:
    if kind in FLOAT32_SOFTMAX:
        return 64 * 2.0**-24 * max(1.0, expected.abs().max().item())
    return 1e-9


def assert_logits_close(kind: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance(kind, expected))


@pytest.mark.parametrize("kind", BACKENDS)
def test_every_node_matches_its_path(kind: str, reference_model: ReferenceModel) -> None:
    backend, full = make_backend(kind, reference_model)
    backend.prefill(PROMPT)
    logits = backend.forward_tree(TREE)  # [N + 1, vocab]
    assert logits.shape == (len(TREE) + 1, backend.vocab_size)
    expected_root = full(PROMPT)[-1]
    assert_logits_close(kind, logits[0], expected_root)
    for node in range(len(TREE)):
        path_ids = PROMPT + TREE.path_tokens(node)
        assert_logits_close(kind, logits[node + 1], full(path_ids)[-1])


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("path", [(), (0, 1), (3, 5), (3, 4), (0, 1, 2)])
def test_commit_then_next_step_matches_recompute(
    kind: str, path: tuple[int, ...], reference_model: ReferenceModel
) -> None:
    backend, full = make_backend(kind, reference_model)
    backend.prefill(PROMPT)
    backend.forward_tree(TREE)
    next_root = 11
    backend.commit(path, next_root)
    committed = PROMPT + [TREE.tokens[i] for i in path] + [next_root]
    assert backend.length == len(committed)
    follow = DraftTree((2, 6), (-1, -1))
    logits = backend.forward_tree(follow)
    assert_logits_close(kind, logits[0], full(committed)[-1])
    assert_logits_close(kind, logits[2], full(committed + [6])[-1])


def test_prompt_longer_than_window_is_refused(reference_model: ReferenceModel) -> None:
    backend = ReferenceBackend(reference_model)
    with pytest.raises(PromptTooLongError, match="context window"):
        backend.prefill([1] * reference_model.config.max_length)
    with pytest.raises(ValueError, match="empty"):
        backend.prefill([])
