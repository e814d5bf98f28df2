"""Reader of the synthetic scenes `pipeline.synthetic` writes: ScanNet's export layout, read
by the export reader, plus `synthetic.json`, the exact description of every box."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipeline.readers.base import SceneError
from pipeline.readers.scannet import ScanNetScene
from pipeline.synthetic import Box


class SyntheticScene(ScanNetScene):
    """A synthetic scene read like any ScanNet scene, plus its exact description."""

    @property
    def description_path(self) -> Path:
        return self.root / "synthetic.json"

    @functools.cached_property
    def description(self) -> dict:
        """synthetic.json: scene_id, seed, config, room (lx, ly, height), boxes."""
        try:
            return json.loads(self.description_path.read_text())
        except (OSError, ValueError) as error:
            raise SceneError(f"scene {self.scene_id}: cannot read {self.description_path} "
                             f"({error}); it is written by pipeline.synthetic") from None

    @property
    def boxes(self) -> list[Box]:
        """Every box of the scene, world frame, as `raycast_depth` takes them."""
        return [Box(**{key: tuple(value) if isinstance(value, list) else value
                       for key, value in box.items()}) for box in self.description["boxes"]]
