"""Placing parameters on a mesh shard by shard, reading each shard from host storage.

Path: session -> jaxinfer.models.lazy_checkpoint.lazy_hf_params (a parameter tree of
HostSource leaves over the safetensors memmaps) -> jaxinfer.models.parallel's expansion
(vocab padding, KV-head replication: `remap`, which stays lazy) -> **place** (this file)
-> ModelRunner.

Why: a tensor-parallel engine must never materialise a whole checkpoint on one device
or in host RAM. `place` asks jax for each device's index into the global array
(`jax.make_array_from_callback`) and reads just that slice from the memmap, so the
peak host memory of loading is about one shard, not the checkpoint, and each device
receives only its own bytes.

Glossary:
  source: a HostSource, a lazily read host array of known shape and dtype.
  index map: for one dim of a MappedSource, the source index of every target index
    (int64; -1 = a row / column of zeros), e.g. [0, 1, ..., V-1, -1, -1] pads a vocab
    or [0, 0, 1, 1] repeats KV heads (over the head-dim columns of each head).
  index: what jax passes to a make_array_from_callback callback: a tuple of slices,
    one per dim, slice(None) for a whole dim.

Dimension codes: E experts (StackedSource's leading axis).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxinfer import progress


class HostSource:
    """A lazily read host array (subclasses say where the bytes come from).

    Attributes:
      shape: the full array's shape (tuple of ints).
      dtype: numpy dtype of what `read` returns.
    """

    shape: tuple
    dtype: np.dtype

    def read(self, index: tuple) -> np.ndarray:
        """Returns array[index] as a fresh C-contiguous array in `dtype`.

        Args:
          index: a tuple of step-1 slices (slice(None) allowed), one per dim; missing
            trailing dims mean whole dims.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


def _bounds(index: tuple, shape: tuple) -> list:
    """(start, stop) of every dim of a jax shard index.

    Raises:
      ValueError: an index that is not a tuple of step-1 slices of at most len(shape) dims.
    """
    index = tuple(index) if isinstance(index, tuple) else (index,)
    if len(index) > len(shape):
        raise ValueError(f"index {index} has more dims than the shape {shape}")
    bounds = []
    for dim, size in enumerate(shape):
        item = index[dim] if dim < len(index) else slice(None)
        if not isinstance(item, slice):
            raise ValueError(f"index {index}: dim {dim} is {item!r}, not a slice")
        start, stop, step = item.indices(size)
        if step != 1:
            raise ValueError(f"index {index}: dim {dim} has step {step}; only step-1 slices are read")
        bounds.append((start, max(start, stop)))
    return bounds


def _is_run(indices: np.ndarray) -> bool:
    """True for a non-empty increasing run of consecutive indices (a basic slice)."""
    return len(indices) > 0 and indices[0] >= 0 and bool(np.all(np.diff(indices) == 1))


class MappedSource(HostSource):
    """A base array-like (numpy array, memmap, or a `.T` view of one), dims remapped, cast.

    Only the bytes a read needs are touched: a dim whose requested indices form a run
    is a basic slice of the base (a cheap memmap read); otherwise only the distinct
    source indices it needs are gathered, in one `base[...]` call for all dims.
    """

    def __init__(self, base, dtype, index_maps: dict | None = None):
        """
        Args:
          base: anything with `.shape`, `.dtype` and numpy indexing (basic slices, one
            integer array among slices, or `np.ix_` arrays).
          dtype: the dtype `read` returns (ml_dtypes.bfloat16 included).
          index_maps: {dim: int64 source indices, -1 = zeros}; len(map) is the dim's size.
        Raises:
          ValueError: a map for a dim the base lacks, not 1-D, or with an index out of
            [-1, base.shape[dim]).
        """
        self.base = base
        self.dtype = np.dtype(dtype)
        self.index_maps = {}
        for dim, index_map in (index_maps or {}).items():
            self.index_maps[int(dim)] = _checked_map(index_map, dim, tuple(base.shape))
        self.shape = tuple(len(self.index_maps[d]) if d in self.index_maps else int(n)
                           for d, n in enumerate(base.shape))

    def read(self, index: tuple) -> np.ndarray:
        bounds = _bounds(index, self.shape)
        out_shape = tuple(stop - start for start, stop in bounds)
        base_index = []  # per dim: a slice, or the sorted distinct source indices to gather
        expand = {}  # dim -> (target positions that are not -1, their index into the gathered rows)
        for dim, (start, stop) in enumerate(bounds):
            if dim not in self.index_maps:
                base_index.append(slice(start, stop))
                continue
            wanted = self.index_maps[dim][start:stop]
            if _is_run(wanted):
                base_index.append(slice(int(wanted[0]), int(wanted[-1]) + 1))
                continue
            valid = wanted >= 0
            if not valid.any():
                return np.zeros(out_shape, self.dtype)  # a block of padding only
            needed, position = np.unique(wanted[valid], return_inverse=True)
            base_index.append(slice(int(needed[0]), int(needed[-1]) + 1) if _is_run(needed) else needed)
            expand[dim] = (valid, position)
        values = self.base[_base_key(base_index)]
        for dim, (valid, position) in expand.items():
            values = np.take(values, position, axis=dim)  # repeats rows read once
            if not valid.all():
                padded = np.zeros(values.shape[:dim] + (len(valid),) + values.shape[dim + 1:], values.dtype)
                padded[(slice(None),) * dim + (valid,)] = values
                values = padded
        return np.array(values, dtype=self.dtype, order="C", copy=True)


def _base_key(base_index: list) -> tuple:
    """The numpy key that reads `base_index` (slices and index arrays) as an outer product."""
    arrays = [i for i, item in enumerate(base_index) if not isinstance(item, slice)]
    if len(arrays) <= 1:
        # NOTE: with one index array among slices numpy keeps the array's dim in place.
        return tuple(base_index)
    # Several index arrays broadcast together in numpy; np.ix_ makes them an outer product.
    return np.ix_(*(np.arange(item.start, item.stop) if isinstance(item, slice) else item for item in base_index))


def _checked_map(index_map, dim: int, shape: tuple) -> np.ndarray:
    if not 0 <= int(dim) < len(shape):
        raise ValueError(f"index map for dim {dim} of a {len(shape)}-dim array of shape {shape}")
    index_map = np.asarray(index_map)
    if index_map.ndim != 1 or not (np.issubdtype(index_map.dtype, np.integer) or index_map.size == 0):
        raise ValueError(f"index map for dim {dim}: expected a 1-D integer array, got {index_map.dtype} "
                         f"{index_map.shape}")
    index_map = index_map.astype(np.int64)
    if index_map.size and (index_map.min() < -1 or index_map.max() >= shape[dim]):
        raise ValueError(f"index map for dim {dim}: indices must be in [-1, {shape[dim]}), got "
                         f"[{index_map.min()}, {index_map.max()}]")
    return index_map


class ZeroSource(HostSource):
    """An array of zeros (what `remap` of a StackedSource's expert axis pads with)."""

    def __init__(self, shape: Sequence[int], dtype):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)

    def read(self, index: tuple) -> np.ndarray:
        return np.zeros(tuple(stop - start for start, stop in _bounds(index, self.shape)), self.dtype)


class StackedSource(HostSource):
    """Same-shape sources stacked along a new leading axis: MoE experts [E, ...]."""

    def __init__(self, members: Sequence[HostSource]):
        """
        Raises:
          ValueError: no members, or members of different shapes or dtypes.
        """
        self.members = list(members)
        if not self.members:
            raise ValueError("StackedSource: needs at least one member")
        first = self.members[0]
        for i, member in enumerate(self.members):
            if tuple(member.shape) != tuple(first.shape) or member.dtype != first.dtype:
                raise ValueError(f"StackedSource: member {i} is {member.dtype} {tuple(member.shape)}, member 0 is "
                                 f"{first.dtype} {tuple(first.shape)}")
        self.shape = (len(self.members),) + tuple(first.shape)
        self.dtype = first.dtype

    def read(self, index: tuple) -> np.ndarray:
        bounds = _bounds(index, self.shape)
        (start, stop), rest = bounds[0], tuple(slice(a, b) for a, b in bounds[1:])
        out = np.empty((stop - start,) + tuple(b - a for a, b in bounds[1:]), self.dtype)  # [E_shard, ...]
        for i, expert in enumerate(range(start, stop)):
            out[i] = self.members[expert].read(rest)
        return out


def remap(source, dim: int, index_map: np.ndarray):
    """`source` with dim `dim` remapped: target index i holds source index index_map[i].

    One code path for lazy and loaded parameters: a HostSource stays lazy (maps of a
    MappedSource compose; a StackedSource remaps each member, or its members for dim 0),
    a concrete numpy / jax array gives a numpy array.

    Args:
      source: a HostSource, or a numpy / jax array.
      dim: the dim to remap.
      index_map: int source indices, -1 = zeros (e.g. vocab padding rows).
    Returns:
      A HostSource of the same dtype, or a numpy array; dim `dim` has size len(index_map).
    Raises:
      ValueError: `dim` out of range, or an index map that is not 1-D ints in
        [-1, source.shape[dim]).
      TypeError: a HostSource subclass this function does not know.
    """
    shape = tuple(source.shape)
    if not 0 <= dim < len(shape):
        raise ValueError(f"remap: dim {dim} is out of range for shape {shape}")
    index_map = _checked_map(index_map, dim, shape)
    if isinstance(source, MappedSource):
        maps = dict(source.index_maps)
        if dim in maps:
            # Map of a map: -1 stays -1, others look up the earlier map.
            index_map = np.where(index_map >= 0, maps[dim][np.maximum(index_map, 0)], -1)
        maps[dim] = index_map
        return MappedSource(source.base, source.dtype, maps)
    if isinstance(source, StackedSource):
        if dim == 0:
            zeros = ZeroSource(shape[1:], source.dtype)
            return StackedSource([source.members[i] if i >= 0 else zeros for i in index_map])
        return StackedSource([remap(member, dim - 1, index_map) for member in source.members])
    if isinstance(source, ZeroSource):
        return ZeroSource(shape[:dim] + (len(index_map),) + shape[dim + 1:], source.dtype)
    if isinstance(source, HostSource):
        raise TypeError(f"remap: {type(source).__name__} is not a MappedSource, StackedSource or ZeroSource")
    values = np.take(np.asarray(source), np.maximum(index_map, 0), axis=dim)
    values[(slice(None),) * dim + (index_map < 0,)] = 0
    return values


def place(tree, shardings) -> Any:
    """Puts every leaf of `tree` on devices with its sharding, reading sources per shard.

    HostSource leaves go through `jax.make_array_from_callback`, which calls `read`
    once per addressable device with that device's index: a device reads only its
    shard. NOTE: a shard replicated over some mesh axes is read once per device that
    holds it (jax caches nothing across devices), except a fully replicated array,
    which jax reads once and copies to every device. Array leaves (numpy or jax) go
    through `jax.device_put`.

    Args:
      tree: a parameter tree of HostSource / numpy / jax.Array leaves.
      shardings: a tree of the same structure with jax.sharding.Sharding leaves (e.g.
        `jaxinfer.sharding.rules.param_shardings`).
    Returns:
      The tree of jax.Array, each with its leaf's shape, dtype and sharding.
    Raises:
      ValueError: the two trees differ in structure (from jax.tree.map).
    """
    is_source = lambda x: isinstance(x, HostSource)  # noqa: E731
    nbytes = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize  # noqa: E731
    total = sum(nbytes(x) for x in jax.tree.leaves(tree, is_leaf=is_source))

    def put(leaf, sharding):
        if isinstance(leaf, HostSource):
            # NOTE: shape, sharding and callback positionally: the keyword names and the
            # later `dtype` argument differ across jax versions.
            out = jax.make_array_from_callback(tuple(leaf.shape), sharding, leaf.read)
        else:
            out = jax.device_put(leaf, sharding)
        bar.update(nbytes(leaf))
        return out

    with progress.bar(total, "loading weights", "B", unit_scale=True) as bar:  # jaxinfer.progress: TTY only
        return jax.tree.map(put, tree, shardings, is_leaf=is_source)
