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
from comet_jax.quant import fmpq, pack
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
        if row["perm"] == "runtime":  # stored with sorted segments (sorted_gather)
            stored = expected.perm[fmpq.gather_order(expected.perm, expected.k8)]
            np.testing.assert_array_equal(np.asarray(qp[f"layers_{i}"][g]["perm"]), stored)
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


# ---- 128-channel blocks on widths that are not multiples of 128 (FMPQConfig.pad_k) ----------
# d_model 192 = 1.5 x 128 (q/k/v, o, gate/up inputs pad to 256), FFN 320 = 2.5 x 128 (down_proj
# input pads to 384 and is still folded into gate/up). The reference is the same quantization
# unpadded: 64-channel blocks with the same INT8 channel count (int8_blocks 2 x 64 = 1 x 128),
# so the same channels in the same order, the same scales and integer sums. Logits agree to
# f32 rounding (rtol/atol 1e-5 of max |logit|): XLA fuses the RMSNorm of the padded path (done
# before the zeros are prepended) differently, which moves normalized values by an ulp.

CFG_PAD = ModelConfig(
    vocab_size=128,
    hidden_size=192,
    intermediate_size=320,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
)
B128 = fmpq.FMPQConfig(block_size=128, rule="budget", int8_blocks=1, pad_k=True)
B64 = fmpq.FMPQConfig(block_size=64, rule="budget", int8_blocks=2)


@pytest.fixture(scope="module")
def tiny_pad():
    model = LlamaForCausalLM(CFG_PAD)
    params = init_params(model, jax.random.key(3))
    for i in range(CFG_PAD.num_layers):
        for norm in ("input_norm", "post_attn_norm"):
            w = np.ones(CFG_PAD.hidden_size, np.float32)
            w[[5, 77, 190]] = 30.0
            params[f"layers_{i}"][norm] = jnp.asarray(w)
    toks = np.random.default_rng(3).integers(0, CFG_PAD.vocab_size, (3, 64)).astype(np.int32)
    stats = collect_stats(CFG_PAD, params, toks, hessian=True, rotated=True, progress=False)
    ref, _ = model.apply({"params": params}, toks[:1])
    return params, toks, stats, ref


def _run_pad(recipe, tiny_pad):
    params, toks, stats, _ = tiny_pad
    qp, plan, rep = quantize_model(CFG_PAD, params, recipe, stats, progress=False)
    out, _ = quantized_model(CFG_PAD, recipe, plan).apply({"params": qp}, toks[:1])
    return np.asarray(out), qp, plan, rep


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


PROJ_OF = {"attn_in": "q_proj", "o_in": "o_proj", "mlp_in": "gate_proj", "down_in": "down_proj"}


def test_padded_block128_model_equals_unpadded_block64(tiny_pad):
    r128 = preset("fmpq_w4axkv4", w_quantizer="rtn", kv_group=32, fmpq=B128)
    r64 = dataclasses.replace(r128, fmpq=B64)
    out, qp, plan, rep = _run_pad(r128, tiny_pad)
    out64, qp64, _, rep64 = _run_pad(r64, tiny_pad)
    _close(out, out64)
    assert rep.int8_fraction == rep64.int8_fraction == (3 * 128 + 128) / (3 * 192 + 320)
    for row, row64 in zip(rep.groups, rep64.groups):
        i, g = row["layer"], row["group"]
        k = row["k"]
        kp = -(-k // 128) * 128
        assert (row["k_pad"], row["k8"], row["perm"]) == (kp, 128, row64["perm"])
        assert row["int8_fraction"] == row64["int8_fraction"] == 128 / k
        be = plan.backend_for(i, PROJ_OF[g])
        assert isinstance(be, W4AxLinear)
        assert (be.pad, be.k4, be.k8, be.block) == (kp - k, kp - 128, 128, 128)
        w = pack.unpack_int4(qp[f"layers_{i}"][PROJ_OF[g]]["w_packed"], 64)
        if row["perm"] == "runtime":
            perm = np.asarray(qp[f"layers_{i}"][g]["perm"])
            perm64 = np.asarray(qp64[f"layers_{i}"][g]["perm"])
            # Zeros first, then the unpadded plan's order; never in the INT8 segment.
            np.testing.assert_array_equal(perm, np.r_[np.arange(kp - k), kp - k + perm64])
            assert np.all(perm[be.k4 :] >= be.pad)
        else:  # folded into gate/up: the backend only prepends the zeros
            assert row["perm"] == "folded" and g == "down_in" and g not in qp[f"layers_{i}"]
        # Zero weight columns where the zeros sit (first in the layout): q 0.
        assert np.all(np.asarray(w)[:, : be.pad] == 0)
    # Without pad_k the same recipe names the problem.
    with pytest.raises(ValueError, match=r"K=192 .*pad_k=True"):
        _run_pad(dataclasses.replace(r128, fmpq=dataclasses.replace(B128, pad_k=False)), tiny_pad)


def test_padded_attention_fold_uniform_and_block_scales(tiny_pad):
    # A foldable o_in plan stays foldable with padding (zeros first, heads after).
    r128 = preset("fmpq_w4axkv4", w_quantizer="rtn", kv_group=32, fmpq=B128)
    r128 = dataclasses.replace(r128, attn_out_foldable=True)
    out, qp, plan, rep = _run_pad(r128, tiny_pad)
    out64, *_ = _run_pad(dataclasses.replace(r128, fmpq=B64), tiny_pad)
    assert {r["perm"] for r in rep.groups if r["group"] == "o_in"} <= {"folded", "identity"}
    assert "o_in" not in qp["layers_0"] and plan.backend_for(0, "o_proj").pad == 64
    _close(out, out64)
    # Uniform W4A4 with 128-blocks: identity plans with the zeros in front.
    u128 = preset("w4a4_rtn", fmpq=B128)
    out_u, qp_u, plan_u, rep_u = _run_pad(u128, tiny_pad)
    out_u64, *_ = _run_pad(preset("w4a4_rtn", fmpq=B64), tiny_pad)
    assert all(r["perm"] == "identity" and r["k8"] == 0 for r in rep_u.groups)
    _close(out_u, out_u64)
    # Per-block activation scales: other blocks than 64 (no reference); runs and stays close.
    blk = dataclasses.replace(r128, act_granularity="block", attn_out_foldable=False)
    out_b, *_ = _run_pad(blk, tiny_pad)
    assert _rel_err(out_b, tiny_pad[3]) < 0.5


def test_padded_gptq_and_rotation(tiny_pad):
    # GPTQ over the padded layout: the zero columns are decoupled (permute_hessian: zero
    # coupling, mean(diag) on their diagonal, so the damping keeps its value), so it is the
    # unpadded GPTQ in exact arithmetic. In f32 the sweep's lazy-batch blocks start 64 columns
    # later and the damping's mean is rounded differently, which flips a few roundings: at most
    # 0.5% of the integers of a projection (measured: 0 outside down_proj, <= 0.09% there).
    g128 = preset("fmpq_w4axkv4", kv_group=32, fmpq=B128)
    out, qp, plan, _ = _run_pad(g128, tiny_pad)
    out64, qp64, *_ = _run_pad(dataclasses.replace(g128, fmpq=B64), tiny_pad)
    for i in range(CFG_PAD.num_layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            pad = plan.backend_for(i, p).pad
            q = np.asarray(pack.unpack_int4(qp[f"layers_{i}"][p]["w_packed"], 64))
            q64 = np.asarray(pack.unpack_int4(qp64[f"layers_{i}"][p]["w_packed"], 64))
            assert np.all(q[:, :pad] == 0) and np.mean(q[:, pad:] != q64) <= 0.005
    assert _rel_err(out, out64) < 0.1  # the flips' effect on the logits of this tiny model
    rot = preset("rot_fmpq_w4axkv4", kv_group=32, fmpq=B128)
    out_r, *_ = _run_pad(rot, tiny_pad)
    assert np.isfinite(out_r).all() and _rel_err(out_r, tiny_pad[3]) < 0.5


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_sorted_gather_changes_no_output(tiny, quantizer):
    """sorted_gather (the default) stores each run-time permutation with both segments in
    ascending channel order and the weight columns reordered to match: the same segments
    (same channel sets), so the same logits bit for bit as the plan's score order (GPTQ runs
    in the plan's order either way); weight groups keep the plan's order."""
    recipe = preset("fmpq_w4ax", w_quantizer=quantizer)
    cache: dict = {}
    out, qp, _, rep = _logits(recipe, tiny, weight_cache=cache)
    out0, qp0, _, _ = _logits(dataclasses.replace(recipe, sorted_gather=False), tiny)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out0))
    runtime = [(r["layer"], r["group"], r["k8"]) for r in rep.groups if r["perm"] == "runtime"]
    assert runtime  # the planted outliers make attn_in / mlp_in gather at run time
    moved = 0
    for i, g, k8 in runtime:
        perm = np.asarray(qp[f"layers_{i}"][g]["perm"])
        perm0 = np.asarray(qp0[f"layers_{i}"][g]["perm"])
        k4 = perm.shape[0] - k8
        for seg in (slice(0, k4), slice(k4, None)):
            assert (np.diff(perm[seg]) > 0).all()
            assert set(perm[seg].tolist()) == set(perm0[seg].tolist())
        moved += int((perm != perm0).sum())
    assert moved > 0  # the score order was not already sorted
    grouped = preset("fmpq_w4ax", w_quantizer="rtn", w_group=64)
    _, qg, _, rg = _logits(grouped, tiny)
    i, g, _ = next((r["layer"], r["group"], 0) for r in rg.groups if r["perm"] == "runtime")
    _, qg0, _, _ = _logits(dataclasses.replace(grouped, sorted_gather=False), tiny)
    np.testing.assert_array_equal(
        np.asarray(qg[f"layers_{i}"][g]["perm"]), np.asarray(qg0[f"layers_{i}"][g]["perm"])
    )


def test_gather_order():
    perm = np.array([0, 1, 7, 3, 2, 9, 4, 8, 6, 5])
    order = fmpq.gather_order(perm, 4)
    np.testing.assert_array_equal(perm[order], [0, 1, 2, 3, 7, 9, 4, 5, 6, 8])
    np.testing.assert_array_equal(fmpq.gather_order(perm, 0), np.argsort(perm))
    with pytest.raises(ValueError, match="k8=11 must be in"):
        fmpq.gather_order(perm, 11)
