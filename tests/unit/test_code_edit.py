"""The code-editing workload: real standard-library functions, rotating task kinds, the original
code as each question's predicted output."""

from __future__ import annotations

import inspect
import textwrap

from draftwise.bench.code_edit import (
    AGENT_CATEGORY,
    CATEGORY,
    FUNCTIONS,
    TASKS,
    agent_questions,
    code_edit_questions,
)


def test_questions_carry_the_functions_source_and_predict_it() -> None:
    questions = code_edit_questions()
    assert len(questions) >= 10  # (a function without Python source here would be skipped)
    kinds = [q.question_id.split("-")[1] for q in questions]
    assert kinds[: len(TASKS)] == [kind for kind, _ in TASKS]  # any first N mix the kinds
    import shlex

    split = next(q for q in questions if q.question_id.endswith("shlex.split"))
    source = textwrap.dedent(inspect.getsource(shlex.split))
    assert split.category == CATEGORY and len(split.turns) == 1
    assert split.prediction == f"```python\n{source}```"
    assert split.turns[0].endswith(split.prediction)
    assert "`s`" in split.turns[0]  # the parameter task names the real first parameter
    assert {q.question_id.split("-", 2)[2] for q in questions} <= set(FUNCTIONS)


def test_agent_questions_are_two_tool_call_turns_over_the_same_code() -> None:
    import shlex

    questions = agent_questions()
    assert len(questions) == len(code_edit_questions())
    split = next(q for q in questions if q.question_id.endswith("shlex.split"))
    first, second = split.turns
    assert split.category == AGENT_CATEGORY and split.prediction is None
    assert '"path": "shlex.py"' in first and "write_file" in first
    assert textwrap.dedent(inspect.getsource(shlex.split)) in first
    assert "`s_value`" in first and "code block" not in first  # the edit, answered as JSON
    assert "comment" in second and "write_file" in second  # the next task kind
