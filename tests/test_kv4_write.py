"""The KV4 write kernel (pallas_kernels/kv4_write.py) against its XLA reference.

Contract: the same bytes, scales and zero points as `kv4_write_reference` (quantize_kv +
scatters), bit for bit, in interpret mode on the CPU; tokens with slot -1 or a slot past the
pool write nothing, and every other pool entry keeps its previous content.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache as kc
from pallas_kernels import kv4_write as W


def _filled_pool(cfg, rng):
    """A pool with random (non-zero) content, so untouched entries are checked too."""
    kv = kc.init_cache(cfg).pages()

    def fill(x):
        if x.dtype == jnp.uint8:
            return jnp.asarray(rng.integers(0, 256, x.shape), x.dtype)
        return jnp.asarray(rng.uniform(0.1, 2.0, x.shape), x.dtype)

    return W.PagedKV(*(fill(x) for x in kv))


@pytest.mark.parametrize(
    "layers,pages,hkv,page,head_dim,group,dtype",
    [
        (2, 6, 2, 16, 64, 64, jnp.bfloat16),
        (3, 5, 3, 32, 128, 32, jnp.bfloat16),  # Hkv = 3 (the default model's), 4 groups
        (1, 4, 8, 16, 128, 128, jnp.float32),
    ],
)
def test_kernel_matches_reference_bit_for_bit(layers, pages, hkv, page, head_dim, group, dtype):
    rng = np.random.default_rng(0)
    cfg = kc.KVCacheConfig(layers, hkv, head_dim, page, pages, group, "int4")
    kv = _filled_pool(cfg, rng)
    n = 11
    k = rng.standard_normal((n, hkv, head_dim)) * rng.uniform(0.1, 5.0, (n, hkv, 1))
    k[0] = 0.0  # all-zero group: scale 1, zero 0
    k[1] = np.abs(k[1])  # all positive: lo = 0
    k[2] = -np.abs(k[2])  # all negative: hi = 0
    k, v = jnp.asarray(k, dtype), jnp.asarray(rng.standard_normal((n, hkv, head_dim)), dtype)
    slots = rng.permutation(pages * page)[:n].astype(np.int32)
    slots[3] = -1  # padding
    slots[5] = pages * page + 7  # past the pool: dropped
    for layer in (0, layers - 1):
        want = W.kv4_write_reference(kv, layer, k, v, jnp.asarray(slots))
        fn = jax.jit(
            lambda kv, k, v, s, layer=layer: W.kv4_write(kv, layer, k, v, s, interpret=True)
        )
        got = fn(kv, k, v, jnp.asarray(slots))
        for name, a, b in zip(W.PagedKV._fields, got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        # the reference really wrote the tokens (the comparison is not between two no-ops)
        assert not np.array_equal(np.asarray(want.k), np.asarray(kv.k))


@pytest.mark.parametrize("hkv,head_dim,group", [(2, 64, 64), (3, 128, 32), (1, 128, 128)])
def test_run_kernel_matches_reference_bit_for_bit(monkeypatch, hkv, head_dim, group):
    """run=8: programs of 8 tokens. Whole rows where the 8 slots are consecutive from an
    8-aligned page offset (a prefill chunk); token by token where they are not: a run
    crossing into another page, an unaligned start, padding (-1), a slot past the pool,
    random slots. Same bytes as the reference, untouched entries kept."""
    rng = np.random.default_rng(2)
    layers, pages, page = 2, 12, 16
    cfg = kc.KVCacheConfig(layers, hkv, head_dim, page, pages, group, "int4")
    kv = _filled_pool(cfg, rng)
    runs = [
        np.arange(3 * page, 3 * page + 8),  # whole run: page 3, offset 0
        np.arange(5 * page + 8, 5 * page + 16),  # whole run: page 5, offset 8
        np.arange(7 * page + 4, 7 * page + 12),  # unaligned start
        np.concatenate(
            [np.arange(9 * page + 12, 9 * page + 16), np.arange(2 * page, 2 * page + 4)]
        ),
        np.array([page * 10, page * 10 + 1, -1, -1, -1, -1, -1, -1]),  # chunk end: padding
        np.array(
            [4 * page + k for k in (0, 1, 2, 3, 4, 5, 6)] + [pages * page + 3]
        ),  # past the pool
        rng.permutation(np.arange(page, 2 * page))[:8],  # scattered
        np.full(8, -1),  # all padding
    ]
    slots = np.concatenate(runs).astype(np.int32)
    n = slots.size
    k = rng.standard_normal((n, hkv, head_dim)) * rng.uniform(0.1, 5.0, (n, hkv, 1))
    k[0] = 0.0  # all-zero group inside a whole run
    k[9] = np.abs(k[9])
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(rng.standard_normal(k.shape), jnp.bfloat16)
    for layer in (0, layers - 1):
        want = W.kv4_write_reference(kv, layer, k, v, jnp.asarray(slots))
        fn = jax.jit(
            lambda kv, k, v, s, layer=layer: W.kv4_write(kv, layer, k, v, s, interpret=True, run=8)
        )
        got = fn(kv, k, v, jnp.asarray(slots))
        for name, a, b in zip(W.PagedKV._fields, got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # Which runs took the whole-row path: with the per-token path disabled, exactly the
    # first two runs are written (the others keep the pool's previous content).
    only_whole = slots.copy()
    only_whole[16:] = -1
    want = W.kv4_write_reference(kv, 0, k, v, jnp.asarray(only_whole))
    with monkeypatch.context() as m:
        m.setattr(W, "_store_token", lambda *a, **kw: None)
        got = W.kv4_write(kv, 0, k, v, jnp.asarray(slots), interpret=True, run=8)
    for name, a, b in zip(W.PagedKV._fields, got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    with pytest.raises(ValueError, match="run=8"):  # 9 tokens: not whole runs
        W.kv4_write(kv, 0, k[:9], v[:9], jnp.asarray(slots[:9]), interpret=True, run=8)
    with pytest.raises(ValueError, match="run=32"):  # longer than a page
        W.kv4_write(kv, 0, k[:32], v[:32], jnp.asarray(slots[:32]), interpret=True, run=32)


def test_write_kv_kernel_flag_and_traced_layer():
    """kv_cache.write_kv(kernel=True) under jit with a traced layer and [B, T] inputs (the
    engine's call) equals kernel=False; bf16 caches ignore the flag."""
    rng = np.random.default_rng(1)
    cfg = kc.KVCacheConfig(2, 2, 64, 16, 8, 64, "int4")
    cache = kc.init_cache(cfg)
    k = jnp.asarray(rng.standard_normal((2, 5, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 5, 2, 64)), jnp.float32)
    slots = jnp.asarray(np.array([[0, 1, 2, -1, -1], [40, 41, 42, 43, 44]], np.int32))

    @jax.jit
    def both(cache, layer):
        a = kc.write_kv(cache, layer, k, v, slots, kernel=True, interpret=True)
        b = kc.write_kv(cache, layer, k, v, slots)
        return a, b

    a, b = both(cache, jnp.int32(1))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a [B, T] chunk of T = PREFILL_WRITE_RUN: the run kernel (row 0 one whole page, row 1
    # split across two pages and ending in padding)
    t = kc.PREFILL_WRITE_RUN
    k16 = jnp.asarray(rng.standard_normal((2, t, 2, 64)), jnp.float32)
    v16 = jnp.asarray(rng.standard_normal((2, t, 2, 64)), jnp.float32)
    row1 = np.concatenate([np.arange(88, 96), np.arange(16, 20), np.full(t - 12, -1)])
    s16 = jnp.asarray(np.stack([np.arange(32, 32 + t), row1]).astype(np.int32))
    run = jax.jit(lambda c: kc.write_kv(c, 0, k16, v16, s16, kernel=True, interpret=True))(cache)
    ref = kc.write_kv(cache, 0, k16, v16, s16)
    for x, y in zip(jax.tree_util.tree_leaves(run), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    bf = kc.init_cache(kc.KVCacheConfig(1, 2, 64, 16, 8, 64, "bf16"))
    out = kc.write_kv(bf, 0, k, v, slots, kernel=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(out.k), np.asarray(kc.write_kv(bf, 0, k, v, slots).k))


def test_bad_inputs():
    cfg = kc.KVCacheConfig(1, 2, 64, 16, 4, 64, "int4")
    kv = kc.init_cache(cfg).pages()
    k = jnp.ones((3, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="slots must be int32"):
        W.kv4_write(kv, 0, k, k, jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match="k_new must be float"):
        W.kv4_write(kv, 0, jnp.ones((3, 2, 32)), k, jnp.zeros((3,), jnp.int32))
    bf = kc.init_cache(kc.KVCacheConfig(1, 2, 64, 16, 4, 64, "bf16")).pages()
    with pytest.raises(ValueError, match="INT4 cache"):
        W.kv4_write(bf, 0, k, k, jnp.zeros((3,), jnp.int32))
