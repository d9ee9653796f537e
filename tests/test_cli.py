"""The `jaxinfer generate` command line, run as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _generate_args(model):
    return ("generate", "--model", model, "--prompt", "def add(a, b):", "--max_tokens", "24", "--temperature", "0")


@pytest.fixture(scope="module")
def plain_generate(text_model_dir):
    """One plain `generate` run, shared by the tests that read it (each run is a process
    that imports jax, loads the model and compiles its programs)."""
    return _cli(*_generate_args(text_model_dir[0]))


def test_generate_streams_and_summarizes(text_model_dir, plain_generate):
    res = plain_generate
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def add(a, b):")
    summary = res.stdout.strip().splitlines()[-1]
    from jaxinfer.models.tokenizer import load_tokenizer
    num_prompt = len(load_tokenizer(text_model_dir[0]).encode("def add(a, b):"))
    assert f"prompt tokens: {num_prompt} |" in summary
    assert "generated tokens: 24 (length)" in summary
    assert "time to first token" in summary and "tokens/s" in summary


def test_kv_cache_dtype_flag_halves_the_bytes_of_the_same_pages(text_model_dir, plain_generate):
    """--kv_cache_dtype int8: the summary names the storage, the pool of the same number of
    pages takes the bytes bytes_per_page gives (one byte per element plus a float32 scale
    per token and KV head) and the text is still generated."""
    from jaxinfer.models.checkpoint import read_hf_config
    from jaxinfer.models.registry import model_config_from_hf
    from jaxinfer.runtime.kv_cache import bytes_per_page
    res = _cli(*_generate_args(text_model_dir[0]), "--kv_cache_dtype", "int8", "--num_pages", "40")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def add(a, b):")
    summary = res.stdout.strip().splitlines()[-1]
    config = model_config_from_hf(read_hf_config(text_model_dir[0]))
    int8_bytes = 40 * bytes_per_page(config, 16, "float32", kv_cache_dtype="int8")
    float_bytes = 40 * bytes_per_page(config, 16, "float32")
    assert int8_bytes * 3 < float_bytes
    assert f"KV cache: {int8_bytes / 1e6:.2f} MB, 40 pages (int8)" in summary
    assert "generated tokens: 24 (length)" in summary
    assert "(auto)" in plain_generate.stdout.strip().splitlines()[-1]
    res = _cli(*_generate_args(text_model_dir[0]), "--kv_cache_dtype", "int4")
    assert res.returncode != 0 and "kv_cache_dtype" in res.stderr


def test_speculative_flags_give_the_same_text_and_report_acceptance(text_model_dir, plain_generate):
    res = _cli(*_generate_args(text_model_dir[0]), "--speculative_method", "ngram", "--num_speculative_tokens", "3")
    assert res.returncode == 0, res.stderr
    text, summary = res.stdout.strip().rsplit("\n", 1)
    assert text == plain_generate.stdout.strip().rsplit("\n", 1)[0]
    assert "speculation: ngram, " in summary and "draft tokens accepted" in summary


def test_usage_errors(text_model_dir):
    res = _cli("generate", "--model", text_model_dir[0])
    assert res.returncode != 0 and "--prompt" in res.stderr
    res = _cli("generate", "--model", text_model_dir[0], "--prompt", "x", "--top_p", "0")
    assert res.returncode != 0 and "top_p" in res.stderr
    res = _cli("bogus")
    assert res.returncode != 0 and "usage" in res.stderr
    res = _cli("serve", "--port", "70000")
    assert res.returncode != 0 and "port" in res.stderr
    res = _cli("generate", "--model", "/no/such/model", "--prompt", "x")
    assert res.returncode == 2 and "/no/such/model" in res.stderr


def test_help_lists_the_flags():
    res = _cli("generate", "--help")
    for flag in ("--prompt", "--model", "--max_tokens", "--temperature", "--stop", "--quantization"):
        assert flag in res.stdout + res.stderr


def test_invalid_request_is_refused_before_the_prompt_is_echoed(text_model_dir):
    res = _cli("generate", "--model", text_model_dir[0], "--prompt", "def add(a, b):", "--max_tokens", "100000")
    assert res.returncode == 2
    assert "max_tokens" in res.stderr and "def add" not in res.stdout


def _decode_rate(summary: str) -> float:
    return float(summary.split("decode: ")[1].split(" tokens/s")[0])


def test_decode_rate_does_not_count_compiles_held_back_by_a_stop_string(text_model_dir, plain_generate):
    plain = plain_generate
    stopped = _cli(*_generate_args(text_model_dir[0]), "--stop", "zzzz")  # never matches: holds text back
    assert plain.returncode == 0 and stopped.returncode == 0, stopped.stderr
    rates = [_decode_rate(r.stdout.strip().splitlines()[-1]) for r in (plain, stopped)]
    # Counting the decode compiles in gave 40x less (5.0 vs 198.5 tokens/s); timings vary
    # on a loaded machine, so only a gross error fails.
    assert rates[0] > 0 and rates[1] > rates[0] / 4, rates


def test_warmup_command_fills_the_cache_and_the_next_one_replays_its_profile(tmp_path):
    small = ("--max_num_seqs", "1", "--max_num_batched_tokens", "4", "--max_model_len", "64",
             "--warmup_context_tokens", "16", "--compilation_cache_dir", str(tmp_path))
    first = _cli("warmup", *small)
    assert first.returncode == 0, first.stderr[-2000:]
    # a decode of one sequence and prompt chunks of 2 and 4 tokens, greedy and sampled
    assert "warm-up (grid): 6 programs (6 compiled or loaded, 0 from the profile)" in first.stdout
    profile = first.stdout.rsplit("profile: ", 1)[1].strip()
    assert profile.startswith(str(tmp_path)) and len(open(profile).read().splitlines()) == 6
    second = _cli("warmup", "--warmup", "profile", *small)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "warm-up (profile): 6 programs (6 compiled or loaded, 6 from the profile)" in second.stdout
    bad = _cli("warmup", "--warmup_context_tokens", "0")
    assert bad.returncode != 0 and "warmup_context_tokens" in bad.stderr
