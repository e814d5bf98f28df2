"""ScanNet's instance benchmark: AP over IoU 0.50:0.05:0.90, AP50 and AP25, per thing class.

The rules of ScanNet's `evaluate_semantic_instance.py` (BenchmarkScripts/3d_evaluation), written
afresh on the inputs that script reads: per scene, the ground truth of every mesh vertex encoded
as `nyu40_id * 1000 + instance + 1` (`encode_ground_truth`), and predicted masks over the
vertices, each with a NYU40 label id and a confidence.

1. AP averages the IoU thresholds `np.arange(0.5, 0.95, 0.05)` (0.50 to 0.90: nine values, with
   the floating values numpy gives them); AP50 and AP25 are the thresholds 0.5 and 0.25.
2. A prediction matches a ground-truth instance only when their IoU is strictly greater than
   the threshold (IoU over vertices: intersection / (|truth| + |prediction| - intersection)).
3. Ground-truth instances are the ids >= 1000 whose class (id // 1000) is one of the 18
   instance classes; those under `min_region_size` vertices (100) are ignored. Predicted masks
   under `min_region_size` vertices, or of a label outside the 18 classes, are dropped.
4. Per scene, class and threshold, ground truth first: each instance in ascending id takes, in
   prediction order, the not-yet-taken predictions of its class whose IoU with it exceeds the
   threshold. The first is a true positive and is taken; each further one is a false positive
   at the lower of its score and the instance's, the instance keeping the higher (and is not
   taken: it may still match a later instance). An instance with none is a false negative.
5. A prediction whose IoU exceeds the threshold with no ground-truth instance of its class
   (ignored ones included) is a false positive, unless the fraction of its vertices that lie on
   void (ground-truth class not one of the 18) or on ignored instances of its class exceeds
   the threshold.
6. The precision-recall curve has one point per unique score (ties fall together, in any
   order) plus an artificial first point of precision 1 at recall 0; AP is the dot product of
   the precisions with the recall step widths of the midpoint rule (the recalls convolved with
   [-0.5, 0, 0.5]); there is no monotone precision envelope.
7. A class with ground truth and no prediction has AP 0; a class without ground truth has none
   (NaN) and is left out of the means over classes. The script raises an IndexError for a class
   with ground truth and predictions of which none is matched or counted (every prediction lies
   on void or ignored instances); here its AP is 0, what its formula gives with the artificial
   point alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from storage.labels import VALID_CLASS_IDS, scannet20_to_nyu40

IOU_THRESHOLDS = np.arange(0.5, 0.95, 0.05)
"""The thresholds AP averages: 0.50 ... 0.90, exactly as the script's np.arange makes them."""
AP50_THRESHOLD = 0.5
AP25_THRESHOLD = 0.25
MIN_REGION_SIZE = 100
"""Ground-truth instances and predicted masks under this many vertices take no part."""
INSTANCE_CLASS_IDS = tuple(VALID_CLASS_IDS[2:])
"""NYU40 ids of the 18 instance classes (the benchmark classes but wall and floor)."""
LABEL_DIVISOR = 1000
"""Ground truth per vertex is nyu40_id * LABEL_DIVISOR + instance + 1."""


def encode_ground_truth(semantic: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """ScanNet's instance ground truth per vertex: nyu40_id * 1000 + instance + 1.

    semantic: (N,) benchmark classes 0..19 (IGNORE_INDEX or any other value: NYU40 id 0).
    instance: (N,) instance ids 0..998 within the scene, -1 for none (then + 0: the vertices
    of a class without an instance, as ScanNet's export writes them). Returns (N,) int64.
    Raises ValueError for an instance id the encoding cannot hold (>= 999).
    """
    instance = np.asarray(instance, dtype=np.int64)
    if instance.size and int(instance.max()) >= LABEL_DIVISOR - 1:
        raise ValueError(f"instance id {int(instance.max())}: ScanNet's encoding nyu40_id * "
                         f"{LABEL_DIVISOR} + instance + 1 holds ids 0..{LABEL_DIVISOR - 2}")
    return scannet20_to_nyu40(semantic) * LABEL_DIVISOR + np.where(instance >= 0, instance + 1, 0)


@dataclass
class _Scene:
    """One scene after assignment: T ground-truth instances (of the 18 classes, any size, in
    ascending id) and P kept predictions (in their order), with their (P, T) intersections,
    zero between a prediction and the instances of other classes."""

    truth_ids: np.ndarray  # (T,) int64
    truth_sizes: np.ndarray  # (T,) int64, vertices
    labels: np.ndarray  # (P,) int64 NYU40
    sizes: np.ndarray  # (P,) int64, vertices
    scores: np.ndarray  # (P,) float64
    void: np.ndarray  # (P,) int64, vertices on void
    intersections: np.ndarray  # (P, T) int64

    @property
    def truth_labels(self) -> np.ndarray:
        return self.truth_ids // LABEL_DIVISOR


@dataclass
class InstanceEvaluator:
    """Accumulates scenes (`add`), then `result()` gives AP, AP50, AP25 and per-class values."""

    min_region_size: int = MIN_REGION_SIZE
    _scenes: list[_Scene] = field(default_factory=list)

    def add(self, ground_truth: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[int],
            scores: Sequence[float]) -> None:
        """One scene. ground_truth: (N,) int64 per vertex, `encode_ground_truth`'s encoding.
        masks: predicted instances, each (N,) bool (or integers, non-zero = in the instance);
        labels: their NYU40 label ids; scores: their confidences. Order matters (rule 4)."""
        ground_truth = np.asarray(ground_truth, dtype=np.int64)
        truth_ids, truth_sizes = np.unique(ground_truth, return_counts=True)
        keep = (truth_ids != 0) & np.isin(truth_ids // LABEL_DIVISOR, INSTANCE_CLASS_IDS)
        truth_ids, truth_sizes = truth_ids[keep], truth_sizes[keep]
        void = ~np.isin(ground_truth // LABEL_DIVISOR, INSTANCE_CLASS_IDS)
        rows: list[tuple[int, int, float, int, np.ndarray]] = []
        for mask, label, score in zip(masks, labels, scores, strict=True):
            mask = np.asarray(mask) != 0
            if mask.shape != ground_truth.shape:
                raise ValueError(f"a mask of {mask.size} vertices for a scene of "
                                 f"{ground_truth.size}")
            size = int(mask.sum())
            if int(label) not in INSTANCE_CLASS_IDS or size < self.min_region_size:
                continue
            ids, counts = np.unique(ground_truth[mask], return_counts=True)
            overlap = np.zeros(len(truth_ids), dtype=np.int64)
            found = np.isin(ids, truth_ids)
            overlap[np.searchsorted(truth_ids, ids[found])] = counts[found]
            overlap[truth_ids // LABEL_DIVISOR != int(label)] = 0
            rows.append((int(label), size, float(score), int(void[mask].sum()), overlap))
        self._scenes.append(_Scene(
            truth_ids=truth_ids, truth_sizes=truth_sizes.astype(np.int64),
            labels=np.array([r[0] for r in rows], dtype=np.int64),
            sizes=np.array([r[1] for r in rows], dtype=np.int64),
            scores=np.array([r[2] for r in rows], dtype=np.float64),
            void=np.array([r[3] for r in rows], dtype=np.int64),
            intersections=(np.stack([r[4] for r in rows]) if rows
                           else np.zeros((0, len(truth_ids)), dtype=np.int64))))

    def result(self) -> dict:
        """{"ap", "ap50", "ap25": means over the classes with ground truth (NaN if none),
        "classes": {nyu40 id: {"ap", "ap50", "ap25"}} for the 18 classes (NaN: no ground truth)}."""
        thresholds = np.append(IOU_THRESHOLDS, AP25_THRESHOLD)
        table = np.array([[self._class_ap(label, threshold) for threshold in thresholds]
                          for label in INSTANCE_CLASS_IDS])
        at_50 = int(np.flatnonzero(np.isclose(thresholds, AP50_THRESHOLD))[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of classes without truth
            return {
                "ap": float(np.nanmean(table[:, :len(IOU_THRESHOLDS)])),
                "ap50": float(np.nanmean(table[:, at_50])),
                "ap25": float(np.nanmean(table[:, -1])),
                "classes": {label: {"ap": float(np.mean(row[:len(IOU_THRESHOLDS)])),
                                    "ap50": float(row[at_50]), "ap25": float(row[-1])}
                            for label, row in zip(INSTANCE_CLASS_IDS, table)},
            }

    def _class_ap(self, label: int, threshold: float) -> float:
        scores: list[float] = []
        hits: list[bool] = []
        missed = 0
        has_truth = has_prediction = False
        for scene in self._scenes:
            found, found_hits, scene_missed, scene_truth, scene_predictions = _match(
                scene, label, threshold, self.min_region_size)
            scores += found
            hits += found_hits
            missed += scene_missed
            has_truth |= scene_truth
            has_prediction |= scene_predictions
        if not has_truth:
            return float("nan")
        if not has_prediction:
            return 0.0
        return average_precision(np.array(scores, dtype=np.float64), np.array(hits, dtype=bool),
                                  missed)


def _match(scene: _Scene, label: int, threshold: float, min_region_size: int
           ) -> tuple[list[float], list[bool], int, bool, bool]:
    """Rules 4 and 5 in one scene, one class, one threshold: (scores, true positive or not,
    missed instances, whether the scene has evaluated ground truth, and predictions)."""
    of_class = np.flatnonzero(scene.truth_labels == label)
    evaluated = of_class[(scene.truth_ids[of_class] >= LABEL_DIVISOR)
                         & (scene.truth_sizes[of_class] >= min_region_size)]
    predictions = np.flatnonzero(scene.labels == label)
    taken = np.zeros(len(scene.labels), dtype=bool)
    scores: list[float] = []
    hits: list[bool] = []
    missed = 0
    for truth in evaluated:
        kept: float | None = None
        for prediction in predictions:
            shared = int(scene.intersections[prediction, truth])
            if shared == 0 or taken[prediction]:
                continue
            iou = shared / (int(scene.truth_sizes[truth]) + int(scene.sizes[prediction]) - shared)
            if iou > threshold:
                score = float(scene.scores[prediction])
                if kept is None:
                    kept = score
                    taken[prediction] = True
                else:  # a second match: the lower score is a false positive
                    scores.append(min(kept, score))
                    hits.append(False)
                    kept = max(kept, score)
        if kept is None:
            missed += 1
        else:
            scores.append(kept)
            hits.append(True)
    small = (scene.truth_ids[of_class] < LABEL_DIVISOR).astype(np.int64) + (
        scene.truth_sizes[of_class] < min_region_size).astype(np.int64)
    for prediction in predictions:
        shared = scene.intersections[prediction, of_class]
        size = int(scene.sizes[prediction])
        iou = shared / (scene.truth_sizes[of_class] + size - shared)
        if ((shared > 0) & (iou > threshold)).any():
            continue
        ignored = int(scene.void[prediction]) + int((shared * small).sum())
        if ignored / size <= threshold:
            scores.append(float(scene.scores[prediction]))
            hits.append(False)
    return scores, hits, missed, len(evaluated) > 0, len(predictions) > 0


def average_precision(scores: np.ndarray, hits: np.ndarray, missed: int) -> float:
    """AP of one class at one threshold (rule 6).

    scores: (M,) float64 of the true and false positives; hits: (M,) bool, True for a true
    positive; missed: ground-truth instances without a match. The curve has a point per unique
    score (precision and recall of everything scored at least that) and the artificial point
    (recall 0, precision 1); AP = sum of precision x midpoint-rule recall step.
    """
    if scores.size == 0:
        return 0.0
    unique, inverse = np.unique(scores, return_inverse=True)  # ascending
    true_at = np.bincount(inverse, weights=hits.astype(np.float64), minlength=len(unique))
    all_at = np.bincount(inverse, minlength=len(unique))
    true_from = np.cumsum(true_at[::-1])[::-1]  # true positives scored >= each unique score
    all_from = np.cumsum(all_at[::-1])[::-1]
    precision = np.append(true_from / all_from, 1.0)
    recall = np.append(true_from / (hits.sum() + missed), 0.0)
    widths = (np.append(recall[0], recall[:-1]) - np.append(recall[1:], 0.0)) / 2
    return float(np.dot(precision, widths))
