"""`python -m benchmarks.run --quick` end to end: every row present, figures sane (no timing
thresholds: numbers are measured by the benchmark, not judged by tests)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # every row: ~3 minutes on a quiet 2-core machine, CI is shared
def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    before = (REPO / "BENCHMARKS.md").read_text() if (REPO / "BENCHMARKS.md").exists() else None
    # README's `python -m benchmarks.run [--quick] [--device cuda] [--json OUT]`, on the CPU
    argv = typed(command("python -m benchmarks.run --device --json --quick"), {"OUT": str(out)},
                 drop=["--device"], append=["--workdir", str(tmp_path / "work"), "--repeats", "1"])
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert {"extraction", "cached_vs_online", "projection", "store", "scaling", "backbone",
            "decode", "flow_vs_decode", "fusion_overhead", "fuse_features", "run_overhead",
            "scannet_scale"} <= set(figures)
    for row in ("extraction", "cached_vs_online", "projection", "backbone", "decode",
                "flow_vs_decode", "fusion_overhead", "fuse_features", "run_overhead"):
        assert figures[row]["ratio"] > 0
    assert figures["fusion_overhead"]["smaller_is_better"] is True
    overhead = figures["run_overhead"]
    assert overhead["seconds_ephemeral"] > 0 and overhead["seconds_server"] > 0
    assert figures["decode"]["psnr_db_min"] >= 35  # the scaled decode's input, vs the full one
    assert figures["fuse_features"]["count_agreement"] > 0.999
    assert figures["scannet_scale"]["seen_fraction"] > 0.5
    backbone = figures["backbone"]
    assert backbone["voxels"] == 10000 and backbone["max_abs_difference"] < 1e-3
    assert all(row["active_pairs"]["wrong_rows"] == 0 for row in backbone["convolutions"])
    assert figures["projection"]["mask_agreement"] > 0.999
    assert figures["cached_vs_online"]["second_experiment_clip_passes"] == 0
    assert figures["cached_vs_online"]["cached_imports_open_clip"] is False
    assert 0 <= figures["store"]["data_wait_fraction"] < 1
    assert len(figures["scaling"]["extraction"]) == 3 and len(figures["scaling"]["projection"]) == 3
    assert "| row |" in result.stdout
    assert "| U-Net forward + backward, " in result.stdout
    after = (REPO / "BENCHMARKS.md").read_text() if (REPO / "BENCHMARKS.md").exists() else None
    assert after == before  # --quick leaves BENCHMARKS.md alone
