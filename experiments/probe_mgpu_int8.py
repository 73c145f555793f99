"""Feasibility probe: a plain int8 GEMM written for Pallas' Mosaic GPU backend against XLA's
int8 GEMM and our Pallas-Triton W4Ax kernel, at the engine's prefill sizes.

Why: at M >= 256 the W4Ax kernel runs at 0.5-0.64x XLA int8 (docs/kernels_gemm.md), and
Pallas-Triton's own int8 GEMM tops out near 0.74x of it (gpu-baselines). Mosaic GPU gives
warp specialisation (one warpgroup issues TMA copies, two run wgmma from shared memory) and
int8 wgmma with int32 accumulators. Before building the W4Ax GEMM on it, this measures the
ceiling: ``y = bf16(x @ w^T)`` for int8 ``x [M, K]``, ``w [N, K]`` (both K-contiguous, the
only layout 8-bit wgmma accepts), output in bf16 through shared memory and TMA stores.
No scales (the W4Ax epilogue is not part of the probe).

GPU only: jax 0.10 (the CPU machines) has no Mosaic GPU interpreter, so there is no CPU test;
the script checks every output element against XLA on the device instead (exact: both round
the same int32 to f32 to bf16).

    PYTHONPATH=. python3 experiments/probe_mgpu_int8.py [--quick]

Writes ``probe_mgpu_int8_<date>.json`` into $OUT (or experiments/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """One schedule. Each of the two compute warpgroups owns a ``tile_m x tile_n`` int32
    accumulator; ``wg_split`` says along which axis the CTA tile holds the two."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128  # int8: one 128-byte swizzled row per K step
    stages: int = 4
    wg_split: str = "n"
    snake_width: int = 8  # grid order: tiles visited in bands of this width (L2 reuse)
    epi_m: int = 64  # epilogue sub-tile (bf16 64 x 64: 128-byte rows)
    epi_n: int = 64
    lane: bool = False  # Mosaic GPU's per-thread ("Lane") lowering instead of "Warpgroup"

    @property
    def cta(self) -> tuple[int, int]:
        return (
            self.tile_m * (2 if self.wg_split == "m" else 1),
            self.tile_n * (2 if self.wg_split == "n" else 1),
        )

    def label(self) -> str:
        return (
            f"{self.tile_m}x{self.tile_n}x{self.tile_k} s{self.stages} wg-{self.wg_split} "
            f"snake{self.snake_width}{' lane' if self.lane else ''}"
        )


def int8_matmul_mgpu(x: jax.Array, w: jax.Array, cfg: ProbeConfig) -> jax.Array:
    """x: [M, K] int8, w: [N, K] int8 -> [M, N] bf16 = bf16(f32(x @ w^T)) (int32 sums)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (m, k), (n, k2) = x.shape, w.shape
    if k != k2 or x.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise ValueError(
            f"want int8 x [M, K] and w [N, K]; got {x.shape} {x.dtype}, {w.shape} {w.dtype}"
        )
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta
    if m % cta_m or n % cta_n or k % tk:
        raise ValueError(f"M={m}, N={n}, K={k} not multiples of the CTA tile {cta_m}x{cta_n}x{tk}")
    m_tiles, n_tiles, k_steps = m // cta_m, n // cta_n, k // tk
    swz = plgpu.find_swizzle(tk * 8)  # bits of one K row of int8
    in_tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    out_swz = plgpu.find_swizzle(cfg.epi_n * 16)
    out_tf = (plgpu.TilingTransform((8, out_swz // 2)), plgpu.SwizzleTransform(out_swz))
    n_epi = (tm // cfg.epi_m) * (tn // cfg.epi_n)
    slots = min(2, n_epi)

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
                    (cta_n, tk), lambda s: (0, s), transforms=in_tf, memory_space=plgpu.SMEM
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    def kernel(x_hbm, w_hbm, y_hbm):
        def nothing(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(nothing, nothing).get_allocations(x_hbm, w_hbm),
            y_smem=plgpu.SMEM((2, slots, cfg.epi_m, cfg.epi_n), jnp.bfloat16, transforms=out_tf),
            collective_axes="wg",
        )
        def scoped(allocs, y_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.snake_width)
                rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
                if cfg.wg_split == "m":
                    wrows, wcols = pl.ds(wg * tm, tm), slice(None)
                else:
                    wrows, wcols = slice(None), pl.ds(wg * tn, tn)

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), jnp.int32))
                    def _(acc):
                        run(acc)
                        y = acc[...].astype(jnp.float32).astype(jnp.bfloat16)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        e = 0
                        for i in range(tm // cfg.epi_m):
                            for j in range(tn // cfg.epi_n):
                                er = slice(i * cfg.epi_m, (i + 1) * cfg.epi_m)
                                ec = slice(j * cfg.epi_n, (j + 1) * cfg.epi_n)
                                slot = e % slots
                                e += 1
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                y_smem[wg, slot] = y[er, ec]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    y_smem.at[wg, slot],
                                    y_hbm.at[rows, cols].at[wrows, wcols].at[er, ec],
                                )

                def step(_, x_smem, w_smem, acc):
                    w_t = plgpu.transpose_ref(w_smem.at[wcols], (1, 0))  # [tk, tn], K-major
                    plgpu.wgmma(acc, x_smem.at[wrows], w_t)
                    plgpu.wgmma_wait(0)
                    return acc

                pipeline(step, context)(x_hbm.at[rows, :], w_hbm.at[cols, :], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(getattr(jax.devices()[0], "core_count", 132),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane
            if cfg.lane
            else plgpu.LoweringSemantics.Warpgroup
        ),
    )
    return f(x, w)


def xla_int8(x, w):
    """XLA's int8 GEMM on the same operands ([N, K] weights), int32 out."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def main():
    from pallas_kernels import tuning
    from pallas_kernels.timing import device_time
    from pallas_kernels.w4ax_matmul import w4ax_matmul

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, two schedules")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "experiments/results")
    dev = jax.devices()[0]
    res = dict(
        meta=dict(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            device=dev.device_kind,
            jax=jax.__version__,
        ),
        rows=[],
    )
    print(res["meta"], flush=True)
    shapes = [(8192, 14336, 4096), (8192, 4096, 14336), (8192, 4096, 4096), (4096, 4096, 4096)]
    configs = [
        ProbeConfig(),
        ProbeConfig(lane=True),
        ProbeConfig(stages=3),
        ProbeConfig(wg_split="m"),
        ProbeConfig(tile_n=64, stages=5),
        ProbeConfig(snake_width=16),
    ]
    if args.quick:
        shapes, configs = shapes[:1], configs[:2]
    key = jax.random.PRNGKey(0)
    for m, n, k in shapes:
        reps = 3
        ks = jax.random.split(jax.random.fold_in(key, m * n + k), 2 * reps)
        xs = [
            jax.random.randint(ks[i], (m, k), -127, 128, jnp.int32).astype(jnp.int8)
            for i in range(reps)
        ]
        ws = [
            jax.random.randint(ks[reps + i], (n, k), -127, 128, jnp.int32).astype(jnp.int8)
            for i in range(reps)
        ]
        sets = list(zip(xs, ws))
        row = dict(m=m, n=n, k=k, tops={})
        ref = jax.jit(xla_int8)(xs[0], ws[0])
        ref_bf16 = np.asarray(ref.astype(jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
        row["xla_int8_us"] = device_time(xla_int8, sets) * 1e6
        xb = [(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)) for a, b in sets]
        row["xla_bf16_us"] = (
            device_time(lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ()))), xb) * 1e6
        )
        # Our W4Ax kernel at the same M, N, K (25% INT8, tuning-table config, unpack included).
        k8 = tuning.int8_fraction_k8(k, 0.25)
        ops = [
            tuning.random_operands(jax.random.fold_in(key, 7 + i), m, n, k, k8) for i in range(reps)
        ]
        row["w4ax_us"] = device_time(w4ax_matmul, ops) * 1e6
        row["w4ax_config"] = tuning.get_config(m, n, k, k8).to_dict()
        for cfg in configs:
            lbl = cfg.label()
            try:
                f = jax.jit(functools.partial(int8_matmul_mgpu, cfg=cfg))
                got = np.asarray(f(xs[0], ws[0]).astype(jnp.float32))
                bad = int(np.sum(got != ref_bf16))
                t = device_time(functools.partial(int8_matmul_mgpu, cfg=cfg), sets) * 1e6
                row[lbl] = dict(us=t, mismatches=bad, vs_xla_int8=row["xla_int8_us"] / t)
            except Exception as e:  # noqa: BLE001 - a schedule may not compile
                row[lbl] = dict(error=f"{type(e).__name__}: {e}"[:1500])
                traceback.print_exc()
            print(f"{m}x{n}x{k} {lbl}: {row[lbl]}", flush=True)
        flops = 2 * m * n * k
        for name in ("xla_int8", "xla_bf16", "w4ax"):
            row["tops"][name] = flops / row[f"{name}_us"] / 1e6
        print(json.dumps(row, default=str), flush=True)
        res["rows"].append(row)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"probe_mgpu_int8_{time.strftime('%Y-%m-%d')}.json")
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
