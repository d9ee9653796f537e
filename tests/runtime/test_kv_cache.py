"""KV cache sizing and allocation on one device (mesh checks: tests/sharding/eight_devices.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.runtime import kv_cache
from jaxinfer.runtime.kv_cache import KVCacheSpec, allocate, bytes_per_page, cache_bytes, num_pages_for
from jaxinfer.sharding import make_mesh


def _model(num_layers=2, num_kv_heads=4, head_dim=16):
    return ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=num_layers, num_heads=8, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       max_position_embeddings=4096)


def _old_num_pages(model_config, engine_config, itemsize, max_model_len):
    """The sizing session.py used before this module (kept here as the oracle)."""
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    page_bytes = (2 * engine_config.page_size * model_config.num_kv_heads * model_config.head_dim
                  * itemsize * model_config.num_layers)
    pages_per_seq = -(-max_model_len // engine_config.page_size)
    return max(1, min(engine_config.max_kv_cache_bytes // page_bytes, pages_per_seq * engine_config.max_num_seqs))


# (model, engine, dtype, max_model_len, expected pages)
SIZING = {
    "num_pages_given": (_model(), EngineConfig(num_pages=37, max_kv_cache_bytes=1), "float32", 512, 37),
    # 1 MiB / (2 * 16 * 4 * 16 * 4 bytes * 2 layers = 16 KiB) = 64 pages < 32 pages * 64 seqs.
    "budget_limited": (_model(), EngineConfig(max_kv_cache_bytes=1 << 20), "float32", 512, 64),
    # ceil(100 / 16) = 7 pages per sequence * 3 sequences = 21 < the 1 GiB budget.
    "seq_limited": (_model(), EngineConfig(max_num_seqs=3), "bfloat16", 100, 21),
    # A budget below one page still gives one page.
    "min_one": (_model(num_layers=4), EngineConfig(max_kv_cache_bytes=1000), "float32", 64, 1),
    "gqa_bf16_odd_page": (_model(num_kv_heads=1, head_dim=8), EngineConfig(page_size=5, max_kv_cache_bytes=12345),
                          "bfloat16", 33, 38),
}


@pytest.mark.parametrize("name", list(SIZING))
def test_sizing_equals_the_old_formula(name):
    model, engine, dtype, max_model_len, expected = SIZING[name]
    got = num_pages_for(model, engine, dtype=dtype, max_model_len=max_model_len)
    assert got == expected == _old_num_pages(model, engine, jnp.dtype(dtype).itemsize, max_model_len)
    # A one-device mesh is the same as no mesh.
    assert num_pages_for(model, engine, dtype=dtype, max_model_len=max_model_len, mesh=make_mesh()) == got


def test_bytes_per_page():
    model = _model(num_layers=3, num_kv_heads=2, head_dim=8)
    assert bytes_per_page(model, 16, "float32") == 2 * 16 * 2 * 8 * 4 * 3
    assert bytes_per_page(model, 16, jnp.bfloat16, make_mesh()) == 2 * 16 * 2 * 8 * 2 * 3
    with pytest.raises(ValueError, match="page_size"):
        bytes_per_page(model, 0, "float32")
    with pytest.raises(ValueError, match="dtype"):
        bytes_per_page(model, 16, "int8")


class _FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_free_memory_caps_the_pool(monkeypatch):
    assert kv_cache.free_device_bytes([_FakeDevice(None), _FakeDevice({"bytes_in_use": 5})]) is None
    devices = [_FakeDevice({"bytes_limit": 1000, "bytes_in_use": 100}), _FakeDevice({"bytes_limit": 1000,
                                                                                      "bytes_in_use": 400}),
               _FakeDevice(None)]
    assert kv_cache.free_device_bytes(devices) == 600  # the most loaded device
    assert kv_cache.free_device_bytes(jax.devices()) is None  # CPU reports no limit

    model, engine = _model(), EngineConfig(max_kv_cache_bytes=1 << 30)  # 16 KiB pages, 64 * 32 by sequences
    monkeypatch.setattr(kv_cache, "free_device_bytes", lambda devices: 10 * (16 << 10))
    assert num_pages_for(model, engine, dtype="float32", max_model_len=512) == 9  # 90% of 10 pages
    monkeypatch.setattr(kv_cache, "free_device_bytes", lambda devices: 100)
    assert num_pages_for(model, engine, dtype="float32", max_model_len=512) == 1
    assert num_pages_for(model, EngineConfig(num_pages=5), dtype="float32", max_model_len=512) == 5


def test_num_pages_for_errors():
    with pytest.raises(ValueError, match="max_model_len"):
        num_pages_for(_model(), EngineConfig(), dtype="float32", max_model_len=0)
    with pytest.raises(ValueError, match="dtype"):
        num_pages_for(_model(), EngineConfig(), dtype="not-a-dtype", max_model_len=16)


def test_spec():
    spec = KVCacheSpec.for_model(_model(num_kv_heads=2), num_pages=9, page_size=16, dtype="bfloat16")
    assert spec.page_shape == (9, 16, 2, 16) and spec.num_layers == 2
    assert spec.dtype == np.dtype(jnp.bfloat16)
    assert KVCacheSpec(num_layers=1, num_pages=1, page_size=1, num_kv_heads=1, head_dim=2,
                       dtype=np.float32).dtype == np.dtype("float32")
    assert KVCacheSpec(num_layers=1, num_pages=1, page_size=1, num_kv_heads=1, head_dim=2).dtype == np.float32


@pytest.mark.parametrize("field, value", [("num_layers", 0), ("num_pages", -1), ("page_size", 2.0),
                                          ("num_kv_heads", True), ("head_dim", None), ("dtype", "int32"),
                                          ("dtype", "nope")])
def test_spec_errors(field, value):
    kwargs = dict(num_layers=2, num_pages=4, page_size=8, num_kv_heads=2, head_dim=16, dtype="float32")
    with pytest.raises(ValueError, match=field):
        KVCacheSpec(**(kwargs | {field: value}))


def test_allocate_and_cache_bytes():
    spec = KVCacheSpec(num_layers=3, num_pages=5, page_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    mesh = make_mesh()
    caches = allocate(spec, mesh)
    assert len(caches) == 3 and all(len(pair) == 2 for pair in caches)
    leaves = jax.tree.leaves(caches)
    for x in leaves:
        assert x.shape == (5, 4, 2, 8) and x.dtype == jnp.bfloat16
        assert x.sharding.spec == P(None, None, "tensor", None) and x.sharding.mesh == mesh
        assert not np.asarray(x.astype(jnp.float32)).any()
    # Every array is its own buffer, so a step can donate them all.
    assert len({x.unsafe_buffer_pointer() for x in leaves}) == 6
    assert cache_bytes(caches) == 6 * 5 * 4 * 2 * 8 * 2
    assert cache_bytes(caches) == spec.num_pages * bytes_per_page(_model(num_layers=3, num_kv_heads=2, head_dim=8),
                                                                  4, "bfloat16", mesh)
    step = jax.jit(lambda c: jax.tree.map(lambda x: x + 1, c), donate_argnums=0)
    new = step(caches)
    assert all(x.is_deleted() for x in leaves) and float(new[2][1][0, 0, 0, 0]) == 1.0
