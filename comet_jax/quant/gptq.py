"""GPTQ (Frantar et al., 2022): error-compensating rounding of ``w: [N, K]`` given ``H = X^T X``.

Columns (input channels) are rounded one at a time; the rounding error of column i, scaled
by the inverse Hessian, is pushed onto the not-yet-rounded columns so that ``X w^T`` changes
as little as possible. Lazy batch updates: inside a block of ``block_size`` columns the error
propagates column by column; the rest of the matrix is updated once per block.

Quantization grid: symmetric signed INT4 (or INT8) from
:func:`comet_jax.quant.quantizers.quantize`: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1)-1)``,
``s = clip_ratio * max|w| / (2^(b-1) - 1)``, per output channel (``scales: [N]``) or per group
of ``group_size`` contiguous input channels (``scales: [N, K/group_size]``). So
``w_hat == quantizers.dequantize(q, scales, granularity=..., group_size=...)`` exactly.

Layout contract with FMPQ: pass ``w`` and ``h`` already in the FMPQ layout
(``fmpq.permute_in(w, plan)``, ``fmpq.permute_hessian(h, plan)``); the result is in the same
layout and groups are contiguous in it, which is what the kernels read. ``act_order=True``
only changes the ORDER in which columns are processed (descending ``diag(H)``, computed in
that layout); results are un-permuted before returning. Because groups must stay contiguous
in the storage layout, act_order uses static group scales (from the un-updated weight,
computed before the sweep); without act_order group scales are computed when the sweep reaches
a group's first column, from the error-updated weights (the original GPTQ behaviour).
Per-channel scales are always computed from the original weight. Scales can also be given
(``scales=``, e.g. learned by :func:`comet_jax.quant.lwc.lwc_quantize`): GPTQ then only
chooses the integers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from comet_jax.quant.quantizers import dequantize, quantize

__all__ = ["GPTQResult", "gptq_quantize", "rtn_quantize", "output_error"]

# Always jitted: XLA rewrites ``amax / qmax`` as ``amax * (1 / qmax)`` under jit (1-ulp scale
# differences against op-by-op execution), so every scale here is computed the jitted way.
_quantize = jax.jit(
    quantize, static_argnames=("bits", "symmetric", "granularity", "group_size", "clip_ratio")
)


class GPTQResult(NamedTuple):
    """q: ``[N, K] int8``; scales: ``[N]`` or ``[N, K/g]`` f32; w_hat: ``[N, K]`` f32 (= q*s)."""

    q: jnp.ndarray
    scales: jnp.ndarray
    w_hat: jnp.ndarray


def _validate(w_shape, h_shape, bits, group_size, block_size, percdamp):
    if len(w_shape) != 2:
        raise ValueError(f"w must be [N, K], got shape {w_shape}")
    k = w_shape[1]
    if tuple(h_shape) != (k, k):
        raise ValueError(f"h has shape {tuple(h_shape)}, expected [K, K] = [{k}, {k}]")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; expected 4 or 8")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size={group_size} must be a positive divisor of K={k}")
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    if group_size is not None and (max(block_size, group_size) % min(block_size, group_size)):
        raise ValueError(
            f"block_size={block_size} and group_size={group_size} must divide one another"
        )
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp} must be >= 0")


def _col_scales(w, bits, group_size, clip_ratio):
    """``[N, K]`` per-column scale from the static grid of ``w``."""
    if group_size is None:
        s = _quantize(w, bits=bits, granularity="row", clip_ratio=clip_ratio).scale
        return jnp.broadcast_to(s[:, None], w.shape)
    s = _quantize(
        w, bits=bits, granularity="group", group_size=group_size, clip_ratio=clip_ratio
    ).scale
    return jnp.repeat(s, group_size, axis=1)


def _inverse_hessian_chol(h, w, percdamp):
    """Upper Cholesky factor of ``(H + damp I)^-1``; dead channels (H_ii = 0) are zeroed."""
    k = h.shape[0]
    dead = jnp.diag(h) == 0
    h = jnp.where(jnp.eye(k, dtype=bool) & dead[:, None], 1.0, h)
    w = jnp.where(dead[None, :], 0.0, w)
    damp = percdamp * jnp.mean(jnp.diag(h))
    h = h + damp * jnp.eye(k, dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(k, dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky(h_inv).T, w


@functools.partial(
    jax.jit, static_argnames=("bits", "group_size", "block_size", "dynamic", "clip_ratio")
)
def _gptq_sweep(w, u, col_scale, *, bits, group_size, block_size, dynamic, clip_ratio):
    """The GPTQ sweep in processing order.

    w: [N, K] f32; u: [K, K] upper Cholesky of H^-1; col_scale: [N, K] static scales (used
    unless ``dynamic``, where a group's scale is taken at its first column).
    Returns q [N, K] int8 and the scale used for each column [N, K].
    """
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    n_blk = -(-k // block_size)
    kp = n_blk * block_size
    pad = kp - k
    # Padding to whole blocks: padded columns have zero weight and unit inverse Hessian.
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.r_[jnp.zeros(k), jnp.ones(pad)])
    col_scale = jnp.pad(col_scale, ((0, 0), (0, pad)), constant_values=1.0)
    cols = jnp.arange(kp)

    def block_body(b, carry):
        w, q_all, s_all = carry
        i1 = b * block_size
        w1 = jax.lax.dynamic_slice(w, (0, i1), (n, block_size))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))
        s1 = jax.lax.dynamic_slice(col_scale, (0, i1), (n, block_size))

        def col_body(i, c):
            w1, q1, sc1, err1, s_cur = c
            col = w1[:, i]
            if dynamic:
                g0 = jax.lax.dynamic_slice(w1, (0, (i // group_size) * group_size), (n, group_size))
                s_new = quantize(g0, bits=bits, granularity="row", clip_ratio=clip_ratio).scale
                s_cur = jnp.where(i % group_size == 0, s_new, s_cur)
                s = s_cur
            else:
                s = s1[:, i]
            qc = jnp.clip(jnp.round(col / s), -qmax - 1, qmax)
            err = (col - qc * s) / u1[i, i]
            # u1 is upper triangular: row i only touches columns >= i.
            w1 = w1 - err[:, None] * u1[i][None, :]
            return (
                w1,
                q1.at[:, i].set(qc.astype(jnp.int8)),
                sc1.at[:, i].set(s),
                err1.at[:, i].set(err),
                s_cur,
            )

        init = (
            w1,
            jnp.zeros((n, block_size), jnp.int8),
            jnp.zeros((n, block_size), jnp.float32),
            jnp.zeros((n, block_size), jnp.float32),
            jnp.ones((n,), jnp.float32),
        )
        _, q1, sc1, err1, _ = jax.lax.fori_loop(0, block_size, col_body, init)
        # Lazy update of all later columns at once (mask: this block is already rounded).
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (block_size, kp))
        later = (cols >= i1 + block_size)[None, :]
        w = w - jnp.where(later, err1 @ u_rows, 0.0)
        q_all = jax.lax.dynamic_update_slice(q_all, q1, (0, i1))
        s_all = jax.lax.dynamic_update_slice(s_all, sc1, (0, i1))
        return w, q_all, s_all

    init = (w, jnp.zeros((n, kp), jnp.int8), jnp.zeros((n, kp), jnp.float32))
    _, q_all, s_all = jax.lax.fori_loop(0, n_blk, block_body, init)
    return q_all[:, :k], s_all[:, :k]


def gptq_quantize(
    w,
    h,
    *,
    bits: int = 4,
    group_size: int | None = None,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratio: float = 1.0,
    scales=None,
) -> GPTQResult:
    """GPTQ-quantizes ``w: [N, K]`` given ``h = X^T X: [K, K]`` (numpy or jnp, any float).

    Args:
      w: weights, K = input channels, in the layout the result should have (FMPQ-permuted).
      h: the (unnormalized or mean) Hessian ``X^T X`` in the same channel order.
      bits: 4 (default) or 8; symmetric signed grid.
      group_size: None for per-output-channel scales, else groups of contiguous columns.
      percdamp: ``H += percdamp * mean(diag H) * I`` before inversion.
      block_size: lazy-update block (128 as in the paper); must divide/be divided by
        group_size.
      act_order: process columns by descending ``diag(H)`` (static group scales; module doc).
      clip_ratio: range multiplier of the scales (1.0 = plain max).
      scales: optional fixed scales, ``[N]`` (per channel) or ``[N, K/group_size]``, e.g.
        ``lwc_quantize(...).scales`` (learned clipping + GPTQ rounding). Used as static scales
        (like act_order); clip_ratio is then ignored.

    Returns:
      :class:`GPTQResult` in the layout of ``w``.
    """
    _validate(np.shape(w), np.shape(h), bits, group_size, block_size, percdamp)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must be in (0, 1]")
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    k = w.shape[1]
    if scales is None:
        col_scale = _col_scales(w, bits, group_size, clip_ratio)
    else:
        want = (w.shape[0],) if group_size is None else (w.shape[0], k // group_size)
        if np.shape(scales) != want:
            raise ValueError(f"scales has shape {np.shape(scales)}, expected {want}")
        scales = jnp.asarray(scales, jnp.float32)
        if not bool(jnp.all(scales > 0)):
            raise ValueError("scales must be > 0")
        col_scale = jnp.broadcast_to(
            scales[:, None] if group_size is None else jnp.repeat(scales, group_size, axis=1),
            w.shape,
        )
    dynamic = group_size is not None and not act_order and scales is None
    if dynamic:
        # Group scales follow the sweep, so groups must not straddle blocks.
        block_size = max(block_size, group_size)
    order = np.argsort(-np.asarray(jnp.diag(h)), kind="stable") if act_order else np.arange(k)
    u, w_p = _inverse_hessian_chol(h[order][:, order], w[:, order], percdamp)
    if not bool(jnp.all(jnp.isfinite(u))):
        raise ValueError(
            f"h + damping is not positive definite (percdamp={percdamp}); raise percdamp"
        )
    q_p, s_p = _gptq_sweep(
        w_p,
        u,
        col_scale[:, order],
        bits=bits,
        group_size=group_size if dynamic else 1,
        block_size=block_size,
        dynamic=dynamic,
        clip_ratio=float(clip_ratio) if dynamic else 1.0,
    )
    inv = np.argsort(order)
    q, s_cols = q_p[:, inv], s_p[:, inv]
    scales = s_cols[:, 0] if group_size is None else s_cols[:, ::group_size]
    return _result(q, scales, group_size)


def _result(q, scales, group_size) -> GPTQResult:
    gran = "row" if group_size is None else "group"
    return GPTQResult(q, scales, dequantize(q, scales, granularity=gran, group_size=group_size))


def rtn_quantize(
    w, *, bits: int = 4, group_size: int | None = None, clip_ratio: float = 1.0
) -> GPTQResult:
    """Round-to-nearest baseline with the same grid and result type as :func:`gptq_quantize`."""
    w = jnp.asarray(w, jnp.float32)
    gran = "row" if group_size is None else "group"
    res = _quantize(w, bits=bits, granularity=gran, group_size=group_size, clip_ratio=clip_ratio)
    return _result(res.q, res.scale, group_size)


def output_error(w, w_hat, h) -> jnp.ndarray:
    """``||X w^T - X w_hat^T||_F^2 = tr(E H E^T)`` with ``E = w - w_hat``, from ``H = X^T X``."""
    e = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
    return jnp.sum((e @ jnp.asarray(h, jnp.float32)) * e)
