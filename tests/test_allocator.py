"""Block allocator and KV capacity planning (pure Python, exact)."""

import dataclasses

import numpy as np
import pytest

from comet_jax.engine.allocator import (
    SCRATCH_PAGE,
    BlockAllocator,
    OutOfPagesError,
    pages_for,
    plan_num_pages,
)
from comet_jax.engine.kv_cache import KVCacheConfig


def test_allocate_free_roundtrip_never_hands_out_scratch():
    rng = np.random.default_rng(0)
    alloc = BlockAllocator(33)
    assert alloc.capacity == 32 and alloc.num_free == 32
    owners = [object() for _ in range(5)]
    held = {o: [] for o in owners}
    for _ in range(300):
        o = owners[rng.integers(len(owners))]
        if held[o] and rng.random() < 0.5:
            alloc.free(held[o], o)
            held[o] = []
        else:
            n = int(rng.integers(0, 6))
            if alloc.can_allocate(n):
                held[o] += alloc.allocate(n, o)
            else:
                with pytest.raises(OutOfPagesError):
                    alloc.allocate(n, o)
        all_pages = [p for ps in held.values() for p in ps]
        assert len(all_pages) == len(set(all_pages)) == alloc.num_used
        assert SCRATCH_PAGE not in all_pages
        assert alloc.num_used + alloc.num_free == alloc.capacity
    for o in owners:
        alloc.free(held[o], o)
    assert alloc.num_used == 0 and alloc.num_free == 32


def test_free_checks_ownership():
    alloc = BlockAllocator(4)
    a, b = object(), object()
    pages = alloc.allocate(2, a)
    with pytest.raises(ValueError, match="not owned"):
        alloc.free(pages, b)
    alloc.free(pages, a)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages, a)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_pages"):
        BlockAllocator(1)
    with pytest.raises(ValueError, match="n=-1"):
        BlockAllocator(4).allocate(-1, None)
    assert pages_for(0, 16) == 0 and pages_for(1, 16) == 1 and pages_for(17, 16) == 2


def test_capacity_plan_kv4_holds_about_3_8x_more_tokens():
    # LLaMA-3-8B shapes: bf16 costs 2*32*8*128*2 = 131072 B/token; KV4 (g=128, f16 scale and
    # zero) 2*32*8*(64+4) = 34816 B/token: 3.76x more tokens in the same memory.
    cfg = KVCacheConfig(
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        page_size=16,
        num_pages=1,
        group_size=128,
        dtype="int4",
    )
    plan = plan_num_pages(free_bytes=40 << 30, fraction=0.5, cache_config=cfg)
    assert plan.bytes_per_token == 34816
    assert plan.num_pages == (20 << 30) // (34816 * 16)
    assert plan.tokens_bf16 == (20 << 30) // 131072
    assert 3.7 < plan.tokens_int4 / plan.tokens_bf16 < 3.8
    assert "KV4" in plan.describe()
    with pytest.raises(ValueError, match="fraction"):
        plan_num_pages(free_bytes=1 << 30, fraction=0.0, cache_config=cfg)
    with pytest.raises(ValueError, match="at least 2"):
        plan_num_pages(free_bytes=1 << 20, fraction=1.0, cache_config=cfg)


def test_capacity_plan_reserves_the_recent_window_rings():
    # 8B shapes, W = 16 for 256 sequences in bf16: 32 x 2 x 256 x 16 x 8 x 128 x 2 B = 512 MiB
    # off the budget before pages; the per-token figures are the pages' alone.
    cfg = KVCacheConfig(32, 8, 128, 16, 1, 128, "int4")
    win = dataclasses.replace(cfg, recent_window=16, window_slots=256)
    assert win.window_bytes == 512 << 20
    plain = plan_num_pages(free_bytes=40 << 30, fraction=0.5, cache_config=cfg)
    plan = plan_num_pages(free_bytes=40 << 30, fraction=0.5, cache_config=win)
    assert plan.num_pages == ((20 << 30) - (512 << 20)) // (34816 * 16) < plain.num_pages
    assert plan.bytes_per_token == plain.bytes_per_token
    assert plan.tokens_bf16 < plain.tokens_bf16
    assert "512.0 MiB reserved for the 16-token float recent window" in plan.describe()
    assert "recent window" not in plain.describe()


def test_capacity_plan_keeps_the_step_working_memory_out_of_the_pool():
    """The fraction's headroom (10% of 40 GiB) covers a 2 GiB step: the pool is unchanged;
    an 8 GiB step takes its bytes from the pool instead, and the plan says so."""
    cfg = KVCacheConfig(32, 8, 128, 16, 1, 128, "int4")
    page = 34816 * 16
    small = plan_num_pages(free_bytes=40 << 30, fraction=0.9, cache_config=cfg, step_bytes=2 << 30)
    big = plan_num_pages(free_bytes=40 << 30, fraction=0.9, cache_config=cfg, step_bytes=8 << 30)
    assert small.num_pages == int((40 << 30) * 0.9) // page and not small.step_bound
    assert big.num_pages == (32 << 30) // page and big.step_bound
    assert "8.00 GiB kept for the largest step's working memory" in big.describe()
    assert "working memory" not in small.describe()
    with pytest.raises(ValueError, match="step_bytes=-1"):
        plan_num_pages(free_bytes=40 << 30, fraction=0.9, cache_config=cfg, step_bytes=-1)


def test_max_batch_for_memory_leaves_room_for_the_sampler():
    """128/128 in KV4 on the 8B shapes (2 pages a sequence): without the step's working
    memory the pool would hold ~7300 sequences whose sampler needs 5 f32 [B, 128256] arrays
    (17 GiB; the first H100 attempt ran out of memory compiling it). The answer n is the
    largest whose pool, with n rows' working memory kept free, holds n sequences; at 1536
    tokens (1214 sequences here) the fraction's headroom already covers it."""
    from comet_jax.engine.config import EngineConfig
    from comet_jax.engine.engine import max_batch_for_memory, step_working_bytes
    from comet_jax.engine.runner import preset_config

    model = preset_config("llama3-8b")
    free = int(67.24 * 2**30)
    cfg = EngineConfig(
        precision="w4axkv4", max_model_len=256, page_size=128, kv_group=128,
        memory_fraction=0.9, max_tokens_per_step=8192, max_batch=8192,
    )  # fmt: skip
    page = 34816 * 128
    n = max_batch_for_memory(model, cfg, free_bytes=free)

    def pool_seqs(rows):
        budget = min(int(free * 0.9), free - step_working_bytes(model, cfg, rows))
        return (budget // page - 1) // 2

    assert pool_seqs(n) >= n and pool_seqs(n + 1) < n + 1
    assert n < (int(free * 0.9) // page - 1) // 2 - 1000
    assert step_working_bytes(model, cfg, n) > free - int(free * 0.9)
    long = dataclasses.replace(cfg, max_model_len=1536)
    assert max_batch_for_memory(model, long, free_bytes=free) == (int(free * 0.9) // page - 1) // 12


def test_step_working_bytes_counts_the_prefill_grid():
    """The planned step memory holds the largest prefill attention grid (q, k, v, output in
    the compute dtype), and the engine compiles only the prefill buckets within it: 64
    sequences x 8192-token chunks of LLaMA-3-8B were 8.1 GiB of XLA scratch."""
    import types

    from comet_jax.engine.config import EngineConfig
    from comet_jax.engine.engine import LLMEngine, prefill_grid_bytes, step_working_bytes
    from comet_jax.engine.runner import preset_config

    model = preset_config("llama3-8b")
    cfg = EngineConfig(
        precision="w4axkv4", max_model_len=256, page_size=128, max_batch=4096,
        max_tokens_per_step=8192, max_prefill_seqs=64, prefill_batch_buckets=(1, 64),
        chunk_buckets=(128, 8192),
    )  # fmt: skip
    assert cfg.prefill_grid_limit == 16384
    per_position = (2 * 32 + 2 * 8) * 128 * 2
    assert prefill_grid_bytes(model, cfg) == 16384 * per_position
    wide = dataclasses.replace(cfg, max_prefill_grid=64 * 8192)
    grow = step_working_bytes(model, wide) - step_working_bytes(model, cfg)
    assert grow == (64 * 8192 - 16384) * per_position
    f32 = dataclasses.replace(cfg, compute_dtype="float32")
    assert prefill_grid_bytes(model, f32) == 2 * prefill_grid_bytes(model, cfg)
    prefill = {
        (b, t) for b, t, *_ in LLMEngine.bucket_shapes(types.SimpleNamespace(config=cfg)) if t > 1
    }
    assert prefill == {(1, 128), (1, 8192), (64, 128)}  # not (64, 8192)
    prefill = {
        (b, t) for b, t, *_ in LLMEngine.bucket_shapes(types.SimpleNamespace(config=wide)) if t > 1
    }
    assert (64, 8192) in prefill


def test_capacity_plan_avoids_pools_triton_cannot_address():
    """LLaMA-3-70B KV4 pages of 64 tokens: 1537 pages (the engine's cap for 64 sequences of
    1536 tokens) put 4.03e9 uint8 elements in k, which Pallas-Triton's 32-bit offsets wrap;
    the plan (and the engine's cap) step down."""
    cfg = KVCacheConfig(
        num_layers=80,
        num_kv_heads=8,
        head_dim=128,
        page_size=64,
        num_pages=1,
        group_size=128,
        dtype="int4",
    )
    per_page = 80 * 8 * 64 * 64
    budget = 1537 * 64 * cfg.bytes_per_token
    plan = plan_num_pages(free_bytes=budget, fraction=1.0, cache_config=cfg)
    assert plan.num_pages * per_page <= 2**31
    assert cfg.triton_safe_pages(1537) == 2**31 // per_page
    assert cfg.triton_safe_pages(1700) == 1700  # > 2^32 elements: 64-bit offsets, fine
    assert cfg.triton_safe_pages(800) == 800  # <= 2^31
    bf16 = dataclasses.replace(cfg, dtype="bf16")
    assert bf16.triton_safe_pages(1537) == 1537


def test_max_batch_for_memory_is_the_sequences_the_planned_pool_holds():
    """LLaMA-3-8B shapes, 1536-token sequences (12 pages of 128): the batch a max-throughput
    run gets "as memory allows" is the planned pool's pages (less scratch) // 12, ~3.76x more
    with KV4; a recent window's rings come out of the same budget; a fixed pool is used as is."""
    from comet_jax.engine.config import EngineConfig
    from comet_jax.engine.engine import max_batch_for_memory
    from comet_jax.engine.runner import preset_config

    model = preset_config("llama3-8b")
    free = 60 << 30
    base = dict(max_model_len=1536, page_size=128, kv_group=128, memory_fraction=0.9)
    bf16 = EngineConfig(precision="bf16", **base)
    kv4 = EngineConfig(precision="w4axkv4", **base)
    budget = int(free * 0.9)
    n_bf16 = max_batch_for_memory(model, bf16, free_bytes=free)
    n_kv4 = max_batch_for_memory(model, kv4, free_bytes=free)
    assert n_bf16 == (budget // (131072 * 128) - 1) // 12 == 287
    assert n_kv4 == (budget // (34816 * 128) - 1) // 12 == 1084
    assert (
        max_batch_for_memory(model, kv4, seq_len=1024 + 128, free_bytes=free)
        == (budget // (34816 * 128) - 1) // 9
    )
    # Recent window of 16 bf16 tokens: 32 x 2 x 16 x 8 x 128 x 2 B = 2 MiB per sequence; the
    # answer n is the largest whose pool, after n rings, still holds n sequences.
    win = dataclasses.replace(kv4, kv_recent_window=16)
    n = max_batch_for_memory(model, win, free_bytes=free)
    ring = 2 << 20
    assert (budget - n * ring) // (34816 * 128) - 1 >= 12 * n
    assert (budget - (n + 1) * ring) // (34816 * 128) - 1 < 12 * (n + 1)
    assert n < n_kv4
    fixed = dataclasses.replace(kv4, num_pages=100)
    assert max_batch_for_memory(model, fixed, free_bytes=free) == 99 // 12
    assert max_batch_for_memory(model, kv4, free_bytes=1 << 20) == 0
