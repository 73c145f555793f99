"""Offline serving throughput of one engine across precisions (bf16, W8A8, W4A16, W4AxKV4).

For each precision, with random weights in the true shapes of a model preset:
  * max throughput at input/output 1024/512 and 128/128: `--requests` requests submitted at
    once; the scheduler runs as many concurrently as memory (KV pages) and --max-batch allow.
    `--max-batch memory --requests batch` is the paper's protocol (max throughput under equal
    memory): each precision runs one full batch of as many sequences of the longest workload
    as its KV pool holds at full length, so none is preempted;
  * fixed batches 4..256 (exactly B requests of --fixed-workload);
reporting output tokens/s, total tokens/s, time per output token (TPOT), peak device memory,
the batch reached, compile time, and the host share = host time (scheduling, input building,
output handling) / (host + device wait) time. With asynchronous scheduling that host work
overlaps the device, so the host share is an upper bound on idle GPU time; the direct measure
is `--profile-batch B`: ``host_gap_share`` = (untraced step wall time - the step's GPU kernel
time) / wall time, 0 when the host never holds the GPU up. Every max-throughput run also logs
each step untraced (``step_log``: wall time and the wait for the previous step's tokens; a
wait near 0 means the host held the GPU up) and sums it by phase (``step_phases``). bf16 is
the baseline of the same engine, measured in the same run.

    python experiments/bench_throughput.py --preset llama3-8b              # GPU
    python experiments/bench_throughput.py --preset llama3-70b --precisions w4axkv4,bf16
    python experiments/bench_throughput.py --tiny                           # CPU smoke run
    # docs/benchmarks.md runs 71-74 (2.30-2.31x; run 69: 2.29x), one process per precision,
    # only the step shapes the run uses (bf16: --decode-buckets 256, no --pack-buckets;
    # gc.freeze() is the default);
    # run 65 (2.20x) compiled --decode-buckets 4,8,16,32,64,128,256,384,512,640,768,896,1024
    # --pack-buckets 1024,2048,3072,4096,5120,6144,7168,8192; runs 54 and 59 (2.04x, 2.09x):
    # those without --schedule prefill_first:
    python experiments/bench_throughput.py --precisions w4axkv4 --max-batch memory \
        --requests batch --workloads 1024/512 --fixed-batches= --memory-fraction 0.9 \
        --max-tokens-per-step 8192 --max-prefill-seqs 8 --prefill-batch-buckets 1,8 \
        --chunk-buckets 1024,8192 --modes async --kernels pallas --schedule prefill_first \
        --decode-buckets 1024 --pack-buckets 8192 --compile-workers 4 --gpu-monitor
    # runs 51 and 55 (128/128, 1.60x): --workloads 128/128 --max-batch-cap 8192
    #   --max-prefill-seqs 64 --prefill-batch-buckets 1,16,32,64 --chunk-buckets 128,8192
    #   --decode-buckets 4,8,16,32,64,128,256,512,1024,2048,3072,4096,5120

Memory: the KV pool is `--memory-fraction` (default 0.85) of the device memory left after the
weights; the script sets XLA_PYTHON_CLIENT_MEM_FRACTION to 0.92 unless it is set (XLA's own
default preallocates 75% of the device), so each precision gets the pool the GPU can hold. The
max-throughput runs in docs/benchmarks.md since 2026-11-27 used 0.92 and --memory-fraction 0.9.

An 80 GB H100's memory on an H200: XLA_PYTHON_CLIENT_MEM_FRACTION=0.5211 gives the H200's
allocator the H100's limit at 0.92 (78,223,769,600 against 78,217,478,144 bytes,
`device_bytes_limit` in the JSON), so each precision plans the H100's pool and batch (1215
vs 277 at 1024/512). The H200's bandwidth still speeds up the bandwidth-bound steps: on
2026-11-29 the H100's run-83 build gave 2.19x this way on two machines against 2.47x on the
H100 itself (docs/benchmarks.md, runs 118-119): such a ratio is not an H100 figure (for that
build it came out 11% under the H100's).

Writes a JSON file (--out) and prints a table. A configuration whose weights do not fit in
device memory is recorded as "does not fit" instead of being run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from comet_jax.cli import GC_FULL_EVERY_STEPS
from comet_jax.engine.config import SCHEDULES, EngineConfig
from comet_jax.engine.engine import LLMEngine, max_batch_for_memory
from comet_jax.engine.runner import precision_plan, preset_config
from comet_jax.engine.sampling import SamplingParams
from models.llama import LlamaForCausalLM, abstract_params
from pallas_kernels import act_quant, kv4_attention


def random_params(model, seed: int = 0):
    """Random params of `model` (any backend) built leaf by leaf from the abstract tree.

    Avoids tracing the whole model's init (slow to compile for 80 layers): floats ~N(0, 0.02),
    norms 1, weight scales ~0.002-0.004 (so int4 x scale ~ N(0, 0.02)), packed ints uniform;
    a run-time permutation sends a random set of channels to the INT8 segment and stores
    both segments in ascending order, as `quantize_model` stores a calibrated plan's
    (`QuantRecipe.sorted_gather`, `fmpq.gather_order`).
    """
    abstract = abstract_params(model)
    key = jax.random.key(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        k = jax.random.fold_in(key, i)
        shape, dtype = leaf.shape, leaf.dtype
        if "norm" in name:
            x = jnp.ones(shape, dtype)
        elif "perm" in name:
            x = jnp.asarray(_stored_perm(model, path, k, shape[0]), dtype)
        elif "scale" in name:
            x = jax.random.uniform(k, shape, dtype, 0.002, 0.004)
        elif jnp.issubdtype(dtype, jnp.integer):
            info = jnp.iinfo(dtype)
            x = jax.random.randint(k, shape, info.min, info.max, jnp.int32).astype(dtype)
        else:
            x = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def _stored_perm(model, path, key, k: int) -> np.ndarray:
    """A random run-time permutation of the leaf at `path` (``layers_{i}/{group}/perm``) in
    the stored form of a calibrated checkpoint (see `random_params`)."""
    from comet_jax.quant import fmpq
    from models.projection import PROJECTIONS_OF

    layer, group, _ = (p.key for p in path[-3:])
    k8 = model.linear.backend_for(int(layer.removeprefix("layers_")), PROJECTIONS_OF[group][0]).k8
    perm = np.asarray(jax.random.permutation(key, k))
    return perm[fmpq.gather_order(perm, k8)]


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_memory():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit"), stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def run_workload(
    engine: LLMEngine,
    n: int,
    prompt_len: int,
    out_len: int,
    seed: int,
    trace: tuple[int, int] | list[tuple[int, int]] | None = None,
    keep: str | None = None,
) -> dict:
    """One max-throughput or fixed-batch run. ``trace=(start, steps)``: trace steps
    ``[start, start + steps)`` of this run (:func:`trace_window`; result under "trace");
    a list of such pairs traces each window (result under "trace" as a list, in order)."""
    windows, single = None, trace is not None and isinstance(trace[0], int)
    if trace is not None:
        windows = [tuple(trace)] if single else [tuple(w) for w in trace]
        for (start, steps), nxt in zip(windows, windows[1:] + [None]):
            if start < 0 or steps < 1 or (nxt is not None and nxt[0] < start + steps):
                raise ValueError(
                    f"trace windows must be (start >= 0, steps >= 1) pairs in increasing, "
                    f"non-overlapping order, got {windows}"
                )
    rng = np.random.default_rng(seed)
    vocab = engine.runner.model.config.vocab_size
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    first, done = {}, {}

    def on_output(out):
        now = time.perf_counter()
        first.setdefault(out.request_id, now)
        if out.finished:
            done[out.request_id] = now

    st0 = dataclasses.replace(engine.stats)
    preempt0 = engine.scheduler.num_preemptions  # the engine's counter spans all workloads
    own0 = engine.runner.own_kv_calls
    t0 = time.perf_counter()
    for _ in range(n):
        engine.add_request(None, rng.integers(0, vocab, prompt_len).tolist(), params, on_output)
    batch_reached, decode_steps, step_i, traced = 0, 0, 0, []
    pending = list(windows or [])
    steps_log = []  # (kind dispatched, step wall, wait) per untraced step
    st = engine.stats
    while engine.has_unfinished():
        if pending and step_i == pending[0][0]:
            _, n_steps = pending.pop(0)
            path = keep if keep is None or not traced else f"{keep}.{len(traced)}"
            traced.append(trace_window(engine, n_steps, keep=path))
            steps_log.append(("traced", 0.0, 0.0))  # breaks the wait attribution chain
            step_i += n_steps
            continue
        calls0, wait0, ts = (st.decode_calls, st.prefill_calls), st.wait_time_s, time.perf_counter()
        engine.step()
        wall_step = time.perf_counter() - ts
        kind = STEP_KINDS[st.decode_calls > calls0[0], st.prefill_calls > calls0[1]]
        steps_log.append((kind, wall_step, st.wait_time_s - wait0))
        step_i += 1
        batch_reached = max(batch_reached, len(engine.scheduler.running))
    wall = time.perf_counter() - t0
    host = st.host_time_s - st0.host_time_s
    dev = st.device_time_s - st0.device_time_s
    wait = st.wait_time_s - st0.wait_time_s
    gen = st.generated_tokens - st0.generated_tokens
    tpot = [(done[r] - first[r]) / (out_len - 1) for r in done if out_len > 1]
    decode_steps = st.steps - st0.steps
    return {
        "requests": n,
        "input_len": prompt_len,
        "output_len": out_len,
        "wall_s": wall,
        "output_tokens": gen,
        "output_tok_per_s": gen / wall,
        "total_tok_per_s": (gen + n * prompt_len) / wall,
        "tpot_ms": 1e3 * float(np.mean(tpot)) if tpot else None,
        "batch_reached": batch_reached,
        "steps": decode_steps,
        "host_s": host,
        "device_s": dev,
        # of device_s: blocked on the previous step's tokens (the rest is dispatch); near 0
        # means the host sets the pace and the GPU waits between steps
        "wait_s": wait,
        "engine_overhead": host / max(host + dev, 1e-9),
        "preemptions": engine.scheduler.num_preemptions - preempt0,
        "own_kv_calls": engine.runner.own_kv_calls - own0,  # prefill calls on own K/V
        "step_phases": step_phases(steps_log, engine.config.async_scheduling),
        # per step, in order: [kind dispatched, wall ms, wait ms] (where a tail comes from)
        "step_log": [[k, round(1e3 * w, 3), round(1e3 * q, 3)] for k, w, q in steps_log],
        **({"trace": traced[0] if single else traced} if trace is not None else {}),
    }


class GpuMonitor:
    """Samples the GPU's SM clock, power and temperature with ``nvidia-smi`` while a run goes
    (``--gpu-monitor``): whether a sustained run holds the clocks that short traced windows
    see. ``summary()``: per field the sample count, median, min and max (None when there is
    no ``nvidia-smi``, e.g. on the CPU)."""

    FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "temperature.gpu")

    def __init__(self, enabled: bool = True, period_ms: int = 250):
        self.enabled, self.period_ms = enabled, period_ms
        self._proc, self._lines = None, []

    def __enter__(self):
        exe = shutil.which("nvidia-smi") if self.enabled else None
        if exe:
            cmd = [exe, f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits"]
            cmd += ["-i", "0", "-lms", str(self.period_ms)]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self._lines = [ln for ln in out.splitlines() if ln.strip()]
        return False

    def summary(self) -> dict | None:
        return parse_gpu_samples(self._lines, self.FIELDS) if self._proc is not None else None


def parse_gpu_samples(lines: list[str], fields: tuple[str, ...]) -> dict:
    """``nvidia-smi --format=csv,noheader,nounits`` lines -> {field: {samples, median, min,
    max}}; values that are not numbers ("[N/A]") are skipped."""
    cols: dict[str, list[float]] = {f: [] for f in fields}
    for line in lines:
        for f, v in zip(fields, (x.strip() for x in line.split(","))):
            try:
                cols[f].append(float(v))
            except ValueError:
                pass
    return {
        f: {
            "samples": len(v),
            "median": float(np.median(v)),
            "min": float(np.min(v)),
            "max": float(np.max(v)),
        }
        for f, v in cols.items()
        if v
    }


# (decode call dispatched, prefill call dispatched) -> the step's kind
STEP_KINDS = {
    (True, False): "decode",
    (False, True): "prefill",
    (True, True): "mixed",
    (False, False): "drain",
}
# A wait shorter than this: the device was done before the host asked (reading a finished
# step's tokens back took 0.6-0.9 ms on the H100 machine, run 69; a device-bound decode
# step's wait is ~15-30 ms).
HOST_BOUND_WAIT_S = 1.5e-3


def step_phases(log: list[tuple[str, float, float]], asynchronous: bool) -> dict:
    """Untraced per-step timing by the kind of device work each step waited for.

    ``log``: per ``engine.step()`` (kind of the call it dispatched, its wall time, the part of
    it spent blocked on sampled tokens). With asynchronous scheduling a step waits for the
    previous step's device work, so its wall time and wait are attributed to the previous
    step's kind: in a device-bound steady state the step's wall time is that work's device
    period (dispatch to dispatch, GPU idle included). ``host_bound`` counts steps whose wait
    was under ``HOST_BOUND_WAIT_S`` (the device had finished before the host asked: the GPU
    may have idled: run 69's collector stalls); ``host_ms`` is the median of wall - wait (the host's own work and
    dispatch). Traced windows (kind "traced") and the first step are left out."""
    out: dict[str, dict] = {}
    for i, (kind, wall, wait) in enumerate(log):
        waited_for = kind
        if asynchronous:
            waited_for = log[i - 1][0] if i else "traced"
        if kind == "traced" or waited_for == "traced":
            continue
        out.setdefault(waited_for, []).append((wall, wait))
    summary = {}
    for kind, rows in out.items():
        walls = np.array([w for w, _ in rows])
        waits = np.array([q for _, q in rows])
        summary[kind] = {
            "steps": len(rows),
            "wall_s": float(walls.sum()),
            "median_ms": 1e3 * float(np.median(walls)),
            "p90_ms": 1e3 * float(np.percentile(walls, 90)),
            "median_wait_ms": 1e3 * float(np.median(waits)),
            "host_ms": 1e3 * float(np.median(walls - waits)),
            "host_bound": int((waits < HOST_BOUND_WAIT_S).sum()),
        }
    return summary


# Kernel-name fragments -> category of the step-time breakdown (first match wins).
KERNEL_CATEGORIES = (
    ("w4ax", "W4Ax GEMM (Pallas)"),
    ("mosaic_gpu", "W4Ax GEMM (Mosaic GPU)"),  # the engine's only Mosaic GPU kernel
    ("act_quant", "activation quantization (Pallas)"),
    ("paged_attention", "paged attention (Pallas)"),
    ("gemm", "cuBLAS GEMM"),
    ("xmma", "cuBLAS GEMM"),
    ("nvjet", "cuBLAS GEMM"),  # cuBLAS's Hopper kernels (nvjet_sm90_...)
    ("cutlass", "cuBLAS GEMM"),
    ("memcpy", "copies"),
    ("memset", "copies"),
    ("copy", "copies"),
    ("scatter", "XLA scatter (KV write)"),
    ("gather", "XLA gather"),
    ("reduce", "XLA reductions"),
    ("fusion", "XLA fusions (other)"),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for frag, cat in KERNEL_CATEGORIES:
        if frag in low:
            return cat
    return "other"


def kernel_breakdown(per: dict, steps: int, top: int = 25) -> dict:
    """Per-step device us by category and the ``top`` kernels, from ``{name: total ns}``."""
    cats: dict[str, float] = {}
    for name, ns in per.items():
        cat = kernel_category(name)
        cats[cat] = cats.get(cat, 0.0) + ns / steps / 1e3
    best = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return {
        "by_category_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels_us": [(name, ns / steps / 1e3) for name, ns in best],
    }


class LastDecodeCall:
    """While open, ``runner.run`` also keeps its last decode call's ``(inputs, prev)`` (a
    ``[B, 1]`` call): what :func:`replay_decode` dispatches again after the run."""

    def __init__(self, runner):
        self.runner, self.inp, self.prev = runner, None, None

    def __enter__(self):
        run = self.runner.run

        def recording(inp, prev=None):
            if inp.tokens.shape[1] == 1:
                self.inp, self.prev = inp, prev
            return run(inp, prev)

        self.runner.run = recording  # an instance attribute over the class's method
        return self

    def __exit__(self, *exc):
        del self.runner.run


# StepInputs fields the model executable takes (the sampler's stay on the host)
MODEL_INPUT_FIELDS = ("tokens", "start", "page_table", "src", "window_slot")


def replay_decode(runner, inp, prev, steps: int, trace_steps: int = 0) -> dict:
    """The decode step's wall time without the engine around it: ``runner.run(inp, prev)``
    (the run's last decode call) dispatched ``steps`` times back to back, at most two in
    flight as in the engine's asynchronous scheduling: ms a step with the inputs built on
    the host as the engine passes them, and with the model's inputs put on the device once.
    Against the engine's median decode step, the
    difference is what the engine's own host work costs the device; against the traced
    kernel time, what dispatch (input copies, graph launch) does. The pages it writes belong
    to finished requests (the pool's next owners write before they read).

    ``trace_steps`` > 0: then traces that many more dispatches (inputs on the device) and
    adds ``traced``: kernel ms and launches per step, by category and by kernel (launches
    and us per step), and ``untraced_minus_kernels_ms``, the untraced step's wall time less
    its kernels' sum for the very same call (the profiler runs XLA's command buffers op by
    op, so the traced steps' own wall time is not the untraced one)."""
    if steps < 1:
        raise ValueError(f"replay_decode: steps must be >= 1, got {steps}")
    if trace_steps < 0:
        raise ValueError(f"replay_decode: trace_steps must be >= 0, got {trace_steps}")

    def per_step(inputs):
        runner.run(inputs, prev).block_until_ready()  # the shape's first call out of the way
        t0 = time.perf_counter()
        flight = []
        for _ in range(steps):
            flight.append(runner.run(inputs, prev))
            if len(flight) > 2:  # the engine's depth: one step running, the next dispatched
                flight.pop(0).block_until_ready()
        flight[-1].block_until_ready()
        return 1e3 * (time.perf_counter() - t0) / steps

    host = per_step(inp)
    on_device = inp._replace(**{f: jax.device_put(getattr(inp, f)) for f in MODEL_INPUT_FIELDS})
    out = {
        "steps": steps,
        "batch": int(inp.tokens.shape[0]),
        "step_ms": host,
        "step_ms_inputs_on_device": per_step(on_device),
    }
    if trace_steps:
        out["traced"] = _trace_replay(runner, on_device, prev, trace_steps)
        out["untraced_minus_kernels_ms"] = (
            out["step_ms_inputs_on_device"] - out["traced"]["kernel_ms"]
        )
    return out


def _trace_replay(runner, inputs, prev, steps: int) -> dict:
    """Kernel time and launches per step of ``steps`` traced dispatches of one call."""
    from pallas_kernels.timing import kernel_counts, traced_kernels

    def run():
        for _ in range(steps):
            runner.run(inputs, prev).block_until_ready()

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "replay.xplane.pb")
        total, count, _, per = traced_kernels(run, keep=path)
        counts = kernel_counts(path) if os.path.exists(path) else {}
    by_kernel = sorted(per.items(), key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "kernel_ms": total / steps / 1e6,
        "kernels_per_step": count / steps,
        "by_category_us": kernel_breakdown(per, steps)["by_category_us"],
        # [name, launches a step, us a step], the longest first
        "kernels": [[n, counts.get(n, 0) / steps, ns / steps / 1e3] for n, ns in by_kernel],
    }


def trace_window(engine: LLMEngine, steps: int, keep: str | None = None) -> dict:
    """Traces the engine's next ``steps`` steps as they come (whatever mix of decode rows and
    prefill chunks the scheduler makes): wall and kernel time per step, the step's mix
    (running sequences, tokens through the model), kernel time by category, the timeline."""
    from pallas_kernels.timing import timeline, traced_kernels

    st0 = dataclasses.replace(engine.stats)
    running, walls = [], []

    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            if not engine.has_unfinished():
                break
            engine.step()
            running.append(len(engine.scheduler.running))
        walls.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as d:
        path = keep or os.path.join(d, "window.xplane.pb")
        total, count, _, per = traced_kernels(run, keep=path)
        tl = timeline(path) if os.path.exists(path) else {}
    done = max(1, len(running))
    st = engine.stats
    return {
        "steps": len(running),
        "mean_running": float(np.mean(running)) if running else 0.0,
        "tokens_per_step": (st.processed_tokens - st0.processed_tokens) / done,
        "prefill_calls": st.prefill_calls - st0.prefill_calls,
        "decode_calls": st.decode_calls - st0.decode_calls,
        "step_wall_ms": 1e3 * walls[0] / done,
        "step_kernel_ms": total / done / 1e6,
        "kernels_per_step": count / done,
        "timeline": {k: v for k, v in tl.items() if k != "host_top_us"},
        **kernel_breakdown(per, done),
    }


def profile_decode(
    engine: LLMEngine, batch: int, steps: int, prompt_len: int = 128, keep: str | None = None
) -> dict:
    """Device time of steady-state decode steps at `batch`, by kernel, from a profiler trace.

    Submits `batch` requests, runs until every prompt is prefilled, traces `steps` decode
    steps, then aborts the requests (pages freed). Besides kernel time it reports where the
    step's wall time goes: the host's dispatch of the compiled step (`runner.run` until it
    returns), and the trace's timeline (GPU span, busy, idle gaps, longest host events).
    `keep`: also write the trace there. On a machine without a GPU the trace has no device
    kernels and only the host side is reported.
    """
    from pallas_kernels.timing import timeline, traced_kernels

    vocab = engine.runner.model.config.vocab_size
    rng = np.random.default_rng(7)
    cfg = engine.config
    # Long enough that the first requests are still running when the last prompt is in:
    # prefilling `batch` prompts takes up to batch * prompt_len / (budget - batch) steps.
    fill = -(-batch * prompt_len // max(1, cfg.max_tokens_per_step - batch)) + 16
    prompt_len = min(prompt_len, cfg.max_model_len - 2 * steps - 9)
    max_new = min(2 * steps + 8 + fill, cfg.max_model_len - prompt_len - 1)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    ids = [
        engine.add_request(None, rng.integers(0, vocab, prompt_len).tolist(), params)
        for _ in range(batch)
    ]
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed < s.num_tokens - 1 for s in sched.running):
        engine.step()
    engine.step()  # one warm decode step outside the trace
    running = len(sched.running)
    t0 = time.perf_counter()
    for _ in range(steps):  # the same steps untraced: the profiler slows every launch
        engine.step()
    untraced = (time.perf_counter() - t0) / steps
    walls, dispatch = [], []
    runner_run = engine.runner.run

    def timed_run(inp, prev=None):
        t0 = time.perf_counter()
        out = runner_run(inp, prev)
        dispatch.append(time.perf_counter() - t0)
        return out

    def run():  # wall time of the steps alone, not of starting and stopping the trace
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        walls.append(time.perf_counter() - t0)

    engine.runner.run = timed_run
    with tempfile.TemporaryDirectory() as d:
        path = keep or os.path.join(d, "decode.xplane.pb")
        try:
            total, count, _, per = traced_kernels(run, keep=path)
        finally:
            del engine.runner.run  # back to the class method
        tl = timeline(path) if os.path.exists(path) else {}
    wall = walls[0]
    for rid in ids:
        engine.abort(rid)
    return {
        "batch": batch,
        "steps": steps,
        "running": running,
        "step_wall_ms": 1e3 * wall / steps,
        "step_wall_untraced_ms": 1e3 * untraced,
        "step_kernel_ms": total / steps / 1e6,
        # Idle GPU time the host causes between steps (0 when the step is kernel-bound).
        "host_gap_share": max(0.0, untraced - total / steps / 1e9) / max(untraced, 1e-12),
        "step_dispatch_ms": 1e3 * sum(dispatch) / steps,
        "kernels_per_step": count / steps,
        "timeline": tl,
        **kernel_breakdown(per, steps),
    }


def decode_buckets(requested: list[int], max_batch: int, align: int = 1) -> tuple[int, ...]:
    """The requested decode buckets below max_batch, then max_batch rounded up to a multiple
    of ``align`` (the rows past max_batch are padding: EngineConfig.decode_buckets)."""
    top = -(-max_batch // align) * align
    return tuple(b for b in requested if b < max_batch) + (top,)


def bench_precision(args, model_config, precision: str) -> list[dict]:
    """Builds the engine for `precision`; returns one result row per scheduling mode."""
    mode = "pallas" if args.kernels == "pallas" else "sim"
    linear = precision_plan(
        model_config,
        precision,
        mode=mode,
        interpret=args.interpret,
        fuse_swiglu=not args.unfused_swiglu,
        fuse_gate_up=args.fuse_gate_up,
        fuse_projections=args.fuse_projections,
    )
    dtype = jnp.float32 if args.float32 else jnp.bfloat16
    model = LlamaForCausalLM(model_config, linear=linear, dtype=dtype, param_dtype=dtype)
    weight_bytes = tree_bytes(abstract_params(model))
    limit, _, _ = device_memory()
    row = {"precision": precision, "weight_gib": weight_bytes / 2**30}
    if limit is not None and weight_bytes > 0.95 * limit:
        row["status"] = f"does not fit: weights {weight_bytes / 2**30:.1f} GiB > device"
        return [row]
    t0 = time.perf_counter()
    params = random_params(model)
    jax.block_until_ready(params)
    row["init_s"] = time.perf_counter() - t0
    longest = max(i + o for i, o in args.workloads)
    max_batch = args.max_batch_cap if args.max_batch == "memory" else args.max_batch
    cfg = EngineConfig(
        max_batch=max_batch,
        max_tokens_per_step=args.max_tokens_per_step,
        max_prefill_seqs=args.max_prefill_seqs,
        schedule=args.schedule,
        max_prefill_grid=args.max_prefill_grid,
        compile_workers=args.compile_workers,
        max_model_len=longest,
        page_size=args.page_size,
        num_pages=args.num_pages,
        memory_fraction=args.memory_fraction,
        precision=precision,
        kv_group=args.kv_group,
        compute_dtype="float32" if args.float32 else "bfloat16",
        kernels=args.kernels,
        interpret=args.interpret,
        page_buckets=tuple(args.page_buckets) if args.page_buckets else None,
        decode_buckets=decode_buckets(args.decode_buckets, max_batch, args.decode_row_align),
        prefill_batch_buckets=tuple(args.prefill_batch_buckets),
        chunk_buckets=tuple(args.chunk_buckets),
        pack_buckets=tuple(args.pack_buckets) if args.pack_buckets else None,
        cuda_graphs=args.cuda_graphs,
        xla_remat=args.xla_remat,
        pack_prefill=args.pack_prefill,
        prefill_dequantize=args.prefill_dequantize,
        kv_write_kernel=args.kv_write_kernel,
        kv_window_kernel=args.kv_window_kernel,
        prefill_own_kv=args.prefill_own_kv,
        decode_fused_write=args.decode_fused_write,
        decode_qk_int8=args.decode_qk_int8 if precision == "w4axkv4" else None,
        kv_recent_window=args.kv_recent_window if precision == "w4axkv4" else 0,
        gc_freeze=args.gc_freeze,
        gc_full_every_steps=args.gc_full_every_steps,
    )
    if args.max_batch == "memory":
        # As many sequences as the pool planned from the memory left after the weights holds,
        # each at the longest workload's full length (no preemption), capped by --requests.
        fits = max_batch_for_memory(model_config, cfg, seq_len=longest)
        row["max_batch_by_memory"] = fits
        cap = args.max_batch_cap
        max_batch = min(fits, cap if args.requests == "batch" else min(cap, args.requests))
        if max_batch < 1:
            row["status"] = f"does not fit: the KV pool holds no {longest}-token sequence"
            return [row]
        cfg = dataclasses.replace(
            cfg,
            max_batch=max_batch,
            max_prefill_seqs=min(cfg.max_prefill_seqs, max_batch),
            prefill_batch_buckets=tuple(
                sorted({min(b, max_batch) for b in cfg.prefill_batch_buckets})
            ),
            decode_buckets=decode_buckets(args.decode_buckets, max_batch, args.decode_row_align),
        )
        print(f"{precision}: max batch by memory {fits}, running {max_batch}", file=sys.stderr)
    row["max_batch"] = max_batch
    row["requests"] = max_batch if args.requests == "batch" else args.requests
    # The engines of the runs below freeze the collector's objects (cfg.gc_freeze), not this one.
    built = LLMEngine.build(
        model_config, params, dataclasses.replace(cfg, gc_freeze=False), linear=linear,
        progress=not args.quiet,
    )  # fmt: skip
    row["compile_s"] = built.compile_time_s
    row["compiled_shapes"] = built.runner.num_compilations
    row["compile_workers"] = built.config.resolved_compile_workers
    row["step_memory"] = step_memory_summary(built.runner)
    mem = row["step_memory"]
    print(
        f"{precision}: KV pool {mem['pool_gib']:.2f} GiB, largest step scratch "
        f"{mem['scratch_gib']:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    row["warm_up_s"] = built.warm_up_time_s
    row["kv_pages"] = built.allocator.capacity
    row["kv_tokens"] = built.allocator.capacity * cfg.page_size
    row["page_size"] = cfg.page_size  # resolved (the flag may be None: the engine's default)
    row["capacity"] = built.capacity.describe() if built.capacity else None
    rows = []
    for mode in args.modes:  # one compiled runner, an engine per scheduling mode
        engine = LLMEngine(
            dataclasses.replace(cfg, async_scheduling=mode == "async"),
            built.runner,
            capacity=built.capacity,
            progress=False,
        )
        try:
            rows.append(_bench_engine(args, engine, dict(row, mode=mode)))
        finally:
            engine.close()  # gc.unfreeze(): this precision's objects may go
    del built, engine, params
    return rows


def step_memory_summary(runner) -> dict:
    """The KV pool's bytes and XLA's memory analysis of each compiled step shape (GiB):
    `scratch_gib` is what a step needs beyond weights and pool (`step_scratch_bytes`, what
    the engine checks at start-up), `max_temp_gib` the largest of its temporaries alone."""
    gib = 2**30
    shapes = {
        f"{b}x{t}x{p}" + (f"r{r}" if r else ""): None
        if m is None
        else {k: v / gib for k, v in m.items()}
        for (b, t, p, r), m in sorted(runner.step_memory().items())
    }
    temps = [m["temp"] for m in shapes.values() if m is not None]
    return {
        "pool_gib": tree_bytes(runner.cache) / gib,
        "max_temp_gib": max(temps) if temps else None,
        "scratch_gib": runner.step_scratch_bytes() / gib,
        "shapes": shapes,
    }


def _bench_engine(args, engine: LLMEngine, row: dict) -> dict:
    row["max_throughput"] = []
    row["gc_frozen"] = engine.gc_frozen_objects  # EngineConfig.gc_freeze (--gc-freeze)
    row["gc_full_every_steps"] = engine.config.gc_full_every_steps
    for i, (pin, pout) in enumerate(args.workloads):
        trace = None
        if args.trace_window and i == 0:
            w = args.trace_window
            trace = tuple(w) if len(w) == 2 else [tuple(w[j : j + 2]) for j in range(0, len(w), 2)]
        keep = f"{os.path.splitext(args.out)[0]}_{row['precision']}_window.xplane.pb"
        with GpuMonitor(args.gpu_monitor) as monitor, LastDecodeCall(engine.runner) as last:
            r = run_workload(
                engine, row["requests"], pin, pout, seed=i, trace=trace,
                keep=keep if args.keep_trace else None,
            )  # fmt: skip
        if args.gpu_monitor:
            r["gpu_monitor"] = monitor.summary()
        if args.replay_decode and last.inp is not None:
            r["replay_decode"] = replay_decode(
                engine.runner, last.inp, last.prev, args.replay_decode, args.replay_trace
            )
            decode = r["step_phases"].get("decode")
            r["replay_decode"]["engine_median_ms"] = decode["median_ms"] if decode else None
            print(json.dumps(r["replay_decode"]), file=sys.stderr, flush=True)
        if trace is not None:
            print(json.dumps(r["trace"], indent=1), file=sys.stderr, flush=True)
        r["peak_mem_gib"] = (device_memory()[2] or 0) / 2**30
        row["max_throughput"].append(r)
        _progress(row["precision"], "max_throughput", r)
    row["fixed_batch"] = []
    fin, fout = args.fixed_workload
    for b in args.fixed_batches:
        if b > row["max_batch"]:
            continue
        r = run_workload(engine, b, fin, fout, seed=100 + b)
        r["peak_mem_gib"] = (device_memory()[2] or 0) / 2**30
        row["fixed_batch"].append(r)
        _progress(row["precision"], "fixed_batch", r)
    if args.profile_batch:
        tag = f"{row['precision']}_{row['mode']}"
        keep = f"{os.path.splitext(args.out)[0]}_{tag}_decode.xplane.pb"
        row["decode_profile"] = profile_decode(
            engine, args.profile_batch, args.profile_steps, keep=keep if args.keep_trace else None
        )
        print(json.dumps(row["decode_profile"], indent=1), file=sys.stderr, flush=True)
    assert engine.allocator.num_used == 0
    row["status"] = "ok"
    return row


def _progress(precision: str, run: str, r: dict) -> None:
    """One line per finished workload on stderr (a run cut off later still shows it)."""
    brief = {k: v for k, v in r.items() if k != "trace"}
    print(f"{precision} {run} {json.dumps(brief, default=str)}", file=sys.stderr, flush=True)


def print_table(results: list[dict]) -> None:
    """One line per (precision, mode, run); "vs bf16" compares with bf16 in the same mode and
    workload: a max-throughput run whatever the request counts (with --max-batch memory they
    differ by precision), a fixed batch at the same batch."""

    def runs(row):
        return [("max", r) for r in row["max_throughput"]] + [
            ("fixed", r) for r in row["fixed_batch"]
        ]

    def key(row, run, r):
        n = r["requests"] if run == "fixed" else None
        return row.get("mode"), run, n, r["input_len"], r["output_len"]

    base = {
        key(row, run, r): r["output_tok_per_s"]
        for row in results
        if row["precision"] == "bf16" and row.get("status") == "ok"
        for run, r in runs(row)
    }
    print(
        f"\n{'precision':16} {'run':5} {'workload':>10} {'req':>5} {'batch':>5} {'out tok/s':>10} "
        f"{'vs bf16':>8} {'TPOT ms':>8} {'host':>8} {'mem GiB':>8}"
    )
    for row in results:
        label = f"{row['precision']}/{row.get('mode', '-')}"
        if row.get("status") != "ok":
            print(f"{label:16} {row.get('status')}")
            continue
        for run, r in runs(row):
            k = key(row, run, r)
            rel = r["output_tok_per_s"] / base[k] if k in base else float("nan")
            tpot = f"{r['tpot_ms']:.2f}" if r["tpot_ms"] is not None else "-"
            print(
                f"{label:16} {run:5} {r['input_len']:>5}/{r['output_len']:<4} "
                f"{r['requests']:>5} {r['batch_reached']:>5} {r['output_tok_per_s']:>10.1f} "
                f"{rel:>8.2f} {tpot:>8} {r['engine_overhead']:>8.1%} "
                f"{r['peak_mem_gib']:>8.2f}"
            )


def _count_or(word: str):
    """argparse type: a positive int, or the literal `word`."""

    def parse(text: str):
        if text == word:
            return word
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive int or '{word}', got {text!r}"
            ) from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected a positive int or '{word}', got {v}")
        return v

    return parse


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in w.split("/")) for w in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--preset", default="llama3-8b", help="model shapes (runner.MODEL_PRESETS)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: tiny model, small workloads, float32, reference kernels",
    )
    p.add_argument("--precisions", default="bf16,w8a8,w4a16,w4axkv4")
    p.add_argument(
        "--workloads",
        type=_pairs,
        default=_pairs("1024/512,128/128"),
        help="max-throughput input/output lengths, e.g. 1024/512,128/128",
    )
    p.add_argument(
        "--requests",
        type=_count_or("batch"),
        default=512,
        help="requests per max-throughput run; 'batch': exactly one full batch (with --max-batch "
        "memory: the batch memory allows, the paper's max-throughput protocol)",
    )
    p.add_argument("--fixed-batches", type=_ints, default=[4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--fixed-workload", type=lambda s: _pairs(s)[0], default=(128, 128))
    p.add_argument(
        "--max-batch",
        type=_count_or("memory"),
        default=256,
        help="most sequences running at once; 'memory': per precision, as many sequences of "
        "the longest workload as its KV pool holds at full length (so none is preempted), "
        "capped by --requests (or by --max-batch-cap with --requests batch)",
    )
    p.add_argument(
        "--max-batch-cap",
        type=int,
        default=4096,
        help="upper bound of --max-batch memory (each decode bucket is a compiled shape)",
    )
    p.add_argument(
        "--replay-decode",
        type=int,
        default=0,
        metavar="N",
        help="after each max-throughput workload, dispatch its last decode call N times back "
        "to back and record ms a step (replay_decode: the step without the engine's host work, "
        "untraced, CUDA graphs as configured); 0: off",
    )
    p.add_argument(
        "--replay-trace",
        type=int,
        default=0,
        metavar="K",
        help="with --replay-decode: then trace K more dispatches of the same call and record "
        "its kernels (ms, launches and the longest kernels per step) and the untraced step "
        "less their sum; 0: off",
    )
    p.add_argument(
        "--decode-row-align",
        type=int,
        default=8,
        help="the largest decode bucket is max_batch rounded up to this (padding rows): 8 "
        "lets the Mosaic GPU W4Ax GEMM write its [rows, N] outputs without a slice copy "
        "(w4ax_mgpu.OUT_ROW_TILE); 1: max_batch itself",
    )
    p.add_argument("--max-tokens-per-step", type=int, default=2048)
    p.add_argument("--max-prefill-seqs", type=int, default=4)
    p.add_argument(
        "--schedule",
        default="mixed",
        choices=SCHEDULES,
        help="EngineConfig.schedule, for every precision alike",
    )
    p.add_argument(
        "--max-prefill-grid",
        type=int,
        default=None,
        help="EngineConfig.max_prefill_grid: most [batch bucket x chunk bucket] positions of a "
        "prefill call (default 2 x --max-tokens-per-step)",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        default=None,
        help="EngineConfig.compile_workers: XLA compilations at once at start-up "
        "(default min(8, CPUs))",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="tokens per KV page (default: the engine's, 128 with the Pallas kernels on a GPU)",
    )
    p.add_argument(
        "--page-buckets",
        type=_ints,
        default=None,
        help="page-table width buckets (default: one, the longest sequence)",
    )
    p.add_argument(
        "--decode-buckets",
        type=_ints,
        default=[4, 8, 16, 32, 64, 128, 256],
        help="decode batch buckets (each is one compiled shape)",
    )
    p.add_argument(
        "--prefill-batch-buckets",
        type=_ints,
        default=[1, 4],
        help="prefill batch buckets; the last must equal --max-prefill-seqs",
    )
    p.add_argument(
        "--chunk-buckets",
        type=_ints,
        default=[256, 2048],
        help="prefill chunk buckets; the last must equal --max-tokens-per-step",
    )
    p.add_argument(
        "--pack-buckets",
        type=_ints,
        default=None,
        help="packed row counts of multi-sequence prefill calls (EngineConfig.pack_buckets); "
        "the last must equal --max-tokens-per-step (default: that alone)",
    )
    p.add_argument(
        "--unfused-swiglu",
        action="store_true",
        help="W4AxKV4 ablation: the layer writes the MLP hidden state and act_quant reads it "
        "back (default: act_quant builds silu(gate) * up itself, W4AxLinear.fuse_swiglu)",
    )
    p.add_argument(
        "--fuse-gate-up",
        action="store_true",
        help="W4AxKV4: the gate / up GEMMs as one Mosaic GPU kernel writing silu(gate) * up "
        "where the tuning table's schedule is a w_regs one (W4AxLinear.fuse_gate_up)",
    )
    p.add_argument(
        "--fuse-projections",
        action="store_true",
        help="W4AxKV4: the q / k / v projections as one GEMM over their concatenated weights "
        "where the tuning table has the concatenated shape at the call's M bucket "
        "(W4AxLinear.fuse_projections; no gain in serving, runs 110 and 113)",
    )
    p.add_argument("--num-pages", type=int, default=None, help="default: plan from free memory")
    p.add_argument("--memory-fraction", type=float, default=0.85)
    p.add_argument("--kv-group", type=int, default=128)
    p.add_argument("--kernels", default="auto", choices=("auto", "pallas", "reference"))
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--float32", action="store_true", help="float32 compute (CPU)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="XLA command buffers off (EngineConfig.cuda_graphs; on by default)",
    )
    p.add_argument(
        "--xla-remat",
        action="store_true",
        help="keep XLA's rematerialization pass (EngineConfig.xla_remat; off by default)",
    )
    p.add_argument(
        "--no-pack-prefill",
        dest="pack_prefill",
        action="store_false",
        help="run multi-sequence prefill calls on their padded grid (EngineConfig.pack_prefill)",
    )
    p.add_argument(
        "--kv-recent-window",
        type=int,
        default=0,
        help="W4AxKV4: keep the newest W tokens' K/V in bf16 (EngineConfig.kv_recent_window)",
    )
    p.add_argument(
        "--prefill-dequantize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="INT4 prefill over pages dequantized once (EngineConfig.prefill_dequantize; on "
        "by default, --no-prefill-dequantize unpacks each page in the kernel)",
    )
    p.add_argument(
        "--kv-write-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="INT4: quantize + store new K/V with the Pallas kernel (EngineConfig.kv_write_kernel;"
        " on by default, --no-kv-write-kernel uses XLA's quantize + scatters)",
    )
    p.add_argument(
        "--kv-window-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --kv-recent-window: decode attends the ring inside the Pallas kernel "
        "(EngineConfig.kv_window_kernel; on by default, --no-kv-window-kernel uses XLA)",
    )
    p.add_argument(
        "--prefill-own-kv",
        action="store_true",
        help="prefill calls without a cached prefix attend over the chunk's own K/V (cuDNN "
        "flash attention on a GPU) instead of its pages (EngineConfig.prefill_own_kv; off by "
        "default); each run reports how many prefill calls took that path (own_kv_calls)",
    )
    p.add_argument(
        "--decode-fused-write",
        action="store_true",
        help="INT4: the decode attention kernel writes the step's new K/V itself instead of "
        "the write kernel before it (EngineConfig.decode_fused_write; off by default)",
    )
    p.add_argument(
        "--bf16-nibbles",
        action="store_true",
        help="INT4 decode attention feeds its dots the bf16 128 + n nibbles (the format "
        "before the f16 subnormals; sets kv4_attention.F16_NIBBLES_DEFAULT off for the run)",
    )
    p.add_argument(
        "--q-one-part",
        action="store_true",
        help="with --decode-qk-int8: q enters the int8 dots as one INT8 part per row (the "
        "form before 2026-11-28 evening; sets kv4_attention.Q_RESIDUAL_DEFAULT off for the run)",
    )
    p.add_argument(
        "--silu-approx",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="act_quant's fused SwiGLU with the approximate PTX logistic (on) or Triton's "
        "accurate exp and division (off); sets act_quant.SILU_APPROX_DEFAULT for the run "
        "(default: the kernel's default)",
    )
    p.add_argument(
        "--decode-qk-int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="W4AxKV4: decode attention takes the logits from int8 dots of q (two INT8 parts "
        "per row) and the K nibbles (EngineConfig.decode_qk_int8; default: on for the INT4 "
        "cache; --no-decode-qk-int8: the f16-nibble logits)",
    )
    p.add_argument(
        "--modes",
        type=lambda t: t.split(","),
        default=["async"],
        help="scheduling modes to run on each compiled engine: sync,async (async dispatches "
        "step N+1 before reading step N's tokens, EngineConfig.async_scheduling)",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        help="persistent XLA compilation cache directory (re-runs skip compiles)",
    )
    p.add_argument(
        "--profile-batch",
        type=int,
        default=0,
        help="also trace steady decode steps at this batch: device time by kernel (0: off)",
    )
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument(
        "--trace-window",
        type=_ints,
        default=None,
        metavar="START,STEPS[,START,STEPS...]",
        help="trace steps START..START+STEPS of the first max-throughput workload (the real "
        "mix of decode rows and prefill chunks): kernel time by category, timeline; more "
        "pairs trace more windows (increasing, non-overlapping)",
    )
    p.add_argument(
        "--keep-trace",
        action="store_true",
        help="write the decode profile's trace beside --out (<out>_<precision>_decode.xplane.pb)",
    )
    p.add_argument(
        "--gpu-monitor",
        action="store_true",
        help="sample the GPU's SM clock, power and temperature (nvidia-smi, every 250 ms) "
        "during each max-throughput run; summary under 'gpu_monitor' (null without nvidia-smi)",
    )
    p.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EngineConfig.gc_freeze: gc.freeze() after start-up, so Python's full "
        "collections skip the compiled steps and params during the runs (default on; runs "
        "before 2026-11-27 run 69 had it off: --no-gc-freeze)",
    )
    p.add_argument(
        "--gc-full-every-steps",
        type=int,
        default=GC_FULL_EVERY_STEPS,
        help="EngineConfig.gc_full_every_steps: Python's full collections held off during the "
        f"runs, run by the engine when a run drains or every N steps (default "
        f"{GC_FULL_EVERY_STEPS}, as the CLI; 0: Python's own, the default before 2026-11-29 "
        "run 111: its collections left 11-12 of the H200's 511 decode steps host-bound "
        "against 1 held off, runs 111-112)",
    )
    p.add_argument("--out", default="bench_throughput.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.float32, args.kernels = "tiny", True, "reference"
        args.workloads = _pairs("64/32,16/16")
        args.requests = "batch" if args.requests == "batch" else 8
        args.fixed_batches, args.fixed_workload = [4, 8], (16, 16)
        args.max_batch = "memory" if args.max_batch == "memory" else 8
        args.max_tokens_per_step, args.max_prefill_seqs = 64, 2
        args.page_size, args.num_pages, args.kv_group = 16, 64, 64
        args.decode_buckets, args.prefill_batch_buckets, args.chunk_buckets = [8], [2], [64]
    if args.trace_window is not None and (not args.trace_window or len(args.trace_window) % 2):
        p.error(f"--trace-window takes START,STEPS pairs, got {args.trace_window}")
    if args.replay_trace and not args.replay_decode:
        p.error("--replay-trace traces the replayed decode call: it needs --replay-decode N")
    if args.replay_trace < 0 or args.replay_decode < 0:
        p.error("--replay-decode and --replay-trace take a count >= 0")
    if args.kernels == "auto":
        args.kernels = "pallas" if jax.default_backend() == "gpu" else "reference"
    return args


def _write_record(args, results) -> None:
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "preset": args.preset,
        # XLA's preallocated share of the device (its default 0.75 when unset) bounds what the
        # KV pool's --memory-fraction of "free memory" can be.
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "device_bytes_limit": device_memory()[0],
        "args": {k: v for k, v in vars(args).items()},
        # kernel-level defaults the engine does not set (which format decode feeds its dots)
        "kernel_defaults": {
            "f16_nibbles": kv4_attention.F16_NIBBLES_DEFAULT,
            "q_residual": kv4_attention.Q_RESIDUAL_DEFAULT,
            "silu_approx": act_quant.SILU_APPROX_DEFAULT,
        },
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, default=str)


def main(argv=None) -> int:
    # Give the engine the device: XLA preallocates 75% of it by default, which caps the KV pool
    # (`--memory-fraction` of what is free after the weights) below what the GPU can hold; a bf16
    # pool capped that way ran 142 of 256 sequences at a time (docs/benchmarks.md, 2026-11-27).
    # Takes effect only if no computation has run yet in this process; an explicit setting wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    args = parse_args(argv)
    if args.bf16_nibbles:
        kv4_attention.F16_NIBBLES_DEFAULT = False
    if args.q_one_part:
        kv4_attention.Q_RESIDUAL_DEFAULT = False
    if args.silu_approx is not None:
        act_quant.SILU_APPROX_DEFAULT = args.silu_approx
    if args.compile_cache:
        from comet_jax.engine import compile_cache

        compile_cache.enable(args.compile_cache, min_compile_secs=1.0)
    model_config = preset_config(args.preset)
    results = []
    for precision in args.precisions.split(","):
        print(f"== {args.preset} {precision}", file=sys.stderr, flush=True)
        results.extend(bench_precision(args, model_config, precision))
        _write_record(args, results)  # after each precision: a cut-off run keeps what it measured
    print_table(results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
