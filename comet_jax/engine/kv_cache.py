"""Paged KV cache (INT4 or bf16) for all layers, its write path, and write-then-attend.

Layout (stacked over layers; see ``pallas_kernels/kv4_attention.py`` for why head-major pages):

    dtype="int4":  k                    [L, P, Hkv, page, D/2] uint8  (kv_quant format, tile = group)
                   v                    [L, P, Hkv, D/2, page] uint8  (the same, pages transposed)
                   k_scale/k_zero/v_*   [L, P, Hkv, D/group, page] f16
    dtype="bf16":  k, v                 [L, P, Hkv, page, D]   bf16   (scales/zeros None)
    recent window: ring_k, ring_v       [L, S, Hkv, W, D]      window_dtype (int4 only; else None)

The optional bf16 recent window (``recent_window = W > 0``, `comet_jax.engine.recent_window`)
keeps each running sequence's newest W tokens' K/V unquantized in a ring of ``S`` slots (one
per running sequence, assigned by the scheduler; token at position p in ring row p % W),
besides their INT4 copies in the pages.

A token's *slot* is ``physical_page * page_size + offset``. Writes take a flat slot per new
token (``-1`` = padding, skipped), so one fixed-shape jitted write serves prefill (many tokens
per sequence) and decode (one). Page allocation (which physical pages a sequence owns) is the
engine's job; this module only needs the resulting ``page_table [B, max_pages] int32``.

Typical engine step (per layer, inside jit, cache donated)::

    out, cache = paged_attention(q, k_new, v_new, cache, layer, page_table, seq_lens,
                                 slot_mapping, mode="decode")
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from comet_jax.quant import kv_quant
from pallas_kernels import kv4_attention as attn
from pallas_kernels import kv4_write

CacheDtype = Literal["int4", "bf16"]


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """Shape of the page pool. ``page_size`` tokens per page, ``num_pages`` pages per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 64
    num_pages: int = 1024
    group_size: int = 128
    dtype: CacheDtype = "int4"
    recent_window: int = 0
    window_slots: int = 0
    window_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "num_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.page_size not in (16, 32, 64, 128):
            raise ValueError(f"page_size={self.page_size} must be one of 16, 32, 64, 128")
        if self.head_dim not in (64, 128, 256):
            raise ValueError(f"head_dim={self.head_dim} must be 64, 128 or 256")
        if self.dtype not in ("int4", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'int4' or 'bf16'")
        if self.dtype == "int4" and (
            self.group_size not in kv_quant.GROUP_SIZES or self.head_dim % self.group_size
        ):
            raise ValueError(
                f"group_size={self.group_size} must be one of {kv_quant.GROUP_SIZES} "
                f"and divide head_dim={self.head_dim}"
            )
        w = self.recent_window
        if not isinstance(w, int) or w < 0:
            raise ValueError(f"recent_window={w!r} must be an int >= 0 (0 = off)")
        if w and (self.dtype != "int4" or self.window_slots < 1):
            raise ValueError(
                f"recent_window={w} needs dtype='int4' (got {self.dtype!r}) and "
                f"window_slots >= 1 (got {self.window_slots})"
            )
        if self.window_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"window_dtype={self.window_dtype!r} must be bfloat16 or float32")

    @property
    def quantized(self) -> bool:
        return self.dtype == "int4"

    @property
    def window_bytes(self) -> int:
        """Bytes of the recent-window rings (K and V, all layers and slots); 0 when off."""
        item = jnp.dtype(self.window_dtype).itemsize
        per_slot = self.recent_window * self.num_kv_heads * self.head_dim * item
        return self.num_layers * 2 * self.window_slots * per_slot

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs over all layers, K and V (for pool sizing)."""
        return self.num_layers * 2 * self.num_kv_heads * bytes_per_token_head(self)

    def pages_for_budget(self, budget_bytes: int) -> int:
        """How many pages (per layer) fit in ``budget_bytes`` of device memory.

        Avoids INT4 pools whose packed k/v (uint8) hold (2^31, 2^32] elements: Pallas-Triton
        addresses those with wrapping 32-bit offsets (the kernels reject them).
        """
        return self.triton_safe_pages(int(budget_bytes // (self.bytes_per_token * self.page_size)))

    def triton_safe_pages(self, pages: int) -> int:
        """``pages``, lowered where needed so an INT4 pool's packed k/v (uint8) do not hold
        (2^31, 2^32] elements (see :meth:`pages_for_budget`)."""
        per_page = self.num_layers * self.num_kv_heads * self.page_size * self.head_dim // 2
        if self.quantized and 2**31 < pages * per_page <= 2**32:
            pages = 2**31 // per_page
        return pages


def bytes_per_token_head(cfg: KVCacheConfig) -> int:
    """Bytes of one K (or V) vector of one head: 68 (int4, D=g=128) vs 256 (bf16, D=128)."""
    if cfg.quantized:
        return kv_quant.kv4_bytes_per_token_head(cfg.head_dim, cfg.group_size)
    return cfg.head_dim * 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The page pool of every layer (module docstring). A pytree; ``config`` is static."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    k_zero: jax.Array | None
    v_scale: jax.Array | None
    v_zero: jax.Array | None
    config: KVCacheConfig = dataclasses.field(metadata=dict(static=True))
    ring_k: jax.Array | None = None
    ring_v: jax.Array | None = None

    def pages(self) -> attn.PagedKV:
        """The arrays as the attention kernels take them."""
        return attn.PagedKV(self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero)

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def init_cache(cfg: KVCacheConfig) -> PagedKVCache:
    """An empty pool (zeros; never read before written, lengths mask the rest)."""
    lead = (cfg.num_layers, cfg.num_pages, cfg.num_kv_heads)
    # Distinct buffers (no aliasing), so the whole cache can be donated to a jitted step.
    if not cfg.quantized:
        kv = functools.partial(jnp.zeros, (*lead, cfg.page_size, cfg.head_dim), jnp.bfloat16)
        return PagedKVCache(kv(), kv(), None, None, None, None, cfg)
    packed = functools.partial(jnp.zeros, (*lead, cfg.page_size, cfg.head_dim // 2), jnp.uint8)
    # V pages transposed (token axis last): the decode kernel's P V dot reads them 4 bytes at
    # a time instead of 1 (pallas_kernels/kv4_attention.py).
    packed_v = functools.partial(jnp.zeros, (*lead, cfg.head_dim // 2, cfg.page_size), jnp.uint8)
    meta = functools.partial(
        jnp.zeros, (*lead, cfg.head_dim // cfg.group_size, cfg.page_size), kv_quant.SCALE_DTYPE
    )
    rings = (None, None)
    if cfg.recent_window:
        shape = (cfg.num_layers, cfg.window_slots, cfg.num_kv_heads, cfg.recent_window)
        ring = functools.partial(jnp.zeros, (*shape, cfg.head_dim), cfg.window_dtype)
        rings = (ring(), ring())
    return PagedKVCache(packed(), packed_v(), meta(), meta(), meta(), meta(), cfg, *rings)


def _check_new(name: str, x, cfg: KVCacheConfig, n: int):
    x = jnp.asarray(x)
    want = (n, cfg.num_kv_heads, cfg.head_dim)
    if x.shape != want or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating [N, Hkv, D] = {want}, got {x.dtype} {x.shape}")
    return x


# Tokens per program of the KV4 write kernel for prefill chunks (`write_kv`).
PREFILL_WRITE_RUN = 16


def write_kv(
    cache: PagedKVCache, layer, k_new, v_new, slot_mapping, *, kernel: bool = False,
    interpret: bool = False,
) -> PagedKVCache:  # fmt: skip
    """Quantizes (int4) and scatters new tokens' K/V of one layer into their slots.

    Args:
      layer: int or traced int32 scalar.
      k_new, v_new: ``[N, Hkv, D]`` float (K after RoPE), or ``[B, T, Hkv, D]`` (flattened).
      slot_mapping: ``[N]`` (or ``[B, T]``) int32 ``page * page_size + offset``; ``-1`` skips.
      kernel: INT4 cache: quantize and store with the one Pallas kernel
        (`pallas_kernels.kv4_write.kv4_write`, same bytes) instead of XLA's quantize + six
        scatters (`kv4_write_reference`). `interpret` runs the kernel on the CPU. With
        ``[B, T]`` slots and ``T`` a multiple of `PREFILL_WRITE_RUN` (a prefill chunk) the
        kernel takes runs of that many tokens (whole page rows where the run's slots are
        consecutive, token by token where not).

    Returns the updated cache (donate the old one under jit for an in-place update).
    """
    cfg = cache.config
    slot_mapping = jnp.asarray(slot_mapping)
    if slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32, got {slot_mapping.dtype}")
    n = slot_mapping.size
    k_new = _check_new("k_new", jnp.reshape(k_new, (-1, *jnp.shape(k_new)[-2:])), cfg, n)
    v_new = _check_new("v_new", jnp.reshape(v_new, (-1, *jnp.shape(v_new)[-2:])), cfg, n)
    slots = slot_mapping.reshape(n)
    if not cfg.quantized:
        put = kv4_write.token_scatter(layer, slots, cfg.page_size, cfg.num_pages)
        return dataclasses.replace(cache, k=put(cache.k, k_new), v=put(cache.v, v_new))
    if kernel:
        run = PREFILL_WRITE_RUN
        chunked = slot_mapping.ndim == 2 and slot_mapping.shape[1] % run == 0
        run = run if chunked and cfg.page_size % run == 0 else 0
        pages = kv4_write.kv4_write(
            cache.pages(), layer, k_new, v_new, slots, interpret=interpret, run=run
        )
    else:
        pages = kv4_write.kv4_write_reference(cache.pages(), layer, k_new, v_new, slots)
    return dataclasses.replace(cache, **pages._asdict())


def slot_mapping_from_positions(page_table, positions, page_size: int, valid=None):
    """Slots of tokens at ``positions [B, T]`` through ``page_table [B, max_pages]``.

    Returns ``[B, T] int32``; tokens with ``valid`` False (or negative positions) map to -1.
    """
    page_table = jnp.asarray(page_table)
    positions = jnp.asarray(positions, jnp.int32)
    logical = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    phys = jnp.take_along_axis(page_table, logical, axis=1)
    slots = phys * page_size + positions % page_size
    ok = positions >= 0 if valid is None else (jnp.asarray(valid) & (positions >= 0))
    return jnp.where(ok, slots, -1).astype(jnp.int32)


def read_kv(cache: PagedKVCache, layer, page_table, dtype=jnp.float32):
    """Dense dequantized ``(k, v)``, each ``[B, max_pages * page_size, Hkv, D]`` (tests, debug)."""
    return attn.gather_kv(cache.pages(), page_table, layer, dtype)


def paged_attention(
    q,
    k_new,
    v_new,
    cache: PagedKVCache,
    layer,
    page_table,
    seq_lens,
    slot_mapping,
    *,
    mode: Literal["decode", "prefill"] = "decode",
    q_lens=None,
    backend: Literal["pallas", "reference"] = "pallas",
    interpret: bool = False,
    window_slots=None,
    write_kernel: bool = False,
    fused_write: bool = False,
    **kernel_kwargs,
):
    """Writes the new tokens' K/V into the cache, then attends over the cache.

    decode:  q ``[B, Hq, D]``, k_new/v_new ``[B, Hkv, D]``, slot_mapping ``[B]``.
    prefill: q ``[B, T, Hq, D]``, k_new/v_new ``[B, T, Hkv, D]``, slot_mapping ``[B, T]``,
             q_lens ``[B]`` valid chunk tokens (default T).
    seq_lens: ``[B] int32`` tokens per sequence *after* this write.
    window_slots: ``[B] int32`` ring slots of the rows (-1: padding); required when the cache
      has a recent window (`comet_jax.engine.recent_window`: the newest W keys unquantized).
    write_kernel: INT4 cache: write with the Pallas quantize-and-store kernel (`write_kv`).
    fused_write: decode over an INT4 cache without a recent window, ``backend="pallas"``:
      the decode kernel writes the new K/V itself (``paged_decode_attention(new_kv=...)``,
      the same bytes) instead of a write before it; elsewhere the usual write.

    Returns ``(out, cache)``: ``out`` shaped like q (q's dtype; the reference returns f32).
    """
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode={mode!r} must be 'decode' or 'prefill'")
    if backend not in ("pallas", "reference"):
        raise ValueError(f"backend={backend!r} must be 'pallas' or 'reference'")
    cfg = cache.config
    if fused_write and mode == "decode" and backend == "pallas" and cfg.quantized:
        if cfg.recent_window:
            raise ValueError("fused_write: the recent window's decode writes its rings apart")
        out, pages = attn.paged_decode_attention(  # checks the shapes and dtypes
            q, cache.pages(), page_table, seq_lens, layer=layer, interpret=interpret,
            new_kv=(k_new, v_new, slot_mapping), **kernel_kwargs,
        )  # fmt: skip
        return out, dataclasses.replace(cache, **pages._asdict())
    cache = write_kv(
        cache, layer, k_new, v_new, slot_mapping, kernel=write_kernel, interpret=interpret
    )
    if cache.config.recent_window:
        from comet_jax.engine import recent_window

        if window_slots is None:
            raise ValueError("this cache has a recent window: pass window_slots [B] int32")
        if mode == "decode":
            q, k_new, v_new = q[:, None], k_new[:, None], v_new[:, None]
            q_lens = jnp.ones_like(jnp.asarray(seq_lens))
        elif q_lens is None:
            q_lens = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        out, cache = recent_window.windowed_attention(
            q, k_new, v_new, cache, layer, page_table, seq_lens, q_lens, window_slots,
            backend=backend, interpret=interpret, **kernel_kwargs,
        )  # fmt: skip
        out = out[:, 0] if mode == "decode" else out
        return out.astype(q.dtype), cache
    out = attend_pages(
        q, cache.pages(), layer, page_table, seq_lens, q_lens,
        mode=mode, backend=backend, interpret=interpret, kernel_kwargs=kernel_kwargs,
    )  # fmt: skip
    return out, cache


def own_chunk_attention(q, k, v, q_lens, *, implementation: str | None = None):
    """Causal attention of prefill rows over their own chunk's K/V as computed, not read back
    from the pages: what a row with no cached prefix sees when its prompt's keys are not
    quantized for its own prefill (the engine's ``EngineConfig.prefill_own_kv``; K/V still go
    into the cache for the decode steps that follow).

    q ``[B, T, Hq, D]``, k / v ``[B, T, Hkv, D]`` (Hq a multiple of Hkv), q_lens ``[B]`` int32
    valid tokens per row (right padding). Token ``t`` of a row attends to tokens ``0..t`` of
    the same row; scale ``D**-0.5``. Returns ``[B, T, Hq, D]`` in q's dtype; positions at or
    past a row's ``q_len`` (and rows with ``q_len = 0``) hold finite values nobody reads.

    implementation: ``jax.nn.dot_product_attention``'s; None: ``"cudnn"`` (flash attention) on
    a GPU for bf16 / f16 operands, ``"xla"`` otherwise.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"q must be [B, T, Hq, D] and k, v [B, T, Hkv, D], got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    if implementation is None:
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if half and jax.default_backend() == "gpu" else "xla"
    # A padding row (q_len 0) attends to its first key instead of to nothing: finite output.
    lens = jnp.maximum(jnp.asarray(q_lens, jnp.int32), 1)
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True, query_seq_lengths=lens,
        key_value_seq_lengths=lens, implementation=implementation,
    )  # fmt: skip
    return out.astype(q.dtype)


def attend_pages(
    q, pages, layer, page_table, seq_lens, q_lens=None, *, mode, backend, interpret,
    kernel_kwargs=None, **semantics,
):  # fmt: skip
    """Attention over pages that already hold the new tokens: the Pallas kernels or their
    references. decode: q ``[B, Hq, D]``; prefill: q ``[B, T, Hq, D]`` with ``q_lens``.
    ``semantics`` (sm_scale, causal_shift, return_lse) go to both backends, ``kernel_kwargs``
    (schedules, dequantize, ...) to the kernels only."""
    kernel_kwargs = {"interpret": interpret, **(kernel_kwargs or {}), **semantics}
    if mode == "decode":
        if backend == "reference":
            return attn.paged_decode_attention_reference(
                q, pages, page_table, seq_lens, layer=layer, **semantics
            )
        return attn.paged_decode_attention(
            q, pages, page_table, seq_lens, layer=layer, **kernel_kwargs
        )
    if backend == "reference":
        return attn.paged_prefill_attention_reference(
            q, pages, page_table, seq_lens, q_lens, layer=layer, **semantics
        )
    return attn.paged_prefill_attention(
        q, pages, page_table, seq_lens, q_lens, layer=layer, **kernel_kwargs
    )
