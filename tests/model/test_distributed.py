"""Stage 2 with DistributedDataParallel: 2 CPU processes under torchrun (gloo), for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.distributed import Distributed
from model.train import _epoch_batches
from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes
from tests.conftest import write_store
from tests.model.test_train import strip_timing

REPO = Path(__file__).resolve().parents[2]
# --norm layer: BatchNorm's statistics would be per process on CPUs (SyncBatchNorm needs CUDA),
# and the CLIP weight is 0 in these epochs (its negatives are per process): with both out of
# the way, 2 processes x 1 scene must compute what 1 process x 2 scenes computes.
SETTINGS = ["--epochs", "3", "--batch-scenes", "2", "--device", "cpu", "--voxel-size", "0.05",
            "--channels", "16,32,48", "--width", "64", "--no-plot", "--warmup-steps", "0",
            "--norm", "layer"]


@pytest.fixture(scope="module")
def five_scenes(tmp_path_factory) -> tuple[Path, Path]:
    """A store of 5 small synthetic scenes and a validation list naming the last one."""
    root = tmp_path_factory.mktemp("ddp")
    write_scenes(root / "scenes", n_scenes=5, n_frames=8, seed=0, color_size=SMALL_COLOR_SIZE,
                 depth_size=SMALL_DEPTH_SIZE, n_points=3000)
    write_store(root / "scenes", root / "store.zarr")
    (root / "val.txt").write_text("scene0004_00\n")
    return root / "store.zarr", root / "val.txt"


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "model.train", *args]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(five_scenes, tmp_path):
    store, val = five_scenes
    common = ["--cache", str(store), "--val-list", str(val), *SETTINGS]
    single = subprocess.run([sys.executable, "-m", "model.train", *common, "--out",
                             str(tmp_path / "one")], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(torchrun(*common, "--out", str(tmp_path / "two")), cwd=REPO,
                         capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "[rank 1]" not in ddp.stderr  # the other processes log warnings only
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["epoch"] for r in two] == [1, 2, 3]  # rank 0 alone wrote the run folder
    for a, b in zip(one, two):
        for name in ("total", "semantic", "offset", "direction"):
            assert b["train"][name] == pytest.approx(a["train"][name], rel=1e-4), name
        assert b["train"]["miou"] == pytest.approx(a["train"]["miou"], abs=1e-3)
        assert b["val"]["miou"] == pytest.approx(a["val"]["miou"], abs=1e-3)
    assert one[-1]["train"]["total"] < one[0]["train"]["total"]  # it learned something
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
               for run in (tmp_path / "one", tmp_path / "two")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-3, msg=name)
    assert (tmp_path / "two" / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_interrupted_ddp_run_resumes_to_the_uninterrupted_metrics(five_scenes, tmp_path, how):
    """kill -9 of torchrun and its processes (resume from last.pt), or SIGINT to torchrun,
    which forwards it: every process stops at the same step and rank 0 saves interrupted.pt
    with the epoch's loss sums and confusion of all processes so far."""
    store, val = five_scenes
    common = ["--cache", str(store), "--val-list", str(val), *SETTINGS]
    subprocess.run(torchrun(*common, "--out", str(tmp_path / "a")), cwd=REPO, check=True,
                   capture_output=True)
    run_dir = tmp_path / "b"
    process = subprocess.Popen(torchrun(*common, "--out", str(run_dir)), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    if how == "kill -9":
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both training processes
    else:
        process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    assert 1 <= len(history(run_dir)) < 3
    if how == "Ctrl-C":
        assert (run_dir / "checkpoints" / "interrupted.pt").exists()
    resumed = subprocess.run(torchrun("--cache", str(store), "--resume", str(run_dir)), cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert strip_timing(history(run_dir)) == strip_timing(history(tmp_path / "a"))


def test_a_scene_no_view_sees_trains_under_ddp(five_scenes, tmp_path):
    """All frames of a training scene invalid: its process has no view for the CLIP loss, and
    DDP still gets a gradient for every parameter (else: a crash or a hang)."""
    import shutil

    from storage import open_store

    store, val = five_scenes
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    frames = open_store(copy, mode="a").root["scenes"]["scene0000_00"]["frames"]
    frames["valid"][:] = False
    result = subprocess.run(torchrun("--cache", str(copy), "--val-list", str(val), *SETTINGS,
                                     "--epochs", "1", "--out", str(tmp_path / "run")),
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(history(tmp_path / "run")) == 1


def test_an_epoch_is_cut_into_global_batches_every_process_shares():
    ids = [f"s{i}" for i in range(5)]
    one = _epoch_batches(ids, seed=0, epoch=0, batch_scenes=2)
    assert sorted(sum(one, [])) == ids and [len(b) for b in one] == [2, 2, 1]
    two = _epoch_batches(ids, seed=0, epoch=0, batch_scenes=2, world_size=2)
    assert two[:2] == one[:2] and two[2] == [one[2][0], one[0][0]]  # padded from the start
    four = _epoch_batches(ids[:1], seed=0, epoch=0, batch_scenes=4, world_size=4)
    assert four == [["s0"] * 4]
    shares = [Distributed(rank=r, world_size=2).shard(two[0]) for r in (0, 1)]
    assert shares == [[two[0][0]], [two[0][1]]]
    assert _epoch_batches(ids, 0, 1, 2) != one  # each epoch its own order


def test_batch_scenes_must_split_across_processes(five_scenes, tmp_path):
    store, val = five_scenes
    result = subprocess.run(torchrun("--cache", str(store), "--batch-scenes", "3", "--device",
                                     "cpu", "--out", str(tmp_path / "run")), cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "--batch-scenes 3 does not split across 2 processes" in result.stderr
