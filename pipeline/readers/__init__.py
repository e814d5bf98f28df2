"""Scene readers by dataset name: `SCENE_READERS[dataset].open(scene_folder)` -> a `Scene`.

A reader implements `pipeline.readers.base.SceneReader` (a `Scene` subclass: frame ids,
intrinsics, sizes, `read_frame`, `read_points`). Adding a dataset is one module with such a
class and one line below; `--dataset NAME` then extracts it.
"""

from __future__ import annotations

from pipeline.readers.base import SceneReader
from pipeline.readers.scannet import ScanNetScene
from pipeline.readers.scannet_sens import SensScene
from pipeline.readers.synthetic import SyntheticScene

SCENE_READERS: dict[str, SceneReader] = {
    "scannet": ScanNetScene,  # SensReader export; a folder with only <scene>.sens reads that
    "scannet-sens": SensScene,  # raw <scene>.sens, no export step
    "synthetic": SyntheticScene,  # pipeline.synthetic's scenes, with exact ground truth
}
"""Dataset name (the flow's `dataset` parameter) -> its reader."""
