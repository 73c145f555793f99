"""Token sampling: per-request parameters, the batched on-device sampler, and stop handling.

`sample_tokens` runs on the device over the last-position logits of each row (in the engine,
as a small jitted function after the model's step), so only B int32 token ids leave the
device per step. Each row has its own temperature, top-k, top-p
and seed; the random key of a row is determined by (seed, counter) with counter = the
index of the token being generated, so a request's samples do not depend on which other
requests share its batch (and a recomputed request after preemption draws the same tokens).
The draw is Gumbel-max over a counter-based hash of (seed, counter, token id).

Stop strings are checked on the host over the incrementally decoded text (`TextStream`), which
holds back the tail that could still turn into a stop string, so streamed text never has to be
taken back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 = greedy (argmax); > 0 scales logits. top_k: 0 = off. top_p: 1 = off.
    seed: per-request RNG seed (None: the engine's seed). max_tokens: new tokens at most.
    stop_token_ids: extra token ids that end the request (the EOS id is added unless
    ignore_eos). stop: strings that end the request; the text is cut before the match.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or (self.max_tokens < 1)
        ):
            raise ValueError(f"max_tokens={self.max_tokens!r}; expected an int >= 1")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r}; expected a number >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r}; expected a number in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed={self.seed!r}; expected an int >= 0 or None")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}; expected non-empty strings")


def _bisect_threshold(x: jax.Array, pred, iters: int = 32) -> jax.Array:
    """Largest t (to f32 bisection precision) with pred(x >= t) true, per row.

    x: [B, V] finite; pred(keep: [B, V] bool) -> [B] bool must hold at t = min(x) and be
    monotone (true for small t). Bisection over values instead of a vocabulary sort: the loop
    body is a few reductions, cheap to compile and O(iters * V) to run.
    """
    lo = jnp.min(x, axis=-1)
    hi = jnp.max(x, axis=-1) + 1.0

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = pred(x >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return lo


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled: [B, V] f32 -> logits outside the top-k, then outside the top-p nucleus of the
    renormalised rest, set to -inf. top_k 0 / top_p 1 leave a row unchanged."""
    neg_inf = jnp.float32(-jnp.inf)
    k = jnp.where(top_k > 0, top_k, scaled.shape[-1])
    t_k = _bisect_threshold(scaled, lambda keep: jnp.sum(keep, axis=-1) >= k)
    scaled = jnp.where(scaled >= t_k[:, None], scaled, neg_inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    floor = jnp.min(jnp.where(jnp.isfinite(scaled), scaled, jnp.inf), axis=-1, keepdims=True)
    t_p = _bisect_threshold(
        jnp.maximum(scaled, floor), lambda keep: jnp.sum(jnp.where(keep, probs, 0), -1) >= top_p
    )
    t_p = jnp.where(top_p < 1.0, t_p, neg_inf)
    return jnp.where(scaled >= t_p[:, None], scaled, neg_inf)


def needs_filter(top_k, top_p) -> bool:
    """Host-side: whether any row of a batch uses top-k or top-p (numpy [B] arrays)."""
    return bool(np.any(np.asarray(top_k) > 0) or np.any(np.asarray(top_p) < 1.0))


# The engine's sampler executables, one per kind (`sampler_kind`).
SAMPLER_KINDS = ("greedy", "sample", "filter")


def sampler_kind(temperature, top_k, top_p) -> str:
    """Host-side choice of sampler for a batch (numpy [B] arrays): "greedy" when no row
    samples (temperature 0 everywhere, padding rows included): the argmax alone, without
    the Gumbel noise's hash and two logs per [B, V] element (8B engine at batch 1214 on the
    H100: median decode step 47.93 -> 47.59 ms, docs/benchmarks.md run 75); "filter" when a
    row uses top-k or top-p; else
    "sample". The tokens are those of `sample_tokens` with the choice made on the device."""
    if not np.any(np.asarray(temperature) > 0):
        return "greedy"
    return "filter" if needs_filter(top_k, top_p) else "sample"


def sample_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counters: jax.Array,
    *,
    filtered: bool | None = None,
    greedy_only: bool = False,
) -> jax.Array:
    """Samples one token per row.

    logits: [B, V] f32; temperature, top_p: [B] f32; top_k, seeds, counters: [B] int32.
    Returns [B] int32. Rows with temperature 0 are greedy.
    filtered: whether the top-k/top-p filter runs. None decides on the device (`lax.cond`
    over "some row uses it"); on a GPU that copies the predicate to the host and blocks the
    host until every kernel before it has run, so the engine decides on the host instead
    (`needs_filter`) and passes True/False (static: one compiled sampler each). A row with
    top_k 0 and top_p 1 is unchanged by the filter, so True is always correct, only slower.
    greedy_only: every row is greedy (the caller knows all temperatures are 0): the argmax
    alone, the same tokens without the noise and the filter.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return greedy
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t[:, None]
    if filtered is None:
        scaled = jax.lax.cond(
            jnp.any((top_k > 0) | (top_p < 1.0)),
            _filter_top_k_top_p,
            lambda s, k, p: s,
            scaled,
            top_k,
            top_p,
        )
    elif filtered:
        scaled = _filter_top_k_top_p(scaled, top_k, top_p)
    u = _uniform_noise(seeds, counters, scaled.shape[-1])
    drawn = jnp.argmax(scaled - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)  # Gumbel-max
    return jnp.where(temperature > 0, drawn, greedy)


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (xorshift-multiply): adjacent inputs -> unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _uniform_noise(seeds: jax.Array, counters: jax.Array, vocab: int) -> jax.Array:
    """[B, V] f32 uniforms in (0, 1), a pure function of (seed, counter, token index).

    A counter-based hash instead of jax.random: it compiles in a fraction of the time of a
    vmapped threefry draw (this sits in every step bucket) and needs no key plumbing.
    """
    row = _mix32(seeds.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x632BE5AB))
    row = _mix32(row ^ counters.astype(jnp.uint32))
    col = jnp.arange(vocab, dtype=jnp.uint32)[None, :]
    bits = _mix32(row[:, None] ^ (col * jnp.uint32(0x85EBCA77)))
    return ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


class TextStream:
    """Incremental detokenization with stop strings.

    `push(token_ids_so_far)` returns the newly final text (delta); the text never includes a
    stop string (`stopped` turns True). Text that could still be the start of a stop string,
    or an incomplete UTF-8 sequence, is held back until it is decided. Each push decodes only
    the tokens since the previous one plus one earlier chunk of context (tokenizers whose
    decoding depends on the left neighbour, e.g. SentencePiece's leading space, stay right),
    so a long completion costs O(new tokens) per step, not O(length).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._prefix = 0  # ids[_prefix:_read] is the context chunk decoded last time
        self._read = 0  # ids[:_read] are in _text
        self._text = ""
        self.emitted = ""
        self.stopped = False

    def _full_text(self, ids: Sequence[int], final: bool) -> str:
        prev = self._decode(ids[self._prefix : self._read])
        cur = self._decode(ids[self._prefix :])
        new = cur[len(prev) :]
        if not final and new.endswith("\ufffd"):
            # A multi-byte character cut in half: show what precedes it, commit nothing yet.
            return self._text + new.rstrip("\ufffd")
        self._text += new
        self._prefix, self._read = self._read, len(ids)
        return self._text

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self._full_text(list(token_ids), final)
        for s in self._stop:
            # Search from where a new match could start.
            idx = text.find(s, max(0, len(self.emitted) - len(s) + 1))
            if idx >= 0:
                text, self.stopped = text[:idx], True
        if self.stopped or final:
            ready = text
        else:
            ready = text[: max(len(self.emitted), len(text) - self._hold)]
        delta = ready[len(self.emitted) :]
        self.emitted = ready
        return delta
