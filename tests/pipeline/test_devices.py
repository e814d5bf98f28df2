"""GPU claiming for Dask worker processes: real processes, real file locks (no GPU needed:
the device count is passed in)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def claimant(lock_dir: Path) -> subprocess.Popen:
    """A process that claims one of 2 GPUs, prints the index and holds it until stdin closes."""
    code = ("import sys; from pathlib import Path; from pipeline.devices import claim_gpu; "
            f"print(claim_gpu(count=2, lock_dir=Path({str(lock_dir)!r})), flush=True); "
            "sys.stdin.read()")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_worker_processes_of_one_machine_get_a_gpu_each(tmp_path):
    first = claimant(tmp_path)
    assert first.stdout.readline().strip() == "0"
    second = claimant(tmp_path)
    assert second.stdout.readline().strip() == "1"
    third = claimant(tmp_path)
    assert third.stdout.readline().strip() == "None"  # all taken: the caller keeps its device
    third.communicate("")
    first.kill()  # even kill -9 gives the GPU back
    first.wait()
    time.sleep(0.1)
    fourth = claimant(tmp_path)
    assert fourth.stdout.readline().strip() == "0"
    for process in (second, fourth):
        process.communicate("")


def test_threads_of_one_process_share_one_gpu(tmp_path):
    code = ("from concurrent.futures import ThreadPoolExecutor; from pathlib import Path; "
            "from pipeline.devices import claim_gpu; "
            f"pool = ThreadPoolExecutor(8); lock_dir = Path({str(tmp_path)!r}); "
            "print(sorted(set(pool.map(lambda _: claim_gpu(count=4, lock_dir=lock_dir), "
            "range(32)))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[0]"
