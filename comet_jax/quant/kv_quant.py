"""KV4: the INT4 group quantizer shared by the paged KV cache and accuracy simulation.

Semantics (docs/architecture.md, "KV cache"): asymmetric INT4 per token per KV head, groups of
``group_size`` channels along head_dim, unsigned nibbles ``q in [0, 15]``,
``x ~ (q - zero) * scale``. K is quantized after RoPE. The integer math is
:func:`comet_jax.quant.quantizers.quantize` (``symmetric=False, granularity="group"``); this
module only fixes the storage format:

- ``packed: [..., D/2] uint8`` in the half-split layout of :func:`comet_jax.quant.pack.pack_uint4`
  with ``tile = group_size``: every group is its own tile, so byte ``j`` of group ``t`` holds
  channel ``t*g + j`` in its low nibble and channel ``t*g + g/2 + j`` in its high nibble.
  A kernel loads one ``[tokens, g/2]`` byte tile per group and gets the two channel halves with
  one mask (``b & 0xF``) and one shift (``b >> 4``); the group's scale and zero apply to both,
  so no scale has to be broadcast across a tile boundary.
- ``scale, zero: [..., D/g] float16``. f16 halves the metadata bytes of f32 (at D=128, g=128 a
  token-head costs 64 + 4 bytes instead of 64 + 8: 3.76x smaller than bf16 instead of 3.56x).
  ``zero`` is an integer in [0, 15], exact in f16. The scale is rounded from the quantizer's
  f32 value (relative change <= 2^-11, i.e. < 0.8% of one quantization step even for q = 15);
  dequantization, the kernels and :func:`fake_quantize_kv` all use the stored f16 scale, so the
  simulation matches the cache bit for bit.

Worked example, ``D = g = 4`` (the tile rule, at a toy size), ``x = [-1.0, 0.4, 2.0, 0.0]``:
range [-1, 2] -> scale 0.2, zero 5, q = [0, 7, 15, 5];
packed bytes = [lo q0 | hi q2, lo q1 | hi q3] = [0xF0, 0x57].
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from comet_jax.quant import pack, quantizers

KV_BITS = 4
SCALE_DTYPE = jnp.float16
GROUP_SIZES = (32, 64, 128)


class KVQuant(NamedTuple):
    """One quantized K or V tensor.

    packed: ``[..., D/2] uint8`` (half-split, tile = group_size).
    scale: ``[..., D/group_size] float16``.
    zero: ``[..., D/group_size] float16`` (integer valued, 0..15).
    """

    packed: jnp.ndarray
    scale: jnp.ndarray
    zero: jnp.ndarray


def _check(head_dim: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be one of {GROUP_SIZES}")
    if head_dim % group_size:
        raise ValueError(f"head_dim={head_dim} must be a multiple of group_size={group_size}")


def quantize_kv(x, group_size: int = 128) -> KVQuant:
    """``x: [..., D]`` float -> :class:`KVQuant` (see module docstring)."""
    x = jnp.asarray(x)
    _check(x.shape[-1], group_size)
    res = quantizers.quantize(
        x, bits=KV_BITS, symmetric=False, granularity="group", group_size=group_size
    )
    packed = pack.pack_uint4(res.q, tile=group_size)
    return KVQuant(packed, res.scale.astype(SCALE_DTYPE), res.zero.astype(SCALE_DTYPE))


def dequantize_kv(packed, scale, zero, group_size: int = 128, dtype=jnp.float32):
    """Inverse of :func:`quantize_kv`: ``packed [..., D/2] uint8`` -> ``[..., D]`` ``dtype``."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype}")
    _check(packed.shape[-1] * 2, group_size)
    q = pack.unpack_uint4(packed, tile=group_size)
    return quantizers.dequantize(
        q, scale, zero, granularity="group", group_size=group_size, dtype=dtype
    )


def fake_quantize_kv(x, group_size: int = 128):
    """quantize_kv -> dequantize_kv in x's dtype: the KV4 simulation used by the float model."""
    x = jnp.asarray(x)
    qkv = quantize_kv(x, group_size)
    return dequantize_kv(*qkv, group_size=group_size, dtype=x.dtype)


def kv4_bytes_per_token_head(head_dim: int, group_size: int) -> int:
    """Stored bytes of one K (or V) vector: packed nibbles + f16 scale and zero per group."""
    _check(head_dim, group_size)
    return head_dim // 2 + 2 * (head_dim // group_size) * jnp.dtype(SCALE_DTYPE).itemsize
