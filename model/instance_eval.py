"""ScanNet's instance benchmark: AP over IoU 0.50:0.95 (step 0.05), AP50 and AP25, per thing class.

The procedure of ScanNet's `evaluate_semantic_instance.py`, written afresh:

- ground-truth instances of a thing class with fewer than `min_region_size` points are ignored
  (ScanNet: 100); a prediction matched to one of them counts neither way;
- per class and IoU threshold, predictions of all scenes in descending score are matched
  greedily to the unmatched ground truth of their scene with the highest IoU >= threshold:
  a match is a true positive, anything else a false positive;
- AP is the area under the precision envelope (all-point interpolation over recall);
- classes with no ground truth are left out of the means (NaN); a class with ground truth and
  no prediction has AP 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from model.instance import InstancePrediction

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)  # 0.6, not 0.6000000000000001


@dataclass
class InstanceEvaluator:
    """Accumulates scenes, then `result()` gives AP, AP50, AP25 and per-class values."""

    thing_classes: tuple[int, ...]
    min_region_size: int = 100
    _scenes: list[tuple[dict, list[InstancePrediction]]] = field(default_factory=list)

    def add(self, semantic: np.ndarray, instance: np.ndarray,
            predictions: list[InstancePrediction]) -> None:
        """semantic, instance: (N,) ground truth of one scene (instance -1 = none)."""
        truth = {}
        for instance_id in np.unique(instance[instance >= 0]):
            points = np.flatnonzero(instance == instance_id)
            label = int(np.bincount(semantic[points][semantic[points] >= 0]).argmax()) \
                if (semantic[points] >= 0).any() else -1
            if label in self.thing_classes:
                truth[int(instance_id)] = (label, points)
        self._scenes.append((truth, predictions))

    def result(self) -> dict:
        thresholds = list(IOU_THRESHOLDS) + [0.25]
        table = np.full((len(self.thing_classes), len(thresholds)), np.nan)
        for c, label in enumerate(self.thing_classes):
            for t, threshold in enumerate(thresholds):
                table[c, t] = self._class_ap(label, threshold)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a class with no truth
            per_class_ap = np.nanmean(table[:, :len(IOU_THRESHOLDS)], axis=1) \
                if not np.isnan(table).all() else table[:, 0]
            mean = lambda values: float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")  # noqa: E731
            return {
                "ap": mean(per_class_ap),
                "ap50": mean(table[:, 0]),
                "ap25": mean(table[:, -1]),
                "class_ap": {label: _none_if_nan(v) for label, v in zip(self.thing_classes, per_class_ap)},
                "class_ap50": {label: _none_if_nan(v) for label, v in zip(self.thing_classes, table[:, 0])},
            }

    def _class_ap(self, label: int, threshold: float) -> float:
        scored: list[tuple[float, bool]] = []  # (score, true positive), ignored ones left out
        n_truth = 0
        for truth, predictions in self._scenes:
            gts = [(gid, points) for gid, (gl, points) in truth.items() if gl == label]
            big = [len(points) >= self.min_region_size for _, points in gts]
            n_truth += sum(big)
            matched = [False] * len(gts)
            preds = sorted((p for p in predictions if p.label == label), key=lambda p: -p.score)
            for prediction in preds:
                best, best_iou = -1, threshold
                for g, (_, points) in enumerate(gts):
                    if matched[g]:
                        continue
                    iou = _iou(prediction.points, points)
                    if iou >= best_iou:
                        best, best_iou = g, iou
                if best >= 0:
                    matched[best] = True
                    if big[best]:
                        scored.append((prediction.score, True))
                    continue  # matched to an ignored small instance: neither way
                scored.append((prediction.score, False))
        if n_truth == 0:
            return float("nan")
        if not scored:
            return 0.0
        # global order by score over scenes (greedy matching above is per scene, as ScanNet's)
        scored.sort(key=lambda item: -item[0])
        hits = np.array([tp for _, tp in scored], dtype=float)
        true_positives = np.cumsum(hits)
        precision = true_positives / np.arange(1, len(hits) + 1)
        recall = true_positives / n_truth
        return average_precision(precision, recall)


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope, all-point interpolation (recall non-decreasing)."""
    recall = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    precision = np.concatenate([[1.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    intersection = np.intersect1d(a, b, assume_unique=True).size
    return intersection / (a.size + b.size - intersection)


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
