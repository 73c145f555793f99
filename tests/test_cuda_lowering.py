"""Every Pallas kernel lowers to a Triton call for CUDA, checked on the CPU.

CI has no GPU, and interpret mode runs the kernels' jnp semantics, not their Triton lowering:
a primitive that Pallas-Triton cannot lower (or a block shape it rejects) would only show up on
the GPU machine. `jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs the
Pallas -> Triton-IR lowering on the CPU. Not covered: Triton's own compilation to PTX (it runs
inside XLA's GPU compiler) and speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine import kv_cache as kc
from pallas_kernels import act_quant as aq
from pallas_kernels import kv4_attention as attn
from pallas_kernels import kv4_write
from pallas_kernels import w4ax_matmul as wm
from pallas_kernels.tuning import GemmConfig

S = jax.ShapeDtypeStruct


def _lower_cuda(fn, *args) -> str:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text, "no Triton kernel call in the CUDA lowering"
    return text


def _gemm_args(m, n, k4, k8):
    return (
        S((m, k4 // 2), jnp.int8),
        S((m, k8), jnp.int8),
        S((m, 2), jnp.float32),
        S((n, (k4 + k8) // 2), jnp.int8),
        S((n,), jnp.float32),
    )


@pytest.mark.parametrize(
    "m,config",
    [
        (16, None),  # decode heuristic (swap_ab, split-K)
        (256, None),
        (1024, None),  # prefill heuristic ("wx" pre-unpack)
        (64, GemmConfig(block_m=64, block_n=128, num_warps=4)),
        (1024, GemmConfig(128, 128, 1, 4, 3, False, 8, pre_unpack="wx", acc8_first=True)),
        (256, GemmConfig(128, 128, 1, 4, 4, True, 8, pre_unpack="x", acc8_first=True)),
        (1024, GemmConfig(128, 128, 1, 4, 3, False, 8, pre_unpack="wx", park_out=True)),
        (256, GemmConfig(128, 128, 1, 4, 4, True, 8, pre_unpack="x", park_out=True)),
    ],
)
def test_w4ax_gemm_lowers(m, config):
    _lower_cuda(functools.partial(wm.w4ax_matmul, config=config), *_gemm_args(m, 256, 384, 128))


@pytest.mark.parametrize(
    "m,k4,k8,bias,fields",
    [
        (200, 384, 128, False, {}),
        (128, 512, 0, True, {}),
        (64, 0, 512, False, dict(block_n=64, stages=5)),
        (300, 512, 0, False, dict(rows_per_wg=128, stages=3)),  # one segment: 128-row halves
        (300, 384, 128, True, dict(rows_per_wg=128, stages=3, park_int8=True)),
        (200, 384, 128, False, dict(park_int8=True)),
        # the packed weight tiles unpacked in shared memory by the kernel
        (200, 384, 128, True, dict(smem_unpack=True)),
        (300, 384, 128, False, dict(rows_per_wg=128, stages=3, park_int8=True, smem_unpack=True)),
        (64, 0, 512, False, dict(block_n=64, smem_unpack=True)),
        # the packed weights unpacked in registers (Y^T tiles: block_n tokens x 2 *
        # rows_per_wg weight rows; tiles that are not powers of two)
        (200, 384, 128, False, dict(w_regs=True)),
        (300, 384, 128, True, dict(w_regs=True, block_n=256, park_int8=True)),
        (1216, 384, 128, False, dict(w_regs=True, block_n=160)),
        (1216, 384, 128, True, dict(w_regs=True, block_n=160, park_int8=True, stages=3)),
        (40, 0, 512, True, dict(w_regs=True, block_n=80)),
        (300, 512, 0, False, dict(w_regs=True, rows_per_wg=128, stages=3)),
        # the 3072 bucket's tiles at the H200's decode batch; a wider tile-order band
        (2224, 384, 128, False, dict(w_regs=True, block_n=192, park_int8=True)),
        (2224, 384, 128, True, dict(w_regs=True, block_n=224, park_int8=True, snake=32)),
    ],
)
def test_w4ax_mgpu_gemm_lowers(m, k4, k8, bias, fields):
    """The Mosaic GPU W4Ax kernel (both segments, one segment, bias, M padded to the tile)
    lowers to a Mosaic GPU call for CUDA: the Pallas -> Mosaic GPU lowering, with wgmma's
    operand checks and the shared-memory budget; not the PTX compilation."""
    from pallas_kernels.w4ax_mgpu import MgpuConfig, w4ax_matmul_mgpu

    args = _gemm_args(m, 256, k4, k8) + ((S((256,), jnp.float32),) if bias else ())
    fn = functools.partial(w4ax_matmul_mgpu, config=MgpuConfig(**fields))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text


@pytest.mark.parametrize("m,sliced", [(296, False), (300, True), (64, True)])
def test_w4ax_mgpu_output_has_the_real_rows(m, sliced):
    """The Mosaic GPU kernel writes an [m, N] output when m is a multiple of 8 (and at least
    one 128-row tile): the last row tile's TMA stores skip the rows past m, and no slice
    (which XLA would turn into a copy in front of a Pallas consumer) follows the call; other
    m get the rows rounded up to 8 (or one tile), then a slice."""
    from pallas_kernels.w4ax_mgpu import MgpuConfig, w4ax_matmul_mgpu

    fn = functools.partial(w4ax_matmul_mgpu, config=MgpuConfig())
    text = (
        jax.jit(fn)
        .trace(*_gemm_args(m, 256, 384, 128))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    out = -(-m // 8) * 8 if m >= 128 else 128
    [call] = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert call.endswith(f"-> tensor<{out}x256xbf16>")
    assert (f"[0:{m}, 0:256] : (tensor<{out}x256xbf16>)" in text) == sliced


@pytest.mark.parametrize(
    "m,tokens,park", [(1216, 160, False), (1214, 80, False), (1000, 256, True)]
)
def test_w_regs_reads_the_engine_operand_as_it_is(m, tokens, park):
    """With the weights unpacked in registers (an ``mgpu`` config with swap_ab and pre_unpack
    "x") the engine's GEMM call is the kernel alone: no XLA pass over the packed weights (no
    shift), none over act_quant's operand (its rows padded to 256 are more than the token
    tiles cover: no pad, no slice), and the output has the m real rows rounded up to 8."""
    cfg = GemmConfig(tokens, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu", acc8_first=park)
    rows = -(-m // 256) * 256
    fn = functools.partial(wm.w4ax_matmul_unpacked, k4=384, m=m, config=cfg)
    args = (S((rows, 512), jnp.int8), S((rows, 2), jnp.float32)) + _gemm_args(m, 256, 384, 128)[3:]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    [call] = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert f"tensor<{rows}x512xi8>" in call and "tensor<256x256xi8>" in call  # x_u, packed w
    out = -(-m // 8) * 8
    assert call.endswith(f"-> tensor<{out}x256xbf16>")
    assert "stablehlo.shift_left" not in text and "stablehlo.pad" not in text
    assert (f"[0:{m}, 0:256]" in text) == (out != m)


@pytest.mark.parametrize(
    "m,k4,tokens,park", [(1216, 384, 160, True), (1214, 384, 160, False), (300, 512, 256, False)]
)
def test_w4ax_swiglu_lowers_to_one_kernel(m, k4, tokens, park):
    """w4ax_swiglu_unpacked with a w_regs schedule: one Mosaic GPU call taking both packed
    weights and writing the [m, N] hidden state (swiglu_config's token tile: 128 parked,
    96 with two accumulators each, 192 with one segment), no XLA pass over the weights."""
    cfg = GemmConfig(tokens, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu", acc8_first=park)
    rows, n = -(-m // 256) * 256, 256
    fn = functools.partial(wm.w4ax_swiglu_unpacked, k4=k4, m=m, config=cfg)
    w = (S((n, 256), jnp.int8), S((n,), jnp.float32))
    args = (S((rows, 512), jnp.int8), S((rows, 2), jnp.float32)) + w + w
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    [call] = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert call.count("tensor<256x256xi8>") == 2
    assert call.endswith(f"-> tensor<{-(-m // 8) * 8}x{n}xbf16>")
    assert "stablehlo.shift_left" not in text and "triton" not in text


def test_w4ax_swiglu_declines_where_its_kernel_does_not_run():
    """None (the caller runs the two GEMMs) for a Triton or a Mosaic GPU non-w_regs config,
    in interpret mode, and for group scales; operand errors name the problem."""
    import numpy as np

    rng = np.random.default_rng(0)
    x_u = jnp.asarray(rng.integers(-8, 8, (256, 512)).astype(np.int8))
    xs = jnp.ones((256, 2), jnp.float32)
    w = jnp.asarray(rng.integers(-128, 128, (256, 256)).astype(np.int8))
    ws = jnp.ones((256,), jnp.float32)
    w_regs = GemmConfig(128, 128, 1, 4, 4, True, 8, pre_unpack="x", backend="mgpu")
    call = functools.partial(wm.w4ax_swiglu_unpacked, k4=384, m=200)
    triton = GemmConfig(128, 128, 1, 4, 3, False, 8, pre_unpack="wx")
    wx_mgpu = GemmConfig(128, 128, 1, 4, 4, False, 8, pre_unpack="wx", backend="mgpu")
    assert call(x_u, xs, w, ws, w, ws, config=triton) is None
    assert call(x_u, xs, w, ws, w, ws, config=wx_mgpu) is None
    assert call(x_u, xs, w, ws, w, ws, config=w_regs, interpret=True) is None
    groups = jnp.ones((256, 4), jnp.float32)
    assert call(x_u, xs, w, groups, w, groups, config=w_regs) is None
    with pytest.raises(ValueError, match="one shape"):
        call(x_u, xs, w, ws, w[:128], ws[:128], config=w_regs)


def test_w4ax_mgpu_config_routes_through_w4ax_matmul():
    """A GemmConfig with backend "mgpu" reaches the Mosaic GPU kernel through w4ax_matmul;
    with group scales, which that kernel does not take, the Triton kernel."""
    cfg = GemmConfig(128, 128, 1, 4, 4, False, 8, pre_unpack="wx", backend="mgpu", park_out=True)
    fn = functools.partial(wm.w4ax_matmul, config=cfg)
    args = _gemm_args(200, 256, 384, 128)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    grouped = args[:4] + (S((256, 4), jnp.float32),)
    assert "mosaic_gpu" not in _lower_cuda(fn, *grouped)


@pytest.mark.parametrize("pre_unpack,xla_unpacks_weights", [("wx", True), ("x", False)])
def test_mgpu_config_without_w_pre_unpack_unpacks_weights_in_the_kernel(
    pre_unpack, xla_unpacks_weights
):
    """An ``mgpu`` GemmConfig whose pre_unpack lacks "w" runs MgpuConfig.smem_unpack: on the
    unpacked activation operand no XLA shift is left in the call (with "wx" XLA still
    unpacks the weights before it)."""
    cfg = GemmConfig(256, 128, 1, 8, 3, pre_unpack=pre_unpack, backend="mgpu", acc8_first=True)
    fn = functools.partial(wm.w4ax_matmul_unpacked, k4=384, m=300, config=cfg)
    args = (S((512, 512), jnp.int8), S((512, 2), jnp.float32)) + _gemm_args(300, 256, 384, 128)[3:]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert ("stablehlo.shift_left" in text) == xla_unpacks_weights


def test_w4a16_gemm_lowers():
    args = (S((64, 512), jnp.bfloat16), S((256, 256), jnp.int8), S((256,), jnp.float32))
    _lower_cuda(wm.w4a16_matmul, *args)


def test_act_quant_lowers():
    perm = np.random.default_rng(0).permutation(512).astype(np.int32)
    fn = functools.partial(aq.act_quant, perm=jnp.asarray(perm), k4=384)
    _lower_cuda(
        lambda x, w: fn(x, norm_weight=w), S((16, 512), jnp.bfloat16), S((512,), jnp.float32)
    )


def test_act_quant_packed_in_kernel_order_lowers():
    """The packed layout (decode-size M) with the permutation and the norm weights as
    arguments: the call rearranges both (two XLA gathers, the ``[K]`` int32 index vector and
    the bf16 weights); given in the kernel's orders (``perm_in_kernel_order``,
    ``norm_in_kernel_order``: an engine's start-up) it runs none."""
    args = (S((16, 512), jnp.bfloat16), S((512,), jnp.int32), S((512,), jnp.bfloat16))

    def gathers(**flags):
        def fn(x, p, w):
            return aq.act_quant(x, p, 384, norm_weight=w, **flags)

        text = _lower_cuda(fn, *args)
        return [ln for ln in text.split("__gpu$xla.gpu.triton")[0].splitlines() if "gather" in ln]

    assert len(gathers()) == 2
    assert not gathers(perm_in_kernel_order=True, norm_in_kernel_order=True)


@pytest.mark.parametrize("m,bm", [(16, 1), (300, 2)])
def test_act_quant_unpacked_lowers(m, bm):
    """The unpacked layout, with pad programs (300 rows -> 512) and several rows a program."""
    perm = np.random.default_rng(0).permutation(512).astype(np.int32)
    fn = functools.partial(
        aq.act_quant, perm=jnp.asarray(perm), k4=384, layout="unpacked", row_align=256,
        rows_per_program=bm,
    )  # fmt: skip
    _lower_cuda(
        lambda x, w: fn(x, norm_weight=w), S((m, 512), jnp.bfloat16), S((512,), jnp.float32)
    )


@pytest.mark.parametrize("m,bm,scatter", [(2224, 1, False), (300, 2, True)])
def test_act_quant_kernel_scales_with_bf16_norm_weights_lowers(m, bm, scatter):
    """kernel_scales=True (the GEMM factors ``[2, R]`` as a third output, a [2, bm] block a
    program) with the RMSNorm weights in bf16: the gathered form takes them gathered by the
    permutation once per call (one XLA gather of the ``[K]`` bf16 weights, no convert), the
    scattered form reads them in order (no XLA op on them)."""
    perm = np.random.default_rng(0).permutation(512).astype(np.int32)
    fn = functools.partial(
        aq.act_quant, perm=jnp.asarray(perm), k4=384, layout="unpacked", row_align=256,
        rows_per_program=bm, kernel_scales=True, scatter=scatter,
    )  # fmt: skip
    text = _lower_cuda(
        lambda x, w: fn(x, norm_weight=w), S((m, 512), jnp.bfloat16), S((512,), jnp.bfloat16)
    )
    gathers = [ln for ln in text.split("__gpu$xla.gpu.triton")[0].splitlines() if "gather" in ln]
    if scatter:
        assert not gathers
    else:
        assert len(gathers) == 1 and gathers[0].rstrip().endswith("-> tensor<512xbf16>")
    out = jax.eval_shape(lambda x, w: fn(x, norm_weight=w), S((m, 512), jnp.bfloat16),
                         S((512,), jnp.bfloat16))  # fmt: skip
    r = -(-m // 256) * 256
    assert [o.shape for o in out] == [(r, 512), (r, 2), (2, r)]
    # the weights in the kernel's order already (kernel_norm_weight, an engine's start-up):
    # no XLA op on them in the call
    text = _lower_cuda(
        lambda x, w: fn(x, norm_weight=w, norm_in_kernel_order=True),
        S((m, 512), jnp.bfloat16), S((512,), jnp.bfloat16),
    )  # fmt: skip
    assert not [ln for ln in text.split("__gpu$xla.gpu.triton")[0].splitlines() if "gather" in ln]


@pytest.mark.parametrize("m,bm,layout,permuted", [(16, 1, "packed", True), (300, 1, "unpacked", False),
                                                 (512, 2, "unpacked", True)])  # fmt: skip
def test_act_quant_swiglu_and_identity_lower(m, bm, layout, permuted):
    """gate= (SwiGLU fused: silu's logistic lowers in Triton) and perm=None (the identity:
    contiguous chunk loads) in both layouts."""
    perm = jnp.asarray(np.random.default_rng(1).permutation(512).astype(np.int32))
    align = 256 if layout == "unpacked" else 1
    fn = functools.partial(
        aq.act_quant, perm=perm if permuted else None, k4=384, layout=layout, row_align=align,
        rows_per_program=bm,
    )  # fmt: skip
    text = _lower_cuda(
        lambda x, g: fn(x, gate=g), S((m, 512), jnp.bfloat16), S((m, 512), jnp.bfloat16)
    )
    assert "act_quant_swiglu" in text
    _lower_cuda(lambda x: fn(x), S((m, 512), jnp.bfloat16))


@pytest.mark.parametrize(
    "config,engine",
    [
        (GemmConfig(128, 64, 1, 4, 4, False, 8, pre_unpack="x"), "triton"),
        (GemmConfig(128, 128, 1, 4, 3, False, 8, pre_unpack="wx", park_out=True), "triton"),
        (
            GemmConfig(256, 128, 1, 8, 3, pre_unpack="wx", backend="mgpu", acc8_first=True),
            "mosaic_gpu",
        ),
    ],
)
def test_w4ax_gemm_on_unpacked_activations_lowers(config, engine):
    """w4ax_matmul_unpacked: the Triton kernel with its one combined activation operand, and
    the Mosaic GPU kernel reading it directly (300 real rows of 512)."""
    fn = functools.partial(wm.w4ax_matmul_unpacked, k4=384, m=300, config=config)
    args = (S((512, 512), jnp.int8), S((512, 2), jnp.float32)) + _gemm_args(300, 256, 384, 128)[3:]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert engine in text and ({"triton", "mosaic_gpu"} - {engine}).pop() not in text


def _pages(hkv, d, page, group, quantized=True):
    cfg = kc.KVCacheConfig(2, hkv, d, page, 32, group, "int4" if quantized else "bf16")
    return jax.tree.map(lambda x: S(x.shape, x.dtype), kc.init_cache(cfg).pages())


@pytest.mark.parametrize("batch,max_pages,page", [(4, 8, 64), (64, 32, 128), (2, 8, 16)])
def test_kv4_decode_attention_lowers(batch, max_pages, page):
    """Covers both warps defaults (64 x 8 heads x 32 pages takes 2 warps) and gathered pages."""
    kv = _pages(8, 128, page, 128)
    args = (S((batch, 32, 128), jnp.bfloat16), kv, S((batch, max_pages), jnp.int32))
    _lower_cuda(attn.paged_decode_attention, *args, S((batch,), jnp.int32))


@pytest.mark.parametrize("dtype,hg", [("int4", 4), ("int4", 1), ("bf16", 4)])
def test_kv4_decode_attention_reading_q_in_its_own_layout_lowers(dtype, hg):
    """q_tiled: the gather load of the group's rows into the 16-row tile and the store of
    every copy back onto its row lower to Triton."""
    kv = _pages(8, 128, 128, 128, quantized=dtype == "int4")
    fn = functools.partial(attn.paged_decode_attention, num_splits=1, q_tiled=True)
    args = (S((64, 8 * hg, 128), jnp.bfloat16), kv, S((64, 16), jnp.int32), S((64,), jnp.int32))
    _lower_cuda(fn, *args)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_kv4_decode_attention_with_ring_lowers(num_splits):
    """The recent window's ring attended inside the decode kernel (bf16 [L, S, Hkv, 16, D])."""
    kv = _pages(8, 128, 128, 128)
    ring = S((2, 64, 8, 16, 128), jnp.bfloat16)
    fn = functools.partial(attn.paged_decode_attention, num_splits=num_splits)
    _lower_cuda(
        lambda q, kv, t, s, rk, rv, rs: fn(q, kv, t, s, ring=(rk, rv), ring_slots=rs),
        S((64, 32, 128), jnp.bfloat16), kv, S((64, 8), jnp.int32), S((64,), jnp.int32),
        ring, ring, S((64,), jnp.int32),
    )  # fmt: skip


@pytest.mark.parametrize("dequantize,t", [(False, 256), (True, 256), (True, 100)])
def test_kv4_prefill_attention_lowers(dequantize, t):
    """t = 256: q read in its own layout (whole 128-row tiles); t = 100: the row layout."""
    kv = _pages(8, 128, 64, 128)
    fn = functools.partial(attn.paged_prefill_attention, dequantize=dequantize)
    args = (S((2, t, 32, 128), jnp.bfloat16), kv, S((2, 8), jnp.int32), S((2,), jnp.int32))
    _lower_cuda(fn, *args)


@pytest.mark.parametrize("d,group", [(128, 128), (128, 32)])
def test_kv4_dequantize_pages_lowers(d, group):
    from pallas_kernels import kv4_dequant

    _lower_cuda(kv4_dequant.dequantize_pages, _pages(8, d, 128, group), S((4, 8), jnp.int32))


@pytest.mark.parametrize("hkv,d,group", [(8, 128, 128), (3, 64, 64), (8, 128, 32)])
def test_kv4_write_lowers_with_aliased_pools(hkv, d, group):
    kv = _pages(hkv, d, 64, group)
    args = (kv, S((5, hkv, d), jnp.bfloat16), S((5, hkv, d), jnp.bfloat16), S((5,), jnp.int32))
    text = _lower_cuda(lambda kv, k, v, s: kv4_write.kv4_write(kv, 1, k, v, s), *args)
    assert "output_operand_alias" in text  # the pool arrays are updated in place
