"""Activation statistics of every linear-layer input, collected over calibration windows.

The float model runs in capture mode (`models.llama`: every input group's float input, after its
RMSNorm, is sown); a `capture_transform` reduces each sown `x: [B, T, K]` to per-channel
statistics inside the jitted forward, so activations are never kept. Projections that share an
input (q/k/v read "attn_in", gate/up read "mlp_in") share one entry: statistics are keyed by
(layer, group).

Per (layer, group), over all calibration tokens:

    absmax   [K] f32    max |x| per input channel
    absmean  [K] f32    mean |x| per input channel
    hessian  [K, K] f32 X^T X summed over tokens (GPTQ's Hessian up to the factor 2/n);
                        only when `hessian=True`
    rot_absmax / rot_absmean [K]: the same of the Hadamard-rotated input x @ H (only when
                        `rotated=True`), so rotation + FMPQ plans need no second pass.

`snapshots` keeps copies of the max/mean statistics after the first n windows (calibration-size
ablations from one pass; the Hessian is not snapshotted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from models.llama import LlamaForCausalLM
from models.projection import GROUPS


@dataclasses.dataclass
class GroupStats:
    """Statistics of one input group (shapes in the module docstring)."""

    absmax: np.ndarray
    absmean: np.ndarray
    hessian: np.ndarray | None = None
    rot_absmax: np.ndarray | None = None
    rot_absmean: np.ndarray | None = None

    def channel_stats(self, rotated: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(absmax, absmean) of the plain or the rotated input."""
        if rotated:
            if self.rot_absmax is None:
                raise ValueError(
                    "rotated statistics were not collected (collect with rotated=True)"
                )
            return self.rot_absmax, self.rot_absmean
        return self.absmax, self.absmean


@dataclasses.dataclass
class CalibStats:
    """`groups[(layer, group)] -> GroupStats`; `n_tokens` tokens from `n_windows` windows."""

    groups: dict[tuple[int, str], GroupStats]
    n_tokens: int
    n_windows: int
    window: int

    def __getitem__(self, key: tuple[int, str]) -> GroupStats:
        if key not in self.groups:
            raise KeyError(f"no statistics for (layer, group)={key}")
        return self.groups[key]


@dataclasses.dataclass(frozen=True)
class StatsTransform:
    """capture_transform: x [B, T, K] -> dict of per-channel reductions (hashable for jit)."""

    hessian: bool = False
    rotated: bool = False

    def __call__(self, layer_idx: int, group: str, x):
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        ax = jnp.abs(xf)
        out = {"absmax": jnp.max(ax, axis=0), "abssum": jnp.sum(ax, axis=0)}
        if self.rotated:
            from comet_jax.quant import hadamard

            ar = jnp.abs(hadamard.hadamard_transform(xf))
            out["rot_absmax"] = jnp.max(ar, axis=0)
            out["rot_abssum"] = jnp.sum(ar, axis=0)
        if self.hessian:
            out["hessian"] = jnp.einsum(
                "tk,tl->kl", xf, xf, precision="highest", preferred_element_type=jnp.float32
            )
        return out


def _stats_fn(config, hessian: bool, rotated: bool):
    model = LlamaForCausalLM(
        config, capture_transform=StatsTransform(hessian=hessian, rotated=rotated)
    )

    @jax.jit
    def run(params, tokens):
        _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
        inter = state["intermediates"]
        return {
            (i, g): inter[f"layers_{i}"][g][0] for i in range(config.num_layers) for g in GROUPS
        }

    return run


def collect_stats(
    config,
    params,
    windows: np.ndarray,
    *,
    batch_size: int = 1,
    hessian: bool = False,
    rotated: bool = False,
    snapshots: Sequence[int] = (),
    progress: bool = True,
) -> CalibStats | tuple[CalibStats, dict[int, CalibStats]]:
    """Runs the float model over `windows: [n, T] int32` and reduces every group's input.

    Returns the full-set CalibStats, or (stats, {n: stats of the first n windows}) when
    `snapshots` is given (each n must be <= the number of windows).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows of shape {windows.shape}; expected [n >= 1, T] token ids")
    n, t = windows.shape
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    bad = [s for s in snapshots if not 1 <= s <= n]
    if bad:
        raise ValueError(f"snapshots={list(snapshots)} must lie in [1, {n}] (number of windows)")
    run = _stats_fn(config, hessian, rotated)
    acc: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    snaps: dict[int, CalibStats] = {}
    done = 0
    bar = tqdm(total=n, desc="calibration", unit="window", disable=not progress)
    for start in range(0, n, batch_size):
        # Batches never straddle a snapshot boundary, so snapshots are exact.
        stop = min(n, start + batch_size, *[s for s in snapshots if s > start])
        out = jax.device_get(run(params, jnp.asarray(windows[start:stop], jnp.int32)))
        for key, red in out.items():
            a = acc.setdefault(key, {})
            for name, val in red.items():
                val = np.asarray(val, np.float64 if name == "hessian" else np.float32)
                if name.endswith("absmax"):
                    a[name] = val if name not in a else np.maximum(a[name], val)
                else:
                    a[name] = val if name not in a else a[name] + val
        done = stop
        bar.update(stop - start)
        if done in snapshots:
            snaps[done] = _finish(acc, done * t, done, t, with_hessian=False)
    bar.close()
    stats = _finish(acc, n * t, n, t, with_hessian=hessian)
    return (stats, snaps) if snapshots else stats


def _finish(acc, n_tokens, n_windows, window, with_hessian: bool) -> CalibStats:
    groups = {}
    for key, a in acc.items():
        groups[key] = GroupStats(
            absmax=a["absmax"].copy(),
            absmean=(a["abssum"] / n_tokens).astype(np.float32),
            hessian=a["hessian"].astype(np.float32) if with_hessian and "hessian" in a else None,
            rot_absmax=a["rot_absmax"].copy() if "rot_absmax" in a else None,
            rot_absmean=(a["rot_abssum"] / n_tokens).astype(np.float32)
            if "rot_abssum" in a
            else None,
        )
    return CalibStats(groups=groups, n_tokens=n_tokens, n_windows=n_windows, window=window)
