"""ScanNet's submission format: what is written reads back exactly, and reading follows the
rules of ScanNet's util_3d.read_instance_prediction_file."""

from __future__ import annotations

import numpy as np

from model.submission import (PredictedInstance, read_instances, read_semantic, write_instances,
                              write_semantic)


def test_instances_read_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    written = [PredictedInstance(rng.random(50) < 0.3, label, score)
               for label, score in ((5, 0.1 + 0.2), (7, 1 / 3), (39, 0.5), (5, 0.1 + 0.2))]
    path = write_instances(tmp_path, "scene0000_00", written)
    assert path.read_text().splitlines()[0] == ("predicted_masks/scene0000_00_000.txt 5 "
                                                "0.30000000000000004")
    read = read_instances(tmp_path, "scene0000_00", 50)
    assert len(read) == 4
    for a, b in zip(written, read):
        assert np.array_equal(a.mask, b.mask) and a.label == b.label and a.score == b.score
    write_semantic(tmp_path, "scene0000_00", np.arange(50) % 41)
    assert read_semantic(tmp_path, "scene0000_00", 50).tolist() == (np.arange(50) % 41).tolist()


def test_reading_follows_scannets_rules(tmp_path):
    masks = tmp_path / "instance" / "predicted_masks"
    masks.mkdir(parents=True)
    (masks / "a.txt").write_text("0\n2\n-1\n")  # any non-zero value is in the instance
    (masks / "b.txt").write_text("1\n0\n0\n")
    # label as a float, a mask named twice: its first place, its last label and confidence
    (tmp_path / "instance" / "scene0000_00.txt").write_text(
        "predicted_masks/a.txt 5.0 0.25\npredicted_masks/b.txt 7 0.5\n"
        "predicted_masks/a.txt 6 0.75\n")
    read = read_instances(tmp_path, "scene0000_00", 3)
    assert [(r.label, r.score, r.mask.tolist()) for r in read] == [
        (6, 0.75, [False, True, True]), (7, 0.5, [True, False, False])]
