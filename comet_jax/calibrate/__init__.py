"""Calibration: activation statistics of every linear-layer input (`comet_jax.calibrate.stats`)."""

from comet_jax.calibrate.stats import CalibStats, GroupStats, StatsTransform, collect_stats

__all__ = ["CalibStats", "GroupStats", "StatsTransform", "collect_stats"]
