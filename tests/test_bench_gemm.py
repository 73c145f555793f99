"""The GEMM benchmark's smoke mode (tiny shapes, interpret mode on the CPU): the checks it
runs on the device pass here, and every stage writes its rows."""

from __future__ import annotations

import dataclasses
import json

from tests import experiment_scripts


def _smoke(tmp_path, *stages):
    """Runs the script's smoke mode with `stages`; returns (module, results JSON)."""
    bench = experiment_scripts.load("bench_gemm")
    bench.main(["--smoke", *stages, "--out", str(tmp_path)])
    [path] = tmp_path.glob("gemm_*.json")
    return bench, json.loads(path.read_text())


def test_smoke_run(tmp_path):
    _, res = _smoke(tmp_path, "--check", "--timing-study", "--act-quant")
    assert res["check_ok"] is True
    assert all(r["ok"] for r in res["check"]) and len(res["check"]) == 3
    [aq] = res["act_quant"]
    assert aq["default_mismatch"] == [0, 0, 0]
    [ts] = res["timing_study"]
    assert ts["ours_device_us"] > 0 and ts["bf16_device_us"] > 0


def test_smoke_large_m_study(tmp_path):
    """Every large-M variant is exact in int32 (interpret mode) and gets timed."""
    bench, res = _smoke(tmp_path, "--large-m")
    assert res["large_m_exact"] and all(res["large_m_exact"].values())
    [row] = res["large_m"]
    assert row["tuned_us"] > 0 and row["bf16_us"] > 0 and row["int8_us"] > 0
    timed = [k for k in row if k.endswith("_us") and k.startswith(("pre-", "swap", "xla"))]
    assert len(timed) == len(bench.LARGE_M_VARIANTS)


def test_smoke_pre_x_study(tmp_path):
    """The decode-M study: tuned config with pre-unpacked INT4 activations, exact and timed."""
    _, res = _smoke(tmp_path, "--pre-x")
    assert res["pre_x_exact"] and all(res["pre_x_exact"].values())
    [row] = res["pre_x"]
    assert row["tuned_us"] > 0 and row["tuned +x_us"] > 0
    assert row["variant_configs"]["tuned +x"]["pre_unpack"] == "x"


def test_smoke_one_acc_study(tmp_path):
    """One-accumulator variants: int32 sums exact, outputs within the bf16 bound, all timed,
    the markdown lists the study."""
    _, res = _smoke(tmp_path, "--one-acc")
    assert res["one_acc_exact"] and all(res["one_acc_exact"].values())
    assert all(0 < e < 1e-2 for e in res["one_acc_out_rel_err"].values())
    [row] = res["one_acc"]
    timed = [k for k in row if k.endswith("_us") and "1acc" in k]
    assert len(timed) == len(row["variant_configs"]) and row["tuned_us"] > 0
    assert all(c["acc8_first"] for c in row["variant_configs"].values())
    assert "Variant study `one_acc`" in next(tmp_path.glob("gemm_*.md")).read_text()


def test_smoke_park_study(tmp_path):
    """Parked-partial variants: int32 sums exact, every output element within its bound,
    all timed, the markdown lists the study."""
    _, res = _smoke(tmp_path, "--park")
    assert res["park_exact"] and all(res["park_exact"].values())
    assert all(v == 0 for v in res["park_bad_elements"].values())
    [row] = res["park"]
    timed = [k for k in row if k.endswith("_us") and "park" in k]
    assert len(timed) == len(row["variant_configs"]) and row["tuned_us"] > 0
    assert all(c["park_out"] for c in row["variant_configs"].values())
    assert "Variant study `park`" in next(tmp_path.glob("gemm_*.md")).read_text()


def test_smoke_unpack_study(tmp_path):
    _, res = _smoke(tmp_path, "--unpack")
    [row] = res["unpack"]
    assert row["equal"] and row["bytes_us"] > 0 and row["words_us"] > 0 and row["gemm_us"] > 0


def test_smoke_a16_study(tmp_path):
    """W4A16: the device check agrees with the reference; every candidate schedule is timed."""
    bench, res = _smoke(tmp_path, "--a16")
    rows = res["a16"]
    assert [r["m"] for r in rows] == [1, 40]
    for r in rows:
        assert r["check_rel_err"] < 1e-5
        assert r["bf16_us"] > 0 and r["w4ax_us"] > 0 and r["best_us"] <= r["default_us"]
        assert len(r["configs"]) == len(bench.a16_candidates(r["m"], r["n"], r["k"]))
    assert "W4A16 GEMM" in (tmp_path / f"gemm_{res['meta']['date']}.md").read_text()


def test_smoke_unpacked_study(tmp_path):
    """The unpacked-operand study: act_quant bytes equal, GEMM outputs equal, all timed."""
    _, res = _smoke(tmp_path, "--unpacked")
    [row] = res["unpacked"]
    assert "error" not in row, row.get("error")
    assert row["act_quant_mismatch"] == [0, 0] and row["max_abs_diff"] == 0.0
    assert row["rel_err_ref"] < 1e-6
    for key in ("packed_us", "unpacked_us", "act_quant_unpacked_us", "bf16_us", "int8_us"):
        assert row[key] > 0
    assert "unpacked operand" in next(tmp_path.glob("gemm_*.md")).read_text()


def test_smoke_swiglu_study(tmp_path):
    """The down-projection input study: in interpret mode all three variants give the CPU
    reference's bytes (no mismatch), each is timed, and the table is written."""
    _, res = _smoke(tmp_path, "--swiglu", "--gather")
    [g] = res["gather"]
    for v in ("random", "sorted", "identity"):
        assert g[f"{v}_mismatch_vs_cpu"] == [0, 0], v
        assert g[f"{v}_us"] > 0, v
    [row] = res["swiglu"]
    for v in ("unfused_gather", "unfused_identity", "fused"):
        assert row[f"{v}_mismatch_vs_cpu"] == [0, 0], v
        assert row[f"{v}_us"] > 0, v
    assert row["fused_vs_unfused_elements"] == 0
    [md] = tmp_path.glob("gemm_*.md")
    assert "SwiGLU + act_quant" in md.read_text() and "gather order" in md.read_text()


def test_smoke_out_rows_and_act_quant_launch_studies(tmp_path):
    """--out-rows: the engine's large-M path checked against the reference (act_quant's
    bytes and, within XLA's last-bit differences of rms_inv between fusions, its scales,
    with bf16 RMSNorm weights; its GEMM factors exactly; every GEMM element within
    tolerance) with its output shape; --act-quant-launch: every launch variant's bytes equal
    the default launch's, and each is timed."""
    _, res = _smoke(tmp_path, "--out-rows", "--act-quant-launch")
    [row] = res["out_rows"]
    assert row["bad"] == 0 and row["shape"] == [row["m"], row["n"]] and row["us"] > 0
    mismatch = row["act_quant_mismatch"]
    assert row["norm"] and mismatch[0] == 0 and mismatch[2] == 0
    assert row["x_scales_max_rel"] <= 2.0**-22  # one f32 ulp at most
    assert len(res["act_quant_launch"]) == 2
    for r in res["act_quant_launch"]:
        variants = [k[: -len("_us")] for k in r if k.startswith("bm") and k.endswith("_us")]
        assert len(variants) == 2
        assert all(r[f"{v}_mismatch"] == [0, 0] for v in variants)


def test_gate_up_table():
    """The --gate-up study's markdown: a measured row (the H100 file's first case) with its
    times, ratio and checks, and a declined case with its reason."""
    bench = experiment_scripts.load("bench_gemm")
    row = dict(
        m=1216, n=14336, k=4096, separate_us=272.2, fused_us=268.7, separate_gemms_us=227.2,
        fused_gemm_us=239.4, fused_vs_separate=272.2 / 268.7, hidden_elements_differing=0,
        hidden_bad_vs_f32=40, down_operand_bytes_differing=0,
    )  # fmt: skip
    declined = dict(m=5, n=256, k=256, error="RuntimeError: no w_regs schedule")
    meta = dict(date="2026-11-28", device="H100", jax="0.11.2")
    md = bench.markdown(dict(meta=meta, check=[], sweep=[], ablation=[], gate_up=[row, declined]))
    assert "| 1216 | 14336 x 4096 | 272.2 | 268.7 | 227.2 | 239.4 | 1.013 | 0 | 40 | 0 |" in md
    assert "| 5 | 256 x 256 | RuntimeError: no w_regs schedule |" in md


def test_smoke_act_quant_build_study(tmp_path):
    """The build study: this build, its SwiGLU with ``silu_approx`` flipped (interpret mode:
    XLA's logistic either way), its permuted layout in the other form (``scatter``) and an
    earlier act_quant.py loaded from a file all give the reference's bytes and are timed,
    also under the identity order (perm None: no scatter form); cases are chosen by name
    (an unknown one is refused, naming the known ones); a file without act_quant() is
    refused by name."""
    import pathlib

    import pytest

    from pallas_kernels import act_quant as aq

    baseline = tmp_path / "old_act_quant.py"
    baseline.write_text(pathlib.Path(aq.__file__).read_text())
    _, res = _smoke(
        tmp_path, "--act-quant-build", "--act-quant-baseline", str(baseline),
        "--act-quant-cases", "2222-stored,8192-stored,2222-identity,2222-swiglu",
    )  # fmt: skip
    plain, identity, gated = res["act_quant_build"]  # the two stored cases: one tiny shape
    assert not plain["gated"] and not identity["gated"] and gated["gated"]
    assert identity["perm_order"] == "identity"
    for name in ("default", "baseline_old_act_quant"):
        assert identity[f"{name}_mismatch"] == 0 and identity[f"{name}_scale_mismatch"] == 0
    assert not any(key.startswith("scatter_") for key in identity)
    flip = f"silu_approx_{not gated['silu_approx_default']}"
    old = "baseline_old_act_quant"
    scatter = f"scatter_{not aq.UNPACKED_SCATTER}"
    assert plain["perm_order"] == "stored"
    for row, names in ((plain, ("default", old, scatter)), (gated, ("default", old, flip))):
        for name in names:
            assert f"{name}_error" not in row, row.get(f"{name}_error")
            assert row[f"{name}_mismatch"] == 0 and row[f"{name}_scale_mismatch"] == 0, name
            assert row[f"{name}_us"] > 0
            assert name == "default" or row[f"{name}_vs_default_mismatch"] == 0
    assert f"{flip}_us" not in plain and f"{scatter}_us" not in gated  # no SwiGLU / no perm
    assert plain["default_tbps"] == pytest.approx(plain["bytes_moved_mb"] / plain["default_us"])
    bench = experiment_scripts.load("bench_gemm")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no act_quant"):
        bench.load_module_file(str(empty))
    with pytest.raises(ValueError, match="choose from 2222-stored"):
        bench.act_quant_build_study({}, float("inf"), cases="2222-stored,4096-stored")


def test_w_regs_schedules_of_each_choice():
    """--mgpu-w-regs CHOICE: the fixed sets, the wave-fitted token tiles at the study's M
    (act_quant's 256-row padding), the table's schedule with each other tile-order band, and
    nothing when off (or, for snake, without a table schedule)."""
    from pallas_kernels.w4ax_mgpu import MgpuConfig, wave_fit_schedules

    bench = experiment_scripts.load("bench_gemm")
    pick = bench._w_regs_schedules
    assert pick("tiles", 8192, 4096, None) == [MgpuConfig(**f) for f in bench.MGPU_W_REGS_CONFIGS]
    decode = [MgpuConfig(**f) for f in bench.MGPU_W_REGS_DECODE_CONFIGS]
    assert pick("decode", 1216, 4096, None) == decode
    assert pick("fit", 2224, 4096, None) == wave_fit_schedules(2224, 4096, row_align=256)
    table = MgpuConfig(block_n=192, w_regs=True, park_int8=True)
    snakes = pick("snake", 2224, 4096, table)
    assert [c.snake for c in snakes] == list(bench.MGPU_SNAKES)
    assert all(c == dataclasses.replace(table, snake=c.snake) for c in snakes)
    assert pick("snake", 2224, 4096, None) == [] and pick("", 2224, 4096, table) == []
