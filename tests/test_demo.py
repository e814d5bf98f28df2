"""`make demo` as README prints it: the model visibly learns (val mIoU well above its first
epoch) and the evaluation predicts instances."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.readme import REPO, command, output, run, typed


@pytest.mark.timeout(1800)  # about a minute on a quiet 2-core machine; CI machines are shared
def test_make_demo_shows_learning(cli_env, tmp_path):
    """README's `make demo DEMO_MODEL=ViT-B-16 DEMO_PRETRAINED=openai` with the tiny model and
    random weights for the real ones: that is plain `make demo` (its defaults), in a folder of
    its own. `-o .venv/.installed`: the environment is the one running this test."""
    assert command("make demo").words == ("make", "demo")
    demo = tmp_path / "demo"
    argv = typed(command("make demo DEMO_MODEL DEMO_PRETRAINED"),
                 {"DEMO_MODEL=ViT-B-16": "DEMO_MODEL=test-ViT-tiny",
                  "DEMO_PRETRAINED=openai": "DEMO_PRETRAINED=none"},
                 append=[f"DEMO_DIR={demo}", f"PY={sys.executable}", "-o", ".venv/.installed"])
    result = run(argv, cli_env, cwd=REPO, timeout=1700)
    shown = output(result)
    assert result.returncode == 0, shown[-4000:]
    assert "Traceback" not in shown
    history = [json.loads(line) for line in (demo / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0]["val"]["miou"], history[-1]["val"]["miou"]
    assert last >= 0.4 and last >= first + 0.15, [r["val"]["miou"] for r in history]
    assert history[-1]["train"]["semantic"] < 0.5 * history[0]["train"]["semantic"]
    predicted = int(re.search(r"^predicted instances: (\d+)", result.stdout, re.M).group(1))
    assert predicted > 0
    assert list((demo / "run" / "predictions").glob("*.png"))
    # the closing lines say what to look at in the pictures
    closing = result.stdout[result.stdout.rindex("demo outputs:"):]
    for picture in ("curves.png", "predictions/"):
        assert picture in closing
