"""`python -m benchmarks.backbone`: every row measured on a small room, the two convolutions agree,
spconv's column either measured or skipped with a note, BENCHMARKS.md untouched (figures are
measured, not judged: no timing thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.backbone import room_voxels
from model.network.backbone import grid_extent, submanifold_map
from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[1]


def test_room_is_a_surface_with_about_eight_active_neighbours():
    coords = room_voxels(20000)
    assert coords.shape == (20000, 4) and int(coords[:, 0].max()) == 0
    assert len(set(map(tuple, coords.tolist()))) == 20000
    kernel_map = submanifold_map(coords, grid_extent(coords))
    mean_neighbours = sum(len(rows) for rows in kernel_map.inputs) / len(coords)
    assert 6 < mean_neighbours < 10  # a sheet of voxels (8 in-plane), not a solid (26)


def test_quick_run_measures_every_row(tmp_path):
    before = (REPO / "BENCHMARKS.md").read_text()
    out = tmp_path / "figures.json"
    argv = typed(command("python -m benchmarks.backbone --json --quick --voxels"),
                 {"N": "3000", "OUT": str(out)}, append=["--repeats", "1"])
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ratio"] > 0 and figures["voxels"] == 3000
    assert figures["max_abs_difference"] < 1e-3
    for mode in ("active-pairs", "all-neighbours"):  # measured in a child process each
        assert figures["peak_memory"][mode]["peak_mb"] > 0
    assert [row["threads"] for row in figures["unet"]][-1] == 1
    for row in figures["convolutions"]:
        assert row["active_pairs"]["wrong_rows"] == row["all_neighbours"]["wrong_rows"] == 0
        assert "spconv" in row or row["spconv_note"].startswith("spconv not installed")
    table = result.stdout
    assert "| U-Net forward + backward, 1 thread |" in table
    assert "| one 32 -> 32 submanifold conv, forward, " in table
    assert (REPO / "BENCHMARKS.md").read_text() == before


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "benchmarks.backbone", "--help"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    for flag in ("--quick", "--voxels", "--repeats", "--device", "--json", "--peak-memory",
                 "--coords"):
        assert flag in result.stdout
