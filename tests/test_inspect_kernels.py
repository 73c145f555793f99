"""experiments/inspect_kernels.py on the CPU: its counters on hand-written PTX / SASS / TTGIR
lines, and the Triton-IR capture of real probes (compiling that IR needs the triton package of
the GPU machine, so the compile step is faked in the last test)."""

from tests import experiment_scripts

ik = experiment_scripts.load("inspect_kernels")

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


TTGIR = """
%1 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x128xi8, #shared> * !ttg.memdesc<128x128xi8, #shared1> -> tensor<64x128xi32, #mma>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1]}>
%2 = ttg.local_alloc %x : (tensor<64x128xi8, #blocked>) -> !ttg.memdesc<64x128xi8, #shared>
"""


def test_markdown_lists_each_kernel_and_errors():
    kern = dict(
        entry="w4ax_k4_3072_k8_1024",
        ttgir=ik.count_ttgir(TTGIR),
        ptx=ik.count_ptx(PTX),
        sass=ik.count_sass(SASS),
    )
    bad = dict(entry="kv4_paged_attention", compile_error="no triton package")
    rows = [dict(name="p", kernels=[kern, bad]), dict(name="q", error="RuntimeError: x")]
    text = ik.markdown(rows)
    assert "| p | w4ax_k4_3072_k8_1024 | 1 / 0 | 2 (1) | 1 |" in text
    assert "HGMMA.64x16x16.F32.BF16" in text
    assert "| p | kv4_paged_attention | no triton package |" in text
    assert "| q | error: RuntimeError: x" in text


LOOP_SASS = """
        /*0100*/                   MOV R1, R2 ;
        /*0110*/                   PRMT R3, R4, 0x4140, RZ ;
        /*0120*/                   LOP3.LUT R3, R3, 0xf000f, RZ, 0xc0, !PT ;
        /*0130*/                   IMAD.MOV.U32 R5, RZ, RZ, R3 ;
        /*0140*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0150*/              @!P0 BRA 0x110 ;
        /*0160*/                   EXIT ;
        /*0170*/                   BRA 0x170 ;
"""


def test_sass_loops_counts_one_trip_by_opcode():
    [loop] = ik.sass_loops(LOOP_SASS, min_body=3)  # the self-branch at 0x170 is 1 long
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x110, 0x150, 5)
    assert loop["opcodes"] == {"PRMT": 1, "LOP3": 1, "MOVE": 1, "HMMA": 1, "BRA": 1}
    assert ik.sass_loops(LOOP_SASS) == []  # shorter than the default 100
    rows = [dict(name="p", kernels=[dict(
        entry="k", ttgir=ik.count_ttgir(TTGIR), ptx=ik.count_ptx(PTX),
        sass=ik.count_sass(LOOP_SASS), sass_loops=[loop], resources=dict(registers=168),
    )])]  # fmt: skip
    md = ik.markdown(rows)
    assert "| p | k | 168 | 0x110-0x150 | 5 | PRMT 1, LOP3 1, MOVE 1, HMMA 1, BRA 1 |" in md


def test_sass_totals_count_the_whole_listing():
    t = ik.sass_totals(LOOP_SASS)
    assert t["instructions"] == len(ik._SASS_LINE.findall(LOOP_SASS)) > 5
    assert t["opcodes"]["PRMT"] == 1 and sum(t["opcodes"].values()) == t["instructions"]
    kern = dict(entry="act_quant", ttgir=ik.count_ttgir(TTGIR), ptx=ik.count_ptx(PTX),
                sass=ik.count_sass(LOOP_SASS), sass_totals=t, resources=dict(registers=64))  # fmt: skip
    md = ik.markdown([dict(name="aq", kernels=[kern])])
    assert f"| aq | act_quant | 64 | {t['instructions']} | " in md


def test_resource_usage_parses_cuobjdump():
    text = (
        "Resource usage:\n Function kv4_paged_attention:\n"
        "  REG:221 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:904 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert ik.parse_resource_usage(text) == dict(registers=221, stack=0, shared=0)
    assert ik.parse_resource_usage("") == {}


def test_count_ttgir():
    c = ik.count_ttgir(TTGIR)
    assert (c["warp_group_dot"], c["dot"], c["mma_v3_layouts"], c["mma_v2_layouts"]) == (1, 0, 1, 0)
    assert c["local_alloc"] == 1


def test_inspect_captures_each_kernels_triton_ir(tmp_path, monkeypatch):
    """On the CPU: Pallas lowers the probes to Triton IR; the compile step is faked here (the
    real one needs the triton package of the GPU machine) to check what gets written."""
    fake = dict(ttgir=TTGIR, ptx=PTX, cubin=None)
    monkeypatch.setattr(ik, "compile_ttir", lambda ttir, w, s, arch: fake)
    (tmp_path / "isa").mkdir()
    probes = ik.gemm_probes(small=True) + ik.attention_probes(small=True)
    probes += ik.act_quant_probes(small=True)
    rows = ik.inspect(probes, tmp_path, "sm_90a")
    aq_rows, rows = rows[-4:], rows[:-4]
    assert [r["name"] for r in aq_rows] == [
        "act_quant_swiglu", "act_quant_swiglu_approx", "act_quant_norm_perm",
        "act_quant_norm_perm_scatter",
    ]  # fmt: skip
    assert all("error" not in r and len(r["kernels"]) == 1 for r in aq_rows)
    aq = {r["name"]: (tmp_path / "isa" / f"{r['name']}_{r['kernels'][0]['entry']}.ttir").read_text()
          for r in aq_rows}  # fmt: skip
    # The approximate logistic only where asked; round-and-convert in one cvt everywhere;
    # contiguous chunks (the scattered form's too): one row-amax reduction per segment (INT4,
    # INT8), not one per chunk (gathered chunks keep one per chunk: 3 INT4 chunks of 128 + 1
    # INT8).
    assert "ex2.approx.ftz.f32" in aq["act_quant_swiglu_approx"]
    assert "ex2.approx" not in aq["act_quant_swiglu"]
    for name, ir in aq.items():
        assert "cvt.rni.s32.f32" in ir, name
        assert ir.count('"tt.reduce"') == (4 if name.endswith("norm_perm") else 2), name
    names = ["w4ax_m16_256x512", "w4ax_park_wx_m64_256x512", "w4ax_park_swap_m64_256x512"]
    names += ["kv4_decode", "kv4_prefill"]
    names += ["kv4_decode_qk_int8", "kv4_prefill_qk_int8"]
    names += [f"kv4_decode_engine_{t}" for t in ("f16", "bf16", "int8_f16", "int8x2_f16")]
    assert [r["name"] for r in rows] == names
    assert all("error" not in r and len(r["kernels"]) == 1 for r in rows)
    int8_ir = (tmp_path / "isa" / "kv4_decode_qk_int8_kv4_paged_attention.ttir").read_text()
    assert "i8" in int8_ir and "tt.dot" in int8_ir
    assert rows[0]["kernels"][0]["entry"].startswith("w4ax_k4_")
    assert rows[3]["kernels"][0]["entry"] == "kv4_paged_attention"
    park = (tmp_path / "isa" / "w4ax_park_wx_m64_256x512_w4ax_k4_384_k8_128.ttir").read_text()
    assert park.count("tt.store") == 2 and park.count("tt.load") >= 5  # parked, read back
    assert rows[0]["num_warps"] == rows[0]["config"]["num_warps"]
    ttir = (tmp_path / "isa" / "w4ax_m16_256x512_w4ax_k4_384_k8_128.ttir").read_text()
    assert "tt.func public @w4ax_k4_384_k8_128" in ttir and "tt.dot" in ttir
    attn_ir = (tmp_path / "isa" / "kv4_decode_kv4_paged_attention.ttir").read_text()
    assert "prmt.b32" in attn_ir  # the inline-PTX nibble unpack is in the kernel's IR
    engine = {t: (tmp_path / "isa" / f"kv4_decode_engine_{t}_kv4_paged_attention.ttir")
              for t in ("f16", "bf16")}  # fmt: skip
    assert "0x00F000F0" in engine["f16"].read_text()  # the f16 subnormal masks
    assert "0x43004300" in engine["bf16"].read_text()  # bf16 128 + n
    # q's residual part in the tile's rows 8-15: as many int8 dots as one part, the two
    # halves of their sums split apart and combined in int32
    i8 = {t: (tmp_path / "isa" / f"kv4_decode_engine_{t}_kv4_paged_attention.ttir").read_text()
          for t in ("int8_f16", "int8x2_f16")}  # fmt: skip
    dots = {t: sum("tt.dot" in ln and "i32" in ln for ln in x.splitlines()) for t, x in i8.items()}
    assert dots["int8x2_f16"] == dots["int8_f16"] > 0, dots
    assert "tt.split" in i8["int8x2_f16"] and "tt.split" not in i8["int8_f16"]
    assert rows[-1]["num_warps"] == 2 and rows[-1]["num_stages"] == 5
    assert rows[0]["kernels"][0]["ptx"]["wgmma"] == 2
