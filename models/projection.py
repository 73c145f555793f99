"""Pluggable linear layers: every projection of the decoder goes through a `LinearBackend`.

Inputs are shared: q/k/v read one input, gate/up read one input. A backend therefore works in
two stages, so that per-input work (RMSNorm, channel permutation, activation quantization)
runs once per input group:

    prepared = backend.prepare_input(group_params, x, norm_weight, eps=eps)   # once per group
    y        = backend.matmul(weight_params, prepared)                         # once per projection

Input groups (per layer) and the projections reading them:

    group      projections              x fed to prepare_input           norm_weight
    "attn_in"  q_proj, k_proj, v_proj   residual stream [B, T, H]        input_norm [H]
    "o_in"     o_proj                   attention output [B, T, Hq*D]    None
    "mlp_in"   gate_proj, up_proj       residual stream [B, T, H]        post_attn_norm [H]
    "down_in"  down_proj                silu(gate) * up [B, T, I]        None

Parameter tree (`variables['params']`, flat per layer; `i` is the layer index):

    embed_tokens                 [V, H]
    layers_{i}/input_norm        [H]          HF input_layernorm.weight
    layers_{i}/post_attn_norm    [H]          HF post_attention_layernorm.weight
    layers_{i}/{proj}            backend weight pytree, e.g. FloatLinear: {"kernel": [N, K],
                                 "bias": [N] (only when the projection has a bias)}
    layers_{i}/{group}           backend group pytree, present only when the backend declares
                                 one (FloatLinear declares none)
    final_norm                   [H]          HF model.norm.weight
    lm_head                      {"kernel": [V, H]}  absent when tie_word_embeddings

Kernels use the Hugging Face [out, in] = [N, K] layout (K contiguous). A backend declares its
pytrees through `weight_init(spec, param_dtype)` / `group_init(spec, param_dtype)`, which return
an init function `rng -> pytree` (or None from `group_init` for "no group params"). Flax checks
at `apply` time that the given leaves have the shapes the init function would produce, so a
quantized backend's init must produce correctly shaped (e.g. packed) leaves.

Backends are chosen per (layer, projection) with a `LinearPlan` (or one backend for all). All
projections of a group that resolve to the same backend share one `prepare_input`; at most one
distinct backend in a group may declare group params (they live under the group name).

Backends must be hashable (frozen dataclasses), since they are static Flax module attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

PyTree = Any
InitFn = Callable[[jax.Array], PyTree]

GROUPS: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")
PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
GROUP_OF: dict[str, str] = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}
PROJECTIONS_OF: dict[str, tuple[str, ...]] = {
    g: tuple(p for p in PROJECTIONS if GROUP_OF[p] == g) for g in GROUPS
}


@dataclasses.dataclass(frozen=True)
class ProjSpec:
    """Static description of one projection: y[..., N] = x[..., K] @ W[N, K].T (+ b)."""

    layer: int
    name: str  # one of PROJECTIONS
    in_features: int  # K
    out_features: int  # N
    bias: bool

    @property
    def group(self) -> str:
        return GROUP_OF[self.name]


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Static description of one shared input: x[..., K] read by `projections`."""

    layer: int
    name: str  # one of GROUPS
    in_features: int  # K
    has_norm: bool  # RMSNorm applied to x before the projections ("attn_in", "mlp_in")
    projections: tuple[ProjSpec, ...]


@runtime_checkable
class LinearBackend(Protocol):
    """What a projection backend provides (FloatLinear is the reference implementation)."""

    def weight_init(self, spec: ProjSpec, param_dtype: Any) -> InitFn:
        """Returns `rng -> weight pytree` for one projection (shapes must be static)."""
        ...

    def group_init(self, spec: GroupSpec, param_dtype: Any) -> InitFn | None:
        """Returns `rng -> group pytree`, or None when the backend keeps no per-group params."""
        ...

    def prepare_input(
        self,
        group_params: PyTree | None,
        x: jax.Array,
        norm_weight: jax.Array | None,
        *,
        eps: float,
    ) -> Any:
        """x: [..., K] in compute dtype -> whatever `matmul` consumes (RMSNorm first if given)."""
        ...

    def matmul(self, weight_params: PyTree, prepared: Any) -> jax.Array:
        """-> y: [..., N] in the compute dtype of the x given to prepare_input."""
        ...


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., H], weight: [H] -> [..., H] in x.dtype; statistics in f32 (as HF does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    # HF casts the normalised value back to the input dtype before scaling by the weight.
    return (weight.astype(x.dtype) * xf.astype(x.dtype)).astype(x.dtype)


def _normal_init(shape: tuple[int, ...], dtype: Any, stddev: float = 0.02) -> InitFn:
    return lambda rng: (stddev * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class FloatLinear:
    """Float projection: params {"kernel": [N, K], "bias"?: [N]} (HF layout).

    The kernel is cast to the compute dtype of x; products accumulate in f32.
    `precision` is passed to the dot ("highest" keeps f32 matmuls in full f32 on GPUs that
    would otherwise use TF32; it is a no-op for bf16 inputs).
    """

    precision: str | None = "highest"

    def weight_init(self, spec: ProjSpec, param_dtype: Any) -> InitFn:
        kernel_init = _normal_init((spec.out_features, spec.in_features), param_dtype)
        if not spec.bias:
            return lambda rng: {"kernel": kernel_init(rng)}

        def init(rng):
            k_rng, b_rng = jax.random.split(rng)
            return {
                "kernel": kernel_init(k_rng),
                "bias": _normal_init((spec.out_features,), param_dtype)(b_rng),
            }

        return init

    def group_init(self, spec: GroupSpec, param_dtype: Any) -> InitFn | None:
        return None

    def prepare_input(self, group_params, x, norm_weight, *, eps):
        return x if norm_weight is None else rms_norm(x, norm_weight, eps)

    def matmul(self, weight_params, prepared):
        x = prepared
        kernel = weight_params["kernel"]  # [N, K]
        y = jnp.einsum(
            "...k,nk->...n",
            x,
            kernel.astype(x.dtype),
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        if "bias" in weight_params:
            y = y + weight_params["bias"].astype(jnp.float32)
        return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """Per-(layer, projection) backend choice; hashable, so usable as a static attribute.

    `overrides` entries are ((layer, name), backend) with `name` a projection name (exact) or a
    group name (all its projections); `layer` may be None for "every layer". Lookup order for
    projection p of layer l: (l, p), (l, group(p)), (None, p), (None, group(p)), default.
    """

    default: LinearBackend = FloatLinear()
    overrides: tuple[tuple[tuple[int | None, str], LinearBackend], ...] = ()

    def __post_init__(self):
        for key, backend in self.overrides:
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"LinearPlan override key {key!r}; expected (layer, name)")
            layer, name = key
            if name not in GROUP_OF and name not in GROUPS:
                raise ValueError(
                    f"LinearPlan override name {name!r}; expected one of {PROJECTIONS + GROUPS}"
                )
            if layer is not None and (not isinstance(layer, int) or layer < 0):
                raise ValueError(f"LinearPlan override layer {layer!r}; expected int >= 0 or None")
            _check_backend(backend)
        _check_backend(self.default)

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[tuple[int | None, str], LinearBackend],
        default: LinearBackend | None = None,
    ) -> LinearPlan:
        return cls(default=default or FloatLinear(), overrides=tuple(mapping.items()))

    def backend_for(self, layer: int, proj: str) -> LinearBackend:
        table = dict(self.overrides)
        group = GROUP_OF[proj]
        for key in ((layer, proj), (layer, group), (None, proj), (None, group)):
            if key in table:
                return table[key]
        return self.default


def _check_backend(backend: Any) -> None:
    missing = [
        m
        for m in ("weight_init", "group_init", "prepare_input", "matmul")
        if not callable(getattr(backend, m, None))
    ]
    if missing:
        raise ValueError(f"linear backend {backend!r} lacks methods {missing}")
    try:
        hash(backend)
    except TypeError as e:
        raise ValueError(
            f"linear backend {backend!r} must be hashable (use a frozen dataclass)"
        ) from e


def as_plan(linear: LinearBackend | LinearPlan) -> LinearPlan:
    """A single backend means that backend for every projection."""
    return linear if isinstance(linear, LinearPlan) else LinearPlan(default=linear)
