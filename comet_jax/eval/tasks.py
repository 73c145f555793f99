"""Sweep tasks: gin-configured experiment steps that return a flat dict of metrics.

A task is what ``comet_jax.sweep`` (and ``experiments/sweep.py --task``) calls after gin has
parsed the point's files and bindings. Tasks read their configuration only through
``gin_config.build`` (``QuantRecipe`` with its nested ``FMPQConfig``, and the task's own
:class:`PerplexityConfig`), so every knob of a sweep is a gin binding::

    python experiments/sweep.py --task comet_jax.eval.tasks:perplexity \
        --gin_file ablate_int8_budget --grid "FMPQConfig.int8_budget=0.0,0.12,0.25" \
        --out experiments/results/sweep_int8_budget.jsonl

Data: calibration on the FIRST ``calib_windows`` windows of the Austen corpus (or, with
``calib_corpus="mixed"``, half of them from the END of the Wikipedia corpus), evaluation on
the first ``max_windows`` windows of the Wikipedia corpus (``comet_jax.data.text``), fixed
non-overlapping windows of ``context`` tokens, the same split as ``experiments/accuracy_table``.
``model="random:PRESET"`` (e.g. ``random:tiny``) runs a random-weight model on random tokens:
a smoke setting for tests, its perplexities mean nothing.

Within one process the float model, the token ids, the calibration statistics (per model,
context and calibration size) and the quantized weights (GPTQ/LWC results keyed by weight and
Hessian digest) are cached, so a sweep over activation or KV settings calibrates once.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from comet_jax import gin_config
from comet_jax.quant.recipe import QuantRecipe

__all__ = ["PerplexityConfig", "perplexity", "int8_fraction", "clear_caches"]


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    """What the perplexity task runs on (gin: ``PerplexityConfig.max_windows = 4``).

    model: ``"smollm2"`` (the prepared GGUF), a ``.gguf`` path, or ``"random:PRESET"``.
    context: window length in tokens (perplexity and calibration).
    calib_windows: calibration windows.
    calib_corpus: where they come from: "austen" (the first Austen windows; the default) or
      "mixed" (the first half, rounded up, from Austen and the rest from the LAST Wikipedia
      windows, disjoint from the evaluated first ones; checked).
    max_windows: Wikipedia windows evaluated (the first ones).
    batch_size: windows per forward pass.
    seed: random weights / tokens of ``random:`` models.
    progress: show tqdm bars of calibration, quantization and evaluation.
    """

    model: str = "smollm2"
    context: int = 2048
    calib_windows: int = 32
    calib_corpus: str = "austen"
    max_windows: int = 16
    batch_size: int = 1
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        for name in ("context", "calib_windows", "max_windows", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PerplexityConfig.{name}={v!r} must be a positive int")
        if self.context < 2:
            raise ValueError(f"PerplexityConfig.context={self.context} must be >= 2")
        if self.calib_corpus not in CALIB_CORPORA:
            raise ValueError(
                f"PerplexityConfig.calib_corpus={self.calib_corpus!r}: expected one of "
                f"{CALIB_CORPORA}"
            )


CALIB_CORPORA = ("austen", "mixed")


def calibration_windows(cfg: PerplexityConfig, austen, wiki) -> np.ndarray:
    """``[calib_windows, context] int32`` calibration windows of ``cfg.calib_corpus``.

    "mixed" takes its Wikipedia share from the end of the corpus and raises when it would
    overlap the ``max_windows`` evaluated windows at the start.
    """
    from comet_jax.data import text

    if cfg.calib_corpus == "austen":
        return text.token_windows(austen, cfg.context, cfg.calib_windows)
    n_wiki = cfg.calib_windows // 2
    n_austen = cfg.calib_windows - n_wiki
    parts = [text.token_windows(austen, cfg.context, n_austen)]
    if n_wiki:
        total = len(wiki) // cfg.context
        if cfg.max_windows + n_wiki > total:
            raise ValueError(
                f"calib_corpus='mixed': {n_wiki} Wikipedia calibration windows + "
                f"{cfg.max_windows} evaluation windows exceed the {total} windows of "
                f"{cfg.context} tokens in the corpus"
            )
        tail = np.asarray(wiki)[(total - n_wiki) * cfg.context : total * cfg.context]
        parts.append(text.token_windows(tail, cfg.context, n_wiki))
    return np.concatenate(parts)


def _register() -> None:
    # PerplexityConfig is configurable once this module is imported (the sweep runner imports
    # the task before parsing gin). Once gin_config.CONFIGURABLES lists it, register_all
    # registers it (and the CLI accepts its bindings too); registering here as well would
    # register it twice.
    import gin

    if f"{__name__}:PerplexityConfig" in gin_config.CONFIGURABLES:
        return
    reg = gin_config.register_all()
    if PerplexityConfig not in reg:
        reg[PerplexityConfig] = gin.external_configurable(PerplexityConfig, module="comet_jax")


_register()

# -- per-process caches ------------------------------------------------------------------------
_MODELS: dict[tuple, tuple] = {}  # (model, seed[, windows]) -> (config, params, austen, wiki)
_STATS: dict[tuple, object] = {}  # (model, seed, context, calib_windows) -> CalibStats
_WEIGHTS: dict[tuple[str, int], dict] = {}  # quantize_model's weight_cache per model


def clear_caches() -> None:
    """Drops the cached models, statistics and quantized weights (frees memory)."""
    _MODELS.clear()
    _STATS.clear()
    _WEIGHTS.clear()


def _load(cfg: PerplexityConfig):
    key = (cfg.model, cfg.seed)
    if cfg.model.startswith("random:"):  # random tokens are drawn for these window counts
        key += (cfg.context, cfg.calib_windows, cfg.max_windows)
    if key in _MODELS:
        return _MODELS[key]
    if cfg.model.startswith("random:"):
        import jax

        from comet_jax.engine.runner import preset_config
        from models.llama import LlamaForCausalLM, init_params

        config = preset_config(cfg.model.split(":", 1)[1])
        params = init_params(LlamaForCausalLM(config), jax.random.key(cfg.seed))
        rng = np.random.default_rng(cfg.seed)
        n = cfg.context * (cfg.calib_windows + cfg.max_windows)
        austen = rng.integers(0, config.vocab_size, n).astype(np.int32)
        wiki = rng.integers(0, config.vocab_size, n).astype(np.int32)
    else:
        from pathlib import Path

        from comet_jax.checkpoint.gguf import load_gguf
        from comet_jax.checkpoint.hf import params_from_hf_tensors
        from comet_jax.data import text
        from comet_jax.tokenizer import Tokenizer
        from models.config import ModelConfig

        path = text.default_gguf_path() if cfg.model == "smollm2" else Path(cfg.model)
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(
                f"PerplexityConfig.model={cfg.model!r}: expected 'smollm2', an existing .gguf "
                "file or 'random:PRESET'"
            )
        hf_config, tensors = load_gguf(path)
        config = ModelConfig.from_hf(hf_config)
        params = params_from_hf_tensors(config, tensors)
        tok = Tokenizer.from_gguf(path)
        austen = text.corpus_token_ids(text.calibration_corpus(), tok)
        wiki = text.corpus_token_ids(text.evaluation_corpus(), tok)
    _MODELS[key] = (config, params, austen, wiki)
    return _MODELS[key]


def _stats(cfg: PerplexityConfig, recipe: QuantRecipe, config, params, austen, wiki):
    """Calibration statistics, reused across points; recollected only when a point needs the
    Hessian or the rotated statistics and the cached entry lacks them."""
    from comet_jax.calibrate import collect_stats

    need_h, need_rot = recipe.needs_hessian, recipe.rotation
    key = (cfg.model, cfg.seed, cfg.context, cfg.calib_windows, cfg.calib_corpus)
    cached = _STATS.get(key)
    if cached is not None:
        g = next(iter(cached.groups.values()))
        has_h, has_rot = g.hessian is not None, g.rot_absmax is not None
        if (has_h or not need_h) and (has_rot or not need_rot):
            return cached, 0.0, True
        need_h, need_rot = need_h or has_h, need_rot or has_rot
    windows = calibration_windows(cfg, austen, wiki)
    t0 = time.perf_counter()
    stats = collect_stats(
        config,
        params,
        windows,
        batch_size=cfg.batch_size,
        hessian=need_h,
        rotated=need_rot,
        progress=cfg.progress,
    )
    _STATS[key] = stats
    return stats, time.perf_counter() - t0, False


def _prepare():
    """(PerplexityConfig, QuantRecipe, quantized model pieces, timings) for the bound point."""
    from comet_jax.quant.convert import quantize_model

    cfg = gin_config.build(PerplexityConfig)
    recipe = gin_config.build(QuantRecipe)
    config, params, austen, wiki = _load(cfg)
    stats, calib_s, cached = None, 0.0, None
    if recipe.act == "fmpq" or recipe.needs_hessian:
        stats, calib_s, cached = _stats(cfg, recipe, config, params, austen, wiki)
    t0 = time.perf_counter()
    wcache = _WEIGHTS.setdefault((cfg.model, cfg.seed), {})
    qparams, plan, report = quantize_model(
        config, params, recipe, stats, progress=cfg.progress, weight_cache=wcache
    )
    timings = {
        "calib_seconds": calib_s,
        "calib_cached": cached,
        "quantize_seconds": time.perf_counter() - t0,
    }
    return cfg, recipe, config, (qparams, plan, report), wiki, timings


def _recipe_fields(recipe: QuantRecipe, report) -> dict:
    return {
        "recipe": recipe.name,
        "recipe_config": json.loads(recipe.to_json()),
        "int8_fraction": report.int8_fraction if recipe.act == "fmpq" else None,
        "int8_fraction_by_group": report.int8_fraction_by_group() if recipe.act == "fmpq" else None,
    }


def perplexity() -> dict:
    """Calibrate (Austen), quantize with the bound ``QuantRecipe``, evaluate Wikipedia ppl.

    Returns a flat dict: ``ppl``, ``nll``, ``n_tokens``, ``n_windows``, ``context``,
    ``int8_fraction`` (channel-weighted INT8 share of all linear inputs; None unless FMPQ),
    ``int8_fraction_by_group``, the recipe, and the calibration / quantization / evaluation
    seconds (``calib_cached``: statistics came from this process's cache).
    """
    import jax

    from comet_jax.data import text
    from comet_jax.eval.perplexity import perplexity as run_ppl
    from comet_jax.quant.convert import quantized_model

    cfg, recipe, config, (qparams, plan, report), wiki, timings = _prepare()
    windows = text.token_windows(wiki, cfg.context, cfg.max_windows)
    model = quantized_model(config, recipe, plan)
    res = run_ppl(
        model,
        jax.device_put(qparams),
        windows,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        desc=f"{recipe.name}/wikipedia",
    )
    return {
        "model": cfg.model,
        "ppl": res.ppl,
        "nll": res.nll,
        "n_tokens": res.n_tokens,
        "n_windows": res.n_windows,
        "context": res.window,
        "calib_windows": cfg.calib_windows,
        "calib_corpus": cfg.calib_corpus,
        **_recipe_fields(recipe, report),
        **timings,
        "eval_seconds": res.seconds,
    }


def int8_fraction() -> dict:
    """Plans and quantizes only (no evaluation): the INT8 share a rule/budget produces.

    Cheap companion of :func:`perplexity` for outlier-rule sweeps (``FMPQConfig.threshold``).
    """
    cfg, recipe, _, (_, _, report), _, timings = _prepare()
    return {
        "model": cfg.model,
        "calib_windows": cfg.calib_windows,
        "context": cfg.context,
        **_recipe_fields(recipe, report),
        **timings,
    }
