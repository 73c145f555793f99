"""`ModelConfig`: the static description of a LLaMA-family decoder (LLaMA-2/3/3.1, Mistral, Qwen2).

The config is a frozen, hashable dataclass of plain values so it can be a static attribute of a
Flax module and a `jax.jit` static argument. `ModelConfig.from_hf` reads a Hugging Face
config (a local checkpoint directory, a `config.json` path, a dict, or a
`transformers.PretrainedConfig`) through the `transformers` config classes, which normalise
the RoPE fields across versions (`rope_theta`/`rope_scaling` in 4.x, `rope_parameters` in 5.x).

RoPE scaling is stored as a tuple of sorted `(key, value)` pairs (hashable); read it with
`config.rope_scaling_dict`. Supported `rope_type`s: "default" (stored as None), "linear"
(`factor`) and "llama3" (`factor`, `low_freq_factor`, `high_freq_factor`,
`original_max_position_embeddings`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2")

_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a LLaMA-family causal LM.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
      head_dim: shapes (q_proj: [num_heads*head_dim, hidden], k/v_proj:
        [num_kv_heads*head_dim, hidden]; num_heads must be a multiple of num_kv_heads).
      rope_theta: RoPE base.
      rope_scaling: None, or sorted ((key, value), ...) pairs including ("rope_type", ...).
      rms_norm_eps: RMSNorm epsilon.
      tie_word_embeddings: lm_head shares the embedding matrix.
      attention_bias: q/k/v projections carry a bias (Qwen2; LLaMA with attention_bias).
      o_proj_bias: o_proj carries a bias (LLaMA `attention_bias=True` only; Qwen2 has none).
      mlp_bias: gate/up/down projections carry a bias (LLaMA `mlp_bias=True`).
      max_position_embeddings: context length the checkpoint was trained for.
      sliding_window: Mistral-style attention window (None = full causal attention).
      family: "llama", "mistral" or "qwen2".
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    family: str = "llama"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; expected one of {FAMILIES}")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if isinstance(self.rope_scaling, Mapping):
            # Accept a dict for convenience; store the hashable form.
            object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        elif self.rope_scaling is not None:
            _normalize_rope_scaling(dict(self.rope_scaling))  # validate

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, source: Any) -> ModelConfig:
        """Builds a config from a HF checkpoint dir, `config.json` path, dict or PretrainedConfig."""
        return _from_hf_config(_to_pretrained_config(source))


def _normalize_rope_scaling(
    scaling: Mapping[str, Any] | None,
) -> tuple[tuple[str, Any], ...] | None:
    if scaling is None:
        return None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in _ROPE_KEYS:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported; expected 'default' or one "
            f"of {tuple(_ROPE_KEYS)}"
        )
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in _ROPE_KEYS[rope_type]:
        if scaling.get(key) is None:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}; got {scaling}")
        out[key] = float(scaling[key])
    if rope_type == "llama3":
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
        if not out["high_freq_factor"] > out["low_freq_factor"]:
            raise ValueError(
                f"rope_scaling high_freq_factor={out['high_freq_factor']} must exceed "
                f"low_freq_factor={out['low_freq_factor']}"
            )
    if not out["factor"] > 0:
        raise ValueError(f"rope_scaling factor={out['factor']} must be > 0")
    return tuple(sorted(out.items()))


def _to_pretrained_config(source: Any):
    import transformers

    if isinstance(source, transformers.PretrainedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"checkpoint directory {path!r} has no config.json")
            return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if os.path.isfile(path):
            with open(path) as f:
                source = json.load(f)
        else:
            raise ValueError(f"config source {path!r} is neither a directory nor a file")
    if not isinstance(source, Mapping):
        raise ValueError(
            f"config source of type {type(source).__name__} is not supported; expected a path, "
            "a dict or a transformers.PretrainedConfig"
        )
    source = dict(source)
    model_type = source.pop("model_type", None)
    if model_type is None:
        archs = source.get("architectures") or []
        guesses = {
            "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2",
        }
        model_type = next((guesses[a] for a in archs if a in guesses), None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"config model_type={model_type!r} is not supported; expected one of {FAMILIES}"
        )
    return transformers.AutoConfig.for_model(model_type, **source)


def _rope_fields(hf) -> tuple[float, dict | None]:
    # transformers 5.x: `rope_parameters` holds rope_theta and the scaling; 4.x: separate fields.
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, Mapping) and params:
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        return float(theta), dict(params)
    return float(getattr(hf, "rope_theta", 10000.0)), getattr(hf, "rope_scaling", None)


def _from_hf_config(hf) -> ModelConfig:
    family = getattr(hf, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not supported; expected one of {FAMILIES}")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu' (SwiGLU)")
    num_heads = hf.num_attention_heads
    num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    theta, scaling = _rope_fields(hf)
    attention_bias = bool(getattr(hf, "attention_bias", False))
    o_proj_bias = attention_bias
    sliding_window = None
    if family == "qwen2":
        attention_bias, o_proj_bias = True, False
        if getattr(hf, "use_sliding_window", False):
            raise ValueError("qwen2 use_sliding_window=True is not supported")
    elif family == "mistral":
        sliding_window = getattr(hf, "sliding_window", None)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=_normalize_rope_scaling(scaling),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        max_position_embeddings=hf.max_position_embeddings,
        sliding_window=sliding_window,
        family=family,
    )
