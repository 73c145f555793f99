"""KV4 with a float window over the most recent tokens: does it pay? (QuantRecipe.kv_recent_window)

    python experiments/kv_window.py              # -> results/kv_window.json (14 min, 2 CPU cores)
    python experiments/kv_window.py --windows 0 1 2 4 8 \
        --out experiments/results/kv_window_small.json          # 16 min
    python experiments/kv_window.py --windows 0 16 --eval-windows 16 \
        --out experiments/results/kv_window_16win.json          # 17 min
    python experiments/kv_window.py --quick      # tiny random model, seconds

Runs on the accuracy table's code path (experiments/accuracy_table.py: model and text loading,
window split, recipes, `evaluate`) with its ablation settings: context 1024, calibration on the
first 8 Austen windows, FMPQ 64-channel blocks with a 25% INT8 budget, INT4 weights in groups of
64 with RTN (the ablations' quantizer; --quantizer gptq for the main rows'), evaluation on the
first Wikipedia windows. Two recipe families, each at windows W (default 0, 16, 64, 128):
  kv4           float weights and activations, KV4 only (no preset: QuantRecipe(kv4=True))
  fmpq_w4axkv4  FMPQ W4AxKV4
plus their W = "all" references (KV4 off: float and FMPQ W4Ax), the ceiling a window can reach.

W is simulated per query (models/attention.py): query t reads keys s > t - W as computed (f32
here) and older ones from KV4. Writes experiments/results/kv_window.json (or --out) with the
settings, per-window NLLs and the KV byte cost of the window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_table as at  # noqa: E402

from comet_jax.calibrate import collect_stats  # noqa: E402
from comet_jax.quant import kv_quant  # noqa: E402
from comet_jax.quant.convert import quantize_model  # noqa: E402
from comet_jax.quant.fmpq import FMPQConfig  # noqa: E402
from comet_jax.quant.recipe import QuantRecipe  # noqa: E402
from comet_jax.sweep import environment  # noqa: E402


def recipes(quantizer: str, kv_group: int, windows) -> list[tuple[str, str, QuantRecipe]]:
    """(family, window label, recipe): every window of both families, then the references."""
    fcfg = FMPQConfig(block_size=64, rule="budget", int8_budget=0.25)
    fmpq = at.main_recipes({"fmpq": fcfg, "w_group": 64})["fmpq_w4axkv4"]
    fmpq = dataclasses.replace(fmpq, w_quantizer=quantizer, kv_group=kv_group)
    kv4 = QuantRecipe(name="kv4", kv4=True, kv_group=kv_group)
    rows = []
    for fam, base in (("kv4", kv4), ("fmpq_w4axkv4", fmpq)):
        for w in windows:
            r = dataclasses.replace(base, name=f"{fam}_win{w}", kv_recent_window=w)
            rows.append((fam, str(w), r))
        rows.append((fam, "all", dataclasses.replace(base, name=f"{fam}_nokv4", kv4=False)))
    return rows


def kv_cost(config, kv_group: int, windows, contexts=(1024, 2048)) -> dict:
    """Bytes of K+V per token over all layers: bf16 vs KV4 (packed nibbles + f16 scale/zero),
    and the window's extra bytes relative to an all-KV4 cache at each context.

    'replace': the W newest tokens are held in bf16 instead of KV4 (each token is quantized
    when it leaves the window). 'extra': a bf16 ring of W tokens beside a full KV4 cache (each
    token is quantized on arrival; simpler kernels, more bytes).
    """
    lh = config.num_layers * config.num_kv_heads
    bf16 = lh * config.head_dim * 2 * 2
    kv4 = lh * kv_quant.kv4_bytes_per_token_head(config.head_dim, kv_group) * 2
    out = {
        "bytes_per_token_bf16": bf16,
        "bytes_per_token_kv4": int(kv4),
        "bf16_over_kv4": bf16 / kv4,
        "windows": {},
    }
    for w in windows:
        d = {"window_bytes_bf16": w * bf16}
        for c in contexts:
            d[f"replace_overhead_at_{c}"] = w * (bf16 - kv4) / (c * kv4)
            d[f"extra_overhead_at_{c}"] = w * bf16 / (c * kv4)
        out["windows"][str(w)] = d
    return out


def run(args) -> dict:
    t_start = time.perf_counter()
    if args.quick:
        config, params, austen, wiki = at.tiny_model_and_text(64 * 8, 64 * 2)
        model_name = "tiny random LLaMA (--quick)"
    else:
        config, params, austen, wiki = at.load_model_and_text(args.gguf, args.tokens)
        model_name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32)"
    calib, wiki_w, _ = at.split_windows(
        austen, wiki, args.context, args.calib_windows, args.eval_windows, 0
    )
    evals = {"wikipedia": wiki_w}
    t0 = time.perf_counter()
    stats = collect_stats(
        config,
        params,
        calib,
        hessian=args.quantizer != "rtn",
        batch_size=args.batch_size,
    )
    calib_seconds = time.perf_counter() - t0
    rows, cache = [], {}
    for fam, label, recipe in recipes(args.quantizer, args.kv_group, args.windows):
        t1 = time.perf_counter()
        st = stats if recipe.act == "fmpq" or recipe.needs_hessian else None
        qparams, plan, report = quantize_model(config, params, recipe, st, weight_cache=cache)
        tq = time.perf_counter() - t1
        res = at.evaluate(config, qparams, recipe, plan, evals, args.batch_size)
        row = {
            "family": fam,
            "window": label,
            "name": recipe.name,
            "recipe": json.loads(recipe.to_json()),
            "int8_fraction": report.int8_fraction if recipe.act == "fmpq" else None,
            "quantize_seconds": tq,
            **res,
        }
        rows.append(row)
        print(fam, label, f"wiki={res['wikipedia']['ppl']:.3f}", flush=True)
    _add_paired(rows)
    return {
        "model": model_name,
        "config": dataclasses.asdict(config),
        "context": args.context,
        "calibration": at.calibration_record(calib, calib_seconds),
        "evaluation": {
            "corpus": "wikipedia (first windows)",
            "windows": len(wiki_w),
            "tokens_predicted": int(len(wiki_w) * (args.context - 1)),
        },
        "weights": f"INT4 symmetric, groups of 64, {args.quantizer}",
        "fmpq": "64-channel blocks, budget rule, 25% of the blocks INT8",
        "kv": f"KV4 asymmetric per token per head, groups of {args.kv_group}; window in f32",
        "windows": list(args.windows),
        "rows": rows,
        "kv_bytes": kv_cost(config, args.kv_group, args.windows),
        "platform": environment(),
        "code": code_state(),
        "seconds": time.perf_counter() - t_start,
    }


def code_state() -> dict:
    """The commit and the uncommitted files the numbers came from."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--short").splitlines()}


def _add_paired(rows) -> None:
    """Per family: the share of KV4's NLL cost (W = 0 minus KV4 off) a window removes, and the
    paired per-window NLL change vs W = 0 (mean and its standard error over windows)."""
    for fam in {r["family"] for r in rows}:
        by = {r["window"]: r for r in rows if r["family"] == fam}
        if "0" not in by or "all" not in by:
            continue
        n0 = np.array(by["0"]["wikipedia"]["per_window_nll"])
        cost = math.log(by["0"]["wikipedia"]["ppl"]) - math.log(by["all"]["wikipedia"]["ppl"])
        for r in by.values():
            d = np.array(r["wikipedia"]["per_window_nll"]) - n0
            r["delta_nll_vs_w0"] = float(d.mean())
            r["delta_nll_vs_w0_stderr"] = (
                float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
            )
            gain = math.log(by["0"]["wikipedia"]["ppl"]) - math.log(r["wikipedia"]["ppl"])
            r["kv4_cost_recovered"] = gain / cost if cost > 0 else None


def to_markdown(res: dict) -> str:
    cost = res["kv_bytes"]
    lines = [
        "| recipe | W | wikipedia ppl | dNLL vs W=0 (± s.e.) | share of KV4 cost recovered "
        "| KV bytes +% at 1024 / 2048 |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        w = r["window"]
        se = r.get("delta_nll_vs_w0_stderr")
        d = "" if w == "0" else f"{r['delta_nll_vs_w0']:+.4f}" + (f" ± {se:.4f}" if se else "")
        rec = r.get("kv4_cost_recovered")
        rec = "" if rec is None or w == "0" else f"{rec:.0%}"
        if w == "all":
            b = f"+{cost['bf16_over_kv4'] - 1:.0%} (all bf16)"
        elif w == "0":
            b = "0"
        else:
            c = cost["windows"][w]
            b = f"+{c['replace_overhead_at_1024']:.1%} / +{c['replace_overhead_at_2048']:.1%}"
        label = "all (KV4 off)" if w == "all" else w
        lines.append(
            f"| {r['family']} | {label} | {r['wikipedia']['ppl']:.3f} | {d} | {rec} | {b} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--windows", type=int, nargs="+", default=[0, 16, 64, 128])
    p.add_argument("--kv-group", type=int, default=64)
    p.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: data root)")
    p.add_argument("--tokens", type=Path, default=None, help="token ids .npz (see accuracy_table)")
    p.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    if 0 not in args.windows:
        p.error("--windows must include 0 (the plain KV4 reference)")
    if args.quick:
        args.context, args.calib_windows, args.eval_windows = 64, 2, 2
    if args.out is None and not args.quick:
        args.out = ROOT / "experiments" / "results" / "kv_window.json"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
