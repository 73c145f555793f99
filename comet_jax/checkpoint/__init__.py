"""Checkpoint import/export: GGUF (`gguf.py`), Hugging Face safetensors, orbax.

Kept free of heavy imports: import the submodule you need, e.g.
`from comet_jax.checkpoint.gguf import load_gguf`.
"""
