"""Text in, text out: prompts, chat templates, streaming text and stop strings.

:class:`Generator` binds a loaded model, its backend and a method, and turns the engine's token
steps into text. It is the one place that knows about tokenizers; the engine works on ids.

Stop strings are matched on the decoded text after each step; the returned text ends before the
stop string (``finish_reason == "stop"``), while ``token_ids`` keeps every committed token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftwise.backends.base import KVBackend
from draftwise.backends.registry import make_backend
from draftwise.constraints import (
    Compiler,
    Constraint,
    ConstraintSpec,
    ConstraintStats,
    constraint_spec,
)
from draftwise.engine import GenerationConfig, Run
from draftwise.method import SUFFIX_TOKENS, MethodBuilder
from draftwise.metrics import GenerationStats
from draftwise.models import LoadedModel, default_cache_dir, load_model
from draftwise.prediction import Prediction
from draftwise.sampling import SamplingConfig
from draftwise.sizing import CostCurve
from draftwise.text import TextTracker

__all__ = ["AlignedCompletion", "Completion", "Generator", "TextStream"]


@dataclass
class Completion:
    """A finished generation."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerationStats
    method: str = ""
    constraint: ConstraintStats | None = None


@dataclass
class TextStream:
    """Iterates the new text of a run; ``text`` holds everything decoded so far."""

    run: Run
    pieces: Iterator[str]
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        return self.pieces


class Generator:
    """Generates text with one model and one method.

    Parameters:
        model: a :class:`LoadedModel` or a spec for :func:`draftwise.load_model`.
        method: a drafter spec, e.g. ``"pld"`` or ``"pld:budget=16"``, optionally followed by
            ``@auto``, ``@off`` or ``@N`` to set the verification budget for this method.
        budget: verification budget when the method names none: ``"auto"`` sizes each tree to
            what pays on this machine (using the step-cost curve, measured once and cached),
            ``"off"`` verifies the drafter's whole tree, ``N`` keeps the N likeliest nodes.
        cache_dir: where the step-cost curve is cached (default: ``~/.cache/draftwise``).
        backend: ``"quant"`` (a GGUF file's own block formats with C++ kernels; Llama/Qwen2),
            ``"hf"`` (transformers, any model), ``"fast"`` (compact Llama/Qwen2
            implementation with kernels chosen for this machine) or ``"auto"`` (fast where it
            supports the model, else hf).
        exact: fast backend only: verify with plain decoding's one-row kernel, so output is
            bit-identical to plain decoding on this backend (slower verification).
        compile_timeout_s: the most seconds compiling one grammar or schema may take.
        suffix_tokens: tokens of earlier outputs this generator's requests keep for the
            ``suffix`` drafter (oldest evicted first; 0: none).
    """

    def __init__(
        self,
        model: LoadedModel | str = "default",
        method: str = "pld",
        *,
        budget: str | int = "auto",
        cache_dir: Path | str | None = None,
        backend: str = "auto",
        exact: bool = False,
        compile_timeout_s: float = 10.0,
        suffix_tokens: int = SUFFIX_TOKENS,
    ) -> None:
        self.model = load_model(model) if isinstance(model, str) else model
        self.compile_timeout_s = compile_timeout_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.backend: KVBackend = make_backend(self.model, backend, self.cache_dir, exact=exact)
        self.backend_name = type(self.backend).__name__
        self.methods = MethodBuilder(self.model, self.backend, budget=budget,
                                     cache_dir=self.cache_dir, suffix_tokens=suffix_tokens)
        self._compiler: Compiler | None = None
        self._set_method(method)

    def _set_method(self, method: str) -> None:
        self.engine = self.methods.engine(method)
        self.method = method

    def cost_curve(self) -> CostCurve:
        """This machine's step-cost curve for the model (measured once, then cached)."""
        return self.methods.cost_curve()

    def with_method(self, method: str) -> Generator:
        """Another generator on the same loaded model, backend and cost curve."""
        other = Generator.__new__(Generator)
        other.model, other.backend, other.cache_dir = self.model, self.backend, self.cache_dir
        other.compile_timeout_s = self.compile_timeout_s
        other.backend_name = self.backend_name
        other.methods = self.methods
        other._compiler = self.compiler
        other._set_method(method)
        return other

    @property
    def compiler(self) -> Compiler:
        """Grammar compiler for this model's tokenizer (compiled grammars are cached here)."""
        if self._compiler is None:
            self._compiler = Compiler(
                self.model.tokenizer, self.backend.vocab_size, self.model.eos_token_ids,
                timeout_s=self.compile_timeout_s,
            )
        return self._compiler

    def constrain(self, spec: ConstraintSpec) -> Constraint:
        """A fresh grammar state for one request (compiled once per spec, then cached)."""
        return self.compiler.compile(spec)

    def encode(self, prompt: str, *, raw: bool = False) -> list[int]:
        """Prompt ids: through the model's chat template unless ``raw`` or it has none."""
        return self.model.encode(prompt, raw=raw)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation through the model's chat template."""
        return self.model.encode_chat(messages)

    def config(
        self,
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
    ) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            sampling=sampling or SamplingConfig(),
            seed=seed,
            eos_token_ids=self.model.eos_token_ids,
        )

    def stream_ids(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        stop: Sequence[str] = (),
        constraint: Constraint | None = None,
        prediction: str | None = None,
    ) -> TextStream:
        """Start a request on ids; iterate the result for new text pieces as they decode.

        ``constraint``: a fresh state from :meth:`constrain` the output must follow;
        ``prediction``: text the output is expected to resemble (see :meth:`generate`)."""
        run = self.engine.run(prompt_ids, config, constraint, self.predict(prediction))
        stream = TextStream(run, iter(()))
        stream.pieces = self._texts(stream, tuple(s for s in stop if s))
        return stream

    def predict(self, text: str | None) -> Prediction | None:
        """A fresh :class:`~draftwise.prediction.Prediction` of ``text`` (its tokens as they
        would appear in the output), or None."""
        if text is None:
            return None
        ids: list[int] = self.model.tokenizer(text, add_special_tokens=False).input_ids
        return Prediction(ids)

    def _texts(self, stream: TextStream, stop: tuple[str, ...]) -> Iterator[str]:
        run, text = stream.run, TextTracker(self.model.tokenizer, stop)
        for _ in run:
            piece, stopped = text.update(run.tokens)
            stream.text = text.text
            if piece:
                yield piece
            if stopped:
                run.stats.finish_reason = "stop"
                run.close()
                return
        piece = text.final(run.tokens)
        stream.text = text.text
        if piece:
            yield piece

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        stop: Sequence[str] = (),
        raw: bool = False,
        json_schema: dict[str, Any] | bool | str | Path | None = None,
        regex: str | None = None,
        grammar: str | Path | None = None,
        whitespace: str = "compact",
        prediction: str | None = None,
    ) -> Completion:
        """Generate a completion of ``prompt`` (chat template applied unless ``raw``).

        Structured output (at most one): ``json_schema`` (a dict, JSON text or a file),
        ``regex``, or ``grammar`` (Lark or GBNF text, or a file). ``whitespace``: JSON only,
        ``compact`` (default) or ``flexible``. Invalid or unsupported ones raise
        :class:`~draftwise.constraints.GrammarError` before any token is generated.

        ``prediction``: text the output is expected to resemble (OpenAI's Predicted Outputs:
        a file to edit, a document to rewrite). It is drafted from, aligned with the output as
        the output departs from it and rejoins it, beside the method's own drafts; the output
        is the same with or without it. ``stats.accepted_prediction_tokens`` and
        ``stats.rejected_prediction_tokens`` count its tokens as OpenAI does.
        """
        spec = constraint_spec(
            json_schema=json_schema, regex=regex, grammar=grammar, whitespace=whitespace
        )
        constraint = self.constrain(spec) if spec is not None else None
        prompt_ids = self.encode(prompt, raw=raw)
        config = self.config(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        stream = self.stream_ids(prompt_ids, config, stop, constraint, prediction)
        for _ in stream:
            pass
        run = stream.run
        return Completion(
            stream.text, list(run.tokens), prompt_ids, run.stats, self.method,
            constraint.stats if constraint is not None else None,
        )


    def sample_aligned(
        self,
        prompt: str,
        n: int,
        *,
        sampling: SamplingConfig,
        max_new_tokens: int = 256,
        seed: int = 0,
        raw: bool = False,
        json_schema: dict[str, Any] | bool | str | Path | None = None,
        regex: str | None = None,
        grammar: str | Path | None = None,
        whitespace: str = "compact",
    ) -> list[AlignedCompletion]:
        """``n`` grammar-aligned samples of ``prompt`` (ASAp; see
        :mod:`draftwise.constraints.aligned`): they converge to the model's distribution
        conditioned on the grammar, where ``n`` independent constrained samples would follow
        the distorted masked distribution. Needs a constraint and ``temperature > 0``."""
        from draftwise.constraints.aligned import AlignedSampler

        spec = constraint_spec(
            json_schema=json_schema, regex=regex, grammar=grammar, whitespace=whitespace
        )
        if spec is None:
            raise ValueError("grammar-aligned sampling needs a JSON schema, regex or grammar")
        prompt_ids = self.encode(prompt, raw=raw)
        sampler = AlignedSampler(
            self.backend, self.constrain(spec), prompt_ids, sampling,
            self.model.eos_token_ids, max_new_tokens, seed,
        )
        tokenizer = self.model.tokenizer
        return [
            AlignedCompletion(
                tokenizer.decode(s.tokens, skip_special_tokens=True), s.tokens, s.complete,
                sampler.grammaticality, sampler.model_calls,
            )
            for s in (sampler.sample() for _ in range(n))
        ]


@dataclass
class AlignedCompletion:
    """One grammar-aligned sample.

    Attributes:
        complete: ended with EOS inside the grammar.
        grammaticality: the sampler's estimate, after this sample, of P(valid | prompt).
        model_calls: model forward passes the sampler had made so far (shared prefixes are
            computed once).
    """

    text: str
    token_ids: list[int]
    complete: bool
    grammaticality: float
    model_calls: int
