"""Fused activation quantization for the W4Ax GEMM: RMSNorm -> permute -> quantize -> pack.

    x:           [M, K] bf16/f32   layer input (original channel order)
    perm:        [K] int32 / None  FMPQ channel order: permuted channel j reads x[:, perm[j]];
                                   None: the identity (a folded or trivial permutation)
    norm_weight: [K] or None       RMSNorm weight (original order); None: no norm
    gate:        [M, K] or None    SwiGLU gate: the quantized input is then
                                   ``(silu(f32(gate)) * x)`` rounded to x's dtype, the MLP's
                                   hidden state, which is never written to memory (no norm)
    ->
    x4_packed:   [M, K4/2] int8    permuted channels [0, K4), per-token symmetric INT4,
                                   half-split tiles of ``tile_k`` (comet_jax.quant.pack)
    x8:          [M, K8]   int8    permuted channels [K4, K), per-token symmetric INT8
    x_scales:    [M, 2]    f32     (INT4 scale, INT8 scale) = clip * amax / qmax, 1 if amax == 0

or, with ``layout="unpacked"`` (what the W4Ax GEMM's large-M configs consume; see
:func:`pallas_kernels.w4ax_matmul.w4ax_matmul_unpacked`):

    x_u:         [R, K]    int8    [16 * q4 | q8]: permuted channels in their natural order,
                                   the INT4 values times 16 (the unpacked half-split tile of
                                   ``unpack_int4_x16_tiles`` is the natural order), R = M
                                   rounded up to ``row_align``; rows >= M are zero
    x_scales:    [R, 2]    f32     as above; rows >= M hold 1 (the scale of a zero row)
    rs:          [2, R]    f32     with ``kernel_scales=True`` only: :func:`kernel_scales`
                                   of x_scales, the Mosaic GPU GEMM's per-token factor
                                   operand, written here so that no XLA pass (a kernel
                                   launch per GEMM call) builds it

The unpacked layout saves the GEMM's callers an XLA pass per call that unpacked the INT4
bytes, concatenated the INT8 segment and padded the rows (``[M, K]`` written and re-read):
in run 44's H100 trace of the LLaMA-3-8B engine ~2.2 ms of a 56 ms decode step at batch 1214
and several ms of a mixed 8192-token step; act_quant + GEMM now take 3.6-10.6% less time per
call at M = 1214 and 8192 (docs/benchmarks.md, 2026-11-27).

With ``perm=None`` the unpacked layout reads each chunk of a row as one contiguous block
(vector loads) instead of gathering it channel by channel; the packed layout gathers the
identity order. ``gate`` (the down projection's input, whose FMPQ permutation
``quantize_model`` folds into the gate and up rows, so ``perm`` is None there) reads the gate
and up projections' outputs and quantizes ``silu(gate) * up`` directly: per row it reads
``2K`` inputs and writes ``K`` bytes, where the unfused MLP wrote the ``K``-wide hidden state
and read it back (XLA's SwiGLU fusion: 7.2 ms of a 125.7 ms mixed LLaMA-3-8B step in run 48).

Bit-exact contract: the kernel reproduces :func:`act_quant_reference`, which is
``comet_jax.quant.quantizers.quantize(bits=4 / 8, granularity="row")`` on the permuted
segments, so the simulated path equals the kernel path. For that:

* the RMSNorm statistic ``inv_rms[m] = rsqrt(mean(x^2) + eps)`` (a float reduction whose
  order would otherwise differ between XLA and Triton) is computed by :func:`rms_inv`, the
  same XLA expression in reference and kernel wrapper; the kernel applies
  ``(x * inv_rms) * w`` in f32 (the same two IEEE products as the reference; no bf16
  rounding of the normalized value). XLA compiles that reduction inside each caller's
  program, and its order can follow the fusion there: the two statistics can differ in the
  last bit of a row (seen on the CPU at K = 512: 6 of 74 scales one or two ulps apart, no
  byte; docs/kernels_gemm.md), which the tests' shapes do not hit;
* the library computes ``scale = amax * f32(clip / qmax)`` and ``q = round(x * (1 / scale))``
  with every step spelled out (so no XLA graph reorders it); the kernel evaluates the same
  expressions, with IEEE ``div.rn.f32`` for ``1 / scale`` (Triton's ``/`` is approximate)
  and round-half-to-even by ``cvt.rni.s32.f32``, rounding and converting in one instruction,
  then the clip in int32 (inline PTX on the GPU; ``jnp`` ops when interpreting, where XLA
  would fold the usual ``(y + 1.5*2^23) - 1.5*2^23`` trick away).

The one exception is ``gate``: on the GPU the kernel evaluates ``silu``'s logistic as
``1 / (1 + 2^(-g log2 e))`` with ``ex2.approx`` and ``rcp.approx`` (``silu_approx``, the
default; relative error ~1e-6) or, with ``silu_approx=False``, Triton's ``exp`` and
division, which still differ from XLA's in the last f32 bits. The hidden value is rounded
to bf16 right after, so a difference survives only where the product sits on a bf16
rounding boundary (it then moves that element by one bf16 ulp before quantization, and the
quantized level only if that crosses a level's rounding point: on the H200, M = 8192, K =
14336, the two forms' outputs were equal element for element). In interpret mode (XLA on
both sides) the fused kernel equals the reference bit for bit.

One pass over X: a program owns ``bm`` whole token rows (1 for decode, so M programs run
side by side); it gathers every permuted chunk of a segment into registers at once (the
chunks are unrolled statically, so their loads are in flight together), reduces the row
amax, then quantizes and stores from registers. The gather order is precomputed
(:func:`kernel_order`) so that the low-nibble and high-nibble halves of each packed INT4 tile
are gathered as two contiguous runs of the output. (The first version looped over 64-channel
chunks with two passes, one program per row: 140 us at M=16, K=4096 on the H100.)
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
# act_quant(silu_approx=None) on the GPU: the SwiGLU's logistic by the approximate PTX forms
# (H200, 2026-11-28: 207.4 -> 159.6 us at M = 8192, K = 14336; no element of the output
# differed from the accurate form's, at M = 2222 and 8192 on random inputs).
SILU_APPROX_DEFAULT = True
# The unpacked layout under a permutation: read each row in order and store each channel at
# its permuted column (True), or gather the row by the permutation and store in order (the
# default: on the H200, M = 8192, K = 4096, the scattered form took 97.3 us against 69.5
# under a checkpoint's gather-order permutation, 450.1 against 108.4 under a random one).
UNPACKED_SCATTER = False
# Channels per chunk of the scattered form (128 = one a thread at 4 warps: the scattered
# stores need no layout conversion through shared memory).
SCATTER_CHUNK = 128


def rms_inv(x, eps: float):
    """``[M, K] -> [M]`` f32: ``rsqrt(mean(x^2) + eps)`` (shared by kernel and reference)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1) + jnp.float32(eps))


def validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k, gate=None):
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D float array [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if perm is not None and (perm.shape != (k,) or perm.dtype != jnp.int32):
        raise ValueError(f"perm must be int32 [{k}] or None, got {perm.dtype} {tuple(perm.shape)}")
    if gate is not None:
        if gate.shape != x.shape or gate.dtype != x.dtype:
            raise ValueError(
                f"gate must match x ({x.dtype} {tuple(x.shape)}), got {gate.dtype} "
                f"{tuple(gate.shape)}"
            )
        if norm_weight is not None:
            raise ValueError(
                "gate (SwiGLU input) takes no norm_weight: the MLP hidden state is not normalized"
            )
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


def swiglu(gate, up):
    """The LLaMA MLP's hidden state ``silu(f32(gate)) * up`` in up's dtype (the expression
    the decoder layer computes when the down projection's backend does not fuse it)."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up).astype(up.dtype)


def _normalize(x, norm_weight, eps):
    xf = x.astype(jnp.float32)
    if norm_weight is None:
        return xf
    return (xf * rms_inv(x, eps)[:, None]) * norm_weight.astype(jnp.float32)[None, :]


LAYOUTS = ("packed", "unpacked")


def _check_layout(layout: str, row_align: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if row_align < 1 or row_align & (row_align - 1):
        raise ValueError(f"row_align={row_align} must be a power of two >= 1")
    if layout == "packed" and row_align != 1:
        raise ValueError("row_align applies to layout='unpacked' only (packed rows are M)")


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
    layout: str = "packed",
    row_align: int = 1,
    gate=None,
):
    """Library-quantizer semantics of :func:`act_quant` (module docstring), in either layout.

    Jitted, like the simulated path that calls the same quantizer.
    """
    validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k, gate)
    _check_layout(layout, row_align)
    if gate is not None:
        x = swiglu(gate, x)
    if perm is None:
        perm = jnp.arange(x.shape[1], dtype=jnp.int32)
    out = _act_quant_reference(
        x,
        perm,
        norm_weight,
        k4=int(k4),
        eps=float(eps),
        clip4=float(clip4),
        clip8=float(clip8),
        tile_k=tile_k,
    )
    if layout == "packed":
        return out
    return to_unpacked(*out, tile_k=tile_k, row_align=row_align)


@functools.partial(jax.jit, static_argnames=("tile_k", "row_align"))
def to_unpacked(x4_packed, x8, x_scales, *, tile_k: int = DEFAULT_TILE_K, row_align: int = 1):
    """The packed operands -> ``(x_u [R, K] int8, x_scales [R, 2] f32)``, the unpacked
    layout (module docstring) built by XLA: the reference of ``layout="unpacked"``."""
    from pallas_kernels.w4ax_matmul import unpack_int4_x16_tiles

    m = x8.shape[0]
    parts = [unpack_int4_x16_tiles(x4_packed, tile_k)] if x4_packed.shape[1] else []
    x_u = jnp.concatenate(parts + [x8], axis=1)
    r = -(-m // row_align) * row_align
    x_u = jnp.pad(x_u, ((0, r - m), (0, 0)))
    return x_u, jnp.pad(x_scales, ((0, r - m), (0, 0)), constant_values=1.0)


def kernel_scales(x_scales):
    """``x_scales [R, 2]`` (s4, s8 per token) -> ``rs [2, R]`` f32: ``s4 / 256`` and
    ``s8 / 16``, the per-token factors of the W4Ax GEMM on the unpacked operands (they carry
    16 * x4 and the kernel's unpacked weights 16 * w4, so the INT4 sums are 256 times and the
    INT8 ones 16 times the integer products). Powers of two: the products are exact. The
    reference of ``act_quant(..., kernel_scales=True)``'s third output."""
    return jnp.stack([x_scales[:, 0] * (1.0 / 256.0), x_scales[:, 1] * (1.0 / 16.0)])


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


def _ptx(asm: str, *args, dtype=jnp.float32):
    """One PTX instruction (or block) applied elementwise to 32-bit ``args`` -> ``dtype``
    (``$0`` the result, ``$1``... the arguments); GPU only."""
    [r] = plgpu.elementwise_inline_asm(
        asm,
        args=list(args),
        constraints=",".join(["=r"] + ["r"] * len(args)),
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, dtype)],
    )
    return r


def _div_rn(a, b, interpret):
    """IEEE a / b (Triton lowers ``/`` to the approximate ``div.full.f32``)."""
    if interpret:
        # The barrier keeps XLA from rewriting the reciprocal into the following multiply.
        a, b = jax.lax.optimization_barrier((a, b))
        return a / b
    return _ptx("div.rn.f32 $0, $1, $2;", a, b)


def _round_even(y, interpret):
    """Round half to even, as ``jnp.round`` (Pallas-Triton has no ``round`` lowering)."""
    if interpret:
        return jnp.round(y)
    return _ptx("cvt.rni.f32.f32 $0, $1;", y)


def _round_to_int(y, lo: int, hi: int, interpret):
    """``clip(round_half_even(y), lo, hi)`` as int32. On the GPU one ``cvt.rni.s32.f32``
    (round and convert; it saturates, so finite y in any range land as the float path would
    after the clip) then the clip in int32: the float form spent a round, two clamps and the
    saturating conversion's two clamps per element."""
    if interpret:
        return jnp.clip(jnp.round(y), float(lo), float(hi)).astype(jnp.int32)
    return jnp.clip(_ptx("cvt.rni.s32.f32 $0, $1;", y, dtype=jnp.int32), lo, hi)


# -log2(e) as an f32 bit pattern (0xBFB8AA3B), for the PTX below.
_NEG_LOG2E_PTX = "0fBFB8AA3B"


def _sigmoid(g, interpret, approx):
    """``1 / (1 + exp(-g))`` in f32. ``approx`` (GPU): four instructions, ``ex2.approx`` of
    ``-g * log2(e)`` and ``rcp.approx`` of one plus it (relative error ~1e-6, against the
    ~20 instructions of Triton's accurate ``exp`` and range-checked division); otherwise,
    and always when interpreting, ``jax.nn.sigmoid`` (XLA's logistic in interpret mode)."""
    if interpret or not approx:
        return jax.nn.sigmoid(g)
    return _ptx(
        "{ .reg .f32 t; mul.f32 t, $1, " + _NEG_LOG2E_PTX + "; ex2.approx.ftz.f32 t, t; "
        "add.f32 t, t, 0f3F800000; rcp.approx.ftz.f32 $0, t; }",
        g,
    )


def _pow2_chunk(n: int, cap: int) -> int:
    """Largest power of two <= ``cap`` dividing ``n`` (``n`` a multiple of 32)."""
    c = cap
    while n % c:
        c //= 2
    return c


def _kernel(
    x_ref,
    g_ref,
    idx_ref,
    w_ref,
    inv_ref,
    *out_refs,
    k4,
    k8,
    cw4,
    cw8,
    clip4,
    clip8,
    has_norm,
    interpret,
    unpacked=False,
    valid_programs=None,
    silu_approx=False,
    scatter=False,
):
    """One program quantizes ``bm`` whole rows in a single pass over HBM.

    ``w_ref``: the RMSNorm weights ``[K]`` in their stored dtype, in the order the kernel
    reads x's channels (the wrapper gathers them by ``idx_ref`` once per call), so every
    chunk loads its weights contiguously; the scattered form reads them in their original
    order. ``out_refs``: the quantized output(s), ``x_scales`` ``[bm, 2]``, and with
    ``kernel_scales`` ``rs`` ``[2, bm]`` (unpacked layout).

    Packed layout: ``idx_ref`` / ``w_ref`` are in *kernel order*: ``[0, K4/2)`` the channels
    that become low nibbles of the packed INT4 bytes, ``[K4/2, K4)`` the high nibbles,
    ``[K4, K)`` the INT8 segment. ``unpacked``: in the permuted order itself, and one output
    ``[bm, K]`` takes ``16 * q4`` then ``q8``. Every chunk of a segment is gathered once
    (statically unrolled, so the loads are independent and in flight together), kept in
    registers for the row amax, then quantized and stored. ``valid_programs``: the programs
    from this index on write the zero rows (scales 1) that pad the unpacked output; their x
    block repeats the last real one. ``idx_ref`` None (unpacked layout only): the identity
    order, each chunk one contiguous load. ``g_ref``: the SwiGLU gate, read like x.

    ``scatter`` (unpacked layout, a permutation): ``idx_ref`` holds the inverse permutation
    ``pos`` ([K], original channel order) and ``w_ref`` the norm weights in original order;
    the row is read contiguously in its original order and each quantized channel ``c`` is
    stored at column ``pos[c]`` (see :func:`_scatter_rows`).
    """
    if scatter:
        return _scatter_rows(
            x_ref, g_ref, idx_ref, w_ref, inv_ref, *out_refs, k4=k4, cw=cw4, clip4=clip4,
            clip8=clip8, has_norm=has_norm, interpret=interpret,
            valid_programs=valid_programs, silu_approx=silu_approx,
        )  # fmt: skip
    out_refs = list(out_refs)
    if unpacked:
        x4_ref = x8_ref = out_refs.pop(0)
    else:
        x4_ref = out_refs.pop(0) if k4 else None
        x8_ref = out_refs.pop(0) if k8 else None
    s_ref, rs_ref = out_refs[0], (out_refs[1] if len(out_refs) > 1 else None)
    kept = _keeper(valid_programs)
    bm = x_ref.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    inv = inv_ref[...].reshape(bm, 1) if has_norm else None

    def gather(start, width):
        if idx_ref is None:  # identity order: one contiguous block
            v = x_ref[:, pl.ds(start, width)]
            g = None if g_ref is None else g_ref[:, pl.ds(start, width)]
        else:
            idx = idx_ref[pl.ds(start, width)].reshape(1, width)
            v = x_ref[rows, idx]  # [bm, width]
            g = None if g_ref is None else g_ref[rows, idx]

        def load_w():  # [1, width] f32: the weights of the channels gathered into v
            return w_ref[pl.ds(start, width)].astype(jnp.float32).reshape(1, width)

        return _layer_input(v, g, inv, load_w if has_norm else None, interpret, silu_approx)

    def row_amax(chunks):  # [bm, 1]; the max is exact in any order
        if idx_ref is None:
            # Contiguous chunks: elementwise across the chunks, then one reduction over the
            # lanes (one cross-warp reduction, not one per chunk: H200, SwiGLU input at
            # M = 8192, 245.3 -> 229.3 us with nothing else changed).
            a = jnp.abs(chunks[0])
            for c in chunks[1:]:
                a = jnp.maximum(a, jnp.abs(c))
            return jnp.max(a, axis=1, keepdims=True)
        # Gathered chunks (each already converted through shared memory): one reduction per
        # chunk measured faster there (107.2 vs 112.4 us at M = 8192, K = 4096).
        a = jnp.max(jnp.abs(chunks[0]), axis=1, keepdims=True)
        for c in chunks[1:]:
            a = jnp.maximum(a, jnp.max(jnp.abs(c), axis=1, keepdims=True))
        return a

    def quant(v, s, qmax):
        # ``x * (1 / s)`` as XLA rewrites the library's division; IEEE ``div.rn`` for 1 / s.
        # Vectors, not scalars: inline asm needs IR values.
        one = jnp.full(v.shape, 1.0, jnp.float32)
        inv_s = _div_rn(one, jnp.broadcast_to(s, v.shape), interpret)
        return _round_to_int(v * inv_s, -int(qmax) - 1, int(qmax), interpret)

    ones = jnp.full((bm, 1), 1.0, jnp.float32)
    s4 = s8 = ones
    if k4 and unpacked:
        starts = range(0, k4, cw4)
        v4 = [gather(c, cw4) for c in starts]
        s4 = _scale_of(row_amax(v4), clip4, 7.0)
        for c, v in zip(starts, v4):
            x4_ref[:, pl.ds(c, cw4)] = kept(quant(v, s4, 7.0) * 16, 0).astype(jnp.int8)
    elif k4:
        h = k4 // 2
        starts = range(0, h, cw4)
        lo = [gather(c, cw4) for c in starts]
        hi = [gather(h + c, cw4) for c in starts]
        s4 = _scale_of(row_amax(lo + hi), clip4, 7.0)
        for c, a, b in zip(starts, lo, hi):
            qa, qb = quant(a, s4, 7.0), quant(b, s4, 7.0)
            x4_ref[:, pl.ds(c, cw4)] = ((qa & 0xF) | (qb << 4)).astype(jnp.int8)
    if k8:
        starts8 = range(0, k8, cw8)
        v8 = [gather(k4 + c, cw8) for c in starts8]
        s8 = _scale_of(row_amax(v8), clip8, 127.0)
        at = k4 if unpacked else 0  # the INT8 segment's first column in its output
        for c, v in zip(starts8, v8):
            x8_ref[:, pl.ds(at + c, cw8)] = kept(quant(v, s8, 127.0), 0).astype(jnp.int8)
    _store_scales(s_ref, s4, s8, kept, rs_ref)


def _keeper(valid_programs):
    """``kept(v, fill)``: ``v``, or ``fill`` in the programs from ``valid_programs`` on (they
    write the zero rows, scales 1, that pad the unpacked output)."""
    keep = None if valid_programs is None else pl.program_id(0) < valid_programs

    def kept(v, fill):
        return v if keep is None else jnp.where(keep, v, fill)

    return kept


def _layer_input(v, g, inv, load_w, interpret, silu_approx):
    """A chunk ``[bm, width]`` of x as f32 as the layer feeds its linear: with the SwiGLU gate
    ``g``, ``silu(f32(g)) * v`` rounded to v's dtype first (as the layer computes it); with
    ``load_w`` (loads the RMSNorm weights ``[1, width]``; called after ``v * inv`` is
    formed, the order the measured kernels were traced in) ``(v * inv) * w``."""
    if g is not None:
        gf = g.astype(jnp.float32)
        v = ((gf * _sigmoid(gf, interpret, silu_approx)) * v).astype(v.dtype)
    v = v.astype(jnp.float32)
    return v if load_w is None else (v * inv) * load_w()


def _store_scales(s_ref, s4, s8, kept, rs_ref=None):
    """``[bm, 2]`` (INT4, INT8) scales; padding programs store 1. ``rs_ref`` ``[2, bm]``: also
    their :func:`kernel_scales` (``s4 / 256``, ``s8 / 16``: exact)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 1)
    s4, s8 = kept(s4, 1.0), kept(s8, 1.0)
    s_ref[...] = jnp.where(lane == 0, s4, s8)
    if rs_ref is not None:
        bm = s4.shape[0]
        row = jax.lax.broadcasted_iota(jnp.int32, rs_ref.shape, 0)
        r4, r8 = s4.reshape(1, bm) * (1.0 / 256.0), s8.reshape(1, bm) * (1.0 / 16.0)
        rs_ref[...] = jnp.where(row == 0, r4, r8)


def _scale_of(a, clip, qmax):
    """The library's ``amax * f32(clip / qmax)`` (XLA folds the constant the same way); 1
    where the amax is 0."""
    c = np.float32(clip / qmax)
    return jnp.where(a * jnp.float32(clip) > 0, a * c, jnp.float32(1.0))


def _scatter_rows(
    x_ref, g_ref, pos_ref, w_ref, inv_ref, out_ref, s_ref, rs_ref=None, *, k4, cw, clip4,
    clip8, has_norm, interpret, valid_programs=None, silu_approx=False,
):  # fmt: skip
    """The unpacked layout under a permutation, read in order and stored scattered: every
    chunk of ``cw`` original channels is one contiguous load (no index array to wait for
    first); channel ``c`` belongs to the INT8 segment where ``pos[c] >= k4``, so the two row
    amaxes are masked maxima over the same chunks, and its quantized value goes to column
    ``pos[c]``. Same values as the gathered form (the same products, maxima and roundings),
    stored by position instead of loaded by index. With a permutation stored in gather
    order (ascending within each segment, ``fmpq.gather_order``) a warp's stores land in
    one or two runs of columns."""
    bm, k = x_ref.shape
    kept = _keeper(valid_programs)
    rows = jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    inv = inv_ref[...].reshape(bm, 1) if has_norm else None
    chunks = []
    for c in range(0, k, cw):
        g = None if g_ref is None else g_ref[:, pl.ds(c, cw)]
        w = (
            (lambda c=c: w_ref[pl.ds(c, cw)].astype(jnp.float32).reshape(1, cw))
            if has_norm
            else None
        )
        v = _layer_input(x_ref[:, pl.ds(c, cw)], g, inv, w, interpret, silu_approx)
        pos = pos_ref[pl.ds(c, cw)].reshape(1, cw)
        chunks.append((v, pos, pos >= k4))
    a4 = a8 = None
    for v, _, is8 in chunks:  # masked maxima; 0 fills (|v| >= 0) leave them exact
        av = jnp.abs(v)
        m4, m8 = jnp.where(is8, 0.0, av), jnp.where(is8, av, 0.0)
        a4 = m4 if a4 is None else jnp.maximum(a4, m4)
        a8 = m8 if a8 is None else jnp.maximum(a8, m8)
    s4 = _scale_of(jnp.max(a4, axis=1, keepdims=True), clip4, 7.0)
    s8 = _scale_of(jnp.max(a8, axis=1, keepdims=True), clip8, 127.0)
    one = jnp.full((bm, 1), 1.0, jnp.float32)
    inv4, inv8 = _div_rn(one, s4, interpret), _div_rn(one, s8, interpret)
    for v, pos, is8 in chunks:
        q = _round_to_int(v * jnp.where(is8, inv8, inv4), -128, 127, interpret)
        q = jnp.clip(q, jnp.where(is8, -128, -8), jnp.where(is8, 127, 7))
        out_ref[rows, pos] = kept(jnp.where(is8, q, q * 16), 0).astype(jnp.int8)
    _store_scales(s_ref, s4, s8, kept, rs_ref)


def _adapt_refs(*refs, gated, gathered, **kw):
    """pallas_call's positional refs (x, [gate], [idx], w, inv, outputs...) -> `_kernel`."""
    refs = list(refs)
    x_ref = refs.pop(0)
    g_ref = refs.pop(0) if gated else None
    idx_ref = refs.pop(0) if gathered else None
    _kernel(x_ref, g_ref, idx_ref, *refs, **kw)


def kernel_order(perm, k4: int, tile_k: int):
    """``perm`` ([K] int32, FMPQ order) rearranged into the kernel's gather order.

    Packed INT4 byte ``p`` (tile ``t = p // (tile_k/2)``, lane ``j``) holds permuted channels
    ``t*tile_k + j`` (low nibble) and ``t*tile_k + tile_k/2 + j`` (high nibble); the kernel
    gathers all low-nibble channels, then all high-nibble channels, then the INT8 segment.
    Returns ``[K]`` positions into ``perm`` (numpy, static).
    """
    k = perm.shape[0]
    h = tile_k // 2
    p = np.arange(k4 // 2)
    lo = (p // h) * tile_k + p % h
    return np.concatenate([lo, lo + h, np.arange(k4, k)]).astype(np.int32)


def _read_order(perm, k: int, k4: int, tile_k: int, unpacked: bool, scatter: bool):
    """``[K]`` int32 channel indices in the order the kernel reads a row of x, or None where
    it reads the row in its original order (the unpacked layout without a permutation).
    Scattered form (``scatter``): the inverse permutation (channel c's column)."""
    if perm is None and not unpacked:  # the packed gather order of the identity: a constant
        return jnp.asarray(kernel_order(np.arange(k), k4, tile_k))
    if unpacked and perm is not None and scatter:
        return jnp.zeros((k,), jnp.int32).at[perm].set(jnp.arange(k, dtype=jnp.int32))
    return perm if unpacked else perm[jnp.asarray(kernel_order(perm, k4, tile_k))]


def _norm_in_read_order(norm_weight, idx, scatter: bool):
    """The RMSNorm weights as the kernel loads them: gathered into the read order ``idx``, or
    as they are where the kernel reads x in its original order (no ``idx``, or the scattered
    form, whose ``idx`` is where each channel is stored)."""
    return norm_weight if idx is None or scatter else norm_weight[idx]


def _scattered(layout: str, scatter: bool | None) -> bool:
    """Whether a call of ``layout`` runs the scattered form (``scatter`` None: the default)."""
    return layout == "unpacked" and (UNPACKED_SCATTER if scatter is None else bool(scatter))


def kernel_read_order(
    perm,
    k: int,
    k4: int,
    *,
    tile_k: int = DEFAULT_TILE_K,
    layout: str = "packed",
    scatter: bool | None = None,
):
    """The ``[K]`` int32 index vector :func:`act_quant` builds from ``perm`` on every call of
    this ``layout`` and ``scatter`` (the packed layout: ``perm`` in the packed gather order,
    :func:`kernel_order`, an XLA gather; the scattered form: the inverse permutation), or
    ``perm`` itself where the call uses it as it is (the unpacked layout's gathered form), or
    None (the unpacked layout without a permutation). Computed once (an engine does it at
    start-up) and passed as ``act_quant(perm=idx, perm_in_kernel_order=True)``: the same
    bytes out, no index op in the call."""
    if perm is not None and (perm.ndim != 1 or perm.shape[0] != k):
        raise ValueError(f"kernel_read_order: want perm [{k}] or None, got {tuple(perm.shape)}")
    _check_layout(layout, 1)
    return _read_order(perm, k, int(k4), tile_k, layout == "unpacked", _scattered(layout, scatter))


def kernel_norm_weight(
    norm_weight,
    perm,
    k4: int,
    *,
    tile_k: int = DEFAULT_TILE_K,
    layout: str = "packed",
    scatter: bool | None = None,
):
    """``norm_weight [K]`` (original channel order) -> ``[K]`` in the order in which
    :func:`act_quant` reads a row of x for this ``perm``, ``k4``, ``tile_k``, ``layout`` and
    ``scatter``: what ``act_quant`` gathers on every call (one XLA gather each), computed once
    (an engine does it at start-up). Pass it as ``act_quant(..., norm_weight=w,
    norm_in_kernel_order=True)``: the same bytes out, no gather in the call. The stored
    dtype is kept (the kernel converts)."""
    k = norm_weight.shape[0]
    if norm_weight.ndim != 1 or (perm is not None and perm.shape != (k,)):
        shape = None if perm is None else tuple(perm.shape)
        raise ValueError(
            f"kernel_norm_weight: want norm_weight [K] and perm [K] or None, got "
            f"{tuple(norm_weight.shape)} and {shape}"
        )
    idx = kernel_read_order(perm, k, k4, tile_k=tile_k, layout=layout, scatter=scatter)
    return _norm_in_read_order(norm_weight, idx, perm is not None and _scattered(layout, scatter))


def default_rows_per_program(m: int, k: int, layout: str = "packed") -> int:
    """Rows per program: 1 for decode (more programs), up to 4 when M is large and K small in
    the packed layout; always 1 in the unpacked layout (the engine's from M = 257 up): at
    M = 8192, K = 4096 on the H100 one row a program took 117 / 99 us (RMSNorm / none,
    FMPQ permutation) against 170 / 131 us for two, the previous default, and 178-281 us for
    four or eight (``bench_gemm.py --act-quant-launch``, docs/benchmarks.md 2026-11-27)."""
    if m < 256 or layout == "unpacked":
        return 1
    return max(1, min(4, 8192 // k))


def default_num_warps(bm: int, k: int) -> int:
    """Warps so that a program's ``bm * K`` values take <= ~64 registers a thread, but 4 for
    one-row programs (the engine's launch at every M).

    One row, K = 14336 (the SwiGLU input of LLaMA-3-8B's down_proj, M = 8192, unpacked
    layout, bytes equal): 4 warps 333.8 us against 421-428 for 8, 948 for 16 on the H200
    (2026-11-28; Nsight Compute at 8 warps: 128 registers a thread, 2 programs per SM, DRAM
    at 30% of peak); 263.8 against 269.7 on the H100 (2026-11-27, ``bench_gemm.py
    --act-quant-launch-gated``)."""
    if bm == 1:
        return 4
    w = 4
    while w < 16 and bm * k > 64 * 32 * w:
        w *= 2
    return w


@functools.partial(
    jax.jit,
    static_argnames=(
        "k4", "eps", "clip4", "clip8", "tile_k", "interpret", "num_warps", "bm", "row_align",
        "silu_approx", "scatter_chunk", "kernel_scales", "norm_ordered", "perm_ordered",
    ),
)  # fmt: skip
def _act_quant_call(
    x, perm, norm_weight, gate, *, k4, eps, clip4, clip8, tile_k, interpret, num_warps, bm,
    row_align, silu_approx=False, scatter_chunk=0, kernel_scales=False, norm_ordered=False,
    perm_ordered=False,
):  # fmt: skip
    """``row_align = 0``: the packed layout; ``>= 1``: unpacked, rows padded to it.
    ``scatter_chunk > 0``: the unpacked layout under a permutation in the scattered form,
    chunks of that many channels; 0: gathered. ``kernel_scales`` (unpacked): a third
    output, ``rs [2, R]``. ``norm_ordered``: norm_weight is in the kernel's read order
    already (:func:`kernel_norm_weight`); ``perm_ordered``: perm is the read order already
    (:func:`kernel_read_order`)."""
    m, k = x.shape
    k8 = k - k4
    has_norm = norm_weight is not None
    unpacked = row_align > 0
    scatter = unpacked and perm is not None and scatter_chunk > 0
    idx = perm if perm_ordered else _read_order(perm, k, k4, tile_k, unpacked, scatter)
    # The weights in their stored dtype (the kernel converts them), in the order the kernel
    # reads x: gathered here once per call, so the programs load them contiguously instead
    # of gathering them element by element, as each program once did (H200, M = 8192 /
    # 2222, K = 4096, a checkpoint's gather order: 74.2 -> 65.3 / 23.3 -> 20.9 us, this
    # XLA gather included; docs/kernels_gemm.md). An engine gathers them once at start-up
    # instead (``norm_ordered``, :func:`kernel_norm_weight`): no gather in the call.
    w_k = jnp.ones((k,), jnp.float32)
    if has_norm:
        w_k = norm_weight if norm_ordered else _norm_in_read_order(norm_weight, idx, scatter)
    inv = rms_inv(x, eps) if has_norm else jnp.ones((m,), jnp.float32)
    mp = -(-m // bm) * bm
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
        inv = jnp.pad(inv, (0, mp - m), constant_values=1.0)
        if gate is not None:
            gate = jnp.pad(gate, ((0, mp - m), (0, 0)))
    cw4 = _pow2_chunk(k4 if unpacked else k4 // 2, 512) if k4 else 0
    cw8 = _pow2_chunk(k8, 512) if k8 else 0
    if scatter:  # one chunk width over the whole row (its original order)
        cw4 = _pow2_chunk(k, scatter_chunk)
    # Unpacked: R rows out (M rounded up to row_align); the grid covers them in whole
    # programs, those past the input's blocks write zeros and read its last block again.
    r = -(-m // row_align) * row_align if unpacked else mp
    grid_rows = -(-r // bm) * bm
    blocks = mp // bm
    valid = blocks if grid_rows > mp else None
    x_block = (lambda i: (jnp.minimum(i, blocks - 1), 0)) if valid else (lambda i: (i, 0))
    row_block = (lambda i: (jnp.minimum(i, blocks - 1),)) if valid else (lambda i: (i,))
    out_shape, out_specs = [], []
    if unpacked:
        out_shape.append(jax.ShapeDtypeStruct((grid_rows, k), jnp.int8))
        out_specs.append(pl.BlockSpec((bm, k), lambda i: (i, 0)))
    elif k4:
        out_shape.append(jax.ShapeDtypeStruct((mp, k4 // 2), jnp.int8))
        out_specs.append(pl.BlockSpec((bm, k4 // 2), lambda i: (i, 0)))
    if k8 and not unpacked:
        out_shape.append(jax.ShapeDtypeStruct((mp, k8), jnp.int8))
        out_specs.append(pl.BlockSpec((bm, k8), lambda i: (i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((grid_rows, 2), jnp.float32))
    out_specs.append(pl.BlockSpec((bm, 2), lambda i: (i, 0)))
    if kernel_scales:
        out_shape.append(jax.ShapeDtypeStruct((2, grid_rows), jnp.float32))
        out_specs.append(pl.BlockSpec((2, bm), lambda i: (0, i)))
    kernel = functools.partial(
        _adapt_refs,
        gated=gate is not None,
        gathered=idx is not None,
        k4=k4,
        k8=k8,
        cw4=cw4,
        cw8=cw8,
        clip4=clip4,
        clip8=clip8,
        has_norm=has_norm,
        interpret=interpret,
        unpacked=unpacked,
        valid_programs=valid,
        silu_approx=silu_approx,
        scatter=scatter,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(grid_rows // bm,),
        in_specs=[
            pl.BlockSpec((bm, k), x_block),
            *([pl.BlockSpec((bm, k), x_block)] if gate is not None else []),
            *([pl.BlockSpec((k,), lambda i: (0,))] if idx is not None else []),
            pl.BlockSpec((k,), lambda i: (0,)),
            pl.BlockSpec((bm,), row_block),
        ],
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="act_quant_swiglu" if gate is not None else "act_quant",
    )(*(a for a in (x, gate, idx) if a is not None), w_k, inv)
    if unpacked:
        x_u, x_scales = outs[0][:r], outs[1][:r]
        return (x_u, x_scales, outs[2][:, :r]) if kernel_scales else (x_u, x_scales)
    outs = [o[:m] for o in outs]
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
    num_warps: int | None = None,
    rows_per_program: int | None = None,
    layout: str = "packed",
    row_align: int = 1,
    gate=None,
    silu_approx: bool | None = None,
    scatter: bool | None = None,
    kernel_scales: bool = False,
    norm_in_kernel_order: bool = False,
    perm_in_kernel_order: bool = False,
):
    """Fused RMSNorm -> permute -> per-token INT4/INT8 quantize -> pack (module docstring);
    with ``gate``, SwiGLU -> permute -> quantize -> pack.

    ``rows_per_program`` / ``num_warps``: the launch (None: :func:`default_rows_per_program`,
    :func:`default_num_warps`). Returns
    ``(x4_packed [M, K4/2] int8, x8 [M, K-K4] int8, x_scales [M, 2] f32)``, or with
    ``layout="unpacked"`` ``(x_u [R, K] int8, x_scales [R, 2] f32)``, R = M rounded up to
    ``row_align``; with ``kernel_scales`` (unpacked layout only) also ``rs [2, R]`` f32,
    :func:`kernel_scales` of x_scales (the Mosaic GPU GEMM's operand).

    ``silu_approx`` (with ``gate``, on the GPU): the SwiGLU's logistic by ``ex2.approx`` and
    ``rcp.approx`` (:func:`_sigmoid`) instead of Triton's accurate ``exp`` and division; None:
    ``SILU_APPROX_DEFAULT``. Interpret mode always evaluates XLA's logistic.

    ``scatter`` (unpacked layout with a permutation): read each row in its original order and
    store channel ``c`` at its permuted column (:func:`_scatter_rows`), or (False) gather the
    row by the permutation and store in order; the same bytes either way. None:
    ``UNPACKED_SCATTER``.

    ``norm_in_kernel_order``: ``norm_weight`` is :func:`kernel_norm_weight` of the RMSNorm
    weight for this call's ``perm``, ``k4``, ``tile_k``, ``layout`` and ``scatter`` (gathered
    once, e.g. at an engine's start-up) instead of the original order, which the call would
    gather itself (an XLA gather a call). The same bytes out; a weight in another order gives
    wrong numbers, so it is for callers that keep the two together.

    ``perm_in_kernel_order``: ``perm`` is :func:`kernel_read_order` of the FMPQ permutation for
    this call's ``k4``, ``tile_k``, ``layout`` and ``scatter`` (in the packed layout the call
    would rearrange it itself: an XLA gather a call). The same bytes out.
    """
    m, k = validate_args(x, perm, k4, norm_weight, clip4, clip8, tile_k, gate)
    if norm_in_kernel_order and norm_weight is None:
        raise ValueError("norm_in_kernel_order=True needs a norm_weight (kernel_norm_weight)")
    if perm_in_kernel_order and perm is None:
        raise ValueError("perm_in_kernel_order=True needs a perm (kernel_read_order)")
    _check_layout(layout, row_align)
    if kernel_scales and layout != "unpacked":
        raise ValueError(
            "kernel_scales=True writes the unpacked layout's GEMM factors: it "
            f"needs layout='unpacked', got {layout!r}"
        )
    bm = rows_per_program or default_rows_per_program(m, k, layout)
    if bm < 1 or bm & (bm - 1):
        raise ValueError(f"rows_per_program={bm} must be a power of two >= 1")
    num_warps = num_warps or default_num_warps(bm, k)
    return _act_quant_call(
        x,
        perm,
        norm_weight,
        gate,
        k4=int(k4),
        eps=float(eps),
        clip4=float(clip4),
        clip8=float(clip8),
        tile_k=tile_k,
        interpret=interpret,
        num_warps=num_warps,
        bm=bm,
        row_align=row_align if layout == "unpacked" else 0,
        silu_approx=SILU_APPROX_DEFAULT if silu_approx is None else bool(silu_approx),
        scatter_chunk=SCATTER_CHUNK if (UNPACKED_SCATTER if scatter is None else scatter) else 0,
        kernel_scales=bool(kernel_scales),
        norm_ordered=bool(norm_in_kernel_order),
        perm_ordered=bool(perm_in_kernel_order),
    )


__all__ = [
    "LAYOUTS",
    "act_quant",
    "act_quant_reference",
    "kernel_norm_weight",
    "kernel_order",
    "kernel_read_order",
    "kernel_scales",
    "rms_inv",
    "swiglu",
    "to_unpacked",
    "validate_args",
]
