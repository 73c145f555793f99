"""Loads a script of `experiments/` (not a package) as a module, for the tests of its CLI."""

from __future__ import annotations

import importlib.util
import pathlib

EXPERIMENTS = pathlib.Path(__file__).parents[1] / "experiments"


def load(name: str):
    """`experiments/<name>.py` imported under the module name `name`."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
