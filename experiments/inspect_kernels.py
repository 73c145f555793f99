"""Which instructions do our Pallas-Triton kernels compile to? (GPU)

On jax 0.11 a Pallas-Triton kernel reaches XLA as Triton IR in a custom call; XLA compiles it
with the rest of the module to PTX. With ``--xla_dump_to`` XLA writes that PTX, so this script
compiles each probe (the W4Ax GEMM at decode, M = 256 and prefill sizes with its tuned configs,
and the KV4 decode/prefill attention kernels) with dumps on, cuts the Pallas kernels'
``.entry`` functions out of the new PTX files, assembles them with ``ptxas`` and disassembles
them with ``cuobjdump``/``nvdisasm`` where the machine has them (PATH, the CUDA wheels, or the
``triton`` wheel's bundled tools), and counts the MMA, shared-memory and unpack instructions.

    python experiments/inspect_kernels.py [--out DIR] [--only PREFIX,...]

Writes ``DIR/kernels_isa.json``, ``DIR/kernels_isa.md`` and ``DIR/isa/<probe>_<kernel>.{ptx,sass}``.
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


def _tool(name: str) -> str | None:
    """ptxas / cuobjdump / nvdisasm: PATH first, then the CUDA wheels next to jax."""
    found = shutil.which(name)
    if found:
        return found
    for site in sys.path:
        for pattern in (("nvidia", "*", "bin"), ("triton", "backends", "nvidia", "bin")):
            hits = glob.glob(os.path.join(site, *pattern, name))
            if hits:
                return hits[0]
    return None


def disassemble(ptx: str, arch: str) -> tuple[str | None, str]:
    """SASS text of ``ptx`` (or None) and a line saying which tools ran or were missing."""
    ptxas = _tool("ptxas")
    dis = _tool("cuobjdump") or _tool("nvdisasm")
    if not ptxas or not dis:
        return None, f"ptxas={ptxas} disassembler={dis}: no SASS"
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        pathlib.Path(src).write_text(ptx)
        r = subprocess.run(
            [ptxas, f"-arch={arch}", src, "-o", cubin], capture_output=True, text=True
        )
        if r.returncode:
            return None, f"ptxas failed: {r.stderr[:300]}"
        cmd = [dis, "-sass", cubin] if dis.endswith("cuobjdump") else [dis, cubin]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            return None, f"{os.path.basename(dis)} failed: {r.stderr[:300]}"
        return r.stdout, f"{os.path.basename(ptxas)} + {os.path.basename(dis)}"


PALLAS_KERNEL = re.compile(r"w4ax_k4_|kv4_paged_attention|bf16_paged_attention|act_quant")


def ptx_entries(ptx: str) -> dict[str, str]:
    """``{entry name: PTX module header + that entry}`` for every kernel in a module's PTX."""
    starts = list(re.finditer(r"^[ \t]*(?:\.visible\s+)?\.entry\s+([\w$.]+)", ptx, re.M))
    if not starts:
        return {}
    header = ptx[: starts[0].start()]
    out = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(ptx)
        out[m.group(1)] = header + ptx[m.start() : end]
    return out


def pallas_kernels_in(dump_dir: str, seen: set) -> dict[str, str]:
    """Pallas kernels' PTX in the dump files written since the last call (``seen`` updated)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        if path in seen:
            continue
        seen.add(path)
        for name, text in ptx_entries(pathlib.Path(path).read_text(errors="replace")).items():
            if PALLAS_KERNEL.search(name):
                out[name] = text
    return out


def gemm_probes():
    """(name, fn, args) for the W4Ax GEMM with the configs the engine uses."""
    import jax

    from pallas_kernels import tuning
    from pallas_kernels.w4ax_matmul import w4ax_matmul

    out = []
    for m, n, k in ((16, 14336, 4096), (256, 4096, 4096), (4096, 4096, 4096)):
        k8 = tuning.int8_fraction_k8(k, 0.25)
        cfg = tuning.get_config(m, n, k, k8)
        ops = tuning.random_operands(jax.random.PRNGKey(m), m, n, k, k8)
        fn = functools.partial(w4ax_matmul, config=cfg)
        out.append((f"w4ax_m{m}_{n}x{k}", fn, ops, cfg.to_dict()))
    return out


def attention_probes():
    """(name, fn, args) for KV4 decode (each operand order) and prefill attention."""
    import jax
    import jax.numpy as jnp

    from comet_jax.engine import kv_cache as kc
    from pallas_kernels import kv4_attention as A

    cfg = kc.KVCacheConfig(1, 8, 128, 128, 256, 128, "int4")
    kv = kc.init_cache(cfg).pages()
    table = jnp.arange(64, dtype=jnp.int32).reshape(4, 16)
    lens = jnp.full((4,), 2000, jnp.int32)
    q = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 128), jnp.bfloat16)
    qp = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 32, 128), jnp.bfloat16)
    out = []
    for order in A.ORDERS:
        fn = functools.partial(A.paged_decode_attention, order=order)
        out.append((f"kv4_decode_{order}", fn, (q, kv, table, lens), dict(order=order)))
    for order in ("qk", "kq"):
        fn = functools.partial(A.paged_prefill_attention, order=order, num_warps=8)
        args = (qp, kv, table, lens, jnp.full((4,), 64, jnp.int32))
        out.append((f"kv4_prefill_{order}", fn, args, dict(order=order, num_warps=8)))
    return out


def markdown(rows) -> str:
    lines = [
        "| probe | kernels | PTX wgmma (A in regs) | PTX mma.sync | ldmatrix | st.shared | "
        "SASS HGMMA/IGMMA | SASS HMMA/IMMA | MMA kinds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k in r.get("kernels", []):
            p, s = k["ptx"], k.get("sass") or {}
            kinds = ", ".join(s.get("mma_kinds") or p["mma_kinds"])
            lines.append(
                f"| {r['name']} | {k['entry'][:40]} | {p['wgmma']} ({p['wgmma_a_regs']}) | {p['mma_sync']} | "
                f"{p['ldmatrix']} | {p['st_shared']} | {s.get('HGMMA', '-')}/{s.get('IGMMA', '-')}"
                f" | {s.get('HMMA', '-')}/{s.get('IMMA', '-')} | {kinds} |"
            )
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--only", default="", help="comma list of probe-name prefixes")
    args = ap.parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run as a script: XLA's dump flags must be set before jax starts")
    dump_dir = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump_dir} " + os.environ.get("XLA_FLAGS", "")
    import jax

    out = pathlib.Path(args.out)
    (out / "isa").mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    arch = "sm_" + str(getattr(dev, "compute_capability", "9.0")).replace(".", "")
    arch += "a" if arch == "sm_90" else ""
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=dev.device_kind,
        jax=jax.__version__,
        arch=arch,
    )
    print(meta, flush=True)
    rows = []
    seen: set = set()
    only = [p for p in args.only.split(",") if p]
    for name, fn, ops, cfg in gemm_probes() + attention_probes():
        if only and not any(name.startswith(p) for p in only):
            continue
        row = dict(name=name, config=cfg)
        try:
            jax.jit(fn).lower(*ops).compile()
            kernels = pallas_kernels_in(dump_dir, seen)
            if not kernels:
                raise RuntimeError(f"no Pallas kernel in the new PTX dumps of {dump_dir}")
            row["kernels"] = []
            for kname, ptx in kernels.items():
                stem = f"{name}_{kname}"[:120]
                (out / "isa" / f"{stem}.ptx").write_text(ptx)
                kern = dict(entry=kname, ptx=count_ptx(ptx))
                sass, how = disassemble(ptx, arch)
                kern["sass_tool"] = how
                if sass is not None:
                    (out / "isa" / f"{stem}.sass").write_text(sass)
                    kern["sass"] = count_sass(sass)
                row["kernels"].append(kern)
        except Exception as e:  # noqa: BLE001 - report and go on to the next probe
            row["error"] = f"{type(e).__name__}: {e!s:.300}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "kernels_isa.json").write_text(json.dumps(dict(meta=meta, probes=rows), indent=1))
    text = markdown(rows)
    (out / "kernels_isa.md").write_text(f"# Kernel ISA ({meta})\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
