"""A checkpoint that would run code when unpickled is refused by every command that loads one
(`model.train --resume`, `model.evaluate --checkpoint`, `model.query --checkpoint`): nothing
executes, and the error is one line naming the file."""

from __future__ import annotations

import os
import shutil

import torch

from tests.reliability.conftest import one_error_line, run_command


class Payload:
    """Unpickling it runs `touch <marker>` (pickle calls os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_no_command_runs_a_checkpoint_payload(trained_run, tiny_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = run / "checkpoints" / "last.pt"
    genuine = torch.load(checkpoint, weights_only=True)  # what model.train writes loads safely
    marker = tmp_path / "payload-ran"
    torch.save({**genuine, "history": [Payload(marker)]}, checkpoint)
    commands = {
        "train": ["model.train", "--cache", str(tiny_store), "--resume", str(run)],
        "evaluate": ["model.evaluate", "--cache", str(tiny_store), "--checkpoint", str(checkpoint)],
        "query": ["model.query", "--cache", str(tiny_store), "--scene", "scene0000_00", "--text",
                  "chair", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "query")],
    }
    for name, command in commands.items():
        result = run_command(*command)
        assert result.returncode != 0, name
        line = one_error_line(result.stderr)
        assert str(checkpoint) in line and "refusing to load" in line, line
        assert "posix.system" in line or "os.system" in line, line  # says what it holds
        assert not marker.exists(), f"model.{name} ran the checkpoint's payload"


def test_a_safe_checkpoint_that_does_not_fit_is_one_line(trained_run, tiny_store, tmp_path):
    """A checkpoint that loads with weights_only=True but whose contents do not fit the model
    (a weight of another shape, a config of the wrong types) is one line naming the file, in
    each command that loads one."""
    genuine = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    name, weight = next(iter(genuine["model"].items()))
    cases = {
        "shape": {**genuine, "model": {**genuine["model"], name: torch.zeros(*weight.shape, 2)}},
        "channels": {**genuine, "config": {**genuine["config"], "channels": "abc"}},
        "config": {**genuine, "config": ["not", "a", "config"]},
    }
    for case, contents in cases.items():
        run = tmp_path / case
        shutil.copytree(trained_run, run)
        checkpoint = run / "checkpoints" / "last.pt"
        torch.save(contents, checkpoint)
        commands = {"shape": ["model.evaluate", "--cache", str(tiny_store), "--checkpoint",
                              str(checkpoint)],
                    "channels": ["model.train", "--cache", str(tiny_store), "--resume", str(run)],
                    "config": ["model.query", "--cache", str(tiny_store), "--scene",
                               "scene0000_00", "--text", "chair", "--checkpoint",
                               str(checkpoint), "--out",
                               str(tmp_path / "query")]}
        result = run_command(*commands[case])
        line = one_error_line(result.stderr)
        assert result.returncode != 0 and str(checkpoint) in line, (case, line)
        assert "does not fit this model" in line, (case, line)
