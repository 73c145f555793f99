"""The perplexity sweep task on a tiny random model: runs through the sweep runner, returns
finite metrics, reuses calibration statistics across points, and honours its bindings."""

from __future__ import annotations

import dataclasses
import math

import gin
import numpy as np
import pytest

from comet_jax import gin_config, sweep
from comet_jax.eval import tasks

TINY = (
    "PerplexityConfig.model = 'random:tiny'",
    "PerplexityConfig.context = 32",
    "PerplexityConfig.calib_windows = 2",
    "PerplexityConfig.max_windows = 2",
    "PerplexityConfig.batch_size = 2",
    "QuantRecipe.w_quantizer = 'rtn'",
)


@pytest.fixture(autouse=True)
def _fresh():
    tasks.clear_caches()
    yield
    tasks.clear_caches()
    gin.clear_config()


def test_perplexity_task_through_the_sweep_runner(tmp_path):
    spec = sweep.SweepSpec(
        task="comet_jax.eval.tasks:perplexity",
        gin_files=("fmpq_w4axkv4",),
        base_bindings=TINY,
        grid=(
            ("FMPQConfig.rule", ("'budget'",)),
            ("FMPQConfig.int8_budget", ("0.0", "1.0")),
        ),
    )
    rows = sweep.run_sweep(spec, tmp_path / "r.jsonl", progress=False)
    assert len(rows) == 2 and all("error" not in r for r in rows)
    by_budget = {r["result"]["recipe_config"]["fmpq"]["int8_budget"]: r["result"] for r in rows}
    lo, hi = by_budget[0.0], by_budget[1.0]
    # tiny preset: every input is a whole number of 64-channel blocks, so the budget is exact.
    assert lo["int8_fraction"] == 0.0 and hi["int8_fraction"] == 1.0
    for r in (lo, hi):
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0
        assert (r["n_windows"], r["context"], r["n_tokens"]) == (2, 32, 2 * 31)
        assert r["recipe"] == "fmpq_w4axkv4"
    # The first point calibrated; the second reused the statistics.
    assert lo["calib_cached"] is False and hi["calib_cached"] is True
    assert "ppl" in sweep.summary_table(rows, ["ppl", "int8_fraction"])


def test_float_recipe_needs_no_calibration_and_int8_fraction_task():
    gin_config.parse(["bf16"], TINY)
    r = tasks.perplexity()
    assert r["int8_fraction"] is None and r["calib_cached"] is None and math.isfinite(r["ppl"])
    gin_config.parse(["fmpq_w4axkv4"], TINY)
    f = tasks.int8_fraction()
    assert 0.0 <= f["int8_fraction"] <= 1.0 and f["calib_cached"] is False
    assert set(f["int8_fraction_by_group"]) == {"attn_in", "o_in", "mlp_in", "down_in"}


def test_bad_task_config_names_the_field():
    gin_config.parse([], ["PerplexityConfig.max_windows = 0"])
    with pytest.raises(ValueError, match="max_windows=0"):
        tasks.perplexity()
    gin_config.parse([], ["PerplexityConfig.model = 'nope.bin'"])
    with pytest.raises(ValueError, match="nope.bin"):
        tasks.perplexity()


def test_mixed_calibration_windows_are_disjoint_from_evaluation():
    ctx = 4
    austen = np.arange(100, 140, dtype=np.int32)  # 10 windows
    wiki = np.arange(0, 30, dtype=np.int32)  # 7 windows of 4 (tail of 2 dropped)
    cfg = tasks.PerplexityConfig(context=ctx, calib_windows=5, max_windows=4, calib_corpus="mixed")
    w = tasks.calibration_windows(cfg, austen, wiki)
    # 3 Austen windows (the first), then the last 2 of Wikipedia's 7 windows.
    np.testing.assert_array_equal(w[:3].ravel(), austen[:12])
    np.testing.assert_array_equal(w[3:].ravel(), wiki[20:28])
    evaluated = set(wiki[: 4 * ctx].tolist())
    assert not evaluated & set(w[3:].ravel().tolist())
    plain = dataclasses.replace(cfg, calib_corpus="austen")
    np.testing.assert_array_equal(
        tasks.calibration_windows(plain, austen, wiki).ravel(), austen[:20]
    )
    with pytest.raises(ValueError, match="exceed the 7 windows"):
        tasks.calibration_windows(dataclasses.replace(cfg, max_windows=6), austen, wiki)
    with pytest.raises(ValueError, match="calib_corpus='books'"):
        tasks.PerplexityConfig(calib_corpus="books")
