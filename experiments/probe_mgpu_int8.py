"""Feasibility probe: the Mosaic GPU kernel of ``pallas_kernels/w4ax_mgpu.py`` run as a plain
int8 GEMM (one segment, unit scales) against XLA's int8 GEMM and the Triton W4Ax kernel, at
the engine's prefill sizes.

Why: at M >= 256 the Triton W4Ax kernel runs at 0.5-0.64x XLA int8 (docs/kernels_gemm.md),
and Pallas-Triton's own int8 GEMM tops out near 0.74x of it (gpu-baselines). This measures
what the Mosaic GPU loop (TMA copies from a memory warpgroup, int8 wgmma from shared memory in
two compute warpgroups) reaches without the W4Ax work around it:
``y = bf16(x @ w^T)`` for int8 ``x [M, K]``, ``w [N, K]`` (both K-contiguous).

GPU only (jax 0.10 has no Mosaic GPU interpreter). Every output element is compared with
XLA's on the device (exact: both round the same int32 to f32 to bf16).

    PYTHONPATH=. python3 experiments/probe_mgpu_int8.py [--quick]

Writes ``probe_mgpu_int8_<date>.json`` into $OUT (or experiments/results). The 2026-11-26
numbers in docs/benchmarks.md came from this script's first form (commit e198736: its own copy
of the loop, warpgroups split along N or M); the kernel module's loop splits along M.
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

from pallas_kernels import tuning
from pallas_kernels.timing import device_time
from pallas_kernels.w4ax_matmul import w4ax_matmul
from pallas_kernels.w4ax_mgpu import MgpuConfig, segment_matmul


def int8_matmul_mgpu(x, w, cfg: MgpuConfig):
    """x: [M, K] int8, w: [N, K] int8 -> [M, N] bf16 = bf16(f32(x @ w^T)) (int32 sums)."""
    m, n = x.shape[0], w.shape[0]
    ones_m, ones_n = jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)
    return segment_matmul(x, ones_m, ones_m, w, ones_n, None, k4=0, cfg=cfg, out_dtype=jnp.bfloat16)


def xla_int8(x, w):
    """XLA's int8 GEMM on the same operands ([N, K] weights), int32 out."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _rand_int8(key, shape):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)


def label(cfg: MgpuConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n} rows/wg {cfg.rows_per_wg} s{cfg.stages} snake{cfg.snake}"


def main():
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
    configs = [  # 128 x 128 per warpgroup: 4 stages exceed the 227 KiB of shared memory
        MgpuConfig(rows_per_wg=128, stages=3),
        MgpuConfig(rows_per_wg=128, stages=3, snake=16),
        MgpuConfig(rows_per_wg=64),  # the W4Ax kernel's tile (two accumulators fit)
        MgpuConfig(rows_per_wg=128, block_n=64),
    ]
    if args.quick:
        shapes, configs = shapes[:1], configs[:2]
    key = jax.random.PRNGKey(0)
    path = os.path.join(out_dir, f"probe_mgpu_int8_{time.strftime('%Y-%m-%d')}.json")
    for m, n, k in shapes:
        reps = 3
        ks = jax.random.split(jax.random.fold_in(key, m * n + k), 2 * reps)
        sets = [(_rand_int8(ks[i], (m, k)), _rand_int8(ks[reps + i], (n, k))) for i in range(reps)]
        row = dict(m=m, n=n, k=k, tops={})
        ref = jax.jit(xla_int8)(*sets[0]).astype(jnp.float32).astype(jnp.bfloat16)
        ref = np.asarray(ref.astype(jnp.float32))
        row["xla_int8_us"] = device_time(xla_int8, sets) * 1e6
        xb = [(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)) for a, b in sets]
        bf16_dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())))
        row["xla_bf16_us"] = device_time(bf16_dot, xb) * 1e6
        # The Triton W4Ax kernel at the same M, N, K (25% INT8, table config, unpack included).
        k8 = tuning.int8_fraction_k8(k, 0.25)
        ops = [
            tuning.random_operands(jax.random.fold_in(key, 7 + i), m, n, k, k8) for i in range(reps)
        ]
        tuned = tuning.get_config(m, n, k, k8)
        if tuned.backend == "mgpu":  # the Triton schedule the table's mgpu entry falls back to
            tuned = dataclasses.replace(tuned, backend="pallas")
        row["w4ax_triton_us"] = device_time(functools.partial(w4ax_matmul, config=tuned), ops) * 1e6
        row["w4ax_triton_config"] = tuned.to_dict()
        for cfg in configs:
            f = functools.partial(int8_matmul_mgpu, cfg=cfg)
            try:
                got = np.asarray(jax.jit(f)(*sets[0]).astype(jnp.float32))
                t = device_time(f, sets) * 1e6
                row[label(cfg)] = dict(
                    us=t, mismatches=int(np.sum(got != ref)), vs_xla_int8=row["xla_int8_us"] / t
                )
            except Exception as e:  # noqa: BLE001 - a schedule may not compile
                row[label(cfg)] = dict(error=f"{type(e).__name__}: {e}"[:1500])
                traceback.print_exc()
            print(f"{m}x{n}x{k} {label(cfg)}: {row[label(cfg)]}", flush=True)
        for name in ("xla_int8", "xla_bf16", "w4ax_triton"):
            row["tops"][name] = 2 * m * n * k / row[f"{name}_us"] / 1e6
        print(json.dumps(row, default=str), flush=True)
        res["rows"].append(row)
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
