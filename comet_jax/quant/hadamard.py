"""QuaRot-style orthogonal rotations: Hadamard matrices and a fast online transform.

A rotation ``R: [K, K]`` with ``R R^T = I`` leaves a linear layer unchanged when applied to
both operands, ``(x R) (w R)^T = x w^T``, while spreading a few large activation channels
over all channels (lower max/rms per token, so fewer outliers for INT4 and for FMPQ's INT8
blocks). Weights are rotated offline (:func:`rotate_weight_in`; a producing layer's output
rows with :func:`rotate_weight_out`), activations online (:func:`hadamard_transform`) where
the rotation cannot be folded.

Construction of ``hadamard_matrix(n)`` (entries +-1/sqrt(n), exactly orthogonal):
  * ``n = 2^k``: Sylvester, ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` (natural order,
    ``H[i, j] = (-1)^popcount(i & j)``), applied online in O(n log n) by :func:`fwht`.
  * ``n = m * 2^k`` with ``m`` the smallest factor for which a Paley construction exists:
    ``R = kron(H_m, H_2^k)``. Paley I gives ``m = q + 1`` for a prime ``q = 3 mod 4``
    (12, 20, 24, 44, 48, 60, 68, 72, 80, 84, 104, 108, 132, 140, ...); Paley II gives
    ``m = 2 (q + 1)`` for a prime ``q = 1 mod 4`` (12, 28, 36, 60, 76, 84, 108, 124, 148, ...).
    Examples: 576 = 36 x 16, 896 = 28 x 32, 1536 = 12 x 128, 4864 = 76 x 64,
    14336 = 28 x 512, 18944 = 148 x 128. The online cost is one ``[m, m]`` matmul per token
    plus the fast transform (11008 = 5504 x 2 exists but is nearly a dense rotation).
    Sizes without a construction (e.g. 52) raise ValueError; :func:`block_hadamard_matrix`
    is the fallback, a block-diagonal ``I (x) H_b`` that spreads outliers only inside each
    block of b channels (weaker).
``random_hadamard_matrix`` multiplies rows by random signs (``R = diag(s) H``, still
orthogonal), as QuaRot does, so that no fixed input direction maps onto a single column.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "hadamard_matrix",
    "random_hadamard_matrix",
    "block_hadamard_matrix",
    "hadamard_factors",
    "fwht",
    "hadamard_transform",
    "rotate_weight_in",
    "rotate_weight_out",
    "rotate_activation",
]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character of GF(q), q prime."""
    squares = np.zeros(q, bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1, -1)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley_kind(m: int) -> int:
    """1 or 2 when Paley I or II builds a Hadamard matrix of order m, else 0."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return 0


def _paley(m: int) -> np.ndarray:
    """Unnormalized +-1 Hadamard matrix of order m by Paley I or II."""
    kind = _paley_kind(m)
    if kind == 1:
        q = m - 1
        s = np.zeros((m, m), np.int64)
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = _jacobsthal(q)  # skew-symmetric for q = 3 mod 4
        return s + np.eye(m, dtype=np.int64)
    if kind != 2:
        raise ValueError(f"m={m} is not a Paley order")
    q = m // 2 - 1
    c = np.zeros((m // 2, m // 2), np.int64)
    c[0, 1:], c[1:, 0] = 1, 1
    c[1:, 1:] = _jacobsthal(q)  # symmetric conference matrix
    a = np.array([[1, 1], [1, -1]])
    b = np.array([[1, -1], [-1, -1]])
    return np.kron(c, a) + np.kron(np.eye(m // 2, dtype=np.int64), b)


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` 1 or a Paley order."""
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    p = n & -n  # largest power of two dividing n
    odd = n // p
    m, p2 = odd, p
    while p2 >= 1:
        if m == 1 or _paley_kind(m):
            return m, p2
        m, p2 = m * 2, p2 // 2
    raise ValueError(
        f"n={n} = {odd} x {p}: no Hadamard construction here (need n = m * 2^k with "
        "m - 1 a prime = 3 mod 4 or m/2 - 1 a prime = 1 mod 4); use block_hadamard_matrix"
    )


@functools.lru_cache(maxsize=64)
def _hadamard_np(n: int) -> np.ndarray:
    m, p = hadamard_factors(n)
    if m == 1:
        return _sylvester(p).astype(np.float64) / math.sqrt(n)
    hm = _paley(m)
    # Exact integer check of the Paley factor (the Kronecker product with Sylvester's matrix
    # is then Hadamard too).
    if m <= 1024 and not np.array_equal(hm @ hm.T, m * np.eye(m, dtype=np.int64)):
        raise AssertionError(f"Paley construction of order {m} is not Hadamard")
    return np.kron(hm, _sylvester(p)).astype(np.float64) / math.sqrt(n)


def hadamard_matrix(n: int, dtype=jnp.float32) -> jnp.ndarray:
    """Orthonormal Hadamard matrix ``[n, n]`` (entries +-1/sqrt(n)); see module docstring."""
    return jnp.asarray(_hadamard_np(n), dtype)


def random_hadamard_matrix(n: int, key, dtype=jnp.float32) -> jnp.ndarray:
    """``diag(s) @ hadamard_matrix(n)`` with random signs ``s`` from ``key``."""
    s = jax.random.rademacher(key, (n,), jnp.float32)
    return (s[:, None] * hadamard_matrix(n, jnp.float32)).astype(dtype)


def block_hadamard_matrix(n: int, block: int, dtype=jnp.float32) -> jnp.ndarray:
    """Block-diagonal ``kron(I_{n/block}, H_block)``: orthogonal for any n divisible by block.

    Spreads outliers only inside each block of ``block`` channels (a fallback for sizes
    :func:`hadamard_matrix` cannot build).
    """
    if block <= 0 or n % block:
        raise ValueError(f"block={block} must be a positive divisor of n={n}")
    return jnp.asarray(np.kron(np.eye(n // block), _hadamard_np(block)), dtype)


@jax.jit
def fwht(x) -> jnp.ndarray:
    """Fast Walsh-Hadamard transform on the last axis: ``x @ hadamard_matrix(n)``, n = 2^k.

    ``x: [..., n]``; log2(n) butterfly stages (O(n log n)), computed in f32.
    """
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last axis, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).astype(x.dtype)


@jax.jit
def _kron_transform(x, hm):
    m = hm.shape[0]
    xm = x.astype(jnp.float32).reshape(*x.shape[:-1], m, x.shape[-1] // m)
    xm = jnp.einsum("...ij,ia->...aj", xm, hm)
    return fwht(xm).reshape(x.shape).astype(x.dtype)


def hadamard_transform(x, signs=None) -> jnp.ndarray:
    """Online rotation ``x @ R`` for ``R = diag(signs) @ hadamard_matrix(n)`` (signs optional).

    ``x: [..., n]``, ``n = m * 2^k``: the ``2^k`` part by :func:`fwht`, the ``m`` part by an
    ``[m, m]`` matmul, since ``x kron(A, B) = A^T X B`` for ``X = x.reshape(m, 2^k)``.
    """
    x = jnp.asarray(x)
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    if signs is not None:
        if np.shape(signs) != (n,):
            raise ValueError(f"signs has shape {np.shape(signs)}, expected [{n}]")
        x = x * jnp.asarray(signs, x.dtype)
    if m == 1:
        return fwht(x)
    return _kron_transform(x, jnp.asarray(_paley(m) / math.sqrt(m), jnp.float32))


def rotate_weight_in(w, r) -> jnp.ndarray:
    """``w: [N, K] -> w @ r``: the consumer side, so that ``(x r) (w r)^T = x w^T``."""
    if w.shape[-1] != r.shape[0]:
        raise ValueError(f"w has K={w.shape[-1]} input channels, rotation is {r.shape}")
    return jnp.asarray(w) @ jnp.asarray(r, jnp.asarray(w).dtype)


def rotate_weight_out(w, r) -> jnp.ndarray:
    """``w: [N, K] -> r^T @ w``: a producing layer whose outputs become ``y @ r``."""
    if w.shape[0] != r.shape[0]:
        raise ValueError(f"w has N={w.shape[0]} output rows, rotation is {r.shape}")
    return jnp.asarray(r, jnp.asarray(w).dtype).T @ jnp.asarray(w)


def rotate_activation(x, r) -> jnp.ndarray:
    """``x: [..., K] -> x @ r`` with an explicit matrix (see hadamard_transform for fast)."""
    if x.shape[-1] != r.shape[0]:
        raise ValueError(f"x has K={x.shape[-1]} channels, rotation is {r.shape}")
    return jnp.asarray(x) @ jnp.asarray(r, jnp.asarray(x).dtype)
