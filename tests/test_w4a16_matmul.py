"""W4A16 GEMM (the W4Ax kernel with one float segment), interpret mode, vs its jnp reference.

Tolerances: with f32 output the kernel and the reference multiply the same bf16 activations
by the same (exact in bf16) x16 weights and differ only in f32 summation order: relative
Frobenius error < 1e-5. With bf16 output: < 1e-2 (bf16 rounding is ~4e-3 relative). Against
unquantized float weights the error is the INT4 weight error, checked loosely (< 0.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant import pack
from pallas_kernels.tuning import a16_config
from pallas_kernels.w4ax_matmul import GemmConfig, w4a16_matmul, w4a16_matmul_reference

TILE = 64
DECODE = GemmConfig(block_m=16, block_n=32, split_k=3, num_stages=2, swap_ab=True, group_m=1)
PREFILL = GemmConfig(block_m=32, block_n=32, split_k=1, num_stages=2, swap_ab=False, group_m=2)
PRE_W = GemmConfig(block_m=16, block_n=32, split_k=2, swap_ab=True, group_m=1, pre_unpack="w")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _operands(seed, m, n, k, group=None, bias=True, x_dtype=jnp.bfloat16):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k1, (m, k), jnp.float32).astype(x_dtype)
    q = jax.random.randint(k2, (n, k), -8, 8).astype(jnp.int8)
    w_scales = jax.random.uniform(
        k3, (n,) if group is None else (n, k // group), jnp.float32, 0.01, 0.05
    )
    b = jax.random.normal(k4, (n,), jnp.float32) if bias else None
    return x, q, pack.pack_int4(q, TILE), w_scales, b


@pytest.mark.parametrize(
    "m,n,k,group,cfg",
    [
        (1, 64, 256, None, DECODE),  # decode, M = 1, split-K over 4 tiles
        (5, 96, 320, 64, DECODE),  # ragged M, group scales, 5 K tiles over 3 splits
        (40, 64, 192, None, PREFILL),  # M not a multiple of block_m
        (33, 32, 256, 128, PRE_W),  # weights unpacked by XLA, groups of 2 tiles
        (17, 64, 256, None, None),  # the a16_config heuristic
    ],
)
def test_kernel_matches_reference(m, n, k, group, cfg):
    x, _, w_packed, w_scales, b = _operands(m, m, n, k, group)
    kw = dict(tile_k=TILE, out_dtype=jnp.float32)
    ref = w4a16_matmul_reference(x, w_packed, w_scales, b, **kw)
    out = w4a16_matmul(x, w_packed, w_scales, b, interpret=True, config=cfg, **kw)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert _rel(out, ref) < 1e-5
    out16 = w4a16_matmul(x, w_packed, w_scales, b, tile_k=TILE, interpret=True, config=cfg)
    assert out16.dtype == jnp.bfloat16 and _rel(out16, ref) < 1e-2


def test_reference_is_the_dequantized_product():
    # f32 activations: the reference rounds them to bf16 as the MMA does; the rest is exact.
    x, q, w_packed, w_scales, _ = _operands(
        3, 6, 32, 128, group=64, bias=False, x_dtype=jnp.float32
    )
    ref = w4a16_matmul_reference(x, w_packed, w_scales, None, tile_k=TILE, out_dtype=jnp.float32)
    w = np.asarray(q, np.float64) * np.repeat(np.asarray(w_scales, np.float64), 64, axis=1)
    xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(ref), xb @ w.T, rtol=1e-5, atol=1e-5)
    out = w4a16_matmul(x, w_packed, w_scales, None, tile_k=TILE, out_dtype=jnp.float32,
                       interpret=True, config=DECODE)  # fmt: skip
    assert _rel(out, xb @ w.T) < 1e-5


def test_heuristic_schedules():
    assert a16_config(1, 4096, 4096).swap_ab and a16_config(1, 4096, 4096).block_m == 16
    assert a16_config(1, 4096, 4096).split_k > 1  # 64 output tiles: split K to fill the SMs
    big = a16_config(4096, 4096, 4096)
    assert big.block_m == 128 and big.split_k == 1 and big.swap_ab


@pytest.mark.parametrize(
    "mutate,match",
    [
        (dict(x=jnp.ones((4, 128), jnp.int8)), "float"),
        (dict(x=jnp.ones((4, 64), jnp.bfloat16)), "expected"),
        (dict(w_scales=jnp.ones((32, 3), jnp.float32)), "group size"),
        (dict(bias=jnp.ones((8,), jnp.float32)), "bias"),
    ],
)
def test_bad_inputs_raise(mutate, match):
    x, _, w_packed, w_scales, b = _operands(0, 4, 32, 128)
    args = dict(x=x, w_packed=w_packed, w_scales=w_scales, bias=b)
    args.update(mutate)
    with pytest.raises(ValueError, match=match):
        w4a16_matmul(**args, tile_k=TILE, interpret=True)


def test_configs_without_meaning_for_a16_are_refused():
    x, _, w_packed, w_scales, b = _operands(0, 4, 32, 128)
    for cfg in (GemmConfig(pre_unpack="wx"), GemmConfig(backend="xla_int8")):
        with pytest.raises(ValueError, match="W4A16"):
            w4a16_matmul(x, w_packed, w_scales, b, tile_k=TILE, interpret=True, config=cfg)
