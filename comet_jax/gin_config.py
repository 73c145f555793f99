"""gin at the edges: every config dataclass becomes bindable without gin inside the library.

Library code builds plain frozen dataclasses. The CLI, the sweep runner and experiment
scripts call :func:`parse` (gin files + ``--gin_param`` bindings; unknown names fail here,
with gin's message, before any compute) and then :func:`build` to get a dataclass whose
defaults were overridden by the bindings::

    parse(["experiments/configs/fmpq_w4axkv4.gin"], ["FMPQConfig.int8_budget = 0.12"])
    recipe = build(QuantRecipe)

Config files live in ``experiments/configs/``; a bare name such as ``fmpq_w4axkv4`` resolves
there.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import gin

# "module:Class" for every configurable dataclass or function. Registered lazily so that
# importing this module stays cheap.
# Only classes that a gin-driven code path actually builds are listed: the model config comes
# from the checkpoint, the KV cache config is derived by the engine, and kernel schedules come
# from the per-shape tuning table.
CONFIGURABLES: tuple[str, ...] = (
    "comet_jax.quant.fmpq:FMPQConfig",
    "comet_jax.quant.recipe:QuantRecipe",
    "comet_jax.engine.config:EngineConfig",
    "comet_jax.eval.tasks:PerplexityConfig",
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"

_registered: dict[type, object] = {}


def register_all() -> dict[type, object]:
    """Registers every class in :data:`CONFIGURABLES` with gin (idempotent)."""
    if _registered:
        return _registered
    classes = []
    for spec in CONFIGURABLES:  # import everything first: a failure registers nothing
        mod_name, cls_name = spec.split(":")
        classes.append(getattr(importlib.import_module(mod_name), cls_name))
    for cls in classes:
        _registered[cls] = gin.external_configurable(cls, module="comet_jax")
    return _registered


def resolve_file(name: str | Path) -> Path:
    """A path, or a bare config name looked up in ``experiments/configs`` (``.gin`` optional)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.gin"):
        if cand.exists():
            return cand
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.gin")) if CONFIG_DIR.exists() else []
    raise ValueError(f"gin file {str(name)!r} not found (known configs: {', '.join(known)})")


def parse(gin_files: Sequence[str | Path] = (), bindings: Sequence[str] = ()) -> None:
    """Parses config files and bindings on top of a clean gin state."""
    register_all()
    gin.clear_config()
    if str(CONFIG_DIR) not in gin.config._LOCATION_PREFIXES:  # lets configs `include` each other
        gin.add_config_file_search_path(str(CONFIG_DIR))
    files = [str(resolve_file(f)) for f in gin_files]
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)


def build(cls, **overrides):
    """An instance of ``cls`` with the parsed gin bindings applied (``overrides`` win)."""
    reg = register_all()
    if cls not in reg:
        raise ValueError(
            f"{cls.__name__} is not a registered configurable; add it to CONFIGURABLES"
        )
    return reg[cls](**overrides)


def operative_config() -> str:
    """The bindings that were actually used (for result records)."""
    return gin.operative_config_str()
