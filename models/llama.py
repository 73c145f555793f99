"""Flax LLaMA-family causal LM (LLaMA-2/3/3.1, Mistral, Qwen2) with pluggable linears/attention.

    model = LlamaForCausalLM(config)                        # float, dense causal attention
    logits, cache = model.apply({"params": params}, tokens, positions, cache=None)
      tokens, positions: [B, T] int32 -> logits: [B, T, V] f32

Layers are a Python loop (not `nn.scan`) so each layer may carry differently shaped
(quantized) parameters. Projections go through `models.projection` backends, attention through
a `models.attention` callable; both are hashable static attributes, so `jax.jit(model.apply)`
works. See `models/projection.py` for the parameter tree.

Capture (calibration): make the "intermediates" collection mutable and every input group's
float input (after its RMSNorm, i.e. the x each projection multiplies) is sown:

    logits, state = model.apply({"params": p}, tokens, positions, mutable=["intermediates"])
    x = state["intermediates"]["layers_3"]["attn_in"][0]       # [B, T, H] compute dtype

Groups: "attn_in", "o_in" [B, T, Hq*D], "mlp_in", "down_in" [B, T, I]. With
`capture_transform=f` the sown value is `f(layer_idx, group_name, x)` instead (e.g. per-channel
absmax or X^T X, to avoid keeping activations). Padding positions are not masked out.

Packed tokens (`packing=`, serving): a prefill call holds several sequences' chunks in a
[B, T] grid padded to its buckets; with ``packing=(pack, unpack)`` every token-wise op
(embedding, projections, MLP, norms, residual) runs on the ``Tp`` real tokens only, and
attention alone sees the [B, T] layout:

    pack:   [Tp] int32, flat index into B*T of packed row r (rows past the real tokens: any)
    unpack: [B, T] int32, packed row of each grid position (padding positions: any row)

See :func:`packing_from_lengths`. The logits are those of the unpacked call at the rows kept.

Kernel orders (serving): a backend whose input quantization kernel reads the RMSNorm weight
and the FMPQ permutation in its own channel order (`W4AxLinear.kernel_orders`) rearranges them
on every call unless the variables hold them in that order already, as the optional
``"kernel_orders"`` collection built once by :func:`kernel_order_variables`:

    variables = {"params": p, "kernel_orders": kernel_order_variables(model, p)}
    logits, cache = model.apply(variables, tokens, positions, cache=None)   # same numbers
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import DenseAttention
from models.config import ModelConfig
from models.projection import (
    GROUPS,
    PROJECTIONS_OF,
    FloatLinear,
    GroupSpec,
    LinearBackend,
    LinearPlan,
    ProjSpec,
    as_plan,
    rms_norm,
)
from models.rope import apply_rope, config_inv_freq, rope_cos_sin


def layer_specs(config: ModelConfig, layer: int) -> dict[str, GroupSpec]:
    """Static GroupSpecs (with their ProjSpecs) of one decoder layer, keyed by group name."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {  # projection: (K, N, bias)
        "q_proj": (h, config.q_size, config.attention_bias),
        "k_proj": (h, config.kv_size, config.attention_bias),
        "v_proj": (h, config.kv_size, config.attention_bias),
        "o_proj": (config.q_size, h, config.o_proj_bias),
        "gate_proj": (h, i, config.mlp_bias),
        "up_proj": (h, i, config.mlp_bias),
        "down_proj": (i, h, config.mlp_bias),
    }
    specs = {}
    for group in GROUPS:
        projs = tuple(
            ProjSpec(
                layer=layer,
                name=p,
                in_features=shapes[p][0],
                out_features=shapes[p][1],
                bias=shapes[p][2],
            )
            for p in PROJECTIONS_OF[group]
        )
        specs[group] = GroupSpec(
            layer=layer,
            name=group,
            in_features=projs[0].in_features,
            has_norm=group in ("attn_in", "mlp_in"),
            projections=projs,
        )
    return specs


def packing_from_lengths(num_valid, t: int, size: int) -> tuple[jax.Array, jax.Array]:
    """``(pack [size], unpack [B, t])`` for rows holding ``num_valid[b]`` leading real tokens.

    ``size`` must be >= sum(num_valid) (checked by the caller on the host: inside jit the
    tokens past ``size`` would be dropped). Padded pack rows repeat flat index 0.
    """
    num_valid = jnp.asarray(num_valid, jnp.int32)
    b = num_valid.shape[0]
    valid = (jnp.arange(t, dtype=jnp.int32)[None, :] < num_valid[:, None]).reshape(-1)
    row = jnp.cumsum(valid.astype(jnp.int32)) - 1  # packed row of each real token
    flat = jnp.arange(b * t, dtype=jnp.int32)
    pack = jnp.zeros((size,), jnp.int32).at[jnp.where(valid, row, size)].set(flat, mode="drop")
    unpack = jnp.where(valid, row, 0).reshape(b, t)
    return pack, unpack


NORM_OF_GROUP = {"attn_in": "input_norm", "mlp_in": "post_attn_norm"}  # RMSNorm param names


def kernel_order_variables(model: LlamaForCausalLM, params) -> dict:
    """The ``"kernel_orders"`` collection (module docstring) for ``params``: for each layer's
    input group whose projections share one backend with a ``kernel_orders(group_params,
    norm_weight)`` method (W4AxLinear in its kernel mode), ``layers_{i}/{group}`` -> what that
    method returns (the group's RMSNorm weight and permutation in the orders its kernel
    reads); groups where it returns None are left out (they rearrange per call, or need
    nothing). Empty for a float model. Run it once (e.g. at an engine's start-up), not inside
    a step."""
    plan = as_plan(model.linear)
    out: dict = {}
    for i in range(model.config.num_layers):
        layer = params[f"layers_{i}"]
        specs = layer_specs(model.config, i)
        for group, spec in specs.items():
            backends = {plan.backend_for(i, p.name) for p in spec.projections}
            if len(backends) != 1:
                continue
            (backend,) = backends
            make = getattr(backend, "kernel_orders", None)
            norm = layer[NORM_OF_GROUP[group]] if group in NORM_OF_GROUP else None
            orders = make(layer.get(group), norm) if make is not None else None
            if orders is not None:
                out.setdefault(f"layers_{i}", {})[group] = orders
    return out


def _ones_init(shape, dtype):
    return lambda rng: jnp.ones(shape, dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)). Params flat (see projection.py)."""

    config: ModelConfig
    layer_idx: int
    linear: LinearPlan
    attention: Callable
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    capture_transform: Callable | None = None

    def _group(
        self, spec: GroupSpec, x, norm_weight, gate=None, hidden_of=None
    ) -> dict[str, jax.Array]:
        """Runs one input group: prepare once per distinct backend, then each projection.
        gate (down_in only, see `_fuses_swiglu`): the input is swiglu(gate, x), which each
        backend's prepare_input builds itself (fused into its quantization).
        hidden_of (mlp_in): the (gate, up) projection names; where their backend builds the
        MLP hidden state swiglu(gate, up) itself (`gate_up_swiglu`, W4AxLinear.fuse_gate_up)
        the result has it as "hidden" instead of the two outputs."""
        if self.is_mutable_collection("intermediates"):
            x_in = x if norm_weight is None else rms_norm(x, norm_weight, self.config.rms_norm_eps)
            if self.capture_transform is not None:
                x_in = self.capture_transform(self.layer_idx, spec.name, x_in)
            self.sow("intermediates", spec.name, x_in)
        backends = {
            p.name: self.linear.backend_for(self.layer_idx, p.name) for p in spec.projections
        }
        distinct = list(dict.fromkeys(backends.values()))
        group_inits = [(b, b.group_init(spec, self.param_dtype)) for b in distinct]
        owners = [b for b, init in group_inits if init is not None]
        if len(owners) > 1:
            raise ValueError(
                f"layer {self.layer_idx} group {spec.name!r}: backends {owners} all declare group "
                "params; at most one backend per input group may"
            )
        group_params = None
        if owners:
            group_params = self.param(spec.name, dict(group_inits)[owners[0]])
        extra = {} if gate is None else {"gate": gate}
        if self.has_variable("kernel_orders", spec.name):
            # the norm weight and permutation in the kernel's orders (kernel_order_variables):
            # one backend in the group, which takes them instead of rearranging them per call
            extra["kernel_orders"] = self.get_variable("kernel_orders", spec.name)
        prepared = {
            b: b.prepare_input(
                group_params if b in owners else None,
                x,
                norm_weight,
                eps=self.config.rms_norm_eps,
                **extra,
            )
            for b in distinct
        }
        weights = {
            p.name: self.param(p.name, backends[p.name].weight_init(p, self.param_dtype))
            for p in spec.projections
        }
        out = {}
        if hidden_of is not None and not self.is_mutable_collection("intermediates"):
            g, u = hidden_of
            backend = backends[g]
            fused = getattr(backend, "gate_up_swiglu", None)
            if backends[u] is backend and fused is not None:
                hidden = fused(weights[g], weights[u], prepared[backend])
                if hidden is not None:
                    out["hidden"] = hidden
        if "hidden" not in out and len(distinct) == 1:
            # one GEMM over the group's concatenated weights where the backend runs it
            # (W4AxLinear.fuse_projections); None: one per projection below
            fused = getattr(distinct[0], "group_matmul", None)
            if fused is not None and not self.is_mutable_collection("intermediates"):
                ys = fused([weights[p.name] for p in spec.projections], prepared[distinct[0]])
                if ys is not None:
                    return {p.name: y for p, y in zip(spec.projections, ys)}
        for p in spec.projections:
            if "hidden" in out and p.name in hidden_of:
                continue
            backend = backends[p.name]
            out[p.name] = backend.matmul(weights[p.name], prepared[backend])
        return out

    @nn.compact
    def __call__(self, x, cos, sin, cache_state, packing=None):
        cfg = self.config
        specs = layer_specs(cfg, self.layer_idx)
        b, t, _ = x.shape
        h = cfg.hidden_size

        input_norm = self.param("input_norm", _ones_init((h,), self.param_dtype))
        qkv = self._group(specs["attn_in"], x, input_norm)
        q = qkv["q_proj"].reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = qkv["k_proj"].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv["v_proj"].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if packing is not None:  # x is [1, Tp, H]: attention runs on the [B, T] grid
            pack, unpack = packing
            q, k, v = (a[0][unpack] for a in (q, k, v))  # [B, T, heads, D]
        attn, cache_state = self.attention(q, k, v, self.layer_idx, cache_state)
        if packing is not None:
            attn = attn.reshape(-1, *attn.shape[2:])[pack][None]
        attn = attn.reshape(b, t, cfg.q_size).astype(self.dtype)
        x = x + self._group(specs["o_in"], attn, None)["o_proj"]

        post_norm = self.param("post_attn_norm", _ones_init((h,), self.param_dtype))
        gu = self._group(specs["mlp_in"], x, post_norm, hidden_of=("gate_proj", "up_proj"))
        if "hidden" in gu:  # the gate / up backend built swiglu(gate, up) itself
            down = self._group(specs["down_in"], gu["hidden"], None)
        elif self._fuses_swiglu(specs["down_in"]) and gu["up_proj"].dtype == jnp.dtype(self.dtype):
            down = self._group(specs["down_in"], gu["up_proj"], None, gate=gu["gate_proj"])
        else:
            gate, up = gu["gate_proj"], gu["up_proj"]
            hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up).astype(self.dtype)
            down = self._group(specs["down_in"], hidden, None)
        x = x + down["down_proj"]
        return x, cache_state

    def _fuses_swiglu(self, spec: GroupSpec) -> bool:
        """Whether every backend of the down projection builds the MLP's hidden state
        silu(gate) * up inside its input quantization (`fuses_swiglu`: W4AxLinear's fused
        kernel), so that the layer never writes it. Not while capturing calibration inputs
        (the hidden state is what gets captured)."""
        if self.is_mutable_collection("intermediates"):
            return False
        return all(
            getattr(self.linear.backend_for(self.layer_idx, p.name), "fuses_swiglu", False)
            for p in spec.projections
        )


class LlamaForCausalLM(nn.Module):
    """LLaMA-family causal LM.

    Attributes:
      config: ModelConfig.
      linear: one LinearBackend for every projection, or a LinearPlan (per layer/projection).
      attention: attention callable (see models/attention.py); None means
        DenseAttention(sliding_window=config.sliding_window).
      dtype: compute dtype (jnp.float32 or jnp.bfloat16); logits are always f32.
      param_dtype: dtype of parameters created by `init`.
      capture_transform: optional f(layer_idx, group, x) applied to sown capture values.

    Embedding and lm_head stay in float (lm_head uses FloatLinear on the final-norm output).
    """

    config: ModelConfig
    linear: LinearBackend | LinearPlan = FloatLinear()
    attention: Callable | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    capture_transform: Callable | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, *, logits_at=None, packing=None):
        """tokens, positions: [B, T] int32 (positions default arange(T)); cache: attention state.

        logits_at: optional [B] int32 index into T; then only those rows go through the final
        norm and lm_head and logits are [B, 1, V] (prefill wants only the last token).
        packing: optional ``(pack [Tp], unpack [B, T])`` (module docstring); needs logits_at.
        Returns (logits f32, new cache state).
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens of shape {tokens.shape}; expected [B, T]")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = jnp.asarray(positions)
        if positions.shape != (b, t):
            raise ValueError(f"positions of shape {positions.shape}; expected {(b, t)}")
        plan = as_plan(self.linear)
        attention = self.attention
        if attention is None:
            attention = DenseAttention(sliding_window=cfg.sliding_window)

        embedding = self.param(
            "embed_tokens",
            lambda rng: (0.02 * jax.random.normal(rng, (cfg.vocab_size, cfg.hidden_size))).astype(
                self.param_dtype
            ),
        )
        if packing is not None:
            if logits_at is None:
                raise ValueError("packing needs logits_at (the packed call returns one row each)")
            pack, unpack = packing
            if unpack.shape != (b, t):
                raise ValueError(f"unpack of shape {unpack.shape}; expected {(b, t)}")
            tokens = tokens.reshape(-1)[pack][None]  # [1, Tp]
            positions = positions.reshape(-1)[pack][None]
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)  # [B, T, H] or [1, Tp, H]
        cos, sin = rope_cos_sin(positions, config_inv_freq(cfg))
        for i in range(cfg.num_layers):
            x, cache = DecoderLayer(
                config=cfg,
                layer_idx=i,
                linear=plan,
                attention=attention,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                capture_transform=self.capture_transform,
                name=f"layers_{i}",
            )(x, cos, sin, cache, packing)

        if packing is not None:
            rows = jnp.take_along_axis(packing[1], jnp.asarray(logits_at)[:, None], axis=1)
            x = x[0][rows]  # [B, 1, H]
        elif logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[:, None, None], axis=1)
        final_norm = self.param("final_norm", _ones_init((cfg.hidden_size,), self.param_dtype))
        x = rms_norm(x, final_norm, cfg.rms_norm_eps)
        head = FloatLinear()
        if cfg.tie_word_embeddings:
            head_params = {"kernel": embedding}
        else:
            spec = ProjSpec(-1, "lm_head", cfg.hidden_size, cfg.vocab_size, False)
            head_params = self.param("lm_head", head.weight_init(spec, self.param_dtype))
        logits = jnp.einsum(
            "...k,nk->...n",
            x,
            head_params["kernel"].astype(x.dtype),
            precision=head.precision,
            preferred_element_type=jnp.float32,
        )
        return logits, cache


def init_params(model: LlamaForCausalLM, rng: jax.Array, batch: int = 1, length: int = 8):
    """Random parameters (the inner `params` tree) for `model`."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return model.init(rng, tokens)["params"]


def abstract_params(model: LlamaForCausalLM):
    """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
