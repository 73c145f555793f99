"""W4Ax GEMM for compute-bound M on Pallas' Mosaic GPU backend (Hopper wgmma, TMA, warp
specialisation). Same semantics and operands as :func:`pallas_kernels.w4ax_matmul.w4ax_matmul`
(its reference, ``w4ax_matmul_reference``, is this kernel's reference too).

Why a second backend: from M = 256 up the Pallas-Triton kernel runs at 0.5-0.64x XLA's int8
GEMM even with every operand unpacked before the loop (docs/kernels_gemm.md). A plain int8
GEMM written for Mosaic GPU (one warpgroup issuing TMA copies, two running wgmma from shared
memory) ran at 1.00-1.03x XLA int8 on the H100 (experiments/probe_mgpu_int8.py). This kernel
is that loop with the W4Ax operands and epilogue:

    x_u: [Mp, K] int8   = [16 * x4 (unpacked, half-split tiles) | x8]  (XLA, per call)
    w_u: [N, K]  int8   = 16 * w (unpacked, same tile order)            (XLA, per call)
    acc4 = x_u[:, :K4] . w_u[:, :K4]      (= 256 * x4 . w, int32)
    acc8 = x_u[:, K4:] . w_u[:, K4:]      (=  16 * x8 . w, int32)
    y    = (acc4 * s4/256 + acc8 * s8/16) * ws[n] (+ bias[n])  -> out_dtype

Schedule: a persistent grid of one CTA per SM walks the ``[Mp/128, N/cta_n]`` output tiles.
Per tile, a memory warpgroup streams ``[128, 128]`` int8 K tiles of x_u and ``[cta_n, 128]``
of w_u through ``stages`` shared-memory slots; two compute warpgroups each own one
``[64, cta_n]`` half of the tile (rows) with two int32 accumulators (INT4 and INT8 segments:
their scales differ per row, so they cannot share one), feeding ``wgmma`` with the K-major
tiles (8-bit wgmma takes no transposes). The epilogue scales, casts and stores through
shared memory with TMA. Per-channel weight scales only (group scales keep the Triton kernel).

GPU only. jax 0.10 (the CPU machines) has no Mosaic GPU interpreter: the CPU tests trace and
lower the kernel for CUDA; its numbers are checked against the reference on the device
(``experiments/bench_gemm.py --mgpu``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.w4ax_matmul import DEFAULT_TILE_K, unpack_int4_x16_tiles, validate_args

ROWS_PER_WG = 64  # rows of the output tile per compute warpgroup (wgmma's M)
CTA_M = 2 * ROWS_PER_WG


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Schedule of :func:`w4ax_matmul_mgpu`. ``block_n``: output columns per tile (wgmma's N,
    a multiple of 64 up to 256; two int32 accumulators of ``64 x block_n`` per warpgroup);
    ``stages``: shared-memory slots of the TMA pipeline; ``snake``: the tile order walks
    bands of this many tiles (L2 reuse of the weight tiles)."""

    block_n: int = 128
    stages: int = 4
    snake: int = 8

    def __post_init__(self):
        if self.block_n % 64 or not 64 <= self.block_n <= 256:
            raise ValueError(f"MgpuConfig.block_n={self.block_n} must be 64, 128, 192 or 256")
        if self.stages < 2:
            raise ValueError(f"MgpuConfig.stages={self.stages} must be >= 2")


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", 132)


def _call(x_u, r4, r8, w_u, ws, bias, *, k4, k8, tile_k, cfg, out_dtype):
    """x_u: [Mp, K] int8, r4 / r8: [Mp] f32 (s4/256, s8/16), w_u: [N, K] int8, ws: [N] f32,
    bias: [N] f32 or None -> [Mp, N] out_dtype."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    mp, k = x_u.shape
    n = w_u.shape[0]
    bn, tk = cfg.block_n, tile_k
    m_tiles, n_tiles = mp // CTA_M, n // bn
    k4_steps, k_steps = k4 // tk, k // tk
    segments = (("acc4",) if k4 else ()) + (("acc8",) if k8 else ())
    swz = plgpu.find_swizzle(tk * 8)  # one K row of int8
    in_tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    epi_n = min(bn, 1024 // out_bits)  # one 128-byte swizzled row per epilogue store
    out_swz = plgpu.find_swizzle(epi_n * out_bits)
    out_tf = (
        plgpu.TilingTransform((8, out_swz * 8 // out_bits)),
        plgpu.SwizzleTransform(out_swz),
    )
    n_epi = bn // epi_n
    slots = min(2, n_epi)
    has_bias = bias is not None

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (CTA_M, tk), lambda s: (0, s), transforms=in_tf, memory_space=plgpu.SMEM
                ),
                plgpu.BlockSpec(
                    (bn, tk), lambda s: (0, s), transforms=in_tf, memory_space=plgpu.SMEM
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    def kernel(x_hbm, r4_hbm, r8_hbm, w_hbm, ws_hbm, *rest):
        bias_hbm, y_hbm = (rest[0], rest[1]) if has_bias else (None, rest[0])

        def nothing(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(x_hbm, w_hbm),
            y_smem=plgpu.SMEM((2, slots, ROWS_PER_WG, epi_n), out_dtype, transforms=out_tf),
            collective_axes="wg",
        )
        def scoped(allocs, y_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.snake)
                rows = pl.ds(mi * CTA_M + wg * ROWS_PER_WG, ROWS_PER_WG)
                cols = pl.ds(ni * bn, bn)

                def context(run):
                    accs = {s: plgpu.ACC((ROWS_PER_WG, bn), jnp.int32) for s in segments}

                    @functools.partial(pl.run_scoped, **accs)
                    def _(**acc):
                        run(acc)
                        row_layout = plgpu.Layout.WGMMA.reduce(1)
                        col_layout = plgpu.Layout.WGMMA.reduce(0)
                        shape = (ROWS_PER_WG, bn)

                        def rows_of(v):  # [64] -> [64, bn], v[i] along row i
                            return lax.broadcast_in_dim(v, shape, (0,))

                        def cols_of(v):  # [bn] -> [64, bn], v[j] along column j
                            return lax.broadcast_in_dim(v, shape, (1,))

                        y = None
                        for s, r_hbm in (("acc4", r4_hbm), ("acc8", r8_hbm)):
                            if s in acc:
                                r = plgpu.load(
                                    r_hbm.at[rows], (), layout=row_layout, optimized=False
                                )
                                t = acc[s][...].astype(jnp.float32) * rows_of(r)
                                y = t if y is None else y + t
                        ws = plgpu.load(ws_hbm.at[cols], (), layout=col_layout, optimized=False)
                        y = y * cols_of(ws)
                        if has_bias:
                            b = plgpu.load(
                                bias_hbm.at[cols], (), layout=col_layout, optimized=False
                            )
                            y = y + cols_of(b)
                        y = y.astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for j in range(n_epi):
                            ec = slice(j * epi_n, (j + 1) * epi_n)
                            slot = j % slots
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            y_smem[wg, slot] = y[:, ec]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                y_smem.at[wg, slot], y_hbm.at[rows, cols].at[:, ec]
                            )

                def step(idx, x_smem, w_smem, acc):
                    (s,) = idx
                    x_t = x_smem.at[pl.ds(wg * ROWS_PER_WG, ROWS_PER_WG)]
                    w_t = plgpu.transpose_ref(w_smem, (1, 0))  # [tk, bn], K-major
                    if len(segments) == 1:
                        plgpu.wgmma(acc[segments[0]], x_t, w_t)
                    else:

                        @pl.when(s < k4_steps)
                        def _():
                            plgpu.wgmma(acc["acc4"], x_t, w_t)

                        @pl.when(s >= k4_steps)
                        def _():
                            plgpu.wgmma(acc["acc8"], x_t, w_t)

                    plgpu.wgmma_wait(0)
                    return acc

                pipeline(step, context)(
                    x_hbm.at[pl.ds(mi * CTA_M, CTA_M), :],
                    w_hbm.at[cols, :],
                    allocations=allocs,
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    args = [x_u, r4, r8, w_u, ws] + ([bias] if has_bias else [])
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(_num_sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(*args)


def check_mgpu_shapes(m: int, n: int, k4: int, k8: int, n_groups: int, tile_k: int, cfg) -> None:
    """ValueError naming what the Mosaic GPU kernel cannot take (before tracing)."""
    if n_groups:
        raise ValueError(
            "the Mosaic GPU W4Ax kernel takes per-channel weight scales [N] only; group "
            f"scales ({n_groups} groups) run the Triton kernel (GemmConfig(backend='pallas'))"
        )
    if tile_k != 128:
        raise ValueError(
            f"the Mosaic GPU W4Ax kernel needs tile_k=128 (one 128-byte K row), got {tile_k}"
        )
    if n % cfg.block_n:
        raise ValueError(f"N={n} must be a multiple of MgpuConfig.block_n={cfg.block_n}")
    if m < 1:
        raise ValueError(f"M={m} must be >= 1")


@functools.partial(jax.jit, static_argnames=("tile_k", "out_dtype", "cfg"))
def _w4ax_mgpu_call(x4_packed, x8, x_scales, w_packed, w_scales, bias, *, tile_k, out_dtype, cfg):
    m = x8.shape[0]
    k4, k8 = 2 * x4_packed.shape[1], x8.shape[1]
    parts = ([unpack_int4_x16_tiles(x4_packed, tile_k)] if k4 else []) + ([x8] if k8 else [])
    x_u = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)  # [M, K] int8
    mp = -(-m // CTA_M) * CTA_M
    if mp != m:
        x_u = jnp.pad(x_u, ((0, mp - m), (0, 0)))
        x_scales = jnp.pad(x_scales, ((0, mp - m), (0, 0)))
    r4 = x_scales[:, 0] * (1.0 / 256.0)
    r8 = x_scales[:, 1] * (1.0 / 16.0)
    w_u = unpack_int4_x16_tiles(w_packed, tile_k)  # [N, K] int8
    b = None if bias is None else bias.astype(jnp.float32)
    y = _call(
        x_u, r4, r8, w_u, w_scales.astype(jnp.float32), b,
        k4=k4, k8=k8, tile_k=tile_k, cfg=cfg, out_dtype=out_dtype,
    )  # fmt: skip
    return y[:m]


def w4ax_matmul_mgpu(
    x4_packed,
    x8,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    config: MgpuConfig | None = None,
):
    """W4Ax GEMM ``[M, N]`` on Mosaic GPU (module docstring); operands as ``w4ax_matmul``."""
    m, n, k4, k8, n_groups = validate_args(
        x4_packed, x8, x_scales, w_packed, w_scales, bias, tile_k
    )
    cfg = config or MgpuConfig()
    check_mgpu_shapes(m, n, k4, k8, n_groups, tile_k, cfg)
    return _w4ax_mgpu_call(
        x4_packed, x8, x_scales, w_packed, w_scales, bias,
        tile_k=tile_k, out_dtype=jnp.dtype(out_dtype), cfg=cfg,
    )  # fmt: skip
