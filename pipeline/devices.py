"""Which torch device a `--device` flag means (shared by stage 1 and stage 2; no open_clip)."""

from __future__ import annotations

import fcntl
import tempfile
import threading
from pathlib import Path

import torch

from storage.errors import UserError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; "cuda" without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no GPU here; use --device cpu")
    return device


_claimed: list = []  # (index, open lock file) of this process's GPU: held for its life
_claim_lock = threading.Lock()


def claim_gpu(count: int | None = None, lock_dir: Path | None = None) -> int | None:
    """The index of a GPU no other process on this machine has claimed, now claimed by this
    one; None when every GPU is taken or there is none. Idempotent within a process, and
    thread-safe (threads of one process share its GPU).

    Several Dask worker processes of one machine (`dask worker --nworkers 4`) each call this
    and get a GPU of their own: an exclusive lock on `<lock_dir>/clipcache3d-gpu-<id>.lock`,
    which the operating system releases when the process ends (even by kill -9). The id is
    the GPU's UUID, so workers that see the GPUs in different orders (dask-cuda rotates
    CUDA_VISIBLE_DEVICES) still never share one. count: GPUs to choose from (default
    torch.cuda.device_count(); given, the lock ids are the indices, as in the tests).
    """
    with _claim_lock:
        if _claimed:
            return _claimed[0][0]
        real = count is None
        count = torch.cuda.device_count() if real else count
        lock_dir = Path(tempfile.gettempdir()) if lock_dir is None else lock_dir
        for index in range(count):
            name = str(torch.cuda.get_device_properties(index).uuid) if real else str(index)
            try:
                handle = open(lock_dir / f"clipcache3d-gpu-{name}.lock", "a")
            except OSError:  # another user's lock file: that GPU is theirs
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _claimed.append((index, handle))
            return index
        return None
