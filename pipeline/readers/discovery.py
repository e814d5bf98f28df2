"""Which folders under a dataset root are scenes: the reader of the dataset decides
(`SceneReader.why_not_scene`), so a new dataset's scenes are found as its reader reads them."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pipeline.readers.base import SceneError, SceneReader
from pipeline.readers.scannet import ScanNetScene


def list_scenes(root: Path, pattern: str | list[str] | None = None,
                reader: SceneReader = ScanNetScene) -> list[Path]:
    """Scene folders under `root` (those `reader.why_not_scene` accepts), sorted by name;
    `root` itself when the reader takes it for a scene. A missing root gives [].

    pattern: None for all; a glob on folder names ("scene00*"); or a list of names or globs,
    each of which must match a scene (SceneError otherwise).
    """
    root = Path(root)
    if root.is_dir() and not reader.why_not_scene(root):
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(path for path in _folders(root) if not reader.why_not_scene(path))
    else:
        return []
    if pattern is None:
        return candidates
    if isinstance(pattern, str):
        return [path for path in candidates if fnmatch.fnmatchcase(path.name, pattern)]
    unmatched = [p for p in pattern if not any(fnmatch.fnmatchcase(c.name, p) for c in candidates)]
    if unmatched:
        raise SceneError(f"no scene folder under {root} matches {', '.join(unmatched)}; "
                         "check the scene names")
    return [path for path in candidates if any(fnmatch.fnmatchcase(path.name, p) for p in pattern)]


def not_scenes(root: Path, pattern: str | list[str] | None = None,
               reader: SceneReader = ScanNetScene) -> dict[str, str]:
    """{folder name: why it is no scene} for the folders under `root` (matching `pattern`, as
    in `list_scenes`) that `list_scenes` passes over: an empty folder, or what the reader says.
    Hidden folders are left out. Empty when `root` is itself a scene."""
    root = Path(root)
    if not root.is_dir() or not reader.why_not_scene(root):
        return {}
    patterns = [pattern] if isinstance(pattern, str) else pattern
    found = {}
    for path in sorted(_folders(root)):
        if patterns and not any(fnmatch.fnmatchcase(path.name, p) for p in patterns):
            continue
        why = "an empty folder" if not any(path.iterdir()) else reader.why_not_scene(path)
        if why:
            found[path.name] = why
    return found


def _folders(root: Path) -> list[Path]:
    return [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")]
