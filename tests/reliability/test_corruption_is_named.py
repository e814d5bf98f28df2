"""Corruption and unreachable storage give one line naming the file, frame or endpoint: a
truncated chunk (zstd cannot decode it), a zarr.json that does not parse (met mid-training),
an S3 endpoint where nothing listens."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest

from flows.extract_clip import extract_clip
from model.train import main as train_main
from storage import StoreError, open_store
from tests.reliability.conftest import copy_store, one_error_line, run_command
from tests.reliability.test_missing_chunks import chunk, featureset_of

TRAIN = ["--epochs", "1", "--device", "cpu", "--voxel-size", "0.05", "--channels", "16,32",
         "--width", "32", "--no-plot", "--batch-scenes", "1", "--val-fraction", "0.5"]


def test_a_truncated_chunk_names_scene_frame_and_file(pristine_store, tmp_path, capsys):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    fid = featureset_of(store)
    for scene_id in ("scene0000_00", "scene0001_00"):  # whichever scene training reads first
        path = chunk(store, scene_id, f"features/{fid}/spatial", 4)
        path.write_bytes(path.read_bytes()[:100])
    code = train_main(["--cache", str(store), "--out", str(tmp_path / "run"), *TRAIN])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "frame 4: the features/" in line and "chunk is corrupt (Zstd" in line
    assert f"/features/{fid}/spatial/c/4/0/0/0" in line and "--verify" in line


def test_a_corrupt_zarr_json_met_mid_training_names_the_file(pristine_store, tmp_path, capsys):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    fid = featureset_of(store)
    metadata = [store / "scenes" / scene_id / "features" / fid / "spatial" / "zarr.json"
                for scene_id in ("scene0000_00", "scene0001_00")]
    for path in metadata:  # read only when a scene is projected, after training started
        path.write_text(path.read_text()[:60])
    code = train_main(["--cache", str(store), "--out", str(tmp_path / "run"), *TRAIN])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and any(f"{path} is corrupt" in line for path in metadata), line
    assert "delete " in line and "--verify" in line


def test_a_corrupt_root_zarr_json_names_the_file(pristine_store, tmp_path):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    (store / "zarr.json").write_text("{")
    with pytest.raises(StoreError, match=f"{store}/zarr.json is corrupt"):
        open_store(store)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("options, expected", [
    ({"endpoint_url": "http://127.0.0.1:9"}, "cannot sign in to the server of .* at "
                                             "http://127.0.0.1:9 \\(Unable to locate credentials"),
    ({"profile": "prod"}, "cannot sign in .*The config profile \\(prod\\) could not be found"),
    ({"endpoint_url": "not a url"}, "cannot use the server of .*endpoint_url must be a URL"),
])
def test_an_s3_client_that_cannot_start_is_one_line(options, expected, tmp_path):
    """A fresh machine: no AWS credentials in the environment, no ~/.aws; a profile that does
    not exist; an endpoint that is no URL. Each command says so in one line."""
    env = {name: None for name in os.environ if name.startswith("AWS_")}  # no credentials,
    # config or credentials files, container or web-identity providers this machine may have
    env.update(HOME=str(tmp_path), AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")  # no instance-metadata lookup for credentials
    commands = [["storage.inspect", "s3://features/store.zarr"]]
    if "endpoint_url" in options and options["endpoint_url"].startswith("http"):
        commands.append(["model.train", "--cache", "s3://features/stores", "--device", "cpu",
                         "--out", str(tmp_path / "run")])  # the same path through stage 2
    for command in commands:
        result = run_command(*command, "--storage-options", json.dumps(options), env=env)
        line = one_error_line(result.stderr)
        assert result.returncode != 0 and re.search(expected, line), line
        assert "--storage-options takes no secrets" in line or "must be a URL" in line


def test_an_unreachable_s3_endpoint_is_one_line(prefect_api, closed_port, synthetic_root,
                                                monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port}"
    options = json.dumps({"endpoint_url": endpoint,
                          "config_kwargs": {"retries": {"max_attempts": 1}}})
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for command in (["storage.inspect", "s3://features/store.zarr"],
                    ["model.train", "--cache", "s3://features/stores", "--device", "cpu"]):
        result = run_command(*command, "--storage-options", options, env=env)
        line = one_error_line(result.stderr)
        assert result.returncode != 0 and f"at {endpoint} " in line, line
        assert "contextvar" not in result.stderr.lower() and len(result.stderr) < 2000
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StoreError, match=f"cannot reach the server of s3://features/store.zarr "
                                         f"at {endpoint} "):
        extract_clip(root=str(synthetic_root), store="s3://features/store.zarr",
                     dataset="synthetic", model="test-ViT-tiny", pretrained="none",
                     storage_options={"endpoint_url": endpoint})
