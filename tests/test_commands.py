"""README's commands for the synthetic scenes and the store's report, run as printed
(tests.readme): `python -m pipeline.synthetic` and `python -m storage.inspect`."""

from __future__ import annotations

import json

from storage import open_store
from tests.readme import command, output, run, typed

INSPECT = "python -m storage.inspect --json --verify"


def test_synthetic_scenes_as_printed(readme_scenes):
    """The session's readme_scenes ran `python -m pipeline.synthetic OUT --scenes N --frames F
    --seed S [--small]` as printed (3 scenes, 6 frames); the scenes are in ScanNet's layout."""
    command("python -m pipeline.synthetic --frames --scenes --seed --small")
    scenes = sorted(path.name for path in readme_scenes.iterdir())
    assert scenes == ["scene0000_00", "scene0001_00", "scene0002_00"]
    for scene in scenes:
        folder = readme_scenes / scene
        assert len(list((folder / "color").glob("*.jpg"))) == 6
        assert len(list((folder / "pose").glob("*.txt"))) == 6
        assert (folder / f"{scene}_vh_clean_2.labels.ply").is_file()


def test_inspect_as_printed(readme_store, cli_env):
    """With and without the optional flags: the table, the JSON report and --verify."""
    found = command(INSPECT)
    table = run(typed(found, {"STORE": str(readme_store)}, drop=["--json", "--verify"]), cli_env)
    assert table.returncode == 0, output(table)[-3000:]
    store = open_store(readme_store)
    (featureset,) = store.featuresets()
    assert f"store {readme_store}: 3 scenes" in table.stdout
    assert featureset in table.stdout and "RANDOM WEIGHTS" in table.stdout
    full = run(typed(found, {"STORE": str(readme_store)}), cli_env)
    assert full.returncode == 0, output(full)[-3000:]
    report = json.loads(full.stdout)
    assert sorted(report["scenes"]) == store.scenes()
    assert report["problems"] == []
    assert "Traceback" not in output(full)
