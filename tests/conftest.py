"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes

SYNTHETIC = {"n_scenes": 2, "n_frames": 8, "seed": 0, "color_size": SMALL_COLOR_SIZE,
             "depth_size": SMALL_DEPTH_SIZE, "n_points": 5000}
"""The shared synthetic set: colour 242x324, depth 240x320, at most 5000 points a scene."""


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Two synthetic scenes (scene0000_00, scene0001_00) of 8 frames each, written once per
    session (about a second). Read-only: copy it before breaking files."""
    root = tmp_path_factory.mktemp("synthetic")
    write_scenes(root, **SYNTHETIC)
    return root

