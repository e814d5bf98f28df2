"""The deployment as README prints it: `prefect server start`, `python -m flows.serve`,
`prefect deployment run 'extract-clip/local' --param ... --watch`, real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import open_store
from tests.readme import command, output, run, typed, with_new_marker

SERVER = "prefect server start --host"
SERVE = "python -m flows.serve --name"
RUN = "prefect deployment run --param --watch"


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


def api(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as response:
        return json.loads(response.read())


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def served(cli_env, tmp_path_factory) -> Iterator[tuple[dict, str, Path]]:
    """README's terminals 1 and 2: a Prefect server on 127.0.0.1 (on a free port rather than
    4200) and `python -m flows.serve --name local` started in a folder of its own, both with
    PREFECT_API_URL exported as README says. Yields (environment of terminal 3, API URL, the
    serve process's folder)."""
    folder = tmp_path_factory.mktemp("deployment")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = with_new_marker(cli_env, PREFECT_HOME=str(folder / "prefect-home"), PREFECT_API_URL=url,
                          PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_UI_ENABLED="false")
    server = subprocess.Popen(typed(command(SERVER), append=["--port", str(port)]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    serve = None
    try:
        wait_healthy(url, timeout=120)
        (folder / "serve").mkdir()
        serve = subprocess.Popen(typed(command(SERVE)), cwd=folder / "serve", env=env,
                                 stdout=open(folder / "serve.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        yield env, url, folder / "serve"
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


def deployment_run(env: dict, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `prefect deployment run ... --watch`, once `serve` has registered the deployment."""
    deadline = time.monotonic() + 120
    while True:
        result = run(argv + ["--watch-timeout", "300"], env, cwd=cwd, timeout=400)
        if "not found" not in output(result).lower() or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_deployment_run_as_printed(served, readme_scenes, tmp_path):
    """README's deployment with the scenes and the tiny model substituted; the store
    `storage/scannet.zarr` is relative, and lands in the serve process's folder."""
    for key in ("python -m flows.serve", "prefect deployment run --param ..."):
        command(key)  # the commands table's short forms of the same two commands
    env, url, serve_folder = served
    argv = typed(command(RUN), {"--param root": str(readme_scenes),
                                "--param model": "test-ViT-tiny", "--param pretrained": "none"})
    result = deployment_run(env, argv, cwd=tmp_path)
    assert result.returncode == 0, output(result)[-4000:]
    assert "Flow run finished successfully in 'Completed'" in output(result)
    store = open_store(serve_folder / "storage" / "scannet.zarr")
    assert not (tmp_path / "storage").exists()  # not where the run was triggered
    assert len(store.scenes()) == 3
    (featureset,) = store.featuresets()
    assert all(store.done(scene, featureset).all() for scene in store.scenes())
    deployment = api(url, "/deployments/name/extract-clip/local")
    assert deployment["entrypoint"] == "flows.extract_clip.extract_clip"  # Dask-safe, see serve


def test_failed_deployment_run_shows_its_reason(served):
    """README's command exactly as printed: /data/scannet/scans is not there. `--watch` shows
    the reason (the run's extract-clip.failed event) and the Failed state carries it, naming
    the parameter (root), not the flag (--root)."""
    env, url, serve_folder = served
    result = deployment_run(env, typed(command(RUN)), cwd=serve_folder.parent)
    shown = " ".join(output(result).split())  # rich wraps long lines
    assert result.returncode == 1, shown[-3000:]
    reason = ("root: no folder /data/scannet/scans: give the dataset folder that holds the "
              "scene folders (scene0000_00/, ...)")
    assert f"extract-clip.failed * {reason}" in shown
    assert shown.index("extract-clip.failed") < shown.index("Flow run finished in state 'Failed'")
    assert "Traceback" not in shown and "--root" not in shown
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", shown).group(1)
    state = api(url, f"/flow_runs/{run_id}")["state"]
    assert state["type"] == "FAILED" and state["message"] == reason
