"""scripts/convert_recursive.py and scripts/recursive_lib.py on a tiny random Llama (4 layers, B = 2).

The conversion (Bae et al. 2024, arXiv 2410.20672) is checked against jaxinfer's own
Transformer: at full LoRA rank the relaxed recursive model must give the original logits.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.checkpoint import save_hf_folder
from jaxinfer.models.registry import model_config_from_hf
from jaxinfer.models.safetensors_reader import read_safetensors
from jaxinfer.models.transformer import AttentionMetadata, Transformer, init_params
from script_loader import load_script

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 61, "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": True, "hidden_act": "silu"}
FULL = 48  # >= min(out, in) of every projection: full rank
TOKENS = np.random.RandomState(0).randint(0, 61, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def mod():
    return load_script("convert_recursive")


@pytest.fixture(scope="module")
def lib(mod):
    return mod.recursive_lib


def _model(tied=True):
    config = model_config_from_hf(dict(HF_CONFIG, tie_word_embeddings=tied))
    params = init_params(config, jax.random.key(1 if tied else 2), init_std=0.3)
    # Random norm weights, so that sharing or not sharing them shows in the logits.
    for i in range(config.num_layers):
        for k, norm in enumerate(("input_layernorm", "post_attention_layernorm")):
            key = jax.random.fold_in(jax.random.key(7), 2 * i + k)
            params[f"layers_{i}"][norm]["scale"] = 1 + 0.3 * jax.random.normal(key, (config.hidden_size,))
    return config, params


def _original_logits(config, params, num_layers=None):
    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    batch, length = TOKENS.shape
    logits, _ = Transformer(config).apply({"params": params}, jnp.asarray(TOKENS.reshape(-1)),
                                          jnp.tile(jnp.arange(length, dtype=jnp.int32), batch), None,
                                          AttentionMetadata.dense(batch, length))
    return np.asarray(logits)


@pytest.mark.parametrize("tied", [True, False])
def test_full_rank_reproduces_the_original_at_every_exit(lib, tied):
    config, params = _model(tied)
    want = _original_logits(config, params)
    # Early exit after one loop = the original's first two layers, then its final norm and head.
    want_exit1 = _original_logits(config, params, num_layers=2)
    assert np.abs(want).max() > 1
    forward = None
    for init in lib.INITS:
        spec = lib.RecursiveSpec(4, 2, init, FULL)
        rp = lib.convert(config, params, spec)
        forward = forward or lib.make_forward(config, spec)  # one compilation: the init only changes values
        out = forward(rp, jnp.asarray(TOKENS))
        assert sorted(out) == [1, 2]
        np.testing.assert_allclose(np.asarray(out[2]), want, atol=1e-4, rtol=0, err_msg=init)
        np.testing.assert_allclose(np.asarray(out[1]), want_exit1, atol=1e-4, rtol=0, err_msg=init)
        assert lib.reconstruction_error(config, params, spec, rp)["max"] < 1e-5


def test_low_rank_and_rank_zero_differ_from_the_original(lib):
    config, params = _model()
    want = _original_logits(config, params)
    errors, relative = [], []
    for rank in (0, 8, FULL):
        spec = lib.RecursiveSpec(4, 2, "average", rank, "per_loop")
        rp = lib.convert(config, params, spec)
        errors.append(float(np.abs(np.asarray(lib.make_forward(config, spec, (2,))(rp, jnp.asarray(TOKENS))[2])
                                   - want).max()))
        relative.append(lib.reconstruction_error(config, params, spec, rp)["mean"])
    assert min(errors[:2]) > 1e-2 and errors[2] < 1e-4
    assert relative[0] > relative[1] > 0.1 > 1e-5 > relative[2]


def test_init_rules_pick_or_average_the_right_layers(lib):
    config, params = _model()
    q = [np.asarray(params[f"layers_{i}"]["self_attn"]["q_proj"]["kernel"]) for i in range(4)]
    norm = [np.asarray(params[f"layers_{i}"]["input_layernorm"]["scale"]) for i in range(4)]
    expected = {"lower": [q[0], q[1]], "stepwise": [q[0], q[2]], "stepwise_ends": [q[0], q[3]],
                "average": [(q[0] + q[2]) / 2, (q[1] + q[3]) / 2]}
    for init, kernels in expected.items():
        rp = lib.convert(config, params, lib.RecursiveSpec(4, 2, init, 0))
        for j in range(2):
            np.testing.assert_allclose(rp["block"][j]["self_attn.q_proj.kernel"], kernels[j], atol=1e-6)
    # rank 0 shares the norms too (auto -> shared), averaged like the kernels.
    rp = lib.convert(config, params, lib.RecursiveSpec(4, 2, "average", 0))
    np.testing.assert_allclose(rp["block"][1]["input_layernorm.scale"], (norm[1] + norm[3]) / 2, atol=1e-6)
    assert rp["per_loop"] == [[{}, {}], [{}, {}]]
    # with LoRA the norms stay per loop: loop 1, position 0 is original layer 2.
    rp = lib.convert(config, params, lib.RecursiveSpec(4, 2, "average", 2))
    assert "input_layernorm.scale" not in rp["block"][0]
    np.testing.assert_array_equal(rp["per_loop"][1][0]["input_layernorm.scale"], norm[2])
    # Larger models: L = 6, B = 3 (2 loops) and B = 2 (3 loops).
    assert lib.RecursiveSpec(6, 3, "stepwise", 0).source_layers() == [[0], [2], [4]]
    assert lib.RecursiveSpec(6, 2, "stepwise", 0).source_layers() == [[0], [3]]
    assert lib.RecursiveSpec(6, 3, "stepwise_ends", 0).source_layers() == [[0], [3], [5]]
    assert lib.RecursiveSpec(6, 3, "average", 0).source_layers() == [[0, 3], [1, 4], [2, 5]]
    assert lib.RecursiveSpec(6, 3, "lower", 0).source_layers() == [[0], [1], [2]]


def test_lora_is_the_truncated_svd_of_the_residual(lib):
    config, params = _model()
    rp = lib.convert(config, params, lib.RecursiveSpec(4, 2, "lower", 3))
    ab = rp["lora"][1][1]["mlp.down_proj"]  # loop 1, position 1: original layer 3 vs shared (layer 1)
    residual = (np.asarray(params["layers_3"]["mlp"]["down_proj"]["kernel"])
                - np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"])).T  # [out, in]
    u, s, vt = np.linalg.svd(residual.astype(np.float64))
    np.testing.assert_allclose(ab["B"] @ ab["A"], (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
    assert ab["A"].shape == (3, 48) and ab["B"].shape == (32, 3)
    # lower init: loop 0 is the shared block itself, its LoRA is zero.
    assert np.abs(rp["lora"][0][0]["self_attn.q_proj"]["B"]).max() < 1e-6


def test_parameter_counts_add_up(lib):
    config, params = _model()
    original = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    d, f, q, kv, v = 32, 48, 32, 16, 61
    pairs = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # (in, out) of the 7 targets
    for rank, norms in ((0, "auto"), (4, "auto"), (4, "shared"), (FULL, "per_loop")):
        spec = lib.RecursiveSpec(4, 2, "average", rank, norms)
        counts = lib.parameter_counts(config, spec, lib.convert(config, params, spec))
        vectors = 2 * d
        assert counts["original"] == original
        assert counts["embedding_and_head"] == v * d + d
        shared_vectors = 2 * vectors if spec.norms == "shared" else 0
        assert counts["shared_block"] == 2 * sum(i * o for i, o in pairs) + shared_vectors
        assert counts["per_loop_vectors"] == (4 * vectors if spec.norms == "per_loop" else 0)
        assert counts["lora"] == 4 * sum(min(rank, i, o) * (i + o) for i, o in pairs)
        assert counts["total"] == sum(counts[k] for k in ("embedding_and_head", "shared_block", "per_loop_vectors",
                                                          "lora"))
    # B = L, rank 0: nothing is shared, the "recursive" model is the original.
    spec = lib.RecursiveSpec(4, 4, "lower", 0)
    assert lib.parameter_counts(config, spec, lib.convert(config, params, spec))["total"] == original


def test_bad_flags_raise_value_errors_naming_the_flag(lib, tmp_path):
    with pytest.raises(ValueError, match="num_blocks: 3 does not divide the model's 4 layers"):
        lib.RecursiveSpec(4, 3, "average", 0)
    with pytest.raises(ValueError, match="num_blocks: must be a positive int"):
        lib.RecursiveSpec(4, 0, "average", 0)
    with pytest.raises(ValueError, match="init: 'middle' is not one of"):
        lib.RecursiveSpec(4, 2, "middle", 0)
    with pytest.raises(ValueError, match="lora_rank: must be an int >= 0"):
        lib.RecursiveSpec(4, 2, "lower", -1)
    with pytest.raises(ValueError, match="norms: 'both' is not one of"):
        lib.RecursiveSpec(4, 2, "lower", 0, "both")
    with pytest.raises(ValueError, match="exit_after_loops"):
        lib.RecursiveSpec(4, 2, "lower", 0, "auto", (3,))


def _folder(tmp_path, tied=True):
    config, params = _model(tied)
    path = str(tmp_path / "src")
    save_hf_folder(path, params, config, dict(HF_CONFIG, tie_word_embeddings=tied))
    return path, config, params


@pytest.mark.parametrize("rank,tied", [(5, True), (0, False)])
def test_folder_round_trips(lib, tmp_path, rank, tied):
    path, config, params = _folder(tmp_path, tied)
    spec = lib.RecursiveSpec(4, 2, "stepwise", rank, exit_after_loops=(2,))
    rp = lib.convert(config, params, spec)
    out = str(tmp_path / "out")
    names = lib.save_recursive(out, dict(HF_CONFIG, tie_word_embeddings=tied), config, spec, rp, source_dir=path)
    config2, hf, spec2, rp2 = lib.load_recursive(out)
    assert config2 == config and spec2 == spec
    assert hf["recursive"] == {"num_blocks": 2, "num_loops": 2, "init": "stepwise", "lora_rank": rank,
                               "lora_targets": list(lib.LORA_TARGETS) if rank else [], "exit_after_loops": [2],
                               "norms": "per_loop" if rank else "shared", "source_layers": [[0], [2]]}
    assert jax.tree.structure(rp2) == jax.tree.structure(rp)
    for a, b in zip(jax.tree.leaves(rp), jax.tree.leaves(rp2)):
        np.testing.assert_array_equal(np.asarray(a), b)
    tensors = read_safetensors(os.path.join(out, lib.WEIGHTS_FILE))
    assert sorted(tensors) == names
    assert ("lm_head.weight" in tensors) == (not tied)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (16, 32)  # HF [out, in]
    lora = [n for n in names if ".lora." in n]
    if rank:
        assert len(lora) == 2 * 2 * 7 * 2  # loops x positions x targets x {A, B}
        assert tensors["model.layers.1.mlp.down_proj.lora.1.A"].shape == (5, 48)
        assert tensors["model.layers.1.mlp.down_proj.lora.1.B"].shape == (32, 5)
        assert "model.layers.0.input_layernorm.loop.1.weight" in tensors
        assert "model.layers.0.input_layernorm.weight" not in tensors
    else:
        assert lora == [] and not any(".loop." in n for n in names)
        assert "model.layers.0.input_layernorm.weight" in tensors
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names)


def test_load_refuses_a_tampered_folder(lib, tmp_path):
    path, config, params = _folder(tmp_path)
    spec = lib.RecursiveSpec(4, 2, "lower", 2)
    out = str(tmp_path / "out")
    lib.save_recursive(out, HF_CONFIG, config, spec, lib.convert(config, params, spec))
    with open(os.path.join(out, "config.json")) as f:
        record = json.load(f)
    record["recursive"]["lora_rank"] = 0
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match="unexpected"):
        lib.load_recursive(out)
    with pytest.raises(ValueError, match="no \"recursive\" section"):
        lib.load_recursive(path)


def test_cli_converts_a_folder_and_writes_the_summary(mod, tmp_path, capsys):
    path, config, params = _folder(tmp_path)
    out = tmp_path / "cli"
    flag_values = mod.test_flag_values
    flag_values(["convert_recursive", f"--model={path}", "--num_blocks=2", "--init=average", "--lora_rank=4",
                 f"--output_dir={out}"])
    try:
        mod.main(["convert_recursive"])
    finally:
        flag_values.unparse_flags()
    printed = capsys.readouterr().out
    summary = json.loads((out / "conversion_summary.json").read_text())
    counts = summary["parameters"]
    assert counts["original"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert f"{counts['total']:,}" in printed and "2 x 2" in printed
    assert summary["num_lora_tensors"] == 2 * 2 * 7 * 2 and 0 < summary["merged_weight_error"]["mean"] < 1
    flag_values(["convert_recursive", f"--model={path}", "--num_blocks=3", f"--output_dir={out}"])
    try:
        with pytest.raises(ValueError, match="num_blocks: 3 does not divide"):
            mod.main(["convert_recursive"])
    finally:
        flag_values.unparse_flags()
