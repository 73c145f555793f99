"""Row-parallel FMPQ: K split into chunks, each with its own permutation, layout and scales.

A row-parallel projection (o_proj, down_proj) splits its input channels K across devices, so an
FMPQ permutation over the whole K would move channels between devices and per-token
activation scales over the whole K would need a cross-device max. Here K is cut into
``n_chunks`` contiguous chunks of ``Kc = K / n_chunks`` channels; chunk ``c`` is a complete
FMPQ problem of its own:

    x:       [M, K]            chunk c = x[:, c*Kc:(c+1)*Kc]   (o_in: whole heads; down_in: an
                                                                FFN slice)
    perm:    [C, Kc] int32     chunk-local permutation (x_c[:, perm[c]]), never leaves the chunk
    layout:  per chunk [INT4 k4 | INT8 k8], k4 + k8 = Kc; k8 is the SAME for every chunk (the
             max over chunks of what the FMPQ rule asks for), so one kernel shape serves all
    scales:  x_scales [M, 2] per chunk (per token, per segment of that chunk)
    weights: w_packed [N, K/2] int8: chunk c's columns, permuted by perm[c], at
             [c*Kc/2, (c+1)*Kc/2) (Kc is a multiple of the packing tile, so packing the whole
             row equals packing each chunk); w_scales [N] (shared) or [N, K/g]

    y = sum_c  W4Ax(x_c[:, perm[c]], W_c)      (+ bias once)

`ChunkedW4AxLinear` computes each chunk with the unmodified `W4AxLinear` code (sim or Pallas)
and sums the f32 partials. Without a mesh it loops over all chunks; with ``mesh`` set, a
`jax.shard_map` over the mesh axis gives each of the ``d`` devices its ``C / d`` contiguous
chunks (which is exactly the K shard that `rules.param_specs` gives it) and one `psum` per
layer adds the partials: the row-parallel all-reduce. The same converted parameters therefore
run on 1 device or on any ``d`` dividing ``n_chunks``.

Permutation placement: the down_in chunk permutation is folded into gate/up output rows
(block-diagonal, so the rows stay inside each device's column shard); the o_in chunk
permutation is gathered at run time inside the chunk (it is local to the device's heads).

`quantize_model_tp` is `comet_jax.quant.convert.quantize_model` with per-chunk plans for the
two row-parallel inputs; `plan_chunks` builds those plans from calibration statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from comet_jax.parallel.mesh import TP_AXIS
from comet_jax.quant import fmpq, pack
from comet_jax.quant.qlinear import W4AxLinear
from models.projection import LinearPlan, rms_norm

ROW_GROUPS = ("o_in", "down_in")  # inputs of the row-parallel projections
ROW_PROJ = {"o_in": "o_proj", "down_in": "down_proj"}


@dataclasses.dataclass(frozen=True)
class ChunkedW4AxLinear(W4AxLinear):
    """`W4AxLinear` over ``n_chunks`` independent K chunks (module docstring).

    ``k4``/``k8`` are PER CHUNK; ``in_features = n_chunks * (k4 + k8)``. Group params (when
    ``permute``): ``perm: [n_chunks, Kc] int32`` (chunk-local indices). ``mesh``/``axis``: run
    the chunks sharded over ``mesh.shape[axis]`` devices (must divide ``n_chunks``).
    """

    n_chunks: int = 1
    mesh: Mesh | None = None
    axis: str = TP_AXIS

    def __post_init__(self):
        super().__post_init__()
        if self.pad:
            raise ValueError(
                f"ChunkedW4AxLinear: pad={self.pad} is not supported (zero-padded FMPQ blocks, "
                "FMPQConfig.pad_k, are not split into tensor-parallel chunks); use a block size "
                "that divides the chunk width"
            )
        if not isinstance(self.n_chunks, int) or self.n_chunks < 1:
            raise ValueError(f"n_chunks={self.n_chunks!r} must be a positive int")
        if self.rotate:
            raise ValueError(
                "ChunkedW4AxLinear: rotate=True is not supported (a Hadamard rotation over the "
                "whole K mixes the chunks of different devices)"
            )
        if self.mesh is not None:
            if self.axis not in self.mesh.shape:
                raise ValueError(f"axis={self.axis!r} is not an axis of the mesh {self.mesh.shape}")
            d = self.mesh.shape[self.axis]
            if self.n_chunks % d:
                raise ValueError(
                    f"mesh axis {self.axis!r} has {d} devices; it must divide n_chunks="
                    f"{self.n_chunks}"
                )

    @property
    def chunk_features(self) -> int:
        """Kc: input channels of one chunk."""
        return self.k4 + self.k8

    @property
    def in_features(self) -> int:
        return self.n_chunks * self.chunk_features

    def chunk_backend(self) -> W4AxLinear:
        """The plain backend that computes one chunk (same format, mode and kernels)."""
        return W4AxLinear(**{f.name: getattr(self, f.name) for f in dataclasses.fields(W4AxLinear)})

    def group_init(self, spec, param_dtype):
        self._check_k(spec.in_features, spec.name)
        if not self.permute:
            return None
        c, kc = self.n_chunks, self.chunk_features
        return lambda rng: {"perm": jnp.tile(jnp.arange(kc, dtype=jnp.int32), (c, 1))}

    # ---- sharding helpers ----------------------------------------------------------------
    def _shard(self, fn, in_specs, out_specs):
        """fn over local chunks: shard_map'ed over the mesh axis, or called as is."""
        if self.mesh is None:
            return fn
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def _map_chunks(self, fn, *args):
        """fn over the leading (chunk) axis of args (None args are passed as None): one
        batched computation in simulation, a loop of kernel calls in Pallas mode."""
        if self.mode == "sim":
            axes = tuple(None if a is None else 0 for a in args)
            return jax.vmap(fn, in_axes=axes)(*args)
        n = jax.tree.leaves(args)[0].shape[0]
        outs = [
            fn(*(None if a is None else jax.tree.map(lambda v, j=j: v[j], a) for a in args))
            for j in range(n)
        ]
        return jax.tree.map(lambda *v: jnp.stack(v), *outs)

    @property
    def fuses_swiglu(self) -> bool:
        """False: each chunk's quantization reads the hidden state the layer writes."""
        return False

    # ---- stage 1: per chunk permute + quantize -------------------------------------------
    def prepare_input(self, group_params, x, norm_weight, *, eps, gate=None):
        self._check_k(x.shape[-1], "prepare_input")
        if gate is not None:  # the SwiGLU hidden state, built here (not fused)
            from pallas_kernels.act_quant import swiglu

            x = swiglu(gate, x)
        if norm_weight is not None:  # not the case for o_in/down_in; kept for generality
            x = rms_norm(x, norm_weight, eps)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        c, kc = self.n_chunks, self.chunk_features
        xc = x2.reshape(x2.shape[0], c, kc)  # [M, C, Kc]
        inner = self.chunk_backend()

        template = []  # rebuild() of the inner prepared pytree, captured while tracing

        def one(x_j, perm_j):  # x_j: [M, Kc], perm_j: [Kc] | None -> prepared arrays
            gp = {"perm": perm_j} if self.permute else None
            arrays, rebuild = split_static(inner.prepare_input(gp, x_j, None, eps=eps))
            template.append(rebuild)
            return arrays

        def local(xc, *perm):  # xc: [M, Cl, Kc], perm: ([Cl, Kc],) -> arrays [Cl, M, ...]
            return self._map_chunks(one, xc.swapaxes(0, 1), perm[0] if perm else None)

        ax = self.axis
        args, specs = (xc,), (P(None, ax, None),)
        if self.permute:
            args, specs = (xc, group_params["perm"]), (*specs, P(ax, None))
        arrays = self._shard(local, in_specs=specs, out_specs=P(ax))(*args)
        return ChunkedPrepared(arrays, template[0], x.dtype, lead)

    # ---- stage 2: per chunk W4Ax, sum over chunks (psum over devices) --------------------
    def matmul(self, weight_params, prepared):
        c, kc = self.n_chunks, self.chunk_features
        w_packed = weight_params["w_packed"]
        n = w_packed.shape[0]
        wp = w_packed.reshape(n, c, kc // 2)  # [N, C, Kc/2]
        w_scales = weight_params["w_scales"]
        grouped = w_scales.ndim == 2
        ws = w_scales.reshape(n, c, -1) if grouped else w_scales  # [N, C, G/C] or [N]
        inner = self.chunk_backend()
        ax = self.axis
        mesh_on = self.mesh is not None

        def local(arrays, wp, ws):
            def one(arrays_j, wp_j, ws_j):  # one chunk -> [M, N] f32 (bias added once, below)
                w_j = {"w_packed": wp_j, "w_scales": ws if ws_j is None else ws_j}
                return inner.matmul(w_j, _with_f32(prepared.rebuild(arrays_j)))

            y = self._map_chunks(
                one, arrays, wp.swapaxes(0, 1), ws.swapaxes(0, 1) if grouped else None
            ).sum(axis=0)
            if mesh_on:
                y = jax.lax.psum(y, ax)  # the row-parallel all-reduce
            return y

        ws_spec = P(None, ax, None) if grouped else P()
        y = self._shard(local, in_specs=(P(ax), P(None, ax, None), ws_spec), out_specs=P())(
            prepared.arrays, wp, ws
        )
        if "bias" in weight_params:
            y = y + weight_params["bias"].astype(jnp.float32)
        return y.reshape(*prepared.lead, y.shape[-1]).astype(prepared.dtype)


class ChunkedPrepared:
    """Stage-1 output: the chunk backend's prepared arrays stacked on a leading chunk axis
    (``[C, M, ...]``), ``rebuild(arrays of one chunk)`` -> the chunk backend's prepared
    object, and the static compute dtype and leading shape of x."""

    def __init__(self, arrays: tuple, rebuild, dtype: Any, lead: tuple):
        self.arrays, self.rebuild, self.dtype, self.lead = arrays, rebuild, dtype, lead


def split_static(tree):
    """pytree -> (array leaves, rebuild(arrays) -> pytree); non-array leaves stay as they are
    (a prepared-activation NamedTuple carries its dtype and lead shape as leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    is_arr = [isinstance(v, (jax.Array, np.ndarray)) for v in leaves]
    static = [None if a else v for v, a in zip(leaves, is_arr)]

    def rebuild(arrays):
        it = iter(arrays)
        return jax.tree.unflatten(treedef, [next(it) if a else v for v, a in zip(static, is_arr)])

    return tuple(v for v, a in zip(leaves, is_arr) if a), rebuild


def _with_f32(prepared):
    """The chunk's prepared activations with an f32 output dtype: partials are summed in f32."""
    if hasattr(prepared, "_replace"):
        return prepared._replace(dtype=jnp.float32)
    return dataclasses.replace(prepared, dtype=jnp.float32)


# ---- plans from calibration statistics ----------------------------------------------------


def plan_chunks(
    max_abs, config: fmpq.FMPQConfig, n_chunks: int, *, mean_abs=None
) -> list[fmpq.FMPQPlan]:
    """Per-chunk FMPQ plans (chunk-local perms, one common INT8 block count).

    The FMPQ rule of `config` is applied per chunk: with the threshold rule a channel is an
    outlier when ``max_abs > threshold * median(max_abs)`` (median over the WHOLE K, so the
    outlier set does not depend on the split) and a chunk needs ``ceil(outliers / block)``
    INT8 blocks; with the budget rule a chunk needs ``budget`` of its blocks (or
    ``ceil(int8_blocks / n_chunks)``). Every chunk gets the max over chunks (clamped to
    ``[min_int8_blocks, max_int8_blocks]``, both read per chunk); inside a chunk the INT8
    segment holds all its outliers, then the top channels by score (as `fmpq.plan_permutation`).
    """
    max_abs = np.asarray(max_abs, np.float64)
    k = max_abs.shape[0]
    block = config.block_size
    if n_chunks < 1 or k % n_chunks or (k // n_chunks) % block:
        raise ValueError(
            f"K={k} must split into n_chunks={n_chunks} chunks of whole {block}-channel blocks"
        )
    kc = k // n_chunks
    nb = kc // block
    if config.order_by == "mean":
        if mean_abs is None:
            raise ValueError("order_by='mean' needs mean_abs")
        score = np.asarray(mean_abs, np.float64)
    else:
        score = max_abs
    if config.rule == "threshold":
        is_out = max_abs > config.threshold * np.median(max_abs)
        need = [-(-int(is_out[c * kc : (c + 1) * kc].sum()) // block) for c in range(n_chunks)]
    else:
        is_out = np.zeros(k, bool)
        if config.int8_blocks is not None:
            need = [-(-config.int8_blocks // n_chunks)]
        else:
            need = [int(np.floor(config.int8_budget * nb + 0.5))]
    hi = nb if config.max_int8_blocks is None else min(config.max_int8_blocks, nb)
    n8 = int(min(max(max(need), config.min_int8_blocks), hi))
    # Outliers first among equals: lift their score above every other channel's.
    boosted = np.where(is_out, score + (np.max(np.abs(score)) + 1.0), score)
    chunk_cfg = dataclasses.replace(
        config, rule="budget", int8_blocks=n8, min_int8_blocks=0, max_int8_blocks=None
    )
    return [
        fmpq.plan_permutation(
            max_abs[c * kc : (c + 1) * kc], chunk_cfg, score=boosted[c * kc : (c + 1) * kc]
        )
        for c in range(n_chunks)
    ]


def global_perm(plans: list[fmpq.FMPQPlan]) -> np.ndarray:
    """Per-chunk plans -> the block-diagonal permutation ``[K] int32`` over the whole K."""
    kc = plans[0].k
    return np.concatenate([np.asarray(p.perm) + c * kc for c, p in enumerate(plans)]).astype(
        np.int32
    )


# ---- conversion ---------------------------------------------------------------------------


def _row_plans(recipe, config, stats, layer, group, k, n_chunks):
    block = recipe.fmpq.block_size
    kc = k // n_chunks
    if recipe.act == "uniform4":
        return [fmpq.FMPQPlan.identity(kc, block, 0)] * n_chunks
    if recipe.act == "uniform8":
        return [fmpq.FMPQPlan.identity(kc, block, kc // block)] * n_chunks
    if stats is None:
        raise ValueError(f"recipe {recipe.name!r} (act='fmpq') needs calibration statistics")
    absmax, absmean = stats[(layer, group)].channel_stats(rotated=False)
    return plan_chunks(absmax, recipe.fmpq, n_chunks, mean_abs=absmean)


def check_tp_shapes(config, n_chunks: int, block: int, tile: int, w_group: int | None) -> None:
    """ValueError unless o_proj/down_proj inputs split into `n_chunks` chunks of whole heads /
    FMPQ blocks / packing tiles / weight groups."""
    if config.num_heads % n_chunks:
        raise ValueError(
            f"num_heads={config.num_heads} must be a multiple of n_chunks={n_chunks} (o_proj "
            "chunks hold whole heads)"
        )
    for name, k in (("q_size", config.q_size), ("intermediate_size", config.intermediate_size)):
        kc = k // n_chunks
        if k % n_chunks or kc % block or kc % tile or (w_group and kc % w_group):
            raise ValueError(
                f"{name}={k} / n_chunks={n_chunks} = {k / n_chunks:g} channels per chunk must be "
                f"a multiple of the FMPQ block {block}, the tile {tile} and the weight group "
                f"{w_group} (FMPQConfig.pad_k does not pad tensor-parallel chunks)"
            )


def quantize_model_tp(
    config,
    params,
    recipe,
    calib_stats=None,
    *,
    n_chunks: int,
    mode: str = "sim",
    interpret: bool = False,
    progress: bool = False,
):
    """`quantize_model` for tensor parallelism up to ``n_chunks``-way (module docstring).

    Column-parallel inputs (attn_in, mlp_in) are converted exactly as `quantize_model` does;
    o_proj and down_proj get per-chunk FMPQ plans and `ChunkedW4AxLinear` backends. Recipes
    without quantized activations (float, W4A16) or with INT8 weights are returned as
    `quantize_model` makes them: their row-parallel layers shard without any chunking (the
    per-token INT8 scale of W8A8 then costs XLA one extra max-reduction across devices).

    Returns (qparams, LinearPlan, QuantReport) like `quantize_model`.
    """
    from comet_jax.quant import convert

    if recipe.is_float or recipe.w_bits != 4 or recipe.act == "none":
        return convert.quantize_model(
            config,
            params,
            recipe,
            calib_stats,
            mode=mode,
            interpret=interpret,
            progress=progress,
        )
    if recipe.rotation:
        raise ValueError(
            f"recipe {recipe.name!r}: rotation=True is not supported with tensor parallelism "
            "(the Hadamard rotation of o_proj/down_proj inputs spans all devices)"
        )
    block, tile = recipe.fmpq.block_size, recipe.tile
    check_tp_shapes(config, n_chunks, block, tile, recipe.w_group)
    # fold=False: the whole-K down_in plan must not be folded into gate/up; ours is below.
    qparams, plan, report = convert.quantize_model(
        config,
        params,
        dataclasses.replace(recipe, fold=False),
        calib_stats,
        mode=mode,
        interpret=interpret,
        progress=progress,
    )
    overrides = dict(plan.overrides)
    rows = {(r["layer"], r["group"]): r for r in report.groups}
    for i in range(config.num_layers):
        lq = dict(qparams[f"layers_{i}"])
        for g in ROW_GROUPS:
            p = ROW_PROJ[g]
            w = np.asarray(params[f"layers_{i}"][p]["kernel"], np.float32)  # [N, K]
            k = w.shape[1]
            plans = _row_plans(recipe, config, calib_stats, i, g, k, n_chunks)
            perm = global_perm(plans)
            identity = bool(np.array_equal(perm, np.arange(k)))
            hess = None
            if recipe.needs_hessian and calib_stats is not None:
                hess = calib_stats[(i, g)].hessian
                if hess is not None:
                    hess = fmpq.permute_hessian(jnp.asarray(hess, jnp.float32), perm)
            q, scales = convert._quantize_weight(recipe, jnp.asarray(w[:, perm]), hess)
            entry = {
                "w_scales": jnp.asarray(scales, jnp.float32),
                "w_packed": pack.pack_int4(jnp.asarray(q, jnp.int8), tile),
            }
            if "bias" in params[f"layers_{i}"][p]:
                entry["bias"] = jnp.asarray(params[f"layers_{i}"][p]["bias"], jnp.float32)
            lq[p] = entry
            lq.pop(g, None)  # quantize_model's whole-K runtime perm, if any
            runtime = g == "o_in" and not identity
            if g == "down_in" and not identity:
                # silu(gate) * up is elementwise per channel: permute gate/up output rows.
                for src in ("gate_proj", "up_proj"):
                    lq[src] = {name: a[perm] for name, a in lq[src].items()}
            if runtime:
                local = np.stack([np.asarray(pl.perm) for pl in plans]).astype(np.int32)
                lq[g] = {"perm": jnp.asarray(local)}
            overrides[(i, p)] = ChunkedW4AxLinear(
                k4=plans[0].k4,
                k8=plans[0].k8,
                block=block,
                tile=tile,
                w_group=recipe.w_group,
                act_granularity=recipe.act_granularity,
                act_clip=recipe.act_clip,
                permute=runtime,
                mode=mode,
                interpret=interpret,
                n_chunks=n_chunks,
            )
            k8 = n_chunks * plans[0].k8
            rows[(i, g)].update(
                k8=int(k8),
                int8_fraction=k8 / k,
                perm="identity" if identity else ("chunk-runtime" if runtime else "chunk-folded"),
                n_chunks=n_chunks,
            )
        qparams[f"layers_{i}"] = jax.device_get(lq)
    report.groups = list(rows.values())
    return qparams, LinearPlan.from_mapping(overrides), report


def with_mesh(plan: LinearPlan, mesh: Mesh | None, axis: str = TP_AXIS) -> LinearPlan:
    """The same plan with every `ChunkedW4AxLinear` bound to `mesh` (None: unbound)."""

    def bind(b):
        if isinstance(b, ChunkedW4AxLinear):
            return dataclasses.replace(b, mesh=mesh, axis=axis)
        return b

    return LinearPlan(
        default=bind(plan.default),
        overrides=tuple((key, bind(b)) for key, b in plan.overrides),
    )


def chunk_row_backends(plan: LinearPlan, config, n_chunks: int) -> LinearPlan:
    """Random-weight plans only: every plain `W4AxLinear` of o_proj/down_proj becomes a
    `ChunkedW4AxLinear` with the same INT8 share per chunk (``k8 / n_chunks`` rounded to whole
    blocks). The converted values of a real checkpoint are NOT valid under the new layout: use
    `quantize_model_tp` for those. (Engine presets such as ``precision="w4axkv4"`` build
    shape-only plans; this makes them row-parallel without a cross-device activation scale.)
    """
    overrides = {}
    for i in range(config.num_layers):
        for g in ROW_GROUPS:
            p = ROW_PROJ[g]
            b = plan.backend_for(i, p)
            if type(b) is W4AxLinear and n_chunks > 1:
                kc = b.in_features // n_chunks
                if b.in_features % n_chunks or kc % b.block:
                    raise ValueError(
                        f"layer {i} {p}: K={b.in_features} does not split into n_chunks="
                        f"{n_chunks} chunks of whole {b.block}-channel blocks"
                    )
                k8 = min(kc, round(b.k8 / n_chunks / b.block) * b.block)
                fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(W4AxLinear)}
                b = ChunkedW4AxLinear(**{**fields, "k4": kc - k8, "k8": k8}, n_chunks=n_chunks)
            overrides[(i, p)] = b
    return LinearPlan.from_mapping({**dict(plan.overrides), **overrides}, default=plan.default)
