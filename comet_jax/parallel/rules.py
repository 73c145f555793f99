"""Tensor-parallel sharding rules: params / KV cache pytree -> PartitionSpec pytree.

Megatron-style layout on a 1-D mesh axis ``tp`` of size d (HF ``[N, K]`` weight layout):

| param (per layer unless noted) | leaf | PartitionSpec |
|---|---|---|
| ``embed_tokens [V, H]`` | | ``P(tp, None)`` vocab-parallel |
| ``lm_head`` | ``kernel [V, H]`` | ``P(tp, None)`` vocab-parallel (logits sharded on V) |
| ``input_norm``, ``post_attn_norm``, ``final_norm`` | ``[H]`` | ``P()`` |
| q/k/v_proj, gate/up_proj (column) | ``kernel [N, K]``, ``w_packed [N, K/2]``, ``w_q [N, K]`` | ``P(tp, None)`` |
| | ``w_scales [N]`` / ``[N, K/g]``, ``bias [N]`` | ``P(tp)`` / ``P(tp, None)`` |
| o_proj, down_proj (row) | ``kernel``, ``w_packed``, ``w_q`` | ``P(None, tp)`` |
| | ``w_scales [N]``, ``bias [N]`` | ``P()`` (bias added once, after the all-reduce) |
| | ``w_scales [N, K/g]`` | ``P(None, tp)`` when ``d`` divides ``K/g``, else ``P()`` |
| attn_in / mlp_in group | ``perm [K]`` | ``P()`` (input replicated) |
| o_in / down_in group | ``perm [C, Kc]`` (chunked, `tp_quant`) | ``P(tp, None)`` (d divides C) |
| | ``perm [K]`` (whole-K runtime perm) | ``P()`` (XLA gathers the input: avoid) |

KV cache (`comet_jax.engine.kv_cache.PagedKVCache`): ``k, v [L, P, Hkv, page, X]`` (KV4 ``v``:
``[L, P, Hkv, D/2, page]``) and the
KV4 scales/zeros ``[L, P, Hkv, D/g, page]`` are sharded by KV head, ``P(None, None, tp)``.

Divisibility: q/o need ``num_heads % d == 0``, gate/up/down ``intermediate_size % d == 0``,
vocab-parallel ``vocab_size % d == 0``; a family that does not divide is replicated (correct,
not split).

KV-head rule for ``d > num_kv_heads`` (or ``num_kv_heads % d != 0``): k_proj, v_proj and the
KV cache are REPLICATED (every device computes and stores all KV heads; the q heads and o_proj
stay sharded). This is always correct and keeps one code path; it costs KV-cache memory
(the cache is not split), the k/v projection FLOPs are not split, and attention is left to
XLA's partitioner (no `shard_map`), which runs a Pallas attention kernel replicated. LLaMA-3-70B (8 KV heads)
shards them up to 8-way, so the fallback only matters beyond 8 GPUs or for tiny models.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from comet_jax.parallel.mesh import TP_AXIS

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
COLUMN_GROUPS = ("attn_in", "mlp_in")
ROW_GROUPS = ("o_in", "down_in")
NORMS = ("input_norm", "post_attn_norm", "final_norm")


def _check_tp(tp: int) -> None:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive int")


def shard_flags(config, tp: int) -> dict[str, bool]:
    """Which families of weights are split at tensor-parallel degree `tp` (module docstring)."""
    _check_tp(tp)
    return {
        "heads": config.num_heads % tp == 0,
        "kv_heads": config.num_kv_heads % tp == 0,
        "ffn": config.intermediate_size % tp == 0,
        "vocab": config.vocab_size % tp == 0,
    }


def _column_leaf(name: str, ndim: int, on: bool, axis: str) -> P:
    if not on:
        return P()
    if name in ("kernel", "w_packed", "w_q", "w_scales", "bias"):
        return P(axis, *([None] * (ndim - 1)))
    raise ValueError(
        f"unknown column-parallel leaf {name!r}; expected kernel|w_packed|w_q|w_scales|bias"
    )


def _row_leaf(name: str, shape: tuple, on: bool, axis: str, tp: int) -> P:
    if not on:
        return P()
    if name in ("kernel", "w_packed", "w_q"):
        return P(None, axis)
    if name == "w_scales":  # [N] shared by all shards; [N, K/g] split only at shard borders
        return P(None, axis) if len(shape) == 2 and shape[1] % tp == 0 else P()
    if name == "bias":
        return P()
    raise ValueError(
        f"unknown row-parallel leaf {name!r}; expected kernel|w_packed|w_q|w_scales|bias"
    )


def proj_is_split(proj: str, flags: dict[str, bool]) -> bool:
    """Whether projection `proj` is sharded under `shard_flags` (else replicated)."""
    if proj in ("q_proj", "o_proj"):
        return flags["heads"]
    if proj in ("k_proj", "v_proj"):
        return flags["kv_heads"] and flags["heads"]
    return flags["ffn"]


def param_specs(params: Any, config, tp: int, axis: str = TP_AXIS) -> Any:
    """A pytree of `PartitionSpec` with the structure of `params` (float or quantized).

    Args:
      params: the inner params tree (`variables['params']`) of `models.LlamaForCausalLM`, with
        arrays or `jax.ShapeDtypeStruct` leaves.
      config: its `ModelConfig`.
      tp: tensor-parallel degree (the size of `axis`).
      axis: mesh axis name.
    """
    flags = shard_flags(config, tp)
    if tp == 1:
        return jax.tree.map(lambda _: P(), params)

    def spec(path, leaf) -> P:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        shape = tuple(getattr(leaf, "shape", ()))
        ndim = len(shape)
        top = keys[0]
        if top == "embed_tokens":
            return P(axis, None) if flags["vocab"] else P()
        if top == "lm_head":
            return P(axis, None) if flags["vocab"] else P()
        if top in NORMS:
            return P()
        if not str(top).startswith("layers_") or len(keys) < 2:
            raise ValueError(f"param {'/'.join(map(str, keys))}: no sharding rule")
        part = keys[1]
        if part in NORMS:
            return P()
        name = keys[-1]
        if part in COLUMN:
            return _column_leaf(name, ndim, proj_is_split(part, flags), axis)
        if part in ROW:
            return _row_leaf(name, shape, proj_is_split(part, flags), axis, tp)
        if part in COLUMN_GROUPS:
            return P()
        if part in ROW_GROUPS:
            on = flags["heads"] if part == "o_in" else flags["ffn"]
            chunked = name == "perm" and ndim == 2 and shape[0] % tp == 0
            return P(axis, None) if (on and chunked) else P()
        raise ValueError(f"param {'/'.join(map(str, keys))}: no sharding rule")

    return jax.tree_util.tree_map_with_path(spec, params)


def cache_specs(cache: Any, tp: int, axis: str = TP_AXIS) -> Any:
    """PartitionSpecs of a `PagedKVCache` (same pytree structure): KV heads split over `axis`
    when ``num_kv_heads % tp == 0``, else replicated (module docstring)."""
    _check_tp(tp)
    on = tp > 1 and cache.config.num_kv_heads % tp == 0
    return jax.tree.map(lambda _: P(None, None, axis) if on else P(), cache)


def named(mesh, specs: Any) -> Any:
    """PartitionSpec pytree -> NamedSharding pytree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def spec_table(params: Any, config, tp: int, axis: str = TP_AXIS, layer: int = 0) -> list[tuple]:
    """(path, shape, PartitionSpec) rows for the non-layer params and one layer (reports)."""
    specs = param_specs(params, config, tp, axis)
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    spec_flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), s in zip(flat, spec_flat):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if keys[0].startswith("layers_") and keys[0] != f"layers_{layer}":
            continue
        rows.append(("/".join(keys), tuple(leaf.shape), s))
    return rows
