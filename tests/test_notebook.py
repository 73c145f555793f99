"""Executes experiments/notebooks/quickstart.ipynb end to end (nbclient, kernel python3) with
its parameters cell shrunk, so the notebook cannot rot. Needs the prepared data; skips with the
command that prepares it otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import prepared_data_or_skip

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "quickstart.ipynb"
# The smallest settings that still exercise every cell (an INT8 block needs some calibration).
SMALL = {"CONTEXT": 64, "CALIB_WINDOWS": 2, "EVAL_WINDOWS": 1, "GEN_TOKENS": 4}


def _shrink(nb) -> None:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    lines = []
    for line in cells[0].source.splitlines():
        name = line.split("=", 1)[0].strip()
        lines.append(f"{name} = {SMALL[name]!r}" if name in SMALL else line)
    missing = set(SMALL) - {ln.split("=", 1)[0].strip() for ln in lines}
    assert not missing, f"parameters cell lacks {sorted(missing)}"
    cells[0].source = "\n".join(lines)


@pytest.mark.data
def test_quickstart_notebook_executes():
    prepared_data_or_skip()
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _shrink(nb)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "INT8 share" in outputs and "float" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), (
        "the permutation plot produced no image"
    )
