"""Resumable config sweeps: a grid (or list) of gin overrides -> one run each -> JSON lines.

A *point* is a tuple of gin bindings (``"FMPQConfig.int8_budget = 0.25"``). Each finished
point appends one JSON object to the results file::

    {"key": "<sha1 of task+files+bindings>", "task": "comet_jax.eval.tasks:perplexity",
     "gin_files": [...], "bindings": [...], "result": {...}, "env": {...},
     "seconds": 12.3, "finished": "2026-11-25T15:00:00Z"}

Re-running the same sweep skips points whose key is already in the file, so a sweep that was
interrupted (or extended with new values) resumes where it stopped. A point that raises is
recorded with ``"error"`` instead of ``"result"`` and is retried on the next run.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import itertools
import json
import platform
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What to run: ``task`` is ``"module:function"``, called as ``fn(**kwargs) -> dict``
    after gin has parsed ``gin_files`` plus the point's bindings."""

    task: str
    gin_files: tuple[str, ...] = ()
    base_bindings: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (gin parameter, values as gin literals)
    points: tuple[tuple[str, ...], ...] = ()  # explicit points, appended after the grid
    task_kwargs: tuple[tuple[str, object], ...] = ()


def parse_grid_arg(arg: str) -> tuple[str, tuple[str, ...]]:
    """``"FMPQConfig.int8_budget=0,0.06,0.12"`` -> ``("FMPQConfig.int8_budget", ("0", ...))``.

    Values are gin literals separated by ``,`` at the top level (brackets and quotes respected).
    """
    if "=" not in arg:
        raise ValueError(f"grid argument {arg!r} must look like 'Configurable.param=v1,v2,...'")
    name, values = arg.split("=", 1)
    name = name.strip()
    if not name or "." not in name:
        raise ValueError(f"grid parameter {name!r} must be 'Configurable.param'")
    out, depth, cur, quote = [], 0, "", None
    for ch in values:
        if quote:
            cur += ch
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
            cur += ch
        elif ch in "([{":
            depth += 1
            cur += ch
        elif ch in ")]}":
            depth -= 1
            cur += ch
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if any(not v for v in out):
        raise ValueError(f"grid argument {arg!r} has an empty value")
    return name, tuple(out)


def expand(spec: SweepSpec) -> list[tuple[str, ...]]:
    """All points of the sweep, in a deterministic order (grid first, then explicit points)."""
    points: list[tuple[str, ...]] = []
    if spec.grid:
        names = [n for n, _ in spec.grid]
        for combo in itertools.product(*[vals for _, vals in spec.grid]):
            points.append(tuple(f"{n} = {v}" for n, v in zip(names, combo)))
    points.extend(tuple(p) for p in spec.points)
    if not points:
        points.append(())
    return [tuple(spec.base_bindings) + p for p in points]


def point_key(spec: SweepSpec, bindings: Sequence[str]) -> str:
    blob = json.dumps(
        [
            spec.task,
            list(spec.gin_files),
            list(bindings),
            sorted((k, repr(v)) for k, v in spec.task_kwargs),
        ]
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def environment() -> dict:
    """The facts a result depends on: versions and the device it ran on."""
    import jax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "host": platform.node(),
    }


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1} is not valid JSON ({e})") from e
    return rows


def resolve_task(task: str) -> Callable[..., dict]:
    if ":" not in task:
        raise ValueError(f"task {task!r} must be 'module:function'")
    mod, fn = task.split(":", 1)
    obj = getattr(importlib.import_module(mod), fn, None)
    if not callable(obj):
        raise ValueError(f"task {task!r}: {mod} has no callable {fn!r}")
    return obj


def run_sweep(
    spec: SweepSpec,
    results_path: str | Path,
    *,
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Runs every unfinished point, appending to ``results_path``; returns all finished rows."""
    import gin
    from tqdm import tqdm

    from comet_jax import gin_config

    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in load_results(results_path) if "result" in r}
    fn = resolve_task(spec.task)
    points = expand(spec)
    todo = [(p, point_key(spec, p)) for p in points]
    todo = [(p, k) for p, k in todo if k not in done]
    env = environment()
    bar = tqdm(todo, desc="sweep", disable=not progress, unit="run")
    for bindings, key in bar:
        bar.set_postfix_str("; ".join(b.split(".")[-1] for b in bindings)[:60])
        gin.clear_config()
        gin_config.parse(spec.gin_files, bindings)  # bad bindings fail here, before compute
        row = {
            "key": key,
            "task": spec.task,
            "gin_files": list(spec.gin_files),
            "bindings": list(bindings),
            "env": env,
        }
        t0 = time.perf_counter()
        try:
            row["result"] = fn(**dict(spec.task_kwargs))
        except Exception as e:  # recorded, retried next time; the sweep goes on
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=5)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with results_path.open("a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if on_result:
            on_result(row)
    gin.clear_config()
    keys = {point_key(spec, p) for p in points}
    return [r for r in load_results(results_path) if r["key"] in keys and "result" in r]


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def summary_table(rows: Iterable[dict], metrics: Sequence[str] | None = None) -> str:
    """A markdown table: one row per point, the varying bindings then the chosen metrics."""
    rows = list(rows)
    if not rows:
        return "(no finished points)"
    all_b = [dict(_split_binding(b) for b in r["bindings"]) for r in rows]
    varying = [
        k for k in dict.fromkeys(k for b in all_b for k in b) if len({b.get(k) for b in all_b}) > 1
    ]
    if metrics is None:
        metrics = [k for k, v in rows[0]["result"].items() if isinstance(v, int | float)][:4]
    head = [k.split(".")[-1] for k in varying] + list(metrics) + ["s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, b in zip(rows, all_b):
        vals = [b.get(k, "") for k in varying]
        vals += [_fmt(r["result"].get(m)) for m in metrics] + [f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def _split_binding(b: str) -> tuple[str, str]:
    k, _, v = b.partition("=")
    return k.strip(), v.strip()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
