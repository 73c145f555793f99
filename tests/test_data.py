"""Data step: R lazy-load parsing, wiki markup stripping, manifest/idempotency, windows."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest

from comet_jax.data import prepare as prep
from comet_jax.data import text as dtext


# -- windows and token streams -------------------------------------------------------------------
def test_token_windows_non_overlapping_from_start():
    ids = np.random.default_rng(0).integers(0, 49152, size=1000)
    w = dtext.token_windows(ids, 128)
    assert w.shape == (7, 128) and w.dtype == np.int32  # 1000 // 128 = 7, tail of 104 dropped
    for i in range(7):
        np.testing.assert_array_equal(w[i], ids[i * 128 : (i + 1) * 128])
    assert dtext.token_windows(list(ids), 128, max_windows=3).shape == (3, 128)
    assert dtext.token_windows(ids, 1000).shape == (1, 1000)  # exact fit
    assert dtext.token_windows(ids, 7, max_windows=10_000).shape == (142, 7)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.arange(10), 11), "window=11"),
        ((np.arange(10), 0), "window"),
        ((np.arange(10), 2, 0), "max_windows"),
        ((np.zeros((2, 5)), 2), "1-D"),
    ],
)
def test_token_windows_errors(args, match):
    with pytest.raises(ValueError, match=match):
        dtext.token_windows(*args)


class _CharTokenizer:
    eos_id = 0

    def encode_batch(self, texts, add_bos=False):
        return [[ord(c) for c in t] for t in texts]


def test_corpus_token_ids_joins_documents_with_eos():
    docs = [dtext.Document("a", "A", "xy"), dtext.Document("b", "B", "z")]
    ids = dtext.corpus_token_ids(docs, _CharTokenizer())
    assert ids.tolist() == [ord("x"), ord("y"), 0, ord("z")] and ids.dtype == np.int32
    with pytest.raises(ValueError, match="documents"):
        dtext.corpus_token_ids([], _CharTokenizer())


# -- source parsers -------------------------------------------------------------------------------
def _rds_bytes(obj, tmp_path) -> bytes:
    import rdata

    p = tmp_path / "obj.rds"
    rdata.write_rds(p, obj, compression=None)
    return p.read_bytes()


def test_read_r_lazyload_db(tmp_path):
    books = {"emma": np.array(["EMMA", "", "Ünïcode line, 1815"]), "b": np.array(["x", "y"])}
    blob, variables = b"", {}
    for name, lines in books.items():
        raw = _rds_bytes(lines, tmp_path)
        entry = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    index = {"variables": variables, "references": {}, "compressed": True}
    (tmp_path / "db.rdb").write_bytes(blob)
    (tmp_path / "db.rdx").write_bytes(gzip.compress(_rds_bytes(index, tmp_path)))
    out = prep.read_r_lazyload_db(tmp_path / "db.rdx", tmp_path / "db.rdb")
    assert {k: list(v) for k, v in out.items()} == {k: list(v) for k, v in books.items()}


def test_strip_wikitext():
    markup = (
        "'''Anarchism''' is a [[political philosophy]]{{sfn|Doe|2001}} that "
        "[[Advocacy|advocates]] self-governed societies.<ref>A. Author, ''Book''</ref>\n"
        "{{Infobox thing\n| a = b\n}}\n== History ==\n"
        "Area: <math>x^2</math> km<ref name=r/>.\n<gallery>\nA.jpg|cap\n</gallery>\n\n\n\nEnd."
    )
    assert prep.strip_wikitext(markup) == (
        "Anarchism is a political philosophy that advocates self-governed societies.\n\n"
        "History\nArea:  km.\n\nEnd.\n"
    )


def test_iter_wiki_articles_drops_redirects_and_other_namespaces(tmp_path):
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    page = "<page><title>{}</title><ns>{}</ns>{}<revision><text>{}</text></revision></page>"
    xml = (
        f'<mediawiki xmlns="{ns}">'
        + page.format("Keep", 0, "", "Body '''one'''")
        + page.format("Redir", 0, '<redirect title="Keep" />', "#REDIRECT [[Keep]]")
        + page.format("Redir2", 0, "", "#redirect [[Keep]]")
        + page.format("Wikipedia:About", 4, "", "Project page")
        + page.format("Also", 0, "", "Two")
        + "</mediawiki>"
    )
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(prep.iter_wiki_articles(path)) == [("Keep", "Body '''one'''"), ("Also", "Two")]


# -- failures name their source -------------------------------------------------------------------
def test_failed_source_is_named(tmp_path, monkeypatch, capsys):
    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package r-cran-janeaustenr"

    monkeypatch.setattr(prep, "_run", lambda cmd, cwd=None: Failed())
    with pytest.raises(prep.PrepareError, match="'austen'.*Unable to locate"):
        prep.prepare_austen(tmp_path)

    wheel = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/__init__.py", "")
    with pytest.raises(prep.PrepareError, match="'wikipedia'.*cannot extract"):
        prep.prepare_wikipedia(tmp_path, wheel=wheel)

    monkeypatch.setattr(prep, "locate_model_wheel_file", lambda: None)
    assert prep.main(["--root", str(tmp_path / "root")]) == 1
    assert "data source 'model'" in capsys.readouterr().err


# -- manifest, idempotency, loaders ---------------------------------------------------------------
def _fake_root(root):
    """A prepared-looking root with tiny files and a consistent manifest."""

    def entry(rel, content, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        sha = hashlib.sha256(content).hexdigest()
        return {"file": rel, "bytes": len(content), "sha256": sha, **kw}

    manifest = {
        "version": 1,
        "model": entry(f"model/{prep.MODEL_FILE}", b"GGUF fake"),
        "corpora": {
            "austen": {
                "role": "calibration",
                "tokens": 5,
                "documents": [
                    entry(
                        "austen/emma.txt", b"Emma Woodhouse\n", name="emma", title="Emma", tokens=5
                    )
                ],
            },
            "wikipedia": {
                "role": "evaluation",
                "tokens": 3,
                "documents": [
                    entry(
                        "wikipedia/000_A.txt",
                        "Ä text\n".encode(),
                        name="000_A",
                        title="A",
                        tokens=3,
                    )
                ],
            },
        },
    }
    (root / prep.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_prepare_is_a_noop_when_cached(tmp_path, monkeypatch, capsys):
    _fake_root(tmp_path)
    before = (tmp_path / prep.MANIFEST).read_text()

    def no_network(*a, **k):
        raise AssertionError("a cached source was fetched again")

    for fn in ("_run", "prepare_model", "prepare_austen", "prepare_wikipedia", "_count_tokens"):
        monkeypatch.setattr(prep, fn, no_network)
    prep.prepare(tmp_path)
    assert (tmp_path / prep.MANIFEST).read_text() == before
    out = capsys.readouterr().out
    assert "nothing to do" in out and "austen: cached" in out

    # A damaged file is detected (sha256) and only that source is rebuilt.
    (tmp_path / "austen/emma.txt").write_text("Emma Woodhouse!\n")
    rebuilt = []
    rebuilt_entry = {"role": "calibration", "documents": [], "tokens": 0}
    monkeypatch.setattr(
        prep, "prepare_austen", lambda root, deb=None: rebuilt.append(1) or rebuilt_entry
    )
    monkeypatch.setattr(prep, "_count_tokens", lambda root, manifest: None)
    prep.prepare(tmp_path)
    assert rebuilt == [1]


def test_text_loaders_on_fake_root(tmp_path, monkeypatch):
    _fake_root(tmp_path)
    monkeypatch.delenv("COMET_JAX_GGUF", raising=False)
    assert dtext.is_prepared(tmp_path)
    assert dtext.calibration_corpus(tmp_path) == [
        dtext.Document("emma", "Emma", "Emma Woodhouse\n")
    ]
    assert dtext.evaluation_corpus(tmp_path)[0].text == "Ä text\n"
    windows = dtext.corpus_windows("austen", _CharTokenizer(), 4, max_windows=2, root=tmp_path)
    np.testing.assert_array_equal(windows, [[ord(c) for c in "Emma"], [ord(c) for c in " Woo"]])
    assert dtext.default_gguf_path(tmp_path) == tmp_path / "model" / prep.MODEL_FILE
    monkeypatch.setenv("COMET_JAX_GGUF", str(tmp_path / "austen/emma.txt"))
    assert dtext.default_gguf_path(tmp_path) == tmp_path / "austen/emma.txt"
    with pytest.raises(ValueError, match="corpus name"):
        dtext.load_corpus("shakespeare", tmp_path)
    empty = tmp_path / "empty"
    assert not dtext.is_prepared(empty)
    with pytest.raises(dtext.DataNotPreparedError, match="comet_jax.data.prepare"):
        dtext.load_corpus("austen", empty)


# -- the real prepared data -----------------------------------------------------------------------
@pytest.mark.data
def test_prepared_manifest(prepared_data):
    m = prepared_data.manifest
    austen, wiki = m["corpora"]["austen"], m["corpora"]["wikipedia"]
    assert (austen["role"], wiki["role"]) == ("calibration", "evaluation")
    assert [d["name"] for d in austen["documents"]] == [n for n, _ in prep.AUSTEN_BOOKS]
    assert len(wiki["documents"]) == 106
    assert wiki["documents"][0]["title"] == "Anarchism"
    assert 0.95e6 < austen["tokens"] < 1.05e6 and 0.65e6 < wiki["tokens"] < 0.8e6
    assert m["model"]["bytes"] > 90e6


@pytest.mark.data
def test_prepared_corpora_disjoint_and_intact(prepared_data):
    cal = dtext.calibration_corpus(prepared_data.root)
    ev = dtext.evaluation_corpus(prepared_data.root)
    for docs, corpus in ((cal, "austen"), (ev, "wikipedia")):
        listed = prepared_data.manifest["corpora"][corpus]["documents"]
        for doc, info in zip(docs, listed):
            assert hashlib.sha256(doc.text.encode()).hexdigest() == info["sha256"], doc.name
    assert cal[1].text.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in cal[1].text
    # Disjoint: no 200-character passage of the evaluation text occurs in the calibration text.
    cal_text = "\n".join(d.text for d in cal)
    for d in ev[::10]:
        mid = len(d.text) // 2
        assert d.text[mid : mid + 200] not in cal_text
    assert not any("<ref" in d.text or "{{" in d.text for d in ev)
