"""Stage 2's memory is bounded by chunk sizes, not by frames x points: a scene of 2M points and
640 stored frames of 640x480 depth (32 of them usable) loads within the bound README states
(`model.dataset.projection_memory_bound`), peak resident memory measured in a fresh process.
Before, the (V, N) visibility, a 16-view chunk of 2M points (~2.6 GB of intermediates) and the
whole scene's depth (640 x 614 KB) were all in memory at once."""

from __future__ import annotations

import json

import pytest

from model.dataset import projection_memory_bound
from tests.reliability.conftest import run_command
from tests.reliability.memory_scene import DESCRIPTION, write_scene

POINTS, FRAMES, EVERY = 2_000_000, 640, 20


@pytest.mark.timeout(1200)  # ~40 s on an idle 2-core CPU; minutes on a busy one
def test_a_many_frame_scene_of_2m_points_stays_within_the_stated_bound(tmp_path):
    store = tmp_path / "big.zarr"
    write_scene(store, POINTS, FRAMES, every=EVERY)
    result = run_command("tests.reliability.memory_scene", str(store))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["points"] == POINTS and measured["views"] == FRAMES // EVERY
    assert measured["seen"] > 0.9  # the views do see the wall
    bound = projection_memory_bound(POINTS, measured["views"], DESCRIPTION["spatial_dim"],
                                    DESCRIPTION["global_dim"]) / 2**20
    extra = measured["peak_mb"] - measured["rss_before_mb"]
    assert extra <= bound, (extra, bound)
