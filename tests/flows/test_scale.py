"""Stage 1 at scale, on one machine: a real Dask cluster (`dask scheduler` + `dask worker`
processes on 127.0.0.1) and a real S3-compatible server (moto's server mode) for the store,
then stage 2 reading that store back from S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flows.extract_clip import main as extract_main
from model.config import TrainConfig
from model.train import Trainer
from storage import StoreError, UserError, open_store
from tests.flows.test_extract_clip import assert_same_features, run

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args[0]} exited with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


# ------------------------------------------------------------------ Dask cluster


def start_cluster(logs: Path, workers: int, threads: int) -> tuple[str, list]:
    """`dask scheduler` and `dask worker --nworkers N --nthreads T --resources GPU=1` (a
    pretend GPU each) on 127.0.0.1; returns the address and the processes."""
    port = free_port()
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)
    wait_for_port(port, scheduler)
    address = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [BIN / "dask", "worker", address, "--nworkers", str(workers), "--nthreads", str(threads),
         "--no-dashboard", "--host", "127.0.0.1", "--resources", "GPU=1"],
        cwd=REPO, stdout=open(logs / "workers.log", "w"), stderr=subprocess.STDOUT)
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, [worker, scheduler]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[str]:
    """A scheduler and 2 single-threaded worker processes, as `dask` CLIs on 127.0.0.1."""
    address, processes = start_cluster(tmp_path_factory.mktemp("dask-logs"), 2, 1)
    yield address
    stop(*processes)


def test_flow_on_an_existing_dask_cluster_gives_the_single_process_store(
        prefect_api, dask_cluster, synthetic_root, tmp_path):
    reference = tmp_path / "threads.zarr"
    run(synthetic_root, reference, workers=1)
    store = tmp_path / "dask.zarr"
    summary = run(synthetic_root, store, dask_address=dask_cluster, dask_resources={"GPU": 1})
    assert summary["failed"] == [] and summary["frames_encoded"] > 0
    assert_same_features(store, reference)
    workers = summary["workers"]
    assert sum(w["scenes"] for w in workers.values()) == 2
    assert all(w["model_loads"] == 1 for w in workers.values())  # one model per worker process
    assert not any(name.endswith(f":{os.getpid()}") for name in workers)  # not run here
    # a second run on the same cluster encodes nothing and loads no model again
    again = run(synthetic_root, store, dask_address=dask_cluster, dask_resources={"GPU": 1})
    assert again["frames_encoded"] == 0
    assert all(w["model_loads"] == 1 for w in again["workers"].values())


def test_resources_no_worker_offers_fail_at_once(prefect_api, dask_cluster, synthetic_root,
                                                 tmp_path):
    with pytest.raises(UserError, match="no worker of the Dask cluster .* offers TPU=1"):
        run(synthetic_root, tmp_path / "store.zarr", dask_address=dask_cluster,
            dask_resources={"TPU": 1})


def test_a_gpu_resource_runs_one_scene_at_a_time_on_a_worker(prefect_api, synthetic_root,
                                                             tmp_path):
    """One worker with 2 threads and one (pretend) GPU: with --dask-resources GPU=1 its two
    scene tasks never overlap (the scheduler's task stream says when each ran); without, they
    do, so the check can fail."""
    from distributed import Client, get_task_stream

    address, processes = start_cluster(tmp_path, workers=1, threads=2)
    try:
        spans = {}
        for name, resources in (("gpu", {"GPU": 1}), ("free", None)):
            with Client(address, timeout=60) as client, get_task_stream(client) as stream:
                run(synthetic_root, tmp_path / f"{name}.zarr", dask_address=address,
                    dask_resources=resources)
            spans[name] = sorted(
                (min(s["start"] for s in t["startstops"] if s["action"] == "compute"),
                 max(s["stop"] for s in t["startstops"] if s["action"] == "compute"))
                for t in stream.data if "extract_scene_task" in str(t["key"]))
    finally:
        stop(*processes)
    assert len(spans["gpu"]) == len(spans["free"]) == 2
    (_, first_end), (second_start, _) = spans["gpu"]
    assert second_start >= first_end  # one at a time
    (_, first_end), (second_start, _) = spans["free"]
    assert second_start < first_end  # both threads at once


# ------------------------------------------------------------------ object storage


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with a bucket `features`; credentials in the environment
    (as a user would set them), the endpoint passed as a storage option."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for_port(port, server)
    saved = {name: os.environ.get(name) for name in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("features")
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    stop(server)


def test_stage_1_into_s3_then_stage_2_from_s3(prefect_api, s3_server, synthetic_root, tmp_path):
    options = {"endpoint_url": s3_server}
    url = "s3://features/stores/synthetic.zarr"
    summary = run(synthetic_root, url, storage_options=options, workers=2)
    assert summary["failed"] == [] and summary["store"] == url
    local = tmp_path / "local.zarr"
    run(synthetic_root, local)
    remote = open_store(url, storage_options=options)
    for scene_id in remote.scenes():
        for fid in remote.featuresets():
            a, b = remote.features(scene_id, fid), open_store(local).features(scene_id, fid)
            np.testing.assert_array_equal(a.spatial, b.spatial)
            np.testing.assert_array_equal(a.done, b.done)
    # objects per frame: what a reader GETs and a writer PUTs (see README, Running at scale)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    scene_id = remote.scenes()[0]
    frames = remote.scene(scene_id, with_depth=False).frame_id.size
    chunks = [key for key in fs.find(f"features/stores/synthetic.zarr/scenes/{scene_id}")
              if "/c/" in key]
    per_frame = [key for key in chunks if "/frames/" in key or "/features/" in key]
    per_frame = [key for key in per_frame if not key.split("/c/")[0].endswith(
        ("intrinsic_color", "intrinsic_depth", "frame_id"))]
    # pose, valid, depth, spatial, global, done; `reason` only for invalid frames (a chunk
    # equal to the fill value "" is not written)
    assert len(per_frame) == 6 * frames

    # stage 2 straight from the bucket: a folder URL of stores, the endpoint as an option
    trainer = Trainer(TrainConfig(cache="s3://features/stores", storage_options=json.dumps(options),
                                  out=str(tmp_path / "run"), epochs=1, device="cpu",
                                  voxel_size=0.05, channels=(16, 32), width=32, plot=False))
    history = trainer.fit()
    assert len(history) == 1 and np.isfinite(history[0]["train"]["total"])
    assert sorted(trainer.train_ids + trainer.val_ids) == remote.scenes()


def test_credentials_as_storage_options_are_refused(s3_server, synthetic_root, tmp_path, capsys):
    with pytest.raises(UserError, match="AWS_SECRET_ACCESS_KEY"):
        open_store("s3://features/x.zarr", "a", storage_options={"secret": "s3cr3t"})
    code = extract_main(["--root", str(synthetic_root), "--dataset", "synthetic", "--store",
                         "s3://features/x.zarr", "--model", "test-ViT-tiny", "--pretrained",
                         "none", "--storage-options", '{"key": "AKIA", "endpoint_url": "x"}'])
    err = capsys.readouterr().err
    assert code == 1 and "look like credentials" in err and "AKIA" not in err
    with pytest.raises(UserError, match="client_kwargs.aws_secret_access_key"):  # nested too
        open_store("s3://features/x.zarr", storage_options={
            "client_kwargs": {"region_name": "x", "aws_secret_access_key": "s3cr3t"}})


def test_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(StoreError, match="no feature store at s3://no-such-bucket/x.zarr"):
        open_store("s3://no-such-bucket/x.zarr", storage_options={"endpoint_url": s3_server})
