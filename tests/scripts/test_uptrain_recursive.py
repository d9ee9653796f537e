"""scripts/uptrain_recursive.py end to end on a tiny converted model (4 layers, B = 2, rank 4).

The token stream is placed in the work dir beforehand (the script caches it there), a
short repeating pattern the model learns in a few steps, so the run needs no tokenizer
and the loss at both exits must fall. Checked: the JSONL loss curve has every exit's loss
per step, the written folder loads back (and changed), a second invocation resumes from
the orbax checkpoint instead of starting over, and other settings in the same work dir
are refused naming the flag.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxinfer.models.checkpoint import save_hf_folder
from jaxinfer.models.registry import model_config_from_hf
from jaxinfer.models.transformer import init_params
from script_loader import SCRIPTS, load_script

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 61, "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": True, "hidden_act": "silu"}
ARGS = ["--seq_len", "16", "--batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "1",
        "--eval_max_tokens", "0", "--checkpoint_minutes", "100"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, "uptrain_recursive.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    lib = load_script("convert_recursive").recursive_lib
    root = tmp_path_factory.mktemp("uptrain")
    config = model_config_from_hf(HF_CONFIG)
    params = init_params(config, jax.random.key(3), init_std=0.1)
    src = str(root / "src")
    save_hf_folder(src, params, config, HF_CONFIG)
    spec = lib.RecursiveSpec(4, 2, "stepwise", 4)
    out = str(root / "rrt")
    lib.save_recursive(out, HF_CONFIG, config, spec, lib.convert(config, params, spec), source_dir=src)
    return lib, root, out


def test_uptraining_learns_logs_every_exit_and_resumes(converted):
    lib, root, model = converted
    work, out = root / "work", str(root / "uptrained")
    work.mkdir()
    np.save(work / "train_tokens.npy", np.tile(np.arange(3, 13, dtype=np.uint16), 400))
    first = _run("--model", model, "--output_dir", out, "--work_dir", str(work), "--max_steps", "12", *ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in open(work / "train_log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "loss_exit_1", "loss_exit_2", "grad_norm", "lr"} <= set(rows[0])
    for key in ("loss_exit_1", "loss_exit_2"):
        assert rows[-1][key] < 0.7 * rows[0][key], (key, rows[0][key], rows[-1][key])
    np.testing.assert_allclose(rows[0]["loss"], (rows[0]["loss_exit_1"] + rows[0]["loss_exit_2"]) / 2, rtol=1e-3)
    summary = json.load(open(os.path.join(out, "uptrain_summary.json")))
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 16
    assert summary["settings"]["exits"] == [1, 2]

    # The folder loads back with the same structure, and training changed it.
    _, _, spec0, before = lib.load_recursive(model)
    _, _, spec1, after = lib.load_recursive(out)
    assert spec1 == spec0
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))) > 1e-3

    # Resumed: steps 13..16 only, from the checkpoint written at step 12.
    second = _run("--model", model, "--output_dir", out, "--work_dir", str(work), "--max_steps", "16", *ARGS)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 12" in second.stderr
    rows = [json.loads(line) for line in open(work / "train_log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 17))

    # Other settings in the same work dir: refused, naming the setting.
    other = _run("--model", model, "--output_dir", out, "--work_dir", str(work), "--max_steps", "16",
                 *ARGS[:5], "5e-3", *ARGS[6:])
    assert other.returncode != 0 and "learning_rate" in other.stderr


def test_bad_exit_losses_are_refused_naming_the_flag(converted):
    _, root, model = converted
    bad = _run("--model", model, "--output_dir", str(root / "x"), "--work_dir", str(root / "w2"),
               "--exit_losses", "3", *ARGS)
    assert bad.returncode != 0 and "--exit_losses" in bad.stderr
