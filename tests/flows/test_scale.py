"""Stage 1 at scale, on one machine, as README prints it: a real Dask cluster (`dask
scheduler` + `dask worker` processes on 127.0.0.1) and a real S3-compatible server (moto's
server mode) for the store, then stage 2 reading that store back from S3."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.extract_clip import main as extract_main
from storage import StoreError, UserError, open_store
from tests.flows.test_extract_clip import assert_same_features
from tests.flows.test_extract_clip import run as run_flow
from tests.readme import (command, output, run, typed, wait_for_no_leftovers,
                          with_new_marker)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCHEDULER = "dask scheduler --port"
WORKER = "dask worker --nthreads --nworkers --resources"
EXTRACT_ON_CLUSTER = ("python -m flows.extract_clip --dask-address --dask-resources --dataset "
                      "--model --pretrained --root --store")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_line(log: Path, pattern: str, process: subprocess.Popen, seconds: float = 180
                  ) -> bool:
    """True once a line matching `pattern` (a regex) appears in the process's `log`; False if
    the process exits first or after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace"), re.M):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


# ------------------------------------------------------------------ Dask cluster


def start_cluster(logs: Path, workers: int, threads: int, env: dict | None = None
                  ) -> tuple[str, list]:
    """README's `dask scheduler` and `dask worker tcp://SCHED:8786 --nworkers N --nthreads T
    --resources GPU=1` (a pretend GPU each), on 127.0.0.1 and a free port; returns the address
    and the processes (workers first)."""
    # the scheduler logs its address at INFO, whatever the environment says of Dask's logs
    scheduler_env = {**(env or os.environ), "DASK_LOGGING__DISTRIBUTED": "info"}
    for _ in range(3):  # another process may take the free port first: then a new one
        address = f"tcp://127.0.0.1:{free_port()}"
        scheduler = subprocess.Popen(
            typed(command(SCHEDULER), {"--port": address.rsplit(":", 1)[1]},
                  append=["--host", "127.0.0.1", "--no-dashboard"]),
            env=scheduler_env, stdout=open(logs / "scheduler.log", "w"),
            stderr=subprocess.STDOUT)
        if wait_for_line(logs / "scheduler.log", rf"Scheduler at:\s+{address}$", scheduler):
            break
        stop(scheduler)
    else:
        raise RuntimeError(f"dask scheduler did not start; see {logs / 'scheduler.log'}")
    worker = subprocess.Popen(
        typed(command(WORKER), {"tcp://SCHED:8786": address, "--nworkers": str(workers),
                                "--nthreads": str(threads)},
              append=["--no-dashboard", "--host", "127.0.0.1"]),
        cwd=REPO, env=env, stdout=open(logs / "workers.log", "w"), stderr=subprocess.STDOUT)
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, [worker, scheduler]


def moto_answers(endpoint: str) -> bool:
    """True when moto's S3 server answers HTTP at `endpoint` (its /moto-api/ page)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_moto(log: Path, tries: int = 3) -> tuple[subprocess.Popen, str]:
    """moto_server on a free port of 127.0.0.1, checked by an HTTP answer, not an open port: the
    port free_port saw may be taken by another process before moto binds it (moto then exits
    while the other listener answers the port check), so a failed start is retried on a new
    port."""
    for _ in range(tries):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=open(log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            if moto_answers(endpoint):
                return server, endpoint
            time.sleep(0.2)
        stop(server)
    raise RuntimeError(f"moto_server did not answer after {tries} starts; its log: {log}")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with buckets `features`, `my-bucket` and `options-bucket`;
    credentials and the endpoint in the environment (as a user would set them for their
    S3-compatible server: botocore reads AWS_ENDPOINT_URL)."""
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for bucket in ("features", "my-bucket", "options-bucket"):
        fs.mkdir(bucket)
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    stop(server)


@pytest.mark.timeout(900)  # several processes start; a busy 2-core machine needs minutes
def test_dask_cluster_into_s3_as_printed(prefect_api, s3_server, readme_scenes, readme_store,
                                         cli_env, tmp_path):
    """README's scheduler, workers and extract command, the store on S3: the flow's tasks run
    on the workers by reference (python -m), one model load per worker, the store equals the
    single-process one; the workers report to the flow's ephemeral API (none starts a Prefect
    server of its own) and, stopped, leave no process behind."""
    command("python -m flows.extract_clip --dask-address --store ...")  # the table's short form
    env = with_new_marker(cli_env, **{name: os.environ[name] for name in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")})
    address, processes = start_cluster(tmp_path, workers=2, threads=1, env=env)
    try:
        url = "s3://my-bucket/scannet.zarr"
        result = run(typed(command(EXTRACT_ON_CLUSTER),
                           {"--root": str(readme_scenes), "tcp://SCHED:8786": address,
                            "--model": "test-ViT-tiny", "--pretrained": "none"}), env)
        assert result.returncode == 0, output(result)[-3000:]
        assert "Traceback" not in output(result)
        assert re.search(rf"stored 18 frames \(0 invalid\) of 3 scenes .* into {url} ",
                         result.stdout)
        workers = re.search(r"^workers: (.*)$", result.stdout, re.M).group(1).split("; ")
        assert len(workers) == 2 and all("1 model load(s)" in w for w in workers), workers
        assert_same_features(url, readme_store)
        # a rerun on the same cluster encodes nothing and loads no model again
        again = run_flow(readme_scenes, url, dask_address=address, dask_resources={"GPU": 1})
        assert again["frames_encoded"] == 0
        assert all(w["model_loads"] == 1 for w in again["workers"].values())
        with pytest.raises(UserError, match="no worker of the Dask cluster .* offers TPU=1"):
            run_flow(readme_scenes, tmp_path / "tpu.zarr", dask_address=address,
                     dask_resources={"TPU": 1})
    finally:
        stop(*processes)
    assert "Starting temporary server" not in (tmp_path / "workers.log").read_text()
    assert wait_for_no_leftovers(env) == []


def worker_transitions(client) -> list[tuple[str, str, str]]:
    """(key, state before, state after) of every task transition in the one worker's own log, in
    the order its state machine made them. The order is exact; the task stream's start and stop
    times are not comparable across tasks (each carries the scheduler's estimate of the worker's
    clock offset at that moment, which moves between heartbeats)."""
    (log,) = client.run(lambda dask_worker: [(str(entry[0]), entry[1], entry[3])
                                             for entry in dask_worker.state.log
                                             if len(entry) == 7]).values()
    return log


def executing_spans(transitions: list[tuple[str, str, str]]) -> list[tuple[int, int]]:
    """(position entering, position leaving) state 'executing' of each scene task."""
    enter, leave = {}, {}
    for position, (key, before, after) in enumerate(transitions):
        if "extract_scene_task" not in key:
            continue
        if after == "executing" and before != "executing":
            enter[key] = position
        elif before == "executing" and after != "executing":
            leave[key] = position
    return sorted((enter[key], leave[key]) for key in enter)


def test_a_gpu_resource_runs_one_scene_at_a_time_on_a_worker(prefect_api, synthetic_root,
                                                             tmp_path):
    """One worker with 2 threads and one (pretend) GPU: with --dask-resources GPU=1 its two
    scene tasks never execute at once (the worker's own transition log says so); without, they
    do, so the check can fail."""
    from distributed import Client

    address, processes = start_cluster(tmp_path, workers=1, threads=2)
    try:
        spans = {}
        with Client(address, timeout=60) as client:
            for name, resources in (("gpu", {"GPU": 1}), ("free", None)):
                already = len(worker_transitions(client))
                run_flow(synthetic_root, tmp_path / f"{name}.zarr", dask_address=address,
                         dask_resources=resources)
                spans[name] = executing_spans(worker_transitions(client)[already:])
    finally:
        stop(*processes)
    assert len(spans["gpu"]) == len(spans["free"]) == 2, spans
    (_, first_leaves), (second_enters, _) = spans["gpu"]
    assert second_enters > first_leaves, spans  # one at a time
    (_, first_leaves), (second_enters, _) = spans["free"]
    assert second_enters < first_leaves, spans  # both threads at once


# ------------------------------------------------------------------ object storage


@pytest.mark.timeout(900)
def test_s3_storage_options_as_printed(s3_server, readme_scenes, readme_store, cli_env, tmp_path):
    """README's S3 block: stage 1 into a bucket of an S3-compatible server named by
    --storage-options, then stage 2 straight from the bucket (a prefix of stores); the objects
    a frame costs are what README says."""
    options = json.dumps({"endpoint_url": s3_server})
    env = with_new_marker(cli_env, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")  # the endpoint comes as an option
    env.pop("AWS_ENDPOINT_URL", None)
    url = "s3://options-bucket/scannet.zarr"
    stage_1 = run(typed(command("python -m flows.extract_clip --storage-options --store ..."),
                        {"...": ["--root", str(readme_scenes), "--model", "test-ViT-tiny",
                                 "--pretrained", "none"],
                         "--store": url, "--storage-options": options}), env)
    assert stage_1.returncode == 0, output(stage_1)[-3000:]
    assert_same_features(url, readme_store)
    # objects per frame: what a reader GETs and a writer PUTs (see README, Running at scale)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    remote = open_store(url)
    scene_id = remote.scenes()[0]
    frames = remote.scene(scene_id, with_depth=False).frame_id.size
    chunks = [key for key in fs.find(f"options-bucket/scannet.zarr/scenes/{scene_id}")
              if "/c/" in key]
    per_frame = [key for key in chunks if "/frames/" in key or "/features/" in key]
    per_frame = [key for key in per_frame if not key.split("/c/")[0].endswith(
        ("intrinsic_color", "intrinsic_depth", "frame_id"))]
    # pose, valid, depth, spatial, global, done; `reason` only for invalid frames (a chunk
    # equal to the fill value "" is not written)
    assert len(per_frame) == 6 * frames

    stage_2 = run(typed(command("python -m model.train --cache --storage-options"),
                        {"--cache": "s3://options-bucket/", "--storage-options": options},
                        append=["--epochs", "1"]), env, cwd=tmp_path)
    assert stage_2.returncode == 0, output(stage_2)[-3000:]
    assert "training on 2 scenes, validating on 1" in stage_2.stderr
    (run_folder,) = (tmp_path / "runs").iterdir()
    history = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["train"]["total"] > 0


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
