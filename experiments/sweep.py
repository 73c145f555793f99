"""Run a resumable sweep of gin overrides; append JSON lines; print a summary table.

Example (the INT8-budget ablation on the default model, quick settings)::

    python experiments/sweep.py --task comet_jax.eval.tasks:perplexity \
        --gin_file fmpq_w4axkv4 --gin_param "PerplexityConfig.max_windows = 4" \
        --grid "FMPQConfig.int8_budget=0.0,0.06,0.12,0.25,0.5" \
        --out experiments/results/sweep_int8_budget.jsonl

Run it again and finished points are skipped; add values to the grid and only those run.
"""

from __future__ import annotations

import argparse
import json
import sys

from comet_jax import sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", required=True, help="'module:function' returning a dict of metrics")
    p.add_argument("--gin_file", action="append", default=[], help="gin file or config name")
    p.add_argument("--gin_param", action="append", default=[], help="binding for every point")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        help="'Configurable.param=v1,v2,...' (repeat for a cartesian product)",
    )
    p.add_argument(
        "--point", action="append", default=[], help="an explicit point: bindings separated by ';'"
    )
    p.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics for the table")
    p.add_argument("--dry_run", action="store_true", help="list the points and exit")
    a = p.parse_args(argv)
    spec = sweep.SweepSpec(
        task=a.task,
        gin_files=tuple(a.gin_file),
        base_bindings=tuple(a.gin_param),
        grid=tuple(sweep.parse_grid_arg(g) for g in a.grid),
        points=tuple(tuple(b.strip() for b in pt.split(";") if b.strip()) for pt in a.point),
    )
    if a.dry_run:
        for pt in sweep.expand(spec):
            print(json.dumps(pt))
        return 0
    rows = sweep.run_sweep(spec, a.out)
    metrics = a.metrics.split(",") if a.metrics else None
    print(sweep.summary_table(rows, metrics))
    failed = [r for r in sweep.load_results(sweep.Path(a.out)) if "error" in r]
    if failed:
        print(f"{len(failed)} point(s) failed; see 'error' in {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
