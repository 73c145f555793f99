"""Autotuning table for the W4Ax GEMM: (M bucket, N, K, INT8 fraction bucket) -> GemmConfig.

The table lives in ``tuning_table.json`` beside this file::

    {"meta": {...}, "entries": {"<m_bucket>:<N>:<K>:<int8_frac>": {GemmConfig fields}}}

Lookup order: the exact key; the same (M bucket, N, K) at another INT8 fraction; the same
two in the bucket a later-added bucket split off (``FALLBACK_BUCKET``: its M used that
bucket's entries before); the heuristic :func:`default_config`. Regenerate on a GPU with

    PYTHONPATH=. python -m pallas_kernels.tuning --regenerate [--quick]

which times the candidate configs of :func:`candidates` on random data (device time,
:mod:`pallas_kernels.timing`, L2-rotating repeats) and rewrites the JSON. The Mosaic GPU
entries come from ``experiments/bench_gemm.py --mgpu`` studies instead (each row's best
schedule checked against the reference, then timed), merged with

    PYTHONPATH=. python -m pallas_kernels.tuning --from-study gemm_<date>.json --bucket B
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import time

from pallas_kernels.w4ax_matmul import DEFAULT_TILE_K, GemmConfig

TABLE_PATH = pathlib.Path(__file__).with_name("tuning_table.json")
# 512: the engine's largest decode bucket by default; 1536: the LLaMA-3-8B decode batch of
# the 1024/512 max-throughput runs on the H100 (1214 rows); 3072: the same on the H200 (2222
# rows; the 4096 bucket's entries are tuned at 8192).
M_BUCKETS = (1, 4, 16, 64, 256, 512, 1024, 1536, 3072, 4096)
# A bucket added later -> the bucket that covered its M before: shapes without entries of
# their own keep the configs they had.
FALLBACK_BUCKET = {1536: 4096, 3072: 4096}
FRAC_BUCKETS = (0.0, 0.125, 0.25, 0.5, 1.0)
NUM_SMS = 132  # H100 SXM; only shapes the heuristic's grid sizes

# (N, K) of the benchmark models: LLaMA-3-8B (fused QKV as MHA 12288 and as GQA 6144),
# LLaMA-3-70B (MHA 24576, GQA 10240), LLaMA-2-7B.
MODEL_SHAPES = {
    "llama3-8b": [(12288, 4096), (6144, 4096), (4096, 4096), (4096, 14336), (14336, 4096)],
    "llama3-70b": [(24576, 8192), (10240, 8192), (8192, 8192), (8192, 28672), (28672, 8192)],
    "llama2-7b": [(12288, 4096), (4096, 4096), (4096, 11008), (11008, 4096)],
}

# (N, K) of the separate projections the engine runs (q, k/v, o, gate/up, down): what
# `--regenerate --shapes <key>` tunes for serving.
ENGINE_SHAPES = {
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "llama3-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def frac_bucket(k8: int, k: int) -> float:
    f = k8 / k if k else 0.0
    return min(FRAC_BUCKETS, key=lambda b: abs(b - f))


def table_key(m: int, n: int, k: int, k8: int) -> str:
    return _key(m_bucket(m), n, k, frac_bucket(k8, k))


def _key(bucket: int, n: int, k: int, frac: float | str = "") -> str:
    """``"<bucket>:<N>:<K>:<frac>"``; without ``frac`` the prefix of every fraction."""
    return f"{bucket}:{n}:{k}:{frac}"


@functools.lru_cache(maxsize=1)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("entries", {})


def _split_for(
    tiles_mn: int, n_k_tiles: int, waves: float = 1.5, min_tiles_per_split: int = 4
) -> int:
    """Smallest power-of-two split-K that puts ``waves`` waves of programs on the SMs."""
    target = waves * NUM_SMS
    split = 1
    while tiles_mn * split < target and n_k_tiles // (split * 2) >= min_tiles_per_split:
        split *= 2
    return split


def _decode_config(m: int, n: int, n_k_tiles: int) -> GemmConfig:
    """Decode (M <= 64): weight-bandwidth bound. Y^T tiles (weights as the MMA's A operand),
    the token dimension padded to >= 16, split-K for enough programs in flight."""
    bm, bn = max(16, 1 << (max(1, m) - 1).bit_length()), 64
    split = _split_for(n // bn, n_k_tiles)
    return GemmConfig(bm, bn, split, num_warps=4, num_stages=4, swap_ab=True, group_m=1)


def _split_128(m: int, n: int, n_k_tiles: int) -> int:
    """Split-K of 128 x 128 output tiles: ~0.9 waves of programs."""
    return _split_for(math.ceil(m / 128) * (n // 128), n_k_tiles, waves=0.9)


def default_config(m: int, n: int, k: int, k8: int = 0, *, tile_k: int = DEFAULT_TILE_K):
    """Heuristic for shapes absent from the table."""
    n_k_tiles = max(1, k // tile_k)
    if m <= 64:
        return _decode_config(m, n, n_k_tiles)
    if (m <= 256 and n >= 4096) or 256 < m <= 512:
        # Y^T tiles over INT4 activations unpacked by XLA: the tuned winner at M = 256 on 6
        # of the 7 engine shapes with N >= 4096 (8B and 70B, 2026-11-25/26, H100), and at
        # M = 512 on all four 8B engine shapes (N = 1024 included; 2026-11-26, H100: 3-27%
        # less time than the parked 128 x 128 tiles over XLA-unpacked weights).
        return GemmConfig(
            block_m=128,
            block_n=64,
            split_k=1,
            num_warps=4,
            num_stages=4,
            swap_ab=True,
            group_m=8,
            pre_unpack="x",
        )
    if m <= 256:
        return GemmConfig(128, 128, _split_128(m, n, n_k_tiles), 8, 4, False, group_m=8)
    # Compute-bound: weights and INT4 activations unpacked by XLA before the kernel (the
    # loop then feeds the MMA straight from shared memory); the INT8 partial parked in the
    # output tile leaves one int32 accumulator, so 128x128 tiles fit 4 warps: the winner on
    # all six 8B shapes at M = 1024 and 4096 (H100, 2026-11-26, docs/kernels_gemm.md).
    return GemmConfig(
        block_m=128,
        block_n=128,
        split_k=1,
        num_warps=4,
        num_stages=3,
        swap_ab=False,
        group_m=8,
        pre_unpack="wx",
        park_out=True,
    )


def a16_config(m: int, n: int, k: int, *, tile_k: int = DEFAULT_TILE_K) -> GemmConfig:
    """Schedule of the W4A16 GEMM (`w4ax_matmul.w4a16_matmul`; no table): always Y^T tiles,
    so the weights, converted to bf16 in registers, are the MMA's register operand and never
    go back to shared memory. Decode tiles as the W4Ax heuristic; 128 x 128 tiles above
    M = 64. On the 8B engine shapes (H100, 2026-11-26, `bench_gemm.py --a16`) this was the
    best candidate or within 6% of it at every M in 1..1024; at M = 4096 XLA-unpacked
    weights without Y^T tiles were 1-8% faster."""
    n_k_tiles = max(1, k // tile_k)
    if m <= 64:
        return _decode_config(m, n, n_k_tiles)
    return GemmConfig(128, 128, _split_128(m, n, n_k_tiles), 8, 3, True, group_m=8)


def get_config(m: int, n: int, k: int, k8: int = 0, *, tile_k: int = DEFAULT_TILE_K):
    """Tuned config for the shape, else the heuristic (module docstring)."""
    table = load_table()
    entry, bucket, frac = None, m_bucket(m), frac_bucket(k8, k)
    while entry is None and bucket is not None:
        entry = _bucket_entry(table, bucket, n, k, frac)
        bucket = FALLBACK_BUCKET.get(bucket)
    if entry is None or tile_k != DEFAULT_TILE_K:
        return default_config(m, n, k, k8, tile_k=tile_k)
    return GemmConfig.from_dict(entry)


def table_entry(m: int, n: int, k: int, k8: int = 0) -> GemmConfig | None:
    """The table's own entry for the shape in M's bucket (as :func:`get_config` reads it,
    without the fallback bucket and the heuristic), or None: what a caller that should only
    run a shape where it was measured asks."""
    entry = _bucket_entry(load_table(), m_bucket(m), n, k, frac_bucket(k8, k))
    return None if entry is None else GemmConfig.from_dict(entry)


def _bucket_entry(table: dict, bucket: int, n: int, k: int, frac: float) -> dict | None:
    """The entry of bucket and shape at this INT8 fraction, else at any fraction, or None."""
    entry = table.get(_key(bucket, n, k, frac))
    if entry is None:
        same = [v for key, v in table.items() if key.startswith(_key(bucket, n, k))]
        entry = same[0] if same else None
    return entry


def candidates(m: int, n: int, k: int, *, tile_k: int = DEFAULT_TILE_K, quick: bool = False):
    """Configs swept first by --regenerate for one shape (the heuristic's choice first);
    :func:`neighbours` of the best one are tried next."""
    base = default_config(m, n, k, tile_k=tile_k)
    out = [base]
    n_k_tiles = k // tile_k
    if m <= 64:
        bm = base.block_m
        for bn in (64, 128):
            for split in (1, 2, 4, 8, 16):
                if n_k_tiles // split < 2:
                    continue
                for stages in (4,) if quick else (3, 5):
                    out.append(GemmConfig(bm, bn, split, 4, stages, True, 1))
        if not quick:
            out.append(GemmConfig(bm, 64, base.split_k, 4, 4, False, 1))
        out.append(dataclasses.replace(base, pre_unpack="x"))
    elif m <= 256:
        for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4)):
            for split in (1, 2, 4):
                out.append(GemmConfig(bm, bn, split, warps, 4, False, 8))
        out.append(GemmConfig(128, 64, 1, 4, 4, True, 8))
        # Y^T tiles over activations unpacked by XLA (run 9: best on 3 of 4 8B shapes).
        for bm, bn, split in ((128, 64, 1), (64, 128, 2), (64, 128, 1)):
            out.append(GemmConfig(bm, bn, split, 4, 4, True, 8, pre_unpack="x"))
    else:
        for bm, bn, warps, stages in (
            (128, 128, 8, 3),
            (128, 128, 4, 4),
            (128, 256, 8, 3),
            (256, 128, 8, 3),
            (128, 128, 8, 4),
            (64, 256, 4, 3),
        ):
            out.append(GemmConfig(bm, bn, 1, warps, stages, False, 8))
        out.append(GemmConfig(128, 128, 1, 8, 3, True, 8))
        out.append(GemmConfig(128, 128, 1, 8, 3, False, 1))
        for bm, bn, warps, stages in ((64, 128, 4, 3), (128, 128, 8, 4), (128, 64, 4, 4)):
            out.append(GemmConfig(bm, bn, 1, warps, stages, False, 8, pre_unpack="wx"))
        for bm, bn, warps, stages in ((128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3)):
            cfg = GemmConfig(bm, bn, 1, warps, stages, False, 8, pre_unpack="wx", park_out=True)
            out.append(cfg)
        # The Mosaic GPU kernel (block_n, num_stages); its Triton fallback is the parked tile.
        for stages in (4, 5):
            cfg = GemmConfig(
                128, 128, 1, 4, stages, False, 8, pre_unpack="wx", backend="mgpu", park_out=True
            )
            out.append(cfg)
    if m > 16:
        out.append(GemmConfig(backend="xla_int8"))
    uniq = _valid_unique(out, n, k, tile_k)
    if quick:
        return uniq[:6] + [c for c in uniq[6:] if c.backend != "pallas"]
    return uniq


def _valid_unique(configs, n, k, tile_k):
    seen, uniq = set(), []
    for c in configs:
        if c in seen or n % min(c.block_n, n):
            continue
        if c.backend == "pallas" and (k // tile_k) // max(1, c.split_k) < 1:
            continue
        seen.add(c)
        uniq.append(c)
    return uniq


def neighbours(cfg: GemmConfig, n: int, k: int, *, tile_k: int = DEFAULT_TILE_K):
    """One-field changes of a Pallas config: k_unroll, num_stages, block_n, split_k, warps."""
    if cfg.backend != "pallas":
        return []
    d = cfg.to_dict()
    out = []
    for u in (1, 2, 4):
        out.append({**d, "k_unroll": u})
    for st in (3, 4, 5, 6):
        out.append({**d, "num_stages": st})
    for bn in (64, 128, 256):
        out.append({**d, "block_n": bn, "num_warps": 8 if bn * cfg.block_m >= 256 * 64 else 4})
    for sk in (cfg.split_k // 2, cfg.split_k * 2):
        if sk >= 1:
            out.append({**d, "split_k": sk})
    out.append({**d, "num_warps": 8 if cfg.num_warps == 4 else 4})
    return [c for c in _valid_unique([GemmConfig(**x) for x in out], n, k, tile_k) if c != cfg]


def time_fn(fn, arg_sets, *, reps: int = 7) -> float:
    """Median device seconds of one call of ``fn(*args)``, rotating over ``arg_sets``
    (:func:`pallas_kernels.timing.device_time`: kernel time from a profiler trace)."""
    from pallas_kernels.timing import device_time

    return device_time(fn, arg_sets, reps=reps)


def random_operands(
    key,
    m: int,
    n: int,
    k: int,
    k8: int,
    *,
    tile_k: int = DEFAULT_TILE_K,
    group_size: int | None = None,
):
    """Random non-zero W4Ax operands ``(x4_packed, x8, x_scales, w_packed, w_scales)``."""
    import jax
    import jax.numpy as jnp

    k4 = k - k8
    k1, k2, k3, k4_, k5 = jax.random.split(key, 5)
    x4_packed = jax.random.randint(k1, (m, k4 // 2), -128, 128, jnp.int32).astype(jnp.int8)
    x8 = jax.random.randint(k2, (m, k8), -127, 128, jnp.int32).astype(jnp.int8)
    x_scales = jax.random.uniform(k3, (m, 2), jnp.float32, 1e-3, 2e-2)
    w_packed = jax.random.randint(k4_, (n, k // 2), -128, 128, jnp.int32).astype(jnp.int8)
    ws_shape = (n,) if group_size is None else (n, k // group_size)
    w_scales = jax.random.uniform(k5, ws_shape, jnp.float32, 1e-3, 2e-2)
    return x4_packed, x8, x_scales, w_packed, w_scales


def int8_fraction_k8(k: int, frac: float, block: int = 128) -> int:
    """K8 for an INT8 fraction, rounded to whole 128-channel blocks."""
    return int(round(frac * k / block)) * block


def _time_configs(cfgs, sets, label, state, *, log, interpret):
    """Times each untried config; ``state`` = {"tried": set, "best": (s, cfg) | None}."""
    from pallas_kernels.w4ax_matmul import w4ax_matmul

    for cfg in cfgs:
        if cfg in state["tried"]:
            continue
        state["tried"].add(cfg)
        f = functools.partial(w4ax_matmul, config=cfg, interpret=interpret)
        try:
            t = time_fn(f, sets)
        except Exception as e:  # noqa: BLE001 - a config may not compile
            log(f"  {label} {cfg}: failed {type(e).__name__}: {e}"[:300])
            continue
        log(f"  {label} {cfg}: {t * 1e6:.1f} us")
        if state["best"] is None or t < state["best"][0]:
            state["best"] = (t, cfg)


def sweep(
    shapes,
    m_values,
    fracs,
    *,
    quick=False,
    refine=True,
    log=print,
    deadline=None,
    interpret=False,
) -> dict:
    """Times the candidates of every (M, N, K, frac), then (``refine``) the one-field
    :func:`neighbours` of the best; returns table entries (best config, its time)."""
    import jax

    entries, key = {}, jax.random.PRNGKey(0)
    for n, k in shapes:
        for frac in fracs:
            k8 = int8_fraction_k8(k, frac)
            for m in m_values:
                if deadline is not None and time.time() > deadline:
                    log("tuning: deadline reached, stopping")
                    return entries
                reps = max(2, min(8, (256 << 20) // (n * k // 2)))
                sets = [
                    random_operands(jax.random.fold_in(key, i), m, n, k, k8) for i in range(reps)
                ]
                label = f"{m}x{n}x{k} f={frac}"
                state = {"tried": set(), "best": None}
                kw = dict(log=log, interpret=interpret)
                _time_configs(candidates(m, n, k, quick=quick), sets, label, state, **kw)
                if refine and state["best"] is not None:
                    _time_configs(neighbours(state["best"][1], n, k), sets, label, state, **kw)
                if state["best"] is not None:
                    t, cfg = state["best"]
                    entries[table_key(m, n, k, k8)] = dict(cfg.to_dict(), us=round(t * 1e6, 2))
    return entries


def write_table(entries: dict, meta: dict, out_path=TABLE_PATH, merge: bool = True) -> None:
    path = pathlib.Path(out_path)
    old = json.loads(path.read_text()).get("entries", {}) if merge and path.exists() else {}
    old.update(entries)
    path.write_text(json.dumps({"meta": meta, "entries": dict(sorted(old.items()))}, indent=1))
    load_table.cache_clear()


def entries_from_study(study: dict, bucket: int) -> dict:
    """Table entries for M bucket ``bucket`` from a ``bench_gemm.py --mgpu`` results file
    (``study``, the parsed JSON): each row timed at an M of that bucket whose best schedule
    was a Mosaic GPU one (``best_mgpu``) gives ``"<bucket>:<N>:<K>:<frac>"`` -> that
    schedule as an ``mgpu`` GemmConfig, with ``us`` and ``at_m`` (the M it was timed at).
    Rows whose best was the table's Triton fallback add nothing. Two rows of one key: the
    one timed at the larger M wins."""
    from pallas_kernels.w4ax_mgpu import MgpuConfig

    if bucket not in M_BUCKETS:
        raise ValueError(f"bucket {bucket} is not one of M_BUCKETS {M_BUCKETS}")
    rows = study.get("mgpu")
    if not rows:
        raise ValueError("the study has no 'mgpu' rows (bench_gemm.py --mgpu writes them)")
    entries, at = {}, {}
    for row in rows:
        m, n, k, k8 = (int(row[f]) for f in ("m", "n", "k", "k8"))
        if m_bucket(m) != bucket:
            raise ValueError(f"a row at M = {m} falls in bucket {m_bucket(m)}, not {bucket}")
        if "best_mgpu" not in row:
            continue
        key = table_key(m, n, k, k8)
        if at.get(key, 0) > m:
            continue
        cfg = MgpuConfig(**row["best_mgpu"]).to_gemm_config()
        entries[key] = dict(cfg.to_dict(), us=round(float(row["best_us"]), 2), at_m=m)
        at[key] = m
    return entries


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regenerate", action="store_true", help="sweep configs on the GPU")
    ap.add_argument("--quick", action="store_true", help="fewer candidates and shapes")
    ap.add_argument(
        "--from-study",
        metavar="FILE",
        help="merge the best Mosaic GPU schedules of a bench_gemm.py --mgpu results file into "
        "the table (entries_from_study; --bucket names the M bucket its rows fall in)",
    )
    ap.add_argument("--bucket", type=int, help="the M bucket of --from-study's rows")
    ap.add_argument("--out", default=str(TABLE_PATH))
    args = ap.parse_args(argv)
    if args.from_study:
        if args.bucket is None:
            ap.error("--from-study needs --bucket")
        study = json.loads(pathlib.Path(args.from_study).read_text())
        try:
            entries = entries_from_study(study, args.bucket)
        except ValueError as e:
            ap.error(f"--from-study {args.from_study}: {e}")
        out = pathlib.Path(args.out)
        meta = json.loads(out.read_text()).get("meta", {}) if out.exists() else {}
        name = pathlib.Path(args.from_study).name
        src = (
            f"{args.bucket} bucket: the best Mosaic GPU schedules of bench_gemm.py --mgpu ({name})"
        )
        run = study.get("meta", {})
        when = f"{run.get('device')}, jax {run.get('jax')}, {run.get('date')}"
        meta["note"] = f"{meta.get('note', '')}; {src} ({when})".lstrip("; ")
        write_table(entries, meta, out)
        for key, v in sorted(entries.items()):
            print(key, v)
        return
    if not args.regenerate:
        for key, v in sorted(load_table().items()):
            print(key, v)
        return
    import jax

    shapes = sorted({s for v in MODEL_SHAPES.values() for s in v})
    if args.quick:
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]
    entries = sweep(shapes, M_BUCKETS, (0.0, 0.125, 0.25), quick=args.quick)
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_table(entries, meta, args.out)


if __name__ == "__main__":
    _main()
