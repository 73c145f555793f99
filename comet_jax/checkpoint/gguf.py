"""GGUF import: llama.cpp checkpoints -> Hugging Face LLaMA names, float32, [out, in] layout.

A GGUF file holds metadata key/values (architecture, tokenizer) and tensors. Tensor shapes in
the file are written innermost-first (`ne0` = the input dimension); the `gguf` reader exposes
them as numpy arrays in C order, which for a linear layer is already `[out, in]`, the Hugging
Face layout. Quantized tensors (Q4_1, Q8_0, ...) are dequantized with `gguf.quants.dequantize`.

Q/K rows: llama.cpp's converter permutes the rows of `q_proj`/`k_proj` of LLaMA-family models
so that its interleaved RoPE (rotating pairs (2i, 2i+1)) computes what Hugging Face's
rotate-half RoPE (rotating pairs (i, i + head_dim/2)) computes on the original weights. Per
head, with `h = head_dim / 2`, the file row `2i + j` (j in {0, 1}) holds the original row
`j*h + i`. `load_gguf` undoes this by default, so every downstream module uses HF RoPE.

Usage:
    config, params = load_gguf(path)   # config: HF-style dict; params: {hf_name: f32 array}
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

# Architectures whose Q/K rows llama.cpp's converter permutes for interleaved RoPE.
_PERMUTED_QK_ARCHS = frozenset({"llama"})

# llama.cpp per-block tensor name -> Hugging Face LLaMA name (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors that carry no HF parameter (precomputed RoPE frequency factors).
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def _reader(path: str | os.PathLike):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    st = os.stat(path)
    return _cached_reader(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    """Parsing the header (~100k tokenizer strings) takes ~2 s; the tensors stay memory-mapped,
    so a cached reader is cheap. Keyed by mtime/size so a rewritten file is parsed again."""
    from gguf import GGUFReader

    return GGUFReader(path, "r")


def _field_value(field) -> Any:
    """Python value of a `gguf.ReaderField` (scalar, string, or list)."""
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    # Older gguf: decode from the raw parts.
    from gguf import GGUFValueType

    def one(idx: int, vtype) -> Any:
        part = field.parts[idx]
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


def read_gguf_metadata(path: str | os.PathLike, *, include_arrays: bool = True) -> dict[str, Any]:
    """All metadata key/values of a GGUF file, as plain Python values.

    `include_arrays=False` drops list values (the tokenizer vocabulary and merges, ~100k
    strings) when only the architecture fields are needed.
    """
    reader = _reader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if not include_arrays and len(field.types) > 1:
            continue
        out[key] = _field_value(field)
    return out


def gguf_hf_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face `LlamaConfig`-style dict from GGUF metadata (architecture fields only)."""
    arch = metadata.get("general.architecture")
    if arch is None:
        raise ValueError("metadata has no 'general.architecture' key; is this a GGUF model?")

    def get(key: str, default: Any = None) -> Any:  # default None: the key is required
        full = f"{arch}.{key}"
        if full in metadata:
            return metadata[full]
        if default is None:
            raise ValueError(f"GGUF metadata lacks {full!r} (needed for the {arch} config)")
        return default

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"GGUF metadata has neither '{arch}.vocab_size' nor a token list")
        vocab = len(tokens)
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"] if arch == "llama" else [],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # corrected by load_gguf from the tensor list
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    # GGUF stores eps as float32 (1e-5 reads back as 9.99999974e-06): round to float32 precision.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.7g}")
    return config


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face LLaMA parameter name for a llama.cpp tensor name; None for skipped tensors.

    >>> gguf_to_hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """
    if name in _SKIPPED_TENSORS:
        return None
    m = _BLOCK_RE.match(name)
    if m:
        layer, base, kind = m.groups()
        if base not in _BLOCK_NAMES:
            raise ValueError(f"tensor name {name!r}: unknown llama.cpp block tensor {base!r}")
        return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{kind}"
    m = _GLOBAL_RE.match(name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"tensor name {name!r} has no Hugging Face LLaMA equivalent")


def _check_rows(w: np.ndarray, n_head: int) -> int:
    if n_head <= 0 or w.shape[0] % (2 * n_head):
        raise ValueError(
            f"n_head={n_head}: Q/K tensor with {w.shape[0]} rows must split into n_head heads "
            "of even head_dim"
        )
    return w.shape[0] // n_head // 2


def permute_qk_to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order. `w: [n_head*head_dim, ...]`."""
    half = _check_rows(w, n_head)
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaved row order -> HF rotate-half order (inverse of permute_qk_to_gguf)."""
    half = _check_rows(w, n_head)
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    """float32 array in C order (`[out, in]` for linear layers) of one `ReaderTensor`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(tensor.data, dtype=np.float32)
    else:
        arr = dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
    # `tensor.shape` is innermost-first (ne0, ne1, ...); C order is its reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(arr.reshape(shape))


def load_gguf(
    path: str | os.PathLike,
    *,
    unpermute_qk: bool | None = None,
    names: Iterable[str] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF LLaMA-family checkpoint.

    Args:
      path: the .gguf file.
      unpermute_qk: undo llama.cpp's interleaved-RoPE Q/K row permutation so that HF rotate-half
        RoPE applies. None (default): do it for the architectures llama.cpp permutes (llama).
      names: optional subset of HF names to load (others are not dequantized).

    Returns:
      (hf_config, params): an HF-style config dict and `{hf_name: float32 array}`; linear weights
      are `[out, in]`, `model.embed_tokens.weight` is `[vocab, hidden]`, norms `[hidden]`.
      `lm_head.weight` appears only when the file has an untied `output.weight`.
    """
    reader = _reader(path)
    metadata = {
        k: _field_value(f)
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.") and len(f.types) == 1
    }
    if "tokenizer.ggml.tokens" in reader.fields:  # only its length is needed (vocab fallback)
        metadata["tokenizer.ggml.tokens"] = range(len(reader.fields["tokenizer.ggml.tokens"].data))
    config = gguf_hf_config(metadata)
    if unpermute_qk is None:
        unpermute_qk = config["model_type"] in _PERMUTED_QK_ARCHS
    wanted = None if names is None else set(names)

    params: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None or (wanted is not None and hf_name not in wanted):
            continue
        arr = _dequantize(tensor)
        if unpermute_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config[
                "num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"
            ]
            arr = unpermute_qk_from_gguf(arr, heads)
        params[hf_name] = arr
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    if wanted is not None and (missing := wanted - params.keys()):
        raise ValueError(f"names={sorted(missing)[:5]}... not found in GGUF file {str(path)!r}")
    return config, params
