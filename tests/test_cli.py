"""`comet-jax` CLI: help texts, gin bindings, generate / quantize / bench on a tiny model."""

import json

import pytest

from comet_jax import cli

TINY_ENGINE = [
    "--compute_dtype",
    "float32",
    "--num_pages",
    "32",
    "--max_model_len",
    "128",
    "--max_tokens_per_step",
    "32",
]


@pytest.mark.parametrize(
    "command, needles",
    [
        ("quantize", ["--recipe", "--calib_windows", "--out", "--gin_file"]),
        (
            "generate",
            [
                "--max_tokens",
                "--temperature",
                "--top_p",
                "--stop",
                "--max_batch",
                "--num_pages",
                "--gin_param",
            ],
        ),
        ("serve", ["--host", "127.0.0.1", "--port", "--max_waiting", "--page_size"]),
        ("eval", ["--corpus", "--window", "--max_windows"]),
    ],
)
def test_every_command_explains_its_options(command, needles, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for n in needles:
        assert n in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for c in ("quantize", "generate", "serve", "eval", "bench", "random:PRESET"):
        assert c in text


def test_gin_bindings_apply_and_flags_win():
    args = cli.build_parser().parse_args(
        [
            "generate",
            "x",
            "--max_batch",
            "3",
            "--gin_param",
            "EngineConfig.max_model_len = 96",
            "--gin_param",
            "EngineConfig.max_batch = 7",
        ]
    )
    cfg = cli._engine_config(args, cli._configure(args))
    assert cfg.max_model_len == 96 and cfg.max_batch == 3


def test_max_prefill_grid_flag():
    parse = cli.build_parser().parse_args
    args = parse(["generate", "x", "--max_prefill_seqs", "4", "--max_tokens_per_step", "64"])
    assert cli._engine_config(args, cli._configure(args)).prefill_grid_limit == 128
    args = parse(["generate", "x", "--max_prefill_seqs", "4", "--max_tokens_per_step", "64",
                  "--max_prefill_grid", "256"])  # fmt: skip
    assert cli._engine_config(args, cli._configure(args)).prefill_grid_limit == 256


def test_compile_workers_flag():
    import os

    parse = cli.build_parser().parse_args
    args = parse(["generate", "x"])
    cfg = cli._engine_config(args, cli._configure(args))
    assert cfg.compile_workers is None
    assert cfg.resolved_compile_workers == max(1, min(8, os.cpu_count() or 1))
    args = parse(["generate", "x", "--compile_workers", "3"])
    assert cli._engine_config(args, cli._configure(args)).resolved_compile_workers == 3
    args = parse(["generate", "x", "--compile_workers", "0"])
    with pytest.raises(ValueError, match="compile_workers=0"):
        cli._engine_config(args, cli._configure(args))


def test_prefill_dequantize_flag():
    parse = cli.build_parser().parse_args
    for argv, want in (
        ([], True),
        (["--no-prefill_dequantize"], False),
        (["--prefill_dequantize"], True),
    ):
        args = parse(["generate", "x", *argv])
        assert cli._engine_config(args, cli._configure(args)).prefill_dequantize is want, argv


def test_gc_freeze_flag_default_on_in_the_cli():
    """The CLI's engines freeze the collector's start-up objects unless --no-gc_freeze;
    generate unfreezes them when it is done (LLMEngine.close)."""
    import gc

    parse = cli.build_parser().parse_args
    for argv, want in (([], True), (["--no-gc_freeze"], False), (["--gc_freeze"], True)):
        args = parse(["generate", "x", *argv])
        assert cli._engine_config(args, cli._configure(args), gc_freeze=True).gc_freeze is (want), (
            argv
        )
    args = ["generate", "--model", "random:tiny", "Hi", "--max_tokens", "2", *TINY_ENGINE]
    assert cli.main(args) == 0
    assert gc.get_freeze_count() == 0


def test_gc_full_collections_held_off_by_default_in_the_cli(monkeypatch):
    """The CLI's engines hold Python's full collections off (every GC_FULL_EVERY_STEPS steps
    at the latest, and at each drain) unless --gc_full_every_steps says otherwise; close()
    gives Python its thresholds back."""
    import gc

    parse = cli.build_parser().parse_args
    args = parse(["generate", "x"])
    assert cli._engine_config(args, cli._configure(args)).gc_full_every_steps == 0  # library
    cases = (([], cli.GC_FULL_EVERY_STEPS), (["--gc_full_every_steps", "0"], 0),
             (["--gc_full_every_steps", "7"], 7))  # fmt: skip
    for argv, want in cases:
        args = parse(["generate", "x", *argv])
        cfg = cli._engine_config(
            args, cli._configure(args), gc_full_every_steps=cli.GC_FULL_EVERY_STEPS
        )
        assert cfg.gc_full_every_steps == want, argv
    assert cli.GC_FULL_EVERY_STEPS == 1000
    from comet_jax.engine.engine import LLMEngine

    built, build = [], LLMEngine.build.__func__

    def spy(cls, *a, **kw):  # the config the command's engine is built with
        engine = build(cls, *a, **kw)
        built.append(engine)
        return engine

    monkeypatch.setattr(LLMEngine, "build", classmethod(spy))
    before = gc.get_threshold()
    args = ["generate", "--model", "random:tiny", "Hi", "--max_tokens", "2", *TINY_ENGINE]
    assert cli.main(args) == 0
    assert [e.config.gc_full_every_steps for e in built] == [cli.GC_FULL_EVERY_STEPS]
    assert built[0].gc_full_collections >= 1  # the one at the drain
    assert gc.get_threshold() == before


def test_bad_gin_binding_fails_before_compute():
    args = cli.build_parser().parse_args(
        ["generate", "x", "--gin_param", "EngineConfig.no_such_field = 1"]
    )
    with pytest.raises(Exception, match="no_such_field"):
        cli._configure(args)


def test_generate_tiny_random(capsys):
    assert (
        cli.main(
            [
                "generate",
                "--model",
                "random:tiny",
                "Hi",
                "--max_tokens",
                "5",
                "--ignore_eos",
                *TINY_ENGINE,
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "5 tokens in" in err and "compiled 2 step shapes" in err


def test_quantize_then_generate_from_checkpoint(tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        cli.main(["quantize", "--model", "random:tiny", "--recipe", "w8a8", "--out", str(out)]) == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "random:tiny"
    assert meta["recipe"]["name"] == "w8a8"
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(out),
                "Hi",
                "a b",
                "--max_tokens",
                "3",
                "--ignore_eos",
                *TINY_ENGINE,
            ]
        )
        == 0
    )
    assert "### a b" in capsys.readouterr().out


def test_recipe_recent_window_reaches_the_engine(tmp_path, capsys):
    """A checkpoint whose recipe keeps a float KV window (gin-built recipe: float weights,
    KV4, kv_recent_window=4) is served with that window by the paged INT4 cache."""
    out = tmp_path / "w"
    params = ["QuantRecipe.name='kv4win'", "QuantRecipe.kv4=True"]
    params += ["QuantRecipe.kv_group=64", "QuantRecipe.kv_recent_window=4"]
    argv = ["quantize", "--model", "random:tiny", "--out", str(out)]
    assert cli.main(argv + [a for p in params for a in ("--gin_param", p)]) == 0
    lm = cli.load_model(str(out))
    assert (lm.kv_dtype, lm.kv_recent_window) == ("int4", 4)
    gen = ["generate", "--model", str(out), "Hi there", "--max_tokens", "3", "--ignore_eos"]
    assert cli.main(gen + TINY_ENGINE + ["--kv_group", "64"]) == 0
    err = capsys.readouterr().err
    assert "4-token float recent window" in err and "3 tokens in" in err


def test_bench_tiny_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    assert (
        cli.main(["bench", "--tiny", "--quiet", "--precisions", "bf16,w4axkv4", "--out", str(path)])
        == 0
    )
    record = json.loads(path.read_text())
    rows = {r["precision"]: r for r in record["results"]}
    assert set(rows) == {"bf16", "w4axkv4"}
    for row in rows.values():
        assert row["status"] == "ok"
        assert [r["batch_reached"] for r in row["fixed_batch"]] == [4, 8]
        assert all(r["output_tok_per_s"] > 0 for r in row["max_throughput"])


def test_unknown_model_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "random:nope", "x", *TINY_ENGINE])
    assert e.value.code == 2
    assert "preset" in capsys.readouterr().err
