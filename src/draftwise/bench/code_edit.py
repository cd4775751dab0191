"""Code-editing workloads: real functions from the Python standard library's own source, each
with an editing task whose answer repeats most of the code it was given.

Editing is where users feel speculation (a file regenerated with small changes), and Spec-Bench
has no such category. The functions are the running interpreter's own (``inspect.getsource``),
so nobody here wrote them and every machine has them; the tasks rotate over four kinds so that
any first N questions mix them: rename the function, rename its first parameter, add comments,
add type hints. Each question carries the original source as its ``prediction`` (OpenAI's
Predicted Outputs), which ``draftwise bench --prediction`` hands to our methods.

The *agent* workload (:func:`agent_questions`) is a coding agent's loop over the same functions:
each request asks for a ``write_file`` tool call (JSON) holding an edited function, and its
second turn, after the tool's answer, asks for the next edit of the function the first answer
wrote. Answers repeat earlier text three ways: the code of the prompt, the first answer in the
second turn, and the tool call's scaffolding of every earlier request (what a cross-request
cache, ``suffix``, can draft and prompt lookup cannot).
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from collections.abc import Callable, Iterator

from draftwise.bench.datasets import Question

__all__ = ["AGENT_CATEGORY", "CATEGORY", "FUNCTIONS", "agent_questions", "code_edit_questions"]

CATEGORY = "code_edit"
AGENT_CATEGORY = "agent"

# short, self-contained functions (9-30 lines) from pure-Python standard library modules
FUNCTIONS = (
    "textwrap.indent", "shlex.split", "shlex.quote", "glob.escape", "string.capwords",
    "base64.b64encode", "colorsys.rgb_to_hls", "colorsys.hls_to_rgb", "colorsys.rgb_to_hsv",
    "html.escape", "urllib.parse.quote_from_bytes", "statistics.median", "statistics.mode",
    "json.encoder.py_encode_basestring", "calendar.leapdays",
)

_FENCE = "```"


def _task_rename(name: str, first: str) -> str:
    return (f"Rename the function `{name}` to `{name}_v2`. Change nothing else and return the "
            "whole function in one Python code block.")


def _task_parameter(name: str, first: str) -> str:
    return (f"Rename the parameter `{first}` of `{name}` to `{first}_value` everywhere in the "
            "function. Change nothing else and return the whole function in one Python code "
            "block.")


def _task_comments(name: str, first: str) -> str:
    return (f"Add a short comment above each step of `{name}` explaining it, and return the "
            "whole function in one Python code block.")


def _task_hints(name: str, first: str) -> str:
    return (f"Add type hints to the parameters and the return value of `{name}`, and return the "
            "whole function in one Python code block.")


TASKS: tuple[tuple[str, Callable[[str, str], str]], ...] = (
    ("rename", _task_rename), ("parameter", _task_parameter), ("comments", _task_comments),
    ("hints", _task_hints),
)


def _source(path: str) -> tuple[str, str, str] | None:
    """``(source, name, first parameter)`` of the function at ``module.attr``, or None where
    this interpreter has no Python source for it."""
    module, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module), attr)
        source = textwrap.dedent(inspect.getsource(function))
        parameters = list(inspect.signature(function).parameters)
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return None
    return source, function.__name__, parameters[0] if parameters else "x"


def _functions() -> Iterator[tuple[int, str, str, str, str]]:
    """``(index, path, source, name, first parameter)`` of each function with source here."""
    for i, path in enumerate(FUNCTIONS):
        found = _source(path)
        if found is not None:
            yield (i, path, *found)


def code_edit_questions() -> list[Question]:
    """One question per function, the task kinds rotating (see the module docstring)."""
    questions = []
    for i, path, source, name, first in _functions():
        kind, task = TASKS[i % len(TASKS)]
        prompt = f"{task(name, first)}\n\n{_FENCE}python\n{source}{_FENCE}"
        questions.append(Question(f"edit-{kind}-{path}", CATEGORY, (prompt,),
                                  prediction=f"{_FENCE}python\n{source}{_FENCE}"))
    return questions


_AGENT = ("You are a coding agent. Your only tool is write_file. Answer with one tool call and "
          "nothing else, as JSON: {{\"tool\": \"write_file\", \"path\": \"{path}\", "
          "\"content\": \"<the whole new file>\"}}.\n\nTask: {task}\n\nThe file {path} "
          "holds:\n\n{fence}python\n{source}{fence}")
_NEXT = ("The tool answered: {{\"ok\": true}}. Next task: {task} Answer with one write_file "
         "call holding the whole new file, as before.")


def _edit(task: Callable[[str, str], str], name: str, first: str) -> str:
    """The edit a task asks for, without how to answer (the agent answers with a tool call)."""
    text = task(name, first)
    return text.split(". Change nothing")[0].split(", and return")[0] + "."


def agent_questions() -> list[Question]:
    """Two turns per function: an edit as a tool call, then the next edit of the result."""
    questions = []
    for i, path, source, name, first in _functions():
        file = path.rpartition(".")[0].replace(".", "/") + ".py"
        (kind, task), (after, then) = TASKS[i % len(TASKS)], TASKS[(i + 1) % len(TASKS)]
        opening = _AGENT.format(path=file, task=_edit(task, name, first), fence=_FENCE,
                                source=source)
        questions.append(Question(f"agent-{kind}+{after}-{path}", AGENT_CATEGORY,
                                  (opening, _NEXT.format(task=_edit(then, name, first)))))
    return questions
