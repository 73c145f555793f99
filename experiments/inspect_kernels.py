"""Which instructions do our Pallas-Triton kernels compile to? (GPU machine, or CPU for IR)

jax 0.11 hands a Pallas-Triton kernel to XLA as Triton IR inside a custom call and XLA
compiles it internally; its dumps hold neither the kernel's PTX nor its LLVM IR (checked on
the H100 machine, 2026-11-26). So this script captures the Triton IR (TTIR) that Pallas
lowers each probe to (the W4Ax GEMM at decode, M = 256 and prefill sizes with their tuned
configs; the KV4 decode and prefill attention), compiles that same TTIR with the ``triton``
package where one is installed (the GPU machine has triton 3.6 beside torch) with the kernel's
num_warps / num_stages for sm_90a, and disassembles the cubin with ``cuobjdump`` (PATH, the
CUDA wheels, or the copy bundled with the triton wheel).
It counts MMA kinds (wgmma = warpgroup MMA, HGMMA/IGMMA in SASS; mma.sync = warp MMA,
HMMA/IMMA), shared-memory traffic and unpack instructions, and each loop's instructions per
trip by opcode (``sass_loops``). No GPU is needed for any of it: with ``pip install
triton==3.6.0`` (the GPU machine's version) on a CPU machine, Pallas lowers the probes to
Triton IR there and the triton package compiles it for sm_90a and disassembles it
(how the decode kernel's nibble formats were compared, docs/kernels_attention.md). Caveat: the triton package's
pipeline is not byte-identical to the one inside XLA, so the counts show what Triton makes of
this IR, not a dump of the binary that ran.

    python experiments/inspect_kernels.py [--out DIR] [--only PREFIX,...]

Writes ``DIR/kernels_isa.json``, ``DIR/kernels_isa.md`` and
``DIR/isa/<probe>.{ttir,ttgir,ptx,sass}``.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

# PTX patterns. wgmma's A operand is a register list ("{...}, {") or a shared-memory
# descriptor ("{...}, %rd"): which one tells whether the unpacked tile skipped shared memory.
PTX_PATTERNS = {
    "wgmma": r"\bwgmma\.mma_async\.",
    "wgmma_a_regs": r"\bwgmma\.mma_async\.[^;]*?\}\s*,\s*\{",
    "mma_sync": r"\bmma\.sync\.",
    "ldmatrix": r"\bldmatrix\.",
    "stmatrix": r"\bstmatrix\.",
    "ld_shared": r"\bld\.shared\.",
    "st_shared": r"\bst\.shared\.",
    "cp_async": r"\bcp\.async\.(?!bulk)",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "prmt": r"\bprmt\.",
    "lop3": r"\blop3\.",
    "cvt": r"\bcvt\.",
    "bar_sync": r"\b(?:bar|barrier)\.sync\b",
}
# SASS opcodes (Hopper): HGMMA/IGMMA = warpgroup MMA (bf16/int8), HMMA/IMMA = warp MMA.
SASS_OPCODES = ("HGMMA", "IGMMA", "HMMA", "IMMA", "LDSM", "STSM", "LDS", "STS", "LDGSTS", "PRMT", "LOP3", "I2F", "F2I", "F2F")  # fmt: skip


def count_ptx(ptx: str) -> dict:
    """Instruction counts of one PTX text, plus the distinct MMA shapes/types it uses."""
    counts = {k: len(re.findall(p, ptx)) for k, p in PTX_PATTERNS.items()}
    shapes = re.findall(r"\b(wgmma\.mma_async\.sync\.aligned\.\S+|mma\.sync\.aligned\.\S+)", ptx)
    counts["mma_kinds"] = sorted(set(shapes))
    return counts


def count_sass(sass: str) -> dict:
    """Opcode counts of one SASS listing (``cuobjdump -sass`` / ``nvdisasm`` text)."""
    out = {}
    for op in SASS_OPCODES:
        out[op] = len(re.findall(rf"\b{op}(?=[.\s])", sass))
    out["mma_kinds"] = sorted(set(re.findall(r"\b((?:HGMMA|IGMMA|HMMA|IMMA)\.\S+)", sass)))
    return out


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
_SASS_MOVES = ("MOV", "IMAD.MOV", "IMAD.MOV.U32")


def sass_loops(sass: str, min_body: int = 100) -> list[dict]:
    """The loops of a SASS listing (a branch back to an earlier address, bodies of at least
    ``min_body`` instructions), outermost first: ``{"start", "end"}`` addresses,
    ``"instructions"`` in the body and ``"opcodes"``, the body's counts by opcode without
    modifiers (predicates dropped; ``MOV`` / ``IMAD.MOV`` counted together as ``MOVE``): per
    thread, one trip of the loop, what a kernel's steady state costs in issue slots."""
    ins = [(int(a, 16), body) for a, body in _SASS_LINE.findall(sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (addr, body) in enumerate(ins):
        body = re.sub(r"^@!?U?P\w+\s+", "", body)
        target = re.search(r"0x([0-9a-f]+)", body) if body.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr and int(target.group(1), 16) in index:
            first = index[int(target.group(1), 16)]
            if i - first + 1 >= min_body:
                loops.append((first, i))
    out = []
    for first, last in sorted(loops, key=lambda fl: fl[0]):
        out.append(
            dict(
                start=ins[first][0],
                end=ins[last][0],
                instructions=last - first + 1,
                opcodes=_opcode_counts(body for _, body in ins[first : last + 1]),
            )
        )
    return out


def _opcode_counts(bodies) -> dict:
    """SASS instruction bodies -> counts by opcode without modifiers, largest first."""
    counts: dict[str, int] = {}
    for body in bodies:
        op = re.sub(r"^@!?U?P\w+\s+", "", body).split()[0]
        op = "MOVE" if op in _SASS_MOVES else op.split(".")[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def sass_totals(sass: str) -> dict:
    """The whole listing's ``{"instructions", "opcodes"}`` (per thread, as written: what a
    straight-line kernel such as act_quant issues once per program; loops count one trip)."""
    bodies = [body for _, body in _SASS_LINE.findall(sass)]
    return dict(instructions=len(bodies), opcodes=_opcode_counts(bodies))


def _tool(name: str) -> str | None:
    """A CUDA tool (cuobjdump): PATH first, then the CUDA wheels, then the triton wheel's copy."""
    found = shutil.which(name)
    if found:
        return found
    for site in sys.path:
        for pattern in (("nvidia", "*", "bin"), ("triton", "backends", "nvidia", "bin")):
            hits = glob.glob(os.path.join(site, *pattern, name))
            if hits:
                return hits[0]
    return None


TTGIR_PATTERNS = {
    "warp_group_dot": r"\bttng\.warp_group_dot\b",
    "dot": r"\btt\.dot\b",
    "mma_v3_layouts": r"nvidia_mma<\{versionMajor = 3",
    "mma_v2_layouts": r"nvidia_mma<\{versionMajor = 2",
    "local_alloc": r"\bttg\.local_alloc\b",
    "convert_layout": r"\bttg\.convert_layout\b",
}


def count_ttgir(ttgir: str) -> dict:
    return {k: len(re.findall(p, ttgir)) for k, p in TTGIR_PATTERNS.items()}


class TtirCapture:
    """Context manager: the Triton IR text of every Pallas kernel lowered inside it."""

    def __init__(self):
        self.modules: list[tuple[str, str]] = []  # (kernel name, TTIR text)

    def __enter__(self):
        from jax._src.pallas.triton import pallas_call_registration as reg

        self._lowering, self._orig = reg.lowering, reg.lowering.lower_jaxpr_to_triton_module

        def wrapped(*args, **kwargs):
            res = self._orig(*args, **kwargs)
            text = res.module.operation.get_asm()
            name = re.search(r"tt\.func public @([\w$.]+)", text)
            self.modules.append((name.group(1) if name else "kernel", text))
            return res

        self._lowering.lower_jaxpr_to_triton_module = wrapped
        return self

    def __exit__(self, *exc):
        self._lowering.lower_jaxpr_to_triton_module = self._orig


def compile_ttir(ttir: str, num_warps: int, num_stages: int, arch: str) -> dict:
    """``{"ttgir", "ptx", "cubin"}`` from the triton package, or ``{"error": ...}``."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        return dict(error=f"no triton package: {e}")
    cc = int(re.sub(r"\D", "", arch))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ttir")
        pathlib.Path(src).write_text(ttir)
        try:
            k = triton.compile(
                src,
                target=GPUTarget("cuda", cc, 32),
                options=dict(num_warps=num_warps, num_stages=num_stages),
            )
        except Exception as e:  # noqa: BLE001 - the dialects of two Triton builds may differ
            return dict(error=f"triton {triton.__version__}: {type(e).__name__}: {e!s:.400}")
        return dict(
            ttgir=k.asm.get("ttgir", ""), ptx=k.asm.get("ptx", ""), cubin=k.asm.get("cubin")
        )


def _cuobjdump(cubin: bytes, flag: str):
    """``cuobjdump FLAG`` on ``cubin`` -> (CompletedProcess or None, the tool or why none)."""
    dis = _tool("cuobjdump")
    if not dis:
        return None, "no cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        pathlib.Path(path).write_bytes(cubin)
        return subprocess.run([dis, flag, path], capture_output=True, text=True), dis


def disassemble_cubin(cubin: bytes) -> tuple[str | None, str]:
    """(SASS text or None, the tool used or why there is none)."""
    r, how = _cuobjdump(cubin, "-sass")
    if r is None:
        return None, how
    if r.returncode:
        return None, f"cuobjdump failed: {r.stderr[:300]}"
    return r.stdout, how


def resource_usage(cubin: bytes) -> dict:
    """``{"registers", "stack", "shared"}`` per thread / kernel from ``cuobjdump
    -res-usage`` (what ptxas allotted; the registers set how many programs fit an SM), or
    ``{}`` without the tool."""
    r, _ = _cuobjdump(cubin, "-res-usage")
    return {} if r is None else parse_resource_usage(r.stdout)


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump -res-usage`` text -> ``{"registers", "stack", "shared"}`` (ints)."""
    found = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", text))
    names = dict(REG="registers", STACK="stack", SHARED="shared")
    return {names[k]: int(v) for k, v in found.items()}


def gemm_probes(small: bool = False):
    """(name, fn, args, num_warps, num_stages, config) for the W4Ax GEMM as the engine runs it."""
    import jax

    from pallas_kernels import tuning
    from pallas_kernels.w4ax_matmul import GemmConfig, w4ax_matmul

    shapes = (
        [(16, 256, 512)] if small else [(16, 14336, 4096), (256, 4096, 4096), (4096, 4096, 4096)]
    )
    out = []
    for m, n, k in shapes:
        k8 = tuning.int8_fraction_k8(k, 0.25)
        cfg = tuning.get_config(m, n, k, k8)
        ops = tuning.random_operands(jax.random.PRNGKey(m), m, n, k, k8)
        fn = functools.partial(w4ax_matmul, config=cfg)
        name = f"w4ax_m{m}_{n}x{k}"
        out.append((name, fn, ops, cfg.num_warps, cfg.num_stages, cfg.to_dict()))
    # The INT8 partial parked in the output tile (`park_out`): the PTX shows whether a CTA
    # barrier separates the parked store from its read-back.
    m, n, k = (64, 256, 512) if small else (4096, 4096, 4096)
    k8 = tuning.int8_fraction_k8(k, 0.25)
    for tag, cfg in (
        ("wx", GemmConfig(128, 128, 1, 4, 3, False, 8, pre_unpack="wx", park_out=True)),
        ("swap", GemmConfig(128, 128, 1, 4, 4, True, 8, pre_unpack="x", park_out=True)),
    ):
        mm = m if tag == "wx" else min(m, 256)
        ops = tuning.random_operands(jax.random.PRNGKey(mm), mm, n, k, k8)
        fn = functools.partial(w4ax_matmul, config=cfg)
        name = f"w4ax_park_{tag}_m{mm}_{n}x{k}"
        out.append((name, fn, ops, cfg.num_warps, cfg.num_stages, cfg.to_dict()))
    return out


def attention_probes(small: bool = False):
    """(name, fn, args, num_warps, num_stages, config) for KV4 decode and prefill attention."""
    import jax
    import jax.numpy as jnp

    from comet_jax.engine import kv_cache as kc
    from pallas_kernels import kv4_attention as A

    pages = 8 if small else 64
    cfg = kc.KVCacheConfig(1, 8, 128, 128, pages, 128, "int4")
    kv = kc.init_cache(cfg).pages()
    table = jnp.arange(pages, dtype=jnp.int32).reshape(4, pages // 4)
    lens = jnp.full((4,), pages // 4 * 128 - 5, jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 128), jnp.bfloat16)
    qp = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 32, 128), jnp.bfloat16)
    out = []
    for tag, kw in (("", {}), ("_qk_int8", dict(qk_int8=True))):
        fn = functools.partial(A.paged_decode_attention, **kw)
        cfg = dict(page=128, block_k=128, **kw)
        out.append((f"kv4_decode{tag}", fn, (q, kv, table, lens), 4, 2, cfg))
        fn = functools.partial(A.paged_prefill_attention, num_warps=8, **kw)
        args = (qp, kv, table, lens, jnp.full((4,), 64, jnp.int32))
        out.append((f"kv4_prefill{tag}", fn, args, 8, 2, dict(page=128, num_warps=8, **kw)))
    # The engine's decode launch at a large grid (2 warps, 5 stages, one split, q in its own
    # layout) by the dots' operand format (docs/kernels_attention.md): compare the loops'
    # instruction counts (``sass_loops``).
    for tag, kw in (
        ("f16", {}),
        ("bf16", dict(f16_nibbles=False)),
        ("int8_f16", dict(qk_int8=True, q_residual=False)),
        ("int8x2_f16", dict(qk_int8=True, q_residual=True)),  # q as two int8 parts
    ):
        launch = dict(num_warps=2, num_stages=5, num_splits=1)
        fn = functools.partial(A.paged_decode_attention, **launch, **kw)
        cfg = dict(page=128, **launch, **kw)
        out.append((f"kv4_decode_engine_{tag}", fn, (q, kv, table, lens), 2, 5, cfg))
    return out


def _act_quant_gated(x, gate, **kw):
    from pallas_kernels.act_quant import act_quant

    return act_quant(x, None, gate=gate, **kw)


def _act_quant_norm(x, perm, norm_weight, **kw):
    from pallas_kernels.act_quant import act_quant

    return act_quant(x, perm, norm_weight=norm_weight, **kw)


def act_quant_probes(small: bool = False):
    """(name, fn, args, num_warps, num_stages, config) for act_quant as the engine calls it in
    prefill (unpacked layout, one row a program, 25% of K in INT8 as in the benchmark model):
    the down projection's SwiGLU input (K = 14336, identity order; the logistic accurate and
    approximate) and the q/k/v input (K = 4096, FMPQ permutation, RMSNorm; gathered, and read
    in order and stored scattered). The kernel has no loop: ``sass_totals`` is what a program
    issues per row."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import act_quant as aq

    m = 16
    out = []
    for name, k, k4, gated, extra in (
        ("swiglu", 14336, 10752, True, dict(silu_approx=False)),
        ("swiglu_approx", 14336, 10752, True, dict(silu_approx=True)),
        ("norm_perm", 4096, 3072, False, dict(scatter=False)),
        ("norm_perm_scatter", 4096, 3072, False, dict(scatter=True)),
    ):
        if small:
            k, k4 = 512, 384
        kx = jax.random.PRNGKey(k)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        g = jax.random.normal(jax.random.fold_in(kx, 1), (m, k), jnp.bfloat16)
        perm = jax.random.permutation(jax.random.fold_in(kx, 2), k).astype(jnp.int32)
        w = jnp.ones((k,), jnp.float32)
        kw = dict(k4=k4, layout="unpacked", row_align=1, rows_per_program=1, **extra)
        if gated:
            fn, ops = functools.partial(_act_quant_gated, **kw), (x, g)
        else:
            fn, ops = functools.partial(_act_quant_norm, **kw), (x, perm, w)
        warps = aq.default_num_warps(1, k)
        cfg = dict(k=k, k4=k4, num_warps=warps, **extra)
        out.append((f"act_quant_{name}", fn, ops, warps, 1, cfg))
    return out


def markdown(rows) -> str:
    lines = [
        "| probe | kernel | warp_group_dot / tt.dot (TTGIR) | PTX wgmma (A in regs) | "
        "PTX mma.sync | ldmatrix | st.shared | SASS HGMMA/IGMMA | SASS HMMA/IMMA | MMA kinds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k in r.get("kernels", []):
            if "compile_error" in k:
                lines.append(f"| {r['name']} | {k['entry'][:40]} | {k['compile_error'][:120]} "
                             "| | | | | | | |")  # fmt: skip
                continue
            p, s, g = k["ptx"], k.get("sass") or {}, k["ttgir"]
            kinds = ", ".join(s.get("mma_kinds") or p["mma_kinds"])
            lines.append(
                f"| {r['name']} | {k['entry'][:40]} | {g['warp_group_dot']} / {g['dot']} | "
                f"{p['wgmma']} ({p['wgmma_a_regs']}) | {p['mma_sync']} | {p['ldmatrix']} | "
                f"{p['st_shared']} | {s.get('HGMMA', '-')}/{s.get('IGMMA', '-')} | "
                f"{s.get('HMMA', '-')}/{s.get('IMMA', '-')} | {kinds} |"
            )
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | | | | |")
    totals = [(r["name"], k) for r in rows for k in r.get("kernels", []) if "sass_totals" in k]
    if totals:
        lines += ["", "SASS per kernel (the whole listing, per thread):", ""]
        lines += [
            "| probe | kernel | registers | instructions | top opcodes |",
            "|---|---|---|---|---|",
        ]
        for name, k in totals:
            t = k["sass_totals"]
            top = ", ".join(f"{op} {n}" for op, n in list(t["opcodes"].items())[:10])
            regs = k.get("resources", {}).get("registers", "-")
            lines.append(f"| {name} | {k['entry'][:40]} | {regs} | {t['instructions']} | {top} |")
    loops = [
        (r["name"], k["entry"], k.get("resources", {}).get("registers", "-"), loop)
        for r in rows
        for k in r.get("kernels", [])
        for loop in k.get("sass_loops", [])
    ]
    if loops:
        lines += ["", "SASS loops (one trip, per thread; opcodes without modifiers):", ""]
        lines += [
            "| probe | kernel | registers | loop | instructions | top opcodes |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry, regs, loop in loops:
            top = ", ".join(f"{op} {n}" for op, n in list(loop["opcodes"].items())[:10])
            span = f"{loop['start']:#x}-{loop['end']:#x}"
            lines.append(
                f"| {name} | {entry[:40]} | {regs} | {span} | {loop['instructions']} | {top} |"
            )
    return "\n".join(lines) + "\n"


def inspect(probes, out: pathlib.Path, arch: str) -> list[dict]:
    """Captures, compiles and counts each probe's kernels; writes the IR files under out/isa."""
    import jax

    rows = []
    for name, fn, ops, warps, stages, cfg in probes:
        row = dict(name=name, config=cfg, num_warps=warps, num_stages=stages, kernels=[])
        try:
            with TtirCapture() as cap:
                jax.jit(fn).trace(*ops).lower(lowering_platforms=("cuda",))
            if not cap.modules:
                raise RuntimeError("no Pallas kernel was lowered")
            for kname, ttir in cap.modules:
                stem = out / "isa" / f"{name}_{kname}"[:120]
                stem.with_suffix(".ttir").write_text(ttir)
                kern = dict(entry=kname)
                comp = compile_ttir(ttir, warps, stages, arch)
                if "error" in comp:
                    kern["compile_error"] = comp["error"]
                else:
                    stem.with_suffix(".ttgir").write_text(comp["ttgir"])
                    stem.with_suffix(".ptx").write_text(comp["ptx"])
                    kern["ttgir"], kern["ptx"] = count_ttgir(comp["ttgir"]), count_ptx(comp["ptx"])
                    sass, how = disassemble_cubin(comp["cubin"]) if comp["cubin"] else (None, "-")
                    kern["sass_tool"] = how
                    if comp["cubin"]:
                        kern["resources"] = resource_usage(comp["cubin"])
                    if sass is not None:
                        stem.with_suffix(".sass").write_text(sass)
                        kern["sass"] = count_sass(sass)
                        kern["sass_loops"] = sass_loops(sass)
                        kern["sass_totals"] = sass_totals(sass)
                row["kernels"].append(kern)
        except Exception as e:  # noqa: BLE001 - report and go on to the next probe
            row["error"] = f"{type(e).__name__}: {e!s:.300}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--only", default="", help="comma list of probe-name prefixes")
    ap.add_argument("--small", action="store_true", help="small shapes (CPU: IR only)")
    args = ap.parse_args(argv)
    import jax

    out = pathlib.Path(args.out)
    (out / "isa").mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "9.0"))
    arch = "sm_" + cc.replace(".", "") + ("a" if cc == "9.0" else "")
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=dev.device_kind,
        jax=jax.__version__,
        arch=arch,
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(meta, flush=True)
    only = [p for p in args.only.split(",") if p]
    probes = gemm_probes(args.small) + attention_probes(args.small)
    probes += act_quant_probes(args.small)
    probes = [p for p in probes if not only or any(p[0].startswith(o) for o in only)]
    rows = inspect(probes, out, arch)
    (out / "kernels_isa.json").write_text(json.dumps(dict(meta=meta, probes=rows), indent=1))
    text = markdown(rows)
    (out / "kernels_isa.md").write_text(f"# Kernel ISA ({meta})\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
