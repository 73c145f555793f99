"""Integer quantizers as pure functions (round-to-nearest, optional clipping).

Granularity names where the scale is shared, for ``x: [..., K]``:

| granularity | reduces over | ``scale`` / ``zero`` shape | typical use |
|---|---|---|---|
| ``"tensor"`` | everything | ``[]`` | static activation scales |
| ``"row"`` | the last axis | ``x.shape[:-1]`` | per-token activations; per-output-channel weights ``[N, K]`` |
| ``"col"`` | all leading axes | ``[K]`` | per-input-channel (KIVI-style K cache) |
| ``"group"`` | groups of ``group_size`` along the last axis | ``x.shape[:-1] + (K/group_size,)`` | per-group weights, KV groups |

Symmetric: ``q = clamp(round(x * (1/s)), -2^(b-1), 2^(b-1) - 1)`` (int8),
``s = max|x| * f32(clip / (2^(b-1) - 1))`` (a multiply by one f32 constant, never a division).
Asymmetric: the range ``[min(lo, 0), max(hi, 0)]`` (always containing 0, so zero is exact) is
mapped onto ``[0, 2^b - 1]`` (uint8): ``q = clamp(round(x * (1/s)) + z, 0, 2^b - 1)``,
``x ~ (q - z) * s`` with the integer-valued zero point ``z`` stored as f32.

A scale is never zero: an all-zero row/group gets scale 1 and quantizes to exact zeros.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax.numpy as jnp
import numpy as np

Granularity = Literal["tensor", "row", "col", "group"]
GRANULARITIES = ("tensor", "row", "col", "group")


class QuantResult(NamedTuple):
    """Integer values and their affine parameters.

    q: same shape as x; int8 (symmetric) or uint8 (asymmetric).
    scale: f32, shape given by the granularity (module docstring).
    zero: f32 integer-valued zero points (asymmetric) or None (symmetric).
    """

    q: jnp.ndarray
    scale: jnp.ndarray
    zero: jnp.ndarray | None


def validate_args(
    shape: tuple[int, ...], bits: int, granularity: str, group_size: int | None, clip_ratio: float
) -> None:
    """Raises ValueError for an impossible quantizer configuration (before any tracing)."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; expected 4 or 8")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
    if granularity == "group":
        if group_size is None or group_size <= 0:
            raise ValueError(
                f"group_size={group_size} must be a positive int for granularity='group'"
            )
        if not shape or shape[-1] % group_size:
            k = shape[-1] if shape else None
            raise ValueError(f"group_size={group_size} must divide the last axis (K={k})")
    elif group_size is not None:
        raise ValueError(f"group_size={group_size} is only valid with granularity='group'")
    if granularity in ("row", "col", "group") and len(shape) < 1:
        raise ValueError(f"granularity={granularity!r} needs an array with at least one axis")


def _grouped(x, granularity, group_size):
    """Returns x reshaped so the reduction is over the last axis: [..., G, g]."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "row":
        return x[..., None, :]
    if granularity == "col":
        return jnp.moveaxis(x.reshape(-1, x.shape[-1]), 0, -1)[:, None, :]  # [K, 1, rows]
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _param_shape(shape, granularity, group_size):
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return shape[:-1]
    if granularity == "col":
        return shape[-1:]
    return (*shape[:-1], shape[-1] // group_size)


def _broadcast(p, shape, granularity, group_size):
    """Expands a scale/zero of the granularity's shape back to the full ``shape``."""
    if granularity == "tensor":
        return p
    if granularity == "row":
        return p[..., None]
    if granularity == "col":
        return p
    return jnp.repeat(p, group_size, axis=-1)


def quantize(
    x,
    *,
    bits: int,
    symmetric: bool = True,
    granularity: Granularity = "row",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
) -> QuantResult:
    """Round-to-nearest integer quantization of ``x: [..., K]`` (see module docstring)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    validate_args(x.shape, bits, granularity, group_size, clip_ratio)
    xf = x.astype(jnp.float32)
    g = _grouped(xf, granularity, group_size)
    pshape = _param_shape(x.shape, granularity, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = jnp.max(jnp.abs(g), axis=-1)
        # The arithmetic is spelled out (a multiply by one host constant, one reciprocal per
        # scale, then multiplies) so that XLA cannot reassociate it differently in eager,
        # jitted, CPU and GPU graphs; the Pallas kernels compute exactly these steps.
        scale = jnp.where(amax > 0, amax * np.float32(clip_ratio / qmax), 1.0).reshape(pshape)
        inv = _broadcast(1.0 / scale, x.shape, granularity, group_size)
        q = jnp.clip(jnp.round(xf * inv), -qmax - 1, qmax).astype(jnp.int8)
        return QuantResult(q, scale, None)
    levels = 2**bits - 1
    hi = jnp.maximum(jnp.max(g, axis=-1), 0.0) * clip_ratio
    lo = jnp.minimum(jnp.min(g, axis=-1), 0.0) * clip_ratio
    rng = hi - lo
    scale = jnp.where(rng > 0, rng * np.float32(1.0 / levels), 1.0)
    inv = 1.0 / scale
    zero = jnp.clip(jnp.round(-lo * inv), 0, levels)
    scale, zero, inv = scale.reshape(pshape), zero.reshape(pshape), inv.reshape(pshape)
    inv_b = _broadcast(inv, x.shape, granularity, group_size)
    z = _broadcast(zero, x.shape, granularity, group_size)
    q = jnp.clip(jnp.round(xf * inv_b) + z, 0, levels).astype(jnp.uint8)
    return QuantResult(q, scale, zero)


def dequantize(
    q,
    scale,
    zero=None,
    *,
    granularity: Granularity = "row",
    group_size: int | None = None,
    dtype=jnp.float32,
):
    """Reference semantics: ``(q - zero) * scale`` broadcast per the granularity -> ``dtype``."""
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q must be an integer array, got dtype {q.dtype}")
    s = _broadcast(jnp.asarray(scale, jnp.float32), q.shape, granularity, group_size)
    qf = q.astype(jnp.float32)
    if zero is not None:
        qf = qf - _broadcast(jnp.asarray(zero, jnp.float32), q.shape, granularity, group_size)
    return (qf * s).astype(dtype)


def fake_quantize(x, **kwargs):
    """quantize -> dequantize, in x's dtype: the simulated-quantization primitive."""
    gran = kwargs.get("granularity", "row")
    res = quantize(x, **kwargs)
    return dequantize(
        res.q,
        res.scale,
        res.zero,
        granularity=gran,
        group_size=kwargs.get("group_size"),
        dtype=jnp.asarray(x).dtype,
    )
