"""`python -m model.evaluate` as a user types it: --export writes ScanNet's submission format,
--predictions scores such a folder against the store's ground truth, --json in both modes.
(The figures themselves are pinned by test_instance_eval.py's hand-made cases.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from model.evaluate import BenchmarkScores, to_json
from model.instance_eval import encode_ground_truth
from model.submission import PredictedInstance, write_instances, write_semantic
from storage.labels import CLASS_NAMES, VALID_CLASS_IDS, nyu40_to_scannet20, scannet20_to_nyu40
from storage import open_store
from model.train import Trainer
from tests.model.test_train import config

REPO = Path(__file__).resolve().parents[2]
SCENES = ["scene0000_00", "scene0001_00"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkpoint(tiny_store, tmp_path_factory) -> Path:
    """A model trained for one epoch, its semantic head's last layer scaled up: an untrained
    model calls nearly every point wall or floor (no instance); this one spreads them over
    many classes, so its export holds dozens of instances of several classes, and scores."""
    out = tmp_path_factory.mktemp("evaluate")
    Trainer(config(tiny_store, out, epochs=1, val_fraction=0.5, batch_scenes=1,
                   min_instance_points=10)).fit()
    path = out / "run" / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)
    names = [name for name in saved["model"] if name.startswith("heads.semantic.")]
    saved["model"][names[-2]] = saved["model"][names[-2]] * 20  # the last Linear's weight
    torch.save(saved, path)
    return path


def test_export_is_scannets_format_and_scoring_it_gives_the_direct_figures(
        tiny_store, synthetic_root, checkpoint, tmp_path):
    export, direct, scored = tmp_path / "submission", tmp_path / "direct.json", tmp_path / "scored.json"
    run = evaluate("--cache", str(tiny_store), "--checkpoint", str(checkpoint), "--scenes",
                   *SCENES, "--export", str(export), "--json", str(direct), "--device", "cpu",
                   "--out", str(tmp_path / "ply"), "--min-region-size", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "semantic mIoU" in run.stdout and f"submission: {export}" in run.stdout
    store = open_store(tiny_store)
    lines = 0
    for scene_id in SCENES:
        # one line per vertex of <scene>_vh_clean_2.ply, in its order: the store's points are them
        mesh = PlyData.read(str(synthetic_root / scene_id / f"{scene_id}_vh_clean_2.ply"))
        n_vertices = mesh["vertex"].count
        truth = store.scene(scene_id, with_depth=False)
        assert len(truth.xyz) == n_vertices
        np.testing.assert_array_equal(truth.xyz[:, 0], mesh["vertex"]["x"])
        semantic = np.loadtxt(export / "semantic" / f"{scene_id}.txt", dtype=np.int64)
        assert semantic.shape == (n_vertices,) and set(semantic) <= set(VALID_CLASS_IDS)
        listing = (export / "instance" / f"{scene_id}.txt").read_text().splitlines()
        for number, line in enumerate(listing):
            relative, label, confidence = line.split(" ")
            assert relative == f"predicted_masks/{scene_id}_{number:03d}.txt"
            assert int(label) in VALID_CLASS_IDS[2:] and 0 <= float(confidence) <= 1
            mask = (export / "instance" / relative).read_text().splitlines()
            assert len(mask) == n_vertices and set(mask) <= {"0", "1"}
        lines += len(listing)
        # the ground truth, as ScanNet's scripts read it (--gt_path)
        gt_semantic = np.loadtxt(export / "ground_truth" / "semantic" / f"{scene_id}.txt",
                                 dtype=np.int64)
        np.testing.assert_array_equal(gt_semantic, scannet20_to_nyu40(truth.semantic))
        gt_instance = np.loadtxt(export / "ground_truth" / "instance" / f"{scene_id}.txt",
                                 dtype=np.int64)
        np.testing.assert_array_equal(gt_instance,
                                      encode_ground_truth(truth.semantic, truth.instance))
    assert lines >= 20  # the exported model did predict instances
    run = evaluate("--cache", str(tiny_store), "--predictions", str(export), "--json", str(scored),
                   "--min-region-size", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(direct.read_text())
    assert json.loads(scored.read_text()) == figures  # the same numbers, to the last bit
    assert set(figures) == {"miou", "ap", "ap50", "ap25", "per_class", "scenes"}
    assert figures["scenes"] == SCENES and list(figures["per_class"]) == list(CLASS_NAMES)
    assert set(figures["per_class"]["chair"]) == {"iou", "ap", "ap50", "ap25"}
    assert figures["per_class"]["wall"]["ap"] is None  # not an instance class
    assert 0 < figures["miou"] <= 1 and figures["ap25"] is not None


def test_a_model_without_the_instance_head_exports_no_instances(tiny_store, tmp_path):
    """Its direct figures have no AP (null), and neither has the score of its export."""
    Trainer(config(tiny_store, tmp_path, epochs=1, val_fraction=0.5, batch_scenes=1,
                   instance_head=False)).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    export, direct, scored = (tmp_path / name for name in ("submission", "direct.json",
                                                            "scored.json"))
    run = evaluate("--cache", str(tiny_store), "--checkpoint", str(checkpoint), "--scenes",
                   *SCENES, "--export", str(export), "--json", str(direct), "--device", "cpu",
                   "--out", str(tmp_path / "ply"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (export / "instance").exists() and (export / "semantic").is_dir()
    run = evaluate("--cache", str(tiny_store), "--predictions", str(export), "--json", str(scored))
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(direct.read_text())
    assert figures["ap"] is None and json.loads(scored.read_text()) == figures


def imperfect_submission(store_path: Path, folder: Path, seed: int = 0) -> dict:
    """Predictions a model could make, from the store's ground truth: objects found whole,
    split in two, merged with the next one, or missed; false positives on the wall and on
    other objects; tied scores; 20% of the semantic labels wrong (some to ids outside the 20).
    Returns the figures computed in memory (BenchmarkScores), never through files."""
    rng = np.random.default_rng(seed)
    store = open_store(store_path)
    scores = BenchmarkScores(min_region_size=10)
    for scene_id in SCENES:
        truth = store.scene(scene_id, with_depth=False)
        labels = scannet20_to_nyu40(truth.semantic)
        semantic = np.where(labels == 0, 1, labels)
        wrong = rng.random(len(semantic)) < 0.2
        semantic[wrong] = rng.choice(list(VALID_CLASS_IDS) + [22, 40], size=int(wrong.sum()))
        write_semantic(folder, scene_id, semantic)
        predicted = nyu40_to_scannet20(semantic)
        scores.add_semantic(torch.from_numpy(np.where(predicted < 0, 20, predicted)).long(),
                            torch.from_numpy(truth.semantic.astype(np.int64)))
        objects = [i for i in np.unique(truth.instance[truth.instance >= 0])
                   if labels[truth.instance == i][0] in VALID_CLASS_IDS[2:]]
        instances = []
        for index, instance_id in enumerate(objects):
            mask = truth.instance == instance_id
            label = int(labels[mask][0])
            score = float(rng.choice([0.5, 0.7, rng.random()]))
            kind = rng.random()
            if kind < 0.4:
                instances.append(PredictedInstance(mask, label, score))
            elif kind < 0.6:
                half = np.flatnonzero(mask)[: mask.sum() // 2]
                first = np.zeros_like(mask)
                first[half] = True
                instances += [PredictedInstance(first, label, score),
                              PredictedInstance(mask & ~first, label, score / 2)]
            elif kind < 0.75 and index + 1 < len(objects):
                instances.append(PredictedInstance(mask | (truth.instance == objects[index + 1]),
                                                   label, score))
            elif kind < 0.9:
                instances.append(PredictedInstance(mask, int(rng.choice(VALID_CLASS_IDS[2:])),
                                                   score))
        wall = np.flatnonzero(truth.semantic == 0)
        on_wall = np.zeros(len(labels), dtype=bool)
        on_wall[wall[: len(wall) // 3]] = True
        instances.append(PredictedInstance(on_wall, int(VALID_CLASS_IDS[4]), 0.99))
        write_instances(folder, scene_id, instances)
        scores.add_instances(truth.semantic, truth.instance, instances)
    return to_json(scores.result(), SCENES)


def test_any_models_submission_is_scored_as_in_memory(tiny_store, tmp_path):
    expected = imperfect_submission(tiny_store, tmp_path / "submission")
    assert 0.1 < expected["ap25"] < 0.95 and 0.3 < expected["miou"] < 0.95  # not degenerate
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path / "submission"),
                   "--json", str(tmp_path / "scored.json"), "--min-region-size", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "scored.json").read_text()) == expected


def perfect_submission(store_path: Path, folder: Path) -> None:
    """The store's ground truth written as predictions: every labelled vertex right, every
    instance of a thing class its own mask."""
    store = open_store(store_path)
    for scene_id in SCENES:
        truth = store.scene(scene_id, with_depth=False)
        labels = scannet20_to_nyu40(truth.semantic)
        write_semantic(folder, scene_id, np.where(labels == 0, 1, labels))  # unlabelled: any id
        instances = []
        for instance_id in np.unique(truth.instance[truth.instance >= 0]):
            mask = truth.instance == instance_id
            label = int(labels[mask][0])
            if label in VALID_CLASS_IDS[2:]:
                instances.append(PredictedInstance(mask, label, 0.5))
        write_instances(folder, scene_id, instances)


def test_perfect_predictions_of_any_model_score_one(tiny_store, tmp_path):
    perfect_submission(tiny_store, tmp_path / "perfect")
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path / "perfect"),
                   "--json", str(tmp_path / "perfect.json"), "--min-region-size", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((tmp_path / "perfect.json").read_text())
    assert figures["miou"] == 1.0 and figures["ap"] == figures["ap50"] == figures["ap25"] == 1.0
    present = [name for name, values in figures["per_class"].items() if values["iou"] is not None]
    assert "wall" in present and "floor" in present and len(present) >= 5
    assert "semantic mIoU 1.000" in run.stdout and "instance AP 1.000" in run.stdout


def test_semantic_only_submissions_are_scored_without_ap(tiny_store, tmp_path):
    perfect_submission(tiny_store, tmp_path / "perfect")
    shutil.rmtree(tmp_path / "perfect" / "instance")
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path / "perfect"),
                   "--json", str(tmp_path / "out.json"), "--scenes", "scene0001_00")
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["miou"] == 1.0 and figures["ap"] is None and figures["scenes"] == ["scene0001_00"]


BREAKAGES = {
    "short": "scene0000_00.txt has 4 lines but the scene has",
    "word": "scene0000_00.txt line 1: 'chair' is not an integer",
    "mask": "scene0001_00_000.txt has 3 lines but the scene has",
    "listing": "scene0001_00.txt line 1: expected `predicted_masks/<scene>_NNN.txt",
    "outside": "lies outside",
    "unknown scene": "predictions for scene scene0099_00, which no store",
    "huge": "scene0000_00.txt line 1: '99999999999999999999' is out of range",
    "device": "scene0001_00_000.txt: not a regular file",
}


def break_submission(folder: Path, breakage: str) -> None:
    semantic = folder / "semantic" / "scene0000_00.txt"
    listing = folder / "instance" / "scene0001_00.txt"
    if breakage == "short":
        semantic.write_text("1\n2\n3\n4\n")
    elif breakage == "word":
        semantic.write_text("chair\n" + "\n".join(semantic.read_text().splitlines()[1:]) + "\n")
    elif breakage == "mask":
        (folder / "instance" / "predicted_masks" / "scene0001_00_000.txt").write_text("0\n1\n1\n")
    elif breakage == "listing":
        listing.write_text("predicted_masks/scene0001_00_000.txt  5 0.5\n")
    elif breakage == "outside":
        listing.write_text("../../secret.txt 5 0.5\n")
    elif breakage == "huge":  # beyond int64: ScanNet's script fails on it, never saturates
        semantic.write_text("99999999999999999999\n" + "\n".join(
            semantic.read_text().splitlines()[1:]) + "\n")
    elif breakage == "device":  # a mask that never ends
        mask = folder / "instance" / "predicted_masks" / "scene0001_00_000.txt"
        mask.unlink()
        mask.symlink_to("/dev/zero")
    else:
        shutil.copy(semantic, folder / "semantic" / "scene0099_00.txt")


def test_a_bad_submission_fails_in_one_line_naming_the_file(tiny_store, tmp_path):
    perfect_submission(tiny_store, tmp_path / "submission")
    break_submission(tmp_path / "submission", "short")
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path / "submission"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {tmp_path / 'submission' / 'semantic'}/")
    assert BREAKAGES["short"] in run.stderr


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_every_kind_of_bad_submission_is_one_line(tiny_store, tmp_path, capsys, breakage):
    from model.evaluate import main

    perfect_submission(tiny_store, tmp_path / "submission")
    break_submission(tmp_path / "submission", breakage)
    assert main(["--cache", str(tiny_store), "--predictions", str(tmp_path / "submission")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and BREAKAGES[breakage] in err


def test_an_unwritable_json_and_a_negative_region_size_are_one_line(tiny_store, tmp_path, capsys):
    from model.evaluate import main

    perfect_submission(tiny_store, tmp_path / "submission")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert main(["--cache", str(tiny_store), "--predictions", str(tmp_path / "submission"),
                 "--json", str(blocked / "metrics.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --json: cannot write {blocked / 'metrics.json'} (a part of "
                          "its folder is a file)")
    assert err.count("\n") == 1
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path / "submission"),
                   "--min-region-size", "-5")
    assert run.returncode == 2 and "--min-region-size -5: a number of vertices" in run.stderr


def test_modes_and_their_flags(tiny_store, tmp_path):
    run = evaluate("--cache", str(tiny_store))
    assert run.returncode == 2 and "--checkpoint" in run.stderr and "--predictions" in run.stderr
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path), "--export",
                   str(tmp_path / "x"))
    assert run.returncode == 2 and "need --checkpoint" in run.stderr
    run = evaluate("--cache", str(tiny_store), "--predictions", str(tmp_path))
    assert run.returncode == 1 and "no predictions in" in run.stderr
