"""Fused activation quantization (interpret mode): bit-exact vs the library quantizer path.

Tolerance: none, with or without clipping. The kernel must produce the same bytes and scales
as ``act_quant_reference`` (``quantizers.quantize`` on the permuted segments): the simulated
accuracy path and the kernel path have to be the same function. The library spells its
arithmetic out (``amax * f32(clip / qmax)``, ``x * (1 / scale)``) so no graph can reorder it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant.pack import unpack_int4
from comet_jax.quant.quantizers import quantize
from pallas_kernels.act_quant import act_quant, act_quant_reference

TILE = 64


def _inputs(m, k, dtype, seed):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (m, k), jnp.float32) * 2.0
    x = x.at[:, 3].mul(20.0)  # an outlier channel
    perm = jax.random.permutation(jax.random.fold_in(key, 1), k).astype(jnp.int32)
    w = jax.random.uniform(jax.random.fold_in(key, 2), (k,), jnp.float32, 0.5, 1.5)
    return x.astype(dtype), perm, w


@pytest.mark.parametrize(
    "m,k,k4,dtype,norm,clip4,clip8",
    [
        (3, 256, 192, jnp.bfloat16, True, 1.0, 1.0),  # 25% INT8
        (2, 256, 128, jnp.float32, False, 0.9, 0.95),  # 50%, clipping
        (1, 192, 192, jnp.bfloat16, True, 0.85, 1.0),  # 0% INT8 (W4A4)
        (2, 128, 0, jnp.float32, True, 1.0, 1.0),  # 100% INT8 (W4A8)
    ],
)
def test_bit_exact(m, k, k4, dtype, norm, clip4, clip8):
    x, perm, w = _inputs(m, k, dtype, seed=k4 + m)
    w = w if norm else None
    got = act_quant(
        x, perm, k4, norm_weight=w, clip4=clip4, clip8=clip8, tile_k=TILE, interpret=True
    )
    want = act_quant_reference(x, perm, k4, norm_weight=w, clip4=clip4, clip8=clip8, tile_k=TILE)
    shapes = [(m, k4 // 2), (m, k - k4), (m, 2)]
    for g, r, s in zip(got, want, shapes):
        assert g.shape == s and g.dtype == r.dtype
    for g, r in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_reference_is_the_library_quantizer():
    """The reference equals quantizers.quantize (jitted) on the permuted segments."""
    m, k, k4 = 4, 256, 192
    x, perm, _ = _inputs(m, k, jnp.float32, seed=9)
    x4p, x8, scales = act_quant_reference(x, perm, k4, tile_k=TILE)
    xp = x[:, perm]
    q4 = jax.jit(lambda v: quantize(v, bits=4, granularity="row"))(xp[:, :k4])
    q8 = jax.jit(lambda v: quantize(v, bits=8, granularity="row"))(xp[:, k4:])
    np.testing.assert_array_equal(np.asarray(unpack_int4(x4p, TILE)), np.asarray(q4.q))
    np.testing.assert_array_equal(np.asarray(x8), np.asarray(q8.q))
    np.testing.assert_array_equal(np.asarray(scales[:, 0]), np.asarray(q4.scale))
    np.testing.assert_array_equal(np.asarray(scales[:, 1]), np.asarray(q8.scale))


def test_zero_row_gets_scale_one():
    x, perm, _ = _inputs(2, 128, jnp.float32, seed=1)
    x = x.at[1].set(0.0)
    x4p, x8, s = act_quant(x, perm, 64, tile_k=TILE, interpret=True)
    assert float(s[1, 0]) == 1.0 and float(s[1, 1]) == 1.0
    assert not np.asarray(x4p[1]).any() and not np.asarray(x8[1]).any()
    assert np.asarray(x4p[0]).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k4=100), "k4=100"),
        (dict(k4=512), "k4=512"),
        (dict(perm=jnp.arange(128, dtype=jnp.int32)), "perm"),
        (dict(perm=jnp.arange(256).astype(jnp.float32)), "perm"),
        (dict(norm_weight=jnp.ones((5,))), "norm_weight"),
        (dict(clip4=0.0), "clip4"),
        (dict(x=jnp.ones((2, 200)), perm=jnp.arange(200, dtype=jnp.int32)), "K=200"),
    ],
)
def test_bad_inputs(kwargs, match):
    x, perm, _ = _inputs(2, 256, jnp.float32, seed=0)
    args = dict(x=x, perm=perm, k4=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        act_quant(
            args.pop("x"), args.pop("perm"), args.pop("k4"), tile_k=TILE, interpret=True, **args
        )


@pytest.mark.parametrize("m,bm", [(5, 2), (9, 4), (4, 4)])
def test_rows_per_program_bit_exact(m, bm):
    """Several rows a program (M padded to a multiple of bm, padding dropped): same bytes."""
    k, k4 = 512, 384  # INT4 segment 3 tiles of 128: chunk widths not the whole segment
    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=m * 7 + bm)
    got = act_quant(x, perm, k4, norm_weight=w, tile_k=128, interpret=True, rows_per_program=bm)
    want = act_quant_reference(x, perm, k4, norm_weight=w, tile_k=128)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_rows_per_program_must_be_pow2():
    x, perm, _ = _inputs(2, 256, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="rows_per_program=3"):
        act_quant(x, perm, 128, tile_k=TILE, interpret=True, rows_per_program=3)


def test_kernel_order_matches_packing():
    """Gathering in kernel order and packing low/high halves gives pack_int4's bytes."""
    from comet_jax.quant.pack import pack_int4
    from pallas_kernels.act_quant import kernel_order

    k, k4, tile = 384, 256, 64
    order = kernel_order(np.arange(k), k4, tile)
    assert sorted(order.tolist()) == list(range(k))
    q = np.random.default_rng(0).integers(-8, 8, size=(3, k4)).astype(np.int8)
    lo, hi = q[:, order[: k4 // 2]], q[:, order[k4 // 2 : k4]]
    packed = ((lo & 0xF) | (hi << 4)).astype(np.int8)
    np.testing.assert_array_equal(packed, np.asarray(pack_int4(jnp.asarray(q), tile)))


@pytest.mark.parametrize(
    "m,k,k4,bm,row_align,norm",
    [
        (5, 256, 128, 1, 8, True),  # decode launch, 3 pad rows
        (6, 384, 256, 2, 4, False),  # 2 rows a program, 2 pad rows
        (3, 256, 0, 1, 4, True),  # all INT8
        (4, 192, 192, 2, 1, True),  # all INT4, no padding
        (7, 512, 384, 4, 16, True),  # x padded to the program (8), then 8 pad rows
    ],
)
def test_unpacked_layout_bit_exact(m, k, k4, bm, row_align, norm):
    """layout="unpacked": [16 * q4 | q8] in the permuted order, rows padded to row_align
    with zeros (scales 1): the reference's bytes, which are the packed layout unpacked."""
    from pallas_kernels.w4ax_matmul import unpack_int4_x16_tiles

    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=m + k4)
    w = w if norm else None
    kw = dict(norm_weight=w, tile_k=TILE, layout="unpacked", row_align=row_align)
    got = act_quant(x, perm, k4, interpret=True, rows_per_program=bm, **kw)
    want = act_quant_reference(x, perm, k4, **kw)
    rows = -(-m // row_align) * row_align
    assert got[0].shape == (rows, k) and got[1].shape == (rows, 2)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    x4p, x8, xs = act_quant_reference(x, perm, k4, norm_weight=w, tile_k=TILE)
    x_u = np.asarray(got[0])
    np.testing.assert_array_equal(x_u[:m, :k4], np.asarray(unpack_int4_x16_tiles(x4p, TILE)))
    np.testing.assert_array_equal(x_u[:m, k4:], np.asarray(x8))
    np.testing.assert_array_equal(np.asarray(got[1][:m]), np.asarray(xs))
    assert not x_u[m:].any() and (np.asarray(got[1][m:]) == 1.0).all()


def test_layout_arguments_checked():
    x, perm, _ = _inputs(2, 256, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="layout='split'"):
        act_quant(x, perm, 128, tile_k=TILE, interpret=True, layout="split")
    with pytest.raises(ValueError, match="row_align=3"):
        act_quant(x, perm, 128, tile_k=TILE, interpret=True, layout="unpacked", row_align=3)
    with pytest.raises(ValueError, match="row_align applies to layout='unpacked'"):
        act_quant_reference(x, perm, 128, tile_k=TILE, row_align=8)


@pytest.mark.parametrize(
    "m,k,k4,bm,layout,row_align,norm",
    [
        (5, 256, 128, 1, "unpacked", 8, True),  # identity: contiguous chunks
        (7, 512, 384, 4, "unpacked", 16, False),
        (3, 256, 0, 1, "unpacked", 4, True),  # all INT8
        (4, 192, 192, 2, "packed", 1, True),  # packed: gathers the identity
    ],
)
def test_identity_perm_none(m, k, k4, bm, layout, row_align, norm):
    """perm=None is the identity order: the same bytes as an explicit arange, which is what
    the reference quantizes (unpacked: contiguous loads, no index array)."""
    x, _, w = _inputs(m, k, jnp.bfloat16, seed=3 * m + k4)
    w = w if norm else None
    kw = dict(norm_weight=w, tile_k=TILE, layout=layout, row_align=row_align)
    got = act_quant(x, None, k4, interpret=True, rows_per_program=bm, **kw)
    want = act_quant_reference(x, jnp.arange(k, dtype=jnp.int32), k4, **kw)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    for g, r in zip(act_quant_reference(x, None, k4, **kw), want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


@pytest.mark.parametrize(
    "m,k,k4,bm,layout,row_align,permuted",
    [
        (5, 256, 192, 1, "unpacked", 8, False),  # the engine's down_in: folded, unpacked
        (6, 384, 256, 2, "unpacked", 4, True),  # a runtime permutation, gathered
        (3, 256, 128, 1, "packed", 1, True),
        (9, 512, 384, 4, "unpacked", 16, False),
    ],
)
def test_swiglu_gate_bit_exact(m, k, k4, bm, layout, row_align, permuted):
    """gate=g quantizes swiglu(g, x) = silu(f32(g)) * x rounded to x's dtype: in interpret
    mode the same bytes and scales as the reference on that hidden state, which is the
    hidden state the decoder layer computes unfused (tolerance: none)."""
    from pallas_kernels.act_quant import swiglu

    x, perm, _ = _inputs(m, k, jnp.bfloat16, seed=m * 5 + k4)
    g = jax.random.normal(jax.random.PRNGKey(m + 100), (m, k), jnp.float32).astype(jnp.bfloat16)
    perm = perm if permuted else None
    kw = dict(tile_k=TILE, layout=layout, row_align=row_align)
    got = act_quant(x, perm, k4, gate=g, interpret=True, rows_per_program=bm, **kw)
    want = act_quant_reference(x, perm, k4, gate=g, **kw)
    hidden = (jax.nn.silu(g.astype(jnp.float32)) * x).astype(jnp.bfloat16)  # the layer's
    np.testing.assert_array_equal(np.asarray(swiglu(g, x)), np.asarray(hidden))
    unfused = act_quant_reference(hidden, perm, k4, **kw)
    for a, b, c in zip(got, want, unfused):
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    assert np.asarray(got[0]).any()  # not an all-zero result


def test_swiglu_gate_checked():
    x, perm, w = _inputs(2, 256, jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="gate must match x"):
        act_quant(x, perm, 128, gate=x[:1], tile_k=TILE, interpret=True)
    with pytest.raises(ValueError, match="gate must match x"):
        act_quant(x, perm, 128, gate=x.astype(jnp.float32), tile_k=TILE, interpret=True)
    with pytest.raises(ValueError, match="takes no norm_weight"):
        act_quant(x, perm, 128, gate=x, norm_weight=w, tile_k=TILE, interpret=True)
    with pytest.raises(ValueError, match="perm must be int32"):
        act_quant(x, perm[:5], 128, tile_k=TILE, interpret=True)


@pytest.mark.parametrize(
    "m,k,k4,bm,row_align,norm,gated,sorted_perm",
    [
        (5, 256, 192, 1, 8, True, False, True),  # a checkpoint's stored (gather-order) perm
        (6, 384, 256, 2, 4, False, False, False),  # the score order, no norm (o_proj's input)
        (3, 256, 0, 1, 4, True, False, True),  # all INT8
        (4, 192, 192, 2, 1, True, False, False),  # all INT4
        (7, 256, 128, 4, 16, False, True, True),  # SwiGLU under a permutation
    ],
)
def test_unpacked_scatter_equals_gather(m, k, k4, bm, row_align, norm, gated, sorted_perm):
    """The unpacked layout's two forms under a permutation, reading in order and storing
    each channel at its permuted column (``scatter=True``) or gathering by the permutation
    (the default): the same bytes and scales, both the reference's (tolerance: none)."""
    from comet_jax.quant.fmpq import gather_order
    from pallas_kernels import act_quant as aq

    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=3 * m + k4)
    if sorted_perm:
        perm = perm[jnp.asarray(gather_order(np.asarray(perm), k - k4))]
    g = jax.random.normal(jax.random.PRNGKey(m), (m, k)).astype(jnp.bfloat16) if gated else None
    kw = dict(norm_weight=w if norm else None, tile_k=TILE, layout="unpacked", gate=g)
    kw["row_align"] = row_align
    want = act_quant_reference(x, perm, k4, **kw)
    outs = {
        s: act_quant(x, perm, k4, interpret=True, scatter=s, rows_per_program=bm, **kw)
        for s in (True, False)
    }
    for s, got in outs.items():
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"scatter={s}")
    assert not aq.UNPACKED_SCATTER and aq.SCATTER_CHUNK >= 32


@pytest.mark.parametrize(
    "m,k,k4,bm,row_align,form",
    [
        (5, 256, 192, 1, 8, "gather"),  # the decode launch, 3 pad rows
        (6, 384, 256, 2, 4, "scatter"),  # 2 rows a program
        (3, 256, 0, 1, 4, "identity"),  # all INT8, contiguous chunks
        (7, 256, 128, 4, 16, "gated"),  # the SwiGLU input (no norm)
    ],
)
def test_kernel_scales_and_bf16_norm_weights(m, k, k4, bm, row_align, form):
    """``kernel_scales=True``: the third output ``rs [2, R]`` is ``kernel_scales(x_scales)``
    (``s4 / 256``, ``s8 / 16``; the padding rows' 1 / 256 and 1 / 16), and the other two
    outputs are unchanged; the RMSNorm weights arrive in their stored dtype (bf16 here) and
    the kernel gathers and converts them itself. Tolerance: none (the reference's bytes)."""
    from pallas_kernels.act_quant import kernel_scales

    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=5 * m + k4)
    w = None if form == "gated" else w.astype(jnp.bfloat16)
    perm = None if form == "identity" else perm
    g = jax.random.normal(jax.random.PRNGKey(m), (m, k)).astype(jnp.bfloat16)
    kw = dict(norm_weight=w, tile_k=TILE, layout="unpacked", row_align=row_align)
    kw["gate"] = g if form == "gated" else None
    want = act_quant_reference(x, perm, k4, **kw)
    got = act_quant(
        x, perm, k4, interpret=True, rows_per_program=bm, kernel_scales=True,
        scatter=form == "scatter", **kw,
    )  # fmt: skip
    assert len(got) == 3
    for a, b in zip(got[:2], want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rs = np.asarray(got[2])
    assert rs.shape == (2, got[1].shape[0]) and rs.dtype == np.float32
    np.testing.assert_array_equal(rs, np.asarray(kernel_scales(want[1])))
    rows = -(-m // row_align) * row_align
    assert (rs[:, m:rows] == np.array([[1 / 256], [1 / 16]], np.float32)).all()
    assert (rs[0, :m] * 256 == np.asarray(want[1])[:m, 0]).all()
    with pytest.raises(ValueError, match="kernel_scales=True .* needs layout='unpacked'"):
        act_quant(x, perm, k4, interpret=True, tile_k=TILE, kernel_scales=True)


@pytest.mark.parametrize(
    "m,k,k4,bm,layout,row_align,form",
    [
        (3, 256, 192, 1, "packed", 1, "perm"),  # the decode launch (packed)
        (5, 256, 128, 1, "unpacked", 8, "perm"),  # the large-M operand, 3 pad rows
        (2, 192, 192, 2, "packed", 1, "identity"),  # packed gather order of the identity
        (4, 256, 0, 1, "unpacked", 4, "identity"),  # read in order: nothing to gather
        (6, 384, 256, 2, "unpacked", 4, "scatter"),  # scattered form: read in order
    ],
)
def test_norm_weight_in_kernel_order(m, k, k4, bm, layout, row_align, form):
    """``kernel_norm_weight`` (the RMSNorm weights gathered once into the kernel's read order)
    with ``norm_in_kernel_order=True``: the same bytes and scales as the call that gathers
    them itself and as the reference (tolerance: none). A weight left in the original order
    under a permutation gives other bytes, so the test can fail."""
    from pallas_kernels.act_quant import kernel_norm_weight

    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=7 * m + k4)
    w = w.astype(jnp.bfloat16)
    perm = None if form == "identity" else perm
    scatter = form == "scatter"
    kw = dict(tile_k=TILE, layout=layout)
    if layout == "unpacked":
        kw["row_align"] = row_align
    want = act_quant_reference(x, perm, k4, norm_weight=w, **kw)
    w_k = kernel_norm_weight(w, perm, k4, tile_k=TILE, layout=layout, scatter=scatter)
    assert w_k.dtype == w.dtype and w_k.shape == (k,)
    got = act_quant(
        x, perm, k4, interpret=True, rows_per_program=bm, scatter=scatter, norm_weight=w_k,
        norm_in_kernel_order=True, **kw,
    )  # fmt: skip
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if form == "perm":  # the original order passed as if gathered: other numbers
        wrong = act_quant(
            x, perm, k4, interpret=True, rows_per_program=bm, norm_weight=w,
            norm_in_kernel_order=True, **kw,
        )  # fmt: skip
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(wrong, want))
        with pytest.raises(ValueError, match="kernel_norm_weight: want norm_weight"):
            kernel_norm_weight(w[:-1], perm, k4, tile_k=TILE, layout=layout)
    with pytest.raises(ValueError, match="norm_in_kernel_order=True needs a norm_weight"):
        act_quant(x, perm, k4, interpret=True, norm_in_kernel_order=True, **kw)


@pytest.mark.parametrize(
    "m,k,k4,bm,layout,row_align,form",
    [
        (3, 256, 192, 1, "packed", 1, "norm"),  # the decode launch, RMSNorm input
        (4, 256, 128, 2, "packed", 1, "plain"),  # o_proj's input (no norm)
        (5, 256, 128, 1, "packed", 1, "gated"),  # SwiGLU input under a permutation
        (5, 256, 128, 1, "unpacked", 8, "norm"),  # the unpacked layout uses perm as it is
        (6, 384, 256, 2, "unpacked", 4, "scatter"),  # scattered form: the inverse permutation
    ],
)
def test_perm_in_kernel_order(m, k, k4, bm, layout, row_align, form):
    """``kernel_read_order`` (the index vector a call builds from the permutation, computed
    once) with ``perm_in_kernel_order=True``, alone and with the norm weights in the kernel's
    order too: the same bytes and scales as the reference (tolerance: none). In the packed
    layout the stored permutation passed as if rearranged gives other bytes (the test can
    fail)."""
    from pallas_kernels.act_quant import kernel_norm_weight, kernel_read_order

    x, perm, w = _inputs(m, k, jnp.bfloat16, seed=11 * m + k4)
    norm = w if form in ("norm", "scatter") else None
    g = jax.random.normal(jax.random.PRNGKey(m), (m, k)).astype(jnp.bfloat16)
    gate = g if form == "gated" else None
    scatter = form == "scatter"
    kw = dict(tile_k=TILE, layout=layout, gate=gate)
    if layout == "unpacked":
        kw["row_align"] = row_align
    want = act_quant_reference(x, perm, k4, norm_weight=norm, **kw)
    idx = kernel_read_order(perm, k, k4, tile_k=TILE, layout=layout, scatter=scatter)
    assert idx.shape == (k,) and idx.dtype == jnp.int32
    if layout == "unpacked" and not scatter:
        np.testing.assert_array_equal(idx, perm)
    call = dict(interpret=True, rows_per_program=bm, scatter=scatter, **kw)
    variants = [dict(norm_weight=norm)]
    if norm is not None:
        w_k = kernel_norm_weight(norm, perm, k4, tile_k=TILE, layout=layout, scatter=scatter)
        variants.append(dict(norm_weight=w_k, norm_in_kernel_order=True))
    for v in variants:
        got = act_quant(x, idx, k4, perm_in_kernel_order=True, **call, **v)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(v.keys()))
    if layout == "packed":
        wrong = act_quant(x, perm, k4, perm_in_kernel_order=True, norm_weight=norm, **call)
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(wrong, want))
    with pytest.raises(ValueError, match="perm_in_kernel_order=True needs a perm"):
        act_quant(x, None, k4, perm_in_kernel_order=True, **call)
    with pytest.raises(ValueError, match="kernel_read_order: want perm"):
        kernel_read_order(perm[:-1], k, k4, tile_k=TILE, layout=layout)
