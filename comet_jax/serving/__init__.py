"""OpenAI-compatible HTTP serving of an `LLMEngine` (stdlib http.server + an engine thread)."""

from comet_jax.serving.server import EngineLoop, OpenAIServer, serve

__all__ = ["EngineLoop", "OpenAIServer", "serve"]
