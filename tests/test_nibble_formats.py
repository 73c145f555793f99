"""How the KV4 decode kernel feeds its dots: the K / V nibbles as f16 subnormals
(`paged_decode_attention(f16_nibbles=...)`, on by default for INT4 caches) against bf16
``128 + n`` (the format before), and the int8 logits (`qk_int8`, `EngineConfig.decode_qk_int8`).

Contract (interpret mode on the CPU; the GPU path is the same arithmetic with the unpack in
inline PTX, measured on the H200 in docs/benchmarks.md):
- the unpack is exact: ``lo = (b & 15) * 2^-24`` and ``hi = 16 * (b >> 4) * 2^-24``;
- both formats stay within the kernel's 1e-2 relative L2 of the f32 reference over the
  dequantized pages, and f16 (10 mantissa bits for q and the probabilities times V's
  scales, against bf16's 7) is not less accurate than bf16 on these cases;
- the engine's ``decode_qk_int8`` reaches the decode kernel (and only decode), with greedy
  tokens following the reference engine's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv4_attention as attn
from tests.test_decode_fused_write import (
    _case,
    _rel,
    assert_follows,
    tiny_bench_attention,
    tiny_engine_case,
)


def test_subnormal_unpack_is_exact():
    b = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16)
    lo, hi = attn._unpack_subnormal(b, fast=False)
    assert lo.dtype == hi.dtype == jnp.float16
    n = np.arange(256).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(lo, np.float64), (n & 15) * 2.0**-24)
    np.testing.assert_array_equal(np.asarray(hi, np.float64), 16 * (n >> 4) * 2.0**-24)
    # the bits read as f16 are the nibbles where they sit in the byte (what the PTX does)
    bits = np.asarray(lo).view(np.uint16), np.asarray(hi).view(np.uint16)
    np.testing.assert_array_equal(bits[0], n & 0x0F)
    np.testing.assert_array_equal(bits[1], n & 0xF0)


CASES = [  # gqa, head_dim, page, group, num_splits
    (4, 64, 16, 64, 1),  # q read in its own layout, two groups
    (4, 128, 16, 128, 2),  # flash-decoding splits (partials merged in XLA)
    (8, 128, 32, 32, 1),  # four groups, 32-channel groups
    (6, 64, 16, 64, 1),  # a GQA group of 6: rows padded to 8
]


@pytest.mark.parametrize("hg,d,page,group,splits", CASES)
def test_f16_nibbles_match_the_reference(hg, d, page, group, splits):
    lens = np.array([37, 64, 2], np.int32)
    kv, table, q, *_ = _case(hg, d, page, group, lens, seed=hg + d + group)
    ref = attn.paged_decode_attention_reference(q, kv, table, lens, layer=1)
    run = functools.partial(
        attn.paged_decode_attention, q, kv, table, lens, layer=1, num_splits=splits,
        interpret=True,
    )  # fmt: skip
    err = {f: _rel(run(f16_nibbles=f), ref) for f in (False, True)}
    assert err[True] < 1e-2 and err[False] < 1e-2, err
    assert err[True] <= err[False] * 1.1, err
    # the default is the f16 format
    assert attn.F16_NIBBLES_DEFAULT
    np.testing.assert_array_equal(np.asarray(run()), np.asarray(run(f16_nibbles=True)))
    if group >= 64:  # int8 logits, V as f16 or bf16
        for f in (False, True):
            assert _rel(run(qk_int8=True, f16_nibbles=f), ref) < 1e-2


def test_int8_q_error_is_small_next_to_the_kv4_rounding():
    """Against attention over the unquantized K/V, the INT4 cache's own rounding dominates:
    int8 q (``qk_int8``) adds under 2% to the error of the f16 / bf16 formats (measured
    14.58% vs 14.48% / 14.50% on this case), though against the reference over the
    dequantized pages it is ~3x theirs."""
    from comet_jax.engine import kv_cache as kc
    from pallas_kernels import kv4_write as W

    key = jax.random.key(0)
    b, hkv, hq, d, page, pages = 3, 2, 8, 128, 16, 16
    cfg = kc.KVCacheConfig(2, hkv, d, page, pages, 64, "int4")
    n = pages * page
    k = jax.random.normal(jax.random.fold_in(key, 1), (n, hkv, d)) * 2
    v = jax.random.normal(jax.random.fold_in(key, 2), (n, hkv, d))
    kv = W.kv4_write_reference(kc.init_cache(cfg).pages(), 1, k, v, jnp.arange(n, dtype=jnp.int32))
    perm = np.random.default_rng(0).permutation(pages)[:15].reshape(b, 5).astype(np.int32)
    table, lens = jnp.asarray(perm), jnp.array([37, 80, 5], jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 3), (b, hq, d)).astype(jnp.bfloat16)
    kp, vp = k.reshape(pages, page, hkv, d), v.reshape(pages, page, hkv, d)
    dense = []
    for r in range(b):
        kk = kp[perm[r]].reshape(-1, hkv, d)[: int(lens[r])]
        vv = vp[perm[r]].reshape(-1, hkv, d)[: int(lens[r])]
        qq = q[r].astype(jnp.float32).reshape(hkv, hq // hkv, d)
        p = jax.nn.softmax(jnp.einsum("hgd,thd->hgt", qq, kk) / np.sqrt(d), -1)
        dense.append(jnp.einsum("hgt,thd->hgd", p, vv).reshape(hq, d))
    dense = jnp.stack(dense)
    run = functools.partial(
        attn.paged_decode_attention, q, kv, table, lens, layer=1, interpret=True
    )
    err = {
        "bf16": _rel(run(f16_nibbles=False), dense),
        "f16": _rel(run(), dense),
        "int8": _rel(run(qk_int8=True), dense),
    }
    assert 0.1 < err["f16"] < 0.2, err  # the INT4 rounding of K and V
    assert err["int8"] < 1.02 * err["f16"] and err["int8"] < 1.02 * err["bf16"], err


@pytest.mark.parametrize("hg,d,group,splits", [(4, 64, 64, 1), (4, 128, 128, 2), (2, 128, 64, 1)])
def test_q_residual_keeps_outlier_q_as_accurate_as_f16(hg, d, group, splits):
    """q with 4 channels 20x the rest: one INT8 part per row loses the small channels to the
    outliers' scale (2.4-5x the f16 format's error on these cases, 22x at the GPU
    study's engine shape); the second part
    (``q_residual``) brings int8 logits back to f16's error (within 10%), in decode (one
    group / two groups, splits) and in prefill."""
    lens = np.array([37, 64, 2], np.int32)
    kv, table, q, *_ = _case(hg, d, 16, group, lens, seed=11 + d)
    big = jnp.arange(4) * (d // 4) + 3  # spread over the groups
    q = (q.astype(jnp.float32).at[..., big].multiply(20.0)).astype(q.dtype)
    ref = attn.paged_decode_attention_reference(q, kv, table, lens, layer=1)
    run = functools.partial(
        attn.paged_decode_attention, q, kv, table, lens, layer=1, num_splits=splits,
        interpret=True,
    )  # fmt: skip
    err = {
        "f16": _rel(run(), ref),
        "int8": _rel(run(qk_int8=True, q_residual=False), ref),
        "int8x2": _rel(run(qk_int8=True), ref),  # two parts: the default
    }
    assert err["f16"] < 1e-2 and err["int8"] > 2 * err["f16"], err
    assert err["int8x2"] < 1.1 * err["f16"], err
    # prefill: a 3-token chunk at the end of each row
    ql = np.minimum(lens, 3).astype(np.int32)
    qp = jnp.tile(q[:, None], (1, 3, 1, 1)) * jnp.array([1.0, -0.5, 0.7])[None, :, None, None]
    qp = qp.astype(q.dtype)
    refp = attn.paged_prefill_attention_reference(qp, kv, table, lens, ql, layer=1)
    pre = functools.partial(
        attn.paged_prefill_attention, qp, kv, table, lens, ql, layer=1, block_q=4,
        interpret=True,
    )  # fmt: skip
    e1, e2 = _rel(pre(qk_int8=True, q_residual=False), refp), _rel(pre(qk_int8=True), refp)
    assert e2 < 1e-2 and e1 > 2 * e2, (e1, e2)
    with pytest.raises(ValueError, match="q_residual=1 must be a bool"):
        attn.paged_decode_attention(q, kv, table, lens, layer=1, qk_int8=True, q_residual=1)


@pytest.mark.parametrize("hg,splits", [(4, 1), (4, 2), (2, 1), (6, 1), (1, 3)])
def test_q_residual_in_spare_rows_gives_the_dots_bits(hg, splits, monkeypatch):
    """The residual part in the decode tile's rows 8-15 (``Q_RESIDUAL_ROWS``: q read in its
    own layout, or the padded row layout with splits; GQA groups of 1, 2, 4 and 6) gives
    the same int32 sums, so the same outputs bit for bit, as the second pair of dots."""
    lens = np.array([37, 64, 2], np.int32)
    kv, table, q, *_ = _case(hg, 64, 16, 64, lens, seed=5 + hg)
    run = functools.partial(
        attn.paged_decode_attention, q, kv, table, lens, layer=1, num_splits=splits,
        qk_int8=True, interpret=True,
    )  # fmt: skip
    assert attn.Q_RESIDUAL_ROWS and attn.Q_RESIDUAL_DEFAULT
    rows = np.asarray(run())
    monkeypatch.setattr(attn, "Q_RESIDUAL_ROWS", False)
    np.testing.assert_array_equal(rows, np.asarray(run()))
    np.testing.assert_array_equal(rows, np.asarray(run(q_residual=True)))
    assert not np.array_equal(rows, np.asarray(run(q_residual=False)))


def test_f16_nibbles_with_the_fused_write():
    """The format's scale restoration happens before the fused write's own token (and the
    recent window's ring block: tests/test_recent_window.py runs the default format), which
    add to the corrected accumulators."""
    lens = np.array([30, 50], np.int32)
    kv, table, q, k_new, v_new, slots = _case(4, 64, 16, 64, lens, seed=3)
    outs = {}
    for f in (False, True):
        out, _ = attn.paged_decode_attention(
            q, kv, table, lens, layer=1, new_kv=(k_new, v_new, slots), f16_nibbles=f,
            interpret=True,
        )  # fmt: skip
        outs[f] = out
    assert _rel(outs[True], outs[False]) < 1e-2


def test_f16_nibbles_needs_an_int4_cache():
    from comet_jax.engine import kv_cache as kc

    cfg = kc.KVCacheConfig(1, 2, 64, 16, 4, 64, "bf16")
    kv = kc.init_cache(cfg).pages()
    q = jnp.ones((1, 4, 64), jnp.bfloat16)
    table, lens = jnp.zeros((1, 2), jnp.int32), jnp.array([3], jnp.int32)
    with pytest.raises(ValueError, match="f16_nibbles needs an INT4 cache"):
        attn.paged_decode_attention(q, kv, table, lens, f16_nibbles=True, interpret=True)
    # the default resolves to the bf16 pages' own path
    out = attn.paged_decode_attention(q, kv, table, lens, interpret=True)
    assert out.shape == q.shape


def test_decode_kernel_ir_carries_the_subnormal_unpack():
    """Lowered for the GPU (on the CPU, as experiments/inspect_kernels.py does): the default
    decode kernel's Triton IR holds the f16 unpack's masks and no 128 + n exponent; with
    f16_nibbles=False the old bf16 form."""
    from comet_jax.engine import kv_cache as kc
    from experiments.inspect_kernels import TtirCapture

    cfg = kc.KVCacheConfig(1, 2, 128, 16, 8, 128, "int4")
    kv = kc.init_cache(cfg).pages()
    q = jnp.ones((2, 8, 128), jnp.bfloat16)
    table, lens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4), jnp.array([40, 64], jnp.int32)
    texts = {}
    for f in (None, False):
        fn = functools.partial(attn.paged_decode_attention, f16_nibbles=f)
        with TtirCapture() as cap:
            jax.jit(fn).trace(q, kv, table, lens).lower(lowering_platforms=("cuda",))
        texts[f] = cap.modules[0][1]
    assert "0x00F000F0" in texts[None] and "0x43004300" not in texts[None]
    assert "0x43004300" in texts[False] and "0x00F000F0" not in texts[False]


def test_engine_decode_qk_int8_config_errors():
    from comet_jax.engine.config import EngineConfig

    with pytest.raises(ValueError, match="decode_qk_int8 needs the INT4 KV cache"):
        EngineConfig(kv_dtype="bf16", decode_qk_int8=True)
    with pytest.raises(ValueError, match="decode_qk_int8 needs the INT4 KV cache"):
        EngineConfig(kv_dtype="int4", kv_group=32, decode_qk_int8=True)
    with pytest.raises(ValueError, match="decode_qk_int8=1 must be a bool or None"):
        EngineConfig(kv_dtype="int4", decode_qk_int8=1)


def test_engine_decode_qk_int8_default_resolves_where_it_applies():
    """None (default): the int8 logits wherever the INT4 cache has groups of >= 64 channels;
    elsewhere off without an error; an explicit False keeps the f16-nibble logits."""
    from comet_jax.engine.config import EngineConfig

    assert EngineConfig().decode_qk_int8 is None
    assert EngineConfig(precision="w4axkv4").resolved_decode_qk_int8
    assert EngineConfig(kv_dtype="int4", kv_group=64).resolved_decode_qk_int8
    assert not EngineConfig(kv_dtype="int4", kv_group=32).resolved_decode_qk_int8
    assert not EngineConfig(precision="bf16").resolved_decode_qk_int8
    assert not EngineConfig(precision="w4axkv4", decode_qk_int8=False).resolved_decode_qk_int8


@pytest.mark.slow
def test_engine_decode_qk_int8_in_interpret_mode(monkeypatch):
    """`EngineConfig.decode_qk_int8` left at its default on the Pallas path (interpret
    mode, an INT4 cache with 64-channel groups): every decode attention call gets
    ``qk_int8=True`` (prefill none), and greedy tokens follow the
    reference engine's (as in tests/test_decode_fused_write.py: the first three of every
    sequence equal, most tokens overall)."""
    from comet_jax.engine.engine import LLMEngine

    cfg, params, ec, ps, sp, want = tiny_engine_case(9, kv_group=64)
    decode_kw, prefill_kw = [], []
    real_dec, real_pre = attn.paged_decode_attention, attn.paged_prefill_attention
    monkeypatch.setattr(
        attn, "paged_decode_attention", lambda *a, **k: decode_kw.append(k) or real_dec(*a, **k)
    )
    monkeypatch.setattr(
        attn, "paged_prefill_attention", lambda *a, **k: prefill_kw.append(k) or real_pre(*a, **k)
    )
    pec = dataclasses.replace(ec, kernels="pallas", interpret=True)
    assert pec.decode_qk_int8 is None and pec.resolved_decode_qk_int8
    eng = LLMEngine.build(cfg, params, pec, progress=False)
    assert eng.runner.model.attention.decode_qk_int8
    assert decode_kw and all(k.get("qk_int8") is True for k in decode_kw)
    assert not any(k.get("qk_int8") for k in prefill_kw)
    assert_follows([g["token_ids"] for g in eng.generate(ps, sp)], want)


def test_bench_attention_nibbles_study_runs(monkeypatch, tmp_path):
    """`bench_attention.py --nibbles-study` at a tiny engine shape (interpret mode): every
    format's error against the reference within 1e-2 for random q (one-part int8 q larger
    with outlier channels, as measured; two parts as small as f16), every variant timed."""
    bench = tiny_bench_attention(monkeypatch, tmp_path, "nibbles", "nibbles_decode")
    monkeypatch.setattr(bench, "STAGES_DECODE", ((2, 256),))
    bench.nibbles_study(jax.random.key(0))
    [row] = bench.RESULTS["nibbles"]
    assert "error" not in row, row.get("error")
    for tag in bench.NIBBLE_VARIANTS:
        assert row[f"{tag}_normal_finite"] and row[f"{tag}_outliers_finite"]
        assert 0 < row[f"{tag}_normal_rel_l2"] < 1e-2
        assert row[f"{tag}_over_bf16"] == 1.0  # the stubbed timer: every variant ran
    # one int8 part loses q's small channels to the outliers' scale; the residual part
    # brings the error back to the f16 format's
    assert row["int8_f16_outliers_rel_l2"] > 5 * row["f16_outliers_rel_l2"]
    assert row["int8x2_f16_outliers_rel_l2"] < 1.2 * row["f16_outliers_rel_l2"]
    [dec] = bench.RESULTS["nibbles_decode"]
    assert all(len(dec[f"{tag}_us"]) == 2 for tag in bench.NIBBLE_VARIANTS)
