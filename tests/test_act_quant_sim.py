"""Simulated FMPQ activation quantization.

Integer values and scales must be bit-identical to comet_jax.quant.quantizers.quantize on the
segments (assert_array_equal); the integer matmul check uses int32 products (exact) and
compares the f32 epilogue to the fake-quant float matmul with rtol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant import act_quant, fmpq
from comet_jax.quant.pack import unpack_int4
from comet_jax.quant.quantizers import quantize as _quantize_eager

# Reference under jit, as the kernels' references run: XLA turns the scale's division by the
# constant qmax into a multiply (op-by-op execution can differ by one ulp).
quantize = jax.jit(
    _quantize_eager,
    static_argnames=("bits", "symmetric", "granularity", "group_size", "clip_ratio"),
)


def _x(rng, shape, outliers=(5, 70)):
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., list(outliers)] *= 60.0
    return x


def test_segment_matches_quantizers_bitwise():
    rng = np.random.default_rng(0)
    x = _x(rng, (7, 256))
    plan = fmpq.plan_permutation(np.abs(x).max(0), fmpq.FMPQConfig(block_size=64))
    assert plan.n_int8_blocks == 1
    r = act_quant.quantize_activation_plan(x, plan)
    xp = x[:, plan.perm]
    ref4 = quantize(xp[:, :192], bits=4, granularity="row")
    ref8 = quantize(xp[:, 192:], bits=8, granularity="row")
    np.testing.assert_array_equal(r.q4, ref4.q)
    np.testing.assert_array_equal(r.q8, ref8.q)
    np.testing.assert_array_equal(r.s4, ref4.scale)
    np.testing.assert_array_equal(r.s8, ref8.scale)
    assert r.q4.dtype == jnp.int8 and r.q8.dtype == jnp.int8
    assert int(jnp.abs(r.q4).max()) <= 8 and r.x_scales().shape == (7, 2)
    x_hat = np.concatenate(
        [
            np.asarray(r.q4, np.float32) * np.asarray(r.s4)[:, None],
            np.asarray(r.q8, np.float32) * np.asarray(r.s8)[:, None],
        ],
        axis=1,
    )
    np.testing.assert_array_equal(r.x_hat, x_hat)
    np.testing.assert_array_equal(unpack_int4(r.x4_packed(64), 64), r.q4)
    # The outlier channels sit in the INT8 segment: much smaller error than uniform INT4.
    err_fmpq = np.abs(np.asarray(r.x_hat) - xp).mean()
    err_a4 = np.abs(np.asarray(quantize(xp, bits=4).q) * quantize(xp, bits=4).scale[:, None] - xp)
    assert err_fmpq < 0.2 * err_a4.mean()
    unperm = act_quant.fake_quantize_activation(x, plan, unpermute=True)
    np.testing.assert_array_equal(np.asarray(unperm)[:, plan.perm], r.x_hat)


def test_block_granularity_and_clipping():
    rng = np.random.default_rng(1)
    x = _x(rng, (2, 3, 128))
    r = act_quant.quantize_activation(
        x, k4=64, granularity="block", block_size=32, clip_ratio4=0.9, clip_ratio8=0.95
    )
    assert r.s4.shape == (2, 3, 2) and r.s8.shape == (2, 3, 2) and r.q4.shape == (2, 3, 64)
    ref = quantize(x[..., :64], bits=4, granularity="group", group_size=32, clip_ratio=0.9)
    np.testing.assert_array_equal(r.q4, ref.q)
    np.testing.assert_array_equal(r.s4, ref.scale)
    ref8 = quantize(x[..., 64:], bits=8, granularity="group", group_size=32, clip_ratio=0.95)
    np.testing.assert_array_equal(r.q8, ref8.q)
    with pytest.raises(ValueError, match="segment"):
        r.x_scales()


@pytest.mark.parametrize("k4", [0, 128])
def test_empty_segments(k4):
    x = _x(np.random.default_rng(2), (1, 128))
    r = act_quant.quantize_activation(x, k4=k4, block_size=64)
    assert r.q4.shape == (1, k4) and r.q8.shape == (1, 128 - k4)
    empty_scale = r.s4 if k4 == 0 else r.s8
    np.testing.assert_array_equal(empty_scale, np.ones(1, np.float32))
    bits = 8 if k4 == 0 else 4
    np.testing.assert_array_equal(r.x_hat, quantize(x, bits=bits).q * quantize(x, bits=bits).scale)


def test_integer_matmul_equals_fake_quant_matmul():
    rng = np.random.default_rng(3)
    x, w = _x(rng, (4, 128)), rng.standard_normal((16, 128)).astype(np.float32)
    plan = fmpq.plan_permutation(np.abs(x).max(0), fmpq.FMPQConfig(block_size=64))
    r = act_quant.quantize_activation_plan(x, plan)
    wq = quantize(fmpq.permute_in(w, plan), bits=4, granularity="row")
    q4, q8, wi = (np.asarray(a, np.int32) for a in (r.q4, r.q8, wq.q))
    acc4, acc8 = q4 @ wi[:, : plan.k4].T, q8 @ wi[:, plan.k4 :].T  # exact int32
    s4, s8, sw = np.asarray(r.s4), np.asarray(r.s8), np.asarray(wq.scale)
    y_int = s4[:, None] * sw[None] * acc4 + s8[:, None] * sw[None] * acc8
    y_fake = np.asarray(r.x_hat) @ (np.asarray(wq.q, np.float32) * sw[:, None]).T
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-4 * np.abs(y_fake).max())


def test_bad_arguments():
    x = np.ones((2, 128), np.float32)
    with pytest.raises(ValueError, match="k4=32"):
        act_quant.quantize_activation(x, k4=32, block_size=64)
    with pytest.raises(ValueError, match="K=128"):
        act_quant.quantize_activation(x, k4=0, block_size=96)
    with pytest.raises(ValueError, match="granularity"):
        act_quant.quantize_activation(x, k4=64, block_size=64, granularity="tensor")
