"""Lazy HF loading and per-shard placement: equal to load_params, remaps, bytes read, errors.

One CPU device here; tests/sharding/placement_checks.py repeats the placement on eight
fake devices (tensor=4, expert=2), where each device reads only its shard.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.models import checkpoint, lazy_checkpoint, quant_format, registry
from jaxinfer.models.layers import Int4Format
from jaxinfer.models.transformer import param_shapes
from jaxinfer.sharding import make_mesh
from jaxinfer.sharding.placement import HostSource, MappedSource, StackedSource, ZeroSource, place, remap


class CountingArray:
    """An array-like that counts the elements every `[...]` returns (what a read touches)."""

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.num_read = 0

    def __getitem__(self, key):
        out = self.array[key]
        self.num_read += out.size
        return out


def _replicated(tree):
    sharding = NamedSharding(make_mesh(), PartitionSpec())
    return jax.tree.map(lambda _: sharding, tree, is_leaf=lambda x: isinstance(x, HostSource))


def _assert_places_like_load_params(path, dtype):
    config = registry.model_config_from_hf(checkpoint.read_hf_config(path))
    lazy = lazy_checkpoint.lazy_hf_params(path, config, dtype)
    shapes = param_shapes(config)
    assert jax.tree.structure(lazy, is_leaf=lambda x: isinstance(x, HostSource)) == jax.tree.structure(shapes)
    placed = place(lazy, _replicated(lazy))
    loaded = checkpoint.load_params(path, config, dtype)
    assert jax.tree.structure(placed) == jax.tree.structure(loaded)
    for (key, a), b in zip(jax.tree_util.tree_flatten_with_path(placed)[0], jax.tree.leaves(loaded)):
        assert isinstance(a, jax.Array) and (a.dtype, a.shape) == (b.dtype, b.shape), key
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


@pytest.fixture(scope="module")
def llama_bf16_dir(hf_model_dir, tmp_path_factory):
    path, _ = hf_model_dir("llama")
    dst = str(tmp_path_factory.mktemp("llama_bf16"))
    shutil.rmtree(dst)
    shutil.copytree(path, dst)
    file = os.path.join(dst, "model.safetensors")
    stored = checkpoint.read_safetensors(file)
    checkpoint.write_safetensors(file, {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in stored.items()})
    return dst


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_places_like_load_params(hf_model_dir, dtype):
    _assert_places_like_load_params(hf_model_dir("llama")[0], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_storage_places_like_load_params(llama_bf16_dir, dtype):
    _assert_places_like_load_params(llama_bf16_dir, dtype)


def test_moe_places_like_load_params(hf_model_dir):
    path, _ = hf_model_dir("qwen3_moe")
    config = registry.model_config_from_hf(checkpoint.read_hf_config(path))
    lazy = lazy_checkpoint.lazy_hf_params(path, config, "float32")
    experts = lazy["layers_0"]["mlp"]["gate_proj"]
    assert isinstance(experts, StackedSource) and experts.shape == (8, 64, 32)  # [E, D, F]
    _assert_places_like_load_params(path, "float32")


def test_sharded_folder_places_like_load_params(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    config, params, hf = checkpoint.load_model(path)
    sharded = str(tmp_path / "sharded")
    checkpoint.save_hf_folder(sharded, params, config, hf, max_shard_bytes=20_000)
    assert lazy_checkpoint.is_lazy_loadable(sharded)
    _assert_places_like_load_params(sharded, "float32")


# ---------------------------------------------------------------------------- remap

_BASE = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)  # e.g. [V, D] embeddings


def _whole(source):
    return source.read((slice(None),) * len(source.shape))


def test_remap_pads_vocab_rows_with_zeros():
    padded = remap(MappedSource(_BASE, np.float32), 0, np.array([0, 1, 2, 3, 4, -1, -1, -1]))  # [V', D]
    assert padded.shape == (8, 6)
    expected = np.concatenate([_BASE, np.zeros((3, 6), np.float32)])
    np.testing.assert_array_equal(_whole(padded), expected)
    np.testing.assert_array_equal(padded.read((slice(4, 6), slice(None))), expected[4:6])
    np.testing.assert_array_equal(padded.read((slice(6, 8), slice(2, 4))), np.zeros((2, 2)))


def test_remap_repeats_head_columns():
    heads = np.array([0, 1, 0, 1, 2, 3, 2, 3])  # 2 heads of 2 columns (+ 2 unused), each repeated twice
    repeated = remap(MappedSource(_BASE, np.float32), 1, heads)
    np.testing.assert_array_equal(_whole(repeated), _BASE[:, heads])
    for start in range(0, 8, 2):  # each tensor=4 shard: one head copy
        np.testing.assert_array_equal(repeated.read((slice(None), slice(start, start + 2))),
                                      _BASE[:, heads[start:start + 2]])


def test_remap_composes():
    first, second = np.array([4, 2, -1, 0]), np.array([3, -1, 1, 0, 0])
    twice = remap(remap(MappedSource(_BASE, np.float32), 0, first), 0, second)
    assert isinstance(twice, MappedSource) and set(twice.index_maps) == {0}
    expected = remap(remap(_BASE, 0, first), 0, second)
    np.testing.assert_array_equal(_whole(twice), expected)
    np.testing.assert_array_equal(expected, _BASE[[0, 0, 2, 4, 4]] * np.array([1, 0, 1, 1, 1])[:, None])
    # Two remapped dims at once are an outer product, not numpy's broadcast of index arrays.
    both = remap(twice, 1, np.array([5, 0, -1]))
    np.testing.assert_array_equal(_whole(both), remap(expected, 1, np.array([5, 0, -1])))


def test_remap_of_a_concrete_array_equals_the_lazy_remap():
    index_map = np.array([1, -1, 3, 3])
    lazy = _whole(remap(MappedSource(_BASE.T, ml_dtypes.bfloat16), 1, index_map))
    concrete = remap(jnp.asarray(_BASE.T, jnp.bfloat16), 1, index_map)
    assert isinstance(concrete, np.ndarray) and concrete.dtype == lazy.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(concrete, lazy)


def test_remap_of_stacked_experts():
    members = [MappedSource(_BASE * (e + 1), np.float32) for e in range(3)]
    stacked = StackedSource(members)  # [E, 5, 6]
    columns = remap(stacked, 2, np.array([5, -1]))
    np.testing.assert_array_equal(_whole(columns), np.stack([(_BASE * (e + 1))[:, [5, 5]] * [1, 0]
                                                             for e in range(3)]))
    experts = remap(stacked, 0, np.array([2, -1]))
    assert isinstance(experts.members[1], ZeroSource)
    np.testing.assert_array_equal(_whole(experts), np.stack([_BASE * 3, np.zeros_like(_BASE)]))


def test_remap_rejects_out_of_range_maps():
    with pytest.raises(ValueError, match=r"dim 0: indices must be in \[-1, 5\)"):
        remap(MappedSource(_BASE, np.float32), 0, np.array([0, 5]))
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        remap(_BASE, 2, np.array([0]))


# ---------------------------------------------------------------------------- bytes read

def test_reads_touch_only_the_requested_shard():
    base = CountingArray(np.arange(8 * 12, dtype=np.float32).reshape(8, 12))
    source = MappedSource(base, ml_dtypes.bfloat16)
    for start in range(0, 12, 3):  # the 4 column shards of a tensor=4 split
        before = base.num_read
        shard = source.read((slice(None), slice(start, start + 3)))
        assert shard.flags.c_contiguous and shard.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(shard, base.array[:, start:start + 3].astype(ml_dtypes.bfloat16))
        assert base.num_read - before == 8 * 3
    # A repeated-head map reads each distinct source column once; padding reads nothing.
    before = base.num_read
    repeated = remap(source, 1, np.array([4, 5, 4, 5, -1, -1]))
    np.testing.assert_array_equal(_whole(repeated).astype(np.float32),
                                  np.concatenate([base.array[:, [4, 5, 4, 5]], np.zeros((8, 2))], 1))
    assert base.num_read - before == 8 * 2
    before = base.num_read
    repeated.read((slice(2, 4), slice(4, 6)))
    assert base.num_read == before


def test_stacked_reads_only_the_experts_of_the_shard():
    bases = [CountingArray(np.full((4, 6), e, np.float32)) for e in range(4)]
    stacked = StackedSource([MappedSource(b, np.float32) for b in bases])
    np.testing.assert_array_equal(stacked.read((slice(2, 4), slice(None), slice(0, 3))),
                                  np.stack([np.full((4, 3), 2), np.full((4, 3), 3)]))
    assert [b.num_read for b in bases] == [0, 0, 12, 12]


def test_place_reads_each_source_with_the_shard_index():
    calls = []

    class Spy(MappedSource):
        def read(self, index):
            calls.append(tuple(index))
            return super().read(index)

    source = Spy(_BASE, np.float32)
    placed = place({"w": source}, {"w": NamedSharding(make_mesh(), PartitionSpec(None, "tensor"))})
    np.testing.assert_array_equal(np.asarray(placed["w"]), _BASE)
    assert len(calls) == 1 and [s.indices(n)[:2] for s, n in zip(calls[0], _BASE.shape)] == [(0, 5), (0, 6)]


# ---------------------------------------------------------------------------- errors

def _copy_with(src, dst, tensors):
    shutil.copytree(src, dst)
    checkpoint.write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return str(dst)


def test_missing_and_misshapen_tensors_are_named(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    config = registry.model_config_from_hf(checkpoint.read_hf_config(path))
    tensors = dict(checkpoint.read_safetensors(os.path.join(path, "model.safetensors")))
    missing = _copy_with(path, tmp_path / "missing",
                         {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        lazy_checkpoint.lazy_hf_params(missing, config, "float32")
    bad = _copy_with(path, tmp_path / "shape", {**tensors, "model.layers.0.self_attn.k_proj.weight":
                                                np.zeros((5, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(5, 64\).*"
                                         r"model\.safetensors"):
        lazy_checkpoint.lazy_hf_params(bad, config, "float32")


def test_int4_and_orbax_folders_are_refused(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("llama")
    config = registry.model_config_from_hf(checkpoint.read_hf_config(path))
    assert lazy_checkpoint.is_lazy_loadable(path)
    int4 = tmp_path / "int4"
    shutil.copytree(path, int4)
    hf = checkpoint.read_hf_config(str(int4))
    hf["quantization_config"] = quant_format.quantization_config(Int4Format(group_size=32))
    (int4 / "config.json").write_text(json.dumps(hf))
    assert not lazy_checkpoint.is_lazy_loadable(str(int4))
    with pytest.raises(ValueError, match=r"int4 folder.*quantization_config.*checkpoint\.load_params"):
        lazy_checkpoint.lazy_hf_params(str(int4), config, "float32")
    orbax = tmp_path / "orbax"
    (orbax / checkpoint.ORBAX_DIR).mkdir(parents=True)
    shutil.copy(os.path.join(path, "config.json"), orbax / "config.json")
    assert not lazy_checkpoint.is_lazy_loadable(str(orbax))
    with pytest.raises(ValueError, match=r"orbax folder.*checkpoint\.load_params"):
        lazy_checkpoint.lazy_hf_params(str(orbax), config, "float32")
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(os.path.join(path, "config.json"), pickle / "config.json")
    (pickle / "pytorch_model.bin").write_bytes(b"not loaded")
    assert not lazy_checkpoint.is_lazy_loadable(str(pickle))
    with pytest.raises(ValueError, match="pickle"):
        lazy_checkpoint.lazy_hf_params(str(pickle), config, "float32")
