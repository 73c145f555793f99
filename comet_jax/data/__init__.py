"""Offline real model + text (`python -m comet_jax.data.prepare`) and the corpus loaders.

Import the submodules directly (`comet_jax.data.text`, `comet_jax.data.prepare`); this package
imports nothing heavy.
"""
