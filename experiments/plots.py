"""Paper-style figures from measured benchmark JSON: one command per figure, PNGs into docs/.

    python experiments/plots.py kernel-speedup        # Fig. 9 style, GEMM bench sweep
    python experiments/plots.py scheduling-ablation   # Fig. 14 style, GEMM bench ablation
    python experiments/plots.py attention-bandwidth   # KV4 decode attention bandwidth
    python experiments/plots.py throughput            # Fig. 10/15 style, bench_throughput
    python experiments/plots.py all                   # every figure whose data exists

Inputs (override with --json): the newest ``experiments/results/gemm_*.json``
(``experiments/bench_gemm.py``), ``experiments/results/bench_attention.json``
(``experiments/bench_attention.py``), the newest ``experiments/results/bench_throughput*.json``
(``experiments/bench_throughput.py --out``). A figure whose input is missing, or lacks the
section it needs, is skipped with a message naming the command that produces it; nothing is
ever plotted that was not measured. Every figure's title names the device and date of its run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"


class Missing(Exception):
    """The figure's input data is absent (the message says how to produce it)."""


def _newest(pattern: str, producer: str) -> Path:
    found = sorted(RESULTS.glob(pattern))
    if not found:
        raise Missing(f"no {RESULTS.relative_to(ROOT)}/{pattern}; produce it with: {producer}")
    return found[-1]


def _load(path: Path | None, pattern: str, producer: str) -> tuple[Path, dict]:
    path = path or _newest(pattern, producer)
    if not path.is_file():
        raise Missing(f"{path} does not exist; produce it with: {producer}")
    return path, json.loads(path.read_text())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _geomean(xs) -> float:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    print(f"wrote {out}")
    return out


GEMM_PRODUCER = "python experiments/bench_gemm.py --sweep --ablate --out experiments/results (GPU)"


# -- Fig. 9: kernel speedup over the bf16 GEMM -------------------------------------------------
def kernel_speedup(json_path: Path | None, out: Path, frac: float = 0.25) -> Path:
    """Per M (one panel each) and GEMM shape N x K: speedup over XLA bf16 of the XLA int8 GEMM,
    our kernel as plain W4A8 (K4 = 0) and our W4Ax with `frac` of the K channels INT8."""
    path, d = _load(json_path, "gemm_*.json", GEMM_PRODUCER)
    rows = [r for r in d.get("sweep", []) if abs(r.get("frac", -1) - frac) < 1e-9]
    if not rows:
        raise Missing(f"{path.name} has no 'sweep' rows at INT8 fraction {frac}: {GEMM_PRODUCER}")
    by_m: dict[int, dict[tuple[int, int], dict]] = defaultdict(dict)
    for r in rows:  # a repeated (m, n, k) keeps its last measurement
        by_m[r["m"]][(r["n"], r["k"])] = r
    ms = sorted(by_m)
    series = (
        ("XLA int8 GEMM", "int8_us", "tab:gray"),
        ("ours, W4A8 (K4=0)", "w4a8_us", "tab:orange"),
        (f"ours, W4Ax ({frac:.0%} INT8)", "w4ax_us", "tab:blue"),
    )
    plt = _plt()
    fig, axes = plt.subplots(len(ms), 1, figsize=(11, 2.6 * len(ms)), squeeze=False)
    for ax, m in zip(axes[:, 0], ms):
        shapes = sorted(by_m[m], key=lambda s: (s[1], s[0]))
        width = 0.8 / len(series)
        for j, (label, key, color) in enumerate(series):
            vals = [by_m[m][s]["bf16_us"] / by_m[m][s][key] for s in shapes]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, vals, width, label=f"{label} (geomean {_geomean(vals):.2f}x)", color=color)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{n}x{k}" for n, k in shapes], fontsize=8)
        ax.set_ylabel(f"M={m}\nspeedup vs bf16")
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    axes[-1, 0].set_xlabel("GEMM shape N x K (out x in)")
    meta = d.get("meta", {})
    fig.suptitle(
        f"W4Ax GEMM speedup over XLA bf16 ({meta.get('device', '?')}, jax {meta.get('jax', '?')}, "
        f"{meta.get('date', '?')}; {path.name})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out)


# -- Fig. 14: schedule ablation ---------------------------------------------------------------
def scheduling_ablation(json_path: Path | None, out: Path) -> Path:
    """Each ablation group (same shape, same run) as speedup over the group's W4A8 (K4=0) row,
    the paper's normalization (over the tuned row where a group has no W4A8 row)."""
    path, d = _load(json_path, "gemm_*.json", GEMM_PRODUCER)
    rows = d.get("ablation") or []
    if not rows:
        raise Missing(f"{path.name} has no 'ablation' rows: {GEMM_PRODUCER}")
    groups: dict[tuple[str, int, int, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["name"].split(" ")[0], r["m"], r["n"], r["k"])].append(r)
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ((prefix, m, n, k), rs) in zip(axes[0], groups.items()):
        ref = next((r for r in rs if "W4A8" in r["name"]), None)
        ref = ref or next((r for r in rs if "tuned" in r["name"]), rs[0])
        labels = [r["name"].split(" ", 1)[1] if " " in r["name"] else r["name"] for r in rs]
        vals = [ref["us"] / r["us"] for r in rs]
        colors = [
            "tab:blue" if "tuned" in r["name"] else "tab:orange" if r is ref else "tab:gray"
            for r in rs
        ]
        ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
        ax.axvline(1.0, color="k", lw=0.8)
        for y, v, r in zip(range(len(rs)), vals[::-1], rs[::-1]):
            ax.text(v, y, f" {v:.2f}x ({r['us']:.0f} us)", va="center", fontsize=7)
        where = prefix if prefix.startswith("M=") else f"{prefix} M={m}"
        ax.set_title(f"{where}, {n}x{k}, K8={rs[0]['k8']}", fontsize=9)
        ref_label = ref["name"].split(" ", 1)[1] if " " in ref["name"] else ref["name"]
        ax.set_xlabel(f"speedup vs '{ref_label}'", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, max(vals) * 1.45)
    meta = d.get("meta", {})
    fig.suptitle(
        f"W4Ax GEMM schedule ablation ({meta.get('device', '?')}, {meta.get('date', '?')}; "
        f"{path.name})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out)


# -- attention bandwidth ----------------------------------------------------------------------
ATTN_PRODUCER = "python experiments/bench_attention.py (GPU)"


def attention_bandwidth(json_path: Path | None, out: Path) -> Path:
    """Decode attention: achieved bandwidth (bytes each kernel must read / time) and the KV4
    kernel's speedup over the bf16 paged kernel, against context length, per batch size."""
    path, d = _load(
        json_path or RESULTS / "bench_attention.json", "bench_attention.json", ATTN_PRODUCER
    )
    rows = [r for r in d.get("decode", []) if "kv4_us" in r]
    if not rows:
        raise Missing(f"{path.name} has no timed 'decode' rows: {ATTN_PRODUCER}")
    copy_tbps = _copy_bandwidth(d.get("meta", {}).get("device"))
    by_b: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_b[r["B"]].append(r)
    kinds = (
        ("kv4", "ours, paged KV4", "-"),
        ("bf16paged", "ours, paged bf16", "--"),
    )  # the bench's GQA / XLA baselines are in its JSON; two lines per B keep this readable
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    cmap = plt.get_cmap("viridis")
    bs = sorted(by_b)
    for i, b in enumerate(bs):
        rs = sorted(by_b[b], key=lambda r: r["S"])
        color = cmap(i / max(1, len(bs) - 1))
        s = [r["S"] for r in rs]
        for key, label, ls in kinds:
            if all(f"{key}_gbps" in r for r in rs):
                ax0.plot(
                    s,
                    [r[f"{key}_gbps"] for r in rs],
                    ls,
                    marker="o",
                    ms=3,
                    color=color,
                    label=f"{label}, B={b}",
                )
        if all("bf16paged_us" in r for r in rs):
            ax1.plot(
                s, [r["bf16paged_us"] / r["kv4_us"] for r in rs], "-o", color=color, label=f"B={b}"
            )
    if copy_tbps:
        ax0.axhline(
            1e3 * copy_tbps,
            color="r",
            lw=0.8,
            label=f"device copy {copy_tbps:.2f} TB/s (GEMM bench)",
        )
    ax0.set_xscale("log", base=2)
    ax0.set_xlabel("context length S (tokens)")
    ax0.set_ylabel("achieved GB/s (bytes of its own cache format)")
    ax0.legend(fontsize=6, ncol=2)
    ax0.set_title("decode attention bandwidth")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(4.0, color="gray", lw=0.8, ls=":", label="4x = bytes ratio bf16 / INT4")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context length S (tokens)")
    ax1.set_ylabel("speedup of KV4 over paged bf16")
    ax1.set_title("decode attention time, KV4 vs bf16")
    ax1.legend(fontsize=7)
    skipped = [f"B={r['B']} S={r['S']}" for r in d.get("decode", []) if "kv4_us" not in r]
    meta = d.get("meta", {})
    fig.suptitle(
        f"Paged KV4 decode attention ({meta.get('device', '?')}, {meta.get('date', '?')}; "
        f"{path.name})" + (f"; not run: {', '.join(skipped)}" if skipped else ""),
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out)


def _copy_bandwidth(device: str | None) -> float | None:
    """Device copy bandwidth measured by the GEMM bench on the same device, if any."""
    for p in sorted(RESULTS.glob("gemm_*.json"), reverse=True):
        try:
            g = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if device and g.get("meta", {}).get("device") == device and g.get("copy_tbps"):
            return float(g["copy_tbps"])
    return None


# -- Fig. 10/15: end-to-end throughput --------------------------------------------------------
THR_PRODUCER = (
    "python experiments/bench_throughput.py --preset llama3-8b "
    "--out experiments/results/bench_throughput.json (GPU)"
)


def throughput(json_path: Path | None, out: Path) -> Path:
    """Left (Fig. 10): max output throughput per workload (in/out lengths) and precision,
    normalized to bf16 of the same run. Right (Fig. 15): output tok/s against fixed batch."""
    path, d = _load(json_path, "bench_throughput*.json", THR_PRODUCER)
    ok = [r for r in d.get("results", []) if r.get("status") == "ok"]
    if not ok:
        raise Missing(f"{path.name} has no successful precision rows: {THR_PRODUCER}")
    modes = {r.get("mode") for r in ok}

    def label(r):  # rows are per (precision, scheduling mode) since the mode comparison
        return f"{r['precision']}/{r['mode']}" if len(modes) > 1 else r["precision"]

    precs = [label(r) for r in ok]
    bases = {r.get("mode"): r for r in ok if r["precision"] == "bf16"}
    base = next(iter(bases.values()), None)
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    wl = [(w["input_len"], w["output_len"]) for w in ok[0]["max_throughput"]]
    width = 0.8 / len(ok)
    for j, r in enumerate(ok):
        tps = {
            (w["input_len"], w["output_len"]): w["output_tok_per_s"] for w in r["max_throughput"]
        }
        mine = bases.get(r.get("mode"))
        ref = (
            {
                (w["input_len"], w["output_len"]): w["output_tok_per_s"]
                for w in mine["max_throughput"]
            }
            if mine
            else None
        )
        vals = [tps.get(k, float("nan")) / (ref[k] if ref else 1.0) for k in wl]
        xs = [i + (j - (len(ok) - 1) / 2) * width for i in range(len(wl))]
        bars = ax0.bar(xs, vals, width, label=label(r))
        for bar, k in zip(bars, wl):
            if k in tps:
                ax0.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height(),
                    f"{tps[k]:.0f}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        fb = sorted(r.get("fixed_batch", []), key=lambda w: w["requests"])
        if fb:
            ax1.plot(
                [w["requests"] for w in fb],
                [w["output_tok_per_s"] for w in fb],
                "-o",
                label=label(r),
            )
    ax0.set_xticks(range(len(wl)))
    ax0.set_xticklabels([f"{i}/{o}" for i, o in wl])
    ax0.set_xlabel("input / output tokens (max throughput; labels: output tok/s)")
    ax0.set_ylabel("output throughput vs bf16" if base else "output tok/s")
    if base:
        ax0.axhline(1.0, color="k", lw=0.8)
    ax0.legend(fontsize=8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size (fixed-batch workload)")
    ax1.set_ylabel("output tok/s")
    ax1.legend(fontsize=8)
    fig.suptitle(
        f"End-to-end throughput, {d.get('preset', '?')} ({', '.join(precs)}; "
        f"{d.get('device', '?')}, {d.get('date', '?')}; {path.name})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out)


FIGURES = {
    "kernel-speedup": (kernel_speedup, "fig_kernel_speedup.png"),
    "scheduling-ablation": (scheduling_ablation, "fig_scheduling_ablation.png"),
    "attention-bandwidth": (attention_bandwidth, "fig_attention_bandwidth.png"),
    "throughput": (throughput, "fig_throughput.png"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("figure", choices=[*FIGURES, "all"])
    p.add_argument("--json", type=Path, default=None, help="input results file (one figure)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (one figure) or folder (all)")
    a = p.parse_args(argv)
    if a.figure == "all" and a.json is not None:
        p.error("--json names the input of one figure; not valid with 'all'")
    names = list(FIGURES) if a.figure == "all" else [a.figure]
    missing = 0
    for name in names:
        fn, default = FIGURES[name]
        out = a.out / default if (a.figure == "all" and a.out) else a.out or DOCS / default
        try:
            fn(a.json, out)
        except Missing as e:
            missing += 1
            print(f"skipped {name}: {e}", file=sys.stderr)
    # Asking for one figure whose data is missing is an error; 'all' skips what is missing.
    return 1 if missing and a.figure != "all" else 0


if __name__ == "__main__":
    raise SystemExit(main())
