"""`python -m benchmarks.stability --quick` end to end: every route measured on the same steps,
gradient norms for every module group (and CLIP's weights for BiFusion's route only),
BENCHMARKS.md untouched (figures are measured, not judged)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_measures_every_route(tmp_path):
    before = (REPO / "BENCHMARKS.md").read_text()
    out = tmp_path / "figures.json"
    argv = typed(command("python -m benchmarks.stability --json --quick"), {"OUT": str(out)},
                 append=["--workdir", str(tmp_path / "work")])
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    routes = figures["routes"]
    assert list(routes) == ["BiFusion", "cached, weight 0.05", "cached, default schedule"]
    assert len({route["steps"] for route in routes.values()}) == 1  # the same steps
    for name, route in routes.items():
        assert {"backbone_3d", "proj_2d", "gate", "heads"} <= set(route["grad_norm"]), name
        assert route["nonfinite_steps"] >= 0 and route["loss_spikes"] >= 0
        for norm in route["grad_norm"].values():
            assert 0 <= norm["p50"] <= norm["p99"] <= norm["max"]
    # gradients reach CLIP's weights only where CLIP runs in the step
    assert routes["BiFusion"]["grad_norm"]["clip"]["max"] > 0
    assert "clip" not in routes["cached, weight 0.05"]["grad_norm"]
    # the CLIP head learns at weight 0.05, not during the default warm-up
    assert routes["cached, weight 0.05"]["grad_norm"]["clip_head"]["max"] > 0
    assert "clip_head" not in routes["cached, default schedule"]["grad_norm"]
    assert figures["natural_max_abs"] < 50  # random weights: no massive activations, planted
    assert "| BiFusion |" in result.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before
