"""Perplexity: exact against a hand computation; batching and padding do not change it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.eval.perplexity import perplexity, window_nll
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, init_params

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    rms_norm_eps=1e-5,
)


def test_window_nll_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    toks = rng.integers(0, 7, (2, 5)).astype(np.int32)
    got = np.asarray(window_nll(jnp.asarray(logits), jnp.asarray(toks)))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ref = [sum(lse[b, t] - logits[b, t, toks[b, t + 1]] for t in range(4)) for b in range(2)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_perplexity_batching_and_reference():
    model = LlamaForCausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    windows = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 16)).astype(np.int32)
    r1 = perplexity(model, params, windows, batch_size=1, progress=False)
    r2 = perplexity(model, params, windows, batch_size=2, progress=False)  # padded last batch
    assert r1.n_tokens == r2.n_tokens == 3 * 15 and r1.n_windows == 3
    # f32 logits; batch shape changes only XLA's summation order (1e-5 relative).
    assert r2.ppl == pytest.approx(r1.ppl, rel=1e-5)
    logits, _ = model.apply({"params": params}, jnp.asarray(windows))
    nll = float(np.sum(np.asarray(window_nll(logits, jnp.asarray(windows)), np.float64)))
    assert r1.ppl == pytest.approx(math.exp(nll / 45), rel=1e-5)
    assert 1.0 < r1.ppl < 10 * CFG.vocab_size


def test_perplexity_rejects_bad_windows():
    model = LlamaForCausalLM(CFG)
    with pytest.raises(ValueError, match="windows of shape"):
        perplexity(model, {}, np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, {}, np.zeros((2, 4), np.int32), batch_size=0)


@pytest.mark.slow
def test_accuracy_table_quick(tmp_path):
    """The experiment script end to end on a tiny random model (--quick, ~1 min on 2 cores)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import accuracy_table

    res = accuracy_table.main(
        [
            "--quick",
            "--rows",
            "bf16",
            "w4a4_rtn",
            "fmpq_w4axkv4",
            "--int8-budget",
            "0.25",
            "--ablation-quantizer",
            "rtn",
            "--out",
            str(tmp_path),
        ]
    )
    assert {r["name"] for r in res["rows"]} == {"bf16", "w4a4_rtn", "fmpq_w4axkv4"}
    assert (tmp_path / "accuracy.json").is_file() and (tmp_path / "accuracy.png").is_file()
    assert all(math.isfinite(r["wikipedia"]["ppl"]) for r in res["rows"])
    assert any(a["ablation"] == "int8_budget" for a in res["ablations"])


def test_accuracy_table_lwc_rows_are_their_presets_with_lwc_weights():
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import accuracy_table

    recipes = accuracy_table.main_recipes({"w_group": 64})
    for name in ("fmpq_w4axkv4", "rot_fmpq_w4axkv4"):
        lwc = recipes[f"{name}_lwc"]
        assert lwc.w_quantizer == "lwc" and lwc.w_group == 64
        same = dataclasses.replace(lwc, name=name, w_quantizer=recipes[name].w_quantizer)
        assert same == recipes[name]


def test_accuracy_table_side_runs_leave_docs_alone():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import accuracy_table

    assert accuracy_table.parse_args([]).docs.name == "accuracy.md"
    assert accuracy_table.parse_args(["--rows", "bf16"]).docs is None
    assert accuracy_table.parse_args(["--out", "/tmp/x"]).docs is None
    assert accuracy_table.parse_args(["--quick"]).docs is None
