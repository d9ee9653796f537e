"""The safetensors format, read and written without torch, and model-folder path checks.

Format: an 8-byte little-endian header length N, N bytes of a JSON object (tensor name
-> {"dtype", "shape", "data_offsets": [begin, end]} relative to the data section, plus
an optional "__metadata__" of strings), then the raw little-endian tensor bytes.

`read_safetensors` trusts nothing in the file: the header length must fit the file,
the header must be one JSON object without duplicate keys, every dtype known, every
shape a list of ints >= 0, every tensor's byte range inside the data section, of
exactly prod(shape) * itemsize bytes, and no two ranges may overlap. A file that breaks
any rule raises `CorruptCheckpoint` (a ValueError) naming the file and the tensor
BEFORE anything is read past the header: tensors are numpy views over one memmap, so
a lying header can neither make the reader allocate nor read outside the file.

The files of a model folder are found with `jaxinfer.models.folder_paths`, which
keeps them inside the folder.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


MAX_RANK = 32  # numpy's own limit is 64


def _short(value) -> str:
    """repr of a header value, cut short (a lying header may hold huge lists or numbers)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**100 else "<a huge int>"
    return text if len(text) <= 200 else text[:200] + "..."


class CorruptCheckpoint(ValueError):
    """A checkpoint file that breaks its format; the message names the file (and tensor)."""


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str) -> tuple[dict, int, int]:
    """(header dict without __metadata__, data section start, data section length), all checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptCheckpoint(f"{path}: corrupt safetensors header: its length field says {header_len} bytes, "
                                    f"the file has {size - 8} after it (limit {MAX_HEADER_BYTES})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"{path}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptCheckpoint(f"{path}: __metadata__ must be a JSON object, got {type(metadata).__name__}")
    data_start = 8 + header_len
    data_len = size - data_start
    ranges = []
    for name, info in header.items():
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise CorruptCheckpoint(f"{where}: entry must be a JSON object, got {type(info).__name__}")
        dtype_name = info.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ST_DTYPES:
            raise CorruptCheckpoint(f"{where}: unsupported dtype {_short(dtype_name)} "
                                    f"(supported: {', '.join(ST_DTYPES)})")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CorruptCheckpoint(f"{where}: shape must be a list of ints >= 0, got {_short(shape)}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CorruptCheckpoint(f"{where}: data_offsets must be [begin, end] ints >= 0, got {_short(offsets)}")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise CorruptCheckpoint(f"{where}: data_offsets {_short(offsets)} outside the data section of "
                                    f"{data_len} bytes (truncated file or lying header)")
        if len(shape) > MAX_RANK:
            raise CorruptCheckpoint(f"{where}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
        nbytes = math.prod(shape) * np.dtype(ST_DTYPES[dtype_name]).itemsize
        if nbytes != end - begin:
            need = f"{nbytes} bytes" if nbytes <= data_len else "more bytes than the file holds"
            raise CorruptCheckpoint(f"{where}: {dtype_name} shape {_short(shape)} needs {need}, its data_offsets "
                                    f"[{begin}, {end}] hold {end - begin}")
        if begin < end:
            ranges.append((begin, end, name))
    ranges.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise CorruptCheckpoint(f"{path}: tensors {_short(a)} and {_short(b)} overlap in the data section")
    return header, data_start, data_len


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a .safetensors file as a numpy array (header checked first).

    Raises:
      CorruptCheckpoint (ValueError): the file breaks the format (see the module docstring).
    """
    header, data_start, data_len = read_header(path)
    if data_len:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
    else:
        data = np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        tensors[name] = data[begin:end].view(np.dtype(ST_DTYPES[info["dtype"]])).reshape(info["shape"])
    return tensors


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes numpy arrays (bfloat16 included) as one .safetensors file."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        blob = arr.tobytes()
        header[name] = {"dtype": ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
