"""Simulated FMPQ activation quantization: the exact integers and scales the kernels use.

Input ``x_perm: [..., K]`` is already in the FMPQ layout (``x[..., plan.perm]``; use
:func:`quantize_activation_plan` to permute and quantize in one call). The first ``K4``
channels are the INT4 segment, the last ``K8 = K - K4`` the INT8 segment. Symmetric, dynamic
(scales from the tokens themselves), per token:

| granularity | INT4 scales ``s4`` | INT8 scales ``s8`` | quantizers.quantize call |
|---|---|---|---|
| ``"segment"`` (default) | ``[...]`` | ``[...]`` | ``granularity="row"`` on each segment |
| ``"block"`` | ``[..., K4/B]`` | ``[..., K8/B]`` | ``granularity="group", group_size=B`` |

``q4 = clamp(round(x4 / s4), -8, 7)``, ``s4 = clip4 * max|x4| / 7``; ``q8`` likewise with 127.
All values come from :func:`comet_jax.quant.quantizers.quantize`, run under ``jax.jit``, so
they are bit-identical to kernel references that call the same function under jit. (Op-by-op
execution differs: XLA rewrites ``amax / qmax`` as ``amax * (1 / qmax)`` when compiling, which
moves a scale by one ulp now and then; compare against a jitted reference.) An empty segment (K4 == 0 or K8 == 0)
gives a ``[..., 0]`` integer array and scales of 1 (the quantizers' convention for a segment
without any non-zero value); a kernel skips it.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from comet_jax.quant.fmpq import FMPQPlan, permute_activation
from comet_jax.quant.pack import DEFAULT_TILE, pack_int4
from comet_jax.quant.quantizers import dequantize, quantize

__all__ = [
    "ActQuantResult",
    "quantize_activation",
    "quantize_activation_plan",
    "fake_quantize_activation",
]

ActGranularity = Literal["segment", "block"]


class ActQuantResult(NamedTuple):
    """Quantized activations in the FMPQ layout.

    q4: ``[..., K4] int8`` values in [-8, 7] (unpacked; :meth:`x4_packed` packs them).
    q8: ``[..., K8] int8`` values in [-128, 127].
    s4: INT4 scales, ``[...]`` (segment) or ``[..., K4/B]`` (block), f32.
    s8: INT8 scales, ``[...]`` (segment) or ``[..., K8/B]`` (block), f32.
    x_hat: ``[..., K]`` the dequantized activations (fake quantization) in x's dtype.
    """

    q4: jnp.ndarray
    q8: jnp.ndarray
    s4: jnp.ndarray
    s8: jnp.ndarray
    x_hat: jnp.ndarray

    def x4_packed(self, tile: int = DEFAULT_TILE):
        """``[..., K4/2] int8`` in the half-split tile layout (``comet_jax.quant.pack``)."""
        return pack_int4(self.q4, tile)

    def x_scales(self):
        """``[..., 2] f32`` (s4, s8): the kernel's scale operand for per-segment scales."""
        if self.s4.shape != self.q4.shape[:-1]:
            raise ValueError("x_scales() is only defined for granularity='segment'")
        return jnp.stack([self.s4, self.s8], axis=-1)


def _segment(x, bits, granularity, block_size, clip_ratio):
    """(q, scale, x_hat) of one precision segment ``x: [..., Ks]``."""
    lead = x.shape[:-1]
    if x.shape[-1] == 0:
        sshape = lead if granularity == "segment" else (*lead, 0)
        return jnp.zeros(x.shape, jnp.int8), jnp.ones(sshape, jnp.float32), x
    if granularity == "segment":
        res = quantize(x, bits=bits, symmetric=True, granularity="row", clip_ratio=clip_ratio)
        x_hat = dequantize(res.q, res.scale, granularity="row", dtype=x.dtype)
    else:
        res = quantize(
            x,
            bits=bits,
            symmetric=True,
            granularity="group",
            group_size=block_size,
            clip_ratio=clip_ratio,
        )
        x_hat = dequantize(
            res.q, res.scale, granularity="group", group_size=block_size, dtype=x.dtype
        )
    return res.q, res.scale, x_hat


def quantize_activation(
    x_perm,
    *,
    k4: int,
    granularity: ActGranularity = "segment",
    block_size: int = 128,
    clip_ratio4: float = 1.0,
    clip_ratio8: float = 1.0,
) -> ActQuantResult:
    """Quantizes permuted activations ``x_perm: [..., K]``: INT4 for ``[:k4]``, INT8 after.

    Args:
      x_perm: floating ``[..., K]`` in the FMPQ layout.
      k4: INT4 segment length (``plan.k4``); a multiple of block_size, ``0 <= k4 <= K``.
      granularity: ``"segment"`` (one scale per token per segment) or ``"block"``.
      block_size: FMPQ block size; K must be a multiple of it.
      clip_ratio4 / clip_ratio8: scale the range before rounding (1.0 = no clipping).
    """
    x_perm = jnp.asarray(x_perm)
    if x_perm.ndim < 1:
        raise ValueError(f"x_perm must have a channel axis, got shape {x_perm.shape}")
    k = x_perm.shape[-1]
    if granularity not in ("segment", "block"):
        raise ValueError(f"granularity={granularity!r} must be 'segment' or 'block'")
    if block_size <= 0 or k % block_size:
        raise ValueError(f"K={k} must be a multiple of the {block_size}-channel block size")
    if not 0 <= k4 <= k or k4 % block_size:
        raise ValueError(f"k4={k4} must be a multiple of block_size={block_size} in [0, K={k}]")
    return _quantize(
        x_perm,
        k4=k4,
        granularity=granularity,
        block_size=block_size,
        clip_ratio4=float(clip_ratio4),
        clip_ratio8=float(clip_ratio8),
    )


@functools.partial(
    jax.jit, static_argnames=("k4", "granularity", "block_size", "clip_ratio4", "clip_ratio8")
)
def _quantize(x_perm, *, k4, granularity, block_size, clip_ratio4, clip_ratio8):
    q4, s4, h4 = _segment(x_perm[..., :k4], 4, granularity, block_size, clip_ratio4)
    q8, s8, h8 = _segment(x_perm[..., k4:], 8, granularity, block_size, clip_ratio8)
    return ActQuantResult(q4, q8, s4, s8, jnp.concatenate([h4, h8], axis=-1))


def quantize_activation_plan(x, plan: FMPQPlan, **kwargs) -> ActQuantResult:
    """Permutes ``x: [..., K]`` (original channel order) by ``plan`` and quantizes it (a
    padded plan first prepends its zero channels: the result is ``plan.k`` wide).

    kwargs are those of :func:`quantize_activation` except k4 and block_size (from the plan).
    """
    return quantize_activation(
        permute_activation(x, plan), k4=plan.k4, block_size=plan.block_size, **kwargs
    )


def fake_quantize_activation(x, plan: FMPQPlan, *, unpermute: bool = False, **kwargs):
    """``[..., K]`` float: the dequantized activations, in the permuted layout by default.

    With ``unpermute=True`` the result is returned in the original channel order (for
    simulating a float model whose weights are not permuted), without a padded plan's zero
    channels.
    """
    x_hat = quantize_activation_plan(x, plan, **kwargs).x_hat
    return x_hat[..., plan.inv_perm][..., plan.pad :] if unpermute else x_hat
