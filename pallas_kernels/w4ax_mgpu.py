"""W4Ax GEMM for compute-bound M on Pallas' Mosaic GPU backend (Hopper wgmma, TMA, warp
specialisation). Same semantics and operands as :func:`pallas_kernels.w4ax_matmul.w4ax_matmul`
(its reference, ``w4ax_matmul_reference``, is this kernel's reference too).

Why a second backend: from M = 256 up the Pallas-Triton kernel runs at 0.5-0.64x XLA's int8
GEMM even with every operand unpacked before the loop (docs/kernels_gemm.md). A plain int8
GEMM written for Mosaic GPU (one warpgroup issuing TMA copies, two running wgmma from shared
memory, 128 x 128 accumulators per warpgroup) ran at 1.01-1.03x XLA int8 on the H100
(experiments/probe_mgpu_int8.py). This kernel is that loop with the W4Ax operands and
epilogue:

    x_u: [Mp, K] int8   = [16 * x4 (unpacked, half-split tiles) | x8]  (XLA, per call)
    w_u: [N, K]  int8   = 16 * w (unpacked, same tile order)            (XLA, per call)
    acc4 = x_u[:, :K4] . w_u[:, :K4]      (= 256 * x4 . w, int32)
    acc8 = x_u[:, K4:] . w_u[:, K4:]      (=  16 * x8 . w, int32)
    y    = (acc4 * s4/256 + acc8 * s8/16) * ws[n] (+ bias[n])  -> out_dtype

Schedule (:class:`MgpuConfig`): a persistent grid of one CTA per SM walks the
``[Mp/128, N/block_n]`` output tiles. Per tile, a memory warpgroup streams ``[128, 128]`` int8
K tiles of x_u and ``[block_n, 128]`` of w_u through ``stages`` shared-memory slots; two
compute warpgroups each own one ``[64, block_n]`` half of the tile (rows) with two int32
accumulators (INT4 and INT8 segments: their scales differ per row, so they cannot share one),
feeding ``wgmma`` with the K-major tiles (8-bit wgmma takes no transposes). The epilogue
scales, casts and stores through shared memory with TMA. Per-channel weight scales only
(group scales keep the Triton kernel). With one segment (W4A8, W4A4, or the plain int8 GEMM
of the probe) each warpgroup may own 128 rows (``rows_per_wg=128``).

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


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Schedule of :func:`w4ax_matmul_mgpu`. ``block_n``: output columns per tile (wgmma's
    N); ``rows_per_wg``: output rows per compute warpgroup (the tile is ``2 * rows_per_wg``
    rows); 128 only with one segment: two int32 accumulators of ``128 x 128`` would need 256
    registers per thread; ``stages``: shared-memory slots of the TMA pipeline; ``snake``: the
    tile order walks bands of this many tiles (L2 reuse of the weight tiles)."""

    block_n: int = 128
    stages: int = 4
    snake: int = 8
    rows_per_wg: int = 64

    def __post_init__(self):
        if self.block_n not in (64, 128):
            raise ValueError(f"MgpuConfig.block_n={self.block_n} must be 64 or 128")
        if self.rows_per_wg not in (64, 128):
            raise ValueError(f"MgpuConfig.rows_per_wg={self.rows_per_wg} must be 64 or 128")
        if self.stages < 2:
            raise ValueError(f"MgpuConfig.stages={self.stages} must be >= 2")

    @property
    def block_m(self) -> int:
        return 2 * self.rows_per_wg


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", 132)


def segment_matmul(x_u, r4, r8, w_u, ws, bias, *, k4, cfg, out_dtype, tile_k=128):
    """The kernel on unpacked operands (module docstring): ``y = (acc4 * r4[m] + acc8 * r8[m])
    * ws[n] (+ bias[n])`` with ``acc4`` over the first ``k4`` channels, ``acc8`` over the rest.

    x_u: [Mp, K] int8, r4 / r8: [Mp] f32, w_u: [N, K] int8 (K contiguous), ws: [N] f32,
    bias: [N] f32 or None -> [Mp, N] out_dtype. Mp a multiple of ``cfg.block_m``, N of
    ``cfg.block_n``, k4 and K of ``tile_k``. With ``k4 = 0`` it is a plain int8 GEMM with a
    per-row and a per-column scale."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    mp, k = x_u.shape
    n = w_u.shape[0]
    k8 = k - k4
    bn, tk, rows_wg = cfg.block_n, tile_k, cfg.rows_per_wg
    cta_m = 2 * rows_wg
    if mp % cta_m or n % bn or k4 % tk or k % tk:
        raise ValueError(
            f"M={mp}, N={n}, K4={k4}, K={k}: want multiples of {cta_m}, {bn}, {tk}, {tk}"
        )
    m_tiles, n_tiles = mp // cta_m, n // bn
    k4_steps, k_steps = k4 // tk, k // tk
    segments = (("acc4",) if k4 else ()) + (("acc8",) if k8 else ())
    if rows_wg == 128 and len(segments) == 2:
        raise ValueError("MgpuConfig.rows_per_wg=128 takes one segment (K4 = 0 or K8 = 0)")
    swz = plgpu.find_swizzle(tk * 8)  # one K row of int8
    in_tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    epi_n = min(bn, 1024 // out_bits)  # one 128-byte swizzled row per epilogue store
    out_swz = plgpu.find_swizzle(epi_n * out_bits)
    out_tf = (
        plgpu.TilingTransform((8, out_swz * 8 // out_bits)),
        plgpu.SwizzleTransform(out_swz),
    )
    epi_m = 64  # 64-row epilogue sub-tiles: a 128-row staging buffer costs 32 KiB more smem
    epi_tiles = [(i, j) for i in range(rows_wg // epi_m) for j in range(bn // epi_n)]
    slots = min(2, len(epi_tiles))
    has_bias = bias is not None

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (cta_m, tk), lambda s: (0, s), transforms=in_tf, memory_space=plgpu.SMEM
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
            y_smem=plgpu.SMEM((2, slots, epi_m, epi_n), out_dtype, transforms=out_tf),
            collective_axes="wg",
        )
        def scoped(allocs, y_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.snake)
                rows = pl.ds(mi * cta_m + wg * rows_wg, rows_wg)
                cols = pl.ds(ni * bn, bn)

                def context(run):
                    accs = {s: plgpu.ACC((rows_wg, bn), jnp.int32) for s in segments}

                    @functools.partial(pl.run_scoped, **accs)
                    def _(**acc):
                        run(acc)
                        row_layout = plgpu.Layout.WGMMA.reduce(1)
                        col_layout = plgpu.Layout.WGMMA.reduce(0)
                        shape = (rows_wg, bn)

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
                        for e, (i, j) in enumerate(epi_tiles):
                            er = slice(i * epi_m, (i + 1) * epi_m)
                            ec = slice(j * epi_n, (j + 1) * epi_n)
                            slot = e % slots
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            y_smem[wg, slot] = y[er, ec]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                y_smem.at[wg, slot], y_hbm.at[rows, cols].at[er, ec]
                            )

                def step(idx, x_smem, w_smem, acc):
                    (s,) = idx
                    x_t = x_smem.at[pl.ds(wg * rows_wg, rows_wg)]
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
                    x_hbm.at[pl.ds(mi * cta_m, cta_m), :],
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


def check_mgpu_shapes(m: int, n: int, n_groups: int, tile_k: int, cfg, *, two_segments: bool):
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
    if cfg.rows_per_wg == 128 and two_segments:
        raise ValueError(
            "MgpuConfig.rows_per_wg=128 takes one segment; this call has both INT4 and INT8 "
            "channels (two accumulators: use rows_per_wg=64)"
        )


@functools.partial(jax.jit, static_argnames=("tile_k", "out_dtype", "cfg"))
def _w4ax_mgpu_call(x4_packed, x8, x_scales, w_packed, w_scales, bias, *, tile_k, out_dtype, cfg):
    m = x8.shape[0]
    k4, k8 = 2 * x4_packed.shape[1], x8.shape[1]
    parts = ([unpack_int4_x16_tiles(x4_packed, tile_k)] if k4 else []) + ([x8] if k8 else [])
    x_u = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)  # [M, K] int8
    mp = -(-m // cfg.block_m) * cfg.block_m
    if mp != m:
        x_u = jnp.pad(x_u, ((0, mp - m), (0, 0)))
        x_scales = jnp.pad(x_scales, ((0, mp - m), (0, 0)))
    r4 = x_scales[:, 0] * (1.0 / 256.0)
    r8 = x_scales[:, 1] * (1.0 / 16.0)
    w_u = unpack_int4_x16_tiles(w_packed, tile_k)  # [N, K] int8
    b = None if bias is None else bias.astype(jnp.float32)
    y = segment_matmul(
        x_u, r4, r8, w_u, w_scales.astype(jnp.float32), b,
        k4=k4, tile_k=tile_k, cfg=cfg, out_dtype=out_dtype,
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
    check_mgpu_shapes(m, n, n_groups, tile_k, cfg, two_segments=bool(k4 and k8))
    return _w4ax_mgpu_call(
        x4_packed, x8, x_scales, w_packed, w_scales, bias,
        tile_k=tile_k, out_dtype=jnp.dtype(out_dtype), cfg=cfg,
    )  # fmt: skip
