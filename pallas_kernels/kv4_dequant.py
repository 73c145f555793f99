"""Dequantize the INT4 pages a page table names into a bf16 pool: one Pallas kernel.

Prefill with ``dequantize=True`` (:func:`pallas_kernels.kv4_attention.paged_prefill_attention`)
first turns the pages of the call into bf16 once, then runs the bf16-page attention kernel on
them. The reference of that pass is :func:`pallas_kernels.kv4_attention.dequantized_pool`
(XLA: page gathers, nibble unpack, ``(q - zero) * scale``); this kernel computes the same
values, bit for bit, in one launch: grid ``(B, MP, Hkv)``, one program per (table entry, KV
head), which reads that page's packed K and V and their f16 scales/zero points and writes the
page's ``[page, D]`` K and V in the output dtype.

Layouts (as :mod:`pallas_kernels.kv4_attention`)::

    k                     [L, P, Hkv, page, D/2] uint8   (half-split nibbles per group of g)
    v                     [L, P, Hkv, D/2, page] uint8   (the same, pages transposed)
    k/v_scale, k/v_zero   [L, P, Hkv, D/g, page] float16
    page_table            [B, MP] int32   (entries clipped into [0, P), as the reference)
    out k, v              [1, B * MP, Hkv, page, D] dtype, table arange(B * MP) -> [B, MP]

Per group ``j`` and token ``t``: channels ``j*g + c`` (c < g/2) take the low nibble of byte
``j*g/2 + c``, channels ``j*g + g/2 + c`` its high nibble; value ``(n - z[t]) * s[t]`` in f32,
then cast (:func:`comet_jax.quant.quantizers.dequantize`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.kv4_attention import PagedKV, _check_kv, _layer_array


def _kernel(layer_ref, table_ref, k_ref, v_ref, ks_ref, kz_ref, vs_ref, vz_ref, ko_ref, vo_ref):
    b, i, h = (pl.program_id(a) for a in range(3))
    n_pages = k_ref.shape[1]
    layer = layer_ref[0]
    pg = jnp.clip(table_ref[b, i], 0, n_pages - 1)
    half = k_ref.shape[4] // ks_ref.shape[3]  # g / 2 bytes per group
    for x_ref, s_ref, z_ref, o_ref, transposed in (
        (k_ref, ks_ref, kz_ref, ko_ref, False),
        (v_ref, vs_ref, vz_ref, vo_ref, True),  # V pages are stored [D/2, page]
    ):
        for j in range(s_ref.shape[3]):
            if transposed:
                byte = x_ref[layer, pg, h, pl.ds(j * half, half), :].T  # [page, g/2] uint8
            else:
                byte = x_ref[layer, pg, h, :, pl.ds(j * half, half)]
            s = s_ref[layer, pg, h, j, :].astype(jnp.float32)[:, None]  # [page, 1]
            z = z_ref[layer, pg, h, j, :].astype(jnp.float32)[:, None]
            lo = (byte & jnp.uint8(0xF)).astype(jnp.float32)
            hi = (byte >> jnp.uint8(4)).astype(jnp.float32)
            o_ref[:, pl.ds(2 * j * half, half)] = ((lo - z) * s).astype(o_ref.dtype)
            o_ref[:, pl.ds(2 * j * half + half, half)] = ((hi - z) * s).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "num_warps", "interpret"))
def _dequantize_call(kv, page_table, layer, *, dtype, num_warps, interpret):
    batch, max_pages = page_table.shape
    _, _, hkv, page, half_d = kv.k.shape
    d = 2 * half_d
    whole = pl.no_block_spec
    out_spec = pl.BlockSpec(
        (None, None, None, page, d), lambda b, i, h: (0, b * max_pages + i, h, 0, 0)
    )
    out_shape = jax.ShapeDtypeStruct((1, batch * max_pages, hkv, page, d), dtype)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu  # GPU-only import

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    k, v = pl.pallas_call(
        _kernel,
        grid=(batch, max_pages, hkv),
        in_specs=[whole] * 8,
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=compiler_params,
        interpret=interpret,
        name="kv4_dequantize_pages",
    )(_layer_array(layer), page_table, kv.k, kv.v, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero)
    return PagedKV(k, v)


def dequantize_pages(
    kv: PagedKV,
    page_table,
    layer=0,
    *,
    dtype=jnp.bfloat16,
    num_warps: int = 4,
    interpret: bool = False,
):
    """The kernel form of :func:`pallas_kernels.kv4_attention.dequantized_pool` (module
    docstring): ``(PagedKV with k, v [1, B * MP, Hkv, page, D] in dtype, table [B, MP] int32 =
    arange)``; use it with ``layer=0``. Same values as the reference, bit for bit."""
    _check_kv(kv)
    if not kv.quantized:
        raise ValueError("dequantize_pages needs an INT4 cache (this one is bf16)")
    page_table = jnp.asarray(page_table)
    if page_table.ndim != 2 or page_table.dtype != jnp.int32:
        raise ValueError(
            f"page_table must be int32 [B, max_pages], got {page_table.dtype} {page_table.shape}"
        )
    batch, max_pages = page_table.shape
    pool = _dequantize_call(
        kv, page_table, layer, dtype=jnp.dtype(dtype), num_warps=num_warps, interpret=interpret
    )
    return pool, jnp.arange(batch * max_pages, dtype=jnp.int32).reshape(batch, max_pages)
