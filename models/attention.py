"""Pluggable attention: the decoder layer hands post-RoPE q/k/v to an attention callable.

Protocol (any hashable callable, typically a frozen dataclass):

    out, new_state = attention(q, k, v, layer_idx, cache_state)
      q: [B, T, Hq, D], k, v: [B, T, Hkv, D]   (compute dtype; K already rotated)
      out: [B, T, Hq, D] in q.dtype

`cache_state` is the `cache=` argument of `LlamaForCausalLM.__call__`, threaded through the
layers in order: layer i receives what layer i-1 returned and the model returns the last one.
A paged KV cache keeps all layers in one state and updates slice `layer_idx`.

`DenseAttention` (the default) is full causal attention within the current call (no cache):
its state is None, or a per-sequence valid length `[B] int32`, or a valid mask `[B, T] bool`,
and it is returned unchanged. Keys at invalid positions are masked out; outputs at invalid
query positions are finite but meaningless. Causality is by index in T, so right padding and
left padding both work (give RoPE the true positions). `kv_transform` lets accuracy studies
simulate a quantized cache: `(k, v, layer_idx) -> (k, v)` applied before attention.
`kv_recent_window = W > 0` simulates a cache that keeps its newest W tokens untransformed: query
t reads keys/values at indices s > t - W (itself and the W-1 before it) as computed and older
ones through `kv_transform`, so each key is read in two formats depending on the query.

`CachedDenseAttention` + `DenseKVCache` is the float reference for incremental decoding: the
state is a contiguous per-layer cache that each layer writes its new K/V into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_valid: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    precision: str | None = "highest",
    recent_kv: tuple[jax.Array, jax.Array] | None = None,
    recent_window: int = 0,
) -> jax.Array:
    """Causal grouped-query attention reference, softmax in f32.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with S == T (query t sits at key index t);
    key_valid: [B, S] bool or None. Returns [B, T, Hq, D] in q.dtype.
    recent_kv, recent_window: a second (k, v) pair, same shapes, read instead of k, v for the
    keys s > t - recent_window of query t (the query and the recent_window - 1 keys before it,
    by index; causal only). recent_window = 0 ignores recent_kv.
    """
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads {hq} must be a multiple of kv heads {hkv}")
    if causal and s != t:
        raise ValueError(f"causal dense attention needs equal q/k lengths, got T={t}, S={s}")
    mask = jnp.ones((b, t, s), bool)
    if causal:
        qi = jnp.arange(t)[:, None]
        ki = jnp.arange(s)[None, :]
        allowed = ki <= qi
        if sliding_window is not None:
            allowed &= ki > qi - sliding_window
        mask &= allowed[None]
    if key_valid is not None:
        mask &= key_valid[:, None, :]
    if not recent_window:
        return masked_attention(q, k, v, mask, precision=precision)
    if recent_window < 0 or not causal or recent_kv is None:
        raise ValueError(
            f"recent_window={recent_window} needs causal=True and recent_kv=(k, v), and must "
            "be >= 0"
        )
    recent = jnp.arange(s)[None, :] > jnp.arange(t)[:, None] - recent_window  # [T, S]
    return masked_attention(q, k, v, mask, precision=precision, recent=(recent[None], *recent_kv))


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    precision: str | None = "highest",
    recent: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool -> [B, T, Hq, D] q.dtype.

    Scores and softmax in f32 (scale D^-0.5); probabilities cast to v.dtype for the PV product.
    recent: optional (select [B or 1, T, S] bool, k2, v2 [B, S, Hkv, D]): where select[b, t, s]
    holds, query t scores key s against k2 and takes its value from v2 (one softmax over both).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)

    def qk(keys):
        return jnp.einsum(
            "bthgd,bshd->bhgts", qg, keys, precision=precision, preferred_element_type=jnp.float32
        )

    def pv(p, vals):
        return jnp.einsum(
            "bhgts,bshd->bthgd",
            p.astype(vals.dtype),
            vals,
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    scores = qk(k)
    if recent is not None:
        sel = recent[0][:, None, None]  # [B|1, 1, 1, T, S]
        scores = jnp.where(sel, qk(recent[1]), scores)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if recent is None:
        out = pv(probs, v)
    else:
        out = pv(jnp.where(sel, 0.0, probs), v) + pv(jnp.where(sel, probs, 0.0), recent[2])
    return out.reshape(b, t, hq, d).astype(q.dtype)


def key_valid_from_state(state: Any, batch: int, length: int) -> jax.Array | None:
    """Dense state (None | lengths [B] | valid mask [B, T]) -> key_valid [B, T] bool or None."""
    if state is None:
        return None
    state = jnp.asarray(state)
    if state.ndim == 1 and state.shape[0] == batch:
        return jnp.arange(length)[None, :] < state[:, None]
    if state.shape == (batch, length):
        return state.astype(bool)
    raise ValueError(
        f"dense attention state of shape {state.shape}; expected None, lengths [{batch}] or a "
        f"valid mask [{batch}, {length}]"
    )


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Full causal attention over the current tokens; state = None | lengths | valid mask.

    kv_recent_window: W > 0 (needs kv_transform) reads the keys/values within W of each query
    untransformed and older ones transformed (module docstring); 0 transforms every key.
    """

    sliding_window: int | None = None
    kv_transform: Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]] | None = None
    precision: str | None = "highest"
    kv_recent_window: int = 0

    def __post_init__(self):
        w = self.kv_recent_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"kv_recent_window={w!r} must be an int >= 0")
        if w and self.kv_transform is None:
            raise ValueError(f"kv_recent_window={w} needs a kv_transform (nothing to keep out of)")

    def __call__(self, q, k, v, layer_idx, cache_state):
        recent_kv = None
        if self.kv_transform is not None:
            if self.kv_recent_window:
                recent_kv = (k, v)
            k, v = self.kv_transform(k, v, layer_idx)
        key_valid = key_valid_from_state(cache_state, q.shape[0], q.shape[1])
        out = dense_attention(
            q,
            k,
            v,
            key_valid=key_valid,
            sliding_window=self.sliding_window,
            precision=self.precision,
            recent_kv=recent_kv,
            recent_window=self.kv_recent_window if recent_kv is not None else 0,
        )
        return out, cache_state


@flax.struct.dataclass
class DenseKVCache:
    """Contiguous float KV cache (a pytree), the simple reference for incremental decoding.

    k, v: [L, B, S, Hkv, D] (K after RoPE); lengths: [B] int32 tokens already cached per
    sequence. A forward call writes its T new tokens of sequence b at slots lengths[b]..+T-1
    (query t of sequence b sits at position lengths[b] + t); the attention never moves
    `lengths`: after the call, `advance(n_new)` adds the number of valid new tokens (T, or
    per-sequence counts [B] for a right-padded ragged chunk; padded slots are overwritten later).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=jnp.float32) -> DenseKVCache:
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    def advance(self, n_new) -> DenseKVCache:
        return self.replace(lengths=self.lengths + jnp.asarray(n_new, jnp.int32))


@dataclasses.dataclass(frozen=True)
class CachedDenseAttention:
    """Causal attention through a `DenseKVCache` (prefill and decode alike); state = the cache.

    Positions handed to the model must equal `cache.lengths[:, None] + arange(T)`. Keep
    lengths + T <= S: `dynamic_update_slice` clamps an overflowing start index, which would
    overwrite earlier slots (checking would need a host sync inside jit).
    """

    sliding_window: int | None = None
    kv_transform: Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]] | None = None
    precision: str | None = "highest"

    def __call__(self, q, k, v, layer_idx, cache_state: DenseKVCache):
        if not isinstance(cache_state, DenseKVCache):
            raise ValueError(
                f"CachedDenseAttention state of type {type(cache_state).__name__}; expected "
                "DenseKVCache (pass cache=DenseKVCache.create(...) to the model)"
            )
        if self.kv_transform is not None:
            k, v = self.kv_transform(k, v, layer_idx)
        cache = cache_state
        write = jax.vmap(
            lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0)
        )
        k_all = write(cache.k[layer_idx], k.astype(cache.k.dtype), cache.lengths)  # [B, S, Hkv, D]
        v_all = write(cache.v[layer_idx], v.astype(cache.v.dtype), cache.lengths)
        t, s = q.shape[1], k_all.shape[1]
        q_pos = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
        k_idx = jnp.arange(s)[None, None, :]
        mask = k_idx <= q_pos[:, :, None]
        if self.sliding_window is not None:
            mask &= k_idx > q_pos[:, :, None] - self.sliding_window
        out = masked_attention(
            q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, precision=self.precision
        )
        new_cache = cache.replace(
            k=cache.k.at[layer_idx].set(k_all), v=cache.v.at[layer_idx].set(v_all)
        )
        return out, new_cache
