"""One bad file never fails a scene: a symlink loop (`color/3.jpg -> 3.jpg`) makes its frame
invalid with the reason; `color/².jpg` (str.isdigit accepts '²') and a frame number beyond
64 bits are ignored files, listed with why; nothing is retried that a retry cannot heal."""

from __future__ import annotations

import asyncio
import errno
import shutil

import pytest
from prefect.client.orchestration import get_client

from flows.extract_clip import is_transient
from pipeline.readers.scannet import ScanNetScene
from storage import open_store
from storage.errors import StoreError, StoreUnreachable, UserError
from tests.flows.test_extract_clip import run


def break_files(scene) -> None:
    color = scene / "color"
    (color / "3.jpg").unlink()
    (color / "3.jpg").symlink_to("3.jpg")  # a loop: stat fails with ELOOP
    shutil.copy(color / "0.jpg", color / "².jpg")
    shutil.copy(color / "0.jpg", color / "99999999999999999999.jpg")
    shutil.copy(color / "1.jpg", color / "001.jpg")  # frame 1 twice


def test_the_reader_reports_each_bad_file(synthetic_root, tmp_path):
    scene = tmp_path / "scene0000_00"
    shutil.copytree(synthetic_root / "scene0000_00", scene)
    break_files(scene)
    reader = ScanNetScene(scene)
    assert reader.frame_ids.tolist() == list(range(8))
    assert reader.read_frame(3).reason == ("color file cannot be read (color/3.jpg: Too many "
                                           "levels of symbolic links)")
    assert reader.read_frame(1).valid and reader.read_frame(4).valid
    ignored = reader.ignored_files
    assert ignored["color/².jpg"] == "'²' is not a frame number (digits 0-9 only)"
    assert ignored["color/99999999999999999999.jpg"] == "its frame number does not fit in 64 bits"
    assert ignored["color/001.jpg"] == "frame 1 is already color/1.jpg"


def test_the_run_stores_the_scene_and_retries_nothing(prefect_api, synthetic_root, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(synthetic_root, root, symlinks=True)
    break_files(root / "scene0000_00")
    summary = run(root, tmp_path / "store.zarr")
    assert summary["failed"] == [] and summary["frames_invalid"] == 1
    scene = summary["scenes"]["scene0000_00"]
    assert list(scene["invalid"]) == [3] and "symbolic links" in scene["invalid"][3]
    assert set(scene["ignored_files"]) == {"color/².jpg", "color/99999999999999999999.jpg",
                                           "color/001.jpg"}
    store = open_store(tmp_path / "store.zarr")
    assert store.scenes() == ["scene0000_00", "scene0001_00"]
    assert store.valid("scene0000_00").sum() == 7

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs()

    extract_runs = [r for r in asyncio.run(task_runs()) if r.name.startswith("extract ")
                    and str(root) in r.name]
    assert len(extract_runs) == 2 and all(r.run_count == 1 for r in extract_runs)


@pytest.mark.parametrize("error, retried", [
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), False),
    (FileNotFoundError(errno.ENOENT, "No such file"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (ValueError("invalid literal for int()"), False),
    (OverflowError("Python int too large to convert to C long"), False),
    (UserError("scene0000_00: no mesh"), False),
    (StoreError("frame 3: chunk is corrupt"), False),
    (MemoryError(), False),
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("timed out"), True),
    (StoreUnreachable("cannot reach the server of s3://b/x.zarr"), True),
])
def test_only_errors_a_retry_may_heal_are_retried(error, retried):
    assert is_transient(error) is retried
