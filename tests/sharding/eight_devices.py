"""Mesh checks on 8 fake CPU devices, run by test_mesh.py in a fresh process.

jax fixes its device count when the backend starts, and the pytest process already has
one CPU device, so test_mesh.py runs this file with
XLA_FLAGS=--xla_force_host_platform_device_count=8. Each check prints one line,
"PASS <name>" or "FAIL <name>: <traceback>", and the test reads its own line. The
engine-level checks (tensor / expert parallel sessions against HF) are in
engine_checks.py, pipeline-parallel sessions in pipeline_checks.py, per-shard
checkpoint loading in placement_checks.py.

Model: a tiny Llama (vocab 256, hidden 64, ffn 128, 2 layers, 4 heads, 4 kv heads,
head dim 16), float and int4 (group size 32).
"""
from __future__ import annotations

import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models.layers import Int4Format
from jaxinfer.models.transformer import AttentionMetadata, Transformer, init_params, logical_axes, param_shapes
from jaxinfer.quant import QuantConfig, quantize
from jaxinfer.runtime import kv_cache
from jaxinfer.sharding import kv_cache_sharding, make_mesh, param_shardings, replicated

import engine_checks  # noqa: E402 - this folder is on sys.path when run as a script
import pipeline_checks  # noqa: E402
import placement_checks  # noqa: E402

CONFIG = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=128)
INT4 = Int4Format(group_size=32)
BATCH, LENGTH = 2, 8
MESHES = {"data2_tensor4": dict(data=2, tensor=4), "tensor2_expert4": dict(tensor=2, expert=4),
          "tensor8": dict(tensor=8)}
# NOTE: int4 scales are split along the input rows like the packed codes, in whole groups:
# o_proj's 64 inputs are 2 groups of 32, so int4 runs on tensor axes of 1 or 2 only
# (check_divisibility_error shows the error a tensor axis of 4 gives).
INT4_MESHES = {"data4_tensor2": dict(data=4, tensor=2), "tensor2_expert4": dict(tensor=2, expert=4)}


def _float_params():
    return init_params(CONFIG, jax.random.key(0))


def _int4_params():
    return quantize(CONFIG, _float_params(), "int4", QuantConfig(group_size=32))


def _tokens():
    tokens = jax.random.randint(jax.random.key(1), (BATCH * LENGTH,), 0, CONFIG.vocab_size, jnp.int32)
    positions = jnp.tile(jnp.arange(LENGTH, dtype=jnp.int32), BATCH)
    return tokens, positions


def _dense_forward(params, tokens, positions):
    metadata = AttentionMetadata.dense(BATCH, LENGTH)
    return Transformer(CONFIG).apply({"params": params}, tokens, positions, None, metadata)[0]


def check_meshes():
    mesh = make_mesh(data=2, tensor=4)
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "expert": 1, "tensor": 4}, mesh.shape
    assert [d.id for d in mesh.devices.flat] == list(range(8))
    mesh = make_mesh(tensor=2, expert=4)
    assert dict(mesh.shape) == {"data": 1, "pipeline": 1, "expert": 4, "tensor": 2}, mesh.shape
    # Two meshes over disjoint devices (prefill / decode).
    decode = make_mesh(tensor=4, devices=jax.devices()[4:])
    assert sorted(d.id for d in decode.devices.flat) == [4, 5, 6, 7]
    try:
        make_mesh(data=4, tensor=4)
    except ValueError as err:
        assert "16" in str(err) and "8" in str(err), err
    else:
        raise AssertionError("a 16-device mesh on 8 devices must raise")
    # Auto axes: with_sharding_constraint works inside jit.
    x = jnp.arange(64.0).reshape(8, 8)
    y = jax.jit(lambda a: jax.lax.with_sharding_constraint(a * 2, NamedSharding(mesh, P(None, "expert"))))(x)
    assert y.sharding.spec == P(None, "expert") and np.array_equal(np.asarray(y), np.asarray(x) * 2)


def _check_every_leaf(quant):
    axes, shapes = logical_axes(CONFIG, quant=quant), param_shapes(CONFIG, quant=quant)
    for name, sizes in (MESHES if quant is None else INT4_MESHES).items():
        mesh = make_mesh(**sizes)
        shardings = param_shardings(mesh, axes, shapes)
        flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
        flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
        assert [p for p, _ in flat] == [p for p, _ in flat_shapes], name
        for path, sharding in flat:
            assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh, (name, path)
            assert len(sharding.spec) == len(dict(flat_shapes)[path].shape), (name, path, sharding.spec)
    return param_shardings(make_mesh(**(MESHES if quant is None else INT4_MESHES)["tensor2_expert4"]), axes, shapes)


def check_float_leaves():
    s = _check_every_leaf(None)
    attn, mlp = s["layers_0"]["self_attn"], s["layers_1"]["mlp"]
    assert attn["q_proj"]["kernel"].spec == P(None, "tensor")
    assert attn["k_proj"]["kernel"].spec == P(None, "tensor")
    assert attn["o_proj"]["kernel"].spec == P("tensor", None)
    assert mlp["gate_proj"]["kernel"].spec == P(None, "tensor")
    assert mlp["down_proj"]["kernel"].spec == P("tensor", None)
    assert s["embed_tokens"].spec == P("tensor", None)
    assert s["lm_head"]["kernel"].spec == P(None, "tensor")
    assert s["norm"]["scale"].spec == P(None)
    assert s["layers_0"]["input_layernorm"]["scale"].spec == P(None)


def check_int4_leaves():
    s = _check_every_leaf(INT4)
    q, down = s["layers_0"]["self_attn"]["q_proj"], s["layers_0"]["mlp"]["down_proj"]
    assert set(q) == {"packed", "scales"}, set(q)
    assert q["packed"].spec == P(None, "tensor") and q["scales"].spec == P(None, "tensor")
    assert down["packed"].spec == P("tensor", None) and down["scales"].spec == P("tensor", None)
    # Asymmetric with act order: zeros split like scales, perm replicated.
    fmt = Int4Format(group_size=32, symmetric=False, act_order=True)
    s = param_shardings(make_mesh(tensor=2), logical_axes(CONFIG, quant=fmt), param_shapes(CONFIG, quant=fmt))
    down = s["layers_0"]["mlp"]["down_proj"]
    assert down["zeros"].spec == P("tensor", None) and down["perm"].spec == P(None)


def check_divisibility_error():
    # tensor=4: o_proj's int4 scales have 64 / 32 = 2 group rows, which 4 does not split.
    axes, shapes = logical_axes(CONFIG, quant=INT4), param_shapes(CONFIG, quant=INT4)
    try:
        param_shardings(make_mesh(data=2, tensor=4), axes, shapes)
    except ValueError as err:
        msg = str(err)
        assert "layers_0/self_attn/o_proj/scales" in msg and "dim 0" in msg and "size 2" in msg, msg
        assert "'tensor' (4)" in msg, msg
    else:
        raise AssertionError("2 group rows on a tensor axis of 4 must raise")
    # The float tree divides on every mesh of the checks.
    for sizes in MESHES.values():
        param_shardings(make_mesh(**sizes), logical_axes(CONFIG), param_shapes(CONFIG))


def _check_forward(params, quant):
    tokens, positions = _tokens()
    forward = jax.jit(_dense_forward)
    expected = np.asarray(forward(params, tokens, positions))
    axes = logical_axes(CONFIG, quant=quant)
    for name, sizes in (MESHES if quant is None else INT4_MESHES).items():
        mesh = make_mesh(**sizes)
        shardings = param_shardings(mesh, axes, params)
        sharded = jax.device_put(params, shardings)
        q = sharded["layers_0"]["self_attn"]["q_proj"]
        leaf = q["kernel"] if quant is None else q["packed"]
        assert leaf.sharding.spec == P(None, "tensor"), leaf.sharding
        assert leaf.addressable_shards[0].data.shape[1] == leaf.shape[1] // sizes["tensor"]
        inputs = jax.device_put((tokens, positions), replicated(mesh))
        logits = forward(sharded, *inputs)
        assert len(logits.sharding.device_set) == 8, name
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0, err_msg=name)
    return expected


def check_float_forward():
    expected = _check_forward(_float_params(), None)
    assert np.abs(expected).max() > 0.05  # not a trivially small output


def check_int4_forward():
    params = _int4_params()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert [p for p, _ in flat] == [p for p, _ in jax.tree_util.tree_flatten_with_path(
        param_shapes(CONFIG, quant=INT4))[0]]
    _check_forward(params, INT4)


def check_kv_allocate():
    mesh = make_mesh(data=2, tensor=4)
    spec = kv_cache.KVCacheSpec.for_model(CONFIG, num_pages=6, page_size=8, dtype="float32")
    caches = kv_cache.allocate(spec, mesh)
    assert len(caches) == CONFIG.num_layers
    per_device = 0
    for k, v in caches:
        for x in (k, v):
            assert x.shape == spec.page_shape and x.dtype == jnp.float32
            assert x.sharding.spec == P(None, None, "tensor", None), x.sharding
            assert len(x.sharding.device_set) == 8
            assert x.addressable_shards[0].data.shape == (6, 8, 1, 16)
            per_device += x.addressable_shards[0].data.nbytes
            assert not np.asarray(x).any()
    assert per_device == kv_cache.bytes_per_page(CONFIG, 8, "float32", mesh) * spec.num_pages
    assert kv_cache.cache_bytes(caches) == 4 * per_device
    # Per-device budget: tensor=4 fits 4x the pages of one device in the same bytes.
    engine = EngineConfig(page_size=8, max_kv_cache_bytes=1 << 20, max_num_seqs=10_000)
    one = kv_cache.num_pages_for(CONFIG, engine, dtype="float32", max_model_len=128)
    assert kv_cache.num_pages_for(CONFIG, engine, dtype="float32", max_model_len=128, mesh=mesh) == 4 * one
    # Two KV heads on a tensor axis of 4: replicated, and sized as such.
    two_heads = kv_cache.KVCacheSpec(num_layers=1, num_pages=3, page_size=8, num_kv_heads=2, head_dim=16)
    (k, _), = kv_cache.allocate(two_heads, mesh)
    assert k.sharding.spec == P(None, None, None, None), k.sharding
    gqa = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    assert kv_cache.bytes_per_page(gqa, 8, "float32", mesh) == kv_cache.bytes_per_page(gqa, 8, "float32")
    # Moving a pool to another mesh (prefill devices 0-3 -> decode devices 4-7) is exact.
    prefill, decode = make_mesh(tensor=4, devices=jax.devices()[:4]), make_mesh(tensor=4, devices=jax.devices()[4:])
    caches = kv_cache.allocate(spec, prefill)
    filled = jax.device_put(jnp.arange(np.prod(spec.page_shape), dtype=jnp.float32).reshape(spec.page_shape),
                            kv_cache_sharding(prefill))
    moved = jax.device_put(filled, kv_cache_sharding(decode))
    assert {d.id for d in moved.sharding.device_set} == {4, 5, 6, 7}
    assert np.array_equal(np.asarray(moved), np.asarray(filled))
    assert {d.id for d in caches[0][0].sharding.device_set} == {0, 1, 2, 3}


def check_paged_forward():
    # One sequence of LENGTH tokens written into sharded pages (page ids 3, 1) must give
    # the dense forward's logits, and the updated pages must keep their sharding.
    mesh = make_mesh(data=2, tensor=4)
    params = _float_params()
    tokens, positions = _tokens()
    tokens, positions = tokens[:LENGTH], positions[:LENGTH]
    metadata = AttentionMetadata.dense(1, LENGTH)
    dense = Transformer(CONFIG).apply({"params": params}, tokens, positions, None, metadata)[0]
    page_size = 4
    spec = kv_cache.KVCacheSpec.for_model(CONFIG, num_pages=5, page_size=page_size, dtype="float32")
    caches = kv_cache.allocate(spec, mesh)
    table = np.array([3, 1], np.int32)
    slots = table[np.arange(LENGTH) // page_size] * page_size + np.arange(LENGTH) % page_size
    rep = replicated(mesh)
    inputs = jax.device_put((tokens, positions, jnp.asarray(slots, jnp.int32), jnp.array([0, LENGTH], jnp.int32),
                             jnp.array([LENGTH], jnp.int32), jnp.asarray(table[None])), rep)

    def step(params, caches, tokens, positions, slots, cu, lens, tables):
        meta = AttentionMetadata(slot_mapping=slots, cu_q_lens=cu, kv_lens=lens, page_tables=tables,
                                 max_q_len=LENGTH)
        return Transformer(CONFIG).apply({"params": params}, tokens, positions, caches, meta)

    sharded = jax.device_put(params, param_shardings(mesh, logical_axes(CONFIG), params))
    logits, new_caches = jax.jit(step, donate_argnums=1)(sharded, caches, *inputs)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), atol=1e-5, rtol=0)
    for k, v in new_caches:
        for x in (k, v):  # NOTE: jit drops trailing Nones: P(None, None, "tensor") is the same sharding
            assert x.sharding.is_equivalent_to(kv_cache_sharding(mesh), x.ndim), x.sharding
    assert np.asarray(new_caches[0][0])[[1, 3]].any() and not np.asarray(new_caches[0][0])[[0, 2, 4]].any()


CHECKS = [check_meshes, check_float_leaves, check_int4_leaves, check_divisibility_error, check_float_forward,
          check_int4_forward, check_kv_allocate, check_paged_forward, placement_checks.check_per_shard_loading,
          *engine_checks.CHECKS, *pipeline_checks.CHECKS]
SLOW_CHECKS = [*engine_checks.SLOW_CHECKS, *pipeline_checks.SLOW_CHECKS]


def main() -> int:
    if len(jax.devices()) != 8:
        print(f"FAIL setup: expected 8 devices, got {jax.devices()}")
        return 1
    failed = 0
    # `--slow`: only the layouts kept for `-m slow` runs.
    for check in SLOW_CHECKS if "--slow" in sys.argv else CHECKS:
        start = time.perf_counter()
        try:
            check()
        except Exception:  # noqa: BLE001 - every failure is reported with its traceback
            failed += 1
            print(f"FAIL {check.__name__}: " + traceback.format_exc().replace("\n", "\n    "), flush=True)
        else:  # the time keeps the suite's budget visible (the test prints stdout on failure)
            print(f"PASS {check.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
