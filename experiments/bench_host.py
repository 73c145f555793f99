"""Host time of the serving engine per step, without a device: the engine's scheduler, input
building and output handling driven by an instant stand-in for the model runner (every step
samples token 7), at the batch sizes of the max-throughput runs. Also counts the rows each
step's calls push through the GEMMs (a decode call's batch bucket; a prefill call's grid,
or its packed rows) against the real tokens: the padding that the shape buckets cost, the
same on any device, for choosing buckets without a GPU.

With asynchronous scheduling (the default) this host work overlaps the GPU's step; the GPU
idles only when a step's host time exceeds the device time of the step before it. At the
LLaMA-3-8B W4AxKV4 128/128 memory batch (up to 5191 running sequences) the engine spent
62.5 ms of host work per 126 ms step on the H100 machine (run 51, docs/benchmarks.md,
2026-11-27), so this is a number to keep down. Same scheduling as the engine on the GPU: the
stand-in only replaces the device call.

    python experiments/bench_host.py                        # 6131 x 128/128 and 1214 x 1024/512
    python experiments/bench_host.py --cases 256:1024/512 --profile 20
    python experiments/bench_host.py --cases 6131:128/128 --prefill-batch-buckets 1,16,32,64 \
        --decode-buckets 4,8,16,32,64,128,256,512,1024,2048,3072,4096,5120

Writes JSON (--out) and prints a table: steps, host ms per step (schedule, inputs and output
handling together; `--profile N` prints where it goes) and GEMM rows per real token of the
decode and prefill calls.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import sys
import time
import types

import numpy as np

from comet_jax.engine.config import SCHEDULES, EngineConfig
from comet_jax.engine.engine import LLMEngine
from comet_jax.engine.runner import pack_rows
from comet_jax.engine.sampling import SamplingParams

VOCAB = 128256


class InstantRunner:
    """The `ModelRunner` surface the engine uses, with no model: `run` returns token 7 for
    every row at once (a host array; the engine reads it with np.asarray), and counts the
    rows the real runner's GEMMs would process: a decode call's batch bucket, a prefill call's
    [batch, chunk] grid, or its packed rows (`runner.pack_rows`)."""

    def __init__(self, num_pages: int, out_size: int, pack_buckets: tuple[int, ...]):
        self.num_pages, self.out_size, self.allow_lazy = num_pages, out_size, True
        self.pack_buckets = tuple(pack_buckets)
        self.no_tokens = np.zeros(out_size, np.int32)
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=VOCAB))
        # call kind -> [rows computed, real tokens, calls]
        self.rows = {"decode": [0, 0, 0], "prefill": [0, 0, 0]}

    def token_slots(self, batch: int) -> int:
        return max(batch, self.out_size)

    def run(self, inp, prev=None):
        b, t = inp.tokens.shape
        tokens = int(inp.num_valid.sum())
        count = self.rows["decode" if t == 1 else "prefill"]
        count[0] += pack_rows(b, t, tokens, self.pack_buckets) or b * t
        count[1] += tokens
        count[2] += 1
        return np.full(self.token_slots(b), 7, np.int32)


DECODE_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def engine_for(
    batch: int,
    prompt: int,
    output: int,
    async_scheduling: bool = True,
    decode_buckets: tuple[int, ...] = DECODE_BUCKETS,
    prefill_batch_buckets: tuple[int, ...] | None = None,
    pack_buckets: tuple[int, ...] | None = None,
    schedule: str = "mixed",
    gc_freeze: bool = True,
    gc_full_every_steps: int = 0,
):
    """The engine of the max-throughput runs over an InstantRunner with a pool for `batch`
    sequences of prompt + output tokens: steps of 8192 tokens, min(64, 8192 // prompt)
    prefill sequences, and by default run 50's 128/128 buckets (docs/benchmarks.md): decode
    `DECODE_BUCKETS` below the batch plus the batch (its 1024/512 runs stopped at 512),
    prefill batch (1, max), packed rows (8192). Given buckets past the limits are dropped
    and the limit added. `schedule`: EngineConfig.schedule."""
    decode = tuple(b for b in decode_buckets if b < batch)
    prefill_seqs = min(64, max(1, 8192 // prompt), batch)
    prefill = tuple(b for b in prefill_batch_buckets or (1,) if b < prefill_seqs)
    cfg = EngineConfig(
        max_batch=batch,
        max_tokens_per_step=8192,
        max_prefill_seqs=prefill_seqs,
        max_model_len=prompt + output,
        page_size=128,
        decode_buckets=decode + (batch,),
        prefill_batch_buckets=prefill + (prefill_seqs,),
        chunk_buckets=tuple(sorted({min(prompt, 8192), 8192})),
        pack_buckets=tuple(b for b in pack_buckets or () if b < 8192) + (8192,),
        aot_compile=False,
        kernels="reference",
        async_scheduling=async_scheduling,
        schedule=schedule,
        gc_freeze=gc_freeze,
        gc_full_every_steps=gc_full_every_steps,
    )
    pages = batch * -(-(prompt + output) // 128) + 1
    runner = InstantRunner(pages, max(batch, prefill_seqs), cfg.pack_bucket_list)
    return LLMEngine(cfg, runner, progress=False)


class GcPauses:
    """Times every collection of Python's garbage collector while active (``gc.callbacks``):
    per generation the count, total and longest pause in ms. A pause stops the engine's host
    loop; one longer than the device step leaves the GPU idle (docs/benchmarks.md run 69)."""

    def __init__(self):
        self.pauses: dict[int, list[float]] = {}
        self._t0 = 0.0

    def _hook(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.setdefault(info["generation"], []).append(time.perf_counter() - self._t0)

    def __enter__(self):
        gc.callbacks.append(self._hook)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._hook)
        return False

    def summary(self) -> dict:
        return {
            f"gen{g}": {
                "count": len(p),
                "total_ms": round(1e3 * sum(p), 3),
                "max_ms": round(1e3 * max(p), 3),
            }
            for g, p in sorted(self.pauses.items())
        }


def run_case(batch: int, prompt: int, output: int, profile: int = 0, **engine_kw) -> dict:
    eng = engine_for(batch, prompt, output, **engine_kw)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    seen = [0]

    def on_output(out):
        seen[0] += len(out.new_token_ids)

    for _ in range(batch):
        eng.add_request(None, rng.integers(0, VOCAB, prompt).tolist(), params, on_output)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    steps = 0
    with GcPauses() as pauses:
        while eng.has_unfinished():
            eng.step()
            steps += 1
        while eng._inflight is not None:  # the last dispatched step's tokens
            eng.step()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    eng.close()
    if seen[0] != batch * output:
        raise RuntimeError(f"{seen[0]} tokens streamed, expected {batch * output}")
    st = eng.stats
    row = dict(
        batch=batch,
        workload=f"{prompt}/{output}",
        steps=st.steps,
        wall_s=wall,
        host_ms_per_step=1e3 * wall / st.steps,
        tokens=seen[0],
        profiled=bool(prof),
        async_scheduling=eng.config.async_scheduling,
        schedule=eng.config.schedule,
        decode_buckets=list(eng.config.decode_bucket_list),
        prefill_batch_buckets=list(eng.config.prefill_batch_bucket_list),
        pack_buckets=list(eng.config.pack_bucket_list),
        gc_freeze=eng.config.gc_freeze,
        gc_full_every_steps=eng.config.gc_full_every_steps,
        engine_full_collections=eng.gc_full_collections,
        gc_pauses=pauses.summary(),
    )
    for kind, (computed, real, calls) in eng.runner.rows.items():
        row[f"{kind}_rows"], row[f"{kind}_tokens"] = computed, real
        row[f"{kind}_rows_per_token"] = computed / max(real, 1)
        row[f"{kind}_calls"] = calls
        row[f"{kind}_tokens_per_call"] = real / max(calls, 1)
    if eng.allocator.num_used:
        raise RuntimeError(f"{eng.allocator.num_used} pages leaked")
    if prof:
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime")
        stats.print_stats(profile)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cases",
        default="6131:128/128,1214:1024/512",
        help="comma list of BATCH:PROMPT/OUTPUT (every request of the batch at once)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per case; the table shows the median"
    )
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions")
    ap.add_argument("--sync", action="store_true", help="synchronous scheduling (default async)")
    ap.add_argument(
        "--schedule",
        default="mixed",
        choices=SCHEDULES,
        help="EngineConfig.schedule",
    )
    ap.add_argument(
        "--decode-buckets",
        default=",".join(map(str, DECODE_BUCKETS)),
        help="comma list; those below a case's batch are kept and the batch added",
    )
    ap.add_argument(
        "--prefill-batch-buckets",
        default="1",
        help="comma list; those below a case's prefill sequences are kept and that number added",
    )
    ap.add_argument(
        "--pack-buckets",
        default="8192",
        help="comma list of packed row counts (EngineConfig.pack_buckets); 8192 is added",
    )
    ap.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EngineConfig.gc_freeze (default on, as in bench_throughput.py); each row reports "
        "the garbage collector's pauses during the run by generation",
    )
    ap.add_argument(
        "--gc-full-every-steps",
        type=int,
        default=0,
        help="EngineConfig.gc_full_every_steps (0: Python's own full collections; N: held off, "
        "run by the engine when it drains or every N steps)",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_host.json"))
    args = ap.parse_args(argv)
    cases = []
    for item in args.cases.split(","):
        try:
            b, wl = item.split(":")
            p, o = wl.split("/")
            cases.append((int(b), int(p), int(o)))
        except ValueError:
            raise SystemExit(
                f"--cases item {item!r}: expected BATCH:PROMPT/OUTPUT, e.g. 256:128/128"
            ) from None
        if min(cases[-1]) < 1:
            raise SystemExit(f"--cases item {item!r}: every number must be >= 1")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} must be >= 1")
    kw = dict(
        async_scheduling=not args.sync,
        schedule=args.schedule,
        gc_freeze=args.gc_freeze,
        gc_full_every_steps=args.gc_full_every_steps,
    )
    for flag, name in (("--decode-buckets", "decode_buckets"),
                       ("--prefill-batch-buckets", "prefill_batch_buckets"),
                       ("--pack-buckets", "pack_buckets")):  # fmt: skip
        text = getattr(args, name)
        try:
            kw[name] = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise SystemExit(f"{flag}={text!r}: expected a comma list of ints") from None
        if min(kw[name]) < 1 or list(kw[name]) != sorted(set(kw[name])):
            raise SystemExit(f"{flag}={text!r}: expected strictly increasing positive ints")
    rows = []
    print(f"{'batch':>6} {'workload':>9} {'steps':>6} {'host ms/step':>13} {'rows/token':>21}")
    for b, p, o in cases:
        runs = [run_case(b, p, o, **kw) for _ in range(args.repeats)]
        row = sorted(runs, key=lambda r: r["host_ms_per_step"])[len(runs) // 2]
        row["runs_ms_per_step"] = [r["host_ms_per_step"] for r in runs]
        rows.append(row)
        pad = (
            f"decode {row['decode_rows_per_token']:.3f} prefill {row['prefill_rows_per_token']:.3f}"
            f"; {row['decode_calls']} decode calls of {row['decode_tokens_per_call']:.0f} rows"
        )
        print(f"{b:>6} {f'{p}/{o}':>9} {row['steps']:>6} {row['host_ms_per_step']:>13.2f}  {pad}")
        full = row["gc_pauses"].get("gen2")
        if full:
            print(f"{'':>6} full collections: {full['count']}, longest {full['max_ms']:.1f} ms")
        if args.profile:
            run_case(b, p, o, profile=args.profile, **kw)
    meta = dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(),
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count())  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
