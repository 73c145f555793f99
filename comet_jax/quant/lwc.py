"""Learnable weight clipping (OmniQuant-style LWC) for symmetric INT4/INT8 weights.

Each output channel (or each group of ``group_size`` input channels of it) gets a clipping
strength ``c = sigmoid(gamma)`` in (0, 1). The scale is ``s = c * max|w| / (2^(b-1) - 1)``,
the same symmetric grid as :mod:`comet_jax.quant.quantizers` with a per-row/per-group
``clip_ratio``. ``gamma`` is trained with Adam (optax) to minimize the output error

    L(gamma) = ||X w^T - X Q(w)^T||_F^2 = sum_n e_n H e_n^T,   e = w - Q(w),  H = X^T X,

through a straight-through round (forward: the real rounding; backward: identity). Only the
symmetric variant is implemented because the W4Ax kernels take symmetric weights (OmniQuant's
asymmetric gamma/beta pair needs zero points).

The loss is a sum of independent per-output-row terms, so the optimizer tracks, per row, the
best clipping seen (including the starting point ``c = sigmoid(init)``, and the RTN point
``c = 1`` evaluated up front): the result is never worse than RTN on the calibration H.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from comet_jax.quant.quantizers import dequantize

__all__ = ["LWCResult", "lwc_quantize"]


class LWCResult(NamedTuple):
    """q: ``[N, K] int8``; scales: ``[N]`` / ``[N, K/g]`` f32; w_hat = dequantize(q, scales);
    clip: the learned clip ratios, shaped like scales, in (0, 1]."""

    q: jnp.ndarray
    scales: jnp.ndarray
    w_hat: jnp.ndarray
    clip: jnp.ndarray


def _groups(w, group_size):
    """``w: [N, K] -> [N, G, g]`` (G = 1, g = K for per-channel)."""
    n, k = w.shape
    g = k if group_size is None else group_size
    return w.reshape(n, k // g, g)


def _fake_quant(wg, clip, qmax, ste: bool):
    """wg: [N, G, g], clip: [N, G] -> (q [N, G, g], scale [N, G], w_hat [N, G, g])."""
    amax = jnp.max(jnp.abs(wg), axis=-1) * clip
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    x = wg / scale[..., None]
    r = jnp.round(x)
    if ste:
        r = x + jax.lax.stop_gradient(r - x)
    q = jnp.clip(r, -qmax - 1, qmax)
    return q, scale, q * scale[..., None]


# Jitted like the optimizer's forward pass, so the final scales are the ones it evaluated.
_final_quant = jax.jit(functools.partial(_fake_quant, ste=False), static_argnames=("qmax",))


def _row_loss(w, w_hat, h):
    e = w - w_hat
    return jnp.sum((e @ h) * e, axis=-1)  # [N]


@functools.partial(jax.jit, static_argnames=("group_size", "qmax", "steps", "lr"))
def _optimize(w, h, gamma0, *, group_size, qmax, steps, lr):
    wg = _groups(w, group_size)
    opt = optax.adam(lr)

    def losses(gamma):
        _, _, w_hat = _fake_quant(wg, jax.nn.sigmoid(gamma), qmax, ste=True)
        return _row_loss(w, w_hat.reshape(w.shape), h)

    def total(gamma):
        rows = losses(gamma)
        return jnp.sum(rows), rows

    rtn_rows = losses(jnp.full_like(gamma0, jnp.inf))  # sigmoid(inf) = 1: plain RTN

    def step(carry, _):
        gamma, state, best_gamma, best_rows = carry
        (_, rows), grad = jax.value_and_grad(total, has_aux=True)(gamma)
        better = rows < best_rows  # rows are the hard-rounded loss at the current gamma
        best_gamma = jnp.where(better[:, None], gamma, best_gamma)
        best_rows = jnp.where(better, rows, best_rows)
        updates, state = opt.update(grad, state, gamma)
        return (optax.apply_updates(gamma, updates), state, best_gamma, best_rows), None

    init = (gamma0, opt.init(gamma0), jnp.full_like(gamma0, jnp.inf), rtn_rows)
    (gamma, _, best_gamma, best_rows), _ = jax.lax.scan(step, init, None, length=steps)
    last = losses(gamma)
    better = last < best_rows
    return jnp.where(better[:, None], gamma, best_gamma)


def lwc_quantize(
    w,
    h,
    *,
    bits: int = 4,
    group_size: int | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    init: float = 4.0,
) -> LWCResult:
    """Learns per-row (or per-group) clip ratios for ``w: [N, K]`` given ``h = X^T X: [K, K]``.

    Args:
      w: weights (K = input channels), in the layout the result should have.
      h: ``X^T X`` over calibration inputs, same channel order (any positive scaling).
      bits: 4 or 8 (symmetric).
      group_size: None for per-output-channel scales, else a divisor of K.
      steps, lr: Adam steps and learning rate on gamma (clip = sigmoid(gamma)).
      init: starting gamma (4.0 -> clip 0.982, OmniQuant's initialization).

    Returns:
      :class:`LWCResult`; ``w_hat == quantizers.dequantize(q, scales, ...)`` exactly.
    """
    if np.ndim(w) != 2:
        raise ValueError(f"w must be [N, K], got shape {np.shape(w)}")
    n, k = np.shape(w)
    if np.shape(h) != (k, k):
        raise ValueError(f"h has shape {np.shape(h)}, expected [K, K] = [{k}, {k}]")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; expected 4 or 8")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size={group_size} must be a positive divisor of K={k}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps={steps} must be >= 0 and lr={lr} > 0")
    w = jnp.asarray(w, jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    # Normalizing H only rescales the loss; it keeps Adam's first steps well conditioned.
    h = h / jnp.maximum(jnp.trace(h) / k, 1e-30)
    qmax = 2 ** (bits - 1) - 1
    n_groups = 1 if group_size is None else k // group_size
    gamma0 = jnp.full((n, n_groups), init, jnp.float32)
    gamma = _optimize(
        w, h, gamma0, group_size=group_size, qmax=qmax, steps=int(steps), lr=float(lr)
    )
    clip = jax.nn.sigmoid(gamma)
    q, scale, _ = _final_quant(_groups(w, group_size), clip, qmax=qmax)
    q = q.reshape(n, k).astype(jnp.int8)
    if group_size is None:
        scale, clip = scale[:, 0], clip[:, 0]
        w_hat = dequantize(q, scale, granularity="row")
    else:
        w_hat = dequantize(q, scale, granularity="group", group_size=group_size)
    return LWCResult(q, scale, w_hat, clip)
