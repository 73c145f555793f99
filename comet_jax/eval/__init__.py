"""Accuracy evaluation: perplexity over fixed windows (`comet_jax.eval.perplexity`)."""

from comet_jax.eval.perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
