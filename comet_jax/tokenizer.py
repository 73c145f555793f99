"""Tokenizers: rebuilt from GGUF metadata (byte-level BPE) or loaded from a local HF directory.

`Tokenizer` wraps a `tokenizers.Tokenizer` backend and never adds special tokens on its own:
`encode` returns exactly the tokens of the text, plus BOS only when asked (`add_bos=True`, or
the source says so: GGUF `tokenizer.ggml.add_bos_token`, HF `add_bos_token`).

GGUF byte-level BPE (`tokenizer.ggml.model == "gpt2"`): the vocabulary is
`tokenizer.ggml.tokens` (id = position), merges are `"left right"` strings in rank order,
tokens of type CONTROL (3) become special tokens. Pre-tokenization for SmolLM2 (`pre ==
"smollm"`): every digit is split off on its own, then the GPT-2 byte-level regex applies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_GGUF_CONTROL = 3  # llama.cpp token type: control token (special)
_GGUF_USER_DEFINED = 4  # llama.cpp token type: added token, not special
# GGUF `tokenizer.ggml.pre` values whose pre-tokenizer is digits-split + GPT-2 byte-level.
_DIGIT_SPLIT_PRE = frozenset({"smollm"})
_GPT2_PRE = frozenset({"default", "gpt-2", "gpt2"})


class Tokenizer:
    """Text <-> token ids, with the model's special ids and chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend  # a tokenizers.Tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's metadata (byte-level BPE only)."""
        from comet_jax.checkpoint.gguf import read_gguf_metadata

        meta = read_gguf_metadata(path)
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, source: str = "<metadata>") -> Tokenizer:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model={kind!r} in {source}: only byte-level BPE ('gpt2') "
                "GGUF tokenizers are supported"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _DIGIT_SPLIT_PRE | _GPT2_PRE:
            raise ValueError(
                f"tokenizer.ggml.pre={pre!r} in {source}: expected one of "
                f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)}"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")

        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=False,
            byte_fallback=False,
        )
        backend = HFTokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(tok, special=(t == _GGUF_CONTROL), normalized=False)
            for tok, t in zip(tokens, types)
            if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ]
        # Ids already exist in the vocabulary, so these calls only mark the tokens as atomic.
        backend.add_special_tokens([a for a in added if a.special])
        backend.add_tokens([a for a in added if not a.special])
        return cls(
            backend,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a local Hugging Face model directory (no network).

        Uses `tokenizer.json` through `tokenizers` when present, else `transformers`'
        AutoTokenizer (e.g. a SentencePiece-only directory), converted to its fast backend.
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path={str(path)!r} is not a directory holding tokenizer files")
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        if (path / "tokenizer.json").exists():
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if not hasattr(hf, "backend_tokenizer"):
                raise ValueError(f"path={str(path)!r}: transformers gave no fast tokenizer")
            backend = hf.backend_tokenizer

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            if isinstance(tok, dict):  # serialized AddedToken
                tok = tok.get("content")
            return None if tok is None else backend.token_to_id(tok)

        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            chat_template=template,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    # -- use ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in `text` map to their ids."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        bos = self.add_bos if add_bos is None else add_bos
        return [([self.bos_id] if bos else []) + e.ids for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template.

        Rendered like Hugging Face does (jinja2 sandbox, trim_blocks, lstrip_blocks). Returns the
        prompt string, or its token ids when `tokenize=True` (no extra BOS: the template
        writes whatever special tokens it needs).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]={m!r}: expected a dict with 'role' and 'content'")
        text = _render_chat(
            self.chat_template,
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_str(self.bos_id),
            eos_token=self._token_str(self.eos_id),
        )
        return self.encode(text, add_bos=False) if tokenize else text

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


def _render_chat(template: str, **context: Any) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**context)
