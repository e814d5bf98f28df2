"""model.query: a planted store is segmented back to its labels, a shuffled one is not; the fused
route, the outputs and the CLI's errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from model.config import TrainConfig
from model.dataset import CachedScenes, collate
from model.query import Query, QueryConfig, label_points, main
from model.checkpoint import build_model
from model.train import Trainer
from pipeline.planted import write_planted_store
from pipeline.prompts import DEFAULT_TEMPLATES, SCANNET20_PROMPTS
from pipeline.text_embeddings import ensure_text_embeddings
from storage import UserError, open_store
from storage.text import missing_prompts

REPO = Path(__file__).resolve().parents[2]
SCENES = ("scene0000_00", "scene0001_00")
SMALL = {"voxel_size": 0.05, "channels": (16, 32), "width": 32, "plot": False, "device": "cpu",
         "warmup_steps": 0, "epochs": 1, "val_fraction": 0.5}


@pytest.fixture(scope="module")
def planted(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic scenes, each labelled region's features a noisy copy of the text embedding
    of its class name (pipeline.planted)."""
    path = tmp_path_factory.mktemp("planted") / "store.zarr"
    write_planted_store(synthetic_root, path, noise=0.5)
    return path


@pytest.fixture(scope="module")
def checkpoint(planted, tmp_path_factory) -> Path:
    """A fusion model trained for one epoch on the planted store, with a validation list that
    is deleted afterwards: a query needs none of the run's data split."""
    out = tmp_path_factory.mktemp("run")
    val_list = out / "val.txt"
    val_list.write_text("scene0001_00\n")
    Trainer(TrainConfig(cache=str(planted), out=str(out), val_list=str(val_list), **SMALL)).fit()
    val_list.unlink()
    return out / "checkpoints" / "last.pt"


def evaluate_2d(store: Path) -> tuple[dict, dict]:
    """The 2d route with --eval over both scenes: (result, scene id -> (sample, labels))."""
    seen: dict = {}
    query = Query(QueryConfig(cache=str(store), scenes=SCENES, evaluate=True, device="cpu"))
    assert query.routes == ("2d",)
    result = query.run(lambda sample, answers: seen.update({sample.scene_id: (sample, answers)}))
    return result, seen


def test_planted_store_is_segmented_back_to_its_labels(planted):
    result, seen = evaluate_2d(planted)
    # ScanNet's rule: classes predicted on a few points (at object borders) but absent from
    # the scenes count 0 in the mean, which holds the mIoU near 0.6 although points are right
    assert result["metrics"]["2d"]["miou"] >= 0.55, result["metrics"]
    for scene_id, (sample, answers) in seen.items():
        labels, truth = answers["2d"].labels, sample.semantic.numpy()
        scored = sample.seen.numpy() & (truth >= 0)
        assert (labels[scored] == truth[scored]).mean() >= 0.9
        # points no view sees are unknown and counted, never guessed
        unseen = ~sample.seen.numpy()
        assert unseen.any() and (labels[unseen] == -1).all() and (labels[~unseen] >= 0).all()
        assert np.isnan(answers["2d"].score[unseen]).all()
        figures = result["scenes"][scene_id]["2d"]
        assert figures["unknown"] == unseen.sum()
        assert sum(figures["counts"].values()) + figures["unknown"] == figures["points"]
        assert figures["points"] == len(labels)


def test_shuffled_store_is_not_segmented(synthetic_root, tmp_path):
    write_planted_store(synthetic_root, tmp_path / "store.zarr", noise=0.5, shuffle=True)
    result, _ = evaluate_2d(tmp_path / "store.zarr")
    assert result["metrics"]["2d"]["miou"] <= 0.15, result["metrics"]


def test_points_take_the_prompt_of_highest_cosine():
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    truth = torch.randint(0, 5, (200,), generator=generator)
    scale = torch.rand(200, 1, generator=generator) * 10 + 0.1  # cosine: the norm does not count
    features = (text[truth] + 0.05 * torch.randn(200, 16, generator=generator)) * scale
    seen = torch.rand(200, generator=generator) > 0.2
    answer = label_points(features, text, seen)
    np.testing.assert_array_equal(answer.labels, np.where(seen, truth, -1))
    assert answer.unknown == int((~seen).sum()) and np.isnan(answer.score[~seen.numpy()]).all()
    assert (answer.score[seen.numpy()] > 0.9).all() and answer.score.dtype == np.float32


def test_point_clip_embeddings_pool_to_the_view_embeddings(planted):
    store = open_store(planted)
    (featureset, spec), = store.featuresets().items()
    sample = CachedScenes({SCENES[0]: store}, featureset, torch.device("cpu")).get(SCENES[0])
    torch.manual_seed(0)
    model = build_model(TrainConfig(**{**SMALL, "channels": (16, 32)}), spec).eval()
    with torch.no_grad():
        output = model(collate([sample]))
        per_point = model.point_clip_embed(output.fused * 20)  # beyond the clamp, as pooled
        pooled_input = (output.fused * 20).clamp(-10, 10)
    assert per_point.shape == (sample.xyz.shape[0], spec.global_dim)
    views = sample.view_visible
    assert views.any(dim=1).all()
    for view in range(views.shape[0]):
        torch.testing.assert_close(per_point[views[view]].mean(0),
                                   model.clip_proj(pooled_input[views[view]].mean(0)))
    with torch.no_grad():
        per_point = model.point_clip_embed(output.fused)
    for view in range(views.shape[0]):
        torch.testing.assert_close(per_point[views[view]].mean(0), output.view_embed[view],
                                   rtol=1e-4, atol=1e-5)


def test_cli_with_a_checkpoint_labels_by_both_routes(planted, checkpoint, tmp_path, capsys):
    from plyfile import PlyData

    out = tmp_path / "query"
    assert main(["--cache", str(planted), "--scene", *SCENES, "--eval", "--checkpoint",
                 str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[2d] semantic mIoU" in printed and "[fused] semantic mIoU" in printed
    saved = json.loads((out / "query.json").read_text())
    assert saved["routes"] == ["2d", "fused"] and saved["config"]["checkpoint"] == str(checkpoint)
    direct = evaluate_2d(planted)[0]["metrics"]["2d"]["miou"]
    assert saved["metrics"]["2d"]["miou"] == pytest.approx(direct)
    assert len(saved["metrics"]["fused"]["class_iou"]) == 20
    n_points = open_store(planted).scene(SCENES[0], with_depth=False).xyz.shape[0]
    for route in ("2d", "fused"):
        vertex = PlyData.read(str(out / f"{SCENES[0]}.{route}.ply"))["vertex"]
        assert vertex.count == n_points
        labels = np.asarray(vertex["label"])
        assert labels.min() >= (-1 if route == "2d" else 0) and labels.max() < 20
        assert np.isfinite(np.asarray(vertex["score"])[labels >= 0]).all()
        assert saved["scenes"][SCENES[0]][route]["unknown"] == (labels == -1).sum()
    assert saved["scenes"][SCENES[0]]["fused"]["unknown"] == 0
    assert (out / f"{SCENES[1]}.png").stat().st_size > 5000


def test_a_tokens_feature_set_has_the_fused_route_only(tiny_store, tmp_path):
    store_path = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store_path)
    store = open_store(store_path, mode="a")
    (featureset, spec), = store.featuresets().items()
    assert spec.spatial_kind == "tokens"
    ensure_text_embeddings(store, featureset, SCANNET20_PROMPTS, DEFAULT_TEMPLATES, device="cpu")
    base = QueryConfig(cache=str(store_path), scenes=SCENES[:1], evaluate=True, device="cpu")
    with pytest.raises(UserError, match="not in CLIP's image-text space.*--spatial-kind maskclip"):
        Query(base)
    Trainer(TrainConfig(cache=str(store_path), out=str(tmp_path / "run"), **SMALL)).fit()
    trained = QueryConfig(**{**vars(base), "checkpoint": str(tmp_path / "run/checkpoints/last.pt")})
    query = Query(trained)
    assert query.routes == ("fused",)
    assert 0 <= query.run()["metrics"]["fused"]["miou"] <= 1
    with pytest.raises(UserError, match="--spatial-kind maskclip"):
        Query(QueryConfig(**{**vars(trained), "route": "both"}))


def test_cli_errors_are_one_line_and_name_the_fix(planted, tmp_path, capsys):
    store = tmp_path / "store.zarr"
    shutil.copytree(planted, store)
    (featureset,) = open_store(store).featuresets()
    common = ["--cache", str(store), "--device", "cpu", "--out", str(tmp_path / "out")]

    def error(*argv: str) -> str:
        assert main([*common, *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no finished features" in error("--scene", "scene9999_00", "--eval")
    assert "has no feature set nope" in error("--scene", SCENES[0], "--eval",
                                                  "--featureset", "nope")
    assert "--checkpoint" in error("--scene", SCENES[0], "--eval", "--route", "fused")
    # prompts the store lacks are encoded by the feature set's text tower (a child process);
    # where that cannot be done here, the error says why and prints the command to run
    lamp = ["--scene", SCENES[0], "--text", "lamp", "chair", "--templates", "plain",
            "--storage-options", '{"auto_mkdir": true}']  # options of a URL; a path ignores them
    group = zarr.open_group(str(store), mode="a")[f"featuresets/{featureset}"]
    recorded = dict(group.attrs)
    group.attrs["pretrained"] = "file:weights.bin"  # as if extracted from a checkpoint file
    err = error(*lamp)
    assert "the feature set was extracted from the checkpoint file weights.bin: pass its path " \
           "with --pretrained" in err
    command = err[err.index("`") + 1:err.rindex("`")]
    assert command == (f"python -m pipeline.text_embeddings --store {store} --featureset "
                       f"{featureset} --prompts lamp chair --templates plain --storage-options "
                       """'{"auto_mkdir": true}'""")
    group.attrs.update(recorded)
    assert main([*common, *lamp]) == 0  # encoded now, in one command
    assert "most labelled:" in capsys.readouterr().out
    assert missing_prompts(open_store(store), featureset, ["lamp", "chair"], ("{}",)) == []
    with pytest.raises(SystemExit):
        main([*common, "--scene", SCENES[0], "--eval", "--text", "lamp", "chair"])  # not 20
    with pytest.raises(SystemExit):
        main([*common, "--scene", SCENES[0]])  # neither --text nor --eval


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "model.query", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m model.query")
    for flag in ("--cache", "--scene", "--text", "--eval", "--checkpoint", "--featureset",
                 "--route", "--templates", "--out", "--device", "--storage-options"):
        assert flag in result.stdout
