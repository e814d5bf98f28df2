"""Every user command answers `--help` as a module (`python -m ...`), explaining its flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["pipeline.synthetic", "flows.extract_clip", "flows.serve",
                                    "storage.inspect", "model.train", "model.evaluate",
                                    "benchmarks.run", "benchmarks.online_clip", "benchmarks.zero_shot",
                                    "benchmarks.stability", "benchmarks.backbone"])
def test_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {module}")
