"""The fixed cost of a stage 1 run: seconds from starting `python -m flows.extract_clip` to the
first frames encoded (the scene's progress bar first showing frames done: its first batch, 4
small frames of the tiny model, decoded, encoded and written), on one small scene.

Two ways, alternating run by run (A B, B A, ...), each run into a fresh store:

- ephemeral: no PREFECT_API_URL: Prefect starts a temporary API server in the run's process
  and stops it at the end (what a run costs out of the box);
- server: a `prefect server start --host 127.0.0.1` started once beforehand, and
  PREFECT_API_URL pointing at it (README's quick start).

Both use one scratch PREFECT_HOME (its database migrated by a warm-up run of each way first),
never the user's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_FRAMES = re.compile(rb"scene\d+_\d+: +\d+%")
"""The scene's progress bar once frames are done (tqdm: `scene0000_00: 100%|...| 4/4`)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(env: dict, timeout: float = 180.0) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on 127.0.0.1 and a free port; (process, API URL, seconds it
    took to answer /api/health)."""
    port = _free_port()
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"prefect server did not answer on {url} within {timeout:.0f} s")


def time_to_first_frame(root: Path, store: Path, env: dict) -> tuple[float, float]:
    """(seconds to the first scene's first batch, seconds of the whole run) of one CLI run."""
    command = [sys.executable, "-m", "flows.extract_clip", "--root", str(root), "--dataset",
               "synthetic", "--store", str(store), "--model", "test-ViT-tiny", "--pretrained",
               "none", "--device", "cpu", "--workers", "1"]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    first, seen = None, b""
    while chunk := process.stderr.read1(1 << 16):  # the bar ends its lines with \r, not \n
        seen = (seen + chunk)[-(1 << 16):]
        if first is None and FIRST_FRAMES.search(seen):
            first = time.perf_counter() - start
    if process.wait() != 0 or first is None:
        raise RuntimeError(f"extract_clip failed ({process.returncode}): "
                           f"{seen[-2000:].decode(errors='replace')}")
    return first, time.perf_counter() - start


def _import_seconds(env: dict) -> float:
    """Seconds a fresh interpreter takes to import the flow's module (torch, open_clip,
    Prefect): the part of either way's time that no server saves."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flows.extract_clip"], env=env, cwd=REPO,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def bench_run_overhead(root: Path, work: Path, repeats: int, warmup: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server, url, server_start = start_server(env)
    try:
        envs = {"ephemeral": env, "server": {**env, "PREFECT_API_URL": url}}
        runs = {name: {"first": [], "total": []} for name in envs}
        order = list(envs)
        first_round = 0 if warmup else 1  # round 0: warm-up (database, imports on disk)
        for round_ in range(first_round, repeats + 1):
            for name in (order if round_ % 2 == 1 else order[::-1]):
                store = work / f"{name}-{round_}.zarr"
                shutil.rmtree(store, ignore_errors=True)  # a fresh store: every frame to do
                first, total = time_to_first_frame(root, store, envs[name])
                if round_:
                    runs[name]["first"].append(first)
                    runs[name]["total"].append(total)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    ratios = [e / s for e, s in zip(runs["ephemeral"]["first"], runs["server"]["first"])]
    figures = {name: {"median_s": statistics.median(run["first"]),
                      "min_s": min(run["first"]), "max_s": max(run["first"]),
                      "total_s": statistics.median(run["total"])} for name, run in runs.items()}
    return {
        "seconds_ephemeral": figures["ephemeral"]["median_s"],
        "seconds_server": figures["server"]["median_s"],
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "what": "seconds before the first frame is encoded, ephemeral API over a running "
                "server (bigger: the more a running server saves)",
        "ephemeral": figures["ephemeral"], "server": figures["server"],
        "server_start_s": server_start, "repeats": repeats, "warmup": warmup,
        "import_s": _import_seconds(env) if warmup else None,  # --quick: not measured
    }
