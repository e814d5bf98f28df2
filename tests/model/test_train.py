"""Stage 2 end to end on a real store: feature-set choice, split, training, checkpoints, resume."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import model.train as train_module
from model.config import TrainConfig, build_parser, parse_config
from model.dataset import CachedScenes, collate
from model.network.losses import LossConfig
from model.evaluate import evaluate
from model.train import Trainer, main, train_step
from storage import StoreError, UserError, open_store
from tests.conftest import write_store

REPO = Path(__file__).resolve().parents[2]
SMALL = {"voxel_size": 0.05, "channels": (16, 32, 48), "width": 64, "plot": False,
         "device": "cpu", "warmup_steps": 0}


def config(store, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{"cache": str(store), "out": str(tmp_path / "run"), **SMALL, **overrides})


def test_model_package_never_imports_open_clip():
    """Neither open_clip nor any image encoder of stage 1 (pipeline.encoders, which builds
    CLIP and DINOv2): stage 2 reads their features from the store."""
    paths = sorted((REPO / "model").rglob("*.py"))
    assert REPO / "model" / "network" / "fusion.py" in paths
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] in ("open_clip", "timm")
                           or name.startswith("pipeline.encoders") for name in names), path
    # and at run time: importing every module of model/ leaves open_clip unloaded
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in paths
               if p.stem != "__init__"]
    code = f"import sys; import {', '.join(modules)}; sys.exit('open_clip' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_no_gradient_reaches_a_cached_feature(tiny_store):
    store = open_store(tiny_store)
    (featureset,) = store.featuresets()
    before = store.features("scene0000_00", featureset).spatial.copy()
    scenes = CachedScenes({"scene0000_00": store}, featureset, torch.device("cpu"))
    sample = scenes.get("scene0000_00")
    feat2d = sample.feat2d.clone()
    assert not sample.feat2d.requires_grad and sample.seen.any()
    model = train_module.build_model(TrainConfig(**SMALL), store.featuresets()[featureset])
    batch = collate([sample])
    optimizer = torch.optim.AdamW(model.parameters())
    result = train_step(model, batch, optimizer, torch.amp.GradScaler("cpu", enabled=False), 30,
                        LossConfig(), grad_clip=1.0, amp=False)
    assert result is not None and result[0]["clip"] > 0  # the CLIP term was in the graph
    assert batch.feat2d.grad is None and sample.feat2d.grad is None
    torch.testing.assert_close(sample.feat2d, feat2d, rtol=0, atol=0)
    np.testing.assert_array_equal(open_store(tiny_store).features("scene0000_00", featureset).spatial,
                                  before)
    assert model.proj_2d[0].weight.grad is not None  # gradients stop at the 2D projection


def test_training_overfits_one_scene(tiny_store, tmp_path):
    val_list = tmp_path / "val.txt"
    val_list.write_text("scene0001_00\n")
    # 2 cm voxels: the scene's pictures (25 points) lie flat on a wall, coarser voxels merge them
    trainer = Trainer(config(tiny_store, tmp_path, val_list=str(val_list), epochs=40,
                             augment=False, lr=5e-3, batch_scenes=1, voxel_size=0.02,
                             instance_head=False, semantic_weight=1.0))
    assert trainer.train_ids == ["scene0000_00"] and trainer.val_ids == ["scene0001_00"]
    history = trainer.fit()
    assert history[-1]["train"]["total"] < 0.05 * history[0]["train"]["total"]
    assert history[-1]["train"]["miou"] >= 0.9, history[-1]["train"]


def test_instance_branch_learns_far_above_a_random_model(tiny_store, tmp_path):
    val_list = tmp_path / "val.txt"
    val_list.write_text("scene0001_00\n")
    # small scenes (5000 points): instances of >= 10 points count, as ScanNet's 100 of 150k
    trainer = Trainer(config(tiny_store, tmp_path, val_list=str(val_list), epochs=60,
                             augment=False, lr=5e-3, batch_scenes=1, voxel_size=0.02,
                             semantic_weight=1.0, cluster_radius=0.05, min_instance_points=10,
                             min_region_size=10))
    score = lambda: evaluate(trainer.model, trainer.scenes, trainer.train_ids, 60,  # noqa: E731
                             trainer.loss_config, False, trainer.cluster, min_region_size=10)
    untrained = score()
    history = trainer.fit()
    trained = score()
    assert untrained["ap50"] <= 0.02
    assert trained["ap50"] >= 0.15 and trained["ap25"] >= 0.3, trained
    assert history[-1]["train"]["offset"] < 0.3 * history[0]["train"]["offset"]


def test_run_folder_holds_metrics_plot_events_and_checkpoints(tiny_store, tmp_path, capsys):
    code = main(["--cache", str(tiny_store), "--out", str(tmp_path / "run"), "--epochs", "2",
                 "--voxel-size", "0.05", "--channels", "16,32", "--width", "32",
                 "--device", "cpu"])
    assert code == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        for split in ("train", "val"):
            assert {"total", "semantic", "clip", "miou"} <= set(record[split])
        assert len(record["val"]["class_iou"]) == 20
        # gradient norms per module group, so a user sees instability coming
        norms = record["grad_norm"]
        # (the CLIP head has no gradient yet: the CLIP term's weight is 0 before epoch 11)
        assert set(norms) == {"backbone_3d", "proj_2d", "gate", "heads"}
        for figures in norms.values():
            assert figures["nonfinite"] == 0
            assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
        assert norms["backbone_3d"]["max"] > 0
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    steps = events.Scalars("grad_norm/backbone_3d")  # a point per step: 1 training scene
    assert [step.step for step in steps] == [0, 1] and steps[0].value > 0
    assert "grad_norm_epoch/gate/p99" in events.Tags()["scalars"]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["featureset"] == next(iter(open_store(tiny_store).featuresets()))
    assert {"model", "optimizer", "scheduler", "scaler", "state", "config"} <= set(checkpoint)
    out = capsys.readouterr().out
    assert "val mIoU" in out and "checkpoints/last.pt" in out


def strip_timing(history):
    """The records without their timings, as JSON text: NaN (an AP without ground truth)
    compares equal to NaN there, as it does not in Python."""
    return json.dumps([{k: v for k, v in record.items() if k not in ("seconds", "data_wait_fraction")}
                       for record in history], sort_keys=True)


def test_resume_after_a_crash_gives_the_same_metrics(tiny_store, tmp_path, monkeypatch):
    settings = dict(epochs=3, batch_scenes=1, val_fraction=0.5, clip_schedule=((0, 0.01),))
    full = Trainer(config(tiny_store, tmp_path / "a", **settings)).fit()

    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def crash_in_the_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")  # stands in for a crash: no handler runs
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", crash_in_the_third_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(config(tiny_store, tmp_path / "b", **settings)).fit()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    resumed = Trainer(TrainConfig(cache=str(tiny_store), resume=str(tmp_path / "b" / "run"),
                                  epochs=3, device="cpu"))
    assert resumed.state.epoch == 2
    assert strip_timing(resumed.fit()) == strip_timing(full)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tiny_store, tmp_path, monkeypatch):
    store = tmp_path / "store.zarr"  # four scenes: two steps per epoch with batch_scenes=1
    shutil.copytree(tiny_store, store)
    settings = dict(epochs=2, batch_scenes=1, val_fraction=0.5)
    full = Trainer(config(store, tmp_path / "a", **settings)).fit()

    calls = {"n": 0}
    real_step = train_module.train_step

    def step_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        result = real_step(*args, **kwargs)
        if calls["n"] == 1:  # a real SIGINT, delivered mid-epoch (step 1 of 1 of epoch 1)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(store, tmp_path / "b", **settings)).fit()
    monkeypatch.setattr(train_module, "train_step", real_step)
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "interrupted.pt"
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 1
    resumed = Trainer(TrainConfig(cache=str(store), resume=str(checkpoint), epochs=2,
                                  device="cpu"))
    assert strip_timing(resumed.fit()) == strip_timing(full)


def test_several_feature_sets_are_listed_and_one_is_picked(tiny_store, synthetic_root, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    (first,) = open_store(store).featuresets()
    second = write_store(synthetic_root, store, image_size=(160, 224))
    listed = sorted((first, second))
    with pytest.raises(UserError, match=f"several feature sets .*{listed[0]}.*{listed[1]}.*--featureset"):
        Trainer(config(store, tmp_path, epochs=1))
    trainer = Trainer(config(store, tmp_path, epochs=1, featureset=second))
    assert trainer.featureset == second and trainer.spec.image_size == (160, 224)
    with pytest.raises(StoreError, match="has no feature set nope .*--featureset"):
        Trainer(config(store, tmp_path, featureset="nope"))


def test_unfinished_scenes_are_left_out_with_a_warning(tiny_store, tmp_path, caplog):
    store_path = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store_path)
    store = open_store(store_path, mode="a")
    (featureset,) = store.featuresets()
    store.root["scenes"]["scene0001_00"]["features"][featureset]["done"][3] = False
    trainer = Trainer(config(store_path, tmp_path, epochs=1))
    assert trainer.train_ids == trainer.val_ids == ["scene0000_00"]
    assert "scene0001_00 (7/8 frames)" in caplog.text and "rerun extract-clip" in caplog.text


def test_cli_errors_are_one_line_and_help_names_every_flag(tmp_path, capsys):
    assert main(["--cache", str(tmp_path / "nothing.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no feature store at") and err.count("\n") == 1
    assert main(["--cache", str(tmp_path)]) == 1
    assert "no feature store in" in capsys.readouterr().err
    help_text = build_parser().format_help()
    for flag in ("--cache", "--featureset", "--resume", "--val-list", "--amp", "--clip-schedule"):
        assert flag in help_text
    parsed = parse_config(["--channels", "8,16", "--clip-schedule", "0:0,5:0.01", "--no-augment"])
    assert parsed.channels == (8, 16) and parsed.clip_schedule == ((0, 0.0), (5, 0.01))
    assert parsed.augment is False and parsed.amp is None
    assert parsed.clip_loss == "positive"
    assert parse_config(["--clip-loss", "contrastive"]).clip_loss == "contrastive"
    with pytest.raises(SystemExit):
        parse_config(["--clip-loss", "siglip"])


def test_random_weight_feature_sets_warn(tiny_store, tmp_path):
    with pytest.warns(UserWarning, match="RANDOM encoder weights"):
        Trainer(config(tiny_store, tmp_path, epochs=1))


def test_non_finite_steps_are_skipped_and_counted(tiny_store, tmp_path, monkeypatch):
    real = train_module.compute_losses
    calls = {"n": 0}

    def nan_on_the_first_step(output, batch, epoch, cfg):
        calls["n"] += 1
        losses = real(output, batch, epoch, cfg)
        if calls["n"] == 1:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "compute_losses", nan_on_the_first_step)
    trainer = Trainer(config(tiny_store, tmp_path, epochs=1, val_fraction=0.0))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"total": 0.0, "semantic": 0.0,
                        "clip": 0.0, "miou": 0.0, "class_iou": []})
    (record,) = trainer.fit()
    assert record["skipped_steps"] == 1
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items()
               if "running" not in k and "num_batches" not in k)  # the skipped step changed nothing


def test_kill_9_during_training_then_resume(tiny_store, tmp_path):
    settings = ["--epochs", "4", "--batch-scenes", "1", "--val-fraction", "0.5", "--voxel-size",
                "0.05", "--channels", "16,32", "--width", "32", "--device", "cpu", "--no-plot"]
    # the reference runs in a fresh process too: this test session's other tests leave
    # process-wide state (thread pools) that may change the last bits of a reduction
    command = [sys.executable, "-m", "model.train", "--cache", str(tiny_store), "--out",
               str(tmp_path / "a"), *settings]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    reference = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    run_dir = tmp_path / "b"
    command[command.index(str(tmp_path / "a"))] = str(run_dir)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 4
    resumed = subprocess.run([sys.executable, "-m", "model.train", "--cache", str(tiny_store),
                              "--resume", str(run_dir)], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip_timing(history) == strip_timing(reference)


def test_evaluate_cli_prints_metrics_and_writes_ply_and_png(tiny_store, tmp_path, capsys):
    from plyfile import PlyData

    from model.evaluate import main as evaluate_main

    Trainer(config(tiny_store, tmp_path, epochs=1, val_fraction=0.5)).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    code = evaluate_main(["--cache", str(tiny_store), "--checkpoint", str(checkpoint),
                          "--scenes", "scene0000_00", "scene0001_00", "--render",
                          "--out", str(tmp_path / "pred"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "semantic mIoU" in out and "instance AP" in out and "AP50" in out
    ply = PlyData.read(str(tmp_path / "pred" / "scene0000_00.ply"))
    vertex = ply["vertex"]
    n_points = open_store(tiny_store).scene("scene0000_00", with_depth=False).xyz.shape[0]
    assert vertex.count == n_points
    assert {"red", "semantic_pred", "instance_pred"} <= {p.name for p in vertex.properties}
    assert (tmp_path / "pred" / "scene0001_00.png").stat().st_size > 5000
    assert evaluate_main(["--cache", str(tiny_store), "--checkpoint", str(tmp_path / "no.pt")]) == 1


def test_distillation_trains_point_embeddings_on_maskclip_features(synthetic_root, tmp_path):
    store = tmp_path / "maskclip.zarr"
    write_store(synthetic_root, store, spatial_kind="maskclip")
    trainer = Trainer(config(store, tmp_path, epochs=8, val_fraction=0.5, batch_scenes=1))
    assert trainer.loss_config.distill_weight == 1.0 and trainer.model.config.point_embed
    history = trainer.fit()
    first, last = history[0]["train"]["distill"], history[-1]["train"]["distill"]
    assert 0 < last < 0.7 * first, (first, last)  # points' CLIP-space embeddings approach 2D's
    assert history[-1]["val"]["distill"] > 0  # reported for validation too


def test_distillation_needs_text_aligned_features(tiny_store, tmp_path):
    with pytest.raises(UserError, match="--spatial-kind maskclip"):
        Trainer(config(tiny_store, tmp_path, distill_weight=1.0))
    trainer = Trainer(config(tiny_store, tmp_path, epochs=1))
    assert trainer.loss_config.distill_weight == 0.0 and not trainer.model.config.point_embed
