"""Serving engine: paged KV cache, scheduler, jitted model steps (imports stay lazy/light)."""
