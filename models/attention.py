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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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
) -> jax.Array:
    """Causal grouped-query attention reference, softmax in f32.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with S == T (query t sits at key index t);
    key_valid: [B, S] bool or None. Returns [B, T, Hq, D] in q.dtype.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"q heads {hq} must be a multiple of kv heads {hkv}")
    if causal and s != t:
        raise ValueError(f"causal dense attention needs equal q/k lengths, got T={t}, S={s}")
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum(
        "bthgd,bshd->bhgts", qg, k, precision=precision, preferred_element_type=jnp.float32
    )
    scores = scores * (d**-0.5)
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
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhgts,bshd->bthgd",
        probs.astype(v.dtype),
        v,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
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
    """Full causal attention over the current tokens; state = None | lengths | valid mask."""

    sliding_window: int | None = None
    kv_transform: Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]] | None = None
    precision: str | None = "highest"

    def __call__(self, q, k, v, layer_idx, cache_state):
        if self.kv_transform is not None:
            k, v = self.kv_transform(k, v, layer_idx)
        key_valid = key_valid_from_state(cache_state, q.shape[0], q.shape[1])
        out = dense_attention(
            q,
            k,
            v,
            key_valid=key_valid,
            sliding_window=self.sliding_window,
            precision=self.precision,
        )
        return out, cache_state
