"""Runs methods over benchmark questions, interleaved, in one process.

Every method sees the same prompts on the same loaded model in the same run. After a warm-up of
each method, questions are visited in file order and, per question, the methods in an order
rotated by one each question, so drift of the machine (thermal, other load) hits all alike.
Multi-turn questions feed each method its own earlier answers through the chat template.

Methods are our registered drafters (``none``, ``pld``, ...) and transformers peers:
``hf-generate`` (plain ``generate``), ``hf-pld`` (``prompt_lookup_num_tokens``) and
``hf-assisted`` (``assistant_model``; needs a draft model), and llama.cpp peers on the same
GGUF: ``llamacpp`` (plain decoding), ``llamacpp-spec`` (its ``--spec-default`` speculation),
``llamacpp-draft`` (its draft-model speculation) and ``llamacpp-lookup`` (the npm build's prompt
lookup), the last three checked for exactness against ``llamacpp``; a peer that cannot run here
is skipped with a one-line reason (see :mod:`draftwise.bench.llamacpp`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from draftwise.api import Generator
from draftwise.bench.datasets import Question, report_category
from draftwise.bench.llamacpp import Peer, PeerUnavailable, start_peer
from draftwise.bench.report import BASELINE
from draftwise.drafters.base import UnknownMethodError, parse_method
from draftwise.drafters.suffix import SuffixCache
from draftwise.engine import GenerationConfig
from draftwise.models import LoadedModel
from draftwise.progress import progress_bar

__all__ = ["BenchConfig", "PEERS", "REFERENCE", "WITH_PREDICTION", "build_runners", "environment",
           "prompt_ids", "run_bench"]

PEERS = {
    "hf-generate": "transformers generate(), plain decoding",
    "hf-pld": "transformers prompt lookup (options: num_tokens=10, max_ngram=2)",
    "hf-assisted": "transformers assisted generation with --draft MODEL",
    "llamacpp": "llama.cpp plain decoding on the same GGUF (a native llama-server, see "
                "--llama-server; else the npm build, labelled)",
    "llamacpp-spec": "llama-server --spec-default (its ngram-mod speculation), exactness "
                     "against llamacpp",
    "llamacpp-draft": "llama-server with the --draft MODEL GGUF (draft-simple), exactness "
                      "against llamacpp",
    "llamacpp-lookup": "the npm build's prompt-lookup speculation, exactness against llamacpp",
}
# a peer whose output is checked against another peer rather than against ``none``
REFERENCE = {"llamacpp-lookup": "llamacpp", "llamacpp-spec": "llamacpp",
             "llamacpp-draft": "llamacpp"}


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...]
    generation: GenerationConfig
    warmup_tokens: int = 8


# (prompt ids, config, the question's predicted output for this turn or None) -> a record
Runner = Callable[[list[int], GenerationConfig, str | None], dict[str, Any]]
WITH_PREDICTION = "+prediction"  # a method name's suffix: the method, given the prediction


class Ours:
    """Runs one of our methods (a :data:`Runner`)."""

    def __init__(self, generator: Generator, with_prediction: bool = False) -> None:
        self.generator = generator
        self.with_prediction = with_prediction
        # drafters that keep their own statistics (composite: per part) expose them as report()
        self.report = getattr(generator.engine.drafter, "report", None)
        self.forget()

    def forget(self) -> None:
        """Draft from no earlier answer: a suffix cache of this method's own (the generator's
        is every method's, and another method's answer to a question is this one's)."""
        engine = self.generator.engine
        if engine.suffix is not None:
            engine.suffix = SuffixCache(engine.suffix.max_tokens)

    def __call__(self, prompt_ids: list[int], config: GenerationConfig,
                 prediction: str | None = None) -> dict[str, Any]:
        generator, report = self.generator, self.report
        predicted = generator.predict(prediction) if self.with_prediction else None
        done = generator.engine.generate(prompt_ids, config, prediction=predicted)
        stats = done.stats
        return {
            **({"drafter_report": report()} if report is not None else {}),
            "token_ids": list(done.tokens),
            "new_tokens": stats.new_tokens,
            "wall_s": stats.total_s,
            "steps": stats.steps,
            "step_tokens": stats.step_tokens,
            "mean_tree_size": stats.mean_tree_size,
            "draft_s": stats.draft_s,
            "verify_s": stats.verify_s,
            "margins": stats.margins,
            "finish_reason": stats.finish_reason,
            **({"accepted_prediction_tokens": stats.accepted_prediction_tokens,
                "rejected_prediction_tokens": stats.rejected_prediction_tokens}
               if predicted is not None else {}),
        }


def _peer(model: Any, kwargs: dict[str, Any]) -> Runner:
    def run(prompt_ids: list[int], config: GenerationConfig,
            prediction: str | None = None) -> dict[str, Any]:
        s = config.sampling
        sampling: dict[str, Any] = {"do_sample": False}
        if not s.greedy:
            sampling = {
                "do_sample": True, "temperature": s.temperature, "top_k": s.top_k or None,
                "top_p": s.top_p, "min_p": s.min_p or None, "typical_p": s.typical_p,
            }
            torch.manual_seed(config.seed)
        ids = torch.tensor([prompt_ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=config.max_new_tokens,
                eos_token_id=list(config.eos_token_ids) or None,
                pad_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
                repetition_penalty=s.repetition_penalty,
                **sampling,
                **kwargs,
            )
        wall = time.perf_counter() - start
        tokens = out[0, len(prompt_ids) :].tolist()
        return {"token_ids": tokens, "new_tokens": len(tokens), "wall_s": wall, "steps": None}

    return run


def _llamacpp(peer: Peer, lookup: bool) -> Runner:
    def run(prompt_ids: list[int], config: GenerationConfig,
            prediction: str | None = None) -> dict[str, Any]:
        if not config.sampling.greedy:
            raise ValueError("the llama.cpp peers run greedy decoding only (temperature 0)")
        answer = peer.generate(prompt_ids, config.max_new_tokens, config.eos_token_ids,
                               lookup=lookup)
        tokens = answer["tokens"]
        return {"token_ids": tokens, "new_tokens": len(tokens), "wall_s": answer["seconds"],
                "steps": None, "validated": answer["validated"], "refuted": answer["refuted"],
                "peer": peer.label}

    return run


def build_runners(
    generator: Generator, methods: Sequence[str], draft: LoadedModel | None,
    *, skipped: Callable[[str, str], None] | None = None, llama_server: str | None = None,
) -> dict[str, Runner]:
    """A runner per method spec; ``none`` first and always present (it is the baseline).

    A llama.cpp peer that cannot run here is left out and reported to ``skipped(spec,
    reason)``; a llama.cpp speculation brings ``llamacpp`` along (its exactness reference).
    ``llama_server``: the native server's path, ``"xllamacpp"`` or ``"npm"`` (see
    :func:`~draftwise.bench.llamacpp.start_peer`)."""
    specs = [BASELINE] + [m for m in methods if m != BASELINE]
    for spec in [s for s in specs if REFERENCE.get(s) == "llamacpp"]:
        if "llamacpp" not in specs:
            specs.insert(specs.index(spec), "llamacpp")
    runners: dict[str, Runner] = {}
    peers: dict[str, Peer | None] = {}  # by the variant each peer process runs
    for spec in specs:
        if spec.endswith(WITH_PREDICTION):
            base = spec[: -len(WITH_PREDICTION)]
            runners[spec] = Ours(generator.with_method(base), with_prediction=True)
            continue
        name, options = parse_method(spec)
        if name not in PEERS:
            runners[spec] = Ours(generator.with_method(spec))
            continue
        if name.startswith("llamacpp"):
            if options:
                raise UnknownMethodError(f"{name} takes no options, got {options}")
            variant = {"llamacpp-spec": "spec", "llamacpp-draft": "draft"}.get(name, "plain")
            server = "npm" if name == "llamacpp-lookup" else llama_server
            key = f"{variant}/{server}"
            if key not in peers:
                try:
                    peers[key] = start_peer(
                        generator.model.source, variant=variant, server=server,
                        draft=draft.source if draft is not None else None)
                except PeerUnavailable as error:
                    peers[key] = None
                    if skipped is not None:
                        skipped(spec, str(error))
            peer = peers[key]
            if peer is not None:
                runners[spec] = _llamacpp(peer, lookup=name == "llamacpp-lookup")
            continue
        model = generator.model.model
        if name == "hf-generate":
            kwargs: dict[str, Any] = {}
        elif name == "hf-pld":
            allowed = {"num_tokens", "max_ngram"}
            if set(options) - allowed:
                raise UnknownMethodError(f"{name} options are {sorted(allowed)}, got {options}")
            kwargs = {
                "prompt_lookup_num_tokens": int(options.get("num_tokens", 10)),
                "max_matching_ngram_size": int(options.get("max_ngram", 2)),
            }
        else:
            if draft is None:
                raise UnknownMethodError("hf-assisted needs a draft model: --draft MODEL")
            kwargs = {"assistant_model": draft.model}
        runners[spec] = _peer(model, kwargs)
    return runners


def _prompt(generator: Generator, turns: Sequence[str], answers: Sequence[str]) -> list[int]:
    return prompt_ids(generator.model.tokenizer, turns, answers)


def prompt_ids(tokenizer: Any, turns: Sequence[str], answers: Sequence[str]) -> list[int]:
    """A turn's prompt: the user's turns so far and the method's own earlier answers, through
    the chat template (plainly joined where the model has none)."""
    if not getattr(tokenizer, "chat_template", None):
        parts = [p for pair in zip(turns, [*answers, ""], strict=False) for p in pair if p]
        ids: list[int] = tokenizer("\n".join(parts)).input_ids
        return ids
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def run_bench(
    generator: Generator,
    questions: Sequence[Question],
    config: BenchConfig,
    runners: dict[str, Runner],
    *,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method (``runners``, from :func:`build_runners`) on every turn of every
    question; returns one record per run, each also passed to ``on_record`` as it is made (so
    an interrupted run keeps what it measured)."""
    names = list(runners)
    tokenizer = generator.model.tokenizer
    gen = config.generation
    warm = GenerationConfig(
        max_new_tokens=config.warmup_tokens, sampling=gen.sampling, seed=gen.seed,
        eos_token_ids=gen.eos_token_ids,
    )
    first = _prompt(generator, questions[0].turns[:1], [])
    for name in names:
        runners[name](first, warm, questions[0].prediction)
    for runner in runners.values():  # the warm-up answered the first question: forget it
        if isinstance(runner, Ours):
            runner.forget()

    records: list[dict[str, Any]] = []
    total = sum(len(q.turns) for q in questions) * len(names)
    bar = progress_bar(total, "bench", enabled=progress, unit="run")
    for index, question in enumerate(questions):
        order = names[index % len(names) :] + names[: index % len(names)]
        answers: dict[str, list[str]] = {name: [] for name in names}
        for turn in range(len(question.turns)):
            for name in order:
                prompt_ids = _prompt(generator, question.turns[: turn + 1], answers[name])
                # a predicted output is the first answer's (a later turn answers something else)
                result = runners[name](prompt_ids, gen,
                                       question.prediction if turn == 0 else None)
                answer = tokenizer.decode(result["token_ids"], skip_special_tokens=True)
                answers[name].append(answer)
                record = {
                        "question_id": question.question_id,
                        "category": report_category(question.category),
                        "source_category": question.category,
                        "turn": turn,
                        "method": name,
                        "reference": REFERENCE.get(name, BASELINE),
                        "prompt_tokens": len(prompt_ids),
                        "greedy": gen.sampling.greedy,
                        **result,
                        "tokens_per_s": result["new_tokens"] / result["wall_s"],
                }
                records.append(record)
                if on_record is not None:
                    on_record(record)
                bar.set_postfix_str(f"{question.question_id} {name}")
                bar.update()
    bar.close()
    return records


def environment(model: LoadedModel, draft: LoadedModel | None = None) -> dict[str, Any]:
    """Versions, threads, CPU and models: enough to tell two runs' machines apart."""
    import transformers

    import draftwise
    from draftwise.machine import cpu_name

    return {
        "draftwise": draftwise.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "platform": platform.platform(),
        "model": {"name": model.name, "source": model.source},
        "draft": None if draft is None else {"name": draft.name, "source": draft.source},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
