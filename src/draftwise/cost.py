"""Step cost: c(n)/c(1), the time of one forward pass over n tokens relative to one token.

n counts every token in the pass: the root plus ``n - 1`` draft nodes, so ``c(1)`` is a plain
decoding step. Sizes are measured in a shuffled order each repetition (so slow drift of the
machine does not fall on the large sizes alone) and the median time per size is kept. Each
measured step commits only its root, so the context grows by one token per measurement.

The curve is what automatic tree sizing (:mod:`draftwise.sizing`) weighs a tree against, so it is
measured once per machine, model and backend build and cached (:func:`cached_step_cost`);
``draftwise bench --cost`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from draftwise.backends.base import Backend
from draftwise.machine import machine_key
from draftwise.progress import progress_bar
from draftwise.tree import DraftTree

__all__ = ["CURVE_SIZES", "cached_step_cost", "measure_step_cost"]


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
    bar = progress_bar((repeats + 1) * len(sizes), "step cost", enabled=progress, unit="pass")
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


CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def cached_step_cost(
    backend: Backend,
    model_key: str,
    cache_dir: Path,
    *,
    progress: bool = True,
) -> dict[int, float]:
    """``{n: c(n)/c(1)}`` for this machine, model and backend: measured once, then cached.

    The cache file is keyed by the model, the backend class, the CPU, the thread count and the
    torch version, so a different machine or setting measures its own curve.
    """
    ident = f"{model_key}|{type(backend).__name__}|{machine_key()}"
    path = cache_dir / "cost" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {int(n): float(v) for n, v in data["relative"].items()}
    if progress:
        print("draftwise: measuring this machine's step cost once (cached)", file=sys.stderr)
    prompt = [(7 * i + 3) % backend.vocab_size for i in range(64)]
    curve = measure_step_cost(backend, prompt, CURVE_SIZES, repeats=3, progress=progress)
    relative = {n: v["relative"] for n, v in curve.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ident": ident, "relative": relative}, indent=1))
    return relative

