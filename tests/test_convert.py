"""quantize_model on a tiny random LLaMA: logits stay close to float, plans and folds hold.

Errors are relative RMS of the logits, `rms(out - ref) / std(ref)`: W8A8 < 0.1 (INT8 with
planted 30x outlier channels), 4-bit recipes < 0.5, and FMPQ must beat uniform W4A4 (by 10%,
RTN weight error being shared) on the
same weights. Folds are checked exactly on the permutations and to f32 rounding (1e-5) on the
float outputs they must not change.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.calibrate import collect_stats
from comet_jax.quant import fmpq
from comet_jax.quant.convert import quantize_model, quantized_model
from comet_jax.quant.qlinear import W4AxLinear
from comet_jax.quant.recipe import PRESETS, QuantRecipe, preset
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, init_params

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=192,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(CFG)
    params = init_params(model, jax.random.key(0))
    # Plant outlier input channels (large norm weights), as real LLM activations have.
    params = jax.tree_util.tree_map(lambda a: a, params)
    for i in range(CFG.num_layers):
        for norm in ("input_norm", "post_attn_norm"):
            w = np.ones(CFG.hidden_size, np.float32)
            w[[5, 77]] = 30.0
            params[f"layers_{i}"][norm] = jnp.asarray(w)
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 64)).astype(np.int32)
    stats = collect_stats(CFG, params, toks, hessian=True, rotated=True, progress=False)
    ref, _ = model.apply({"params": params}, toks[:1])
    return params, toks, stats, ref


def _rel_err(out, ref) -> float:
    d = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean(d * d)) / np.std(np.asarray(ref)))


def _logits(recipe, tiny, **kw):
    params, toks, stats, _ = tiny
    qp, plan, rep = quantize_model(CFG, params, recipe, stats, progress=False, **kw)
    out, _ = quantized_model(CFG, recipe, plan).apply({"params": qp}, toks[:1])
    return out, qp, plan, rep


def test_float_recipe_is_identity(tiny):
    out, *_ = _logits(PRESETS["bf16"], tiny)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tiny[3]))


def test_w8a8_logits_close(tiny):
    out, *_ = _logits(PRESETS["w8a8"], tiny)
    assert _rel_err(out, tiny[3]) < 0.1


def test_fmpq_plan_respected(tiny):
    recipe = preset(
        "fmpq_w4ax",
        w_quantizer="rtn",
        fmpq=fmpq.FMPQConfig(block_size=64, rule="threshold", threshold=8.0),
    )
    out, qp, plan, rep = _logits(recipe, tiny)
    stats = tiny[2]
    for row in rep.groups:
        i, g = row["layer"], row["group"]
        expected = fmpq.plan_permutation(
            stats[(i, g)].absmax, recipe.fmpq, mean_abs=stats[(i, g)].absmean
        )
        assert row["k8"] == expected.k8
        proj = {
            "attn_in": "q_proj",
            "o_in": "o_proj",
            "mlp_in": "gate_proj",
            "down_in": "down_proj",
        }[g]
        be = plan.backend_for(i, proj)
        assert isinstance(be, W4AxLinear) and (be.k4, be.k8) == (expected.k4, expected.k8)
        if row["perm"] == "runtime":
            np.testing.assert_array_equal(np.asarray(qp[f"layers_{i}"][g]["perm"]), expected.perm)
    # The planted outlier channels of the normed inputs sit in the INT8 segment.
    attn = next(r for r in rep.groups if r["group"] == "attn_in" and r["layer"] == 0)
    assert attn["k8"] == 64 and attn["perm"] == "runtime"
    perm = np.asarray(qp["layers_0"]["attn_in"]["perm"])
    assert {5, 77} <= set(perm[-64:].tolist())
    assert np.isfinite(np.asarray(out)).all()
    out_u, *_ = _logits(preset("w4a4_rtn", fmpq=recipe.fmpq), tiny)
    assert _rel_err(out, tiny[3]) < 0.9 * _rel_err(out_u, tiny[3])


def _float_with_folds(params, plan_down, fold_o, perm_o):
    """Float params with the down_in / o_in permutations folded as convert does."""
    p = jax.tree_util.tree_map(np.asarray, params)
    lp = dict(p["layers_0"])
    for proj in ("gate_proj", "up_proj"):
        lp[proj] = {"kernel": fmpq.fold_out(lp[proj]["kernel"], plan_down)}
    lp["down_proj"] = {"kernel": fmpq.permute_in(lp["down_proj"]["kernel"], plan_down)}
    for proj, rows in (
        ("q_proj", fold_o.q_rows),
        ("k_proj", fold_o.k_rows),
        ("v_proj", fold_o.v_rows),
    ):
        lp[proj] = {"kernel": lp[proj]["kernel"][rows]}
    lp["o_proj"] = {"kernel": fmpq.permute_in(lp["o_proj"]["kernel"], perm_o)}
    p["layers_0"] = lp
    return p


def test_folds_are_exact_in_float(tiny):
    params, toks, _, ref = tiny
    rng = np.random.default_rng(1)
    perm_down = rng.permutation(CFG.intermediate_size).astype(np.int32)
    # A foldable o_in permutation: swap the two KV groups, swap heads inside, permute dims.
    d, rep = CFG.head_dim, CFG.num_heads // CFG.num_kv_heads
    sig = [rng.permutation(d), rng.permutation(d)]
    heads = [3, 2, 1, 0]  # new head h' takes old head heads[h'] (group of old head = h // rep)
    perm_o = np.concatenate([heads[h] * d + sig[heads[h] // rep] for h in range(4)])
    fold = fmpq.attention_fold(
        perm_o, n_heads=CFG.num_heads, n_kv_heads=CFG.num_kv_heads, head_dim=d
    )
    assert fold is not None
    p = _float_with_folds(params, perm_down, fold, perm_o)
    out, _ = LlamaForCausalLM(CFG).apply({"params": p}, toks[:1])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_fold_status_and_identity_plans(tiny):
    recipe = preset(
        "fmpq_w4ax",
        w_quantizer="rtn",
        attn_out_foldable=True,
        fmpq=fmpq.FMPQConfig(block_size=32, rule="budget", int8_budget=0.25),
        tile=32,
    )
    _, qp, plan, rep = _logits(recipe, tiny)
    status = {(r["layer"], r["group"]): r["perm"] for r in rep.groups}
    assert status[(0, "down_in")] == "folded" and "perm" not in qp["layers_0"].get("down_in", {})
    assert status[(0, "o_in")] in ("folded", "identity")
    for r in rep.groups:  # budget: round-half-up of 25% of the blocks of each input
        assert r["k8"] == int(np.floor(0.25 * (r["k"] // 32) + 0.5)) * 32
    _, _, plan_u, rep_u = _logits(preset("w4a4_rtn"), tiny)
    assert all(r["perm"] == "identity" and r["k8"] == 0 for r in rep_u.groups)


def test_gptq_and_rotation_run(tiny):
    for name in ("w4a16_gptq", "rot_fmpq_w4axkv4"):
        recipe = dataclasses.replace(PRESETS[name], kv_group=32)
        out, *_ = _logits(recipe, tiny)
        assert np.isfinite(np.asarray(out)).all()
        assert _rel_err(out, tiny[3]) < 0.5


def test_recipe_validation_and_json():
    r = preset("fmpq_w4axkv4", w_group=64)
    assert QuantRecipe.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="act='fmpq'"):
        QuantRecipe(act="fmpq")
    with pytest.raises(ValueError, match="preset name"):
        preset("w3a3")
    with pytest.raises(ValueError, match="kv_group"):
        QuantRecipe(kv_group=48)
