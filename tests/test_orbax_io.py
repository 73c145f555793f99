"""Orbax save/load of a quantized model: every leaf, the plan and the metadata roundtrip exactly."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from comet_jax.calibrate import collect_stats
from comet_jax.checkpoint.orbax_io import load_quantized, save_quantized
from comet_jax.quant.convert import quantize_model, quantized_model
from comet_jax.quant.fmpq import FMPQConfig
from comet_jax.quant.recipe import preset
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, init_params

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=64,
    rms_norm_eps=1e-5,
)


def assert_trees_equal(a, b):
    """Same structure, dtypes and values, leaf by leaf (exact: a roundtrip copies bytes)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["fmpq_w4axkv4", "w8a8"])
def test_roundtrip(tmp_path, name):
    params = init_params(LlamaForCausalLM(CFG), jax.random.key(1))
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    stats = collect_stats(CFG, params, toks, progress=False)
    recipe = preset(
        name, w_quantizer="rtn", fmpq=FMPQConfig(block_size=64, rule="budget", int8_budget=0.5)
    )
    qp, plan, rep = quantize_model(CFG, params, recipe, stats, progress=False)
    out = save_quantized(tmp_path / "q", CFG, recipe, qp, plan, rep)
    with pytest.raises(ValueError, match="not empty"):
        save_quantized(out, CFG, recipe, qp, plan, rep)

    cfg2, recipe2, qp2, plan2, rep2 = load_quantized(out)
    assert cfg2 == CFG and recipe2 == recipe and plan2 == plan
    assert rep2["int8_fraction"] == pytest.approx(rep.int8_fraction)
    assert_trees_equal(qp, qp2)
    if name == "fmpq_w4axkv4":  # the runtime permutations and packed weights travel
        assert qp2["layers_0"]["attn_in"]["perm"].dtype == np.int32
        assert qp2["layers_0"]["q_proj"]["w_packed"].dtype == np.int8
    y1, _ = quantized_model(CFG, recipe, plan).apply({"params": qp}, toks[:1])
    y2, _ = quantized_model(cfg2, recipe2, plan2).apply({"params": qp2}, toks[:1])
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_load_rejects_missing_meta(tmp_path):
    with pytest.raises(ValueError, match="meta.json"):
        load_quantized(tmp_path)


CFG_PAD = ModelConfig(
    vocab_size=96,
    hidden_size=192,  # 1.5 x 128: q/k/v, o and gate/up inputs padded to 256
    intermediate_size=256,
    num_layers=2,
    num_heads=3,
    num_kv_heads=1,
    head_dim=64,
    rms_norm_eps=1e-5,
)


def test_roundtrip_padded_128_blocks(tmp_path):
    params = init_params(LlamaForCausalLM(CFG_PAD), jax.random.key(2))
    toks = np.random.default_rng(1).integers(0, CFG_PAD.vocab_size, (2, 32)).astype(np.int32)
    stats = collect_stats(CFG_PAD, params, toks, progress=False)
    fcfg = FMPQConfig(block_size=128, rule="budget", int8_budget=0.5, pad_k=True)
    recipe = preset("fmpq_w4axkv4", w_quantizer="rtn", w_group=64, fmpq=fcfg)
    qp, plan, rep = quantize_model(CFG_PAD, params, recipe, stats, progress=False)
    be = plan.backend_for(0, "q_proj")
    assert be.pad == 64 and qp["layers_0"]["attn_in"]["perm"].shape == (256,)
    assert qp["layers_0"]["q_proj"]["w_packed"].shape == (192, 128)  # [N, 256 / 2]
    out = save_quantized(tmp_path / "q", CFG_PAD, recipe, qp, plan, rep)
    cfg2, recipe2, qp2, plan2, rep2 = load_quantized(out)
    assert cfg2 == CFG_PAD and recipe2 == recipe and recipe2.fmpq.pad_k and plan2 == plan
    assert plan2.backend_for(0, "q_proj").pad == 64
    assert [g["k_pad"] for g in rep2["groups"][:4]] == [256, 256, 256, 256]
    assert_trees_equal(qp, qp2)
    y1, _ = quantized_model(CFG_PAD, recipe, plan).apply({"params": qp}, toks[:1])
    y2, _ = quantized_model(cfg2, recipe2, plan2).apply({"params": qp2}, toks[:1])
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_meta_without_pad_fields_loads(tmp_path):
    """Checkpoints written before padding existed: no ``pad`` / ``pad_k`` keys -> 0 / False."""
    params = init_params(LlamaForCausalLM(CFG), jax.random.key(1))
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    stats = collect_stats(CFG, params, toks, progress=False)
    recipe = preset("fmpq_w4ax", w_quantizer="rtn", fmpq=FMPQConfig(block_size=64))
    qp, plan, rep = quantize_model(CFG, params, recipe, stats, progress=False)
    out = save_quantized(tmp_path / "q", CFG, recipe, qp, plan, rep)
    meta = json.loads((out / "meta.json").read_text())
    del meta["recipe"]["fmpq"]["pad_k"]
    for _, backend in meta["plan"]["overrides"]:
        backend["fields"].pop("pad", None)
    (out / "meta.json").write_text(json.dumps(meta))
    _, recipe2, _, plan2, _ = load_quantized(out)
    assert recipe2 == recipe and plan2 == plan
