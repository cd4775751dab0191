"""A small end-to-end bench run on a tiny random model folder (no weights downloaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from draftwise.cli import main

from ..conftest import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers folder: tiny random Llama + a word-level tokenizer, saved locally."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=7)


def test_bench_writes_parseable_outputs(tiny_model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    questions = tmp_path / "q.jsonl"
    rows = [
        {"question_id": 1, "category": "qa", "turns": ["w1 w2 w3 w1 w2"]},
        {"question_id": 2, "category": "writing", "turns": ["w4 w5 w6", "w4 w5"]},
    ]
    questions.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--questions", str(questions),
                 "--methods", "pld,pld:budget=2,max_ngram=1,hf-generate", "--max-new-tokens",
                 "12", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| pld |" in stdout and "| hf-generate |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("none", "pld", "pld:budget=2,max_ngram=1", "hf-generate"):
        overall = summary["methods"][name]["overall"]
        assert {"speedup", "mat", "tokens_per_s", "exact_match", "questions"} <= set(overall)
        assert overall["exact_match"] == 1.0  # float32 tiny model: greedy identical
        assert set(summary["methods"][name]["categories"]) == {"qa", "mt_bench"}
    assert summary["environment"]["torch"]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 3  # 4 methods x 3 turns
    assert (out / "table.md").read_text().startswith("| method |")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_code_edit_workload_with_predictions(tiny_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--workload code-edit --prediction: each of our methods also runs given the original code
    as its predicted output (METHOD+prediction, none+prediction for the prediction alone),
    every output identical to plain decoding, the prediction's tokens counted."""
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--workload", "code-edit",
                 "--limit", "2", "--methods", "pld", "--prediction", "--max-new-tokens", "8",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"none", "pld", "none+prediction", "pld+prediction"}
    for data in summary["methods"].values():
        assert data["overall"]["exact_match"] == 1.0
        assert set(data["categories"]) == {"code_edit"}
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    predicted = [r for r in records if r["method"].endswith("+prediction")]
    assert len(predicted) == 4 and all("accepted_prediction_tokens" in r for r in predicted)
    assert all("accepted_prediction_tokens" not in r for r in records if r not in predicted)
    assert main(["bench", "--model", str(tiny_model_dir), "--prediction"]) == 1  # no predictions
    assert "carry no predicted output" in capsys.readouterr().err


def test_bench_without_matplotlib_keeps_its_figures(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The chart is optional: without matplotlib the run says so once, before it starts, and
    still writes its records, summary and table and exits 0."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["w1 w2 w1"]}))
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--questions", str(questions),
                 "--methods", "pld", "--max-new-tokens", "6", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    stderr = capsys.readouterr().err
    assert "no chart.png this run" in stderr and "matplotlib" in stderr
    assert (out / "records.jsonl").exists() and (out / "table.md").exists()
    assert json.loads((out / "summary.json").read_text())["methods"]["pld"]
    assert not (out / "chart.png").exists() and not (out / "records.partial.jsonl").exists()


def test_bench_cost_curve(tiny_model_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--model", str(tiny_model_dir), "--cost", "--cost-max", "4",
                 "--cost-repeats", "2", "--out", str(tmp_path)])
    assert code == 0
    curve = json.loads((tmp_path / "cost.json").read_text())["curve"]
    assert sorted(int(n) for n in curve) == [1, 2, 3, 4]
    assert curve["1"]["relative"] == 1.0


def test_bench_rejects_unknown_method(tiny_model_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tiny_model_dir), "--methods", "none,bogus"]) == 1
    assert "unknown method 'bogus'" in capsys.readouterr().err
