"""W4Ax GEMM: INT4 weights x FMPQ mixed INT4/INT8 activations, Pallas-Triton, with its reference.

``Y[M, N] = X[M, K] @ W[N, K]^T`` where the K channels of X were permuted so that the INT4
blocks come first (``K4`` channels) and the INT8 blocks last (``K8``); ``K = K4 + K8``.

Operands (docs/architecture.md, "Number formats"):

    x4_packed: [M, K4/2] int8   INT4 activations, half-split tiles of ``tile_k``
    x8:        [M, K8]   int8   INT8 activations
    x_scales:  [M, 2]    f32    per-token (INT4 segment scale, INT8 segment scale)
    w_packed:  [N, K/2]  int8   INT4 weights over the full K, half-split tiles of ``tile_k``
    w_scales:  [N] f32 (per output channel) or [N, K/g] f32 (groups of g along K)
    bias:      [N] or None

    Y = s4[m] * ws[n] * (x4 . w[:, :K4]) + s8[m] * ws[n] * (x8 . w[:, K4:]) + bias[n]

With group scales each group's partial sum gets its own ``ws[n, g]``.

Kernel design (Hopper, Triton):

* Both dot operands are K-contiguous and contracted on their last axes (``dot_general``
  with ``(((1,), (1,)), ((), ()))``): the only int8 layout on which Triton's tensor-core
  path runs at full rate on sm_90.
* One K tile of packed weights ``[bn, tile_k/2]`` is unpacked with one op per half
  (``b << 4`` = 16*lo, ``b & 0xF0`` = 16*hi) and contributes
  ``dot(x[:, :tile_k/2], lo) + dot(x[:, tile_k/2:], hi)``; INT4 activations are unpacked the
  same way. The factors 16 (INT8 segment) and 256 (INT4 segment) are folded into the
  epilogue; accumulation is int32 per segment.
* ``swap_ab``: compute ``Y^T`` tiles ``[bn, bm] = W_tile @ X_tile^T`` so that the unpacked
  weights are the MMA's A operand (registers) and the small token dimension is the MMA's N
  (down to 16): the decode schedule.
* ``split_k``: the tile range ``[0, K/tile_k)`` is cut into ``split_k`` contiguous pieces
  (a piece may straddle the INT4/INT8 boundary); partial f32 results ``[S, M, N]`` are
  reduced by XLA. With ``split_k == 1`` the kernel writes ``out_dtype`` directly.
* ``group_m``: grouped ordering of output tiles over the 1-D grid (L2 reuse in prefill).
* ``pre_unpack`` ("w" or "wx"; prefill): XLA unpacks the packed weights (and with "wx" the
  INT4 activations) once per call into x16 int8 ``[N, K]`` (same half-split tile order), so the
  kernel's loop has no unpack: the weight tile goes from shared memory straight to the MMA
  instead of registers -> shared memory every K step. Costs 1.5 extra bytes per weight of HBM
  traffic (read 0.5, write 1, read 1 instead of 0.5): pays only where the GEMM is
  compute-bound (large M). ``pre_unpack="x"`` unpacks only the INT4 activations (M x K4
  bytes, cheap at any M): with ``swap_ab`` the weights are the MMA's register operand and the
  activations then reach it from shared memory without a register round trip.
* ``backend="mgpu"`` (the tuning-table choice for the large prefill GEMMs): the same GEMM on
  Pallas' Mosaic GPU backend (``pallas_kernels/w4ax_mgpu.py``: TMA, warp specialisation,
  wgmma from shared memory), 5-25% less time than this kernel at M = 8192 on three of the four
  8B engine shapes (H100, 2026-11-26). Per-channel scales only; elsewhere the config runs
  here as ``backend="pallas"``.
* ``backend="xla_int8"`` (a tuning candidate, per-channel scales only): XLA unpacks the INT4
  weights and activations to int8 and runs its int8 ``[N, K]`` GEMM per segment; same int32
  sums, same epilogue. Meant for compute-bound prefill, where the kernel's in-loop unpack
  costs MMA rate; on the H100 it lost to the kernel at every M measured (<= 1024).
* ``acc8_first`` (an ablation, off): the INT8 segment's tiles first, then its partial
  ``acc8 * s8 / 16`` rounded to bf16 (one extra bf16 rounding of that term, relative error
  <= 2^-9 of it), and the one int32 accumulator, zeroed, takes the INT4 tiles: one
  accumulator and half of one live instead of two. It tests whether the second accumulator
  is what keeps 128 x 128 tiles at 4 warps (a plain int8 ``[N, K]`` GEMM's fastest tile) out
  of reach. Measured on the H100 (2026-11-26, ``bench_gemm.py --one-acc``): it is not; those
  tiles stay 1.3-2.5x slower than the tuned ones, and the tuned tiles gain nothing.
  Per-channel weight scales only (group scales already accumulate in f32).
* ``park_out``: one int32 accumulator and nothing parked in registers. The INT8 segment's
  tiles run first; their scaled partial ``acc8 * s8 / 16`` is stored into the program's own
  output tile (global memory; it stays in L2), the accumulator, zeroed, takes the INT4
  tiles, and the epilogue reads the partial back and adds it. Rounding: the partial takes
  the output dtype once before the final rounding (bf16: <= 2^-9 of that term; split-K
  partials are f32). In the PTX Triton generates, CTA barriers (``bar.sync``, which order
  global memory within the CTA) separate the store from the read-back whatever the INT4
  loop's trip count (docs/kernels_gemm.md); the benchmark also checks every output element
  on the device. With only one segment (K4 = 0 or K8 = 0) it changes nothing. Measured on
  the H100 (2026-11-26, ``bench_gemm.py --park``): it lets 128 x 128 tiles at 4 warps run,
  7-19% less time than the tuned two-accumulator configs at M = 1024 and 4096 (now the
  tuning-table entries there); no gain at M = 256.
* W4A16 (`w4a16_matmul`): the same kernel with one float segment, ``x: [M, K]`` bf16 in
  place of ``x8``; the x16 weight halves are converted to bf16 in registers (exact) and meet
  x on the bf16 MMA with f32 accumulation; x_scales are ones, the 1/16 stays in the epilogue.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from comet_jax.quant.pack import pack_int4, unpack_int4, unpack_int4_x16
from pallas_kernels.act_quant import to_unpacked

DEFAULT_TILE_K = 128
BACKENDS = ("pallas", "xla_int8", "mgpu")
# From this M the engine's activations reach the GEMMs in the unpacked layout
# (`w4ax_matmul_unpacked`; `W4AxLinear.act_layout="auto"`): every tuning-table config of the
# engine's shapes there takes its activations pre-unpacked (Triton "x" / "wx", or Mosaic
# GPU), checked by tests/test_w4ax_matmul.py. The rows are padded to a multiple of
# UNPACKED_ROW_ALIGN: every block_m divides it, so no GEMM pads them again.
UNPACKED_MIN_M = 257
UNPACKED_ROW_ALIGN = 256
PRE_UNPACK = ("", "w", "x", "wx")
_DOT_LAST = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Static schedule of one W4Ax GEMM call (see module docstring)."""

    block_m: int = 64
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    group_m: int = 8
    k_unroll: int = 1  # K tiles per pipelined loop step (more bytes in flight per stage)
    # "": unpack in the kernel loop; "w": weights unpacked by XLA before the kernel; "x": the
    # INT4 activations only; "wx": both (module docstring).
    pre_unpack: str = ""
    # "pallas": the kernel below. "xla_int8": unpack INT4 weights/activations to int8 with
    # XLA, then XLA's int8 GEMM ([N, K]) per segment and the same epilogue (module docstring).
    # "mgpu": the Mosaic GPU kernel (pallas_kernels/w4ax_mgpu.py) with block_m (128 or 256
    # rows), block_n, num_stages and acc8_first (its park_int8) as its schedule (with swap_ab
    # and a pre_unpack without "w": MgpuConfig.w_regs, block_m tokens and block_n weight
    # rows per tile); where it
    # cannot run (interpret mode, group scales, tile_k != 128, N not a multiple of block_n,
    # raw sums, 256 rows with two accumulators) the same config runs here with backend
    # "pallas".
    backend: str = "pallas"
    # One int32 accumulator per tile instead of two: the INT8 segment's loop runs first and
    # its scaled partial waits in bf16 registers (half the space) while the same accumulator,
    # zeroed, takes the INT4 segment. An ablation (no speed-up measured; module docstring).
    # Per-channel weight scales only.
    acc8_first: bool = False
    # One int32 accumulator per tile, nothing parked in registers: the INT8 segment's loop
    # runs first, its scaled partial goes to the program's own output tile (global memory,
    # L2-resident), the accumulator, zeroed, takes the INT4 segment, and the epilogue adds
    # the partial back. Rounds that partial to the output dtype once (module docstring).
    park_out: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if self.pre_unpack not in PRE_UNPACK:
            raise ValueError(f"pre_unpack={self.pre_unpack!r} must be one of {PRE_UNPACK}")
        if self.acc8_first and self.park_out:
            raise ValueError(
                "GemmConfig: acc8_first and park_out are exclusive (both park the INT8 partial)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GemmConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# Validation (before tracing)
# --------------------------------------------------------------------------------------------


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _check_2d(name, a, dtype):
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must be {jnp.dtype(dtype).name}, got dtype {a.dtype}")


def validate_args(x4_packed, x8, x_scales, w_packed, w_scales, bias, tile_k) -> tuple:
    """Checks shapes/dtypes; returns ``(M, N, K4, K8, n_groups)`` (n_groups 0: per channel)."""
    if not (_is_pow2(tile_k) and tile_k >= 32):
        raise ValueError(f"tile_k={tile_k} must be a power of two >= 32")
    _check_2d("x4_packed", x4_packed, jnp.int8)
    _check_2d("x8", x8, jnp.int8)
    _check_2d("w_packed", w_packed, jnp.int8)
    m = x4_packed.shape[0]
    if x8.shape[0] != m:
        raise ValueError(f"x8 has {x8.shape[0]} rows but x4_packed has {m}; expected equal M")
    k4, k8 = 2 * x4_packed.shape[1], x8.shape[1]
    if k4 % tile_k:
        raise ValueError(f"x4_packed: K4={k4} must be a multiple of tile_k={tile_k}")
    if k8 % tile_k:
        raise ValueError(f"x8: K8={k8} must be a multiple of tile_k={tile_k}")
    k = k4 + k8
    if k == 0:
        raise ValueError("x4_packed and x8 are both empty: K4 + K8 must be > 0")
    n = w_packed.shape[0]
    if 2 * w_packed.shape[1] != k:
        raise ValueError(
            f"w_packed has shape {w_packed.shape} (K={2 * w_packed.shape[1]}); "
            f"expected [N, {k // 2}] for K = K4 + K8 = {k4} + {k8}"
        )
    if n % 16:
        raise ValueError(f"w_packed: N={n} must be a multiple of 16")
    if x_scales.shape != (m, 2) or x_scales.dtype != jnp.float32:
        raise ValueError(
            f"x_scales must be f32 [{m}, 2], got {x_scales.dtype} {tuple(x_scales.shape)}"
        )
    if w_scales.dtype != jnp.float32:
        raise ValueError(f"w_scales must be f32, got dtype {w_scales.dtype}")
    n_groups = 0
    if w_scales.shape == (n,):
        pass
    elif w_scales.ndim == 2 and w_scales.shape[0] == n and w_scales.shape[1] > 0:
        n_groups = w_scales.shape[1]
        if k % n_groups or (k // n_groups) % tile_k:
            raise ValueError(
                f"w_scales has {n_groups} groups over K={k}: the group size must be a "
                f"multiple of tile_k={tile_k}"
            )
    else:
        raise ValueError(f"w_scales must be [{n}] or [{n}, K/g] f32, got shape {w_scales.shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    return m, n, k4, k8, n_groups


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _add_bias_cast(y, bias, out_dtype):
    """f32 ``y: [M, N]`` (+ ``bias: [N]``) -> out_dtype."""
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def w4ax_accumulators_reference(x4_packed, x8, w_packed, *, tile_k: int = DEFAULT_TILE_K):
    """Exact integer sums ``(acc4, acc8)``, each ``[M, N] int32`` (true units, no x16)."""
    k4 = 2 * x4_packed.shape[1]
    w = unpack_int4(w_packed, tile_k)  # [N, K] int8 in [-8, 7]
    m, n = x8.shape[0], w.shape[0]
    acc4 = jnp.zeros((m, n), jnp.int32)
    acc8 = jnp.zeros((m, n), jnp.int32)
    if k4:
        x4 = unpack_int4(x4_packed, tile_k)
        acc4 = jax.lax.dot_general(x4, w[:, :k4], _DOT_LAST, preferred_element_type=jnp.int32)
    if x8.shape[1]:
        acc8 = jax.lax.dot_general(x8, w[:, k4:], _DOT_LAST, preferred_element_type=jnp.int32)
    return acc4, acc8


def w4ax_matmul_reference(
    x4_packed,
    x8,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    tile_k=DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
):
    """Pure-jnp W4Ax GEMM: the documented semantics (module docstring)."""
    m, n, k4, k8, n_groups = validate_args(
        x4_packed, x8, x_scales, w_packed, w_scales, bias, tile_k
    )
    s4, s8 = x_scales[:, 0:1], x_scales[:, 1:2]
    if n_groups == 0:
        acc4, acc8 = w4ax_accumulators_reference(x4_packed, x8, w_packed, tile_k=tile_k)
        y = (s4 * acc4.astype(jnp.float32) + s8 * acc8.astype(jnp.float32)) * w_scales[None, :]
    else:
        w = unpack_int4(w_packed, tile_k)
        x = jnp.concatenate(
            [unpack_int4(x4_packed, tile_k) if k4 else x8[:, :0], x8], axis=1
        )  # [M, K] int8, true values
        g = (k4 + k8) // n_groups
        y = jnp.zeros((m, n), jnp.float32)
        # Groups may straddle the INT4/INT8 boundary: cut at both.
        cuts = sorted(set(list(range(0, k4 + k8, g)) + [k4, k4 + k8]))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi <= lo:
                continue
            acc = jax.lax.dot_general(
                x[:, lo:hi], w[:, lo:hi], _DOT_LAST, preferred_element_type=jnp.int32
            )
            s = s4 if lo < k4 else s8
            y = y + s * (acc.astype(jnp.float32) * w_scales[None, :, lo // g])
    return _add_bias_cast(y, bias, out_dtype)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


def _kernel(
    *refs,
    t4,
    t8,
    tile_k,
    tiles_per_split,
    swap_ab,
    group_tiles,
    raw,
    has_x4,
    has_x8,
    has_bias,
    k_unroll,
    w_unpacked,
    x4_unpacked,
    x_float,
    acc8_first=False,
    park_out=False,
    x_combined=False,
):
    refs = list(refs)
    if x_combined:  # one [bm, K] operand, unpacked INT4 then INT8 (w4ax_matmul_unpacked)
        x4_ref = x8_ref = refs.pop(0)
    else:
        x4_ref = refs.pop(0) if has_x4 else None
        x8_ref = refs.pop(0) if has_x8 else None
    xs_ref, w_ref, ws_ref = refs[:3]
    refs = refs[3:]
    bias_ref = refs.pop(0) if has_bias else None
    out_refs = refs

    h = tile_k // 2
    bn = w_ref.shape[0]
    bm = xs_ref.shape[0]
    acc_shape = (bn, bm) if swap_ab else (bm, bn)
    n_tiles = t4 + t8
    lo = pl.program_id(1) * tiles_per_split
    hi = jnp.minimum(lo + tiles_per_split, n_tiles)
    grouped = group_tiles > 0 and not raw

    # W4A16 (`x_float`): the x16 weight halves are exact in bf16 (multiples of 16 in
    # [-128, 112]); they meet the float activations on the bf16 MMA, f32 accumulation.
    dot_type = jnp.float32 if x_float else jnp.int32

    def dot(a, b):
        if x_float:
            a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        return jax.lax.dot_general(a, b, _DOT_LAST, preferred_element_type=dot_type)

    def tile_dot(xlo, xhi, t):
        if w_unpacked:  # x16 int8, tile t = [16 * low nibbles | 16 * high nibbles]
            wlo = w_ref[:, pl.ds(t * tile_k, h)]
            whi = w_ref[:, pl.ds(t * tile_k + h, h)]
        else:
            wb = w_ref[:, pl.ds(t * h, h)]
            wlo = jnp.left_shift(wb, jnp.int8(4))  # 16 * low nibble
            whi = wb & jnp.int8(-16)  # 16 * high nibble
        if swap_ab:
            return dot(wlo, xlo) + dot(whi, xhi)
        return dot(xlo, wlo) + dot(xhi, whi)

    def accumulate(acc, t, d):
        if not grouped:
            return acc + d
        gs = ws_ref[pl.ds(t // group_tiles, 1), :]  # [1, bn]
        gs = gs.reshape(bn, 1) if swap_ab else gs
        return acc + d.astype(jnp.float32) * gs

    acc_dtype = jnp.float32 if grouped or x_float else jnp.int32

    def full_tile_dot(x, t):
        # Both operands unpacked in the same tile order: one dot over the whole K tile.
        w = w_ref[:, pl.ds(t * tile_k, tile_k)]
        return dot(w, x) if swap_ab else dot(x, w)

    def body4(t, acc):
        if x4_unpacked and w_unpacked:
            return accumulate(acc, t, full_tile_dot(x4_ref[:, pl.ds(t * tile_k, tile_k)], t))
        if x4_unpacked:  # x16 int8 tiles [16 * low | 16 * high], as the weights' halves
            xlo = x4_ref[:, pl.ds(t * tile_k, h)]
            xhi = x4_ref[:, pl.ds(t * tile_k + h, h)]
            return accumulate(acc, t, tile_dot(xlo, xhi, t))
        xb = x4_ref[:, pl.ds(t * h, h)]
        xlo = jnp.left_shift(xb, jnp.int8(4))
        xhi = xb & jnp.int8(-16)
        return accumulate(acc, t, tile_dot(xlo, xhi, t))

    def body8(t, acc):
        t8_ = t if x_combined else t - t4  # the tile's position in its operand
        if w_unpacked:
            return accumulate(acc, t, full_tile_dot(x8_ref[:, pl.ds(t8_ * tile_k, tile_k)], t))
        xlo = x8_ref[:, pl.ds(t8_ * tile_k, h)]
        xhi = x8_ref[:, pl.ds(t8_ * tile_k + h, h)]
        return accumulate(acc, t, tile_dot(xlo, xhi, t))

    def seg_loop(start, stop, body, acc):
        # `k_unroll` tiles per pipelined step, then the remainder one tile at a time.
        if k_unroll == 1:
            return jax.lax.fori_loop(start, stop, body, acc)
        n_steps = jnp.maximum(stop - start, 0) // k_unroll

        def step(i, acc):
            for j in range(k_unroll):
                acc = body(start + i * k_unroll + j, acc)
            return acc

        acc = jax.lax.fori_loop(0, n_steps, step, acc)
        return jax.lax.fori_loop(start + n_steps * k_unroll, stop, body, acc)

    def store(ref, v):
        ref[...] = (v.T if swap_ab else v).astype(ref.dtype)

    def token_scales():
        # Fold the x16 (INT8 segment) and x256 (INT4 segment) unpack factors into the scales.
        xs = xs_ref[...]  # [bm, 2]: (INT4 scale, INT8 scale) per token
        col = jax.lax.broadcasted_iota(jnp.int32, (bm, 2), 1)
        s4 = jnp.sum(jnp.where(col == 0, xs, 0.0), axis=1) * (1.0 / 256.0)
        s8 = jnp.sum(jnp.where(col == 1, xs, 0.0), axis=1) * (1.0 / 16.0)
        shape = (1, bm) if swap_ab else (bm, 1)
        return s4.reshape(shape), s8.reshape(shape)

    def load_out():
        v = out_refs[0][...].astype(jnp.float32)
        return v.T if swap_ab else v

    if park_out and has_x4 and has_x8:
        # One live accumulator: the INT8 tiles, their partial parked in this program's own
        # output tile, then the INT4 tiles. Read back after the INT4 loop; the compiled
        # kernel has CTA barriers in between (module docstring).
        acc = seg_loop(jnp.maximum(lo, t4), hi, body8, jnp.zeros(acc_shape, acc_dtype))
        if raw:
            store(out_refs[1], acc)
        else:
            s4, s8 = token_scales()
            store(out_refs[0], acc.astype(jnp.float32) * s8)
        acc = seg_loop(lo, jnp.minimum(hi, t4), body4, jnp.zeros(acc_shape, acc_dtype))
        if raw:
            store(out_refs[0], acc)
            return
        y = acc.astype(jnp.float32) * s4 + load_out()
    elif acc8_first:  # one int32 accumulator: INT8 tiles, park them in bf16, then INT4 tiles
        acc8 = jnp.zeros(acc_shape, acc_dtype)
        if has_x8:
            acc8 = seg_loop(jnp.maximum(lo, t4), hi, body8, acc8)
        if raw:
            store(out_refs[1], acc8)
        else:
            s4, s8 = token_scales()
            part8 = (acc8.astype(jnp.float32) * s8).astype(jnp.bfloat16)
        acc4 = jnp.zeros(acc_shape, acc_dtype)
        if has_x4:
            acc4 = seg_loop(lo, jnp.minimum(hi, t4), body4, acc4)
        if raw:
            store(out_refs[0], acc4)
            return
        y = acc4.astype(jnp.float32) * s4 + part8.astype(jnp.float32)
    else:
        acc4 = jnp.zeros(acc_shape, acc_dtype)
        acc8 = jnp.zeros(acc_shape, acc_dtype)
        if has_x4:
            acc4 = seg_loop(lo, jnp.minimum(hi, t4), body4, acc4)
        if has_x8:
            acc8 = seg_loop(jnp.maximum(lo, t4), hi, body8, acc8)
        if raw:
            store(out_refs[0], acc4)
            store(out_refs[1], acc8)
            return
        s4, s8 = token_scales()
        y = acc4.astype(jnp.float32) * s4 + acc8.astype(jnp.float32) * s8
    if not grouped:
        ws = ws_ref[...]
        y = y * (ws.reshape(bn, 1) if swap_ab else ws.reshape(1, bn))
    if has_bias:
        b = bias_ref[...].astype(jnp.float32)
        y = y + (b.reshape(bn, 1) if swap_ab else b.reshape(1, bn))
    store(out_refs[0], y)


def unpack_int4_x16_tiles(packed, tile_k: int = DEFAULT_TILE_K, *, words: bool = True):
    """``[R, K/2]`` packed int8 -> ``[R, K]`` int8 holding 16 * value, each ``tile_k`` tile
    laid out as [16 * low nibbles | 16 * high nibbles]: the kernel's unpack, done by XLA.

    ``words=True`` (default): work on 32-bit words (4 packed bytes: ``(w << 4) & 0xF0F0F0F0``
    and ``w & 0xF0F0F0F0`` act on each byte alone), a quarter of the elements of the byte-wise
    form; same bytes out (tested). On H100 (``bench_gemm.py --unpack``, 2026-11-26) it took
    31.5 vs 36.3 us for a 4096x14336 weight (2.80 vs 2.43 TB/s of bytes read + written).
    ``words=False``: the byte-wise form (also used when a half tile is not whole words).
    """
    r, half = packed.shape
    if not words or (tile_k // 2) % 4:
        lo16, hi16 = unpack_int4_x16(packed, tile_k)  # [R, K/tile, tile/2] each
        return jnp.concatenate([lo16, hi16], axis=-1).reshape(r, -1)
    if packed.dtype != jnp.int8 or (2 * half) % tile_k:
        raise ValueError(
            f"packed must be int8 [R, K/2] with K a multiple of tile_k={tile_k}, got "
            f"{packed.dtype} {tuple(packed.shape)}"
        )
    w = jax.lax.bitcast_convert_type(packed.reshape(r, half // 4, 4), jnp.uint32)
    w = w.reshape(r, 2 * half // tile_k, tile_k // 8)  # [R, tiles, words per half tile]
    mask = jnp.uint32(0xF0F0F0F0)
    lo16 = jnp.left_shift(w, jnp.uint32(4)) & mask
    hi16 = w & mask
    out = jnp.concatenate([lo16, hi16], axis=-1)  # [R, tiles, tile/4] words
    return jax.lax.bitcast_convert_type(out, jnp.int8).reshape(r, 2 * half)


def _pick_block_n(n: int, want: int) -> int:
    bn = want
    while bn > 16 and n % bn:
        bn //= 2
    return bn


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@functools.partial(
    jax.jit,
    static_argnames=(
        "tile_k", "out_dtype", "interpret", "config", "raw", "combined_k4", "rows"
    ),
)  # fmt: skip
def _w4ax_call(
    x4_packed,
    x8,
    x_scales,
    w_packed,
    w_scales,
    bias,
    *,
    tile_k,
    out_dtype,
    interpret,
    config: GemmConfig,
    raw: bool,
    combined_k4: int = -1,
    rows: int = 0,
):
    """``combined_k4 >= 0``: ``x4_packed`` is the unpacked operand ``x_u [R, K]`` of
    :func:`w4ax_matmul_unpacked` with its first ``rows`` rows real, ``x8`` is None."""
    combined = combined_k4 >= 0
    n = w_packed.shape[0]
    if combined:
        m, k4, k8 = rows, combined_k4, x4_packed.shape[1] - combined_k4
    else:
        m, k4, k8 = x8.shape[0], 2 * x4_packed.shape[1], x8.shape[1]
    t4, t8 = k4 // tile_k, k8 // tile_k
    n_tiles = t4 + t8
    n_groups = 0 if w_scales.ndim == 1 else w_scales.shape[1]
    group_tiles = 0 if n_groups == 0 else (k4 + k8) // n_groups // tile_k

    bm = max(16, config.block_m)
    bn = _pick_block_n(n, config.block_n)
    tps = -(-n_tiles // max(1, min(config.split_k, n_tiles)))
    splits = -(-n_tiles // tps)
    mp = _round_up(m, bm)
    if combined and x4_packed.shape[0] < mp:  # rows past mp are never read
        pad = ((0, mp - x4_packed.shape[0]), (0, 0))
        x4_packed = jnp.pad(x4_packed, pad)
        x_scales = jnp.pad(x_scales, pad, constant_values=1.0)
    elif not combined and mp != m:
        pad = ((0, mp - m), (0, 0))
        x4_packed, x8 = jnp.pad(x4_packed, pad), jnp.pad(x8, pad)
        x_scales = jnp.pad(x_scales, pad, constant_values=1.0)
    n_pm, n_pn = mp // bm, n // bn
    gm = max(1, config.group_m)

    def tile_ids(pid):
        # Grouped ordering: `gm` rows of output tiles sweep the N axis together.
        per_group = gm * n_pn
        first_m = (pid // per_group) * gm
        size_m = jnp.minimum(n_pm - first_m, gm)
        return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m

    def m_map(pid, s):
        return tile_ids(pid)[0]

    def n_map(pid, s):
        return tile_ids(pid)[1]

    write_partial = raw or splits > 1
    has_x4, has_x8 = k4 > 0, k8 > 0
    x_float = not combined and jnp.issubdtype(x8.dtype, jnp.floating)  # W4A16: float x8
    if config.acc8_first and (n_groups or x_float):
        raise ValueError(
            "GemmConfig.acc8_first needs per-channel weight scales and integer activations "
            f"(got {'group scales' if n_groups else 'float activations (W4A16)'}): grouped "
            "and W4A16 calls accumulate in f32 already"
        )
    w_unpacked = config.pre_unpack in ("w", "wx")
    x4_unpacked = combined or (config.pre_unpack in ("x", "wx") and has_x4)
    x4_arg = x4_packed
    if x4_unpacked and not combined:
        x4_arg = unpack_int4_x16_tiles(x4_packed, tile_k)
    w_arg = unpack_int4_x16_tiles(w_packed, tile_k) if w_unpacked else w_packed
    has_bias = bias is not None and not write_partial  # else added after the split reduction
    args, in_specs = [], []
    if combined:
        args.append(x4_arg)
        in_specs.append(pl.BlockSpec((bm, k4 + k8), lambda p, s: (m_map(p, s), 0)))
    if has_x4 and not combined:
        args.append(x4_arg)
        in_specs.append(pl.BlockSpec((bm, x4_arg.shape[1]), lambda p, s: (m_map(p, s), 0)))
    if has_x8 and not combined:
        args.append(x8)
        in_specs.append(pl.BlockSpec((bm, k8), lambda p, s: (m_map(p, s), 0)))
    args += [x_scales, w_arg]  # scales whole: no slicing kernels before the call
    in_specs += [
        pl.BlockSpec((bm, 2), lambda p, s: (m_map(p, s), 0)),
        pl.BlockSpec((bn, w_arg.shape[1]), lambda p, s: (n_map(p, s), 0)),
    ]
    if n_groups:
        args.append(w_scales.T)  # [G, N]: one contiguous row per group
        in_specs.append(pl.BlockSpec((n_groups, bn), lambda p, s: (0, n_map(p, s))))
    else:
        args.append(w_scales)
        in_specs.append(pl.BlockSpec((bn,), lambda p, s: (n_map(p, s),)))
    if has_bias:
        args.append(bias.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((bn,), lambda p, s: (n_map(p, s),)))

    if write_partial:
        dt = jnp.int32 if raw else jnp.float32
        shape = jax.ShapeDtypeStruct((splits, mp, n), dt)
        spec = pl.BlockSpec((None, bm, bn), lambda p, s: (s, m_map(p, s), n_map(p, s)))
        out_shape, out_specs = ([shape, shape], [spec, spec]) if raw else (shape, spec)
    else:
        out_shape = jax.ShapeDtypeStruct((mp, n), out_dtype)
        out_specs = pl.BlockSpec((bm, bn), lambda p, s: (m_map(p, s), n_map(p, s)))

    kernel = functools.partial(
        _kernel,
        t4=t4,
        t8=t8,
        tile_k=tile_k,
        tiles_per_split=tps,
        swap_ab=config.swap_ab,
        group_tiles=group_tiles,
        raw=raw,
        has_x4=has_x4,
        has_x8=has_x8,
        has_bias=has_bias,
        k_unroll=max(1, config.k_unroll),
        w_unpacked=w_unpacked,
        x4_unpacked=x4_unpacked,
        x_float=x_float,
        acc8_first=config.acc8_first,
        park_out=config.park_out,
        x_combined=combined,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n_pm * n_pn, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        name=f"w4a16_k_{k8}" if x_float else f"w4ax_k4_{k4}_k8_{k8}",
    )(*args)
    if raw:
        return tuple(o.sum(axis=0)[:m] for o in out)
    if write_partial:
        y = out.sum(axis=0)[:m]
        return _add_bias_cast(y, bias, out_dtype)
    return out[:m]


@functools.partial(jax.jit, static_argnames=("tile_k", "out_dtype", "raw"))
def _xla_int8_call(x4_packed, x8, x_scales, w_packed, w_scales, bias, *, tile_k, out_dtype, raw):
    """The ``xla_int8`` backend: exact int32 segment sums from XLA int8 GEMMs, same epilogue
    (on the unpacked operand XLA builds here, :func:`_xla_int8_unpacked_call`).

    Only per-channel weight scales (group scales use the kernel).
    """
    x_u, x_scales = to_unpacked(x4_packed, x8, x_scales, tile_k=tile_k)
    return _xla_int8_unpacked_call(
        x_u, x_scales, w_packed, w_scales, bias,
        m=x8.shape[0], k4=2 * x4_packed.shape[1], tile_k=tile_k, out_dtype=out_dtype, raw=raw,
    )  # fmt: skip


def _segment_epilogue(acc4, acc8, x_scales, w_scales, bias, out_dtype):
    """``(s4 * acc4 + s8 * acc8) * ws (+ bias)`` from true-unit int32 sums [M, N]."""
    y = (
        x_scales[:, 0:1] * acc4.astype(jnp.float32) + x_scales[:, 1:2] * acc8.astype(jnp.float32)
    ) * w_scales[None, :]
    return _add_bias_cast(y, bias, out_dtype)


@functools.partial(jax.jit, static_argnames=("m", "k4", "tile_k", "out_dtype", "raw"))
def _xla_int8_unpacked_call(
    x_u, x_scales, w_packed, w_scales, bias, *, m, k4, tile_k, out_dtype, raw=False
):
    """The ``xla_int8`` backend on the unpacked operand: x16 x x16 (INT4 segment) and
    x8 x x16 (INT8 segment) int8 dots, exact in int32: the kernel's raw units (``raw``), or
    with the x256 / x16 removed by shifts, the segment epilogue."""
    w_u = unpack_int4_x16_tiles(w_packed, tile_k)
    x_u = x_u[:m]

    def seg(lo, hi):
        if hi == lo:
            return jnp.zeros((m, w_u.shape[0]), jnp.int32)
        return jax.lax.dot_general(
            x_u[:, lo:hi], w_u[:, lo:hi], _DOT_LAST, preferred_element_type=jnp.int32
        )

    acc4, acc8 = seg(0, k4), seg(k4, x_u.shape[1])
    if raw:
        return acc4, acc8
    acc4, acc8 = jnp.right_shift(acc4, 8), jnp.right_shift(acc8, 4)
    return _segment_epilogue(acc4, acc8, x_scales[:m], w_scales, bias, out_dtype)


def _mgpu_config(cfg: GemmConfig, w_scales, n, two_segments, *, raw, tile_k, interpret, **_):
    """The Mosaic GPU schedule of an ``mgpu`` config, or None where that kernel cannot run
    the call (it then runs on the Triton kernel). block_m is the tile's rows (two
    warpgroups); acc8_first: the INT8 partial in bf16 registers (MgpuConfig.park_int8), the
    Mosaic GPU form of the same idea."""
    from pallas_kernels.w4ax_mgpu import (
        BLOCK_NS,
        ROWS_PER_WG,
        MgpuConfig,
        mgpu_unsupported,
        w_regs_tokens_ok,
    )

    if raw or interpret:  # no raw sums; jax 0.10 has no Mosaic GPU interpreter
        return None
    # the tiles it has (MgpuConfig's choices); with the weights unpacked in registers
    # (swap_ab, no "w" pre-unpack) block_m counts tokens (wgmma's N), block_n weight rows
    wrows = [2 * r for r in ROWS_PER_WG]
    if cfg.swap_ab and "w" not in cfg.pre_unpack:
        if not w_regs_tokens_ok(cfg.block_m) or cfg.block_n not in wrows:
            return None
    elif cfg.block_n not in BLOCK_NS or cfg.block_m not in wrows:
        return None
    mcfg = MgpuConfig.from_gemm_config(cfg)
    n_groups = 0 if w_scales.ndim == 1 else w_scales.shape[1]
    if mgpu_unsupported(n, n_groups, tile_k, mcfg, two_segments=two_segments):
        return None
    return mcfg


def _fallback_from_mgpu(cfg: GemmConfig, w_scales) -> GemmConfig:
    """An ``mgpu`` config the Mosaic GPU kernel cannot run, as the Triton kernel's
    (acc8_first is the Triton kernel's too, for per-channel scales only)."""
    # Triton tiles are powers of two (a w_regs entry may tile 152 tokens)
    block_m = 1 << (cfg.block_m.bit_length() - 1)
    return dataclasses.replace(
        cfg, backend="pallas", acc8_first=cfg.acc8_first and w_scales.ndim == 1, block_m=block_m
    )


def _dispatch(x4_packed, x8, x_scales, w_packed, w_scales, bias, *, cfg, raw, **kw):
    # Group scales are not an xla_int8 epilogue: those calls run the kernel.
    if cfg.backend == "xla_int8" and w_scales.ndim == 1:
        return _xla_int8_call(
            x4_packed, x8, x_scales, w_packed, w_scales, bias,
            tile_k=kw["tile_k"], out_dtype=kw["out_dtype"], raw=raw,
        )  # fmt: skip
    if cfg.backend == "mgpu":
        two = x4_packed.shape[1] > 0 and x8.shape[1] > 0
        mcfg = _mgpu_config(cfg, w_scales, w_packed.shape[0], two, raw=raw, **kw)
        if mcfg is not None:
            from pallas_kernels.w4ax_mgpu import w4ax_matmul_mgpu

            return w4ax_matmul_mgpu(
                x4_packed, x8, x_scales, w_packed, w_scales, bias,
                tile_k=kw["tile_k"], out_dtype=kw["out_dtype"], config=mcfg,
            )  # fmt: skip
        cfg = _fallback_from_mgpu(cfg, w_scales)
    return _w4ax_call(x4_packed, x8, x_scales, w_packed, w_scales, bias, config=cfg, raw=raw, **kw)


def _resolve_config(config, m, n, k4, k8, tile_k):
    if config is not None:
        if not isinstance(config, GemmConfig):
            raise ValueError(f"config must be a GemmConfig or None, got {type(config).__name__}")
        return config
    from pallas_kernels import tuning  # local import: tuning imports this module

    return tuning.get_config(m, n, k4 + k8, k8, tile_k=tile_k)


def w4ax_matmul(
    x4_packed,
    x8,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
    config: GemmConfig | None = None,
):
    """W4Ax GEMM ``[M, N]`` (module docstring). ``config=None`` takes the tuning table."""
    m, n, k4, k8, _ = validate_args(x4_packed, x8, x_scales, w_packed, w_scales, bias, tile_k)
    cfg = _resolve_config(config, m, n, k4, k8, tile_k)
    return _dispatch(
        x4_packed,
        x8,
        x_scales,
        w_packed,
        w_scales,
        bias,
        cfg=cfg,
        raw=False,
        tile_k=tile_k,
        out_dtype=jnp.dtype(out_dtype),
        interpret=interpret,
    )


def validate_unpacked_args(
    x_u, x_scales, w_packed, w_scales, bias, k4, m, tile_k, rs=None
) -> tuple:
    """Checks the operands of :func:`w4ax_matmul_unpacked`; returns ``(M, N, K4, K8)``."""
    _check_2d("x_u", x_u, jnp.int8)
    rows, k = x_u.shape
    m = rows if m is None else m
    if not 0 < m <= rows:
        raise ValueError(f"m={m} real rows must be in [1, {rows}] (x_u has {rows} rows)")
    if not 0 <= k4 <= k or k4 % tile_k or (k - k4) % tile_k:
        raise ValueError(
            f"k4={k4}: the INT4 and INT8 segments of x_u (K={k}) must be multiples of "
            f"tile_k={tile_k}"
        )
    if x_scales.shape != (rows, 2) or x_scales.dtype != jnp.float32:
        raise ValueError(
            f"x_scales must be f32 [{rows}, 2] (one row per x_u row), got {x_scales.dtype} "
            f"{tuple(x_scales.shape)}"
        )
    if rs is not None and (rs.shape != (2, rows) or rs.dtype != jnp.float32):
        raise ValueError(
            f"rs must be f32 [2, {rows}] (act_quant.kernel_scales of x_scales), got {rs.dtype} "
            f"{tuple(rs.shape)}"
        )
    shapes = (
        jax.ShapeDtypeStruct((m, k4 // 2), jnp.int8),
        jax.ShapeDtypeStruct((m, k - k4), jnp.int8),
        jax.ShapeDtypeStruct((m, 2), jnp.float32),
    )
    _, n, _, k8, _ = validate_args(*shapes, w_packed, w_scales, bias, tile_k)
    return m, n, k4, k8


def w4ax_matmul_unpacked_reference(
    x_u,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    k4: int,
    m: int | None = None,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
):
    """:func:`w4ax_matmul_reference` on the unpacked operand (repacked: ``x_u``'s INT4 values
    are ``16 * q``, so ``>> 4`` recovers them exactly)."""
    m, _, k4, _ = validate_unpacked_args(x_u, x_scales, w_packed, w_scales, bias, k4, m, tile_k)
    x4 = pack_int4(jnp.right_shift(x_u[:m, :k4], 4), tile_k)
    return w4ax_matmul_reference(
        x4, x_u[:m, k4:], x_scales[:m], w_packed, w_scales, bias,
        tile_k=tile_k, out_dtype=out_dtype,
    )  # fmt: skip


def w4ax_matmul_unpacked(
    x_u,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    k4: int,
    m: int | None = None,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
    config: GemmConfig | None = None,
    rs=None,
):
    """W4Ax GEMM ``[m, N]`` on the activations as ``act_quant(layout="unpacked")`` writes
    them: ``x_u [R, K] int8`` = ``[16 * x4 | x8]`` (the INT4 channels ``[0, k4)`` unpacked
    into the natural order and times 16, the INT8 channels after), ``x_scales [R, 2]``, the
    first ``m`` rows real (default all ``R``). Same values as :func:`w4ax_matmul` on the
    packed form of the same integers, with the same config lookup (``(m, N, K, K8)``).
    ``rs [2, R]`` (optional): ``act_quant.kernel_scales(x_scales)`` as act_quant writes it
    with ``kernel_scales=True``; the Mosaic GPU kernel then takes it as its factor operand
    instead of an XLA pass building it (the other backends read x_scales).

    * ``mgpu``: the Mosaic GPU kernel reads ``x_u`` as its activation operand directly, rows
      padded to its tile only where R is not a multiple of it (``act_quant``'s ``row_align``
      exists to make it one);
    * ``pallas``: the Triton kernel takes ``x_u`` as one operand (the INT8 tiles at their
      offset ``k4``), i.e. it runs the config with its activations pre-unpacked
      (``pre_unpack`` "x" / "wx", which the tuning table picks from M = 257 up for the
      engine's shapes: ``tests/test_w4ax_matmul.py``);
    * ``xla_int8``: XLA's int8 dots on the x16 operands, exact shifts back.
    """
    m, n, k4, k8 = validate_unpacked_args(
        x_u, x_scales, w_packed, w_scales, bias, k4, m, tile_k, rs
    )
    cfg = _resolve_config(config, m, n, k4, k8, tile_k)
    out_dtype = jnp.dtype(out_dtype)
    if cfg.backend == "xla_int8" and w_scales.ndim == 1:
        return _xla_int8_unpacked_call(
            x_u, x_scales, w_packed, w_scales, bias,
            m=m, k4=k4, tile_k=tile_k, out_dtype=out_dtype,
        )  # fmt: skip
    if cfg.backend == "mgpu":
        two = k4 > 0 and k8 > 0
        mcfg = _mgpu_config(cfg, w_scales, n, two, raw=False, tile_k=tile_k, interpret=interpret)
        if mcfg is not None:
            from pallas_kernels.w4ax_mgpu import w4ax_matmul_mgpu_unpacked

            return w4ax_matmul_mgpu_unpacked(
                x_u, x_scales, w_packed, w_scales, bias, rs,
                m=m, k4=k4, tile_k=tile_k, out_dtype=out_dtype, cfg=mcfg,
            )  # fmt: skip
        cfg = _fallback_from_mgpu(cfg, w_scales)
    return _w4ax_call(
        x_u, None, x_scales, w_packed, w_scales, bias,
        tile_k=tile_k, out_dtype=out_dtype, interpret=interpret, config=cfg, raw=False,
        combined_k4=k4, rows=m,
    )  # fmt: skip


def w4ax_swiglu_unpacked(
    x_u,
    x_scales,
    w_gate,
    ws_gate,
    w_up,
    ws_up,
    *,
    k4: int,
    m: int | None = None,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
    config: GemmConfig | None = None,
    rs=None,
):
    """The MLP's hidden state ``act_quant.swiglu(gate, up)`` from one Mosaic GPU kernel over
    the unpacked activations (``w4ax_mgpu.swiglu_matmul_mgpu_unpacked``: the gate and up
    GEMMs' tiles side by side in registers, only the hidden state written), or None where
    that kernel does not run the call: the config for the gate / up shape (``(m, N, K,
    K8)``, as each GEMM would look it up) is not a Mosaic GPU w_regs schedule, or the call
    is interpreted, or has group scales. The caller then runs the two GEMMs and
    ``act_quant.swiglu`` (the same values; the GPU's ``exp`` aside). Operands as
    :func:`w4ax_matmul_unpacked` (both weights ``[N, K/2]`` with ``[N]`` scales, no bias,
    ``rs`` optional)."""
    m, n, k4, k8 = validate_unpacked_args(x_u, x_scales, w_gate, ws_gate, None, k4, m, tile_k, rs)
    validate_unpacked_args(x_u, x_scales, w_up, ws_up, None, k4, m, tile_k)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have one shape")
    cfg = _resolve_config(config, m, n, k4, k8, tile_k)
    if cfg.backend != "mgpu":
        return None
    two = k4 > 0 and k8 > 0
    mcfg = _mgpu_config(cfg, ws_gate, n, two, raw=False, tile_k=tile_k, interpret=interpret)
    if mcfg is None:
        return None
    from pallas_kernels.w4ax_mgpu import swiglu_config, swiglu_matmul_mgpu_unpacked

    scfg = swiglu_config(mcfg, two_segments=two)
    if scfg is None or n % scfg.tile_n:
        return None
    return swiglu_matmul_mgpu_unpacked(
        x_u, x_scales, w_gate, ws_gate, w_up, ws_up, rs,
        m=m, k4=k4, tile_k=tile_k, out_dtype=jnp.dtype(out_dtype), cfg=scfg,
    )  # fmt: skip


def w4ax_accumulators(
    x4_packed,
    x8,
    w_packed,
    *,
    tile_k: int = DEFAULT_TILE_K,
    interpret: bool = False,
    config: GemmConfig | None = None,
):
    """The kernel's int32 sums ``(acc4, acc8)`` in true units (x16 / x256 removed exactly).

    Same loops as :func:`w4ax_matmul` with the float epilogue skipped: the exact-integer check.
    """
    m, n = x8.shape[0], w_packed.shape[0]
    dummy_scales = jnp.ones((m, 2), jnp.float32)
    dummy_ws = jnp.ones((n,), jnp.float32)
    _, _, k4, k8, _ = validate_args(x4_packed, x8, dummy_scales, w_packed, dummy_ws, None, tile_k)
    cfg = _resolve_config(config, m, n, k4, k8, tile_k)
    acc4_16, acc8_16 = _dispatch(
        x4_packed,
        x8,
        dummy_scales,
        w_packed,
        dummy_ws,
        None,
        cfg=cfg,
        raw=True,
        tile_k=tile_k,
        out_dtype=jnp.dtype(jnp.float32),
        interpret=interpret,
    )
    return jnp.right_shift(acc4_16, 8), jnp.right_shift(acc8_16, 4)


# --------------------------------------------------------------------------------------------
# W4A16: INT4 weights x float activations, the same kernel on the bf16 MMA
# --------------------------------------------------------------------------------------------


def validate_a16_args(x, w_packed, w_scales, bias, tile_k) -> tuple:
    """Checks W4A16 operands (``x: [M, K]`` float); returns ``(M, N, K, n_groups)``."""
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a 2-D float array [M, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    ones = jax.ShapeDtypeStruct((m, 2), jnp.float32)
    shapes = (jax.ShapeDtypeStruct((m, 0), jnp.int8), jax.ShapeDtypeStruct((m, k), jnp.int8))
    _, n, _, _, n_groups = validate_args(*shapes, ones, w_packed, w_scales, bias, tile_k)
    return m, n, k, n_groups


def w4a16_matmul_reference(
    x, w_packed, w_scales, bias=None, *, tile_k=DEFAULT_TILE_K, out_dtype=jnp.bfloat16
):
    """``Y[M, N] = bf16(x) @ (q * s)^T + bias`` in f32: x rounded to bf16 as the MMA sees it,
    the INT4 weights ``q`` times their per-channel ``[N]`` or per-group ``[N, K/g]`` scales."""
    validate_a16_args(x, w_packed, w_scales, bias, tile_k)
    w = _dequantized_weights(w_packed, w_scales, tile_k)
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)
    y = jax.lax.dot_general(
        xb, w, _DOT_LAST, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    return _add_bias_cast(y, bias, out_dtype)


def w4a16_matmul(
    x,
    w_packed,
    w_scales,
    bias=None,
    *,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    interpret: bool = False,
    config: GemmConfig | None = None,
):
    """W4A16 GEMM ``[M, N]``: the W4Ax kernel with one float segment (``x: [M, K]``, cast to
    bf16) and the x16 INT4 weight halves converted to bf16 in registers; f32 accumulation,
    the factor 16 folded into the epilogue. ``config=None``: `tuning.a16_config`.
    ``pre_unpack="w"`` is allowed (x16 int8 weights from XLA); "x"/"wx" and ``xla_int8``
    have nothing to act on here and are refused.

    Measured on H100 (docs/kernels_gemm.md, "W4A16"): 1.0-2.5x XLA bf16 at M <= 64,
    0.4-0.9x at M >= 256 (the in-loop int8 -> bf16 conversion of every weight, once per M
    tile, costs MMA rate). XLA's own dequantize + bf16 GEMM was no faster there (83 vs
    54 us at M = 512, 107 vs 109 us at M = 1024, 4096 x 4096), so there is no XLA backend."""
    m, n, k, _ = validate_a16_args(x, w_packed, w_scales, bias, tile_k)
    if config is None:
        from pallas_kernels import tuning  # local import: tuning imports this module

        config = tuning.a16_config(m, n, k, tile_k=tile_k)
    if not isinstance(config, GemmConfig):
        raise ValueError(f"config must be a GemmConfig or None, got {type(config).__name__}")
    if config.backend != "pallas" or config.pre_unpack not in ("", "w"):
        raise ValueError(
            f"W4A16 runs the Pallas kernel with pre_unpack '' or 'w', got backend="
            f"{config.backend!r}, pre_unpack={config.pre_unpack!r}"
        )
    return _w4ax_call(
        jnp.zeros((m, 0), jnp.int8),
        x.astype(jnp.bfloat16),
        jnp.ones((m, 2), jnp.float32),  # the epilogue's segment scales: 1 (x is not scaled)
        w_packed,
        w_scales,
        bias,
        tile_k=tile_k,
        out_dtype=jnp.dtype(out_dtype),
        interpret=interpret,
        config=config,
        raw=False,
    )


def _dequantized_weights(w_packed, w_scales, tile_k):
    """``[N, K]`` f32 = INT4 values x their per-channel ``[N]`` or per-group ``[N, K/g]``
    scales."""
    w = unpack_int4(w_packed, tile_k).astype(jnp.float32)
    if w_scales.ndim == 1:
        return w * w_scales[:, None]
    return w * jnp.repeat(w_scales, w.shape[1] // w_scales.shape[1], axis=1)


def dequantized_matmul(x4_packed, x8, x_scales, w_packed, w_scales, *, tile_k=DEFAULT_TILE_K):
    """Float check: dequantize both operands and multiply in f32 (``[M, N]`` f32)."""
    k4 = 2 * x4_packed.shape[1]
    w = _dequantized_weights(w_packed, w_scales, tile_k)
    parts = []
    if k4:
        parts.append(unpack_int4(x4_packed, tile_k).astype(jnp.float32) * x_scales[:, 0:1])
    parts.append(x8.astype(jnp.float32) * x_scales[:, 1:2])
    x = jnp.concatenate(parts, axis=1)
    return jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST)


__all__ = [
    "DEFAULT_TILE_K",
    "GemmConfig",
    "dequantized_matmul",
    "validate_args",
    "w4ax_accumulators",
    "w4ax_accumulators_reference",
    "w4ax_matmul",
    "w4ax_matmul_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]
