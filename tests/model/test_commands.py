"""Stage 2 and the open-vocabulary queries as README prints them, run as subprocesses in a folder
that holds README's `storage/` (the stores written by README's stage-1 commands), with the run
folders and scene ids of this test set substituted."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.config import TrainConfig
from model.train import Trainer
from model.train import main as train_main
from pipeline.prompts import DEFAULT_TEMPLATES
from storage import open_store
from storage.text import missing_prompts
from tests.readme import command, output, run, typed

SCENE = "scene0000_00"
TRAIN = "python -m model.train --cache --epochs"
MASKCLIP = ("python -m flows.extract_clip --dataset --model --pretrained --root --spatial-kind "
            "--store")
QUERY_TEXT = "python -m model.query --cache --scene --text"
QUERY_EVAL = "python -m model.query --cache --checkpoint --eval --scene"


def workdir(tmp_path: Path, storage: Path) -> Path:
    """A folder whose `storage/` is `storage` (read-only there), as README's commands expect."""
    (tmp_path / "storage").symlink_to(storage, target_is_directory=True)
    return tmp_path


def run_folder(result) -> Path:
    return Path(re.search(r"run folder (\S+?):", result.stdout).group(1))


@pytest.fixture(scope="module")
def trained(readme_store, cli_env, tmp_path_factory) -> tuple[Path, Path, object]:
    """README's `python -m model.train --cache storage/ --epochs 30`, one epoch instead of 30:
    (the folder it ran in, its run folder, the finished process)."""
    cwd = workdir(tmp_path_factory.mktemp("stage-2"), readme_store.parent)
    result = run(typed(command(TRAIN), {"--epochs": "1"}), cli_env, cwd=cwd)
    assert result.returncode == 0, output(result)[-3000:]
    return cwd, cwd / run_folder(result), result


def test_train_as_printed(trained):
    # the commands table's form, with the epochs given, is the same command
    assert typed(command("python -m model.train --cache"), append=["--epochs", "1"]) == \
        typed(command(TRAIN), {"--epochs": "1"})
    cwd, folder, result = trained
    assert folder.parent == cwd / "runs"
    assert "training on 2 scenes, validating on 1" in result.stderr
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1]
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "curves.png", "tensorboard"):
        assert (folder / name).exists(), name
    assert result.stdout.rstrip().endswith("checkpoints/last.pt, checkpoints/best.pt, "
                                           "metrics.jsonl, curves.png, tensorboard/")


def test_no_epochs_claims_no_checkpoint(readme_store, tmp_path, capsys):
    assert train_main(["--cache", str(readme_store), "--epochs", "0", "--out",
                       str(tmp_path / "run"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "no epoch trained: no checkpoint, no curves" in printed
    assert ".pt" not in printed and "curves.png" not in printed
    assert printed.rstrip().endswith("metrics.jsonl, tensorboard/")
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_train_on_a_featureset_with_a_val_list(readme_store, cli_env, tmp_path):
    cwd = workdir(tmp_path, readme_store.parent)
    (cwd / "val.txt").write_text("scene0002_00\n")
    (featureset,) = open_store(readme_store).featuresets()
    result = run(typed(command("python -m model.train --cache --featureset --val-list"),
                       {"--featureset": featureset}, append=["--epochs", "1"]), cli_env, cwd=cwd)
    assert result.returncode == 0, output(result)[-3000:]
    assert f"training on 2 scenes, validating on 1, feature set {featureset}" in result.stderr
    saved = json.loads((cwd / run_folder(result) / "metrics.jsonl").read_text().splitlines()[0])
    assert saved["epoch"] == 1


def test_resume_as_printed(trained, cli_env, tmp_path):
    """`--resume runs/RUN` with a larger --epochs trains on from the finished epoch."""
    cwd, folder, _ = trained
    copy = workdir(tmp_path, (cwd / "storage").resolve())
    shutil.copytree(folder, copy / "runs" / folder.name)
    result = run(typed(command("python -m model.train --cache --resume"),
                       {"runs/RUN": f"runs/{folder.name}"}, append=["--epochs", "2"]),
                 cli_env, cwd=copy)
    assert result.returncode == 0, output(result)[-3000:]
    assert f"resuming runs/{folder.name} at epoch 2, step 0" in result.stderr
    history = (copy / "runs" / folder.name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]


EVALUATE = "python -m model.evaluate --cache --checkpoint --export --json --render"
SCORE = "python -m model.evaluate --cache --json --predictions"
EVALUATE_BLOCK = "python -m model.evaluate --cache --checkpoint --export --json --render #2"
SCORE_BLOCK = "python -m model.evaluate --cache --json --predictions #2"
"""The commands table's forms (optional parts in brackets), then the code blocks' forms."""


@pytest.fixture(scope="module")
def evaluated(trained, cli_env):
    """README's evaluation of a finished run, as printed (its run folder for runs/RUN): the
    folder it ran in (with submission/ and metrics.json), the run folder, the process."""
    cwd, folder, _ = trained
    found = command(EVALUATE_BLOCK)
    result = run(typed(found, {"runs/RUN/checkpoints/best.pt":
                               f"runs/{folder.name}/checkpoints/best.pt"}), cli_env, cwd=cwd)
    assert result.returncode == 0, output(result)[-3000:]
    return cwd, folder, result


def test_evaluate_as_printed(evaluated):
    """The evaluation of a finished run says what it evaluates, not that it "resumed"; it
    writes the PLYs and PNGs, the submission and the metrics. The table's form with its
    optional parts is the same command."""
    assert typed(command(EVALUATE), {"RUN/checkpoints/best.pt": "runs/RUN/checkpoints/best.pt",
                                     "DIR": "submission/", "FILE": "metrics.json"}) == \
        typed(command(EVALUATE_BLOCK))
    cwd, folder, result = evaluated
    assert "semantic mIoU" in result.stdout and "instance AP" in result.stdout
    assert "resumed" not in output(result) and "resuming" not in output(result)
    assert re.search(r"evaluating runs/\S+/checkpoints/best.pt \(after 1 epochs\) on 1 scenes",
                     result.stderr)
    assert re.search(r"^predicted instances: \d+ in 1 scenes$", result.stdout, re.M)
    (ply,) = (folder / "predictions").glob("*.ply")
    assert (folder / "predictions" / f"{ply.stem}.png").stat().st_size > 5000
    assert (cwd / "submission" / "semantic" / f"{ply.stem}.txt").is_file()
    assert json.loads((cwd / "metrics.json").read_text())["scenes"] == [ply.stem]


def test_score_a_submission_as_printed(evaluated, cli_env, tmp_path):
    """README's scoring of a submission folder (the one the evaluation above exported) gives
    the figures of the direct evaluation; the table's form is the same command."""
    cwd, _, _ = evaluated
    assert typed(command(SCORE), {"DIR": "submission/", "FILE": "metrics.json"}) == \
        typed(command(SCORE_BLOCK))
    direct = json.loads((cwd / "metrics.json").read_text())
    scored_in = tmp_path / "score"
    shutil.copytree(cwd / "submission", scored_in / "submission")
    (scored_in / "storage").symlink_to((cwd / "storage").resolve(), target_is_directory=True)
    result = run(typed(command(SCORE_BLOCK)), cli_env, cwd=scored_in)
    assert result.returncode == 0, output(result)[-3000:]
    scored = json.loads((scored_in / "metrics.json").read_text())
    assert scored["scenes"] == direct["scenes"]
    assert scored["miou"] == pytest.approx(direct["miou"], abs=1e-6)
    for key in ("ap", "ap50", "ap25"):
        assert (scored[key] is None) == (direct[key] is None), key
        if direct[key] is not None:
            assert scored[key] == pytest.approx(direct[key], abs=1e-6), key


def test_a_rendered_prediction_has_a_class_legend(readme_store, tmp_path, monkeypatch):
    """Every PNG that shows classes says which colour is which."""
    import torch

    from model import evaluate
    from model.dataset import CachedScenes

    store = open_store(readme_store)
    (featureset,) = store.featuresets()
    sample = CachedScenes({SCENE: store}, featureset, torch.device("cpu")).get(SCENE)
    truth = sample.semantic.numpy()
    absent = min(set(range(20)) - set(truth.tolist()))
    predicted = np.where(truth == 0, absent, truth)  # walls predicted as a class not there
    shown = {}
    monkeypatch.setattr(evaluate, "plot_top_views",
                        lambda path, xyz, panels, title, legend=None: shown.update(legend=legend))
    evaluate.render(tmp_path / "x.png", sample, evaluate.ScenePrediction(SCENE, predicted, []))
    names = {evaluate.CLASS_NAMES[k] for k in np.unique(truth) if k >= 0}
    assert set(shown["legend"]) == names | {evaluate.CLASS_NAMES[absent],
                                            "unlabelled / no instance"}


# ------------------------------------------------------------------ open-vocabulary queries


@pytest.fixture(scope="module")
def maskclip_workdir(readme_scenes, cli_env, tmp_path_factory) -> Path:
    """A folder whose `storage/scannet-maskclip.zarr` README's maskclip command wrote."""
    cwd = tmp_path_factory.mktemp("maskclip")
    result = run(typed(command(MASKCLIP), {"--root": str(readme_scenes), "--model": "test-ViT-tiny",
                                           "--pretrained": "none"}), cli_env, cwd=cwd)
    assert result.returncode == 0, output(result)[-3000:]
    return cwd


@pytest.fixture(scope="module")
def maskclip_checkpoint(maskclip_workdir) -> Path:
    """A model trained for one epoch on the maskclip store (with the distillation term), in
    the folder's runs/."""
    out = maskclip_workdir / "runs" / "maskclip"
    Trainer(TrainConfig(cache=str(maskclip_workdir / "storage"), out=str(out), epochs=1,
                        device="cpu", voxel_size=0.05, channels=(16, 32), width=32,
                        plot=False)).fit()
    return out / "checkpoints" / "best.pt"


def test_maskclip_store_as_printed(maskclip_workdir):
    store = open_store(maskclip_workdir / "storage" / "scannet-maskclip.zarr")
    ((featureset, spec),) = store.featuresets().items()
    assert spec.spatial_kind == "maskclip" and spec.text_aligned and len(store.scenes()) == 3


def test_query_by_text_in_one_command(maskclip_workdir, cli_env, tmp_path):
    """Prompts not cached yet are encoded by the feature set's text tower in a child process
    and cached; the query process itself never imports open_clip (its import log says)."""
    store_path = maskclip_workdir / "storage" / "scannet-maskclip.zarr"
    cwd = tmp_path / "copy"
    shutil.copytree(store_path, cwd / "storage" / store_path.name)
    featureset = next(iter(open_store(store_path).featuresets()))
    assert missing_prompts(open_store(store_path), featureset, ["chair", "coffee table"],
                           DEFAULT_TEMPLATES) == ["chair", "coffee table"]
    result = run(typed(command(QUERY_TEXT), {"scene0011_00": SCENE}),
                 {**cli_env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd)
    assert result.returncode == 0, output(result)[-3000:]
    assert f"{SCENE} 2d: " in result.stdout and "most labelled:" in result.stdout
    assert "encoding 2 prompt(s) not cached" in result.stderr
    imported = re.findall(r"^import time:.*\| +([\w.]+)$", result.stderr, re.M)
    assert "model.dataset" in imported and "open_clip" not in imported
    assert not any(name.startswith("pipeline.encoders") for name in imported)
    assert missing_prompts(open_store(cwd / "storage" / store_path.name), featureset,
                           ["chair", "coffee table"], DEFAULT_TEMPLATES) == []
    (out,) = (cwd / "runs").iterdir()
    assert {p.name for p in out.iterdir()} == {f"{SCENE}.2d.ply", f"{SCENE}.png", "query.json"}


def test_query_eval_with_a_checkpoint(maskclip_workdir, maskclip_checkpoint, cli_env):
    result = run(typed(command(QUERY_EVAL), {
        "scene0011_00": SCENE, "runs/RUN/checkpoints/best.pt": str(maskclip_checkpoint)}),
        cli_env, cwd=maskclip_workdir)
    assert result.returncode == 0, output(result)[-3000:]
    assert "[2d] semantic mIoU" in result.stdout and "[fused] semantic mIoU" in result.stdout


def test_query_as_in_the_table(maskclip_workdir, maskclip_checkpoint, cli_env):
    """The table's form with its optional --checkpoint (and without --eval, which with --text
    takes one prompt per ScanNet class)."""
    result = run(typed(command("python -m model.query --cache --checkpoint --eval --scene --text"),
                       {"STORE.zarr": "storage/scannet-maskclip.zarr", "ID": SCENE,
                        "RUN/checkpoints/best.pt": str(maskclip_checkpoint)}, drop=["--eval"]),
                 cli_env, cwd=maskclip_workdir)
    assert result.returncode == 0, output(result)[-3000:]
    assert f"{SCENE} 2d: " in result.stdout and f"{SCENE} fused: " in result.stdout


def test_text_embeddings_ahead_of_queries(maskclip_workdir, cli_env, tmp_path):
    store_path = maskclip_workdir / "storage" / "scannet-maskclip.zarr"
    copy = tmp_path / "storage" / store_path.name
    shutil.copytree(store_path, copy)
    for cached in copy.glob("featuresets/*/text"):  # what the queries above encoded
        shutil.rmtree(cached)
    argv = typed(command("python -m pipeline.text_embeddings --prompts --scannet20 --store #2"))
    assert typed(command("python -m pipeline.text_embeddings --prompts --scannet20 --store"),
                 {"STORE.zarr": str(store_path.relative_to(maskclip_workdir))}) == argv
    first = run(argv, cli_env, cwd=tmp_path)
    assert first.returncode == 0, output(first)[-3000:]
    assert "21 prompts x 7 templates" in first.stdout and ": 21 encoded, 0 cached" in first.stdout
    again = run(argv, cli_env, cwd=tmp_path)
    assert ": 0 encoded, 21 cached already" in again.stdout
