"""Unit tests of models/: config validation, RoPE, dense attention, pluggable backends, capture.

Tolerances: float32 paths compared with 1e-5 absolute (same math, different association);
integer-valued bookkeeping compared exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant.qlinear import W4AxLinear
from models import (
    GROUPS,
    PROJECTIONS,
    CachedDenseAttention,
    DenseAttention,
    DenseKVCache,
    FloatLinear,
    LinearPlan,
    LlamaForCausalLM,
    ModelConfig,
    abstract_params,
    apply_rope,
    dense_attention,
    init_params,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from models.llama import NORM_OF_GROUP, kernel_order_variables

TINY = ModelConfig(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    attention_bias=True,
)


def _random_params(model, seed=0):
    """Random params from the abstract tree (no eager init): norms near one, weights ~1/sqrt(K)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-1]), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model))


@functools.cache
def _jitted(model, mutable=False):
    return jax.jit(functools.partial(model.apply, mutable=list(mutable) if mutable else False))


def _run(model, params, tokens, mutable=()):
    """Jitted forward, cached per (model, mutable): one compile per model and token shape."""
    return _jitted(model, tuple(mutable))({"params": params}, tokens)


def _tokens(b, t, seed=0, vocab=96):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, jnp.int32)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_kv_heads=4), "multiple of num_kv_heads"),
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(hidden_size=0), "hidden_size=0 must be a positive int"),
        (dict(family="gpt2"), "family='gpt2'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs 'low_freq_factor'"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_config_from_hf_errors():
    base = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        ModelConfig.from_hf(dict(base, model_type="gpt2"))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ModelConfig.from_hf(dict(base, model_type="llama", hidden_act="gelu"))
    with pytest.raises(ValueError, match="neither a directory nor a file"):
        ModelConfig.from_hf("/nonexistent/ckpt")
    # model_type may be inferred from `architectures` (as GGUF-derived dicts provide).
    cfg = ModelConfig.from_hf(dict(base, architectures=["Qwen2ForCausalLM"]))
    assert cfg.family == "qwen2" and cfg.attention_bias
    assert hash(cfg) == hash(ModelConfig.from_hf(dict(base, architectures=["Qwen2ForCausalLM"])))


# ---------------------------------------------------------------------------- RoPE


def test_rope_relative_position():
    """<rope(q, m), rope(k, n)> depends only on m - n; norms are preserved."""
    d = 16
    inv_freq = rope_inv_freq(d, 10000.0)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, d))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, d))

    def dot(m, n):
        cm, sm = rope_cos_sin(jnp.array([[m]]), inv_freq)
        cn, sn = rope_cos_sin(jnp.array([[n]]), inv_freq)
        return float(jnp.sum(apply_rope(q, cm, sm) * apply_rope(k, cn, sn)))

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 5), abs=1e-3)
    c, s = rope_cos_sin(jnp.array([[37]]), inv_freq)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, c, s)), jnp.linalg.norm(q), rtol=1e-5)


def test_llama3_inv_freq_bands():
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    base = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, scaling)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


# ---------------------------------------------------------------------------- attention


def _attention_loop_reference(q, k, v, valid, window=None):
    """Per (batch, head, query) numpy loop: the plainest statement of causal GQA."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                js = [
                    j for j in range(i + 1) if valid[bi, j] and (window is None or i - j < window)
                ]
                if not js:
                    continue
                s = np.array([q[bi, i, h] @ k[bi, j, h // g] for j in js]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, h // g] for pj, j in zip(p, js))
    return out


@pytest.mark.parametrize("t, window", [(1, None), (7, None), (9, 3)])
def test_dense_attention_matches_loop(t, window):
    rng = np.random.default_rng(t)
    q = rng.normal(size=(2, t, 6, 8)).astype(np.float32)
    k = rng.normal(size=(2, t, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, t, 2, 8)).astype(np.float32)
    lengths = np.array([t, max(1, t - 3)])
    valid = np.arange(t)[None] < lengths[:, None]
    got = dense_attention(q, k, v, key_valid=jnp.asarray(valid), sliding_window=window)
    want = _attention_loop_reference(q, k, v, valid, window)
    for bi, n in enumerate(lengths):  # outputs at padded queries are unspecified
        np.testing.assert_allclose(np.asarray(got[bi, :n]), want[bi, :n], atol=1e-5)


def test_dense_attention_state_errors():
    q = jnp.ones((2, 3, 2, 4))
    with pytest.raises(ValueError, match="dense attention state of shape"):
        DenseAttention()(q, q, q, 0, jnp.ones((3,), jnp.int32))


# ---------------------------------------------------------------------------- model


def test_param_tree_layout():
    model = LlamaForCausalLM(TINY)
    shapes = jax.tree.map(lambda a: a.shape, abstract_params(model))
    assert set(shapes) == {"embed_tokens", "final_norm", "lm_head", "layers_0", "layers_1"}
    layer = shapes["layers_1"]
    assert set(layer) == {"input_norm", "post_attn_norm", *PROJECTIONS}
    assert layer["q_proj"] == {"kernel": (48, 48), "bias": (48,)}
    assert layer["k_proj"] == {"kernel": (16, 48), "bias": (16,)}
    assert layer["o_proj"] == {"kernel": (48, 48)}
    assert layer["down_proj"] == {"kernel": (48, 80)}
    tied = abstract_params(LlamaForCausalLM(dataclasses.replace(TINY, tie_word_embeddings=True)))
    assert "lm_head" not in tied


def test_jit_static_model_and_logits_at():
    model = LlamaForCausalLM(TINY)
    params = _random_params(model)
    tokens = _tokens(2, 7)
    hash(model)  # a static argument must be hashable

    fwd = jax.jit(lambda m, p, t, at: m.apply({"params": p}, t, logits_at=at)[0], static_argnums=0)
    at = jnp.array([6, 0], jnp.int32)
    last = fwd(model, params, tokens, at)
    assert last.shape == (2, 1, 96)
    logits, _ = _run(model, params, tokens)
    np.testing.assert_allclose(last[:, 0], logits[jnp.arange(2), at], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_packed_tokens_give_the_same_logits():
    """packing=(pack, unpack): token-wise ops on the real tokens only, same last-row logits
    (ragged rows, a length-1 row, padded pack rows)."""
    from models.llama import packing_from_lengths

    model = LlamaForCausalLM(TINY)
    params = _random_params(model)
    tokens = _tokens(3, 8)
    lens = jnp.array([5, 1, 8], jnp.int32)
    pack, unpack = packing_from_lengths(lens, 8, 16)
    assert pack.shape == (16,) and unpack.shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(pack[:14]), [0, 1, 2, 3, 4, 8, *range(16, 24)])
    np.testing.assert_array_equal(np.asarray(unpack[2]), np.arange(6, 14))
    at = lens - 1
    want = model.apply({"params": params}, tokens, logits_at=at)[0]
    got = model.apply({"params": params}, tokens, logits_at=at, packing=(pack, unpack))[0]
    assert got.shape == want.shape == (3, 1, 96)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="packing needs logits_at"):
        model.apply({"params": params}, tokens, packing=(pack, unpack))
    with pytest.raises(ValueError, match="unpack of shape"):
        model.apply({"params": params}, tokens, logits_at=at, packing=(pack, unpack[:2]))


@dataclasses.dataclass(frozen=True)
class ScaledLinear:
    """Test backend with group params: x' = norm(x) * s (group), y = x' @ (W / s).T.

    Mathematically the float model when the weight is divided by the same s; exercises group
    params, per-projection plans and the one-prepare-per-group contract.
    """

    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def weight_init(self, spec, param_dtype):
        return FloatLinear().weight_init(spec, param_dtype)

    def group_init(self, spec, param_dtype):
        return lambda rng: {"scale": 1.0 + jax.random.uniform(rng, (spec.in_features,))}

    def prepare_input(self, group_params, x, norm_weight, *, eps):
        self.calls.append(x.shape)
        x = x if norm_weight is None else rms_norm(x, norm_weight, eps)
        return x * group_params["scale"]

    def matmul(self, weight_params, prepared):
        return FloatLinear().matmul(weight_params, prepared)


def _fold_scales(params, plan_layers_groups, scales):
    """Divides the weights of the projections reading (layer, group) by that group's scale."""
    from models import PROJECTIONS_OF

    params = jax.tree.map(lambda a: a, params)
    for (layer, group), s in zip(plan_layers_groups, scales):
        lp = dict(params[f"layers_{layer}"])
        lp[group] = {"scale": s}
        for proj in PROJECTIONS_OF[group]:
            lp[proj] = dict(lp[proj], kernel=lp[proj]["kernel"] / s)
        params[f"layers_{layer}"] = lp
    return params


def test_plan_with_group_params_matches_float():
    float_model = LlamaForCausalLM(TINY)
    params = _random_params(float_model)
    tokens = _tokens(2, 7, seed=5)
    want, _ = _run(float_model, params, tokens)

    backend = ScaledLinear()
    plan = LinearPlan.from_mapping({(1, "attn_in"): backend, (None, "down_in"): backend})
    model = LlamaForCausalLM(TINY, linear=plan)
    shapes = jax.tree.map(lambda a: a.shape, abstract_params(model))
    assert shapes["layers_1"]["attn_in"] == {"scale": (48,)}
    assert "attn_in" not in shapes["layers_0"]
    assert shapes["layers_0"]["down_in"] == {"scale": (80,)}

    where = [(1, "attn_in"), (0, "down_in"), (1, "down_in")]
    scales = [1.0 + jax.random.uniform(jax.random.key(i), (k,)) for i, k in enumerate((48, 80, 80))]
    backend.calls.clear()
    got, _ = jax.jit(model.apply)({"params": _fold_scales(params, where, scales)}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert len(backend.calls) == 3  # one prepare per group, not per projection


@dataclasses.dataclass(frozen=True)
class _OtherFloat(FloatLinear):
    """Same math as FloatLinear, but a distinct backend (unequal type)."""


def test_mixed_backends_within_group():
    """k_proj alone on another backend: both backends prepare the shared input once."""
    float_model = LlamaForCausalLM(TINY)
    params = _random_params(float_model)
    tokens = _tokens(2, 7, seed=2)
    want, _ = _run(float_model, params, tokens)
    other = _OtherFloat()
    assert other != FloatLinear()
    model = LlamaForCausalLM(TINY, linear=LinearPlan(overrides=(((0, "k_proj"), other),)))
    got, _ = _run(model, params, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

    two_owners = LinearPlan(
        default=ScaledLinear(), overrides=(((0, "q_proj"), dataclasses.replace(ScaledLinear())),)
    )
    # Equal (dataclass eq ignores `calls`) backends collapse to one; distinct ones must not both
    # own group params.
    assert two_owners.backend_for(0, "q_proj") == two_owners.backend_for(0, "k_proj")

    @dataclasses.dataclass(frozen=True)
    class OtherScaled(ScaledLinear):
        pass

    bad = LlamaForCausalLM(
        TINY, linear=LinearPlan(default=ScaledLinear(), overrides=(((0, "q_proj"), OtherScaled()),))
    )
    with pytest.raises(ValueError, match="at most one backend per input group"):
        init_params(bad, jax.random.key(0))


def test_plan_validation():
    with pytest.raises(ValueError, match="override name 'qkv'"):
        LinearPlan(overrides=(((0, "qkv"), FloatLinear()),))
    with pytest.raises(ValueError, match="must be hashable"):
        LinearPlan(default=_Unhashable())


class _Unhashable:
    __hash__ = None

    def weight_init(self, spec, dt): ...
    def group_init(self, spec, dt): ...
    def prepare_input(self, gp, x, n, *, eps): ...
    def matmul(self, w, x): ...


def test_capture_intermediates():
    model = LlamaForCausalLM(TINY)
    params = _random_params(model)
    tokens = _tokens(2, 7, seed=3)
    (logits, _), state = _run(model, params, tokens, mutable=["intermediates"])
    inter = state["intermediates"]
    assert set(inter) == {"layers_0", "layers_1"}
    widths = {"attn_in": 48, "o_in": 48, "mlp_in": 48, "down_in": 80}
    for group in GROUPS:
        (x,) = inter["layers_1"][group]
        assert x.shape == (2, 7, widths[group])
    x0 = params["embed_tokens"][tokens]
    want = rms_norm(x0, params["layers_0"]["input_norm"], TINY.rms_norm_eps)
    np.testing.assert_allclose(inter["layers_0"]["attn_in"][0], want, atol=1e-6)
    plain, _ = _run(model, params, tokens)
    np.testing.assert_allclose(logits, plain, atol=1e-6)

    # A reducing transform: per-channel absmax instead of whole activations.
    absmax = LlamaForCausalLM(
        TINY, capture_transform=lambda layer, group, x: jnp.max(jnp.abs(x), axis=(0, 1))
    )
    _, reduced = _run(absmax, params, tokens, mutable=["intermediates"])
    np.testing.assert_allclose(
        reduced["intermediates"]["layers_1"]["down_in"][0],
        jnp.max(jnp.abs(inter["layers_1"]["down_in"][0]), axis=(0, 1)),
    )


@dataclasses.dataclass(frozen=True)
class _RecordingAttention:
    """Dense attention that appends its layer index to an int32 state (checks threading)."""

    def __call__(self, q, k, v, layer_idx, cache_state):
        out, _ = DenseAttention()(q, k, v, layer_idx, None)
        if cache_state is None:  # model.init passes no cache
            cache_state = jnp.zeros((0,), jnp.int32)
        return out, jnp.concatenate([cache_state, jnp.array([layer_idx], jnp.int32)])


def test_attention_plugin_threads_state_and_kv_transform():
    model = LlamaForCausalLM(TINY, attention=_RecordingAttention())
    params = _random_params(model)
    tokens = _tokens(2, 7, seed=4)
    _, state = jax.jit(model.apply)({"params": params}, tokens, None, jnp.zeros((0,), jnp.int32))
    np.testing.assert_array_equal(state, [0, 1])

    zero_v = DenseAttention(kv_transform=lambda k, v, layer: (k, jnp.zeros_like(v)))
    _, inter = _run(
        LlamaForCausalLM(TINY, attention=zero_v), params, tokens, mutable=["intermediates"]
    )
    assert not np.any(np.asarray(inter["intermediates"]["layers_0"]["o_in"][0]))


def test_bf16_compute_close_to_f32():
    params = _random_params(LlamaForCausalLM(TINY))
    tokens = _tokens(2, 7, seed=6)
    f32, _ = _run(LlamaForCausalLM(TINY), params, tokens)
    bf16, _ = _run(LlamaForCausalLM(TINY, dtype=jnp.bfloat16), params, tokens)
    assert bf16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits; two layers: a few percent of the logit range.
    assert float(jnp.max(jnp.abs(bf16 - f32))) <= 5e-2 * float(jnp.max(jnp.abs(f32)))


def test_cached_decode_matches_full_forward():
    """Ragged prefill (right padded) then one-token decode steps through a DenseKVCache give
    the logits of one full forward pass per sequence."""
    full_model = LlamaForCausalLM(TINY)
    params = _random_params(full_model)
    tokens = np.asarray(_tokens(2, 7, seed=8))
    want, _ = _run(full_model, params, tokens)

    model = LlamaForCausalLM(TINY, attention=CachedDenseAttention())
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, c))
    cache = DenseKVCache.create(TINY, batch=2, max_len=8)
    prompt = np.array([4, 2])  # sequence 1 is padded from 2 to 4 tokens in the prefill chunk
    pos = np.broadcast_to(np.arange(4), (2, 4)).astype(np.int32)
    logits, cache = step(params, tokens[:, :4], pos, cache)
    cache = cache.advance(prompt)
    for b, n in enumerate(prompt):
        np.testing.assert_allclose(logits[b, :n], want[b, :n], atol=1e-5)
    # Decode: each sequence feeds its next token at its own position.
    lengths = prompt.copy()
    for _ in range(3):
        nxt = tokens[np.arange(2), lengths][:, None]
        logits, cache = step(params, nxt, lengths[:, None].astype(np.int32), cache)
        cache = cache.advance(1)
        np.testing.assert_allclose(logits[:, 0], want[np.arange(2), lengths], atol=1e-5)
        lengths += 1
    np.testing.assert_array_equal(cache.lengths, lengths)


# ---------------------------------------------------------------------------- real model


def _perplexity(model, params, ids: np.ndarray) -> float:
    logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(ids)[None])
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[1:, None], axis=-1)
    return float(jnp.exp(jnp.mean(nll)))


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_gguf_perplexity(smollm2_float, smollm2_tokenizer, prepared_data):
    """SmolLM2-135M from GGUF: sane perplexity on 256 tokens of Austen; RoPE order matters."""
    from comet_jax.checkpoint.gguf import permute_qk_to_gguf
    from comet_jax.checkpoint.hf import params_from_hf_tensors
    from comet_jax.data import text

    hf_config, tensors = smollm2_float
    config = ModelConfig.from_hf(hf_config)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert config.tie_word_embeddings and config.head_dim == 64
    params = params_from_hf_tensors(config, tensors)
    doc = text.calibration_corpus(prepared_data.root)[0]
    ids = np.asarray(smollm2_tokenizer.encode(doc.text[:4000], add_bos=False)[:256], np.int32)
    assert ids.shape == (256,)
    model = LlamaForCausalLM(config)
    ppl = _perplexity(model, params, ids)
    # Measured here: 22.03 on these 256 tokens (Sense & Sensibility); over 1024 tokens of
    # Pride & Prejudice 18.20, matching the numpy float32 reference of offline-model.md.
    assert 10.0 < ppl < 35.0, ppl

    # Keeping llama.cpp's interleaved Q/K row order under rotate-half RoPE must hurt badly.
    wrong = dict(tensors)
    for i in range(config.num_layers):
        for proj, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            wrong[name] = permute_qk_to_gguf(np.asarray(tensors[name]), heads)
    assert _perplexity(model, params_from_hf_tensors(config, wrong), ids) > 2 * ppl


def test_fused_swiglu_gives_the_same_logits():
    """W4AxKV4 with the down projection's act_quant building silu(gate) * up itself (the
    default) vs the layer writing the hidden state (fuse_swiglu=False): the same logits,
    bit for bit, with the Pallas kernels in interpret mode; the jitted step runs the fused
    kernel (its name is in the HLO) and the unfused one does not. Capturing intermediates
    still sows the hidden state."""
    from comet_jax.engine.runner import precision_plan, preset_config
    from models import PROJECTIONS_OF

    cfg = dataclasses.replace(preset_config("tiny"), num_layers=1)
    plan = precision_plan(cfg, "w4axkv4", mode="pallas", interpret=True)
    backends = {g: plan.backend_for(0, PROJECTIONS_OF[g][0]) for g in GROUPS}
    assert backends["down_in"].fuses_swiglu
    off = dict(backends, down_in=dataclasses.replace(backends["down_in"], fuse_swiglu=False))
    unfused = LinearPlan.from_mapping({(None, g): b for g, b in off.items()})
    fused_model = LlamaForCausalLM(cfg, linear=plan, dtype=jnp.bfloat16)
    unfused_model = LlamaForCausalLM(cfg, linear=unfused, dtype=jnp.bfloat16)
    params = init_params(fused_model, jax.random.key(3))
    tokens = _tokens(2, 5, seed=4)
    fwd = jax.jit(lambda m, p, t: m.apply({"params": p}, t)[0], static_argnums=0)
    got = np.asarray(fwd(fused_model, params, tokens))
    want = np.asarray(fwd(unfused_model, params, tokens))
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)

    def cuda_hlo(fuse: bool) -> str:  # the GPU lowering (kernels, not their interpretation)
        gpu = {g: dataclasses.replace(b, interpret=False) for g, b in backends.items()}
        gpu["down_in"] = dataclasses.replace(gpu["down_in"], fuse_swiglu=fuse)
        model = LlamaForCausalLM(
            cfg, linear=LinearPlan.from_mapping({(None, g): b for g, b in gpu.items()}),
            dtype=jnp.bfloat16,
        )  # fmt: skip
        lowered = fwd.trace(model, params, tokens).lower(lowering_platforms=("cuda",))
        return lowered.as_text()

    assert "act_quant_swiglu" in cuda_hlo(True)
    assert "act_quant_swiglu" not in cuda_hlo(False)
    _, state = fused_model.apply({"params": params}, tokens, mutable=["intermediates"])
    sown = state["intermediates"]["layers_0"]["down_in"][0]
    assert sown.shape == (2, 5, cfg.intermediate_size)


def test_fused_projections_give_the_same_logits(monkeypatch):
    """W4AxLinear.fuse_projections: an input group's projections as one GEMM over their
    concatenated weights, the output split back, where the tuning table has the
    concatenated shape in the call's M bucket. Without an entry (the real table at this toy
    shape) the group declines; with one (patched: one fixed GEMM config for every shape,
    the kernels in interpret mode) the logits equal the one-GEMM-per-projection path's bit
    for bit, and the CUDA lowering holds 4 GEMM calls per layer instead of 7 (q | k | v and
    gate | up, then o and down)."""
    from comet_jax.engine.runner import precision_plan
    from pallas_kernels import tuning
    from pallas_kernels.w4ax_matmul import GemmConfig

    cfg = ModelConfig(
        vocab_size=320, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=64,
    )  # fmt: skip
    tokens = _tokens(2, 5, seed=6, vocab=320)

    def model(fuse, interpret=True):
        plan = precision_plan(
            cfg, "w4axkv4", mode="pallas", interpret=interpret, fuse_projections=fuse
        )
        return LlamaForCausalLM(cfg, linear=plan, dtype=jnp.bfloat16)

    def logits(m, params):  # a fresh jit: the tuning functions are read while tracing
        return np.asarray(jax.jit(lambda p, t: m.apply({"params": p}, t)[0])(params, tokens))

    params = init_params(model(False), jax.random.key(7))
    base = logits(model(False), params)
    assert np.isfinite(base).all() and np.abs(base).max() > 0
    attn = model(True).linear.backend_for(0, "q_proj")  # q | k | v: 256 + 128 + 128 rows
    assert tuning.table_entry(10, 512, attn.padded_features, attn.k8) is None
    np.testing.assert_array_equal(logits(model(True), params), base)

    one = GemmConfig(64, 64, 1, 4, 3, False, 8)
    monkeypatch.setattr(tuning, "get_config", lambda m, n, k, k8=0, **kw: one)
    monkeypatch.setattr(tuning, "table_entry", lambda m, n, k, k8=0: one)
    want = logits(model(False), params)
    np.testing.assert_array_equal(logits(model(True), params), want)

    def gemm_calls(fuse):  # the GPU lowering: Triton GEMM kernels in the HLO
        m = model(fuse, interpret=False)
        fn = jax.jit(lambda p, t: m.apply({"params": p}, t)[0])
        text = fn.trace(params, tokens).lower(lowering_platforms=("cuda",)).as_text()
        return len(re.findall(r"= call @_w4ax_call", text))

    assert (gemm_calls(False), gemm_calls(True)) == (7, 4)


@dataclasses.dataclass(frozen=True)
class _JnpGateUp(W4AxLinear):
    """W4AxLinear whose gate_up_swiglu always runs, as jnp: the value the one-kernel path
    computes (act_quant.swiglu of the two GEMM outputs, each rounded to the compute dtype)."""

    def gate_up_swiglu(self, gate_params, up_params, prepared):
        from pallas_kernels.act_quant import swiglu

        return swiglu(self.matmul(gate_params, prepared), self.matmul(up_params, prepared))


def test_gate_up_kernel_path_gives_the_same_logits():
    """W4AxLinear.fuse_gate_up: where the gate / up backend returns the MLP hidden state
    itself (here a jnp stand-in with the kernel's expression) the layer hands it to the down
    projection, whose act_quant then reads it instead of building it from gate and up: the
    same logits, bit for bit (interpret mode), as the default path; where it does not run
    (interpret mode) fuse_gate_up changes nothing. The CUDA lowering with a w_regs schedule
    for every shape runs the one kernel: no act_quant_swiglu, one Mosaic GPU call fewer."""
    from comet_jax.engine.runner import precision_plan
    from models import PROJECTIONS_OF
    from pallas_kernels import tuning
    from pallas_kernels.w4ax_matmul import GemmConfig

    cfg = ModelConfig(
        vocab_size=320, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=64,
    )  # fmt: skip
    plan = precision_plan(cfg, "w4axkv4", mode="pallas", interpret=True)
    backends = {g: plan.backend_for(0, PROJECTIONS_OF[g][0]) for g in GROUPS}

    def model_with(mlp_in, **fields):
        bs = {g: dataclasses.replace(b, **fields) for g, b in backends.items()}
        bs["mlp_in"] = dataclasses.replace(mlp_in, **fields)
        linear = LinearPlan.from_mapping({(None, g): b for g, b in bs.items()})
        return LlamaForCausalLM(cfg, linear=linear, dtype=jnp.bfloat16)

    mlp = backends["mlp_in"]
    base = model_with(mlp)
    params = init_params(base, jax.random.key(5))
    tokens = _tokens(2, 5, seed=6, vocab=320)
    fwd = jax.jit(lambda m, p, t: m.apply({"params": p}, t)[0], static_argnums=0)
    want = np.asarray(fwd(base, params, tokens))
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    stand_in = model_with(_JnpGateUp(**dataclasses.asdict(mlp)))
    np.testing.assert_array_equal(np.asarray(fwd(stand_in, params, tokens)), want)
    on = model_with(dataclasses.replace(mlp, fuse_gate_up=True))  # interpreted: not run
    np.testing.assert_array_equal(np.asarray(fwd(on, params, tokens)), want)

    def cuda_hlo(fuse: bool) -> str:
        gpu = dict(interpret=False, act_layout="unpacked")
        model = model_with(dataclasses.replace(mlp, fuse_gate_up=fuse), **gpu)
        return fwd.trace(model, params, tokens).lower(lowering_platforms=("cuda",)).as_text()

    w_regs = GemmConfig(128, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu")
    real = tuning.get_config
    try:
        tuning.get_config = lambda m, n, k, k8=0, **kw: w_regs
        fused, separate = cuda_hlo(True), cuda_hlo(False)
    finally:
        tuning.get_config = real
    assert "act_quant_swiglu" in separate and "act_quant_swiglu" not in fused

    def operand_counts(text):  # of the Mosaic GPU calls (x, row factors [2, R], weights, scales)
        return sorted({len(c.split(",")) for c in re.findall(r"@mosaic_gpu\w*\(([^)]*)\)", text)})

    assert operand_counts(separate) == [4]  # one weight, its scales
    assert operand_counts(fused) == [4, 6]  # and gate|up: both weights, both scales
    # act_quant writes the kernels' row factors (kernel_scales): no XLA op on the operands
    # between act_quant and a Mosaic GPU call (each one a kernel launch per GEMM)
    bodies = re.findall(r"func private @w4ax_matmul_mgpu_unpacked\w*\(.*?\n  \}", separate, re.S)
    before = [b.split("stablehlo.custom_call @mosaic_gpu")[0].split("{", 1)[1] for b in bodies]
    assert before and all("stablehlo." not in b for b in before), before


def _vector_gathers(fn, *args, floating: bool) -> int:
    """Gathers producing a 1-D float (``floating``: norm weights) or integer (index vectors)
    array in ``fn``'s jaxpr, nested calls included and Pallas kernels' bodies left out (the
    XLA gathers a call runs besides its kernels)."""

    def walk(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue
            aval = eqn.outvars[0].aval if eqn.outvars else None
            if (
                eqn.primitive.name == "gather"
                and aval.ndim == 1
                and jnp.issubdtype(aval.dtype, jnp.floating) == floating
            ):
                n += 1
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += walk(inner)
        return n

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("layout", ["auto", "unpacked"])
def test_kernel_order_variables_give_the_same_logits(layout):
    """The "kernel_orders" collection (``kernel_order_variables``: the RMSNorm weights and the
    runtime permutations rearranged once into the act_quant kernel's read orders, as the
    engine's runner does at start-up): the same logits bit for bit as the per-call
    rearrangement, W4AxKV4 with the Pallas kernels in interpret mode, in the packed
    (decode-size M) and the unpacked layout; the step then holds no gather of a norm weight
    (2 a layer without it) and, packed, none of a permutation (3 a layer: attn_in, o_in,
    mlp_in). Norm weights left in the original order under the permutations give other
    logits, and so does a permutation left in its stored order in the packed layout (the
    collection is read). Float and simulated backends have none."""
    from comet_jax.engine.runner import model_variables, precision_plan, preset_config
    from pallas_kernels.act_quant import kernel_norm_weight, kernel_read_order

    cfg = dataclasses.replace(preset_config("tiny"), num_layers=2)
    plan = precision_plan(cfg, "w4axkv4", mode="pallas", interpret=True)

    def lay(b):
        return dataclasses.replace(b, act_layout=layout) if isinstance(b, W4AxLinear) else b

    plan = LinearPlan(
        default=lay(plan.default), overrides=tuple((k, lay(b)) for k, b in plan.overrides)
    )
    model = LlamaForCausalLM(cfg, linear=plan, dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(5))

    def vary(path, a):  # norm weights other than ones, permutations other than the identity
        name = jax.tree_util.keystr(path)
        key = jax.random.fold_in(jax.random.key(7), sum(map(ord, name)))
        if name.endswith("['perm']"):
            return jax.random.permutation(key, a)
        return a * (1.0 + 0.5 * jax.random.uniform(key, a.shape)) if "norm" in name else a

    params = jax.tree_util.tree_map_with_path(vary, params)
    orders = kernel_order_variables(model, params)
    assert sorted(orders) == ["layers_0", "layers_1"]
    for i in range(2):
        got = orders[f"layers_{i}"]
        assert sorted(got) == ["attn_in", "mlp_in", "o_in"]  # down_in: perm folded, no norm
        assert sorted(got["attn_in"]) == ["norm", "perm_packed"] and list(got["o_in"]) == [
            "perm_packed"
        ]
        layer = params[f"layers_{i}"]
        backend = plan.backend_for(i, "q_proj")
        perm = layer["attn_in"]["perm"]
        for lay_ in ("packed", "unpacked"):
            want = kernel_norm_weight(
                layer["input_norm"], perm, backend.k4, tile_k=backend.tile, layout=lay_
            )
            np.testing.assert_array_equal(got["attn_in"]["norm"][lay_], want)
        want = kernel_read_order(perm, perm.shape[0], backend.k4, tile_k=backend.tile)
        np.testing.assert_array_equal(got["attn_in"]["perm_packed"], want)
    variables = model_variables(model, params)
    assert variables.keys() == {"params", "kernel_orders"}
    tokens = _tokens(2, 5, seed=6)
    fwd = jax.jit(lambda v, t: model.apply(v, t)[0])
    want = np.asarray(fwd({"params": params}, tokens))
    got = np.asarray(fwd(variables, tokens))
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)

    def swapped(part):  # the collection with one part left in its stored order
        out = {}
        for name, groups in orders.items():
            out[name] = {}
            for g, d in groups.items():
                d = dict(d)
                if part == "norm" and "norm" in d:
                    d["norm"] = {k: params[name][NORM_OF_GROUP[g]] for k in d["norm"]}
                if part == "perm":
                    d["perm_packed"] = params[name][g]["perm"]
                out[name][g] = d
        return out

    other = np.asarray(fwd({"params": params, "kernel_orders": swapped("norm")}, tokens))
    assert not np.array_equal(other, want)
    if layout == "auto":  # packed at this M: the index vector is read
        other = np.asarray(fwd({"params": params, "kernel_orders": swapped("perm")}, tokens))
        assert not np.array_equal(other, want)

    def count(v, floating):
        return _vector_gathers(lambda v: model.apply(v, tokens)[0], v, floating=floating)

    assert count({"params": params}, True) == 4
    assert count(variables, True) == 0
    assert count({"params": params}, False) == (6 if layout == "auto" else 0)
    assert count(variables, False) == 0
    sim = LlamaForCausalLM(cfg, linear=precision_plan(cfg, "w4axkv4"), dtype=jnp.bfloat16)
    assert kernel_order_variables(sim, params) == {}
    assert model_variables(sim, params).keys() == {"params"}
