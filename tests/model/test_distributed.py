"""Stage 2 with DistributedDataParallel: 2 CPU processes under torchrun (gloo), for real, started
by README's torchrun commands as printed (tests.readme), 2 processes for README's 4 GPUs."""

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
from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[2]
# --norm layer: BatchNorm's statistics would be per process on CPUs (SyncBatchNorm needs CUDA):
# with it out of the way, 2 processes x 1 scene must compute what 1 process x 2 scenes computes
# (the CLIP weight is 0 in these epochs).
SETTINGS = ["--epochs", "3", "--device", "cpu", "--voxel-size", "0.05", "--channels", "16,32,48",
            "--width", "64", "--no-plot", "--warmup-steps", "0", "--norm", "layer"]
GLOBAL_BATCH = ["--batch-scenes", "2"]
SINGLE_NODE = "torchrun -m model.train --cache --nproc_per_node ..."
BATCH = "torchrun -m model.train --batch-scenes --cache --nproc_per_node"
RESUME = "torchrun -m model.train --cache --nproc_per_node --resume"
NODES = "torchrun -m model.train --master_addr --nnodes --node_rank --nproc_per_node ..."


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
    """README's `torchrun --nproc_per_node N -m model.train --cache ...` with N = 2 and `args`
    (starting with --cache STORE) for `--cache ...`."""
    assert args[0] == "--cache"
    return typed(command(SINGLE_NODE), {"N": "2", "--cache": list(args[1:])})


def torchrun_env() -> dict[str, str]:
    """This environment with a free port for torchrun's rendezvous (PET_MASTER_PORT, what
    --master_port reads): tests on one machine must not meet on the default 29500."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {**os.environ, "PET_MASTER_PORT": str(port)}


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(five_scenes, tmp_path):
    store, val = five_scenes
    common = ["--cache", str(store), "--val-list", str(val), *SETTINGS, *GLOBAL_BATCH]
    single = subprocess.run([sys.executable, "-m", "model.train", *common, "--out",
                             str(tmp_path / "one")], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    # README's `torchrun --nproc_per_node 4 -m model.train --cache storage/ --batch-scenes 8`:
    # 2 processes, the global batch of the single process
    argv = typed(command(BATCH), {"--nproc_per_node": "2", "--cache": str(store),
                                  "--batch-scenes": "2"},
                 append=["--val-list", str(val), *SETTINGS, "--out", str(tmp_path / "two")])
    assert argv[:-len(SETTINGS) - 4] == torchrun("--cache", str(store), *GLOBAL_BATCH)
    ddp = subprocess.run(argv, cwd=REPO, env=torchrun_env(), capture_output=True, text=True)
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
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in (tmp_path / "one", tmp_path / "two")]
    # The losses above agree to 1e-4; the weights agree less closely, and not for a wrong
    # gradient: with LayerNorm after each convolution the loss ignores some directions in weight
    # space (a constant added to every output channel), float32 sums in another order (one
    # process's batch against two all-reduced halves) leave noise there, and Adam scales any
    # gradient, noise included, to a step of about lr. Measured: 1% of a tensor's norm at most.
    # A wrong gradient shows in the losses above, compared epoch by epoch.
    for name, value in weights[0].items():
        if value.is_floating_point() and value.norm() > 0:
            drift = (weights[1][name] - value).norm() / value.norm()
            assert drift <= 0.03, (name, float(drift))
    assert (tmp_path / "two" / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_interrupted_ddp_run_resumes_to_the_uninterrupted_metrics(five_scenes, tmp_path, how):
    """kill -9 of torchrun and its processes (resume from last.pt), or SIGINT to torchrun,
    which forwards it: every process stops at the same step and rank 0 saves interrupted.pt
    with the epoch's loss sums and confusion of all processes so far."""
    store, val = five_scenes
    common = ["--cache", str(store), "--val-list", str(val), *SETTINGS, *GLOBAL_BATCH]
    subprocess.run(torchrun(*common, "--out", str(tmp_path / "a")), cwd=REPO, check=True,
                   env=torchrun_env(), capture_output=True)
    run_dir = tmp_path / "b"
    process = subprocess.Popen(torchrun(*common, "--out", str(run_dir)), cwd=REPO,
                               env=torchrun_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
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
    # README's `torchrun --nproc_per_node 4 -m model.train --cache storage/ --resume runs/RUN`
    resumed = subprocess.run(typed(command(RESUME), {"--nproc_per_node": "2", "--cache": str(store),
                                                     "--resume": str(run_dir)}),
                             cwd=REPO, env=torchrun_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert strip_timing(history(run_dir)) == strip_timing(history(tmp_path / "a"))


def test_two_nodes_as_printed(five_scenes, tmp_path):
    """README's two-node command, `torchrun --nnodes 2 --node_rank R --master_addr HOST
    --nproc_per_node 4 -m model.train ...`, both nodes on this machine with a process each.
    All frames of a training scene are invalid: its process has no view for the CLIP loss,
    and DDP still gets a gradient for every parameter (else: a crash or a hang)."""
    import shutil

    from storage import open_store

    store, val = five_scenes
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    frames = open_store(copy, mode="a").root["scenes"]["scene0000_00"]["frames"]
    frames["valid"][:] = False
    frames["reason"][:] = "colour image does not decode"  # an invalid frame has its reason
    env = torchrun_env()
    arguments = ["--cache", str(copy), "--val-list", str(val), *SETTINGS, *GLOBAL_BATCH,
                 "--epochs", "1", "--out", str(tmp_path / "run")]
    nodes = [subprocess.Popen(typed(command(NODES), {"R": str(rank), "HOST": "127.0.0.1",
                                                     "--nproc_per_node": "1", "...": arguments}),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
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
                            env=torchrun_env(), capture_output=True, text=True)
    assert result.returncode != 0
    assert "--batch-scenes 3 does not split across 2 processes" in result.stderr
