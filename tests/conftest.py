"""Shared pytest fixtures.

Real-data fixtures (`prepared_data`, `smollm2_tokenizer`, `smollm2_float`) skip the test with
a clear message when the data step (`python -m comet_jax.data.prepare`) has not run for the
data root (`$COMET_JAX_DATA`, else `~/.cache/comet_jax`). Mark such tests `@pytest.mark.data`.
"""

from __future__ import annotations

import os

# Eight host devices for the sharding tests; must be set before jax is first imported.
# Tests that need one device simply use jax.devices()[0].
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The suite is dominated by XLA:CPU compiles of tiny interpret-mode kernels, not by running
# them: LLVM's level 0 compiles them ~20% faster (set the flag yourself to test at another).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on a persistent XLA compilation cache under ~/.cache by default; tests do not
# write there (tests/test_compile_cache.py enables one in a temporary directory).
os.environ["COMET_JAX_COMPILE_CACHE"] = "none"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class PreparedData:
    root: Path  # the data root
    manifest: dict[str, Any]  # its manifest.json
    gguf_path: Path  # SmolLM2-135M-Instruct.Q4_1.gguf


def prepared_data_or_skip() -> PreparedData:
    """The prepared data root, or `pytest.skip` naming the command that prepares it."""
    from comet_jax.data import text

    root = text.data_root()
    if not text.is_prepared(root):
        pytest.skip(
            f"real model/text data not prepared under {root}: run "
            "`python -m comet_jax.data.prepare` (or set COMET_JAX_DATA to a prepared root)"
        )
    return PreparedData(root, text.load_manifest(root), text.default_gguf_path(root))


@pytest.fixture(scope="session")
def prepared_data() -> PreparedData:
    return prepared_data_or_skip()


@pytest.fixture(scope="session")
def smollm2_tokenizer(prepared_data):
    """`comet_jax.tokenizer.Tokenizer` rebuilt from the SmolLM2 GGUF (~2 s, once per session)."""
    from comet_jax.tokenizer import Tokenizer

    return Tokenizer.from_gguf(prepared_data.gguf_path)


@pytest.fixture(scope="session")
def smollm2_float(prepared_data):
    """`(hf_config, params)` of SmolLM2-135M dequantized to float32, HF names and RoPE order
    (~4 s and ~540 MB, once per session). Treat the arrays as read-only."""
    from comet_jax.checkpoint.gguf import load_gguf

    config, params = load_gguf(prepared_data.gguf_path)
    for arr in params.values():
        arr.flags.writeable = False  # shared by every test of the session
    return config, params
