"""Meshes and the logical-axis rules: one device in this process, 8 in a subprocess.

The pytest process has already started jax with one CPU device, so the multi-device
checks live in eight_devices.py, run once by `test_eight_devices` with 8 fake CPU
devices; every check prints a PASS / FAIL line and the test names each one that failed
or did not run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.models.transformer import logical_axes, param_shapes
from jaxinfer.sharding import (DEFAULT_RULES, MESH_AXES, kv_cache_sharding, logical_to_mesh_spec, make_mesh,
                               mesh_size, named_sharding, param_shardings, replicated)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=128)
EIGHT_DEVICE_CHECKS = ["check_meshes", "check_float_leaves", "check_int4_leaves", "check_divisibility_error",
                       "check_float_forward", "check_int4_forward", "check_kv_allocate", "check_paged_forward",
                       "check_per_shard_loading", "check_llama_tensor_parallel",
                       "check_memory_per_device_agrees_with_the_planner", "check_moe_expert_parallel",
                       "check_int4_and_shared_prefix_under_tensor_parallel", "check_sizes_are_refused_before_loading",
                       "check_qwen3_pipeline_parallel", "check_pipeline_sizes_refused", "check_splitwise_disaggregation"]
SLOW_EIGHT_DEVICE_CHECKS = ["check_pallas_attention_per_shard", "check_moe_more_layouts", "check_pipeline_more_layouts",
                            "check_moe_pipeline_parallel"]


def test_one_device_mesh():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 1, "pipeline": 1, "expert": 1, "tensor": 1}
    assert list(mesh.devices.flat) == [jax.devices()[0]]
    if hasattr(jax.sharding, "AxisType"):
        assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 4
    assert mesh_size(mesh, "tensor") == 1 and mesh_size(mesh, "pipeline") == 1
    # Auto axes: with_sharding_constraint works in a jitted function.
    out = jax.jit(lambda x: jax.lax.with_sharding_constraint(x + 1, named_sharding(mesh, ("embed", "mlp"))))(
        jnp.zeros((2, 4)))
    assert np.array_equal(np.asarray(out), np.ones((2, 4)))


@pytest.mark.parametrize("sizes, field", [
    (dict(tensor=0), "tensor"), (dict(data=-1), "data"), (dict(expert=1.5), "expert"), (dict(tensor=True), "tensor"),
    (dict(data=2), "data \\* pipeline \\* expert \\* tensor"), (dict(pipeline=0), "pipeline"),
])
def test_make_mesh_errors(sizes, field):
    with pytest.raises(ValueError, match=field):
        make_mesh(**sizes)


def test_named_sharding_and_rules():
    mesh = make_mesh()
    assert named_sharding(mesh, ("embed", "heads")).spec == P(None, "tensor")
    assert named_sharding(mesh, ("activation_batch", "activation_length", "activation_embed")).spec == \
        P("data", None, None)
    assert named_sharding(mesh, (None, "vocab")).spec == P(None, "tensor")
    # A mesh axis is used by one dim only; an axis the mesh lacks is dropped.
    assert named_sharding(mesh, ("heads", "mlp")).spec == P("tensor", None)
    assert named_sharding(mesh, ("embed",), rules=(("embed", "pipeline"),)).spec == P("pipeline")
    assert named_sharding(mesh, ("embed",), rules=(("embed", "sequence"),)).spec == P(None)
    assert named_sharding(mesh, ("embed",), rules=(("embed", ("data", "tensor")),)).spec == P(("data", "tensor"))
    assert kv_cache_sharding(mesh).spec == P(None, None, "tensor", None)
    assert replicated(mesh).spec == P() and isinstance(replicated(mesh), NamedSharding)
    # The old, mesh-independent helper is unchanged.
    assert logical_to_mesh_spec(("embed", "heads", "unknown")) == P(None, "tensor", None)
    table = dict(DEFAULT_RULES)
    for name in ("vocab", "embed", "heads", "kv_heads", "mlp", "expert", "norm", "activation_batch",
                 "activation_length", "activation_embed", "activation_heads", "activation_kv_heads",
                 "activation_vocab", "activation_mlp", "cache_pages", "cache_page_tokens", "cache_heads",
                 "cache_head_dim"):
        assert name in table, name


def test_unknown_logical_name():
    with pytest.raises(ValueError, match="'sequence'"):
        named_sharding(make_mesh(), ("sequence", "embed"))
    with pytest.raises(ValueError, match="layer/w.*'sequence'"):
        param_shardings(make_mesh(), {"layer": {"w": P("sequence", "embed")}})


def test_param_shardings_one_device():
    mesh = make_mesh()
    axes = logical_axes(CONFIG)
    shardings = param_shardings(mesh, axes, param_shapes(CONFIG))
    flat = jax.tree.leaves(shardings)
    assert len(flat) == len(jax.tree.leaves(param_shapes(CONFIG)))
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in flat)
    assert shardings["layers_1"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "tensor")
    assert shardings["layers_1"]["mlp"]["down_proj"]["kernel"].spec == P("tensor", None)
    assert shardings["embed_tokens"].spec == P("tensor", None)
    # Without shapes too.
    assert param_shardings(mesh, axes)["lm_head"]["kernel"].spec == P(None, "tensor")


def test_unnamed_parameter_is_named_in_the_error():
    tree = {"dense": {"kernel": P("embed", "mlp"), "scale": P()}}
    with pytest.raises(ValueError, match="dense/scale"):
        param_shardings(make_mesh(), tree)
    # An explicit None (replicated dim) is a named choice.
    assert param_shardings(make_mesh(), {"perm": P(None)})["perm"].spec == P(None)


def test_shape_errors_name_the_parameter():
    tree = {"dense": {"kernel": P("embed", "mlp")}}
    with pytest.raises(ValueError, match="dense/kernel is missing"):
        param_shardings(make_mesh(), tree, {"other": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    with pytest.raises(ValueError, match="dense/kernel names 2 axes"):
        param_shardings(make_mesh(), tree, {"dense": {"kernel": jax.ShapeDtypeStruct((4,), jnp.float32)}})
    # Size-1 mesh axes divide everything.
    odd = {"dense": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32)}}
    assert param_shardings(make_mesh(), tree, odd)["dense"]["kernel"].spec == P(None, "tensor")


def _run_eight_devices(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eight_devices.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = {}
    for line in proc.stdout.splitlines():
        if line.startswith(("PASS ", "FAIL ")):
            name = line[5:].split(":", 1)[0]
            lines[name] = line
    return proc, lines


@pytest.mark.slow
def test_more_layouts_on_eight_devices():
    proc, lines = _run_eight_devices("--slow")
    assert sorted(lines) == sorted(SLOW_EIGHT_DEVICE_CHECKS), proc.stdout + proc.stderr[-4000:]
    assert all(line.startswith("PASS") for line in lines.values()), proc.stdout + proc.stderr[-4000:]


def test_eight_devices():
    # One test, one subprocess: a parametrized test over a module fixture would start
    # the subprocess once per pytest-xdist worker (2 minutes of CPU each, cold).
    proc, lines = _run_eight_devices()
    detail = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    missing = sorted(set(EIGHT_DEVICE_CHECKS) - set(lines))
    assert not missing, f"did not run (rc {proc.returncode}): {missing}\n{detail}"
    assert sorted(lines) == sorted(EIGHT_DEVICE_CHECKS), detail  # every check is listed
    failed = [line for line in lines.values() if not line.startswith("PASS")]
    assert not failed, "\n".join(failed) + "\n" + detail
