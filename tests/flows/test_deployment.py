"""The deployment path: a real `prefect server` on 127.0.0.1, `flows.serve`, `prefect deployment run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage import open_store

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout} s")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_UI_ENABLED": "false"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_healthy(api_url, timeout=120)
        yield env, prefect
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_deployment_run_completes(prefect_server, synthetic_root, tmp_path):
    env, prefect = prefect_server
    store = tmp_path / "store.zarr"
    serve_log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", "local"], cwd=REPO,
                             env=env, stdout=serve_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        params = {"root": str(synthetic_root), "store": str(store), "dataset": "synthetic",
                  "model": "test-ViT-tiny", "pretrained": "none", "batch_size": 4}
        command = [prefect, "deployment", "run", "extract-clip/local", "--watch",
                   "--watch-timeout", "240"]
        for key, value in params.items():
            command += ["--param", f"{key}={json.dumps(value)}"]
        deadline = time.monotonic() + 60
        while True:  # the deployment exists once `serve` has registered it
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=300)
            if "not found" not in (result.stdout + result.stderr).lower() or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert result.returncode == 0, (result.stdout + result.stderr
                                        + (tmp_path / "serve.log").read_text()[-4000:])
        assert "Completed" in result.stdout
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    reader = open_store(store)
    assert len(reader.scenes()) == 2
    (fid,) = reader.featuresets()
    assert all(reader.features(scene_id, fid).done.all() for scene_id in reader.scenes())
