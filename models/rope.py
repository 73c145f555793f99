"""Rotary position embeddings (Hugging Face "rotate-half" convention) with LLaMA-3 scaling.

Per head of size D, channel i < D/2 is paired with channel i + D/2 and the pair is rotated by
`positions * inv_freq[i]`. (llama.cpp's interleaved convention pairs (2i, 2i+1); GGUF Q/K rows
are un-permuted on import so this convention applies everywhere in comet-jax.)

`inv_freq` is computed in float32 exactly as the reference implementation does, so logits
match it to float32 rounding at any position.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """inv_freq: [head_dim/2] f32, with "linear" or "llama3" frequency scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    factor = scaling["factor"]
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r}; expected 'linear' or 'llama3'")
    # LLaMA-3.1: long wavelengths (beyond the original context / low_freq_factor) are slowed
    # down by `factor`, short ones (below context / high_freq_factor) are kept, and the band
    # between is interpolated linearly in 1/wavelength.
    old_ctx = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def config_inv_freq(config: ModelConfig) -> np.ndarray:
    """inv_freq: [head_dim/2] f32 for a model config."""
    return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict)


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions: [B, T] int -> (cos, sin): [B, T, D/2] f32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, H, D]; cos/sin: [B, T, D/2] f32 -> rotated x in x.dtype (math in f32)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
