"""FMPQ permutation / block assignment and the permutation folds.

Float comparisons use f64 numpy (exact up to ~1e-12) or f32 jnp with rtol 1e-5: a permutation
changes only the summation order.
"""

import dataclasses

import jax
import numpy as np
import pytest

from comet_jax.quant import fmpq
from comet_jax.quant.fmpq import FMPQConfig, FMPQPlan


def _stats(rng, k, outliers=(), scale=50.0):
    max_abs = 1.0 + rng.random(k)
    max_abs[list(outliers)] *= scale
    return max_abs


def _is_perm(p, k):
    return np.array_equal(np.sort(np.asarray(p)), np.arange(k))


def test_threshold_gathers_outliers_last():
    rng = np.random.default_rng(0)
    outl = [3, 77, 150, 200, 255]
    max_abs = _stats(rng, 256, outl)
    plan = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64))
    assert _is_perm(plan.perm, 256) and plan.perm.dtype == np.int32
    assert (plan.n_int8_blocks, plan.k4, plan.k8, plan.n_blocks) == (1, 192, 64, 4)
    int8_chs = set(plan.perm[plan.k4 :].tolist())
    assert set(outl) <= int8_chs
    # The block is filled with the next-largest channels: the top 64 by max_abs.
    assert int8_chs == set(np.argsort(-max_abs)[:64].tolist())
    # Ascending order: the largest channel is the last one, INT4 part sorted too.
    assert np.all(np.diff(max_abs[plan.perm]) >= 0)
    assert fmpq.int8_fraction(plan) == 0.25
    assert np.array_equal(plan.int8_block_mask, [False, False, False, True])
    assert np.array_equal(plan.perm[plan.inv_perm], np.arange(256))


def test_threshold_block_count_and_clamps():
    rng = np.random.default_rng(1)
    max_abs = _stats(rng, 512, range(0, 140, 2))  # 70 outliers
    assert fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64)).n_int8_blocks == 2
    assert fmpq.plan_permutation(max_abs, FMPQConfig(block_size=128)).n_int8_blocks == 1
    capped = FMPQConfig(block_size=64, max_int8_blocks=1)
    assert fmpq.plan_permutation(max_abs, capped).n_int8_blocks == 1
    no_outliers = _stats(rng, 512)
    assert fmpq.plan_permutation(no_outliers, FMPQConfig(block_size=64)).n_int8_blocks == 0
    floor = FMPQConfig(block_size=64, min_int8_blocks=3)
    assert fmpq.plan_permutation(no_outliers, floor).n_int8_blocks == 3


def test_all_channels_outliers():
    max_abs = np.ones(128) + np.random.default_rng(2).random(128) * 1e-3
    plan = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64, threshold=0.5))
    assert plan.n_int8_blocks == 2 and plan.k4 == 0 and fmpq.int8_fraction(plan) == 1.0


@pytest.mark.parametrize(
    "cfg, n8",
    [
        (FMPQConfig(block_size=64, rule="budget", int8_budget=0.0), 0),
        (FMPQConfig(block_size=64, rule="budget", int8_budget=1.0), 8),
        (FMPQConfig(block_size=64, rule="budget", int8_budget=0.25), 2),
        (FMPQConfig(block_size=64, rule="budget", int8_budget=0.06), 0),  # 0.48 -> 0
        (FMPQConfig(block_size=64, rule="budget", int8_budget=0.07), 1),  # 0.56 -> 1
        (FMPQConfig(block_size=64, rule="budget", int8_blocks=3), 3),
        (FMPQConfig(block_size=64, rule="budget", int8_blocks=99), 8),
    ],
)
def test_budget_rule(cfg, n8):
    rng = np.random.default_rng(3)
    max_abs = _stats(rng, 512, [5])
    plan = fmpq.plan_permutation(max_abs, cfg)
    assert plan.n_int8_blocks == n8 and _is_perm(plan.perm, 512)
    if n8:
        assert plan.perm[-1] == 5


def test_score_orders_but_outliers_stay_int8():
    rng = np.random.default_rng(4)
    max_abs = _stats(rng, 128, [10])
    score = rng.random(128)
    score[10] = 0.0  # the outlier has the lowest score: it still must be INT8
    plan = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64), score=score)
    assert plan.n_int8_blocks == 1 and 10 in plan.perm[64:]
    rest = [c for c in plan.perm[64:] if c != 10]
    assert set(rest) == set(np.argsort(-np.where(np.arange(128) == 10, -1, score))[:63])
    mean_cfg = FMPQConfig(block_size=64, rule="budget", int8_blocks=1, order_by="mean")
    mean_abs = rng.random(128)
    p = fmpq.plan_permutation(max_abs, mean_cfg, mean_abs=mean_abs)
    assert p.perm[-1] == np.argmax(mean_abs)


def test_segment_order_original_keeps_sets():
    rng = np.random.default_rng(5)
    max_abs = _stats(rng, 256, [1, 100])
    a = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64))
    b = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=64, segment_order="original"))
    assert set(a.perm[192:]) == set(b.perm[192:])
    assert np.all(np.diff(b.perm[:192]) > 0) and np.all(np.diff(b.perm[192:]) > 0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="K=200"):
        fmpq.plan_permutation(np.ones(200), FMPQConfig(block_size=64))
    with pytest.raises(ValueError, match="block_size"):
        FMPQConfig(block_size=0)
    with pytest.raises(ValueError, match="int8_budget"):
        FMPQConfig(int8_budget=1.5)
    with pytest.raises(ValueError, match="rule"):
        FMPQConfig(rule="magic")
    with pytest.raises(ValueError, match="max_abs"):
        fmpq.plan_permutation(np.ones((2, 64)), FMPQConfig(block_size=64))
    with pytest.raises(ValueError, match="mean_abs"):
        fmpq.plan_permutation(np.ones(64), FMPQConfig(block_size=64, order_by="mean"))
    with pytest.raises(ValueError, match="score"):
        fmpq.plan_permutation(np.ones(64), FMPQConfig(block_size=64), score=np.ones(32))
    with pytest.raises(ValueError, match="permute_in"):
        fmpq.permute_in(np.ones((4, 32)), FMPQPlan.identity(64, 64))


def test_plan_is_a_pytree():
    plan = fmpq.plan_permutation(_stats(np.random.default_rng(6), 128, [7]), FMPQConfig(64))
    leaves, tree = jax.tree_util.tree_flatten(plan)
    assert len(leaves) == 1
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.n_int8_blocks == plan.n_int8_blocks and np.array_equal(back.perm, plan.perm)
    x = np.random.default_rng(7).standard_normal((3, 128)).astype(np.float32)
    y = jax.jit(fmpq.permute_activation)(x, plan)
    np.testing.assert_array_equal(np.asarray(y), x[:, plan.perm])


def test_permute_in_preserves_matmul_and_hessian():
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((5, 128)), rng.standard_normal((6, 128))
    plan = fmpq.plan_permutation(np.abs(x).max(0), FMPQConfig(block_size=64, threshold=1.2))
    xp, wp = fmpq.permute_activation(x, plan), fmpq.permute_in(w, plan)
    np.testing.assert_allclose(xp @ wp.T, x @ w.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fmpq.permute_hessian(x.T @ x, plan), xp.T @ xp, atol=1e-12)


def _silu(z):
    return z / (1 + np.exp(-z))


def test_fold_mlp():
    rng = np.random.default_rng(9)
    d, f = 32, 128
    x = rng.standard_normal((4, d))
    wg, wu, wd = (
        rng.standard_normal((f, d)),
        rng.standard_normal((f, d)),
        rng.standard_normal((d, f)),
    )
    y = (_silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    h = _silu(x @ wg.T) * (x @ wu.T)
    plan = fmpq.plan_permutation(np.abs(h).max(0), FMPQConfig(block_size=64, rule="budget"))
    wg2, wu2 = fmpq.fold_out(wg, plan), fmpq.fold_out(wu, plan)
    wd2 = fmpq.permute_in(wd, plan)
    h2 = _silu(x @ wg2.T) * (x @ wu2.T)
    np.testing.assert_allclose(h2, h[:, plan.perm], atol=1e-12)  # already in the FMPQ layout
    np.testing.assert_allclose(h2 @ wd2.T, y, rtol=1e-10, atol=1e-10)


def _attention(x, wq, wk, wv, bq, bv, n_heads, n_kv, d):
    """Causal GQA attention (no RoPE: head moves commute with it) -> o_proj input [T, Hq*D]."""
    t = x.shape[0]
    q = (x @ wq.T + bq).reshape(t, n_heads, d)
    k = (x @ wk.T).reshape(t, n_kv, d)
    v = (x @ wv.T + bv).reshape(t, n_kv, d)
    rep = n_heads // n_kv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(t, n_heads * d)


@pytest.mark.parametrize("n_heads, n_kv, d, block", [(4, 2, 16, 16), (4, 4, 32, 16), (8, 2, 8, 16)])
def test_fold_attention(n_heads, n_kv, d, block):
    rng = np.random.default_rng(10)
    dm, t = 24, 6
    x = rng.standard_normal((t, dm))
    wq, wk = rng.standard_normal((n_heads * d, dm)), rng.standard_normal((n_kv * d, dm))
    wv = rng.standard_normal((n_kv * d, dm))
    bq, bv = rng.standard_normal(n_heads * d), rng.standard_normal(n_kv * d)
    wo = rng.standard_normal((dm, n_heads * d))
    attn = _attention(x, wq, wk, wv, bq, bv, n_heads, n_kv, d)
    y = attn @ wo.T
    max_abs = 1.0 + rng.random(n_heads * d)
    max_abs[[3, n_heads * d - 5, d + 1]] *= 40
    cfg = FMPQConfig(block_size=block)
    plan = fmpq.plan_attention_out(max_abs, cfg, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d)
    assert _is_perm(plan.perm, n_heads * d)
    assert {3, n_heads * d - 5, d + 1} <= set(plan.perm[plan.k4 :].tolist())
    fold = fmpq.attention_fold(plan, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d)
    assert fold is not None
    attn2 = _attention(
        x,
        fmpq.fold_out(wq, fold.q_rows),
        fmpq.fold_out(wk, fold.k_rows),
        fmpq.fold_out(wv, fold.v_rows),
        fmpq.fold_out(bq, fold.q_rows),
        fmpq.fold_out(bv, fold.v_rows),
        n_heads,
        n_kv,
        d,
    )
    np.testing.assert_allclose(attn2, attn[:, plan.perm], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(attn2 @ fmpq.permute_in(wo, plan).T, y, rtol=1e-10, atol=1e-10)


def test_attention_fold_rejects_free_perm_and_runtime_fallback():
    rng = np.random.default_rng(11)
    n_heads, n_kv, d = 4, 2, 16
    max_abs = _stats(rng, 64, [3, 40])
    plan = fmpq.plan_permutation(max_abs, FMPQConfig(block_size=16))
    assert fmpq.attention_fold(plan, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d) is None
    # Within-head orders differing between the q heads of one KV group cannot fold either.
    perm = np.arange(64)
    perm[0:2] = [1, 0]
    assert fmpq.attention_fold(perm, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d) is None
    perm[16:18] = [17, 16]  # same swap in the group's second q head: folds into v only
    fold = fmpq.attention_fold(perm, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d)
    assert fold is not None and not fold.moves_heads
    assert np.array_equal(fold.v_rows[:2], [1, 0])
    # Fallback: run-time gather of the o_proj input with the permuted o_proj weight.
    attn, wo = rng.standard_normal((3, 64)), rng.standard_normal((8, 64))
    y = fmpq.permute_activation(attn, plan) @ fmpq.permute_in(wo, plan).T
    np.testing.assert_allclose(y, attn @ wo.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="n_heads"):
        fmpq.attention_fold(perm, n_heads=3, n_kv_heads=2, head_dim=16)


# ---- K padded to whole blocks (FMPQConfig.pad_k) -------------------------------------------


def _padded_invariants(plan, k_in, block):
    """Zeros first (perm[:pad] == arange(pad)), in INT4, and perm a permutation of Kp."""
    kp = -(-k_in // block) * block
    assert (plan.k, plan.pad, plan.k_in) == (kp, kp - k_in, k_in)
    assert _is_perm(plan.perm, kp) and plan.perm.dtype == np.int32
    assert np.array_equal(plan.perm[: plan.pad], np.arange(plan.pad))
    assert plan.k4 >= plan.pad and np.all(plan.perm[plan.k4 :] >= plan.pad)  # never INT8
    assert np.array_equal(plan.real_perm, plan.perm[plan.pad :] - plan.pad)


@pytest.mark.parametrize(
    "cfg",
    [
        FMPQConfig(block_size=128, rule="budget", int8_budget=0.25, pad_k=True),
        FMPQConfig(block_size=128, rule="threshold", threshold=8.0, pad_k=True),
        FMPQConfig(block_size=128, rule="threshold", pad_k=True, segment_order="original"),
        FMPQConfig(block_size=128, rule="budget", int8_budget=1.0, pad_k=True),
        FMPQConfig(block_size=128, rule="budget", int8_blocks=5, pad_k=True),  # capped at 4
    ],
)
def test_padded_plan_576_to_640(cfg):
    rng = np.random.default_rng(20)
    outl = [3, 100, 575]
    max_abs = _stats(rng, 576, outl)
    plan = fmpq.plan_permutation(max_abs, cfg)
    _padded_invariants(plan, 576, 128)
    assert plan.n_blocks == 5 and plan.n_int8_blocks <= 4  # floor(576 / 128)
    if plan.n_int8_blocks:
        assert {c + 64 for c in outl} <= set(plan.perm[plan.k4 :].tolist())
    # The same channels and order as the unpadded plan of a block that divides 576 when the
    # INT8 channel counts agree (the ranking does not depend on the block size).
    if cfg.rule == "budget" and cfg.int8_budget == 0.25 and cfg.int8_blocks is None:
        assert plan.n_int8_blocks == 1  # floor(0.25 * 4.5 + 0.5): real blocks, not 5
        ref = fmpq.plan_permutation(max_abs, dataclasses.replace(cfg, block_size=64))
        assert ref.k8 == plan.k8 == 128
        np.testing.assert_array_equal(plan.real_perm, ref.perm)
        assert fmpq.int8_fraction(plan) == fmpq.int8_fraction(ref) == 128 / 576


def test_padded_threshold_median_ignores_zeros_and_cap():
    rng = np.random.default_rng(21)
    max_abs = _stats(rng, 200, [7])
    cfg = FMPQConfig(block_size=128, threshold=8.0, pad_k=True)
    plan = fmpq.plan_permutation(max_abs, cfg)
    # Median over the 200 real channels (~1.5): only channel 7 is an outlier.
    assert plan.n_int8_blocks == 1 and 7 + plan.pad in plan.perm[plan.k4 :]
    # Every channel an outlier: 2 blocks wanted, capped at floor(200 / 128) = 1.
    every = fmpq.plan_permutation(np.ones(200), dataclasses.replace(cfg, threshold=0.5))
    assert every.n_int8_blocks == 1
    _padded_invariants(every, 200, 128)
    # A multiple of the block is not padded at all.
    assert fmpq.plan_permutation(_stats(rng, 1536, [9]), cfg).pad == 0
    with pytest.raises(ValueError, match=r"K=576 .*pad_k=True"):
        fmpq.plan_permutation(np.ones(576), FMPQConfig(block_size=128))


def test_padded_identity_plans():
    p4 = FMPQPlan.identity(576, 128, 0, pad_k=True)
    assert (p4.k, p4.pad, p4.k4) == (640, 64, 640)
    p8 = FMPQPlan.identity(576, 128, 5, pad_k=True)  # uniform INT8: no INT4 segment at all
    assert p8.k4 == 0 and p8.pad == 64
    with pytest.raises(ValueError, match="n_int8_blocks"):
        FMPQPlan.identity(576, 128, 6, pad_k=True)
    with pytest.raises(ValueError, match="pad_k"):
        FMPQPlan.identity(576, 128)


def test_padded_permutes_are_zero_channels_and_exact():
    rng = np.random.default_rng(22)
    k = 576
    x, w = rng.standard_normal((5, k)), rng.standard_normal((6, k))
    plan = fmpq.plan_permutation(np.abs(x).max(0), FMPQConfig(128, rule="budget", pad_k=True))
    xp, wp = fmpq.permute_activation(x, plan), fmpq.permute_in(w, plan)
    assert xp.shape == (5, 640) and wp.shape == (6, 640)
    zeros = plan.perm < plan.pad
    assert np.all(xp[:, zeros] == 0) and np.all(wp[:, zeros] == 0)
    np.testing.assert_array_equal(xp[:, ~zeros], x[:, plan.real_perm])
    np.testing.assert_allclose(xp @ wp.T, x @ w.T, rtol=1e-12, atol=1e-12)
    # jnp operands pad the same way (under jit too).
    yj = jax.jit(fmpq.permute_activation)(x.astype(np.float32), plan)
    np.testing.assert_array_equal(np.asarray(yj), xp.astype(np.float32))
    # Hessian: zero coupling, mean(diag) on the padded diagonal, real block = permuted H.
    h = x.T @ x
    hp = fmpq.permute_hessian(h, plan)
    real = np.nonzero(~zeros)[0]
    np.testing.assert_allclose(hp[np.ix_(real, real)], h[np.ix_(plan.real_perm, plan.real_perm)])
    pads = np.nonzero(zeros)[0]
    np.testing.assert_allclose(np.diag(hp)[pads], np.mean(np.diag(h)))
    off = hp[pads].copy()
    off[np.arange(len(pads)), pads] = 0
    assert np.all(off == 0)
    assert np.mean(np.diag(hp)) == pytest.approx(np.mean(np.diag(h)), rel=1e-12)
    hj = fmpq.permute_hessian(jax.numpy.asarray(h, np.float32), plan)
    np.testing.assert_allclose(np.asarray(hj), hp, rtol=1e-6)


def test_padded_folds_use_real_perm():
    rng = np.random.default_rng(23)
    d, f = 32, 320  # down_proj input 320 = 2.5 x 128
    x = rng.standard_normal((4, d))
    wg, wu, wd = (rng.standard_normal(s) for s in ((f, d), (f, d), (d, f)))
    h = _silu(x @ wg.T) * (x @ wu.T)
    plan = fmpq.plan_permutation(np.abs(h).max(0), FMPQConfig(128, rule="budget", pad_k=True))
    assert plan.pad == 64
    h2 = _silu(x @ fmpq.fold_out(wg, plan).T) * (x @ fmpq.fold_out(wu, plan).T)  # [4, 320]
    # The consumer only prepends the zeros: equal to the gathered padded activation.
    np.testing.assert_allclose(fmpq.pad_channels(h2, plan.pad), fmpq.permute_activation(h, plan))
    y = h @ wd.T
    np.testing.assert_allclose(
        fmpq.pad_channels(h2, plan.pad) @ fmpq.permute_in(wd, plan).T, y, rtol=1e-10, atol=1e-10
    )
    # Attention: a padded head-structured plan still folds (o_in of 9 heads x 64 = 576).
    n_heads, n_kv, hd = 9, 3, 64
    max_abs = _stats(rng, n_heads * hd, [5, 300])
    cfg = FMPQConfig(block_size=128, rule="threshold", pad_k=True)
    pa = fmpq.plan_attention_out(max_abs, cfg, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd)
    _padded_invariants(pa, 576, 128)
    assert {5 + 64, 300 + 64} <= set(pa.perm[pa.k4 :].tolist())
    fold = fmpq.attention_fold(pa, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd)
    assert fold is not None
    # A padded plan whose zeros are not first cannot fold.
    bad = FMPQPlan(np.roll(pa.perm, 1), pa.n_int8_blocks, 128, 640, 64)
    assert bad.real_perm is None
    with pytest.raises(ValueError, match="cannot be folded"):
        fmpq.fold_out(wg, bad)
