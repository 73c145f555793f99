"""Hardware counters of the attention kernels under Nsight Compute (GPU, `ncu` on the PATH).

    PYTHONPATH=. python3 experiments/ncu_attention.py [--variants decode_int4,decode_bf16,...]

Runs itself under ``ncu --clock-control none`` (the clocks stay as the machine has them),
launching each variant's Pallas kernel exactly once (compiled ahead, so compile launches
nothing), then turns ncu's CSV into one row per variant: duration, DRAM throughput, registers,
shared memory, occupancy (theoretical / achieved and its limiter), issue activity, and the
warp-stall breakdown (cycles per issued instruction spent in each stall reason). What it answers:
whether a kernel is bound by memory, by latency (few warps, long stalls) or by issue.

Variants are the decode shape of issue 4 (B = 64, S = 4096, LLaMA-3-8B heads, page 128,
INT4 g = 128), the prefill shape on the 1.5x line (B = 8, T = 1024) with Pallas ``mha``, and
the 8B W4AxKV4 engine's decode step at 1024/512 (``*_engine``: 1214 sequences, ragged S in
[1024, 1536], an 8-layer pool over 4 GiB per packed array as the engine's, read at layer 5):
its attention call and its ``kv4_write`` of one new token per sequence. Beside them, the
engine's prefill-step activation quantization (``act_quant_*``: 8192 tokens, the unpacked
operand of the large-M GEMMs, two INT8 blocks): the SwiGLU form feeding down_proj (K = 14336,
no permutation: it is folded into gate / up) and the RMSNorm + gather form feeding q/k/v
(K = 4096, a random permutation stored as a calibrated checkpoint stores it: each segment's
channels ascending).
Writes ``ncu_attention.{json,md}`` and the raw CSV to $OUT (or experiments/results/).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

OUT = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
NAME = "ncu_attention"
STALLS = (
    "long_scoreboard",
    "short_scoreboard",
    "barrier",
    "mio_throttle",
    "math_pipe_throttle",
    "wait",
    "not_selected",
    "selected",
    "dispatch_stall",
    "lg_throttle",
    "no_instruction",
    "branch_resolving",
    "membar",
    "drain",
    "sleeping",
    "tex_throttle",
    "imc_miss",
    "misc",
)
STALL_METRICS = [f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS]
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats")
EXTRA_METRICS = ["smsp__inst_executed.sum", "dram__bytes_read.sum", "dram__bytes_write.sum"]
# The tensor pipes' busy share (is a kernel bound by its MMAs?): asked for only where this
# ncu knows the name (``ncu --query-metrics``; the names differ across chips and versions).
TENSOR_METRICS = [
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "sm__inst_executed_pipe_tensor_op_imma.sum",
]


def known_metrics(ncu: str, wanted: list[str]) -> list[str]:
    """The names of ``wanted`` whose base metric ``ncu --query-metrics`` lists (the device's
    chip)."""
    out = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True).stdout
    bases = {ln.split()[0] for ln in out.splitlines() if ln.strip()}
    return [m for m in wanted if m.split(".")[0] in bases]


# What the summary keeps from the sections, by ncu's metric names in the details page.
KEEP = {
    "Duration": "duration",
    "DRAM Throughput": "dram_pct",
    "Memory Throughput": "mem_pct",
    "Compute (SM) Throughput": "sm_pct",
    "Registers Per Thread": "regs",
    "Block Size": "threads",
    "Grid Size": "grid",
    "Dynamic Shared Memory Per Block": "dyn_smem",
    "Static Shared Memory Per Block": "static_smem",
    "Theoretical Occupancy": "occ_theoretical_pct",
    "Achieved Occupancy": "occ_achieved_pct",
    "Block Limit Registers": "limit_regs",
    "Block Limit Shared Mem": "limit_smem",
    "Block Limit Warps": "limit_warps",
    "Block Limit SM": "limit_sm",
    "One or More Eligible": "issue_active_pct",
    "Issued Warp Per Scheduler": "ipc_per_scheduler",
    "Active Warps Per Scheduler": "warps_per_scheduler",
    "Eligible Warps Per Scheduler": "eligible_per_scheduler",
    "Warp Cycles Per Issued Instruction": "cycles_per_issue",
}

B, S, HQ, HKV, D = 64, 4096, 32, 8, 128
PB, PT = 8, 1024  # prefill batch and chunk


def _decode(variant: str):
    """(name, thunk) launching one decode kernel on a B x S cache."""
    import jax
    import jax.numpy as jnp

    from experiments.bench_attention import make_paged
    from pallas_kernels import kv4_attention as A

    key = jax.random.key(0)
    quantized = "int4" in variant
    kw = dict(num_warps=4) if variant.endswith("_w4") else {}
    kv, tables = make_paged(key, B, S, 128, 128, quantized, 1)
    q = jax.random.normal(jax.random.fold_in(key, 1), (B, HQ, D), jnp.bfloat16)
    lens = jnp.full((B,), S, jnp.int32)
    fn = jax.jit(functools.partial(A.paged_decode_attention, **kw))
    args = (q, kv, tables[0], lens)
    compiled = fn.lower(*args).compile()
    return lambda: compiled(*args)


def _prefill(variant: str):
    import jax
    import jax.numpy as jnp

    from experiments.bench_attention import make_paged
    from pallas_kernels import kv4_attention as A

    key = jax.random.key(0)
    q = jax.random.normal(key, (PB, PT, HQ, D), jnp.bfloat16)
    if variant == "prefill_mha":
        from jax.experimental.pallas.ops.gpu import attention as fa

        k = jax.random.normal(jax.random.fold_in(key, 2), q.shape, jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 3), q.shape, jnp.bfloat16)
        fn = jax.jit(functools.partial(fa.mha, segment_ids=None, sm_scale=1 / math.sqrt(D),
                                       causal=True))  # fmt: skip
        args = (q, k, v)
    else:
        kv, tables = make_paged(key, PB, PT, 128, 128, True, 1)
        lens = jnp.full((PB,), PT, jnp.int32)
        fn = jax.jit(functools.partial(A.paged_prefill_attention, dequantize=True))
        args = (q, kv, tables[0], lens)
    compiled = fn.lower(*args).compile()
    return lambda: compiled(*args)


EB, E_LO, E_HI, E_LAYERS, E_LAYER = 1214, 1024, 1536, 8, 5  # the engine's decode step


def _engine(variant: str):
    """The engine-shaped decode attention call or its KV4 write (module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench_attention import _int4_pool
    from pallas_kernels import kv4_attention as A
    from pallas_kernels.kv4_write import kv4_write

    key = jax.random.key(0)
    page = 128
    mp = -(-E_HI // page)
    pages = EB * mp + 1
    kv = _int4_pool(key, E_LAYERS, pages, page)
    rng = np.random.default_rng(0)
    table = rng.permutation(pages)[: EB * mp].reshape(EB, mp).astype(np.int32)
    lens = rng.integers(E_LO, E_HI + 1, EB).astype(np.int32)
    if variant.startswith("decode_engine"):
        q = jax.random.normal(jax.random.fold_in(key, 1), (EB, HQ, D), jnp.bfloat16)
        kw = ENGINE_DECODE_KWARGS[variant]
        fn = jax.jit(functools.partial(A.paged_decode_attention, layer=E_LAYER, **kw))
        args = (q, kv, jnp.asarray(table), jnp.asarray(lens))
    else:  # the newest token of each sequence: its page and offset
        from comet_jax.engine.kv_cache import slot_mapping_from_positions

        slots = slot_mapping_from_positions(table, lens[:, None] - 1, page)[:, 0]
        k_new, v_new = (
            jax.random.normal(jax.random.fold_in(key, i), (EB, HKV, D), jnp.bfloat16)
            for i in (2, 3)
        )
        fn = jax.jit(lambda kv, k, v, s: kv4_write(kv, E_LAYER, k, v, s), donate_argnums=0)
        args = (kv, k_new, v_new, slots)
    compiled = fn.lower(*args).compile()
    return lambda: compiled(*args)  # launched once: the donated pool is not reused


def _act_quant(variant: str):
    """One prefill-step act_quant call as the engine makes it (module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import act_quant as aq
    from pallas_kernels.w4ax_matmul import UNPACKED_ROW_ALIGN

    key = jax.random.key(0)
    m = 8192
    kw = dict(layout="unpacked", row_align=UNPACKED_ROW_ALIGN)
    if variant == "act_quant_swiglu":
        k = 14336
        up = jax.random.normal(key, (m, k), jnp.bfloat16)
        gate = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.bfloat16)
        fn = jax.jit(lambda x, g: aq.act_quant(x, None, k - 256, gate=g, **kw))
        args = (up, gate)
    else:
        k = 4096
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        # a calibrated checkpoint's stored form: each segment's channels ascending
        # (`fmpq.gather_order`, as bench_throughput's random_params stores them)
        from comet_jax.quant import fmpq

        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 2), k))
        perm = jnp.asarray(perm[fmpq.gather_order(perm, 256)], jnp.int32)
        w = jax.random.uniform(jax.random.fold_in(key, 3), (k,), jnp.bfloat16, 0.5, 1.5)
        fn = jax.jit(lambda x, p, w: aq.act_quant(x, p, k - 256, norm_weight=w, **kw))
        args = (x, perm, w)
    compiled = fn.lower(*args).compile()
    return lambda: compiled(*args)


# the engine-shaped decode call by how its dots are fed (docs/kernels_attention.md)
ENGINE_DECODE_KWARGS = {
    "decode_engine": {},  # the default (f16 nibbles)
    "decode_engine_qk_int8": dict(qk_int8=True, q_residual=False),
    "decode_engine_qk_int8x2": dict(qk_int8=True, q_residual=True),
}

VARIANTS = {
    "decode_int4": _decode,  # the default path (2 warps at this grid)
    "decode_int4_w4": _decode,
    "decode_bf16": _decode,  # the same kernel on bf16 pages (4 warps)
    "prefill_kv4": _prefill,  # dequantized pool + bf16-page kernel (the dequant pass too)
    "prefill_mha": _prefill,
    "decode_engine": _engine,
    "decode_engine_qk_int8": _engine,
    "decode_engine_qk_int8x2": _engine,
    "write_engine": _engine,
    "act_quant_swiglu": _act_quant,
    "act_quant_norm": _act_quant,
}
KERNEL_REGEX = "regex:paged_attention|mha|kv4_dequant|kv4_write|act_quant"


def child(names):
    """Launch each variant's kernels once, in order (the parent maps launches to names)."""
    import jax

    thunks = [(n, VARIANTS[n](n)) for n in names]
    for n, thunk in thunks:
        jax.block_until_ready(thunk())
        print(f"[launched {n}]", flush=True)


def parse(csv_text: str, names):
    """ncu ``--csv --page details`` text -> one dict per profiled kernel launch, in order."""
    start = csv_text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV header in the profiler output")
    rows = list(csv.DictReader(io.StringIO(csv_text[start:])))
    launches: dict[int, dict] = {}
    for r in rows:
        i = int(r["ID"])
        d = launches.setdefault(i, {"kernel": r["Kernel Name"].split("(")[0]})
        name, unit, val = r["Metric Name"], r.get("Metric Unit", ""), r["Metric Value"]
        try:
            val = float(val.replace(",", ""))
        except ValueError:
            pass
        if name in KEEP:
            d[KEEP[name]] = val
            if name == "Duration":
                d["duration_unit"] = unit
        elif name.startswith("smsp__average_warps_issue_stalled_"):
            d["stall_" + name.split("stalled_")[1].split("_per_issue")[0]] = val
        elif name in EXTRA_METRICS or name in TENSOR_METRICS:
            d[name] = val
    out = [launches[i] for i in sorted(launches)]
    # Map launches to variants: the kernels of each variant come in launch order; prefill_kv4
    # launches the dequantize kernel, then the attention kernel.
    per_variant = {"prefill_kv4": 2}
    k = 0
    for n in names:
        for _ in range(per_variant.get(n, 1)):
            if k < len(out):
                out[k]["variant"] = n
                k += 1
    return out


def markdown(meta, launches):
    cols = [
        ("variant", "variant"), ("kernel", "kernel"), ("duration", "time"),
        ("dram_pct", "DRAM %"), ("regs", "regs"), ("threads", "threads"),
        ("occ_theoretical_pct", "occ. theor. %"), ("occ_achieved_pct", "occ. achieved %"),
        ("issue_active_pct", "cycles issuing %"), ("eligible_per_scheduler", "eligible/sched"),
        ("cycles_per_issue", "cycles/issue"), ("dram__bytes_read.sum", "DRAM read"),
        ("dram__bytes_write.sum", "DRAM write"),
    ]  # fmt: skip
    lines = [f"# ncu: attention kernels ({meta})", ""]
    lines.append("| " + " | ".join(c[1] for c in cols) + " | top stalls (cycles per issue) |")
    lines.append("|" + "---|" * (len(cols) + 1))
    for d in launches:
        stalls = sorted(
            ((k[6:], v) for k, v in d.items() if k.startswith("stall_") and isinstance(v, float)),
            key=lambda kv: -kv[1],
        )[:5]
        cells = []
        for c, _ in cols:
            v = d.get(c, "")
            cell = f"{v:.4g}" if isinstance(v, float) else str(v)
            if c == "duration" and cell:
                cell += " " + d.get("duration_unit", "")
            cells.append(cell)
        lines.append(
            "| " + " | ".join(cells) + " | " + ", ".join(f"{k} {v:.2f}" for k, v in stalls) + " |"
        )
    limits = [
        f"{d.get('variant')}: limits regs {d.get('limit_regs')} smem {d.get('limit_smem')} "
        f"warps {d.get('limit_warps')}; dyn smem {d.get('dyn_smem')}; grid {d.get('grid')}"
        for d in launches
    ]
    tensor = [
        f"{d.get('variant')}: " + ", ".join(f"{m} {d[m]:.4g}" for m in TENSOR_METRICS if m in d)
        for d in launches
        if any(m in d for m in TENSOR_METRICS)
    ]
    if tensor:
        tensor = ["", "Tensor pipes:", ""] + [f"- {t}" for t in tensor]
    return "\n".join(lines + [""] + limits + tensor) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " +
                    ", ".join(VARIANTS))  # fmt: skip
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.child:
        child(names)
        return
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on the PATH")
    cmd = [ncu, "--clock-control", "none", "--kernel-name", KERNEL_REGEX, "--csv",
           "--page", "details", "--metrics",
           ",".join(STALL_METRICS + EXTRA_METRICS + known_metrics(ncu, TENSOR_METRICS))]  # fmt: skip
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += [sys.executable, os.path.abspath(__file__), "--child", "--variants", ",".join(names)]
    t0 = time.time()
    # ncu saves and restores device memory around each replayed kernel: with XLA holding most
    # of the device (its default preallocation, or the 92% the engine-shaped variants' import
    # of bench_attention asks for) it "failed to profile" (H200, 2026-11-28).
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, NAME + ".csv"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"ncu exited with {proc.returncode}")
    import jax

    version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        ncu=version.strip().splitlines()[-1:],
        wall_s=round(time.time() - t0, 1),
        shape=dict(
            decode=dict(B=B, S=S),
            prefill=dict(B=PB, T=PT),
            engine=dict(B=EB, S=(E_LO, E_HI), layers=E_LAYERS, layer=E_LAYER),
            heads=(HQ, HKV, D),
        ),
    )
    launches = parse(proc.stdout, names)
    with open(os.path.join(OUT, NAME + ".json"), "w") as f:
        json.dump(dict(meta=meta, launches=launches), f, indent=1)
    md = markdown(meta, launches)
    with open(os.path.join(OUT, NAME + ".md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
