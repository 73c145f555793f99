"""Paged KV4 decode/prefill kernels (interpret mode) vs the jnp references.

Tolerances:
- kernel vs reference on the same (dequantized) cache: < 1e-2 relative L2. The kernel feeds
  bf16 operands to the dots (q, softmax weights times V scales) with f32 accumulation; measured
  ~2e-3.
- reference on the INT4 cache vs full-precision attention on the unquantized K/V: < 0.2.
  Budget: asymmetric INT4 over a group of g Gaussian values has a step of ~range/15 ~ 0.35 sigma
  (g=128), i.e. ~10% RMS error per element (8% at g=32); K errors also move the softmax weights,
  so attention outputs land at 10-15% (measured on Gaussian data, S = 1..1000: 0.08-0.15, max
  0.149 at g=128). 0.2 leaves ~30% margin. bf16 cache mode must match exactly (same values).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache as kc
from pallas_kernels import kv4_attention as attn

QUANT_BUDGET = 0.2
_write = jax.jit(kc.write_kv)


def _jit(fn, **static):
    """Whole-call jit: interpret-mode kernels and references compile once instead of per op."""
    return jax.jit(functools.partial(fn, **static))


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _filled_cache(dtype, hg, d, page, group, lens, max_pages, seed, hkv=2):
    rng = np.random.default_rng(seed)
    b = len(lens)
    cfg = kc.KVCacheConfig(2, hkv, d, page, b * max_pages + 3, group, dtype)
    table = rng.permutation(cfg.num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    s = max_pages * page
    pos = np.broadcast_to(np.arange(s), (b, s))
    slots = kc.slot_mapping_from_positions(table, pos, page, pos < lens[:, None])
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.bfloat16)
    cache = _write(kc.init_cache(cfg), 1, k, v, slots)
    return cache, table, k, v, rng


DECODE_CASES = [  # dtype, gqa, head_dim, page, group, num_splits, block_k (None: gather pages)
    ("int4", 1, 64, 16, 64, 1, None),
    ("int4", 4, 128, 32, 128, 3, 32),  # one page per loop step
    ("int4", 8, 128, 16, 32, 2, 32),  # two-page gather, splits
    ("bf16", 4, 64, 32, 64, 2, None),
]


@pytest.mark.parametrize("dtype,hg,d,page,group,splits,block_k", DECODE_CASES)
def test_decode_matches_reference(dtype, hg, d, page, group, splits, block_k):
    lens = np.array([1, page - 1, 3 * page + 5, 4 * page], np.int32)
    cache, table, k, v, rng = _filled_cache(dtype, hg, d, page, group, lens, 4, seed=hg + d)
    q = jnp.asarray(rng.standard_normal((len(lens), 2 * hg, d)), jnp.bfloat16)
    kernel = _jit(
        attn.paged_decode_attention, layer=1, num_splits=splits, block_k=block_k, interpret=True
    )
    out = kernel(q, cache.pages(), table, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _jit(attn.paged_decode_attention_reference, layer=1)(q, cache.pages(), table, lens)
    assert _rel(out, ref) < 1e-2
    full = attn.dense_attention_reference(q[:, None], k, v, lens, np.ones(len(lens), np.int32))
    budget = QUANT_BUDGET if dtype == "int4" else 1e-6
    assert _rel(ref, full[:, 0]) < budget


@pytest.mark.parametrize("dtype", ["int4", "bf16"])
def test_decode_masks_the_tail_of_the_last_page_in_both_loop_structures(dtype):
    """Positions past each length hold large junk (written, not zero): the one-loop kernel
    (default) and the two-loop split must both mask them and agree with the reference."""
    hg, d, page, group, max_pages = 4, 64, 16, 64, 4
    lens = np.array([1, page - 1, 2 * page, 3 * page + 9], np.int32)  # a whole-page one too
    rng = np.random.default_rng(7)
    b, s = len(lens), max_pages * page
    cfg = kc.KVCacheConfig(2, 2, d, page, b * max_pages + 3, group, dtype)
    table = rng.permutation(cfg.num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    pos = np.broadcast_to(np.arange(s), (b, s))
    slots = kc.slot_mapping_from_positions(table, pos, page, pos < max_pages * page)
    junk = np.where(pos[..., None, None] < lens[:, None, None, None], 1.0, 40.0)
    k = jnp.asarray(rng.standard_normal((b, s, 2, d)) * junk, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, 2, d)) * junk, jnp.bfloat16)
    cache = _write(kc.init_cache(cfg), 1, k, v, slots)
    q = jnp.asarray(rng.standard_normal((b, 2 * hg, d)), jnp.bfloat16)
    ref = _jit(attn.paged_decode_attention_reference, layer=1)(q, cache.pages(), table, lens)
    outs = [
        _jit(attn.paged_decode_attention, layer=1, one_loop=one, interpret=True)(
            q, cache.pages(), table, lens
        )
        for one in (True, False)
    ]
    for out in outs:
        assert _rel(out, ref) < 1e-2
    np.testing.assert_allclose(
        np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32), atol=1e-2, rtol=0
    )
    # the junk is visible if unmasked: the same call with every position counted differs
    full_lens = np.full(b, s, np.int32)
    unmasked = _jit(attn.paged_decode_attention_reference, layer=1)(
        q, cache.pages(), table, full_lens
    )
    assert _rel(unmasked, ref) > 0.1


@pytest.mark.parametrize("qk_int8", [False, True])
def test_trimmed_tail_loads_give_the_same_bits(qk_int8):
    """trim_tail reads no bytes of keys past each length (K rows, V in 16-key runs; zeros
    instead). Those keys are masked anyway, so the output is bit for bit the full read's,
    with junk written past the lengths; lengths cover a partial first page, a run boundary,
    whole pages and a 16-key run's middle."""
    hg, d, page, group, max_pages = 4, 128, 32, 64, 4
    lens = np.array([5, page, 16, 2 * page + 17, 4 * page], np.int32)
    rng = np.random.default_rng(11)
    b, s = len(lens), max_pages * page
    cfg = kc.KVCacheConfig(2, 2, d, page, b * max_pages + 3, group, "int4")
    table = rng.permutation(cfg.num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    pos = np.broadcast_to(np.arange(s), (b, s))
    slots = kc.slot_mapping_from_positions(table, pos, page, pos < s)
    junk = np.where(pos[..., None, None] < lens[:, None, None, None], 1.0, 40.0)
    k = jnp.asarray(rng.standard_normal((b, s, 2, d)) * junk, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, 2, d)) * junk, jnp.bfloat16)
    cache = _write(kc.init_cache(cfg), 1, k, v, slots)
    q = jnp.asarray(rng.standard_normal((b, 2 * hg, d)), jnp.bfloat16)
    outs = [
        _jit(
            attn.paged_decode_attention,
            layer=1,
            block_k=page,
            num_splits=1,
            trim_tail=trim,
            qk_int8=qk_int8,
            interpret=True,
        )(q, cache.pages(), table, lens)
        for trim in (False, True)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    ref = _jit(attn.paged_decode_attention_reference, layer=1)(q, cache.pages(), table, lens)
    assert _rel(outs[1], ref) < 1e-2


def test_trimmed_tail_needs_one_int4_page_a_step(monkeypatch):
    """trim_tail=True is refused where it cannot apply (bf16 pages, gathered pages, the
    two-loop structure); None follows TRIM_TAIL_DEFAULT where it applies, else stays off."""
    lens = np.array([3, 20], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", 4, 64, 16, 64, lens, 2, seed=3)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    for bad in (dict(block_k=32), dict(one_loop=False)):
        with pytest.raises(ValueError, match="trim_tail"):
            attn.paged_decode_attention(q, cache.pages(), table, lens, trim_tail=True, **bad)
    bf16, table16, _, _, _ = _filled_cache("bf16", 4, 64, 16, 64, lens, 2, seed=3)
    with pytest.raises(ValueError, match="trim_tail"):
        attn.paged_decode_attention(q, bf16.pages(), table16, lens, trim_tail=True)
    seen = _spy_attend(monkeypatch, lambda kw: kw.get("trim_tail", False))
    for default in (True, False):
        monkeypatch.setattr(attn, "TRIM_TAIL_DEFAULT", default)
        attn.paged_decode_attention(q, cache.pages(), table, lens, block_k=16, interpret=True)
        attn.paged_decode_attention(q, cache.pages(), table, lens, block_k=32, interpret=True)
    assert seen == [True, False, False, False]


PREFILL_CASES = [  # dtype, gqa, head_dim, page, group
    ("int4", 4, 128, 16, 64),
    ("int4", 8, 64, 32, 32),
    ("bf16", 1, 128, 16, 128),
]


@pytest.mark.parametrize("dtype,hg,d,page,group", PREFILL_CASES)
def test_prefill_matches_reference(dtype, hg, d, page, group):
    lens = np.array([1, 2 * page + 3, 3 * page], np.int32)
    t = 2 * page + 3
    q_lens = np.array([1, t, page + 1], np.int32)  # last: a cached prefix of 2 * page - 1 tokens
    cache, table, k, v, rng = _filled_cache(dtype, hg, d, page, group, lens, 3, seed=hg * d)
    q = jnp.asarray(rng.standard_normal((3, t, 2 * hg, d)), jnp.bfloat16)
    kernel = _jit(attn.paged_prefill_attention, layer=1, block_q=4, interpret=True)
    out = kernel(q, cache.pages(), table, lens, q_lens)
    ref = _jit(attn.paged_prefill_attention_reference, layer=1)(
        q, cache.pages(), table, lens, q_lens
    )
    assert _rel(out, ref) < 1e-2
    assert not np.asarray(out[0, 1:]).any()  # rows past q_lens are zero
    full = jax.jit(attn.dense_attention_reference)(q, k, v, lens, q_lens)
    assert _rel(ref, full) < (QUANT_BUDGET if dtype == "int4" else 1e-6)


@pytest.mark.parametrize(
    "dtype,hg,d,page,group,t,block_q",
    [("int4", 4, 128, 16, 64, 32, 4), ("bf16", 8, 64, 32, 64, 16, None)],
)
def test_prefill_reads_q_in_its_own_layout(monkeypatch, dtype, hg, d, page, group, t, block_q):
    """Power-of-two GQA groups and whole tiles: the kernel reads q's [B, T, Hkv, hg, D] view and
    writes the output in place (no row-layout copies); same values as the row-layout path."""
    lens = np.array([1, t + 8, 3 * page], np.int32)
    q_lens = np.array([1, t, 17], np.int32)  # ragged chunks, cached prefixes
    cache, table, k, v, rng = _filled_cache(dtype, hg, d, page, group, lens, 3, seed=5 * hg)
    q = jnp.asarray(rng.standard_normal((3, t, 2 * hg, d)), jnp.bfloat16)
    args = (q, cache.pages(), table, lens, q_lens)
    rows_path = _jit(attn.paged_prefill_attention, layer=1, block_q=block_q, interpret=True,
                     return_lse=True)(*args)[0]  # fmt: skip
    ref = _jit(attn.paged_prefill_attention_reference, layer=1)(*args)

    def no_row_layout(*a, **kw):
        raise AssertionError("q went through the row layout")

    monkeypatch.setattr(attn, "_to_rows", no_row_layout)
    out = _jit(attn.paged_prefill_attention, layer=1, block_q=block_q, interpret=True)(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < 1e-2
    assert _rel(out, rows_path) < 1e-6
    assert not np.asarray(out[0, 1:]).any()  # rows past q_lens are zero


@pytest.mark.parametrize("dtype,shift", [("int4", 1), ("int4", 16), ("bf16", 5)])
def test_causal_shift_and_lse_match_reference(dtype, shift):
    """causal_shift = W (keys <= position - W: the recent window's INT4 part) and the rows'
    log-sum-exp: outputs < 1e-2 as above; lse within 1e-4 absolute (f32 softmax sums; the
    logits see bf16 q); the same rows see no key (-inf) in kernel and reference."""
    page, hg, d, group = 16, 4, 64, 64
    lens = np.array([1, 2 * page + 3, 3 * page, 5], np.int32)
    cache, table, _, _, rng = _filled_cache(dtype, hg, d, page, group, lens, 3, seed=shift)
    kv = cache.pages()
    q = jnp.asarray(rng.standard_normal((4, 2 * hg, d)), jnp.bfloat16)
    kw = dict(layer=1, causal_shift=shift, return_lse=True)
    o, lse = _jit(attn.paged_decode_attention, num_splits=2, interpret=True, **kw)(
        q, kv, table, lens
    )
    ro, rlse = _jit(attn.paged_decode_attention_reference, **kw)(q, kv, table, lens)
    t = 2 * page + 3
    q_lens = np.array([1, t, page + 1, 5], np.int32)
    qp = jnp.asarray(rng.standard_normal((4, t, 2 * hg, d)), jnp.bfloat16)
    po, plse = _jit(attn.paged_prefill_attention, block_q=4, interpret=True, **kw)(
        qp, kv, table, lens, q_lens
    )
    rpo, rplse = _jit(attn.paged_prefill_attention_reference, **kw)(qp, kv, table, lens, q_lens)
    for got, want, gl, wl in ((o, ro, lse, rlse), (po, rpo, plse, rplse)):
        assert _rel(got, want) < 1e-2
        gl, wl = np.asarray(gl), np.asarray(wl)
        seen = np.isfinite(wl)
        assert (np.isfinite(gl) == seen).all() and not seen.all() and seen.any()
        np.testing.assert_allclose(gl[seen], wl[seen], atol=1e-4)
    with pytest.raises(ValueError, match="causal_shift"):
        attn.paged_decode_attention(q, kv, table, lens, causal_shift=-1, interpret=True)


@pytest.mark.parametrize("hg,d,page,group", [(4, 128, 16, 64), (8, 64, 32, 32)])
def test_prefill_on_a_dequantized_pool_matches_reference(hg, d, page, group):
    """dequantize=True: the named pages dequantized once into a bf16 pool, then the bf16-page
    kernel. Extra error beyond the bf16 path: the bf16 rounding of the dequantized K/V
    (2^-9 relative per element); bound 1e-2 as for the other paths. Same zero rows."""
    lens = np.array([1, 2 * page + 3, 3 * page], np.int32)
    t = 2 * page + 3
    q_lens = np.array([1, t, page + 1], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", hg, d, page, group, lens, 3, seed=hg + page)
    kv = cache.pages()
    q = jnp.asarray(rng.standard_normal((3, t, 2 * hg, d)), jnp.bfloat16)
    kernel = _jit(attn.paged_prefill_attention, layer=1, block_q=4, dequantize=True, interpret=True)
    out = kernel(q, kv, table, lens, q_lens)
    ref = _jit(attn.paged_prefill_attention_reference, layer=1)(q, kv, table, lens, q_lens)
    assert out.shape == q.shape and _rel(out, ref) < 1e-2
    assert not np.asarray(out[0, 1:]).any()
    pool, ptab = attn.dequantized_pool(kv, table, layer=1)
    assert pool.k.shape == (1, table.size, kv.k.shape[2], page, d) and not pool.quantized
    dense_k, _ = attn.gather_kv(kv, table, layer=1, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(attn.gather_kv(pool, ptab, layer=0, dtype=jnp.bfloat16)[0]), np.asarray(dense_k)
    )


@pytest.mark.parametrize("hg,d,page,group", [(4, 128, 16, 64), (2, 64, 32, 32), (1, 128, 16, 128)])
def test_dequantize_kernel_equals_the_xla_pool(hg, d, page, group):
    """kv4_dequant.dequantize_pages (interpret mode) makes the same pool as dequantized_pool,
    bit for bit (same f32 arithmetic), table entries out of range clipped the same way; and
    prefill through it equals prefill through the XLA pool."""
    from pallas_kernels import kv4_dequant

    lens = np.array([1, 2 * page + 3, 3 * page], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", hg, d, page, group, lens, 3, seed=group + d)
    kv = cache.pages()
    table = table.copy()
    table[0, 2] = kv.k.shape[1] + 5  # unused entry past the pool: clipped, as the reference
    want, want_tab = attn.dequantized_pool(kv, table, layer=1)
    got, got_tab = jax.jit(functools.partial(kv4_dequant.dequantize_pages, interpret=True))(
        kv, table, 1
    )
    np.testing.assert_array_equal(np.asarray(got_tab), np.asarray(want_tab))
    for g, w in ((got.k, want.k), (got.v, want.v)):
        assert g.dtype == w.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    t = page + 3
    q_lens = np.array([1, page, t], np.int32)
    q = jnp.asarray(rng.standard_normal((3, t, 2 * hg, d)), jnp.bfloat16)
    run = functools.partial(
        attn.paged_prefill_attention, layer=1, block_q=4, dequantize=True, interpret=True
    )
    a = jax.jit(functools.partial(run, dequantize_kernel=True))(q, kv, table, lens, q_lens)
    b = jax.jit(functools.partial(run, dequantize_kernel=False))(q, kv, table, lens, q_lens)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="INT4 cache"):
        bf16, *_ = _filled_cache("bf16", hg, d, page, group, lens, 3, seed=1)
        kv4_dequant.dequantize_pages(bf16.pages(), table, 1, interpret=True)
    with pytest.raises(ValueError, match="page_table"):
        kv4_dequant.dequantize_pages(kv, table.astype(np.float32), 1, interpret=True)


def test_dequantized_pool_needs_int4_and_excludes_int8_logits():
    lens = np.array([5], np.int32)
    for dtype, kw, match in (
        ("bf16", {}, "INT4 cache"),
        ("int4", {"qk_int8": True}, "exclude each other"),
    ):
        cache, table, _, _, rng = _filled_cache(dtype, 2, 64, 16, 64, lens, 1, seed=4)
        q = jnp.asarray(rng.standard_normal((1, 5, 4, 64)), jnp.bfloat16)
        with pytest.raises(ValueError, match=match):
            attn.paged_prefill_attention(
                q, cache.pages(), table, lens, dequantize=True, interpret=True, **kw
            )


@pytest.mark.parametrize("hg,d,group", [(4, 128, 128), (8, 64, 64), (1, 128, 64)])
def test_int8_logits_match_reference(hg, d, group):
    """qk_int8: q rounded to INT8 per row and group, int8 x nibble dots. Its only error beyond
    the bf16 path is q's rounding (step max|q|/127 per group): measured 3.1-3.3e-3 relative
    on these cases against the reference on the same cache (bf16 path: 1.6-2.3e-3); bound
    1e-2 as for the bf16 path."""
    page = 16
    lens = np.array([1, page - 1, 3 * page + 5], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", hg, d, page, group, lens, 4, seed=hg * group)
    kv = cache.pages()
    q = jnp.asarray(rng.standard_normal((3, 2 * hg, d)), jnp.bfloat16)
    dec = _jit(attn.paged_decode_attention, layer=1, num_splits=2, qk_int8=True, interpret=True)
    ref = _jit(attn.paged_decode_attention_reference, layer=1)(q, kv, table, lens)
    assert _rel(dec(q, kv, table, lens), ref) < 1e-2
    t = page + 3
    q_lens = np.array([1, page - 1, t], np.int32)
    qp = jnp.asarray(rng.standard_normal((3, t, 2 * hg, d)), jnp.bfloat16)
    pre = _jit(attn.paged_prefill_attention, layer=1, block_q=4, qk_int8=True, interpret=True)
    refp = _jit(attn.paged_prefill_attention_reference, layer=1)(qp, kv, table, lens, q_lens)
    assert _rel(pre(qp, kv, table, lens, q_lens), refp) < 1e-2


def test_int8_logits_need_an_int4_cache_with_wide_groups():
    lens = np.array([5], np.int32)
    for dtype, group, match in (("bf16", 64, "INT4 cache"), ("int4", 32, "groups of >= 64")):
        cache, table, _, _, rng = _filled_cache(dtype, 2, 64, 16, group, lens, 1, seed=3)
        q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.bfloat16)
        with pytest.raises(ValueError, match=match):
            attn.paged_decode_attention(q, cache.pages(), table, lens, qk_int8=True, interpret=True)


def test_decode_empty_sequence_gives_zeros_and_jit_works():
    lens = np.array([0, 9], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", 2, 64, 16, 64, lens, 2, seed=7)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.bfloat16)
    fn = jax.jit(lambda q, kv, pt, sl: attn.paged_decode_attention(q, kv, pt, sl, interpret=True))
    out = fn(q, cache.pages(), table, lens)  # layer 0: written nowhere -> only lens matter
    assert not np.asarray(out[0]).any() and np.isfinite(np.asarray(out)).all()


def test_bad_inputs_raise():
    lens = np.array([5, 20], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", 4, 64, 16, 64, lens, 2, seed=1)
    kv = cache.pages()
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    bad_table = table.copy()
    bad_table[1, 1] = kv.k.shape[1]
    with pytest.raises(ValueError, match=r"page_table\[1\]"):
        attn.paged_decode_attention(q, kv, bad_table, lens, interpret=True)
    with pytest.raises(ValueError, match="capacity=32"):
        attn.paged_decode_attention(q, kv, table, np.array([5, 33], np.int32), interpret=True)
    with pytest.raises(ValueError, match="seq_lens"):
        attn.paged_decode_attention(q, kv, table, lens.astype(np.float32), interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        attn.paged_decode_attention(q[..., :32], kv, table, lens, interpret=True)
    with pytest.raises(ValueError, match="Hq=5"):
        attn.paged_decode_attention(q[:, :5], kv, table, lens, interpret=True)
    with pytest.raises(ValueError, match="layer=2"):
        attn.paged_decode_attention(q, kv, table, lens, layer=2, interpret=True)
    with pytest.raises(ValueError, match="q_lens"):
        attn.paged_prefill_attention(
            q[:, None], kv, table, lens, np.array([2, 1], np.int32), interpret=True
        )
    with pytest.raises(ValueError, match="kv.k_scale"):
        attn.paged_decode_attention(q, kv._replace(k_scale=kv.k_scale[..., :8]), table, lens)
    # INT4 V pages are stored transposed ([D/2, page]); K's layout for V is named as such.
    with pytest.raises(ValueError, match=r"INT4 kv.v must be \[L, P, Hkv, D/2, page\]"):
        attn.paged_decode_attention(q, kv._replace(v=kv.v.swapaxes(-1, -2)), table, lens)
    with pytest.raises(ValueError, match="unpack"):
        attn.paged_decode_attention(q, kv, table, lens, unpack="asm", interpret=True)


def test_pool_size_in_32bit_offset_hazard_is_rejected():
    pages = 40_000  # k, v: [1, P, 8, 128, 64] uint8 = 2.6e9 elements, under 4 GiB
    packed = jax.ShapeDtypeStruct((1, pages, 8, 128, 64), jnp.uint8)
    packed_v = jax.ShapeDtypeStruct((1, pages, 8, 64, 128), jnp.uint8)  # V pages transposed
    meta = jax.ShapeDtypeStruct((1, pages, 8, 1, 128), jnp.float16)
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    kv = attn.PagedKV(packed, packed_v, meta, meta, meta, meta)
    with pytest.raises(ValueError, match="kv.k has"):
        attn.paged_decode_attention(q, kv, np.zeros((1, 1), np.int32), np.ones(1, np.int32))
    cfg = kc.KVCacheConfig(32, 8, 128, 16, 1)
    per_page = 32 * 8 * 16 * 64  # packed k elements per page (all layers)
    budget = int(1.25 * 2**31 / per_page) * cfg.bytes_per_token * 16  # lands in the window
    assert not 2**31 < cfg.pages_for_budget(budget) * per_page <= 2**32
    assert cfg.pages_for_budget(budget) * per_page <= 2**31


def test_default_decode_block_k_gathers_small_pages():
    """Measured on H100: one page per step from page 64 up; 256 gathered keys below."""
    assert [attn.default_decode_block_k(p) for p in (16, 32, 64, 128)] == [256, 256, 64, 128]


def test_default_warps_follow_the_h100_measurements():
    """The schedule defaults reproduce the best of 1 / 2 / 4 (decode) and 4 / 8 (prefill) warps
    measured on the H100 (docs/benchmarks.md, 2026-11-26), LLaMA-3-8B heads (Hkv = 8)."""
    dw = attn.default_decode_warps
    # page 128 (block_k 128), blocks = S / 128
    assert dw(64, 8, 4096 // 128, 128) == 2 and dw(64, 8, 16384 // 128, 128) == 2
    assert dw(256, 8, 1024 // 128, 128) == 2 and dw(256, 8, 16384 // 128, 128) == 2
    assert dw(64, 8, 1024 // 128, 128) == 4 and dw(16, 8, 4096 // 128, 128) == 4
    assert dw(16, 8, 16384 // 128, 128) == 4
    assert dw(64, 8, 4096 // 64, 64) == 4  # page 64: 4 warps won
    assert dw(64, 8, 4096 // 128, 128, quantized=False) == 4  # bf16 pages: as measured before
    assert attn.default_prefill_warps(128) == 8 and attn.default_prefill_warps(16) == 4


def _spy_attend(monkeypatch, pick) -> list:
    """Records ``pick(kwargs)`` of every `_attend` launch (the call still runs)."""
    seen = []
    orig = attn._attend

    def spy(*args, **kw):
        seen.append(pick(kw))
        return orig(*args, **kw)

    monkeypatch.setattr(attn, "_attend", spy)
    return seen


def test_default_stages_reach_the_kernel(monkeypatch):
    """INT4 decode and prefill over bf16 / dequantized pages get 5 pipeline stages (two K/V
    buffers in Triton 3.6, measured faster on the H100); bf16-page decode and in-kernel INT4
    prefill keep 2; an explicit value passes through."""
    seen = _spy_attend(monkeypatch, lambda kw: kw["num_stages"])
    lens = np.array([3, 20], np.int32)
    for dtype in ("int4", "bf16"):
        cache, table, _, _, rng = _filled_cache(dtype, 4, 64, 16, 64, lens, 2, seed=3)
        q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
        attn.paged_decode_attention(q, cache.pages(), table, lens, layer=1, interpret=True)
        qp = q[:, None]
        attn.paged_prefill_attention(qp, cache.pages(), table, lens, layer=1, interpret=True)
        if dtype == "int4":
            attn.paged_prefill_attention(
                qp, cache.pages(), table, lens, layer=1, dequantize=True, interpret=True
            )
    cache, table, _, _, rng = _filled_cache("int4", 4, 64, 16, 64, lens, 2, seed=3)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    attn.paged_decode_attention(q, cache.pages(), table, lens, num_stages=3, interpret=True)
    # int4: decode 5, in-kernel prefill 2, dequantized prefill 5; bf16: decode 2, prefill 5
    assert seen == [5, 2, 5, 2, 5, 3]
    assert attn.default_stages(decode=True, int4_pages=True) == 5


def test_one_loop_default_follows_the_cache_dtype(monkeypatch):
    """Decode runs the one-loop structure on INT4 pages (measured faster at ragged lengths
    on the H100) and keeps the two-loop split on bf16 pages (not measured with one loop);
    prefill never takes it; an explicit value passes through."""
    seen = _spy_attend(monkeypatch, lambda kw: kw.get("one_loop", False))
    lens = np.array([3, 20], np.int32)
    for dtype in ("int4", "bf16"):
        cache, table, _, _, rng = _filled_cache(dtype, 4, 64, 16, 64, lens, 2, seed=3)
        q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
        attn.paged_decode_attention(q, cache.pages(), table, lens, layer=1, interpret=True)
        attn.paged_prefill_attention(q[:, None], cache.pages(), table, lens, interpret=True)
        attn.paged_decode_attention(
            q, cache.pages(), table, lens, one_loop=dtype == "bf16", interpret=True
        )
    assert seen == [True, False, False, False, False, True]


@pytest.mark.parametrize(
    "dtype,hg,d,page,group,block_k",
    [
        ("int4", 4, 128, 32, 128, 32),  # the 8B's group: 4 copies per 16-row tile
        ("int4", 1, 64, 16, 64, None),  # MHA: 16 copies, gathered pages
        ("int4", 16, 64, 16, 32, 32),  # a group that fills the tile alone
        ("bf16", 8, 64, 32, 64, None),
    ],
)
def test_decode_reading_q_in_its_own_layout_is_the_padded_path(dtype, hg, d, page, group, block_k):
    """q_tiled (q's [B, Hkv, hg, D] view, the tile filled with copies of the group's rows,
    every copy stored onto its row) gives the padded row layout's output bit for bit,
    including an empty sequence; the default takes it with one split and no lse, and it is
    refused where it cannot apply."""
    lens = np.array([0, 1, page - 1, 3 * page + 5], np.int32)
    cache, table, _, _, rng = _filled_cache(dtype, hg, d, page, group, lens, 4, seed=hg + 7)
    q = jnp.asarray(rng.standard_normal((len(lens), 2 * hg, d)), jnp.bfloat16)
    kw = dict(layer=1, num_splits=1, block_k=block_k, interpret=True)
    tiled = _jit(attn.paged_decode_attention, q_tiled=True, **kw)(q, cache.pages(), table, lens)
    padded = _jit(attn.paged_decode_attention, q_tiled=False, **kw)(q, cache.pages(), table, lens)
    np.testing.assert_array_equal(np.asarray(tiled, np.float32), np.asarray(padded, np.float32))
    assert not np.asarray(tiled[0], np.float32).any()
    ref = _jit(attn.paged_decode_attention_reference, layer=1)(q, cache.pages(), table, lens)
    assert _rel(tiled[1:], ref[1:]) < 1e-2
    with pytest.raises(ValueError, match="q_tiled=True needs one split"):
        attn.paged_decode_attention(
            q, cache.pages(), table, lens, layer=1, num_splits=2, q_tiled=True, interpret=True
        )


def test_decode_default_reads_q_in_its_own_layout_with_one_split(monkeypatch):
    seen = _spy_attend(monkeypatch, lambda kw: kw.get("q_tiled", False))
    lens = np.array([3, 20], np.int32)
    cache, table, _, _, rng = _filled_cache("int4", 4, 64, 16, 64, lens, 2, seed=3)
    q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    for splits, lse in ((1, False), (2, False), (1, True)):
        attn.paged_decode_attention(
            q, cache.pages(), table, lens, num_splits=splits, return_lse=lse, interpret=True
        )
    assert seen == [True, False, False]
