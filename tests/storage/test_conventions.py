"""The store describes itself: xarray and dask read every group in a process that never imports
this project; consolidated metadata that a later run made stale still read correctly;
`storage.inspect` shows the conventions, or that a store predates them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.labels import CLASS_NAMES
from storage import open_store
from storage.conventions import CONVENTIONS_VERSION, DIMENSIONS
from storage.inspect import main as inspect_main
from storage.text import read_text_embeddings, write_text_embeddings
from tests.storage.test_store import DESCRIPTION, frame_features, make_points, make_scene, write_all

PROJECT = ("storage", "pipeline", "model", "flows", "benchmarks", "tests")

READ_WITHOUT_THE_PROJECT = r'''
import json, sys
import dask.array as da
import numpy as np
import xarray as xr
import zarr

store = sys.argv[1]
root = zarr.open_group(store, mode="r")
groups, arrays = {}, {}
for path, node in [("", root), *sorted(root.members(max_depth=None))]:
    if isinstance(node, zarr.Group):
        dataset = xr.open_zarr(store, group=path or None)  # fails on an array without dims
        groups[path] = {name: {"dims": list(v.dims), "sizes": [int(n) for n in v.shape],
                               "attrs": {k: v.attrs[k] for k in v.attrs if k != "long_name"},
                               "has_long_name": "long_name" in v.attrs}
                        for name, v in dataset.data_vars.items()}
    else:
        array = da.from_zarr(store, component=path)
        arrays[path] = {"shape": list(array.shape), "chunks": [c[0] for c in array.chunks]}
scene = sorted(root["scenes"].group_keys())[0]
featureset = sorted(root["featuresets"].group_keys())[0]
frames = xr.open_zarr(store, group=f"scenes/{scene}/frames")
features = xr.open_zarr(store, group=f"scenes/{scene}/features/{featureset}")
raw_depth = da.from_zarr(store, component=f"scenes/{scene}/frames/depth")[0].compute()
print(json.dumps({
    "groups": groups, "arrays": arrays, "conventions": root.attrs["conventions"],
    "usable": int((frames.valid & features.done).sum()),
    "depth_metres": float(frames.depth[0].values.max()), "depth_raw": int(raw_depth.max()),
    "depth_scale": root[f"scenes/{scene}"].attrs["depth_scale"],
    "spatial_finite": bool(np.isfinite(features.spatial.values).all()),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in PROJECT),
}, default=str))
'''.replace("PROJECT", repr(PROJECT))


def read_without_the_project(store: Path, tmp_path: Path) -> dict:
    script = tmp_path / "read.py"
    script.write_text(READ_WITHOUT_THE_PROJECT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", str(script), str(store)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_xarray_and_dask_read_every_group_without_the_project(tiny_store, tmp_path):
    found = read_without_the_project(tiny_store, tmp_path)
    assert found["project_modules"] == []
    store = open_store(tiny_store)
    (fid,) = store.featuresets()
    spec = store.featuresets()[fid]
    scene = "scene0000_00"
    # every group opened (the root and per-scene groups hold no arrays; their datasets are empty)
    expected_groups = {"", "scenes", "featuresets", f"featuresets/{fid}", *(
        f"scenes/{s}{sub}" for s in store.scenes()
        for sub in ("", "/frames", "/points", "/features", f"/features/{fid}"))}
    assert set(found["groups"]) == expected_groups
    for path, variables in found["groups"].items():
        for name, variable in variables.items():
            assert tuple(variable["dims"]) == DIMENSIONS[name], (path, name)
            assert variable["has_long_name"], (path, name)
            if name != "reason":
                assert "units" in variable["attrs"], (path, name)
    points = found["groups"][f"scenes/{scene}/points"]
    assert points["xyz"]["attrs"]["units"] == "m"
    semantic = points["semantic"]["attrs"]
    assert semantic["class_names"] == list(CLASS_NAMES)
    assert semantic["flag_values"] == [*range(20), -100]
    assert semantic["flag_meanings"].split() == [n.replace(" ", "_") for n in CLASS_NAMES] + \
        ["ignored"]
    assert points["instance"]["attrs"]["flag_values"] == [-1]
    assert points["segment"]["attrs"]["flag_meanings"] == "unknown"
    frames = found["groups"][f"scenes/{scene}/frames"]
    assert frames["pose"]["attrs"]["units"] == "m"
    assert frames["intrinsic_color"]["attrs"]["units"] == "pixel"
    assert frames["depth"]["attrs"]["units"] == "m"  # xarray applied scale_factor
    assert found["depth_metres"] == pytest.approx(found["depth_raw"] * found["depth_scale"])
    spatial = found["groups"][f"scenes/{scene}/features/{fid}"]["spatial"]
    assert spatial["sizes"] == [8, *spec.grid_size, spec.spatial_dim]
    assert spatial["attrs"]["resize"] == spec.resize
    assert spatial["attrs"]["grid_size"] == list(spec.grid_size)
    assert found["usable"] == 8 and found["spatial_finite"]
    dask_spatial = found["arrays"][f"scenes/{scene}/features/{fid}/spatial"]
    assert dask_spatial["chunks"] == [1, *spec.grid_size, spec.spatial_dim]
    conventions = found["conventions"]
    assert conventions["version"] == CONVENTIONS_VERSION
    assert "camera-to-world" in conventions["pose"] and "OpenCV" in conventions["pose"]
    assert "pixel" in conventions["intrinsics"] and "centre" in conventions["intrinsics"]
    assert "squash" in conventions["feature_grid"] and "crop" in conventions["feature_grid"]
    assert conventions["semantic"]["ignore_index"] == -100
    assert conventions["instance"]["none"] == -1 and conventions["segment"]["unknown"] == -1


def test_readme_xarray_example_runs_without_the_project(tiny_store, tmp_path):
    from tests.model.test_reader import readme_example

    shutil.copytree(tiny_store, tmp_path / "storage" / "features.zarr")
    script = tmp_path / "example.py"
    script.write_text(readme_example("xarray") + "\nimport sys\nprint(sorted(m for m in sys.modules"
                      f" if m.split('.')[0] in {PROJECT!r}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == repr(list(CLASS_NAMES))
    assert lines[1] == "m ('frame', 'y', 'x', 'channel') 8 usable frames"
    assert lines[2] == "[]"


def test_a_stale_snapshot_misses_nothing(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    store = open_store(path, mode="a")
    make_scene(store)
    fid = store.register_featureset(DESCRIPTION)
    store.create_features("scene0000_00", fid, (2, 3), 4, 5)
    write_all(store, "scene0000_00", fid, range(6))
    make_scene(store, "scene0002_00")
    make_scene(store, "scene0003_00")
    store.node("scenes/scene0002_00").attrs["complete"] = False  # a peer is still creating it
    store.consolidate()
    assert open_store(path, consolidated=True).root.metadata.consolidated_metadata is not None
    # a later run writes while readers read the snapshot
    store.node("scenes/scene0002_00").attrs["complete"] = True
    make_scene(store, "scene0001_00", points=make_points(seed=1))
    other = store.register_featureset({**DESCRIPTION, "model": "another"})
    store.create_features("scene0000_00", other, (2, 3), 4, 5)
    write_all(store, "scene0000_00", other, range(6))
    write_text_embeddings(store, fid, ["a chair"], ["{}"], np.ones((1, 5), np.float32))
    shutil.rmtree(path / "scenes" / "scene0003_00")  # deleted by hand

    reader = open_store(path, consolidated=True)  # as a remote store is read
    assert reader.root.metadata.consolidated_metadata is not None  # the stale snapshot
    assert reader.scenes() == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert set(reader.featuresets()) == {fid, other}
    assert np.array_equal(reader.scene("scene0001_00").xyz, make_points(seed=1).xyz)
    spatial = reader.features("scene0000_00", other).spatial
    assert np.array_equal(spatial[3], frame_features(3)[0].astype(np.float16))
    assert read_text_embeddings(reader, fid, ["a chair"], ["{}"]).tolist() == [[1.0] * 5]
    # the snapshot is used where it holds a node: its metadata are read from it alone
    (path / "scenes" / "scene0000_00" / "points" / "xyz" / "zarr.json").unlink()
    assert reader.scene("scene0000_00").xyz.shape == (10, 3)
    # ... and --verify reads every zarr.json as it is
    assert inspect_main([str(path), "--verify"]) == 1
    assert "scene scene0000_00: points/xyz is missing" in capsys.readouterr().out


def test_inspect_shows_conventions_and_flags_an_older_store(tiny_store, tmp_path, capsys):
    assert inspect_main([str(tiny_store)]) == 0
    out = capsys.readouterr().out
    assert f"conventions: version {CONVENTIONS_VERSION} (format version 1); consolidated " \
        "metadata: yes" in out
    assert "semantic: ScanNet-20, 20 classes (wall, floor, ..., otherfurniture), -100 ignored" in out
    assert "dimension names on 32 of 32 arrays\n" in out
    assert "    frames/pose            (frame, pose_row, pose_column)  [m]" in out
    assert "    features/*/spatial     (frame, y, x, channel)  [1]" in out
    assert inspect_main([str(tiny_store), "--verify"]) == 0  # reads every zarr.json, and
    assert "consolidated metadata: yes" in capsys.readouterr().out  # still sees the snapshot
    assert inspect_main([str(tiny_store), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["conventions"]
    assert found["kinds"]["points/xyz"] == {"dimension_names": ["point", "axis"], "units": "m"}

    old = strip_to_an_older_store(tiny_store, tmp_path / "old.zarr")
    assert inspect_main([str(old)]) == 0
    out = capsys.readouterr().out
    assert "conventions: none recorded: this store was written before" in out
    assert "(0 of 32 arrays have dimension names)" in out and "consolidated metadata: no" in out
    reader = open_store(old)  # still reads as before
    assert reader.scene("scene0000_00").xyz.shape == (5000, 3)


def strip_to_an_older_store(store: Path, to: Path) -> Path:
    """A copy of `store` as the version before wrote it: no dimension names, no attributes on
    arrays, no conventions, no consolidated metadata."""
    shutil.copytree(store, to)
    for metadata in to.rglob("zarr.json"):
        document = json.loads(metadata.read_text())
        document.pop("dimension_names", None)
        document.pop("consolidated_metadata", None)
        if document["node_type"] == "array":
            document["attributes"] = {}
        document.get("attributes", {}).pop("conventions", None)
        metadata.write_text(json.dumps(document))
    return to
