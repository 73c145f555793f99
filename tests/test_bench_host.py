"""experiments/bench_host.py: the engine's host path at large batch with an instant runner."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "bench_host.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_host", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


@pytest.mark.parametrize("bad", ["40", "40:20", "x:20/6", "0:20/6"])
def test_bad_cases_are_named(bench, bad):
    with pytest.raises(SystemExit, match="--cases item"):
        bench.main(["--cases", bad, "--repeats", "1"])
