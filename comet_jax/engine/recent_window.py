"""The bf16 recent window of the INT4 paged cache: the newest W tokens attended unquantized.

Semantics (the same as the simulation `QuantRecipe.kv_recent_window` / `models.attention`,
whose accuracy docs/accuracy.md measures): a query at position p reads the keys and values at
positions in ``(p - W, p]`` unquantized and the older ones (``<= p - W``) from the INT4 pages.

Storage (`comet_jax.engine.kv_cache`): every token still goes into its INT4 page; in addition
the newest W tokens of each running sequence sit in a ring ``[L, S, Hkv, W, D]`` (S slots, one
per running sequence, assigned by the scheduler; position p in ring row ``p % W``).

One attention call (a decode step, T = 1, or a prefill chunk of T tokens starting at
``start = seq_len - q_len``):

1. the INT4 part: the paged kernels with ``causal_shift = W`` (keys ``<= p - W``), returning
   the rows' log-sum-exp;
2. the float band: per query, its W band keys are the ring's W - 1 tokens before the chunk
   (read before this call writes the ring) followed by the chunk's own K/V, as computed:
   ``ext = [ring(start - W + 1 .. start - 1) | chunk(start .. start + T - 1)]`` and query t
   takes ``ext[t : t + W]``; W shifted slices, no [T, W] gather;
3. the two softmaxes merged by their log-sum-exps;
4. the chunk's tokens among its sequence's newest W written into the ring.

A prefill call none of whose rows has a cached prefix may instead attend its chunk's own K/V
unquantized (`EngineConfig.prefill_own_kv`: every key of the chunk in float, a superset of the
window's W); it still writes the pages and, by :func:`ring_fill`, the ring, so the decode
steps and later chunks that follow read the same cache as after steps 1-4.

A decode step (T = 1) takes a shorter route through the same semantics: write the new token
into its ring row first (:func:`ring_put_decode`), then attend the pages and the slot's whole
ring, which now holds exactly the positions ``(p - W, p]`` (rows of negative positions
masked), in one call (`paged_decode_attention(ring=...)`): with ``window_kernel`` the Pallas
kernel takes the ring as one more key block, else XLA attends it with two batched dots and
merges by log-sum-exp.

Arrays: q ``[B, T, Hq, D]``, k_new/v_new ``[B, T, Hkv, D]``, slots ``[B] int32`` (-1: padded
row), seq_lens ``[B]`` (after the chunk), q_lens ``[B]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from comet_jax.engine import kv_cache
from pallas_kernels import kv4_attention as attn


def band_kv(cache, layer, slots, start, k_new, v_new):
    """``(k_ext, v_ext, pos, rows)``: ``k_ext, v_ext [B, W - 1 + T, Hkv, D]`` (the ring's
    tokens before the chunk, then the chunk), their positions ``pos [B, W - 1 + T]``
    (negative: before the sequence, masked), and ``rows = (k_rows, v_rows)``, each
    ``[B, Hkv, W, D]``: the slots' whole rings as read (for :func:`ring_write`)."""
    window = cache.config.recent_window
    t = k_new.shape[1]
    prior_pos = start[:, None] - window + 1 + jnp.arange(window - 1, dtype=jnp.int32)  # [B, W-1]
    row = jnp.mod(prior_pos, window)[:, None, :, None]
    k_rows, v_rows = slot_rings(cache, layer, slots)

    def ext(rows, new):
        prior = jnp.take_along_axis(rows, row, axis=2).transpose(0, 2, 1, 3)  # [B, W-1, Hkv, D]
        return jnp.concatenate([prior.astype(new.dtype), new], axis=1)

    pos = jnp.concatenate([prior_pos, start[:, None] + jnp.arange(t, dtype=jnp.int32)], axis=1)
    return ext(k_rows, k_new), ext(v_rows, v_new), pos, (k_rows, v_rows)


def slot_rings(cache, layer, slots):
    """``(k_rows, v_rows)``, each ``[B, Hkv, W, D]``: layer ``layer``'s rings of the rows'
    slots as read now (slot -1, a padded row, reads slot 0; nothing uses it)."""
    slot = jnp.clip(slots, 0, cache.config.window_slots - 1)
    return tuple(jnp.take(ring[layer], slot, axis=0) for ring in (cache.ring_k, cache.ring_v))


def ring_fill(cache, layer, k_new, v_new, slots, start, q_lens, seq_lens):
    """A prefill chunk's own ring write when its attention does not read the ring (rows
    without a cached prefix attending their own K/V, `EngineConfig.prefill_own_kv`): the
    chunk's tokens among their sequence's newest W go into their slot's ring rows, the same
    values as :func:`windowed_attention` writes. k_new / v_new ``[B, T, Hkv, D]``. Returns
    the cache with its rings updated."""
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    rows = slot_rings(cache, layer, slots)
    ring_k, ring_v = ring_write(
        cache, layer, k_new, v_new, slots, jnp.asarray(start, jnp.int32),
        jnp.asarray(q_lens, jnp.int32), seq_lens, rows,
    )  # fmt: skip
    return dataclasses.replace(cache, ring_k=ring_k, ring_v=ring_v)


def band_attention(q, k_ext, v_ext, ext_pos, seq_lens, window: int, sm_scale: float):
    """Attention of ``q [B, T, Hq, D]`` over its band: query t reads ``ext[t : t + W]``.

    Returns ``(o [B, T, Hq, D] f32, lse [B, T, Hq] f32)`` (lse -inf where nothing is visible).
    """
    b, t, hq, d = q.shape
    hkv = k_ext.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    logits, valid = [], []
    for j in range(window):
        kj = k_ext[:, j : j + t].astype(jnp.float32)
        logits.append(jnp.einsum("btkgd,btkd->btkg", qg, kj) * sm_scale)
        pj = ext_pos[:, j : j + t]
        valid.append((pj >= 0) & (pj < seq_lens[:, None]))
    logits = jnp.stack(logits, axis=-1)  # [B, T, Hkv, hg, W]
    valid = jnp.stack(valid, axis=-1)[:, :, None, None, :]  # [B, T, 1, 1, W]
    p, lse = attn.masked_softmax(logits, valid)
    o = jnp.zeros(qg.shape, jnp.float32)
    for j in range(window):
        o = o + p[..., j, None] * v_ext[:, j : j + t, :, None, :].astype(jnp.float32)
    return o.reshape(b, t, hq, d), lse.reshape(b, t, hq)


def ring_put_decode(cache, layer, k_new, v_new, slots, seq_lens):
    """A decode step's first half: the token ``k_new, v_new [B, Hkv, D]`` at position
    ``p = seq_lens - 1`` goes into ring row ``p % W`` of its slot (slot -1: a padded row, not
    written). Returns ``(ring_k, ring_v)``. The ring is read after this write (the kernels'
    ``ring`` argument), so XLA updates it in place."""
    cfg = cache.config
    pos = jnp.asarray(seq_lens, jnp.int32) - 1
    live = (slots >= 0) & (pos >= 0)
    slot = jnp.where(live, slots, cfg.window_slots)  # out of range: the write is dropped
    row = jnp.mod(pos, cfg.recent_window)
    layer = jnp.asarray(layer, jnp.int32)

    def put(ring, new):
        return ring.at[layer, slot, :, row, :].set(new.astype(ring.dtype), mode="drop")

    return put(cache.ring_k, k_new), put(cache.ring_v, v_new)


def ring_write(cache, layer, k_new, v_new, slots, start, q_lens, seq_lens, rows):
    """Writes each chunk token whose position is among its sequence's newest W into ring row
    ``position % W`` of its slot (the others, padding and slot -1 are dropped).

    ``rows`` are :func:`slot_rings` (as :func:`band_kv` returns them), this layer's rings as
    read before the write. The written values are ``where(keep, new, old)`` with ``old``
    taken from them: the same values (dropped tokens are never written), but the scatter now
    depends on the read, so XLA orders the read first and updates the ring in place. Without
    that edge the read and the scatter were unordered and XLA copied both whole rings
    ``[L, S, Hkv, W, D]`` in every layer (seen in the compiled HLO;
    tests/test_recent_window.py checks it)."""
    cfg = cache.config
    w = cfg.recent_window
    b, t = k_new.shape[:2]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    keep = (jnp.arange(t)[None, :] < q_lens[:, None]) & (pos >= seq_lens[:, None] - w)
    keep &= (slots >= 0)[:, None]
    slot = jnp.where(keep, slots[:, None], cfg.window_slots).reshape(-1)  # out of range: drop
    ring_row = jnp.mod(pos, w)  # [B, T]
    row = ring_row.reshape(-1)
    layer = jnp.asarray(layer, jnp.int32)
    keep_rows = keep.reshape(-1)[:, None, None]
    row_idx = ring_row[:, None, :, None]  # [B, 1, T, 1]

    def put(ring, vals, read):  # ring [L, S, Hkv, W, D] <- vals [B*T, Hkv, D]
        old = jnp.take_along_axis(read, row_idx, axis=2).transpose(0, 2, 1, 3)  # [B, T, Hkv, D]
        vals = jnp.where(keep_rows, vals.reshape(b * t, *vals.shape[2:]).astype(ring.dtype),
                         old.reshape(b * t, *old.shape[2:]).astype(ring.dtype))  # fmt: skip
        return ring.at[layer, slot, :, row, :].set(vals, mode="drop")

    return put(cache.ring_k, k_new, rows[0]), put(cache.ring_v, v_new, rows[1])


def windowed_attention(
    q,
    k_new,
    v_new,
    cache,
    layer,
    page_table,
    seq_lens,
    q_lens,
    slots,
    *,
    backend: str = "pallas",
    interpret: bool = False,
    sm_scale: float | None = None,
    window_kernel: bool = False,
    **kernel_kwargs,
):
    """Attention with the recent window over a cache whose chunk is already in its pages
    (module docstring). ``window_kernel``: decode with the Pallas backend attends the ring
    inside the kernel (W a power of two >= 16). Returns ``(out [B, T, Hq, D] f32, cache with
    the ring updated)``."""
    w = cache.config.recent_window
    b, t, hq, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    q_lens = jnp.asarray(q_lens, jnp.int32)
    start = seq_lens - q_lens
    if t == 1:  # decode: write the ring, then pages + ring in one attention call
        ring_k, ring_v = ring_put_decode(cache, layer, k_new[:, 0], v_new[:, 0], slots, seq_lens)
        cache = dataclasses.replace(cache, ring_k=ring_k, ring_v=ring_v)
        if backend == "pallas":
            kernel_kwargs = {**kernel_kwargs, "ring_in_kernel": window_kernel}
        out = kv_cache.attend_pages(
            q[:, 0], cache.pages(), layer, page_table, seq_lens, q_lens, mode="decode",
            backend=backend, interpret=interpret, kernel_kwargs=kernel_kwargs,
            sm_scale=sm_scale, ring=(ring_k, ring_v), ring_slots=slots,
        )  # fmt: skip
        return out.astype(jnp.float32)[:, None], cache
    o1, lse1 = kv_cache.attend_pages(
        q, cache.pages(), layer, page_table, seq_lens, q_lens, mode="prefill",
        backend=backend, interpret=interpret, kernel_kwargs=kernel_kwargs,
        sm_scale=sm_scale, causal_shift=w, return_lse=True,
    )  # fmt: skip
    k_ext, v_ext, ext_pos, rows = band_kv(cache, layer, slots, start, k_new, v_new)
    o2, lse2 = band_attention(q, k_ext, v_ext, ext_pos, seq_lens, w, sm_scale)
    out = attn.merge_attention(o1, lse1, o2, lse2)
    out = jnp.where((jnp.arange(t)[None, :] < q_lens[:, None])[:, :, None, None], out, 0.0)
    ring_k, ring_v = ring_write(cache, layer, k_new, v_new, slots, start, q_lens, seq_lens, rows)
    return out, dataclasses.replace(cache, ring_k=ring_k, ring_v=ring_v)
