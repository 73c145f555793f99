"""Fused activation quantization for the W4Ax GEMM: RMSNorm -> permute -> quantize -> pack.

    x:           [M, K] bf16/f32   layer input (original channel order)
    perm:        [K] int32         FMPQ channel order: permuted channel j reads x[:, perm[j]]
    norm_weight: [K] or None       RMSNorm weight (original order); None: no norm
    ->
    x4_packed:   [M, K4/2] int8    permuted channels [0, K4), per-token symmetric INT4,
                                   half-split tiles of ``tile_k`` (comet_jax.quant.pack)
    x8:          [M, K8]   int8    permuted channels [K4, K), per-token symmetric INT8
    x_scales:    [M, 2]    f32     (INT4 scale, INT8 scale) = clip * amax / qmax, 1 if amax == 0

Bit-exact contract: the kernel reproduces :func:`act_quant_reference`, which is
``comet_jax.quant.quantizers.quantize(bits=4 / 8, granularity="row")`` on the permuted
segments, so the simulated path equals the kernel path. For that:

* the RMSNorm statistic ``inv_rms[m] = rsqrt(mean(x^2) + eps)`` (a float reduction whose
  order would otherwise differ between XLA and Triton) is computed once by :func:`rms_inv`,
  shared by reference and kernel wrapper; the kernel applies ``(x * inv_rms) * w`` in f32
  (the same two IEEE products as the reference; no bf16 rounding of the normalized value);
* the library computes ``scale = amax * f32(clip / qmax)`` and ``q = round(x * (1 / scale))``
  with every step spelled out (so no XLA graph reorders it); the kernel evaluates the same expressions, with IEEE ``div.rn.f32`` for ``1 / scale`` (Triton's ``/`` is
  approximate) and round-half-to-even ``cvt.rni.f32.f32`` (inline PTX on the GPU; ``jnp`` ops when
  interpreting, where XLA would fold the usual ``(y + 1.5*2^23) - 1.5*2^23`` trick away).

One program per token row: pass 1 gathers the permuted chunks and reduces ``amax`` per
segment, pass 2 re-gathers (L1/L2 hits), quantizes and stores; the INT4 tile ``t`` is
gathered as its two halves, which become the low / high nibbles of the packed bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from comet_jax.quant.pack import pack_int4
from comet_jax.quant.quantizers import quantize

DEFAULT_TILE_K = 128


def rms_inv(x, eps: float):
    """``[M, K] -> [M]`` f32: ``rsqrt(mean(x^2) + eps)`` (shared by kernel and reference)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + jnp.float32(eps))


def validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k):
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D float array [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if perm.shape != (k,) or perm.dtype != jnp.int32:
        raise ValueError(f"perm must be int32 [{k}], got {perm.dtype} {tuple(perm.shape)}")
    if tile_k < 32 or tile_k & (tile_k - 1):
        raise ValueError(f"tile_k={tile_k} must be a power of two >= 32")
    if k % tile_k:
        raise ValueError(f"x: K={k} must be a multiple of tile_k={tile_k}")
    if not 0 <= k4 <= k or k4 % tile_k:
        raise ValueError(f"k4={k4} must be a multiple of tile_k={tile_k} in [0, K={k}]")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    for name, c in (("clip4", clip4), ("clip8", clip8)):
        if not 0.0 < c <= 1.0:
            raise ValueError(f"{name}={c} must be in (0, 1]")
    return m, k


def _normalize(x, norm_weight, eps):
    xf = x.astype(jnp.float32)
    if norm_weight is None:
        return xf
    return (xf * rms_inv(x, eps)[:, None]) * norm_weight.astype(jnp.float32)[None, :]


def act_quant_reference(
    x,
    perm,
    k4: int,
    *,
    norm_weight=None,
    eps: float = 1e-6,
    clip4: float = 1.0,
    clip8: float = 1.0,
    tile_k: int = DEFAULT_TILE_K,
):
    """Library-quantizer semantics of :func:`act_quant` (module docstring).

    Jitted, like the simulated path that calls the same quantizer.
    """
    validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k)
    return _act_quant_reference(
        x,
        perm,
        norm_weight,
        k4=int(k4),
        eps=float(eps),
        clip4=float(clip4),
        clip8=float(clip8),
        tile_k=tile_k,
    )


@functools.partial(jax.jit, static_argnames=("k4", "eps", "clip4", "clip8", "tile_k"))
def _act_quant_reference(x, perm, norm_weight, *, k4, eps, clip4, clip8, tile_k):
    m, k = x.shape
    xp = _normalize(x, norm_weight, eps)[:, perm]
    ones = jnp.ones((m,), jnp.float32)
    if k4:
        r4 = quantize(xp[:, :k4], bits=4, granularity="row", clip_ratio=clip4)
        x4_packed, s4 = pack_int4(r4.q, tile_k), r4.scale
    else:
        x4_packed, s4 = jnp.zeros((m, 0), jnp.int8), ones
    if k4 < k:
        r8 = quantize(xp[:, k4:], bits=8, granularity="row", clip_ratio=clip8)
        x8, s8 = r8.q, r8.scale
    else:
        x8, s8 = jnp.zeros((m, 0), jnp.int8), ones
    return x4_packed, x8, jnp.stack([s4, s8], axis=-1)


def _div_rn(a, b, interpret):
    """IEEE a / b (Triton lowers ``/`` to the approximate ``div.full.f32``)."""
    if interpret:
        # The barrier keeps XLA from rewriting the reciprocal into the following multiply.
        a, b = jax.lax.optimization_barrier((a, b))
        return a / b
    [q] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return q


def _round_even(y, interpret):
    """Round half to even, as ``jnp.round`` (Pallas-Triton has no ``round`` lowering)."""
    if interpret:
        return jnp.round(y)
    [r] = plgpu.elementwise_inline_asm(
        "cvt.rni.f32.f32 $0, $1;",
        args=[y],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, jnp.float32)],
    )
    return r


def _kernel(
    x_ref,
    perm_ref,
    w_ref,
    inv_ref,
    *out_refs,
    k4,
    k8,
    chunk,
    tile_k,
    clip4,
    clip8,
    has_norm,
    interpret,
):
    out_refs = list(out_refs)
    x4_ref = out_refs.pop(0) if k4 else None
    x8_ref = out_refs.pop(0) if k8 else None
    s_ref = out_refs[0]
    inv = inv_ref[...] if has_norm else None

    def gather(start):
        idx = perm_ref[pl.ds(start, chunk)]
        v = x_ref[idx].astype(jnp.float32)
        if has_norm:
            v = (v * inv) * w_ref[pl.ds(start, chunk)]
        return v

    def amax(lo, n_chunks):
        def body(i, a):
            return jnp.maximum(a, jnp.max(jnp.abs(gather(lo + i * chunk))))

        return jax.lax.fori_loop(0, n_chunks, body, jnp.float32(0.0))

    def scale_of(a, clip, qmax):
        # XLA folds the library's ``(amax * clip) / qmax`` into ``amax * c`` with the
        # constant ``c`` rounded once to f32 (exact for clip == 1; for clip < 1 the folding
        # order, hence the last bit of ``c``, depends on the surrounding graph; see
        # docs/kernels_gemm.md).
        c = np.float32(clip / qmax)
        return jnp.where(a * jnp.float32(clip) > 0, a * c, jnp.float32(1.0))

    def quant(v, s, qmax):
        # XLA rewrites ``x / broadcast(s)`` into ``x * broadcast(1 / s)``: same here.
        # Vectors, not scalars: inline asm needs IR values (a scalar literal is not one).
        inv = _div_rn(
            jnp.full(v.shape, 1.0, jnp.float32), jnp.full(v.shape, s, jnp.float32), interpret
        )
        y = _round_even(v * inv, interpret)
        return jnp.clip(y, -qmax - 1.0, qmax).astype(jnp.int32)

    s4 = s8 = jnp.float32(1.0)
    if k4:
        s4 = scale_of(amax(0, k4 // chunk), clip4, 7.0)
        half = tile_k // 2

        def body4(t, c):
            lo = quant(gather(t * tile_k), s4, 7.0)
            hi = quant(gather(t * tile_k + half), s4, 7.0)
            x4_ref[pl.ds(t * half, half)] = ((lo & 0xF) | (hi << 4)).astype(jnp.int8)
            return c

        jax.lax.fori_loop(0, k4 // tile_k, body4, 0)
    if k8:
        s8 = scale_of(amax(k4, k8 // chunk), clip8, 127.0)

        def body8(i, c):
            x8_ref[pl.ds(i * chunk, chunk)] = quant(gather(k4 + i * chunk), s8, 127.0).astype(
                jnp.int8
            )
            return c

        jax.lax.fori_loop(0, k8 // chunk, body8, 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (2,), 0)
    s_ref[...] = jnp.where(lane == 0, s4, s8)


@functools.partial(
    jax.jit, static_argnames=("k4", "eps", "clip4", "clip8", "tile_k", "interpret", "num_warps")
)
def _act_quant_call(x, perm, norm_weight, *, k4, eps, clip4, clip8, tile_k, interpret, num_warps):
    m, k = x.shape
    k8 = k - k4
    has_norm = norm_weight is not None
    w_perm = norm_weight.astype(jnp.float32)[perm] if has_norm else jnp.ones((k,), jnp.float32)
    inv = rms_inv(x, eps) if has_norm else jnp.ones((m,), jnp.float32)
    chunk = tile_k // 2  # gathers of half a tile: the INT4 pass needs exactly these halves
    out_shape, out_specs = [], []
    if k4:
        out_shape.append(jax.ShapeDtypeStruct((m, k4 // 2), jnp.int8))
        out_specs.append(pl.BlockSpec((None, k4 // 2), lambda i: (i, 0)))
    if k8:
        out_shape.append(jax.ShapeDtypeStruct((m, k8), jnp.int8))
        out_specs.append(pl.BlockSpec((None, k8), lambda i: (i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((m, 2), jnp.float32))
    out_specs.append(pl.BlockSpec((None, 2), lambda i: (i, 0)))
    kernel = functools.partial(
        _kernel,
        k4=k4,
        k8=k8,
        chunk=chunk,
        tile_k=tile_k,
        clip4=clip4,
        clip8=clip8,
        has_norm=has_norm,
        interpret=interpret,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(m,),
        in_specs=[
            pl.BlockSpec((None, k), lambda i: (i, 0)),
            pl.BlockSpec((k,), lambda i: (0,)),
            pl.BlockSpec((k,), lambda i: (0,)),
            pl.BlockSpec((None,), lambda i: (i,)),
        ],
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="act_quant",
    )(x, perm, w_perm, inv)
    outs = list(outs)
    x4 = outs.pop(0) if k4 else jnp.zeros((m, 0), jnp.int8)
    x8 = outs.pop(0) if k8 else jnp.zeros((m, 0), jnp.int8)
    return x4, x8, outs[0]


def act_quant(
    x,
    perm,
    k4: int,
    *,
    norm_weight=None,
    eps: float = 1e-6,
    clip4: float = 1.0,
    clip8: float = 1.0,
    tile_k: int = DEFAULT_TILE_K,
    interpret: bool = False,
    num_warps: int = 4,
):
    """Fused RMSNorm -> permute -> per-token INT4/INT8 quantize -> pack (module docstring).

    Returns ``(x4_packed [M, K4/2] int8, x8 [M, K-K4] int8, x_scales [M, 2] f32)``.
    """
    validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k)
    return _act_quant_call(
        x,
        perm,
        norm_weight,
        k4=int(k4),
        eps=float(eps),
        clip4=float(clip4),
        clip8=float(clip8),
        tile_k=tile_k,
        interpret=interpret,
        num_warps=num_warps,
    )


__all__ = ["act_quant", "act_quant_reference", "rms_inv", "validate_args"]
