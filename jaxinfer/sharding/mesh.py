"""The device mesh: its axis names and the one function that builds it.

Path: ModelRunner.from_config -> **make_mesh** (today always `make_mesh()`, one device:
EngineConfig has no mesh sizes yet) -> ModelRunner, which
asks jaxinfer.sharding.rules for the NamedSharding of every parameter, KV page array
and step input over this mesh. A disaggregated engine builds two meshes over disjoint
devices (prefill on some, decode on the others) and gives each runner its own.

Mesh axes (MESH_AXES, always all three, size 1 when unused):
  data: batch (data-parallel replicas of the step; weights and KV pages replicated).
  tensor: Megatron tensor parallelism (heads, kv heads, MLP width, vocab split).
  expert: expert parallelism of MoE layers.

Every axis is `AxisType.Auto`: XLA's partitioner propagates shardings from the
NamedSharding of the inputs, and `with_sharding_constraint` works inside the model.
NOTE: `jax.make_mesh` defaults to Explicit axes on recent jax, under which
`with_sharding_constraint` fails ("can only refer to Auto axes"); that is why the mesh
is built with `jax.sharding.Mesh` and explicit axis types here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "tensor", "expert")


def _auto_axis_types(num_axes: int) -> Optional[tuple]:
    """(AxisType.Auto,) * num_axes, or None on a jax without axis types (Auto is its only kind)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else (axis_type.Auto,) * num_axes


def make_mesh(*, data: int = 1, tensor: int = 1, expert: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh of shape (data, tensor, expert) over MESH_AXES, every axis Auto.

    Devices are laid out in the order given, expert fastest, then tensor, then data
    (device i of a (1, 4, 1) mesh is the i-th device). A one-device mesh
    (`make_mesh()`) is what a single-device runner uses.

    Args:
      data: size of the "data" axis (>= 1).
      tensor: size of the "tensor" axis (>= 1).
      expert: size of the "expert" axis (>= 1).
      devices: devices to use; the first data * tensor * expert of them are taken.
        None = `jax.devices()`. Pass disjoint slices to build the two meshes of a
        disaggregated (prefill / decode) engine.
    Returns:
      A jax.sharding.Mesh with axis_names == MESH_AXES.
    Raises:
      ValueError: a size that is not an int >= 1 (named), or more devices asked for
        than given.
    """
    sizes = {"data": data, "tensor": tensor, "expert": expert}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name}: mesh axis size must be an int >= 1, got {size!r}")
    num_devices = math.prod(sizes.values())
    available = list(jax.devices() if devices is None else devices)
    if num_devices > len(available):
        raise ValueError(f"data * tensor * expert: the mesh needs {data} * {tensor} * {expert} = {num_devices} "
                         f"devices, but only {len(available)} are available")
    grid = np.empty(num_devices, dtype=object)
    grid[:] = available[:num_devices]  # NOTE: np.array(devices) could try to iterate a device
    grid = grid.reshape(data, tensor, expert)  # [data, tensor, expert]
    axis_types = _auto_axis_types(len(MESH_AXES))
    if axis_types is None:
        return Mesh(grid, MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_size(mesh: Mesh, axis: str) -> int:
    """Devices along `axis` of `mesh`; 1 for an axis the mesh does not have."""
    return int(dict(mesh.shape).get(axis, 1))
