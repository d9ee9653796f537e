"""Checkpoint loading: shards, dtypes, errors that name the tensor, pickle refusal, orbax."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.models import checkpoint
from script_loader import load_script


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _tensors(path):
    return checkpoint.read_safetensors(os.path.join(path, "model.safetensors"))


def _rewrite(path, tensors):
    checkpoint.write_safetensors(os.path.join(path, "model.safetensors"), dict(tensors))


def test_safetensors_roundtrip_bf16(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)}
    file = str(tmp_path / "x.safetensors")
    checkpoint.write_safetensors(file, arrays)
    back = checkpoint.read_safetensors(file)
    np.testing.assert_array_equal(back["a"], arrays["a"])
    assert back["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["b"].astype(np.float32), [1.5, -2.25])
    # And HF's own safetensors library reads what we write.
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(file)["a"], arrays["a"])


def test_sharded_checkpoint_equals_single(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("qwen2")
    config, params, hf = checkpoint.load_model(path)
    sharded = str(tmp_path / "sharded")
    checkpoint.save_hf_folder(sharded, params, config, hf, max_shard_bytes=20_000)
    files = sorted(os.listdir(sharded))
    assert "model.safetensors.index.json" in files
    assert sum(f.startswith("model-0") for f in files) > 2
    _, params2, _ = checkpoint.load_model(sharded)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_bfloat16_checkpoint_loads_in_both_dtypes(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    dst = _copy(path, tmp_path / "bf16")
    _rewrite(dst, {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in _tensors(dst).items()})
    _, p32, _ = checkpoint.load_model(dst, "float32")
    _, p16, _ = checkpoint.load_model(dst, "bfloat16")
    assert jax.tree.leaves(p32)[0].dtype == jnp.float32 and jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32)), p32, p16)


def test_missing_unexpected_and_misshapen_tensors_are_named(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    tensors = dict(_tensors(path))

    dst = _copy(path, tmp_path / "missing")
    _rewrite(dst, {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoint.load_model(dst)

    dst = _copy(path, tmp_path / "unexpected")
    _rewrite(dst, {**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
        checkpoint.load_model(dst)

    dst = _copy(path, tmp_path / "shape")
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    _rewrite(dst, bad)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(5, 64\)"):
        checkpoint.load_model(dst)


def test_pickle_weights_are_refused(tmp_path, hf_model_dir):
    path, _ = hf_model_dir("llama")
    dst = tmp_path / "pickle"
    dst.mkdir()
    shutil.copy(os.path.join(path, "config.json"), dst / "config.json")
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        checkpoint.load_model(str(dst))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox",
                                                      "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        checkpoint.load_model(str(tmp_path))


def test_orbax_conversion_roundtrip(hf_model_dir, tmp_path):
    convert_checkpoint = load_script("convert_checkpoint")
    from jaxinfer import InferenceSession, SamplingParams
    path, _ = hf_model_dir("gemma")
    out = convert_checkpoint.convert(path, str(tmp_path / "orbax"), "float32")
    assert os.path.isdir(os.path.join(out, checkpoint.ORBAX_DIR))
    _, p_hf, _ = checkpoint.load_model(path)
    _, p_ox, _ = checkpoint.load_model(out)
    jax.tree.map(np.testing.assert_array_equal, p_hf, p_ox)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = InferenceSession.from_pretrained(path).generate([[5, 6, 7]], params)[0].token_ids
    b = InferenceSession.from_pretrained(out).generate([[5, 6, 7]], params)[0].token_ids
    assert a == b


def test_orbax_params_that_do_not_fit_the_config_are_named(hf_model_dir, tmp_path):
    convert_checkpoint = load_script("convert_checkpoint")
    path, _ = hf_model_dir("llama")
    out = convert_checkpoint.convert(path, str(tmp_path / "orbax"), "float32")
    config_file = os.path.join(out, "config.json")
    with open(config_file) as f:
        hf = json.load(f)
    hf["intermediate_size"] += 8
    with open(config_file, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=r"orbax param .*layers_0.*mlp.*down_proj.*kernel.* has shape \(96, 64\)"):
        checkpoint.load_model(out)
