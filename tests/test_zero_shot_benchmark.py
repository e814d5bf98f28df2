"""`python -m benchmarks.zero_shot --quick` end to end: every row measured, the planted store far
above its shuffled copy and chance, BENCHMARKS.md untouched (figures are measured, not judged)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.zero_shot import main

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_measures_every_row(tmp_path, capsys):
    before = (REPO / "BENCHMARKS.md").read_text()
    out = tmp_path / "figures.json"
    assert main(["--quick", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for row in ("planted_2d", "shuffled_2d", "random_2d"):
        assert 0 <= figures[row]["miou"] <= 1 and figures[row]["points"] > 0
    for row in ("planted_held_out", "random_held_out"):
        assert set(figures[row]) >= {"2d", "fused", "scenes", "train_seconds"}
        assert figures[row]["fused"]["unknown"] == 0
    assert figures["planted_2d"]["miou"] > figures["shuffled_2d"]["miou"] + 0.4
    assert figures["planted_2d"]["miou"] > 10 * figures["chance_all"] > 0
    assert "| planted, cells shuffled | 2d (no training) |" in capsys.readouterr().out
    assert (REPO / "BENCHMARKS.md").read_text() == before
