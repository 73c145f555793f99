"""Paged KV cache: config, capacity, write/read roundtrip (int4 and bf16), padding, jit.

Roundtrips are exact: what read_kv returns must equal dequantize(quantize(x)) bit for bit
(INT4) or x itself (bf16 mode), at every written slot, and skipped slots must stay untouched.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache as kc
from comet_jax.quant import kv_quant


def _setup(dtype, page=16, group=64, d=64, hkv=2, b=3, max_pages=4, seed=0):
    rng = np.random.default_rng(seed)
    cfg = kc.KVCacheConfig(2, hkv, d, page, 24, group, dtype)
    table = rng.permutation(24)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    lens = np.array([1, page + 5, max_pages * page - 3][:b], np.int32)
    s = max_pages * page
    pos = np.broadcast_to(np.arange(s), (b, s))
    slots = kc.slot_mapping_from_positions(table, pos, page, pos < lens[:, None])
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    return cfg, table, lens, slots, k, v


def test_config_validation_and_capacity():
    cfg = kc.KVCacheConfig(num_layers=32, num_kv_heads=8, head_dim=128, page_size=64)
    bf = kc.KVCacheConfig(32, 8, 128, 64, dtype="bf16")
    assert cfg.bytes_per_token == 32 * 2 * 8 * 68  # 64 packed + 2 x f16 (scale, zero)
    assert bf.bytes_per_token == 32 * 2 * 8 * 256
    assert bf.bytes_per_token / cfg.bytes_per_token == pytest.approx(3.76, abs=0.01)
    assert cfg.pages_for_budget(2**30) == 2**30 // (cfg.bytes_per_token * 64)
    for bad, match in [
        (dict(page_size=24), "page_size"),
        (dict(dtype="fp8"), "dtype"),
        (dict(group_size=48), "group_size"),
        (dict(num_pages=0), "num_pages"),
    ]:
        with pytest.raises(ValueError, match=match):
            kc.KVCacheConfig(2, 2, 64, **{"page_size": 16, **bad})


@pytest.mark.parametrize("dtype,window", [("bf16", 0), ("int4", 0), ("int4", 4)])
def test_init_cache_leaves_are_distinct_buffers(dtype, window):
    """Every leaf of a new pool owns its buffer, so a jitted step can donate the whole cache
    and the engine needs no per-leaf copy (which doubled the pool's peak memory at start-up)."""
    cfg = kc.KVCacheConfig(2, 2, 64, 16, 24, 64, dtype, recent_window=window, window_slots=3)
    leaves = jax.tree_util.tree_leaves(kc.init_cache(cfg))
    assert len(leaves) == (6 if dtype == "int4" else 2) + (2 if window else 0)
    pointers = [x.unsafe_buffer_pointer() for x in leaves]
    assert len(set(pointers)) == len(leaves)
    assert all(not np.asarray(x).any() for x in leaves)


@pytest.mark.parametrize("dtype", ["int4", "bf16"])
def test_write_read_roundtrip(dtype):
    cfg, table, lens, slots, k, v = _setup(dtype)
    cache = kc.init_cache(cfg)
    assert cache.nbytes == 2 * (cfg.bytes_per_token // 2) * 24 * 16
    cache = jax.jit(kc.write_kv, donate_argnums=0)(cache, jnp.int32(1), k, v, slots)
    kr, vr = kc.read_kv(cache, 1, table)
    for x, xr in ((k, kr), (v, vr)):
        want = x.astype(jnp.float32)
        if dtype == "int4":
            want = kv_quant.dequantize_kv(*kv_quant.quantize_kv(x, cfg.group_size), group_size=64)
        for b, n in enumerate(lens):
            np.testing.assert_array_equal(np.asarray(xr[b, :n]), np.asarray(want[b, :n]))
    # Layer 0 was never written; padding slots (-1) left the rest of the pool untouched.
    assert not np.asarray(cache.k[0]).any()
    n_written = int((np.asarray(slots) >= 0).sum())
    touched = np.asarray(cache.k[1]).reshape(24 * 2, 16, -1).any(axis=-1).sum() // 2
    assert touched <= n_written


def test_decode_write_one_token():
    cfg, table, lens, slots, k, v = _setup("int4", page=32, group=32)
    write = jax.jit(kc.write_kv)
    cache = write(kc.init_cache(cfg), 0, k, v, slots)
    new_k = jnp.asarray(np.random.default_rng(5).standard_normal((3, 2, 64)), jnp.float32)
    pos = lens[:, None]  # next position of each sequence
    slot = kc.slot_mapping_from_positions(table, pos, 32)[:, 0]
    cache = write(cache, 0, new_k, new_k, slot)
    kr, _ = jax.jit(kc.read_kv)(cache, 0, table)
    want = kv_quant.dequantize_kv(*kv_quant.quantize_kv(new_k, 32), group_size=32)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(kr[b, lens[b]]), np.asarray(want[b]))


def test_write_bad_arguments():
    cfg, table, lens, slots, k, v = _setup("int4")
    cache = kc.init_cache(cfg)
    with pytest.raises(ValueError, match="k_new"):
        kc.write_kv(cache, 0, k[..., :32], v, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kc.write_kv(cache, 0, k, v, np.asarray(slots, np.float32))
    with pytest.raises(ValueError, match="mode"):
        kc.paged_attention(k, k, v, cache, 0, table, lens, slots, mode="encode")


def test_chunked_prefill_then_decode_matches_reference():
    """Two prefill chunks and one decode step through paged_attention (kernel, interpret)."""
    from pallas_kernels import kv4_attention as attn

    rng = np.random.default_rng(3)
    cfg = kc.KVCacheConfig(1, 2, 64, 16, 16, 64, "int4")
    b, hq, t = 2, 4, 20
    table = np.arange(2 * 8, dtype=np.int32).reshape(2, 8)[:, ::-1].copy()
    cache = kc.init_cache(cfg)
    seen = np.zeros(b, np.int32)
    # Whole-step jit, as in the engine (interpret-mode kernels then compile once).
    prefill = jax.jit(functools.partial(kc.paged_attention, mode="prefill", interpret=True))
    decode = jax.jit(functools.partial(kc.paged_attention, interpret=True))
    decode_ref = jax.jit(functools.partial(kc.paged_attention, backend="reference"))
    for q_lens in (np.array([20, 7], np.int32), np.array([13, 20], np.int32)):
        q = jnp.asarray(rng.standard_normal((b, t, hq, 64)), jnp.bfloat16)
        kn = jnp.asarray(rng.standard_normal((b, t, 2, 64)), jnp.bfloat16)
        pos = seen[:, None] + np.arange(t)
        slots = kc.slot_mapping_from_positions(table, pos, 16, np.arange(t) < q_lens[:, None])
        seen = seen + q_lens
        out, cache = prefill(q, kn, kn, cache, 0, table, seen, slots, q_lens=q_lens)
        ref = jax.jit(attn.paged_prefill_attention_reference)(q, cache.pages(), table, seen, q_lens)
        err = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
        assert err < 1e-2
    q = jnp.asarray(rng.standard_normal((b, hq, 64)), jnp.bfloat16)
    kn = jnp.asarray(rng.standard_normal((b, 2, 64)), jnp.bfloat16)
    slot = kc.slot_mapping_from_positions(table, seen[:, None], 16)[:, 0]
    out, cache = decode(q, kn, kn, cache, 0, table, seen + 1, slot)
    ref, _ = decode_ref(q, kn, kn, cache, 0, table, seen + 1, slot)
    assert jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref) < 1e-2
