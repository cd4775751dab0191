"""Constraints: masks, forced tokens, pruning, rollback, compile cache, named errors, MaskBench."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from draftwise.constraints import (
    Compiler,
    ConstraintError,
    ConstraintSpec,
    ConstraintTimeout,
    GrammarError,
    byte_tokenizer,
    check_output,
    constraint_spec,
)
from draftwise.tree import DraftTree

MASKBENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "maskbench"
EOS = 256
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["x", "yz"]}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler() -> Compiler:
    return Compiler(byte_tokenizer(), vocab_size=EOS + 1, eos_token_ids=[EOS])


def schema(value: object, whitespace: str = "compact") -> ConstraintSpec:
    return ConstraintSpec("json_schema", json.dumps(value), whitespace)


def allowed(constraint, text: str) -> list[int]:
    """Commit ``text``; return the bytes allowed next."""
    constraint.commit(list(text.encode()))
    return constraint.mask().nonzero().flatten().tolist()


def accepts(constraint, ids: list[int], eos: int) -> bool:
    """Every token allowed by the mask in turn, then EOS."""
    for token in ids:
        if not bool(constraint.mask()[token]):
            return False
        constraint.commit([token])
    return bool(constraint.mask()[eos])


def test_compact_whitespace_is_the_default(compiler: Compiler) -> None:
    compact = compiler.compile(schema(PERSON))
    assert bytes(compact.forced(20)) == b'{"name": "'  # one space after ':' and nothing else
    assert allowed(compact, '{"name": "Al", "age": 3') == sorted(b",0123456789")
    flexible = compiler.compile(schema(PERSON, "flexible"))
    after = allowed(flexible, '{"name": "Al", "age": 3')
    assert ord("\n") in after and ord(" ") in after
    assert not compact.error() and not flexible.error()


def test_forced_tokens_stop_where_the_grammar_branches(compiler: Compiler) -> None:
    regex = compiler.compile(ConstraintSpec("regex", r"ab(c|d)ef"))
    assert regex.forced(10) == list(b"ab")
    assert regex.forced(1) == list(b"a")
    regex.commit(list(b"abd"))
    assert regex.forced(10) == [*b"ef", EOS]  # the end is forced too, and ends the chain
    assert regex.mask().nonzero().flatten().tolist() == [ord("e")]  # forced() left no trace


def test_tree_masks_prune_forbidden_nodes_and_mask_every_row(compiler: Compiler) -> None:
    c = compiler.compile(ConstraintSpec("regex", r"a[bc]d|ae"))
    # root -> a -> {b -> d, x -> y, c}; root -> z -> ...; root -> a -> e -> EOS -> q
    tree = DraftTree(
        tuple(b"abdxycz") + (ord("e"), EOS, ord("q")), (-1, 0, 1, 0, 3, 0, -1, 0, 7, 8)
    )
    kept, masks = c.tree_masks(tree)
    assert kept.tokens == (*b"abdc", ord("e"), EOS)
    assert kept.parents == (-1, 0, 1, 0, 0, 4)
    rows = [m.nonzero().flatten().tolist() for m in masks]
    assert rows[0] == [ord("a")]  # root
    assert rows[1] == sorted(b"bce")  # after "a"
    assert rows[2] == [ord("d")]  # after "ab"
    assert rows[3] == [EOS]  # after "abd": the bonus position of a full match
    assert rows[4] == [ord("d")]  # after "ac"
    assert rows[5] == [EOS]  # after "ae"
    assert c.mask().nonzero().flatten().tolist() == [ord("a")]  # committed state untouched
    pruned = c.prune(tree)  # the cheap path (no masks) agrees
    assert pruned.tokens == kept.tokens and pruned.parents == kept.parents


def test_forbidden_sampled_drafts_stay_as_leaves(compiler: Compiler) -> None:
    """The rejection rule must still reject them and take their residual."""
    c = compiler.compile(ConstraintSpec("regex", r"a[bc]"))
    probs = torch.full((4, EOS + 1), 1.0 / (EOS + 1), dtype=torch.float64)
    tree = DraftTree((ord("z"), ord("a"), ord("q"), ord("b")), (-1, -1, 0, 1), probs)
    kept = c.prune(tree)
    assert kept.tokens == (ord("z"), ord("a"), ord("b"))  # z kept (a leaf), its child dropped
    kept, masks = c.tree_masks(tree)
    assert kept.tokens == (ord("z"), ord("a"), ord("b"))
    assert bool(masks[1].all())  # z's row is never used; it allows everything
    assert kept.draft_probs is not None and kept.draft_probs.shape[0] == 3


def test_rollback_then_mask_equals_the_original_mask(compiler: Compiler) -> None:
    gen = torch.Generator().manual_seed(0)
    for value in (PERSON, {"type": "array", "items": {"type": "number"}, "maxItems": 4}):
        c = compiler.compile(schema(value))
        prefix: list[int] = []
        for _ in range(30):  # walk a random valid path, checking rollback at every point
            before = c.mask()
            options = before.nonzero().flatten()
            options = options[options != EOS]
            if len(options) == 0:
                break
            steps = options[torch.randint(len(options), (3,), generator=gen)].tolist()
            valid = 0
            for token in steps:
                if not bool(c.mask()[token]):
                    break
                c.commit([token])
                valid += 1
            c.rollback(valid)
            assert torch.equal(c.mask(), before)
            c.commit([steps[0]])
            prefix.append(steps[0])
        assert len(prefix) > 5


def test_compiled_grammars_are_cached_and_states_independent(compiler: Compiler) -> None:
    spec = ConstraintSpec("regex", r"[0-9]{3}-cache")
    first = compiler.compile(spec)
    second = compiler.compile(spec)
    assert not first.stats.cached and second.stats.cached and second.stats.compile_s == 0.0
    first.commit(list(b"12"))
    assert second.mask().nonzero().flatten().tolist() == list(b"0123456789")


def test_the_grammar_cache_keeps_the_most_recently_used() -> None:
    compiler = Compiler(byte_tokenizer(), 257, [256], cache_size=2)
    specs = [ConstraintSpec("regex", f"[0-9]{{{n}}}") for n in (1, 2, 3)]
    compiler.compile(specs[0])
    compiler.compile(specs[1])
    assert compiler.compile(specs[0]).stats.cached  # used again: now the most recent
    compiler.compile(specs[2])  # evicts specs[1], the least recently used
    assert compiler.compile(specs[0]).stats.cached
    assert not compiler.compile(specs[1]).stats.cached
    with pytest.raises(ConstraintError, match="cache"):
        Compiler(byte_tokenizer(), 257, [256], cache_size=0)


@pytest.mark.parametrize(
    ("kind", "source", "quoted"),
    [
        ("regex", "a(b", "unclosed group"),
        ("grammar", "start: foo", 'unknown name: "foo"'),
        ("json_schema", '{"type": "object", "unevaluatedProperties": false}',
         "Unimplemented keys"),
        ("json_schema", '{"type": "string", "format": "no-such-format"}', "Unknown format"),
        ("json_schema", '{"oneOf": [{"type": "integer"}, {"minimum": 3}]}', "oneOf"),
        ("json_schema", "{not json", "not valid JSON"),
    ],
)
def test_invalid_or_unsupported_input_is_a_named_error(
    compiler: Compiler, kind: str, source: str, quoted: str
) -> None:
    with pytest.raises(GrammarError, match=quoted):
        compiler.compile(ConstraintSpec(kind, source))


def test_compile_timeout_is_a_named_error() -> None:
    slow = Compiler(byte_tokenizer(), vocab_size=EOS + 1, eos_token_ids=[EOS], timeout_s=1e-6)
    big = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": f"[a-z]{{{i}}}"}
                                            for i in range(1, 60)}}
    with pytest.raises(ConstraintTimeout, match="took longer than"):
        slow.compile(schema(big))


def test_constraint_spec_reads_inline_text_and_files(tmp_path: Path) -> None:
    file = tmp_path / "s.json"
    file.write_text(json.dumps(PERSON))
    assert constraint_spec(json_schema=str(file)) == constraint_spec(json_schema=PERSON)
    assert constraint_spec(json_schema=json.dumps(PERSON)).source == json.dumps(PERSON)
    lark = tmp_path / "g.lark"
    lark.write_text('start: "yes" | "no"\n')
    assert constraint_spec(grammar=str(lark)).source == 'start: "yes" | "no"\n'
    assert constraint_spec() is None
    with pytest.raises(ConstraintError, match="at most one"):
        constraint_spec(regex="a", grammar="start: a")
    with pytest.raises(ConstraintError, match="not found"):
        constraint_spec(json_schema=str(tmp_path / "missing.json"))
    with pytest.raises(ConstraintError, match="whitespace"):
        ConstraintSpec("regex", "a", "loose")


def test_gbnf_grammars_are_converted(compiler: Compiler) -> None:
    c = compiler.compile(ConstraintSpec("grammar", 'root ::= "yes" | "no"'))
    assert sorted(c.mask().nonzero().flatten().tolist()) == sorted(b"yn")


def test_check_output_is_independent_of_the_grammar_engine() -> None:
    spec = schema(PERSON)
    assert check_output(spec, '{"name": "Al", "age": 3, "tags": ["x"]}', True) == (True, "")
    ok, why = check_output(spec, '{"name": "Al", "age": 3, "tags": ["w"]}', True)
    assert not ok and "schema violation" in why
    assert not check_output(spec, '{"name": "Al"', False)[0]
    assert check_output(ConstraintSpec("regex", "a+b"), "aab", True)[0]
    assert not check_output(ConstraintSpec("regex", "a+b"), "ab b", True)[0]


def maskbench_counts(compiler: Compiler, encode) -> Counter:
    """Run every MaskBench instance through the token mask (compact JSON, as json.dumps writes
    it); schemas llguidance cannot represent exactly are refused with a named error."""
    counts: Counter = Counter()
    eos = compiler.eos_token_ids[0]
    for file in sorted(MASKBENCH.glob("*.json")):
        case = json.loads(file.read_text())
        spec = schema(case["schema"])
        try:
            compiler.compile(spec)
        except GrammarError:
            counts["schemas refused"] += 1
            counts["instances of refused schemas"] += len(case["tests"])
            continue
        counts["schemas compiled"] += 1
        for test in case["tests"]:
            text = json.dumps(test["data"], ensure_ascii=False)
            ok = accepts(compiler.compile(spec), encode(text), eos)
            valid = "valid" if test["valid"] else "invalid"
            counts[f"{valid} {'accepted' if ok else 'rejected'}"] += 1
    return counts


def check_maskbench(counts: Counter) -> None:
    print(dict(counts))
    assert counts["schemas compiled"] + counts["schemas refused"] == 400
    assert counts["valid rejected"] == 0 and counts["invalid accepted"] == 0
    assert counts["schemas compiled"] >= 300  # refusals stay the exception
    assert counts["valid accepted"] > 400 and counts["invalid rejected"] > 700


@pytest.mark.skipif(not MASKBENCH.is_dir(), reason="../shared/data/maskbench is not present")
def test_maskbench_byte_level(compiler: Compiler) -> None:
    check_maskbench(maskbench_counts(compiler, lambda text: list(text.encode())))


@pytest.mark.slow
@pytest.mark.skipif(not MASKBENCH.is_dir(), reason="../shared/data/maskbench is not present")
def test_maskbench_default_model_tokenizer() -> None:
    from draftwise.models import load_model

    loaded = load_model("default", progress=False)
    tok = loaded.tokenizer
    compiler = Compiler(tok, int(loaded.model.config.vocab_size), loaded.eos_token_ids)
    check_maskbench(
        maskbench_counts(compiler, lambda text: tok(text, add_special_tokens=False).input_ids)
    )
