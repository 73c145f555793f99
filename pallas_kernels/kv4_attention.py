"""Paged attention over an INT4 (or bf16) KV cache: decode and chunked-prefill Pallas kernels.

Cache layout (one pool per layer, stacked; built by ``comet_jax.engine.kv_cache``):

    k:           [L, P, Hkv, page, D/2] uint8   (INT4, half-split tiles of ``group`` channels)
    v:           [L, P, Hkv, D/2, page] uint8   (INT4, the same bytes with each page transposed)
    k, v:        [L, P, Hkv, page, D]   bf16    (baseline cache)
    k_scale, k_zero, v_scale, v_zero:
                 [L, P, Hkv, D/group, page] f16 (INT4 only; token axis last so a page's scales
                                                 of one group are one contiguous 2*page-byte load)

``P`` physical pages of ``page`` tokens. A page of one KV head is one contiguous block, so a
kernel program that owns (sequence, KV head) reads each page once for all ``Hq/Hkv`` query
heads of that GQA group (the "rows" of its tile). ``page_table [B, max_pages] int32`` maps a
sequence's logical page ``i`` to a physical page; ``seq_lens [B] int32`` counts its tokens
(those of the current chunk included: write first, then attend).

Math inside a page (per group ``j`` of ``g`` channels, INT4): with nibble tiles
``lo, hi: [page, g/2]`` and the group's per-token ``s, z: [page]``,

    logits += s * (q_lo @ lo^T + q_hi @ hi^T - z * sum(q_group))        # K: scale after the dot
    ps = bf16(p * s);  o_lo += ps @ lo - sum(ps * z);  o_hi += ps @ hi - ...  # V: scale before

The nibbles enter the bf16 tensor-core dots as exact integers (as ``128 + n``, made by a bit
trick; the 128 is folded into ``z``); dequantization costs one multiply-add per logit instead of
one per cache element. The zero-point corrections use the same rounded operands as the dots, so
they cancel exactly. Softmax is online (flash) in f32, in base 2 (``exp2``; the log-sum-exp
outputs are in natural-log units).

Decode splits the page range of a sequence over ``num_splits`` programs (flash-decoding) and
merges their partial results with a log-sum-exp step; prefill gives each program a tile of
``block_q`` chunk tokens x the GQA group and walks the pages causally.

Decode with the recent window's ring (``ring=``, ``[L, S, Hkv, W, D]`` float, the newest W
tokens of each sequence unquantized): the pages are attended up to ``p - W``
(``causal_shift = W``) and split 0 of each (sequence, KV head) takes the slot's W ring rows
as one more key block (one dot for the logits, one per half for P V, positions from
``p`` and the row index, rows before the sequence masked), inside the same online softmax.

Why INT4 V pages are stored transposed (``[D/2, page]``, token axis last): in ``P V`` the
keys are the dot's contraction axis, and Triton feeds the unpacked nibbles to the tensor cores
in a layout where each thread holds 4 consecutive contraction indices. With V as
``[page, D/2]`` those are 4 bytes a row (64 bytes) apart and the kernel read them from shared
memory one byte at a time (128 ``LDS.U8`` per thread and loop step, plus the moves and byte
permutes that pack them); with ``[D/2, page]`` they are 4 adjacent bytes. On the H100
(2026-11-26) that took decode at B = 64, S = 4096 from 153 to 138 us (docs/kernels_attention.md).
K is read as ``K^T`` by its dot and is already in the right order as ``[page, D/2]``.

``paged_*_reference`` functions are the documented semantics: gather pages, dequantize with
:mod:`comet_jax.quant.quantizers`, masked softmax in f32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from comet_jax.quant import pack, quantizers

_MASK = -0.7 * float(np.finfo(np.float32).max)
_MIN_ROWS = 16  # Triton's smallest dot M
# The kernel's softmax runs in base 2: logits scaled by sm_scale * log2(e), exp2 (one multiply
# fewer per logit than exp, which is exp2 of x * log2(e) on the GPU); the running max is
# returned in natural-log units (x ln 2), the denominators are the same in either base.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class PagedKV(NamedTuple):
    """The arrays of a paged KV cache (module docstring); scales/zeros are None for bf16.
    INT4 ``v`` is ``[L, P, Hkv, D/2, page]`` (pages transposed), ``k`` ``[L, P, Hkv, page,
    D/2]``; bf16 ``k`` and ``v`` are both ``[L, P, Hkv, page, D]``."""

    k: jnp.ndarray
    v: jnp.ndarray
    k_scale: jnp.ndarray | None = None
    k_zero: jnp.ndarray | None = None
    v_scale: jnp.ndarray | None = None
    v_zero: jnp.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1] * (2 if self.quantized else 1)

    @property
    def group_size(self) -> int:
        return self.head_dim // self.k_scale.shape[-2] if self.quantized else self.head_dim

    @property
    def page_size(self) -> int:
        return self.k.shape[-2]


# --------------------------------------------------------------------------- validation


def _concrete(x):
    """numpy value of x, or None when x is a tracer (under jit only shapes can be checked)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _check_kv(kv: PagedKV) -> None:
    if not isinstance(kv, PagedKV):
        raise ValueError(f"kv must be a PagedKV, got {type(kv).__name__}")
    if kv.k.ndim != 5 or kv.v.ndim != 5:
        raise ValueError(f"kv.k/kv.v must be 5-d, got {kv.k.shape}, {kv.v.shape}")
    if kv.quantized:
        want_v = (*kv.k.shape[:3], kv.k.shape[4], kv.k.shape[3])
        if kv.v.shape != want_v:
            raise ValueError(
                f"INT4 kv.v must be [L, P, Hkv, D/2, page] = {want_v} (kv.k's pages "
                f"transposed; kv.k is [L, P, Hkv, page, D/2] = {kv.k.shape}), got {kv.v.shape}"
            )
    elif kv.k.shape != kv.v.shape:
        raise ValueError(
            f"bf16 kv.k/kv.v must both be [L, P, Hkv, page, D], got {kv.k.shape}, {kv.v.shape}"
        )
    if kv.quantized:
        if kv.k.dtype != jnp.uint8 or kv.v.dtype != jnp.uint8:
            raise ValueError(f"INT4 kv.k/kv.v must be uint8, got {kv.k.dtype}, {kv.v.dtype}")
        l_, p_, h_, t_, _ = kv.k.shape
        g_count = kv.k_scale.shape[-2]
        want = (l_, p_, h_, g_count, t_)
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            a = getattr(kv, name)
            if a is None or a.shape != want:
                got = None if a is None else a.shape
                raise ValueError(
                    f"kv.{name} must have shape {want} ([L, P, Hkv, D/g, page]), got {got}"
                )
        if kv.head_dim % g_count or (kv.head_dim // g_count) % 32:
            raise ValueError(
                f"group count {g_count} must split head_dim={kv.head_dim} in groups >= 32"
            )
    else:
        if not jnp.issubdtype(kv.k.dtype, jnp.floating):
            raise ValueError(f"bf16-mode kv.k must be floating, got dtype {kv.k.dtype}")
        if any(getattr(kv, n) is not None for n in ("k_zero", "v_scale", "v_zero")):
            raise ValueError("kv scales/zeros must be all set (INT4) or all None (bf16)")
    for name, a in zip(PagedKV._fields, kv):
        if a is not None and a.size > 2**31 and a.size * a.dtype.itemsize <= 2**32:
            raise ValueError(
                f"kv.{name} has {a.size} elements ({a.dtype}): Pallas-Triton uses signed 32-bit "
                "element offsets for arrays of up to 4 GiB, which wrap past 2^31 elements; size "
                "the pool (num_pages) so a uint8 array is <= 2 GiB or > 4 GiB "
                "(KVCacheConfig.pages_for_budget does this)"
            )
    if kv.page_size < 16 or kv.page_size & (kv.page_size - 1):
        raise ValueError(f"page size {kv.page_size} must be a power of two >= 16")
    if kv.head_dim < 32 or kv.head_dim & (kv.head_dim - 1):
        raise ValueError(f"head_dim={kv.head_dim} must be a power of two >= 32")


def _check_tables(kv: PagedKV, page_table, seq_lens, layer, batch: int, q_lens=None, chunk=None):
    page_table, seq_lens = jnp.asarray(page_table), jnp.asarray(seq_lens)
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.dtype != jnp.int32:
        raise ValueError(
            f"page_table must be int32 [B={batch}, max_pages], got {page_table.dtype} {page_table.shape}"
        )
    if seq_lens.shape != (batch,) or seq_lens.dtype != jnp.int32:
        raise ValueError(
            f"seq_lens must be int32 [B={batch}], got {seq_lens.dtype} {seq_lens.shape}"
        )
    num_layers, num_pages, page = kv.k.shape[0], kv.k.shape[1], kv.page_size
    capacity = page_table.shape[1] * page
    lay = _concrete(layer)
    if lay is not None and not 0 <= int(lay) < num_layers:
        raise ValueError(f"layer={int(lay)} out of range for a cache of {num_layers} layers")
    lens = _concrete(seq_lens)
    if lens is not None:
        if lens.min(initial=0) < 0 or lens.max(initial=0) > capacity:
            raise ValueError(
                f"seq_lens={lens.tolist()} must be in [0, capacity={capacity}] "
                f"(max_pages={page_table.shape[1]} x page_size={page})"
            )
        table = _concrete(page_table)
        if table is not None:
            for b, n in enumerate(lens):
                used = table[b, : -(-int(n) // page)]
                if used.size and (used.min() < 0 or used.max() >= num_pages):
                    raise ValueError(
                        f"page_table[{b}] entries {used.tolist()} must be in [0, num_pages={num_pages})"
                    )
        ql = _concrete(q_lens)
        if ql is not None and (ql.min() < 0 or (ql > lens).any() or (ql > chunk).any()):
            raise ValueError(f"q_lens={ql.tolist()} must be in [0, min(seq_lens, T={chunk})]")


def _layer_array(layer) -> jnp.ndarray:
    return jnp.asarray(layer, jnp.int32).reshape(1)


# --------------------------------------------------------------------------- kernel

# Nibbles enter the dots as bf16(128 + n): exact, and one bit trick away from the byte
# (bf16 0x4300 is 128.0 with a mantissa step of 1, so 0x4300 | n == 128 + n). The bias is
# folded into the zero point: (128 + n) - (128 + z) == n - z.
_NIBBLE_BIAS = 128.0
# trim_tail reads V's transposed pages in whole runs of this many keys (16 bytes a row).
_TRIM_RUN = 16
# paged_decode_attention(trim_tail=None). Off: on the H100 (2026-11-28, `bench_attention.py
# --tail-study`, B = 1214, 32-layer pool) the masked loads took the length-masked loop from
# 745-768 to 1329-1337 us at ragged S in [1024, 1536] and from 638-644 to 1118-1121 us at
# S = 1025 (outputs equal bit for bit); with whole pages (no masked loop) 1-2% either way.
TRIM_TAIL_DEFAULT = False

# Per 4 bytes (x): prmt spreads the bytes into 16-bit lanes, lop3 masks the low nibble and ORs
# the bf16 exponent in: 4 instructions give 4 bf16 values (5 for the high nibbles: x >> 4 first).
# Two single-result calls because multi-result inline asm does not lower in Pallas-Triton.
_NIBBLE_ASM = """
{
.reg .b32 x, t01, t23;
{shift}
prmt.b32 t01, x, 0, 0x4140;
prmt.b32 t23, x, 0, 0x4342;
lop3.b32 $0, t01, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, t23, 0x000F000F, 0x43004300, 0xEA;
}
"""
_LO_ASM = _NIBBLE_ASM.replace("{shift}", "mov.b32 x, $2;")
_HI_ASM = _NIBBLE_ASM.replace("{shift}", "shr.u32 x, $2, 4;")


def _asm_halves(byte, asms, dtype, constraints: str):
    """``(lo, hi)``: one elementwise inline-PTX call per string of ``asms`` over ``byte``'s
    words (4 bytes a call), each giving ``dtype`` values of ``byte``'s shape (GPU only)."""
    from jax.experimental.pallas import triton as plgpu  # GPU-only

    out = [jax.ShapeDtypeStruct(byte.shape, dtype)]
    return tuple(
        plgpu.elementwise_inline_asm(
            a, args=[byte], constraints=constraints, pack=4, result_shape_dtypes=out
        )[0]
        for a in asms
    )


def _unpack_biased(byte, *, fast: bool):
    """``[..] uint8 -> (lo, hi)`` bf16 holding ``128 + (byte & 15)`` and ``128 + (byte >> 4)``."""
    if fast:
        return _asm_halves(byte, (_LO_ASM, _HI_ASM), jnp.bfloat16, "=r,=r,r")
    lo = (byte & jnp.uint8(0xF)).astype(jnp.float32) + _NIBBLE_BIAS
    hi = (byte >> jnp.uint8(4)).astype(jnp.float32) + _NIBBLE_BIAS
    return lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16)


# f16_nibbles: a nibble's bits, left where they are in a 16-bit lane, read as f16 are a
# subnormal: lane & 0x000F == lo * 2^-24 and lane & 0x00F0 == 16 * hi * 2^-24, exact, with no
# bias to remove. Both halves come from the same two prmt (ptxas merges the identical ones
# of the two calls), the high one needs no shift: 6 instructions per 4 bytes instead of 9.
# The 2^24 (2^20 for V's high half) comes back as a power-of-two scale after the dots; q's
# high half enters divided by 16.
_SUB_SCALE = 2.0**24
# paged_decode_attention(f16_nibbles=None). On: on the H200 (2026-11-28, `bench_attention.py
# --nibbles-study`) decode took 680-686 us against 731-743 (bf16 128 + n) at the engine's
# B = 1214, 32-layer pool, ragged S in [1024, 1536]; 112 vs 122-123 us at B = 64, S = 4096;
# relative error against the f32 reference 1.7e-3 against 2.4-2.6e-3.
F16_NIBBLES_DEFAULT = True
_SUB_ASM = """
{
.reg .b32 t01, t23;
prmt.b32 t01, $2, 0, 0x4140;
prmt.b32 t23, $2, 0, 0x4342;
and.b32 $0, t01, {mask};
and.b32 $1, t23, {mask};
}
"""
_SUB_LO_ASM = _SUB_ASM.replace("{mask}", "0x000F000F")
_SUB_HI_ASM = _SUB_ASM.replace("{mask}", "0x00F000F0")


def _unpack_subnormal(byte, *, fast: bool):
    """``[..] uint8 -> (lo, hi)`` f16 holding ``(byte & 15) * 2^-24`` and
    ``16 * (byte >> 4) * 2^-24`` (subnormals, exact)."""
    if fast:
        return _asm_halves(byte, (_SUB_LO_ASM, _SUB_HI_ASM), jnp.float16, "=r,=r,r")
    unit = np.float32(1.0 / _SUB_SCALE)
    lo = (byte & jnp.uint8(0xF)).astype(jnp.float32) * unit
    hi = (byte & jnp.uint8(0xF0)).astype(jnp.float32) * unit
    return lo.astype(jnp.float16), hi.astype(jnp.float16)


_I8_LO_ASM = "and.b32 $0, $1, 0x0F0F0F0F;"
_I8_HI_ASM = "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }"


def _unpack_int8(byte, *, fast: bool):
    """``[..] uint8 -> (lo, hi)`` int8 nibbles 0..15: one ``and`` per 4 bytes (two for hi)."""
    if fast:
        return _asm_halves(byte, (_I8_LO_ASM, _I8_HI_ASM), jnp.int8, "=r,r")
    return (byte & jnp.uint8(0xF)).astype(jnp.int8), (byte >> jnp.uint8(4)).astype(jnp.int8)


# qk_int8 with q_residual: q ~ s (hi + lo / _Q_RES), hi and lo int8; the residual of hi's
# rounding lies in [-0.5, 0.5], so 254 of its units fill lo's [-127, 127]. The int32 sums
# combine as 254 dot(hi, k) + dot(lo, k): |.| <= 254 * 127 * 15 * group, inside int32 for
# groups of up to 4096 channels.
_Q_RES = 254
# q_residual in the decode tile's spare rows (16 rows, the GQA group padded to <= 8): rows 8-15
# are copies or padding, read as copies of rows 0-7, so they take the residual part and one
# pair of dots gives both sums (`_spare_rows`).
Q_RESIDUAL_ROWS = True
# paged_*_attention(q_residual=None) with qk_int8: two parts (in decode tiles with spare rows
# as fast as one part: H200, 2026-11-28, docs/kernels_attention.md)
Q_RESIDUAL_DEFAULT = True


def _round_to_int8(y):
    """Round half away from zero to int8 (|y| <= 127): Pallas-Triton has no ``round``."""
    return jnp.where(y >= 0, y + 0.5, y - 0.5).astype(jnp.int32).astype(jnp.int8)


def _online_softmax_step(logits, m_prev, l_prev, valid=None, row_scale=None):
    """One key block of the online (flash) softmax, base 2: f32 ``logits [BM, K]`` scaled by
    ``sm_scale * log2(e)``, the rows' running max (same units) and denominator ``[BM]``;
    ``valid [BM, K]`` masks keys (None: all visible). ``row_scale [BM, 1]`` (> 0): the logits
    still to be multiplied by it, which happens inside the exponent's multiply-add (the max
    of a row scales with it).
    Returns ``(probs, corr, m_next, l_next)``: unnormalized block probabilities, the factor
    that rescales the earlier accumulators, and the updated max and denominator."""
    if valid is not None:
        logits = jnp.where(valid, logits, _MASK)
    block_max = jnp.max(logits, axis=1)
    if row_scale is not None:
        block_max = block_max * row_scale[:, 0]
    m_next = jnp.maximum(m_prev, block_max)
    corr = jnp.exp2(m_prev - m_next)
    if row_scale is None:
        probs = jnp.exp2(logits - m_next[:, None])
    else:
        probs = jnp.exp2(logits * row_scale - m_next[:, None])
    if valid is not None:
        probs = jnp.where(valid, probs, 0.0)
    return probs, corr, m_next, l_prev * corr + jnp.sum(probs, axis=1)


def _new_token(
    kn_ref, vn_ref, slot, pool_outs, accs, m_i, l_i, q_cols, *, layer, h, use, group, n_groups,
    log2_scale, interpret,
):  # fmt: skip
    """Decode with the step's own K/V (``paged_decode_attention(new_kv=...)``): quantizes the
    token's ``[G, 2, g/2]`` K and V blocks with :mod:`pallas_kernels.kv4_write`'s arithmetic,
    stores the bytes and f16 scale / zero at ``slot`` of ``pool_outs`` (k, v, ks, kz, vs, vz;
    V's page transposed), and attends the token as one more key from registers, dequantized
    as the reference reads it back (``(n - zero) * scale``), inside the same online softmax.
    ``use`` False (splits other than 0) or slot -1: no key, no store. Returns the updated
    ``(accs, m, l)``."""
    from pallas_kernels.kv4_write import _quantize_groups  # kv4_write imports this module

    k_out, v_out, ks_out, kz_out, vs_out, vz_out = pool_outs
    page = k_out.shape[3]
    half = group // 2
    keep = use & (slot >= 0)
    in_pool = keep & (slot < k_out.shape[1] * page)
    pg = jnp.where(in_pool, slot // page, 0)
    off = jnp.where(in_pool, slot % page, 0)
    logit, v_hats, stores = None, [], []
    for j in range(n_groups):
        deq = []
        for x_ref, p_out, s_out, z_out, transposed in (
            (kn_ref, k_out, ks_out, kz_out, False),
            (vn_ref, v_out, vs_out, vz_out, True),
        ):
            x = x_ref[j].astype(jnp.float32)[None]  # [1, 2, g/2]
            byte, scale, zero = _quantize_groups(x, interpret)  # [1, g/2], [1], [1]
            stores.append((p_out, s_out, z_out, transposed, j, byte, scale, zero))
            lo = (byte & jnp.uint8(0xF)).astype(jnp.float32).reshape(half)
            hi = (byte >> jnp.uint8(4)).astype(jnp.float32).reshape(half)
            deq.append(((lo - zero) * scale, (hi - zero) * scale))  # [g/2] each
        (k_lo, k_hi), (v_lo, v_hi) = deq
        q_lo = q_cols(j * group, half).astype(jnp.float32)
        q_hi = q_cols(j * group + half, half).astype(jnp.float32)
        term = jnp.sum(q_lo * k_lo[None, :], axis=1) + jnp.sum(q_hi * k_hi[None, :], axis=1)
        logit = term if logit is None else logit + term
        v_hats += [v_lo, v_hi]
    t = jnp.where(keep, logit * log2_scale, _MASK)
    m_next = jnp.maximum(m_i, t)
    corr = jnp.exp2(m_i - m_next)
    p = jnp.where(keep, jnp.exp2(t - m_next), 0.0)
    accs = tuple(acc * corr[:, None] + p[:, None] * v[None, :] for acc, v in zip(accs, v_hats))

    @pl.when(in_pool)
    def _():
        for p_out, s_out, z_out, transposed, j, byte, scale, zero in stores:
            cols = pl.ds(j * half, half)
            if transposed:
                p_out[layer, pg, h, cols, off] = byte.reshape(half)
            else:
                p_out[layer, pg, h, off, cols] = byte.reshape(half)
            s_out[layer, pg, h, pl.ds(j, 1), off] = scale.astype(s_out.dtype)
            z_out[layer, pg, h, pl.ds(j, 1), off] = zero.astype(z_out.dtype)

    return accs, m_next, l_i * corr + p


def _kernel(
    # inputs
    layer_ref,  # [1] int32
    page_table_ref,  # [B, max_pages] int32
    seq_lens_ref,  # [B] int32 (kv tokens, chunk included)
    q_start_ref,  # [B] int32 (position of chunk token 0)
    q_lens_ref,  # [B] int32 (valid chunk tokens)
    q_ref,  # [BM, D] (block of [B, Hkv, R, D]; row = token * hg_pad + head-in-group), or
    # with q_direct [block_q, hg, D] (block of q's own [B, T, Hkv, hg, D] view; same rows)
    k_ref,  # [L, P, Hkv, page, D/2 | D]
    v_ref,  # [L, P, Hkv, D/2, page] (INT4) | [L, P, Hkv, page, D]
    *rest,  # (k_scale, k_zero, v_scale, v_zero) if quantized, then outputs
    quantized: bool,
    group: int,
    hg: int,
    hg_pad: int,
    pages_per_block: int,
    blocks_per_split: int,
    num_splits: int,
    sm_scale: float,
    fast_unpack: bool,
    qk_int8: bool = False,
    q_residual: bool = False,
    q_res_rows: bool = False,
    causal_shift: int = 0,
    partials: bool = False,
    ring: bool = False,
    q_direct: bool = False,
    one_loop: bool = False,
    q_tiled: bool = False,
    tile_rows: int = 0,
    trim_tail: bool = False,
    new_kv: bool = False,
    f16_nibbles: bool = False,
    interpret: bool = False,
):
    if quantized:
        ks_ref, kz_ref, vs_ref, vz_ref, *outs = rest
    else:
        outs = list(rest)
    if ring:  # the recent window's rings [L, S, Hkv, W, D] and each row's slot [B]
        rk_ref, rv_ref, rs_ref, *outs = outs
    if new_kv:  # the step's own token: its K/V block [G, 2, g/2] and each row's slot [B];
        # the six pool arrays come last among the outputs (aliased to the inputs)
        kn_ref, vn_ref, slot_ref, *outs = outs
        outs, pool_outs = outs[:-6], outs[-6:]
    o_ref = outs[0]
    b, h, qt, split = (pl.program_id(i) for i in range(4))
    if q_direct:  # the rows of [block_q, hg, D] are token-major, as in the row layout
        block_q, hg_q, head_dim = q_ref.shape
        block_rows = block_q * hg_q

        def q_cols(start, size):
            return q_ref[:, :, pl.ds(start, size)].reshape(block_rows, size)

        def store_o(start, val):
            o_ref[:, :, pl.ds(start, val.shape[1])] = val.reshape(block_q, hg_q, val.shape[1])
    elif q_tiled:  # decode: q's own [hg, D] rows, each read tile_rows / hg times
        hg_q, head_dim = q_ref.shape
        block_rows = tile_rows
        rid = (jnp.arange(block_rows, dtype=jnp.int32) % hg_q)[:, None]

        def cols(start, size):
            return (start + jnp.arange(size, dtype=jnp.int32))[None, :]

        def q_cols(start, size):
            return q_ref[rid, cols(start, size)]

        def store_o(start, val):  # the copies of a row hold the same bits: any may land
            o_ref[rid, cols(start, val.shape[1])] = val
    else:  # q's rows as the block holds them
        block_rows, head_dim = q_ref.shape
        if q_res_rows:  # decode rows [hg_pad real + padding]: read rows r % 8 (copies)
            rid8 = (jnp.arange(block_rows, dtype=jnp.int32) % (block_rows // 2))[:, None]

            def q_cols(start, size):
                return q_ref[rid8, (start + jnp.arange(size, dtype=jnp.int32))[None, :]]
        else:

            def q_cols(start, size):
                return q_ref[:, pl.ds(start, size)]

        def store_o(start, val):
            o_ref[:, pl.ds(start, val.shape[1])] = val

    page = k_ref.shape[3]
    half = group // 2
    n_groups = head_dim // group

    layer = layer_ref[0]
    seq_len = seq_lens_ref[b]
    q_start = q_start_ref[b]
    q_len = q_lens_ref[b]

    row = qt * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    if q_tiled:  # every row is a real head of the one query token
        token = jnp.zeros_like(row)
        row_valid = token < q_len
    else:
        token = row // hg_pad
        row_valid = (row % hg_pad < hg) & (token < q_len)
    # [BM] the last key position each query row sees: its own position, minus
    # `causal_shift` when the newest keys are attended elsewhere (the bf16 recent window).
    row_pos = q_start + token - causal_shift

    # Last key this tile can see (causal), then the split's slice of the needed pages.
    first_token = qt * block_rows // hg_pad
    last_token = jnp.minimum(q_len, (qt + 1) * block_rows // hg_pad) - 1
    last_key = q_start + last_token + 1 - causal_shift
    kv_end = jnp.where(first_token < q_len, jnp.clip(last_key, 0, seq_len), 0)
    block_k = pages_per_block * page  # keys per loop step
    n_blocks = (kv_end + block_k - 1) // block_k
    blk_lo = split * blocks_per_split
    blk_hi = jnp.minimum(n_blocks, blk_lo + blocks_per_split)

    # q pieces: group j -> (first half, second half) of its channels, matching the nibbles.
    q_pieces, q_sums, q_scales, q_res = [], [], [], []
    cdt = jnp.bfloat16 if quantized else q_ref.dtype
    for j in range(n_groups if quantized else 0):
        lo = q_cols(j * group, half)
        hi = q_cols(j * group + half, half)
        if qk_int8:  # symmetric INT8 per row and group; the dots run int8 x nibble -> int32
            lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
            amax = jnp.maximum(jnp.max(jnp.abs(lo), axis=1), jnp.max(jnp.abs(hi), axis=1))
            sq = jnp.where(amax > 0, amax / 127.0, 1.0)
            y_lo, y_hi = lo / sq[:, None], hi / sq[:, None]
            lo, hi = _round_to_int8(y_lo), _round_to_int8(y_hi)
            if q_residual:  # the rounding's residual as a second int8 part, in 1/254 units
                r_lo, r_hi = (
                    _round_to_int8((y - x.astype(jnp.float32)) * _Q_RES)
                    for y, x in ((y_lo, lo), (y_hi, hi))
                )
                q_res.append((r_lo, r_hi))
                sq = sq * (1.0 / _Q_RES)  # the dots' sums come in the residual's units
            q_scales.append(sq[:, None])
        elif f16_nibbles:  # the high half scaled by 1/16 against the keys' 16 n
            lo = lo.astype(jnp.float16)
            hi = (hi.astype(jnp.float32) * (1.0 / 16.0)).astype(jnp.float16)
        else:
            lo, hi = lo.astype(cdt), hi.astype(cdt)
        q_pieces.append((lo, hi))
        # Sums of the rounded q the dot sees, so the zero-point term cancels exactly.
        lo_sum = jnp.sum(lo.astype(jnp.float32), axis=1)
        hi_sum = jnp.sum(hi.astype(jnp.float32), axis=1)
        if f16_nibbles and not qk_int8:  # the high half's 1/16; the dots' 2^-24 (below)
            q_sums.append((lo_sum + 16.0 * hi_sum) * (1.0 / _SUB_SCALE))
        elif q_res:  # in the residual's units, as the combined sums
            r_sum = sum(jnp.sum(x.astype(jnp.float32), axis=1) for x in q_res[j])
            q_sums.append((lo_sum + hi_sum) * _Q_RES + r_sum)
        else:
            q_sums.append(lo_sum + hi_sum)
        if q_res_rows:  # rows 8-15 (copies of 0-7) carry the residual part instead
            low_rows = (jnp.arange(block_rows, dtype=jnp.int32) < block_rows // 2)[:, None]
            q_pieces[j] = tuple(jnp.where(low_rows, x, r) for x, r in zip((lo, hi), q_res[j]))
    # bf16 pages have no groups to split: one dot over all D channels for the logits, one
    # accumulator [BM, D] for P V (wider MMAs than two half-width ones).
    acc_width = half if quantized else head_dim
    q_whole = None if quantized else q_cols(0, head_dim).astype(cdt)

    def load(ref, pg, *trail):
        """ref[layer, pages, h, *trail] with the block's pages merged into one token axis."""
        x = ref[(layer, pg, h, *trail)]
        return x.reshape(block_k, *x.shape[2:]) if pages_per_block > 1 else x

    def k_bytes(pg, j, lim):
        """[block_k, g/2] uint8: group j's K bytes; with ``lim`` (trim_tail, one page a
        step) the rows of keys >= lim are not read (zeros)."""
        if lim is None:
            return load(k_ref, pg, slice(None), pl.ds(j * half, half))
        from jax.experimental.pallas import triton as plgpu  # masked load (also interprets)

        keep = jnp.arange(page, dtype=jnp.int32)[:, None] < lim
        return plgpu.load(
            k_ref.at[layer, pg, h, :, pl.ds(j * half, half)],
            mask=jnp.broadcast_to(keep, (page, half)),
            other=0,
        )

    def halves(pg, j, lim):
        """The [block_k, g/2] K nibble halves of group j as bf16 128 + nibble (exact), or
        with f16_nibbles as the f16 subnormals nibble * 2^-24 and 16 * nibble * 2^-24."""
        unpack = _unpack_subnormal if f16_nibbles else _unpack_biased
        return unpack(k_bytes(pg, j, lim), fast=fast_unpack)

    def v_halves(pg, j, lim):
        """The same for V, read from its transposed pages ([g/2, page] bytes per page). With
        ``lim``, whole 16-key runs past it are not read: the token axis is the contiguous
        one, and a mask that changes every key would cut the copies to single bytes."""
        idx = (layer, pg, h, pl.ds(j * half, half), slice(None))
        if lim is None:
            byte = v_ref[idx]
        else:
            from jax.experimental.pallas import triton as plgpu

            run = jnp.arange(page, dtype=jnp.int32) // _TRIM_RUN * _TRIM_RUN
            keep = jnp.broadcast_to((run < lim)[None, :], (half, page))
            byte = plgpu.load(v_ref.at[idx], mask=keep, other=0)
        unpack = _unpack_subnormal if f16_nibbles else _unpack_biased
        lo, hi = unpack(byte, fast=fast_unpack)  # [(ppb,) g/2, page]
        lo, hi = jnp.swapaxes(lo, -1, -2), jnp.swapaxes(hi, -1, -2)
        if pages_per_block > 1:
            lo, hi = lo.reshape(block_k, half), hi.reshape(block_k, half)
        return lo, hi

    def pages_of(blk):
        if pages_per_block == 1:
            return page_table_ref[b, blk]
        # a gather of whole pages: [pages_per_block] physical page ids
        return page_table_ref[b, pl.ds(blk * pages_per_block, pages_per_block)]

    def v_zeros(pg):
        """V zero points of the block's pages, per group: [block_k] f16 each."""
        return tuple(load(vz_ref, pg, j, slice(None)) for j in range(n_groups))

    log2_scale = sm_scale * _LOG2E  # softmax in base 2: exp2(logit * scale * log2(e))
    # P V's operands: bf16 128 + nibble (the bias leaves with the zero point), or the f16
    # subnormals of f16_nibbles (no bias)
    v_dtype, v_bias = (jnp.float16, 0.0) if f16_nibbles else (jnp.bfloat16, _NIBBLE_BIAS)

    def body(blk, carry, masked=True):
        accs, m_prev, l_prev, *rest = carry
        if quantized:  # the V zero-point terms [BM] per group, then the V zero points
            zaccs, *vz_now = rest
        pg = pages_of(blk)
        # masked == "keys" (one query token per tile, decode): keys >= kv_end get _MASK added
        # to their logits (a per-key [1, block_k] vector folded into the scaling's add, no
        # select over the [BM, block_k] tile). Each block of the loop holds a visible key,
        # so the max is finite and the masked keys' exp2 is 0. Needs finite bytes past the
        # length (init_cache zeros or earlier writes), as the dots read them anyway.
        neg = lim = None
        if masked == "keys":
            lim = kv_end - blk * block_k
            neg = jnp.where(jnp.arange(block_k, dtype=jnp.int32) < lim, 0.0, _MASK)[None, :]
        trim = lim if trim_tail and quantized else None

        def scaled(x):
            return x * log2_scale if neg is None else x * log2_scale + neg

        if quantized:
            # The V zero points feed no dot, so Triton's pipeliner leaves their load
            # synchronous: fetch the next block's here, one step ahead (clamped to this
            # split's last block, which the loop bounds make a used page).
            vz_next = v_zeros(pages_of(jnp.minimum(blk + 1, blk_hi - 1)))
            logits = None
        else:
            k_all = load(k_ref, pg, slice(None), slice(None)).astype(cdt)  # [block_k, D]
            logits = scaled(jnp.dot(q_whole, k_all.T, preferred_element_type=jnp.float32))
        for j in range(n_groups if quantized else 0):  # INT4: per group, nibble halves
            if qk_int8:  # nibbles as int8 0..15: a mask and a shift, no float conversion
                byte = k_bytes(pg, j, trim)
                k_lo, k_hi = _unpack_int8(byte, fast=fast_unpack)
                acc_t, bias = jnp.int32, 0.0
            elif f16_nibbles:  # f16 subnormals n 2^-24, 16 n 2^-24: no bias
                k_lo, k_hi = halves(pg, j, trim)
                acc_t, bias = jnp.float32, 0.0
            else:  # INT4 as 128 + nibble in bf16 (bias folded into the zero point)
                k_lo, k_hi = halves(pg, j, trim)
                acc_t, bias = jnp.float32, _NIBBLE_BIAS
            raw = jnp.dot(q_pieces[j][0], k_lo.T, preferred_element_type=acc_t)
            raw += jnp.dot(q_pieces[j][1], k_hi.T, preferred_element_type=acc_t)
            if q_res_rows:  # row r + 8 holds row r's residual sums: combine, copy back
                top, bottom = jnp.split(raw, 2, axis=0)
                comb = top * jnp.int32(_Q_RES) + bottom
                raw = jnp.broadcast_to(comb[None], (2, *comb.shape)).reshape(raw.shape)
            elif q_res:  # the residual part's dots on the same nibbles, exact in int32
                raw = raw * jnp.int32(_Q_RES)
                raw += jnp.dot(q_res[j][0], k_lo.T, preferred_element_type=jnp.int32)
                raw += jnp.dot(q_res[j][1], k_hi.T, preferred_element_type=jnp.int32)
            raw = raw.astype(jnp.float32)
            s = load(ks_ref, pg, j, slice(None)).astype(jnp.float32)[None, :]
            z = load(kz_ref, pg, j, slice(None)).astype(jnp.float32)[None, :] + bias
            # s * (raw - z * q_sum) * log2_scale as raw * a + off: a, c are per key and off
            # needs no dot, so one multiply-add follows the dots on the loop's critical path
            # (the length mask rides in off). int8 q: times its per-row scale after.
            # f16 subnormals: the dots' 2^-24 comes back in a (in the constant) and leaves
            # q_sum (there, once a program): s * (2^24 raw - z * q_sum) = a (raw - z q_sum')
            sub = f16_nibbles and not qk_int8
            a = s * (log2_scale * _SUB_SCALE if sub else log2_scale)
            c = a * z
            qs = q_sums[j][:, None]
            off = neg - qs * c if (j == 0 and neg is not None) else -(qs * c)
            term = raw * a + off
            if qk_int8 and n_groups > 1:  # one group: q's row scale waits for the exponent
                term = term * q_scales[j]
            logits = term if logits is None else logits + term
        valid = None
        if masked and masked != "keys":
            key_pos = blk * block_k + jnp.arange(block_k, dtype=jnp.int32)
            valid = (key_pos[None, :] <= row_pos[:, None]) & (key_pos[None, :] < seq_len)
        row_scale = q_scales[0] if qk_int8 and n_groups == 1 else None
        probs, corr, m_next, l_next = _online_softmax_step(logits, m_prev, l_prev, valid, row_scale)
        new_accs = []
        if not quantized:
            v_all = load(v_ref, pg, slice(None), slice(None))  # [block_k, D]
            pv = jnp.dot(probs.astype(v_all.dtype), v_all, preferred_element_type=jnp.float32)
            return (accs[0] * corr[:, None] + pv,), m_next, l_next
        new_zaccs = []
        for j in range(n_groups):
            s = load(vs_ref, pg, j, slice(None)).astype(jnp.float32)[None, :]
            z = vz_now[j].astype(jnp.float32)[None, :] + v_bias
            ps_f32 = probs * s
            ps = ps_f32.astype(v_dtype)
            v_lo, v_hi = v_halves(pg, j, trim)
            # bf16 128 + n: the same rounded ps in the dot and in the correction, so the
            # bias cancels exactly. f16 subnormals have no bias: the correction takes the
            # unrounded products (no conversion back). Either way the correction, the same
            # for every column, is kept per row beside the accumulators and subtracted once
            # after the loop (one multiply-add a column).
            zc_ps = ps_f32 if f16_nibbles else ps.astype(jnp.float32)
            zc = jnp.sum(zc_ps * z, axis=1)
            new_zaccs.append(zaccs[j] * corr + zc)
            for acc, v_half in zip(accs[2 * j : 2 * j + 2], (v_lo, v_hi)):
                pv = jnp.dot(ps, v_half, preferred_element_type=jnp.float32)
                new_accs.append(acc * corr[:, None] + pv)
        return tuple(new_accs), m_next, l_next, tuple(new_zaccs), *vz_next

    n_accs = 2 * n_groups if quantized else 1
    accs0 = tuple(jnp.zeros((block_rows, acc_width), jnp.float32) for _ in range(n_accs))
    m0 = jnp.full((block_rows,), _MASK, jnp.float32)
    l0 = jnp.zeros((block_rows,), jnp.float32)
    # Blocks whose keys every row of the tile sees (before the tile's first query position
    # and inside the sequence) skip the causal/length mask; the rest (the diagonal band, the
    # last partial block) keep it. Padded rows are zeroed below through row_valid.
    n_full = jnp.clip(q_start + first_token + 1 - causal_shift, 0, seq_len) // block_k
    full_hi = jnp.clip(n_full, blk_lo, blk_hi)
    carry = (accs0, m0, l0)
    if quantized:  # the V zero-point terms; the first block's V zero points (page 0 when
        # the split has no blocks)
        first = jnp.where(blk_lo < blk_hi, blk_lo, 0)
        carry += (tuple(jnp.zeros_like(l0) for _ in range(n_groups)), *v_zeros(pages_of(first)))
    if one_loop:
        # Decode: each program runs ONE pipelined loop over all its blocks, masked by length
        # when its last block is partial, unmasked otherwise (the other loop has no trips).
        # Split in two (unmasked full blocks, then the masked partial one) each program
        # drained Triton's pipeline before a last, unpipelined block: B = 256 decode at ragged
        # S in [1024, 1536] took 226-230 us against 178-182 at S = 1280; masking every block
        # instead costs 2-9% where blocks are whole (H100, `bench_attention.py
        # --engine-shape / --loop-study`, 2026-11-26).
        tail = (kv_end % block_k != 0) & (blk_hi == n_blocks)
        split_at = jnp.where(tail, blk_lo, blk_hi)
        carry = jax.lax.fori_loop(blk_lo, split_at, functools.partial(body, masked=False), carry)
        accs, m_i, l_i, *rest = jax.lax.fori_loop(
            split_at, blk_hi, functools.partial(body, masked="keys"), carry
        )
    else:
        carry = jax.lax.fori_loop(blk_lo, full_hi, functools.partial(body, masked=False), carry)
        accs, m_i, l_i, *rest = jax.lax.fori_loop(full_hi, blk_hi, body, carry)
    if quantized:  # each group's V zero-point term, from both of its accumulators (f16
        # subnormal nibbles: after the dots' 2^-24, and 16x for the high halves)
        accs = tuple(
            (acc * (_SUB_SCALE / (16.0 if c % 2 else 1.0)) if f16_nibbles else acc)
            - rest[0][c // 2][:, None]
            for c, acc in enumerate(accs)
        )
    if new_kv:  # the step's own token (position seq_len - 1), quantized here, in split 0
        accs, m_i, l_i = _new_token(
            kn_ref, vn_ref, slot_ref[b], pool_outs, accs, m_i, l_i, q_cols,
            layer=layer, h=h, use=split == 0, group=group, n_groups=n_groups,
            log2_scale=log2_scale, interpret=interpret,
        )  # fmt: skip
    if ring:  # one more key block: the slot's ring, positions (p - W, p], in split 0 only
        slot = rs_ref[b]
        window = rk_ref.shape[3]
        qpos = q_start + token  # [BM] the query rows' own positions
        r = jnp.arange(window, dtype=jnp.int32)
        # Ring row r holds the newest position <= p congruent to r mod W (W a power of two;
        # p >= -1, so p - r + W >= 0).
        rpos = qpos[:, None] - ((qpos[:, None] - r[None, :] + window) & (window - 1))
        ok = (rpos >= 0) & row_valid[:, None] & (slot >= 0) & (split == 0)
        slot = jnp.maximum(slot, 0)
        rk = rk_ref[layer, slot, h, :, :]  # [W, D]
        qf = q_cols(0, head_dim).astype(rk.dtype)
        logits = jnp.dot(qf, rk.T, preferred_element_type=jnp.float32) * log2_scale
        probs, corr, m_i, l_i = _online_softmax_step(logits, m_i, l_i, ok)
        ps = probs.astype(rk.dtype)
        accs = tuple(
            acc * corr[:, None]
            + jnp.dot(ps, rv_ref[layer, slot, h, :, pl.ds(c * acc_width, acc_width)],
                      preferred_element_type=jnp.float32)
            for c, acc in enumerate(accs)
        )  # fmt: skip
    l_i = jnp.where(row_valid, l_i, 0.0)

    if not partials:
        inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)[:, None]
        for c, acc in enumerate(accs):
            store_o(c * acc_width, (acc * inv).astype(o_ref.dtype))
    else:
        m_ref, l_ref = outs[1], outs[2]
        for c, acc in enumerate(accs):
            o_ref[:, pl.ds(c * acc_width, acc_width)] = acc
        m_ref[...] = m_i * _LN2  # natural-log units for the merge and the lse
        l_ref[...] = l_i


def _attend(
    q_rows,  # [B, Hkv, R, D], R = T * hg_pad
    kv: PagedKV,
    layer,
    page_table,
    seq_lens,
    q_start,
    q_lens,
    *,
    hg: int,
    hg_pad: int,
    block_rows: int,
    block_k: int,
    num_splits: int,
    sm_scale: float,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    unpack: str,
    qk_int8: bool = False,
    q_residual: bool = False,
    causal_shift: int = 0,
    return_lse: bool = False,
    ring=None,
    q_direct: bool = False,
    one_loop: bool = False,
    q_tiled: bool = False,
    trim_tail: bool = False,
    new_kv=None,
    f16_nibbles: bool = False,
):
    """Launches the kernel over grid (B, Hkv, R / block_rows, num_splits); merges splits.
    ``ring``: None or ``(ring_k, ring_v, ring_slots)``, attended as one more key block.
    ``new_kv``: None or ``(k_new, v_new, slots)`` (decode, INT4 pages): each row's own token,
    ``[B, Hkv, D]`` K / V and ``[B]`` slots; the kernel stores it and attends it as one
    more key (``_new_token``); the pages are attended with ``causal_shift`` 1 (below the
    token). Then the result is ``(out, PagedKV)``: the pool arrays updated in place
    (aliased; donate them under jit).

    Returns ``o [B, Hkv, R, D]`` (q's dtype), or with ``return_lse`` ``(o, lse [B, Hkv, R]
    f32)``, lse = log of the softmax denominator (-inf for rows that see no key).

    ``q_direct``: ``q_rows`` is q's own ``[B, T, Hkv, hg, D]`` view (``hg == hg_pad``, ``T`` a
    multiple of ``block_rows / hg``, one split, no lse): the kernel reads its tiles and writes
    ``o [B, T, Hkv, hg, D]`` in place of the row layout, so no transposed copies of q and the
    output are made (at B = 8, T = 1024 each copy moves 67 MB).

    ``one_loop``: every tile holds one query token (decode): each program runs one loop
    over its key blocks (masked by length if the last one is partial) instead of unmasked
    full blocks followed by the masked rest.

    ``q_tiled`` (decode, one split, no lse): ``q_rows`` is q's own ``[B, Hkv, hg, D]`` view
    (a free reshape of ``[B, Hq, D]``) and the output comes back in it. The kernel fills its
    ``block_rows``-row tile with ``block_rows / hg`` copies of the group's rows (a gather
    load) and stores all of them onto the ``hg`` output rows (the copies compute the same
    bits), instead of XLA padding q to ``block_rows`` rows per KV head and slicing the output
    back: at B = 1214 those two passes took 1.0 ms of a 51.8 ms LLaMA-3-8B decode step
    (docs/benchmarks.md, run 48).

    ``trim_tail`` (INT4 pages, ``one_loop``, one page a step): the length-masked loop reads
    only the K rows of keys below the length and V's in 16-key runs (masked loads, zeros
    past them) instead of whole pages."""
    if q_tiled:
        batch, hkv, hg_q, head_dim = q_rows.shape
        rows = block_rows
        if num_splits != 1 or return_lse or block_rows % hg_q or hg_q != hg:
            raise ValueError(
                "q_tiled needs one split, no lse and a GQA group dividing the tile, got "
                f"num_splits={num_splits}, return_lse={return_lse}, hg={hg_q}, rows={block_rows}"
            )
    elif q_direct:
        batch, t, hkv, hg_q, head_dim = q_rows.shape
        rows = t * hg_q
        if hg_q != hg_pad or rows % block_rows or num_splits != 1 or return_lse or ring:
            raise ValueError("q_direct needs hg == hg_pad, whole tiles, one split, no lse/ring")
    else:
        batch, hkv, rows, head_dim = q_rows.shape
    if one_loop and (q_direct or rows != block_rows):
        raise ValueError(f"one_loop needs one tile of rows (decode), got {rows} rows")
    max_pages = page_table.shape[1]
    if block_k % kv.page_size or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power-of-two multiple of the page size")
    pages_per_block = block_k // kv.page_size
    if trim_tail and not _trim_applies(kv, one_loop, block_k):
        raise ValueError(
            "trim_tail needs an INT4 cache, one_loop, one page a step (block_k == page) and "
            f"pages of a multiple of {_TRIM_RUN} tokens, got quantized={kv.quantized}, "
            f"one_loop={one_loop}, block_k={block_k}, page={kv.page_size}"
        )
    max_blocks = -(-max_pages // pages_per_block)
    # Pad the table to whole blocks; padded entries point at page 0 and are masked by length.
    page_table = jnp.pad(page_table, ((0, 0), (0, max_blocks * pages_per_block - max_pages)))
    num_splits = min(num_splits, max_blocks)
    q_tiles = rows // block_rows
    kernel = functools.partial(
        _kernel,
        quantized=kv.quantized,
        group=kv.group_size,
        hg=hg,
        hg_pad=hg_pad,
        pages_per_block=pages_per_block,
        blocks_per_split=-(-max_blocks // num_splits),
        num_splits=num_splits,
        sm_scale=sm_scale,
        fast_unpack=_fast_unpack(unpack, interpret),
        qk_int8=qk_int8,
        q_residual=qk_int8 and q_residual,
        q_res_rows=bool(
            Q_RESIDUAL_ROWS
            and qk_int8
            and q_residual
            and _spare_rows(block_rows, hg_pad, rows)
            and (q_tiled or (one_loop and not q_direct))
        ),
        causal_shift=causal_shift,
        partials=num_splits > 1 or return_lse,
        ring=ring is not None,
        q_direct=q_direct,
        one_loop=one_loop,
        q_tiled=q_tiled,
        tile_rows=block_rows if q_tiled else 0,
        trim_tail=trim_tail,
        new_kv=new_kv is not None,
        f16_nibbles=f16_nibbles,
        interpret=interpret,
    )
    whole = pl.no_block_spec  # the kernel gets the whole array and indexes it itself
    if q_direct:
        block_q = block_rows // hg_pad
        q_spec = pl.BlockSpec(
            (None, block_q, None, hg_pad, head_dim), lambda b, h, t, s: (b, t, h, 0, 0)
        )
    elif q_tiled:
        q_spec = pl.BlockSpec((None, None, hg_q, head_dim), lambda b, h, t, s: (b, h, 0, 0))
    else:
        q_spec = pl.BlockSpec((None, None, block_rows, head_dim), lambda b, h, t, s: (b, h, t, 0))
    in_specs = [whole] * 5 + [q_spec]
    inputs = [_layer_array(layer), page_table, seq_lens, q_start, q_lens, q_rows, kv.k, kv.v]
    in_specs += [whole, whole]
    if kv.quantized:
        inputs += [kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero]
        in_specs += [whole] * 4
    if ring is not None:
        inputs += list(ring)
        in_specs += [whole] * 3
    if new_kv is not None:
        k_new, v_new, slots = new_kv
        g_count = kv.k_scale.shape[-2]
        split = (batch, hkv, g_count, 2, kv.group_size // 2)  # a head's groups, nibble halves
        new_spec = pl.BlockSpec((None, None, *split[2:]), lambda b, h, t, s: (b, h, 0, 0, 0))
        inputs += [k_new.reshape(split), v_new.reshape(split), slots]
        in_specs += [new_spec, new_spec, whole]
    o_spec = pl.BlockSpec(
        (None, None, None, block_rows, head_dim), lambda b, h, t, s: (b, h, s, t, 0)
    )
    ml_spec = pl.BlockSpec((None, None, None, block_rows), lambda b, h, t, s: (b, h, s, t))
    if q_direct or q_tiled:
        out_shape = [jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype)]
        out_specs = [q_spec]
    elif num_splits == 1 and not return_lse:
        out_shape = [jax.ShapeDtypeStruct((batch, hkv, 1, rows, head_dim), q_rows.dtype)]
        out_specs = [o_spec]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, hkv, num_splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, hkv, num_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, hkv, num_splits, rows), jnp.float32),
        ]
        out_specs = [o_spec, ml_spec, ml_spec]
    aliases = {}
    n_out = len(out_shape)
    if new_kv is not None:  # inputs 6..11: k, v, k_scale, k_zero, v_scale, v_zero
        pools = inputs[6:12]
        out_shape += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in pools]
        out_specs += [whole] * 6
        aliases = {6 + i: n_out + i for i in range(6)}
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu  # GPU-only import

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, hkv, q_tiles, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params,
        interpret=interpret,
        name="kv4_paged_attention" if kv.quantized else "bf16_paged_attention",
    )(*inputs)
    if new_kv is not None:
        outs, pools = outs[:n_out], PagedKV(*outs[n_out:])
        return _attend_result(outs, q_rows, q_direct, q_tiled, num_splits, return_lse), pools
    return _attend_result(outs, q_rows, q_direct, q_tiled, num_splits, return_lse)


def _attend_result(outs, q_rows, q_direct, q_tiled, num_splits, return_lse):
    """The kernel's outputs -> o (merging flash-decoding splits), or (o, lse)."""
    if q_direct or q_tiled:
        return outs[0]
    if num_splits == 1 and not return_lse:
        return outs[0][:, :, 0]
    o, m, l_ = outs
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.where(l_ > 0, jnp.exp(m - m_max), 0.0)  # [B, Hkv, S, R]
    l_sum = jnp.sum(w * l_, axis=2)
    o_sum = jnp.sum(w[..., None] * o, axis=2)
    inv = jnp.where(l_sum > 0, 1.0 / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)
    out = (o_sum * inv[..., None]).astype(q_rows.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l_sum > 0, m_max[:, :, 0] + jnp.log(jnp.where(l_sum > 0, l_sum, 1.0)), -jnp.inf)
    return out, lse


def _q_residual(q_residual) -> bool:
    """``q_residual`` checked, None resolved to :data:`Q_RESIDUAL_DEFAULT`."""
    return _check_bool("q_residual", Q_RESIDUAL_DEFAULT if q_residual is None else q_residual)


def _spare_rows(block_rows: int, hg_pad: int, rows: int) -> bool:
    """A decode tile of 16 rows whose GQA group fits 8 of them (one query token): rows 8-15
    are copies or padding, free to carry q's residual part (``Q_RESIDUAL_ROWS``)."""
    return block_rows == 16 and hg_pad <= 8 and rows == block_rows


def _trim_applies(kv: PagedKV, one_loop: bool, block_k: int) -> bool:
    """Whether ``trim_tail`` can run: INT4 pages, the one-loop decode, one page a loop step,
    pages of whole ``_TRIM_RUN``-key runs."""
    return kv.quantized and one_loop and block_k == kv.page_size and kv.page_size % _TRIM_RUN == 0


def _fast_unpack(unpack: str, interpret: bool) -> bool:
    if unpack not in ("auto", "asm", "convert"):
        raise ValueError(f"unpack={unpack!r} must be 'auto', 'asm' or 'convert'")
    if unpack == "asm" and interpret:
        raise ValueError("unpack='asm' (inline PTX) cannot run with interpret=True")
    return unpack == "asm" or (unpack == "auto" and not interpret)


def _check_qk_int8(qk_int8: bool, kv: PagedKV) -> bool:
    if qk_int8 and not kv.quantized:
        raise ValueError("qk_int8=True needs an INT4 cache (bf16 pages have no nibbles)")
    if qk_int8 and kv.group_size < 64:
        # Each dot contracts half a group; int8 tensor-core MMAs take K in steps of 32.
        raise ValueError(f"qk_int8=True needs groups of >= 64 channels, got {kv.group_size}")
    return bool(qk_int8)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be a bool")
    return bool(value)


def _check_f16_nibbles(f16_nibbles: bool, kv: PagedKV) -> bool:
    if f16_nibbles and not kv.quantized:
        raise ValueError("f16_nibbles needs an INT4 cache (this one is bf16)")
    return bool(f16_nibbles)


def _check_q(q, kv: PagedKV, ndim: int, what: str):
    q = jnp.asarray(q)
    if q.ndim != ndim or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be a floating {what} array, got {q.dtype} {q.shape}")
    hq, d = q.shape[-2], q.shape[-1]
    hkv = kv.k.shape[2]
    if d != kv.head_dim:
        raise ValueError(f"q head_dim={d} does not match the cache head_dim={kv.head_dim}")
    if hq % hkv:
        raise ValueError(f"q heads Hq={hq} must be a multiple of the cache's Hkv={hkv}")
    return q, hq // hkv


def default_decode_block_k(page: int) -> int:
    """Keys per decode loop step: one page from 64 tokens up, else 256 (gathered pages).

    H100, B=64, S=4096, INT4 g=128 (2026-11-26): page 16: 478 us one page per step vs 263 us
    with 256 keys per step; page 32: 287 vs 264; page 64: 217 vs 272; page 128: 191 vs 234.
    """
    return page if page >= 64 else 256


def default_decode_warps(
    batch: int, hkv: int, max_blocks: int, block_k: int, quantized: bool = True
) -> int:
    """Warps per decode program: 2 for an INT4 cache when the grid is large and steps are 128+
    keys, else 4 (bf16 pages: 4, the setting they were measured with).

    H100, INT4 g=128, page 128 (2026-11-26, `bench_attention.py --warps-study`), us for
    1 / 2 / 4 warps: B=64 S=4096 259 / 165 / 174; B=64 S=16384 993 / 602 / 643; B=256
    S=1024 211 / 177 / 186; B=256 S=16384 2541 / 2338 / 2497; but B=64 S=1024 78 / 65 / 56,
    B=16 S=4096 96 / 108 / 70, B=16 S=16384 335 / 201 / 196, and page 64 (B=64 S=4096)
    221 / 248 / 206: there 4 warps win.
    """
    many = batch * hkv >= 512 and batch * hkv * max_blocks >= 16384
    return 2 if quantized and many and block_k >= 128 else 4


def default_stages(decode: bool, int4_pages: bool) -> int:
    """Triton pipeline stages: 5 where measured better, else 2.

    With Pallas-Triton's indirect page loads (page table -> page), Triton 3.6 gives the K/V
    tiles one shared-memory buffer at 2-4 stages: the next page's copy is issued at the end of
    a loop step and waited for at the start of the next, so its latency is not hidden behind
    the step's work. From 5 stages the tiles get two buffers and the wait allows the next
    step's copies in flight (SASS: ``DEPBAR.LE SB0, 0x6`` instead of ``0x0``). H100
    (2026-11-26, `bench_attention_2026-11-26_stages.json`), us for 2 / 4 / 5 stages: INT4
    decode B=64 S=4096 137.7 / 137.4 / 127.3, B=16 S=16384 178.2 / 173.6 / 160.7, B=64
    S=16384 498.3 / 496.2 / 450.9, B=256 S=1280 181.3 / 181.2 / 177.9; prefill on dequantized
    (bf16) pages, 2 / 3 / 5: B=8 T=1024 323.2 / 322.1 / 303.1, B=1 T=8192 1505.8 / 1463.6 /
    1371.3. bf16-page decode (its tiles are 4x larger) and prefill unpacking INT4 in the
    kernel were not measured at 5: they keep 2.
    """
    if decode:
        return 5 if int4_pages else 2
    return 2 if int4_pages else 5


def default_prefill_warps(block_rows: int) -> int:
    """Warps per prefill program: 8 for tiles of 128+ rows, else 4.

    H100, INT4 page 128, 128-row tiles (2026-11-26), 4 vs 8 warps: B=1 T=2048 380 vs 251 us,
    B=8 T=1024 1078 vs 550, 4 x 512 after 4096 cached 1007 vs 775 (dequantized pages: 332 vs
    184, 770 vs 458, 1075 vs 615).
    """
    return 8 if block_rows >= 128 else 4


def _default_splits(batch: int, hkv: int, max_blocks: int) -> int:
    """Enough programs to fill ~2 waves of an H100 (132 SMs), at least 2 key blocks per split."""
    want = -(-264 // (batch * hkv))
    return int(max(1, min(want, max_blocks // 2)))


def _to_rows(q, hg: int, hg_pad: int, block_rows: int):
    """[B, T, Hq, D] -> [B, Hkv, R, D] with R = T * hg_pad padded to a multiple of block_rows."""
    batch, t, hq, d = q.shape
    hkv = hq // hg
    x = q.reshape(batch, t, hkv, hg, d)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, hg_pad - hg), (0, 0)))
    x = x.transpose(0, 2, 1, 3, 4).reshape(batch, hkv, t * hg_pad, d)
    rows = -(-(t * hg_pad) // block_rows) * block_rows
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - t * hg_pad), (0, 0)))


def _from_rows(o, t: int, hg: int, hg_pad: int):
    batch, hkv, _, d = o.shape
    o = o[:, :, : t * hg_pad].reshape(batch, hkv, t, hg_pad, d)[:, :, :, :hg]
    return o.transpose(0, 2, 1, 3, 4).reshape(batch, t, hkv * hg, d)


def _lse_from_rows(lse, t: int, hg: int, hg_pad: int):
    """[B, Hkv, R] -> [B, T, Hq]."""
    return _from_rows(lse[..., None], t, hg, hg_pad)[..., 0]


def _check_shift(causal_shift) -> int:
    if not isinstance(causal_shift, int) or causal_shift < 0:
        raise ValueError(f"causal_shift={causal_shift!r} must be an int >= 0")
    return causal_shift


def _check_new_kv(new_kv, kv: PagedKV, batch: int, ring, return_lse, causal_shift):
    """Validated ``(k_new, v_new, slots)`` of ``paged_decode_attention(new_kv=...)``: the
    write kernel's checks (``kv4_write._check_write``), one token per row."""
    from pallas_kernels.kv4_write import _check_write  # kv4_write imports this module

    try:
        k_new, v_new, slots = new_kv
    except (TypeError, ValueError):
        raise ValueError("new_kv must be a tuple (k_new, v_new, slots)") from None
    if ring is not None or return_lse or causal_shift:
        raise ValueError(
            "new_kv attends the newest token itself: no ring, return_lse or causal_shift "
            f"(got ring={ring is not None}, return_lse={return_lse}, causal_shift={causal_shift})"
        )
    k_new, v_new, slots = jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots)
    _check_write(kv, k_new, v_new, slots)
    if slots.shape != (batch,):
        raise ValueError(f"new_kv slots must be [B={batch}] (one token per row), got {slots.shape}")
    return k_new, v_new, slots


def paged_decode_attention(
    q,
    kv: PagedKV,
    page_table,
    seq_lens,
    *,
    layer=0,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    unpack: str = "auto",
    qk_int8: bool = False,
    q_residual: bool | None = None,
    causal_shift: int = 0,
    return_lse: bool = False,
    ring=None,
    ring_slots=None,
    ring_in_kernel: bool = True,
    one_loop: bool | None = None,
    q_tiled: bool | None = None,
    trim_tail: bool | None = None,
    new_kv=None,
    f16_nibbles: bool | None = None,
):
    """One new token per sequence attends to its cached tokens (its own K/V already written,
    or, with ``new_kv``, written by this call).

    Args:
      q: ``[B, Hq, D]`` float; the INT4 path feeds it to the dots as bf16 (bf16 pages: q's
        dtype).
      kv: :class:`PagedKV` arrays of the whole cache (all layers).
      page_table: ``[B, max_pages] int32``; entries past ``ceil(seq_len/page)`` are ignored.
      seq_lens: ``[B] int32`` tokens in the cache per sequence; 0 gives a zero output row.
      layer: int or traced int32 scalar, the layer to read.
      num_splits: flash-decoding splits of the page range (default: fill ~2 waves of 132 SMs).
      num_warps: default :func:`default_decode_warps` (2 or 4, measured on the H100).
      num_stages: Triton pipeline stages, default :func:`default_stages` (INT4 pages: 5).
      block_k: keys per loop step, a power-of-two multiple of the page size; more than one
        page gathers ``block_k / page`` pages per step through the page table so the dots stay
        large with small pages. Default :func:`default_decode_block_k`.
      unpack: INT4 nibble -> bf16 path: "asm" (inline PTX prmt/lop3, GPU), "convert" (integer
        to float conversions), "auto" (asm unless interpret).
      qk_int8: compute the logits on int8 tensor cores: q rounded to INT8 per row and group
        (symmetric), K nibbles used as int8 0..15 (a mask and a shift, no float conversion),
        exact int32 sums, scales and zero points applied per key. V is unchanged. INT4
        caches with groups of >= 64 channels only.
      q_residual: (with ``qk_int8``) q enters as two INT8 parts, ``q ~ s (hi + lo / 254)``,
        lo the rounding residual of hi; the int32 sums combine exactly as
        ``254 hi.k + lo.k``. In a decode tile of 16 rows whose GQA group fits 8 (rows 8-15
        are copies or padding) the residual part takes rows 8-15 and the same dots give
        both sums (``Q_RESIDUAL_ROWS``); elsewhere (prefill, larger groups) a second pair
        of dots does. Error against the reference as the f16 format's (1.7e-3, also with
        4 of 128 channels 20x the rest, where one part has 3.7e-2: H200, 2026-11-28,
        docs/kernels_attention.md). None (default): :data:`Q_RESIDUAL_DEFAULT` (on);
        False: one part.
      causal_shift: attend only to keys at positions <= the query's own minus this (the
        newest ones are attended elsewhere: the bf16 recent window, `comet_jax.engine`).
      return_lse: also return the log-sum-exp of the scaled logits per row, ``[B, Hq]`` f32
        (-inf where no key is visible), for merging with attention over other keys.
      ring: the bf16 recent window, ``(ring_k, ring_v)`` each ``[L, S, Hkv, W, D]`` float,
        with ``ring_slots [B] int32`` (-1: a padded row, no ring). Row b's query at position
        ``p = seq_len - 1`` attends the INT4 pages up to ``p - W`` and, unquantized, ring
        ``ring_slots[b]``, whose row ``r`` holds the newest position ``<= p`` congruent to
        ``r`` mod W (the step's own token already written; rows of negative positions are
        masked). ``causal_shift`` is then W.
      ring_in_kernel: attend the ring inside the kernel as one more key block (W a power of
        two >= 16); else, or for other W, the kernel returns its log-sum-exp and XLA attends
        the ring (:func:`ring_attention_reference`) and merges the two.
      one_loop: each program runs one pipelined loop over its key blocks, masked by length
        only when its last block is partial; False splits it into unmasked full blocks and
        the masked last block (the prefill kernel's structure: ~17% slower for INT4 pages at
        the engine's ragged lengths, see `_kernel`). None (default): True for INT4 pages,
        where it was measured; bf16 pages keep the split they were measured with.
      q_tiled: the kernel reads q in its own ``[B, Hkv, hg, D]`` layout and writes the
        output in it, filling its 16-row tile with copies of the GQA group's rows, instead
        of XLA padding q to the tile and slicing the output back (``_attend``). None
        (default): whenever it applies (one split, no lse, the group dividing the tile).
      trim_tail: in the length-masked loop (one_loop, INT4 pages, one page a step) read only
        the bytes of keys below the length (K by row, V in 16-key runs), not the whole last
        page: its unused part averages half a page per (sequence, KV head). None (default):
        :data:`TRIM_TAIL_DEFAULT` (off: measured 1.8x slower on the H100) where it applies.
      new_kv: ``(k_new, v_new, slots)``, ``[B, Hkv, D]`` float and ``[B] int32`` (INT4 cache,
        no ring or lse): the call writes each row's own token itself instead of a separate
        :func:`pallas_kernels.kv4_write.kv4_write` before it. Row b's token is at position
        ``seq_lens[b] - 1`` (``seq_lens`` counts it, as without ``new_kv``), stored at
        ``slots[b]`` (-1: none; then the row attends only its first ``seq_lens[b] - 1``
        keys). The program of (row, KV head) quantizes the token with ``kv4_write``'s
        arithmetic (the same bytes), stores it and attends it as one more key from
        registers, dequantized as the reference reads it back; the pages are read below
        it. Returns ``(out, kv)`` with the pool arrays updated in place (aliased: donate
        ``kv`` under jit). Semantics (rows with a slot): the pages of
        :func:`pallas_kernels.kv4_write.kv4_write_reference`, then this function without
        ``new_kv`` over them (the output within the kernel's bf16 tolerance, not bit for bit:
        the token's key enters in f32). Measured slower on the H200 (docs/kernels_attention.md).
      f16_nibbles: (INT4 cache) the K and V nibbles enter the dots as f16 subnormals read
        from their own bits (``n * 2^-24`` and, the high nibble left in place,
        ``16 n * 2^-24``): 6 instructions per 4 bytes instead of 9, no bias to remove, the
        2^24 restored by power-of-two scales after the dots. q (the high half divided by 16,
        exactly) and the probabilities times V's scales enter as f16 instead of bf16: more
        mantissa, and values below 2^-24 (6e-8) round to 0 or a subnormal. With ``qk_int8``
        the V side only. None (default): :data:`F16_NIBBLES_DEFAULT` for INT4 caches.

    Returns:
      ``[B, Hq, D]`` in q's dtype (and the lse with ``return_lse``; with ``new_kv``,
      ``(out, kv)``).

    Checks shapes and dtypes always; page-table entries, lengths and layer only when they are
    concrete (outside jit).
    """
    _check_kv(kv)
    q, hg = _check_q(q, kv, 3, "[B, Hq, D]")
    batch, hq, d = q.shape
    page_table = jnp.asarray(page_table)
    _check_tables(kv, page_table, seq_lens, layer, batch)
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    if new_kv is not None:
        new_kv = _check_new_kv(new_kv, kv, batch, ring, return_lse, causal_shift)
        causal_shift = 1  # the pages below the new token; the token itself from registers
    in_kernel, xla_ring = None, None
    if ring is not None:
        ring_k, ring_v, ring_slots, window = _check_ring(ring, ring_slots, kv, batch)
        if causal_shift not in (0, window):
            raise ValueError(f"causal_shift={causal_shift} with a ring of W={window}: use 0 or W")
        causal_shift = window
        if ring_in_kernel and window >= _MIN_ROWS and not window & (window - 1):
            in_kernel = (ring_k, ring_v, ring_slots)
        else:
            xla_ring = (ring_k, ring_v, ring_slots)
    max_pages = page_table.shape[1]
    block_k = block_k or default_decode_block_k(kv.page_size)
    blocks = -(-max_pages // max(1, block_k // kv.page_size))
    if num_splits is None:
        num_splits = _default_splits(batch, kv.k.shape[2], blocks)
    if num_warps is None:
        num_warps = default_decode_warps(batch, kv.k.shape[2], blocks, block_k, kv.quantized)
    if num_stages is None:
        num_stages = default_stages(decode=True, int4_pages=kv.quantized)
    if one_loop is None:
        one_loop = kv.quantized
    if trim_tail is None:
        trim_tail = TRIM_TAIL_DEFAULT and _trim_applies(kv, one_loop, block_k)
    if not 1 <= num_splits <= max_pages:
        raise ValueError(f"num_splits={num_splits} must be in [1, max_pages={max_pages}]")
    hg_pad = 1 << (hg - 1).bit_length()
    block_rows = max(_MIN_ROWS, hg_pad)
    seq_lens = jnp.asarray(seq_lens)
    ones = jnp.ones_like(seq_lens)
    want_lse = return_lse or xla_ring is not None
    tiles = num_splits == 1 and not want_lse and hg == hg_pad
    if q_tiled and not tiles:
        raise ValueError(
            "q_tiled=True needs one split, no lse (nor a ring attended in XLA) and a "
            f"power-of-two GQA group, got num_splits={num_splits}, hg={hg}"
        )
    q_tiled = tiles if q_tiled is None else q_tiled
    out = _attend(
        q.reshape(batch, hq // hg, hg, d)
        if q_tiled
        else _to_rows(q[:, None], hg, hg_pad, block_rows),
        kv,
        layer,
        jnp.asarray(page_table),
        seq_lens,
        seq_lens - 1,
        ones,
        hg=hg,
        hg_pad=hg_pad,
        block_rows=block_rows,
        block_k=block_k,
        num_splits=num_splits,
        sm_scale=sm_scale,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        unpack=unpack,
        qk_int8=_check_qk_int8(qk_int8, kv),
        q_residual=_q_residual(q_residual),
        causal_shift=_check_shift(causal_shift),
        return_lse=want_lse,
        ring=in_kernel,
        one_loop=one_loop,
        q_tiled=q_tiled,
        trim_tail=bool(trim_tail),
        new_kv=new_kv,
        f16_nibbles=_check_f16_nibbles(
            F16_NIBBLES_DEFAULT and kv.quantized if f16_nibbles is None else f16_nibbles, kv
        ),
    )
    if new_kv is not None:
        out, pools = out  # no lse (checked)
        out = out.reshape(batch, hq, d) if q_tiled else _from_rows(out, 1, hg, hg_pad)[:, 0]
        return out, pools
    if q_tiled:
        return out.reshape(batch, hq, d)
    if not want_lse:
        return _from_rows(out, 1, hg, hg_pad)[:, 0]
    out, lse = out
    out, lse = _from_rows(out, 1, hg, hg_pad)[:, 0], _lse_from_rows(lse, 1, hg, hg_pad)[:, 0]
    if xla_ring is not None:
        o2, lse2 = ring_attention_reference(q, *xla_ring, seq_lens, layer=layer, sm_scale=sm_scale)
        out = merge_attention(out, lse, o2, lse2).astype(q.dtype)
        lse = merge_lse(lse, lse2)
    return (out, lse) if return_lse else out


def paged_prefill_attention(
    q,
    kv: PagedKV,
    page_table,
    seq_lens,
    q_lens=None,
    *,
    layer=0,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    unpack: str = "auto",
    qk_int8: bool = False,
    q_residual: bool | None = None,
    dequantize: bool = False,
    dequantize_kernel: bool | None = None,
    causal_shift: int = 0,
    return_lse: bool = False,
):
    """Causal attention of a chunk of new tokens against the cache (chunk already written).

    Args:
      q: ``[B, T, Hq, D]``; chunk token ``i`` of sequence ``b`` sits at absolute position
        ``seq_lens[b] - q_lens[b] + i`` (a prefix of ``seq_lens - q_lens`` tokens is cached:
        chunked prefill and prefix reuse).
      seq_lens: ``[B] int32`` cached tokens including the chunk.
      q_lens: ``[B] int32`` valid chunk tokens (default T); rows ``i >= q_lens[b]`` return 0.
      block_q: chunk tokens per program (default: 128 rows / GQA group, at least 1).
      num_warps: default :func:`default_prefill_warps` (8 for 128-row tiles).
      num_stages: default :func:`default_stages` (bf16 or dequantized pages: 5).
      block_k: keys per loop step, as in :func:`paged_decode_attention`.
      qk_int8, q_residual: int8 logits, as in :func:`paged_decode_attention`.
      dequantize: INT4 cache only. Dequantize the pages the table names once (XLA, into a
        bf16 pool of ``B x max_pages`` pages, :func:`dequantized_pool`) and run the bf16-page
        kernel on them, instead of unpacking every page again in each of the chunk's
        ``T * Hq / Hkv / 128`` row tiles. For long chunks, where prefill is compute-bound;
        costs one extra pass that writes 4x the INT4 bytes. Same values up to the bf16
        rounding of the dequantized K/V.
      dequantize_kernel: with ``dequantize``, make the bf16 pool with the Pallas kernel
        (:func:`pallas_kernels.kv4_dequant.dequantize_pages`, one launch, the same bits)
        instead of XLA (:func:`dequantized_pool`). Default: the kernel unless ``interpret``.
      causal_shift, return_lse: as in :func:`paged_decode_attention` (lse ``[B, T, Hq]``).

    Returns:
      ``[B, T, Hq, D]`` in q's dtype (and the lse with ``return_lse``).
    """
    _check_kv(kv)
    q, hg = _check_q(q, kv, 4, "[B, T, Hq, D]")
    batch, t, hq, d = q.shape
    if q_lens is None:
        q_lens = jnp.full((batch,), t, jnp.int32)
    q_lens = jnp.asarray(q_lens)
    if q_lens.shape != (batch,) or q_lens.dtype != jnp.int32:
        raise ValueError(f"q_lens must be int32 [B={batch}], got {q_lens.dtype} {q_lens.shape}")
    page_table = jnp.asarray(page_table)
    _check_tables(kv, page_table, seq_lens, layer, batch, q_lens, t)
    hg_pad = 1 << (hg - 1).bit_length()
    if block_q is None:
        block_q = max(1, 128 // hg_pad)
    block_rows = max(_MIN_ROWS, block_q * hg_pad)
    if block_rows & (block_rows - 1):
        raise ValueError(f"block_q={block_q} x padded GQA group {hg_pad} must be a power of two")
    if num_warps is None:
        num_warps = default_prefill_warps(block_rows)
    if num_stages is None:  # the pages the kernel reads: bf16 after `dequantize`
        num_stages = default_stages(decode=False, int4_pages=kv.quantized and not dequantize)
    seq_lens = jnp.asarray(seq_lens)
    if dequantize:
        if not kv.quantized:
            raise ValueError("dequantize=True needs an INT4 cache (this one is bf16)")
        if qk_int8:
            raise ValueError("dequantize=True and qk_int8=True exclude each other")
        if dequantize_kernel is None:
            dequantize_kernel = not interpret
        if dequantize_kernel:
            from pallas_kernels.kv4_dequant import dequantize_pages  # imports this module

            kv, page_table = dequantize_pages(kv, page_table, layer, interpret=interpret)
        else:
            kv, page_table = dequantized_pool(kv, page_table, layer)
        _check_kv(kv)
        layer = 0
    # q's own layout when its [B, T, Hkv, hg, D] view tiles whole (no transposed copies).
    direct = hg == hg_pad and (t * hg) % block_rows == 0 and not return_lse
    out = _attend(
        q.reshape(batch, t, hq // hg, hg, d) if direct else _to_rows(q, hg, hg_pad, block_rows),
        kv,
        layer,
        jnp.asarray(page_table),
        seq_lens,
        seq_lens - q_lens,
        q_lens,
        hg=hg,
        hg_pad=hg_pad,
        block_rows=block_rows,
        block_k=block_k or kv.page_size,
        num_splits=1,
        sm_scale=sm_scale if sm_scale is not None else 1.0 / math.sqrt(d),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        unpack=unpack,
        qk_int8=_check_qk_int8(qk_int8, kv),
        q_residual=_q_residual(q_residual),
        causal_shift=_check_shift(causal_shift),
        return_lse=return_lse,
        q_direct=direct,
    )
    if direct:
        return out.reshape(q.shape)
    if return_lse:
        out, lse = out
        return _from_rows(out, t, hg, hg_pad), _lse_from_rows(lse, t, hg, hg_pad)
    return _from_rows(out, t, hg, hg_pad)


# --------------------------------------------------------------------------- references


def _gather_pages(kv: PagedKV, page_table, layer, dtype):
    """The pages ``page_table [B, MP]`` names, dequantized: ``(k, v)``, each
    ``[B, MP, Hkv, page, D]`` in ``dtype`` (entries clipped into range)."""

    def one(x, scale, zero, transposed=False):
        pages = jnp.take(x[layer], page_table, axis=0, mode="clip")  # [B, MP, Hkv, page, X]
        if transposed:  # INT4 V pages are stored [D/2, page]
            pages = pages.swapaxes(-1, -2)
        if kv.quantized:
            g = kv.group_size
            s = jnp.take(scale[layer], page_table, axis=0, mode="clip").swapaxes(-1, -2)
            z = jnp.take(zero[layer], page_table, axis=0, mode="clip").swapaxes(-1, -2)
            qv = pack.unpack_uint4(pages, tile=g)
            pages = quantizers.dequantize(qv, s, z, granularity="group", group_size=g)
        return pages.astype(dtype)

    return one(kv.k, kv.k_scale, kv.k_zero), one(kv.v, kv.v_scale, kv.v_zero, kv.quantized)


def gather_kv(kv: PagedKV, page_table, layer=0, dtype=jnp.float32):
    """Dense ``(k, v)``, each ``[B, max_pages * page, Hkv, D]``, dequantized to ``dtype``.

    Page-table entries are clipped into range (unused entries may hold anything).
    """
    page_table = jnp.asarray(page_table)
    batch, max_pages = page_table.shape

    def dense(pages):  # [B, MP, Hkv, page, D] -> [B, MP * page, Hkv, D]
        pages = pages.transpose(0, 1, 3, 2, 4)
        return pages.reshape(batch, max_pages * kv.page_size, *pages.shape[-2:])

    k, v = _gather_pages(kv, page_table, layer, dtype)
    return dense(k), dense(v)


def dequantized_pool(kv: PagedKV, page_table, layer=0, dtype=jnp.bfloat16):
    """The pages a table names, dequantized once into a pool of their own (prefill's
    ``dequantize=True``): ``(PagedKV with k, v [1, B * MP, Hkv, page, D] in dtype, table
    [B, MP] int32 = arange)``; use it with ``layer=0``."""
    page_table = jnp.asarray(page_table)
    batch, max_pages = page_table.shape
    k, v = _gather_pages(kv, page_table, layer, dtype)
    pool = PagedKV(*(x.reshape(1, batch * max_pages, *x.shape[2:]) for x in (k, v)))
    return pool, jnp.arange(batch * max_pages, dtype=jnp.int32).reshape(batch, max_pages)


def dense_attention_reference(
    q, k, v, seq_lens, q_lens=None, sm_scale=None, *, causal_shift=0, return_lse=False
):
    """Causal attention of ``q [B, T, Hq, D]`` on dense ``k, v [B, S, Hkv, D]`` in f32.

    Query token ``i`` sits at ``seq_lens - q_lens + i`` and sees keys at positions <= its own
    minus ``causal_shift`` and < seq_lens; rows ``i >= q_lens`` and sequences with no visible
    key give 0. ``return_lse``: also the rows' log-sum-exp ``[B, T, Hq]`` (-inf: no key).
    """
    batch, t, hq, d = q.shape
    hg = hq // k.shape[2]
    seq_lens = jnp.asarray(seq_lens)
    q_lens = jnp.full((batch,), t, jnp.int32) if q_lens is None else jnp.asarray(q_lens)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    k = jnp.repeat(k.astype(jnp.float32), hg, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), hg, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * sm_scale
    pos = (seq_lens - q_lens)[:, None] + jnp.arange(t)  # [B, T]
    key = jnp.arange(k.shape[1])
    mask = (key[None, None, :] <= pos[:, :, None] - causal_shift) & (
        key[None, None, :] < seq_lens[:, None, None]
    )
    mask &= (jnp.arange(t)[None, :] < q_lens[:, None])[:, :, None]
    p, lse = masked_softmax(logits, mask[:, None])  # mask [B, 1, T, S]
    out = jnp.einsum("bhts,bshd->bthd", p, v)
    if not return_lse:
        return out
    return out, lse.transpose(0, 2, 1)  # [B, H, T] -> [B, T, H]


def masked_softmax(logits, valid):
    """Softmax of f32 ``logits`` over the last axis, restricted to ``valid`` (broadcastable).

    Returns ``(p, lse)``: ``p`` normalized (0 off ``valid``, all 0 on a row with no valid
    entry) and the row log-sum-exp ``lse`` (shape ``logits.shape[:-1]``, -inf on such rows).
    The references and the recent window's float band share it."""
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1)
    safe = jnp.where(denom > 0, denom, 1.0)
    lse = jnp.where(denom > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
    return p / safe[..., None], lse


def paged_prefill_attention_reference(
    q,
    kv: PagedKV,
    page_table,
    seq_lens,
    q_lens=None,
    *,
    layer=0,
    sm_scale=None,
    causal_shift=0,
    return_lse=False,
):
    """Semantics of :func:`paged_prefill_attention` (f32 output)."""
    k, v = gather_kv(kv, page_table, layer)
    return dense_attention_reference(
        q, k, v, seq_lens, q_lens, sm_scale, causal_shift=causal_shift, return_lse=return_lse
    )


def paged_decode_attention_reference(
    q, kv: PagedKV, page_table, seq_lens, *, layer=0, sm_scale=None, causal_shift=0,
    return_lse=False, ring=None, ring_slots=None,
):  # fmt: skip
    """Semantics of :func:`paged_decode_attention` (f32 output)."""
    ones = jnp.ones_like(jnp.asarray(seq_lens))
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    if ring is not None:
        ring_k, ring_v, ring_slots, window = _check_ring(ring, ring_slots, kv, q.shape[0])
        causal_shift = window
    out, lse = paged_prefill_attention_reference(
        q[:, None], kv, page_table, seq_lens, ones, layer=layer, sm_scale=sm_scale,
        causal_shift=causal_shift, return_lse=True,
    )  # fmt: skip
    out, lse = out[:, 0], lse[:, 0]
    if ring is not None:
        o2, lse2 = ring_attention_reference(
            q, ring_k, ring_v, ring_slots, seq_lens, layer=layer, sm_scale=sm_scale
        )
        out, lse = merge_attention(out, lse, o2, lse2), merge_lse(lse, lse2)
    return (out, lse) if return_lse else out


def _check_ring(ring, ring_slots, kv: PagedKV, batch: int):
    """``(ring_k, ring_v, ring_slots, W)`` after checking them against the cache."""
    if not isinstance(ring, (tuple, list)) or len(ring) != 2:
        raise ValueError("ring must be a pair (ring_k, ring_v) of [L, S, Hkv, W, D] arrays")
    ring_k, ring_v = (jnp.asarray(x) for x in ring)
    layers, _, hkv, _, _ = kv.k.shape
    if (
        ring_k.ndim != 5
        or ring_k.shape != ring_v.shape
        or ring_k.shape[0] != layers
        or ring_k.shape[2] != hkv
        or ring_k.shape[4] != kv.head_dim
        or not jnp.issubdtype(ring_k.dtype, jnp.floating)
    ):
        raise ValueError(
            f"ring_k/ring_v must both be float [L={layers}, S, Hkv={hkv}, W, D={kv.head_dim}], "
            f"got {ring_k.dtype} {ring_k.shape}, {ring_v.dtype} {ring_v.shape}"
        )
    if ring_slots is None:
        raise ValueError("a ring needs ring_slots [B] int32 (-1: padded row)")
    ring_slots = jnp.asarray(ring_slots)
    if ring_slots.shape != (batch,) or ring_slots.dtype != jnp.int32:
        raise ValueError(
            f"ring_slots must be int32 [B={batch}], got {ring_slots.dtype} {ring_slots.shape}"
        )
    slots = _concrete(ring_slots)
    if slots is not None and (
        slots.max(initial=-1) >= ring_k.shape[1] or slots.min(initial=0) < -1
    ):
        raise ValueError(f"ring_slots={slots.tolist()} must be in [-1, S={ring_k.shape[1]})")
    return ring_k, ring_v, ring_slots, ring_k.shape[3]


def ring_attention_reference(q, ring_k, ring_v, ring_slots, seq_lens, *, layer=0, sm_scale=None):
    """Decode attention of ``q [B, Hq, D]`` over each row's ring of unquantized keys only
    (:func:`paged_decode_attention`'s ``ring``): row ``r`` of slot ``ring_slots[b]`` holds the
    newest position ``<= seq_len - 1`` congruent to ``r`` mod W; negative positions and slot
    -1 are masked. Returns ``(o [B, Hq, D] f32, lse [B, Hq] f32)``, lse -inf where no key."""
    b, hq, d = q.shape
    _, slots_n, hkv, w, _ = ring_k.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    pos = jnp.asarray(seq_lens, jnp.int32) - 1
    read = jnp.clip(ring_slots, 0, slots_n - 1)
    rows_k = jnp.take(ring_k[layer], read, axis=0)  # [B, Hkv, W, D]
    rows_v = jnp.take(ring_v[layer], read, axis=0)
    r = jnp.arange(w, dtype=jnp.int32)[None, :]
    row_pos = pos[:, None] - jnp.mod(pos[:, None] - r, w)  # [B, W]
    valid = ((row_pos >= 0) & (ring_slots >= 0)[:, None])[:, None, None, :]  # [B, 1, 1, W]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(rows_k.dtype)
    logits = jnp.einsum("bkgd,bkwd->bkgw", qg, rows_k, preferred_element_type=jnp.float32)
    p, lse = masked_softmax(logits * sm_scale, valid)
    o = jnp.einsum("bkgw,bkwd->bkgd", p, rows_v.astype(jnp.float32))
    return o.reshape(b, hq, d), lse.reshape(b, hq)


def merge_attention(o1, lse1, o2, lse2):
    """Softmax over the union of two disjoint key sets from the parts' normalized outputs
    ``[..., D]`` and log-sum-exps ``[...]``; rows that see no key in either give 0 (f32)."""
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1 = jnp.where(jnp.isfinite(lse1), jnp.exp(lse1 - m), 0.0)
    w2 = jnp.where(jnp.isfinite(lse2), jnp.exp(lse2 - m), 0.0)
    total = w1 + w2
    inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return (o1.astype(jnp.float32) * (w1 * inv)[..., None]) + (
        o2.astype(jnp.float32) * (w2 * inv)[..., None]
    )


def merge_lse(lse1, lse2):
    """log(exp(lse1) + exp(lse2)), -inf where both are."""
    m = jnp.maximum(lse1, lse2)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.exp(lse1 - safe) + jnp.exp(lse2 - safe)
    return jnp.where(jnp.isfinite(m), safe + jnp.log(total), -jnp.inf)
