"""A scene's axis alignment in the store: stored as given, identity (and said so) when absent,
and readable by a plain zarr reader."""

from __future__ import annotations

import numpy as np
import zarr

from storage import open_store
from tests.storage.test_store import make_points

ALIGNMENT = np.array([[0.945519, 0.325568, 0.0, -5.38439], [-0.325568, 0.945519, 0.0, -2.87178],
                      [0.0, 0.0, 1.0, -0.06435], [0.0, 0.0, 0.0, 1.0]])


def create(store, scene_id: str, **alignment) -> None:
    store.create_scene(scene_id, frame_id=np.arange(2), intrinsic_color=np.eye(3),
                       intrinsic_depth=np.eye(3), color_size=(4, 6), depth_size=(2, 3),
                       depth_scale=0.001, points=make_points(), **alignment)


def test_axis_alignment_is_stored_with_the_scene(tmp_path):
    store = open_store(tmp_path / "store.zarr", mode="a")
    create(store, "scene0000_00", axis_alignment=ALIGNMENT)
    create(store, "scene0707_00", axis_alignment=None)  # a test scan: none
    create(store, "scene0708_00")
    given = open_store(tmp_path / "store.zarr").scene("scene0000_00")
    np.testing.assert_array_equal(given.axis_alignment, ALIGNMENT)  # exact through JSON
    assert given.axis_alignment.dtype == np.float64 and given.has_axis_alignment
    for scene_id in ("scene0707_00", "scene0708_00"):
        absent = open_store(tmp_path / "store.zarr").scene(scene_id)
        np.testing.assert_array_equal(absent.axis_alignment, np.eye(4))
        assert not absent.has_axis_alignment
    attrs = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")["scenes/scene0000_00"].attrs
    assert attrs["axis_alignment"] == ALIGNMENT.tolist() and attrs["has_axis_alignment"] is True


def test_a_scene_stored_before_the_alignment_reads_as_identity(tmp_path):
    store = open_store(tmp_path / "store.zarr", mode="a")
    create(store, "scene0000_00", axis_alignment=ALIGNMENT)
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="a")["scenes/scene0000_00"]
    attrs = dict(group.attrs)
    del attrs["axis_alignment"], attrs["has_axis_alignment"]
    group.attrs.clear()
    group.attrs.update(attrs)
    scene = open_store(tmp_path / "store.zarr").scene("scene0000_00")
    np.testing.assert_array_equal(scene.axis_alignment, np.eye(4))
    assert not scene.has_axis_alignment
