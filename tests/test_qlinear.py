"""Quantized projection backends: the simulated path is the kernels' arithmetic, bit for bit.

Tolerances: integer paths and every comparison against a kernel reference are exact (0 ulp:
same integers, same scales, same f32 epilogue). Comparisons against a float matmul of the
dequantized operands allow f32 summation-order error (rtol 1e-5).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant import pack, quantizers
from comet_jax.quant.qlinear import (
    PreparedKernel,
    PreparedUnpacked,
    W4A16Linear,
    W4AxLinear,
    W8A8Linear,
)
from models.projection import ProjSpec, rms_norm
from pallas_kernels import act_quant as aq
from pallas_kernels import w4ax_matmul as wk

EPS = 1e-5


def _weights(rng, n, k, tile, w_group=None, bias=False):
    w = rng.standard_normal((n, k)).astype(np.float32)
    gran = "row" if w_group is None else "group"
    r = quantizers.quantize(jnp.asarray(w), bits=4, granularity=gran, group_size=w_group)
    p = {"w_packed": pack.pack_int4(r.q, tile), "w_scales": r.scale}
    if bias:
        p["bias"] = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return p, r


def _x(rng, shape, outliers=(3, 17)):
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., list(outliers)] *= 25.0  # a few outlier channels, as in real activations
    return jnp.asarray(x)


@pytest.mark.parametrize(
    "m,k4,k8,n,w_group,bias,permute",
    [
        (1, 64, 64, 32, None, False, True),  # M=1 decode row
        (5, 128, 64, 48, None, True, True),  # ragged M, bias
        (7, 0, 128, 16, None, False, False),  # W4A8 (empty INT4 segment)
        (3, 192, 0, 32, None, False, False),  # uniform W4A4 (empty INT8 segment)
        (4, 128, 64, 32, 64, False, True),  # per-group weight scales
    ],
)
def test_w4ax_sim_equals_kernel_references(m, k4, k8, n, w_group, bias, permute):
    rng = np.random.default_rng(m * 1000 + k4 + k8)
    k, tile = k4 + k8, 64
    be = W4AxLinear(k4=k4, k8=k8, block=64, tile=tile, w_group=w_group, permute=permute)
    wp, _ = _weights(rng, n, k, tile, w_group, bias)
    x = _x(rng, (m, k))
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32)
    perm = jnp.asarray(rng.permutation(k), jnp.int32) if permute else jnp.arange(k, dtype=jnp.int32)
    gp = {"perm": perm} if permute else None

    prep = jax.jit(lambda x: be.prepare_input(gp, x, norm_w, eps=EPS))(x)
    y = jax.jit(lambda p: be.matmul(wp, p))(prep)

    # The kernels' own references, called directly: the same integers and scales, bit for bit.
    x4p, x8, xs = aq.act_quant_reference(x, perm, k4, norm_weight=norm_w, eps=EPS, tile_k=tile)
    np.testing.assert_array_equal(np.asarray(prep.x4_packed), np.asarray(x4p))
    np.testing.assert_array_equal(np.asarray(prep.x8), np.asarray(x8))
    np.testing.assert_array_equal(np.asarray(prep.x_scales), np.asarray(xs))
    ref = jax.jit(functools.partial(wk.w4ax_matmul_reference, tile_k=tile, out_dtype=jnp.float32))
    y_ref = ref(x4p, x8, xs, wp["w_packed"], wp["w_scales"], wp.get("bias"))
    # The same jnp epilogue; XLA may contract a multiply-add into an FMA differently in another
    # jit context, so allow 2 ulp on the f32 output (the integers above are exact).
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2.5e-7, atol=0)

    # And the semantics: the same as a float matmul of the dequantized operands.
    xn = np.asarray(rms_norm(x, norm_w, EPS))[:, np.asarray(perm)]
    x_hat = np.concatenate(
        [
            np.asarray(pack.unpack_int4(x4p, tile), np.float64) * np.asarray(xs)[:, :1]
            if k4
            else np.zeros((m, 0)),
            np.asarray(x8, np.float64) * np.asarray(xs)[:, 1:],
        ],
        axis=1,
    )
    q = np.asarray(pack.unpack_int4(wp["w_packed"], tile), np.float64)
    s = np.asarray(wp["w_scales"], np.float64)
    w_hat = q * (s[:, None] if w_group is None else np.repeat(s, w_group, axis=1))
    y64 = x_hat @ w_hat.T + (np.asarray(wp["bias"]) if bias else 0.0)
    np.testing.assert_allclose(np.asarray(y), y64, rtol=1e-5, atol=1e-5 * np.abs(y64).max())
    # The quantized input is close to the float input (sanity of the INT4/INT8 split).
    assert np.abs(x_hat - xn).max() <= np.abs(xn).max() / 7 + 1e-6


def test_w4ax_3d_input_and_dtype():
    rng = np.random.default_rng(0)
    be = W4AxLinear(k4=64, k8=64, block=64, tile=64)
    wp, _ = _weights(rng, 32, 128, 64)
    x = _x(rng, (2, 3, 128))
    y = be.matmul(wp, be.prepare_input(None, x, None, eps=EPS))
    y2 = be.matmul(wp, be.prepare_input(None, x.reshape(6, 128), None, eps=EPS))
    assert y.shape == (2, 3, 32) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y).reshape(6, 32), np.asarray(y2))


def test_w4ax_block_granularity_is_exact_chunked_integer_math():
    rng = np.random.default_rng(1)
    m, k4, k8, n, tile = 4, 128, 64, 32, 64
    be = W4AxLinear(k4=k4, k8=k8, block=64, tile=tile, act_granularity="block")
    wp, wr = _weights(rng, n, k4 + k8, tile)
    x = _x(rng, (m, k4 + k8))
    prep = be.prepare_input(None, x, None, eps=EPS)
    assert prep.x_scales.shape == (m, 3)
    y = be.matmul(wp, prep)
    # Each 64-channel block: its own per-token scale; integer sums exact.
    yb = 0.0
    for b in range(3):
        sl = slice(64 * b, 64 * (b + 1))
        bits = 4 if b < 2 else 8
        r = quantizers.quantize(x[:, sl], bits=bits, granularity="row")
        acc = np.asarray(r.q, np.int64) @ np.asarray(wr.q[:, sl], np.int64).T
        yb = yb + (np.asarray(r.scale)[:, None] * np.asarray(wr.scale)[None, :]) * acc
    np.testing.assert_allclose(np.asarray(y), yb, rtol=1e-5, atol=1e-6 * np.abs(yb).max())


def test_w4ax_rotation_matches_explicit_rotation():
    from comet_jax.quant import hadamard

    rng = np.random.default_rng(2)
    k, n = 128, 16
    be = W4AxLinear(k4=64, k8=64, block=64, tile=64, rotate=True)
    wp, _ = _weights(rng, n, k, 64)
    x = _x(rng, (3, k))
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32)
    y = be.matmul(wp, be.prepare_input(None, x, norm_w, eps=EPS))
    xr = hadamard.hadamard_transform(rms_norm(x, norm_w, EPS))
    plain = W4AxLinear(k4=64, k8=64, block=64, tile=64)
    y_ref = plain.matmul(wp, plain.prepare_input(None, xr, None, eps=EPS))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))


def test_w8a8_sim_integer_path():
    rng = np.random.default_rng(3)
    m, k, n = 5, 96, 24
    be = W8A8Linear()
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    r = quantizers.quantize(w, bits=8, granularity="row")
    wp = {"w_q": r.q, "w_scales": r.scale}
    x = _x(rng, (m, k))
    y = be.matmul(wp, be.prepare_input(None, x, None, eps=EPS))
    xr = quantizers.quantize(x, bits=8, granularity="row")
    acc = np.asarray(xr.q, np.int64) @ np.asarray(r.q, np.int64).T  # exact
    y_ref = (np.asarray(xr.scale)[:, None] * np.asarray(r.scale)[None, :]).astype(np.float32) * acc
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.T), rtol=0.05, atol=0.05 * 25)


@pytest.mark.parametrize("w_group", [None, 64])
def test_w4a16_matches_dequantized_weights(w_group):
    rng = np.random.default_rng(4)
    be = W4A16Linear(tile=64, w_group=w_group)
    wp, wr = _weights(rng, 16, 128, 64, w_group)
    x = _x(rng, (3, 128))
    y = be.matmul(wp, be.prepare_input(None, x, None, eps=EPS))
    gran = "row" if w_group is None else "group"
    w_hat = quantizers.dequantize(wr.q, wr.scale, granularity=gran, group_size=w_group)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x) @ np.asarray(w_hat).T, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("w_group", [None, 64])
def test_w4a16_pallas_interpret_matches_dequantized_weights(w_group):
    # The kernel rounds activations to bf16 (the MMA's input); weights x16 are exact in bf16
    # and sums are f32: only summation order differs from the f64 product (tolerance 1e-5).
    rng = np.random.default_rng(6)
    be = W4A16Linear(tile=64, w_group=w_group, mode="pallas", interpret=True)
    wp, wr = _weights(rng, 16, 128, 64, w_group)
    x = _x(rng, (2, 3, 128))
    y = be.matmul(wp, be.prepare_input(None, x, None, eps=EPS))
    assert y.shape == (2, 3, 16) and y.dtype == x.dtype
    gran = "row" if w_group is None else "group"
    w_hat = quantizers.dequantize(wr.q, wr.scale, granularity=gran, group_size=w_group)
    xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = xb @ np.asarray(w_hat, np.float64).T
    if "bias" in wp:
        want = want + np.asarray(wp["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def test_weight_init_shapes_and_validation():
    be = W4AxLinear(k4=64, k8=64, block=64, tile=64, w_group=64)
    spec = ProjSpec(0, "q_proj", 128, 32, True)
    p = be.weight_init(spec, jnp.float32)(jax.random.key(0))
    assert p["w_packed"].shape == (32, 64) and p["w_packed"].dtype == jnp.int8
    assert p["w_scales"].shape == (32, 2) and p["bias"].shape == (32,)
    with pytest.raises(ValueError, match="k4=96"):
        W4AxLinear(k4=96, k8=32, block=64, tile=64)
    with pytest.raises(ValueError, match="mode"):
        W4AxLinear(k4=64, k8=64, mode="cuda")
    with pytest.raises(ValueError, match="no kernel"):
        W8A8Linear(mode="pallas")
    with pytest.raises(ValueError, match="multiple of tile"):
        W4A16Linear(tile=64, w_group=96, mode="pallas")
    with pytest.raises(ValueError, match="K=256"):
        be.weight_init(ProjSpec(0, "q_proj", 256, 32, False), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["auto", "unpacked"])
def test_pallas_interpret_matches_sim_tiny(layout):
    """Both activation layouts of the kernel path (M = 16: "auto" is the packed one)."""
    rng = np.random.default_rng(5)
    m, k4, k8, n = 16, 64, 64, 16
    perm = jnp.asarray(rng.permutation(k4 + k8), jnp.int32)
    wp, _ = _weights(rng, n, k4 + k8, 64)
    x = _x(rng, (m, k4 + k8))
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, k4 + k8), jnp.float32)
    out = {}
    for mode, interp in (("sim", False), ("pallas", True)):
        be = W4AxLinear(
            k4=k4, k8=k8, block=64, tile=64, permute=True, mode=mode, interpret=interp,
            act_layout=layout,
        )  # fmt: skip
        prepared = be.prepare_input({"perm": perm}, x, norm_w, eps=EPS)
        if mode == "pallas":
            kind = PreparedUnpacked if layout == "unpacked" else PreparedKernel
            assert isinstance(prepared, kind)
        out[mode] = np.asarray(be.matmul(wp, prepared))
    # Same integers; the kernel's f32 epilogue may order the two segment terms differently.
    np.testing.assert_allclose(out["pallas"], out["sim"], rtol=1e-6, atol=1e-6)


def test_auto_layout_switches_to_unpacked_at_large_m():
    """act_layout="auto" writes the unpacked operand from UNPACKED_MIN_M rows up (rows padded
    to UNPACKED_ROW_ALIGN, zeros past M) and the GEMM gives the sim path's values; a bad
    layout name is rejected."""
    from pallas_kernels.w4ax_matmul import UNPACKED_MIN_M, UNPACKED_ROW_ALIGN

    rng = np.random.default_rng(6)
    k4, k8, n = 64, 64, 16
    wp, _ = _weights(rng, n, k4 + k8, 64)
    be = W4AxLinear(k4=k4, k8=k8, block=64, tile=64, mode="pallas", interpret=True)
    sim = W4AxLinear(k4=k4, k8=k8, block=64, tile=64)
    for m, kind in ((UNPACKED_MIN_M - 1, PreparedKernel), (UNPACKED_MIN_M, PreparedUnpacked)):
        x = _x(rng, (m, k4 + k8))
        prepared = be.prepare_input(None, x, None, eps=EPS)
        assert isinstance(prepared, kind)
        y = np.asarray(be.matmul(wp, prepared))
        y_sim = np.asarray(sim.matmul(wp, sim.prepare_input(None, x, None, eps=EPS)))
        np.testing.assert_allclose(y, y_sim, rtol=1e-6, atol=1e-6)
    rows = -(-m // UNPACKED_ROW_ALIGN) * UNPACKED_ROW_ALIGN
    assert prepared.x_u.shape == (rows, k4 + k8) and prepared.m == m
    assert not np.asarray(prepared.x_u[m:]).any()
    np.testing.assert_array_equal(np.asarray(prepared.x_scales[m:]), 1.0)
    with pytest.raises(ValueError, match="act_layout='split'"):
        W4AxLinear(k4=k4, k8=k8, block=64, tile=64, act_layout="split")


# ---- K padded to whole blocks: 576 = 4.5 x 128 -> 640 (FMPQConfig.pad_k) -------------------


def _padded_pair(rng, n, w_group, bias, permute):
    """A padded block-128 backend and its unpadded reference (block 64, the same channels in
    the same order and precision), with weights quantized in each layout."""
    from comet_jax.quant import fmpq

    k, block, tile = 576, 128, 64
    x = _x(rng, (5, k), outliers=(3, 17, 400))
    cfg = fmpq.FMPQConfig(block_size=block, rule="budget", int8_budget=0.25, pad_k=True)
    if permute:
        plan = fmpq.plan_permutation(np.abs(np.asarray(x)).max(0), cfg)
    else:  # uniform-style identity plan: only the zeros in front
        plan = fmpq.FMPQPlan.identity(k, block, 1, pad_k=True)
    assert (plan.k, plan.pad, plan.k8) == (640, 64, 128)
    w = rng.standard_normal((n, k)).astype(np.float32)
    gran = "row" if w_group is None else "group"

    def wparams(w_layout):
        r = quantizers.quantize(jnp.asarray(w_layout), bits=4, granularity=gran, group_size=w_group)
        p = {"w_packed": pack.pack_int4(r.q, tile), "w_scales": r.scale}
        if bias:
            p["bias"] = jnp.asarray(np.arange(n, dtype=np.float32) / n)
        return p, r

    kw = dict(tile=tile, w_group=w_group, permute=permute)
    padded = W4AxLinear(k4=plan.k4, k8=plan.k8, block=block, pad=plan.pad, **kw)
    ref = W4AxLinear(k4=plan.k4 - plan.pad, k8=plan.k8, block=64, **kw)
    wp_pad, r_pad = wparams(fmpq.permute_in(w, plan))
    wp_ref, r_ref = wparams(w[:, plan.real_perm])
    gp_pad = {"perm": jnp.asarray(plan.perm)} if permute else None
    gp_ref = {"perm": jnp.asarray(plan.real_perm)} if permute else None
    return x, plan, (padded, wp_pad, r_pad, gp_pad), (ref, wp_ref, r_ref, gp_ref)


@pytest.mark.parametrize(
    "w_group,bias,permute,norm",
    [
        (None, False, True, True),
        (None, True, True, False),
        (64, False, True, True),  # weight groups: the zeros fill one group (scale 1, q 0)
        (None, False, False, True),  # identity plan: the backend only prepends the zeros
    ],
)
def test_w4ax_padded_equals_unpadded_reference(w_group, bias, permute, norm):
    rng = np.random.default_rng(30)
    n = 48
    x, plan, (be, wp, r_pad, gp), (be_ref, wp_ref, r_ref, gp_ref) = _padded_pair(
        rng, n, w_group, bias, permute
    )
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, 576), jnp.float32) if norm else None
    # Padded weights: zero columns where the zeros sit, no scale changed by them.
    zeros = np.asarray(plan.perm) < plan.pad
    q_pad = np.asarray(r_pad.q)
    assert np.all(q_pad[:, zeros] == 0)
    np.testing.assert_array_equal(q_pad[:, ~zeros], np.asarray(r_ref.q))
    s_pad = np.asarray(r_pad.scale)
    if w_group is None:
        np.testing.assert_array_equal(s_pad, np.asarray(r_ref.scale))
    else:  # the first group holds the 64 zeros (quantizers' scale 1 for an all-zero group)
        assert np.all(s_pad[:, 0] == 1.0)
        np.testing.assert_array_equal(s_pad[:, 1:], np.asarray(r_ref.scale))

    def run(b, g, w):
        return jax.jit(lambda x: (p := b.prepare_input(g, x, norm_w, eps=EPS), b.matmul(w, p)))(x)

    (prep, y), (prep_ref, y_ref) = run(be, gp, wp), run(be_ref, gp_ref, wp_ref)
    # Activations: zeros in the first INT4 block, everything else and both scales identical.
    q4 = np.asarray(pack.unpack_int4(prep.x4_packed, 64))
    q4_ref = np.asarray(pack.unpack_int4(prep_ref.x4_packed, 64))
    assert q4.shape == (5, plan.k4) and np.all(q4[:, : plan.pad] == 0)
    np.testing.assert_array_equal(q4[:, plan.pad :], q4_ref)
    np.testing.assert_array_equal(np.asarray(prep.x8), np.asarray(prep_ref.x8))
    np.testing.assert_array_equal(np.asarray(prep.x_scales), np.asarray(prep_ref.x_scales))
    # Output: the same integer accumulators and scales. Per-channel weight scales: the same
    # two-term f32 epilogue, up to the FMA contraction XLA may pick per graph (<= 2 ulp, as
    # above). Weight groups: one f32 term per group, 10 vs 9 of them (the zeros' term is 0)
    # summed in another order, so f32 rounding of the row's terms (1e-6 of max |y|).
    # (The zeros fill a whole packing tile here, so the kernel quantizes only the real
    # channels: the activation operands above are bit-identical by construction.)
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    atol = 0.0 if w_group is None else 1e-6 * np.abs(y_ref).max()
    np.testing.assert_allclose(y, y_ref, rtol=2.5e-7, atol=atol)


@pytest.mark.parametrize("norm", [False, True])
def test_w4ax_padded_general_path_all_int8(norm):
    """Zeros not in whole INT4 tiles (here: no INT4 segment, uniform W4A8 with 128-blocks):
    the input is normalized, zero-padded and gathered, then quantized."""
    rng = np.random.default_rng(33)
    k, n = 576, 32
    x = _x(rng, (4, k))
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32) if norm else None
    wp_ref, r = _weights(rng, n, k, 64)
    q_pad = jnp.concatenate([jnp.zeros((n, 64), jnp.int8), r.q], axis=1)
    wp = {"w_packed": pack.pack_int4(q_pad, 64), "w_scales": r.scale}
    be = W4AxLinear(k4=0, k8=640, block=128, tile=64, pad=64)
    ref = W4AxLinear(k4=0, k8=576, block=64, tile=64)
    prep, prep_ref = (b.prepare_input(None, x, norm_w, eps=EPS) for b in (be, ref))
    x8, x8_ref = np.asarray(prep.x8), np.asarray(prep_ref.x8)
    assert x8.shape == (4, 640) and np.all(x8[:, :64] == 0)
    y, y_ref = be.matmul(wp, prep), ref.matmul(wp_ref, prep_ref)
    if not norm:  # no float step before quantization: bit for bit
        np.testing.assert_array_equal(x8[:, 64:], x8_ref)
        np.testing.assert_array_equal(np.asarray(prep.x_scales), np.asarray(prep_ref.x_scales))
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2.5e-7)
    else:  # RMSNorm outside the fused reference: the normalized values may move by an ulp
        np.testing.assert_allclose(
            np.asarray(prep.x_scales), np.asarray(prep_ref.x_scales), rtol=1e-6
        )
        assert np.abs(x8[:, 64:].astype(int) - x8_ref).max() <= 1
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-3, atol=1e-3)


def test_w4ax_padded_block_granularity_scales_ignore_zeros():
    rng = np.random.default_rng(31)
    x, plan, (be, wp, _, gp), _ = _padded_pair(rng, 16, None, False, True)
    be = W4AxLinear(
        k4=be.k4, k8=be.k8, block=128, tile=64, permute=True, pad=plan.pad, act_granularity="block"
    )
    prep = be.prepare_input(gp, x, None, eps=EPS)
    assert prep.x_q.shape == (5, 640) and prep.x_scales.shape == (5, 5)
    zeros = np.asarray(plan.perm) < plan.pad
    assert np.all(np.asarray(prep.x_q)[:, zeros] == 0)
    # The first block: 64 zeros + 64 real channels; its scale is theirs alone.
    real0 = np.asarray(x)[:, plan.real_perm[:64]]
    s0 = quantizers.quantize(jnp.asarray(real0), bits=4, granularity="row").scale
    np.testing.assert_array_equal(np.asarray(prep.x_scales[:, 0]), np.asarray(s0))
    y = be.matmul(wp, prep)
    assert y.shape == (5, 16) and np.isfinite(np.asarray(y)).all()


def test_w4ax_padded_shapes_and_validation():
    be = W4AxLinear(k4=512, k8=128, block=128, tile=64, w_group=64, permute=True, pad=64)
    assert (be.in_features, be.padded_features) == (576, 640)
    p = be.weight_init(ProjSpec(0, "q_proj", 576, 32, False), jnp.float32)(jax.random.key(0))
    assert p["w_packed"].shape == (32, 320) and p["w_scales"].shape == (32, 10)
    from models.projection import GroupSpec

    g = be.group_init(GroupSpec(0, "attn_in", 576, True, ()), jnp.float32)(jax.random.key(0))
    assert g["perm"].shape == (640,)
    with pytest.raises(ValueError, match=r"k4\+k8-pad=576"):
        be.weight_init(ProjSpec(0, "q_proj", 640, 32, False), jnp.float32)
    with pytest.raises(ValueError, match="pad=640"):
        W4AxLinear(k4=512, k8=128, block=128, tile=64, pad=640)
    with pytest.raises(ValueError, match="K=640"):
        be.prepare_input({"perm": jnp.arange(640)}, jnp.ones((2, 640)), None, eps=EPS)


@pytest.mark.slow
@pytest.mark.parametrize("general,layout", [(False, "auto"), (True, "auto"), (False, "unpacked")])
def test_pallas_interpret_padded_matches_sim(general, layout):
    """Zeros in a whole INT4 tile (real channels quantized, zero bytes prepended; unpacked:
    zero channels) and the general path (all-INT8 layout: normalize, pad, gather): kernel ==
    simulation."""
    rng = np.random.default_rng(32)
    x, plan, (be, wp, _, gp), _ = _padded_pair(rng, 16, None, False, True)
    k4, k8 = (0, 640) if general else (be.k4, be.k8)
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, 576), jnp.float32)
    out = {}
    for mode, interp in (("sim", False), ("pallas", True)):
        b = W4AxLinear(
            k4=k4,
            k8=k8,
            block=128,
            tile=64,
            permute=True,
            pad=plan.pad,
            mode=mode,
            interpret=interp,
            act_layout=layout,
        )
        out[mode] = np.asarray(b.matmul(wp, b.prepare_input(gp, x, norm_w, eps=EPS)))
    np.testing.assert_allclose(out["pallas"], out["sim"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m,permute", [(3, False), (260, False), (5, True), (257, True)])
def test_w4ax_gate_quantizes_the_swiglu_hidden_state(m, permute):
    """prepare_input(gate=g) with the fused kernel (interpret) = prepare_input of the hidden
    state silu(g) * up that the layer would have written: same bytes, scales and GEMM
    output (tolerance: none), in the packed (small M) and unpacked (M >= 257) layouts, with
    the identity (folded) order and a runtime permutation; fuse_swiglu=False and the
    rotated / padded backends build the hidden state first, with the same result."""
    rng = np.random.default_rng(m)
    k4, k8, n = 128, 64, 32
    wp, _ = _weights(rng, n, k4 + k8, 64)
    up = _x(rng, (m, k4 + k8)).astype(jnp.bfloat16)
    gate = _x(rng, (m, k4 + k8), outliers=(5,)).astype(jnp.bfloat16)
    hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up).astype(jnp.bfloat16)
    gp = {"perm": jnp.asarray(rng.permutation(k4 + k8), jnp.int32)} if permute else None
    kw = dict(k4=k4, k8=k8, block=64, tile=64, permute=permute)
    fused = W4AxLinear(mode="pallas", interpret=True, **kw)
    plain = dataclasses.replace(fused, fuse_swiglu=False)
    sim = W4AxLinear(**kw)
    assert fused.fuses_swiglu and not plain.fuses_swiglu and sim.fuses_swiglu
    want = plain.prepare_input(gp, hidden, None, eps=EPS)
    for be, ref in ((fused, plain), (plain, plain), (sim, sim)):  # sim: packed at any M
        got = be.prepare_input(gp, up, None, eps=EPS, gate=gate)
        exp = ref.prepare_input(gp, hidden, None, eps=EPS)
        assert type(got) is type(exp)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exp)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y = np.asarray(fused.matmul(wp, fused.prepare_input(gp, up, None, eps=EPS, gate=gate)))
    np.testing.assert_array_equal(y, np.asarray(plain.matmul(wp, want)))
    assert np.abs(y).max() > 0
    assert not W4AxLinear(k4=64, k8=64, block=64, tile=64, rotate=True).fuses_swiglu


def test_group_matmul_runs_where_enabled_and_measured(monkeypatch):
    """W4AxLinear.group_matmul (fuse_projections): three projections' outputs from one GEMM
    over their concatenated weights, equal to one GEMM each (Pallas, interpret mode, one
    config for every shape); it declines (None) when not enabled, in simulation, for one
    projection, for different parameter sets (a bias on one), and where the tuning table has
    no entry of its own for the concatenated shape."""
    from pallas_kernels import tuning

    rng = np.random.default_rng(11)
    k4, k8, tile = 128, 128, 64
    backend = W4AxLinear(k4=k4, k8=k8, block=tile, tile=tile, mode="pallas", interpret=True)
    fused = dataclasses.replace(backend, fuse_projections=True)
    ws = [_weights(rng, n, k4 + k8, tile)[0] for n in (128, 64, 64)]
    x = _x(rng, (2, 3, k4 + k8))
    prep = fused.prepare_input(None, x, None, eps=EPS)
    assert fused.group_matmul(ws, prep) is None  # the real table: no entry at this shape
    one = wk.GemmConfig(64, 64, 1, 4, 3, False, 8)
    monkeypatch.setattr(tuning, "get_config", lambda m, n, k, k8=0, **kw: one)
    monkeypatch.setattr(tuning, "table_entry", lambda m, n, k, k8=0: one)
    ys = fused.group_matmul(ws, prep)
    assert [y.shape for y in ys] == [(2, 3, 128), (2, 3, 64), (2, 3, 64)]
    for y, w in zip(ys, ws):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(fused.matmul(w, prep)))
    assert backend.group_matmul(ws, prep) is None  # not enabled
    sim = dataclasses.replace(fused, mode="sim", interpret=False)
    assert sim.group_matmul(ws, sim.prepare_input(None, x, None, eps=EPS)) is None
    assert fused.group_matmul(ws[:1], prep) is None
    with_bias = [dict(ws[0], bias=jnp.ones((128,), jnp.float32)), *ws[1:]]
    assert fused.group_matmul(with_bias, prep) is None
