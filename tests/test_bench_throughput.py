"""The throughput benchmark's CPU smoke run, and its decode-step profile (no GPU here: the
trace has no device kernels, so the profile must say so with zeros rather than invent any)."""

from __future__ import annotations

import json

import pytest

from tests import experiment_scripts


@pytest.fixture(scope="module")
def bench():
    return experiment_scripts.load("bench_throughput")


@pytest.mark.parametrize(
    "name,cat",
    [
        ("w4ax_k4_3072_k8_1024", "W4Ax GEMM (Pallas)"),
        ("kernel_mosaic_gpu_kernel", "W4Ax GEMM (Mosaic GPU)"),
        ("act_quant", "activation quantization (Pallas)"),
        ("kv4_paged_attention", "paged attention (Pallas)"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "cuBLAS GEMM"),
        ("loop_add_fusion_3", "XLA fusions (other)"),
        ("nvjet_sm90_tss_176x64_64x7_4x1_v_bz_TNN", "cuBLAS GEMM"),
        ("something_else", "other"),
    ],
)
def test_kernel_category(bench, name, cat):
    assert bench.kernel_category(name) == cat


def test_tiny_run_with_decode_profile(bench, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out)]
    argv += [
        "--profile-batch",
        "4",
        "--profile-steps",
        "2",
        "--keep-trace",
        "--modes",
        "sync,async",
    ]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["precision"], r["mode"]) for r in rows] == [("bf16", "sync"), ("bf16", "async")]
    assert (
        rows[1]["max_throughput"][0]["output_tokens"]
        == rows[0]["max_throughput"][0]["output_tokens"]
    )
    row = rows[0]
    assert row["status"] == "ok"  # the script asserts no KV page leaked, profile included
    assert all(r["gc_frozen"] > 0 for r in rows)  # --gc-freeze is on by default
    assert all(r["gc_full_every_steps"] == 1000 for r in rows)  # held off by default
    import gc

    assert gc.get_freeze_count() == 0  # each run's engine unfroze them when closed
    mem = row["step_memory"]  # XLA's memory analysis of every compiled step shape
    assert mem["pool_gib"] > 0 and mem["shapes"]
    for stats in mem["shapes"].values():
        assert stats["temp"] >= 0 and stats["argument"] > mem["pool_gib"]  # params + pool
        assert stats["alias"] >= mem["pool_gib"] * 0.999  # the donated pool is reused in place
    assert mem["max_temp_gib"] == max(m["temp"] for m in mem["shapes"].values())
    assert mem["scratch_gib"] >= mem["max_temp_gib"]  # + outputs not written in place
    prof = row["decode_profile"]
    assert prof["running"] == 4 and prof["steps"] == 2 and prof["step_wall_ms"] > 0
    assert prof["step_kernel_ms"] == 0.0 and prof["top_kernels_us"] == []  # CPU: no GPU plane
    assert 0 < prof["step_dispatch_ms"] <= prof["step_wall_ms"]
    assert prof["step_wall_untraced_ms"] > 0
    assert prof["host_gap_share"] == 1.0  # no GPU kernels on the CPU: the step is all host
    assert prof["timeline"]["kernels"] == 0 and "span_us" not in prof["timeline"]
    assert any("step" in name for name in prof["timeline"]["host_top_us"])
    assert (tmp_path / "r_bf16_async_decode.xplane.pb").stat().st_size > 0
    tput = row["max_throughput"][0]
    assert tput["output_tokens"] == tput["requests"] * tput["output_len"]
    for r, skipped in zip(rows, (0, 1)):  # by the kind of work each step waited for
        phases = r["max_throughput"][0]["step_phases"]  # (async: the previous step's)
        assert {"prefill", "decode"} <= set(phases) and "drain" not in phases
        steps = r["max_throughput"][0]["steps"]
        assert sum(p["steps"] for p in phases.values()) == steps - skipped
        for p in phases.values():
            assert p["wall_s"] > 0 and p["median_ms"] > 0 and 0 <= p["host_bound"] <= p["steps"]
        log = r["max_throughput"][0]["step_log"]
        assert len(log) == steps and all(w >= q >= 0 for _, w, q in log)


def test_replay_decode_after_each_workload(bench, tmp_path):
    """--replay-decode N: after each max-throughput workload its last decode call is
    dispatched N more times (inputs from the host, then on the device) and timed beside the
    engine's median decode step; the runner's run method is its own again afterwards, no
    page leaks (the script asserts it), and the same tokens are served as without it."""
    out = tmp_path / "rp.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out), "--fixed-batches="]
    argv += ["--modes", "sync,async"]
    assert bench.main(argv + ["--replay-decode", "3", "--replay-trace", "2"]) == 0
    rows = json.loads(out.read_text())["results"]
    for row in rows:
        assert row["status"] == "ok"
        for run in row["max_throughput"]:
            rep = run["replay_decode"]
            assert rep["steps"] == 3 and rep["batch"] >= 1
            assert rep["step_ms"] > 0 and rep["step_ms_inputs_on_device"] > 0
            # the CPU's trace holds no device kernels: zero kernel time, the wall time left
            tr = rep["traced"]
            assert tr["steps"] == 2 and tr["kernel_ms"] == 0 and tr["kernels"] == []
            assert rep["untraced_minus_kernels_ms"] == rep["step_ms_inputs_on_device"]
            assert rep["engine_median_ms"] == run["step_phases"]["decode"]["median_ms"]
            assert run["output_tokens"] == run["requests"] * run["output_len"]
    assert bench.main(argv) == 0
    plain = json.loads(out.read_text())["results"]
    assert all("replay_decode" not in r for row in plain for r in row["max_throughput"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        bench.replay_decode(None, None, None, 0)
    with pytest.raises(ValueError, match="trace_steps must be >= 0"):
        bench.replay_decode(None, None, None, 1, -1)
    with pytest.raises(SystemExit):  # argparse: --replay-trace needs --replay-decode
        bench.main(argv + ["--replay-trace", "2"])


def test_last_decode_call_records_and_restores(bench):
    """LastDecodeCall keeps the last [B, 1] call's inputs and prev, passes every call
    through, and leaves the runner's own method in place when closed."""
    import types

    import numpy as np

    class Runner:
        def run(self, inp, prev=None):
            return ("ran", inp.tokens.shape)

    runner = Runner()
    inp = types.SimpleNamespace
    decode, prefill = inp(tokens=np.zeros((4, 1))), inp(tokens=np.zeros((2, 16)))
    with bench.LastDecodeCall(runner) as last:
        assert runner.run(decode, "p") == ("ran", (4, 1))
        assert runner.run(prefill) == ("ran", (2, 16))
    assert last.inp is decode and last.prev == "p"
    assert "run" not in vars(runner) and runner.run(prefill) == ("ran", (2, 16))


def test_step_phases_attribute_waits_to_the_awaited_step(bench):
    """Asynchronous: a step's wall and wait belong to the previous step's work; synchronous:
    to its own. A traced window breaks the chain; waits under 1.5 ms count as host-bound."""
    log = [
        ("prefill", 0.010, 0.0),
        ("prefill", 0.100, 0.090),
        ("decode", 0.105, 0.095),
        ("decode", 0.050, 0.0007),
        ("traced", 0.0, 0.0),
        ("decode", 0.040, 0.0),
        ("decode", 0.048, 0.030),
        ("drain", 0.047, 0.040),
    ]
    a = bench.step_phases(log, asynchronous=True)
    assert set(a) == {"prefill", "decode"}
    assert a["prefill"]["steps"] == 2 and a["prefill"]["host_bound"] == 0
    assert a["prefill"]["wall_s"] == pytest.approx(0.205)
    assert a["decode"]["steps"] == 3 and a["decode"]["host_bound"] == 1
    assert a["decode"]["median_ms"] == pytest.approx(48.0)
    assert a["decode"]["median_wait_ms"] == pytest.approx(30.0)
    s = bench.step_phases(log, asynchronous=False)
    assert s["prefill"]["steps"] == 2 and s["decode"]["steps"] == 4 and s["drain"]["steps"] == 1
    assert s["decode"]["host_bound"] == 2 and s["prefill"]["host_bound"] == 1


def test_gpu_monitor_samples_parse(bench):
    """nvidia-smi CSV lines -> per-field statistics; "[N/A]" values are skipped; without
    nvidia-smi (this machine) the monitor reports None instead of numbers."""
    fields = ("clocks.sm", "power.draw")
    lines = ["1980, 650.5", "1755, [N/A]", "1830, 700.0"]
    got = bench.parse_gpu_samples(lines, fields)
    assert got["clocks.sm"] == {"samples": 3, "median": 1830.0, "min": 1755.0, "max": 1980.0}
    assert got["power.draw"]["samples"] == 2 and got["power.draw"]["max"] == 700.0
    import shutil

    if shutil.which("nvidia-smi") is None:
        with bench.GpuMonitor() as mon:
            pass
        assert mon.summary() is None


def test_trace_window_of_a_workload(bench, tmp_path):
    """--trace-window traces steps of the real workload; the run still completes in full."""
    out = tmp_path / "w.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out)]
    argv += ["--trace-window", "2,3", "--fixed-batches", "4"]
    assert bench.main(argv) == 0
    [row] = json.loads(out.read_text())["results"]
    first, second = row["max_throughput"]
    win = first["trace"]
    assert first["requests"] == 8  # --tiny's request count, whatever the window
    assert win["steps"] == 3 and win["step_wall_ms"] > 0 and win["tokens_per_step"] > 0
    assert win["prefill_calls"] + win["decode_calls"] >= 3
    assert win["step_kernel_ms"] == 0.0 and win["by_category_us"] == {}  # CPU: no GPU plane
    assert "trace" not in second
    assert first["output_tokens"] == first["requests"] * first["output_len"]


def test_several_trace_windows(bench, tmp_path):
    """Several START,STEPS pairs trace each window in order; bad pairs are refused."""
    out = tmp_path / "w2.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out), "--fixed-batches="]
    assert bench.main(argv + ["--trace-window", "1,2,5,3"]) == 0
    [row] = json.loads(out.read_text())["results"]
    [first, _] = row["max_throughput"]
    wins = first["trace"]
    assert [w["steps"] for w in wins] == [2, 3]
    assert first["requests"] == 8  # --tiny's request count, whatever the windows
    assert first["output_tokens"] == first["requests"] * first["output_len"]
    with pytest.raises(SystemExit):
        bench.main(argv + ["--trace-window", "1,2,5"])
    with pytest.raises(ValueError, match="non-overlapping"):
        bench.run_workload(None, 1, 4, 4, seed=0, trace=[(4, 3), (5, 1)])


def test_prefill_own_kv_runs_are_counted(bench, tmp_path):
    """--prefill-own-kv: the tiny batch's prefill calls without a prefix run on the own-K/V
    executables, and each run says how many did (at most one per step that prefilled);
    without it none."""
    out = tmp_path / "o.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out), "--fixed-batches="]
    for flag, own in (["--prefill-own-kv"], True), ([], False):
        assert bench.main(argv + flag) == 0
        [row] = json.loads(out.read_text())["results"]
        assert len(row["max_throughput"]) == 2  # --tiny's two workloads
        for run in row["max_throughput"]:
            phases = run["step_phases"]
            prefill_steps = sum(phases[k]["steps"] for k in ("prefill", "mixed") if k in phases)
            assert (0 < run["own_kv_calls"] <= prefill_steps) if own else run["own_kv_calls"] == 0
            assert run["output_tokens"] == run["requests"] * run["output_len"]


def test_silu_approx_flag_sets_and_records_the_kernel_default(bench, tmp_path, monkeypatch):
    """--silu-approx / --no-silu-approx set act_quant.SILU_APPROX_DEFAULT for the run (what the
    engine's fused SwiGLU calls then trace with) and the record says which; without either
    the kernel's own default stands."""
    from pallas_kernels import act_quant as aq

    own = aq.SILU_APPROX_DEFAULT
    monkeypatch.setattr(aq, "SILU_APPROX_DEFAULT", own)  # restored after the test
    out = tmp_path / "s.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out), "--fixed-batches="]
    argv += ["--workloads", "8/4"]
    for flag, want in ([], own), (["--silu-approx"], True), (["--no-silu-approx"], False):
        assert bench.main(argv + flag) == 0
        assert json.loads(out.read_text())["kernel_defaults"]["silu_approx"] is want
        assert aq.SILU_APPROX_DEFAULT is want


def test_max_batch_as_memory_allows(bench, tmp_path):
    """--max-batch memory --requests batch: each precision runs one full batch of as many
    sequences as its pool holds at the longest workload's length (tiny: 63 pages of 16 tokens,
    96-token sequences -> 10), with no preemption; a fixed decode bucket list gains that batch."""
    out = tmp_path / "m.json"
    argv = ["--tiny", "--precisions", "bf16", "--quiet", "--out", str(out), "--fixed-batches="]
    assert bench.main(argv + ["--max-batch", "memory", "--requests", "batch"]) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["max_batch_by_memory"] == 63 // 6 == row["max_batch"] == row["requests"]
    for r in row["max_throughput"]:
        assert r["requests"] == 10 and r["preemptions"] == 0
        assert r["output_tokens"] == 10 * r["output_len"]
    assert row["max_throughput"][0]["batch_reached"] == 10
    # The last decode bucket: the batch rounded up to --decode-row-align (8 by default).
    decode = sorted(int(k.split("x")[0]) for k in row["step_memory"]["shapes"] if "x1x" in k)
    assert decode == [8, 16]
    assert bench.main(argv + ["--max-batch", "memory", "--requests", "batch",
                              "--decode-row-align", "1"]) == 0  # fmt: skip
    [row] = json.loads(out.read_text())["results"]
    decode = sorted(int(k.split("x")[0]) for k in row["step_memory"]["shapes"] if "x1x" in k)
    assert decode == [8, 10] and row["max_throughput"][0]["batch_reached"] == 10
    # --max-batch-cap caps the batch memory allows (each decode bucket is a compiled shape).
    assert (
        bench.main(argv + ["--max-batch", "memory", "--requests", "batch", "--max-batch-cap", "6"])
        == 0
    )
    [row] = json.loads(out.read_text())["results"]
    assert row["max_batch_by_memory"] == 10 and row["max_batch"] == 6 == row["requests"]
    with pytest.raises(SystemExit):
        bench.main(argv + ["--max-batch", "lots"])
    with pytest.raises(SystemExit):
        bench.main(argv + ["--requests", "0"])


def test_table_compares_max_throughput_across_request_counts(bench, capsys):
    """With --max-batch memory each precision runs its own batch: "vs bf16" still compares the
    max-throughput runs of one workload; fixed batches compare at equal batch only."""

    def run(n, tok_s):
        return dict(requests=n, input_len=1024, output_len=512, batch_reached=n,
                    output_tok_per_s=tok_s, tpot_ms=1.0, engine_overhead=0.1, peak_mem_gib=1.0)  # fmt: skip

    ok = dict(mode="async", status="ok")
    rows = [
        dict(ok, precision="bf16", max_throughput=[run(277, 6000.0)], fixed_batch=[run(4, 100.0)]),
        dict(
            ok,
            precision="w4axkv4",
            max_throughput=[run(1214, 12000.0)],
            fixed_batch=[run(4, 150.0), run(8, 200.0)],
        ),
    ]
    bench.print_table(rows)
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if "w4axkv4" in ln]
    assert [(ln[1], ln[3], ln[6]) for ln in lines] == [
        ("max", "1214", "2.00"),
        ("fixed", "4", "1.50"),
        ("fixed", "8", "nan"),
    ]


def test_random_params_store_permutations_like_a_checkpoint(bench):
    """The random-weight W4AxKV4 model gathers attn_in, o_in and mlp_in at run time (down_in
    folded) with permutations in a calibrated checkpoint's stored form: a permutation whose
    INT4 and INT8 segments are each ascending, the INT8 segment a random channel set."""
    import dataclasses

    import numpy as np

    from comet_jax.engine.runner import precision_plan, preset_config
    from models.llama import LlamaForCausalLM
    from models.projection import PROJECTIONS_OF

    cfg = dataclasses.replace(  # widths of several 64-channel blocks: 25% INT8 is > 0
        preset_config("tiny"), hidden_size=256, intermediate_size=512, head_dim=64
    )
    plan = precision_plan(cfg, "w4axkv4", block=64)
    params = bench.random_params(LlamaForCausalLM(cfg, linear=plan))
    layer = params["layers_0"]
    assert set(g for g in ("attn_in", "o_in", "mlp_in", "down_in") if g in layer) == {
        "attn_in", "o_in", "mlp_in"
    }  # fmt: skip
    for g in ("attn_in", "o_in", "mlp_in"):
        perm = np.asarray(layer[g]["perm"])
        k8 = plan.backend_for(0, PROJECTIONS_OF[g][0]).k8
        k4 = perm.shape[0] - k8
        assert 0 < k8 < perm.shape[0]
        assert sorted(perm.tolist()) == list(range(perm.shape[0]))
        assert (np.diff(perm[:k4]) > 0).all() and (np.diff(perm[k4:]) > 0).all()
        assert perm[k4:].tolist() != list(range(k4, perm.shape[0]))  # not the identity
