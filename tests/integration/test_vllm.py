"""draftwise's proposer inside a real vLLM (skipped where vLLM is not installed): a short greedy
generation with the plugin equals vLLM's own plain greedy output, with the proposer built in
vLLM's spawned worker processes (its multiprocessing executor), and drafts accepted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":  # vLLM spawns its workers: they import this file
        folder, method, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        spec = None
        if method != "none":
            spec = {"method": "custom_class", "num_speculative_tokens": 6,
                    "model": "draftwise.integrations.vllm.Method"}
        llm = LLM(model=folder, max_model_len=1024, seed=0, enforce_eager=True, dtype="float32",
                  speculative_config=spec, disable_log_stats=False,
                  distributed_executor_backend="mp")
        greedy = SamplingParams(temperature=0.0, max_tokens=40)
        outputs = []
        for ids in prompts + prompts:  # the second pass drafts from the first's answers
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)
            outputs.append(list(out[0].outputs[0].token_ids))
        accepted = sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics()
                       if m.name == "vllm:spec_decode_num_accepted_tokens")
        print("RESULT " + json.dumps({"outputs": outputs, "accepted": accepted}), flush=True)
''')


def run(tmp_path: Path, folder: Path, method: str, prompts: list[list[int]]) -> dict[str, object]:
    script = tmp_path / "generate.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "DRAFTWISE_VLLM_METHOD": method, "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    done = subprocess.run([sys.executable, str(script), str(folder), method, json.dumps(prompts)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result: dict[str, object] = json.loads(lines[-1][len("RESULT "):])
    return result


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed here (pip install -e \".[vllm]\")")
def test_the_suffix_proposer_in_vllm_equals_vllms_plain_greedy(tmp_path: Path) -> None:
    from draftwise.models import load_model

    model = load_model("default", progress=False)
    folder = model.weights_folder()
    prompts = [model.encode(text) for text in (
        "Repeat after me: the quick brown fox jumps over the lazy dog.",
        "Write a Python function that adds two numbers.",
    )]
    plain = run(tmp_path, folder, "none", prompts)
    suffix = run(tmp_path, folder, "suffix", prompts)
    assert suffix["outputs"] == plain["outputs"]
    assert float(suffix["accepted"]) > 0  # type: ignore[arg-type]
