"""Hugging Face checkpoint import: local safetensors (+ config.json) -> ModelConfig + Flax params.

No torch: tensors are read with `safetensors.numpy` (bf16 arrives as `ml_dtypes.bfloat16`).
A checkpoint directory holds either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor_name: shard_file}}`).

`params_from_hf_tensors(config, tensors)` is the one place where HF tensor names become the
comet-jax parameter tree (layout in `models/projection.py`). It is shared with the GGUF loader,
which produces the same `{hf_name: np.ndarray [out, in]}` dict (Q/K rows in HF rotate-half
order). Linear weights keep the HF [out, in] layout: no transposes.

    config, params = load_hf_model("/path/to/ckpt", dtype=jnp.float32)
    model = LlamaForCausalLM(config)
    logits, _ = model.apply({"params": params}, tokens, positions)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.llama import layer_specs
from models.projection import GROUP_OF, GROUPS

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# HF tensors that hold no parameter of ours (old checkpoints stored RoPE buffers).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_HF_PROJ_PREFIX = {
    p: ("self_attn" if GROUP_OF[p] in ("attn_in", "o_in") else "mlp") for p in GROUP_OF
}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory as a dict."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"checkpoint path {os.fspath(path)!r} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """Safetensors files of a checkpoint directory (sharded via the index, or single)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValueError(f"{index!r} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"shards {missing} listed in {index!r} do not exist")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"checkpoint directory {path!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a local HF checkpoint: {hf_name: np.ndarray} in their stored dtype."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(path):
        for name, array in load_file(file).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one shard ({file!r})")
            tensors[name] = array
    return tensors


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names and shapes for a config (lm_head only when untied)."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
        for group in GROUPS:
            for spec in layer_specs(config, i)[group].projections:
                base = f"{pre}{_HF_PROJ_PREFIX[spec.name]}.{spec.name}."
                shapes[base + "weight"] = (spec.out_features, spec.in_features)
                if spec.bias:
                    shapes[base + "bias"] = (spec.out_features,)
    return shapes


def params_from_hf_tensors(
    config: ModelConfig, tensors: Mapping[str, Any], dtype: Any = jnp.float32
) -> dict[str, Any]:
    """{hf_name: array [out, in]} -> the model's `params` tree (see models/projection.py).

    Arrays are converted to `dtype` (a jnp/np dtype). Raises ValueError listing missing
    tensors, unexpected tensors, and shape mismatches. With tied embeddings an `lm_head.weight`
    in the checkpoint is ignored (Hugging Face ignores it too).
    """
    expected = hf_tensor_shapes(config)
    names = set(tensors)
    missing = sorted(set(expected) - names)
    unexpected = sorted(
        n
        for n in names - set(expected)
        if not _IGNORED.match(n) and not (config.tie_word_embeddings and n == "lm_head.weight")
    )
    bad_shapes = [
        f"{n}: got {tuple(np.shape(tensors[n]))}, expected {expected[n]}"
        for n in sorted(names & set(expected))
        if tuple(np.shape(tensors[n])) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_abbrev(unexpected)}")
    if bad_shapes:
        problems.append(f"shape mismatches {_abbrev(bad_shapes)}")
    if problems:
        raise ValueError(
            f"checkpoint does not match the {config.family} config: " + "; ".join(problems)
        )

    def get(name):
        return jnp.asarray(np.asarray(tensors[name]), dtype=dtype)

    params: dict[str, Any] = {
        "embed_tokens": get("model.embed_tokens.weight"),
        "final_norm": get("model.norm.weight"),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight")}
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        layer: dict[str, Any] = {
            "input_norm": get(pre + "input_layernorm.weight"),
            "post_attn_norm": get(pre + "post_attention_layernorm.weight"),
        }
        for group in GROUPS:
            for spec in layer_specs(config, i)[group].projections:
                base = f"{pre}{_HF_PROJ_PREFIX[spec.name]}.{spec.name}."
                proj = {"kernel": get(base + "weight")}
                if spec.bias:
                    proj["bias"] = get(base + "bias")
                layer[spec.name] = proj
        params[f"layers_{i}"] = layer
    return params


def _abbrev(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def load_hf_model(
    path: str | os.PathLike, dtype: Any = jnp.float32
) -> tuple[ModelConfig, dict[str, Any]]:
    """Local HF checkpoint directory -> (ModelConfig, params tree in `dtype`)."""
    config = ModelConfig.from_hf(os.fspath(path))
    return config, params_from_hf_tensors(config, load_hf_tensors(path), dtype=dtype)
