"""GGUF import: name mapping, dequantization, Q/K un-permutation, and the real model's float
forward pass (numpy, HF rotate-half RoPE) on Pride and Prejudice."""

from __future__ import annotations

import numpy as np
import pytest

from comet_jax.checkpoint.gguf import (
    gguf_to_hf_name,
    load_gguf,
    permute_qk_to_gguf,
    read_gguf_metadata,
    unpermute_qk_from_gguf,
)

# A tiny LLaMA: d=64 (two 32-wide quant blocks), 4 query heads / 2 KV heads of 16, FFN 96.
TINY = dict(d=64, ffn=96, heads=4, kv=2, hd=16, layers=2, vocab=40)


def _tiny_hf_params(rng, untied: bool) -> dict[str, np.ndarray]:
    d, f, hd = TINY["d"], TINY["ffn"], TINY["hd"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], d), "model.norm.weight": (d,)}
    if untied:
        shapes["lm_head.weight"] = (TINY["vocab"], d)
    for i in range(TINY["layers"]):
        pre = f"model.layers.{i}."
        shapes |= {
            pre + "input_layernorm.weight": (d,),
            pre + "post_attention_layernorm.weight": (d,),
            pre + "self_attn.q_proj.weight": (TINY["heads"] * hd, d),
            pre + "self_attn.k_proj.weight": (TINY["kv"] * hd, d),
            pre + "self_attn.v_proj.weight": (TINY["kv"] * hd, d),
            pre + "self_attn.o_proj.weight": (d, TINY["heads"] * hd),
            pre + "mlp.gate_proj.weight": (f, d),
            pre + "mlp.up_proj.weight": (f, d),
            pre + "mlp.down_proj.weight": (d, f),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    """Written independently of the module under test (the inverse direction)."""
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf]


def _write_tiny_gguf(path, params, quant=None) -> None:
    """Write `params` (HF names/order) the way llama.cpp's converter does: llama.cpp names,
    Q/K rows permuted for interleaved RoPE. `quant`: {hf_name: GGMLQuantizationType}."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["layers"])
    w.add_context_length(512)
    w.add_embedding_length(TINY["d"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(TINY["vocab"])
    w.add_rope_dimension_count(TINY["hd"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, arr in params.items():
        if ".q_proj." in name:
            arr = permute_qk_to_gguf(arr, TINY["heads"])
        elif ".k_proj." in name:
            arr = permute_qk_to_gguf(arr, TINY["kv"])
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(arr))
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_roundtrip_names_layout_and_qk_order(tmp_path, untied):
    params = _tiny_hf_params(np.random.default_rng(0), untied)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, params)

    config, loaded = load_gguf(path)
    assert loaded.keys() == params.keys()
    for name, ref in params.items():
        # F32 storage and an exact inverse permutation: bit-exact.
        np.testing.assert_array_equal(loaded[name], ref, err_msg=name)
        assert loaded[name].dtype == np.float32
    assert config["tie_word_embeddings"] is (not untied)
    assert config["num_hidden_layers"] == TINY["layers"]
    assert config["hidden_size"] == TINY["d"]
    assert config["intermediate_size"] == TINY["ffn"]
    assert config["num_attention_heads"] == TINY["heads"]
    assert config["num_key_value_heads"] == TINY["kv"]
    assert config["head_dim"] == TINY["hd"]
    assert config["vocab_size"] == TINY["vocab"]
    assert config["max_position_embeddings"] == 512
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0

    # Without un-permutation the Q/K rows come back in llama.cpp's interleaved order.
    _, raw = load_gguf(path, unpermute_qk=False, names=["model.layers.1.self_attn.k_proj.weight"])
    k = params["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(
        raw["model.layers.1.self_attn.k_proj.weight"], permute_qk_to_gguf(k, TINY["kv"])
    )


def test_tiny_gguf_quantized_tensors(tmp_path):
    import gguf

    Q = gguf.GGMLQuantizationType
    params = _tiny_hf_params(np.random.default_rng(1), untied=False)
    quant = {
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_1,
        "model.layers.0.mlp.down_proj.weight": Q.Q4_1,
        "model.layers.1.mlp.up_proj.weight": Q.F16,
    }
    path = tmp_path / "tiny_q.gguf"
    _write_tiny_gguf(path, params, quant)
    _, loaded = load_gguf(path)
    for name, qtype in quant.items():
        ref, got = params[name], loaded[name]
        assert got.shape == ref.shape and got.dtype == np.float32
        blocks = ref.reshape(ref.shape[0], -1, 32)  # quant groups of 32 along the input
        absmax = np.abs(blocks).max(-1, keepdims=True)
        # Half a quantization step, plus the f16 rounding of the block's scale/min (2^-11
        # relative, times up to absmax): the bound of round-to-nearest with f16 block params.
        if qtype == Q.Q8_0:  # symmetric, step = absmax/127
            tol = absmax / 127 / 2 + absmax * 2.0**-10
        elif qtype == Q.Q4_1:  # asymmetric, 16 levels: step = (max-min)/15
            step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
            tol = step / 2 + absmax * 2.0**-9
        else:  # F16 round-to-nearest: relative 2^-11
            tol = np.abs(blocks) * 2.0**-11 + 1e-7
        err = np.abs(got.reshape(blocks.shape) - blocks)
        assert np.all(err <= tol), (name, float((err - tol).max()))
        if qtype != Q.F16:  # and it is a real quantization, not a pass-through
            assert err.max() > 1e-3


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 3), (3, 8, 5), (9, 64, 7)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, head_dim, cols):
    w = np.random.default_rng(2).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    p = permute_qk_to_gguf(w, n_head)
    # llama.cpp layout, spelled out: file row 2i+j of a head holds HF row j*h+i.
    h = head_dim // 2
    for head in range(n_head):
        for i in range(h):
            for j in range(2):
                np.testing.assert_array_equal(
                    p[head * head_dim + 2 * i + j], w[head * head_dim + j * h + i]
                )
    np.testing.assert_array_equal(unpermute_qk_from_gguf(p, n_head), w)
    np.testing.assert_array_equal(unpermute_qk_from_gguf(p[:, 0], n_head), w[:, 0])  # biases
    with pytest.raises(ValueError, match="n_head"):
        unpermute_qk_from_gguf(w[:-1], n_head)


def _rope_tables(T: int, hd: int, theta: float):
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T)[:, None] * inv[None]  # [T, hd/2]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_rotate_half(x, cos, sin):
    """HF RoPE: pairs (i, i + hd/2). `x: [T, H, hd]`, `cos, sin: [T, hd/2]`."""
    h = x.shape[-1] // 2
    x1, x2, c, s = x[..., :h], x[..., h:], cos[:, None], sin[:, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rope_interleaved(x, cos, sin):
    """llama.cpp RoPE: pairs (2i, 2i+1). `x: [T, H, hd]`, `cos, sin: [T, hd/2]`."""
    x1, x2, c, s = x[..., 0::2], x[..., 1::2], cos[:, None], sin[:, None]
    return np.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(x.shape)


def test_interleaved_rope_on_gguf_rows_equals_rotate_half_on_hf_rows():
    rng = np.random.default_rng(3)
    T, H, hd, d = 11, 3, 16, 24
    x = rng.standard_normal((T, d)).astype(np.float32)
    wq = rng.standard_normal((H * hd, d)).astype(np.float32)
    wk = rng.standard_normal((H * hd, d)).astype(np.float32)
    cos, sin = _rope_tables(T, hd, 10000.0)

    def scores(wq_, wk_, rope):
        q = rope((x @ wq_.T).reshape(T, H, hd), cos, sin)
        k = rope((x @ wk_.T).reshape(T, H, hd), cos, sin)
        return np.einsum("thd,shd->hts", q, k)

    ref = scores(wq, wk, rope_rotate_half)
    gg = scores(permute_qk_to_gguf(wq, H), permute_qk_to_gguf(wk, H), rope_interleaved)
    np.testing.assert_allclose(gg, ref, rtol=1e-4, atol=1e-3)  # f32 sums of 16 products
    wrong = scores(permute_qk_to_gguf(wq, H), permute_qk_to_gguf(wk, H), rope_rotate_half)
    assert np.abs(wrong - ref).max() > 1.0


def test_name_mapping_and_errors(tmp_path):
    assert gguf_to_hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None
    for bad in ("blk.0.attn_qkv.weight", "pos_embd.weight", "blk.x.attn_q.weight"):
        with pytest.raises(ValueError, match="tensor name"):
            gguf_to_hf_name(bad)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


# -- the real model ------------------------------------------------------------------------------
def numpy_llama_logits(config, params, ids, rope=rope_rotate_half) -> np.ndarray:
    """Reference float32 LLaMA forward pass, full causal attention: `logits: [T, vocab]`."""
    T, H, KV = len(ids), config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps = config["head_dim"], config["rms_norm_eps"]
    cos, sin = _rope_tables(T, hd, config["rope_theta"])
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    x = params["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = {
            k.split(f"model.layers.{i}.", 1)[1]: v
            for k, v in params.items()
            if k.startswith(f"model.layers.{i}.")
        }
        h = norm(x, p["input_layernorm.weight"])
        q = rope((h @ p["self_attn.q_proj.weight"].T).reshape(T, H, hd), cos, sin)
        k = rope((h @ p["self_attn.k_proj.weight"].T).reshape(T, KV, hd), cos, sin)
        v = (h @ p["self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        s = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0) / np.sqrt(hd) + mask  # [H, T, T]
        s = np.exp(s - s.max(-1, keepdims=True))
        o = (s / s.sum(-1, keepdims=True)) @ v.transpose(1, 0, 2)  # [H, T, hd]
        x = x + o.transpose(1, 0, 2).reshape(T, H * hd) @ p["self_attn.o_proj.weight"].T
        h = norm(x, p["post_attention_layernorm.weight"])
        g = h @ p["mlp.gate_proj.weight"].T
        x = (
            x
            + (g / (1 + np.exp(-g)) * (h @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
        )
    x = norm(x, params["model.norm.weight"])
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return x @ head.T


def perplexity(logits: np.ndarray, ids) -> float:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]].mean()))


@pytest.fixture(scope="module")
def pride_ids(prepared_data, smollm2_tokenizer):
    from comet_jax.data.text import load_corpus

    book = next(d for d in load_corpus("austen", prepared_data.root) if d.name == "prideprejudice")
    return np.asarray(smollm2_tokenizer.encode(book.text[:20000]), dtype=np.int64)


@pytest.mark.data
def test_smollm2_metadata_and_config(prepared_data, smollm2_float):
    meta = read_gguf_metadata(prepared_data.gguf_path, include_arrays=False)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 8192
    config, params = smollm2_float
    expected = dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )
    assert {k: config[k] for k in expected} == expected
    assert "lm_head.weight" not in params
    assert params["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert params["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert sum(v.size for v in params.values()) == 134_515_008


@pytest.fixture(scope="module")
def pride_logits(smollm2_float, pride_ids):
    """`[256, vocab]` logits of the first 256 tokens (causal: any prefix's logits are a prefix)."""
    config, params = smollm2_float
    return numpy_llama_logits(config, params, pride_ids[:256])


@pytest.mark.data
def test_smollm2_float_perplexity_on_pride_and_prejudice(pride_logits, pride_ids):
    # Reference (numpy f32, first 1024 tokens): 18.20; the first 256 tokens measure ~16.9.
    ppl = perplexity(pride_logits, pride_ids[:256])
    assert 15.0 < ppl < 30.0, ppl


@pytest.mark.data
def test_smollm2_rope_order_matters(smollm2_float, pride_ids, pride_logits):
    """GGUF row order needs interleaved RoPE; with HF RoPE it gives nonsense (~10x perplexity)."""
    config, params = smollm2_float
    T = 64
    ids, ref = pride_ids[:T], pride_logits[:T]
    gguf_order = dict(params)
    for name, arr in params.items():
        if ".q_proj." in name or ".k_proj." in name:
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            gguf_order[name] = permute_qk_to_gguf(arr, heads)
    same = numpy_llama_logits(config, gguf_order, ids, rope=rope_interleaved)
    # Same math in a different summation order, f32 over 30 layers: logits agree to ~1e-3.
    np.testing.assert_allclose(same, ref, atol=2e-3 * np.abs(ref).max())
    wrong = perplexity(numpy_llama_logits(config, gguf_order, ids), ids)
    assert wrong > 3 * perplexity(ref, ids), wrong


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_matches_transformers_llama(smollm2_float, pride_ids, pride_logits):
    """Our loader + numpy forward == transformers' LlamaForCausalLM on the same weights."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    config, params = smollm2_float
    skip = ("model_type", "architectures", "torch_dtype")
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in skip}))
    state = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
    result = model.eval().load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    ids = pride_ids[:32]
    with torch.no_grad():
        got = model(torch.from_numpy(ids[None])).logits[0].numpy()
    ref = pride_logits[:32]
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())  # f32, ~7e-5 seen
