"""scripts/benchmark_latency.py --speculative: the comparison runs, on code prompts, and reports
the same tokens for every method with the acceptance figures (a tiny run; speed is not checked)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_latency.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_latency_speculation_comparison(tmp_path):
    out = tmp_path / "spec.json"
    res = _run("--model", "tiny-code", "--prompts", "code", "--skip_hf", "--speculative", "none,ngram",
               "--prompt_len", "32", "--output_len", "8", "--num_prompts", "1", "--repeats", "1",
               "--num_speculative_tokens", "3", "--json_out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["speculation"]}
    assert set(rows) == {"none", "ngram"} and report["num_prompts"] == 1 and report["prompts"] == "code"
    assert rows["none"]["acceptance_rate"] is None and rows["none"]["speedup_vs_first"] == 1.0
    assert rows["ngram"]["same_tokens_as_first"] is True
    assert rows["ngram"]["tokens_per_verify_step"] is None or rows["ngram"]["tokens_per_verify_step"] >= 1.0
    assert "ngram" in res.stdout and "speed-up" in res.stdout
    res = _run("--model", "tiny-code", "--skip_hf", "--speculative", "none,draft", "--json_out", str(out))
    assert res.returncode != 0 and "draft_model" in res.stderr
