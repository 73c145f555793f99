"""Float model -> quantized model: FMPQ plans, folds, weight quantization, kernel packing.

    qparams, plan, report = quantize_model(config, params, recipe, calib_stats)
    model = quantized_model(config, recipe, plan)        # LlamaForCausalLM, KV4 if asked
    logits, _ = model.apply({"params": qparams}, tokens)

Per decoder layer:
1. One FMPQ plan per input group (q/k/v share "attn_in", gate/up share "mlp_in"), from the
   group's calibration max |x| (of the rotated input when the recipe rotates). Uniform schemes
   use identity plans (all INT4 or all INT8 blocks).
2. Folds (recipe.fold, no rotation): the "down_in" permutation is folded into gate/up output
   rows (always valid: silu(gate) * up is elementwise per channel); the "o_in" permutation
   into q/k/v output rows when `fmpq.attention_fold` finds the foldable form. Every other
   non-identity permutation stays a run-time gather in the group's `prepare_input`
   (group params ``perm: [K] int32``).
3. Weights: rotate columns (W @ H), permute columns (W[:, perm]), quantize (RTN, GPTQ with the
   Hessian permuted the same way, or LWC), pack INT4 along K with `pack.pack_int4(q, tile)`.

Padding (``recipe.fmpq.pad_k``, e.g. 128-channel blocks on SmolLM2's 576-wide inputs): a plan
whose input width K is not a multiple of the block covers ``Kp`` channels, ``Kp - K`` zeros
first (`comet_jax.quant.fmpq`). Weights get zero columns there (`fmpq.permute_in`), Hessians
a decoupled diagonal (`fmpq.permute_hessian`), folds use the plan's real-channel permutation
(the zeros are prepended at run time by the backend, ``W4AxLinear.pad``), so folding and
weight quantization work as without padding.

The report lists, per (layer, group), K (the layer's real input width), ``k_pad`` (K with the
zero padding), the INT8 channels, the INT8 fraction (of the real channels) and whether the
permutation was folded, gathered at run time or is the identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from comet_jax.quant import fmpq, gptq, kv_quant, pack
from comet_jax.quant.qlinear import W4A16Linear, W4AxLinear, W8A8Linear
from comet_jax.quant.recipe import QuantRecipe
from models.attention import DenseAttention
from models.llama import LlamaForCausalLM, layer_specs
from models.projection import GROUPS, PROJECTIONS_OF, FloatLinear, LinearPlan


@dataclasses.dataclass(frozen=True)
class KV4Transform:
    """kv_transform of `DenseAttention`: fake-quantizes post-RoPE K and V to KV4."""

    group_size: int = 64

    def __call__(self, k, v, layer_idx):
        return (
            kv_quant.fake_quantize_kv(k, self.group_size),
            kv_quant.fake_quantize_kv(v, self.group_size),
        )


def attention_for(config, recipe: QuantRecipe):
    """The attention callable of a recipe: dense, with KV4 fake quantization when kv4 (the
    most recent `recipe.kv_recent_window` positions of each query left in float)."""
    kv = KV4Transform(recipe.kv_group) if recipe.kv4 else None
    if kv is not None and config.head_dim % recipe.kv_group:
        raise ValueError(f"kv_group={recipe.kv_group} must divide head_dim={config.head_dim}")
    return DenseAttention(
        sliding_window=config.sliding_window,
        kv_transform=kv,
        kv_recent_window=recipe.kv_recent_window if kv is not None else 0,
    )


def quantized_model(config, recipe: QuantRecipe, plan: LinearPlan, dtype=jnp.float32):
    """The Flax model that runs `quantize_model`'s params (projection plan + KV4 attention)."""
    return LlamaForCausalLM(
        config, linear=plan, attention=attention_for(config, recipe), dtype=dtype
    )


@dataclasses.dataclass
class QuantReport:
    """What quantize_model did, JSON-serializable via `to_dict`."""

    recipe: str
    groups: list[dict[str, Any]]

    @property
    def int8_fraction(self) -> float:
        """INT8 share of all linear-layer input channels (FMPQ blocks), channel-weighted."""
        k = sum(g["k"] for g in self.groups)
        return sum(g["k8"] for g in self.groups) / k if k else 0.0

    def int8_fraction_by_group(self) -> dict[str, float]:
        out = {}
        for name in GROUPS:
            rows = [g for g in self.groups if g["group"] == name]
            k = sum(g["k"] for g in rows)
            out[name] = sum(g["k8"] for g in rows) / k if k else 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "int8_fraction": self.int8_fraction,
            "int8_fraction_by_group": self.int8_fraction_by_group(),
            "groups": self.groups,
        }


def _rotate_cols(w):
    from comet_jax.quant import hadamard

    return hadamard.hadamard_transform(jnp.asarray(w, jnp.float32))


def _rotate_hessian(h):
    """Hessian of x @ Hd: Hd^T H Hd."""
    a = _rotate_cols(h)  # H @ Hd
    return _rotate_cols(a.T)  # (H Hd)^T Hd = Hd^T H Hd  (H symmetric)


def _group_plan(recipe: QuantRecipe, config, stats, layer: int, group: str, k: int):
    """The FMPQ plan of one input group, or None for float activations."""
    block, pad_k = recipe.fmpq.block_size, recipe.fmpq.pad_k
    if recipe.act == "none":
        return None
    if k % block and not pad_k:
        raise ValueError(
            f"layer {layer} group {group!r}: K={k} must be a multiple of the FMPQ block size "
            f"{block}: pad it with zero channels (FMPQConfig(pad_k=True)) or use a block that "
            "divides K (block_size=64 for d_model=576)"
        )
    if recipe.act == "uniform4":
        return fmpq.FMPQPlan.identity(k, block, 0, pad_k=pad_k)
    if recipe.act == "uniform8":
        kp, _ = fmpq.padded_k(k, block, pad_k)
        return fmpq.FMPQPlan.identity(k, block, kp // block, pad_k=pad_k)
    if stats is None:
        raise ValueError(f"recipe {recipe.name!r} (act='fmpq') needs calibration statistics")
    absmax, absmean = stats[(layer, group)].channel_stats(rotated=recipe.rotation)
    if group == "o_in" and recipe.attn_out_foldable and not recipe.rotation:
        return fmpq.plan_attention_out(
            absmax,
            recipe.fmpq,
            n_heads=config.num_heads,
            n_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            mean_abs=absmean,
        )
    return fmpq.plan_permutation(absmax, recipe.fmpq, mean_abs=absmean)


def _is_identity(perm) -> bool:
    return bool(np.array_equal(np.asarray(perm), np.arange(len(perm))))


def _quantize_weight(recipe: QuantRecipe, w, h):
    """w: [N, K] f32 in the final (rotated, permuted) layout -> (q [N, K] int8, scales)."""
    bits = recipe.w_bits
    if recipe.w_quantizer == "rtn" or bits == 8:
        r = gptq.rtn_quantize(w, bits=bits, group_size=recipe.w_group, clip_ratio=recipe.w_clip)
        return r.q, r.scales
    if h is None:
        raise ValueError(
            f"w_quantizer={recipe.w_quantizer!r} needs calibration Hessians "
            "(collect_stats(..., hessian=True))"
        )
    if recipe.w_quantizer == "gptq":
        r = gptq.gptq_quantize(
            w,
            h,
            bits=bits,
            group_size=recipe.w_group,
            percdamp=recipe.gptq_percdamp,
            act_order=recipe.gptq_act_order,
            clip_ratio=recipe.w_clip,
        )
        return r.q, r.scales
    from comet_jax.quant import lwc

    r = lwc.lwc_quantize(
        w, h, bits=bits, group_size=recipe.w_group, steps=recipe.lwc_steps, lr=recipe.lwc_lr
    )
    return r.q, r.scales


def _cached_quantize(recipe: QuantRecipe, w, h, cache: dict | None):
    if cache is None:
        return _quantize_weight(recipe, w, h)
    d = hashlib.sha1()
    d.update(np.asarray(w, np.float32).tobytes())
    if h is not None and recipe.w_quantizer != "rtn":
        d.update(np.asarray(h, np.float32).tobytes())
    keys = (
        "w_bits",
        "w_quantizer",
        "w_group",
        "w_clip",
        "gptq_percdamp",
        "gptq_act_order",
        "lwc_steps",
        "lwc_lr",
    )
    d.update(repr([getattr(recipe, k) for k in keys]).encode())
    key = d.hexdigest()
    if key not in cache:
        cache[key] = jax.device_get(_quantize_weight(recipe, w, h))
    return cache[key]


def quantize_model(
    config,
    params,
    recipe: QuantRecipe,
    calib_stats=None,
    *,
    mode: str = "sim",
    interpret: bool = False,
    progress: bool = True,
    weight_cache: dict | None = None,
):
    """Quantizes a float model.

    Args:
      config: ModelConfig.
      params: float params tree (`models.projection` layout, FloatLinear weights).
      recipe: the QuantRecipe.
      calib_stats: `comet_jax.calibrate.CalibStats` (needed for FMPQ plans and GPTQ/LWC).
      mode, interpret: backend mode of the integer projections ("sim" or "pallas").
      weight_cache: optional dict reused across calls: weight quantization results keyed by
        a digest of (final weight, Hessian, quantizer settings), so recipes that differ only
        in activations / KV (same permutation and rotation) skip GPTQ/LWC.

    Returns:
      (qparams, LinearPlan, QuantReport).
    """
    if recipe.is_float:
        return params, LinearPlan(FloatLinear()), QuantReport(recipe.name, [])
    if recipe.rotation and recipe.act == "none":
        raise ValueError("rotation=True needs quantized activations (act != 'none')")
    qparams = {k: v for k, v in params.items() if not k.startswith("layers_")}
    overrides: dict[tuple[int, str], Any] = {}
    rows: list[dict[str, Any]] = []
    bar = tqdm(range(config.num_layers), desc=f"quantize {recipe.name}", disable=not progress)
    for i in bar:
        lp = params[f"layers_{i}"]
        specs = layer_specs(config, i)
        w = {p: np.asarray(lp[p]["kernel"], np.float32) for p in PROJECTIONS_OF_ALL}
        b = {
            p: np.asarray(lp[p]["bias"], np.float32) for p in PROJECTIONS_OF_ALL if "bias" in lp[p]
        }
        plans = {
            g: _group_plan(recipe, config, calib_stats, i, g, specs[g].in_features) for g in GROUPS
        }
        runtime_perm = {g: False for g in GROUPS}
        status = {}
        for g, plan in plans.items():
            if plan is None or _is_identity(plan.perm):
                status[g] = "identity"
            elif recipe.fold and not recipe.rotation and g == "down_in":
                for p in ("gate_proj", "up_proj"):
                    w[p] = np.asarray(fmpq.fold_out(w[p], plan))
                    if p in b:
                        b[p] = np.asarray(fmpq.fold_out(b[p], plan))
                status[g] = "folded"
            elif (
                recipe.fold
                and not recipe.rotation
                and g == "o_in"
                and (
                    fold := fmpq.attention_fold(
                        plan,
                        n_heads=config.num_heads,
                        n_kv_heads=config.num_kv_heads,
                        head_dim=config.head_dim,
                    )
                )
                is not None
            ):
                for p, r in (
                    ("q_proj", fold.q_rows),
                    ("k_proj", fold.k_rows),
                    ("v_proj", fold.v_rows),
                ):
                    w[p] = w[p][r]
                    if p in b:
                        b[p] = b[p][r]
                status[g] = "folded"
            else:
                runtime_perm[g] = True
                status[g] = "runtime"
        layer_q = {}
        for g in GROUPS:
            plan = plans[g]
            hess = None
            if recipe.needs_hessian:
                gs = calib_stats[(i, g)] if calib_stats is not None else None
                hess = None if gs is None else gs.hessian
                if hess is not None:
                    hess = jnp.asarray(hess, jnp.float32)
                    if recipe.rotation:
                        hess = _rotate_hessian(hess)
                    if plan is not None:
                        hess = fmpq.permute_hessian(hess, plan)
            backend = _backend(recipe, plan, runtime_perm[g], mode, interpret)
            reorder = None  # stored column order (recipe.sorted_gather), None: the plan's
            if (
                runtime_perm[g]
                and recipe.sorted_gather
                and recipe.act_granularity == "segment"
                and recipe.w_group is None
            ):
                reorder = fmpq.gather_order(plan.perm, plan.k8)
            if runtime_perm[g]:
                perm = plan.perm if reorder is None else np.asarray(plan.perm)[reorder]
                layer_q[g] = {"perm": jnp.asarray(perm, jnp.int32)}
            for p in PROJECTIONS_OF[g]:
                wp = jnp.asarray(w[p])
                if recipe.rotation:
                    wp = _rotate_cols(wp)
                if plan is not None:
                    wp = fmpq.permute_in(wp, plan)
                q, scales = _cached_quantize(recipe, wp, hess, weight_cache)
                if reorder is not None:  # the stored order (same integers per segment)
                    q = np.asarray(q)[:, reorder]
                entry = {"w_scales": jnp.asarray(scales, jnp.float32)}
                if recipe.w_bits == 4:
                    entry["w_packed"] = pack.pack_int4(jnp.asarray(q, jnp.int8), recipe.tile)
                else:
                    entry["w_q"] = jnp.asarray(q, jnp.int8)
                if p in b:
                    entry["bias"] = jnp.asarray(b[p])
                layer_q[p] = entry
                overrides[(i, p)] = backend
            k = specs[g].in_features
            k8 = 0 if plan is None else plan.k8
            rows.append(
                {
                    "layer": i,
                    "group": g,
                    "k": k,
                    "k_pad": k if plan is None else plan.k,
                    "k8": int(k8),
                    "int8_fraction": k8 / k,
                    "perm": status[g],
                }
            )
        layer_q["input_norm"] = lp["input_norm"]
        layer_q["post_attn_norm"] = lp["post_attn_norm"]
        qparams[f"layers_{i}"] = jax.device_get(layer_q)
    plan = LinearPlan.from_mapping(overrides)
    return qparams, plan, QuantReport(recipe.name, rows)


PROJECTIONS_OF_ALL = tuple(p for g in GROUPS for p in PROJECTIONS_OF[g])


def _backend(recipe: QuantRecipe, plan, runtime_perm: bool, mode: str, interpret: bool):
    if recipe.w_bits == 8:
        return W8A8Linear(act_clip=recipe.act_clip, mode=mode, interpret=interpret)
    if plan is None:
        return W4A16Linear(tile=recipe.tile, w_group=recipe.w_group, mode=mode, interpret=interpret)
    if plan.pad and plan.real_perm is None:  # W4AxLinear relies on the zeros coming first
        raise ValueError(
            f"padded FMPQ plan with {plan.pad} zero channels not first in its permutation"
        )
    return W4AxLinear(
        k4=plan.k4,
        k8=plan.k8,
        block=plan.block_size,
        tile=recipe.tile,
        w_group=recipe.w_group,
        act_granularity=recipe.act_granularity,
        act_clip=recipe.act_clip,
        permute=runtime_perm,
        rotate=recipe.rotation,
        pad=plan.pad,
        mode=mode,
        interpret=interpret,
    )
