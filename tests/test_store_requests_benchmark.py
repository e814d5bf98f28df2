"""`python -m benchmarks.store_requests --quick` end to end against moto's S3 server: the counts
it reports are the server's, and consolidated metadata open the store with one metadata read
(no timing thresholds: the benchmark measures, tests do not judge times)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[1]


def test_quick_store_requests_benchmark(tmp_path):
    out = tmp_path / "requests.json"
    before_md = (REPO / "BENCHMARKS.md").read_text()
    argv = typed(command("python -m benchmarks.store_requests --json --quick --scenes"),
                 {"OUT": str(out)}, drop=["--scenes"],  # --quick's own size
                 append=["--workdir", str(tmp_path / "work")])
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    scenes = figures["sizes"]["scenes"]
    earlier, before, after = figures["earlier"], figures["before"], figures["after"]
    assert earlier["open"]["scenes"] == before["open"]["scenes"] == after["open"]["scenes"] == scenes
    # without: the root, every scene's and the feature set's zarr.json; with: the root's alone
    assert earlier["open"]["by_kind"]["GET"] == before["open"]["by_kind"]["GET"] == 1 + scenes + 1
    assert after["open"]["by_kind"]["GET"] == 1
    # s3fs's default asks each object's size first; this version's S3 defaults do not
    assert earlier["open"]["by_kind"]["HEAD"] >= 1 + scenes + 1
    assert after["scene"]["by_kind"]["HEAD"] < earlier["scene"]["by_kind"]["HEAD"] / 4
    assert before["open"]["by_kind"]["LIST"] == after["open"]["by_kind"]["LIST"]
    # reading a scene: the same chunks, no zarr.json
    assert before["scene"]["requests"] > after["scene"]["requests"]
    arrays_of_a_scene = figures["metadata_files"] // scenes - 4  # minus its 4 groups (about)
    assert before["scene"]["requests"] - after["scene"]["requests"] >= arrays_of_a_scene
    assert figures["consolidate_by_kind"]["PUT"] == 1  # the root's zarr.json, once
    assert "| open the store, list scenes and feature sets |" in result.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before_md  # --quick leaves it alone


def test_help():
    result = subprocess.run([sys.executable, "-m", "benchmarks.store_requests", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m benchmarks.store_requests")
    assert "--quick" in result.stdout and "--scenes" in result.stdout
