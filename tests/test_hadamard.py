"""Hadamard rotations: orthogonality (atol 1e-5 in f32), fast transform == matmul
(atol 1e-5 relative to O(1) data), layer invariance, and outlier spreading."""

import jax
import numpy as np
import pytest

from comet_jax.quant import hadamard as had


@pytest.mark.parametrize("n", [1, 8, 12, 20, 28, 36, 48, 576])
def test_orthogonal(n):
    r = np.asarray(had.hadamard_matrix(n))
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(n), rtol=1e-6)


def test_factors_and_unsupported():
    assert had.hadamard_factors(576) == (36, 16)
    assert had.hadamard_factors(1536) == (12, 128)
    assert had.hadamard_factors(14336) == (28, 512)
    with pytest.raises(ValueError, match="n=52"):
        had.hadamard_matrix(52)
    r = np.asarray(had.block_hadamard_matrix(52 * 4, 4))
    np.testing.assert_allclose(r @ r.T, np.eye(208), atol=1e-6)


@pytest.mark.parametrize("n", [64, 96])
def test_fast_transform_matches_matrix(n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, n)).astype(np.float32)
    np.testing.assert_allclose(
        had.hadamard_transform(x), x @ np.asarray(had.hadamard_matrix(n)), atol=1e-5
    )
    r = np.asarray(had.random_hadamard_matrix(n, jax.random.key(1)))
    signs = r[:, 0] * np.sqrt(n) * np.sign(np.asarray(had.hadamard_matrix(n))[:, 0])
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(had.hadamard_transform(x, signs), x @ r, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        had.fwht(x[..., :12])


def test_rotation_preserves_layer_and_spreads_outliers():
    rng = np.random.default_rng(2)
    n = 128
    x = rng.standard_normal((32, n)).astype(np.float32)
    x[:, [3, 77]] *= 50.0
    w = rng.standard_normal((16, n)).astype(np.float32)
    r = had.random_hadamard_matrix(n, jax.random.key(0))
    y = np.asarray(had.rotate_activation(x, r)) @ np.asarray(had.rotate_weight_in(w, r)).T
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-3 * np.abs(x @ w.T).max())
    # Producing side: a layer w_prod: [n, 16] whose outputs are rotated: (x w^T) r.
    w_prod, x16 = w.T.copy(), x[:, :16] / 50.0
    np.testing.assert_allclose(
        x16 @ np.asarray(had.rotate_weight_out(w_prod, r)).T,
        (x16 @ w_prod.T) @ np.asarray(r),
        rtol=1e-4,
        atol=1e-4,
    )
    xr = np.asarray(had.hadamard_transform(x))

    def max_to_rms(a):
        return (np.abs(a).max(-1) / np.sqrt((a**2).mean(-1))).mean()

    def kurtosis(a):
        return ((a**4).mean(-1) / (a**2).mean(-1) ** 2).mean()

    assert max_to_rms(xr) < 0.5 * max_to_rms(x)
    assert kurtosis(xr) < 0.2 * kurtosis(x)
