"""GPTQ against RTN on correlated inputs.

What is asserted: (1) the output error tr(E H E^T) of GPTQ is below RTN's on random
correlated X (per channel, per group, act-order) -- by a margin (< 0.8x) far outside f32
noise; (2) with a diagonal H (no off-diagonal coupling, so the error feedback is zero) GPTQ
returns RTN's integers and scales exactly; (3) w_hat == quantizers.dequantize(q, scales).
"""

import numpy as np
import pytest

from comet_jax.quant import fmpq
from comet_jax.quant.gptq import gptq_quantize, output_error, rtn_quantize
from comet_jax.quant.quantizers import dequantize

N, K = 16, 96


def _problem(seed=0, k=K):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.standard_normal((4 * k, k)) @ mix) * (1 + 3 * rng.random(k))
    w = rng.standard_normal((N, k)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32)


@pytest.mark.parametrize(
    "group_size, act_order", [(None, False), (32, False), (None, True), (32, True)]
)
def test_gptq_beats_rtn(group_size, act_order):
    w, h = _problem()
    # block_size 64 does not divide K=96: exercises the padded last block.
    res = gptq_quantize(w, h, group_size=group_size, act_order=act_order, block_size=64)
    rtn = rtn_quantize(w, group_size=group_size)
    assert res.q.shape == (N, K) and str(res.q.dtype) == "int8"
    assert int(np.abs(np.asarray(res.q)).max()) <= 8
    assert res.scales.shape == ((N,) if group_size is None else (N, K // group_size))
    gran = "row" if group_size is None else "group"
    np.testing.assert_array_equal(
        res.w_hat, dequantize(res.q, res.scales, granularity=gran, group_size=group_size)
    )
    assert float(output_error(w, res.w_hat, h)) < 0.8 * float(output_error(w, rtn.w_hat, h))


@pytest.mark.parametrize("group_size", [None, 32])
def test_diagonal_hessian_equals_rtn(group_size):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((N, K)).astype(np.float32)
    h = np.diag(0.5 + rng.random(K)).astype(np.float32)
    res = gptq_quantize(w, h, group_size=group_size, block_size=64)
    rtn = rtn_quantize(w, group_size=group_size)
    np.testing.assert_array_equal(res.q, rtn.q)
    np.testing.assert_array_equal(res.scales, rtn.scales)


def test_fmpq_layout_roundtrip():
    """GPTQ on the FMPQ-permuted layout equals GPTQ's math on permuted inputs (same H)."""
    w, h = _problem(seed=2)
    plan = fmpq.plan_permutation(np.sqrt(np.diag(h)), fmpq.FMPQConfig(block_size=32, rule="budget"))
    wp, hp = fmpq.permute_in(w, plan), fmpq.permute_hessian(h, plan)
    res = gptq_quantize(wp, hp, act_order=True, block_size=64)
    # Error measured in either layout is the same quantity.
    e_perm = float(output_error(wp, res.w_hat, hp))
    e_orig = float(output_error(w, np.asarray(res.w_hat)[:, plan.inv_perm], h))
    np.testing.assert_allclose(e_perm, e_orig, rtol=1e-4)


def test_dead_channel_and_errors():
    w, h = _problem(seed=3)
    h[5, :] = 0.0
    h[:, 5] = 0.0
    res = gptq_quantize(w, h, block_size=64)
    assert np.all(np.isfinite(np.asarray(res.w_hat)))
    with pytest.raises(ValueError, match="h has shape"):
        gptq_quantize(w, h[:8, :8])
    with pytest.raises(ValueError, match="group_size=40"):
        gptq_quantize(w, h, group_size=40)
    with pytest.raises(ValueError, match="bits=3"):
        gptq_quantize(w, h, bits=3)


def test_given_scales_are_kept():
    w, h = _problem(seed=4)
    rtn = rtn_quantize(w, group_size=32, clip_ratio=0.9)
    res = gptq_quantize(w, h, group_size=32, block_size=64, scales=rtn.scales)
    np.testing.assert_array_equal(res.scales, rtn.scales)
    assert float(output_error(w, res.w_hat, h)) < float(output_error(w, rtn.w_hat, h))
    with pytest.raises(ValueError, match="scales has shape"):
        gptq_quantize(w, h, scales=rtn.scales)
