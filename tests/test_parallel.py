"""Tensor parallelism on simulated CPU devices: meshes of 1, 2, 4, 8 equal one device.

The multi-device test needs 8 devices, i.e. ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before jax is imported. When this process has fewer devices, the test body re-runs in a
subprocess with the flag set (the parent only checks its exit status and output).

Tolerances (why): bf16 logits within 2e-2 absolute (bf16 rounding of the layer outputs; the
all-reduce adds f32 partials, measured 0.0 on this model); float f32 logits within 1e-5 absolute (row-parallel partial sums are added
in a different order: a few f32 ulps of values ~1; measured <= 6e-7); quantized (FMPQ W4Ax +
KV4 cache, sim) logits within 1e-4 absolute: the integer products are exact, the per-chunk
f32 partials are summed in a different order, and a one-ulp change of an input could move an
activation across a rounding boundary of the INT4 quantizer (measured <= 6e-7). Greedy tokens
of prefill + decode over the paged KV cache must be identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from comet_jax.parallel import mesh as mesh_lib
from comet_jax.parallel import rules, tp_quant
from comet_jax.quant.fmpq import FMPQConfig
from comet_jax.quant.qlinear import W4AxLinear
from models import LinearPlan, LlamaForCausalLM, ModelConfig, abstract_params, layer_specs

N_DEVICES = 8
TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=512,
    num_layers=1,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
)
_NO_DEVICES = "simulated devices unavailable"
FLOAT_ATOL = 1e-5
QUANT_ATOL = 1e-4
BF16_ATOL = 2e-2


# ---- single-process unit tests -------------------------------------------------------------


def test_plan_chunks_are_chunk_local_with_common_int8_count():
    rng = np.random.default_rng(0)
    k, c, block = 256, 4, 16
    absmax = rng.uniform(0.5, 1.5, k)
    absmax[[3, 5, 7, 200]] *= 40  # chunk 0 holds 3 outliers, chunk 3 one
    plans = tp_quant.plan_chunks(absmax, FMPQConfig(block_size=block), c)
    assert len(plans) == c
    assert {p.n_int8_blocks for p in plans} == {1}  # ceil(3 / 16) = 1 for every chunk
    kc = k // c
    for i, p in enumerate(plans):
        assert sorted(np.asarray(p.perm)) == list(range(kc))  # a permutation inside the chunk
        chunk_out = set(np.nonzero(absmax[i * kc : (i + 1) * kc] > 8 * np.median(absmax))[0])
        assert chunk_out <= set(np.asarray(p.perm)[p.k4 :])  # every outlier in the INT8 segment
    g = tp_quant.global_perm(plans)
    assert sorted(g) == list(range(k)) and all(g[i] // kc == i // kc for i in range(k))
    with pytest.raises(ValueError, match="n_chunks=3"):
        tp_quant.plan_chunks(absmax, FMPQConfig(block_size=block), 3)


@pytest.mark.parametrize("n_chunks, w_group, granularity", [(1, None, "segment"), (2, 32, "block")])
def test_chunked_backend_is_sum_of_w4ax_chunks(n_chunks, w_group, granularity):
    """y = sum_c W4Ax(chunk c) exactly (integers exact; f32 partials added in chunk order);
    n_chunks=1 is the plain W4Ax backend bit for bit."""
    rng = jax.random.split(jax.random.key(n_chunks), 4)
    kc, n = 128, 48
    k = n_chunks * kc
    fmt = dict(
        k4=96, k8=32, block=32, tile=32, w_group=w_group, act_granularity=granularity, permute=True
    )
    base = W4AxLinear(**fmt)
    chunked = tp_quant.ChunkedW4AxLinear(**fmt, n_chunks=n_chunks)
    w = chunked.weight_init(_spec(k, n), jnp.float32)(rng[0])
    w["w_scales"] = jax.random.uniform(rng[1], w["w_scales"].shape, minval=0.01, maxval=0.02)
    perm = jnp.stack([jax.random.permutation(r, kc) for r in jax.random.split(rng[2], n_chunks)])
    perm = perm.astype(jnp.int32)
    x = jax.random.normal(rng[3], (3, 5, k))  # ragged token count
    y = jax.jit(
        lambda w, p, x: chunked.matmul(w, chunked.prepare_input({"perm": p}, x, None, eps=1e-6))
    )(w, perm, x)
    want = 0.0
    for c in range(n_chunks):
        w_c = {
            "w_packed": w["w_packed"][:, c * kc // 2 : (c + 1) * kc // 2],
            "w_scales": w["w_scales"]
            if w_group is None
            else w["w_scales"][:, c * kc // w_group : (c + 1) * kc // w_group],
        }
        x_c = x[..., c * kc : (c + 1) * kc]
        want = want + jax.jit(
            lambda w, p, x: base.matmul(w, base.prepare_input({"perm": p}, x, None, eps=1e-6))
        )(w_c, perm[c], x_c)
    if n_chunks == 1:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    else:  # f32 sums of the same two partials, maybe in another association: 1e-6 relative
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_chunked_kernel_path_in_both_activation_layouts(layout):
    """The row-parallel chunked backend on the Pallas kernels (interpret mode) equals its
    simulation with either activation operand (the unpacked one as `act_layout="auto"`
    writes it from 257 rows, its zero pad rows included): each chunk's prepared arrays go
    through `split_static` / `rebuild` and the f32 partials are summed."""
    rng = jax.random.split(jax.random.key(7), 4)
    kc, n, n_chunks = 128, 32, 2
    fmt = dict(k4=96, k8=32, block=32, tile=32, permute=True, n_chunks=n_chunks)
    sim = tp_quant.ChunkedW4AxLinear(**fmt)
    kern = tp_quant.ChunkedW4AxLinear(**fmt, mode="pallas", interpret=True, act_layout=layout)
    w = sim.weight_init(_spec(n_chunks * kc, n), jnp.float32)(rng[0])
    w["w_scales"] = jax.random.uniform(rng[1], w["w_scales"].shape, minval=0.01, maxval=0.02)
    perm = jnp.stack([jax.random.permutation(r, kc) for r in jax.random.split(rng[2], n_chunks)])
    x = jax.random.normal(rng[3], (2, 5, n_chunks * kc))

    def run(be):
        f = lambda w, p, x: be.matmul(w, be.prepare_input({"perm": p}, x, None, eps=1e-6))
        return np.asarray(jax.jit(f)(w, perm.astype(jnp.int32), x))

    np.testing.assert_allclose(run(kern), run(sim), rtol=1e-6, atol=1e-6)


def _spec(k, n):
    from models import ProjSpec

    return ProjSpec(0, "o_proj", k, n, False)


def test_param_specs_table_float_and_quantized():
    cfg = ModelConfig(**{**TINY, "num_layers": 2})
    flt = abstract_params(LlamaForCausalLM(cfg))
    specs = rules.param_specs(flt, cfg, 4)
    layer = specs["layers_0"]
    assert specs["embed_tokens"] == P("tp", None) and specs["lm_head"]["kernel"] == P("tp", None)
    assert layer["q_proj"]["kernel"] == P("tp", None) and layer["k_proj"]["kernel"] == P("tp", None)
    assert layer["o_proj"]["kernel"] == P(None, "tp") and layer["down_proj"]["kernel"] == P(
        None, "tp"
    )
    assert layer["input_norm"] == P() and specs["final_norm"] == P()
    # tp=8 > 4 KV heads: k/v replicated, q still split.
    s8 = rules.param_specs(flt, cfg, 8)["layers_0"]
    assert s8["k_proj"]["kernel"] == P() and s8["q_proj"]["kernel"] == P("tp", None)

    col = W4AxLinear(k4=96, k8=32, block=32, tile=32, permute=True)
    row = tp_quant.ChunkedW4AxLinear(k4=32, k8=32, block=32, tile=32, permute=True, n_chunks=8)
    plan = LinearPlan.from_mapping(
        {(None, "attn_in"): col, (None, "mlp_in"): col, (None, "o_in"): row, (None, "down_in"): row}
    )
    q = abstract_params(LlamaForCausalLM(cfg, linear=plan))
    ql = rules.param_specs(q, cfg, 2)["layers_1"]
    assert ql["q_proj"]["w_packed"] == P("tp", None) and ql["q_proj"]["w_scales"] == P("tp")
    assert ql["o_proj"]["w_packed"] == P(None, "tp") and ql["o_proj"]["w_scales"] == P()
    assert ql["o_in"]["perm"] == P("tp", None) and ql["attn_in"]["perm"] == P()
    assert q["layers_1"]["o_in"]["perm"].shape == (8, 64)
    o_in = W4AxLinear(k4=384, k8=128, block=32, tile=32, permute=True)
    chunked = tp_quant.chunk_row_backends(LinearPlan.from_mapping({(None, "o_in"): o_in}), cfg, 4)
    assert chunked.backend_for(1, "o_proj") == tp_quant.ChunkedW4AxLinear(
        k4=96, k8=32, block=32, tile=32, permute=True, n_chunks=4
    )  # K=512 -> 4 chunks of 128, 32 INT8 channels each (25%, as before)
    rows = rules.spec_table(q, cfg, 2)
    assert all(not r[0].startswith("layers_1") for r in rows)


def test_mesh_and_distributed_arguments():
    with pytest.raises(ValueError, match="tp=0"):
        mesh_lib.make_mesh(0)
    with pytest.raises(ValueError, match="exceeds"):
        mesh_lib.make_mesh(len(jax.devices()) + 1)
    assert mesh_lib.make_mesh(1).shape == {"tp": 1}
    with pytest.raises(ValueError, match="give all three"):
        mesh_lib.initialize_distributed(coordinator_address="localhost:1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    if env == dict(os.environ) and "COMET_COORDINATOR" not in os.environ:
        assert mesh_lib.initialize_distributed() is False  # single process: no-op


# ---- the 8-device equality test -------------------------------------------------------------


def _fake_stats(cfg, seed=0):
    """Calibration statistics with a few outlier channels per input (the FMPQ plans use them)."""
    from comet_jax.calibrate.stats import CalibStats, GroupStats

    rng = np.random.default_rng(seed)
    groups = {}
    for i in range(cfg.num_layers):
        for g, spec in layer_specs(cfg, i).items():
            k = spec.in_features
            a = rng.uniform(0.5, 1.5, k)
            a[rng.choice(k, 3, replace=False)] *= 30
            groups[(i, g)] = GroupStats(a.astype(np.float32), (a / 3).astype(np.float32))
    return CalibStats(groups, 64, 1, 64)


def _greedy_step(model):
    """(params, cache, StepInputs) -> ((logits [B, V] of each row's last token, greedy ids [B]),
    cache): the engine step's model call (paged KV cache) without the sampler."""
    from comet_jax.engine.runner import PagedState

    def step(params, cache, inp):
        t = inp.tokens.shape[1]
        positions = inp.start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        state = PagedState(cache, inp.page_table, inp.start, inp.num_valid)
        logits, state = model.apply(
            {"params": params},
            inp.tokens,
            positions,
            cache=state,
            logits_at=jnp.maximum(inp.num_valid - 1, 0),
        )
        return (logits[:, 0], jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)), state.cache

    return step


def _generate(step, params, cache, prompt, pages, n_new):
    """Greedy decoding: one prefill step, then n_new - 1 decode steps.

    Returns (logits [B, n_new, V] f32, tokens [B, n_new] int32). `step` returns either
    (tokens, cache) (the engine's) or ((logits, tokens), cache) (`_greedy_step`).
    """
    from comet_jax.engine.runner import StepInputs

    b, t = prompt.shape
    inp = StepInputs.zeros(b, t, pages.shape[1])._replace(
        tokens=prompt, num_valid=np.full(b, t, np.int32), page_table=pages
    )
    logits, tokens = [], []
    for i in range(n_new):
        out, cache = step(params, cache, inp)
        lg, tok = out if isinstance(out, tuple) else (None, out)
        logits.append(None if lg is None else np.asarray(lg))
        tokens.append(np.asarray(tok))
        inp = StepInputs.zeros(b, 1, pages.shape[1])._replace(
            tokens=tokens[-1][:, None],
            start=np.full(b, t + i, np.int32),
            num_valid=np.ones(b, np.int32),
            page_table=pages,
        )
    stacked = None if logits[0] is None else np.stack(logits, axis=1)
    return stacked, np.stack(tokens, axis=1)


def _setup(mode="sim"):
    """Tiny float model, its FMPQ W4AxKV4 conversion for up to 8-way TP, and a prompt."""
    from comet_jax.quant.convert import quantized_model
    from comet_jax.quant.recipe import preset
    from models import init_params

    cfg = ModelConfig(**TINY)
    float_model = LlamaForCausalLM(cfg)
    params = init_params(float_model, jax.random.key(0))
    recipe = preset("fmpq_w4axkv4", w_quantizer="rtn", tile=32, fmpq=FMPQConfig(block_size=32))
    qparams, plan, _ = tp_quant.quantize_model_tp(
        cfg,
        params,
        recipe,
        _fake_stats(cfg),
        n_chunks=N_DEVICES,
        mode=mode,
        interpret=mode == "pallas",
    )
    prompt = np.asarray(
        jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size), np.int32
    )  # 11 tokens: not a multiple of the 16-token page
    pages = np.array([[1, 2], [3, 4]], np.int32)
    bf16 = float_model.clone(dtype=jnp.bfloat16)
    cases = (
        ("float", float_model, params, "bf16", FLOAT_ATOL),
        ("w4axkv4", quantized_model(cfg, recipe, plan), qparams, "int4", QUANT_ATOL),
        ("bf16", bf16, params, "bf16", BF16_ATOL),
    )
    return cfg, cases, prompt, pages


def _cache_config(cfg, kv_dtype):
    from comet_jax.engine import kv_cache

    return kv_cache.KVCacheConfig(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        page_size=16,
        num_pages=6,
        group_size=64,
        dtype=kv_dtype,
    )


def _equality_body(
    meshes=(1, 2, 4, 8), engine_step=False, kernels="reference", names=("float", "w4axkv4")
):
    """Float and FMPQ W4AxKV4 tiny models on meshes of `meshes` devices vs one device: logits
    of the prefill and 3 decode steps (paged KV cache) within tolerance, greedy tokens equal.
    engine_step: run the engine's own step (with its sampler; tokens only).
    kernels="pallas": the quantized model only, Pallas kernels in interpret mode (shard_map
    around the W4Ax GEMM, the fused activation quantizer and the paged KV4 attention); the
    reference is the same kernels on one device."""
    from comet_jax.engine import kv_cache
    from comet_jax.engine.runner import PagedAttention, make_step_fn
    from comet_jax.parallel import sharded_runner as sr

    if jax.device_count() < max(meshes):
        raise RuntimeError(f"{_NO_DEVICES}: {jax.devices()}")
    t0 = time.time()
    pallas = kernels == "pallas"
    cfg, cases, prompt, pages = _setup("pallas" if pallas else "sim")
    make = make_step_fn if engine_step else _greedy_step
    for name, model, p, kv_dtype, atol in cases:
        if name not in names or (pallas and name != "w4axkv4"):
            continue
        ccfg = _cache_config(cfg, kv_dtype)
        paged = model.clone(attention=PagedAttention(kernels, interpret=pallas))
        ref_logits, ref_tokens = _generate(
            jax.jit(make(paged)), p, kv_cache.init_cache(ccfg), prompt, pages, 4
        )
        for d in meshes:
            mesh = mesh_lib.make_mesh(d)
            sp = sr.shard_params(p, cfg, mesh)
            cache = sr.init_sharded_cache(ccfg, mesh)
            step = sr.jit_step(make(sr.shard_model(paged, mesh)), mesh, sp, cache, cfg)
            logits, tokens = _generate(step, sp, cache, prompt, pages, 4)
            msg = ""
            if logits is not None:
                err = float(np.max(np.abs(logits - ref_logits)))
                assert err <= atol, (name, d, err)
                msg = f"max|dlogits|={err:.2e}, "
            np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{name} tp={d}")
            print(f"{name} tp={d}: {msg}tokens equal ({time.time() - t0:.0f}s)")


def _in_subprocess(call: str):
    """Runs `tests.test_parallel.<call>` with 8 simulated CPU devices in a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    code = f"import tests.test_parallel as t; t.{call}"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    print(r.stdout)
    if r.returncode and _NO_DEVICES in r.stderr:
        pytest.skip(f"could not start {N_DEVICES} simulated devices in a subprocess")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]


def test_meshes_1_2_4_8_equal_single_device():
    if jax.device_count() >= N_DEVICES:
        _equality_body()
    else:
        _in_subprocess("_equality_body()")


@pytest.mark.slow
def test_bf16_and_engine_step_on_mesh():
    """bf16 compute (logits + tokens), and the engine's own step function (sampler included,
    tokens only) for the f32 and W4AxKV4 models, on 2- and 8-device meshes."""
    for kwargs in (dict(meshes=(2, 8), names=("bf16",)), dict(meshes=(2, 8), engine_step=True)):
        if jax.device_count() >= N_DEVICES:
            _equality_body(**kwargs)
        else:
            _in_subprocess(f"_equality_body(**{kwargs!r})")


def _runner_body(tp=2):
    """`ModelRunner(..., mesh=...)` (the engine's runner) vs the single-device runner."""
    from comet_jax.engine.runner import ModelRunner, PagedAttention

    if jax.device_count() < tp:
        raise RuntimeError(f"{_NO_DEVICES}: {jax.devices()}")
    cfg, cases, prompt, pages = _setup()
    for name, model, p, kv_dtype, _ in cases[:2]:
        paged = model.clone(attention=PagedAttention("reference"))
        ccfg = _cache_config(cfg, kv_dtype)
        tokens = []
        for mesh in (None, mesh_lib.make_mesh(tp)):
            r = ModelRunner(paged, p, ccfg, mesh=mesh)
            tokens.append(
                _generate(
                    lambda _p, _c, inp, r=r: (r.run(inp), None), None, None, prompt, pages, 3
                )[1]
            )
        np.testing.assert_array_equal(tokens[1], tokens[0], err_msg=f"{name} runner tp={tp}")
        print(f"{name}: ModelRunner tp={tp} tokens equal")


@pytest.mark.slow
def test_model_runner_mesh_option():
    import inspect

    from comet_jax.engine.runner import ModelRunner

    if "mesh" not in inspect.signature(ModelRunner).parameters:
        pytest.skip("comet_jax.engine.runner.ModelRunner has no mesh option yet")
    if jax.device_count() >= N_DEVICES:
        _runner_body()
    else:
        _in_subprocess("_runner_body()")


@pytest.mark.slow
def test_pallas_kernels_on_mesh():
    """Pallas W4Ax GEMM / act-quant / paged KV4 attention (interpret mode) under shard_map."""
    if jax.device_count() >= N_DEVICES:
        _equality_body(meshes=(2,), kernels="pallas")
    else:
        _in_subprocess('_equality_body(meshes=(2,), kernels="pallas")')


if __name__ == "__main__":  # XLA_FLAGS=--xla_force_host_platform_device_count=8 python ...
    _equality_body()


def test_shard_plan_turns_fused_projections_off_across_devices():
    """W4AxLinear.fuse_projections concatenates an input group's weights: a one-device form,
    so shard_plan turns it off on a mesh of 2 (where q / k / v stay plain or are wrapped) and
    keeps it on one device. A stand-in mesh: shard_plan reads only its axis sizes."""
    import dataclasses

    from comet_jax.engine.runner import precision_plan
    from comet_jax.parallel.sharded_runner import shard_plan
    from models import PROJECTIONS_OF

    cfg = ModelConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64,
    )  # fmt: skip
    plan = precision_plan(cfg, "w4axkv4", fuse_projections=True)

    def fused(p, layer, proj):
        b = p.backend_for(layer, proj)
        return getattr(b, "inner", b).fuse_projections

    @dataclasses.dataclass(frozen=True)
    class StandIn:  # hashable, as the backends holding it must be
        d: int

        @property
        def shape(self):
            return {mesh_lib.TP_AXIS: self.d}

    for d, want in ((1, True), (2, False)):
        mesh = StandIn(d)
        sharded = shard_plan(plan, cfg, mesh)
        for layer in range(cfg.num_layers):
            assert all(fused(sharded, layer, p) == want for p in PROJECTIONS_OF["attn_in"])
