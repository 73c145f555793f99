"""Tensor-parallel decode benchmark: LLaMA-3-70B shapes (random weights), d-way TP vs 1 device.

    PYTHONPATH=. python3 experiments/bench_tp.py --tp 2 --layers 80 --batch 1,16,64 \
        --context 1024 --out $OUT                 # 2 GPUs (nvidia-h200-x2 / h100-x2)
    PYTHONPATH=. python3 experiments/bench_tp.py --tiny --out /tmp/tp   # CPU smoke test

For each decode batch size B: one jitted engine decode step (tokens [B, 1], every sequence
`context` tokens into a paged KV4 cache, greedy sampling) is timed on
  * ``tp1``: one device, the same model as ``tpd`` (row-parallel layers loop over their d
    chunks and sum: the baseline that measures sharding overhead only);
  * ``tp1_plain``: one device, ordinary FMPQ W4Ax (one chunk; the single-GPU production path);
  * ``tpd``: d devices, params and KV cache sharded by `comet_jax.parallel.rules`.
All three are measured in the same run. Reported: decode tokens/s, ms/step, scaling efficiency
``tok/s(tpd) / (d * tok/s(tp1_plain))``, and the time in all-reduce, measured by timing a
chain of the same number of `psum`s of the same size ([B, H], 2 per layer + 1 for the
embedding) under `shard_map` on the same mesh. Weights are random INT4 (`W4AxLinear` init),
``--int8-frac`` of every input group's channels in INT8 blocks. Writes ``bench_tp.json`` and a
Markdown table ``bench_tp.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time


def _pre_jax(argv):
    """--tiny on the CPU needs several host devices, set before jax is imported."""
    if "--tiny" in argv and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


_pre_jax(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from comet_jax.engine import kv_cache  # noqa: E402
from comet_jax.engine.runner import (  # noqa: E402
    MODEL_PRESETS,
    PagedAttention,
    StepInputs,
    make_step_fn,
)
from comet_jax.parallel import make_mesh  # noqa: E402
from comet_jax.parallel import sharded_runner as sr  # noqa: E402
from comet_jax.parallel.tp_quant import ChunkedW4AxLinear  # noqa: E402
from comet_jax.quant.qlinear import W4AxLinear  # noqa: E402
from models import LinearPlan, LlamaForCausalLM, ModelConfig, layer_specs  # noqa: E402

SHAPES = {
    "llama3-70b": MODEL_PRESETS["llama3-70b"],
    "tiny": dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=512,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    ),
}


def log(*a):
    print(*a, flush=True)


def make_plan(
    cfg: ModelConfig,
    n_chunks: int,
    int8_frac: float,
    block: int,
    tile: int,
    mode: str,
    interpret: bool,
) -> LinearPlan:
    """W4Ax everywhere; o_proj/down_proj as `n_chunks`-chunk row-parallel backends."""
    overrides = {}
    for group, spec in layer_specs(cfg, 0).items():
        c = n_chunks if group in ("o_in", "down_in") else 1
        kc = spec.in_features // c
        k8 = int(round(kc * int8_frac / block)) * block
        kw = dict(k4=kc - k8, k8=k8, block=block, tile=tile, mode=mode, interpret=interpret)
        if c > 1:
            overrides[(None, group)] = ChunkedW4AxLinear(**kw, n_chunks=c)
        else:
            overrides[(None, group)] = W4AxLinear(**kw)
    return LinearPlan.from_mapping(overrides)


def time_fn(fn, warmup: int, iters: int) -> float:
    """Seconds per call (fn returns something to block on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def decode_setup(model, mesh, cfg, batch, context, page_size, kv_group):
    """(step() -> tokens, params, cache) of one decode step at `context` tokens per sequence."""
    pages_per_seq = -(-(context + 1) // page_size)
    ccfg = kv_cache.KVCacheConfig(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        page_size=page_size,
        num_pages=batch * pages_per_seq + 1,
        group_size=kv_group,
        dtype="int4",
    )
    model = sr.shard_model(model, mesh)
    params = sr.init_sharded_params(model, mesh, jax.random.key(0))
    cache = sr.init_sharded_cache(ccfg, mesh)
    step = sr.jit_step(make_step_fn(model), mesh, params, cache, cfg)
    pt = (1 + np.arange(batch * pages_per_seq, dtype=np.int32)).reshape(batch, pages_per_seq)
    inp = StepInputs.zeros(batch, 1, pages_per_seq)._replace(
        tokens=np.ones((batch, 1), np.int32),
        start=np.full(batch, context, np.int32),
        num_valid=np.ones(batch, np.int32),
        page_table=pt,
    )
    state = {"cache": cache}

    def run():
        tok, state["cache"] = step(params, state["cache"], inp)
        return tok

    return run, params, state


def allreduce_time(mesh, batch, hidden, n, dtype, warmup, iters) -> float:
    """Seconds for `n` chained psums of [batch, hidden] over the mesh (the row-parallel
    all-reduces of one decode step)."""
    d = mesh.shape["tp"]

    def chain(x):
        for _ in range(n):
            x = jax.lax.psum(x, "tp") * (1.0 / d)  # keep values bounded; a real dependency
        return x

    f = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    x = jnp.ones((batch, hidden), dtype)
    return time_fn(lambda: f(x), warmup, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-70b", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, 8 CPU devices")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (memory)")
    ap.add_argument("--batch", default=None, help="decode batch sizes (default 1,16,64; tiny 1,4)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--int8-frac", type=float, default=0.25)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true", help="skip the tp1_plain baseline")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also write a jax.profiler trace of 5 tpd decode steps per batch (TensorBoard / "
        "Perfetto: the all-reduce kernels, e.g. ncclDevKernel_AllReduce, give the exact time)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    args = ap.parse_args(argv)

    gpu = jax.default_backend() == "gpu"
    args.batch = args.batch or ("1,4" if args.tiny else "1,16,64")
    if args.tiny:
        args.model, args.context, args.iters, args.warmup = "tiny", 40, 3, 1
        args.page_size = 16
    shape = dict(SHAPES[args.model])
    if args.layers:
        shape["num_layers"] = args.layers
    cfg = ModelConfig(**shape)
    mode, attn = ("pallas", "pallas") if gpu else ("sim", "reference")
    block = 128 if cfg.hidden_size % 128 == 0 and not args.tiny else 32
    tile = block
    kv_group = 128 if cfg.head_dim % 128 == 0 else 64
    d = args.tp
    if jax.device_count() < d:
        raise SystemExit(f"--tp {d} needs {d} devices, found {jax.device_count()}")
    attention = PagedAttention(attn)
    models = {
        "tp1": (
            LlamaForCausalLM(
                cfg,
                linear=make_plan(cfg, d, args.int8_frac, block, tile, mode, False),
                attention=attention,
                dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16,
            ),
            1,
        ),
        f"tp{d}": (
            LlamaForCausalLM(
                cfg,
                linear=make_plan(cfg, d, args.int8_frac, block, tile, mode, False),
                attention=attention,
                dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16,
            ),
            d,
        ),
    }
    if not args.no_plain:
        models["tp1_plain"] = (
            LlamaForCausalLM(
                cfg,
                linear=make_plan(cfg, 1, args.int8_frac, block, tile, mode, False),
                attention=attention,
                dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16,
            ),
            1,
        )
    meta = {
        "model": args.model,
        "config": dataclasses.asdict(cfg),
        "tp": d,
        "context": args.context,
        "int8_frac": args.int8_frac,
        "block": block,
        "kernels": mode,
        "attention": attn,
        "device": str(jax.devices()[0].device_kind),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(json.dumps(meta))
    rows = []
    for b in [int(v) for v in args.batch.split(",")]:
        row = {"batch": b}
        for name, (model, n_dev) in models.items():
            mesh = make_mesh(n_dev)
            try:
                run, params, state = decode_setup(
                    model, mesh, cfg, b, args.context, args.page_size, kv_group
                )
                s = time_fn(run, args.warmup, args.iters)
                if args.profile and n_dev > 1:
                    with jax.profiler.trace(str(pathlib.Path(args.out) / f"trace_b{b}")):
                        time_fn(run, 0, 5)
                row[f"{name}_ms"] = 1e3 * s
                row[f"{name}_tok_s"] = b / s
                del params, state
            except Exception as e:  # noqa: BLE001 - an OOM at one size must not end the sweep
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"B={b} {name}: {row[f'{name}_error']}")
        mesh = make_mesh(d)
        n_ar = 2 * cfg.num_layers + 1
        ar = allreduce_time(mesh, b, cfg.hidden_size, n_ar, jnp.float32, args.warmup, args.iters)
        row["allreduce_ms"] = 1e3 * ar
        row["allreduce_count"] = n_ar
        base = row.get("tp1_plain_tok_s", row.get("tp1_tok_s"))
        if base and f"tp{d}_tok_s" in row:
            row["speedup"] = row[f"tp{d}_tok_s"] / base
            row["efficiency"] = row["speedup"] / d
            row["allreduce_share"] = row["allreduce_ms"] / row[f"tp{d}_ms"]
        log(json.dumps(row))
        rows.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_tp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = write_table(rows, meta, d)
    (out / "bench_tp.md").write_text(table)
    print(table)


def write_table(rows, meta, d) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"TP decode, {meta['model']} ({meta['config']['num_layers']} layers), context "
        f"{meta['context']}, {meta['device']} x{d}, kernels={meta['kernels']}",
        "",
        f"| B | tp1_plain tok/s | tp1 tok/s | tp{d} tok/s | speedup | efficiency | "
        "all-reduce ms/step | share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {f(r.get('tp1_plain_tok_s'), '.1f')} | "
            f"{f(r.get('tp1_tok_s'), '.1f')} | {f(r.get(f'tp{d}_tok_s'), '.1f')} | "
            f"{f(r.get('speedup'), '.2f')} | {f(r.get('efficiency'), '.2f')} | "
            f"{f(r.get('allreduce_ms'), '.3f')} | {f(r.get('allreduce_share'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
