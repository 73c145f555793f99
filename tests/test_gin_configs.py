"""Every named gin config parses, builds its dataclasses, and every binding is consumed.

A binding counts as consumed when it appears in gin's operative config after building the
root configurables the file binds (QuantRecipe, which pulls FMPQConfig through
``QuantRecipe.fmpq = @FMPQConfig()``; EngineConfig; the perplexity task's PerplexityConfig).
``ablate_*.gin`` files are deltas layered on the default config, as their headers say.
"""

from __future__ import annotations

import gin
import pytest

from comet_jax import gin_config, sweep
from comet_jax.engine.config import EngineConfig
from comet_jax.eval import tasks  # registers PerplexityConfig
from comet_jax.quant.fmpq import FMPQConfig
from comet_jax.quant.recipe import PRESETS, QuantRecipe

FILES = sorted(gin_config.CONFIG_DIR.glob("*.gin"))
DEFAULT = gin_config.CONFIG_DIR / "fmpq_w4axkv4.gin"
ROOTS = {
    "QuantRecipe": QuantRecipe,
    "FMPQConfig": QuantRecipe,
    "EngineConfig": EngineConfig,
    "PerplexityConfig": tasks.PerplexityConfig,
}
REQUIRED = {
    "fmpq_w4axkv4",
    "bf16",
    "w8a8",
    "w4a16_gptq",
    "w4a8kv4",
    "w4a4_rtn",
    "rot_fmpq_w4axkv4",
    "ablate_int8_budget",
    "ablate_block_size",
}


def _stack(path):
    return [DEFAULT, path] if path.stem.startswith("ablate_") else [path]


def _bindings() -> list[str]:
    """The parsed bindings, one 'Configurable.param = value' line each (gin's formatting)."""
    return [ln for ln in gin.config_str().splitlines() if ln and not ln.startswith(("#", " "))]


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def test_named_configs_exist():
    assert REQUIRED <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_config_parses_builds_and_every_binding_is_consumed(path):
    gin_config.parse(_stack(path))
    bound = _bindings()
    assert bound, f"{path.name} binds nothing"
    roots = {ROOTS[b.split(".")[0].split("/")[-1]] for b in bound}
    built = {cls: gin_config.build(cls) for cls in roots}
    operative = set(gin.operative_config_str().splitlines())
    unused = [b for b in bound if b not in operative]
    assert not unused, f"{path.name}: bindings not consumed by any built config: {unused}"
    recipe = built.get(QuantRecipe)
    if recipe is not None and path.stem in PRESETS:
        # A named recipe config is exactly the preset of the same name (accuracy-table rows).
        assert recipe == PRESETS[path.stem]
    if recipe is not None and recipe.act == "fmpq":
        assert isinstance(recipe.fmpq, FMPQConfig) and 576 % recipe.fmpq.block_size == 0


def test_ablation_deltas_change_the_default():
    gin_config.parse([DEFAULT, "ablate_int8_budget"], ["FMPQConfig.int8_budget = 0.12"])
    r = gin_config.build(QuantRecipe)
    assert (r.fmpq.rule, r.fmpq.int8_budget, r.fmpq.block_size) == ("budget", 0.12, 64)
    assert r.kv4 and r.w_quantizer == "gptq"


def test_unknown_parameter_fails_with_gins_message():
    with pytest.raises(ValueError, match="doesn't have a parameter named 'blok_size'"):
        gin_config.parse(["fmpq_w4axkv4"], ["FMPQConfig.blok_size = 128"])
    with pytest.raises(ValueError, match="No configurable matching 'Nope'"):
        gin_config.parse([], ["Nope.x = 1"])
    with pytest.raises(ValueError, match="not found"):
        gin_config.resolve_file("no_such_config")


def test_invalid_value_fails_at_build_naming_the_field():
    gin_config.parse(["fmpq_w4axkv4"], ["FMPQConfig.block_size = 63"])
    with pytest.raises(ValueError, match="block_size=63"):
        gin_config.build(QuantRecipe)


def test_bad_sweep_binding_fails_before_any_compute(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the task ran although a binding was invalid")

    monkeypatch.setattr(tasks, "_load", boom)
    spec = sweep.SweepSpec(
        task="comet_jax.eval.tasks:perplexity",
        gin_files=("fmpq_w4axkv4",),
        grid=(("PerplexityConfig.max_window", ("1",)),),
    )
    out = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match="max_window"):
        sweep.run_sweep(spec, out, progress=False)
    assert not out.exists() or out.read_text() == ""
