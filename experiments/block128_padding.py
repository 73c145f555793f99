"""FMPQ block size on SmolLM2-135M with 128-channel blocks via zero padding (576 -> 640).

    python experiments/block128_padding.py            # ~5 min on 2 CPU cores

The block-size rows of the accuracy-table ablation (`experiments/accuracy_table.py`), alone:
FMPQ W4AxKV4 with RTN weights (symmetric INT4, groups of 64), 25% INT8 budget, per-segment
activation scales, KV4 groups of 64, calibration on the first 8 Austen windows of 1024,
evaluation on the first 4 Wikipedia windows of 1024. Block 64 and 192 divide every input width
(576, 1536); block 128 pads the 576-wide inputs (q/k/v, o, gate/up) to 640 with zero channels
(`FMPQConfig.pad_k`) and leaves down_proj's 1536 as it is. Also runs block 64 vs 128 with
per-block activation scales (simulation only), where the block size changes the scales.

Writes experiments/results/block128_padding.json (``--out``). ``--w-group 0 --blocks 64 128
--block-granularity --out experiments/results/block128_padding_per_channel.json`` repeats the
64 vs padded-128 pair with per-channel weight scales, where the two runs are bit-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from comet_jax.calibrate import collect_stats  # noqa: E402
from comet_jax.quant.convert import quantize_model  # noqa: E402
from comet_jax.quant.fmpq import FMPQConfig  # noqa: E402
from comet_jax.sweep import environment  # noqa: E402
from experiments.accuracy_table import (  # noqa: E402
    block_size_row,
    evaluate,
    load_model_and_text,
    main_recipes,
    split_windows,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--int8-budget", type=float, default=0.25)
    p.add_argument("--w-group", type=int, default=64, help="weight group (0: per channel)")
    p.add_argument("--blocks", type=int, nargs="*", default=[64, 128, 192])
    p.add_argument("--block-granularity", type=int, nargs="*", default=[64, 128])
    p.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / "block128_padding.json"
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    config, params, austen, wiki = load_model_and_text()
    calib, wiki_w, _ = split_windows(
        austen, wiki, args.context, args.calib_windows, args.eval_windows, 0
    )
    t0 = time.perf_counter()
    # RTN weights need no Hessian; max/mean |x| are those of the accuracy table's calibration.
    stats = collect_stats(config, params, calib)
    calib_seconds = time.perf_counter() - t0
    fcfg = FMPQConfig(block_size=64, rule="budget", int8_budget=args.int8_budget)
    w_group = args.w_group or None
    base = main_recipes({"fmpq": fcfg, "w_group": w_group})["fmpq_w4axkv4"]
    base = dataclasses.replace(base, w_quantizer="rtn")
    dims = (config.hidden_size, config.q_size, config.intermediate_size)
    runs = [("segment", bs) for bs in args.blocks]
    runs += [("block", bs) for bs in args.block_granularity]
    rows = []
    for gran, bs in runs:
        _, label, recipe, _ = block_size_row(base, bs, dims)
        recipe = dataclasses.replace(recipe, act_granularity=gran, name=f"{recipe.name}_{gran}")
        t1 = time.perf_counter()
        qparams, plan, report = quantize_model(config, params, recipe, stats, progress=False)
        tq = time.perf_counter() - t1
        res = evaluate(config, qparams, recipe, plan, {"wikipedia": wiki_w}, 1)
        row = {
            "block_size": bs,
            "label": label,
            "act_granularity": gran,
            "name": recipe.name,
            "recipe": json.loads(recipe.to_json()),
            "int8_fraction": report.int8_fraction,
            "int8_fraction_by_group": report.int8_fraction_by_group(),
            "k_pad_by_group": {g["group"]: g["k_pad"] for g in report.groups if g["layer"] == 0},
            "quantize_seconds": tq,
            **res,
        }
        rows.append(row)
        print(
            f"{gran:8s} {label:24s} int8={report.int8_fraction:.4f} "
            f"wiki={res['wikipedia']['ppl']:.3f} ({res['wikipedia']['seconds']:.0f} s)",
            flush=True,
        )
    out = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32)",
        "context": args.context,
        "calibration": {"corpus": "austen (first windows)", "windows": len(calib)},
        "calibration_seconds": calib_seconds,
        "evaluation": {"corpus": "wikipedia (first windows)", "windows": len(wiki_w)},
        "weights": "RTN symmetric INT4, "
        + (f"groups of {w_group}" if w_group else "per output channel"),
        "kv": "KV4, groups of 64",
        "int8_budget": args.int8_budget,
        "rows": rows,
        "platform": environment(),
        "seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
