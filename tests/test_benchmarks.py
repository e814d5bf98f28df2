"""`python -m benchmarks.run --quick` end to end: every row present, figures sane (no timing
thresholds: numbers are measured by the benchmark, not judged by tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    before = (REPO / "BENCHMARKS.md").read_text() if (REPO / "BENCHMARKS.md").exists() else None
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out),
                             "--workdir", str(tmp_path / "work")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert {"extraction", "cached_vs_online", "projection", "store", "scaling"} <= set(figures)
    for row in ("extraction", "cached_vs_online", "projection"):
        assert figures[row]["ratio"] > 0
    assert figures["projection"]["mask_agreement"] > 0.999
    assert figures["cached_vs_online"]["second_experiment_clip_passes"] == 0
    assert figures["cached_vs_online"]["cached_imports_open_clip"] is False
    assert 0 <= figures["store"]["data_wait_fraction"] < 1
    assert len(figures["scaling"]["extraction"]) == 3 and len(figures["scaling"]["projection"]) == 3
    assert "| row |" in result.stdout
    after = (REPO / "BENCHMARKS.md").read_text() if (REPO / "BENCHMARKS.md").exists() else None
    assert after == before  # --quick leaves BENCHMARKS.md alone
