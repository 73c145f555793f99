"""KV4 with a float window over the most recent tokens (QuantRecipe.kv_recent_window).

Semantics under test: for a query at position t, keys/values at positions s > t - W (the query
and the W - 1 before it) are read unquantized, older ones through the KV4 fake quantizer, the
way a paged cache with a float tail would serve them. W = 0 is the plain KV4 path, bit for bit;
W >= T reads every key in float, i.e. the kv4-off path (bit for bit on CPU; asserted to 1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax import gin_config
from comet_jax.eval import tasks
from comet_jax.quant import kv_quant
from comet_jax.quant.convert import KV4Transform, attention_for, quantize_model, quantized_model
from comet_jax.quant.recipe import QuantRecipe, preset
from models.attention import DenseAttention, dense_attention
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, init_params

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=192,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
)
T = 24
KV4 = QuantRecipe(name="kv4", kv4=True)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(LlamaForCausalLM(CFG), jax.random.key(0))
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, T)).astype(np.int32)
    return params, jnp.asarray(toks)


def _logits(recipe, tiny):
    params, toks = tiny
    qp, plan, _ = quantize_model(CFG, params, recipe, None, progress=False)
    out, _ = quantized_model(CFG, recipe, plan).apply({"params": qp}, toks)
    return np.asarray(out)


def _old_kv4_attention(q, k, v, group):
    """The KV4 attention as it was before the window existed (causal, no padding)."""
    k, v = kv_quant.fake_quantize_kv(k, group), kv_quant.fake_quantize_kv(v, group)
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], g, d)
    s = jnp.einsum(
        "bthgd,bshd->bhgts", qg, k, precision="highest", preferred_element_type=jnp.float32
    )
    s = s * (d**-0.5)
    mask = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    s = jnp.where(mask[None, None, None], s, -0.7 * float(jnp.finfo(jnp.float32).max))
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum(
        "bhgts,bshd->bthgd",
        p.astype(v.dtype),
        v,
        precision="highest",
        preferred_element_type=jnp.float32,
    )
    return o.reshape(b, t, hq, d).astype(q.dtype)


def _qkv(seed, t=T, hq=4, hkv=2, d=64):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))


# ------------------------------------------------------------------- window 0 = old path
def test_window_zero_is_the_old_kv4_path_bit_for_bit(tiny):
    q, k, v = _qkv(1)
    att = attention_for(CFG, KV4)
    assert att == DenseAttention(kv_transform=KV4Transform(64))  # the pre-window object
    got, _ = att(q, k, v, 0, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_old_kv4_attention(q, k, v, 64)))
    explicit = dataclasses.replace(KV4, kv_recent_window=0)
    np.testing.assert_array_equal(_logits(explicit, tiny), _logits(KV4, tiny))


# ---------------------------------------------------------- window >= T = float KV path
@pytest.mark.parametrize("w", [T, T + 7])
def test_window_covering_the_sequence_is_the_float_kv_path(tiny, w):
    got = _logits(dataclasses.replace(KV4, kv_recent_window=w), tiny)
    want = _logits(QuantRecipe(name="float"), tiny)
    # Stated tolerance 1e-6 (the same einsums on the same operands; observed exact on CPU).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- a window in between
def test_window_in_between_float_rows_then_kv4_rows(tiny):
    """Rows t < W see only recent keys in every layer, so their logits are the float model's
    exactly; rows t >= W read some KV4 keys and differ from float, and from plain KV4."""
    w = 8
    mid = _logits(dataclasses.replace(KV4, kv_recent_window=w), tiny)
    flt = _logits(QuantRecipe(name="float"), tiny)
    kv4 = _logits(KV4, tiny)
    np.testing.assert_allclose(mid[:, :w], flt[:, :w], rtol=1e-6, atol=1e-6)
    for later in range(w, T):
        assert not np.allclose(mid[:, later], flt[:, later], rtol=0, atol=1e-6), later
    assert not np.allclose(mid[:, w:], kv4[:, w:], rtol=0, atol=1e-6)

    def err(x):
        return float(np.sqrt(np.mean((x[:, w:] - flt[:, w:]) ** 2)))

    # Keeping the W most recent keys in float brings every later row closer to float on
    # average (a property of this seed, checked rather than guaranteed in general).
    assert 0.0 < err(mid) < err(kv4)


def test_attention_rows_match_a_per_query_loop():
    """Each (t, s) reads float K/V when t - s < W else KV4 K/V; a plain loop says the same."""
    q, k, v = _qkv(2, t=11)
    w = 3
    got, _ = DenseAttention(kv_transform=KV4Transform(64), kv_recent_window=w)(q, k, v, 0, None)
    kq = np.asarray(kv_quant.fake_quantize_kv(k, 64), np.float64)
    vq = np.asarray(kv_quant.fake_quantize_kv(v, 64), np.float64)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    want = np.zeros_like(qn)
    for b in range(2):
        for h in range(4):
            for t in range(11):
                ks = [kn[b, s, h // 2] if t - s < w else kq[b, s, h // 2] for s in range(t + 1)]
                vs = [vn[b, s, h // 2] if t - s < w else vq[b, s, h // 2] for s in range(t + 1)]
                sc = np.array([qn[b, t, h] @ kk for kk in ks]) / 8.0
                p = np.exp(sc - sc.max())
                want[b, t, h] = (p / p.sum()) @ np.array(vs)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


# --------------------------------------------------------------------- hand-checked case
def test_hand_checked_tiny_attention():
    """T = 4, one head, D = group = 32, W = 2.

    Values: channel 1 = 15 and channel 0 = 0 fix the KV4 grid at scale 1, zero 0, so channel 2
    = 0.4 rounds to 0 when quantized. With q = 0 all scores tie and the output is the mean of
    the values read: channel 2 of row t = 0.4 x (number of float keys) / (t + 1), float keys
    being s in {t-1, t}: rows 0.4, 0.4, 0.8/3, 0.8/4.
    Keys: same grid; key 0 has 0.4 in channel 2, which q = 100 e_2 turns into a score of
    100 x 0.4 / sqrt(32) when key 0 is read in float (query 1) and 0 when it is read in KV4
    (queries 2 and 3), the same key read two ways depending on the query.
    """
    d, t = 32, 4
    row = np.zeros(d, np.float32)
    row[1] = 15.0
    v = np.tile(row, (t, 1))
    v[:, 2] = 0.4
    vq = np.asarray(kv_quant.fake_quantize_kv(jnp.asarray(v), 32))
    np.testing.assert_array_equal(vq[:, 2], 0.0)  # the premise: 0.4 -> 0 in KV4
    np.testing.assert_array_equal(vq[:, :2], v[:, :2])
    att = DenseAttention(kv_transform=KV4Transform(32), kv_recent_window=2)

    def run(q, k, vv):
        out, _ = att(*(jnp.asarray(a)[None, :, None, :] for a in (q, k, vv)), 0, None)
        return np.asarray(out)[0, :, 0]

    out = run(np.zeros((t, d), np.float32), np.tile(row, (t, 1)), v)
    np.testing.assert_allclose(out[:, 2], [0.4, 0.4, 0.8 / 3, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], 15.0, rtol=1e-6)

    k = np.tile(row, (t, 1))
    k[0, 2] = 0.4
    q = np.zeros((t, d), np.float32)
    q[:, 2] = 100.0
    onehot = np.zeros((t, d), np.float32)
    onehot[np.arange(t), np.arange(t) + 4] = 1.0  # value s = e_{4+s}: output = probabilities
    onehot[:, 1] = 15.0  # keeps the value grid exact (scale 1)
    probs = run(q, k, onehot)[:, 4:8]
    e = math.exp(100 * 0.4 / math.sqrt(d))
    want = [
        [1, 0, 0, 0],  # t = 0: key 0 only
        [e / (e + 1), 1 / (e + 1), 0, 0],  # t = 1: key 0 recent, read in float
        [1 / 3, 1 / 3, 1 / 3, 0],  # t = 2: key 0 old, read in KV4 -> score 0
        [1 / 4, 1 / 4, 1 / 4, 1 / 4],
    ]
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-1, 1.5, True, "16"])
def test_recipe_rejects_bad_windows(bad):
    with pytest.raises(ValueError, match="kv_recent_window="):
        QuantRecipe(kv4=True, kv_recent_window=bad)


def test_recipe_window_needs_kv4_and_round_trips():
    with pytest.raises(ValueError, match="needs kv4=True"):
        QuantRecipe(kv_recent_window=16)
    r = preset("fmpq_w4axkv4", kv_recent_window=np.int64(64))
    assert r.kv_recent_window == 64 and type(r.kv_recent_window) is int
    assert QuantRecipe.from_json(r.to_json()) == r
    old = json.loads(preset("fmpq_w4axkv4").to_json())
    del old["kv_recent_window"]  # a recipe saved before the field existed
    assert QuantRecipe.from_json(old).kv_recent_window == 0
    assert attention_for(CFG, r).kv_recent_window == 64


def test_attention_validation():
    with pytest.raises(ValueError, match="needs a kv_transform"):
        DenseAttention(kv_recent_window=4)
    with pytest.raises(ValueError, match="kv_recent_window=-2"):
        DenseAttention(kv_transform=KV4Transform(64), kv_recent_window=-2)
    q, k, v = _qkv(3, t=4)
    with pytest.raises(ValueError, match="recent_window=2 needs causal"):
        dense_attention(q, k, v, recent_window=2)


# -------------------------------------------------------------------------------- gin
@pytest.fixture
def _clean_gin():
    yield
    gin.clear_config()


def test_gin_binding_reaches_the_attention(_clean_gin):
    gin_config.parse(["fmpq_w4axkv4"], ["QuantRecipe.kv_recent_window = 16"])
    r = gin_config.build(QuantRecipe)
    assert r.kv_recent_window == 16 and r.kv4
    assert attention_for(CFG, r) == DenseAttention(
        kv_transform=KV4Transform(64), kv_recent_window=16
    )


def test_gin_invalid_window_fails_before_any_compute(_clean_gin, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded although the recipe was invalid")

    monkeypatch.setattr(tasks, "_load", boom)
    gin_config.parse(["fmpq_w4axkv4"], ["QuantRecipe.kv_recent_window = -1"])
    with pytest.raises(ValueError, match="kv_recent_window=-1"):
        tasks.perplexity()
    gin_config.parse(["bf16"], ["QuantRecipe.kv_recent_window = 16"])
    with pytest.raises(ValueError, match="needs kv4=True"):
        gin_config.build(QuantRecipe)
    with pytest.raises(ValueError, match="doesn't have a parameter named 'kv_recent_windw'"):
        gin_config.parse(["fmpq_w4axkv4"], ["QuantRecipe.kv_recent_windw = 16"])
