"""Run the model's prefill/decode steps on a tensor-parallel mesh.

Three pieces, each a few lines at the call site (the engine's `ModelRunner` uses them when
given a mesh):

1. `shard_model(model, mesh)`: the same Flax model with its plug-ins made mesh-aware:
   integer column-parallel projections are wrapped in `ColumnParallelLinear` (a `shard_map`
   over the output channels, so the Pallas GEMM runs on local weight shards),
   `ChunkedW4AxLinear` row-parallel projections are bound to the mesh (local chunks + one
   `psum`), attention is wrapped in `ShardedAttention` (a `shard_map` over KV heads, so the
   paged KV4 kernels see a local cache of ``Hkv / d`` heads). Float projections and the
   embedding / lm_head stay plain jnp: XLA's SPMD partitioner splits them from the parameter
   shardings and inserts the row-parallel all-reduce itself.
2. `shard_params` / `shard_cache` / `init_sharded_cache`: place params and the paged cache
   with the `rules` PartitionSpecs.
3. `jit_step(step_fn, mesh, params, cache, config)`: `jax.jit` with in/out shardings (cache
   donated, step inputs and sampled tokens replicated); `jit_forward` does the same for a plain
   ``model.apply`` (logits).

Per decoder layer on d devices: 2 all-reduces of ``[tokens, H]`` (after o_proj and after
down_proj) and nothing else; the vocab-parallel embedding adds one all-reduce and the
lm_head's sharded logits one all-gather (or a sharded argmax) per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from comet_jax.parallel import rules
from comet_jax.parallel.mesh import TP_AXIS, tp_size
from comet_jax.parallel.tp_quant import ChunkedW4AxLinear, split_static
from comet_jax.quant.qlinear import W4A16Linear, W4AxLinear, W8A8Linear
from models.attention import DenseAttention
from models.projection import GROUPS, PROJECTIONS_OF, LinearPlan, as_plan

INTEGER_BACKENDS = (W4AxLinear, W8A8Linear, W4A16Linear)


@dataclasses.dataclass(frozen=True)
class ColumnParallelLinear:
    """Column-parallel wrapper of a projection backend: weights split along N on `axis`.

    The input (already prepared: normalized, permuted, quantized) is replicated on every
    device; each device multiplies it by its ``N / d`` weight rows with the inner backend's own
    code (sim or Pallas) inside `jax.shard_map`; the output stays sharded along N (the next op,
    attention over local heads or silu(gate) * up, is local too).
    """

    inner: Any
    mesh: Mesh
    axis: str = TP_AXIS

    def weight_init(self, spec, param_dtype):
        return self.inner.weight_init(spec, param_dtype)

    def group_init(self, spec, param_dtype):
        return self.inner.group_init(spec, param_dtype)

    def prepare_input(self, group_params, x, norm_weight, *, eps):
        # Replicated in, replicated out: every device quantizes the whole input itself (the
        # fused Pallas kernel is a custom call that XLA's partitioner cannot split).
        template = []

        def local(gp, x, nw):
            arrays, rebuild = split_static(self.inner.prepare_input(gp, x, nw, eps=eps))
            template.append(rebuild)
            return arrays

        arrays = jax.shard_map(local, mesh=self.mesh, in_specs=P(), out_specs=P(), check_vma=False)(
            group_params, x, norm_weight
        )
        return template[0](arrays)

    def matmul(self, weight_params, prepared):
        arrays, rebuild = split_static(prepared)
        out_ndim = jax.eval_shape(
            lambda w, arrs: self.inner.matmul(w, rebuild(arrs)), weight_params, arrays
        ).ndim
        w_specs = jax.tree.map(lambda a: P(self.axis, *([None] * (a.ndim - 1))), weight_params)

        def local(w, arrs):
            return self.inner.matmul(w, rebuild(arrs))

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(w_specs, P()),
            out_specs=P(*([None] * (out_ndim - 1)), self.axis),
            check_vma=False,
        )(weight_params, arrays)


def _paged_state_cls():
    from comet_jax.engine.runner import PagedState

    return PagedState


@dataclasses.dataclass(frozen=True)
class ShardedAttention:
    """Attention plug-in wrapper: `shard_map` over heads (q heads and KV heads split d-way).

    Works for `models.attention.DenseAttention` (state None / lengths / mask, replicated) and
    the engine's `PagedAttention` (state `PagedState`; the cache is head-sharded, page table
    and lengths replicated). Inside, the inner attention sees a cache whose static config says
    ``num_kv_heads / d`` heads, so the paged kernels run unchanged on local pages.
    """

    inner: Callable
    mesh: Mesh
    axis: str = TP_AXIS

    def __call__(self, q, k, v, layer_idx, state):
        ax = self.axis
        d = self.mesh.shape[ax]
        head = P(None, None, ax, None)
        paged_cls = _paged_state_cls()
        if isinstance(state, paged_cls):
            cache = state.cache
            global_cfg = cache.config
            local_cfg = dataclasses.replace(global_cfg, num_kv_heads=global_cfg.num_kv_heads // d)
            slot_spec = None if state.window_slot is None else P()
            state_spec = paged_cls(rules.cache_specs(cache, d, ax), P(), P(), P(), slot_spec)

            def local(q, k, v, st):
                st = st._replace(cache=dataclasses.replace(st.cache, config=local_cfg))
                out, st = self.inner(q, k, v, layer_idx, st)
                return out, st._replace(cache=dataclasses.replace(st.cache, config=global_cfg))
        else:
            state_spec = None if state is None else P()

            def local(q, k, v, st):
                return self.inner(q, k, v, layer_idx, st)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(head, head, head, state_spec),
            out_specs=(head, state_spec),
            check_vma=False,
        )(q, k, v, state)


def shard_plan(plan, config, mesh: Mesh, axis: str = TP_AXIS) -> LinearPlan:
    """A LinearPlan whose integer backends run sharded on `mesh` (module docstring).

    A column-parallel input group is wrapped only when all its projections are split (with
    the replicated-KV rule, q/k/v stay plain and XLA partitions them); chunked row-parallel
    backends are bound to the mesh; `W4AxLinear.fuse_projections` is turned off (a
    one-device form).
    """
    plan = as_plan(plan)
    d = tp_size(mesh, axis)
    flags = rules.shard_flags(config, d)
    overrides = {}
    for i in range(config.num_layers):
        for g in GROUPS:
            projs = PROJECTIONS_OF[g]
            wrap = d > 1 and all(rules.proj_is_split(p, flags) for p in projs)
            for p in projs:
                b = plan.backend_for(i, p)
                if isinstance(b, ColumnParallelLinear):  # re-target an already sharded plan
                    b = b.inner
                if d > 1 and getattr(b, "fuse_projections", False):
                    # one GEMM over concatenated weights is a one-device form: across devices
                    # the concatenation of column shards would move the weights
                    b = dataclasses.replace(b, fuse_projections=False)
                if isinstance(b, ChunkedW4AxLinear):
                    b = dataclasses.replace(b, mesh=mesh if d > 1 else None, axis=axis)
                elif wrap and p in rules.COLUMN and isinstance(b, INTEGER_BACKENDS):
                    b = ColumnParallelLinear(b, mesh, axis)
                overrides[(i, p)] = b
    return LinearPlan.from_mapping(overrides, default=plan.default)


def shard_model(model, mesh: Mesh, axis: str = TP_AXIS):
    """`model` (a `LlamaForCausalLM`) with mesh-aware projections and attention."""
    d = tp_size(mesh, axis)
    cfg = model.config
    linear = shard_plan(model.linear, cfg, mesh, axis)
    attention = model.attention
    if isinstance(attention, ShardedAttention):  # re-target an already sharded model
        attention = attention.inner
    if attention is None:
        attention = DenseAttention(sliding_window=cfg.sliding_window)
    flags = rules.shard_flags(cfg, d)
    if d > 1 and flags["heads"] and flags["kv_heads"]:
        attention = ShardedAttention(attention, mesh, axis)
    return model.clone(linear=linear, attention=attention)


def param_shardings(params, config, mesh: Mesh, axis: str = TP_AXIS):
    """NamedSharding pytree of `params` (arrays or ShapeDtypeStructs)."""
    return rules.named(mesh, rules.param_specs(params, config, tp_size(mesh, axis), axis))


def cache_shardings(cache, mesh: Mesh, axis: str = TP_AXIS):
    return rules.named(mesh, rules.cache_specs(cache, tp_size(mesh, axis), axis))


def shard_params(params, config, mesh: Mesh, axis: str = TP_AXIS):
    """Places `params` on `mesh` with the `rules` shardings."""
    return jax.device_put(params, param_shardings(params, config, mesh, axis))


def shard_cache(cache, mesh: Mesh, axis: str = TP_AXIS):
    """Places a `PagedKVCache` on `mesh`, split by KV head. Every leaf gets its own buffer
    (`init_cache` shares one zeros array between leaves; a donated step needs distinct ones)."""
    return jax.device_put(cache, cache_shardings(cache, mesh, axis), may_alias=False)


def init_sharded_cache(cache_config, mesh: Mesh, axis: str = TP_AXIS):
    """An empty `PagedKVCache` created directly in its sharded layout (no full host copy)."""
    from comet_jax.engine import kv_cache

    abstract = jax.eval_shape(lambda: kv_cache.init_cache(cache_config))
    return jax.jit(
        lambda: kv_cache.init_cache(cache_config),
        out_shardings=cache_shardings(abstract, mesh, axis),
    )()


def init_sharded_params(model, mesh: Mesh, rng, axis: str = TP_AXIS):
    """Random params created directly in their sharded layout (benchmarks: 70B shapes)."""
    from models.llama import abstract_params, init_params

    model = model.clone(attention=None)  # attention holds no params; init runs without a cache
    shardings = param_shardings(abstract_params(model), model.config, mesh, axis)
    return jax.jit(lambda r: init_params(model, r), out_shardings=shardings)(rng)


def jit_step(step_fn, mesh: Mesh, params, cache, config, axis: str = TP_AXIS, donate=True):
    """`jax.jit(step_fn)` for ``step_fn(params, cache, inputs) -> (out, cache)`` on `mesh`.

    Params and cache keep their `rules` shardings in and out; step inputs (host numpy) and
    `out` (sampled tokens, or the engine's last-position logits) are replicated.
    """
    rep = NamedSharding(mesh, P())
    c_sh = cache_shardings(cache, mesh, axis)
    return jax.jit(
        step_fn,
        in_shardings=(param_shardings(params, config, mesh, axis), c_sh, rep),
        out_shardings=(rep, c_sh),
        donate_argnums=(1,) if donate else (),
    )


def jit_replicated(mesh: Mesh):
    """``jax.jit`` with every input and output replicated on `mesh` (e.g. the sampler over
    replicated logits and host sampling arrays)."""
    rep = NamedSharding(mesh, P())

    def jit(fn):
        return jax.jit(fn, in_shardings=rep, out_shardings=rep)

    return jit


def jit_forward(model, mesh: Mesh, params, axis: str = TP_AXIS, **apply_kwargs):
    """``f(params, tokens) -> logits [B, T, V] f32`` (replicated) of `model` on `mesh`
    (`model` should come from `shard_model`)."""
    rep = NamedSharding(mesh, P())

    def fwd(p, tokens):
        return model.apply({"params": p}, tokens, **apply_kwargs)[0]

    return jax.jit(
        fwd,
        in_shardings=(param_shardings(params, model.config, mesh, axis), rep),
        out_shardings=rep,
    )
