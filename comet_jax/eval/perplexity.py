"""Perplexity over fixed, non-overlapping token windows (jitted, batched).

Each window ``[T]`` is one independent forward pass (no state carried between windows); the
model predicts tokens ``1..T-1`` from their prefixes, so a window contributes ``T - 1``
negative log-likelihoods. Perplexity is ``exp(sum NLL / count)`` over all windows. The model
is any `LlamaForCausalLM` (float, simulated-quantized or kernel-backed, with KV4 fake
quantization when its attention carries the KV4 transform); logits are f32 and the log-softmax
is taken in f32.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll / n_tokens); per_window: [n] mean NLL of each window."""

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    window: int
    seconds: float
    per_window: tuple[float, ...]

    def to_dict(self):
        return dataclasses.asdict(self)


def window_nll(logits, tokens):
    """logits: [B, T, V] f32, tokens: [B, T] int32 -> [B] summed NLL of tokens[:, 1:]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = tokens[:, 1:]
    ll = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return -jnp.sum(ll, axis=-1)


def _nll_fn(model):
    @jax.jit
    def run(params, tokens):
        logits, _ = model.apply({"params": params}, tokens)
        return window_nll(logits, tokens)

    return run


def perplexity(
    model,
    params,
    windows,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of `model` on `windows: [n, T] int32` (e.g. `data.text.token_windows`)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {windows.shape}; expected [n >= 1, T >= 2] token ids")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    n, t = windows.shape
    run = _nll_fn(model)
    per = []
    start = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="window", disable=not progress)
    for lo in range(0, n, batch_size):
        batch = windows[lo : lo + batch_size]
        pad = batch_size - batch.shape[0]
        if pad:  # keep one compiled shape; padded rows are dropped below
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        nll = np.asarray(jax.device_get(run(params, jnp.asarray(batch, jnp.int32))), np.float64)
        per.extend(nll[: batch_size - pad].tolist())
        bar.update(batch_size - pad)
    bar.close()
    total = float(np.sum(per))
    count = n * (t - 1)
    return PerplexityResult(
        ppl=math.exp(total / count),
        nll=total,
        n_tokens=count,
        n_windows=n,
        window=t,
        seconds=time.perf_counter() - start,
        per_window=tuple(p / (t - 1) for p in per),
    )
