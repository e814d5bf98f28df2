"""Stage 1 on raw ScanNet scans (`<scene>.sens`), through a real Prefect API and as README types it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.extract_clip import ExtractionFailed, extract_clip
from storage import open_store
from tests.readme import command, output, run, typed
from tests.sens_writer import sens_from_export

TINY = {"model": "test-ViT-tiny", "pretrained": "none", "batch_size": 4}


@pytest.fixture(scope="module")
def raw_root(synthetic_root, tmp_path_factory) -> Path:
    """Both synthetic scenes as ScanNet distributes scans: a .sens beside the mesh files."""
    root = tmp_path_factory.mktemp("raw")
    for scene in sorted(p for p in synthetic_root.iterdir() if p.is_dir()):
        sens_from_export(scene, root)
    return root


def test_readme_command_on_raw_scannet(raw_root, cli_env, tmp_path):
    """README's `--dataset scannet-sens` command as printed (the table's short form is the same
    command), the tiny model for ViT-B-16, stride 2 to check that only those frames are read."""
    short = command("python -m flows.extract_clip --dataset --root --store ...")
    found = command("python -m flows.extract_clip --dataset --model --pretrained --root --store "
                    "--stride #2")
    assert {"--dataset", "scannet-sens"} <= set(short.words) & set(found.words)
    store = tmp_path / "scannet.zarr"
    result = run(typed(found, {"--root": str(raw_root), "--store": str(store),
                               "--model": "test-ViT-tiny", "--pretrained": "none",
                               "--stride": "2"}), cli_env)
    assert result.returncode == 0, output(result)[-3000:]
    assert "stored 8 frames (0 invalid) of 2 scenes" in result.stdout
    reader = open_store(store)
    assert reader.scenes() == ["scene0000_00", "scene0001_00"]
    for scene_id in reader.scenes():
        scene = reader.scene(scene_id)
        np.testing.assert_array_equal(scene.frame_id, [0, 2, 4, 6])
        assert scene.valid.all() and scene.has_axis_alignment


def test_a_bad_header_fails_its_scene_alone_and_a_cut_file_keeps_its_frames(
        prefect_api, raw_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raw_root, root)
    bad, cut = sorted(p for p in root.iterdir() if p.is_dir())
    sens = bad / f"{bad.name}.sens"
    sens.write_bytes((5).to_bytes(4, "little") + sens.read_bytes()[4:])  # version 5
    sens = cut / f"{cut.name}.sens"
    sens.write_bytes(sens.read_bytes()[: int(sens.stat().st_size * 0.7)])
    with pytest.raises(ExtractionFailed) as error:
        extract_clip(root=str(root), store=str(tmp_path / "store.zarr"), dataset="scannet-sens",
                     **TINY)
    message = str(error.value)
    assert "1 of 2 scenes failed" in message and "\n" not in message
    assert f"{bad.name}: {bad / bad.name}.sens is a .sens file of version 5" in message
    store = open_store(tmp_path / "store.zarr")
    assert store.scenes() == [cut.name]
    scene = store.scene(cut.name)
    n_kept = int(scene.valid.sum())
    assert 0 < n_kept < 8 and scene.valid[:n_kept].all()  # the frames before the cut
    lost = 8 - n_kept
    for reason in scene.reason[n_kept:]:
        assert f"frames {n_kept}-7 ({lost} of 8) cannot be read" in reason
    (fid,) = store.featuresets()
    assert store.done(cut.name, fid).all()  # the lost frames are done: training skips them
    # "download the file again": the whole files back, the same command stores what was lost
    for scene in (bad, cut):
        shutil.copy(raw_root / scene.name / f"{scene.name}.sens", scene / f"{scene.name}.sens")
    again = extract_clip(root=str(root), store=str(tmp_path / "store.zarr"),
                         dataset="scannet-sens", **TINY)
    assert again["frames_encoded"] == 8 + lost and again["frames_invalid"] == 0
    store = open_store(tmp_path / "store.zarr")
    for scene_id in (bad.name, cut.name):
        assert store.scene(scene_id).valid.all() and store.done(scene_id, fid).all()
        assert np.isfinite(store.features(scene_id, fid).global_).all()


def test_dataset_scannet_reads_raw_scans_beside_exported_ones(prefect_api, synthetic_root,
                                                             raw_root, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copytree(synthetic_root / "scene0000_00", root / "scene0000_00")  # exported
    shutil.copytree(raw_root / "scene0001_00", root / "scene0001_00")  # raw
    summary = extract_clip(root=str(root), store=str(tmp_path / "store.zarr"), dataset="scannet",
                           **TINY)
    assert summary["failed"] == [] and summary["frames_encoded"] == 16
    store = open_store(tmp_path / "store.zarr")
    assert store.scenes() == ["scene0000_00", "scene0001_00"]
    assert all(store.scene(s).valid.all() for s in store.scenes())
