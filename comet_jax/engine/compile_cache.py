"""Persistent XLA compilation cache for engine start-up.

An engine compiles one executable per step shape ahead of time (`LLMEngine.compile_all`); on the
H100 that took 92 s (bf16) to 215 s (W4AxKV4 with its Pallas kernels) for the LLaMA-3-8B
benchmark engine (docs/benchmarks.md). With the cache on, a later process that builds the same
engine (same model shapes, precision, buckets, jax version and device) loads the executables
from disk instead. The CLI turns it on by default (`--compile_cache DIR`, `none` to disable).

    from comet_jax.engine import compile_cache
    compile_cache.enable()           # $COMET_JAX_COMPILE_CACHE, else ~/.cache/comet_jax/xla
    compile_cache.enable("/scratch/xla", min_compile_secs=0)
    compile_cache.disable()
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _cc

ENV_VAR = "COMET_JAX_COMPILE_CACHE"
DEFAULT_DIR = "~/.cache/comet_jax/xla"
_OFF = ("", "none", "off")


def enable(path: str | os.PathLike | None = None, *, min_compile_secs: float = 0.5) -> Path | None:
    """Caches every later compilation taking >= ``min_compile_secs`` under ``path``.

    ``path`` None: ``$COMET_JAX_COMPILE_CACHE``, else ``~/.cache/comet_jax/xla``. A path of
    ``""``, ``"none"`` or ``"off"`` turns the cache off instead. Returns the directory in use
    (None when off).
    """
    if path is None:
        path = os.environ.get(ENV_VAR, DEFAULT_DIR)
    if str(path).strip().lower() in _OFF:
        disable()
        return None
    if min_compile_secs < 0:
        raise ValueError(f"min_compile_secs={min_compile_secs!r} must be >= 0")
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"compile cache path {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    _cc.set_cache_dir(str(directory))
    _cc.reset_cache()  # re-read the settings at the next compilation, even after earlier ones
    return directory


def disable() -> None:
    """No persistent cache for later compilations."""
    jax.config.update("jax_compilation_cache_dir", None)
    _cc.reset_cache()
