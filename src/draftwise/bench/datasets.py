"""Benchmark questions in Spec-Bench's JSONL format: ``question_id``, ``category``, ``turns``.

The package ships its own small set (``questions.jsonl``: 5 questions in each of multi_turn,
translation, summarization, qa, math_reasoning, rag and code) so ``draftwise bench`` runs with no
arguments; ``--questions`` reads any file of the same shape, such as Spec-Bench's own.

Spec-Bench files its 80 MT-bench questions under eight categories (writing, roleplay, ...);
reports group them as ``mt_bench``, as Spec-Bench's paper does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Question", "QuestionFileError", "load_questions", "select", "report_category"]

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)


class QuestionFileError(ValueError):
    """A question file is missing or not in Spec-Bench's format."""


@dataclass(frozen=True)
class Question:
    """A question; ``prediction``: text its first answer is expected to resemble (a code edit's
    original code), handed to methods run with ``--prediction``."""

    question_id: str
    category: str
    turns: tuple[str, ...]
    prediction: str | None = None


def report_category(category: str) -> str:
    """The category a question is reported under (MT-bench's eight are one: ``mt_bench``)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read a Spec-Bench-format JSONL file (the packaged default set when ``path`` is None)."""
    if path is None:
        text = resources.files("draftwise.bench").joinpath("questions.jsonl").read_text("utf-8")
        where = "the packaged question set"
    else:
        file = Path(path)
        if not file.is_file():
            raise QuestionFileError(f"no question file at {str(file)!r}")
        text, where = file.read_text("utf-8"), str(file)
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turns = record["turns"]
            if not isinstance(turns, list) or not turns or not all(
                isinstance(t, str) for t in turns
            ):
                raise TypeError("'turns' must be a non-empty list of strings")
            questions.append(
                Question(str(record["question_id"]), str(record["category"]), tuple(turns))
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise QuestionFileError(
                f"{where}, line {number}: not a Spec-Bench question "
                f"(question_id, category, turns): {error}"
            ) from error
    if not questions:
        raise QuestionFileError(f"{where} holds no questions")
    return questions


def select(
    questions: Sequence[Question],
    *,
    categories: Sequence[str] = (),
    limit: int | None = None,
) -> list[Question]:
    """Questions in ``categories`` (report names or file names), at most ``limit`` per
    report category, in file order."""
    wanted = set(categories)
    known = {q.category for q in questions} | {report_category(q.category) for q in questions}
    unknown = wanted - known
    if unknown:
        raise QuestionFileError(
            f"no questions in categories {sorted(unknown)}; available: {sorted(known)}"
        )
    taken: dict[str, int] = {}
    chosen = []
    for question in questions:
        group = report_category(question.category)
        if wanted and not ({question.category, group} & wanted):
            continue
        if limit is not None and taken.get(group, 0) >= limit:
            continue
        taken[group] = taken.get(group, 0) + 1
        chosen.append(question)
    return chosen
