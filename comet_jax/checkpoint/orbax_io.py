"""Save / load a quantized model with orbax: arrays in an orbax checkpoint, the rest in JSON.

Layout of a saved model directory:

    params/      orbax StandardCheckpointer tree: the quantized params (packed INT4 weights
                 ``w_packed [N, K/2] int8``, ``w_scales``, per-group ``perm [K] int32``, norms,
                 embedding), exactly the tree `quantize_model` returned
    meta.json    {"format": 1, "config": ModelConfig fields, "recipe": QuantRecipe fields,
                  "plan": {"default": backend, "overrides": [[[layer, name], backend], ...]},
                  "report": QuantReport.to_dict() or null}
                 backend = {"type": "W4AxLinear", "fields": {...}}: the static part of every
                 projection (INT4/INT8 split k4/k8, block, tile, weight groups, flags, and
                 ``pad``: zero channels prepended when K is padded to whole FMPQ blocks; then
                 ``w_packed``, ``w_scales`` groups and ``perm`` cover the padded K). The
                 FMPQ block map is k4/k8 per input group (INT8 blocks are the last k8 channels)
                 and the permutation is the ``perm`` leaf (or folded into the weights).
                 Checkpoints written before ``pad`` existed load with pad = 0.

Loading rebuilds the LinearPlan from JSON, derives the expected param shapes from it
(`models.llama.abstract_params`) and restores the arrays against that target, so a checkpoint
that does not match its own metadata fails loudly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from comet_jax.quant.qlinear import W4A16Linear, W4AxLinear, W8A8Linear
from comet_jax.quant.recipe import QuantRecipe
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, abstract_params
from models.projection import FloatLinear, LinearPlan

FORMAT = 1
BACKENDS = {c.__name__: c for c in (FloatLinear, W8A8Linear, W4A16Linear, W4AxLinear)}


def _backend_to_json(b) -> dict[str, Any]:
    name = type(b).__name__
    if name not in BACKENDS:
        raise ValueError(f"backend {b!r} cannot be saved; expected one of {sorted(BACKENDS)}")
    return {"type": name, "fields": dataclasses.asdict(b)}


def _backend_from_json(d: dict[str, Any], mode: str | None, interpret: bool | None):
    if d.get("type") not in BACKENDS:
        raise ValueError(f"backend type {d.get('type')!r}; expected one of {sorted(BACKENDS)}")
    fields = dict(d["fields"])
    if "mode" in fields:
        if mode is not None:
            fields["mode"] = mode
        if interpret is not None:
            fields["interpret"] = interpret
    return BACKENDS[d["type"]](**fields)


def plan_to_json(plan: LinearPlan) -> dict[str, Any]:
    return {
        "default": _backend_to_json(plan.default),
        "overrides": [[list(k), _backend_to_json(b)] for k, b in plan.overrides],
    }


def plan_from_json(d: dict[str, Any], mode: str | None = None, interpret: bool | None = None):
    cache: dict[str, Any] = {}

    def get(bd):  # identical backends stay one object (shared prepare_input per group)
        key = json.dumps(bd, sort_keys=True)
        if key not in cache:
            cache[key] = _backend_from_json(bd, mode, interpret)
        return cache[key]

    return LinearPlan(
        default=get(d["default"]),
        overrides=tuple(((k[0], k[1]), get(b)) for k, b in d["overrides"]),
    )


def config_from_json(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = dict(d["rope_scaling"])
    return ModelConfig(**d)


def save_quantized(
    path: str | os.PathLike,
    config: ModelConfig,
    recipe: QuantRecipe,
    qparams,
    plan: LinearPlan,
    report=None,
    *,
    force: bool = False,
    source: str | None = None,
) -> Path:
    """Writes `path/params` (orbax) and `path/meta.json`. Returns the directory.

    source: where the float model came from (e.g. ``"smollm2"`` or a checkpoint path), kept so
    that loaders can find the matching tokenizer.
    """
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()) and not force:
        raise ValueError(f"path={str(path)!r} exists and is not empty; pass force=True")
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "config": dataclasses.asdict(config),
        "recipe": json.loads(recipe.to_json()),
        "plan": plan_to_json(plan),
        "report": None if report is None else report.to_dict(),
        "source": source,
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", jax.device_get(qparams), force=force)
    ckpt.wait_until_finished()
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a model written by `save_quantized`."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "params").is_dir()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of a saved quantized model (format-checked)."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"path={str(path)!r} has no meta.json: not a saved quantized model")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"meta.json format={meta.get('format')!r}; expected {FORMAT}")
    return meta


def load_quantized(
    path: str | os.PathLike, *, mode: str | None = None, interpret: bool | None = None
) -> tuple[ModelConfig, QuantRecipe, Any, LinearPlan, dict | None]:
    """Reads a directory written by `save_quantized`.

    mode / interpret: override the saved backend mode ("sim" or "pallas").
    Returns (config, recipe, qparams, plan, report dict or None).
    """
    path = Path(path).absolute()
    meta = read_meta(path)
    config = config_from_json(meta["config"])
    recipe = QuantRecipe.from_json(meta["recipe"])
    plan = plan_from_json(meta["plan"], mode, interpret)
    target = abstract_params(LlamaForCausalLM(config, linear=plan))
    qparams = ocp.StandardCheckpointer().restore(path / "params", target)
    return config, recipe, qparams, plan, meta.get("report")
