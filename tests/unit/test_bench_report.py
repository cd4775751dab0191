"""Benchmark metrics on hand-made records."""

from __future__ import annotations

import json

import pytest

from draftwise.bench.datasets import QuestionFileError, load_questions, select
from draftwise.bench.report import first_divergence, mark_exactness, markdown, summarize


def record(qid: str, category: str, method: str, tokens: list[int], wall: float,
           steps: int | None, margins: list[float] | None = None, turn: int = 0) -> dict:
    return {"question_id": qid, "category": category, "method": method, "turn": turn,
            "token_ids": tokens, "new_tokens": len(tokens), "wall_s": wall, "steps": steps,
            "margins": margins or [], "greedy": True}


def records() -> list[dict]:
    return [
        record("q1", "qa", "none", [1, 2, 3, 4], 4.0, 4, [3.0, 2.0, 0.001, 5.0]),
        record("q1", "qa", "pld", [1, 2, 3, 4], 2.0, 2),
        record("q2", "math", "none", [5, 6], 1.0, 2, [1.0, 1.0]),
        record("q2", "math", "pld", [5, 6], 0.5, 1),
        record("q3", "math", "none", [7, 8, 9, 9], 4.0, 4, [1.0, 2.0, 0.5, 0.25]),
        record("q3", "math", "pld", [7, 8, 1, 2], 1.0, 2),
    ]


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_speedup_mat_and_exactness_per_category_and_overall() -> None:
    rows = records()
    mark_exactness(rows)
    summary = summarize(rows)["methods"]
    pld = summary["pld"]
    # overall: pld 10 tokens / 3.5 s; plain 10 tokens / 9 s
    assert pld["overall"]["tokens_per_s"] == pytest.approx(10 / 3.5)
    assert pld["overall"]["speedup"] == pytest.approx((10 / 3.5) / (10 / 9.0))
    assert pld["overall"]["mat"] == pytest.approx(10 / 5)
    assert pld["overall"]["exact_match"] == pytest.approx(2 / 3)
    assert pld["overall"]["questions"] == 3
    math = pld["categories"]["math"]
    assert math["speedup"] == pytest.approx((6 / 1.5) / (6 / 5.0))
    assert math["mat"] == pytest.approx(2.0)
    assert math["exact_match"] == pytest.approx(0.5)
    assert pld["categories"]["qa"]["exact_match"] == 1.0
    assert summary["none"]["overall"]["speedup"] == pytest.approx(1.0)
    assert summary["none"]["overall"]["mat"] == pytest.approx(1.0)
    assert pld["mismatches"] == [
        {"question_id": "q3", "turn": 0, "first_divergence": 2, "margin": 0.5}
    ]


def test_markdown_lists_methods_categories_and_mismatches() -> None:
    rows = records()
    mark_exactness(rows)
    table = markdown(summarize(rows))
    assert "| pld |" in table and "| math | qa |" in table
    assert "first divergence at new token 2" in table and "5.00e-01" in table


def test_sampled_runs_have_no_exactness() -> None:
    rows = records()
    for row in rows:
        row["greedy"] = False
    mark_exactness(rows)
    assert summarize(rows)["methods"]["pld"]["overall"]["exact_match"] is None


def test_packaged_questions_cover_every_category() -> None:
    questions = load_questions()
    counts: dict[str, int] = {}
    for q in questions:
        counts[q.category] = counts.get(q.category, 0) + 1
    assert set(counts) == {"multi_turn", "translation", "summarization", "qa",
                           "math_reasoning", "rag", "code"}
    assert min(counts.values()) >= 5
    assert all(len(q.turns) == 2 for q in questions if q.category == "multi_turn")


def test_select_limits_per_report_category(tmp_path) -> None:
    path = tmp_path / "q.jsonl"
    lines = [{"question_id": i, "category": c, "turns": ["x"]}
             for i, c in enumerate(["writing", "coding", "qa", "qa", "rag"])]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    chosen = select(load_questions(path), limit=1)
    assert [q.category for q in chosen] == ["writing", "qa", "rag"]  # writing+coding: mt_bench
    assert [q.question_id for q in select(load_questions(path), categories=["qa"])] == ["2", "3"]
    with pytest.raises(QuestionFileError, match="no questions in categories"):
        select(load_questions(path), categories=["poetry"])


def test_bad_question_files_are_named_errors(tmp_path) -> None:
    with pytest.raises(QuestionFileError, match="no question file"):
        load_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa"}\n')
    with pytest.raises(QuestionFileError, match="line 1"):
        load_questions(bad)


def test_method_lists_split_on_commas_between_methods_only() -> None:
    from draftwise.cli.bench import split_methods

    assert split_methods("none,pld:budget=16,max_ngram=4,hf-pld,recycling@8") == (
        "none", "pld:budget=16,max_ngram=4", "hf-pld", "recycling@8"
    )
    assert split_methods("composite:parts=pld+aded,budget=8@auto") == (
        "composite:parts=pld+aded,budget=8@auto",
    )
