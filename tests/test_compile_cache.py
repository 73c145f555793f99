"""Persistent compilation cache (comet_jax.engine.compile_cache) and the CLI flag.

Contract: with the cache on, building the same engine a second time compiles nothing new: the
cache directory gains no entries and jax reports cache hits; off, nothing is written.
"""

from __future__ import annotations

import jax
import pytest

from comet_jax import cli
from comet_jax.engine import compile_cache
from comet_jax.engine.engine import LLMEngine
from comet_jax.engine.runner import preset_config
from models.llama import LlamaForCausalLM, init_params
from tests.test_engine import CFG


@pytest.fixture
def hits():
    """Counts jax's persistent-cache hit events while the test runs."""
    from jax import monitoring

    events = []

    def listener(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            events.append(event)

    monitoring.register_event_listener(listener)
    yield events
    monitoring.unregister_event_listener(listener)


def test_second_engine_build_loads_from_the_cache(tmp_path, hits):
    cfg = preset_config("tiny")
    params = init_params(LlamaForCausalLM(cfg), jax.random.key(0))
    try:
        assert compile_cache.enable(tmp_path / "xla", min_compile_secs=0) == tmp_path / "xla"
        LLMEngine.build(cfg, params, CFG, progress=False)
        entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
        assert entries, "the first build wrote no cache entries"
        assert not hits
        LLMEngine.build(cfg, params, CFG, progress=False)
        assert sorted(p.name for p in (tmp_path / "xla").iterdir()) == entries
        assert hits, "the second build did not load from the cache"
    finally:
        compile_cache.disable()
    n = len(hits)
    LLMEngine.build(cfg, params, CFG, progress=False)  # off again: no hits, no new entries
    assert len(hits) == n


def test_off_values_and_bad_path(tmp_path, monkeypatch):
    for off in ("none", "off", ""):
        assert compile_cache.enable(off) is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "none")
    assert compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    try:
        assert compile_cache.enable() == tmp_path / "env"
    finally:
        compile_cache.disable()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        compile_cache.enable(tmp_path / "file")
    with pytest.raises(ValueError, match="min_compile_secs"):
        compile_cache.enable(tmp_path / "d", min_compile_secs=-1)


def test_cli_flag_parses():
    args = cli.build_parser().parse_args(["generate", "x", "--compile_cache", "none"])
    assert args.compile_cache == "none"
    assert cli.build_parser().parse_args(["serve"]).compile_cache is None
