"""Glue between the Flax model, the paged KV pool and the jitted engine step.

One step function serves decode and prefill: it takes a padded batch of token slices

    tokens: [B, T] int32      T = 1 (decode) or a chunk bucket (prefill)
    start: [B] int32          position of tokens[:, 0] (= tokens already in the cache)
    num_valid: [B] int32      real tokens per row (0 for padding rows)
    page_table: [B, P] int32  pages of each row's sequence (0 = scratch page)
    sampling arrays [B]       temperature, top_k, top_p, seed, counter

writes the rows' K/V into the pool, attends over each row's pages, and samples one token per
row from the logits of its last valid token. Only [B] int32 leaves the device.

The model sees attention through `PagedAttention` (models/attention.py protocol): its cache
state is a `PagedState` holding the whole pool (all layers) plus the batch's page table, and
each layer updates its slice. The pool layout and kernels come from a `KVBackend`:
`BF16KV` (bf16 pages) and `Int4KV` (KV4 pages, `comet_jax.quant.kv_quant` format, dequantized
in the reference attention). Pool arrays: `[L, num_pages, page_size, Hkv, ...]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from comet_jax.engine.sampling import sample_tokens
from comet_jax.quant import kv_quant

_MASK = -0.7 * float(np.finfo(np.float32).max)


class KVBackend(Protocol):
    """Paged KV pool storage and attention (hashable: a static attribute of the model)."""

    def init_pool(self, num_layers, num_pages, page_size, num_kv_heads, head_dim) -> Any: ...

    def write(self, pool, layer: int, k, v, page, offset) -> Any:
        """k, v: [B, T, Hkv, D]; page, offset: [B, T] int32 slot of each token."""
        ...

    def attend(self, pool, layer: int, q, page_table, q_pos, kv_len) -> jax.Array:
        """q: [B, T, Hq, D]; page_table: [B, P]; q_pos: [B, T]; kv_len: [B] -> [B, T, Hq, D]."""
        ...


def paged_attention_reference(q, k_ctx, v_ctx, q_pos, kv_len) -> jax.Array:
    """Causal GQA over gathered pages, softmax in f32.

    q: [B, T, Hq, D]; k_ctx, v_ctx: [B, S, Hkv, D] (S = P * page_size; key s sits at position
    s); q_pos: [B, T] positions of the queries; kv_len: [B] keys written so far. Query at
    position p sees keys s <= p and s < kv_len.
    """
    b, t, hq, d = q.shape
    s, hkv = k_ctx.shape[1], k_ctx.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k_ctx, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    key_pos = jnp.arange(s)[None, None, :]
    allowed = (key_pos <= q_pos[:, :, None]) & (key_pos < kv_len[:, None, None])  # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, _MASK)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhgts,bshd->bthgd", probs.astype(v_ctx.dtype), v_ctx, preferred_element_type=jnp.float32
    )
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _gather(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """pages: [N, page, ...]; page_table: [B, P] -> [B, P*page, ...]."""
    g = pages[page_table]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


@dataclasses.dataclass(frozen=True)
class BF16KV:
    """bf16 pages: pool = (k, v), each [L, N, page, Hkv, D]."""

    dtype: Any = jnp.bfloat16

    def init_pool(self, num_layers, num_pages, page_size, num_kv_heads, head_dim):
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def write(self, pool, layer, k, v, page, offset):
        kp, vp = pool
        kp = kp.at[layer, page, offset].set(k.astype(kp.dtype))
        vp = vp.at[layer, page, offset].set(v.astype(vp.dtype))
        return kp, vp

    def attend(self, pool, layer, q, page_table, q_pos, kv_len):
        kp, vp = pool
        k_ctx = _gather(kp[layer], page_table).astype(q.dtype)
        v_ctx = _gather(vp[layer], page_table).astype(q.dtype)
        return paged_attention_reference(q, k_ctx, v_ctx, q_pos, kv_len)


@dataclasses.dataclass(frozen=True)
class Int4KV:
    """KV4 pages (kv_quant format): pool = (k, v) KVQuant, packed [L, N, page, Hkv, D/2] uint8,
    scale/zero [L, N, page, Hkv, D/g] f16."""

    group: int = 64

    def init_pool(self, num_layers, num_pages, page_size, num_kv_heads, head_dim):
        base = (num_layers, num_pages, page_size, num_kv_heads)
        g = head_dim // self.group

        def one():
            return kv_quant.KVQuant(
                jnp.zeros(base + (head_dim // 2,), jnp.uint8),
                jnp.ones(base + (g,), kv_quant.SCALE_DTYPE),
                jnp.zeros(base + (g,), kv_quant.SCALE_DTYPE),
            )

        return (one(), one())

    def write(self, pool, layer, k, v, page, offset):
        def put(store, x):
            qx = kv_quant.quantize_kv(x.astype(jnp.float32), self.group)
            return kv_quant.KVQuant(
                *(s.at[layer, page, offset].set(n) for s, n in zip(store, qx, strict=True))
            )

        return put(pool[0], k), put(pool[1], v)

    def attend(self, pool, layer, q, page_table, q_pos, kv_len):
        def ctx(store):
            parts = [_gather(a[layer], page_table) for a in store]
            return kv_quant.dequantize_kv(*parts, group_size=self.group, dtype=q.dtype)

        return paged_attention_reference(q, ctx(pool[0]), ctx(pool[1]), q_pos, kv_len)


class PagedState(NamedTuple):
    """Attention cache state threaded through the layers."""

    pool: Any
    page_table: jax.Array  # [B, P] int32
    start: jax.Array  # [B] int32
    num_valid: jax.Array  # [B] int32


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """models.attention protocol over a paged pool: write this step's K/V, then attend."""

    kv: Any  # KVBackend
    page_size: int

    def __call__(self, q, k, v, layer_idx, state: PagedState):
        b, t = q.shape[:2]
        ti = jnp.arange(t, dtype=jnp.int32)[None, :]
        q_pos = state.start[:, None] + ti  # [B, T]
        valid = ti < state.num_valid[:, None]
        slot_page = jnp.take_along_axis(
            state.page_table, jnp.where(valid, q_pos // self.page_size, 0), axis=1
        )
        page = jnp.where(valid, slot_page, 0)  # padding tokens land on the scratch page
        offset = jnp.where(valid, q_pos % self.page_size, 0)
        pool = self.kv.write(state.pool, layer_idx, k, v, page, offset)
        kv_len = state.start + state.num_valid
        out = self.kv.attend(pool, layer_idx, q, state.page_table, q_pos, kv_len)
        return out, state._replace(pool=pool)


class StepInputs(NamedTuple):
    """Host-built (numpy) inputs of one step; see the module docstring for shapes."""

    tokens: np.ndarray
    start: np.ndarray
    num_valid: np.ndarray
    page_table: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seeds: np.ndarray
    counters: np.ndarray

    @staticmethod
    def zeros(batch: int, length: int, pages: int) -> StepInputs:
        i32 = lambda *s: np.zeros(s, np.int32)
        return StepInputs(
            tokens=i32(batch, length),
            start=i32(batch),
            num_valid=i32(batch),
            page_table=i32(batch, pages),
            temperature=np.zeros(batch, np.float32),
            top_k=i32(batch),
            top_p=np.ones(batch, np.float32),
            seeds=i32(batch),
            counters=i32(batch),
        )

    def abstract(self) -> StepInputs:
        return StepInputs(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self))


def make_step_fn(model):
    """The pure step: (params, pool, StepInputs) -> (next_tokens [B] int32, pool)."""

    def step(params, pool, inp: StepInputs):
        t = inp.tokens.shape[1]
        positions = inp.start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        state = PagedState(pool, inp.page_table, inp.start, inp.num_valid)
        last = jnp.maximum(inp.num_valid - 1, 0)
        logits, state = model.apply(
            {"params": params}, inp.tokens, positions, cache=state, logits_at=last
        )
        next_tokens = sample_tokens(
            logits[:, 0], inp.temperature, inp.top_k, inp.top_p, inp.seeds, inp.counters
        )
        return next_tokens, state.pool

    return step


def kv_backend_for(kv_dtype: str, group: int):
    if kv_dtype == "bf16":
        return BF16KV()
    if kv_dtype == "int4":
        return Int4KV(group)
    raise ValueError(f"kv_dtype={kv_dtype!r}; expected 'bf16' or 'int4'")


def linear_backend_for(precision: str, *, interpret: bool = False):
    """The projection backend of a precision preset ('bf16' = float weights)."""
    from models.projection import FloatLinear

    if precision == "bf16":
        return FloatLinear(precision=None)
    try:
        from comet_jax.quant import qlinear
    except ImportError as e:
        raise ValueError(
            f"precision={precision!r} needs comet_jax.quant.qlinear, which is not importable: {e}"
        ) from e
    factory = getattr(qlinear, "backend_for_precision", None)
    if factory is None:
        raise ValueError(
            f"precision={precision!r}: comet_jax.quant.qlinear has no backend_for_precision()"
        )
    return factory(precision, interpret=interpret)


class ModelRunner:
    """Owns the model, its params and the KV pool; runs (and AOT-compiles) step buckets.

    `run(inp)` executes the executable compiled for inp's shapes; with `allow_lazy=False` an
    uncompiled shape raises instead of compiling, which is how the engine guarantees that
    steady-state serving never recompiles.
    """

    def __init__(self, model, params, *, num_pages: int, page_size: int, kv):
        cfg = model.config
        self.model = model
        self.params = params
        self.page_size = page_size
        self.num_pages = num_pages
        self.pool = kv.init_pool(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self._jit = jax.jit(make_step_fn(model), donate_argnums=(1,))
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self.allow_lazy = True

    @property
    def num_compilations(self) -> int:
        return len(self._compiled)

    def compile(self, batch: int, length: int, pages: int) -> None:
        key = (batch, length, pages)
        if key in self._compiled:
            return
        abstract = StepInputs.zeros(batch, length, pages).abstract()
        self._compiled[key] = self._jit.lower(self.params, self.pool, abstract).compile()

    def run(self, inp: StepInputs) -> jax.Array:
        """Dispatches one step; returns next_tokens [B] int32 (a device array, not waited on)."""
        key = (*inp.tokens.shape, inp.page_table.shape[1])
        if key not in self._compiled:
            if not self.allow_lazy:
                raise RuntimeError(f"step shape {key} was not compiled at start-up")
            self.compile(*key)
        next_tokens, self.pool = self._compiled[key](self.params, self.pool, inp)
        return next_tokens


# Random-weight model shapes for tests and benchmarks (name -> ModelConfig kwargs).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                       rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
}


def preset_config(name: str):
    from models.config import ModelConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"model preset {name!r}; expected one of {tuple(MODEL_PRESETS)}")
    return ModelConfig(**MODEL_PRESETS[name])


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS 256 and EOS 257 (for random-weight models)."""

    bos_id, eos_id = 256, 257
    chat_template = None

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, **_) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
