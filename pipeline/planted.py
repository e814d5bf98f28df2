"""Planted feature sets: every labelled region's features are noisy copies of the text embedding
of its class, so an open-vocabulary query has a known answer without real CLIP weights.

`write_planted_store(scenes_root, store)` on synthetic scenes (pipeline.synthetic):

1. extracts the scenes with the tiny random-weight ViT, `maskclip` kind (pipeline.extraction):
   the store gets the scenes' frames, depth and points, and a feature set whose model has a text
   tower;
2. encodes the 20 ScanNet class prompts with that model (pipeline.text_embeddings), cached in
   the store as for any feature set;
3. replaces each frame's spatial grid: a cell's feature is the mean of the class embeddings of
   the colour pixels it covers (each pixel's class ray-cast exactly from synthetic.json; pixels
   of no ScanNet-20 class, like the ceiling, left out; a cell with none gets a fixed random
   "background" vector), plus Gaussian noise; a frame's global embedding is the mean of its cells.

With `shuffle=True` the cells of each scene are then permuted among all its frames: the same
features, no longer where their classes are; a query of that store must fail. The spec of a
planted feature set says so in its notes, under "planted" (not part of the feature-set id: keep
planted sets in stores of their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.extraction import extract_scene
from storage.labels import nyu40_to_scannet20
from pipeline.projection import GridMapping
from pipeline.prompts import DEFAULT_TEMPLATES, SCANNET20_PROMPTS
from pipeline.synthetic import Box, cast_image
from pipeline.readers.synthetic import SyntheticScene
from pipeline.text_embeddings import ensure_text_embeddings
from storage.store import FeatureStore, open_store
from storage.text import read_text_embeddings


def cell_class_counts(boxes: Sequence[Box], cam_to_world: np.ndarray, intrinsic_color: np.ndarray,
                      mapping: GridMapping, num_classes: int) -> np.ndarray:
    """(gh, gw, K) int64: how many colour pixels of each ScanNet-20 class each feature-grid
    cell covers in one frame.

    boxes: the scene's boxes (their NYU40 ids give the classes). cam_to_world: (4, 4) metres.
    intrinsic_color: (3, 3) pixels. Pixels map onto the grid as the projection maps points
    (GridMapping: resize and crop); pixels outside the model input or of no class are not counted.
    """
    _, box_index, _ = cast_image(boxes, cam_to_world, intrinsic_color, mapping.color_size)
    box_class = nyu40_to_scannet20(np.array([box.nyu40 for box in boxes])).astype(np.int64)
    classes = np.where(box_index >= 0, box_class[box_index], -1)
    rows, cols = np.mgrid[0:mapping.color_size[0], 0:mapping.color_size[1]]
    uv = torch.from_numpy(np.stack([cols, rows], axis=-1).astype(np.float32))
    grid_uv, inside = mapping.color_to_grid(uv)
    grid_h, grid_w = mapping.grid_size
    cell_x = ((grid_uv[..., 0] + 1) / 2 * grid_w).floor().long().clamp(0, grid_w - 1)
    cell_y = ((grid_uv[..., 1] + 1) / 2 * grid_h).floor().long().clamp(0, grid_h - 1)
    cell = (cell_y * grid_w + cell_x).numpy()
    keep = inside.numpy() & (classes >= 0)
    counts = np.bincount(cell[keep] * num_classes + classes[keep],
                         minlength=grid_h * grid_w * num_classes)
    return counts.reshape(grid_h, grid_w, num_classes)


def plant_scene(store: FeatureStore, featureset: str, scene: SyntheticScene,
                class_embeddings: np.ndarray, noise: float, shuffle: bool,
                rng: np.random.Generator) -> None:
    """Overwrite one scene's features with planted ones (see the module docstring).

    class_embeddings: (K, D) unit-norm text embeddings, row k for class k. noise: the expected
    norm of the noise added to each cell, in units of the smallest distance between two rows.
    """
    arrays = store.scene(scene.scene_id, with_depth=False)
    mapping = GridMapping.for_featureset(store.featureset_spec(featureset), arrays.color_size)
    num_classes, dim = class_embeddings.shape
    distances = np.linalg.norm(class_embeddings[:, None] - class_embeddings[None], axis=-1)
    noise_std = noise * distances[~np.eye(num_classes, dtype=bool)].min() / np.sqrt(dim)
    background = rng.standard_normal(dim)
    background /= np.linalg.norm(background)
    positions = np.flatnonzero(arrays.valid)
    boxes = scene.boxes
    spatial = []
    for position in positions:
        counts = cell_class_counts(boxes, arrays.pose[position], arrays.intrinsic_color, mapping,
                                   num_classes)
        total = counts.sum(axis=-1, keepdims=True)
        mixed = counts @ class_embeddings / np.maximum(total, 1)
        spatial.append(np.where(total > 0, mixed, background))
    spatial = np.stack(spatial)
    spatial += rng.normal(0.0, noise_std, spatial.shape)
    if shuffle:
        cells = spatial.reshape(-1, dim)
        spatial = cells[rng.permutation(len(cells))].reshape(spatial.shape)
    store.write_features(scene.scene_id, featureset, positions, spatial=spatial,
                         global_=spatial.mean(axis=(1, 2)))


def write_tiny_store(scenes_root: Path, store_path: str | Path, *, note: dict | None = None,
                     templates: Sequence[str] = DEFAULT_TEMPLATES) -> tuple[FeatureStore, str]:
    """Extract every synthetic scene under `scenes_root` with the tiny random-weight ViT
    (maskclip kind) and cache the ScanNet-20 class prompts' text embeddings. `note` goes into
    the feature set's spec as notes (outside its identity). Returns the store and feature set."""
    store = open_store(store_path, mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none", spatial_kind="maskclip", device="cpu"))
    featureset = store.register_featureset(encoder.describe().with_notes(**(note or {})))
    for path in sorted(Path(scenes_root).iterdir()):
        if path.is_dir():
            extract_scene(SyntheticScene.open(path), store, encoder, featureset, batch_size=8)
    ensure_text_embeddings(store, featureset, SCANNET20_PROMPTS, templates, device="cpu")
    return store, featureset


def write_planted_store(scenes_root: Path, store_path: str | Path, *, noise: float = 0.5,
                        shuffle: bool = False, seed: int = 0,
                        templates: Sequence[str] = DEFAULT_TEMPLATES) -> str:
    """Write a planted store of every synthetic scene under `scenes_root`; returns the feature
    set id. Deterministic given `seed`. See the module docstring for what is planted."""
    store, featureset = write_tiny_store(
        scenes_root, store_path, templates=templates,
        note={"planted": {"noise": noise, "shuffle": shuffle, "seed": seed}})
    class_embeddings = read_text_embeddings(store, featureset, SCANNET20_PROMPTS, templates)
    rng = np.random.default_rng(seed)
    for scene_id in store.scenes():
        scene = SyntheticScene.open(Path(scenes_root) / scene_id)
        plant_scene(store, featureset, scene, class_embeddings, noise, shuffle, rng)
    return featureset
