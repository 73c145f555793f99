"""Benchmark: paged KV4 decode/prefill attention vs bf16 Pallas and XLA baselines (GPU).

    PYTHONPATH=. python3 experiments/bench_attention.py [--quick]

1. Correctness on the GPU: kernels vs the jnp references (dequantized cache), random data,
   ragged lengths.
2. Decode, LLaMA-3-8B heads (Hq=32, Hkv=8, D=128), B x S grid: our INT4 kernel, our kernel on
   a bf16 paged cache, ``pallas.ops.gpu.decode_attention.gqa`` on bf16 K/V, XLA einsum on bf16.
   Effective bandwidth = bytes the kernel must read (K/V + scales, pages actually used) / time.
3. Prefill (causal, from an empty prefix and one chunked case) vs ``pallas.ops.gpu.attention.mha``.

Single studies (each runs alone, see ``--help``): ``--warps-study``, ``--prefill-study``,
``--stages-study``, ``--engine-shape`` (``--engine-launch``), ``--loop-study``,
``--tail-study`` (``trim_tail`` and kv4_write warps), ``--cudnn-prefill`` (the engine's
prefill path vs cuDNN attention on its K/V), ``--write-runs`` (kv4_write per token vs in
runs of 16, 32 layers in one jitted loop).

Timing: medians of 7 repeats, each the mean over n back-to-back async dispatches (n sized to
~50 ms), after compile + warm-up; inputs rotate over several buffers when the working set is
small enough to sit in L2. Writes JSON + markdown to $OUT (or experiments/results/).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import kv4_attention as A

HQ, HKV, D = 32, 8, 128
# --engine-shape at the engine's batch 1214 builds a 57 GB pool: XLA's default preallocation
# (75% of the device) ran out of memory building it (2026-11-27, docs/benchmarks.md); take
# the serving benchmark's share unless the caller set one. Before the first device use.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
OUT = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
FOCUS = "--focus" in sys.argv
# Single-study modes: flag -> (output name, function name); the flag's study runs alone.
STUDIES = {
    "--warps-study": ("bench_attention_warps", "warps_study"),
    "--prefill-study": ("bench_attention_prefill_study", "prefill_study"),
    "--stages-study": ("bench_attention_stages", "stages_study"),
    "--engine-shape": ("bench_attention_engine_shape", "engine_shape_study"),
    "--loop-study": ("bench_attention_loop", "loop_study"),
    "--tail-study": ("bench_attention_tail", "tail_study"),
    "--cudnn-prefill": ("bench_attention_cudnn_prefill", "cudnn_prefill_study"),
    "--write-runs": ("bench_attention_write_runs", "write_runs_study"),
    "--fused-write": ("bench_attention_fused_write", "fused_write_study"),
    "--nibbles-study": ("bench_attention_nibbles", "nibbles_study"),
    "--window-study": ("bench_attention_window", "window_study"),
}
NAME = "bench_attention_focus" if FOCUS else "bench_attention"
for _flag, (_name, _) in STUDIES.items():
    if not FOCUS and _flag in sys.argv:
        NAME = _name
        break
PREFILL_SHAPES = [(1, 2048, 0), (1, 8192, 0), (8, 1024, 0), (4, 512, 4096)]  # (B, T, prefix)
WRITE_SIZES = (64, 1214, 8192)  # tokens per write call (decode batches, prefill chunk)
RESULTS: dict = {
    "meta": {},
    "correctness": [],
    "tuning": [],
    "decode": [],
    "prefill": [],
    "write": [],
    "warps": [],
    "prefill_warps": [],
    "prefill_study": [],
    "stages": [],
    "engine_shape": [],
    "loop": [],
    "tail": [],
    "write_warps": [],
    "cudnn_prefill": [],
    "write_runs": [],
    "fused_write": [],
    "window": [],
    "nibbles": [],
    "nibbles_decode": [],
}


def log(*a):
    print(*a, flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, NAME + ".json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def record(section: str, label: str, row: dict) -> None:
    """A study's row: into ``RESULTS[section]``, printed under ``label``, results saved."""
    RESULTS[section].append(row)
    log(label, row)
    save()


def bench(fn, arg_sets, target_s=0.05, repeats=7):
    """Median seconds per call of ``fn(*args)``, rotating over ``arg_sets``."""
    jax.block_until_ready(fn(*arg_sets[0]))
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = time.perf_counter() - t0
    n = int(min(500, max(3, target_s / max(one, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


# ------------------------------------------------------------------------------ data


def paged_bytes_per_token_head(quantized, group):
    """K + V bytes of one token of one KV head as stored (what a kernel must read)."""
    if quantized:
        return 2 * (D // 2 + 2 * 2 * (D // group))
    return 2 * D * 2


@functools.partial(jax.jit, static_argnums=1)
def _random_bytes(key, shape):
    """Random uint8 of ``shape`` through uint32 words (``random.bits`` in uint8 allocated a 4x
    intermediate and ran out of memory for the 4 GiB pool of B = 256, S = 32768)."""
    words = jax.random.bits(key, (*shape[:-1], shape[-1] // 4), jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape)


def _int4_pool(key, layers, pages, page=128, group=D):
    """Random INT4 pool ``[layers, pages, Hkv, ...]`` in the engine's layout (V^T pages)."""
    ks = jax.random.split(key, 8)
    k = _random_bytes(ks[0], (layers, pages, HKV, page, D // 2))
    v = _random_bytes(ks[1], (layers, pages, HKV, D // 2, page))
    ms = (layers, pages, HKV, D // group, page)
    sc = lambda kk: jax.random.uniform(kk, ms, jnp.float32, 0.02, 0.1).astype(jnp.float16)  # noqa: E731
    zr = lambda kk: jax.random.randint(kk, ms, 4, 12).astype(jnp.float16)  # noqa: E731
    return A.PagedKV(k, v, sc(ks[2]), zr(ks[3]), sc(ks[4]), zr(ks[5]))


def make_paged(key, batch, seq, page, group, quantized, n_sets):
    """Random paged cache holding n_sets disjoint copies of B sequences of ``seq`` tokens."""
    mp = -(-seq // page)
    pages = n_sets * batch * mp
    if quantized:  # keep the packed pools out of the (2^31, 2^32] element window (_check_kv)
        per_page = HKV * page * D // 2
        if 2**31 < pages * per_page <= 2**32:
            pages = 2**32 // per_page + 1
    ks = jax.random.split(key, 8)
    shape = (1, pages, HKV, page)
    if quantized:
        kv = _int4_pool(key, 1, pages, page, group)
    else:
        k = jax.random.normal(ks[0], (*shape, D), jnp.bfloat16)
        v = jax.random.normal(ks[1], (*shape, D), jnp.bfloat16)
        kv = A.PagedKV(k, v)
    perm = np.random.default_rng(0).permutation(pages).astype(np.int32)
    tables = [
        jnp.asarray(perm[s * batch * mp : (s + 1) * batch * mp].reshape(batch, mp))
        for s in range(n_sets)
    ]
    return kv, tables


def n_sets_for(nbytes):
    return int(min(4, max(1, math.ceil(256e6 / max(nbytes, 1)))))


def xla_decode(q, k, v, lens):
    """Plain XLA GQA decode attention on bf16 [B, S, Hkv, D]."""
    b = q.shape[0]
    qg = q.reshape(b, HKV, HQ // HKV, D)
    logits = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    mask = jnp.arange(k.shape[1])[None, :] < lens[:, None]
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhgs,bshd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, HQ, D).astype(q.dtype)


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ------------------------------------------------------------------------------ sections


def correctness():
    from comet_jax.engine import kv_cache as kc

    rng = np.random.default_rng(1)
    cases = [  # (dtype, group, hg, head_dim, page)
        ("int4", 128, 4, 128, 64),
        ("int4", 32, 8, 128, 16),
        ("int4", 64, 1, 64, 32),
        ("bf16", 128, 4, 128, 64),
    ]
    for dtype, g, hg, hd, page in cases:
        hkv, b, mp = 2, 4, 12
        cfg = kc.KVCacheConfig(1, hkv, hd, page, 64, g if hd >= g else hd, dtype)
        lens = np.array([1, page + 3, 5 * page - 1, mp * page], np.int32)
        pt = rng.permutation(64)[: b * mp].reshape(b, mp).astype(np.int32)  # disjoint pages
        s = mp * page
        pos = np.broadcast_to(np.arange(s), (b, s))
        slots = kc.slot_mapping_from_positions(pt, pos, page, pos < lens[:, None])
        k = jnp.asarray(rng.standard_normal((b, s, hkv, hd)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, s, hkv, hd)), jnp.bfloat16)
        cache = kc.write_kv(kc.init_cache(cfg), 0, k, v, slots)
        q = jnp.asarray(rng.standard_normal((b, hkv * hg, hd)), jnp.bfloat16)
        out = A.paged_decode_attention(q, cache.pages(), pt, lens, num_splits=3)
        ref = A.paged_decode_attention_reference(q, cache.pages(), pt, lens)
        full = A.dense_attention_reference(q[:, None], k, v, lens, np.ones(b, np.int32))[:, 0]
        t, ql = 2 * page + 5, np.array([1, page, 2 * page + 5, 7], np.int32)
        qp = jnp.asarray(rng.standard_normal((b, t, hkv * hg, hd)), jnp.bfloat16)
        outp = A.paged_prefill_attention(qp, cache.pages(), pt, lens, ql)
        refp = A.paged_prefill_attention_reference(qp, cache.pages(), pt, lens, ql)
        row = dict(
            dtype=dtype,
            group=g,
            gqa=hg,
            head_dim=hd,
            page=page,
            decode_vs_ref=rel(out, ref),
            decode_ref_vs_full=rel(ref, full),
            prefill_vs_ref=rel(outp, refp),
            finite=bool(jnp.isfinite(out).all() & jnp.isfinite(outp).all()),
        )
        # gathered pages (two per loop step), on the device
        o = A.paged_decode_attention(q, cache.pages(), pt, lens, num_splits=3, block_k=2 * page)
        op = A.paged_prefill_attention(qp, cache.pages(), pt, lens, ql, block_k=2 * page)
        row["decode_gather2_vs_ref"] = rel(o, ref)
        row["prefill_gather2_vs_ref"] = rel(op, refp)
        if dtype == "int4":  # prefill on pages dequantized once (dequantize=True)
            op = A.paged_prefill_attention(qp, cache.pages(), pt, lens, ql, dequantize=True)
            row["prefill_dequantized_vs_ref"] = rel(op, refp)
            ox = A.paged_prefill_attention(
                qp, cache.pages(), pt, lens, ql, dequantize=True, dequantize_kernel=False
            )
            row["prefill_dequantized_kernel_vs_xla_pool"] = rel(op, ox)  # 0: same bits
        if dtype == "int4" and g >= 64:  # int8 logits (groups of >= 64 channels)
            o = A.paged_decode_attention(q, cache.pages(), pt, lens, num_splits=3, qk_int8=True)
            op = A.paged_prefill_attention(qp, cache.pages(), pt, lens, ql, qk_int8=True)
            row["decode_qk_int8_vs_ref"] = rel(o, ref)
            row["prefill_qk_int8_vs_ref"] = rel(op, refp)
        RESULTS["correctness"].append(row)
        log("correct", row)
    save()


def decode_point(batch, seq, page, group, quantized, key, **kw):
    mp = -(-seq // page)
    nbytes = batch * mp * page * HKV * paged_bytes_per_token_head(quantized, group)
    kv, tables = make_paged(key, batch, seq, page, group, quantized, n_sets_for(nbytes))
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, HQ, D), jnp.bfloat16)
    lens = jnp.full((batch,), seq, jnp.int32)
    fn = jax.jit(functools.partial(A.paged_decode_attention, **kw))
    t = bench(lambda pt: fn(q, kv, pt, lens), [(pt,) for pt in tables])
    return t, nbytes


TUNING_GRID = (
    [dict(page=p) for p in (16, 32, 64, 128)]
    + [dict(page=p, block_k=256) for p in (16, 32, 64, 128)]
    + [dict(page=128, num_warps=4, num_stages=3), dict(page=128, num_warps=8, num_stages=2)]
    + [dict(page=128, num_splits=n) for n in (2, 4)]
    + [dict(page=128, unpack="convert")]
    + [dict(page=128, group=g) for g in (64, 32)]
    + [dict(page=p, qk_int8=True) for p in (64, 128)]
    + [dict(page=16, block_k=256, qk_int8=True)]
)
PREFILL_VARIANTS = [
    dict(page=128, num_warps=8),
    dict(page=64, num_warps=8),
    dict(page=16, num_warps=8),
    dict(page=128, num_warps=4, num_stages=3),
    dict(page=128, num_warps=8, block_q=64),
    dict(page=128, num_warps=8, qk_int8=True),
    dict(page=64, num_warps=8, qk_int8=True),
    dict(page=128, num_warps=8, dequantize=True),  # the pool made by kv4_dequant (default)
    dict(page=128, num_warps=8, dequantize=True, dequantize_kernel=False),  # by XLA
    dict(page=64, num_warps=8, dequantize=True),
]


# --focus: the default page-128 path and its schedule knobs (stages, warps, splits) only.
FOCUS_GRID = (
    [dict(page=128), dict(page=16, block_k=256)]
    + [dict(page=128, num_stages=n) for n in (2, 4)]  # default: 5 (default_stages)
    + [dict(page=128, num_warps=2)]
    + [dict(page=128, num_splits=n) for n in (1, 8, 16)]
)
FOCUS_PREFILL = [v for v in PREFILL_VARIANTS if not v.get("qk_int8")]


def tuning(key):
    b, s = 64, 4096
    grid = FOCUS_GRID if FOCUS else TUNING_GRID
    best = None
    for cfg in grid:
        cfg = dict(cfg)
        page, group = cfg.pop("page"), cfg.pop("group", 128)
        try:
            t, nb = decode_point(b, s, page, group, True, key, **cfg)
        except Exception as e:  # keep the sweep going; report the failure
            log("tune FAIL", page, group, cfg, repr(e)[:300])
            RESULTS["tuning"].append(dict(page=page, group=group, **cfg, error=repr(e)[:300]))
            continue
        row = dict(page=page, group=group, **cfg, us=t * 1e6, gbps=nb / t / 1e9)
        RESULTS["tuning"].append(row)
        log("tune", row)
        if group == 128 and (best is None or t < best[0]):
            best = (t, page, cfg)
    save()
    return best


WARPS_STUDY = dict(batches=(16, 64, 256), seqs=(1024, 4096, 16384), warps=(1, 2, 4))


def warps_study(key):
    """Decode time by num_warps over B x S at page 128 (and page 64 at B=64, S=4096)."""
    points = [
        (b, s, 128, w)
        for b in WARPS_STUDY["batches"]
        for s in WARPS_STUDY["seqs"]
        for w in WARPS_STUDY["warps"]
    ]
    points += [(64, 4096, 64, w) for w in WARPS_STUDY["warps"]]
    for b, s, page, w in points:
        row = dict(B=b, S=s, page=page, num_warps=w)
        try:
            t, nb = decode_point(b, s, page, 128, True, key, num_warps=w)
            row.update(us=t * 1e6, gbps=nb / t / 1e9)
        except Exception as e:
            row["error"] = repr(e)[:300]
        RESULTS["warps"].append(row)
        log("warps", row)
    q_key = jax.random.fold_in(key, 7)
    for b, t, prefix in ((1, 2048, 0), (8, 1024, 0), (4, 512, 4096)):
        q = jax.random.normal(q_key, (b, t, HQ, D), jnp.bfloat16)
        lens = jnp.full((b,), prefix + t, jnp.int32)
        kv, tables = make_paged(key, b, prefix + t, 128, 128, True, 1)
        for deq in (False, True):
            for w in (4, 8):
                row = dict(prefill=f"B={b} T={t} prefix={prefix}", dequantize=deq, num_warps=w)
                fn = jax.jit(
                    functools.partial(A.paged_prefill_attention, dequantize=deq, num_warps=w)
                )
                try:
                    row["us"] = bench(fn, [(q, kv, tables[0], lens)]) * 1e6
                except Exception as e:
                    row["error"] = repr(e)[:300]
                RESULTS["prefill_warps"].append(row)
                log("prefill warps", row)
    save()


PREFILL_STUDY = [dict(num_stages=n) for n in (2, 3, 5)] + [
    dict(block_k=256, num_stages=n) for n in (2, 3)
]


def mha_time(key, q):
    """Seconds of Pallas `mha` (bf16, causal) on random K/V shaped like ``q [B, T, Hq, D]``."""
    from jax.experimental.pallas.ops.gpu import attention as fa

    k = jax.random.normal(jax.random.fold_in(key, 2), q.shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 3), q.shape, jnp.bfloat16)
    mha = jax.jit(
        functools.partial(fa.mha, segment_ids=None, sm_scale=1 / math.sqrt(D), causal=True)
    )
    return bench(mha, [(q, k, v)])


def prefill_study(key):
    """The default prefill path (INT4 pages dequantized by kv4_dequant, page 128, 8 warps) by
    pipeline stages and keys per loop step, with `mha` on the same shapes."""
    for b, t, prefix in PREFILL_SHAPES:
        s = prefix + t
        q = jax.random.normal(key, (b, t, HQ, D), jnp.bfloat16)
        lens = jnp.full((b,), s, jnp.int32)
        kv, tables = make_paged(key, b, s, 128, 128, True, 1)
        row = dict(B=b, T=t, prefix=prefix)
        for var in PREFILL_STUDY:
            tag = "_".join(f"{k}{v}" for k, v in sorted(var.items()))
            fn = jax.jit(functools.partial(A.paged_prefill_attention, dequantize=True, **var))
            try:
                row[tag + "_us"] = bench(fn, [(q, kv, tables[0], lens)]) * 1e6
            except Exception as e:
                row[tag + "_error"] = repr(e)[:300]
        if prefix == 0:
            row["mha_us"] = mha_time(key, q) * 1e6
            for name in [n for n in row if n.endswith("_us") and n != "mha_us"]:
                row[name[:-3] + "_over_mha"] = row[name] / row["mha_us"]
        RESULTS["prefill_study"].append(row)
        log("prefill study", row)
        save()


def cudnn_prefill_study(key):
    """Prefill with no cached prefix: the engine's path (INT4 pages dequantized, then the bf16
    page kernel) against cuDNN's fused attention (``jax.nn.dot_product_attention``,
    ``implementation="cudnn"``, causal, GQA) on the same dequantized K/V as dense arrays, i.e.
    what a prefill that attends its own fresh K/V (written to the cache but not read back)
    would cost. Outputs compared (relative L2)."""
    for b, t in ((8, 1024), (1, 8192)):
        q = jax.random.normal(key, (b, t, HQ, D), jnp.bfloat16)
        lens = jnp.full((b,), t, jnp.int32)
        kv, tables = make_paged(key, b, t, 128, 128, True, 1)
        row = dict(B=b, T=t)
        try:
            ours = jax.jit(functools.partial(A.paged_prefill_attention, dequantize=True))
            args = (q, kv, tables[0], lens)
            out = ours(*args)
            row["engine_us"] = bench(ours, [args]) * 1e6
            k, v = A.gather_kv(kv, tables[0], 0, jnp.bfloat16)
            k, v = k[:, :t], v[:, :t]
            cud = jax.jit(
                functools.partial(
                    jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"
                )
            )
            ref = cud(q, k, v)
            row["rel_err"] = rel(ref, out)
            row["cudnn_us"] = bench(cud, [(q, k, v)]) * 1e6
            row["cudnn_over_engine"] = row["cudnn_us"] / row["engine_us"]
        except Exception as e_:
            row["error"] = repr(e_)[:400]
        record("cudnn_prefill", "cudnn prefill", row)


def write_runs_study(key):
    """kv4_write of a prefill step's 8192 tokens (8 chunks of 1024 consecutive positions in
    random pages of 128) into all 32 layers of a pool, one jitted loop over the layers (no
    per-call dispatch; the times include the loop's per-iteration overhead): per token
    (run=0, the decode launch) vs runs of 16 tokens (whole page rows); and the 1214-token
    decode write (one token per sequence) for reference. Bytes checked against XLA's
    quantize + scatters at layer 0."""
    from pallas_kernels import kv4_write as W

    layers, page, pages = 32, 128, 1024  # 2 GiB per packed array (Pallas' 32-bit offsets)
    rng = np.random.default_rng(0)
    table = rng.permutation(pages)[:64].reshape(8, 8)
    pos = np.arange(1024)
    prefill = (table[:, pos // page] * page + pos % page).reshape(-1).astype(np.int32)
    decode = rng.permutation(pages * page)[:1214].astype(np.int32)  # one token per sequence
    kv = _int4_pool(key, layers, pages, page)
    for name, slots_np, runs in (
        ("prefill 8 x 1024", prefill, (0, 16)),
        ("decode 1214", decode, (0,)),
    ):
        n = slots_np.size
        k = jax.random.normal(jax.random.fold_in(key, 5), (n, HKV, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 6), (n, HKV, D), jnp.bfloat16)
        slots = jnp.asarray(slots_np)
        row = dict(case=name, tokens=n, layers=layers)
        try:  # bytes first (the timed loops below write into the pool)
            want = jax.jit(W.kv4_write_reference)(kv, 0, k, v, slots)
            for run in runs:
                one = jax.jit(functools.partial(W.kv4_write, run=run))(kv, 0, k, v, slots)
                row[f"run{run}_equal"] = _same_leaves(one, want)
            del want, one
            for run in runs:

                def all_layers(kv, run=run, kvs=(k, v, slots)):
                    body = lambda i, c: W.kv4_write(c, i, *kvs, run=run)  # noqa: E731
                    return jax.lax.fori_loop(0, layers, body, kv)

                state = [kv]
                kv = None  # donated to the loop from here on
                fn = jax.jit(all_layers, donate_argnums=0)

                def step(fn=fn, state=state):
                    state[0] = fn(state[0])
                    return state[0].k

                row[f"run{run}_us_per_layer"] = bench(step, [()]) * 1e6 / layers
                kv = state[0]
        except Exception as e_:
            row["error"] = repr(e_)[:400]
        record("write_runs", "write runs", row)


def _engine_ragged_case():
    """``(B, page, pages, lens [B], table [B, max_pages])`` of the engine's decode shape
    (ENGINE_SHAPE): ragged lengths uniform in [seq_lo, seq_hi], page 128, a pool of one page
    more than the table uses, pages in random order (seeded)."""
    e = ENGINE_SHAPE
    b, page = e["batch"], 128
    mp = -(-e["seq_hi"] // page)
    pages = b * mp + 1
    rng = np.random.default_rng(0)
    lens = rng.integers(e["seq_lo"], e["seq_hi"] + 1, b).astype(np.int32)
    table = rng.permutation(pages)[: b * mp].reshape(b, mp).astype(np.int32)
    return b, page, pages, lens, table


def fused_write_study(key):
    """The decode step's cache write then attention (``kv4_write``, then
    ``paged_decode_attention``) against the attention kernel writing the new token itself
    (``new_kv=``, `EngineConfig.decode_fused_write`) at the engine's shape
    (``--engine-batch``, ragged S in [1024, 1536] counting the new token, page 128). Checked
    first on a one-layer pool: the pools after both paths equal leaf by leaf, outputs within
    1e-2 relative L2. Timed on a pool of ``ENGINE_SHAPE["layers"]`` layers (over 4 GiB per
    packed array, as the engine's), one jitted loop over the layers per call (the pool
    donated and carried, so written in place), A B A B; per layer."""
    from pallas_kernels import kv4_write as W

    e = ENGINE_SHAPE
    b, page, pages, lens_np, table_np = _engine_ragged_case()
    from comet_jax.engine import kv_cache as kc

    last = lens_np[:, None] - 1  # the new token's position
    slots = kc.slot_mapping_from_positions(table_np, last, page)[:, 0]
    table, lens = jnp.asarray(table_np), jnp.asarray(lens_np)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.bfloat16)
    k_new = jax.random.normal(jax.random.fold_in(key, 2), (b, HKV, D), jnp.bfloat16)
    v_new = jax.random.normal(jax.random.fold_in(key, 3), (b, HKV, D), jnp.bfloat16)
    new_kv = (k_new, v_new, slots)

    def separate(kv, layer):
        kv = W.kv4_write(kv, layer, k_new, v_new, slots)
        return A.paged_decode_attention(q, kv, table, lens, layer=layer), kv

    def fused(kv, layer):
        return A.paged_decode_attention(q, kv, table, lens, layer=layer, new_kv=new_kv)

    row = dict(B=b, layers=e["layers"], mean_S=float(lens_np.mean()))
    try:  # one layer: both paths from the same pool, compared
        kv = _int4_pool(jax.random.fold_in(key, 7), 1, pages, page)
        out_s, kv_s = jax.jit(separate, static_argnums=1)(kv, 0)
        out_f, kv_f = jax.jit(fused, static_argnums=1)(kv, 0)
        row["pools_equal"] = _same_leaves(kv_s, kv_f)
        row["written"] = not bool(jnp.array_equal(kv_s.v, kv.v))
        row["rel_l2"] = rel(out_f, out_s)
        row["finite"] = bool(jnp.all(jnp.isfinite(out_f.astype(jnp.float32))))
        del kv, kv_s, kv_f
        log("fused write check", row)
        kv = _int4_pool(jax.random.fold_in(key, e["layers"]), e["layers"], pages, page)
        fns = {}
        for tag, path in (("separate", separate), ("fused", fused)):

            def all_layers(kv, path=path):
                def body(i, c):
                    o, c_kv = path(c[1], i)
                    return c[0] + o.astype(jnp.float32), c_kv

                zero = jnp.zeros(q.shape, jnp.float32)
                return jax.lax.fori_loop(0, e["layers"], body, (zero, kv))

            fns[tag] = jax.jit(all_layers, donate_argnums=0)
        state = [kv]
        kv = None  # donated from here on

        def step(tag):
            out, state[0] = fns[tag](state[0])
            return out

        for rep_i in range(2):
            for tag in fns:
                t = bench(functools.partial(step, tag), [()])
                row[f"{tag}{rep_i}_us_per_layer"] = t * 1e6 / e["layers"]
        sep = min(row["separate0_us_per_layer"], row["separate1_us_per_layer"])
        fus = min(row["fused0_us_per_layer"], row["fused1_us_per_layer"])
        row["fused_over_separate"] = fus / sep
    except Exception as e_:
        row["error"] = repr(e_)[:400]
    record("fused_write", "fused write", row)


WINDOW = 16  # --window-study's recent window (the accuracy study's W, docs/accuracy.md)


def window_study(key):
    """Decode with the bf16 recent window (``ring=``, `EngineConfig.kv_recent_window`) at the
    engine's shape (``--engine-batch``, ragged S in [1024, 1536], page 128, one layer) with
    the engine's decode logits (``qk_int8``, `EngineConfig.decode_qk_int8`'s default): the
    ring attended inside the kernel as one more key block (``ring_in_kernel``, the engine's
    default `kv_window_kernel`) and beside it in XLA (the kernel's log-sum-exp merged with
    :func:`ring_attention_reference`), each against the jnp reference (relative L2) and
    timed, with the plain decode call (no window) of the same pool beside them. Every 97th
    row is a padded row (ring slot -1)."""
    b, page, pages, lens_np, table_np = _engine_ragged_case()
    w = WINDOW
    table, lens = jnp.asarray(table_np), jnp.asarray(lens_np)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.bfloat16)
    ring_shape = (1, b, HKV, w, D)
    ring_k = jax.random.normal(jax.random.fold_in(key, 2), ring_shape, jnp.bfloat16)
    ring_v = jax.random.normal(jax.random.fold_in(key, 3), ring_shape, jnp.bfloat16)
    slots_np = np.arange(b, dtype=np.int32)
    slots_np[::97] = -1
    ring = dict(ring=(ring_k, ring_v), ring_slots=jnp.asarray(slots_np))
    eng = dict(qk_int8=True)  # the engine's decode default (EngineConfig.decode_qk_int8)
    row = dict(B=b, W=w, mean_S=float(lens_np.mean()), padded_rows=int((slots_np < 0).sum()))
    try:
        kv = _int4_pool(jax.random.fold_in(key, 7), 1, pages, page)
        fns = {
            "kernel": jax.jit(
                lambda kv: A.paged_decode_attention(
                    q, kv, table, lens, **ring, ring_in_kernel=True, **eng
                )
            ),
            "xla": jax.jit(
                lambda kv: A.paged_decode_attention(
                    q, kv, table, lens, **ring, ring_in_kernel=False, **eng
                )
            ),
            "no_window": jax.jit(lambda kv: A.paged_decode_attention(q, kv, table, lens, **eng)),
        }
        ref = jax.jit(lambda kv: A.paged_decode_attention_reference(q, kv, table, lens, **ring))(kv)
        outs = {tag: fn(kv) for tag, fn in fns.items()}
        row["kernel_vs_ref"] = rel(outs["kernel"], ref)
        row["xla_vs_ref"] = rel(outs["xla"], ref)
        row["kernel_vs_xla"] = rel(outs["kernel"], outs["xla"])
        row["finite"] = all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in outs.values())
        del ref
        log("window check", row)
        for rep_i in range(2):
            for tag, fn in fns.items():
                row[f"{tag}{rep_i}_us"] = bench(fn, [(kv,)]) * 1e6
        best = {t: min(row[f"{t}0_us"], row[f"{t}1_us"]) for t in fns}
        row["kernel_over_no_window"] = best["kernel"] / best["no_window"]
        row["xla_over_kernel"] = best["xla"] / best["kernel"]
    except Exception as e_:
        row["error"] = repr(e_)[:400]
    record("window", "window", row)


# --nibbles-study: the dots' operand formats (tag -> paged_decode_attention kwargs)
NIBBLE_VARIANTS = {
    "bf16": dict(f16_nibbles=False),
    "f16": dict(f16_nibbles=True),
    "int8_f16": dict(qk_int8=True, q_residual=False, f16_nibbles=True),
    "int8x2_f16": dict(qk_int8=True, q_residual=True, f16_nibbles=True),
}


def nibbles_study(key):
    """How the decode kernel feeds its dots (NIBBLE_VARIANTS: nibbles as bf16 128 + n, the
    format before 2026-11-28; as f16 subnormals, ``f16_nibbles``, the default since; q
    as INT8 per row against int8 K nibbles, ``qk_int8``, in one part or two,
    ``q_residual``, with f16 V) at the engine's shape (``--engine-batch``, 32-layer pool,
    ragged S in [1024, 1536], layer 5). Errors against the f32 reference over the
    dequantized pages on the first 64 rows, for q ~ N(0, 1) and for q with 4 channels per
    head 20x larger (int8 q's scale follows its largest channel); then timings, each variant
    in turn, twice; then the B x S points of ``STAGES_DECODE`` by variant."""
    e = ENGINE_SHAPE
    b, page, pages, lens_np, table_np = _engine_ragged_case()
    table, lens = jnp.asarray(table_np), jnp.asarray(lens_np)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.bfloat16)
    outlier = jnp.zeros((D,), jnp.float32).at[jnp.array([3, 40, 77, 120])].set(19.0) + 1.0
    q_out = (q.astype(jnp.float32) * outlier).astype(jnp.bfloat16)
    row = dict(B=b, layers=e["layers"], mean_S=float(lens_np.mean()))
    try:
        kv = _int4_pool(jax.random.fold_in(key, e["layers"]), e["layers"], pages, page)
        fns = {
            tag: jax.jit(functools.partial(A.paged_decode_attention, layer=e["layer"], **kw))
            for tag, kw in NIBBLE_VARIANTS.items()
        }
        n = min(64, b)
        for q_kind, qq in (("normal", q), ("outliers", q_out)):
            ref = A.paged_decode_attention_reference(
                qq[:n], kv, table[:n], lens[:n], layer=e["layer"]
            )
            for tag, fn in fns.items():
                out = fn(qq, kv, table, lens)
                row[f"{tag}_{q_kind}_rel_l2"] = rel(out[:n], ref)
                row[f"{tag}_{q_kind}_finite"] = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        log("nibbles check", row)
        for rep_i in range(2):
            for tag, fn in fns.items():
                row[f"{tag}{rep_i}_us"] = bench(fn, [(q, kv, table, lens)]) * 1e6
        base = min(row["bf160_us"], row["bf161_us"])
        for tag in fns:
            row[f"{tag}_over_bf16"] = min(row[f"{tag}0_us"], row[f"{tag}1_us"]) / base
        del kv
    except Exception as e_:
        row["error"] = repr(e_)[:400]
    record("nibbles", "nibbles", row)
    _decode_rows(key, NIBBLE_VARIANTS, "nibbles_decode")
    save()


ENGINE_SHAPE = dict(batch=256, seq_lo=1024, seq_hi=1536, layers=32, layer=5, launch=False)
# --engine-launch: case (c) alone, the default launch against these (tag, kernel kwargs)
ENGINE_LAUNCH_VARIANTS = (
    ("warps4_", dict(num_warps=4)),
    ("stages3_", dict(num_stages=3)),
    ("stages4_", dict(num_stages=4)),
    ("stages6_", dict(num_stages=6)),
    ("block256_", dict(block_k=256)),
    ("stages2_", dict(num_stages=2)),
    ("warps4_stages3_", dict(num_warps=4, num_stages=3)),
)


def engine_shape_study(key):
    """Why the engine's batch-256 decode attention did not speed up like the standalone call
    (docs/benchmarks.md, run 29): the INT4 decode kernel at B = 256 on (a) a one-layer pool
    with uniform S = 1280, (b) the same pool with ragged S uniform in [1024, 1536] (the
    engine's mix at that point), (c) a 32-layer pool (over 4 GiB per packed array, as in the
    engine: 64-bit offsets) with the same ragged S, read at layer 5. Same page table width
    (12 pages) and page 128 for all; (c)'s pool is sized like the engine's (B x 12 pages + 1).
    Each case also times the two-loop kernel (``one_loop=False``, the structure before
    2026-11-26), and (b) flash-decoding splits 2-4 (the default is one split at B = 256);
    (d) is (c) with the rows sorted longest first (programs launch batch-row fastest, so the
    grid's last programs are the shortest). ``--engine-launch``: case (c) alone, the default
    launch against ``ENGINE_LAUNCH_VARIANTS`` (warps, pipeline stages, keys per step)."""
    e = ENGINE_SHAPE
    b, page = e["batch"], 128
    mp = -(-e["seq_hi"] // page)
    rng = np.random.default_rng(0)
    ragged = rng.integers(e["seq_lo"], e["seq_hi"] + 1, b).astype(np.int32)
    uniform = np.full(b, (e["seq_lo"] + e["seq_hi"]) // 2, np.int32)  # 1280
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.bfloat16)
    longest_first = np.sort(ragged)[::-1].copy()  # the engine's decode row order
    cases = (
        (f"one layer, S = {uniform[0]}", 1, 0, uniform),
        ("one layer, ragged S", 1, 0, ragged),
        (f"{e['layers']} layers, ragged S", e["layers"], e["layer"], ragged),
        (f"{e['layers']} layers, ragged S, longest first", e["layers"], e["layer"], longest_first),
    )
    if e["launch"]:
        cases = cases[2:3]
    for name, layers, layer, lens in cases:
        pages = b * mp + 1
        row = dict(case=name, B=b, layers=layers, pages=pages, mean_S=float(lens.mean()))
        kv = None  # the previous case's pool goes before this one is built (B = 1214: 60 GB)
        try:
            kv = _int4_pool(jax.random.fold_in(key, layers), layers, pages, page)
            table = jnp.asarray(rng.permutation(pages)[: b * mp].reshape(b, mp).astype(np.int32))
            lens_j = jnp.asarray(lens)
            nbytes = int(lens.sum()) * HKV * paged_bytes_per_token_head(True, D)
            row["k_gib"] = kv.k.size / 2**30
            # one_loop (the default since 2026-11-26) vs the two-loop split it replaced, and
            # flash-decoding splits (the default is one split at B = 256)
            # q_padded: the row layout XLA pads to 16 rows per KV head (before q_tiled)
            variants = [
                ("", {}),
                ("two_loops_", dict(one_loop=False)),
                ("q_padded_", dict(q_tiled=False)),
            ]
            if e["launch"]:
                variants = [("", {}), *ENGINE_LAUNCH_VARIANTS, ("", {})]  # default twice
            if layers == 1 and lens is ragged:  # the last wave: 2048 programs on 660 slots
                variants += [(f"splits{n}_", dict(num_splits=n)) for n in (2, 3, 4)]
            for tag, var in variants:
                fn = jax.jit(functools.partial(A.paged_decode_attention, layer=layer, **var))
                t = bench(fn, [(q, kv, table, lens_j)])  # pools of 0.2-6.4 GB: no L2 reuse
                if e["launch"] and f"{tag}us" in row:  # the default's second timing
                    tag = "again_"
                row.update({f"{tag}us": t * 1e6, f"{tag}gbps": nbytes / t / 1e9})
        except Exception as e_:
            row["error"] = repr(e_)[:300]
        RESULTS["engine_shape"].append(row)
        log("engine shape", row)
    save()


def tail_study(key):
    """(1) ``trim_tail`` (the masked loop reads no bytes past each length) against full-page
    reads at the engine's decode shape (``--engine-batch``, 32-layer pool, layer 5): ragged S
    in [1024, 1536] and uniform S = 1025 (127 unused keys in the last page), 1152 and 1280
    (whole pages: no tail, the mask's cost alone). Outputs must be equal bit for bit; timings
    alternate A B A B. (2) kv4_write by warps per program at 1214 and 8192 tokens (page 128),
    bytes checked against XLA's quantize + scatters (single calls: their dispatch is in the
    times; `--write-runs` loops over layers instead)."""
    e = ENGINE_SHAPE
    b, page = e["batch"], 128
    mp = -(-e["seq_hi"] // page)
    rng = np.random.default_rng(0)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.bfloat16)
    cases = (
        ("ragged S", rng.integers(e["seq_lo"], e["seq_hi"] + 1, b).astype(np.int32)),
        ("S = 1025", np.full(b, 1025, np.int32)),
        ("S = 1152", np.full(b, 1152, np.int32)),
        ("S = 1280", np.full(b, 1280, np.int32)),
    )
    pages = b * mp + 1
    try:
        kv = _int4_pool(jax.random.fold_in(key, e["layers"]), e["layers"], pages, page)
        table = jnp.asarray(rng.permutation(pages)[: b * mp].reshape(b, mp).astype(np.int32))
        fns = {
            t: jax.jit(functools.partial(A.paged_decode_attention, layer=e["layer"], trim_tail=t))
            for t in (False, True)
        }
        for name, lens in cases:
            row = dict(case=name, B=b, mean_S=float(lens.mean()))
            lens_j = jnp.asarray(lens)
            args = (q, kv, table, lens_j)
            try:
                outs = {t: fn(*args) for t, fn in fns.items()}
                row["equal"] = bool(jnp.array_equal(outs[False], outs[True]))
                row["finite"] = bool(jnp.all(jnp.isfinite(outs[True].astype(jnp.float32))))
                for rep_i in range(2):
                    for t in (False, True):
                        tag = ("trim" if t else "full") + f"{rep_i}_us"
                        row[tag] = bench(fns[t], [args]) * 1e6
                full = min(row["full0_us"], row["full1_us"])
                trim = min(row["trim0_us"], row["trim1_us"])
                row["trim_over_full"] = trim / full
            except Exception as e_:
                row["error"] = repr(e_)[:300]
            RESULTS["tail"].append(row)
            log("tail", row)
            save()
        del kv
    except Exception as e_:
        RESULTS["tail"].append(dict(error=repr(e_)[:300]))
        log("tail", RESULTS["tail"][-1])
    from comet_jax.engine import kv_cache as kc
    from pallas_kernels import kv4_write as W

    for n_tokens in (1214, 8192):
        cfg = kc.KVCacheConfig(1, HKV, D, page, 4096, 128, "int4")
        k = jax.random.normal(key, (n_tokens, HKV, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (n_tokens, HKV, D), jnp.bfloat16)
        slots = jnp.asarray(rng.permutation(4096 * page)[:n_tokens].astype(np.int32))
        want = W.kv4_write_reference(kc.init_cache(cfg).pages(), 0, k, v, slots)
        row = dict(tokens=n_tokens)
        for warps in (1, 2, 4, 8):
            fn = jax.jit(functools.partial(W.kv4_write, num_warps=warps), donate_argnums=0)
            try:
                got = fn(kc.init_cache(cfg).pages(), 0, k, v, slots)
                row[f"w{warps}_equal"] = _same_leaves(got, want)
                pool = [kc.init_cache(cfg).pages()]
                step = functools.partial(_write_step, fn, pool, k, v, slots)
                row[f"w{warps}_us"] = bench(step, [()]) * 1e6
            except Exception as e_:
                row[f"w{warps}_error"] = repr(e_)[:300]
        RESULTS["write_warps"].append(row)
        log("write_warps", row)
    save()


STAGES_DECODE = ((64, 4096), (256, 1280), (16, 16384), (64, 16384))


def _decode_rows(key, variants: dict, section: str) -> None:
    """INT4 decode at page 128 over STAGES_DECODE, each variant (tag -> kernel kwargs) timed
    twice interleaved (``{tag}_us`` lists), the `gqa` anchor at B = 64, S = 4096; rows go to
    ``RESULTS[section]``."""
    for b, s in STAGES_DECODE:
        row = dict(B=b, S=s)
        for _ in range(2):
            for tag, kw in variants.items():
                try:
                    t, _ = decode_point(b, s, 128, 128, True, key, **kw)
                    row.setdefault(f"{tag}_us", []).append(t * 1e6)
                except Exception as e:
                    row[f"{tag}_error"] = repr(e)[:300]
        if (b, s) == (64, 4096):
            row.update(dense_baselines(key, b, s, b * s * HKV * 2 * D * 2))
        RESULTS[section].append(row)
        log(section, row)


def loop_study(key):
    """INT4 decode at uniform lengths (whole pages: the two-loop kernel's masked loop is
    empty there), one loop (default) vs two loops, interleaved twice, with the `gqa` anchor
    at B = 64, S = 4096: what the one-loop mask costs where the split had nothing to drain."""
    _decode_rows(key, {"one_loop": dict(one_loop=True), "two_loops": dict(one_loop=False)}, "loop")
    save()


def stages_study(key):
    """Pipeline stages (default_stages): INT4 decode at page 128 by 2 / 4 / 5 / 6 stages (two
    interleaved repeats), its error at 5 vs the reference (ragged lengths), the `gqa` anchor at
    B = 64, S = 4096, and prefill on dequantized pages by 2 / 3 / 5 stages with `mha`."""
    _decode_rows(key, {f"s{st}": dict(num_stages=st) for st in (2, 4, 5, 6)}, "stages")
    kv, tables = make_paged(key, 6, 4096, 128, 128, True, 1)
    q = jax.random.normal(jax.random.fold_in(key, 9), (6, HQ, D), jnp.bfloat16)
    lens = jnp.asarray([1, 127, 128, 129, 1000, 4096], jnp.int32)
    ref = A.paged_decode_attention_reference(q, kv, tables[0], lens)
    out = jax.jit(functools.partial(A.paged_decode_attention, num_stages=5))(q, kv, tables[0], lens)
    RESULTS["stages"].append(dict(check="decode, 5 stages, vs reference", rel=rel(out, ref)))
    for b, t in ((8, 1024), (1, 8192)):
        q = jax.random.normal(key, (b, t, HQ, D), jnp.bfloat16)
        kv, tables = make_paged(key, b, t, 128, 128, True, 1)
        lens = jnp.full((b,), t, jnp.int32)
        row = dict(prefill=f"B={b} T={t}", mha_us=mha_time(key, q) * 1e6)
        for st in (2, 3, 5):
            fn = jax.jit(
                functools.partial(A.paged_prefill_attention, dequantize=True, num_stages=st)
            )
            try:
                row[f"s{st}_us"] = bench(fn, [(q, kv, tables[0], lens)]) * 1e6
            except Exception as e:
                row[f"s{st}_error"] = repr(e)[:300]
        RESULTS["stages"].append(row)
        log("stages", row)
    save()


def decode_sweep(key, page, kw, quick):
    batches, seqs = (
        ((64,), (4096,)) if quick or FOCUS else ((1, 16, 64, 256), (1024, 4096, 16384, 32768))
    )
    for b in batches:
        for s in seqs:
            row = dict(B=b, S=s)
            bf16_bytes = b * s * HKV * 2 * D * 2
            try:
                t, nb = decode_point(b, s, page, 128, True, key, **kw)
                row.update(kv4_us=t * 1e6, kv4_gbps=nb / t / 1e9, kv4_bytes=nb)
            except Exception as e:
                row["kv4_error"] = repr(e)[:300]
            if bf16_bytes <= 16 * 2**30:
                try:
                    t, nb = decode_point(b, s, page, 128, False, key, **kw)
                    row.update(bf16paged_us=t * 1e6, bf16paged_gbps=nb / t / 1e9)
                except Exception as e:
                    row["bf16paged_error"] = repr(e)[:300]
                row.update(dense_baselines(key, b, s, bf16_bytes))
            for base in ("gqa_us", "xla_us"):
                if base in row and "kv4_us" in row:
                    row["speedup_vs_" + base[:-3]] = row[base] / row["kv4_us"]
            RESULTS["decode"].append(row)
            log("decode", row)
            save()


def dense_baselines(key, b, s, bf16_bytes):
    from jax.experimental.pallas.ops.gpu import decode_attention as da

    out = {}
    n_sets = n_sets_for(bf16_bytes)
    ks = jax.random.split(key, 2 * n_sets + 1)
    q = jax.random.normal(ks[-1], (b, HQ, D), jnp.bfloat16)
    lens = jnp.full((b,), s, jnp.int32)
    sets = [
        (
            jax.random.normal(ks[2 * i], (b, s, HKV, D), jnp.bfloat16),
            jax.random.normal(ks[2 * i + 1], (b, s, HKV, D), jnp.bfloat16),
        )
        for i in range(n_sets)
    ]
    gqa = jax.jit(lambda q, k, v, n: da.gqa(q, k, v, kv_seq_len=n))
    xla = jax.jit(xla_decode)
    for name, fn in (("gqa", gqa), ("xla", xla)):
        try:
            t = bench(fn, [(q, k, v, lens) for k, v in sets])
            out[name + "_us"] = t * 1e6
            out[name + "_gbps"] = bf16_bytes / t / 1e9
        except Exception as e:
            out[name + "_error"] = repr(e)[:300]
    return out


def prefill(key, quick):
    shapes = PREFILL_SHAPES
    if quick:
        shapes = shapes[:1]
    for b, t, prefix in shapes:
        s = prefix + t
        row = dict(B=b, T=t, prefix=prefix)
        q = jax.random.normal(key, (b, t, HQ, D), jnp.bfloat16)
        lens = jnp.full((b,), s, jnp.int32)
        flops = 4 * b * HQ * D * (t * prefix + t * (t + 1) / 2)
        row["gflop"] = flops / 1e9
        for quantized in (True, False):
            name = "kv4" if quantized else "bf16paged"
            best = None
            for var in FOCUS_PREFILL if FOCUS else PREFILL_VARIANTS:
                var = dict(var)
                if (var.get("qk_int8") or var.get("dequantize")) and not quantized:
                    continue  # int8 logits and the dequantized pool need INT4 pages
                page = var.pop("page")
                tag = "_".join([name, f"p{page}"] + [f"{k}{v}" for k, v in sorted(var.items())])
                try:
                    kv, tables = make_paged(key, b, s, page, 128, quantized, 1)
                    fn = jax.jit(functools.partial(A.paged_prefill_attention, **var))
                    tt = bench(fn, [(q, kv, tables[0], lens)])
                except Exception as e:
                    row[tag + "_error"] = repr(e)[:300]
                    continue
                row[tag + "_us"] = tt * 1e6
                if best is None or tt < best:
                    best = tt
            if best is not None:
                row[name + "_us"] = best * 1e6
                row[name + "_tflops"] = flops / best / 1e12
        if prefix == 0:
            try:
                tt = mha_time(key, q)
                row["mha_us"] = tt * 1e6
                row["mha_tflops"] = flops / tt / 1e12
                if "kv4_us" in row:
                    row["kv4_over_mha"] = row["kv4_us"] / row["mha_us"]
            except Exception as e:
                row["mha_error"] = repr(e)[:300]
        RESULTS["prefill"].append(row)
        log("prefill", row)
        save()


def _write_step(fn, state, k, v, slots):
    state[0] = fn(state[0], 0, k, v, slots)  # donated: an in-place update, as in the engine
    return state[0].k


def _same_leaves(a, b) -> bool:
    """Whether two pytrees of arrays (pools) hold the same values, leaf by leaf."""
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def writes(key):
    """Cache write of N tokens into a donated pool: XLA (quantize + six scatters) vs the Pallas
    kernel (pallas_kernels/kv4_write.py); the kernel's bytes are checked against XLA's first."""
    from comet_jax.engine import kv_cache as kc

    for n_tokens in WRITE_SIZES:
        cfg = kc.KVCacheConfig(1, HKV, D, 64, 4096, 128, "int4")
        k = jax.random.normal(key, (n_tokens, HKV, D), jnp.bfloat16)
        slots = jnp.asarray(
            np.random.default_rng(0).permutation(4096 * 64)[:n_tokens].astype(np.int32)
        )
        row = dict(what=f"{n_tokens} tokens")
        xla_out = kc.write_kv(kc.init_cache(cfg), 0, k, k, slots)
        for name, kernel in (("xla", False), ("kernel", True)):
            fn = jax.jit(functools.partial(kc.write_kv, kernel=kernel), donate_argnums=0)
            try:
                if kernel:
                    got = fn(kc.init_cache(cfg), 0, k, k, slots)
                    row["kernel_equal"] = _same_leaves(got, xla_out)
                step = functools.partial(_write_step, fn, [kc.init_cache(cfg)], k, k, slots)
                row[name + "_us"] = bench(step, [()]) * 1e6
            except Exception as e:
                row[name + "_error"] = repr(e)[:300]
        RESULTS["write"].append(row)
        log("write", row)
    save()


def markdown():
    m = RESULTS["meta"]
    lines = [f"# bench_attention ({m.get('date')}, {m.get('device')}, jax {m.get('jax')})", ""]
    lines += [
        "## Decode (Hq=32, Hkv=8, D=128; INT4 g=128)",
        "",
        "| B | S | KV4 us | KV4 GB/s | bf16 paged us | gqa bf16 us | gqa GB/s | XLA us | KV4 vs gqa | KV4 vs XLA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda r, k, fmt="{:.0f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
    for r in RESULTS["decode"]:
        lines.append(
            f"| {r['B']} | {r['S']} | {f(r, 'kv4_us', '{:.1f}')} | {f(r, 'kv4_gbps')} | {f(r, 'bf16paged_us', '{:.1f}')} "
            f"| {f(r, 'gqa_us', '{:.1f}')} | {f(r, 'gqa_gbps')} | {f(r, 'xla_us', '{:.1f}')} "
            f"| {f(r, 'speedup_vs_gqa', '{:.2f}x')} | {f(r, 'speedup_vs_xla', '{:.2f}x')} |"
        )
    lines += ["", "## Decode tuning at B=64, S=4096", "", "| config | us | GB/s |", "|---|---|---|"]
    for r in RESULTS["tuning"]:
        cfg = {k: v for k, v in r.items() if k not in ("us", "gbps")}
        lines.append(f"| {cfg} | {f(r, 'us', '{:.1f}')} | {f(r, 'gbps')} |")
    lines += [
        "",
        "## Prefill (causal)",
        "",
        "| B | T | prefix | KV4 us | bf16 paged us | mha bf16 us | KV4/mha | KV4 TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["prefill"]:
        lines.append(
            f"| {r['B']} | {r['T']} | {r['prefix']} | {f(r, 'kv4_us', '{:.0f}')} | {f(r, 'bf16paged_us', '{:.0f}')} "
            f"| {f(r, 'mha_us', '{:.0f}')} | {f(r, 'kv4_over_mha', '{:.2f}')} | {f(r, 'kv4_tflops', '{:.0f}')} |"
        )
    if RESULTS["warps"]:
        lines += ["", "## Decode by num_warps", "", "| B | S | page | warps | us | GB/s |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in RESULTS["warps"]:
            lines.append(
                f"| {r['B']} | {r['S']} | {r['page']} | {r['num_warps']} "
                f"| {f(r, 'us', '{:.1f}')} | {f(r, 'gbps')} |"
            )
    if RESULTS["prefill_study"]:
        lines += ["", "## Prefill by stages / keys per step (dequantized pages)", ""]
        lines += [f"- {r}" for r in RESULTS["prefill_study"]]
    if RESULTS["stages"]:
        lines += [
            "",
            "## By Triton pipeline stages (decode: INT4 page 128; prefill: dequantized)",
            "",
        ]
        lines += [f"- {r}" for r in RESULTS["stages"]]
    for sec, title in (
        ("tail", "trim_tail vs full pages"),
        ("write_warps", "kv4_write warps"),
        ("cudnn_prefill", "prefill: engine path vs cuDNN on the same K/V"),
        ("write_runs", "kv4_write: per token vs runs of 16 (32 layers, one jitted loop)"),
        ("fused_write", "decode: kv4_write then attention vs the attention kernel writing"),
        ("nibbles", "decode at the engine's shape by the dots' operand formats"),
        ("nibbles_decode", "decode over B x S by the dots' operand formats"),
        ("window", "decode with the bf16 recent window: ring in the kernel / in XLA / none"),
    ):
        if RESULTS[sec]:
            lines += ["", f"## {title}", ""] + [f"- {r}" for r in RESULTS[sec]]
    if RESULTS["engine_shape"]:
        lines += ["", "## INT4 decode at the engine's batch-256 shape", ""]
        lines += [f"- {r}" for r in RESULTS["engine_shape"]]
    if RESULTS["loop"]:
        lines += ["", "## INT4 decode, one loop vs two loops (uniform lengths)", ""]
        lines += [f"- {r}" for r in RESULTS["loop"]]
    if RESULTS["prefill_warps"]:
        lines += ["", "## Prefill (INT4, page 128) by num_warps", ""]
        lines += [f"- {r}" for r in RESULTS["prefill_warps"]]
    lines += ["", "## Cache write (XLA quantize + scatters vs the Pallas kernel)", ""]
    lines += [f"- {r}" for r in RESULTS["write"]]
    lines += ["", "## GPU correctness (relative L2 error)", ""]
    lines += [f"- {r}" for r in RESULTS["correctness"]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, NAME + ".md"), "w") as fh:
        fh.write(text)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one decode point, one prefill shape")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument(
        "--warps-study", action="store_true", help="only decode time by num_warps over B x S"
    )
    ap.add_argument(
        "--focus",
        action="store_true",
        help="schedule knobs at B=64,S=4096 + the prefill shapes, no int8 logits",
    )
    ap.add_argument(
        "--engine-shape",
        action="store_true",
        help="only INT4 decode at the engine's shape (--engine-batch, default 256): 1 vs 32 "
        "layers, uniform vs ragged, one vs two loops, q read in its own layout vs padded",
    )
    ap.add_argument(
        "--engine-batch",
        type=int,
        default=ENGINE_SHAPE["batch"],
        help="--engine-shape's batch (the 8B W4AxKV4 engine at 1024/512 runs 1214)",
    )
    ap.add_argument(
        "--engine-launch",
        action="store_true",
        help="with --engine-shape: only the 32-layer ragged case, default launch vs warps / "
        "stages / keys-per-step variants",
    )
    ap.add_argument(
        "--stages-study",
        action="store_true",
        help="only decode / prefill time by Triton pipeline stages (default_stages)",
    )
    ap.add_argument(
        "--prefill-study",
        action="store_true",
        help="only the default prefill path by num_stages / block_k, with mha",
    )
    ap.add_argument(
        "--tail-study",
        action="store_true",
        help="only trim_tail vs full-page reads at --engine-batch (32 layers; bit-equality "
        "checked) and kv4_write by warps (bytes checked)",
    )
    ap.add_argument(
        "--cudnn-prefill",
        action="store_true",
        help="only prefill without a prefix: the engine's path vs cuDNN attention on its K/V",
    )
    ap.add_argument(
        "--write-runs",
        action="store_true",
        help="only kv4_write of a prefill step (8192 tokens) per token vs in runs of 16",
    )
    ap.add_argument(
        "--fused-write",
        action="store_true",
        help="only decode at --engine-batch: kv4_write then attention vs the attention "
        "kernel writing the new token itself (pools checked equal; 32 layers, one jitted loop)",
    )
    ap.add_argument(
        "--nibbles-study",
        action="store_true",
        help="only decode at --engine-batch by the dots' operand formats (bf16 / f16 "
        "subnormal nibbles / int8 q; errors vs the reference, timings), then over B x S",
    )
    ap.add_argument(
        "--window-study",
        action="store_true",
        help=f"only decode at --engine-batch with a bf16 recent window of {WINDOW} tokens: "
        "the ring inside the kernel vs beside it in XLA vs no window (errors vs the "
        "reference, timings)",
    )
    ap.add_argument(
        "--loop-study",
        action="store_true",
        help="only INT4 decode at uniform lengths, one loop (default) vs two loops, with gqa",
    )
    args = ap.parse_args()
    if args.engine_batch < 1:
        raise SystemExit(f"--engine-batch={args.engine_batch} must be >= 1")
    ENGINE_SHAPE["batch"] = args.engine_batch
    ENGINE_SHAPE["launch"] = args.engine_launch
    if args.focus:
        global PREFILL_SHAPES
        PREFILL_SHAPES = [(1, 2048, 0), (1, 8192, 0), (8, 1024, 0), (4, 512, 4096)]
        args.skip += ",writes"
    skip = set(filter(None, args.skip.split(",")))
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=dev.device_kind,
        jax=jax.__version__,
        python=sys.version.split()[0],
    )
    log(RESULTS["meta"])
    key = jax.random.key(0)
    t0 = time.time()
    for flag, (_, study) in STUDIES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            globals()[study](key)
            print(markdown())
            return
    sections = [("correctness", correctness), ("tuning", None), ("writes", lambda: writes(key))]
    best = None
    for name, fn in sections:
        if name in skip:
            continue
        try:
            if name == "tuning":
                best = tuning(key)
            else:
                fn()
        except Exception:
            traceback.print_exc()
        log(f"[{name} done at {time.time() - t0:.0f}s]")
    # Without the tuning section: page 128, the engine's GPU default (kv_cache / EngineConfig).
    page, kw = (128, {}) if best is None else (best[1], best[2])
    RESULTS["meta"]["decode_config"] = dict(page=page, **kw)
    for name, fn in (
        ("decode", lambda: decode_sweep(key, page, kw, args.quick)),
        ("prefill", lambda: prefill(key, args.quick)),
    ):
        if name in skip:
            continue
        try:
            fn()
        except Exception:
            traceback.print_exc()
        log(f"[{name} done at {time.time() - t0:.0f}s]")
    save()
    print(markdown())


if __name__ == "__main__":
    main()
