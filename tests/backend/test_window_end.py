"""A tree near the end of the context window is cut to the cache slots left, so a drafter that
proposes more nodes than fit ends the run at the window (finish reason "context") with plain
decoding's tokens, never an error."""

from __future__ import annotations

from collections.abc import Sequence

from draftwise.backends.fast import FastBackend
from draftwise.drafters.base import StepResult
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree

from ..conftest import tiny_hf_model


class WideDrafter:
    """Proposes ``width`` children of the root, each with a chain below it, whatever the room:
    many more cache rows than depth levels."""

    def __init__(self, width: int) -> None:
        self.width = width

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        pass

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        paths = [[(context[-1] + k) % 64, (context[-1] + 2 * k) % 64, k % 64][:max(max_depth, 0)]
                 for k in range(self.width)]
        return DraftTree.from_paths([p for p in paths if p])

    def observe(self, step: StepResult) -> None:
        pass


def test_a_wide_tree_at_the_window_end_is_cut_to_the_rows_left() -> None:
    model = tiny_hf_model(seed=3)
    window = 48
    prompt = [(5 * i + 1) % 64 for i in range(window - 6)]
    config = GenerationConfig(max_new_tokens=64)
    plain = Engine(FastBackend(model, max_length=window), WideDrafter(0)).generate(prompt, config)
    wide = Engine(FastBackend(model, max_length=window), WideDrafter(24)).generate(prompt, config)
    assert plain.stats.finish_reason == wide.stats.finish_reason == "context"
    assert wide.tokens == plain.tokens
    assert max(wide.stats.tree_sizes) > 0  # it did draft, within the room
