"""The real embedded model end to end (slow: loads SmolLM2-135M-Instruct; CI still runs it)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftwise.api import Generator
from draftwise.models import ModelNotFoundError, load_model
from draftwise.text import TextTracker

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize: The cat sat on the mat. The cat was happy on the mat because the mat was warm.",
    "Translate to French: Good morning, how are you today?",
    "What is 17 times 23? Show your steps.",
    "Give three tips for writing clear emails.",
    "Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox.",
]


@pytest.fixture(scope="module")
def generator() -> Generator:
    # a pinned budget: auto sizing decides from timings whether drafting pays, and on a busy
    # machine it may verify no draft at all, leaving the tree path untested
    return Generator(load_model("default", progress=False), "pld", budget=8, backend="hf")


def test_greedy_pld_equals_transformers_generate(generator: Generator) -> None:
    model, eos = generator.model.model, generator.model.eos_token_ids
    accepted_any = False
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        config = generator.config(max_new_tokens=48)
        run = generator.engine.generate(ids, config)
        with torch.inference_mode():
            reference = model.generate(
                torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=list(eos),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids) :].tolist()
        assert run.tokens == reference, prompt
        accepted_any |= run.stats.mat > 1.0
    assert accepted_any  # the drafts were not all rejected: the tree path was exercised


def test_second_load_uses_the_cache(tmp_path: Path) -> None:
    first = load_model("default", cache_dir=tmp_path, progress=False)
    (folder,) = (tmp_path / "models").iterdir()
    # the tokenizer and config at once; the float32 weights only when a backend asks for them
    assert first.converted and not first.weights_loaded
    assert not (folder / "model.safetensors").exists()
    assert first.model is not None and (folder / "model.safetensors").is_file()
    second = load_model("default", cache_dir=tmp_path, progress=False)
    assert not second.converted  # the second load read the cache
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits)


def test_missing_model_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model at"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_stop_string_truncates_text(generator: Generator) -> None:
    full = generator.generate("Count from 1 to 20, separated by commas.", max_new_tokens=40)
    assert "5" in full.text
    stop = full.text[full.text.index("5") :][:2]
    cut = generator.generate(
        "Count from 1 to 20, separated by commas.", max_new_tokens=40, stop=[stop]
    )
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.stats.finish_reason == "stop"


def test_a_long_lived_generator_drafts_from_its_earlier_answers(generator: Generator) -> None:
    """The suffix drafter of a Generator's later request drafts an earlier request's answer
    (its output is kept even where a stop string ended it early); the text is plain's."""
    suffix = generator.with_method("suffix@8")
    prompt = "Describe a lighthouse keeper's morning in three sentences."
    first = suffix.generate(prompt, max_new_tokens=48)
    again = suffix.generate(prompt, max_new_tokens=48)
    plain = generator.with_method("none").generate(prompt, max_new_tokens=48)
    assert first.text == again.text == plain.text
    assert again.stats.steps < first.stats.steps / 2
    stop = " ".join(plain.text.split()[8:10])
    cut = suffix.generate(prompt, max_new_tokens=48, stop=[stop])
    assert cut.stats.finish_reason == "stop"
    cache = generator.methods.suffix
    assert cache is not None
    newest = cache._tenants[""].docs  # the stopped request's output is the newest held
    assert list(newest[max(newest)]) == cut.token_ids


def test_text_pieces_from_windows_add_up_to_the_tokenizers_decode(generator: Generator) -> None:
    tokenizer = generator.model.tokenizer
    text = "Grüße aus Zürich! 你好，世界。 🤖🚀\n\ndef f(x):\n    return x ** 2  # ok\n" * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(10):
        tracker, pieces, n = TextTracker(tokenizer), [], 0
        while n < len(ids):
            n = min(len(ids), n + rng.randint(1, 4))
            pieces.append(tracker.update(ids[:n])[0])
            assert tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(tracker.text)
        pieces.append(tracker.final(ids))
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "draftwise.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_json_compare() -> None:
    done = cli("generate", "Repeat: one two three, one two three.", "--max-new-tokens", "24",
               "--compare", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # identical, or a divergence the tool reports as a floating-point near-tie
    assert result["identical"] is True or result["margin"] < 1e-3, result
    assert result["new_tokens"] > 0 and result["mat"] >= 1.0
    assert {"text", "tokens_per_s", "speedup"} <= set(result)


def test_cli_streams_text_and_a_stats_line() -> None:
    done = cli("generate", "Say hello.", "--max-new-tokens", "12", "--method", "none")
    assert done.returncode == 0, done.stderr
    assert "tok/s" in done.stdout.strip().splitlines()[-1]
    assert "MAT 1.00" in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], 1, "no model at"),
        (["generate", "hi", "--method", "nope"], 1, "unknown method"),
        (["generate", "hi", "--temperature", "-1"], 1, "temperature must be"),
        (["generate", "hi", "--max-new-tokens", "0"], 2, "max-new-tokens"),
        (["generate", "hi", "--bogus"], 2, "unrecognized arguments"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    done = cli(*args)
    assert done.returncode == code
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_fast_backend_matches_transformers_on_the_real_model(generator: Generator) -> None:
    """Logits within float32 tolerance; greedy output identical or diverging only at a
    near-tie of the transformers model (different kernels may round a tie differently)."""
    from draftwise.backends.fast import FastBackend
    from draftwise.bench.report import first_divergence
    from draftwise.drafters import create_drafter
    from draftwise.engine import Engine
    from draftwise.tree import DraftTree

    model = generator.model.model
    fast = FastBackend(model)  # untuned: default kernels
    ids = generator.encode(PROMPTS[0])
    fast.prefill(ids)
    tree = DraftTree.chain([ids[3], ids[4], ids[5]])
    logits = fast.forward_tree(tree)
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids + [ids[3], ids[4], ids[5]]])).logits[0]
    torch.testing.assert_close(logits, expected[-4:], rtol=1e-3, atol=1e-3)
    engine = Engine(fast, create_drafter("pld"))
    for prompt in PROMPTS[:4]:
        ids = generator.encode(prompt)
        run = engine.generate(ids, generator.config(max_new_tokens=32))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                eos_token_id=list(generator.model.eos_token_ids), output_scores=True,
                return_dict_in_generate=True,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
        reference = out.sequences[0, len(ids) :].tolist()
        first = first_divergence(run.tokens, reference)
        if first is not None:
            top2 = torch.topk(out.scores[first][0], 2).values
            assert float(top2[0] - top2[1]) < 1e-3, (prompt, first)


def test_cli_fast_backend_compare() -> None:
    done = cli("generate", "Repeat: one two three, one two three.", "--max-new-tokens", "24",
               "--backend", "fast", "--compare", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "FastBackend" and result["new_tokens"] > 0
    assert isinstance(result["identical"], bool)


def test_quant_backend_on_the_default_gguf(generator: Generator) -> None:
    """The GGUF's own Q4_1/Q8_0 blocks: with float32 activations and cache, logits of the fp32
    conversion to float32 rounding (summed over 30 layers: the tolerance of the fast backend's
    test above); with the default 8-bit activations and float16 cache, a tree's rows
    bit-identical to plain decoding and speculation identical to plain decoding; 5x fewer
    weight bytes read per step than float32."""
    from draftwise.backends.fast import FastBackend
    from draftwise.backends.quant import QuantBackend, kernels_unavailable, load_kernels
    from draftwise.drafters import create_drafter
    from draftwise.engine import Engine
    from draftwise.models import default_cache_dir
    from draftwise.tree import DraftTree

    if kernels_unavailable():
        pytest.skip(f"no quantized kernels here: {kernels_unavailable()}")
    ops = load_kernels(default_cache_dir(), progress=False)
    config32 = generator.model.config
    quant32 = QuantBackend(generator.model.source, config32, ops=ops, activations="float32",
                           kv_cache="float32")
    assert quant32.capabilities.float32_tensors == ()
    fast = FastBackend(generator.model.model)
    dense = sum(p.numel() * 4 for p in generator.model.model.parameters())
    assert quant32.step_weights()[0] < dense / 5
    ids = generator.encode(PROMPTS[0])
    tree = DraftTree.chain([ids[3], ids[4], ids[5]])
    for backend in (quant32, fast):
        backend.prefill(ids)
    torch.testing.assert_close(quant32.forward_tree(tree), fast.forward_tree(tree),
                               rtol=1e-3, atol=1e-3)

    quant = QuantBackend(generator.model.source, config32, ops=ops)  # 8-bit activations
    assert quant.step_weights()[0] < dense / 5
    quant.prefill(ids)
    logits = quant.forward_tree(tree)
    quant.prefill(ids)
    for i, token in enumerate([ids[3], ids[4], ids[5]]):
        row = quant.forward_tree(DraftTree.chain([]))[0]
        assert torch.equal(row, logits[i]), i
        quant.commit((), token)
    for prompt in PROMPTS[:3]:
        ids = generator.encode(prompt)
        config = generator.config(max_new_tokens=32)
        plain = Engine(quant, create_drafter("none")).generate(ids, config).tokens
        assert Engine(quant, create_drafter("pld")).generate(ids, config).tokens == plain


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20},
                    "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("method", ["pld", "recycling", "composite"])
def test_structured_output_equals_constrained_plain(generator: Generator, method: str) -> None:
    from draftwise.constraints import check_output, constraint_spec

    spec = constraint_spec(json_schema=SCHEMA)
    other = generator.with_method(method)
    plain = generator.with_method("none")
    prompt = "Describe a person named Ada who is 36 and likes chess, as JSON."
    a = other.generate(prompt, max_new_tokens=96, json_schema=SCHEMA)
    b = plain.generate(prompt, max_new_tokens=96, json_schema=SCHEMA)
    assert a.token_ids == b.token_ids
    assert a.stats.finish_reason == "eos"
    assert check_output(spec, a.text, complete=True) == (True, "")
    assert a.constraint is not None and a.constraint.forced > 0


def test_cli_structured_json_compare(tmp_path: Path) -> None:
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    out = subprocess.run(
        [sys.executable, "-m", "draftwise.cli", "generate", "A person named Bo, as JSON.",
         "--json-schema", str(schema), "--compare", "--json", "--max-new-tokens", "80"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert result["identical"] is True
    assert result["constraint"]["valid"] is True, result
    assert json.loads(result["text"])["name"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--regex", "a(b"], "unclosed group"),
        (["--json-schema", '{"type": "string", "format": "nope"}'], "Unknown format"),
        (["--json-schema", "missing-file.json"], "JSON schema file not found"),
        (["--regex", "a", "--grammar", "start: a"], "at most one"),
    ],
)
def test_cli_constraint_errors_are_one_line(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "draftwise.cli", "generate", "hi", *args],
        capture_output=True, text=True,
    )
    assert out.returncode == 1
    assert message in out.stderr and out.stdout == ""
    assert out.stderr.startswith("draftwise: error:")


def test_cli_aligned_samples() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "draftwise.cli", "generate", "Pick a color.", "--regex",
         "(red|green|blue)", "--samples", "5", "--aligned", "--temperature", "1.0",
         "--max-new-tokens", "8", "--json"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert result["aligned"] and len(result["samples"]) == 5
    for sample in result["samples"]:
        assert sample["valid"] and sample["text"] in ("red", "green", "blue")
    assert 0.0 < result["samples"][-1]["grammaticality"] <= 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "draftwise.cli", "generate", "x", "--samples", "2", "--aligned"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 1 and "temperature" in bad.stderr


def test_bench_structured_mode(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas.jsonl"
    rows = [
        {"name": "person", "schema": SCHEMA},
        {"name": "refused", "schema": {"type": "string", "format": "no-such-format"}},
        {"name": "flag", "schema": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                    "required": ["on"], "additionalProperties": False}},
    ]
    schemas.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "draftwise.cli", "bench", "--structured", str(schemas),
         "--methods", "none,pld", "--max-new-tokens", "48", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, check=True,
    )
    assert "| pld | 2 |" in out.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["compiled"] == 2 and summary["refused"] == 1
    assert "Unknown format" in summary["refusals"]["refused"]
    for method in ("none", "pld"):
        m = summary["methods"][method]
        assert m["schemas"] == 2 and m["identical"] == 2 and m["forced_share"] > 0
    records = [json.loads(line) for line in (tmp_path / "o" / "records.jsonl").open()]
    assert {r["method"] for r in records} == {"none", "pld"}
    assert all(r["valid"] or r["finish_reason"] == "length" for r in records)


MASKBENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "maskbench"


@pytest.mark.skipif(not MASKBENCH.is_dir(), reason="../shared/data/maskbench is not present")
def test_maskbench_schemas_with_drafters_equal_constrained_plain(generator: Generator) -> None:
    """Regressions: llguidance's masks also forbid non-canonical tokenizations that its
    validate_tokens accepts (the drafter must be shown the tree the masks left); and its
    rollback, after many tree walks, could leave masks unlike a fresh replay's (label-commenter:
    walks now run on forks)."""
    from draftwise.bench.structured import PROMPT, load_schemas
    from draftwise.constraints import ConstraintSpec

    fast = Generator(generator.model, "none", backend="fast")
    plain = fast.with_method("none")
    others = [fast.with_method(m) for m in ("recycling", "composite")]
    items = load_schemas(MASKBENCH)
    for item in items[:2] + [s for s in items if s.name.endswith("label-commenter-config")]:
        spec = ConstraintSpec("json_schema", json.dumps(item.schema))
        ids = generator.encode(PROMPT.format(schema=json.dumps(item.schema)))
        config = generator.config(max_new_tokens=128)
        expected = plain.engine.generate(ids, config, fast.constrain(spec)).tokens
        for other in others:
            assert other.engine.generate(ids, config, fast.constrain(spec)).tokens == expected
