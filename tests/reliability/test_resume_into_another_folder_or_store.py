"""`--resume` continues a run in the folder the user points at (never the one recorded in the
checkpoint) and refuses, in one line naming what differs, a --cache whose store, feature set
or scenes are not the run's; --allow-different-store accepts another store on purpose."""

from __future__ import annotations

import json
import shutil

import pytest

from model.config import TrainConfig
from model.train import Trainer, main
from storage import UserError
from tests.conftest import write_store
from tests.reliability.conftest import extract, one_error_line


def resume(run, cache, **overrides) -> Trainer:
    return Trainer(TrainConfig(cache=str(cache), resume=str(run), device="cpu", **overrides))


def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(trained_run, tiny_store,
                                                                       tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    before = {path: path.read_bytes() for path in trained_run.rglob("*") if path.is_file()}
    trainer = resume(copy, tiny_store, epochs=2)
    assert trainer.out == copy and trainer.state.epoch == 1
    trainer.fit()
    assert [json.loads(line)["epoch"] for line in
            (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    after = {path: path.read_bytes() for path in trained_run.rglob("*") if path.is_file()}
    assert after == before  # nothing of the original run was written
    assert resume(copy, tiny_store, out=str(tmp_path / "elsewhere")).out == tmp_path / "elsewhere"


def test_a_store_without_the_runs_scenes_is_refused(trained_run, tiny_store, tmp_path, capsys):
    smaller = tmp_path / "smaller.zarr"
    shutil.copytree(tiny_store, smaller)
    shutil.rmtree(smaller / "scenes" / "scene0001_00")
    code = main(["--cache", str(smaller), "--resume", str(trained_run), "--device", "cpu"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "1 of the run's 2 scenes" in line and "scene0001_00" in line
    assert str(tiny_store) in line  # where the run read them


def test_another_store_needs_allow_different_store(trained_run, tiny_store, tmp_path, capsys):
    moved = tmp_path / "moved.zarr"
    shutil.copytree(tiny_store, moved)
    code = main(["--cache", str(moved), "--resume", str(trained_run), "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and str(tiny_store) in line and str(moved) in line
    assert "--allow-different-store" in line
    trainer = resume(trained_run, moved, allow_different_store=True, out=str(tmp_path / "run"))
    assert sorted(trainer.train_ids + trainer.val_ids) == ["scene0000_00", "scene0001_00"]


def test_other_frames_under_the_same_scene_ids_are_refused(trained_run, synthetic_root,
                                                          tiny_encoder, tmp_path):
    strided = tmp_path / "strided.zarr"
    extract(synthetic_root, strided, tiny_encoder, stride=2)
    for allow in (False, True):  # other data: not even --allow-different-store takes it
        with pytest.raises(UserError, match="had 8 frames and 5000 points .* gives 4 and 5000"):
            resume(trained_run, strided, allow_different_store=allow)


def test_a_store_without_the_runs_feature_set_is_refused(trained_run, synthetic_root, tmp_path):
    other = tmp_path / "other.zarr"
    write_store(synthetic_root, other, image_size=(160, 224))
    with pytest.raises(UserError, match="trained on feature set [0-9a-f]{12}: test-ViT-tiny .*"
                                        "which --cache .* does not hold"):
        resume(trained_run, other)
