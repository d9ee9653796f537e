"""Per-shard loading on 8 fake CPU devices: lazy_hf_params -> place over tensor=4, expert=2.

Imported by eight_devices.py (which runs with
XLA_FLAGS=--xla_force_host_platform_device_count=8); plain asserts, no pytest. The
checkpoint is written without transformers or torch: random `init_params` saved with
`checkpoint.save_hf_folder` under a minimal Qwen3-MoE config.json (layer 0 MoE with 4
experts, layer 1 dense), so attention, dense MLP, stacked experts, router, norms,
embeddings and the LM head are all placed.
"""
from __future__ import annotations

import math
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.models import checkpoint, lazy_checkpoint, registry
from jaxinfer.models.transformer import init_params, logical_axes, param_shapes
from jaxinfer.sharding import make_mesh, param_shardings
from jaxinfer.sharding.placement import HostSource, MappedSource, StackedSource, place, remap

HF_CONFIG = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "mlp_only_layers": [1], "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


class _CountingArray:
    """Wraps a source's base array: records the element count of every `[...]` read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list = []

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(out.size)
        return out


def _bases(source: HostSource) -> list:
    """The MappedSources under a leaf (one, or one per expert)."""
    return list(source.members) if isinstance(source, StackedSource) else [source]


def check_per_shard_loading():
    assert len(jax.devices()) == 8, jax.devices()
    config = registry.model_config_from_hf(HF_CONFIG)
    params = init_params(config, jax.random.key(0), init_std=0.5)
    with tempfile.TemporaryDirectory() as path:
        checkpoint.save_hf_folder(path, params, config, HF_CONFIG)
        assert lazy_checkpoint.is_lazy_loadable(path)
        lazy = lazy_checkpoint.lazy_hf_params(path, config, "bfloat16")  # stored f32: each read casts
        counters = {}
        for key, leaf in jax.tree_util.tree_flatten_with_path(lazy, is_leaf=lambda x: isinstance(x, HostSource))[0]:
            for member in _bases(leaf):
                assert isinstance(member, MappedSource), (key, member)
                member.base = _CountingArray(member.base)
                counters.setdefault(jax.tree_util.keystr(key), []).append(member.base)
        shardings = param_shardings(make_mesh(tensor=4, expert=2), logical_axes(config), param_shapes(config))
        placed = place(lazy, shardings)
        whole = checkpoint.load_params(path, config, "bfloat16")
    num_split = 0
    for (key, array), expected in zip(jax.tree_util.tree_flatten_with_path(placed)[0], jax.tree.leaves(whole)):
        name = jax.tree_util.keystr(key)
        assert array.dtype == expected.dtype and array.shape == expected.shape, name
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected), err_msg=name)
        shard_shape = array.sharding.shard_shape(array.shape)
        assert len(array.addressable_shards) == 8, name
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape, (name, shard.data.shape, shard_shape)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(expected)[shard.index], err_msg=name)
        reads = [n for counter in counters[name] for n in counter.reads]
        size, shard_size = math.prod(array.shape), math.prod(shard_shape)
        if array.sharding.is_fully_replicated:
            assert sum(reads) == size, (name, reads)  # jax reads a fully replicated array once
            continue
        num_split += 1
        # Every device reads its own shard (a replicated one once per device), never more:
        # a stacked expert leaf reads each of its E / 2 experts' slices separately.
        per_read = shard_size // (shard_shape[0] if len(counters[name]) > 1 else 1)
        assert sum(reads) == 8 * shard_size and max(reads) <= per_read, (name, reads, shard_shape)
    assert num_split >= 8, num_split  # q/k/v/o, dense MLP, experts, embeddings, LM head
    experts = placed["layers_0"]["mlp"]["gate_proj"]
    assert experts.sharding.shard_shape(experts.shape) == (2, 64, 8), experts.sharding  # [E / 2, D, F / 4]
    _check_remapped_vocab_shards()


def _check_remapped_vocab_shards():
    """A padded vocab ([250, D] -> [256, D] over tensor=4): the padding shard reads less."""
    table = np.arange(250 * 8, dtype=np.float32).reshape(250, 8)
    counter = _CountingArray(table)
    padded = remap(MappedSource(counter, np.float32), 0, np.concatenate([np.arange(250), np.full(6, -1)]))
    sharding = NamedSharding(make_mesh(tensor=4, expert=2), PartitionSpec("tensor", None))
    array = place({"embed": padded}, {"embed": sharding})["embed"]
    expected = np.concatenate([table, np.zeros((6, 8), np.float32)])
    np.testing.assert_array_equal(np.asarray(array), expected)
    # 8 devices, 64 rows each; the last tensor shard holds 58 real rows and 6 zero rows.
    assert sorted(counter.reads) == sorted([64 * 8] * 6 + [58 * 8] * 2), counter.reads
