"""FMPQ channel permutation and INT4/INT8 block assignment (COMET section 4.1).

One plan per linear-layer *input* (layers that share an input, q/k/v or gate/up, share one
plan). Input channels are reordered so that every channel the rule calls an outlier lands in
the INT8 segment, which is the LAST ``n_int8_blocks`` blocks of ``block_size`` channels:

    new position:  0 ............ K4-1 | K4 ........... K-1
    holds:         INT4 channels       | INT8 channels (the top channels by score)

``plan.perm[i]`` is the OLD channel that NEW position ``i`` takes: ``x_perm = x[..., perm]``,
``w_perm = w[:, perm]`` (``[N, K]`` weights, K = input channels), so ``x_perm @ w_perm.T ==
x @ w.T``. The kernels read ``x4 = x_perm[:, :K4]`` and ``x8 = x_perm[:, K4:]``.

How the channels are ordered (``FMPQConfig.segment_order="score"``, the default): one stable
ascending sort by the key ``(is_outlier, score)``; ties keep the original channel order. So
the INT8 segment holds the ``K8`` highest-ranked channels: all outliers (highest score last),
and, when the number of outlier channels is not a multiple of ``block_size``, the INT8 blocks
are filled up with the next-largest non-outlier channels (they cost nothing extra: the block is
INT8 anyway, and they leave the INT4 segment with a smaller range). Sorting the INT4 segment
by score too groups channels of similar range into the same block, which lowers the error of
per-token-per-block activation scales; with per-segment scales the order inside a segment is
irrelevant. ``segment_order="original"`` keeps the original channel order inside each segment.
(``quantize_model`` plans in the score order and, with per-segment scales, stores the run-time
permutation in :func:`gather_order`: the same segments, each ascending, which the act_quant
kernel gathers nearly in order.)

Block count rules (``FMPQConfig.rule``):
  * ``"threshold"``: channel c is an outlier if ``max_abs[c] > threshold * median(max_abs)``;
    ``n_int8_blocks = ceil(n_outliers / block_size)``.
  * ``"budget"``: ``n_int8_blocks = int8_blocks`` if given, else
    ``floor(int8_budget * n_blocks + 0.5)`` (a fraction of the layer's blocks).
  Both are then clamped to ``[min_int8_blocks, max_int8_blocks or n_blocks]``. With the budget
  rule "outlier" means nothing and the top ``K8`` channels by score are INT8.

Padding K to whole blocks (``FMPQConfig.pad_k``): when the layer's input width K is not a
multiple of ``block_size`` (SmolLM2: 576 = 4.5 x 128), the plan covers ``Kp = ceil(K / B) * B``
channels. The ``pad = Kp - K`` extra channels are zeros PREPENDED to the input:
``x_pad = [0 ... 0, x]`` (padded channel j < pad is a zero, channel j >= pad is old channel
``j - pad``); ``perm`` indexes ``x_pad``. Every plan built here puts the zeros first:
``perm[:pad] == arange(pad)`` (score -inf, never an outlier), and caps the INT8 segment at
``floor(K / B)`` blocks, so the zeros always sit in the first INT4 block and never take INT8
budget. They are exact no-ops: a zero changes no per-token absmax (activation scales), its
weight column is zero (no per-row / per-group max changes either; a weight group of zeros gets
the quantizers' scale 1 and q = 0) and it adds 0 to every integer accumulator. The budget rule
counts the layer's real blocks ``K / B`` (4.5 for 576 / 128), not the padded ones.
:func:`permute_in`, :func:`permute_activation` and :func:`permute_hessian` accept unpadded
``[.., K]`` operands with a padded plan and pad them; :func:`fold_out` and
:func:`attention_fold` fold ``perm[pad:] - pad`` (the permutation of the real channels): the
producer then emits the real channels already permuted and the consumer only prepends the
zeros, so padding never blocks a fold.

Folding the permutation into the producing layer (no run-time gather):
  * MLP: ``down_proj`` input channel c is ``act(gate[c]) * up[c]``, elementwise in c, so any
    permutation folds: ``fold_out(w_gate, perm)``, ``fold_out(w_up, perm)`` and
    ``permute_in(w_down, plan)``. Always valid.
  * Attention (see :func:`attention_fold`): ``o_proj`` input channel ``c = h * D + d`` is
    ``out[h, d] = sum_t p[h, t] * v[t, g(h), d]``: attention mixes positions, never channels,
    but q head ``h`` reads KV head ``g(h) = h // (Hq / Hkv)`` and a v row is shared by all
    q heads of its group. A permutation of the o_proj input folds into q/k/v output rows iff
    it has the form ``perm[h' * D + d'] = pi(h') * D + sigma_j(d')`` with ``pi`` a permutation
    of q heads that maps each KV group onto one KV group (``g(pi(h'))`` depends only on
    ``g(h')``) and ``sigma_j`` one within-head permutation per KV group, identical for all q
    heads of that group. A general FMPQ sort is almost never of that form;
    :func:`plan_attention_out` builds the best plan of that form, and when a plan does not
    fold the fallback is the run-time gather (the quantize step permutes ``x`` anyway).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FMPQConfig",
    "FMPQPlan",
    "plan_permutation",
    "plan_attention_out",
    "int8_fraction",
    "padded_k",
    "pad_channels",
    "permute_in",
    "permute_activation",
    "permute_hessian",
    "fold_out",
    "AttentionFold",
    "attention_fold",
]


@dataclasses.dataclass(frozen=True)
class FMPQConfig:
    """How to build an :class:`FMPQPlan` (see the module docstring for the rules).

    block_size: channels per block; the kernels support 64, 128 (paper) and 256.
    rule: ``"threshold"`` (outlier count decides) or ``"budget"`` (fixed INT8 share).
    threshold: tau of the outlier test ``max_abs > tau * median(max_abs)``. 8 flags the
      systematic outlier channels of LLaMA-family activations (typically 20-100x the median)
      and leaves the bulk (within ~3x of the median) in INT4.
    int8_budget: fraction of blocks that are INT8 under ``rule="budget"`` (0.0 .. 1.0).
    int8_blocks: explicit INT8 block count under ``rule="budget"``; overrides int8_budget.
    min_int8_blocks / max_int8_blocks: clamp applied after either rule (None = no cap).
    order_by: the score used when no explicit score is passed: ``"max"`` (max |x|, default)
      or ``"mean"`` (mean |x|; needs mean_abs).
    segment_order: ``"score"`` (sort inside both segments) or ``"original"``.
    pad_k: when K is not a multiple of block_size, pad it up with zero channels (module
      docstring) instead of raising; e.g. block_size=128 on d_model 576 plans 640 channels.
    """

    block_size: int = 128
    rule: Literal["threshold", "budget"] = "threshold"
    threshold: float = 8.0
    int8_budget: float = 0.25
    int8_blocks: int | None = None
    min_int8_blocks: int = 0
    max_int8_blocks: int | None = None
    order_by: Literal["max", "mean"] = "max"
    segment_order: Literal["score", "original"] = "score"
    pad_k: bool = False

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size={self.block_size} must be a positive even int")
        if self.rule not in ("threshold", "budget"):
            raise ValueError(f"rule={self.rule!r} must be 'threshold' or 'budget'")
        if not self.threshold > 0:
            raise ValueError(f"threshold={self.threshold} must be > 0")
        if not 0.0 <= self.int8_budget <= 1.0:
            raise ValueError(f"int8_budget={self.int8_budget} must be in [0, 1]")
        if self.int8_blocks is not None and self.int8_blocks < 0:
            raise ValueError(f"int8_blocks={self.int8_blocks} must be >= 0")
        if self.min_int8_blocks < 0:
            raise ValueError(f"min_int8_blocks={self.min_int8_blocks} must be >= 0")
        if self.max_int8_blocks is not None and self.max_int8_blocks < self.min_int8_blocks:
            raise ValueError(
                f"max_int8_blocks={self.max_int8_blocks} must be >= "
                f"min_int8_blocks={self.min_int8_blocks}"
            )
        if self.order_by not in ("max", "mean"):
            raise ValueError(f"order_by={self.order_by!r} must be 'max' or 'mean'")
        if self.segment_order not in ("score", "original"):
            raise ValueError(f"segment_order={self.segment_order!r} must be 'score' or 'original'")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FMPQPlan:
    """The permutation and block map of one layer input (a pytree; ``perm`` is the leaf).

    perm: ``[K] int32``; new position i takes old channel ``perm[i]`` (of the padded input
      when ``pad > 0``).
    n_int8_blocks: the LAST ``n_int8_blocks`` blocks are INT8, the others INT4.
    block_size: channels per block.
    k: number of planned channels, padding included (a multiple of block_size).
    pad: zero channels prepended to the layer input (module docstring); the layer itself has
      ``k_in = k - pad`` input channels.
    """

    perm: np.ndarray
    n_int8_blocks: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    pad: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def k_in(self) -> int:
        """Input channels of the layer (without the padding)."""
        return self.k - self.pad

    @property
    def n_blocks(self) -> int:
        return self.k // self.block_size

    @property
    def k8(self) -> int:
        """Channels in the INT8 segment (the last ones)."""
        return self.n_int8_blocks * self.block_size

    @property
    def k4(self) -> int:
        """Channels in the INT4 segment (the first ones)."""
        return self.k - self.k8

    @property
    def inv_perm(self) -> np.ndarray:
        """``[K] int32``: old channel c sits at new position ``inv_perm[c]``."""
        inv = np.empty(self.k, np.int32)
        inv[np.asarray(self.perm)] = np.arange(self.k, dtype=np.int32)
        return inv

    @property
    def int8_block_mask(self) -> np.ndarray:
        """``[n_blocks] bool`` block map, True for INT8 blocks (always a suffix)."""
        return np.arange(self.n_blocks) >= self.n_blocks - self.n_int8_blocks

    @property
    def real_perm(self) -> np.ndarray | None:
        """``[k_in]``: the permutation of the real channels, ``perm[pad:] - pad``, when the
        zeros sit first (``perm[:pad] == arange(pad)``, every plan built here); else None.
        For ``pad == 0`` this is ``perm``. Folds use it."""
        perm = np.asarray(self.perm)
        if not np.array_equal(perm[: self.pad], np.arange(self.pad)):
            return None
        return (perm[self.pad :] - self.pad).astype(np.int32)

    @classmethod
    def identity(
        cls, k: int, block_size: int = 128, n_int8_blocks: int = 0, *, pad_k: bool = False
    ) -> FMPQPlan:
        """No permutation (uniform W4A4 when n_int8_blocks=0, W4A8 when all blocks).

        ``k`` is the layer's input width; with ``pad_k`` it is padded to whole blocks (zeros
        first). ``n_int8_blocks`` counts padded blocks: all of them (uniform W4A8) puts the
        zeros in the INT8 segment too, where, with no INT4 segment at all, they cost no budget.
        """
        kp, pad = padded_k(k, block_size, pad_k)
        if not 0 <= n_int8_blocks <= kp // block_size:
            raise ValueError(f"n_int8_blocks={n_int8_blocks} must be in [0, {kp // block_size}]")
        return cls(np.arange(kp, dtype=np.int32), n_int8_blocks, block_size, kp, pad)


def padded_k(k: int, block_size: int, pad_k: bool) -> tuple[int, int]:
    """``(Kp, pad)``: K rounded up to whole blocks when ``pad_k`` (else K, checked)."""
    if k <= 0:
        raise ValueError(f"K={k} must be positive")
    if not pad_k or k % block_size == 0:
        _check_k(k, block_size)
        return k, 0
    kp = -(-k // block_size) * block_size
    return kp, kp - k


def pad_channels(a, pad: int, axis: int = -1):
    """Prepends ``pad`` zero channels along ``axis`` (NumPy in, NumPy out; else jnp)."""
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (pad, 0)
    if isinstance(a, np.ndarray):
        return np.pad(a, widths)
    return jnp.pad(a, widths)


def _check_k(k: int, block_size: int) -> None:
    if k <= 0 or k % block_size:
        raise ValueError(
            f"K={k} must be a positive multiple of the {block_size}-channel block size "
            "(or pad it with zero channels: FMPQConfig(pad_k=True))"
        )


def _stats(name, a, k=None) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D [K] array, got shape {a.shape}")
    if k is not None and a.shape[0] != k:
        raise ValueError(f"{name} has shape {a.shape}, expected [{k}] like max_abs")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _n_int8_blocks(cfg: FMPQConfig, n_outliers: int, k_in: int) -> int:
    """INT8 block count for a layer of ``k_in`` real channels (``k_in / block`` blocks, a
    fraction when padded). Capped at ``floor(k_in / block)``: padded zeros never go INT8."""
    if cfg.rule == "threshold":
        n8 = -(-n_outliers // cfg.block_size)
    elif cfg.int8_blocks is not None:
        n8 = cfg.int8_blocks
    else:
        n8 = int(np.floor(cfg.int8_budget * (k_in / cfg.block_size) + 0.5))
    n_real = k_in // cfg.block_size
    hi = n_real if cfg.max_int8_blocks is None else min(cfg.max_int8_blocks, n_real)
    return int(min(max(n8, cfg.min_int8_blocks), hi))


def _rank_key(max_abs, mean_abs, score, cfg):
    """Returns (is_outlier [K] bool, score [K] f64) after validation (K unpadded)."""
    max_abs = _stats("max_abs", max_abs)
    k = max_abs.shape[0]
    padded_k(k, cfg.block_size, cfg.pad_k)  # validates K
    if score is None:
        if cfg.order_by == "mean":
            if mean_abs is None:
                raise ValueError("order_by='mean' needs mean_abs")
            score = _stats("mean_abs", mean_abs, k)
        else:
            score = max_abs
    else:
        score = _stats("score", score, k)
    if cfg.rule == "threshold":
        is_outlier = max_abs > cfg.threshold * np.median(max_abs)
    else:
        is_outlier = np.zeros(k, bool)
    return is_outlier, score


def plan_permutation(
    max_abs, config: FMPQConfig = FMPQConfig(), *, mean_abs=None, score=None
) -> FMPQPlan:
    """Builds the FMPQ plan of one layer input from calibration statistics.

    Args:
      max_abs: ``[K]`` max |x| per input channel over the calibration tokens.
      config: the rule and block size.
      mean_abs: ``[K]`` mean |x| per channel (used when ``config.order_by == "mean"``).
      score: optional ``[K]`` ordering score overriding ``order_by`` (e.g. max|x| * ||w_col||).
        The outlier test always uses max_abs; the score only orders channels.

    Returns:
      An :class:`FMPQPlan` (INT4 blocks first, INT8 blocks last; module docstring).
    """
    is_outlier, score = _rank_key(max_abs, mean_abs, score, config)
    k_in = score.shape[0]
    k, pad = padded_k(k_in, config.block_size, config.pad_k)
    n8 = _n_int8_blocks(config, int(is_outlier.sum()), k_in)
    # Padded zeros: channels 0..pad-1 of x_pad, ranked below every real channel.
    score = np.concatenate([np.full(pad, -np.inf), score])
    is_outlier = np.concatenate([np.zeros(pad, bool), is_outlier])
    # lexsort: last key is primary; stable, so ties keep the original channel order.
    order = np.lexsort((score, is_outlier))
    k8 = n8 * config.block_size
    if config.segment_order == "original":
        order = np.concatenate([np.sort(order[: k - k8]), np.sort(order[k - k8 :])])
    return FMPQPlan(order.astype(np.int32), n8, config.block_size, k, pad)


def gather_order(perm, k8: int) -> np.ndarray:
    """``[K]`` positions that sort each segment of ``perm`` (``[0, K - k8)`` and
    ``[K - k8, K)``) by source channel: ``perm[gather_order(perm, k8)]`` takes the same
    channels into each segment, in ascending order.

    With per-token-per-segment activation scales and per-output-channel weight scales the
    order inside a segment changes no integer and no scale of the W4Ax GEMM (its int32 sums
    are exact in any order), so a checkpoint may store its run-time permutation this way
    (``QuantRecipe.sorted_gather``): the act_quant kernel then gathers each row in ascending,
    nearly contiguous order instead of the score order's scattered one. Zero pad channels
    (``perm[:pad] == arange(pad)``, the smallest indices) stay first."""
    perm = np.asarray(perm)
    k = perm.shape[0]
    if not 0 <= k8 <= k:
        raise ValueError(f"k8={k8} must be in [0, K={k}]")
    k4 = k - k8
    return np.concatenate(
        [np.argsort(perm[:k4], kind="stable"), k4 + np.argsort(perm[k4:], kind="stable")]
    ).astype(np.int32)


def plan_attention_out(
    max_abs,
    config: FMPQConfig = FMPQConfig(),
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    mean_abs=None,
    score=None,
) -> FMPQPlan:
    """An o_proj-input plan restricted to the permutations that fold into q/k/v rows.

    Same statistics and rules as :func:`plan_permutation` on ``K = n_heads * head_dim``
    channels ``c = h * head_dim + d``. Channels are ranked by ``(is_outlier, score)``; KV groups
    are ordered by their top-ranked channel, q heads inside a group likewise, and the head_dim
    positions of a group by the group's best rank at that position (one order per KV group, as
    folding requires): the heaviest heads end up last. The INT8 segment is then the smallest
    block suffix that holds every outlier (threshold rule) or the budget (budget rule).

    With ``config.pad_k`` and K not a multiple of the block, the zero channels go first and
    the head-structured order after them: the plan still folds (:func:`attention_fold`).

    Coarser than the free sort: whole heads move, so with head_dim = block_size a block is a
    head and the INT8 count is the number of heads holding an outlier. Compare
    :func:`int8_fraction` against :func:`plan_permutation` and fall back to the free plan with
    a run-time gather when the folded plan needs too many INT8 blocks.
    """
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(
            f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
        )
    is_outlier, score = _rank_key(max_abs, mean_abs, score, config)
    k = score.shape[0]
    if k != n_heads * head_dim:
        raise ValueError(f"K={k} must equal n_heads * head_dim = {n_heads} * {head_dim}")
    kp, pad = padded_k(k, config.block_size, config.pad_k)
    rank = np.empty(k, np.int64)
    rank[np.lexsort((score, is_outlier))] = np.arange(k)
    n_rep = n_heads // n_kv_heads
    r = rank.reshape(n_kv_heads, n_rep, head_dim)  # [group, head in group, d]
    group_order = np.argsort(r.max(axis=(1, 2)), kind="stable")
    perm = []
    for j in group_order:
        dim_order = np.argsort(r[j].max(axis=0), kind="stable")
        for i in np.argsort(r[j].max(axis=1), kind="stable"):
            perm.append((j * n_rep + i) * head_dim + dim_order)
    # Padding: the zeros go first, the folded head order after them (still foldable).
    perm = np.concatenate([np.arange(pad), pad + np.concatenate(perm)]).astype(np.int32)
    n_blocks, n_real = kp // config.block_size, k // config.block_size
    if config.rule == "threshold":
        pos = np.nonzero(np.concatenate([np.zeros(pad, bool), is_outlier])[perm])[0]
        n8 = 0 if pos.size == 0 else n_blocks - int(pos[0]) // config.block_size
        hi = n_real if config.max_int8_blocks is None else min(config.max_int8_blocks, n_real)
        n8 = min(max(n8, config.min_int8_blocks), hi)
    else:
        n8 = _n_int8_blocks(config, 0, k)
    return FMPQPlan(perm, int(n8), config.block_size, kp, pad)


def int8_fraction(plan: FMPQPlan) -> float:
    """Fraction of the layer's real input channels that are INT8 (== of its blocks when
    unpadded; padded zeros are never INT8 in a plan built here)."""
    return plan.k8 / plan.k_in


def _perm_arg(perm_or_plan, k: int, what: str) -> np.ndarray:
    perm = perm_or_plan.perm if isinstance(perm_or_plan, FMPQPlan) else perm_or_plan
    if not hasattr(perm, "shape"):  # keep jax arrays (also tracers) as they are
        perm = np.asarray(perm)
    if perm.shape != (k,):
        raise ValueError(f"{what}: permutation of shape {perm.shape} does not match size {k}")
    return perm


def _pad_for(a, plan, axis: int):
    """Pads an unpadded operand (``a.shape[axis] == plan.k_in``) of a padded plan."""
    if isinstance(plan, FMPQPlan) and plan.pad and a.shape[axis] == plan.k_in:
        return pad_channels(a, plan.pad, axis)
    return a


def permute_in(w, plan: FMPQPlan | np.ndarray):
    """Permutes weight input columns: ``w: [N, K] -> w[:, perm]`` (any array type).

    With a padded plan, ``w: [N, k_in]`` first gets ``pad`` zero columns in front."""
    w = _pad_for(w, plan, -1)
    return w[:, _perm_arg(plan, w.shape[-1], "permute_in")]


def permute_activation(x, plan: FMPQPlan | np.ndarray):
    """Run-time permutation of activations: ``x: [..., K] -> x[..., perm]`` (``[..., k_in]``
    inputs of a padded plan get their zero channels first)."""
    x = _pad_for(x, plan, -1)
    return x[..., _perm_arg(plan, x.shape[-1], "permute_activation")]


def permute_hessian(h, plan: FMPQPlan | np.ndarray):
    """``H = X^T X: [K, K]`` in the permuted layout: ``H[perm][:, perm]`` (for GPTQ/LWC).

    With a padded plan, an unpadded ``[k_in, k_in]`` H is padded first: zero rows/columns
    (the zero channels correlate with nothing) and ``mean(diag(H))`` on their diagonal, so the
    padded channels are neither dead nor coupled to the real ones and GPTQ's damping
    ``percdamp * mean(diag(H))`` keeps its unpadded value (up to f32 rounding of the mean).
    Their weights are zero, so they have no rounding error to propagate either.
    """
    if isinstance(plan, FMPQPlan) and plan.pad and h.shape[-1] == plan.k_in:
        fill = h.diagonal().mean()
        h = pad_channels(pad_channels(h, plan.pad, 0), plan.pad, 1)
        idx = np.arange(plan.pad)
        if isinstance(h, np.ndarray):
            h = h.copy()
            h[idx, idx] = fill
        else:
            h = h.at[idx, idx].set(fill)
    perm = _perm_arg(plan, h.shape[-1], "permute_hessian")
    return h[perm][:, perm]


def _fold_perm(perm_or_plan, what: str):
    """The permutation a producer folds: a padded plan's ``real_perm``."""
    if isinstance(perm_or_plan, FMPQPlan) and perm_or_plan.pad:
        real = perm_or_plan.real_perm
        if real is None:
            raise ValueError(
                f"{what}: the padded plan does not put its {perm_or_plan.pad} zero channels "
                "first (perm[:pad] != arange(pad)), so it cannot be folded"
            )
        return real
    return perm_or_plan


def fold_out(w, perm: FMPQPlan | np.ndarray):
    """Permutes OUTPUT rows of a producing layer: ``w: [N, K] (or bias [N]) -> w[perm]``.

    The layer then emits its outputs already in the consumer's permuted input order. With a
    padded plan (K = ``k_in`` rows) the rows follow ``plan.real_perm``: the consumer prepends
    the zero channels itself.
    """
    return w[_perm_arg(_fold_perm(perm, "fold_out"), w.shape[0], "fold_out")]


class AttentionFold(NamedTuple):
    """Row permutations that fold an o_proj input permutation into q/k/v (apply fold_out).

    q_rows: ``[n_heads * head_dim]`` for q_proj rows (and bias): whole heads move.
    k_rows: ``[n_kv_heads * head_dim]`` for k_proj rows (and bias): whole KV heads move, so
      RoPE pairs and any per-head k-norm are untouched.
    v_rows: ``[n_kv_heads * head_dim]`` for v_proj rows (and bias): KV heads move and the
      head_dim positions of each KV head are permuted.
    """

    q_rows: np.ndarray
    k_rows: np.ndarray
    v_rows: np.ndarray

    @property
    def moves_heads(self) -> bool:
        """False when only v rows change (q_proj/k_proj need no update)."""
        return not np.array_equal(self.q_rows, np.arange(self.q_rows.size))


def attention_fold(
    perm: FMPQPlan | np.ndarray, *, n_heads: int, n_kv_heads: int, head_dim: int
) -> AttentionFold | None:
    """Decomposes an o_proj input permutation into q/k/v row permutations, or None.

    Valid iff ``perm[h' * D + d'] = pi(h') * D + sigma_{g(h')}(d')`` (module docstring). With
    the result: ``fold_out`` q_proj/k_proj/v_proj rows (and biases) by ``q_rows``/``k_rows``/
    ``v_rows`` and ``permute_in(w_o, perm)``; attention then outputs the permuted channels.
    When this returns None the plan does not fold: keep the weights unpermuted except
    ``permute_in(w_o, perm)`` and permute the o_proj input at run time (the activation
    quantize step gathers ``x[..., perm]``). A padded plan is decomposed through its
    ``real_perm`` (the consumer prepends the zero channels).
    """
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(
            f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
        )
    d = head_dim
    perm = _fold_perm(perm, "attention_fold")
    perm = np.asarray(_perm_arg(perm, n_heads * d, "attention_fold")).reshape(n_heads, d)
    n_rep = n_heads // n_kv_heads
    pi = perm[:, 0] // d  # old head of each new head
    if not np.array_equal(perm // d, np.repeat(pi[:, None], d, axis=1)):
        return None  # a new head mixes channels of several old heads
    sigma = perm % d  # [new head, d'] -> old d
    rho = pi[::n_rep] // n_rep  # old KV group of each new KV group
    for jn in range(n_kv_heads):
        heads = slice(jn * n_rep, (jn + 1) * n_rep)
        if np.any(pi[heads] // n_rep != rho[jn]):
            return None  # a new KV group takes q heads of several old groups
        if np.any(sigma[heads] != sigma[jn * n_rep]):
            return None  # q heads sharing one v head need one head_dim order
    ar = np.arange(d)
    q_rows = (pi[:, None] * d + ar).reshape(-1)
    k_rows = (rho[:, None] * d + ar).reshape(-1)
    v_rows = (rho[:, None] * d + sigma[::n_rep]).reshape(-1)
    return AttentionFold(q_rows.astype(np.int32), k_rows.astype(np.int32), v_rows.astype(np.int32))
