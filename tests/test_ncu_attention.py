"""experiments/ncu_attention.py on the CPU: ncu's CSV -> per-launch rows mapped to variants."""

from __future__ import annotations

import csv
import io
import sys

import pytest

from experiments import ncu_attention as N

HEADER = ["ID", "Process ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit",
          "Metric Value"]  # fmt: skip


def _csv(rows) -> str:
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL)
    w.writerow(HEADER)
    for r in rows:
        w.writerow(r)
    return "==PROF== Connected to process\n" + out.getvalue()


def test_parse_maps_launches_to_variants_and_keeps_the_metrics():
    stall = "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"
    text = _csv(
        [
            ("0", "7", "kv4_paged_attention(...)", "SOL", "Duration", "us", "153.2"),
            ("0", "7", "kv4_paged_attention(...)", "Launch", "Registers Per Thread", "", "249"),
            ("0", "7", "kv4_paged_attention(...)", "cmd", stall, "", "0.78"),
            ("1", "7", "kv4_dequantize_pages", "SOL", "DRAM Throughput", "%", "35.6"),
            ("2", "7", "bf16_paged_attention", "Occupancy", "Achieved Occupancy", "%", "12.4"),
            ("3", "7", "mha_forward", "cmd", "smsp__inst_executed.sum", "inst", "79,208,448"),
        ]
    )
    rows = N.parse(text, ["decode_int4", "prefill_kv4", "prefill_mha"])
    assert [r["variant"] for r in rows] == ["decode_int4", "prefill_kv4", "prefill_kv4",
                                            "prefill_mha"]  # fmt: skip
    assert rows[0]["kernel"] == "kv4_paged_attention"
    assert rows[0]["duration"] == 153.2 and rows[0]["duration_unit"] == "us"
    assert rows[0]["regs"] == 249.0 and rows[0]["stall_long_scoreboard"] == 0.78
    assert rows[1]["dram_pct"] == 35.6 and rows[2]["occ_achieved_pct"] == 12.4
    assert rows[3]["smsp__inst_executed.sum"] == 79208448.0
    md = N.markdown({"date": "x"}, rows)
    assert "| decode_int4 | kv4_paged_attention | 153.2 us |" in md
    assert "long_scoreboard 0.78" in md


def test_parse_and_cli_reject_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="no ncu CSV header"):
        N.parse("==ERROR== profiling failed\n", ["decode_int4"])
    monkeypatch.setattr(sys, "argv", ["ncu_attention.py", "--variants", "decode_int9"])
    with pytest.raises(SystemExit, match="unknown variants"):
        N.main()
    monkeypatch.setattr(sys, "argv", ["ncu_attention.py"])
    monkeypatch.setattr(N.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="ncu .* is not on the PATH"):
        N.main()


def test_tensor_pipe_metrics_asked_for_only_where_known_and_reported(tmp_path):
    """The tensor metrics go on ncu's command line only if ``ncu --query-metrics`` lists
    their base names (a fake ncu here), and come back in the row and the markdown."""
    fake = tmp_path / "ncu"
    fake.write_text(
        "#!/bin/sh\necho 'Device NVIDIA H200'\necho 'Metric Name  Metric Description'\n"
        "echo 'sm__pipe_tensor_op_hmma_cycles_active  # of cycles where HMMA pipe was active'\n"
        "echo 'sm__inst_executed_pipe_tensor_op_imma  # of IMMA instructions'\n"
    )
    fake.chmod(0o755)
    got = N.known_metrics(str(fake), N.TENSOR_METRICS)
    assert got == [
        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_tensor_op_imma.sum",
    ]
    hmma = got[0]
    text = _csv([("0", "7", "kv4_paged_attention(...)", "cmd", hmma, "%", "61.5")])
    [row] = N.parse(text, ["decode_engine_qk_int8x2"])
    assert row[hmma] == 61.5 and row["variant"] == "decode_engine_qk_int8x2"
    assert f"- decode_engine_qk_int8x2: {hmma} 61.5" in N.markdown({"date": "x"}, [row])
    assert N.ENGINE_DECODE_KWARGS["decode_engine_qk_int8x2"] == dict(qk_int8=True, q_residual=True)
    assert set(N.ENGINE_DECODE_KWARGS) <= set(N.VARIANTS)
