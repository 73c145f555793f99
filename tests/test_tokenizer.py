"""Tokenizer: GGUF byte-level BPE rebuild, HF-directory loading, chat template, real counts."""

from __future__ import annotations

import json
import re

import pytest

from comet_jax.tokenizer import Tokenizer

TRICKY = (
    "Hello world! In 1813, 12345 apples cost $3.50 — naïve café 日本語 🙂\n\n  two  spaces\tend"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable-char table (bytes that print as themselves keep their char)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_gguf_metadata() -> dict:
    """A 270-token byte-level BPE vocabulary in GGUF metadata form."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "o r", "Ġ w", "Ġw or", "l d"]
    tokens = specials + _byte_chars() + ["".join(m.split(" ")) for m in merges]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_gguf_metadata())


def test_tiny_roundtrip_digits_unicode(tiny):
    ids = tiny.encode(TRICKY)
    assert tiny.decode(ids) == TRICKY
    pieces = [tiny.id_to_token(i) for i in tiny.encode(" 2024 and the world")]
    # Each digit alone (Digits pre-tokenizer), merges applied inside words.
    assert pieces == ["Ġ", "2", "0", "2", "4", "Ġand", "Ġthe", "Ġwor", "ld"]
    assert tiny.vocab_size == 270 and tiny.bos_id == 1 and tiny.eos_id == 2


def test_tiny_special_tokens_and_bos(tiny):
    assert tiny.encode("<|im_start|>hi<|im_end|>")[0] == 1
    assert tiny.encode("<|im_start|>hi<|im_end|>")[-1] == 2
    assert tiny.encode("a")[0] != 1  # no BOS by default
    assert tiny.encode("a", add_bos=True)[0] == 1
    assert tiny.encode_batch(["a", "b c"], add_bos=True) == [
        tiny.encode("a", add_bos=True),
        tiny.encode("b c", add_bos=True),
    ]
    ids = tiny.encode("x<|im_end|>")
    assert tiny.decode(ids, skip_special_tokens=True) == "x"


def test_tiny_chat_template(tiny):
    msgs = [{"role": "user", "content": "Hi 42"}]
    text = tiny.apply_chat_template(msgs)
    assert text == "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    assert tiny.apply_chat_template(msgs, tokenize=True) == tiny.encode(text)
    with pytest.raises(ValueError, match="messages"):
        tiny.apply_chat_template([{"role": "user"}])


def test_hf_dir_roundtrip(tiny, tmp_path):
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": tiny.chat_template,
        "add_bos_token": False,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert hf.encode(TRICKY) == tiny.encode(TRICKY)
    assert (hf.bos_id, hf.eos_id) == (1, 2)
    msgs = [{"role": "user", "content": "x"}]
    assert hf.apply_chat_template(msgs) == tiny.apply_chat_template(msgs)


@pytest.mark.slow  # imports transformers (~3-8 s)
def test_hf_dir_without_tokenizer_json_uses_transformers(tiny, tmp_path):
    meta = tiny_gguf_metadata()
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = "\n".join(["#version: 0.2", *meta["tokenizer.ggml.merges"]]) + "\n"
    (tmp_path / "merges.txt").write_text(merges)
    cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>",
           "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = Tokenizer.from_hf_dir(tmp_path)
    text = "the world and the other words"  # no digits: GPT-2 has no digit split
    assert hf.encode(text) == tiny.encode(text)
    assert hf.decode(hf.encode(TRICKY)) == TRICKY
    assert (hf.bos_id, hf.eos_id) == (1, 2)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="text"):
        tiny.encode(b"bytes")
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({**tiny_gguf_metadata(), "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf_metadata({**tiny_gguf_metadata(), "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer(tiny.backend, bos_id=1, eos_id=2).apply_chat_template([])
    with pytest.raises(ValueError, match="path"):
        Tokenizer.from_hf_dir(tmp_path / "nope")


# -- the real SmolLM2 tokenizer ------------------------------------------------------------------
@pytest.mark.data
def test_smollm2_tokenizer_basics(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert ids[0] != tok.bos_id
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == list("12345")
    assert tok.encode("Hello world") == [19556, 905]  # "Hello", "Ġworld"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)[0] == 1


@pytest.mark.data
def test_smollm2_austen_token_counts(prepared_data, smollm2_tokenizer):
    from comet_jax.data.text import load_corpus

    austen = prepared_data.manifest["corpora"]["austen"]
    assert 0.95e6 < austen["tokens"] < 1.05e6  # offline-model.md: ~1.0 M SmolLM2 tokens
    book = next(d for d in load_corpus("austen", prepared_data.root) if d.name == "northangerabbey")
    expected = next(d["tokens"] for d in austen["documents"] if d["name"] == "northangerabbey")
    assert len(smollm2_tokenizer.encode(book.text)) == expected


@pytest.mark.data
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(prepared_data, smollm2_tokenizer):
    """Independent implementation: transformers' own GGUF tokenizer conversion.

    transformers converts `pre == "smollm"` to plain GPT-2 ByteLevel, without the digit split
    (it differs on e.g. "  0": "ĠĠ","0" here, "Ġ","Ġ","0" there), so digits are removed from
    the texts; that leaves the vocabulary, merges and special tokens to compare.
    """
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from comet_jax.data.text import load_corpus

    path = prepared_data.gguf_path
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    docs = (
        load_corpus("wikipedia", prepared_data.root)[:3]
        + load_corpus("austen", prepared_data.root)[:1]
    )
    for text in [TRICKY, "<|im_start|>user\nx<|im_end|>"] + [d.text[:4000] for d in docs]:
        text = re.sub(r"[0-9]", "", text)
        assert smollm2_tokenizer.encode(text) == hf.encode(text, add_special_tokens=False)
