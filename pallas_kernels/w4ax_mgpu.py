"""W4Ax GEMM for compute-bound M on Pallas' Mosaic GPU backend (Hopper wgmma, TMA, warp
specialisation). Same semantics and operands as :func:`pallas_kernels.w4ax_matmul.w4ax_matmul`
(its reference, ``w4ax_matmul_reference``, is this kernel's reference too).

Why a second backend: from M = 256 up the Pallas-Triton kernel runs at 0.5-0.64x XLA's int8
GEMM even with every operand unpacked before the loop (docs/kernels_gemm.md). A plain int8
GEMM written for Mosaic GPU (one warpgroup issuing TMA copies, two running wgmma from shared
memory, 128 x 128 accumulators per warpgroup) ran at 1.01-1.03x XLA int8 on the H100
(experiments/probe_mgpu_int8.py). This kernel is that loop with the W4Ax operands and
epilogue:

    x_u: [Mp, K] int8   = [16 * x4 (unpacked, half-split tiles) | x8]  (XLA, per call)
    w_u: [N, K]  int8   = 16 * w (unpacked, same tile order)            (XLA, per call)
    acc4 = x_u[:, :K4] . w_u[:, :K4]      (= 256 * x4 . w, int32)
    acc8 = x_u[:, K4:] . w_u[:, K4:]      (=  16 * x8 . w, int32)
    y    = (acc4 * s4/256 + acc8 * s8/16) * ws[n] (+ bias[n])  -> out_dtype

Schedule (:class:`MgpuConfig`): a persistent grid of one CTA per SM walks the
``[Mp/128, N/block_n]`` output tiles. Per tile, a memory warpgroup streams ``[128, 128]`` int8
K tiles of x_u and ``[block_n, 128]`` of w_u through ``stages`` shared-memory slots; two
compute warpgroups each own one ``[64, block_n]`` half of the tile (rows) with two int32
accumulators (INT4 and INT8 segments: their scales differ per row, so they cannot share one),
feeding ``wgmma`` with the K-major tiles (8-bit wgmma takes no transposes). The epilogue
scales, casts and stores through shared memory with TMA. Per-channel weight scales only
(group scales keep the Triton kernel). With one segment (W4A8, W4A4, or the plain int8 GEMM
of the probe) each warpgroup may own 128 rows (``rows_per_wg=128``); with two, ``park_int8``
runs the INT8 segment's tiles first and holds their scaled partial as bf16 in registers, so
one accumulator (and 128 rows) suffice. ``park_int8`` runs on the H100 (the tuning table's
256 x 128 schedules of the M = 4096 bucket; ``bench_gemm.py --mgpu`` checks and times it).

``smem_unpack`` (correct on the H100, every output element within tolerance; no tuning
entry uses it): the kernel takes the packed INT4 weights, viewed as int32 words ``[N, K/8]``
(:func:`packed_words`, a bitcast), instead of XLA's per-call int8 copy (which writes and
re-reads ``N x K`` bytes: ~3.7 ms of every LLaMA-3-8B engine step at batch 1214,
docs/benchmarks.md). The memory warpgroup streams each K tile's ``[block_n, 16]`` words
(64 packed bytes a row) and the activations' two ``[rows, 64]`` halves; each compute
warpgroup loads the words into registers, writes ``(w << 4) & 0xF0F0F0F0`` (16 * the low
nibbles) and ``w & 0xF0F0F0F0`` (16 * the high ones) into its own two shared-memory tiles
(the half-split tile order: low nibbles are channels ``[0, 64)`` of the tile, high
``[64, 128)``), commits them, and issues one wgmma per half, which reads the same buffer
as int8 (a ``RefUnion`` of an int32 and an int8 view, both tiled in 8-row blocks of 64
swizzled bytes). On the H100 (2026-11-27, ``bench_gemm.py --mgpu --mgpu-smem-unpack``) the
best such schedule took 1.14-1.40x the time of the best ``wx`` schedule with XLA's unpack
included (M = 1216 and 8192, LLaMA-3-8B shapes); the first version, which shifted bytes
through int16 registers, took 1.6-2.2x. The unpack sits between a warpgroup's wgmmas (the
pipeline waits for each step's wgmma before the next step's unpack), so the tensor cores
still wait on it every K step.

``w_regs`` (the tuning table's choice for the engine's large-M GEMMs since 2026-11-28): the
packed weights reach the kernel as they are stored (``[N, K/2]`` int8, no XLA pass) and are
unpacked in registers into wgmma's A operand, which may live in registers (shared memory is
only read). With the weights as A the MMA computes tiles of ``Y^T``: each compute warpgroup
owns ``rows_per_wg`` weight rows (wgmma's M) of a ``block_n``-token tile (wgmma's N; any
multiple of 16 from 64 to 256, e.g. 160: eight tiles cover the 1216-row decode batch in two
whole waves on 132 SMs). Per K step a warpgroup loads its ``[rows_per_wg, 64]`` packed bytes
in the 8-bit wgmma register layout (four bytes per register), turns each register into
``(w << 4) & 0xF0F0F0F0`` and ``w & 0xF0F0F0F0`` (16 * low / 16 * high nibbles, channels
``[0, 64)`` / ``[64, 128)`` of the tile: :func:`_split_nibbles`) and issues one wgmma per
half against the activations' two ``[block_n, 64]`` halves in shared memory. The epilogue
scales per weight row (``ws``) and per token (``r4``, ``r8``), converts the ``[64, block_n]``
sub-tiles to the transposed register layout and writes them through a transposed view of
the ``[block_n, 64]`` staging tile of ``Y``, then TMA. On the H100 (2026-11-28,
``bench_gemm.py --mgpu --mgpu-w-regs``): at M = 8192 0.99-1.01x the ``wx`` schedules with
XLA's unpack included, at M = 1216 0.72-0.91x of them (docs/kernels_gemm.md); the serving
benchmark's decode step 47.6 -> 44.6 ms (docs/benchmarks.md).

:func:`swiglu_matmul_mgpu_unpacked` is the same kernel with two weight operands, gate and
up: each compute warpgroup unpacks both weights' rows for the same 64 output channels and
accumulates both tiles over the same activation tile (two accumulator sets, hence
:func:`swiglu_config`'s smaller token tiles), and the epilogue writes only the MLP's hidden
state ``act_quant.swiglu(gate, up)`` of the two tiles rounded to the output dtype, as the
separate GEMMs' outputs are. Lowered on the CPU; not yet run on the GPU
(``bench_gemm.py --gate-up`` checks and times it against the separate GEMMs and
``act_quant(gate=)``; ``W4AxLinear.fuse_gate_up`` puts it in the model, off by default).

GPU only. jax 0.10 (the CPU machines) has no Mosaic GPU interpreter: the CPU tests trace and
lower the kernel for CUDA; its numbers are checked against the reference on the device
(``experiments/bench_gemm.py --mgpu``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.act_quant import kernel_scales, to_unpacked
from pallas_kernels.act_quant import swiglu as swiglu_of
from pallas_kernels.w4ax_matmul import DEFAULT_TILE_K, unpack_int4_x16_tiles, validate_args

BLOCK_NS = (64, 128)  # MgpuConfig.block_n: wgmma's N per tile
W_REGS_TOKENS = (64, 256)  # w_regs: tokens per tile (wgmma's N), a multiple of 16 in this range
# w_regs: registers per thread its accumulators and parked partials may take (the parked
# 64-row x 256-token tile's 128 + 64, measured on the H100 without spills)
MAX_ACC_REGS = 192
ROWS_PER_WG = (64, 128)  # MgpuConfig.rows_per_wg: one or two 64-row wgmma M blocks
OUT_ROW_TILE = 8  # rows of the epilogue's TMA store tiling: output rows come in multiples of it
NIBBLE_HIGH_MASK = -252645136  # 0xF0F0F0F0 as int32: each byte's high nibble


def w_regs_tokens_ok(tokens: int) -> bool:
    """Whether ``tokens`` can be a w_regs tile's token count: an integer wgmma's N (from 64
    up a multiple of 16: ptxas refuses m64n152k32 for s8), not a power of two necessarily
    (160: 8 tiles cover the 1216-row decode batch, against 10 of 128)."""
    lo, hi = W_REGS_TOKENS
    return tokens % 16 == 0 and lo <= tokens <= hi


def packed_words(w_packed):
    """``[N, K/2]`` int8 packed weights -> ``[N, K/8]`` int32 (four packed bytes a word, the
    first in the low bits): the operand of ``MgpuConfig.smem_unpack``; a bitcast, no copy."""
    n, kh = w_packed.shape
    if kh % 4:
        raise ValueError(f"packed weights [N, K/2] need K/2 % 4 == 0, got {w_packed.shape}")
    return lax.bitcast_convert_type(w_packed.reshape(n, kh // 4, 4), jnp.int32)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Schedule of :func:`w4ax_matmul_mgpu`. ``block_n``: output columns per tile (wgmma's
    N); ``rows_per_wg``: output rows per compute warpgroup (the tile is ``2 * rows_per_wg``
    rows); 128 only with one segment or ``park_int8``: two int32 accumulators of
    ``128 x 128`` would need 256 registers per thread; ``smem_unpack``: the kernel unpacks
    the packed weight tiles in shared memory itself (module docstring); ``w_regs``: the
    kernel unpacks them in registers (module docstring): ``block_n`` then counts tokens
    (wgmma's N, a multiple of 16 in [64, 256]), the tile has ``2 * rows_per_wg`` weight rows,
    and the accumulators (and parked partials) may take up to ``MAX_ACC_REGS`` registers
    per thread (:func:`acc_regs`) (:attr:`block_m` / :attr:`tile_n`: the tile's extent
    along M / N either way); ``stages``: shared-memory slots of the TMA pipeline; ``snake``: the tile order walks bands of this many tiles (L2 reuse of the
    weight tiles); ``park_int8`` (two segments): one accumulator, the INT8 segment's K tiles
    first, its scaled partial then held as bf16 in registers (half the space of an int32
    accumulator) while the zeroed accumulator takes the INT4 tiles; one extra bf16 rounding
    of that term (<= 2^-9 of it), as the Triton kernel's ``acc8_first``."""

    block_n: int = 128
    stages: int = 4
    snake: int = 8
    rows_per_wg: int = 64
    park_int8: bool = False
    smem_unpack: bool = False
    w_regs: bool = False

    def __post_init__(self):
        if self.w_regs and not w_regs_tokens_ok(self.block_n):
            lo, hi = W_REGS_TOKENS
            raise ValueError(
                f"MgpuConfig.block_n={self.block_n} (tokens per tile with w_regs) must be a "
                f"multiple of 16 in [{lo}, {hi}]"
            )
        if not self.w_regs and self.block_n not in BLOCK_NS:
            raise ValueError(f"MgpuConfig.block_n={self.block_n} must be one of {BLOCK_NS}")
        if self.w_regs and self.smem_unpack:
            raise ValueError(
                "MgpuConfig: w_regs and smem_unpack are exclusive (two weight unpacks)"
            )
        if self.rows_per_wg not in ROWS_PER_WG:
            raise ValueError(
                f"MgpuConfig.rows_per_wg={self.rows_per_wg} must be one of {ROWS_PER_WG}"
            )
        if self.stages < 2:
            raise ValueError(f"MgpuConfig.stages={self.stages} must be >= 2")

    @property
    def block_m(self) -> int:
        """Rows of the output (tokens) per tile: M is padded to a multiple of it."""
        return self.block_n if self.w_regs else 2 * self.rows_per_wg

    @property
    def tile_n(self) -> int:
        """Columns of the output (weight rows) per tile: N must be a multiple of it."""
        return 2 * self.rows_per_wg if self.w_regs else self.block_n

    @classmethod
    def from_gemm_config(cls, cfg) -> MgpuConfig:
        """The schedule of an ``mgpu`` :class:`~pallas_kernels.tuning.GemmConfig`: block_m
        is the tile's rows (two warpgroups); acc8_first is the Mosaic GPU form of the same
        idea (park_int8); a pre_unpack without "w" leaves the weights to the kernel
        (smem_unpack), and with swap_ab to its registers (w_regs: block_m is then the
        tokens per tile, wgmma's N, and block_n the weight rows, two warpgroups')."""
        if cfg.swap_ab and "w" not in cfg.pre_unpack:
            return cls(
                block_n=cfg.block_m,
                stages=cfg.num_stages,
                rows_per_wg=cfg.block_n // 2,
                park_int8=cfg.acc8_first,
                w_regs=True,
            )
        return cls(
            block_n=cfg.block_n,
            stages=cfg.num_stages,
            rows_per_wg=cfg.block_m // 2,
            park_int8=cfg.acc8_first,
            smem_unpack="w" not in cfg.pre_unpack,
        )

    def to_gemm_config(self):
        """The ``mgpu`` :class:`~pallas_kernels.tuning.GemmConfig` (a tuning-table entry)
        that :meth:`from_gemm_config` maps back to this schedule; ``snake`` has no field
        there and must be the default."""
        from pallas_kernels.w4ax_matmul import GemmConfig

        if self.snake != MgpuConfig.snake:
            raise ValueError(
                f"MgpuConfig.snake={self.snake}: a GemmConfig has no field for it (only the "
                f"default {MgpuConfig.snake} round-trips)"
            )
        if self.w_regs:
            shape = dict(block_m=self.block_n, block_n=2 * self.rows_per_wg, swap_ab=True)
            pre = "x"
        else:
            shape = dict(block_m=2 * self.rows_per_wg, block_n=self.block_n, swap_ab=False)
            pre = "x" if self.smem_unpack else "wx"
        return GemmConfig(
            **shape,
            num_warps=4,
            num_stages=self.stages,
            pre_unpack=pre,
            backend="mgpu",
            acc8_first=self.park_int8,
        )


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", 132)


def _broadcast_load(vec_ref, shape, dim):
    """A ``[shape[dim]]`` vector in global memory -> ``[shape]`` in the wgmma accumulator's
    layout, entry i along index i of axis ``dim`` (per-row or per-column scales)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA.reduce(1 - dim)
    v = plgpu.load(vec_ref, (), layout=layout, optimized=False)
    return lax.broadcast_in_dim(v, shape, (dim,))


def _nothing(*_, **__):
    return None


def _pipeline(body, context, *, in_specs, k_steps, cfg):
    """The K loop of one output tile: a memory warpgroup streams ``in_specs``' blocks through
    ``cfg.stages`` shared-memory slots, two compute warpgroups run ``body`` per K step
    inside ``context`` (the accumulators' scope)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=context,
    )


def _launch(kernel, out_type, args):
    """A persistent grid of one CTA per SM, three warpgroups (memory + two compute)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(_num_sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(*args)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """The INT4 / INT8 accumulation and epilogue math shared by the kernels: a tile's int32
    accumulators (per output, one per segment, or with ``park`` one, the INT8 partial parked
    as bf16 in registers), the K step's wgmmas into the segment's accumulators, and the
    output tiles ``(acc4 * r4 + acc8 * r8) * ws (+ bias)``, one per ``ws_hbms`` entry (two
    for the SwiGLU kernel: gate and up over the same tokens). ``per_token(r_hbm)`` /
    ``per_channel(c_hbm)``: a ``[M]`` / ``[N]`` vector broadcast to the accumulator's
    ``shape`` (the kernels orient the tile differently)."""

    park: bool
    segments: tuple
    k4_steps: int
    k8_steps: int
    shape: tuple
    per_token: object
    per_channel: object
    r4_hbm: object
    r8_hbm: object
    ws_hbms: tuple
    bias_hbms: tuple
    out_dtype: object

    def scaled(self, acc_ref, r_hbm):
        return acc_ref[...].astype(jnp.float32) * self.per_token(r_hbm)

    def _name(self, name, o):
        return name if len(self.ws_hbms) == 1 else f"{name}_{o}"

    def _accs(self, acc, name):
        return tuple(acc[self._name(name, o)] for o in range(len(self.ws_hbms)))

    def context(self, run, finish):
        """Allocates the accumulators, runs the pipeline (``run``), then ``finish(ys)`` with
        ``ys`` the output tiles ``[shape]`` in out_dtype (one per output), inside the
        accumulators' scope."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu

        outs = range(len(self.ws_hbms))
        names = ("acc",) if self.park else self.segments
        accs = {self._name(a, o): plgpu.ACC(self.shape, jnp.int32) for o in outs for a in names}

        @functools.partial(pl.run_scoped, **accs)
        def _(**acc):
            if self.park:
                zero = plgpu.layout_cast(jnp.zeros(self.shape, jnp.bfloat16), plgpu.Layout.WGMMA)
                parked = zero if len(outs) == 1 else tuple(zero for _ in outs)
                _, parked = run((acc, parked))
                parked = (parked,) if len(outs) == 1 else parked
                ys = [
                    self.scaled(a, self.r4_hbm) + p.astype(jnp.float32)
                    for a, p in zip(self._accs(acc, "acc"), parked)
                ]
            else:
                run(acc)
                r_of = {"acc4": self.r4_hbm, "acc8": self.r8_hbm}
                ys = [
                    functools.reduce(
                        lambda a, b: a + b,
                        [self.scaled(self._accs(acc, s)[o], r_of[s]) for s in self.segments],
                    )
                    for o in outs
                ]
            out = []
            for y, ws_hbm, bias_hbm in zip(ys, self.ws_hbms, self.bias_hbms):
                y = y * self.per_channel(ws_hbm)
                if bias_hbm is not None:
                    y = y + self.per_channel(bias_hbm)
                out.append(y.astype(self.out_dtype))
            finish(tuple(out))

    def step(self, s, carry, mma):
        """K step ``s``: ``mma(acc_refs)`` issues its wgmmas into the step's segment's
        accumulators (one per output); waits for them; with ``park``, after the last INT8
        tile, parks the scaled partials and zeroes the accumulators. Returns the pipeline's
        carry."""
        import jax.experimental.pallas as pl
        import jax.experimental.pallas.mosaic_gpu as plgpu

        acc = carry[0] if self.park else carry
        if self.park or len(self.segments) == 1:
            mma(self._accs(acc, "acc" if self.park else self.segments[0]))
        else:

            @pl.when(s < self.k4_steps)
            def _():
                mma(self._accs(acc, "acc4"))

            @pl.when(s >= self.k4_steps)
            def _():
                mma(self._accs(acc, "acc8"))

        plgpu.wgmma_wait(0)
        if not self.park:
            return acc

        def park_partial(_):  # after the last INT8 tile: park it, zero the acc
            parked = []
            for a in self._accs(acc, "acc"):
                parked.append(self.scaled(a, self.r8_hbm).astype(jnp.bfloat16))
                zero = jnp.zeros(self.shape, jnp.int32)
                a[...] = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
            return parked[0] if len(parked) == 1 else tuple(parked)

        parked = lax.cond(s == self.k8_steps - 1, park_partial, lambda p: p, carry[1])
        return acc, parked


def segment_matmul(x_u, rs, w_u, ws, bias, *, k4, cfg, out_dtype, tile_k=128, out_rows=None):
    """The kernel on unpacked operands (module docstring): ``y = (acc4 * r4[m] + acc8 * r8[m])
    * ws[n] (+ bias[n])`` with ``acc4`` over the first ``k4`` channels, ``acc8`` over the rest.

    x_u: [Mp, K] int8, rs: [2, Mp'] f32 (Mp' >= Mp), rows r4 and r8 (the per-token factors,
    one operand: ``act_quant.kernel_scales``), w_u: [N, K] int8 (K contiguous), ws: [N] f32,
    bias: [N] f32 or None -> [out_rows, N] out_dtype. Mp a multiple of ``cfg.block_m``, N of
    ``cfg.block_n``, k4 and K of ``tile_k``. With ``k4 = 0`` it is a plain int8 GEMM with a
    per-row and a per-column scale. ``out_rows`` (default Mp; a multiple of 8, the TMA
    store's row tiling, in ``[cfg.block_m, Mp]``): the output has only the first ``out_rows``
    rows; the TMA stores of the last row tile skip the rows past them (the hardware drops
    out-of-bounds elements), so the caller needs no ``y[:m]`` slice, which XLA materializes
    as a copy wherever the output feeds another custom call (the gate / up outputs into
    ``act_quant(gate=)``: the 1.39 ms of ``memcpy128`` in the batch-1214 decode step of the
    LLaMA-3-8B engine, run 61)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    out_rows = x_u.shape[0] if out_rows is None else out_rows
    if cfg.w_regs:
        return _swap_segment_matmul(
            x_u, rs, (w_u,), (ws,), (bias,),
            k4=k4, cfg=cfg, out_dtype=out_dtype, tk=tile_k, out_rows=out_rows,
        )  # fmt: skip
    mp, k = x_u.shape
    n = w_u.shape[0]
    k8 = k - k4
    bn, tk, rows_wg = cfg.block_n, tile_k, cfg.rows_per_wg
    su = cfg.smem_unpack  # w_u is then the packed weights as int32 words [N, K/8]
    h = tk // 2
    if su and (w_u.dtype != jnp.int32 or 8 * w_u.shape[1] != k):
        raise ValueError(
            f"smem_unpack takes the packed weights as int32 words [N, {k // 8}] "
            f"(packed_words), got {w_u.dtype} {w_u.shape}"
        )
    cta_m = 2 * rows_wg
    if mp % cta_m or n % bn or k4 % tk or k % tk:
        raise ValueError(
            f"M={mp}, N={n}, K4={k4}, K={k}: want multiples of {cta_m}, {bn}, {tk}, {tk}"
        )
    if not cta_m <= out_rows <= mp or out_rows % OUT_ROW_TILE:
        raise ValueError(
            f"out_rows={out_rows} must be a multiple of {OUT_ROW_TILE} in [{cta_m}, M={mp}]"
        )
    m_tiles, n_tiles = mp // cta_m, n // bn
    k4_steps, k_steps = k4 // tk, k // tk
    segments = (("acc4",) if k4 else ()) + (("acc8",) if k8 else ())
    park = cfg.park_int8 and len(segments) == 2
    if rows_wg == 128 and len(segments) == 2 and not park:
        raise ValueError(
            "MgpuConfig.rows_per_wg=128 takes one segment (K4 = 0 or K8 = 0) or park_int8=True"
        )
    k8_steps = k_steps - k4_steps

    def k_tile(s):  # with park the INT8 segment's tiles come first
        return (0, lax.rem(s + k4_steps, k_steps)) if park else (0, s)

    swz = plgpu.find_swizzle(tk * 8)  # one K row of int8
    in_tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    swz_h = plgpu.find_swizzle(h * 8)  # half a K tile: the packed bytes, or one nibble half
    half_tf = (plgpu.TilingTransform((8, swz_h)), plgpu.SwizzleTransform(swz_h))
    # The same bytes as int32 words: 8-row tiles of swz_h bytes, swizzled alike, so a word
    # view and a byte view of one shared-memory buffer address the same bytes.
    word_tf = (plgpu.TilingTransform((8, swz_h // 4)), plgpu.SwizzleTransform(swz_h))

    def k_half(s, j):  # half j of K tile s, in units of h columns
        return (0, 2 * k_tile(s)[1] + j)

    out_bits = jnp.dtype(out_dtype).itemsize * 8
    epi_n = min(bn, 1024 // out_bits)  # one 128-byte swizzled row per epilogue store
    out_swz = plgpu.find_swizzle(epi_n * out_bits)
    out_tf = (
        plgpu.TilingTransform((8, out_swz * 8 // out_bits)),
        plgpu.SwizzleTransform(out_swz),
    )
    epi_m = 64  # 64-row epilogue sub-tiles: a 128-row staging buffer costs 32 KiB more smem
    epi_tiles = [(i, j) for i in range(rows_wg // epi_m) for j in range(bn // epi_n)]
    slots = min(2, len(epi_tiles))
    has_bias = bias is not None

    def smem_spec(shape, index, tf):
        return plgpu.BlockSpec(shape, index, transforms=tf, memory_space=plgpu.SMEM)

    if su:  # x in two K halves; the weights' packed bytes of the tile
        in_specs = [
            smem_spec((cta_m, h), lambda s: k_half(s, 0), half_tf),
            smem_spec((cta_m, h), lambda s: k_half(s, 1), half_tf),
            smem_spec((bn, h // 4), k_tile, word_tf),
        ]
    else:
        in_specs = [smem_spec((cta_m, tk), k_tile, in_tf), smem_spec((bn, tk), k_tile, in_tf)]

    pipeline = functools.partial(_pipeline, in_specs=in_specs, k_steps=k_steps, cfg=cfg)

    def kernel(x_hbm, rs_hbm, w_hbm, ws_hbm, *rest):
        bias_hbm, y_hbm = (rest[0], rest[1]) if has_bias else (None, rest[0])
        r4_hbm, r8_hbm = rs_hbm.at[0], rs_hbm.at[1]

        operands = (x_hbm, x_hbm, w_hbm) if su else (x_hbm, w_hbm)
        # smem_unpack: each compute warpgroup's unpacked weight halves [lo | hi] of one tile,
        # written as int32 words and read by wgmma as int8 (one buffer, two views)
        scratch = {}
        if su:
            scratch["w_un"] = plgpu.RefUnion(
                plgpu.SMEM((2, 2, bn, h // 4), jnp.int32, transforms=word_tf),
                plgpu.SMEM((2, 2, bn, h), jnp.int8, transforms=half_tf),
            )

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(_nothing, _nothing).get_allocations(*operands),
            y_smem=plgpu.SMEM((2, slots, epi_m, epi_n), out_dtype, transforms=out_tf),
            collective_axes="wg",
            **scratch,
        )
        def scoped(allocs, y_smem, w_un=None):
            wg = lax.axis_index("wg")
            w_words, w_bytes = w_un if su else (None, None)

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, cfg.snake)
                rows = pl.ds(mi * cta_m + wg * rows_wg, rows_wg)
                cols = pl.ds(ni * bn, bn)

                shape = (rows_wg, bn)

                def rows_of(r_hbm):  # [Mp] scales -> [rows_wg, bn], row i's along row i
                    return _broadcast_load(r_hbm.at[rows], shape, 0)

                def cols_of(c_hbm):  # [N] scales -> [rows_wg, bn], column j's along column j
                    return _broadcast_load(c_hbm.at[cols], shape, 1)

                segs = _Segments(
                    park, segments, k4_steps, k8_steps, shape, rows_of, cols_of,
                    r4_hbm, r8_hbm, (ws_hbm,), (bias_hbm,), out_dtype,
                )  # fmt: skip

                def finish(ys):
                    (y,) = ys
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e, (i, j) in enumerate(epi_tiles):
                        er = slice(i * epi_m, (i + 1) * epi_m)
                        ec = slice(j * epi_n, (j + 1) * epi_n)
                        slot = e % slots
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        y_smem[wg, slot] = y[er, ec]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            y_smem.at[wg, slot], y_hbm.at[rows, cols].at[er, ec]
                        )

                context = functools.partial(segs.context, finish=finish)

                def step(idx, *refs):
                    (s,) = idx
                    *smems, carry = refs
                    mine = pl.ds(wg * rows_wg, rows_wg)
                    if su:
                        # The tile's packed bytes, four to an int32 word -> registers -> 16 *
                        # low / 16 * high nibbles into this warpgroup's scratch (two 32-bit
                        # ops per four bytes: the shift moves each byte's low nibble up, the
                        # mask drops what crossed from the byte below); wgmma reads the
                        # scratch as int8 after the commit.
                        x_lo, x_hi, w_p = smems
                        wp = w_p[...]  # [bn, h / 4] int32
                        high = jnp.int32(NIBBLE_HIGH_MASK)
                        w_words[wg, 0] = jnp.left_shift(wp, jnp.int32(4)) & high
                        w_words[wg, 1] = wp & high
                        plgpu.commit_smem()
                        pairs = [
                            (x_lo.at[mine], plgpu.transpose_ref(w_bytes.at[wg, 0], (1, 0))),
                            (x_hi.at[mine], plgpu.transpose_ref(w_bytes.at[wg, 1], (1, 0))),
                        ]
                    else:
                        x_smem, w_smem = smems
                        # w: [tk, bn], K-major
                        pairs = [(x_smem.at[mine], plgpu.transpose_ref(w_smem, (1, 0)))]

                    def mma(accs):
                        (acc,) = accs
                        for a, b in pairs:
                            plgpu.wgmma(acc, a, b)

                    return segs.step(s, carry, mma)

                x_rows = x_hbm.at[pl.ds(mi * cta_m, cta_m), :]
                ins = (x_rows, x_rows) if su else (x_rows,)
                pipeline(step, context)(*ins, w_hbm.at[cols, :], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    _check_rs(rs, mp)
    args = [x_u, rs, w_u, ws] + ([bias] if has_bias else [])
    return _launch(kernel, jax.ShapeDtypeStruct((out_rows, n), out_dtype), args)


def _split_nibbles(packed):
    """``[R, 64]`` int8 packed bytes in the WGMMA_8BIT register layout -> ``(16 * low
    nibbles, 16 * high nibbles)``, both int8 in the same layout: the A operands of the two
    half-tile wgmmas. Each register holds four bytes; as one 32-bit word it takes
    ``(w << 4) & 0xF0F0F0F0`` and ``w & 0xF0F0F0F0`` (two operations per four bytes).
    Written at the Mosaic GPU level: Pallas' Mosaic GPU lowering refuses 8-bit shifts."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import numpy as np
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith

    out = plgpu.ShapeDtypeStruct(packed.shape, jnp.int8, layout=plgpu.Layout.WGMMA_8BIT)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_8BIT,), return_type=(out, out))
    def split(_, arr):
        i32 = ir.IntegerType.get_signless(32)
        mask = arith.constant(i32, NIBBLE_HIGH_MASK)
        four = arith.constant(i32, 4)

        def each(fn):
            regs = np.empty(arr.registers.shape, dtype=object)
            for idx, reg in np.ndenumerate(arr.registers):
                word = mgpu_utils.bitcast(reg, i32)
                regs[idx] = mgpu_utils.bitcast(fn(word), reg.type)
            return mgpu.FragmentedArray(_registers=regs, _layout=arr.layout, _is_signed=True)

        low = each(lambda w: arith.andi(arith.shli(w, four), mask))
        high = each(lambda w: arith.andi(w, mask))
        return low, high

    return split(packed)


def _swap_segment_matmul(
    x_u, rs, w_ps, wss, biases, *, k4, cfg, out_dtype, tk, out_rows, swiglu=False
):
    """``segment_matmul`` with ``cfg.w_regs``: the packed weights ``[N, K/2]`` int8 as they
    are stored, unpacked in registers into wgmma's A operand; the MMA computes tiles of
    ``Y^T`` (module docstring). ``w_ps``, ``wss``, ``biases``: one entry per output, or with
    ``swiglu`` two (gate, up) whose outputs the epilogue combines into ``silu(gate) * up``
    (:func:`swiglu_matmul_mgpu_unpacked`). The tiles cover ``out_rows`` rounded up to
    ``block_n``; x_u (and rs's columns) may have more rows than that (act_quant's 256-row
    padding), which are not read."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    rows, k = x_u.shape
    n = w_ps[0].shape[0]
    for w_p in w_ps:
        if w_p.dtype != jnp.int8 or w_p.shape != (n, k // 2):
            raise ValueError(
                f"w_regs takes the packed weights as int8 [N, {k // 2}] (every output's of "
                f"N = {n} rows), got {w_p.dtype} {w_p.shape}"
            )
    n_out = len(w_ps)
    k8 = k - k4
    bt, rw = cfg.block_n, cfg.rows_per_wg  # tokens per tile (wgmma N); weight rows per wg
    cta_w = 2 * rw
    h = tk // 2
    mp = -(-out_rows // bt) * bt  # the rows the tiles cover
    if n % cta_w or k4 % tk or k % tk:
        raise ValueError(f"N={n}, K4={k4}, K={k}: want multiples of {cta_w}, {tk}, {tk}")
    if not 0 < out_rows or out_rows % OUT_ROW_TILE or mp > rows:
        raise ValueError(
            f"out_rows={out_rows} must be a positive multiple of {OUT_ROW_TILE} whose tiles of "
            f"{bt} rows ({mp}) fit x's {rows} rows"
        )
    t_tiles, w_tiles = mp // bt, n // cta_w
    k4_steps, k_steps = k4 // tk, k // tk
    k8_steps = k_steps - k4_steps
    segments = (("acc4",) if k4 else ()) + (("acc8",) if k8 else ())
    park = cfg.park_int8 and len(segments) == 2
    if acc_regs(cfg, two_segments=len(segments) == 2, outputs=n_out) > MAX_ACC_REGS:
        raise ValueError(_acc_reason(cfg, n_out))

    def k_tile(s):  # with park the INT8 segment's tiles come first
        return lax.rem(s + k4_steps, k_steps) if park else s

    swz_h = plgpu.find_swizzle(h * 8)  # 64 bytes: half a K tile of x, or its packed bytes
    half_tf = (plgpu.TilingTransform((8, swz_h)), plgpu.SwizzleTransform(swz_h))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    epi_w = min(64, 1024 // out_bits)  # output columns (weight rows) per epilogue store
    out_swz = plgpu.find_swizzle(epi_w * out_bits)
    out_tf = (
        plgpu.TilingTransform((8, out_swz * 8 // out_bits)),
        plgpu.SwizzleTransform(out_swz),
    )
    epi_t = 64 if bt % 64 == 0 else bt  # output rows (tokens) per epilogue store
    epi_tiles = [(i, j) for i in range(rw // epi_w) for j in range(bt // epi_t)]
    slots = min(2, len(epi_tiles))
    has_bias = [b is not None for b in biases]

    def smem_spec(shape, index):
        return plgpu.BlockSpec(shape, index, transforms=half_tf, memory_space=plgpu.SMEM)

    in_specs = [
        smem_spec((bt, h), lambda s: (0, 2 * k_tile(s))),  # x: the tile's low-nibble half
        smem_spec((bt, h), lambda s: (0, 2 * k_tile(s) + 1)),  # and its high-nibble half
    ] + [smem_spec((cta_w, h), lambda s: (0, k_tile(s)))] * n_out  # w: the packed bytes

    pipeline = functools.partial(_pipeline, in_specs=in_specs, k_steps=k_steps, cfg=cfg)

    def kernel(x_hbm, rs_hbm, *rest):
        r4_hbm, r8_hbm = rs_hbm.at[0], rs_hbm.at[1]
        w_hbms, ws_hbms, rest = rest[:n_out], rest[n_out : 2 * n_out], rest[2 * n_out :]
        bias_hbms = []
        for b in has_bias:
            bias_hbms.append(rest[0] if b else None)
            rest = rest[1:] if b else rest
        (y_hbm,) = rest

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(_nothing, _nothing).get_allocations(x_hbm, x_hbm, *w_hbms),
            y_smem=plgpu.SMEM((2, slots, epi_t, epi_w), out_dtype, transforms=out_tf),
            collective_axes="wg",
        )
        def scoped(allocs, y_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((t_tiles * w_tiles,), collective_axes="sm")
            def tiles(info):
                (lin,) = info.index
                ti, wi = plgpu.planar_snake(lin, (t_tiles, w_tiles), 1, cfg.snake)
                toks = pl.ds(ti * bt, bt)
                wrows = pl.ds(wi * cta_w + wg * rw, rw)
                shape = (rw, bt)  # Y^T: weight rows x tokens

                def of_w(c_hbm):  # [N] -> [rw, bt], weight row i's value along row i
                    return _broadcast_load(c_hbm.at[wrows], shape, 0)

                def of_t(r_hbm):  # [Mp] -> [rw, bt], token j's value along column j
                    return _broadcast_load(r_hbm.at[toks], shape, 1)

                segs = _Segments(
                    park, segments, k4_steps, k8_steps, shape, of_t, of_w,
                    r4_hbm, r8_hbm, tuple(ws_hbms), tuple(bias_hbms), out_dtype,
                )  # fmt: skip

                def finish(ys):
                    # the gate and up tiles rounded to out_dtype, as their GEMM outputs, then
                    # the MLP's expression on them (act_quant.swiglu)
                    (y,) = (swiglu_of(*ys),) if swiglu else ys
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e, (i, j) in enumerate(epi_tiles):
                        ew = slice(i * epi_w, (i + 1) * epi_w)
                        et = slice(j * epi_t, (j + 1) * epi_t)
                        slot = e % slots
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        # [epi_w, epi_t] of Y^T into the [epi_t, epi_w] staging tile of Y
                        sub = plgpu.layout_cast(y[ew, et], plgpu.Layout.WGMMA_TRANSPOSED)
                        plgpu.transpose_ref(y_smem.at[wg, slot], (1, 0))[...] = sub
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            y_smem.at[wg, slot], y_hbm.at[toks, wrows].at[et, ew]
                        )

                context = functools.partial(segs.context, finish=finish)

                def step(idx, x_lo, x_hi, *refs):
                    (s,) = idx
                    *w_smems, carry = refs
                    halves = []
                    for w_smem in w_smems:
                        packed = plgpu.load(
                            w_smem.at[pl.ds(wg * rw, rw)], (), layout=plgpu.Layout.WGMMA_8BIT
                        )
                        halves.append(_split_nibbles(packed))

                    def mma(accs):
                        for acc, (low, high) in zip(accs, halves):
                            plgpu.wgmma(acc, low, plgpu.transpose_ref(x_lo, (1, 0)))
                            plgpu.wgmma(acc, high, plgpu.transpose_ref(x_hi, (1, 0)))

                    return segs.step(s, carry, mma)

                x_rows = x_hbm.at[toks, :]
                w_rows = [w.at[pl.ds(wi * cta_w, cta_w), :] for w in w_hbms]
                pipeline(step, context)(x_rows, x_rows, *w_rows, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    _check_rs(rs, mp)
    args = [x_u, rs, *w_ps, *wss] + [b for b in biases if b is not None]
    return _launch(kernel, jax.ShapeDtypeStruct((out_rows, n), out_dtype), args)


def mgpu_unsupported(n: int, n_groups: int, tile_k: int, cfg, *, two_segments: bool):
    """Why the Mosaic GPU kernel cannot take this call, or None when it can (the one list of
    its limits: :func:`w4ax_matmul_mgpu` raises it, ``w4ax_matmul`` falls back on it)."""
    if n_groups:
        return (
            "the Mosaic GPU W4Ax kernel takes per-channel weight scales [N] only; group "
            f"scales ({n_groups} groups) run the Triton kernel (GemmConfig(backend='pallas'))"
        )
    if tile_k != 128:
        return f"the Mosaic GPU W4Ax kernel needs tile_k=128 (one 128-byte K row), got {tile_k}"
    if n % cfg.tile_n:
        what = "2 * rows_per_wg" if cfg.w_regs else "block_n"
        return f"N={n} must be a multiple of MgpuConfig.{what}={cfg.tile_n}"
    if cfg.w_regs:
        if acc_regs(cfg, two_segments=two_segments) > MAX_ACC_REGS:
            return _acc_reason(cfg)
        return None
    if cfg.rows_per_wg == 128 and two_segments and not cfg.park_int8:
        return (
            "MgpuConfig.rows_per_wg=128 takes one segment; this call has both INT4 and INT8 "
            "channels (two accumulators: use rows_per_wg=64, or park_int8=True)"
        )
    return None


def acc_regs(cfg, *, two_segments: bool, outputs: int = 1) -> int:
    """Registers per thread that a w_regs tile's accumulators take: per output one int32
    ``rows_per_wg x block_n`` accumulator per segment, or with ``park_int8`` one plus the
    parked bf16 partial (half of one)."""
    one = cfg.rows_per_wg * cfg.block_n // 128  # one int32 accumulator over 128 threads
    park = cfg.park_int8 and two_segments
    per_output = one + one // 2 if park else one * (2 if two_segments else 1)
    return outputs * per_output


# wave_fit_schedules' cost model: a tile's fixed cost (pipeline fill and drain, epilogue) in
# token-equivalents of its K loop. A ranking heuristic only; the study times what it ranks.
TILE_OVERHEAD_TOKENS = 24


def wave_fit_schedules(
    m: int,
    n: int,
    *,
    sms: int = 132,
    row_align: int = 1,
    top: int = 3,
    two_segments: bool = True,
) -> list[MgpuConfig]:
    """w_regs schedules (128 weight rows a tile) whose token tiles suit ``m`` rows of a
    ``[m, K] x [K, n]`` GEMM on ``sms`` SMs, best-ranked first: for each token count ``t``
    (a multiple of 16 in ``W_REGS_TOKENS``) the persistent grid runs ``ceil(m / t) * n /
    128`` tiles in ``waves = ceil(tiles / sms)`` rounds, each costing ``t +
    TILE_OVERHEAD_TOKENS``; the ``top`` cheapest token counts are kept (ties: more tokens a
    tile first), each as the unparked schedule where its two accumulators fit
    ``MAX_ACC_REGS`` and the ``park_int8`` one. ``row_align``: the operand's rows are padded
    to a multiple of it already (act_quant's ``row_align``); token tiles reaching past that
    would pad the operand a second time and are left out (except where one tile covers all
    the rows: then some padding is unavoidable). At M = 2224 (the H200's 1024/512 decode
    batch) the 4096 bucket's 256-token tiles put 288 tiles of an ``N = 4096`` GEMM in three
    waves, the last 18% full; 192-token tiles make 384 tiles, three waves 97% full (ranked
    first, and the fastest there on the device, docs/kernels_gemm.md)."""
    if m < 1 or n % 128:
        raise ValueError(f"wave_fit_schedules: want m >= 1 and n % 128 == 0, got {m}, {n}")
    rows = -(-m // row_align) * row_align
    lo, hi = W_REGS_TOKENS
    scored = []
    for t in range(lo, hi + 1, 16):
        tiles_m = -(-m // t)
        if tiles_m * t > max(rows, t):  # a second padding of the operand's rows (one tile:
            continue  # unavoidable, allowed)
        waves = -(-tiles_m * (n // 128) // sms)
        scored.append((waves * (t + TILE_OVERHEAD_TOKENS), -t))
    out = []
    for _, neg_t in sorted(scored)[:top]:
        plain = MgpuConfig(block_n=-neg_t, rows_per_wg=64, w_regs=True)
        if acc_regs(plain, two_segments=two_segments) <= MAX_ACC_REGS:
            out.append(plain)
        if two_segments:
            out.append(dataclasses.replace(plain, park_int8=True))
    return out


def _acc_reason(cfg, outputs: int = 1) -> str:
    what = "gate and up accumulators" if outputs == 2 else "int32 accumulators"
    return (
        f"MgpuConfig(w_regs=True, rows_per_wg={cfg.rows_per_wg}, block_n={cfg.block_n}, "
        f"park_int8={cfg.park_int8}): the {what} of {cfg.rows_per_wg} x {cfg.block_n} "
        f"exceed {MAX_ACC_REGS} registers per thread with this call's segments (use "
        "park_int8=True or fewer tokens per tile)"
    )


@functools.partial(jax.jit, static_argnames=("tile_k", "out_dtype", "cfg"))
def _w4ax_mgpu_call(x4_packed, x8, x_scales, w_packed, w_scales, bias, *, tile_k, out_dtype, cfg):
    # [Mp, K] int8 = [16 * x4 | x8], rows padded to the tile: what act_quant writes itself
    # for the unpacked entry below
    x_u, x_scales = to_unpacked(x4_packed, x8, x_scales, tile_k=tile_k, row_align=cfg.block_m)
    return _on_unpacked(
        x_u, x_scales, w_packed, w_scales, bias,
        m=x8.shape[0], k4=2 * x4_packed.shape[1], tile_k=tile_k, out_dtype=out_dtype, cfg=cfg,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("m", "k4", "tile_k", "out_dtype", "cfg"))
def w4ax_matmul_mgpu_unpacked(
    x_u, x_scales, w_packed, w_scales, bias, rs=None, *, m, k4, tile_k, out_dtype, cfg
):
    """The kernel on the unpacked activation operand that ``act_quant(layout="unpacked")``
    writes (``x_u [R, K]`` int8 = [16 * x4 | x8], ``x_scales [R, 2]``, the first ``m`` rows
    real; ``rs [2, R]``: ``act_quant.kernel_scales`` of x_scales where act_quant wrote it, else
    None): no XLA pass over the activations before the call. Operands checked by
    ``w4ax_matmul.w4ax_matmul_unpacked``, which routes here."""
    return _on_unpacked(
        x_u, x_scales, w_packed, w_scales, bias,
        m=m, k4=k4, tile_k=tile_k, out_dtype=out_dtype, cfg=cfg, rs=rs,
    )  # fmt: skip


def _check_rs(rs, rows: int) -> None:
    if rs.dtype != jnp.float32 or rs.ndim != 2 or rs.shape[0] != 2 or rs.shape[1] < rows:
        raise ValueError(
            f"rs must be float32 [2, >= {rows}] (kernel_scales of the rows' x_scales), got "
            f"{rs.dtype} {rs.shape}"
        )


def _rows(x_u, x_scales, m, cfg, rs=None):
    """The activation operand's rows as the kernel takes them: ``(x_u, rs, out_rows)``,
    x_u padded to whole row tiles only where its rows fall short (w_regs tiles cover
    ``out_rows`` only: extra rows are left unread), ``rs`` the per-row factors
    (``act_quant.kernel_scales``; computed here from x_scales when the caller has none). The output
    stops at m rows rounded up to the TMA row tiling (segment_matmul's out_rows): with m a
    multiple of 8 (and, without w_regs, at least one row tile) no slice is left."""
    rows = x_u.shape[0]
    if rs is not None:
        _check_rs(rs, rows)
    out_rows = -(-m // OUT_ROW_TILE) * OUT_ROW_TILE
    if cfg.w_regs:
        mp = max(rows, -(-out_rows // cfg.block_m) * cfg.block_m)
    else:
        out_rows = max(out_rows, cfg.block_m)
        mp = -(-rows // cfg.block_m) * cfg.block_m
    if mp != rows:
        x_u = jnp.pad(x_u, ((0, mp - rows), (0, 0)))
        x_scales = jnp.pad(x_scales, ((0, mp - rows), (0, 0)))
        if rs is not None:
            rs = jnp.pad(rs[:, :rows], ((0, 0), (0, mp - rows)))
    return x_u, kernel_scales(x_scales) if rs is None else rs, out_rows


def _on_unpacked(
    x_u, x_scales, w_packed, w_scales, bias, *, m, k4, tile_k, out_dtype, cfg, rs=None
):
    x_u, rs, out_rows = _rows(x_u, x_scales, m, cfg, rs)
    # [N, K] int8, unless the kernel unpacks the packed tiles itself (smem_unpack: as int32
    # words; w_regs: the packed bytes as they are)
    if cfg.w_regs:
        w_u = w_packed
    elif cfg.smem_unpack:
        w_u = packed_words(w_packed)
    else:
        w_u = unpack_int4_x16_tiles(w_packed, tile_k)
    b = None if bias is None else bias.astype(jnp.float32)
    y = segment_matmul(
        x_u, rs, w_u, w_scales.astype(jnp.float32), b,
        k4=k4, tile_k=tile_k, cfg=cfg, out_dtype=out_dtype, out_rows=out_rows,
    )  # fmt: skip
    return y if out_rows == m else y[:m]


def swiglu_config(cfg: MgpuConfig, *, two_segments: bool) -> MgpuConfig | None:
    """The SwiGLU kernel's schedule from a w_regs GEMM schedule (the tuning table's for the
    gate / up shape): 64 weight rows per warpgroup and the most tokens per tile, at most
    ``cfg.block_n``, whose gate and up accumulators fit ``MAX_ACC_REGS``; None for a schedule
    that is not w_regs (the kernel exists only in that form)."""
    if not cfg.w_regs:
        return None
    c = dataclasses.replace(cfg, rows_per_wg=64)
    while acc_regs(c, two_segments=two_segments, outputs=2) > MAX_ACC_REGS:
        if c.block_n - 16 < W_REGS_TOKENS[0]:
            return None
        c = dataclasses.replace(c, block_n=c.block_n - 16)
    return c


@functools.partial(jax.jit, static_argnames=("m", "k4", "tile_k", "out_dtype", "cfg"))
def swiglu_matmul_mgpu_unpacked(
    x_u, x_scales, w_gate, ws_gate, w_up, ws_up, rs=None, *, m, k4, tile_k, out_dtype, cfg
):
    """The LLaMA MLP's hidden state from one kernel: ``swiglu(gate, up)`` (``act_quant.swiglu``:
    ``silu(f32(gate)) * up`` rounded to out_dtype) of the W4Ax GEMMs ``gate = x @ w_gate``,
    ``up = x @ w_up`` over the same activations, each rounded to out_dtype first, as the two
    GEMMs' outputs are: the same values as the separate GEMMs and ``act_quant.swiglu``
    (the GPU's ``exp`` aside), without writing gate and up. ``x_u [R, K]`` int8 / ``x_scales
    [R, 2]`` as ``act_quant(layout="unpacked")`` writes them (first ``m`` rows real),
    ``w_gate`` / ``w_up`` ``[N, K/2]`` packed, ``ws_gate`` / ``ws_up`` ``[N]`` ->
    ``[m, N]`` out_dtype. ``cfg``: a w_regs schedule (:func:`swiglu_config`). Each compute
    warpgroup computes the gate and the up tile of the same 64 weight rows and tokens (the
    A operands of both unpacked in registers, the activation tile read from shared memory
    by both), so the epilogue has both in registers."""
    if not cfg.w_regs or cfg.rows_per_wg != 64:
        raise ValueError(
            f"swiglu_matmul takes a w_regs schedule of 64 rows per warpgroup, got {cfg}"
        )
    x_u, rs, out_rows = _rows(x_u, x_scales, m, cfg, rs)
    wss = tuple(w.astype(jnp.float32) for w in (ws_gate, ws_up))
    h = _swap_segment_matmul(
        x_u, rs, (w_gate, w_up), wss, (None, None),
        k4=k4, cfg=cfg, out_dtype=out_dtype, tk=tile_k, out_rows=out_rows, swiglu=True,
    )  # fmt: skip
    return h if out_rows == m else h[:m]


def w4ax_matmul_mgpu(
    x4_packed,
    x8,
    x_scales,
    w_packed,
    w_scales,
    bias=None,
    *,
    tile_k: int = DEFAULT_TILE_K,
    out_dtype=jnp.bfloat16,
    config: MgpuConfig | None = None,
):
    """W4Ax GEMM ``[M, N]`` on Mosaic GPU (module docstring); operands as ``w4ax_matmul``."""
    m, n, k4, k8, n_groups = validate_args(
        x4_packed, x8, x_scales, w_packed, w_scales, bias, tile_k
    )
    cfg = config or MgpuConfig()
    reason = mgpu_unsupported(n, n_groups, tile_k, cfg, two_segments=bool(k4 and k8))
    if reason:
        raise ValueError(reason)
    return _w4ax_mgpu_call(
        x4_packed, x8, x_scales, w_packed, w_scales, bias,
        tile_k=tile_k, out_dtype=jnp.dtype(out_dtype), cfg=cfg,
    )  # fmt: skip
