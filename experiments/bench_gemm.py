"""W4Ax GEMM benchmark: correctness on the device, config tuning, ablations, the model sweep.

    PYTHONPATH=. python3 experiments/bench_gemm.py --check --tune --ablate --sweep \
        --out $OUT [--budget-s 500] [--quick]

Every timed row measures its baselines in the same run: XLA bf16 ``jnp.dot`` (cuBLAS),
XLA int8 ``dot_general`` with ``[N, K]`` weights (contract last axes, int32 accumulation),
and the W4A8 case of our own kernel (K4 = 0). Times are medians over repeated jitted calls
that rotate through several weight copies (>= 256 MiB in all where that fits in 8 copies) so
decode shapes are not served from L2. Writes ``gemm_<date>.json`` and ``gemm_<date>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import act_quant as aq_mod
from pallas_kernels import timing, tuning
from pallas_kernels.act_quant import act_quant, act_quant_reference, to_unpacked
from pallas_kernels.w4ax_matmul import (
    UNPACKED_ROW_ALIGN,
    GemmConfig,
    dequantized_matmul,
    w4ax_accumulators,
    w4ax_accumulators_reference,
    w4ax_matmul,
    w4ax_matmul_reference,
    w4ax_matmul_unpacked,
    w4ax_matmul_unpacked_reference,
    w4ax_swiglu_unpacked,
)

M_VALUES = (1, 4, 16, 64, 256, 1024, 4096)
SMOKE = False  # --smoke: tiny shapes in interpret mode on the CPU (tests the script itself)
FRACS = (0.0, 0.125, 0.25)
_DOT_LAST = (((1,), (1,)), ((), ()))


def log(*a):
    print(*a, flush=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def n_copies(bytes_per_copy: int, m: int) -> int:
    """Distinct weight copies per timed call: >= 256 MiB of weights (out of L2) and, for
    small shapes, up to 32 ops per call so the host dispatch/sync (~0.1 ms) adds <= ~3 us."""
    if m >= 1024:
        return 2
    return int(
        max(
            2,
            min(32, (1 << 30) // bytes_per_copy, max(math.ceil((256 << 20) / bytes_per_copy), 16)),
        )
    )


# ------------------------------------------------------------------------------------------
# correctness on the device
# ------------------------------------------------------------------------------------------


def check(results):
    key = jax.random.PRNGKey(1)
    cases = [  # m, n, k, k8, config, group
        (1, 4096, 4096, 1024, None, None),
        (16, 14336, 4096, 512, None, None),
        (64, 4096, 14336, 3584, None, None),
        (33, 1024, 2048, 512, GemmConfig(16, 64, 4, 4, 4, True, 1), None),
        (256, 4096, 4096, 1024, None, None),
        (300, 2048, 4096, 0, GemmConfig(128, 128, 1, 8, 3, False, 8), None),
        (1000, 4096, 4096, 4096, None, None),
        (4096, 4096, 4096, 1024, None, None),
        (64, 4096, 4096, 1024, None, 128),
        (512, 4096, 4096, 1024, GemmConfig(128, 128, 2, 8, 3, False, 8), 256),
    ]
    aq_cases = [
        (64, 4096, 3072, True, 1.0),
        (7, 14336, 12288, True, 0.9),
        (300, 4096, 4096, False, 1.0),
        (5, 4096, 0, True, 0.85),
    ]
    if SMOKE:
        cases = [
            (3, 64, 256, 128, GemmConfig(16, 32, 2, 4, 2, True, 1), None),
            (20, 64, 256, 128, GemmConfig(16, 32, 1, 4, 2, False, 2), 128),
        ]
        aq_cases = [(3, 256, 128, True, 0.9)]
    ok = True
    for i, (m, n, k, k8, cfg, g) in enumerate(cases):
        ops = tuning.random_operands(jax.random.fold_in(key, i), m, n, k, k8, group_size=g)
        bias = jax.random.normal(jax.random.fold_in(key, 100 + i), (n,), jnp.float32) * 0.1
        cfg_used = cfg or tuning.get_config(m, n, k, k8)
        a4, a8 = w4ax_accumulators(ops[0], ops[1], ops[3], config=cfg_used, interpret=SMOKE)
        r4, r8 = w4ax_accumulators_reference(ops[0], ops[1], ops[3])
        exact = bool(jnp.all(a4 == r4)) and bool(jnp.all(a8 == r8))
        y = w4ax_matmul(*ops, bias, config=cfg_used, interpret=SMOKE)
        yr = w4ax_matmul_reference(*ops, bias, out_dtype=jnp.float32)
        yd = dequantized_matmul(*ops) + bias
        e_ref, e_deq = rel_err(y.astype(jnp.float32), yr), rel_err(y.astype(jnp.float32), yd)
        good = exact and e_ref < 1e-2 and e_deq < 1e-2
        ok &= good
        row = dict(
            m=m,
            n=n,
            k=k,
            k8=k8,
            group=g,
            config=cfg_used.to_dict(),
            int_exact=exact,
            rel_err_ref=e_ref,
            rel_err_deq=e_deq,
            ok=good,
        )
        results["check"].append(row)
        log(
            f"check gemm {m}x{n}x{k} k8={k8} g={g} {cfg_used}: exact={exact} "
            f"err_ref={e_ref:.2e} err_deq={e_deq:.2e} {'OK' if good else 'FAIL'}"
        )
    for i, (m, k, k4, norm, clip) in enumerate(aq_cases):
        kx = jax.random.fold_in(key, 500 + i)
        x = (jax.random.normal(kx, (m, k), jnp.float32) * 2).astype(jnp.bfloat16)
        perm = jax.random.permutation(jax.random.fold_in(kx, 1), k).astype(jnp.int32)
        w = jax.random.uniform(jax.random.fold_in(kx, 2), (k,), jnp.float32, 0.5, 1.5)
        w = w if norm else None
        a = act_quant(x, perm, k4, norm_weight=w, clip4=clip, clip8=1.0, interpret=SMOKE)
        r = act_quant_reference(x, perm, k4, norm_weight=w, clip4=clip, clip8=1.0)
        diffs = [int(jnp.sum(u != v)) for u, v in zip(a, r)]
        # The accuracy contract: the kernel on the GPU against the reference on the CPU
        # (where the accuracy tables are computed).
        rc = cpu_act_quant_reference(x, perm, k4, norm_weight=w, clip4=clip, clip8=1.0)
        diffs_cpu = [int(np.sum(np.asarray(u) != v)) for u, v in zip(a, rc)]
        # With RMSNorm the f32 statistic mean(x^2) is reduced in a different order on the
        # CPU and the GPU: reported, not required equal.
        good = norm or all(d == 0 for d in diffs_cpu)
        ok &= good
        results["check"].append(
            dict(
                kernel="act_quant",
                m=m,
                k=k,
                k4=k4,
                norm=norm,
                mismatches_vs_device_xla=diffs,
                mismatches_vs_cpu=diffs_cpu,
                ok=good,
            )
        )
        log(
            f"check act_quant {m}x{k} k4={k4} norm={norm} clip={clip}: mismatches "
            f"(x4, x8, scales) vs XLA on device {diffs}, vs CPU reference {diffs_cpu} "
            f"{'OK' if good else 'FAIL'}"
        )
    return ok


def cpu_act_quant_reference(x, perm, k4, **kw):
    """act_quant_reference evaluated by XLA on the host CPU; numpy outputs."""
    cpu = jax.devices("cpu")[0]
    args = [jax.device_put(np.asarray(v), cpu) for v in (x, perm)]
    for name in ("norm_weight", "gate"):
        if kw.get(name) is not None:
            kw = dict(kw, **{name: jax.device_put(np.asarray(kw[name]), cpu)})
    with jax.default_device(cpu):
        return [np.asarray(o) for o in act_quant_reference(*args, k4, **kw)]


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def _ours_sets(m, n, k, k8, reps, seed=0, group=None):
    key = jax.random.PRNGKey(seed)
    return [
        tuning.random_operands(jax.random.fold_in(key, i), m, n, k, k8, group_size=group)
        for i in range(reps)
    ]


def time_ours(m, n, k, k8, config=None, sets=None, group=None):
    reps = n_copies(n * k // 2, m)
    sets = sets or _ours_sets(m, n, k, k8, reps, group=group)
    f = functools.partial(w4ax_matmul, config=config, interpret=SMOKE)
    return tuning.time_fn(f, sets)


def time_bf16(m, n, k):
    reps = n_copies(n * k * 2, m)
    key = jax.random.PRNGKey(7)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    sets = [
        (x, jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16))
        for i in range(reps)
    ]
    return tuning.time_fn(lambda a, b: jnp.dot(a, b), sets)


def time_int8(m, n, k):
    reps = n_copies(n * k, m)
    key = jax.random.PRNGKey(8)
    x = jax.random.randint(key, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    sets = [
        (
            x,
            jax.random.randint(jax.random.fold_in(key, i), (n, k), -127, 128, jnp.int32).astype(
                jnp.int8
            ),
        )
        for i in range(reps)
    ]
    f = lambda a, b: jax.lax.dot_general(a, b, _DOT_LAST, preferred_element_type=jnp.int32)
    return tuning.time_fn(f, sets)


def timing_study(results):
    """The old wall-clock measure (one synced dispatch of all copies) against device time
    (slope of an in-jit loop): how much of the old numbers was host overhead."""
    rows = results.setdefault("timing_study", [])
    cases = [(16, 14336, 4096), (16, 4096, 4096), (64, 8192, 8192), (4096, 4096, 4096)]
    if SMOKE:
        cases = [(2, 64, 256)]
    for m, n, k in cases:
        k8 = tuning.int8_fraction_k8(k, 0.25)
        row = dict(m=m, n=n, k=k, k8=k8)
        sets = _ours_sets(m, n, k, k8, n_copies(n * k // 2, m))
        f = functools.partial(w4ax_matmul, interpret=SMOKE)
        row["ours_dispatch_us"] = timing.dispatch_time(f, sets) * 1e6
        info: dict = {}
        row["ours_device_us"] = timing.device_time(f, sets, info=info) * 1e6
        row["ours_kernels"] = info.get("kernel_us")
        key = jax.random.PRNGKey(7)
        xb = jax.random.normal(key, (m, k), jnp.bfloat16)
        bsets = [
            (xb, jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16))
            for i in range(n_copies(n * k * 2, m))
        ]
        row["bf16_dispatch_us"] = timing.dispatch_time(jnp.dot, bsets) * 1e6
        row["bf16_device_us"] = timing.device_time(jnp.dot, bsets) * 1e6
        rows.append(row)
        log(f"timing {json.dumps(row)}")


def act_quant_study(results):
    """Fused activation quantization: the kernel (a few launches) vs the XLA reference,
    bit-exactness on the device, decode and prefill M, the 8B layer widths."""
    rows = results.setdefault("act_quant", [])
    cases = [  # m, k, k4, norm
        (1, 4096, 3072, True),
        (16, 4096, 3072, True),
        (64, 4096, 3072, True),
        (256, 4096, 3072, True),
        (4096, 4096, 3072, True),
        (16, 14336, 10752, False),
        (256, 14336, 10752, False),
        (4096, 14336, 10752, False),
    ]
    if SMOKE:
        cases = [(3, 256, 128, True)]
    key = jax.random.PRNGKey(11)
    for i, (m, k, k4, norm) in enumerate(cases):
        kx = jax.random.fold_in(key, i)
        x = (jax.random.normal(kx, (m, k), jnp.float32) * 2).astype(jnp.bfloat16)
        perm = jax.random.permutation(jax.random.fold_in(kx, 1), k).astype(jnp.int32)
        w = jax.random.uniform(jax.random.fold_in(kx, 2), (k,), jnp.float32, 0.5, 1.5)
        w = w if norm else None
        ref = functools.partial(act_quant_reference, perm=perm, k4=k4, norm_weight=w)
        row = dict(m=m, k=k, k4=k4, norm=norm)
        r = cpu_act_quant_reference(x, perm, k4, norm_weight=w)
        variants = {"default": {}}
        if not SMOKE:
            variants.update(
                {"rows2": dict(rows_per_program=2), "rows4": dict(rows_per_program=4)}
                if m >= 64
                else {"warps8": dict(num_warps=8)}
            )
        for name, kw in variants.items():
            f = functools.partial(act_quant, perm=perm, k4=k4, norm_weight=w, interpret=SMOKE, **kw)
            try:
                a = f(x)
                row[f"{name}_mismatch"] = [int(np.sum(np.asarray(u) != v)) for u, v in zip(a, r)]
                row[f"{name}_us"] = timing.device_time(f, [(x,)]) * 1e6
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        row["xla_us"] = timing.device_time(ref, [(x,)]) * 1e6
        rows.append(row)
        log(f"act_quant {json.dumps(row)}")


def _within_budget(name, cases, deadline):
    """Yields (index, case) until ``deadline`` (time.time()) passes, logging the first case
    left out."""
    for i, case in enumerate(cases):
        if time.time() > deadline:
            log(f"{name}: budget reached before {case}")
            return
        yield i, case


def swiglu_study(results, deadline):
    """The down projection's input (LLaMA-3-8B: K = 14336, 25% INT8, unpacked layout):
    XLA's SwiGLU fusion writing the hidden state, then act_quant gathering it through an
    index array (the engine until now) or reading it contiguously (``perm=None``, the folded
    permutation), against act_quant reading gate and up itself (``gate=``). Per case: the
    fused bytes against the CPU reference of the same hidden state (mismatching elements:
    silu's last bits, see pallas_kernels/act_quant.py) and against the unfused kernel's on
    the device; device time of each variant (XLA's fusion included where it runs)."""
    from pallas_kernels.act_quant import swiglu
    from pallas_kernels.w4ax_matmul import UNPACKED_ROW_ALIGN

    rows = results.setdefault("swiglu", [])
    cases = [(1214, 14336, 10752), (8192, 14336, 10752), (1214, 4096, 3072)]
    key = jax.random.PRNGKey(21)
    for i, (m, k, k4) in _within_budget("swiglu", [(5, 256, 128)] if SMOKE else cases, deadline):
        kx = jax.random.fold_in(key, i)
        sets = []
        for j in range(2):  # two input sets: the second call does not find the first in L2
            kj = jax.random.fold_in(kx, j)
            up = jax.random.normal(kj, (m, k), jnp.float32).astype(jnp.bfloat16)
            gate = (2 * jax.random.normal(jax.random.fold_in(kj, 1), (m, k), jnp.float32)).astype(
                jnp.bfloat16
            )
            sets.append((up, gate))
        arange = jnp.arange(k, dtype=jnp.int32)
        kw = dict(k4=k4, layout="unpacked", row_align=UNPACKED_ROW_ALIGN, interpret=SMOKE)
        aq = functools.partial(act_quant, **kw)
        variants = {
            "unfused_gather": lambda u, g, aq=aq, p=arange: aq(swiglu(g, u), p),
            "unfused_identity": lambda u, g, aq=aq: aq(swiglu(g, u), None),
            "fused": lambda u, g, aq=aq: aq(u, None, gate=g),
        }
        row = dict(m=m, k=k, k4=k4)
        up, gate = sets[0]
        want = cpu_act_quant_reference(  # of XLA's hidden state, computed on the device
            swiglu(gate, up), np.arange(k, dtype=np.int32), k4, layout="unpacked",
            row_align=UNPACKED_ROW_ALIGN,
        )  # fmt: skip
        outs = {}
        for name, fn in variants.items():
            try:
                outs[name] = [np.asarray(o) for o in jax.jit(fn)(up, gate)]
                row[f"{name}_mismatch_vs_cpu"] = [
                    int(np.sum(a != b)) for a, b in zip(outs[name], want)
                ]
                row[f"{name}_us"] = timing.device_time(fn, sets) * 1e6
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        if "fused" in outs and "unfused_identity" in outs:
            a, b = outs["fused"][0].astype(np.int32), outs["unfused_identity"][0].astype(np.int32)
            row["fused_vs_unfused_elements"] = int(np.sum(a != b))
            row["fused_vs_unfused_max_diff"] = int(np.abs(a - b).max())
        rows.append(row)
        log(f"swiglu {json.dumps(row)}")


def gate_up_study(results, deadline):
    """The MLP between the mlp_in and down_in quantizations, as the engine runs it at its
    large M (act_quant's unpacked operand in, the down projection's unpacked operand out;
    LLaMA-3-8B: gate / up 14336 x 4096, down K = 14336, 25% INT8 on both sides, the down
    input's permutation folded away): "separate" = the gate and up GEMMs (the tuning table's
    schedules) and ``act_quant(up, gate=gate)``; "fused" = ``w4ax_swiglu_unpacked`` (one
    Mosaic GPU kernel writing silu(gate) * up) and ``act_quant(hidden)``. Checks on the
    device: the fused hidden state against ``act_quant.swiglu`` of the separate GEMMs'
    outputs (elements that differ: the GPU's exp against XLA's, by one bf16 ulp where a value
    sits on a rounding boundary) and against the f32 reference (within one bf16 rounding of
    each GEMM and of the product); the down operands' bytes of the two paths. Device time of
    both paths (weights rotated over enough copies to leave L2) and of their GEMM parts."""
    rows = results.setdefault("gate_up", [])
    cases = [(5, 256, 256)] if SMOKE else [(1216, 14336, 4096), (8192, 14336, 4096)]
    for case in _gemm_input_cases("gate_up", cases, 41, deadline):
        row = _gate_up_case(*case)
        rows.append(row)
        log(f"gate_up {json.dumps(row)}")


def _gate_up_case(m, n, k, k8, kx, x, perm) -> dict:
    """One case of :func:`gate_up_study`."""
    from pallas_kernels.act_quant import swiglu

    k4 = k - k8
    k8d = tuning.int8_fraction_k8(n, 0.25)
    x_u, xs = act_quant(
        x, perm, k4, layout="unpacked", row_align=UNPACKED_ROW_ALIGN, interpret=SMOKE
    )
    down_q = functools.partial(
        act_quant, layout="unpacked", row_align=UNPACKED_ROW_ALIGN, interpret=SMOKE
    )
    gemm = functools.partial(w4ax_matmul_unpacked, k4=k4, m=m, interpret=SMOKE)

    def separate_gemms(wg, wsg, wu, wsu):
        return gemm(x_u, xs, wg, wsg), gemm(x_u, xs, wu, wsu)

    def fused_gemm(wg, wsg, wu, wsu):
        return w4ax_swiglu_unpacked(x_u, xs, wg, wsg, wu, wsu, k4=k4, m=m, interpret=SMOKE)

    def separate(*w):
        g, u = separate_gemms(*w)
        return down_q(u, None, n - k8d, gate=g)

    def fused(*w):
        return down_q(fused_gemm(*w), None, n - k8d)

    sets = []
    for j in range(n_copies(2 * n * k // 2, m)):
        wg = tuning.random_operands(jax.random.fold_in(kx, 10 + 2 * j), 1, n, k, k8)[3:5]
        wu = tuning.random_operands(jax.random.fold_in(kx, 11 + 2 * j), 1, n, k, k8)[3:5]
        sets.append((*wg, *wu))
    row = dict(m=m, n=n, k=k, k8=k8, k8_down=k8d)
    try:
        h = jax.jit(fused_gemm)(*sets[0])
        if h is None:
            raise RuntimeError("no w_regs schedule in the tuning table for this shape")
        g, u = jax.jit(separate_gemms)(*sets[0])
        hs = np.asarray(swiglu(g, u)).view(np.uint16)
        hf = np.asarray(h).view(np.uint16)
        row["hidden_elements_differing"] = int(np.sum(hs != hf))
        ulp = np.abs(hs.astype(np.int32) - hf.astype(np.int32))
        row["hidden_max_ulp"] = int(ulp[hs >> 15 == hf >> 15].max(initial=0))
        wg, wsg, wu, wsu = sets[0]
        ref = [
            w4ax_matmul_unpacked_reference(x_u, xs, w, ws, k4=k4, m=m, out_dtype=jnp.float32)
            for w, ws in ((wg, wsg), (wu, wsu))
        ]
        h_ref = np.asarray(jax.nn.silu(ref[0]) * ref[1])
        tol = 2.0**-6 * (np.abs(h_ref) + np.sqrt(np.mean(h_ref**2)))
        row["hidden_bad_vs_f32"] = int(np.sum(~(np.abs(np.asarray(h, np.float32) - h_ref) <= tol)))
        row["hidden_rel_err"] = rel_err(np.asarray(h, np.float32), h_ref)
        qa, qb = jax.jit(separate)(*sets[0]), jax.jit(fused)(*sets[0])
        row["down_operand_bytes_differing"] = int(np.sum(np.asarray(qa[0]) != np.asarray(qb[0])))
        for name, fn in (
            ("separate", separate),
            ("fused", fused),
            ("separate_gemms", separate_gemms),
            ("fused_gemm", fused_gemm),
        ):
            row[f"{name}_us"] = timing.device_time(fn, sets) * 1e6
        row["fused_vs_separate"] = row["separate_us"] / row["fused_us"]
    except Exception as e:  # noqa: BLE001 - the next case still runs
        row["error"] = f"{type(e).__name__}: {e!s:.600}"
    return row


def gather_study(results, deadline):
    """act_quant of a layer input read from the residual stream (RMSNorm fused, K = 4096,
    25% INT8, unpacked layout) under three run-time permutations: a random one (the score
    order of an FMPQ plan), the same channel sets with both segments ascending
    (`fmpq.gather_order`, what `quantize_model` stores), and the identity (contiguous
    loads). Same bytes for the first two up to the order inside each segment (checked
    against the CPU reference); device time of each."""
    from comet_jax.quant import fmpq
    from pallas_kernels.w4ax_matmul import UNPACKED_ROW_ALIGN

    rows = results.setdefault("gather", [])
    cases = [(1214, 4096, 3072), (8192, 4096, 3072)]
    key = jax.random.PRNGKey(31)
    for i, (m, k, k4) in _within_budget("gather", [(5, 256, 128)] if SMOKE else cases, deadline):
        kx = jax.random.fold_in(key, i)
        sets = [
            ((2 * jax.random.normal(jax.random.fold_in(kx, j), (m, k))).astype(jnp.bfloat16),)
            for j in range(2)
        ]
        w = jax.random.uniform(jax.random.fold_in(kx, 9), (k,), jnp.float32, 0.5, 1.5)
        rand = np.asarray(jax.random.permutation(jax.random.fold_in(kx, 7), k), np.int32)
        perms = {
            "random": rand,
            "sorted": rand[fmpq.gather_order(rand, k - k4)],
            "identity": None,
        }
        row = dict(m=m, k=k, k4=k4)
        (x,) = sets[0]
        for name, perm in perms.items():
            p = None if perm is None else jnp.asarray(perm)
            fn = functools.partial(
                act_quant, perm=p, k4=k4, norm_weight=w, layout="unpacked",
                row_align=UNPACKED_ROW_ALIGN, interpret=SMOKE,
            )  # fmt: skip
            try:
                got = [np.asarray(o) for o in fn(x)]
                ref_perm = np.arange(k, dtype=np.int32) if perm is None else perm
                want = cpu_act_quant_reference(
                    x, ref_perm, k4, norm_weight=w, layout="unpacked",
                    row_align=UNPACKED_ROW_ALIGN,
                )  # fmt: skip
                row[f"{name}_mismatch_vs_cpu"] = [int(np.sum(a != b)) for a, b in zip(got, want)]
                row[f"{name}_us"] = timing.device_time(fn, sets) * 1e6
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(f"gather {json.dumps(row)}")


def _gemm_input_cases(name, cases, seed, deadline):
    """Per ``(m, n, k)`` case until ``deadline``: ``(m, n, k, k8, key, x, perm)`` with 25%
    INT8 channels, random bf16 activations ``x [m, k]`` and a random FMPQ permutation."""
    key = jax.random.PRNGKey(seed)
    for i, (m, n, k) in enumerate(cases):
        if time.time() > deadline:
            log(f"{name}: budget reached before {m}x{n}x{k}")
            return
        kx = jax.random.fold_in(key, i)
        x = (jax.random.normal(kx, (m, k), jnp.float32) * 2).astype(jnp.bfloat16)
        perm = jax.random.permutation(jax.random.fold_in(kx, 1), k).astype(jnp.int32)
        yield m, n, k, tuning.int8_fraction_k8(k, 0.25), kx, x, perm


def _engine_gemm(aq, k4, m):
    """``f(x, w_packed, w_scales)``: the engine's large-M path, act_quant (``aq``) writing
    the unpacked operand and the Mosaic GPU kernel's factors (``kernel_scales``) into
    ``w4ax_matmul_unpacked`` with ``m`` real rows."""

    def f(x, wp, ws):
        x_u, xs, rs = aq(x, layout="unpacked", row_align=UNPACKED_ROW_ALIGN, kernel_scales=True)
        return w4ax_matmul_unpacked(x_u, xs, wp, ws, k4=k4, m=m, interpret=SMOKE, rs=rs)

    return f


def _weight_sets(kx, x, n, k, k8, m):
    """``(x, w_packed, w_scales)`` argument sets over enough weight copies to rotate L2."""
    return [
        (x, *tuning.random_operands(jax.random.fold_in(kx, 10 + j), 1, n, k, k8)[3:])
        for j in range(n_copies(n * k // 2, m))
    ]


def unpacked_study(results, deadline):
    """Activations into the GEMM: act_quant's packed layout + the GEMM wrapper's XLA unpack /
    concat / row pad (the engine until now) against act_quant writing the unpacked operand
    that the tuned large-M configs read directly (``layout="unpacked"``). Per case: the two
    act_quant outputs compared byte for byte on the device, the two GEMM outputs compared
    element for element (same kernel on the same integers: expected equal) and against the
    XLA reference; device time of each pair (act_quant + GEMM, rotating weight copies) with
    XLA bf16 and int8 dots of the same shape in the same run."""
    rows = results.setdefault("unpacked", [])
    shapes = ((4096, 4096), (14336, 4096), (4096, 14336))  # q/o, gate/up, down (8B)
    cases = [(m, n, k) for m in (512, 1214, 8192) for n, k in shapes]
    if SMOKE:
        cases = [(300, 64, 256)]
    for m, n, k, k8, kx, x, perm in _gemm_input_cases("unpacked", cases, 21, deadline):
        k4 = k - k8
        norm = k == 4096  # the norm-fused inputs (qkv, gate/up) are 4096 wide in the 8B
        w = jax.random.uniform(jax.random.fold_in(kx, 2), (k,), jnp.float32, 0.5, 1.5)
        w = w if norm else None
        aq = functools.partial(act_quant, perm=perm, k4=k4, norm_weight=w, interpret=SMOKE)
        row = dict(m=m, n=n, k=k, k8=k8, norm=norm, config=tuning.get_config(m, n, k, k8).to_dict())
        try:
            packed_ops = aq(x)
            unpacked_ops = aq(x, layout="unpacked", row_align=UNPACKED_ROW_ALIGN)
            want = to_unpacked(*packed_ops, row_align=UNPACKED_ROW_ALIGN)
            row["act_quant_mismatch"] = [int(jnp.sum(a != b)) for a, b in zip(unpacked_ops, want)]

            def packed(x, wp, ws, aq=aq):
                return w4ax_matmul(*aq(x), wp, ws, interpret=SMOKE)

            unpacked = _engine_gemm(aq, k4, m)
            sets = _weight_sets(kx, x, n, k, k8, m)
            y_p, y_u = packed(*sets[0]), unpacked(*sets[0])
            ref = w4ax_matmul_reference(*packed_ops, *sets[0][1:])
            row["max_abs_diff"] = float(jnp.max(jnp.abs(y_p.astype(jnp.float32) - y_u)))
            row["rel_err_ref"] = rel_err(y_u, ref)
            row["packed_us"] = tuning.time_fn(packed, sets) * 1e6
            row["unpacked_us"] = tuning.time_fn(unpacked, sets) * 1e6
            row["act_quant_packed_us"] = tuning.time_fn(aq, [(x,)]) * 1e6
            row["act_quant_unpacked_us"] = (
                tuning.time_fn(
                    functools.partial(aq, layout="unpacked", row_align=UNPACKED_ROW_ALIGN), [(x,)]
                )
                * 1e6
            )
            row["bf16_us"] = time_bf16(m, n, k) * 1e6
            row["int8_us"] = time_int8(m, n, k) * 1e6
        except Exception as e:  # noqa: BLE001 - keep the other cases
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        log(f"unpacked {json.dumps(row)}")


def out_rows_study(results, deadline, ms=None):
    """The engine's large-M path (act_quant's unpacked operand and factors into
    ``w4ax_matmul_unpacked`` with the table's config) at decode-batch M, on the LLaMA-3-8B
    projection shapes (the 4096-wide inputs RMSNorm-fused with bf16 weights, as the
    engine's): act_quant's operand and scales element for element against the library's
    reference evaluated on the host CPU (``to_unpacked``; ``x_scales_max_rel``: a scale may
    differ in its last bit where the two evaluate ``rms_inv`` differently), its factors
    ``rs`` against ``kernel_scales`` of its own scales (exact), every GEMM output element
    against XLA's GEMM on the same operand (f32; within 2^-7 of its magnitude plus the
    output's RMS), the output's shape, and the device time of the call. With M a multiple
    of 8 the Mosaic GPU kernel writes exactly M rows (``w4ax_mgpu.segment_matmul(out_rows=)``);
    otherwise the rows rounded up to 8, then a slice (a copy when the output leaves the jit)."""
    rows = results.setdefault("out_rows", [])
    shapes = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
    cases = [(m, n, k) for m in (ms or (1216, 1214)) for n, k in shapes]
    if SMOKE:
        cases = [(300, 64, 256)]
    for m, n, k, k8, kx, x, perm in _gemm_input_cases("out_rows", cases, 23, deadline):
        k4 = k - k8
        w = None
        if k == 4096 or SMOKE:  # the norm-fused inputs (qkv, gate / up), weights in bf16
            w = jax.random.uniform(jax.random.fold_in(kx, 2), (k,), jnp.float32, 0.5, 1.5)
            w = w.astype(jnp.bfloat16)
        aq = functools.partial(act_quant, perm=perm, k4=k4, norm_weight=w, interpret=SMOKE)
        row = dict(m=m, n=n, k=k, k8=k8, norm=w is not None)
        row["config"] = tuning.get_config(m, n, k, k8).to_dict()
        try:
            got = aq(x, layout="unpacked", row_align=UNPACKED_ROW_ALIGN, kernel_scales=True)
            # the library's arithmetic on the host CPU (XLA on the GPU may round differently)
            ref_ops = cpu_act_quant_reference(x, perm, k4, norm_weight=w)
            want = to_unpacked(*ref_ops, row_align=UNPACKED_ROW_ALIGN)
            # x_u and x_scales against the reference; rs against its definition on the
            # kernel's own scales (exact)
            want = (*want, aq_mod.kernel_scales(got[1]))
            row["act_quant_mismatch"] = [int(jnp.sum(a != b)) for a, b in zip(got, want)]
            row["x_scales_max_rel"] = float(jnp.max(jnp.abs(got[1] / want[1] - 1.0)))
            engine_path = _engine_gemm(aq, k4, m)
            sets = _weight_sets(kx, x, n, k, k8, m)
            y = jax.jit(engine_path)(*sets[0])
            # the GEMM against XLA's on the kernel's own operand (the same integers)
            ref = w4ax_matmul_unpacked_reference(
                got[0], got[1], *sets[0][1:], k4=k4, m=m, out_dtype=jnp.float32
            )
            ref = np.asarray(ref)
            tol = 2.0**-7 * (np.abs(ref) + np.sqrt(np.mean(ref**2)))
            yf = np.asarray(y, np.float32)
            row["shape"] = list(yf.shape)
            row["bad"] = int(np.sum(~(np.abs(yf - ref) <= tol)))
            row["rel_err"] = rel_err(yf, ref)
            row["us"] = tuning.time_fn(engine_path, sets) * 1e6
        except Exception as e:  # noqa: BLE001 - keep the other cases
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        log(f"out_rows {json.dumps(row)}")


def act_quant_launch_study(results, deadline, m=8192, only_gated=False):
    """act_quant's launch (rows per program x warps) at prefill M in the unpacked layout the
    engine uses there, on the LLaMA-3-8B inputs: the attention / MLP inputs (K = 4096, FMPQ
    permutation, RMSNorm), the o projection's input (K = 4096, permutation, no norm) and the
    down projection's (K = 14336, SwiGLU of gate and up, identity order). Each variant's bytes
    against the default launch's on the device (the launch changes no arithmetic), device us
    (one input, L2-resident share: x is 64-235 MB, far past the 50 MB L2)."""
    rows = results.setdefault("act_quant_launch", [])
    cases = [(4096, 3072, True, True, False), (4096, 3072, True, False, False),
             (14336, 10752, False, False, True)]  # fmt: skip
    variants = [(bm, w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]
    if only_gated:  # after the first run: bm 4 / 8 were 1.3-2x slower at K = 4096
        cases, variants = cases[2:], [(bm, w) for bm in (1, 2) for w in (4, 8, 16)]
    if SMOKE:
        m, cases, variants = (
            40,
            [(256, 128, True, True, False), (256, 128, False, False, True)],
            [
                (1, 4),
                (2, 4),
            ],
        )
    key = jax.random.PRNGKey(29)
    for i, (k, k4, permuted, norm, gated) in enumerate(cases):
        kx = jax.random.fold_in(key, i)
        x = (jax.random.normal(kx, (m, k), jnp.float32) * 2).astype(jnp.bfloat16)
        g = (jax.random.normal(jax.random.fold_in(kx, 3), (m, k)) * 2).astype(jnp.bfloat16)
        perm = jax.random.permutation(jax.random.fold_in(kx, 1), k).astype(jnp.int32)
        w = jax.random.uniform(jax.random.fold_in(kx, 2), (k,), jnp.float32, 0.5, 1.5)
        kw = dict(
            perm=perm if permuted else None, k4=k4, norm_weight=w if norm else None,
            layout="unpacked", row_align=UNPACKED_ROW_ALIGN, interpret=SMOKE,
        )  # fmt: skip
        args = (x, g) if gated else (x,)

        def call(*a, kw=kw, **launch):
            return act_quant(a[0], gate=a[1] if len(a) > 1 else None, **kw, **launch)

        row = dict(m=m, k=k, k4=k4, permuted=permuted, norm=norm, gated=gated)
        bm0 = aq_mod.default_rows_per_program(m, k, "unpacked")
        row["default_launch"] = [bm0, aq_mod.default_num_warps(bm0, k)]
        base = call(*args)
        row["default_us"] = tuning.time_fn(call, [args]) * 1e6
        row["bytes_moved_mb"] = (m * k * (2 * len(args) + 1)) / 1e6
        for bm, nw in variants:
            if time.time() > deadline:
                log("act_quant_launch: budget reached")
                break
            lbl = f"bm{bm}_w{nw}"
            f = functools.partial(call, rows_per_program=bm, num_warps=nw)
            try:
                out = f(*args)
                row[f"{lbl}_mismatch"] = [int(jnp.sum(a != b)) for a, b in zip(out, base)]
                row[f"{lbl}_us"] = tuning.time_fn(f, [args]) * 1e6
            except Exception as e:  # noqa: BLE001 - a launch may not compile
                row[f"{lbl}_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(f"act_quant_launch {json.dumps(row)}")


def load_module_file(path: str, name: str = "act_quant_baseline"):
    """A Python file as a module (e.g. ``git show REV:pallas_kernels/act_quant.py > f.py``:
    an earlier build of a kernel, timed beside the current one in the same run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load a module from {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "act_quant", None)):
        raise ValueError(f"{path!r} defines no act_quant()")
    return mod


# act_quant_build_study's cases: name -> (M, K, K4, gated, permutation order of K = 4096)
ACT_QUANT_BUILD_CASES = {
    "2222-stored": (2222, 4096, 3072, False, "stored"),
    "8192-stored": (8192, 4096, 3072, False, "stored"),
    "8192-random": (8192, 4096, 3072, False, "random"),
    "2222-identity": (2222, 4096, 3072, False, "identity"),
    "8192-identity": (8192, 4096, 3072, False, "identity"),
    "2222-swiglu": (2222, 14336, 10752, True, None),
    "8192-swiglu": (8192, 14336, 10752, True, None),
}
ACT_QUANT_BUILD_DEFAULT = "2222-stored,8192-stored,8192-random,2222-swiglu,8192-swiglu"


def act_quant_build_study(
    results, deadline, baseline: str | None = None, cases: str = ACT_QUANT_BUILD_DEFAULT
):
    """act_quant as the engine calls it (unpacked layout, default launch, 25% of K in INT8)
    at the decode batch and a prefill step's M, on the LLaMA-3-8B inputs: the q/k/v and MLP
    input (K = 4096, RMSNorm, an FMPQ permutation stored as checkpoints store it, ascending
    within each segment, in random order, or none: the identity, contiguous loads) and the
    down projection's (K = 14336, SwiGLU of gate and up, identity order). ``cases``: a comma
    list of :data:`ACT_QUANT_BUILD_CASES` names. Variants: this build's default, with
    ``silu_approx`` flipped (SwiGLU cases) or ``scatter`` flipped (permuted cases), and
    ``baseline``, a comma list of earlier act_quant.py files (see :func:`load_module_file`;
    ``baseline_<file stem>``). Per variant: device us (two input
    sets, each past the L2), elements of the INT8 operand that differ from the reference
    evaluated by XLA on the host CPU (and their largest difference in levels), scales that
    differ, and elements that differ from this build's default."""
    from comet_jax.quant import fmpq

    rows = results.setdefault("act_quant_build", [])
    builds = {"default": act_quant}
    for path in [p for p in (baseline or "").split(",") if p]:
        stem = pathlib.Path(path).stem
        builds[f"baseline_{stem}"] = load_module_file(path, f"baseline_{stem}").act_quant
    names = [c for c in cases.split(",") if c]
    unknown = [c for c in names if c not in ACT_QUANT_BUILD_CASES]
    if unknown or not names:
        raise ValueError(
            f"act_quant build cases {unknown or cases!r}: choose from "
            f"{', '.join(ACT_QUANT_BUILD_CASES)}"
        )
    cases = [ACT_QUANT_BUILD_CASES[c] for c in names]
    if SMOKE:  # the same inputs at one tiny shape
        cases = list(dict.fromkeys((5, 256, 128, g, order) for _, _, _, g, order in cases))
    key = jax.random.PRNGKey(43)
    for i, (m, k, k4, gated, order) in _within_budget("act_quant_build", cases, deadline):
        kx = jax.random.fold_in(key, i)
        sets = []
        for j in range(2):
            kj = jax.random.fold_in(kx, j)
            x = (2 * jax.random.normal(kj, (m, k), jnp.float32)).astype(jnp.bfloat16)
            if gated:
                g = 2 * jax.random.normal(jax.random.fold_in(kj, 1), (m, k))
                sets.append((x, g.astype(jnp.bfloat16)))
            else:
                sets.append((x,))
        perm = None
        w = None
        if order in ("stored", "random"):
            perm = jax.random.permutation(jax.random.fold_in(kx, 2), k).astype(jnp.int32)
            if order == "stored":  # as a calibrated checkpoint stores it (ascending segments)
                perm = perm[jnp.asarray(fmpq.gather_order(np.asarray(perm), k - k4))]
        if not gated:
            w = jax.random.uniform(jax.random.fold_in(kx, 3), (k,), jnp.float32, 0.5, 1.5)
            w = w.astype(jnp.bfloat16)  # stored as the engine's model stores it
        kw = dict(k4=k4, norm_weight=w, layout="unpacked", row_align=UNPACKED_ROW_ALIGN)
        ref = cpu_act_quant_reference(
            sets[0][0], np.arange(k, dtype=np.int32) if perm is None else perm,
            gate=sets[0][1] if gated else None, **kw,
        )  # fmt: skip
        kw["perm"] = perm
        variants = {b: functools.partial(fn, interpret=SMOKE, **kw) for b, fn in builds.items()}
        flips = {"silu_approx": aq_mod.SILU_APPROX_DEFAULT} if gated else {}
        if perm is not None:  # the other form of the permuted layout
            flips["scatter"] = aq_mod.UNPACKED_SCATTER
        for arg, default in flips.items():  # this build with one default flipped
            variants[f"{arg}_{not default}"] = functools.partial(
                act_quant, interpret=SMOKE, **{arg: not default}, **kw
            )
        row = dict(m=m, k=k, k4=k4, gated=gated, perm_order=order)
        row["silu_approx_default"] = aq_mod.SILU_APPROX_DEFAULT
        outs = {}
        for name, f in variants.items():
            call = (lambda x, g, f=f: f(x, gate=g)) if gated else f
            try:
                out = [np.asarray(o) for o in jax.jit(call)(*sets[0])]
                d = out[0].astype(np.int32) - ref[0].astype(np.int32)
                row[f"{name}_mismatch"] = int(np.count_nonzero(d))
                levels = np.concatenate([d[:, :k4].ravel() // 16, d[:, k4:].ravel()])
                row[f"{name}_max_level_diff"] = int(np.abs(levels).max())
                row[f"{name}_scale_mismatch"] = int(np.count_nonzero(out[1] != ref[1]))
                if name != "default" and "default" in outs:
                    diff = np.count_nonzero(out[0] != outs["default"])
                    row[f"{name}_vs_default_mismatch"] = int(diff)
                outs[name] = out[0]
                row[f"{name}_us"] = timing.device_time(call, sets) * 1e6
            except Exception as e:  # noqa: BLE001 - report and go on
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        row["bytes_moved_mb"] = m * k * (2 * len(sets[0]) + 1) / 1e6
        if row.get("default_us"):
            row["default_tbps"] = row["bytes_moved_mb"] / row["default_us"]  # MB/us = TB/s
        rows.append(row)
        log(f"act_quant_build {json.dumps(row)}")


def time_copy(nbytes=1 << 30):
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = tuning.time_fn(lambda a: a * 1.0001, [(x,)])
    return 2 * nbytes / t


# ------------------------------------------------------------------------------------------
# tuning subset and ablations
# ------------------------------------------------------------------------------------------


def tune(results, quick, deadline, shapes_name="", ms=()):
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
    ms = ms or ((1, 16, 64, 256, 4096) if quick else M_VALUES)
    if quick:
        shapes = shapes[:3]
    if shapes_name:
        shapes = tuning.ENGINE_SHAPES[shapes_name]
    if SMOKE:
        shapes, ms = [(128, 512)], (1, 300)
    entries = tuning.sweep(
        shapes, ms, (0.25,), quick=quick, log=log, deadline=deadline, interpret=SMOKE
    )
    results["tuning"] = entries
    return entries


def ablate(results, deadline):
    """Each row: one change against the tuned/heuristic config, same shape, same run."""
    rows = []

    def run(name, m, n, k, k8, cfg, group=None):
        if time.time() > deadline:
            return
        try:
            t = time_ours(m, n, k, k8, cfg, group=group)
        except Exception as e:  # noqa: BLE001
            log(f"ablate {name}: failed {type(e).__name__}: {str(e)[:200]}")
            return
        rows.append(
            dict(
                name=name,
                m=m,
                n=n,
                k=k,
                k8=k8,
                group=group,
                config=cfg.to_dict() if cfg else None,
                us=t * 1e6,
            )
        )
        log(f"ablate {name:40s} {m}x{n}x{k} k8={k8}: {t * 1e6:8.1f} us")

    n, k = (128, 512) if SMOKE else (8192, 8192)
    k8 = k // 4
    for m in (16,) if SMOKE else (16, 64):
        base = tuning.get_config(m, n, k, k8)
        run("decode tuned", m, n, k, k8, base)
        run("decode no split-K", m, n, k, k8, GemmConfig(**{**base.to_dict(), "split_k": 1}))
        run("decode no swap_ab", m, n, k, k8, GemmConfig(**{**base.to_dict(), "swap_ab": False}))
        run("decode W4A8 (K4=0)", m, n, k, k, base)
        run("decode W4A4 (K8=0)", m, n, k, 0, base)
        run("decode group scales g=128", m, n, k, k8, base, group=128)
    m = 128 if SMOKE else 4096
    base = tuning.get_config(m, n, k, k8)
    run("prefill tuned", m, n, k, k8, base)
    run(
        "prefill group_m=1 (row-major)", m, n, k, k8, GemmConfig(**{**base.to_dict(), "group_m": 1})
    )
    run("prefill swap_ab", m, n, k, k8, GemmConfig(**{**base.to_dict(), "swap_ab": True}))
    for st in (2, 4):
        run(
            f"prefill num_stages={st}",
            m,
            n,
            k,
            k8,
            GemmConfig(**{**base.to_dict(), "num_stages": st}),
        )
    run("prefill W4A8 (K4=0)", m, n, k, k, base)
    run("prefill W4A4 (K8=0)", m, n, k, 0, base)
    run("prefill group scales g=128", m, n, k, k8, base, group=128)
    m = 256
    base = tuning.get_config(m, n, k, k8)
    run("M=256 tuned", m, n, k, k8, base)
    run(
        "M=256 split_k x2",
        m,
        n,
        k,
        k8,
        GemmConfig(**{**base.to_dict(), "split_k": base.split_k * 2}),
    )
    run("M=256 no split", m, n, k, k8, GemmConfig(**{**base.to_dict(), "split_k": 1}))
    results["ablation"] = rows


# ------------------------------------------------------------------------------------------
# the model sweep
# ------------------------------------------------------------------------------------------


def sweep(results, deadline, quick, models=None, fracs_arg=None, ms=None):
    shapes = []
    for name, lst in tuning.MODEL_SHAPES.items():
        if models and name not in models:
            continue
        for s in lst:
            if s not in shapes:
                shapes.append(s)
    ms = ms or ((1, 16, 64, 256, 4096) if quick else M_VALUES)
    if SMOKE:
        shapes, ms = [(128, 256)], (1, 100)
    rows = results["sweep"]
    for n, k in shapes:
        for m in ms:
            if time.time() > deadline:
                log("sweep: deadline reached")
                return
            try:
                base = dict(
                    m=m,
                    n=n,
                    k=k,
                    bf16_us=time_bf16(m, n, k) * 1e6,
                    int8_us=time_int8(m, n, k) * 1e6,
                    w4a8_us=time_ours(m, n, k, k) * 1e6,
                )
            except Exception as e:  # noqa: BLE001
                log(f"sweep {m}x{n}x{k} baselines failed: {e!s:.200}")
                continue
            fracs = FRACS if (n, k) in tuning.MODEL_SHAPES["llama3-8b"] or not quick else (0.25,)
            fracs = fracs_arg or fracs
            for frac in fracs:
                k8 = tuning.int8_fraction_k8(k, frac)
                try:
                    t = time_ours(m, n, k, k8) * 1e6
                except Exception as e:  # noqa: BLE001
                    log(f"sweep {m}x{n}x{k} frac={frac} failed: {e!s:.200}")
                    continue
                wbytes = n * k / 2
                row = dict(
                    base,
                    frac=frac,
                    k8=k8,
                    w4ax_us=t,
                    config=tuning.get_config(m, n, k, k8).to_dict(),
                    vs_bf16=base["bf16_us"] / t,
                    vs_int8=base["int8_us"] / t,
                    vs_w4a8=base["w4a8_us"] / t,
                    weight_tbps=wbytes / t / 1e6,
                    tops=2 * m * n * k / t / 1e6,
                )
                rows.append(row)
                log(
                    f"sweep {m:5d}x{n:5d}x{k:5d} f={frac:5.3f}: ours {t:8.1f} us  "
                    f"bf16 {base['bf16_us']:8.1f}  int8 {base['int8_us']:8.1f}  "
                    f"w4a8 {base['w4a8_us']:8.1f}  x{row['vs_bf16']:.2f} bf16 "
                    f"x{row['vs_int8']:.2f} int8  {row['weight_tbps']:.2f} TB/s(w)"
                )


LARGE_M_VARIANTS = (  # (label, GemmConfig fields) against the tuned config, M >= 256
    # Run 6 (2026-11-25): pre-w 64x128 4 warps won at M >= 1024; 128-wide tiles with two int32
    # accumulators spill at 4 warps (128x128: 2.5-3x slower), xla_int8 and 256-wide tiles lose.
    ("pre-w 64x128 w4 s4", dict(block_m=64, block_n=128, num_warps=4, num_stages=4, pre_unpack="w")),
    ("pre-wx 64x128 w4 s4", dict(block_m=64, block_n=128, num_warps=4, num_stages=4, pre_unpack="wx")),
    ("pre-wx 64x128 w4 s3", dict(block_m=64, block_n=128, num_warps=4, num_stages=3, pre_unpack="wx")),
    ("pre-wx 64x128 w4 s5", dict(block_m=64, block_n=128, num_warps=4, num_stages=5, pre_unpack="wx")),
    ("pre-wx 64x128 w4 s4 u2", dict(block_m=64, block_n=128, num_warps=4, num_stages=4, k_unroll=2, pre_unpack="wx")),
    ("pre-wx 128x64 w4 s4", dict(block_m=128, block_n=64, num_warps=4, num_stages=4, pre_unpack="wx")),
    ("pre-wx 64x256 w8 s3", dict(block_m=64, block_n=256, num_warps=8, num_stages=3, pre_unpack="wx")),
    ("pre-wx 128x128 w8 s4", dict(block_m=128, block_n=128, num_warps=8, num_stages=4, pre_unpack="wx")),
    ("pre-wx 64x128 w4 s4 g1", dict(block_m=64, block_n=128, num_warps=4, num_stages=4, group_m=1, pre_unpack="wx")),
    ("swap_ab 128x128 w8 s3", dict(block_m=128, block_n=128, num_warps=8, num_stages=3, swap_ab=True)),
)  # fmt: skip


def large_m_study(results, deadline, ms=None, update_table=True, shapes_name="llama3-8b"):
    """Compute-bound M (default 256, 1024, 4096): the tuned kernel against weights unpacked by
    XLA before the kernel (``pre_unpack``), swap_ab and the xla_int8 backend
    (:func:`variant_study`)."""
    fixed = [(lbl, GemmConfig(**kw)) for lbl, kw in LARGE_M_VARIANTS]
    ms = ms or (256, 1024, 4096)
    return variant_study(
        results, deadline, "large_m", ms, lambda m, tuned: fixed, update_table, shapes_name
    )


def _tile_variants(prefix, tiles, *, swap_ab=False, suffix="", **fields):
    """``(label, GemmConfig)`` per tile of ``tiles``: ``(bm, bn, warps, stages)``, or with
    ``swap_ab`` ``(bn, bm, warps, stages)`` (Y^T tiles are ``[bn, bm]``); the label names the
    tile in the given order. No split-K, group_m 8, ``fields`` as given."""
    out = []
    for a, b, warps, stages in tiles:
        bm, bn = (b, a) if swap_ab else (a, b)
        cfg = GemmConfig(bm, bn, 1, warps, stages, swap_ab, 8, **fields)
        out.append((f"{prefix} {a}x{b} w{warps} s{stages}{suffix}", cfg))
    return out


def pre_x_variants(m, tuned):
    """The tuned config with the INT4 activations unpacked by XLA (``pre_unpack="x"``), and
    at M = 256 Y^T tiles (weights as the register operand) over pre-unpacked activations."""
    out = [("tuned +x", dataclasses.replace(tuned, pre_unpack="x"))]
    if m >= 256:
        tiles = ((128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4))
        out += _tile_variants("swap", tiles, swap_ab=True, suffix=" +x", pre_unpack="x")
        cfg = GemmConfig(64, 128, 2, 4, 4, True, 8, pre_unpack="x")
        out.append(("swap 128x64 w4 s4 split2 +x", cfg))
    return out


def pre_x_study(results, deadline, ms=None, update_table=True, shapes_name="llama3-8b"):
    """Decode M (default 1, 16, 64, 256): the INT4 activations unpacked by XLA before the
    kernel (:func:`variant_study`)."""
    ms = ms or (1, 16, 64, 256)
    return variant_study(results, deadline, "pre_x", ms, pre_x_variants, update_table, shapes_name)


def one_acc_variants(m, tuned):
    """One int32 accumulator per tile (``acc8_first``): the INT8 segment's partial waits in
    bf16 registers. Tests whether 128 x 128 tiles at 4 warps (a plain int8 GEMM's best) then
    win; against the tuned two-accumulator config at the same M. (H100, 2026-11-26: they do
    not, docs/kernels_gemm.md.)"""
    out = []
    if not tuned.acc8_first:
        out.append(("tuned +1acc", dataclasses.replace(tuned, acc8_first=True)))
    tiles = ((128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3))
    out += _tile_variants("1acc wx", tiles, pre_unpack="wx", acc8_first=True)
    if m <= 256:
        tiles = ((128, 128, 4, 4), (128, 128, 4, 3))
        out += _tile_variants(
            "1acc swap", tiles, swap_ab=True, suffix=" +x", pre_unpack="x", acc8_first=True
        )
    return out


def park_variants(m, tuned):
    """One int32 accumulator per tile with the INT8 partial parked in the output tile
    (``park_out``): nothing parked in registers, so the tiles a plain int8 GEMM runs best
    (128 x 128 at 4 warps) and wider ones become possible; against the tuned config."""
    out = [("tuned +park", dataclasses.replace(tuned, park_out=True, acc8_first=False))]
    # Weights unpacked in the loop (no XLA pass over them: 1.5 bytes per weight less HBM
    # traffic per call), INT4 activations unpacked by XLA.
    park_x = ((128, 128, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4))
    if m >= 1024:
        tiles = ((128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3))
        out += _tile_variants(
            "park wx", tiles + ((256, 128, 8, 3),), pre_unpack="wx", park_out=True
        )
        out += _tile_variants("park x", park_x, pre_unpack="x", park_out=True)
    elif m > 256:  # the largest decode buckets: between the two regimes, try both
        tiles = ((128, 128, 4, 4), (128, 128, 8, 3))
        out += _tile_variants("park wx", tiles, pre_unpack="wx", park_out=True)
        out += _tile_variants("park x", park_x, pre_unpack="x", park_out=True)
        tiles = ((128, 128, 4, 4), (128, 128, 4, 3))
        out += _tile_variants(
            "park swap", tiles, swap_ab=True, suffix=" +x", pre_unpack="x", park_out=True
        )
        # The M = 256 heuristic: Y^T 128 x 64 tiles over pre-unpacked x, two accumulators.
        out += _tile_variants(
            "swap", ((64, 128, 4, 4),), swap_ab=True, suffix=" +x", pre_unpack="x"
        )
    else:  # Y^T tiles over pre-unpacked INT4 activations, weights unpacked in registers
        tiles = ((128, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 4), (128, 256, 8, 3))
        out += _tile_variants(
            "park swap", tiles, swap_ab=True, suffix=" +x", pre_unpack="x", park_out=True
        )
    return [(lbl, c) for lbl, c in out if c != tuned]


def park_study(results, deadline, ms=None, update_table=True, shapes_name="llama3-8b"):
    """M in 256, 1024, 4096 (default): the INT8 partial parked in the output tile
    (:func:`variant_study`)."""
    ms = ms or (256, 1024, 4096)
    return variant_study(results, deadline, "park", ms, park_variants, update_table, shapes_name)


def one_acc_study(results, deadline, ms=None, update_table=True, shapes_name="llama3-8b"):
    """M in 256, 1024, 4096 (default): one accumulator per tile (:func:`variant_study`)."""
    ms = ms or (256, 1024, 4096)
    return variant_study(
        results, deadline, "one_acc", ms, one_acc_variants, update_table, shapes_name
    )


def _study_shapes(name: str) -> list[tuple[int, int]]:
    """A ``tuning.ENGINE_SHAPES`` key, or an explicit ``NxK,NxK`` list."""
    if name in tuning.ENGINE_SHAPES:
        return tuning.ENGINE_SHAPES[name]
    try:
        return [tuple(int(v) for v in part.split("x")) for part in name.split(",")]
    except ValueError:
        raise SystemExit(
            f"--study-shapes {name!r}: want one of {sorted(tuning.ENGINE_SHAPES)} or NxK,NxK"
        ) from None


def variant_study(
    results, deadline, key, ms, variants_of, update_table=True, shapes_name="llama3-8b"
):
    """The tuned config against ``variants_of(m, tuned)`` on the engine shapes of
    ``shapes_name`` (``tuning.ENGINE_SHAPES``) at 25% INT8, baselines (XLA bf16, XLA int8)
    in the same run; every variant's int32 sums are checked exact on the device first (random
    non-zero operands, M not a multiple of the tile). The fastest exact variant per shape
    becomes its tuning-table entry."""
    rows = results.setdefault(key, [])
    shapes = _study_shapes(shapes_name)
    if SMOKE:
        shapes, ms = [(64, 256)], (40,)

    def variants(m, tuned):
        vs = variants_of(m, tuned)
        if SMOKE:
            vs = [(lbl, dataclasses.replace(c, block_m=16, block_n=32)) for lbl, c in vs]
        return vs

    exact_of = results.setdefault(f"{key}_exact", {})
    out_err_of = results.setdefault(f"{key}_out_rel_err", {})
    entries = {}
    for n, k in shapes:
        for m in ms:
            if time.time() > deadline:
                log(f"{key}: deadline reached")
                break
            k8 = tuning.int8_fraction_k8(k, 0.25)
            tuned = tuning.get_config(m, n, k, k8)
            vs = [(lbl, c) for lbl, c in variants(m, tuned) if not n % min(c.block_n, n)]
            # Exactness on the device for each distinct config (M = m + 3: a partial tile).
            ops = tuning.random_operands(jax.random.PRNGKey(21), m + 3, n, k, k8)
            ref = [np.asarray(a) for a in w4ax_accumulators_reference(ops[0], ops[1], ops[3])]
            for lbl, cfg in vs:
                try:
                    got = w4ax_accumulators(ops[0], ops[1], ops[3], config=cfg, interpret=SMOKE)
                    ok = all(np.array_equal(np.asarray(g), r) for g, r in zip(got, ref))
                except Exception as e:  # noqa: BLE001 - a config may not compile
                    ok = False
                    log(f"{key} {lbl} failed: {type(e).__name__}: {e!s:.200}")
                exact_of[f"{lbl} {m}x{n}x{k}"] = ok
                if ok:  # and the epilogue's output (acc8_first / park_out round a term)
                    try:
                        y = np.asarray(w4ax_matmul(*ops, config=cfg, interpret=SMOKE), np.float32)
                        y_ref = np.asarray(w4ax_matmul_reference(*ops, out_dtype=jnp.float32))
                        err = rel_err(y, y_ref)
                        # Per element too: a wrong tile (e.g. a parked partial read back
                        # before it was written) would hide in a norm over the whole output.
                        tol = 2.0**-6 * (np.abs(y_ref) + np.sqrt(np.mean(y_ref**2)))
                        bad = int(np.sum(~(np.abs(y - y_ref) <= tol)))
                    except Exception as e:  # noqa: BLE001
                        err, bad = float("inf"), -1
                        log(f"{key} {lbl} output failed: {type(e).__name__}: {e!s:.200}")
                    out_err_of[f"{lbl} {m}x{n}x{k}"] = err
                    results.setdefault(f"{key}_bad_elements", {})[f"{lbl} {m}x{n}x{k}"] = bad
                    exact_of[f"{lbl} {m}x{n}x{k}"] = bool(err < 1e-2 and bad == 0)
            sets = _ours_sets(m, n, k, k8, n_copies(n * k // 2, m))
            row = dict(m=m, n=n, k=k, k8=k8)
            row["bf16_us"] = time_bf16(m, n, k) * 1e6
            row["int8_us"] = time_int8(m, n, k) * 1e6
            row["tuned_config"] = tuned.to_dict()
            row["tuned_us"] = time_ours(m, n, k, k8, tuned, sets=sets) * 1e6
            best = (row["tuned_us"], "tuned", tuned)
            for lbl, cfg in vs:
                try:
                    t = time_ours(m, n, k, k8, cfg, sets=sets) * 1e6
                except Exception as e:  # noqa: BLE001 - a config may not compile
                    row[f"{lbl}_error"] = f"{type(e).__name__}: {e!s:.200}"
                    continue
                row[f"{lbl}_us"] = t
                if t < best[0] and exact_of.get(f"{lbl} {m}x{n}x{k}", False):
                    best = (t, lbl, cfg)
            row["best"], row["best_us"] = best[1], best[0]
            row["variant_configs"] = {lbl: c.to_dict() for lbl, c in vs}
            row["best_vs_bf16"] = row["bf16_us"] / best[0]
            row["best_vs_int8"] = row["int8_us"] / best[0]
            row["tuned_vs_bf16"] = row["bf16_us"] / row["tuned_us"]
            rows.append(row)
            log(f"{key} {json.dumps(row, default=str)}")
            if best[1] != "tuned":
                entries[tuning.table_key(m, n, k, k8)] = dict(
                    best[2].to_dict(), us=round(best[0], 2)
                )
    results[f"{key}_entries"] = entries
    if update_table and entries and not SMOKE:
        tuning.write_table(entries, results["meta"])
    return entries


MGPU_CONFIGS = (  # MgpuConfig fields; 2026-11-26: 4 stages beat 3 by 7-11% at M = 8192
    {},
    dict(stages=5),
    dict(block_n=64),
    # One accumulator, INT8 partial in bf16 registers: 128-row warpgroup tiles (the plain
    # int8 loop's), or 64-row ones with fewer registers live.
    dict(rows_per_wg=128, stages=3, park_int8=True),
    dict(rows_per_wg=128, stages=4, park_int8=True),
    dict(park_int8=True),
    dict(block_n=64, park_int8=True),
)
# The weights' INT4 tiles unpacked in shared memory by the kernel (no XLA int8 copy);
# `--mgpu-smem-unpack`. The byte-wise unpack (through int16) was 1.6-2.2x slower than the
# schedules above with XLA's unpack included (2026-11-27); the kernel now unpacks int32 words.
MGPU_SMEM_UNPACK_CONFIGS = (
    dict(rows_per_wg=128, stages=3, park_int8=True, smem_unpack=True),
    dict(rows_per_wg=128, stages=4, park_int8=True, smem_unpack=True),
    dict(park_int8=True, smem_unpack=True),
    dict(park_int8=True, stages=5, smem_unpack=True),
    dict(smem_unpack=True),
    dict(stages=5, smem_unpack=True),
)

# The packed weights unpacked in registers into wgmma's A operand (Y^T tiles: block_n tokens
# x 2 * rows_per_wg weight rows); `--mgpu-w-regs`.
MGPU_W_REGS_CONFIGS = (
    dict(w_regs=True, block_n=128, rows_per_wg=64),
    dict(w_regs=True, block_n=128, rows_per_wg=64, stages=5),
    dict(w_regs=True, block_n=128, rows_per_wg=64, park_int8=True),
    dict(w_regs=True, block_n=256, rows_per_wg=64, park_int8=True, stages=3),
    dict(w_regs=True, block_n=256, rows_per_wg=64, park_int8=True),
    dict(w_regs=True, block_n=128, rows_per_wg=128, park_int8=True),
    dict(w_regs=True, block_n=64, rows_per_wg=64, stages=5),
)
# Token tiles fitting the engine's 1216-row decode batch in fewer whole waves on 132 SMs
# (8 x 160, 16 x 80 rows, against 10 x 128 or 5 x 256; 152, which divides 1216, is not an
# integer wgmma shape); `--mgpu-w-regs decode`.
MGPU_W_REGS_DECODE_CONFIGS = (
    dict(w_regs=True, block_n=160, rows_per_wg=64, park_int8=True),
    dict(w_regs=True, block_n=160, rows_per_wg=64),
    dict(w_regs=True, block_n=80, rows_per_wg=64),
    dict(w_regs=True, block_n=80, rows_per_wg=64, stages=6),
)


# Tile-order bands (MgpuConfig.snake) timed against the table's schedule (default 8):
# `--mgpu-w-regs snake`.
MGPU_SNAKES = (2, 4, 16, 32)


def _mgpu_label(c) -> str:
    """A MgpuConfig's row label: tile (rows x columns of the output), stages, park8 /
    smem-unpack / w-regs, and the tile-order band where it is not the default."""
    from pallas_kernels.w4ax_mgpu import MgpuConfig

    extra = (" park8" if c.park_int8 else "") + (" smem-unpack" if c.smem_unpack else "")
    extra += " w-regs" if c.w_regs else ""
    extra += f" snake{c.snake}" if c.snake != MgpuConfig.snake else ""
    return f"mgpu {c.block_m}x{c.tile_n} s{c.stages}{extra}"


def _w_regs_schedules(choice: str, m: int, n: int, table_schedule) -> list:
    """The schedules ``--mgpu-w-regs CHOICE`` adds for an ``[m, K] x [K, n]`` GEMM: a fixed
    set (tiles, decode), the token tiles that fit the SMs' waves at this M (fit), or the
    table's schedule (``table_schedule``, a MgpuConfig or None) with other tile-order bands
    (snake); none for "" (off)."""
    from pallas_kernels.w4ax_matmul import UNPACKED_ROW_ALIGN
    from pallas_kernels.w4ax_mgpu import MgpuConfig, _num_sms, wave_fit_schedules

    if choice in ("tiles", "decode"):
        fixed = MGPU_W_REGS_CONFIGS if choice == "tiles" else MGPU_W_REGS_DECODE_CONFIGS
        return [MgpuConfig(**fields) for fields in fixed]
    if choice == "fit":
        return wave_fit_schedules(m, n, sms=_num_sms(), row_align=UNPACKED_ROW_ALIGN)
    if choice == "snake" and table_schedule is not None:
        return [dataclasses.replace(table_schedule, snake=b) for b in MGPU_SNAKES]
    return []


def mgpu_study(results, deadline, ms=None, shapes_name="llama3-8b", smem_unpack=False, w_regs=""):
    """The Mosaic GPU W4Ax kernel (``pallas_kernels/w4ax_mgpu.py``) against the Triton kernel
    (the table's config; for an ``mgpu`` entry the Triton fallback the engine would run) and
    XLA bf16 / int8 at compute-bound M (default 1024, 4096, 8192), 25% INT8. Each
    schedule's output is first checked on the device against the reference (f32): every
    element within 2^-7 of its magnitude plus the output's RMS (one bf16 rounding; park_int8
    adds one more of the INT8 term, 2^-9 of it), and the relative error of the whole output
    < 1e-2."""
    from pallas_kernels.w4ax_matmul import _fallback_from_mgpu
    from pallas_kernels.w4ax_mgpu import MgpuConfig, w4ax_matmul_mgpu

    rows = results.setdefault("mgpu", [])
    shapes = _study_shapes(shapes_name)
    ms = ms or (1024, 4096, 8192)
    for n, k in shapes:
        for m in ms:
            if time.time() > deadline:
                log("mgpu: deadline reached")
                return rows
            k8 = tuning.int8_fraction_k8(k, 0.25)
            ops = tuning.random_operands(jax.random.PRNGKey(31), m + 5, n, k, k8)
            y_ref = np.asarray(w4ax_matmul_reference(*ops, out_dtype=jnp.float32))
            tol = 2.0**-7 * (np.abs(y_ref) + np.sqrt(np.mean(y_ref**2)))
            sets = _ours_sets(m, n, k, k8, n_copies(n * k // 2, m))
            tuned = tuning.get_config(m, n, k, k8)
            if tuned.backend == "mgpu":  # compare against Triton: the entry's fallback
                tuned = _fallback_from_mgpu(tuned, ops[4])
            row = dict(m=m, n=n, k=k, k8=k8, tuned_config=tuned.to_dict())
            row["bf16_us"] = time_bf16(m, n, k) * 1e6
            row["int8_us"] = time_int8(m, n, k) * 1e6
            row["tuned_us"] = time_ours(m, n, k, k8, tuned, sets=sets) * 1e6
            best = (row["tuned_us"], "tuned")
            configs = [MgpuConfig(**fields) for fields in MGPU_CONFIGS]
            if smem_unpack or w_regs:  # the table's schedule (XLA unpacks), then the kernel's
                table = tuning.get_config(m, n, k, k8)
                configs = []
                if table.backend == "mgpu":
                    t = MgpuConfig.from_gemm_config(table)
                    configs = [t]
                    if smem_unpack and not t.w_regs:
                        configs.append(dataclasses.replace(t, smem_unpack=True))
                more = [MgpuConfig(**f) for f in (MGPU_SMEM_UNPACK_CONFIGS if smem_unpack else ())]
                more += _w_regs_schedules(w_regs, m, n, configs[0] if configs else None)
                for cfg in more:
                    if cfg not in configs:
                        configs.append(cfg)
            for cfg in configs:
                lbl = _mgpu_label(cfg)
                f = functools.partial(w4ax_matmul_mgpu, config=cfg)
                try:
                    y = np.asarray(f(*ops), np.float32)
                    bad = int(np.sum(~(np.abs(y - y_ref) <= tol)))
                    err = rel_err(y, y_ref)
                    t = tuning.time_fn(f, sets) * 1e6
                except Exception as e:  # noqa: BLE001 - a schedule may not compile
                    row[f"{lbl}_error"] = f"{type(e).__name__}: {e!s:.600}"
                    log(f"mgpu {m}x{n}x{k} {lbl}: {row[f'{lbl}_error']}")
                    continue
                row[f"{lbl}_us"], row[f"{lbl}_bad"], row[f"{lbl}_rel_err"] = t, bad, err
                if bad == 0 and err < 1e-2 and t < best[0]:
                    best = (t, lbl)
                    row["best_mgpu"] = dataclasses.asdict(cfg)
            row["best"], row["best_us"] = best[1], best[0]
            row["best_vs_bf16"] = row["bf16_us"] / best[0]
            row["best_vs_int8"] = row["int8_us"] / best[0]
            row["best_vs_tuned"] = row["tuned_us"] / best[0]
            rows.append(row)
            log(f"mgpu {json.dumps(row, default=str)}")
    return rows


def unpack_study(results):
    """The XLA weight unpack of ``pre_unpack``: byte-wise vs 32-bit-word form (device time,
    bytes equal on the device), and the tuned M = 1024 GEMM that includes it."""
    from pallas_kernels.w4ax_matmul import unpack_int4_x16_tiles

    rows = results.setdefault("unpack", [])
    shapes = [(64, 256)] if SMOKE else [(14336, 4096), (4096, 14336), (4096, 4096)]
    for n, k in shapes:
        sets = _ours_sets(1, n, k, 0, n_copies(n * k // 2, 1))
        w_sets = [(s[3],) for s in sets]
        row = dict(n=n, k=k)
        a = unpack_int4_x16_tiles(w_sets[0][0], words=True)
        b = unpack_int4_x16_tiles(w_sets[0][0], words=False)
        row["equal"] = bool(jnp.all(a == b))
        for name, words in (("bytes", False), ("words", True)):
            f = functools.partial(unpack_int4_x16_tiles, words=words)
            t = timing.device_time(f, w_sets)
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_tbps"] = 1.5 * n * k / t / 1e12  # K/2 read + K written per row
        m = 40 if SMOKE else 1024
        k8 = tuning.int8_fraction_k8(k, 0.25)
        row["gemm_m"], row["gemm_config"] = m, tuning.get_config(m, n, k, k8).to_dict()
        row["gemm_us"] = time_ours(m, n, k, k8) * 1e6
        rows.append(row)
        log(f"unpack {json.dumps(row)}")


def unroll_study(results, deadline):
    """k_unroll (K tiles per pipelined step) against the current configs, baselines alongside."""
    rows = results.setdefault("unroll", [])
    cases = [
        (16, 8192, 8192),
        (1, 14336, 4096),
        (64, 4096, 14336),
        (256, 8192, 8192),
        (4096, 8192, 8192),
    ]
    if SMOKE:
        cases = [(16, 128, 512)]
    for m, n, k in cases:
        k8 = tuning.int8_fraction_k8(k, 0.25)
        base = tuning.get_config(m, n, k, k8)
        row = dict(m=m, n=n, k=k, k8=k8, config=base.to_dict())
        if time.time() > deadline:
            break
        row["bf16_us"] = time_bf16(m, n, k) * 1e6
        row["int8_us"] = time_int8(m, n, k) * 1e6
        variants = [(u, base.num_stages) for u in (1, 2, 4)]
        variants += [(2, 3), (4, 2)]
        for u, st in variants:
            cfg = GemmConfig(**{**base.to_dict(), "k_unroll": u, "num_stages": st})
            try:
                row[f"u{u}_s{st}_us"] = time_ours(m, n, k, k8, cfg) * 1e6
            except Exception as e:  # noqa: BLE001
                log(f"unroll {m}x{n}x{k} u={u} s={st}: failed {e!s:.200}")
        rows.append(row)
        log(f"unroll {json.dumps(row)}")


def _a16_sets(m, n, k, reps, group=None, seed=11):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    sets = []
    for i in range(reps):
        kq, ks = jax.random.split(jax.random.fold_in(key, i))
        w_packed = jax.random.randint(kq, (n, k // 2), -128, 128, jnp.int32).astype(jnp.int8)
        shape = (n,) if group is None else (n, k // group)
        sets.append((x, w_packed, jax.random.uniform(ks, shape, jnp.float32, 0.005, 0.02)))
    return sets


def a16_candidates(m, n, k):
    """The W4A16 heuristic first, then its neighbours (tile shapes, split-K, operand order,
    XLA-unpacked weights)."""
    base = tuning.a16_config(m, n, k)
    rep = functools.partial(dataclasses.replace, base)
    if m <= 64:
        out = [base, rep(block_n=128), rep(num_stages=3)]
        out += [rep(split_k=s) for s in (max(1, base.split_k // 2), 2 * base.split_k)]
    else:
        out = [
            base,
            rep(block_n=64, num_warps=4, num_stages=4),
            rep(block_m=64, block_n=128, num_warps=4, num_stages=4),
            GemmConfig(128, 128, 1, 8, 3, False, 8),
            GemmConfig(128, 128, 1, 8, 3, False, 8, pre_unpack="w"),
            rep(pre_unpack="w"),
        ]
    return list(dict.fromkeys(out))


def a16_study(results, deadline, ms=None, shapes_name="llama3-8b"):
    """W4A16 GEMM (`w4a16_matmul`) vs XLA bf16 and our W4Ax at 25% INT8, per engine shape
    and M: candidate schedules timed, the best kept; device correctness vs the reference."""
    from pallas_kernels.w4ax_matmul import w4a16_matmul, w4a16_matmul_reference

    rows = results.setdefault("a16", [])
    shapes = _study_shapes(shapes_name)
    ms = ms or (1, 16, 64, 256, 1024, 4096)
    if SMOKE:
        shapes, ms = [(64, 256)], (1, 40)
    for n, k in shapes:
        x, w_packed, w_scales = _a16_sets(64, n, k, 1, group=128)[0]
        got = w4a16_matmul(x, w_packed, w_scales, out_dtype=jnp.float32, interpret=SMOKE)
        ref = w4a16_matmul_reference(x, w_packed, w_scales, out_dtype=jnp.float32)
        err = rel_err(got, ref)
        log(f"a16 check {n}x{k} group 128: rel err {err:.2e}")
        for m in ms:
            if time.time() > deadline:
                log("a16: deadline reached")
                return
            sets = _a16_sets(m, n, k, n_copies(n * k // 2, m))
            k8 = tuning.int8_fraction_k8(k, 0.25)
            row = dict(m=m, n=n, k=k, check_rel_err=err, configs=[])
            row["bf16_us"] = time_bf16(m, n, k) * 1e6
            row["w4ax_us"] = time_ours(m, n, k, k8) * 1e6
            for cfg in a16_candidates(m, n, k):
                f = functools.partial(w4a16_matmul, config=cfg, interpret=SMOKE)
                try:
                    us = tuning.time_fn(f, sets) * 1e6
                except Exception as e:  # noqa: BLE001 - a config that fails to compile
                    log(f"a16 {m}x{n}x{k} {cfg}: failed {e!s:.200}")
                    continue
                row["configs"].append(dict(config=cfg.to_dict(), us=us))
            if row["configs"]:
                row["default_us"] = row["configs"][0]["us"]
                best = min(row["configs"], key=lambda c: c["us"])
                row["best_us"], row["best_config"] = best["us"], best["config"]
                row["default_vs_bf16"] = row["bf16_us"] / row["default_us"]
                row["best_vs_bf16"] = row["bf16_us"] / row["best_us"]
            rows.append(row)
            log(f"a16 {json.dumps(row)}")


def _csv(cast):
    """argparse type: a comma list -> tuple of ``cast`` values (empty text -> ())."""
    return lambda text: tuple(cast(x) for x in text.split(",") if x)


def geomean(v):
    v = [x for x in v if x > 0]
    return float(np.exp(np.mean(np.log(v)))) if v else float("nan")


def _variant_cells(row, variants, versus: int) -> tuple[str, str]:
    """Table cells of a study row's ``{variant}_us`` times ("-" where missing) and the time
    of ``variants[versus]`` over the first's."""
    us = [row.get(f"{v}_us") for v in variants]
    cells = " | ".join("-" if u is None else f"{u:.1f}" for u in us)
    ratio = f"{us[versus] / us[0]:.3f}" if us[0] and us[versus] else "-"
    return cells, ratio


def markdown(results) -> str:
    meta = results["meta"]
    out = [f"# W4Ax GEMM benchmark ({meta['date']}, {meta['device']}, jax {meta['jax']})", ""]
    if results.get("copy_tbps"):
        out.append(f"Device-to-device copy (read+write): {results['copy_tbps']:.2f} TB/s\n")
    rows = results["sweep"]
    if rows:
        out += [
            "## Geomean speedup per M (all shapes, INT8 fraction as listed)",
            "",
            "| M | frac | n | vs XLA bf16 | vs XLA int8 [N,K] | vs our W4A8 |",
            "|---|---|---|---|---|---|",
        ]
        for m in M_VALUES:
            for frac in FRACS:
                r = [x for x in rows if x["m"] == m and x["frac"] == frac]
                if r:
                    out.append(
                        f"| {m} | {frac} | {len(r)} | "
                        f"{geomean([x['vs_bf16'] for x in r]):.2f} | "
                        f"{geomean([x['vs_int8'] for x in r]):.2f} | "
                        f"{geomean([x['vs_w4a8'] for x in r]):.2f} |"
                    )
        out += [
            "",
            "## Per shape (us)",
            "",
            "| M | N | K | frac | W4Ax | bf16 | int8 | W4A8 | xbf16 | xint8 | TB/s(w) | TOP/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in rows:
            out.append(
                f"| {x['m']} | {x['n']} | {x['k']} | {x['frac']} | {x['w4ax_us']:.1f} | "
                f"{x['bf16_us']:.1f} | {x['int8_us']:.1f} | {x['w4a8_us']:.1f} | "
                f"{x['vs_bf16']:.2f} | {x['vs_int8']:.2f} | {x['weight_tbps']:.2f} | "
                f"{x['tops']:.0f} |"
            )
    if results.get("ablation"):
        out += [
            "",
            "## Ablation (us)",
            "",
            "| variant | M | N | K | K8 | us |",
            "|---|---|---|---|---|---|",
        ]
        for x in results["ablation"]:
            out.append(
                f"| {x['name']} | {x['m']} | {x['n']} | {x['k']} | {x['k8']} | {x['us']:.1f} |"
            )
    if results.get("gather"):
        out += [
            "",
            "## act_quant gather order (device us; RMSNorm fused, unpacked layout)",
            "",
            "| M | K | random permutation | segments sorted | identity | sorted / random |",
            "|---|---|---|---|---|---|",
        ]
        for x in results["gather"]:
            cells, ratio = _variant_cells(x, ("random", "sorted", "identity"), 1)
            out.append(f"| {x['m']} | {x['k']} | {cells} | {ratio} |")
    if results.get("swiglu"):
        out += [
            "",
            "## Down projection input: SwiGLU + act_quant (device us; unpacked layout)",
            "",
            "| M | K | XLA SwiGLU + gather | XLA SwiGLU + contiguous | fused | fused / gather | "
            "fused vs unfused (elements, max diff) |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in results["swiglu"]:
            cells, ratio = _variant_cells(x, ("unfused_gather", "unfused_identity", "fused"), 2)
            out.append(
                f"| {x['m']} | {x['k']} | {cells} | {ratio} | "
                f"{x.get('fused_vs_unfused_elements', '-')}, "
                f"{x.get('fused_vs_unfused_max_diff', '-')} |"
            )
    if results.get("gate_up"):
        out += [
            "",
            "## MLP gate / up to the down operand (device us; w4ax_swiglu_unpacked vs two GEMMs)",
            "",
            "| M | N x K | separate | fused | separate GEMMs | fused GEMM | separate / fused | "
            "hidden differing | bad vs f32 | down bytes differing |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in results["gate_up"]:
            if "error" in x:
                out.append(f"| {x['m']} | {x['n']} x {x['k']} | {x['error'][:120]} |")
                continue
            t = " | ".join(
                f"{x[f'{v}_us']:.1f}" for v in ("separate", "fused", "separate_gemms", "fused_gemm")
            )
            out.append(
                f"| {x['m']} | {x['n']} x {x['k']} | {t} | {x['fused_vs_separate']:.3f} | "
                f"{x['hidden_elements_differing']} | {x['hidden_bad_vs_f32']} | "
                f"{x['down_operand_bytes_differing']} |"
            )
    if results.get("act_quant_build"):
        out += [
            "",
            "## act_quant builds (device us; operand elements differing from the CPU reference / "
            "from this build's default)",
            "",
            "| M | K | SwiGLU / permutation | variant | us | vs default | "
            "differing (ref / default) | scales differing |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in results["act_quant_build"]:
            names = [key[:-3] for key in x if key.endswith("_us")]
            for name in names + [key[:-6] for key in x if key.endswith("_error")]:
                head = f"| {x['m']} | {x['k']} | {x['gated'] or x.get('perm_order')} | {name} |"
                if f"{name}_error" in x:
                    out.append(f"{head} {x[f'{name}_error'][:100]} | | | |")
                    continue
                rel = x[f"{name}_us"] / x["default_us"] if x.get("default_us") else float("nan")
                out.append(
                    f"{head} {x[f'{name}_us']:.1f} | {rel:.3f} | {x[f'{name}_mismatch']} / "
                    f"{x.get(f'{name}_vs_default_mismatch', '-')} | {x[f'{name}_scale_mismatch']} |"
                )
    if results.get("act_quant"):
        out += [
            "",
            "## act_quant: kernel vs XLA reference (device us; mismatches x4/x8/scales against "
            "the reference on the CPU)",
            "",
            "| M | K | norm | kernel | mismatches | XLA | other launches |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in results["act_quant"]:
            other = ", ".join(
                f"{key[:-3]} {v:.1f}"
                for key, v in x.items()
                if key.endswith("_us") and key not in ("default_us", "xla_us")
            )
            out.append(
                f"| {x['m']} | {x['k']} | {x['norm']} | {x.get('default_us', float('nan')):.1f} "
                f"| {x.get('default_mismatch', x.get('default_error'))} "
                f"| {x['xla_us']:.1f} | {other} |"
            )
    if results.get("unpacked"):
        out += [
            "",
            "## Activations into the GEMM: packed + XLA unpack vs act_quant's unpacked operand "
            "(device us, act_quant + GEMM; 25% INT8)",
            "",
            "| M | N | K | config | packed | unpacked | ratio | act_quant packed / unpacked "
            "| bf16 dot | int8 dot | max diff | rel err | act_quant mismatches |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in results["unpacked"]:
            if "unpacked_us" not in x:
                out.append(f"| {x['m']} | {x['n']} | {x['k']} | error: {x.get('error')} |")
                continue
            c = x["config"]
            out.append(
                f"| {x['m']} | {x['n']} | {x['k']} | {c['backend']} {c['block_m']}x"
                f"{c['block_n']} | {x['packed_us']:.1f} | {x['unpacked_us']:.1f} "
                f"| {x['unpacked_us'] / x['packed_us']:.3f} | {x['act_quant_packed_us']:.1f} / "
                f"{x['act_quant_unpacked_us']:.1f} | {x['bf16_us']:.1f} | {x['int8_us']:.1f} "
                f"| {x['max_abs_diff']:.3g} | {x['rel_err_ref']:.2e} | {x['act_quant_mismatch']} |"
            )
    if results.get("timing_study"):
        out += [
            "",
            "## Timing method: synced dispatch (old) vs device time (us)",
            "",
            "| M | N | K | ours old | ours device | bf16 old | bf16 device |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in results["timing_study"]:
            out.append(
                f"| {x['m']} | {x['n']} | {x['k']} | {x['ours_dispatch_us']:.1f} "
                f"| {x['ours_device_us']:.1f} | {x['bf16_dispatch_us']:.1f} "
                f"| {x['bf16_device_us']:.1f} |"
            )
    if results.get("a16"):
        out += [
            "",
            "## W4A16 GEMM vs XLA bf16 and W4Ax (25% INT8), device us",
            "",
            "| M | N | K | W4A16 default | best | best config | bf16 | W4Ax | default vs bf16 "
            "| best vs bf16 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in results["a16"]:
            if "best_us" not in x:
                continue
            c = x["best_config"]
            brief = (
                f"{c['block_m']}x{c['block_n']} s{c['split_k']} w{c['num_warps']} "
                f"st{c['num_stages']}{' swap' if c['swap_ab'] else ''}"
                f"{' pre-' + c['pre_unpack'] if c['pre_unpack'] else ''}"
            )
            out.append(
                f"| {x['m']} | {x['n']} | {x['k']} | {x['default_us']:.1f} | {x['best_us']:.1f} "
                f"| {brief} | {x['bf16_us']:.1f} | {x['w4ax_us']:.1f} "
                f"| {x['default_vs_bf16']:.2f} | {x['best_vs_bf16']:.2f} |"
            )
    for key in ("large_m", "pre_x", "one_acc", "park", "mgpu"):
        if not results.get(key):
            continue
        out += [
            "",
            f"## Variant study `{key}` (25% INT8), device us; best = fastest exact variant",
            "",
            "| M | N | K | tuned | best | best variant | bf16 | int8 | best vs bf16 | best vs int8 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in results[key]:
            out.append(
                f"| {x['m']} | {x['n']} | {x['k']} | {x['tuned_us']:.1f} | {x['best_us']:.1f} "
                f"| {x['best']} | {x['bf16_us']:.1f} | {x['int8_us']:.1f} "
                f"| {x['best_vs_bf16']:.2f} | {x['best_vs_int8']:.2f} |"
            )
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--unroll", action="store_true", help="k_unroll study")
    ap.add_argument("--unpack", action="store_true", help="XLA weight unpack: bytes vs words")
    ap.add_argument("--a16", action="store_true", help="W4A16 GEMM vs bf16, schedules")
    ap.add_argument(
        "--pre-x",
        action="store_true",
        help="M <= 256: INT4 activations unpacked before the kernel; best ones into the table",
    )
    ap.add_argument(
        "--large-m",
        action="store_true",
        help="M >= 256 variants (pre_unpack, swap_ab, xla_int8); best ones into the table",
    )
    ap.add_argument(
        "--one-acc",
        action="store_true",
        help="M >= 256: one int32 accumulator per tile (acc8_first); best ones into the table",
    )
    ap.add_argument(
        "--park",
        action="store_true",
        help="M >= 256: the INT8 partial parked in the output tile (park_out), one "
        "accumulator, wider tiles; best ones into the table",
    )
    ap.add_argument(
        "--mgpu",
        action="store_true",
        help="M >= 1024: the Mosaic GPU W4Ax kernel vs the tuned Triton one, XLA bf16 / int8",
    )
    ap.add_argument(
        "--mgpu-smem-unpack",
        action="store_true",
        help="--mgpu times the tuning table's schedule (XLA unpacks the weights), the same "
        "schedule unpacking the INT4 weight tiles in shared memory, and the other "
        "smem-unpack schedules (instead of MGPU_CONFIGS)",
    )
    ap.add_argument(
        "--mgpu-w-regs",
        nargs="?",
        const="tiles",
        default="",
        choices=("tiles", "decode", "fit", "snake"),
        help="--mgpu times the tuning table's schedule and the schedules unpacking the packed "
        "weights in registers: MGPU_W_REGS_CONFIGS (tiles, the default), the token tiles "
        "dividing the 1216-row decode batch (decode: MGPU_W_REGS_DECODE_CONFIGS), or the "
        "token tiles that fill the SMs' waves best at each --study-ms M (fit: "
        "w4ax_mgpu.wave_fit_schedules), or the table's schedule with other tile-order bands "
        "(snake: MGPU_SNAKES); the best schedule of each row is recorded as "
        "best_mgpu (python -m pallas_kernels.tuning --from-study puts it in the table)",
    )
    ap.add_argument(
        "--out-rows",
        action="store_true",
        help="the engine's large-M GEMM path at decode-batch M (--study-ms, default 1216,1214): "
        "checked against the reference, output rows, timed",
    )
    ap.add_argument(
        "--act-quant-launch",
        action="store_true",
        help="act_quant rows per program x warps at M = 8192, unpacked layout (bytes checked)",
    )
    ap.add_argument(
        "--act-quant-launch-gated",
        action="store_true",
        help="--act-quant-launch on the SwiGLU input (K = 14336) alone, 1-2 rows per program",
    )
    ap.add_argument(
        "--act-quant-build",
        action="store_true",
        help="act_quant at the engine's M (2222, 8192), K = 4096 / 14336 (SwiGLU): this build "
        "(and silu_approx flipped for the SwiGLU input, scatter for the permuted one) checked "
        "against the CPU reference, timed",
    )
    ap.add_argument(
        "--act-quant-baseline",
        default="",
        help="with --act-quant-build: comma list of earlier act_quant.py files to time beside "
        "this build",
    )
    ap.add_argument(
        "--act-quant-cases",
        default=ACT_QUANT_BUILD_DEFAULT,
        help="with --act-quant-build: comma list of cases, from "
        + ", ".join(ACT_QUANT_BUILD_CASES),
    )
    ap.add_argument("--timing-study", action="store_true", help="old vs device timing")
    ap.add_argument("--act-quant", action="store_true", help="act_quant kernel vs XLA")
    ap.add_argument(
        "--gather",
        action="store_true",
        help="act_quant under random / segment-sorted / identity run-time permutations",
    )
    ap.add_argument(
        "--swiglu",
        action="store_true",
        help="down projection input: XLA SwiGLU + act_quant (gathered / contiguous) vs "
        "act_quant(gate=...)",
    )
    ap.add_argument(
        "--gate-up",
        action="store_true",
        help="the MLP at the engine's large M: gate / up GEMMs + act_quant(gate=) vs one "
        "Mosaic GPU kernel writing silu(gate) * up + act_quant (W4AxLinear.fuse_gate_up)",
    )
    ap.add_argument(
        "--unpacked",
        action="store_true",
        help="act_quant's unpacked operand into the GEMM vs packed + XLA unpack (checked, timed)",
    )
    ap.add_argument("--tune-shapes", default="", help="tuning.ENGINE_SHAPES key for --tune")
    ap.add_argument("--tune-ms", type=_csv(int), default=(), help="comma list of M for --tune")
    ap.add_argument(
        "--study-shapes",
        default="llama3-8b",
        help=f"shapes for --pre-x / --large-m / --one-acc / --a16: a tuning.ENGINE_SHAPES "
        f"key ({', '.join(sorted(tuning.ENGINE_SHAPES))}) or NxK,NxK",
    )
    ap.add_argument(
        "--study-ms",
        type=_csv(int),
        default=(),
        help="comma list of M for --pre-x / --large-m / --a16",
    )
    ap.add_argument("--sweep-ms", type=_csv(int), default=(), help="comma list of M for --sweep")
    ap.add_argument("--models", default="", help="comma list of tuning.MODEL_SHAPES keys")
    ap.add_argument("--fracs", type=_csv(float), default=(), help="comma list of INT8 fractions")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop timing after this")
    ap.add_argument("--tune-share", type=float, default=0.5, help="share of budget for --tune")
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    args = ap.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    if args.mgpu and SMOKE:
        raise SystemExit(
            "--mgpu runs Mosaic GPU kernels, which have no CPU interpreter: drop --smoke"
        )
    t_start = time.time()
    deadline = t_start + args.budget_s
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    results = dict(
        meta=dict(
            date=date, device=jax.devices()[0].device_kind, jax=jax.__version__, argv=sys.argv[1:]
        ),
        check=[],
        sweep=[],
        ablation=[],
    )
    stem = out / f"gemm_{date}"

    def save():
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(results))

    log(results["meta"])
    try:
        results["copy_tbps"] = time_copy(1 << 20 if SMOKE else 1 << 30) / 1e12
        log(f"copy bandwidth {results['copy_tbps']:.2f} TB/s")
        if args.check:
            try:
                results["check_ok"] = check(results)
            except Exception:  # noqa: BLE001 - a failed check must not cost the timings
                traceback.print_exc()
                results["check_ok"] = False
            save()
        if args.timing_study:
            timing_study(results)
            save()
        if args.act_quant:
            act_quant_study(results)
            save()
        if args.out_rows:
            out_rows_study(results, deadline, ms=args.study_ms)
            save()
        if args.act_quant_build:
            act_quant_build_study(
                results, deadline, baseline=args.act_quant_baseline or None,
                cases=args.act_quant_cases,
            )  # fmt: skip
            save()
        if args.act_quant_launch or args.act_quant_launch_gated:
            act_quant_launch_study(results, deadline, only_gated=args.act_quant_launch_gated)
            save()
        for flag, study in (
            ("unpacked", unpacked_study),
            ("swiglu", swiglu_study),
            ("gather", gather_study),
            ("gate_up", gate_up_study),
        ):
            if getattr(args, flag):
                study(results, deadline)
                save()
        if args.tune:
            entries = tune(
                results,
                args.quick,
                min(deadline, time.time() + args.tune_share * args.budget_s),
                args.tune_shapes,
                args.tune_ms,
            )
            tuning.write_table(entries, results["meta"], out / "tuning_entries.json", merge=False)
            if not SMOKE:  # this run's later stages use the new table
                tuning.write_table(entries, results["meta"])
                (out / "tuning_table.json").write_text(tuning.TABLE_PATH.read_text())
            save()
        if args.ablate:
            ablate(results, deadline)
            save()
        if args.unroll:
            unroll_study(results, deadline)
            save()
        if args.unpack:
            unpack_study(results)
            save()
        if args.a16:
            a16_study(results, deadline, ms=args.study_ms, shapes_name=args.study_shapes)
            save()
        study = dict(ms=args.study_ms, shapes_name=args.study_shapes)
        if args.pre_x:
            pre_x_study(results, deadline, **study)
            save()
        if args.mgpu:
            mgpu_study(
                results,
                deadline,
                smem_unpack=args.mgpu_smem_unpack,
                w_regs=args.mgpu_w_regs,
                **study,
            )
            save()
        if args.large_m:
            large_m_study(results, deadline, **study)
            save()
        if args.one_acc:
            one_acc_study(results, deadline, **study)
            save()
        if args.park:
            park_study(results, deadline, **study)
            save()
        if (
            args.pre_x or args.large_m or args.one_acc or args.park
        ) and not SMOKE:  # the table those studies updated
            (out / "tuning_table.json").write_text(tuning.TABLE_PATH.read_text())
        if args.sweep:
            sweep(
                results,
                deadline,
                args.quick,
                models=[x for x in args.models.split(",") if x] or None,
                fracs_arg=args.fracs or None,
                ms=args.sweep_ms or None,
            )
    except Exception:  # noqa: BLE001 - keep what was measured
        traceback.print_exc()
    save()
    md = markdown(results)
    log(md[:6000])
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
