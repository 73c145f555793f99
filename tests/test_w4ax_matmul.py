"""W4Ax GEMM kernel (interpret mode) vs its jnp reference and a float dequantized matmul.

Tolerances: the int32 accumulators must agree exactly (integer path); after the epilogue,
relative Frobenius error < 1e-2 (the output is bf16, ~4e-3 relative rounding; f32 outputs
land near 1e-7). Tiles are tiny (tile_k 64, blocks 16/32) so interpret mode stays fast.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.tuning import default_config, get_config, random_operands
from pallas_kernels.w4ax_matmul import (
    GemmConfig,
    dequantized_matmul,
    w4a16_matmul,
    w4ax_accumulators,
    w4ax_accumulators_reference,
    w4ax_matmul,
    w4ax_matmul_reference,
)

TILE = 64
DECODE = GemmConfig(
    block_m=16, block_n=32, split_k=3, num_warps=4, num_stages=2, swap_ab=True, group_m=1
)
PREFILL = GemmConfig(
    block_m=32, block_n=32, split_k=1, num_warps=4, num_stages=2, swap_ab=False, group_m=2
)
# Weights (and INT4 activations) unpacked to x16 int8 by XLA before the kernel.
PRE_W = GemmConfig(block_m=32, block_n=32, split_k=2, swap_ab=False, group_m=2, pre_unpack="w")
PRE_WX = GemmConfig(block_m=32, block_n=32, split_k=1, swap_ab=False, group_m=2, pre_unpack="wx")
PRE_X = GemmConfig(block_m=16, block_n=32, split_k=3, swap_ab=True, group_m=1, pre_unpack="x")
# One int32 accumulator: the INT8 segment first, its partial parked in bf16.
ONE_ACC = GemmConfig(block_m=32, block_n=32, pre_unpack="wx", group_m=2, acc8_first=True)
ONE_ACC_SWAP = GemmConfig(
    block_m=16, block_n=32, split_k=3, swap_ab=True, group_m=1, pre_unpack="x", acc8_first=True
)

# One int32 accumulator, the INT8 partial parked in the output tile (global memory).
PARK = GemmConfig(block_m=32, block_n=32, pre_unpack="wx", group_m=2, park_out=True)
PARK_SWAP = GemmConfig(
    block_m=16, block_n=32, split_k=3, swap_ab=True, group_m=1, pre_unpack="x", park_out=True
)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "m,n,k,k8,cfg,group,use_bias",
    [
        (1, 96, 256, 64, DECODE, None, True),  # M=1, 25% INT8, N not a power of two, split-K
        (5, 224, 256, 0, DECODE, None, False),  # W4A4 (0% INT8)
        (40, 96, 256, 128, PREFILL, None, True),  # M not a multiple of the tile, 50%
        (33, 64, 256, 256, PREFILL, 128, False),  # W4A8 (100% INT8), group scales
        (3, 64, 384, 128, DECODE, 64, True),  # group scales with split-K across segments
        (40, 96, 256, 64, PRE_WX, None, True),  # pre-unpacked weights and activations
        (33, 64, 384, 128, PRE_W, 64, False),  # pre-unpacked weights, groups, split-K
        (17, 32, 256, 0, PRE_WX, None, False),  # pre-unpacked, W4A4
        (9, 32, 256, 256, PRE_WX, None, True),  # pre-unpacked, W4A8 (no INT4 segment)
        (3, 96, 384, 128, PRE_X, None, True),  # pre-unpacked activations, swap_ab, split-K
        (20, 64, 256, 64, PRE_X, 128, False),  # pre-unpacked activations, group scales
        (40, 96, 256, 64, ONE_ACC, None, True),  # one accumulator, INT8 segment first
        (17, 32, 256, 0, ONE_ACC, None, False),  # one accumulator, W4A4
        (9, 32, 256, 256, ONE_ACC, None, True),  # one accumulator, W4A8
        (3, 96, 384, 128, ONE_ACC_SWAP, None, True),  # swap_ab, split-K across segments
        (24, 64, 384, 128, dataclasses.replace(ONE_ACC, pre_unpack=""), None, False),
        (40, 96, 256, 64, PARK, None, True),  # INT8 partial parked in the output tile
        (17, 32, 256, 0, PARK, None, False),  # parked, W4A4 (one segment: nothing to park)
        (9, 32, 256, 256, PARK, None, True),  # parked, W4A8
        (3, 96, 384, 128, PARK_SWAP, None, True),  # parked, swap_ab, split-K across segments
        (20, 64, 256, 64, PARK_SWAP, 128, False),  # parked, group scales
        (24, 64, 384, 128, dataclasses.replace(PARK, pre_unpack=""), 64, True),  # in-loop unpack
    ],
)
def test_kernel_matches_reference(m, n, k, k8, cfg, group, use_bias):
    key = jax.random.PRNGKey(m * 1000 + k8)
    ops = random_operands(key, m, n, k, k8, tile_k=TILE, group_size=group)
    assert int(jnp.count_nonzero(ops[3])) > 0
    bias = jax.random.normal(jax.random.fold_in(key, 1), (n,)) * 0.05 if use_bias else None

    # Exact integer agreement before the epilogue.
    acc = w4ax_accumulators(ops[0], ops[1], ops[3], tile_k=TILE, interpret=True, config=cfg)
    ref = w4ax_accumulators_reference(ops[0], ops[1], ops[3], tile_k=TILE)
    for a, r in zip(acc, ref):
        assert a.dtype == jnp.int32 and a.shape == (m, n)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))

    y = w4ax_matmul(*ops, bias, tile_k=TILE, interpret=True, config=cfg)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    y_ref = w4ax_matmul_reference(*ops, bias, tile_k=TILE, out_dtype=jnp.float32)
    y_deq = dequantized_matmul(*ops, tile_k=TILE)
    if bias is not None:
        y_deq = y_deq + bias
    assert _rel(y.astype(jnp.float32), y_ref) < 1e-2
    assert _rel(y.astype(jnp.float32), y_deq) < 1e-2


def test_acc8_first_rounds_only_the_int8_partial():
    """acc8_first parks acc8 * s8 in bf16: with f32 output the only difference from the
    two-accumulator kernel is that one rounding, <= 2^-9 of the INT8 term per element."""
    m, n, k, k8 = 24, 64, 384, 128
    ops = random_operands(jax.random.PRNGKey(11), m, n, k, k8, tile_k=TILE)
    two = dataclasses.replace(ONE_ACC, acc8_first=False)
    kw = dict(tile_k=TILE, interpret=True, out_dtype=jnp.float32)
    y1 = np.asarray(w4ax_matmul(*ops, config=ONE_ACC, **kw), np.float64)
    y2 = np.asarray(w4ax_matmul(*ops, config=two, **kw), np.float64)
    acc8 = np.asarray(w4ax_accumulators_reference(ops[0], ops[1], ops[3], tile_k=TILE)[1])
    term8 = np.abs(acc8 * np.asarray(ops[2])[:, 1:2] * np.asarray(ops[4])[None, :])
    assert np.all(np.abs(y1 - y2) <= term8 * 2.0**-8 + 1e-6)
    assert not np.array_equal(y1, y2)  # the rounding happened (random data)


@pytest.mark.parametrize("cfg", [PARK, PARK_SWAP, dataclasses.replace(PARK, split_k=2)])
def test_park_out_rounds_only_the_int8_partial(cfg):
    """park_out stores acc8 * s8 into the output tile and adds it back after the INT4 loop:
    exact int32 sums in raw mode; with bf16 output it differs from the two-accumulator
    kernel only by that partial's rounding to bf16 (<= 2^-9 of it) before the final one;
    with split-K the partials are f32, so parking loses nothing."""
    m, n, k, k8 = 24, 64, 384, 128
    ops = random_operands(jax.random.PRNGKey(14), m, n, k, k8, tile_k=TILE)
    kw = dict(tile_k=TILE, interpret=True)
    got = w4ax_accumulators(ops[0], ops[1], ops[3], config=cfg, **kw)
    ref = w4ax_accumulators_reference(ops[0], ops[1], ops[3], tile_k=TILE)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    two = dataclasses.replace(cfg, park_out=False)
    y1 = np.asarray(w4ax_matmul(*ops, config=cfg, **kw).astype(jnp.float32), np.float64)
    y2 = np.asarray(w4ax_matmul(*ops, config=two, **kw).astype(jnp.float32), np.float64)
    term8 = np.abs(np.asarray(ref[1]) * np.asarray(ops[2])[:, 1:2] * np.asarray(ops[4])[None, :])
    y_ref = np.asarray(w4ax_matmul_reference(*ops, tile_k=TILE, out_dtype=jnp.float32))
    # Two bf16 roundings at most (the parked partial's, then the output's) against one.
    bound = term8 * 2.0**-8 + np.abs(y_ref) * 2.0**-7 + 1e-6
    assert np.all(np.abs(y1 - y2) <= bound)
    assert np.all(np.abs(y1 - y_ref) <= bound)
    if cfg.split_k > 1:
        np.testing.assert_allclose(y1, y2, rtol=2.0**-7)
    else:
        assert not np.array_equal(y1, y2)  # the parked partial was rounded (random data)


def test_park_out_and_acc8_first_are_exclusive():
    with pytest.raises(ValueError, match="acc8_first and park_out"):
        GemmConfig(acc8_first=True, park_out=True)


def test_acc8_first_rejects_group_scales_and_a16():
    ops = random_operands(jax.random.PRNGKey(12), 4, 32, 256, 64, tile_k=TILE, group_size=128)
    with pytest.raises(ValueError, match="acc8_first needs per-channel.*group scales"):
        w4ax_matmul(*ops, tile_k=TILE, interpret=True, config=ONE_ACC)
    x = jax.random.normal(jax.random.PRNGKey(13), (4, 256), jnp.bfloat16)
    ops = random_operands(jax.random.PRNGKey(12), 4, 32, 256, 0, tile_k=TILE)
    with pytest.raises(ValueError, match="acc8_first needs per-channel.*W4A16"):
        cfg = dataclasses.replace(ONE_ACC, pre_unpack="")
        w4a16_matmul(x, ops[3], ops[4], tile_k=TILE, interpret=True, config=cfg)


def test_f32_output_and_default_config():
    """config=None goes through the tuning table / heuristic; f32 output is near-exact."""
    m, n, k, k8 = 2, 64, 256, 128
    ops = random_operands(jax.random.PRNGKey(3), m, n, k, k8, tile_k=TILE)
    y = w4ax_matmul(*ops, tile_k=TILE, interpret=True, out_dtype=jnp.float32)
    y_ref = w4ax_matmul_reference(*ops, tile_k=TILE, out_dtype=jnp.float32)
    assert _rel(y, y_ref) < 1e-5


@pytest.mark.parametrize("cfg", [DECODE, PREFILL, PRE_WX, ONE_ACC, PARK])
def test_bf16_output_is_the_f32_output_rounded_once(cfg):
    """The engine asks for the compute dtype straight from the epilogue (QLinear): the same
    bf16 values as the f32 output cast afterwards (split-K partials are f32 either way), except
    park_out, whose parked INT8 partial takes the output dtype once more (<= 2^-9 of it)."""
    m, n, k, k8 = 9, 96, 256, 64
    ops = random_operands(jax.random.PRNGKey(21), m, n, k, k8, tile_k=TILE)
    bias = jax.random.normal(jax.random.PRNGKey(22), (n,), jnp.float32)
    kw = dict(tile_k=TILE, interpret=True, config=cfg)
    y16 = w4ax_matmul(*ops, bias, out_dtype=jnp.bfloat16, **kw)
    y32 = w4ax_matmul(*ops, bias, out_dtype=jnp.float32, **kw)
    assert y16.dtype == jnp.bfloat16
    if cfg.park_out:
        assert _rel(y16.astype(jnp.float32), y32) < 2**-8
    else:
        np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))


def test_default_config_above_m512_runs_parked():
    """config=None at M > 512 (no table entry for this shape): the heuristic's parked
    128x128 config, through interpret mode, within the bf16 bound of the reference."""
    m, n, k, k8 = 520, 64, 256, 128
    assert get_config(m, n, k, k8).park_out
    ops = random_operands(jax.random.PRNGKey(15), m, n, k, k8, tile_k=TILE)
    y = w4ax_matmul(*ops, tile_k=TILE, interpret=True)
    y_ref = w4ax_matmul_reference(*ops, tile_k=TILE, out_dtype=jnp.float32)
    assert _rel(y.astype(jnp.float32), y_ref) < 1e-2


def test_heuristic_paths():
    assert default_config(1, 4096, 4096).swap_ab  # decode: weights as the MMA's A operand
    assert default_config(16, 4096, 4096).split_k > 1
    assert not default_config(4096, 4096, 4096).swap_ab
    assert default_config(4096, 4096, 4096).pre_unpack == "wx"  # compute-bound: XLA unpacks
    assert default_config(1024, 4096, 4096).park_out  # one accumulator: 128x128 at 4 warps
    assert default_config(64, 4096, 4096).pre_unpack == ""  # decode: bytes, unpack in-kernel
    mid = default_config(256, 8192, 8192)  # Y^T tiles over pre-unpacked INT4 activations
    assert mid.swap_ab and mid.pre_unpack == "x" and mid.split_k == 1
    assert default_config(512, 1024, 4096) == mid  # M = 512: the same tiles, any N
    assert default_config(513, 4096, 4096).park_out  # the M = 1024 bucket: parked tiles
    assert default_config(256, 1024, 8192).pre_unpack == ""
    from pallas_kernels.tuning import candidates

    for m in (16, 256, 1024):  # --regenerate tries pre-unpacked variants at every M
        assert any(c.pre_unpack for c in candidates(m, 4096, 4096))
    assert get_config(3, 14336, 4096, 1024).block_m >= 16


def _ok_args(m=4, n=32, k=256, k8=128):
    return list(random_operands(jax.random.PRNGKey(0), m, n, k, k8, tile_k=TILE))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :100]), "K8=100"),  # K8 not a multiple of tile
        (lambda a: a.__setitem__(0, a[0][:, :20]), "K4=40"),  # K4 not a multiple of tile
        (lambda a: a.__setitem__(2, a[2][:, :1]), "x_scales"),
        (lambda a: a.__setitem__(4, a[4][:16]), "w_scales"),
        (lambda a: a.__setitem__(4, jnp.ones((32, 3), jnp.float32)), "w_scales"),
        (lambda a: a.__setitem__(3, a[3][:, :64]), "w_packed"),
        (lambda a: a.__setitem__(1, a[1].astype(jnp.int32)), "x8 must be int8"),
        (lambda a: a.__setitem__(2, a[2].astype(jnp.bfloat16)), "x_scales"),
        (lambda a: a.__setitem__(1, a[1][:3]), "x8 has 3 rows"),
    ],
)
def test_bad_inputs_raise_before_tracing(mutate, match):
    args = _ok_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        w4ax_matmul(*args, tile_k=TILE, interpret=True, config=PREFILL)


def test_bad_bias_and_tile():
    args = _ok_args()
    with pytest.raises(ValueError, match="bias"):
        w4ax_matmul(*args, jnp.ones((7,)), tile_k=TILE, interpret=True, config=PREFILL)
    with pytest.raises(ValueError, match="tile_k"):
        w4ax_matmul(*args, tile_k=48, interpret=True, config=PREFILL)
    with pytest.raises(ValueError, match="K4 \\+ K8 must be > 0"):
        z = jnp.zeros((4, 0), jnp.int8)
        w4ax_matmul(z, z, args[2], args[3][:, :0], args[4], tile_k=TILE, interpret=True)


XLA_INT8 = GemmConfig(backend="xla_int8")


@pytest.mark.parametrize("k8", [0, 128, 256])
def test_xla_int8_backend_matches_reference(k8):
    """The large-M backend: same int32 sums, same epilogue (rel. error < 1e-2 in bf16)."""
    m, n, k = 7, 96, 256
    key = jax.random.PRNGKey(k8 + 5)
    ops = random_operands(key, m, n, k, k8, tile_k=TILE)
    bias = jax.random.normal(jax.random.fold_in(key, 1), (n,)) * 0.05
    acc = w4ax_accumulators(ops[0], ops[1], ops[3], tile_k=TILE, config=XLA_INT8)
    ref = w4ax_accumulators_reference(ops[0], ops[1], ops[3], tile_k=TILE)
    for a, r in zip(acc, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    y = w4ax_matmul(*ops, bias, tile_k=TILE, config=XLA_INT8, out_dtype=jnp.float32)
    yr = w4ax_matmul_reference(*ops, bias, tile_k=TILE, out_dtype=jnp.float32)
    assert _rel(y, yr) < 1e-6


def test_xla_int8_backend_with_groups_uses_the_kernel():
    """Group scales are not an xla_int8 epilogue: the call runs the kernel instead."""
    ops = random_operands(jax.random.PRNGKey(3), 4, 64, 256, 128, tile_k=TILE, group_size=128)
    y = w4ax_matmul(*ops, tile_k=TILE, config=XLA_INT8, interpret=True, out_dtype=jnp.float32)
    yr = w4ax_matmul_reference(*ops, tile_k=TILE, out_dtype=jnp.float32)
    assert _rel(y, yr) < 1e-6


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend='cublas'"):
        GemmConfig(backend="cublas")
    with pytest.raises(ValueError, match="pre_unpack='xw'"):
        GemmConfig(pre_unpack="xw")


def test_pre_unpacked_tiles_match_reference_unpack():
    """XLA's x16 unpack keeps the half-split tile order the kernel reads."""
    from comet_jax.quant.pack import unpack_int4
    from pallas_kernels.w4ax_matmul import unpack_int4_x16_tiles

    packed = random_operands(jax.random.PRNGKey(5), 2, 32, 256, 0, tile_k=TILE)[3]
    x16 = unpack_int4_x16_tiles(packed, TILE, words=False)
    assert x16.shape == (32, 256) and x16.dtype == jnp.int8
    np.testing.assert_array_equal(
        np.asarray(x16, np.int32), 16 * np.asarray(unpack_int4(packed, TILE), np.int32)
    )
    for tile in (32, 64, 128):  # the 32-bit-word form (the default) writes the same bytes
        words = unpack_int4_x16_tiles(packed, tile)
        np.testing.assert_array_equal(
            np.asarray(words), np.asarray(unpack_int4_x16_tiles(packed, tile, words=False))
        )
    with pytest.raises(ValueError, match="multiple of tile_k=96"):
        unpack_int4_x16_tiles(packed, 96, words=True)


# ---- the unpacked activation operand (act_quant(layout="unpacked")) ------------------------


@pytest.mark.parametrize(
    "cfg,k8,group",
    [
        (None, 128, None),  # heuristic
        (DECODE, 128, None),  # split-K, swap_ab, packed weights
        (PRE_W, 256, None),
        (PRE_WX, 0, None),  # W4A4
        (ONE_ACC_SWAP, 128, None),
        (PARK, 384, None),  # W4A8
        (PREFILL, 128, 64),  # group scales
        (GemmConfig(block_m=32, block_n=32, backend="xla_int8"), 128, None),
        (GemmConfig(128, 64, 1, 4, 3, backend="mgpu", pre_unpack="wx"), 128, None),  # fallback
    ],
)
def test_unpacked_operand_gives_the_packed_results(cfg, k8, group):
    """w4ax_matmul_unpacked on [16 * x4 | x8] (rows padded past M) == w4ax_matmul on the
    packed operands, bit for bit, for every backend and kernel path; both == the reference."""
    from pallas_kernels.act_quant import to_unpacked
    from pallas_kernels.w4ax_matmul import w4ax_matmul_unpacked, w4ax_matmul_unpacked_reference

    m, n, k = 37, 64, 384
    x4, x8, xs, wp, ws = random_operands(
        jax.random.PRNGKey(k8 + 3), m, n, k, k8, tile_k=TILE, group_size=group
    )
    bias = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    x_u, xs_u = to_unpacked(x4, x8, xs, tile_k=TILE, row_align=64)
    assert x_u.shape == (64, k)
    kw = dict(tile_k=TILE, out_dtype=jnp.float32)
    ref = w4ax_matmul_reference(x4, x8, xs, wp, ws, bias, **kw)
    ref_u = w4ax_matmul_unpacked_reference(x_u, xs_u, wp, ws, bias, k4=k - k8, m=m, **kw)
    np.testing.assert_array_equal(np.asarray(ref_u), np.asarray(ref))
    packed = w4ax_matmul(x4, x8, xs, wp, ws, bias, interpret=True, config=cfg, **kw)
    got = w4ax_matmul_unpacked(
        x_u, xs_u, wp, ws, bias, k4=k - k8, m=m, interpret=True, config=cfg, **kw
    )
    assert got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(packed))
    assert _rel(got, ref) < 5e-3  # acc8_first's bf16 partial; exact paths ~1e-7


def test_unpacked_operand_checks():
    from pallas_kernels.w4ax_matmul import w4ax_matmul_unpacked

    _, _, _, wp, ws = random_operands(jax.random.PRNGKey(0), 8, 32, 256, 128, tile_k=TILE)
    x_u, xs = jnp.ones((16, 256), jnp.int8), jnp.ones((16, 2), jnp.float32)
    call = functools.partial(w4ax_matmul_unpacked, tile_k=TILE, interpret=True)
    with pytest.raises(ValueError, match="m=17 real rows"):
        call(x_u, xs, wp, ws, k4=128, m=17)
    with pytest.raises(ValueError, match="k4=96"):
        call(x_u, xs, wp, ws, k4=96)
    with pytest.raises(ValueError, match=r"x_scales must be f32 \[16, 2\]"):
        call(x_u, xs[:8], wp, ws, k4=128)
    with pytest.raises(ValueError, match="x_u must be int8"):
        call(x_u.astype(jnp.int32), xs, wp, ws, k4=128)
    with pytest.raises(ValueError, match="w_packed has shape"):
        call(jnp.ones((16, 384), jnp.int8), xs, wp, ws, k4=128)


def test_tuning_table_takes_unpacked_activations_from_unpacked_min_m():
    """The premise of W4AxLinear's act_layout="auto": from UNPACKED_MIN_M rows up, every
    tuning-table config of the engine's shapes (any INT8 fraction) reads its activations
    pre-unpacked (Triton "x" / "wx" or Mosaic GPU), so the unpacked operand costs them
    nothing; below it some do not (the packed layout stays there)."""
    from pallas_kernels import tuning
    from pallas_kernels.w4ax_matmul import UNPACKED_MIN_M, UNPACKED_ROW_ALIGN

    def unpacked(cfg):
        return cfg.backend == "mgpu" or cfg.pre_unpack in ("x", "wx")

    shapes = [s for v in tuning.ENGINE_SHAPES.values() for s in v]
    big = [b for b in tuning.M_BUCKETS if b >= UNPACKED_MIN_M]
    found = 0
    for key, fields in tuning.load_table().items():
        mb, n, k, _ = key.split(":")
        if int(mb) in big and (int(n), int(k)) in shapes:
            found += 1
            cfg = GemmConfig.from_dict(fields)
            assert unpacked(cfg), key
            if cfg.swap_ab and cfg.backend == "mgpu":
                # w_regs tiles cover ceil(m / block_m) token tiles, fewer rows than act_quant
                # writes at the M the entry was tuned at (no second row padding there; at
                # other M of the bucket the operand may be padded to whole tiles)
                m = fields["at_m"]
                rows = -(-m // UNPACKED_ROW_ALIGN) * UNPACKED_ROW_ALIGN
                assert -(-m // cfg.block_m) * cfg.block_m <= rows, key
            else:
                assert UNPACKED_ROW_ALIGN % cfg.block_m == 0, key  # no second row padding
    assert found >= 8
    small = [tuning.get_config(UNPACKED_MIN_M - 1, n, k, k // 4) for n, k in shapes]
    assert not all(unpacked(c) for c in small)


def test_tuning_bucket_of_the_8b_decode_batch_falls_back_to_the_old_bucket():
    """The M = 1536 bucket (tuned at the LLaMA-3-8B decode batch 1214) has its own entries
    for the engine's 8B shapes; a shape without one there keeps the 4096 bucket's
    (FALLBACK_BUCKET: what M = 1025..1536 used before the bucket existed), and M above the
    3072 bucket still reads the 4096 bucket."""
    from pallas_kernels import tuning

    table = tuning.load_table()
    assert tuning.m_bucket(1214) == 1536 and tuning.m_bucket(1537) == 3072
    for n, k in tuning.ENGINE_SHAPES["llama3-8b"]:
        key = f"1536:{n}:{k}:0.25"
        assert key in table, key
        assert tuning.get_config(1214, n, k, k // 4) == GemmConfig.from_dict(table[key])
        assert tuning.get_config(4000, n, k, k // 4) == GemmConfig.from_dict(
            table[f"4096:{n}:{k}:0.25"]
        )
    assert "1536:8192:8192:0.25" not in table
    before = GemmConfig.from_dict(table["4096:8192:8192:0.25"])
    assert tuning.get_config(1214, 8192, 8192, 2048) == before


def test_tuning_bucket_of_the_h200_decode_batch():
    """The 3072 bucket (the H200's 1024/512 decode batch, 2222 rows, tuned at M = 2224) has
    entries for the engine's 8B shapes; M above it reads the 4096 bucket, and a shape
    without an entry of its own falls back to the 4096 bucket's."""
    from pallas_kernels import tuning

    table = tuning.load_table()
    assert tuning.m_bucket(1537) == tuning.m_bucket(2222) == tuning.m_bucket(3072) == 3072
    assert tuning.m_bucket(3073) == 4096
    for n, k in tuning.ENGINE_SHAPES["llama3-8b"]:
        entry = table[f"3072:{n}:{k}:0.25"]
        assert entry["at_m"] == 2224
        assert tuning.get_config(2222, n, k, k // 4) == GemmConfig.from_dict(entry)
        assert tuning.get_config(3073, n, k, k // 4) == GemmConfig.from_dict(
            table[f"4096:{n}:{k}:0.25"]
        )
    assert "3072:8192:8192:0.25" not in table
    before = GemmConfig.from_dict(table["4096:8192:8192:0.25"])
    assert tuning.get_config(2222, 8192, 8192, 2048) == before


QKV_STUDY = "experiments/results/gemm_2026-11-29_mgpu_qkv_fit_h200.json"


def test_fused_qkv_shape_has_entries_of_its_own_where_measured():
    """LLaMA-3-8B's q / k / v as one 6144 x 4096 GEMM (W4AxLinear.fuse_projections): the 3072
    and 4096 buckets hold the study's best schedules (timed at M = 2224 and 8192);
    tuning.table_entry reads a bucket's own entry only, so the 1536 bucket (the H100's decode
    batch, not measured) has none, though get_config falls back to the 4096 bucket's there."""
    import json
    import pathlib

    from pallas_kernels import tuning

    root = pathlib.Path(__file__).resolve().parents[1]
    study = json.loads((root / QKV_STUDY).read_text())
    table = tuning.load_table()
    for bucket, m in ((3072, 2224), (4096, 8192)):
        rows = [r for r in study["mgpu"] if r["n"] == 6144 and r["m"] == m]
        entries = tuning.entries_from_study(dict(study, mgpu=rows), bucket)
        key = f"{bucket}:6144:4096:0.25"
        assert entries == {key: table[key]}
        assert tuning.table_entry(m, 6144, 4096, 1024) == GemmConfig.from_dict(table[key])
    assert tuning.table_entry(1214, 6144, 4096, 1024) is None
    assert tuning.get_config(1214, 6144, 4096, 1024) == tuning.table_entry(8192, 6144, 4096, 1024)
    assert tuning.table_entry(2224, 4096, 4096, 1024) == tuning.get_config(2224, 4096, 4096, 1024)
    assert tuning.table_entry(2224, 12345, 4096, 1024) is None


FIT_STUDY = "experiments/results/gemm_2026-11-28_mgpu_w_regs_fit_h200.json"


def test_entries_from_study_rebuild_the_table_rows():
    """tuning.entries_from_study turns a bench_gemm.py --mgpu results file into table entries
    (the best Mosaic GPU schedule of each row, its time, the M it was timed at): the
    recorded study gives the 3072 bucket's entries exactly; rows whose best is not a Mosaic
    GPU schedule add nothing; of two rows of one key the larger M wins; bad input is named."""
    import json
    import pathlib

    from pallas_kernels import tuning

    root = pathlib.Path(__file__).resolve().parents[1]
    study = json.loads((root / FIT_STUDY).read_text())
    entries = tuning.entries_from_study(study, 3072)
    table = tuning.load_table()
    assert entries and entries == {key: table[key] for key in entries}
    rows = study["mgpu"]
    triton = dict(rows[0], best="tuned")
    del triton["best_mgpu"]
    assert tuning.entries_from_study({"mgpu": [triton]}, 3072) == {}
    small = dict(rows[0], m=1600, best_us=1.0)
    key = tuning.table_key(rows[0]["m"], rows[0]["n"], rows[0]["k"], rows[0]["k8"])
    both = tuning.entries_from_study({"mgpu": [rows[0], small]}, 3072)
    assert both[key]["at_m"] == 2224
    with pytest.raises(ValueError, match="bucket 4096, not 3072"):
        tuning.entries_from_study({"mgpu": [dict(rows[0], m=4000)]}, 3072)
    with pytest.raises(ValueError, match="not one of M_BUCKETS"):
        tuning.entries_from_study(study, 3000)
    with pytest.raises(ValueError, match="no 'mgpu' rows"):
        tuning.entries_from_study({"sweep": []}, 3072)


def test_from_study_cli_merges_into_a_table(tmp_path, capsys):
    """``python -m pallas_kernels.tuning --from-study FILE --bucket B --out TABLE`` merges the
    study's entries into TABLE (other entries kept) and notes the source in its meta."""
    import json
    import pathlib

    from pallas_kernels import tuning

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "table.json"
    out.write_text(json.dumps({"meta": {"note": "old"}, "entries": {"1:8:8:0.0": {"us": 1}}}))
    try:
        tuning._main(["--from-study", str(root / FIT_STUDY), "--bucket", "3072", "--out", str(out)])
    finally:
        tuning.load_table.cache_clear()
    written = json.loads(out.read_text())
    assert "1:8:8:0.0" in written["entries"]
    assert "3072:4096:4096:0.25" in written["entries"]
    note = written["meta"]["note"]
    assert note.startswith("old; 3072 bucket") and "gemm_2026-11-28_mgpu_w_regs_fit_h200" in note
    assert "3072:4096:4096:0.25" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tuning._main(["--from-study", str(root / FIT_STUDY), "--out", str(out)])
    assert "needs --bucket" in capsys.readouterr().err
