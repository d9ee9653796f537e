"""Meshes, logical axis names and the one table that maps them to mesh axes.

Several processes (jax.distributed start-up, the step channel): `jaxinfer.sharding.distributed`,
imported by name only where a job is wanted.
"""
from jaxinfer.sharding.mesh import (MESH_AXES, make_mesh, mesh_for_engine, mesh_shape, mesh_size,  # noqa: F401
                                    shard_map)
from jaxinfer.sharding.rules import (DEFAULT_RULES, KV_CACHE_AXES, kv_cache_sharding,  # noqa: F401
                                     logical_to_mesh_spec, named_sharding, param_shardings, replicated)
