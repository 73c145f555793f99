"""Quantized projection backends for `models.projection` (the `LinearBackend` protocol).

Every backend is a frozen dataclass (a static Flax attribute) with two stages: per input group
`prepare_input` (RMSNorm -> optional rotation -> optional channel permutation -> activation
quantization) and per projection `matmul`. Each integer backend has two modes:

- ``mode="sim"``: pure jnp; integer products accumulated in int32, then the float epilogue
  ``y = sum_chunks (s_x[m, c] * s_w[n, c]) * acc_c[m, n]`` in chunk order (a chunk is the
  largest K range where both scales are constant: an FMPQ precision segment, a weight group,
  or an activation block). This is what the W4Ax kernel computes; the tests check it bit for
  bit against the kernel references.
- ``mode="pallas"``: the Pallas kernels (`pallas_kernels.act_quant` and
  `pallas_kernels.w4ax_matmul`; W4A16 has no activation quantization and is not bit-exact
  to its simulation: the kernel rounds activations to bf16); ``interpret=True`` runs them on
  CPU.

Backends and their parameter pytrees (HF ``[N, K]`` layout, K contiguous):

| backend | weight params | group params | kernel |
|---|---|---|---|
| `W8A8Linear` | ``w_q: [N, K] int8``, ``w_scales: [N] f32`` | -- | sim only |
| `W4A16Linear` | ``w_packed: [N, K/2] int8``, ``w_scales: [N]`` or ``[N, K/g] f32`` | -- | W4A16 (the W4Ax kernel, bf16 MMA) |
| `W4AxLinear` | ``w_packed``, ``w_scales`` as above | ``perm: [K] int32`` if `permute` | W4Ax |

`W4AxLinear` with ``pad > 0`` (FMPQ blocks over a K that is not a multiple of the block,
`comet_jax.quant.fmpq`): ``pad`` zero channels are prepended to the normalized (and rotated)
input before the permutation, and every K above is the padded ``k4 + k8``; the layer's input
is ``k4 + k8 - pad`` wide. The weights carry zero columns there.

``bias: [N] f32`` is added when the projection has one. `W4AxLinear` covers uniform W4A4
(``k8=0``), W4A8 (``k4=0``) and FMPQ W4Ax (INT4 channels first, INT8 channels last, as laid out
by the group's permutation). Activations are quantized per token, symmetric, with one scale per
precision segment (``act_granularity="segment"``, the kernel's format ``x_scales: [M, 2]``) or
per block (``"block"``, simulation only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from comet_jax.quant import act_quant, pack, quantizers
from models.projection import GroupSpec, ProjSpec, rms_norm

MODES = ("sim", "pallas")
ACT_GRANULARITIES = ("segment", "block")


def _check_mode(mode: str, interpret: bool, kernel: bool, name: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{name}: mode={mode!r} must be one of {MODES}")
    if mode == "pallas" and not kernel:
        raise ValueError(f"{name}: mode='pallas' has no kernel for this format; use mode='sim'")
    if interpret and mode != "pallas":
        raise ValueError(f"{name}: interpret=True only applies to mode='pallas'")


def _flatten(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def int_dot(a, b):
    """a: [M, K] int8, b: [N, K] int8 -> [M, N] int32 (exact integer products)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def chunked_epilogue(x_q, x_scales, w_q, w_scales, chunks):
    """Sum over K chunks of ``(s_x[m, i] * s_w[n, j]) * (x_q[:, lo:hi] . w_q[:, lo:hi])``.

    x_q: [M, K] int8; x_scales: [M, Cx] f32; w_q: [N, K] int8; w_scales: [N, Cw] f32;
    chunks: static ((lo, hi, i, j), ...) in K order; the f32 terms are added in that order.
    Returns [M, N] f32.
    """
    y = None
    for lo, hi, i, j in chunks:
        acc = int_dot(x_q[:, lo:hi], w_q[:, lo:hi]).astype(jnp.float32)
        term = (x_scales[:, i][:, None] * w_scales[:, j][None, :]) * acc
        y = term if y is None else y + term
    return y


def _add_bias_cast(y, weight_params, dtype, lead):
    if "bias" in weight_params:
        y = y + weight_params["bias"].astype(jnp.float32)
    return y.reshape(*lead, y.shape[-1]).astype(dtype)


def _weight_init(
    spec: ProjSpec, tile: int, w_group: int | None, packed: bool = True, k: int | None = None
):
    """Shape-correct random init (only used for shapes; real values come from convert).

    k: the stored K when it differs from ``spec.in_features`` (zero-padded W4Ax inputs)."""
    n, k = spec.out_features, spec.in_features if k is None else k
    if packed and k % tile:
        raise ValueError(f"{spec.name}: K={k} must be a multiple of the packing tile={tile}")
    if w_group is not None and k % w_group:
        raise ValueError(f"{spec.name}: K={k} must be a multiple of the weight group={w_group}")

    def init(rng):
        q = jax.random.randint(rng, (n, k), -8, 8).astype(jnp.int8)
        s_shape = (n,) if w_group is None else (n, k // w_group)
        out = {"w_scales": jnp.full(s_shape, 0.01, jnp.float32)}
        if packed:
            out["w_packed"] = pack.pack_int4(q, tile)
        else:
            out["w_q"] = q
        if spec.bias:
            out["bias"] = jnp.zeros((n,), jnp.float32)
        return out

    return init


@dataclasses.dataclass(frozen=True)
class W8A8Linear:
    """INT8 weights per output channel, INT8 activations per token (both symmetric)."""

    act_clip: float = 1.0
    mode: str = "sim"
    interpret: bool = False

    def __post_init__(self):
        _check_mode(self.mode, self.interpret, False, "W8A8Linear")

    def weight_init(self, spec, param_dtype):
        return _weight_init(spec, 1, None, packed=False)

    def group_init(self, spec, param_dtype):
        return None

    def prepare_input(self, group_params, x, norm_weight, *, eps):
        if norm_weight is not None:
            x = rms_norm(x, norm_weight, eps)
        x2, lead = _flatten(x)
        res = quantizers.quantize(x2, bits=8, granularity="row", clip_ratio=self.act_clip)
        return PreparedInt(res.q, res.scale[:, None], jnp.dtype(x.dtype), tuple(lead))

    def matmul(self, weight_params, prepared):
        w_q = weight_params["w_q"]
        chunks = ((0, w_q.shape[1], 0, 0),)
        y = chunked_epilogue(
            prepared.x_q, prepared.x_scales, w_q, weight_params["w_scales"][:, None], chunks
        )
        return _add_bias_cast(y, weight_params, prepared.dtype, prepared.lead)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["x_q", "x_scales"], meta_fields=["dtype", "lead"]
)
@dataclasses.dataclass(frozen=True)
class PreparedInt:
    """Quantized activations in simulation: x_q [M, K] int8, x_scales [M, C] f32 (C chunks).

    dtype: the compute dtype of the output; lead: the leading shape of x (M = prod(lead)).
    """

    x_q: jax.Array
    x_scales: jax.Array
    dtype: Any
    lead: tuple


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x4_packed", "x8", "x_scales"],
    meta_fields=["dtype", "lead"],
)
@dataclasses.dataclass(frozen=True)
class PreparedKernel:
    """Kernel-format activations: x4_packed [M, K4/2] int8, x8 [M, K8] int8, x_scales [M, 2]."""

    x4_packed: jax.Array
    x8: jax.Array
    x_scales: jax.Array
    dtype: Any
    lead: tuple


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x_u", "x_scales", "rs"],
    meta_fields=["k4", "dtype", "lead"],
)
@dataclasses.dataclass(frozen=True)
class PreparedUnpacked:
    """Kernel-format activations in the unpacked layout (``act_quant(layout="unpacked")``):
    x_u [R, K] int8 = [16 * x4 | x8], x_scales [R, 2] f32, the first m = prod(lead) rows real,
    the INT4 segment k4 channels wide; rs [2, R] f32 (or None): the Mosaic GPU GEMM's
    per-token factors (``act_quant.kernel_scales``), written by act_quant with the rest."""

    x_u: jax.Array
    x_scales: jax.Array
    k4: int
    dtype: Any
    lead: tuple
    rs: jax.Array | None = None

    @property
    def m(self) -> int:
        return math.prod(self.lead)


ACT_LAYOUTS = ("auto", "packed", "unpacked")


def dequantize_weight(weight_params, tile: int, w_group: int | None):
    """-> W: [N, K] f32 = q * scale (per channel or per group)."""
    q = pack.unpack_int4(weight_params["w_packed"], tile)
    s = weight_params["w_scales"]
    if w_group is None:
        return q.astype(jnp.float32) * s[:, None]
    return quantizers.dequantize(q, s, granularity="group", group_size=w_group)


@dataclasses.dataclass(frozen=True)
class W4A16Linear:
    """INT4 weights (per channel or per group, RTN/GPTQ/LWC values), float activations.

    ``mode="sim"``: dequantize to f32 and multiply in f32. ``mode="pallas"``: the W4A16 GEMM
    (`pallas_kernels.w4ax_matmul.w4a16_matmul`: activations rounded to bf16, weights unpacked
    in registers, bf16 MMA with f32 accumulation); the weight group must then be a multiple
    of `tile`.
    """

    tile: int = 64
    w_group: int | None = None
    mode: str = "sim"
    interpret: bool = False

    def __post_init__(self):
        _check_mode(self.mode, self.interpret, True, "W4A16Linear")
        if self.mode == "pallas" and self.w_group is not None and self.w_group % self.tile:
            raise ValueError(
                f"W4A16Linear: w_group={self.w_group} must be a multiple of tile={self.tile} "
                "for the kernel (mode='pallas')"
            )

    def weight_init(self, spec, param_dtype):
        return _weight_init(spec, self.tile, self.w_group)

    def group_init(self, spec, param_dtype):
        return None

    def prepare_input(self, group_params, x, norm_weight, *, eps):
        return x if norm_weight is None else rms_norm(x, norm_weight, eps)

    def matmul(self, weight_params, prepared):
        x = prepared
        if self.mode == "pallas":
            from pallas_kernels import w4ax_matmul as wk

            x2, lead = _flatten(x)
            y = wk.w4a16_matmul(
                x2,
                weight_params["w_packed"],
                weight_params["w_scales"],
                weight_params.get("bias"),
                tile_k=self.tile,
                out_dtype=x.dtype,
                interpret=self.interpret,
            )
            return y.reshape(*lead, y.shape[-1])
        w = dequantize_weight(weight_params, self.tile, self.w_group)
        y = jnp.einsum(
            "...k,nk->...n",
            x.astype(jnp.float32),
            w,
            precision="highest",
            preferred_element_type=jnp.float32,
        )
        if "bias" in weight_params:
            y = y + weight_params["bias"].astype(jnp.float32)
        return y.astype(x.dtype)


def quantize_activations(x2, k4: int, block: int, granularity: str, clip: float):
    """Per-token symmetric quantization of permuted ``x2: [M, K]`` (INT4 ``[:k4]``, INT8 after).

    Returns ``(x_q [M, K] int8, x_scales)``: ``[M, 2]`` (s4, s8) for ``"segment"`` (the kernel
    operand), ``[M, K/block]`` for ``"block"``. The integers come from
    :func:`comet_jax.quant.act_quant.quantize_activation`.
    """
    r = act_quant.quantize_activation(
        x2, k4=k4, granularity=granularity, block_size=block, clip_ratio4=clip, clip_ratio8=clip
    )
    x_q = jnp.concatenate([r.q4, r.q8], axis=-1)
    if granularity == "segment":
        return x_q, jnp.stack([r.s4, r.s8], axis=-1)
    return x_q, jnp.concatenate([r.s4, r.s8], axis=-1)


@dataclasses.dataclass(frozen=True)
class W4AxLinear:
    """FMPQ W4Ax: INT4 weights, INT4 (first k4 channels) / INT8 (last k8) activations.

    Attributes:
      k4, k8: INT4 / INT8 input channels after the group's permutation (multiples of `block`),
        padding included.
      block: FMPQ block size along K (64 or 128).
      tile: INT4 packing tile of the weights (the kernel's K tile; divides `block`).
      w_group: None = per-output-channel weight scales, else the weight group size along K.
      act_granularity: "segment" (per token per precision segment) or "block".
      act_clip: clip ratio of the activation absmax (1.0 = none).
      permute: the group carries a runtime permutation ``perm: [K] int32`` (False when the
        permutation is folded into the producing weights or is the identity).
      rotate: apply the online Hadamard rotation (``comet_jax.quant.hadamard``) before the
        permutation; the weights were rotated offline to match.
      pad: zero channels prepended to the (normalized, rotated) input before the permutation,
        so that ``k4 + k8`` covers whole blocks when the layer's K does not (module docstring;
        ``fmpq.FMPQPlan.pad``). The layer's input width is ``k4 + k8 - pad``. When the zeros
        fill whole packing tiles of the INT4 segment (``pad % tile == 0`` and ``pad <= k4``:
        any K that is a multiple of the tile, except all-INT8 layouts) the runtime ``perm``
        must keep them first (``perm[:pad] == arange(pad)``, as every `fmpq` plan does): the
        kernel then quantizes only the real channels (``perm[pad:] - pad``, RMSNorm still
        fused) and ``pad / 2`` zero bytes are prepended to the packed INT4 operand. Otherwise
        the input is normalized, zero-padded and gathered by the full ``perm``.
      mode, interpret: see the module docstring.
      act_layout (``mode="pallas"``): the activation operand the quantize kernel writes for
        the GEMMs: "packed" (``x4_packed``, ``x8``), "unpacked" (one ``[R, K]`` int8 array
        ``[16 * x4 | x8]``, rows padded to ``w4ax_matmul.UNPACKED_ROW_ALIGN``, which the
        large-M GEMM configs consume without an XLA unpack pass), or "auto": unpacked from
        ``w4ax_matmul.UNPACKED_MIN_M`` rows up. Same integers, scales and outputs in all three.
      fuse_swiglu: as the down projection's backend, build the MLP hidden state
        ``silu(gate) * up`` inside the act_quant kernel (``act_quant(gate=...)``) instead of
        letting the layer write it and the kernel read it back (see `fuses_swiglu`). Same
        values (interpret mode: bit for bit; module docstring of ``pallas_kernels.act_quant``
        for the GPU's silu); False is the unfused ablation.
      fuse_gate_up: as the gate / up projections' backend, compute the MLP hidden state
        ``silu(gate) * up`` in one Mosaic GPU kernel (``w4ax_matmul.w4ax_swiglu_unpacked``:
        both GEMMs' tiles side by side in registers, gate and up never written; the down
        projection's act_quant then reads the hidden state) wherever the tuning table's
        schedule for the gate / up shape is a w_regs one (the engine's large-M calls on the
        GPU); elsewhere the two GEMMs as usual (`gate_up_swiglu`). Same values (the GPU's
        ``exp`` aside). Off by default until measured against the separate GEMMs and
        ``act_quant(gate=)`` in serving.
      fuse_projections (``mode="pallas"``): the input group's projections (q / k / v) as
        one GEMM over their weights concatenated along N, the output split back
        (`group_matmul`), wherever the tuning table has an entry of its own for the
        concatenated shape in the call's M bucket (measured there: LLaMA-3-8B's 6144 x 4096
        at M = 2224 and 8192); elsewhere one GEMM per projection. Every output element is
        computed as by its own GEMM (same integer sums, same epilogue), so the values are
        the same. The concatenation is an XLA copy of the group's weights per call (for the
        8B's q / k / v 12.6 MB a layer); one device only (under tensor parallelism the
        concatenation of column-sharded weights would move them between devices). Off by
        default: in serving it gained nothing (H200, 8B, 1024/512: 18966.8 against
        19056.1 / 19106.7 tok/s on one machine, run 110). The decode step's trace (run 113)
        says why: its GEMMs took 0.47 ms a step less than the three GEMMs in run 106's
        trace (another machine), not the kernel study's 1.4 ms (which reads every operand
        from memory; in the step k's and v's operand may still be in L2 after q's GEMM:
        not measured), and the weights' concatenation (0.38 ms) and the copies of the
        split outputs (0.13 ms) took that back.
    """

    k4: int
    k8: int
    block: int = 64
    tile: int = 64
    w_group: int | None = None
    act_granularity: str = "segment"
    act_clip: float = 1.0
    permute: bool = False
    rotate: bool = False
    pad: int = 0
    mode: str = "sim"
    interpret: bool = False
    act_layout: str = "auto"
    fuse_swiglu: bool = True
    fuse_gate_up: bool = False
    fuse_projections: bool = False

    def __post_init__(self):
        kernel_ok = self.act_granularity == "segment" and self.w_group is None
        _check_mode(self.mode, self.interpret, kernel_ok, "W4AxLinear")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(
                f"act_granularity={self.act_granularity!r} must be one of {ACT_GRANULARITIES}"
            )
        if self.k4 < 0 or self.k8 < 0 or self.k4 + self.k8 == 0:
            raise ValueError(f"k4={self.k4}, k8={self.k8}: expected non-negative, not both zero")
        if self.block % self.tile or self.k4 % self.block or self.k8 % self.block:
            raise ValueError(
                f"k4={self.k4}, k8={self.k8} must be multiples of block={self.block}, "
                f"itself a multiple of tile={self.tile}"
            )
        if self.w_group is not None and (self.k4 % self.w_group or self.w_group % self.tile):
            raise ValueError(
                f"w_group={self.w_group} must divide k4={self.k4} (segment boundary) and be a "
                f"multiple of tile={self.tile}"
            )
        if not 0.0 < self.act_clip <= 1.0:
            raise ValueError(f"act_clip={self.act_clip} must be in (0, 1]")
        if self.act_layout not in ACT_LAYOUTS:
            raise ValueError(f"act_layout={self.act_layout!r} must be one of {ACT_LAYOUTS}")
        if not 0 <= self.pad < self.k4 + self.k8:
            raise ValueError(
                f"pad={self.pad} zero channels must be in [0, k4+k8={self.k4 + self.k8})"
            )

    @property
    def padded_features(self) -> int:
        """K as stored and computed: ``k4 + k8``, padding included."""
        return self.k4 + self.k8

    @property
    def in_features(self) -> int:
        """The layer's input width (without the zero padding)."""
        return self.k4 + self.k8 - self.pad

    def _check_k(self, k: int, what: str) -> None:
        if k != self.in_features:
            if self.pad:
                raise ValueError(
                    f"{what}: K={k} but the backend takes k4+k8-pad={self.in_features} input "
                    f"channels (k4={self.k4}, k8={self.k8}, pad={self.pad} zero channels)"
                )
            raise ValueError(f"{what}: K={k} but the backend has k4+k8={self.in_features}")

    def weight_init(self, spec: ProjSpec, param_dtype):
        self._check_k(spec.in_features, spec.name)
        return _weight_init(spec, self.tile, self.w_group, k=spec.in_features + self.pad)

    def group_init(self, spec: GroupSpec, param_dtype):
        self._check_k(spec.in_features, spec.name)
        if not self.permute:
            return None
        k = self.padded_features
        return lambda rng: {"perm": jnp.arange(k, dtype=jnp.int32)}

    def _pad(self, x):
        """Prepends the ``pad`` zero channels (a no-op when pad == 0)."""
        if not self.pad:
            return x
        return jnp.concatenate([jnp.zeros((*x.shape[:-1], self.pad), x.dtype), x], axis=-1)

    def _transform(self, group_params, x, norm_weight, eps):
        """RMSNorm -> rotation -> zero padding -> permutation (float), as the fused quantize
        kernel does."""
        if norm_weight is not None:
            x = rms_norm(x, norm_weight, eps)
        if self.rotate:
            from comet_jax.quant import hadamard

            x = hadamard.hadamard_transform(x).astype(x.dtype)
        x = self._pad(x)
        if self.permute:
            x = jnp.take(x, group_params["perm"], axis=-1)
        return x

    @property
    def fuses_swiglu(self) -> bool:
        """prepare_input takes ``gate`` and quantizes ``swiglu(gate, x)`` in the act_quant
        kernel (the down projection's input, never written to memory): segment granularity,
        no rotation, no zero padding."""
        return (
            self.fuse_swiglu
            and self.act_granularity == "segment"
            and not self.rotate
            and not self.pad
        )

    def kernel_orders(self, group_params, norm_weight):
        """What the act_quant kernel takes in its own channel order, computed ahead for
        `prepare_input`'s ``kernel_orders`` (``models.llama.kernel_order_variables`` builds
        them once): ``"norm"``: ``{"packed": [K], "unpacked": [K]}``, the RMSNorm weight in the
        order in which the kernel reads a row in each layout (`act_quant.kernel_norm_weight`;
        absent without a norm); ``"perm_packed"``: ``[K]`` int32, the group's ``perm`` in the
        packed layout's gather order (`act_quant.kernel_read_order`; absent without a runtime
        permutation). None where there is nothing to give or the kernel does not take the
        input as it is (not ``mode="pallas"``, rotation, zero padding, block granularity)."""
        if self.mode != "pallas" or self.rotate or self.pad or self.act_granularity == "block":
            return None
        from pallas_kernels import act_quant as aq

        perm = group_params["perm"] if self.permute else None
        out = {}
        if norm_weight is not None:
            self._check_k(norm_weight.shape[0], "kernel_orders")
            out["norm"] = {
                layout: aq.kernel_norm_weight(
                    norm_weight, perm, self.k4, tile_k=self.tile, layout=layout
                )
                for layout in ("packed", "unpacked")
            }
        if perm is not None:
            out["perm_packed"] = aq.kernel_read_order(
                perm, perm.shape[0], self.k4, tile_k=self.tile, layout="packed"
            )
        return out or None

    def prepare_input(self, group_params, x, norm_weight, *, eps, gate=None, kernel_orders=None):
        """gate: [..., K] or None: the input is then the SwiGLU hidden state
        ``silu(f32(gate)) * x`` in x's dtype (fused into act_quant where `fuses_swiglu`).
        kernel_orders: None, or `kernel_orders(group_params, norm_weight)` computed ahead
        (then the kernel reads the norm weight and, in the packed layout, the permutation as
        they are instead of rearranging them per call; the same numbers)."""
        self._check_k(x.shape[-1], "prepare_input")
        from pallas_kernels import act_quant as aq

        if gate is not None and not self.fuses_swiglu:
            x, gate = aq.swiglu(gate, x), None
        if self.act_granularity == "block":  # simulation only (no kernel format)
            x2, lead = _flatten(self._transform(group_params, x, norm_weight, eps))
            x_q, x_scales = quantize_activations(
                x2, self.k4, self.block, self.act_granularity, self.act_clip
            )
            return PreparedInt(x_q, x_scales, jnp.dtype(x.dtype), tuple(lead))
        x2, lead = _flatten(x)
        g2 = None if gate is None else _flatten(gate)[0]
        if self.rotate:
            # The fused kernel has no rotation: normalize and rotate first, then quantize.
            from comet_jax.quant import hadamard

            if norm_weight is not None:
                x2 = rms_norm(x2, norm_weight, eps)
                norm_weight = None
            x2 = hadamard.hadamard_transform(x2).astype(x2.dtype)
        k4 = self.k4
        zero_bytes = 0
        if self.pad and self._zeros_packed_first:
            # The zeros are the first pad channels of the INT4 segment: quantize the real
            # channels alone (their permutation is perm[pad:] - pad; RMSNorm stays fused) and
            # prepend the zeros' packed bytes. Same integers and scales as unpadded, bit for bit.
            k4, zero_bytes = k4 - self.pad, self.pad // 2
            real = jnp.arange(x2.shape[-1], dtype=jnp.int32)
            if self.permute:
                real = group_params["perm"][self.pad :] - self.pad
            perm = real
        else:
            if self.pad:
                # General case: the kernel's RMSNorm statistic would average over the zeros:
                # normalize the unpadded rows here with the kernel's f32 expression
                # ((x * rms_inv) * w, act_quant._normalize), pad, then quantize those values.
                if norm_weight is not None:
                    inv = aq.rms_inv(x2, eps)[:, None]
                    x2 = (x2.astype(jnp.float32) * inv) * norm_weight.astype(jnp.float32)[None, :]
                    norm_weight = None
                x2 = self._pad(x2)
            perm = group_params["perm"] if self.permute else None  # None: the identity
        kwargs = dict(
            gate=g2,
            norm_weight=norm_weight,
            eps=eps,
            clip4=self.act_clip,
            clip8=self.act_clip,
            tile_k=self.tile,
        )
        unpacked = self.mode == "pallas" and self._unpacked(x2.shape[0])
        if kernel_orders is not None and self.mode == "pallas":
            if self.rotate or self.pad:  # kernel_orders gives None for these
                raise ValueError(
                    "kernel_orders is for the kernel's own input path; this backend "
                    f"normalizes and permutes outside it (rotate={self.rotate}, pad={self.pad})"
                )
            if norm_weight is not None and "norm" in kernel_orders:
                kwargs["norm_weight"] = kernel_orders["norm"]["unpacked" if unpacked else "packed"]
                kwargs["norm_in_kernel_order"] = True
            if not unpacked and perm is not None and "perm_packed" in kernel_orders:
                perm = kernel_orders["perm_packed"]
                kwargs["perm_in_kernel_order"] = True
        if unpacked:
            from pallas_kernels.w4ax_matmul import UNPACKED_ROW_ALIGN

            x_u, x_scales, rs = aq.act_quant(
                x2, perm, k4, interpret=self.interpret, layout="unpacked",
                row_align=UNPACKED_ROW_ALIGN, kernel_scales=True, **kwargs,
            )  # fmt: skip
            if zero_bytes:  # the pad zero channels, unpacked
                zeros = jnp.zeros((x_u.shape[0], self.pad), x_u.dtype)
                x_u = jnp.concatenate([zeros, x_u], axis=-1)
            return PreparedUnpacked(x_u, x_scales, self.k4, jnp.dtype(x.dtype), tuple(lead), rs=rs)
        if self.mode == "pallas":
            out = aq.act_quant(x2, perm, k4, interpret=self.interpret, **kwargs)
        else:
            out = aq.act_quant_reference(x2, perm, k4, **kwargs)
        if zero_bytes:
            x4 = out[0]
            x4 = jnp.concatenate([jnp.zeros((x4.shape[0], zero_bytes), x4.dtype), x4], axis=-1)
            out = (x4, *out[1:])
        return PreparedKernel(*out, jnp.dtype(x.dtype), tuple(lead))

    def _unpacked(self, m: int) -> bool:
        """Whether prepare_input writes the unpacked layout for ``m`` rows (``act_layout``)."""
        if self.act_layout != "auto":
            return self.act_layout == "unpacked"
        from pallas_kernels.w4ax_matmul import UNPACKED_MIN_M

        return m >= UNPACKED_MIN_M

    @property
    def _zeros_packed_first(self) -> bool:
        """The pad zeros fill whole packing tiles at the start of the INT4 segment."""
        return 0 < self.pad <= self.k4 and self.pad % self.tile == 0

    def chunks(self) -> tuple[tuple[int, int, int, int], ...]:
        """Static K chunks (lo, hi, x-scale column, w-scale column) of the epilogue."""
        k, k4 = self.padded_features, self.k4
        if self.act_granularity == "segment" and self.w_group is None:
            segs = ((0, k4, 0), (k4, k, 1))  # x_scales columns: (s4, s8)
            return tuple((lo, hi, col, 0) for lo, hi, col in segs if hi > lo)
        unit = self.block if self.act_granularity == "block" else self.w_group
        if self.w_group is not None:
            unit = math.gcd(unit, self.w_group)
        out = []
        for lo in range(0, k, unit):
            if self.act_granularity == "block":
                xi = lo // self.block
            else:
                xi = 0 if lo < k4 else 1
            wj = 0 if self.w_group is None else lo // self.w_group
            out.append((lo, lo + unit, xi, wj))
        return tuple(out)

    def gate_up_swiglu(self, gate_params, up_params, prepared):
        """``act_quant.swiglu(gate, up)`` ``[..., N]`` (prepared's dtype) of the gate and up
        projections of ``prepared`` from the one-kernel path (`fuse_gate_up`), or None where
        it does not run (not enabled, not the unpacked kernel operand, interpreted, biases,
        no w_regs schedule for the shape): the caller then runs `matmul` twice."""
        if not (self.fuse_gate_up and isinstance(prepared, PreparedUnpacked)):
            return None
        if "bias" in gate_params or "bias" in up_params:
            return None
        from pallas_kernels import w4ax_matmul as wk

        h = wk.w4ax_swiglu_unpacked(
            prepared.x_u, prepared.x_scales,
            gate_params["w_packed"], gate_params["w_scales"],
            up_params["w_packed"], up_params["w_scales"],
            k4=prepared.k4, m=prepared.m, tile_k=self.tile, out_dtype=prepared.dtype,
            interpret=self.interpret, rs=prepared.rs,
        )  # fmt: skip
        return None if h is None else h.reshape(*prepared.lead, h.shape[-1])

    def group_matmul(self, weight_params: list, prepared):
        """The outputs of the projections ``weight_params`` (a list, one input group's, in
        order) from one GEMM over their weights concatenated along N (`fuse_projections`),
        or None where that does not run (not enabled, not the Pallas path, fewer than two
        projections, different parameter sets, no table entry of its own for the
        concatenated shape at this M): the caller then runs `matmul` per projection."""
        if not self.fuse_projections or self.mode != "pallas" or len(weight_params) < 2:
            return None
        if self.act_granularity != "segment" or not isinstance(
            prepared, (PreparedKernel, PreparedUnpacked)
        ):
            return None
        keys = set(weight_params[0])
        if any(set(w) != keys for w in weight_params):
            return None
        from pallas_kernels import tuning

        ns = [int(w["w_packed"].shape[0]) for w in weight_params]
        m = math.prod(prepared.lead)
        if tuning.table_entry(m, sum(ns), self.padded_features, self.k8) is None:
            return None
        fused = {key: jnp.concatenate([w[key] for w in weight_params], axis=0) for key in keys}
        y = self.matmul(fused, prepared)
        outs, start = [], 0
        for n in ns:
            outs.append(y[..., start : start + n])
            start += n
        return outs

    def matmul(self, weight_params, prepared):
        if self.act_granularity == "block":
            # Per-block activation scales: no kernel; same integer sums, finer epilogue.
            w_q = pack.unpack_int4(weight_params["w_packed"], self.tile)  # [N, K] int8
            w_scales = weight_params["w_scales"]
            if w_scales.ndim == 1:
                w_scales = w_scales[:, None]
            y = chunked_epilogue(prepared.x_q, prepared.x_scales, w_q, w_scales, self.chunks())
            return _add_bias_cast(y, weight_params, prepared.dtype, prepared.lead)
        from pallas_kernels import w4ax_matmul as wk

        weights = (
            weight_params["w_packed"],
            weight_params["w_scales"],
            weight_params.get("bias"),
        )
        # Straight to the compute dtype: the epilogue is f32 and rounds once at the store, the
        # values of an f32 output cast afterwards (park_out tiles round their parked INT8
        # partial once more, <= 2^-9 of it; tests/test_w4ax_matmul.py), without writing and
        # re-reading an f32 [M, N]: the tuning table was timed this way too.
        kwargs = dict(tile_k=self.tile, out_dtype=prepared.dtype)
        if isinstance(prepared, PreparedUnpacked):  # written by the kernel path only
            x_args = (prepared.x_u, prepared.x_scales)
            fn = functools.partial(
                wk.w4ax_matmul_unpacked, k4=prepared.k4, m=prepared.m, interpret=self.interpret,
                rs=prepared.rs,
            )  # fmt: skip
        else:
            x_args = (prepared.x4_packed, prepared.x8, prepared.x_scales)
            fn = wk.w4ax_matmul_reference
            if self.mode == "pallas":
                fn = functools.partial(wk.w4ax_matmul, interpret=self.interpret)
        y = fn(*x_args, *weights, **kwargs)
        return y.reshape(*prepared.lead, y.shape[-1])

    # ---- Pallas path ---------------------------------------------------------------------
