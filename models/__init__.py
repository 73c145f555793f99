"""Flax LLaMA-family models with pluggable projection backends and attention."""

from models.attention import (
    CachedDenseAttention,
    DenseAttention,
    DenseKVCache,
    dense_attention,
    masked_attention,
)
from models.config import ModelConfig
from models.llama import DecoderLayer, LlamaForCausalLM, abstract_params, init_params, layer_specs
from models.projection import (
    GROUP_OF,
    GROUPS,
    PROJECTIONS,
    PROJECTIONS_OF,
    FloatLinear,
    GroupSpec,
    LinearBackend,
    LinearPlan,
    ProjSpec,
    rms_norm,
)
from models.rope import apply_rope, config_inv_freq, rope_cos_sin, rope_inv_freq

__all__ = [
    "GROUPS",
    "GROUP_OF",
    "PROJECTIONS",
    "PROJECTIONS_OF",
    "CachedDenseAttention",
    "DecoderLayer",
    "DenseKVCache",
    "DenseAttention",
    "FloatLinear",
    "GroupSpec",
    "LinearBackend",
    "LinearPlan",
    "LlamaForCausalLM",
    "ModelConfig",
    "ProjSpec",
    "abstract_params",
    "apply_rope",
    "config_inv_freq",
    "dense_attention",
    "init_params",
    "masked_attention",
    "layer_specs",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
]
