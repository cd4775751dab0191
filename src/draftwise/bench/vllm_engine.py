"""``draftwise bench --engine vllm``: the same questions through vLLM's offline ``LLM``, greedy.

Methods: ``none`` (vLLM without speculation: every other method's exactness reference), vLLM's
own proposers ``ngram`` and ``suffix`` (options as vLLM's ``speculative_config`` fields:
``ngram:prompt_lookup_min=2,prompt_lookup_max=5``; ``suffix`` needs ``arctic-inference``), and
any draftwise method as a ``custom_class`` proposer (:mod:`draftwise.integrations.vllm`),
written ``draftwise/SPEC`` where the name is also vLLM's (``draftwise/suffix``) and plainly
otherwise (``pld``, ``composite:parts=pld+suffix``).

vLLM runs in float32 (under its CPU default, bfloat16, its own speculation is not identical to
its plain decoding: a near-tie flipped in ``tests/integration/test_vllm.py``'s first try), with
its default compilation. Each method gets its own ``LLM`` (vLLM's engine is built for one
speculative config), loaded,
warmed up on the first question, then run over every turn of every question one request at a
time, so its time is one request's latency as in our own bench; the methods run one after
another, not interleaved. A record's ``steps`` are its new tokens minus the draft tokens vLLM
accepted for it (each step commits one token of the target's own plus the accepted drafts), so
MAT means what it means for our methods; vLLM's own mean acceptance length (1 + accepted per
drafting step) is in the summary's ``vllm`` part.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from draftwise.bench.datasets import Question, report_category
from draftwise.bench.report import BASELINE
from draftwise.drafters.base import UnknownMethodError, drafter_config, parse_method
from draftwise.integrations.vllm import METHOD_ENV, check_token_only
from draftwise.models import LoadedModel
from draftwise.progress import progress_bar

__all__ = ["OURS_PREFIX", "VLLM_OWN", "VllmUnavailable", "run_vllm_bench", "speculative_config"]

VLLM_OWN = ("ngram", "suffix")  # vLLM's proposers, by the names vLLM gives them
OURS_PREFIX = "draftwise/"
KV_CACHE_GB = "2"  # vLLM's CPU KV cache when $VLLM_CPU_KVCACHE_SPACE names none
CLASS = "draftwise.integrations.vllm.Method"


class VllmUnavailable(RuntimeError):
    """vLLM, or one of its proposers, cannot run here (the message says why)."""


def ours(method: str) -> str | None:
    """The draftwise spec ``method`` runs as a custom proposer, or None for vLLM's own."""
    if method.startswith(OURS_PREFIX):
        return method[len(OURS_PREFIX):]
    if method == BASELINE or parse_method(method)[0] in VLLM_OWN:
        return None
    return method


def speculative_config(method: str, k: int) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for a bench method (None: no speculation). Raises
    :class:`~draftwise.drafters.UnknownMethodError` for a spec that cannot run inside vLLM."""
    spec = ours(method)
    if spec is not None:
        drafter_config(spec)  # a bad spec fails before vLLM loads anything
        try:
            check_token_only(spec)
        except ValueError as error:
            raise UnknownMethodError(str(error)) from error
        return {"method": "custom_class", "model": CLASS, "num_speculative_tokens": k}
    if method == BASELINE:
        return None
    name, options = parse_method(method)
    config: dict[str, Any] = {"method": name, "num_speculative_tokens": k}
    for key, value in options.items():
        try:
            config[key] = int(value)
        except ValueError:
            try:
                config[key] = float(value)
            except ValueError:
                config[key] = value
    return config


def _metric(llm: Any, name: str) -> float:
    total = 0.0
    for metric in llm.get_metrics():
        if metric.name == name:
            total += float(getattr(metric, "value", 0) or 0)
    return total


@contextlib.contextmanager
def _engine(folder: str, method: str, k: int, max_model_len: int, seed: int) -> Any:
    """An ``LLM`` for ``method``, shut down on exit (its engine process and KV cache)."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise VllmUnavailable(
            f"vLLM is not installed here ({error}); install it with: pip install -e "
            "\".[vllm]\" && pip uninstall -y torchvision torchaudio torchcodec") from error
    spec = ours(method)
    previous = os.environ.get(METHOD_ENV)
    if spec is not None:
        os.environ[METHOD_ENV] = spec  # vLLM's spawned engine process reads it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)
    llm = None
    try:
        try:
            llm = LLM(model=folder, max_model_len=max_model_len, seed=seed, dtype="float32",
                      speculative_config=speculative_config(method, k),
                      disable_log_stats=False)
        except (ImportError, ValueError) as error:  # e.g. suffix without arctic-inference
            raise VllmUnavailable(f"vLLM cannot run {method}: {error}") from error
        yield llm
    finally:
        if previous is None:
            os.environ.pop(METHOD_ENV, None)
        else:
            os.environ[METHOD_ENV] = previous
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def run_vllm_bench(
    model: LoadedModel, questions: Sequence[Question], methods: Sequence[str], *,
    prompt: Callable[[Sequence[str], Sequence[str]], list[int]], max_new_tokens: int,
    num_speculative_tokens: int = 8, max_model_len: int = 4096, seed: int = 0,
    progress: bool = True, skipped: Callable[[str, str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records (one per method, question and turn) and, per method, vLLM's own spec-decode
    counters. ``prompt(turns, answers)``: the prompt ids of a turn (our chat template, the
    method's own earlier answers). A method vLLM cannot run is reported to ``skipped``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for method in methods:
        speculative_config(method, num_speculative_tokens)  # every spec checked up front
    folder = str(model.weights_folder())
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=seed)
    warm = SamplingParams(temperature=0.0, max_tokens=8, seed=seed)
    records: list[dict[str, Any]] = []
    counters: dict[str, Any] = {}
    specs = [BASELINE, *(m for m in methods if m != BASELINE)]
    total = sum(len(q.turns) for q in questions) * len(specs)
    bar = progress_bar(total, "bench vllm", enabled=progress, unit="run")
    for method in specs:
        try:
            with _engine(folder, method, num_speculative_tokens, max_model_len, seed) as llm:
                first = TokensPrompt(prompt_token_ids=prompt(questions[0].turns[:1], []))
                llm.generate([first], warm, use_tqdm=False)
                drafts0 = _metric(llm, "vllm:spec_decode_num_drafts")
                accepted0 = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
                for question in questions:
                    answers: list[str] = []
                    for turn in range(len(question.turns)):
                        ids = prompt(question.turns[: turn + 1], answers)
                        before = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
                        start = time.perf_counter()
                        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy,
                                           use_tqdm=False)[0].outputs[0]
                        wall = time.perf_counter() - start
                        accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens") - before
                        tokens = list(out.token_ids)
                        answers.append(out.text)
                        record = {
                            "question_id": question.question_id,
                            "category": report_category(question.category),
                            "turn": turn, "method": method, "engine": "vllm",
                            "token_ids": tokens, "new_tokens": len(tokens), "wall_s": wall,
                            "steps": max(len(tokens) - int(accepted), 1) if tokens else 0,
                            "greedy": True, "finish_reason": out.finish_reason,
                        }
                        records.append(record)
                        if on_record is not None:
                            on_record(record)
                        bar.set_postfix_str(f"{question.question_id} {method}")
                        bar.update()
                drafts = _metric(llm, "vllm:spec_decode_num_drafts") - drafts0
                accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens") - accepted0
                counters[method] = {
                    "drafts": drafts, "accepted_tokens": accepted,
                    "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
                }
        except VllmUnavailable as error:
            if method == BASELINE or skipped is None:
                raise
            skipped(method, str(error))
            bar.update(sum(len(q.turns) for q in questions))
    bar.close()
    return records, counters
