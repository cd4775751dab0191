"""Building a :class:`ConstraintSpec` from user input, and checking outputs against it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from draftwise.constraints.base import ConstraintError, ConstraintSpec, GrammarError

__all__ = ["check_output", "constraint_spec"]


def _read(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConstraintError(f"{what} file not found: {path}")
    return path.read_text(encoding="utf-8")


def constraint_spec(
    *,
    json_schema: dict[str, Any] | bool | str | Path | None = None,
    regex: str | None = None,
    grammar: str | Path | None = None,
    whitespace: str = "compact",
) -> ConstraintSpec | None:
    """The spec for at most one of ``json_schema`` (dict, JSON text or file), ``regex`` or
    ``grammar`` (Lark/GBNF text or file); None when none is given."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex),
                                  ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give at most one constraint, got {', '.join(given)}")
    if json_schema is not None:
        if isinstance(json_schema, dict | bool):
            source = json.dumps(json_schema)
        elif isinstance(json_schema, Path):
            source = _read(json_schema, "JSON schema")
        else:
            try:  # inline JSON, else a file name
                json.loads(json_schema)
                source = json_schema
            except json.JSONDecodeError:
                looks_like_json = json_schema.lstrip()[:1] in ("{", "[")
                if looks_like_json:
                    raise GrammarError("the JSON schema is not valid JSON") from None
                source = _read(Path(json_schema), "JSON schema")
        return ConstraintSpec("json_schema", source, whitespace)
    if regex is not None:
        return ConstraintSpec("regex", regex, whitespace)
    if grammar is not None:
        if isinstance(grammar, Path):
            source = _read(grammar, "grammar")
        elif "\n" not in grammar and Path(grammar).is_file():
            source = _read(Path(grammar), "grammar")
        else:
            source = grammar
        return ConstraintSpec("grammar", source, whitespace)
    return None


def check_output(spec: ConstraintSpec, text: str, complete: bool) -> tuple[bool, str]:
    """Is ``text`` a valid output for ``spec``? Returns ``(valid, reason when not)``.

    ``complete``: the grammar reached an accepting state (generation ended by EOS or with the
    grammar satisfied). JSON is also checked independently of the grammar engine: it must parse,
    and validate against the schema with ``jsonschema`` where that package is installed.
    """
    if not complete:
        return False, "incomplete: generation stopped before the grammar was satisfied"
    if spec.kind == "regex":
        try:
            pattern = re.compile(spec.source, flags=re.DOTALL)
        except re.error:
            return True, "not independently checked (Python re cannot read the regex)"
        if pattern.fullmatch(text) is None:
            return False, "does not match the regex (Python re)"
        return True, ""
    if spec.kind != "json_schema":
        return True, ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return False, f"not JSON: {error}"
    try:
        import jsonschema
    except ImportError:
        return True, ""
    try:
        jsonschema.validate(value, json.loads(spec.source))
    except jsonschema.ValidationError as error:
        return False, f"schema violation: {error.message}"
    except jsonschema.SchemaError as error:
        raise GrammarError(f"jsonschema rejects the schema: {error.message}") from None
    except Exception as error:  # noqa: BLE001 - e.g. an unresolvable remote $ref
        return True, f"not independently checked ({type(error).__name__})"
    return True, ""
