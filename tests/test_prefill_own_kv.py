"""Prefill over the chunk's own K/V (`EngineConfig.prefill_own_kv`): the attention function
against the dense reference, the attention plug-in against the paged path, and the engine
(executables, which calls take the path, tokens, config errors). CPU: XLA's implementation
(cuDNN runs on the GPU only, measured by experiments/bench_throughput.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache
from comet_jax.engine.engine import LLMEngine
from comet_jax.engine.runner import ModelRunner, PagedAttention, PagedState, preset_config
from comet_jax.engine.sampling import SamplingParams
from models.attention import DenseAttention, dense_attention
from models.llama import LlamaForCausalLM, init_params
from tests.test_engine import CFG as ENGINE_CFG

# test_engine's tiny engine (f32 compute, reference kernels, bf16 cache), async scheduling
CFG = dataclasses.replace(ENGINE_CFG, async_scheduling=True)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _qkv(key, b, t, hq, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    return q, k, v


def test_own_chunk_attention_matches_dense_reference():
    """Every valid query position equals causal dense attention over the row's valid keys
    (f32, 1e-5); a padding row (q_len 0) and positions past q_len are finite."""
    q, k, v = _qkv(jax.random.key(1), 3, 24, 8, 2, 64)
    lens = jnp.array([24, 9, 0], jnp.int32)
    got = kv_cache.own_chunk_attention(q, k, v, lens)
    valid = jnp.arange(24)[None, :] < lens[:, None]
    want = dense_attention(q, k, v, key_valid=valid)
    assert got.shape == q.shape and got.dtype == q.dtype
    for row, n in enumerate(lens.tolist()):
        np.testing.assert_allclose(got[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(got)))


def test_own_chunk_attention_bf16_and_errors():
    """bf16 operands (XLA here; cuDNN on a GPU) within bf16 rounding of the f32 result;
    shapes that do not fit name the problem."""
    q, k, v = _qkv(jax.random.key(2), 2, 16, 4, 4, 64)
    lens = jnp.array([16, 5], jnp.int32)
    want = kv_cache.own_chunk_attention(q, k, v, lens)
    got = kv_cache.own_chunk_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), lens)
    assert got.dtype == jnp.bfloat16
    err = jnp.abs(got.astype(jnp.float32) - want)[0]
    assert float(err.max()) < 3e-2 * float(jnp.abs(want[0]).max())
    with pytest.raises(ValueError, match="q heads 6 must be a multiple of KV heads 4"):
        kv_cache.own_chunk_attention(jnp.zeros((2, 16, 6, 64)), k, v, lens)
    with pytest.raises(ValueError, match="must be \\[B, T, Hq, D\\]"):
        kv_cache.own_chunk_attention(q, k[:, :8], v[:, :8], lens)


@pytest.mark.parametrize("dtype", ["bf16", "int4", "int4_window"])
def test_plugin_writes_the_cache_and_attends_own_kv(dtype):
    """PagedAttention(own_kv=True) on rows without a prefix: the cache afterwards holds exactly
    what the paged path writes (with a recent window of 4 tokens: the pages and the rings, whose
    rows held stale values of an earlier occupant before the call), and the output is
    attention over the computed K/V (bf16 cache: the paged path's output up to the cache's
    bf16 rounding of K/V). Tolerance: none for the cache, 1e-5 for the output (f32)."""
    window = dict(recent_window=4, window_slots=3, window_dtype="float32")
    cfg = kv_cache.KVCacheConfig(
        num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, num_pages=8, group_size=64,
        dtype=dtype.split("_")[0], **(window if dtype == "int4_window" else {}),
    )  # fmt: skip
    q, k, v = _qkv(jax.random.key(3), 2, 32, 4, 2, 64)
    table = jnp.array([[1, 2, 0, 0], [3, 4, 5, 0]], jnp.int32)
    cache = kv_cache.init_cache(cfg)
    extra = {}
    if cfg.recent_window:
        stale = jax.random.normal(jax.random.key(9), cache.ring_k.shape, jnp.float32)
        cache = dataclasses.replace(cache, ring_k=stale, ring_v=stale * 2)
        extra["window_slot"] = jnp.array([2, 0], jnp.int32)
    state = PagedState(
        cache, table, jnp.zeros(2, jnp.int32), jnp.array([32, 20], jnp.int32), **extra
    )
    paged, s_paged = PagedAttention("reference")(q, k, v, 1, state)
    own, s_own = PagedAttention("reference", own_kv=True)(q, k, v, 1, state)
    for a, b in zip(jax.tree.leaves(s_paged.cache), jax.tree.leaves(s_own.cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if cfg.recent_window:  # the rows' newest 4 tokens (positions 28-31 and 16-19) went in
        rk = np.asarray(s_own.cache.ring_k)[1]
        np.testing.assert_array_equal(
            rk[2][:, [0, 1, 2, 3]], np.asarray(k)[0, 28:32].swapaxes(0, 1)
        )
        np.testing.assert_array_equal(
            rk[0][:, [0, 1, 2, 3]], np.asarray(k)[1, 16:20].swapaxes(0, 1)
        )
        np.testing.assert_array_equal(rk[1], np.asarray(state.cache.ring_k)[1, 1])  # untouched
    valid = jnp.arange(32)[None, :] < state.num_valid[:, None]
    want = dense_attention(q, k, v, key_valid=valid)
    for row, n in enumerate(state.num_valid.tolist()):
        np.testing.assert_allclose(own[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)
        if dtype == "bf16":
            np.testing.assert_allclose(own[row, :n], paged[row, :n], rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny")
    return cfg, init_params(LlamaForCausalLM(cfg), jax.random.key(0))


def test_engine_runs_no_prefix_calls_on_own_kv(model):
    """One more executable per prefill shape; calls whose rows all start their sequence take
    it, later chunks of a long prompt (a cached prefix) the paged one; same greedy tokens as
    the paged-only engine (bf16 cache); nothing compiled after start-up; no pages leaked."""
    base = LLMEngine.build(*model, CFG, progress=False)
    eng = LLMEngine.build(*model, dataclasses.replace(CFG, prefill_own_kv=True), progress=False)
    prefill_shapes = [s for s in eng.bucket_shapes() if s[1] > 1]
    assert prefill_shapes and eng.runner.num_compilations == base.runner.num_compilations + len(
        prefill_shapes
    )
    before = eng.runner.num_compilations
    rng = np.random.default_rng(4)
    short = [rng.integers(0, 320, n).tolist() for n in (5, 11, 14, 9)]
    long = [rng.integers(0, 320, 70).tolist()]  # 3 chunks of <= 32 tokens
    want = base.generate(short + long, GREEDY)
    got = eng.generate(short + long, GREEDY)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert eng.runner.num_compilations == before
    own = eng.runner.own_kv_calls
    assert 0 < own < eng.stats.prefill_calls  # the long prompt's later chunks read pages
    assert eng.allocator.num_used == 0


def test_engine_int4_own_kv_prefill_logits(model):
    """INT4 cache: a no-prefix prefill does not read the pages, so its first token equals the
    bf16-cache engine's with the same option (what the call writes into the INT4 pages is
    checked by test_plugin_writes_the_cache_and_attends_own_kv[int4])."""
    ps = [np.random.default_rng(6).integers(0, 320, n).tolist() for n in (7, 19)]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    firsts = []
    for kv in ("bf16", "int4"):
        ec = dataclasses.replace(CFG, kv_dtype=kv, kv_group=64, prefill_own_kv=True)
        eng = LLMEngine.build(*model, ec, progress=False)
        firsts.append([g["token_ids"] for g in eng.generate(ps, one)])
        assert eng.runner.own_kv_calls == eng.stats.prefill_calls > 0
    assert firsts[0] == firsts[1]


def test_engine_own_kv_with_recent_window(model):
    """INT4 cache with a recent window of 4 tokens: no-prefix prefill calls take the own-K/V
    executables and still fill the rings (what they write: test_plugin_writes_the_cache_and_
    attends_own_kv[int4_window]); a 70-token prompt's later chunks take the paged path. The
    first token equals the bf16-cache own-K/V engine's (the call reads no cache); the whole
    greedy run with the Pallas kernels in interpret mode equals the reference backend's; on
    prompts no longer than the window the engine gives the window engine's tokens without
    the option. No recompiles after start-up, no pages leaked."""
    rng = np.random.default_rng(7)
    ps = [rng.integers(0, 320, n).tolist() for n in (7, 19, 70)]
    base = dataclasses.replace(CFG, kv_dtype="int4", kv_group=64, prefill_own_kv=True)
    bf16 = LLMEngine.build(*model, dataclasses.replace(base, kv_dtype="bf16"), progress=False)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    firsts = [g["token_ids"] for g in bf16.generate(ps, one)]
    runs = []
    for kernels in (dict(kernels="reference"), dict(kernels="pallas", interpret=True)):
        ec = dataclasses.replace(base, kv_recent_window=4, **kernels)
        eng = LLMEngine.build(*model, ec, progress=False)
        before = eng.runner.num_compilations
        assert [g["token_ids"] for g in eng.generate(ps, one)] == firsts
        runs.append([g["token_ids"] for g in eng.generate(ps, GREEDY)])
        assert 0 < eng.runner.own_kv_calls < eng.stats.prefill_calls  # the 70-token prompt
        assert eng.runner.num_compilations == before and eng.allocator.num_used == 0
    assert runs[0] == runs[1]
    # Prompts no longer than the window: the paged prefill attends all of their keys
    # unquantized too, so the two prefills mean the same, and the decode steps read the
    # rings each filled: the same greedy tokens (without ring_fill the rings are stale).
    short = [rng.integers(0, 320, n).tolist() for n in (2, 3, 4)]
    paged = dataclasses.replace(base, kv_recent_window=4, prefill_own_kv=False)
    own = dataclasses.replace(base, kv_recent_window=4)
    got = [
        [
            g["token_ids"]
            for g in LLMEngine.build(*model, ec, progress=False).generate(short, GREEDY)
        ]
        for ec in (paged, own)
    ]
    assert got[0] == got[1]


def test_prefill_own_kv_config_errors(model):
    for bad in (dict(prefill_own_kv=1), dict(prefill_own_kv="yes")):
        with pytest.raises(ValueError, match="prefill_own_kv=.* must be a bool"):
            dataclasses.replace(CFG, **bad)
    with pytest.raises(ValueError, match=r"prefill_own_kv runs on one device \(tp=2\)"):
        dataclasses.replace(CFG, tp=2, prefill_own_kv=True)
    cfg, params = model
    cache = kv_cache.KVCacheConfig(
        num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        page_size=16, num_pages=8, dtype="bf16",
    )  # fmt: skip
    dense = LlamaForCausalLM(cfg, attention=DenseAttention())
    with pytest.raises(ValueError, match="attention is PagedAttention.*DenseAttention"):
        ModelRunner(dense, params, cache, prefill_own_kv=True)
