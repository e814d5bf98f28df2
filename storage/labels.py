"""ScanNet's label spaces in one place: NYU40 ids (what the label meshes hold), the 20
benchmark classes (what the store's `semantic` arrays and the models hold), as in ScanNet's own
benchmark scripts, and the values that mean "none" in the store's label arrays."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
"""Semantic label of points outside ScanNet's 20 benchmark classes (torch's CE default)."""

NO_INSTANCE = -1
"""Instance id of points that belong to no annotated object."""

NO_SEGMENT = -1
"""Segment (superpoint) id of points whose segment is unknown."""

NYU40_NAMES = (
    "unannotated", "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow",
    "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper",
    "towel", "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink",
    "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
"""Name of each NYU40 id (index = id); 0 is ScanNet's "no label"."""

VALID_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
"""The NYU40 ids of ScanNet's 20 benchmark classes; benchmark class i is VALID_CLASS_IDS[i]."""

CLASS_NAMES = tuple(NYU40_NAMES[nyu40] for nyu40 in VALID_CLASS_IDS)
"""Names of the 20 benchmark classes, index = benchmark class (0 wall ... 19 otherfurniture)."""

THING_CLASSES = tuple(range(2, 20))
"""Benchmark classes scored in instance segmentation: all but wall (0) and floor (1)."""

_NYU40_TO_SCANNET20 = np.full(len(NYU40_NAMES), IGNORE_INDEX, dtype=np.int16)
_NYU40_TO_SCANNET20[list(VALID_CLASS_IDS)] = np.arange(len(VALID_CLASS_IDS))


def nyu40_to_scannet20(labels: np.ndarray) -> np.ndarray:
    """Map NYU40 ids to benchmark classes.

    labels: any shape, integer NYU40 ids (0..40; anything else counts as unlabelled).
    Returns the same shape, int16: 0..19, IGNORE_INDEX for every other id.
    """
    labels = np.asarray(labels)
    known = (labels >= 0) & (labels < len(NYU40_NAMES))
    mapped = np.full(labels.shape, IGNORE_INDEX, dtype=np.int16)
    mapped[known] = _NYU40_TO_SCANNET20[labels[known].astype(np.intp)]
    return mapped


def scannet20_to_nyu40(classes: np.ndarray) -> np.ndarray:
    """Map benchmark classes to NYU40 ids, as ScanNet's submission files hold them.

    classes: any shape, integer benchmark classes (0..19; anything else, IGNORE_INDEX included,
    counts as unlabelled). Returns the same shape, int64: VALID_CLASS_IDS[class], 0 elsewhere.
    """
    classes = np.asarray(classes)
    known = (classes >= 0) & (classes < len(VALID_CLASS_IDS))
    mapped = np.zeros(classes.shape, dtype=np.int64)
    mapped[known] = np.asarray(VALID_CLASS_IDS)[classes[known].astype(np.intp)]
    return mapped
