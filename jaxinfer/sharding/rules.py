"""The logical-axis rules table (MaxText style) and the shardings it gives on a mesh.

Weights carry logical names ("embed", "mlp", "heads", "kv_heads", "vocab", "norm"; MoE
experts: "expert", "expert_mlp", "router_expert") through
`flax.linen.with_logical_partitioning`; activations and the KV cache use the
`activation_*` and `cache_*` names below (the cache names shard the KV pages; the
activation names give the specs of the models' shard_map regions; no model code calls
`with_sharding_constraint`: XLA propagates activation shardings from the weights). DEFAULT_RULES is the
only place that says which mesh axis (jaxinfer.sharding.mesh.MESH_AXES: "data",
"pipeline", "expert", "tensor") each one is split over; None = replicated.

Path: ModelRunner -> **param_shardings / kv_cache_sharding / replicated** (this file) ->
`jaxinfer.sharding.placement.place` / `jax.jit(in_shardings=..., out_shardings=...)`;
the models' shard_map regions (attention, int4 matmuls, MoE experts) take their
partition specs from the same table (`named_sharding`).

Resolving a logical spec on a mesh: each logical name maps to its mesh axis; a mesh
axis the mesh does not have is dropped (the dim is replicated), and so is a mesh axis
an earlier dim of the same array already uses (a mesh axis may split one dim only).
Size-1 mesh axes are kept: they split nothing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.sharding.mesh import mesh_size

# A rule's value: one mesh axis, several (the dim is split over their product), or None.
MeshAxes = Union[None, str, tuple]

DEFAULT_RULES = (
    # Weights.
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    # MoE weights (jaxinfer.models.moe): stacked experts [E, D, F] / [E, F, D] split over
    # experts (expert parallel) and each expert's ffn dim (tensor parallel, as "mlp");
    # the router's per-expert output dim is replicated: every device routes every token.
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("router_expert", None),
    # Activations.
    ("activation_batch", "data"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_mlp", "tensor"),
    # KV cache: one layer's [P, L, K, H] page array.
    ("cache_pages", None),
    ("cache_page_tokens", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)

# Logical axes of one layer's K (or V) page array [P, L, K, H].
KV_CACHE_AXES = ("cache_pages", "cache_page_tokens", "cache_heads", "cache_head_dim")


def logical_to_mesh_spec(logical_axes, rules=DEFAULT_RULES) -> PartitionSpec:
    """Maps a tuple of logical axis names (None allowed) to a PartitionSpec.

    Mesh-independent and lenient (an unknown name maps to None); `named_sharding` is
    the strict, mesh-aware form.
    """
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name is not None else None for name in logical_axes))


def _as_tuple(axes: MeshAxes) -> tuple:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _dim_mesh_axes(mesh: Mesh, logical_axes: Sequence[Optional[str]], rules) -> list:
    """Per dim, the tuple of mesh axes it is split over (see the module docstring)."""
    table = dict(rules)
    used: set = set()
    dims = []
    for name in logical_axes:
        if name is None:
            dims.append(())
            continue
        if name not in table:
            raise ValueError(f"logical_axes: unknown logical axis name {name!r}; the rules name "
                             f"{sorted(table)}")
        axes = tuple(a for a in _as_tuple(table[name]) if a in mesh.shape and a not in used)
        used.update(axes)
        dims.append(axes)
    return dims


def _spec(dims: Sequence[tuple]) -> PartitionSpec:
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in dims))


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], rules=DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of an array whose dims carry `logical_axes` (None = replicated dim).

    Args:
      mesh: the device mesh.
      logical_axes: one logical name (or None) per dim, e.g. ("embed", "heads").
      rules: (logical name, mesh axes) pairs.
    Returns:
      NamedSharding(mesh, spec) with one spec entry per dim.
    Raises:
      ValueError: a logical name the rules do not have (named).
    """
    return NamedSharding(mesh, _spec(_dim_mesh_axes(mesh, logical_axes, rules)))


def _path_str(path) -> str:
    """"layers_0/self_attn/q_proj/kernel" for a jax tree path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_spec(x) -> bool:
    # NOTE: PartitionSpec is a tuple subclass: without this, jax.tree utilities would
    # descend into it and treat its names as leaves.
    return isinstance(x, PartitionSpec)


def param_shardings(mesh: Mesh, logical_axes_tree, shapes_tree=None, rules=DEFAULT_RULES):
    """NamedShardings of every parameter, from its logical axis names.

    Args:
      mesh: the device mesh.
      logical_axes_tree: PartitionSpec leaves of logical names, as returned by
        `jaxinfer.models.transformer.logical_axes(config, quant)`.
      shapes_tree: optional tree of the same structure with `.shape` leaves (arrays or
        jax.ShapeDtypeStruct, e.g. `param_shapes(config, quant=...)`): every split dim
        is then checked to divide evenly.
      rules: (logical name, mesh axes) pairs.
    Returns:
      A tree of NamedSharding matching `logical_axes_tree`.
    Raises:
      ValueError: naming the parameter path, for a parameter with no logical names (an
        empty PartitionSpec: flax's mark of a parameter created without
        `with_logical_partitioning`), an unknown logical name, a parameter missing
        from `shapes_tree`, more names than dims, or a dim its mesh axes do not divide.
        NOTE: an explicit None entry (e.g. the int4 `perm` vector's (None,)) is a named
        choice to replicate that dim, not an unnamed parameter.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(logical_axes_tree, is_leaf=_is_spec)
    shapes = None
    if shapes_tree is not None:
        shapes = {_path_str(path): leaf.shape
                  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes_tree)[0]}
    shardings = []
    for path, spec in flat:
        name = _path_str(path)
        if not _is_spec(spec):
            raise ValueError(f"logical_axes_tree: {name}: expected a PartitionSpec leaf, got {type(spec).__name__}")
        if len(spec) == 0:
            raise ValueError(f"logical_axes_tree: parameter {name} has no logical axis names; create it with "
                             f"flax.linen.with_logical_partitioning")
        try:
            dims = _dim_mesh_axes(mesh, tuple(spec), rules)
        except ValueError as err:
            raise ValueError(f"logical_axes_tree: parameter {name}: {err}") from None
        if shapes is not None:
            _check_divisible(mesh, name, spec, dims, shapes)
        shardings.append(NamedSharding(mesh, _spec(dims)))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def _check_divisible(mesh: Mesh, name: str, spec: PartitionSpec, dims: Sequence[tuple], shapes: dict) -> None:
    if name not in shapes:
        raise ValueError(f"shapes_tree: parameter {name} is missing")
    shape = tuple(shapes[name])
    if len(dims) > len(shape):
        raise ValueError(f"logical_axes_tree: parameter {name} names {len(dims)} axes {tuple(spec)} but has "
                         f"shape {shape}")
    for dim, (size, axes) in enumerate(zip(shape, dims)):
        num_shards = math.prod(mesh_size(mesh, a) for a in axes)
        if size % num_shards:
            split = " * ".join(f"{a!r} ({mesh_size(mesh, a)})" for a in axes)
            raise ValueError(f"shapes_tree: parameter {name} of shape {shape}: dim {dim} ({spec[dim]!r}) of "
                             f"size {size} is not divisible by mesh axis {split} = {num_shards}")


def kv_cache_sharding(mesh: Mesh, rules=DEFAULT_RULES, *, num_kv_heads: Optional[int] = None) -> NamedSharding:
    """The NamedSharding of one layer's K (or V) page array [P, L, K, H].

    Args:
      mesh: the device mesh.
      rules: (logical name, mesh axes) pairs; the array's names are KV_CACHE_AXES.
      num_kv_heads: K, when known: if the mesh axes of "cache_heads" do not divide it
        (e.g. one KV head on a tensor axis of 4), the heads are replicated instead of
        split, as `jaxinfer.runtime.kv_cache.bytes_per_page` assumes.
    Returns:
      NamedSharding(mesh, spec); with DEFAULT_RULES spec = P(None, None, "tensor", None).
    """
    dims = _dim_mesh_axes(mesh, KV_CACHE_AXES, rules)
    if num_kv_heads is not None and num_kv_heads % math.prod(mesh_size(mesh, a) for a in dims[2]):
        dims[2] = ()
    return NamedSharding(mesh, _spec(dims))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated NamedSharding (step inputs and outputs: tokens, logits, ...)."""
    return NamedSharding(mesh, PartitionSpec())
