"""The figure modules need no torch: the plot nodes, `instseg-predict`'s overlay and the
notebooks import them without paying for it (`viz.training` only draws tensors it is given)."""
from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = ("overlays", "training", "draw", "suite", "dashboard", "galleries", "panoptic")


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_torch(module):
    code = (f"import sys, instseg_pipeline.viz.{module}; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
