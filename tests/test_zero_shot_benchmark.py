"""`python -m benchmarks.zero_shot --quick` end to end: every row measured, the planted store far
above its shuffled copy and chance, BENCHMARKS.md untouched (figures are measured, not judged)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.readme import command, output, run, typed

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_measures_every_row(tmp_path, cli_env):
    before = (REPO / "BENCHMARKS.md").read_text()
    out = tmp_path / "figures.json"
    result = run(typed(command("python -m benchmarks.zero_shot --quick"),
                       append=["--workdir", str(tmp_path / "work"), "--json", str(out)]), cli_env)
    assert result.returncode == 0, output(result)[-3000:]
    figures = json.loads(out.read_text())
    for row in ("planted_2d", "shuffled_2d", "random_2d"):
        assert 0 <= figures[row]["miou"] <= 1 and figures[row]["points"] > 0
    for row in ("planted_held_out", "random_held_out"):
        assert set(figures[row]) >= {"2d", "fused", "scenes", "train_seconds"}
        assert figures[row]["fused"]["unknown"] == 0
    assert figures["planted_2d"]["miou"] > figures["shuffled_2d"]["miou"] + 0.4
    assert figures["planted_2d"]["miou"] > 10 * figures["chance_all"] > 0
    assert "| planted, cells shuffled | 2d (no training) |" in result.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before
