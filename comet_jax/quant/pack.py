"""INT4 packing in the half-split tile layout consumed by the W4Ax kernels.

Two signed 4-bit values share a byte. Values are packed along the last axis in tiles of
``tile`` elements (the kernel's K tile; 128 by default). Inside tile ``t`` byte ``j``
(``0 <= j < tile/2``) holds element ``t*tile + j`` in its LOW nibble and element
``t*tile + tile/2 + j`` in its HIGH nibble.

Worked example, ``tile = 4``, one row ``q = [1, -2, 3, -8 | 7, 0, -1, 5]`` (two tiles):

    tile 0: byte 0 = lo q[0]= 1 (0x1) | hi q[2]= 3 (0x3) -> 0x31
            byte 1 = lo q[1]=-2 (0xE) | hi q[3]=-8 (0x8) -> 0x8E
    tile 1: byte 2 = lo q[4]= 7 (0x7) | hi q[6]=-1 (0xF) -> 0xF7
            byte 3 = lo q[5]= 0 (0x0) | hi q[7]= 5 (0x5) -> 0x50
    packed (int8 view) = [0x31, 0x8E - 256, 0xF7 - 256, 0x50] = [49, -114, -9, 80]

Why this layout: a kernel that loads a ``[rows, tile/2]`` byte tile gets the two halves of
the K tile with one mask or one shift each, already as signed int8 scaled by 16
(the "x16 zero-extension" of COMET):

    hi16 = b & 0xF0   # == 16 * q_hi  (two's complement: the nibble is the sign-carrying half)
    lo16 = b << 4     # == 16 * q_lo  (int8 wrap-around drops the high nibble)

and the tile's contribution to a dot product is ``x[:, :tile/2] @ lo + x[:, tile/2:] @ hi``:
two contiguous loads of the other operand, no interleaving. The factor 16 (256 when both
operands are unpacked this way) is exact and is folded into the output scale.
"""

from __future__ import annotations

import jax.numpy as jnp

DEFAULT_TILE = 128


def _check_tile(k: int, tile: int, what: str) -> None:
    if tile <= 0 or tile % 2:
        raise ValueError(f"tile={tile} must be a positive even number")
    if k % tile:
        raise ValueError(f"{what}: last axis K={k} must be a multiple of tile={tile}")


def pack_int4(q, tile: int = DEFAULT_TILE):
    """Packs signed INT4 values along the last axis.

    Args:
      q: ``[..., K]`` int8 (or any integer dtype) with values in [-8, 7].
      tile: half-split tile length; K must be a multiple of it.

    Returns:
      ``[..., K/2]`` int8 in the half-split tile layout (see module docstring).
    """
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q must be an integer array, got dtype {q.dtype}")
    k = q.shape[-1]
    _check_tile(k, tile, "pack_int4")
    t = q.reshape(*q.shape[:-1], k // tile, 2, tile // 2).astype(jnp.int32)
    lo, hi = t[..., 0, :], t[..., 1, :]
    byte = (lo & 0xF) | ((hi & 0xF) << 4)
    byte = jnp.where(byte >= 128, byte - 256, byte)
    return byte.reshape(*q.shape[:-1], k // 2).astype(jnp.int8)


def unpack_int4_x16(packed, tile: int = DEFAULT_TILE):
    """Splits packed bytes into the x16-scaled halves, as a kernel does.

    Args:
      packed: ``[..., K/2]`` int8.

    Returns:
      ``(lo16, hi16)``, each ``[..., K/tile, tile/2]`` int8 holding 16 * value.
    """
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.int8:
        raise ValueError(f"packed must be int8, got dtype {packed.dtype}")
    k = packed.shape[-1] * 2
    _check_tile(k, tile, "unpack_int4_x16")
    b = packed.reshape(*packed.shape[:-1], k // tile, tile // 2)
    hi16 = b & jnp.int8(-16)  # 0xF0 as int8
    lo16 = jnp.left_shift(b, jnp.int8(4))
    return lo16, hi16


def unpack_int4(packed, tile: int = DEFAULT_TILE):
    """Inverse of :func:`pack_int4`: ``[..., K/2]`` int8 -> ``[..., K]`` int8 in [-8, 7]."""
    lo16, hi16 = unpack_int4_x16(packed, tile)
    # Arithmetic shift right undoes the x16 exactly (the low nibble is zero).
    lo = jnp.right_shift(lo16, jnp.int8(4))
    hi = jnp.right_shift(hi16, jnp.int8(4))
    q = jnp.stack([lo, hi], axis=-2)  # [..., K/tile, 2, tile/2]
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_uint4(q, tile: int = DEFAULT_TILE):
    """Packs unsigned 4-bit values [0, 15] in the same half-split layout (KV cache)."""
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q must be an integer array, got dtype {q.dtype}")
    k = q.shape[-1]
    _check_tile(k, tile, "pack_uint4")
    t = q.reshape(*q.shape[:-1], k // tile, 2, tile // 2).astype(jnp.int32)
    byte = (t[..., 0, :] & 0xF) | ((t[..., 1, :] & 0xF) << 4)
    return byte.reshape(*q.shape[:-1], k // 2).astype(jnp.uint8)


def unpack_uint4(packed, tile: int = DEFAULT_TILE):
    """Inverse of :func:`pack_uint4`: ``[..., K/2]`` uint8 -> ``[..., K]`` uint8 in [0, 15]."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype}")
    k = packed.shape[-1] * 2
    _check_tile(k, tile, "unpack_uint4")
    b = packed.reshape(*packed.shape[:-1], k // tile, tile // 2)
    q = jnp.stack([b & jnp.uint8(0xF), jnp.right_shift(b, jnp.uint8(4))], axis=-2)
    return q.reshape(*packed.shape[:-1], k)
