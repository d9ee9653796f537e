"""scripts/benchmark_startup.py end to end: a cold and a warm start of the bundled model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cold_then_warm_start(tmp_path):
    out, png = tmp_path / "startup.json", tmp_path / "startup.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_startup.py"), "--model",
                           "tiny-code", "--runs", "2", "--prompt_len", "8", "--output_len", "3",
                           "--cache_dir", str(tmp_path / "cache"), f"--output={out}", f"--plot={png}"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    first, second = report["runs"]
    assert (first["kind"], second["kind"]) == ("cold", "warm")  # the given --cache_dir started empty
    assert first["warmup_programs"] == 0 and first["compiles_after_warmup"] >= 2
    assert second["warmup_programs"] == first["compiles_after_warmup"]  # what the first run recorded
    assert second["compiles_after_warmup"] == 0
    for run in report["runs"]:
        assert 0 < run["import_s"] <= run["load_s"] <= run["warmup_s"] <= run["first_token_s"] <= run["done_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
