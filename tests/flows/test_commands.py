"""Stage 1 as README prints it, run as subprocesses (tests.readme), and its expected failures:
one `error:` line, no traceback, no store left behind."""

from __future__ import annotations

import re
import shutil
import socket

import numpy as np
import pytest

from flows.extract_clip import main
from storage import open_store
from tests.flows.test_extract_clip import assert_same_features
from tests.readme import (command, leftover_processes, output, run, typed,
                          wait_for_no_leftovers, with_new_marker)

TINY = {"--model": "test-ViT-tiny", "--pretrained": "none"}


def test_stage_1_as_printed(readme_store, readme_scenes):
    """The fixture ran `python -m flows.extract_clip ... --stride 1` as printed; what it wrote
    and what it showed."""
    command("python -m flows.extract_clip --dataset --model --pretrained --root --store --stride")
    store = open_store(readme_store)
    assert store.scenes() == sorted(p.name for p in readme_scenes.iterdir())
    (featureset,) = store.featuresets()
    assert all(store.done(scene, featureset).all() for scene in store.scenes())
    shown = (readme_store.parent / "extract.log").read_text()
    assert re.search(r"stored 18 frames \(0 invalid\) of 3 scenes .* \([\d.]+ [KM]B\)", shown)
    assert "Traceback" not in shown and "ZarrUserWarning" not in shown
    # a progress bar per scene with its total (6 frames each), none without one
    for scene in store.scenes():
        assert re.search(rf"{scene}: +100%\|[^|]*\| 6/6 ", shown), shown[-2000:]
    assert not re.search(r"\d+frame \[", shown)


def test_rerun_as_in_the_table_encodes_nothing(readme_store, readme_scenes, cli_env, tmp_path):
    store = tmp_path / "scannet.zarr"
    shutil.copytree(readme_store, store)
    result = run(typed(command("python -m flows.extract_clip --dataset --model --pretrained "
                               "--root --store"),
                       {"--root": str(readme_scenes), "--store": str(store), "M": "test-ViT-tiny",
                        "P": "none"}), cli_env)
    assert result.returncode == 0, output(result)[-3000:]
    assert "stored 0 frames (0 invalid) of 3 scenes" in result.stdout


@pytest.mark.timeout(900)  # a LocalCluster of processes on a busy 2-core machine takes minutes
def test_dask_local_cluster_as_printed(readme_store, readme_scenes, cli_env, tmp_path):
    """`--task-runner dask` from `python -m` (the scene tasks reach the workers by reference);
    the workers report to the flow's API (no temporary Prefect server of their own) and leave
    no process behind."""
    env = with_new_marker(cli_env)
    store = tmp_path / "dask.zarr"
    result = run(typed(command("python -m flows.extract_clip --dataset --model --pretrained "
                               "--root --store --task-runner --workers"),
                       {"--root": str(readme_scenes), "--store": str(store), "--workers": "2",
                        **TINY}), env)
    shown = output(result)
    assert result.returncode == 0, shown[-3000:]
    assert "Traceback" not in shown
    assert "distributed.nanny" not in shown  # Dask's INFO lines are not the user's business
    assert shown.count("Starting temporary server") == 1  # the flow's own ephemeral API
    workers = re.search(r"^workers: (.*)$", result.stdout, re.M).group(1).split("; ")
    assert len(workers) == 2 and all("1 model load(s)" in w for w in workers), workers
    assert_same_features(store, readme_store)
    assert wait_for_no_leftovers(env) == []


# ------------------------------------------------------------------ expected failures


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_known_weights_without_network_fail_at_once_in_one_line(readme_scenes, cli_env, tmp_path):
    """README's stage-1 command as typed on a machine without network: the Hugging Face host
    does not answer (a closed local port stands for it) and nothing is cached."""
    env = with_new_marker(cli_env, HF_HUB_OFFLINE="", HF_HOME=str(tmp_path / "hf"),
                          HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    store = tmp_path / "scannet.zarr"
    result = run(typed(command("python -m flows.extract_clip --dataset --model --pretrained "
                               "--root --store --stride"),
                       {"--root": str(readme_scenes), "--store": str(store)}), env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback, no Prefect
    assert result.stderr.startswith("error: --pretrained: the ViT-B-16 weights 'openai' are not "
                                    "in the local cache and 127.0.0.1 does not answer")
    assert "none for random weights" in result.stderr
    assert not store.exists() and leftover_processes(env) == []


@pytest.mark.parametrize("flags, expected", [
    ({"--model": "ViT-B-61"}, "error: --model: unknown open_clip model 'ViT-B-61': did you mean "
                              "ViT-B-16"),
    ({"--model": "test-ViT-tiny", "--pretrained": "openai"},
     "error: --pretrained: test-ViT-tiny has no open_clip weights tagged 'openai'"),
    ({"--model": "ViT-B-16", "--pretrained": "laion2b_e16"},  # a tag of ViT-B-32's, not its
     "error: --pretrained: ViT-B-16 has no open_clip weights tagged 'laion2b_e16' (its tags: "),
    ({"--model": "ViT-B-16", "--pretrained": "openai"},
     "error: --pretrained: the ViT-B-16 weights 'openai' are not in the local cache and "
     "HF_HUB_OFFLINE is set"),
    ({"--pretrained": "weights/model.bin"}, "error: --pretrained: checkpoint weights/model.bin "
                                            "does not exist"),
    ({"--root": "no/such/folder"}, "error: --root: no folder no/such/folder (relative to "),
    ({"--scenes": "scene09*"}, "error: --scenes: no scene folder under "),
    ({"--store": "."}, "error: --store: . is a folder with other files in it, not a feature "
                       "store"),
])
def test_bad_input_is_one_line_before_anything_starts(readme_scenes, tmp_path, monkeypatch,
                                                      capfd, flags, expected):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a store")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as CI: no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    args = {"--root": str(readme_scenes), "--store": "new.zarr", "--model": "test-ViT-tiny",
            "--pretrained": "none", **flags}
    assert main([word for pair in args.items() for word in pair]) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(expected), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no store, no cache


def test_a_broken_scene_ends_in_one_error_line_and_no_traceback(readme_scenes, cli_env,
                                                                tmp_path):
    """README's command as typed over scenes of which one has no mesh: Prefect logs the failed
    task run and the failed flow run, one line each without a traceback (a scene error is not
    retried; the flow ends Failed with its reason), and the command's one `error:` line comes
    last."""
    root = tmp_path / "scans"
    shutil.copytree(readme_scenes, root)
    broken = sorted(root.iterdir())[0]
    (broken / f"{broken.name}_vh_clean_2.ply").unlink()
    store = tmp_path / "scannet.zarr"
    result = run(typed(command("python -m flows.extract_clip --dataset --model --pretrained "
                               "--root --store --stride"),
                       {"--root": str(root), "--store": str(store), **TINY}), cli_env)
    shown = output(result)
    assert result.returncode == 1
    assert "Traceback" not in shown and "NoneType: None" not in shown, shown[-3000:]
    assert "Finished in state Failed('Task run encountered an exception SceneError: " in shown
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    last = [line for line in result.stderr.splitlines() if "Stopping temporary server" not in line]
    assert errors == last[-1:]  # the last line but Prefect's own goodbye at exit
    assert errors[0].startswith(f"error: 1 of 3 scenes failed (the others are stored in {store}):"
                                f" {broken.name}: ")
    assert len(open_store(store).scenes()) == 2


def test_a_run_whose_every_scene_fails_leaves_no_store(prefect_api, synthetic_root, tmp_path,
                                                       capfd):
    root = tmp_path / "scenes"
    shutil.copytree(synthetic_root, root)
    for scene in root.iterdir():
        (scene / f"{scene.name}_vh_clean_2.ply").unlink()
    store = tmp_path / "s.zarr"
    assert main(["--root", str(root), "--dataset", "synthetic", "--store", str(store), "--model",
                 "test-ViT-tiny", "--pretrained", "none"]) == 1
    err = capfd.readouterr().err.rstrip().splitlines()[-1]
    assert err.startswith(f"error: all 2 scenes failed and {store}, which this run created, was "
                          "removed again: scene0000_00: ")
    assert not store.exists()


def test_progress_reaches_the_scene_total(synthetic_root, tmp_path):
    """extract_scene reports (done, total) before the first batch and after each: a bar has
    its total from the start."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.readers.synthetic import SyntheticScene

    store = open_store(tmp_path / "s.zarr", mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))
    featureset = store.register_featureset(encoder.describe())
    scene = SyntheticScene.open(sorted(synthetic_root.iterdir())[0])
    calls = []
    extract_scene(scene, store, encoder, featureset, batch_size=3,
                  on_progress=lambda done, total: calls.append((done, total)))
    total = scene.frame_ids.size
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) == 1 + int(np.ceil(total / 3))
