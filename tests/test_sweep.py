"""Sweep runner: grid expansion, resumability, error recording, bad bindings fail early."""

import json

import gin
import pytest

from comet_jax import sweep

CALLS = []


@gin.configurable(module="sweep_test")
def toy_params(a=1, b="x", fail=False):
    return dict(a=a, b=b, fail=fail)


def toy_task():
    p = toy_params()
    CALLS.append(p)
    if p["fail"]:
        raise RuntimeError("asked to fail")
    return {"score": p["a"] * 10.0, "b": p["b"]}


TASK = "tests.test_sweep:toy_task"


def test_parse_grid_arg_respects_brackets_and_quotes():
    assert sweep.parse_grid_arg("X.y=1, 2.5,'a,b',[1, 2]") == (
        "X.y",
        ("1", "2.5", "'a,b'", "[1, 2]"),
    )
    with pytest.raises(ValueError, match="must look like"):
        sweep.parse_grid_arg("X.y")
    with pytest.raises(ValueError, match="empty value"):
        sweep.parse_grid_arg("X.y=1,,2")


def test_sweep_runs_resumes_and_records(tmp_path):
    CALLS.clear()
    out = tmp_path / "r.jsonl"
    spec = sweep.SweepSpec(
        task=TASK, grid=(("toy_params.a", ("1", "2")), ("toy_params.b", ("'p'", "'q'")))
    )
    rows = sweep.run_sweep(spec, out, progress=False)
    assert len(rows) == 4 and len(CALLS) == 4
    assert sorted(r["result"]["score"] for r in rows) == [10.0, 10.0, 20.0, 20.0]
    assert all(r["env"]["jax"] and r["bindings"] for r in rows)
    # Resume: nothing runs again; extending the grid runs only the new points.
    sweep.run_sweep(spec, out, progress=False)
    assert len(CALLS) == 4
    spec2 = sweep.SweepSpec(
        task=TASK, grid=(("toy_params.a", ("1", "2", "3")), ("toy_params.b", ("'p'", "'q'")))
    )
    rows2 = sweep.run_sweep(spec2, out, progress=False)
    assert len(CALLS) == 6 and len(rows2) == 6
    table = sweep.summary_table(rows2, ["score"])
    assert table.count("\n") == 7 and "| a | b | score | s |" in table


def test_failed_point_is_recorded_and_retried(tmp_path):
    out = tmp_path / "r.jsonl"
    spec = sweep.SweepSpec(task=TASK, points=(("toy_params.fail = True",), ("toy_params.a = 7",)))
    rows = sweep.run_sweep(spec, out, progress=False)
    assert [r["result"]["score"] for r in rows] == [70.0]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert "RuntimeError: asked to fail" in lines[0]["error"]
    n = len(CALLS)
    sweep.run_sweep(spec, out, progress=False)
    assert len(CALLS) == n + 1  # only the failed point is retried


def test_bad_binding_fails_before_running(tmp_path):
    CALLS.clear()
    spec = sweep.SweepSpec(task=TASK, points=(("toy_params.nope = 1",),))
    with pytest.raises(ValueError, match="nope"):
        sweep.run_sweep(spec, tmp_path / "r.jsonl", progress=False)
    assert CALLS == []
