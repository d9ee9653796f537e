"""The device mesh: its axis names and the one function that builds it.

Path: session -> **mesh_for_engine** (EngineConfig's tensor / expert / pipeline sizes ->
**make_mesh** over the first tp * ep * pp devices) -> ModelRunner, which
asks jaxinfer.sharding.rules for the NamedSharding of every parameter, KV page array
and step input over this mesh. A disaggregated engine builds two meshes over disjoint
devices (prefill on some, decode on the others) and gives each runner its own.

Mesh axes (MESH_AXES, always all four, size 1 when unused):
  data: batch (data-parallel replicas of the step; weights and KV pages replicated).
  pipeline: pipeline stages (layers split into stages).
  expert: expert parallelism of MoE layers.
  tensor: Megatron tensor parallelism (heads, kv heads, MLP width, vocab split).
The tensor axis varies fastest over the device list: a tensor group is made of
neighbouring devices (one host's chips, NVLink / ICI neighbours), where its two
all-reduces per layer are cheapest.

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

MESH_AXES = ("data", "pipeline", "expert", "tensor")


def _auto_axis_types(num_axes: int) -> Optional[tuple]:
    """(AxisType.Auto,) * num_axes, or None on a jax without axis types (Auto is its only kind)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else (axis_type.Auto,) * num_axes


def make_mesh(*, data: int = 1, tensor: int = 1, expert: int = 1, pipeline: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh of shape (data, pipeline, expert, tensor) over MESH_AXES, every axis Auto.

    Devices are laid out in the order given, tensor fastest, then expert, pipeline and
    data (device i of a tensor=4 mesh is the i-th device). A one-device mesh
    (`make_mesh()`) is what a single-device runner uses.

    Args:
      data: size of the "data" axis (>= 1).
      tensor: size of the "tensor" axis (>= 1).
      expert: size of the "expert" axis (>= 1).
      pipeline: size of the "pipeline" axis (>= 1).
      devices: devices to use; the first data * pipeline * expert * tensor of them are taken.
        None = `jax.devices()`. Pass disjoint slices to build the two meshes of a
        disaggregated (prefill / decode) engine.
    Returns:
      A jax.sharding.Mesh with axis_names == MESH_AXES.
    Raises:
      ValueError: a size that is not an int >= 1 (named), or more devices asked for
        than given.
    """
    sizes = {"data": data, "pipeline": pipeline, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name}: mesh axis size must be an int >= 1, got {size!r}")
    num_devices = math.prod(sizes.values())
    available = list(jax.devices() if devices is None else devices)
    if num_devices > len(available):
        raise ValueError(f"data * pipeline * expert * tensor: the mesh needs {data} * {pipeline} * {expert} * "
                         f"{tensor} = {num_devices} devices, but only {len(available)} are available")
    grid = np.empty(num_devices, dtype=object)
    grid[:] = available[:num_devices]  # NOTE: np.array(devices) could try to iterate a device
    grid = grid.reshape(data, pipeline, expert, tensor)  # [data, pipeline, expert, tensor]
    axis_types = _auto_axis_types(len(MESH_AXES))
    if axis_types is None:
        return Mesh(grid, MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_size(mesh: Mesh, axis: str) -> int:
    """Devices along `axis` of `mesh`; 1 for an axis the mesh does not have."""
    return int(dict(mesh.shape).get(axis, 1))


def mesh_for_engine(tensor_parallel_size: int = 1, expert_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                    devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The runner's mesh for an engine's parallel sizes: the first tp * ep * pp devices.

    Raises:
      ValueError: more devices asked for than there are, naming the three sizes.
    """
    available = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * expert_parallel_size * pipeline_parallel_size
    if needed > len(available):
        raise ValueError(f"tensor_parallel_size * expert_parallel_size * pipeline_parallel_size: "
                         f"{tensor_parallel_size} * {expert_parallel_size} * {pipeline_parallel_size} = {needed} "
                         f"devices, but only {len(available)} are available")
    return make_mesh(tensor=tensor_parallel_size, expert=expert_parallel_size, pipeline=pipeline_parallel_size,
                     devices=available)


def mesh_shape(mesh: Mesh) -> dict:
    """{"pipeline": pp, "expert": ep, "tensor": tp} of `mesh` (what metrics report)."""
    return {axis: mesh_size(mesh, axis) for axis in ("pipeline", "expert", "tensor")}


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """`fn` run per shard over `mesh` (jax.shard_map), replication checks off.

    The checks are off because Pallas kernels inside (attention, grouped matmul) carry
    no varying-manual-axes information (KERNELS: Pallas in shard_map needs
    check_vma=False); every use psums explicitly what it must. Works on jax with
    `jax.shard_map` (0.6+: check_vma) and on older ones (experimental: check_rep).
    """
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # a jax.shard_map that still calls it check_rep
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map
    return experimental_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def splitwise_meshes(num_prefill_devices: int, prefill_tensor_parallel_size: int,
                     decode_tensor_parallel_size: int) -> tuple[Mesh, Mesh]:
    """The two meshes of a disaggregated engine: the first num_prefill_devices devices
    (tensor parallel over all of them), then the next decode_tensor_parallel_size.

    Raises:
      ValueError: too few devices, naming the sizes.
    """
    devices = jax.devices()
    needed = num_prefill_devices + decode_tensor_parallel_size
    if needed > len(devices):
        raise ValueError(f"num_prefill_devices + decode_tensor_parallel_size: {num_prefill_devices} + "
                         f"{decode_tensor_parallel_size} = {needed} devices, but only {len(devices)} are available")
    return (make_mesh(tensor=prefill_tensor_parallel_size, devices=devices[:num_prefill_devices]),
            make_mesh(tensor=decode_tensor_parallel_size, devices=devices[num_prefill_devices:needed]))

