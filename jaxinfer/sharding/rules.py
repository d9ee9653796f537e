"""The logical-axis rules table (MaxText style): logical name -> mesh axis.

Weights carry logical names ("embed", "mlp", "heads", "kv_heads", "vocab", "expert")
through `flax.linen.with_logical_partitioning`; this table is the only place that says
which mesh axis each one is split over. Mesh axes: "data" (batch), "tensor" (Megatron
tensor parallelism), "expert".
"""
from __future__ import annotations

from jax.sharding import PartitionSpec

DEFAULT_RULES = (
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)


def logical_to_mesh_spec(logical_axes, rules=DEFAULT_RULES) -> PartitionSpec:
    """Maps a tuple of logical axis names (None allowed) to a PartitionSpec."""
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name is not None else None for name in logical_axes))
