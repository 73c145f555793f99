"""Parity of the Flax LLaMA family with transformers' own forward pass on tiny random models.

Each case builds a tiny random transformers model (torch CPU, float32; all weights, norms and
biases redrawn so nothing is zero or one), saves it as safetensors, loads it with
`comet_jax.checkpoint.hf.load_hf_model` and compares logits.

Tolerances: float32 logits within 1e-4 absolute (logits are O(1): both sides compute the same
float32 math in a different order); bfloat16 compute within 5e-2 * max|logit| (bf16 keeps
8 mantissa bits; two layers of rounding).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from comet_jax.checkpoint.hf import (  # noqa: E402
    hf_tensor_shapes,
    load_hf_model,
    load_hf_tensors,
    params_from_hf_tensors,
)
from models import LlamaForCausalLM, ModelConfig  # noqa: E402

F32_TOL = 1e-4
BF16_REL_TOL = 5e-2

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)

FAMILIES = {
    "llama2_mha": ("llama", dict(num_key_value_heads=4)),
    "llama31_gqa_rope_scaling": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral_sliding_window": ("mistral", dict(head_dim=16, sliding_window=5)),
    "qwen2_qkv_bias": ("qwen2", dict(rope_theta=1000000.0, use_sliding_window=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
}


def _hf_model(family: str, overrides: dict, seed: int = 0):
    model_type, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return model


def _save(model, path, **kwargs) -> str:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return os.fspath(path)


def _hf_logits(model, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.float().numpy()


def _inputs(batch=2, length=12, offset=0, vocab=128, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length) + offset, (batch, length)).astype(np.int32)
    return tokens, positions


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    model = _hf_model(family, {})
    path = _save(model, tmp_path)
    config, params = load_hf_model(path)
    assert config.family == FAMILIES[family][0]
    # Offset positions so RoPE (and llama3 scaling) is exercised beyond small angles.
    tokens, positions = _inputs(offset=40)
    want = _hf_logits(model, tokens, positions)
    got, _ = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, tokens, positions)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=F32_TOL, rtol=0)


def test_config_fields_from_hf(tmp_path):
    model = _hf_model("llama31_gqa_rope_scaling", {})
    cfg = ModelConfig.from_hf(_save(model, tmp_path))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling_dict == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    qwen = ModelConfig.from_hf(_hf_model("qwen2_qkv_bias", {}).config)
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.family == "qwen2"
    mistral = ModelConfig.from_hf(_hf_model("mistral_sliding_window", {}).config.to_dict())
    assert mistral.sliding_window == 5 and mistral.head_dim == 16
    # Old-style (transformers 4.x) config.json fields are accepted too.
    old = dict(
        _COMMON, model_type="llama", rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}
    )
    old.pop("attn_implementation")
    assert ModelConfig.from_hf(old).rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}


def test_sharded_checkpoint(tmp_path):
    model = _hf_model("llama31_gqa_rope_scaling", {})
    path = _save(model, tmp_path, max_shard_size="40KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2
    config, params = load_hf_model(path)
    tokens, positions = _inputs(batch=1, length=9)
    got, _ = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, tokens, positions)
    np.testing.assert_allclose(np.asarray(got), _hf_logits(model, tokens, positions), atol=F32_TOL)


def test_bf16_compute_close(tmp_path):
    model = _hf_model("qwen2_qkv_bias", {})
    config, params = load_hf_model(_save(model, tmp_path), dtype=jnp.bfloat16)
    assert params["layers_0"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    tokens, positions = _inputs()
    want = _hf_logits(model, tokens, positions)
    got, _ = jax.jit(LlamaForCausalLM(config, dtype=jnp.bfloat16).apply)(
        {"params": params}, tokens, positions
    )
    assert got.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(got) - want))
    assert err <= BF16_REL_TOL * np.max(np.abs(want)), err


def test_tensor_errors(tmp_path):
    model = _hf_model("qwen2_qkv_bias", {})
    path = _save(model, tmp_path)
    config = ModelConfig.from_hf(path)
    tensors = load_hf_tensors(path)
    assert set(tensors) == set(hf_tensor_shapes(config))

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="missing tensors.*layers.1.self_attn.k_proj.bias"):
        params_from_hf_tensors(config, missing)

    extra = dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensors.*o_proj.bias"):
        params_from_hf_tensors(config, extra)

    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 96), np.float32)
    with pytest.raises(ValueError, match=r"up_proj.weight: got \(64, 96\), expected \(96, 64\)"):
        params_from_hf_tensors(config, bad)

    # Legacy RoPE buffers are ignored.
    legacy = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)})
    params_from_hf_tensors(config, legacy)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither model.safetensors"):
        load_hf_tensors(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a directory"):
        load_hf_tensors(tmp_path / "nowhere")


def test_dense_padding_mask_matches_unpadded(tmp_path):
    """A right-padded ragged batch gives, on valid positions, the logits of each sequence alone."""
    model = _hf_model("llama31_gqa_rope_scaling", {})
    config, params = load_hf_model(_save(model, tmp_path))
    apply = jax.jit(LlamaForCausalLM(config).apply)
    lengths = np.array([11, 4, 1], np.int32)
    t = 11
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 128, (3, t)).astype(np.int32)
    positions = np.broadcast_to(np.arange(t), (3, t)).astype(np.int32)
    batched, state = apply({"params": params}, tokens, positions, cache=jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(state), lengths)  # dense state passes through
    for b, n in enumerate(lengths[1:], start=1):  # row 0 is unpadded
        alone, _ = apply({"params": params}, tokens[b : b + 1, :n], positions[b : b + 1, :n])
        np.testing.assert_allclose(np.asarray(batched[b, :n]), np.asarray(alone[0]), atol=1e-5)

    # Left padding with a [B, T] valid mask and true positions gives the same logits.
    left_tokens = np.zeros_like(tokens)
    left_pos = np.zeros_like(positions)
    valid = np.zeros((3, t), bool)
    for b, n in enumerate(lengths):
        left_tokens[b, t - n :] = tokens[b, :n]
        left_pos[b, t - n :] = np.arange(n)
        valid[b, t - n :] = True
    left, _ = apply({"params": params}, left_tokens, left_pos, cache=jnp.asarray(valid))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(
            np.asarray(left[b, t - n :]), np.asarray(batched[b, :n]), atol=1e-5
        )
