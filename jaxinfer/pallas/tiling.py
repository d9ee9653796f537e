"""Tile-size rules the grouped kernels share (plain Python, no jax).

GPU (Triton) tiles are powers of two of at least 16 rows / columns; TPU (Mosaic) row
tiles are multiples of 16 (sublanes of bfloat16) and column / contraction tiles the
largest of 512, 256, 128 lanes that divides the dimension (else the whole dimension).
"""
from __future__ import annotations

LANE_BLOCKS = (512, 256, 128)  # TPU bk / bn candidates, largest first


def pow2_block(size: int, largest: int) -> int:
    """GPU: the power of two >= size (at least 16), at most `largest`."""
    return min(largest, max(16, 1 << (size - 1).bit_length()))


def round_up(size: int, block: int) -> int:
    return -(-size // block) * block


def row_block(num_rows: int, largest: int) -> int:
    """TPU: rows rounded up to a multiple of 16, at most `largest`."""
    return min(largest, round_up(num_rows, 16))


def lane_block(size: int) -> int:
    """TPU: the largest of LANE_BLOCKS that divides `size`, else `size` itself."""
    for block in LANE_BLOCKS:
        if size % block == 0:
            return block
    return size
