"""Decode attention that writes the step's own K/V (`paged_decode_attention(new_kv=...)`,
`EngineConfig.decode_fused_write`) against writing first, then attending.

Contract (interpret mode on the CPU):
- the pool arrays after the call equal `kv4_write_reference`'s bit for bit (the kernel
  quantizes with `kv4_write`'s arithmetic), untouched entries included, and a slot of -1
  writes nothing;
- the output matches `paged_decode_attention_reference` over those pages within the decode
  kernel's tolerance (1e-2 relative L2; tests/test_kv4_attention.py: the kernel feeds bf16
  operands to its dots). A row with slot -1 attends its first ``seq_len - 1`` keys.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache as kc
from pallas_kernels import kv4_attention as attn
from pallas_kernels import kv4_write as W


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _case(hg, d, page, group, lens, seed, hkv=2, max_pages=4):
    """A cache holding each row's first ``len - 1`` tokens (layer 1; random bytes elsewhere),
    the rows' new tokens and their slots (position ``len - 1``)."""
    rng = np.random.default_rng(seed)
    b = len(lens)
    cfg = kc.KVCacheConfig(2, hkv, d, page, b * max_pages + 3, group, "int4")
    pool = kc.init_cache(cfg)
    fill = lambda x: jnp.asarray(  # noqa: E731
        rng.integers(0, 256, x.shape) if x.dtype == jnp.uint8 else rng.uniform(0.1, 2, x.shape),
        x.dtype,
    )
    pool = dataclasses.replace(pool, **{n: fill(x) for n, x in pool.pages()._asdict().items()})
    table = rng.permutation(cfg.num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    s = max_pages * page
    pos = np.broadcast_to(np.arange(s), (b, s))
    slots = kc.slot_mapping_from_positions(table, pos, page, pos < lens[:, None] - 1)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    cache = jax.jit(kc.write_kv)(pool, 1, k, v, slots)
    new = np.asarray(kc.slot_mapping_from_positions(table, lens[:, None] - 1, page))[:, 0]
    k_new = jnp.asarray(rng.standard_normal((b, hkv, d)) * 2, jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((b, hkv, d)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, hg * hkv, d)), jnp.bfloat16)
    return cache.pages(), table, q, k_new, v_new, new.astype(np.int32)


CASES = [  # gqa, head_dim, page, group, num_splits, block_k (None: default)
    (4, 64, 16, 64, 1, None),  # q read in its own layout (one split), two-page gather
    (4, 128, 32, 32, 1, 32),  # four groups, one page a step
    (1, 64, 16, 32, 3, 16),  # padded rows, flash-decoding splits (the token in split 0)
]


@pytest.mark.parametrize("hg,d,page,group,splits,block_k", CASES)
def test_fused_write_equals_write_then_attend(hg, d, page, group, splits, block_k):
    lens = np.array([1, page - 1, 3 * page + 5, 4 * page, page + 1], np.int32)
    kv, table, q, k_new, v_new, slots = _case(hg, d, page, group, lens, seed=hg + d + group)
    slots[4] = -1  # a row without a new token: no store, its first len - 1 keys only
    kw = dict(layer=1, num_splits=splits, block_k=block_k, interpret=True)
    fused = jax.jit(functools.partial(attn.paged_decode_attention, **kw))
    out, pools = fused(q, kv, table, lens, new_kv=(k_new, v_new, jnp.asarray(slots)))
    assert out.shape == q.shape and out.dtype == q.dtype

    want_pools = W.kv4_write_reference(kv, 1, k_new, v_new, jnp.asarray(slots))
    for name, a, b in zip(W.PagedKV._fields, pools, want_pools):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert not np.array_equal(np.asarray(want_pools.v), np.asarray(kv.v))  # really written

    ref_lens = np.where(slots >= 0, lens, lens - 1).astype(np.int32)
    ref = jax.jit(functools.partial(attn.paged_decode_attention_reference, layer=1))
    want = ref(q, want_pools, table, ref_lens)
    assert _rel(out, want) < 1e-2
    for row in range(len(lens)):  # each row on its own (a wrong row cannot hide in the norm)
        assert _rel(out[row], want[row]) < 1e-2, row
    # and the kernel without new_kv over the written pages agrees as closely
    plain = jax.jit(functools.partial(attn.paged_decode_attention, **kw))
    assert _rel(out, plain(q, want_pools, table, ref_lens)) < 1e-2


def test_fused_write_with_a_traced_layer_and_donated_pool():
    lens = np.array([5, 20, 33], np.int32)
    kv, table, q, k_new, v_new, slots = _case(4, 64, 16, 64, lens, seed=3)
    want_pools = W.kv4_write_reference(kv, 1, k_new, v_new, jnp.asarray(slots))
    want = attn.paged_decode_attention_reference(q, want_pools, table, lens, layer=1)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(q, kv, layer, new_kv):
        return attn.paged_decode_attention(
            q, kv, table, lens, layer=layer, interpret=True, new_kv=new_kv
        )

    out, pools = step(q, kv, jnp.int32(1), (k_new, v_new, jnp.asarray(slots)))
    assert _rel(out, want) < 1e-2
    for name, a, b in zip(W.PagedKV._fields, pools, want_pools):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_bad_new_kv_raises():
    lens = np.array([5, 20], np.int32)
    kv, table, q, k_new, v_new, slots = _case(4, 64, 16, 64, lens, seed=4)
    call = functools.partial(attn.paged_decode_attention, q, kv, table, lens, interpret=True)
    s = jnp.asarray(slots)
    with pytest.raises(ValueError, match="tuple"):
        call(new_kv=(k_new, v_new))
    with pytest.raises(ValueError, match="k_new"):
        call(new_kv=(k_new[:, :1], v_new, s))
    with pytest.raises(ValueError, match="slots"):
        call(new_kv=(k_new, v_new, s.astype(jnp.int16)))
    with pytest.raises(ValueError, match="return_lse"):
        call(new_kv=(k_new, v_new, s), return_lse=True)
    with pytest.raises(ValueError, match="causal_shift"):
        call(new_kv=(k_new, v_new, s), causal_shift=2)
    bf16 = attn.PagedKV(
        jnp.zeros((2, 4, 2, 16, 64), jnp.bfloat16), jnp.zeros((2, 4, 2, 16, 64), jnp.bfloat16)
    )
    with pytest.raises(ValueError, match="INT4"):
        attn.paged_decode_attention(
            q,
            bf16,
            np.array([[0], [1]], np.int32),
            np.array([5, 6], np.int32),
            new_kv=(k_new, v_new, s),
        )


def test_paged_attention_routes_decode_only():
    """`kv_cache.paged_attention(fused_write=True)`: decode over INT4 pages with the Pallas
    backend goes through the fused kernel (same pages and output as write-then-attend);
    prefill, the reference backend and bf16 caches keep the separate write."""
    lens = np.array([5, 20, 33], np.int32)
    kv, table, q, k_new, v_new, slots = _case(4, 64, 16, 64, lens, seed=5)
    cfg = kc.KVCacheConfig(2, 2, 64, 16, kv.k.shape[1], 64, "int4")
    cache = kc.PagedKVCache(*kv, config=cfg)
    calls = []
    real = attn.paged_decode_attention

    def spy(*a, **k):
        calls.append("new_kv" in k)
        return real(*a, **k)

    run = lambda fused, backend="pallas": kc.paged_attention(  # noqa: E731
        q, k_new, v_new, cache, 1, table, lens, jnp.asarray(slots), backend=backend,
        interpret=True, write_kernel=True, fused_write=fused,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn, "paged_decode_attention", spy)
        out_f, cache_f = run(True)
        out_s, cache_s = run(False)
    assert calls == [True, False]
    for name in W.PagedKV._fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(cache_f, name)), np.asarray(getattr(cache_s, name)), err_msg=name
        )
    assert _rel(out_f, out_s) < 1e-2
    out_r, _ = run(True, backend="reference")  # the reference backend writes first as ever
    assert _rel(out_f, out_r) < 1e-2


def tiny_engine_case(seed, **config):
    """The random tiny LLaMA on the reference engine (INT4 cache; ``config`` overrides):
    ``(model config, params, EngineConfig, prompts, greedy SamplingParams, its tokens)``."""
    from comet_jax.engine import runner as runner_mod
    from comet_jax.engine.config import EngineConfig
    from comet_jax.engine.engine import LLMEngine
    from comet_jax.engine.sampling import SamplingParams
    from models.llama import LlamaForCausalLM, init_params

    cfg = runner_mod.preset_config("tiny")
    params = init_params(LlamaForCausalLM(cfg), jax.random.key(0))
    ec = EngineConfig(
        max_batch=4, max_tokens_per_step=32, max_prefill_seqs=2, max_model_len=128,
        page_size=16, num_pages=24, decode_buckets=(4,), prefill_batch_buckets=(2,),
        chunk_buckets=(32,), compute_dtype="float32", kernels="reference", kv_dtype="int4",
        **config,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    ps = [rng.integers(0, 320, n).tolist() for n in (5, 40, 1, 17)]
    sp = SamplingParams(max_tokens=6, temperature=0)
    engine = LLMEngine.build(cfg, params, ec, progress=False)
    want = [w["token_ids"] for w in engine.generate(ps, sp)]
    return cfg, params, ec, ps, sp, want


def assert_follows(got, want):
    """Greedy tokens of a kernel engine against the reference engine's: a random tiny model
    has near-flat logits, so the first three of every sequence must be equal and most
    tokens overall (as tests/test_engine.py's Pallas test)."""
    assert [g[:3] for g in got] == [w[:3] for w in want]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.75 * sum(len(w) for w in want)


@pytest.mark.slow
def test_engine_decode_fused_write_in_interpret_mode(monkeypatch):
    """`EngineConfig.decode_fused_write` on the Pallas path (interpret mode): the decode
    steps trace the fused kernel and no separate decode write (prefill keeps the write
    kernel, in runs of 16), and greedy tokens follow the reference engine's. As in
    tests/test_engine.py's Pallas test: a random tiny model has near-flat logits, so the
    first three tokens of every sequence must be equal and most tokens overall."""
    from comet_jax.engine.engine import LLMEngine

    cfg, params, ec, ps, sp, want = tiny_engine_case(8)
    writes, fused = [], []
    real_write, real_attn = W.kv4_write, attn.paged_decode_attention
    monkeypatch.setattr(
        W, "kv4_write", lambda *a, **k: writes.append(k.get("run", 0)) or real_write(*a, **k)
    )
    monkeypatch.setattr(
        attn,
        "paged_decode_attention",
        lambda *a, **k: fused.append("new_kv" in k) or real_attn(*a, **k),
    )
    pec = dataclasses.replace(ec, kernels="pallas", interpret=True, decode_fused_write=True)
    eng = LLMEngine.build(cfg, params, pec, progress=False)
    assert eng.runner.model.attention.decode_fused_write
    assert fused and all(fused)  # every decode layer call writes its own K/V
    assert writes and set(writes) == {16}  # the write kernel runs for prefill chunks only
    assert_follows([g["token_ids"] for g in eng.generate(ps, sp)], want)
    with pytest.raises(ValueError, match="decode_fused_write"):
        dataclasses.replace(pec, kv_recent_window=4)


def tiny_bench_attention(monkeypatch, tmp_path, *sections):
    """experiments/bench_attention.py for a CPU test of a study: writing to ``tmp_path``, the
    engine shape shrunk (3 rows of 130-300 tokens, 2 layers, layer 1), the decode kernel in
    interpret mode, a timer that calls once and reports 1 ms, ``RESULTS[s]`` empty for each
    of ``sections``."""
    from tests import experiment_scripts

    monkeypatch.setenv("OUT", str(tmp_path))
    bench = experiment_scripts.load("bench_attention")
    monkeypatch.setattr(bench, "OUT", str(tmp_path))
    for k, v in dict(batch=3, seq_lo=130, seq_hi=300, layers=2, layer=1).items():
        monkeypatch.setitem(bench.ENGINE_SHAPE, k, v)
    monkeypatch.setattr(
        attn,
        "paged_decode_attention",
        functools.partial(attn.paged_decode_attention, interpret=True),
    )
    monkeypatch.setattr(bench, "bench", lambda fn, arg_sets: (fn(*arg_sets[0]), 1e-3)[1])
    monkeypatch.setattr(bench, "RESULTS", {**bench.RESULTS, **{s: [] for s in sections}})
    return bench


def test_bench_attention_fused_write_study_runs(monkeypatch, tmp_path):
    """`bench_attention.py --fused-write` at a tiny engine shape with the kernels in
    interpret mode: both paths' pools equal, outputs close, both timed."""
    bench = tiny_bench_attention(monkeypatch, tmp_path, "fused_write")
    monkeypatch.setattr(W, "kv4_write", functools.partial(W.kv4_write, interpret=True))
    bench.fused_write_study(jax.random.key(0))
    [row] = bench.RESULTS["fused_write"]
    assert "error" not in row, row.get("error")
    assert row["pools_equal"] and row["written"] and row["finite"]
    assert 0 < row["rel_l2"] < 1e-2
    assert row["fused_over_separate"] == 1.0  # the stubbed timer: both paths ran
