"""Quantized projection backends: the simulated path is the kernels' arithmetic, bit for bit.

Tolerances: integer paths and every comparison against a kernel reference are exact (0 ulp:
same integers, same scales, same f32 epilogue). Comparisons against a float matmul of the
dequantized operands allow f32 summation-order error (rtol 1e-5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant import pack, quantizers
from comet_jax.quant.qlinear import W4A16Linear, W4AxLinear, W8A8Linear
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
        W4A16Linear(mode="pallas")
    with pytest.raises(ValueError, match="K=256"):
        be.weight_init(ProjSpec(0, "q_proj", 256, 32, False), jnp.float32)


@pytest.mark.slow
def test_pallas_interpret_matches_sim_tiny():
    rng = np.random.default_rng(5)
    m, k4, k8, n = 16, 64, 64, 16
    perm = jnp.asarray(rng.permutation(k4 + k8), jnp.int32)
    wp, _ = _weights(rng, n, k4 + k8, 64)
    x = _x(rng, (m, k4 + k8))
    norm_w = jnp.asarray(rng.uniform(0.5, 1.5, k4 + k8), jnp.float32)
    out = {}
    for mode, interp in (("sim", False), ("pallas", True)):
        be = W4AxLinear(k4=k4, k8=k8, block=64, tile=64, permute=True, mode=mode, interpret=interp)
        out[mode] = np.asarray(be.matmul(wp, be.prepare_input({"perm": perm}, x, norm_w, eps=EPS)))
    # Same integers; the kernel's f32 epilogue may order the two segment terms differently.
    np.testing.assert_allclose(out["pallas"], out["sim"], rtol=1e-6, atol=1e-6)
