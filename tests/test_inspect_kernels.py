"""The ISA counters of experiments/inspect_kernels.py on hand-written PTX/SASS lines (the
capture itself needs a GPU: jax only hands Triton IR to the PTX compiler there)."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "inspect_kernels.py"
_spec = importlib.util.spec_from_file_location("inspect_kernels", _PATH)
ik = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ik)

PTX = """
  wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1, %f2}, {%r1, %r2, %r3, %r4}, %rd7, p, 1, 1, 1;
  wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%r9, %r10}, %rd3, %rd4, p;
  mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%r1,%r2,%r3,%r4}, {%r5,%r6,%r7,%r8}, {%r9,%r10}, {%r1,%r2,%r3,%r4};
  ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1, %r2, %r3, %r4}, [%r5];
  st.shared.v4.b32 [%r1], {%r2, %r3, %r4, %r5};
  ld.shared.v2.f32 {%f1, %f2}, [%r1];
  cp.async.cg.shared.global [%r1], [%rd1], 16;
  cp.async.bulk.tensor.2d.shared::cluster.global [%r1], [%rd1, {%r2, %r3}], [%r4];
  prmt.b32 %r1, %r2, 0, 16704;
  lop3.b32 %r1, %r2, 983055, 1124090624, 234;
  cvt.rn.bf16x2.f32 %r1, %f1, %f2;
"""

SASS = """
        /*0a10*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0a20*/                   IGMMA.64x128x32.S8.S8 R40, gdesc[UR8], RZ, !UPT ;
        /*0a30*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ;
        /*0a40*/                   LDSM.16.M88.4 R8, [R2] ;
        /*0a50*/                   STS.128 [R3], R4 ;
        /*0a60*/                   LDS.64 R6, [R3+0x10] ;
        /*0a70*/                   PRMT R1, R2, 0x4140, RZ ;
        /*0a80*/                   LOP3.LUT R1, R1, 0xf000f, RZ, 0xc0, !PT ;
"""


def test_count_ptx():
    c = ik.count_ptx(PTX)
    assert (c["wgmma"], c["wgmma_a_regs"], c["mma_sync"]) == (2, 1, 1)
    assert (c["ldmatrix"], c["st_shared"], c["ld_shared"]) == (1, 1, 1)
    assert (c["cp_async"], c["tma"], c["prmt"], c["lop3"], c["cvt"]) == (1, 1, 1, 1, 1)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in c["mma_kinds"]
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in c["mma_kinds"]


def test_count_sass():
    c = ik.count_sass(SASS)
    assert (c["HGMMA"], c["IGMMA"], c["IMMA"], c["HMMA"]) == (1, 1, 1, 0)
    assert (c["LDSM"], c["STS"], c["LDS"], c["PRMT"], c["LOP3"]) == (1, 1, 1, 1, 1)
    assert c["mma_kinds"] == [
        "HGMMA.64x16x16.F32.BF16",
        "IGMMA.64x128x32.S8.S8",
        "IMMA.16832.S8.S8",
    ]


def test_markdown_lists_each_kernel_and_errors():
    kern = dict(entry="w4ax_k4_3072_k8_1024", ptx=ik.count_ptx(PTX), sass=ik.count_sass(SASS))
    text = ik.markdown([dict(name="p", kernels=[kern]), dict(name="q", error="RuntimeError: x")])
    assert "| p | w4ax_k4_3072_k8_1024 | 2 (1) | 1 |" in text
    assert "HGMMA.64x16x16.F32.BF16" in text
    assert "| q | error: RuntimeError: x" in text


def test_pallas_kernels_are_cut_out_of_module_ptx(tmp_path):
    """A dumped module holds XLA fusions and the Pallas kernels; only new files count."""
    header = ".version 8.4\n.target sm_90a\n.address_size 64\n\n"
    body = lambda name, op: f".visible .entry {name}(\n.param .u64 p0\n)\n{{\n{op};\nret;\n}}\n"  # noqa: E731
    module = header + body("loop_add_fusion", "add.f32 %f1, %f2, %f3")
    module += body("w4ax_k4_3072_k8_1024", "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 x")
    module += body("kv4_paged_attention", "prmt.b32 %r1, %r2, 0, 16704")
    (tmp_path / "module_0001.jit_f.ptx").write_text(module)
    entries = ik.ptx_entries(module)
    assert list(entries) == ["loop_add_fusion", "w4ax_k4_3072_k8_1024", "kv4_paged_attention"]
    assert all(e.startswith(header) for e in entries.values())
    seen = set()
    got = ik.pallas_kernels_in(str(tmp_path), seen)
    assert list(got) == ["w4ax_k4_3072_k8_1024", "kv4_paged_attention"]
    assert ik.count_ptx(got["w4ax_k4_3072_k8_1024"])["mma_sync"] == 1
    assert "add.f32" not in got["kv4_paged_attention"]
    assert ik.pallas_kernels_in(str(tmp_path), seen) == {}  # already seen
