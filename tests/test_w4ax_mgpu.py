"""The Mosaic GPU W4Ax backend on the CPU: config and shape errors, and the fallback of an
``mgpu`` config to the Triton kernel where Mosaic GPU cannot run (interpret mode, group
scales, raw sums). The kernel's own numbers are checked against the reference on the GPU
(``experiments/bench_gemm.py --mgpu``: every output element within one bf16 rounding);
its CUDA lowering in tests/test_cuda_lowering.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.tuning import get_config, random_operands
from pallas_kernels.w4ax_matmul import (
    GemmConfig,
    w4ax_accumulators,
    w4ax_accumulators_reference,
    w4ax_matmul,
    w4ax_matmul_reference,
)
from pallas_kernels.w4ax_mgpu import MgpuConfig, w4ax_matmul_mgpu

MGPU = GemmConfig(128, 128, 1, 4, 4, False, 8, pre_unpack="wx", backend="mgpu", park_out=True)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "fields",
    [
        dict(block_n=96),
        dict(block_n=256),
        dict(stages=1),
        dict(rows_per_wg=96),
        # w_regs: tokens per tile are an integer wgmma N from 64 to 256 (multiples of 16)
        dict(w_regs=True, block_n=152),
        dict(w_regs=True, block_n=48),
        dict(w_regs=True, block_n=272),
        dict(w_regs=True, smem_unpack=True),
    ],
)
def test_config_errors(fields):
    with pytest.raises(ValueError, match="MgpuConfig"):
        MgpuConfig(**fields)


def test_w_regs_config_from_a_gemm_config():
    """An ``mgpu`` GemmConfig with swap_ab and no "w" pre-unpack is MgpuConfig.w_regs: its
    block_m counts tokens (wgmma's N, M padded to it), block_n weight rows (two warpgroups,
    N a multiple of it); without swap_ab the same fields are smem_unpack."""
    g = GemmConfig(160, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu", acc8_first=True)
    c = MgpuConfig.from_gemm_config(g)
    assert c == MgpuConfig(block_n=160, stages=4, rows_per_wg=64, park_int8=True, w_regs=True)
    assert (c.block_m, c.tile_n) == (160, 128)
    c = MgpuConfig.from_gemm_config(
        GemmConfig(128, 256, 1, 4, 3, True, 8, pre_unpack="x", backend="mgpu")
    )
    assert (c.w_regs, c.rows_per_wg, c.block_n, c.tile_n) == (True, 128, 128, 256)
    plain = MgpuConfig.from_gemm_config(dataclasses.replace(g, swap_ab=False, block_m=256))
    assert plain.smem_unpack and not plain.w_regs and (plain.block_m, plain.tile_n) == (256, 128)


@pytest.mark.parametrize(
    "cfg",
    [
        MgpuConfig(block_n=144, w_regs=True),
        MgpuConfig(block_n=256, w_regs=True, park_int8=True, stages=3),
        MgpuConfig(block_n=128, rows_per_wg=128, w_regs=True),
        MgpuConfig(block_n=128, rows_per_wg=128, park_int8=True),
        MgpuConfig(block_n=64, smem_unpack=True, stages=5),
    ],
)
def test_to_gemm_config_round_trips(cfg):
    """MgpuConfig.to_gemm_config is the table entry from_gemm_config maps back to it."""
    g = cfg.to_gemm_config()
    assert g.backend == "mgpu" and MgpuConfig.from_gemm_config(g) == cfg
    assert (g.block_m, g.block_n) == (cfg.block_m, cfg.tile_n)
    with pytest.raises(ValueError, match="snake=4"):
        dataclasses.replace(cfg, snake=4).to_gemm_config()


def test_wave_fit_schedules_rank_token_tiles_by_whole_waves():
    """wave_fit_schedules ranks token tiles by modeled waves x tile cost: at the M the table
    was measured at it puts the measured winner first (H100: 160 tokens at M = 1214, 256 at
    8192); at the H200's 2224-row decode batch it prefers tiles filling the waves better than
    256 (288 tiles of an N = 4096 GEMM: 3 waves on 132 SMs, the last 18% full); no tile
    pads the operand past act_quant's rows; park_int8 variants follow each token count, the
    unparked one only where two accumulators fit the register budget."""
    from pallas_kernels.w4ax_mgpu import MAX_ACC_REGS, acc_regs, wave_fit_schedules

    def tokens(m, n, **kw):
        return [c.block_n for c in wave_fit_schedules(m, n, row_align=256, **kw)]

    assert tokens(1214, 4096)[0] == 160
    assert tokens(8192, 4096)[0] == 256
    fit = tokens(2224, 4096)
    assert 256 not in fit and fit[0] == 192 and 144 in fit
    for m in (300, 1214, 2224, 8192):
        for n in (1024, 4096, 14336):
            cfgs = wave_fit_schedules(m, n, row_align=256)
            assert len({c.block_n for c in cfgs}) == 3
            for c in cfgs:
                assert c.w_regs and c.tile_n == 128
                assert -(-m // c.block_n) * c.block_n <= -(-m // 256) * 256
                assert acc_regs(c, two_segments=True) <= MAX_ACC_REGS
            assert [c for c in cfgs if c.park_int8]
    # one tile covering every row pads the operand whatever its size: the smallest first
    assert wave_fit_schedules(40, 1024)[0].block_n == 64
    one = wave_fit_schedules(2224, 4096, row_align=256, two_segments=False)
    assert not any(c.park_int8 for c in one)
    with pytest.raises(ValueError, match="n % 128"):
        wave_fit_schedules(2224, 4000)
    with pytest.raises(ValueError, match="m >= 1"):
        wave_fit_schedules(0, 4096)


def test_shape_errors_name_the_problem():
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 192, 256, 128))
    with pytest.raises(ValueError, match="N=192 must be a multiple of MgpuConfig.block_n=128"):
        w4ax_matmul_mgpu(*ops)
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 128, 256, 128, group_size=128))
    with pytest.raises(ValueError, match="per-channel weight scales"):
        w4ax_matmul_mgpu(*ops)
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 128, 256, 128, tile_k=64))
    with pytest.raises(ValueError, match="tile_k=128"):
        w4ax_matmul_mgpu(*ops, tile_k=64)
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 128, 256, 128))
    with pytest.raises(ValueError, match="rows_per_wg=128 takes one segment"):
        w4ax_matmul_mgpu(*ops, config=MgpuConfig(rows_per_wg=128, stages=3))
    # w_regs: N counts weight rows (two warpgroups of rows_per_wg); two accumulators of
    # 64 x 256 (both segments, no park) do not fit the registers
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 192, 256, 128))
    with pytest.raises(
        ValueError, match="N=192 must be a multiple of MgpuConfig.2 \\* rows_per_wg=128"
    ):
        w4ax_matmul_mgpu(*ops, config=MgpuConfig(w_regs=True))
    ops = list(random_operands(jax.random.PRNGKey(1), 8, 128, 256, 128))
    with pytest.raises(ValueError, match="int32 accumulators of 64 x 256 exceed 192 registers"):
        w4ax_matmul_mgpu(*ops, config=MgpuConfig(w_regs=True, block_n=256))


def test_w_regs_register_budget_and_the_swiglu_schedule():
    """acc_regs counts a w_regs tile's accumulator registers per thread (int32 per segment,
    or one plus the parked bf16 half with park_int8); swiglu_config keeps the GEMM's stages
    and shrinks the token tile (multiples of 16) until gate and up fit MAX_ACC_REGS."""
    from pallas_kernels.w4ax_mgpu import MAX_ACC_REGS, acc_regs, swiglu_config

    c = MgpuConfig(w_regs=True, block_n=160)
    assert acc_regs(c, two_segments=True) == 160 and acc_regs(c, two_segments=False) == 80
    park = MgpuConfig(w_regs=True, block_n=256, park_int8=True)
    assert acc_regs(park, two_segments=True) == MAX_ACC_REGS == 192
    assert acc_regs(park, two_segments=True, outputs=2) == 384
    assert swiglu_config(park, two_segments=True) == dataclasses.replace(park, block_n=128)
    assert swiglu_config(c, two_segments=True) == dataclasses.replace(c, block_n=96)
    assert swiglu_config(c, two_segments=False) == c  # 2 x 80 registers
    wide = MgpuConfig(w_regs=True, block_n=128, rows_per_wg=128, stages=3)
    assert swiglu_config(wide, two_segments=False) == dataclasses.replace(wide, rows_per_wg=64)
    assert swiglu_config(MgpuConfig(), two_segments=True) is None  # not w_regs


def test_word_unpack_of_smem_unpack_equals_the_xla_unpack():
    """The in-kernel unpack's arithmetic (MgpuConfig.smem_unpack), run here in jnp on the
    words the kernel receives: per 128-channel tile, ``(w << 4) & 0xF0F0F0F0`` then
    ``w & 0xF0F0F0F0`` read back as bytes give the same int8 operand as XLA's unpack (16 *
    the low nibbles, then 16 * the high ones); packed_words is a little-endian bitcast."""
    from pallas_kernels.w4ax_matmul import unpack_int4_x16_tiles
    from pallas_kernels.w4ax_mgpu import NIBBLE_HIGH_MASK, packed_words

    n, k = 16, 512
    w = jax.random.randint(jax.random.PRNGKey(3), (n, k // 2), -128, 128).astype(jnp.int8)
    words = packed_words(w)
    assert words.shape == (n, k // 8) and words.dtype == jnp.int32
    as_bytes = np.asarray(words).view(np.int8).reshape(n, k // 2)
    np.testing.assert_array_equal(as_bytes, np.asarray(w))

    def to_bytes(x):  # [N, K/8] int32 -> [N, K/2] int8, as wgmma's int8 view reads them
        return np.asarray(x).view(np.int8).reshape(n, k // 2)

    mask = jnp.int32(NIBBLE_HIGH_MASK)
    lo = to_bytes(jnp.left_shift(words, jnp.int32(4)) & mask).reshape(n, k // 128, 64)
    hi = to_bytes(words & mask).reshape(n, k // 128, 64)
    got = np.concatenate([lo, hi], axis=-1).reshape(n, k)
    np.testing.assert_array_equal(got, np.asarray(unpack_int4_x16_tiles(w, 128)))
    with pytest.raises(ValueError, match="K/2 % 4 == 0"):
        packed_words(w[:, :6])


# The Mosaic GPU form of acc8_first (MgpuConfig.park_int8) with 256-row tiles; its Triton
# fallback keeps acc8_first for per-channel scales and drops it for group scales.
MGPU_PARK = GemmConfig(
    256, 128, 1, 8, 3, False, 8, pre_unpack="wx", backend="mgpu", acc8_first=True
)
# The weights unpacked in registers (MgpuConfig.w_regs), 160-token tiles: the Triton
# fallback takes the largest power of two below (its tiles are powers of two), 128.
MGPU_W_REGS = GemmConfig(160, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu")


def test_w_regs_fallback_tiles_are_powers_of_two():
    from pallas_kernels.w4ax_matmul import _fallback_from_mgpu

    w_scales = jnp.ones((128,), jnp.float32)
    assert _fallback_from_mgpu(MGPU_W_REGS, w_scales).block_m == 128
    assert _fallback_from_mgpu(dataclasses.replace(MGPU_W_REGS, block_m=80), w_scales).block_m == 64
    assert _fallback_from_mgpu(MGPU_PARK, w_scales) == dataclasses.replace(
        MGPU_PARK, backend="pallas"
    )


@pytest.mark.parametrize("config", [MGPU, MGPU_PARK, MGPU_W_REGS])
@pytest.mark.parametrize("group_size", [None, 128])
def test_mgpu_config_falls_back_to_triton_in_interpret_mode(group_size, config):
    """An mgpu config (from the table or given) in interpret mode runs the Triton kernel with
    the same fields: output within the bf16 bound of the reference (1e-2 relative)."""
    m, n, k, k8 = 40, 128, 512, 128
    ops = random_operands(jax.random.PRNGKey(2), m, n, k, k8, group_size=group_size)
    y = w4ax_matmul(*ops, interpret=True, config=config)
    y_ref = w4ax_matmul_reference(*ops, out_dtype=jnp.float32)
    assert y.shape == (m, n) and _rel(y.astype(jnp.float32), y_ref) < 1e-2


def test_mgpu_config_raw_sums_are_exact():
    """Raw int32 sums have no Mosaic GPU path: the Triton kernel's, exact (integers)."""
    x4, x8, _, w, _ = random_operands(jax.random.PRNGKey(3), 24, 128, 512, 256)
    got = w4ax_accumulators(x4, x8, w, interpret=True, config=MGPU)
    for g, r in zip(got, w4ax_accumulators_reference(x4, x8, w)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_table_routes_the_large_gemms_to_mosaic_gpu_with_the_weights_unpacked_in_registers():
    """The engine's packed-prefill GEMMs (M = 8192 rows, 8B shapes, 25% INT8) and its
    1214-row decode GEMMs take the Mosaic GPU kernel unpacking the packed weights in
    registers (MgpuConfig.w_regs; H100, 2026-11-28: prefill 256 tokens x 128 weight rows,
    INT8 first; decode refitted on an H200, 2026-11-29: 160-token tiles, 176 for gate / up,
    80 for k / v, INT8 first); the decode GEMMs at M = 256 stay on Triton."""
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)):
        cfg = get_config(8192, n, k, k // 4)
        assert (cfg.backend, cfg.block_m, cfg.block_n, cfg.acc8_first) == ("mgpu", 256, 128, True)
        assert MgpuConfig.from_gemm_config(cfg).w_regs
        cfg = get_config(1214, n, k, k // 4)
        want = {(4096, 4096): 160, (4096, 14336): 160, (14336, 4096): 176, (1024, 4096): 80}
        assert (cfg.backend, cfg.block_m, cfg.acc8_first) == ("mgpu", want[n, k], True)
        assert MgpuConfig.from_gemm_config(cfg).w_regs
        # the H200's 2224-row decode batch (2026-11-28, the 3072 bucket): tiles that fill
        # the waves, INT8 first
        cfg = get_config(2224, n, k, k // 4)
        want = {(4096, 4096): 192, (4096, 14336): 192, (14336, 4096): 224, (1024, 4096): 144}
        assert (cfg.backend, cfg.block_m, cfg.acc8_first) == ("mgpu", want[n, k], True)
        assert MgpuConfig.from_gemm_config(cfg).w_regs
    assert get_config(256, 14336, 4096, 1024).backend == "pallas"
