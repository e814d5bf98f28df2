"""`python -m benchmarks.sens --quick` end to end: every figure present and the two routes'
stores agree (no timing thresholds: the benchmark measures times, tests do not judge them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[1]


def test_quick_sens_benchmark(tmp_path):
    out = tmp_path / "sens.json"
    before = (REPO / "BENCHMARKS.md").read_text()
    argv = typed(command("python -m benchmarks.sens --quick"),
                 append=["--json", str(out), "--workdir", str(tmp_path / "work")])
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    frames = figures["frames"]
    export = figures["export"]
    assert export["files"] == 3 * frames + 4  # colour, depth, pose a frame; 4 intrinsic files
    assert export["bytes"] == sum(export["bytes_by_folder"].values()) > 0
    assert figures["sens_bytes"] > 0 and figures["index_seconds"] > 0
    (row,) = figures["models"]
    assert row["model"] == "test-ViT-tiny" and row["ratio"] > 0
    assert row["export_route_seconds"] > export["seconds"]
    agreement = row["agreement"]
    assert agreement["depth_equal"] and agreement["valid_equal"]
    assert agreement["pose_max_abs"] <= 5e-7  # the export's %f rounding, nothing more
    assert 0 < agreement["feature_relative_median"] < 0.15  # re-encoded JPEGs: close, not equal
    assert "| .sens route: extraction from `<scene>.sens` |" in result.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before  # --quick leaves it alone


def test_help():
    result = subprocess.run([sys.executable, "-m", "benchmarks.sens", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m benchmarks.sens")
    assert "--quick" in result.stdout and "--workdir" in result.stdout
