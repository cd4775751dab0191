"""Step cost: c(n)/c(1), the time of one forward pass over n tokens relative to one token.

n counts every token in the pass: the root plus ``n - 1`` draft nodes, so ``c(1)`` is a plain
decoding step. Sizes are measured in a shuffled order each repetition (so slow drift of the
machine does not fall on the large sizes alone) and the median time per size is kept. Each
measured step commits only its root, so the context grows by one token per measurement.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

from tqdm import tqdm

from draftwise.backends.base import Backend
from draftwise.tree import DraftTree

__all__ = ["measure_step_cost"]


def measure_step_cost(
    backend: Backend,
    prompt_ids: Sequence[int],
    sizes: Sequence[int],
    *,
    repeats: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """``{n: {"seconds": median s, "relative": c(n)/c(1)}}`` for each ``n`` in ``sizes``."""
    if 1 not in sizes:
        sizes = [1, *sizes]
    rng = random.Random(seed)
    vocab = backend.vocab_size
    backend.prefill(list(prompt_ids))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    bar = tqdm(total=(repeats + 1) * len(sizes), desc="step cost", disable=not progress)
    for repeat in range(repeats + 1):  # the first pass warms up and is discarded
        order = list(sizes)
        rng.shuffle(order)
        for n in order:
            tree = DraftTree.chain([rng.randrange(vocab) for _ in range(n - 1)])
            start = time.perf_counter()
            logits = backend.forward_tree(tree)
            elapsed = time.perf_counter() - start
            backend.commit((), int(logits[0].argmax()))
            if repeat:
                times[n].append(elapsed)
            bar.update()
    bar.close()
    one = statistics.median(times[1])
    return {
        n: {"seconds": statistics.median(times[n]), "relative": statistics.median(times[n]) / one}
        for n in sorted(sizes)
    }
