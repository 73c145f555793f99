"""KV4 cache write: quantize new tokens' K/V and store them into their pages, one Pallas kernel.

What it replaces (``kv4_write_reference``, the engine's path before this kernel became the
default, `EngineConfig.kv_write_kernel`): XLA quantizes
``[N, Hkv, D]`` K and V (group min/max reductions, scale, zero point, rounding, nibble packing)
and scatters six arrays (packed K and V, four f16 scale/zero arrays) into the pool: six
scatters plus the quantization's own kernels, per layer. On the H100 the decode step at batch
64 spent 0.48 ms of 6.25 in these writes for 32 layers (docs/benchmarks.md, 2026-11-26).

Kernel: grid ``(N, Hkv / heads)``, one program per token and block of ``heads`` KV heads
(all of them when Hkv is a power of two, else one: Triton's tensors are powers of two). It
reads the token's ``[heads, D]`` K and V values, computes per head and group of ``g``
channels exactly the arithmetic of
:func:`comet_jax.quant.quantizers.quantize` (asymmetric, 4 bits, clip 1: ``hi = max(max(x),
0)``, ``lo = min(min(x), 0)``, ``scale = (hi - lo) * f32(1/15)`` (1 if 0), ``inv = 1/scale``
(IEEE division), ``zero = clip(round(-lo * inv), 0, 15)``, ``q = clip(round(x * inv) + zero,
0, 15)``, round half to even), packs the half-split nibbles of :mod:`comet_jax.quant.kv_quant`
and stores the bytes and the f16 scale/zero straight into the pool arrays, which are passed in
and out aliased (updated in place under a donating jit). Slot ``-1``, slots past the pool and
a layer out of range write nothing (the reference drops them the same way).

Why a token's heads share a program: with one program per (token, KV head) the call took
42 us per layer for the 1214 tokens of a LLaMA-3-8B decode step (1.35 ms of the 48.7 ms step)
and 104 us for an 8192-token prefill step (3.3 ms of 108), H100 trace of run 61, for a few MB
of traffic. Per token: 1.30 and 2.64 ms (run 64, docs/benchmarks.md). The grid was not what
limits the decode call; what does is not measured (each token's V bytes are single-byte
stores into 64 rows of the transposed page).

Prefill chunks (``run``, what `kv_cache.write_kv` passes for ``[B, T]`` slots with T a
multiple of 16): a program takes 16 consecutive tokens of one KV head; when their slots are
16 consecutive positions from a 16-aligned page offset it quantizes them together and stores
whole rows (each of V's 64 transposed rows gets 16 adjacent bytes in one store instead of
16 single-byte stores from 16 programs), else it writes them token by token as above. On the
H100 (2026-11-28, ``bench_attention.py --write-runs``, 32 layers in one jitted loop whose
per-iteration overhead the times include, bytes equal to XLA's) a prefill step's 8192 tokens
took 20.7 us per layer against 90.9 us token by token; in the 8B engine at 1024/512 the
median prefill step went from 107.2 to 105.7 ms (run 74, same machine). Decode (one token
per sequence) keeps the per-token grid: 42.6 us per layer for 1214 tokens in the same run.

Bit-exactness: interpret mode on the CPU equals the reference bytes and scales exactly
(tests). On the GPU the kernel uses ``div.rn.f32`` and ``cvt.rni`` as
:mod:`pallas_kernels.act_quant` does; on the H100 (2026-11-26, `bench_attention.py`) its pool
bytes equalled the reference's, and in the 8B engine's batch-256 decode step it took 0.10 ms
against 0.70 ms for the reference's scatters and reductions (docs/benchmarks.md).

Layouts (as :mod:`pallas_kernels.kv4_attention`)::

    k                     [L, P, Hkv, page, D/2] uint8
    v                     [L, P, Hkv, D/2, page] uint8   (pages transposed)
    k/v_scale, k/v_zero   [L, P, Hkv, D/g, page] float16
    k_new, v_new          [N, Hkv, D] float
    slots                 [N] int32  (page * page_size + offset; -1 = skip)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from comet_jax.quant import kv_quant
from pallas_kernels.act_quant import _div_rn, _round_even
from pallas_kernels.kv4_attention import PagedKV, _check_kv, _layer_array

_LEVELS = 2**kv_quant.KV_BITS - 1  # unsigned nibbles 0..15


def _check_write(kv: PagedKV, k_new, v_new, slots):
    _check_kv(kv)
    if not kv.quantized:
        raise ValueError("kv4_write needs an INT4 cache (this one is bf16)")
    if slots.dtype != jnp.int32 or slots.ndim != 1:
        raise ValueError(f"slots must be int32 [N], got {slots.dtype} {slots.shape}")
    want = (slots.shape[0], kv.k.shape[2], kv.head_dim)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != want or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be float [N, Hkv, D] = {want}, got {x.dtype} {x.shape}")


def token_scatter(layer, slots, page_size: int, num_pages: int):
    """``put(pool, vals, token_axis_last=False)``: writes ``vals [N, Hkv, X]`` at the tokens'
    slots of ``pool[layer]`` (``[L, P, Hkv, page, X]``, or ``[L, P, Hkv, X, page]`` with
    ``token_axis_last``) by one XLA scatter. Slot ``-1`` becomes an out-of-range page index and
    ``mode="drop"`` turns it into a no-op, as it does slots past the pool."""
    skip = slots < 0
    page = jnp.where(skip, num_pages, slots // page_size)
    off = jnp.where(skip, 0, slots % page_size)
    layer = jnp.asarray(layer, jnp.int32)

    def put(pool, vals, token_axis_last=False):
        if token_axis_last:
            return pool.at[layer, page, :, :, off].set(vals.astype(pool.dtype), mode="drop")
        return pool.at[layer, page, :, off, :].set(vals.astype(pool.dtype), mode="drop")

    return put


def kv4_write_reference(kv: PagedKV, layer, k_new, v_new, slots) -> PagedKV:
    """XLA: :func:`kv_quant.quantize_kv` of ``[N, Hkv, D]`` K/V, then one scatter per array
    (:func:`token_scatter`). ``layer``: int or traced int32 scalar."""
    slots = jnp.asarray(slots)
    _check_write(kv, k_new, v_new, slots)
    put = token_scatter(layer, slots, kv.page_size, kv.k.shape[1])
    g = kv.group_size
    kq = kv_quant.quantize_kv(k_new, g)
    vq = kv_quant.quantize_kv(v_new, g)
    return PagedKV(
        put(kv.k, kq.packed),
        put(kv.v, vq.packed, True),
        put(kv.k_scale, kq.scale, True),
        put(kv.k_zero, kq.zero, True),
        put(kv.v_scale, vq.scale, True),
        put(kv.v_zero, vq.zero, True),
    )


def _quantize_groups(x, interpret: bool):
    """``x [..., G, 2, half]`` f32 -> ``(bytes [..., G, half] uint8, scale, zero [..., G])``:
    the asymmetric 4-bit arithmetic of the module docstring per group (the last two axes)."""
    hi = jnp.maximum(jnp.max(jnp.max(x, axis=-1), axis=-1), 0.0)  # [..., G]
    lo = jnp.minimum(jnp.min(jnp.min(x, axis=-1), axis=-1), 0.0)
    rng = hi - lo
    scale = jnp.where(rng > 0, rng * np.float32(1.0 / _LEVELS), 1.0)
    inv = _div_rn(jnp.ones_like(scale), scale, interpret)
    zero = jnp.clip(_round_even(-lo * inv, interpret), 0.0, float(_LEVELS))
    q = _round_even(x * inv[..., None, None], interpret) + zero[..., None, None]
    q = jnp.clip(q, 0.0, float(_LEVELS))
    # byte = low half + 16 * high half (exact small integers in f32)
    weight = jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 2) == 0, 1.0, 16.0)
    byte = jnp.sum(q * weight, axis=-2).astype(jnp.int32).astype(jnp.uint8)
    return byte, scale, zero


def _store_token(kv_refs, outs, layer, slot, h, *, page, interpret, at=None):
    """Quantizes one token's K and V (``kv_refs`` = (k, v) blocks: the whole block
    ``[heads, G, 2, half]``, or row ``at`` of a ``[R, G, 2, half]`` one) and stores them at
    ``slot``; ``outs`` = (k, v, ks, kz, vs, vz) pool refs."""
    k_out, v_out, ks_out, kz_out, vs_out, vz_out = outs
    pg = slot // page
    off = slot % page
    for x_ref, p_out, s_out, z_out, transposed in (
        (kv_refs[0], k_out, ks_out, kz_out, False),
        (kv_refs[1], v_out, vs_out, vz_out, True),  # V pages transposed: token axis last
    ):
        x = (x_ref[...] if at is None else x_ref[at]).astype(jnp.float32)
        byte, scale, zero = _quantize_groups(x, interpret)  # [heads, G, half], [heads, G]
        if transposed:
            p_out[layer, pg, h, :, :, off] = byte
        else:
            p_out[layer, pg, h, off, :, :] = byte
        s_out[layer, pg, h, :, off] = scale.astype(s_out.dtype)
        z_out[layer, pg, h, :, off] = zero.astype(z_out.dtype)


def _kernel(
    layer_ref,  # [1] int32
    slots_ref,  # [N] int32
    k_ref,  # [heads, G, 2, g/2] block of [N, Hkv, G, 2, g/2]
    v_ref,
    *refs,  # 6 aliased pool inputs (unused), then the 6 outputs
    page: int,
    num_pages: int,
    num_layers: int,
    interpret: bool,
):
    n = pl.program_id(0)
    heads = k_ref.shape[0]
    h = pl.ds(pl.program_id(1) * heads, heads)
    slot = slots_ref[n]
    layer = layer_ref[0]
    ok = (slot >= 0) & (slot < num_pages * page) & (layer >= 0) & (layer < num_layers)

    @pl.when(ok)
    def _():
        _store_token((k_ref, v_ref), refs[6:], layer, slot, h, page=page, interpret=interpret)


def _run_kernel(
    layer_ref,  # [1] int32
    slots_ref,  # [N] int32
    k_ref,  # [R, G, 2, g/2] block of [N, Hkv, G, 2, g/2] (one KV head)
    v_ref,
    *refs,  # 6 aliased pool inputs (unused), then the 6 outputs
    page: int,
    num_pages: int,
    num_layers: int,
    interpret: bool,
):
    """``R`` consecutive tokens of one KV head. When their slots are ``R`` consecutive
    positions from an ``R``-aligned offset of one page (a prefill chunk's tokens), all of
    them are quantized at once and stored as whole rows: K ``[R, G, g/2]`` bytes, V
    ``[G, g/2, R]`` (R adjacent bytes per row of the transposed page), scales ``[G, R]``.
    Otherwise each token takes the per-token path in turn (slot -1 and out-of-range slots
    write nothing, as there)."""
    k_out, v_out, ks_out, kz_out, vs_out, vz_out = outs = refs[6:]
    run = k_ref.shape[0]
    h = pl.program_id(1)
    base = pl.program_id(0) * run
    layer = layer_ref[0]
    layer_ok = (layer >= 0) & (layer < num_layers)
    slots = slots_ref[pl.ds(base, run)]
    first = slots_ref[base]
    step = jnp.arange(run, dtype=jnp.int32)
    whole = (
        (jnp.min(jnp.where(slots == first + step, 1, 0)) == 1)
        & (first >= 0)
        & (first % run == 0)  # with run | page: inside one page
        & (first + run <= num_pages * page)
        & layer_ok
    )

    @pl.when(whole)
    def _():
        pg = first // page
        off = pl.multiple_of(first % page, run)
        rows = pl.ds(off, run)
        for x_ref, p_out, s_out, z_out, transposed in (
            (k_ref, k_out, ks_out, kz_out, False),
            (v_ref, v_out, vs_out, vz_out, True),
        ):
            x = x_ref[...].astype(jnp.float32)  # [R, G, 2, half]
            byte, scale, zero = _quantize_groups(x, interpret)  # [R, G, half], [R, G]
            if transposed:
                p_out[layer, pg, h, :, :, rows] = jnp.transpose(byte, (1, 2, 0))
            else:
                p_out[layer, pg, h, rows, :, :] = byte
            s_out[layer, pg, h, :, rows] = scale.T.astype(s_out.dtype)
            z_out[layer, pg, h, :, rows] = zero.T.astype(z_out.dtype)

    @pl.when(jnp.logical_not(whole))
    def _():
        def one(j, carry):
            slot = slots_ref[base + j]
            ok = (slot >= 0) & (slot < num_pages * page) & layer_ok

            @pl.when(ok)
            def _():
                _store_token(
                    (k_ref, v_ref), outs, layer, slot, h, page=page, interpret=interpret,
                    at=j,
                )  # fmt: skip

            return carry

        jax.lax.fori_loop(0, run, one, 0)


def kv4_write(
    kv: PagedKV,
    layer,
    k_new,
    v_new,
    slots,
    *,
    interpret: bool = False,
    num_warps: int | None = None,
    run: int = 0,
) -> PagedKV:
    """Quantizes ``k_new, v_new [N, Hkv, D]`` and stores them at ``slots [N]`` (module
    docstring); returns the updated :class:`PagedKV` (donate ``kv`` under jit so the pool is
    updated in place). Same bytes as :func:`kv4_write_reference`.

    ``run`` (0: off): programs of ``run`` consecutive tokens of one KV head, which store
    whole rows when the tokens' slots are consecutive from a ``run``-aligned page offset (a
    prefill chunk) and fall back to token by token otherwise (`_run_kernel`); ``run`` must
    be a power of two dividing N and the page size. ``num_warps``: per program (GPU launch;
    default 1, with ``run`` 4)."""
    if num_warps is None:
        num_warps = 4 if run else 1
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps={num_warps!r} must be 1, 2, 4 or 8")
    slots = jnp.asarray(slots)
    k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
    _check_write(kv, k_new, v_new, slots)
    n, hkv, d = k_new.shape
    num_layers, num_pages, _, page, _ = kv.k.shape
    g_count = kv.k_scale.shape[-2]
    half = d // g_count // 2
    # Bitcast views: a token-head's channels as [G, 2, g/2] (group, nibble half, byte), its
    # packed bytes as [G, g/2] (V: [G, g/2, page] per page); reshaped back after the call (no
    # copies). A program takes all the token's heads when Hkv is a power of two.
    heads = hkv if hkv & (hkv - 1) == 0 else 1
    if run:
        if run & (run - 1) or n % run or page % run:
            raise ValueError(
                f"run={run} must be a power of two dividing the tokens ({n}) and the page "
                f"size ({page})"
            )
    split = (n, hkv, g_count, 2, half)
    packed = (num_layers, num_pages, hkv, page, g_count, half)
    packed_v = (num_layers, num_pages, hkv, g_count, half, page)
    ins = [_layer_array(layer), slots, k_new.reshape(split), v_new.reshape(split)]
    pools = [kv.k.reshape(packed), kv.v.reshape(packed_v), kv.k_scale, kv.k_zero]
    pools += [kv.v_scale, kv.v_zero]
    whole = pl.no_block_spec
    if run:
        x_spec = pl.BlockSpec((run, None, g_count, 2, half), lambda i, j: (i, j, 0, 0, 0))
        grid = (n // run, hkv)
    else:
        x_spec = pl.BlockSpec((None, heads, g_count, 2, half), lambda i, j: (i, j, 0, 0, 0))
        grid = (n, hkv // heads)
    kernel = functools.partial(
        _run_kernel if run else _kernel,
        page=page,
        num_pages=num_pages,
        num_layers=num_layers,
        interpret=interpret,
    )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu  # GPU-only import

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole, whole, x_spec, x_spec] + [whole] * 6,
        out_specs=[whole] * 6,
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={4 + i: i for i in range(6)},
        compiler_params=compiler_params,
        interpret=interpret,
        name="kv4_write",
    )(*ins, *pools)
    k, v, ks, kz, vs, vz = outs
    return PagedKV(k.reshape(kv.k.shape), v.reshape(kv.v.shape), ks, kz, vs, vz)
