"""experiments/bench_host.py: the engine's host path at large batch with an instant runner."""

from __future__ import annotations

import json

import pytest

from tests import experiment_scripts


@pytest.fixture(scope="module")
def bench():
    return experiment_scripts.load("bench_host")


def test_cases_stream_every_token_and_free_every_page(bench, tmp_path):
    out = tmp_path / "host.json"
    bench.main(["--cases", "40:20/6,9:300/4", "--repeats", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["workload"]) for r in rows] == [(40, "20/6"), (9, "300/4")]
    for r in rows:
        assert r["tokens"] == r["batch"] * int(r["workload"].split("/")[1])
        assert r["steps"] > 0 and r["host_ms_per_step"] > 0 and len(r["runs_ms_per_step"]) == 2
    # The stand-in runner serves the engine's real schedule: every request's prompt is
    # prefilled in chunks within the step budget and the batch decodes together.
    eng = bench.engine_for(40, 20, 6)
    assert eng.config.max_prefill_seqs == 40 and eng.config.decode_buckets[-1] == 40
    bench.main(["--cases", "40:20/6", "--repeats", "1", "--sync", "--out", str(out)])
    (sync,) = json.loads(out.read_text())["rows"]
    assert not sync["async_scheduling"] and rows[0]["async_scheduling"]
    assert sync["tokens"] == 240 and sync["steps"] < rows[0]["steps"]  # no trailing step


def test_gc_pauses_are_timed_and_the_freeze_is_released(bench):
    """Each row reports the collector's pauses during the run by generation (a forced full
    collection inside the timed window shows up); the engine freezes by default and its
    close() leaves nothing frozen; --no-gc-freeze runs without the freeze."""
    import gc

    with bench.GcPauses() as pauses:
        gc.collect()
    full = pauses.summary()["gen2"]
    assert full["count"] == 1 and full["total_ms"] == full["max_ms"] > 0
    row = bench.run_case(40, 20, 6)
    assert row["gc_freeze"] and gc.get_freeze_count() == 0
    assert all(p["count"] >= 1 and p["max_ms"] >= 0 for p in row["gc_pauses"].values())
    assert not bench.run_case(40, 20, 6, gc_freeze=False)["gc_freeze"]
    held = bench.run_case(40, 20, 6, gc_full_every_steps=10**6)  # the engine's at drain only
    assert held["engine_full_collections"] == 1 and held["gc_pauses"]["gen2"]["count"] == 1


def test_instant_runner_counts_the_rows_the_gemms_would_run(bench):
    from comet_jax.engine.runner import StepInputs

    r = bench.InstantRunner(num_pages=9, out_size=8, pack_buckets=(8192,))
    dec = StepInputs.zeros(8, 1, 2)
    dec.num_valid[:5] = 1  # 5 decode rows in the batch-8 bucket
    assert r.run(dec).shape == (8,)
    grid = StepInputs.zeros(4, 1024, 2)
    grid.num_valid[:3] = [1024, 700, 20]  # a 4 x 1024 grid: not packed
    packed = StepInputs.zeros(4, 4096, 2)
    packed.num_valid[:2] = [4096, 100]  # 16384 grid positions > 8192: packed rows
    r.run(grid), r.run(packed)
    assert r.rows == {"decode": [8, 5, 1], "prefill": [4096 + 8192, 1744 + 4196, 2]}


def test_bucket_options_change_the_padding(bench, tmp_path):
    """Finer buckets, fewer padded rows: with a decode bucket per batch size no decode row is
    padding, and the prefill rows per token follow the prefill batch buckets."""
    out = tmp_path / "host.json"
    argv = ["--cases", "40:1024/12", "--repeats", "1", "--out", str(out)]  # 8 prompts a step
    bench.main(argv + ["--decode-buckets", "8,16", "--prefill-batch-buckets", "1"])
    (coarse,) = json.loads(out.read_text())["rows"]
    exact = ",".join(map(str, range(1, 41)))
    bench.main(argv + ["--decode-buckets", exact, "--prefill-batch-buckets", exact])
    (fine,) = json.loads(out.read_text())["rows"]
    assert coarse["decode_buckets"] == [8, 16, 40] and coarse["prefill_batch_buckets"] == [1, 8]
    assert fine["decode_rows_per_token"] == 1.0 < coarse["decode_rows_per_token"]
    assert fine["prefill_rows_per_token"] <= coarse["prefill_rows_per_token"]
    assert fine["decode_tokens"] == coarse["decode_tokens"]  # the same schedule
    # Packed rows in 1024-row buckets: the 8 x 1024 grids whose steps hold fewer prompt tokens
    # (decode rows take part of the budget) run on fewer rows.
    bench.main(argv + ["--pack-buckets", ",".join(map(str, range(1024, 8192, 1024)))])
    (packed,) = json.loads(out.read_text())["rows"]
    assert packed["pack_buckets"] == list(range(1024, 8193, 1024))
    assert packed["prefill_rows_per_token"] < coarse["prefill_rows_per_token"]
    assert packed["prefill_tokens"] == coarse["prefill_tokens"]
    for bad in ("8,x", "16,8", "0,8"):
        with pytest.raises(SystemExit, match="--decode-buckets"):
            bench.main(argv + ["--decode-buckets", bad])


@pytest.mark.parametrize("bad", ["40", "40:20", "x:20/6", "0:20/6"])
def test_bad_cases_are_named(bench, bad):
    with pytest.raises(SystemExit, match="--cases item"):
        bench.main(["--cases", bad, "--repeats", "1"])


def test_prefill_first_schedule_decodes_in_full_batches(bench, tmp_path):
    """--schedule prefill_first: all 40 prompts (8 per step) are prefilled before any decode
    row runs, then every decode call holds the whole batch (5 calls of 40 rows for 6 output
    tokens, the first one sampled by the prefill); the mixed schedule decodes in more,
    partial calls."""
    out = tmp_path / "host.json"
    argv = ["--cases", "40:1024/6", "--repeats", "1", "--out", str(out)]
    bench.main(argv + ["--schedule", "prefill_first"])
    (first,) = json.loads(out.read_text())["rows"]
    bench.main(argv)
    (mixed,) = json.loads(out.read_text())["rows"]
    assert first["schedule"] == "prefill_first" and mixed["schedule"] == "mixed"
    assert (first["decode_calls"], first["decode_tokens_per_call"]) == (5, 40)
    assert first["tokens"] == mixed["tokens"] == 240
    assert mixed["decode_calls"] > first["decode_calls"]
